//! ARI wire types: the events callgate reacts to and the REST bodies it reads.
//!
//! Invariant: decoding is lenient. Unknown event types become [`Event::Other`], unknown fields are
//! ignored and optional fields default, so a newer Asterisk never breaks the stream. Timestamps stay in
//! Asterisk's own string form (`2026-11-22T10:38:11.582+0000`). Types that can carry caller-typed digits
//! or caller identity have a redacting `Debug`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A channel's state as Asterisk names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum ChannelState {
    Down,
    Rsrved,
    OffHook,
    Dialing,
    Ring,
    Ringing,
    Up,
    Busy,
    #[serde(rename = "Dialing Offhook")]
    DialingOffhook,
    #[serde(rename = "Pre-ring")]
    PreRing,
    #[default]
    #[serde(other)]
    Unknown,
}

/// Caller or connected-line identity. `Debug` hides both values (they identify a person).
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct CallerId {
    pub name: String,
    pub number: String,
}

impl fmt::Debug for CallerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallerId(<redacted>)")
    }
}

/// Where a channel is in the dialplan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Dialplan {
    pub context: String,
    pub exten: String,
    pub priority: i64,
    pub app_name: String,
    pub app_data: String,
}

/// An ARI channel snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Channel {
    pub id: String,
    pub name: String,
    pub state: ChannelState,
    pub caller: CallerId,
    pub connected: CallerId,
    pub accountcode: String,
    pub dialplan: Dialplan,
    pub creationtime: String,
    pub language: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channelvars: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_id: Option<String>,
}

/// Playback state (`queued`, `playing`, …, `done`, `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaybackState {
    Queued,
    Playing,
    Continuing,
    Paused,
    Done,
    Failed,
    #[default]
    #[serde(other)]
    Unknown,
}

/// A playback, as returned by `play` and carried by `Playback*` events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Playback {
    pub id: String,
    pub media_uri: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_media_uri: Option<String>,
    /// `channel:<id>` or `bridge:<id>`.
    pub target_uri: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    pub state: PlaybackState,
}

impl Playback {
    /// The channel id when the playback targets a channel.
    pub fn target_channel(&self) -> Option<&str> {
        self.target_uri.strip_prefix("channel:")
    }
}

/// A bridge snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Bridge {
    pub id: String,
    pub technology: String,
    pub bridge_type: String,
    pub bridge_class: String,
    pub creator: String,
    pub name: String,
    pub channels: Vec<String>,
    pub creationtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_mode: Option<String>,
}

/// A Stasis application (`GET /applications/{app}`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Application {
    pub name: String,
    pub channel_ids: Vec<String>,
    pub bridge_ids: Vec<String>,
    pub endpoint_ids: Vec<String>,
    pub device_names: Vec<String>,
    pub events_allowed: Vec<serde_json::Value>,
    pub events_disallowed: Vec<serde_json::Value>,
}

/// `GET /asterisk/info` (only what callgate reads).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct AsteriskInfo {
    pub system: SystemInfo,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct SystemInfo {
    /// e.g. `22.10.1`.
    pub version: String,
    pub entity_id: String,
}

/// `GET /sounds/{id}`: a sound file and the languages and formats it exists in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Sound {
    pub id: String,
    pub formats: Vec<SoundFormat>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct SoundFormat {
    pub language: String,
    pub format: String,
}

/// `GET /channels/{id}/variable` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct Variable {
    pub value: String,
}

/// Error body of every non-2xx ARI answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ErrorBody {
    pub message: String,
}

/// `StasisStart`: a channel entered the application.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct StasisStart {
    #[serde(default)]
    pub timestamp: String,
    /// Arguments after the application name in `Stasis(app,…)` (or originate `appArgs`).
    #[serde(default)]
    pub args: Vec<String>,
    pub channel: Channel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_channel: Option<Channel>,
}

/// Events that carry only a channel (`StasisEnd`, `ChannelStateChange`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ChannelEvent {
    #[serde(default)]
    pub timestamp: String,
    pub channel: Channel,
}

/// `ChannelDtmfReceived` (sent at the end of a digit). `Debug` hides the digit.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct DtmfReceived {
    #[serde(default)]
    pub timestamp: String,
    /// `0-9`, `A-D`, `*` or `#`. Part of a personal number: never log it.
    pub digit: String,
    #[serde(default)]
    pub duration_ms: u32,
    pub channel: Channel,
}

impl fmt::Debug for DtmfReceived {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DtmfReceived")
            .field("digit", &"<redacted>")
            .field("duration_ms", &self.duration_ms)
            .field("channel", &self.channel.id)
            .finish()
    }
}

/// `ChannelHangupRequest`. With `soft: true` the `cause` is a soft-hangup flag (32 = explicit),
/// not a Q.850 cause.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct HangupRequest {
    #[serde(default)]
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft: Option<bool>,
    pub channel: Channel,
}

/// `ChannelDestroyed` (only while subscribed; not after `StasisEnd` of a dialplan channel).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ChannelDestroyed {
    #[serde(default)]
    pub timestamp: String,
    #[serde(default)]
    pub cause: i64,
    #[serde(default)]
    pub cause_txt: String,
    pub channel: Channel,
}

/// `PlaybackStarted` / `PlaybackFinished`: no channel field; correlate by `playback.id`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PlaybackEvent {
    #[serde(default)]
    pub timestamp: String,
    pub playback: Playback,
}

/// `ChannelVarset`. `Debug` hides the value (it may be a result or identity field).
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Varset {
    #[serde(default)]
    pub timestamp: String,
    #[serde(default)]
    pub variable: String,
    #[serde(default)]
    pub value: String,
    /// Absent for a global variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
}

impl fmt::Debug for Varset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Varset")
            .field("variable", &self.variable)
            .field("value", &"<redacted>")
            .field("channel", &self.channel.as_ref().map(|c| c.id.as_str()))
            .finish()
    }
}

/// `ChannelEnteredBridge` / `ChannelLeftBridge`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BridgeEvent {
    #[serde(default)]
    pub timestamp: String,
    pub bridge: Bridge,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
}

/// `ApplicationReplaced`: another connection took the application over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ApplicationReplaced {
    #[serde(default)]
    pub timestamp: String,
    #[serde(default)]
    pub application: String,
}

/// One message from the events websocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    StasisStart(StasisStart),
    StasisEnd(ChannelEvent),
    ChannelDtmfReceived(DtmfReceived),
    ChannelHangupRequest(HangupRequest),
    ChannelDestroyed(ChannelDestroyed),
    ChannelStateChange(ChannelEvent),
    ChannelVarset(Varset),
    PlaybackStarted(PlaybackEvent),
    PlaybackFinished(PlaybackEvent),
    ChannelEnteredBridge(BridgeEvent),
    ChannelLeftBridge(BridgeEvent),
    ApplicationReplaced(ApplicationReplaced),
    /// Any event type callgate does not use (`Dial`, `ChannelDialplan`, `BridgeDestroyed`, …).
    Other {
        kind: String,
    },
}

/// Why a frame could not be decoded. Carries no part of the frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is not a JSON object with a string `type`")]
    NotAnEvent,
    #[error("event {kind} is missing required fields or has wrong types")]
    Invalid { kind: String },
}

impl Event {
    /// The event's `type` string.
    pub fn kind(&self) -> &str {
        match self {
            Event::StasisStart(_) => "StasisStart",
            Event::StasisEnd(_) => "StasisEnd",
            Event::ChannelDtmfReceived(_) => "ChannelDtmfReceived",
            Event::ChannelHangupRequest(_) => "ChannelHangupRequest",
            Event::ChannelDestroyed(_) => "ChannelDestroyed",
            Event::ChannelStateChange(_) => "ChannelStateChange",
            Event::ChannelVarset(_) => "ChannelVarset",
            Event::PlaybackStarted(_) => "PlaybackStarted",
            Event::PlaybackFinished(_) => "PlaybackFinished",
            Event::ChannelEnteredBridge(_) => "ChannelEnteredBridge",
            Event::ChannelLeftBridge(_) => "ChannelLeftBridge",
            Event::ApplicationReplaced(_) => "ApplicationReplaced",
            Event::Other { kind } => kind,
        }
    }

    /// The channel id the event is about, when it names one. Playback events name none (use the
    /// playback's target).
    pub fn channel_id(&self) -> Option<&str> {
        match self {
            Event::StasisStart(e) => Some(&e.channel.id),
            Event::StasisEnd(e) | Event::ChannelStateChange(e) => Some(&e.channel.id),
            Event::ChannelDtmfReceived(e) => Some(&e.channel.id),
            Event::ChannelHangupRequest(e) => Some(&e.channel.id),
            Event::ChannelDestroyed(e) => Some(&e.channel.id),
            Event::ChannelVarset(e) => e.channel.as_ref().map(|c| c.id.as_str()),
            Event::ChannelEnteredBridge(e) | Event::ChannelLeftBridge(e) => {
                e.channel.as_ref().map(|c| c.id.as_str())
            }
            Event::PlaybackStarted(e) | Event::PlaybackFinished(e) => e.playback.target_channel(),
            Event::ApplicationReplaced(_) | Event::Other { .. } => None,
        }
    }
}

/// Decodes one websocket text frame: reads `type` first, then the typed body straight from the text
/// (no intermediate `serde_json::Value`: events carry whole channel snapshots, and this runs for every
/// event of every call).
pub fn decode(text: &str) -> Result<Event, DecodeError> {
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    let kind = serde_json::from_str::<Kind<'_>>(text)
        .map_err(|_| DecodeError::NotAnEvent)?
        .kind;
    fn typed<T: serde::de::DeserializeOwned>(text: &str, kind: &str) -> Result<T, DecodeError> {
        serde_json::from_str(text).map_err(|_| DecodeError::Invalid {
            kind: kind.to_owned(),
        })
    }
    let event = match kind.as_ref() {
        "StasisStart" => Event::StasisStart(typed(text, &kind)?),
        "StasisEnd" => Event::StasisEnd(typed(text, &kind)?),
        "ChannelDtmfReceived" => Event::ChannelDtmfReceived(typed(text, &kind)?),
        "ChannelHangupRequest" => Event::ChannelHangupRequest(typed(text, &kind)?),
        "ChannelDestroyed" => Event::ChannelDestroyed(typed(text, &kind)?),
        "ChannelStateChange" => Event::ChannelStateChange(typed(text, &kind)?),
        "ChannelVarset" => Event::ChannelVarset(typed(text, &kind)?),
        "PlaybackStarted" => Event::PlaybackStarted(typed(text, &kind)?),
        "PlaybackFinished" => Event::PlaybackFinished(typed(text, &kind)?),
        "ChannelEnteredBridge" => Event::ChannelEnteredBridge(typed(text, &kind)?),
        "ChannelLeftBridge" => Event::ChannelLeftBridge(typed(text, &kind)?),
        "ApplicationReplaced" => Event::ApplicationReplaced(typed(text, &kind)?),
        _ => Event::Other {
            kind: kind.into_owned(),
        },
    };
    Ok(event)
}
