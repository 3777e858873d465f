//! The fake Asterisk's state: channels, playbacks, bridges, the application's owner socket, and
//! the operations REST handlers and scripted callers perform on them.
//!
//! Invariant: all state lives in one `State` behind one mutex that is never held across `.await`;
//! every change bumps a `watch` counter so waiters re-check instead of sleeping. Events go only to
//! the socket that currently owns the application; with no owner they are dropped, as Asterisk does.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

use super::{ChannelEnd, Direction, Origination, Party, RestEntry, SimOptions};
use crate::pbx::ari::wire::{
    Bridge, CallerId, Channel, ChannelState, Dialplan, Playback, PlaybackState,
};

pub(super) const NO_CHANNEL: &str = "Channel not found";
pub(super) const NOT_IN_STASIS: &str = "Channel not in Stasis application";
pub(super) const INVALID_STATE: &str = "Channel in invalid state";
pub(super) const NO_PLAYBACK: &str = "Playback not found";
pub(super) const NO_VARIABLE: &str = "Provided variable was not found";
pub(super) const NO_BRIDGE: &str = "Bridge not found";

/// A REST answer: status and optional JSON body.
pub(super) type Reply = (u16, Option<Value>);

pub(super) fn error(status: u16, message: &str) -> Reply {
    (status, Some(json!({ "message": message })))
}

/// Frames for one websocket's writer.
#[derive(Debug)]
pub(super) enum WsOut {
    Text(String),
    Close,
    /// Stop reading and writing but keep the TCP connection open (a hung peer).
    Stall,
}

pub(super) enum Owner {
    None,
    Socket {
        id: u64,
        tx: mpsc::UnboundedSender<WsOut>,
    },
    /// Another (simulated) instance owns the application; its events go nowhere.
    Phantom,
}

pub(super) struct Chan {
    pub snapshot: Channel,
    /// The application the channel was created into when it is not the main one.
    pub other_app: Option<String>,
    pub in_stasis: bool,
    pub vars: BTreeMap<String, String>,
    pub moh: bool,
    pub moh_starts: u64,
    pub media_started: Vec<String>,
    pub current: Option<String>,
    pub queue: VecDeque<String>,
    pub bridge: Option<String>,
    /// `CHANNEL(linkedid)`: its own id, or the originator's linkedid.
    pub linkedid: String,
    /// Originated by the application: its events keep coming after `StasisEnd` (or without ever
    /// entering Stasis, for the `;2` half of a Local pair), up to `ChannelDestroyed`.
    pub subscribed: bool,
    /// The other half of a Local pair.
    pub peer: Option<String>,
    pub mute_in: bool,
    pub mute_out: bool,
    /// Bridge features of the current bridge membership (`addChannel` `absorbDTMF` / `mute`).
    pub absorb_dtmf: bool,
    pub bridge_mute: bool,
}

/// A Local agent leg originated into an agent context: `a` (`;1`, in the application) and `b`
/// (`;2`, running the simulated queue).
#[derive(Debug, Clone)]
pub(super) struct Leg {
    pub a: String,
    pub b: String,
    /// The second `appArgs` value (`agent,<call>`), when given.
    pub call: Option<String>,
    pub context: String,
    /// The interface of the agent who answered.
    pub agent: Option<String>,
    pub ended: bool,
}

impl Leg {
    pub fn matches(&self, key: &str) -> bool {
        self.a == key || self.b == key || self.call.as_deref() == Some(key)
    }
}

/// `POST /channels` as the fake got it, after parameter parsing.
pub(super) struct OriginateReq<'a> {
    pub id: String,
    pub other: Option<&'a str>,
    pub endpoint: &'a str,
    pub app_args: Option<&'a str>,
    pub into_app: bool,
    /// The `app` parameter: another name than the fake's own puts the channel in that application.
    pub app: Option<&'a str>,
    /// `POST /channels` (dials at once) rather than `/channels/create`.
    pub dial: bool,
    pub caller_id: Option<&'a str>,
    pub originator: Option<&'a str>,
    pub variables: BTreeMap<String, String>,
}

pub(super) struct Pb {
    pub playback: Playback,
    pub channel: String,
}

pub(super) struct State {
    pub owner: Owner,
    /// Replaced sockets stay open (Asterisk does not close them) but get nothing more.
    pub replaced: Vec<(u64, mpsc::UnboundedSender<WsOut>)>,
    /// Sockets of other application names: `(socket id, app, writer)`.
    pub other_sockets: Vec<(u64, String, mpsc::UnboundedSender<WsOut>)>,
    pub connections: u64,
    pub pings: u64,
    /// Events produced while no socket owned the application (lost, as in Asterisk).
    pub dropped_events: u64,
    /// Whether new websockets are accepted.
    pub accepting: bool,
    pub next_conn: u64,
    pub next_call: u64,
    pub channels: BTreeMap<String, Chan>,
    pub ended: BTreeMap<String, ChannelEnd>,
    pub playbacks: BTreeMap<String, Pb>,
    pub bridges: BTreeMap<String, Bridge>,
    /// Agent legs in the order they were originated.
    pub legs: Vec<Leg>,
    pub originations: Vec<Origination>,
    /// Counter behind Local channel names (`Local/…-0000000N;1`).
    pub next_local: u64,
    pub rest_log: Vec<RestEntry>,
    pub rest_delay: Duration,
    /// Event types the application filtered out (`PUT /applications/{app}/eventFilter`).
    pub disallowed: std::collections::BTreeSet<String>,
}

pub(super) struct Shared {
    pub opts: SimOptions,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

/// Asterisk's timestamp form: `2026-11-22T10:38:11.582+0000`.
pub(super) fn timestamp() -> String {
    // The fake stamps its wire messages with wall-clock time like Asterisk does; nothing in the
    // simulator or in callgate decides anything on these values.
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now();
    let now = time::OffsetDateTime::from(now);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]+0000"
    );
    now.format(&format).unwrap_or_default()
}

impl Shared {
    pub fn new(opts: SimOptions) -> Arc<Shared> {
        Arc::new(Shared {
            opts,
            state: Mutex::new(State {
                owner: Owner::None,
                replaced: Vec::new(),
                other_sockets: Vec::new(),
                connections: 0,
                pings: 0,
                dropped_events: 0,
                accepting: true,
                next_conn: 0,
                next_call: 0,
                channels: BTreeMap::new(),
                ended: BTreeMap::new(),
                playbacks: BTreeMap::new(),
                bridges: BTreeMap::new(),
                legs: Vec::new(),
                originations: Vec::new(),
                next_local: 0,
                rest_log: Vec::new(),
                rest_delay: Duration::ZERO,
                disallowed: Default::default(),
            }),
            changed: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state and wakes every waiter.
    pub fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        let result = {
            let mut guard = self.lock();
            let mut ctx = Ctx {
                shared: self,
                st: &mut guard,
            };
            f(&mut ctx)
        };
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        result
    }

    /// Reads the state without waking anyone.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// Waits until `f` returns `Some`, re-checking after every state change.
    pub async fn wait_until<R>(&self, mut f: impl FnMut(&State) -> Option<R>) -> R {
        let mut rx = self.changed.subscribe();
        loop {
            if let Some(r) = f(&self.lock()) {
                return r;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`; unreachable, but never spin.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// State plus the handle needed to spawn timers; what every operation works on.
pub(super) struct Ctx<'a> {
    pub shared: &'a Arc<Shared>,
    pub st: &'a mut State,
}

impl Ctx<'_> {
    fn opts(&self) -> &SimOptions {
        &self.shared.opts
    }

    /// Sends one event to the owning socket (dropped when there is none).
    pub fn emit(&mut self, kind: &str, fields: Value) {
        if self.st.disallowed.contains(kind) {
            return;
        }
        let Owner::Socket { tx, .. } = &self.st.owner else {
            self.st.dropped_events += 1;
            return;
        };
        let mut obj = Map::new();
        obj.insert("type".into(), kind.into());
        obj.insert("timestamp".into(), timestamp().into());
        if let Value::Object(fields) = fields {
            obj.extend(fields);
        }
        obj.insert("asterisk_id".into(), self.opts().asterisk_id.clone().into());
        obj.insert("application".into(), self.opts().app.clone().into());
        let _ = tx.send(WsOut::Text(Value::Object(obj).to_string()));
    }

    fn channel_json(&self, id: &str) -> Value {
        self.st
            .channels
            .get(id)
            .and_then(|c| serde_json::to_value(&c.snapshot).ok())
            .unwrap_or(Value::Null)
    }

    fn emit_channel(&mut self, kind: &str, id: &str, mut extra: Value) {
        let channel = self.channel_json(id);
        if let Value::Object(map) = &mut extra {
            map.insert("channel".into(), channel);
        }
        let other = self.st.channels.get(id).and_then(|c| c.other_app.clone());
        match other {
            Some(app) => self.emit_other(&app, kind, extra),
            None => self.emit(kind, extra),
        }
    }

    /// Sends one event to the sockets of another application name (none: dropped).
    fn emit_other(&mut self, app: &str, kind: &str, fields: Value) {
        let mut obj = Map::new();
        obj.insert("type".into(), kind.into());
        obj.insert("timestamp".into(), timestamp().into());
        if let Value::Object(fields) = fields {
            obj.extend(fields);
        }
        obj.insert("application".into(), app.into());
        let text = Value::Object(obj).to_string();
        for (_, name, tx) in &self.st.other_sockets {
            if name == app {
                let _ = tx.send(WsOut::Text(text.clone()));
            }
        }
    }

    /// A websocket for an application name other than the main one; it takes nothing over.
    pub fn connect_other_socket(&mut self, app: &str, tx: mpsc::UnboundedSender<WsOut>) -> u64 {
        self.st.next_conn += 1;
        let id = self.st.next_conn;
        self.st.other_sockets.push((id, app.to_owned(), tx));
        id
    }

    /// Another client holds the main application while none of ours is connected.
    pub fn hold_elsewhere(&mut self) {
        if matches!(self.st.owner, Owner::None) {
            self.st.owner = Owner::Phantom;
        }
    }

    fn other_app_active(&self, app: &str) -> bool {
        self.st.other_sockets.iter().any(|(_, name, _)| name == app)
    }

    /// A new websocket for the application: the previous owner gets `ApplicationReplaced`.
    pub fn connect_socket(&mut self, tx: mpsc::UnboundedSender<WsOut>) -> u64 {
        self.replace_owner();
        self.st.next_conn += 1;
        let id = self.st.next_conn;
        self.st.owner = Owner::Socket { id, tx };
        self.st.connections += 1;
        id
    }

    /// Sends `ApplicationReplaced` to the owning socket and parks it.
    pub fn replace_owner(&mut self) {
        if let Owner::Socket { id, tx } = std::mem::replace(&mut self.st.owner, Owner::Phantom) {
            let msg = json!({
                "type": "ApplicationReplaced",
                "timestamp": timestamp(),
                "application": self.opts().app,
            });
            let _ = tx.send(WsOut::Text(msg.to_string()));
            self.st.replaced.push((id, tx));
        }
    }

    pub fn socket_closed(&mut self, id: u64) {
        self.st.other_sockets.retain(|(oid, _, _)| *oid != id);
        if matches!(self.st.owner, Owner::Socket { id: owner, .. } if owner == id) {
            self.st.owner = Owner::None;
        }
        self.st.replaced.retain(|(rid, _)| *rid != id);
    }

    pub fn drop_socket(&mut self) {
        if let Owner::Socket { tx, .. } = std::mem::replace(&mut self.st.owner, Owner::None) {
            let _ = tx.send(WsOut::Close);
        }
    }

    pub fn stall_socket(&mut self) {
        if let Owner::Socket { tx, .. } = &self.st.owner {
            let _ = tx.send(WsOut::Stall);
        }
    }

    pub fn send_raw(&mut self, text: &str) {
        if let Owner::Socket { tx, .. } = &self.st.owner {
            let _ = tx.send(WsOut::Text(text.to_owned()));
        }
    }

    fn end(&mut self, id: &str, continued_to: Option<(String, String, u32)>, by: Option<Party>) {
        let variables = self
            .st
            .channels
            .get(id)
            .map(|c| c.vars.clone())
            .unwrap_or_default();
        self.st.ended.entry(id.to_owned()).or_insert(ChannelEnd {
            continued_to,
            hung_up_by: by,
            stasis_failed: false,
            variables,
        });
    }

    /// An inbound call reaches `Stasis(app, args…)`. Without an active application it fails at once
    /// (`STASISSTATUS=FAILED`) and never appears in the application.
    pub fn inbound(&mut self, caller: &super::Caller) -> (String, bool) {
        self.st.next_call += 1;
        let n = self.st.next_call;
        let id = format!("{}-1.{n}", self.opts().system_name);
        let app_data = std::iter::once(self.opts().app.clone())
            .chain(caller.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(",");
        let ts = timestamp();
        let identity = CallerId {
            name: caller.name.clone(),
            number: caller.number.clone(),
        };
        let snapshot = Channel {
            id: id.clone(),
            name: format!("PJSIP/sim-{n:08x}"),
            state: ChannelState::Ring,
            caller: identity,
            connected: CallerId::default(),
            accountcode: String::new(),
            dialplan: Dialplan {
                context: self.opts().inbound_context.clone(),
                exten: self.opts().inbound_exten.clone(),
                priority: 2,
                app_name: "Stasis".into(),
                app_data,
            },
            creationtime: ts,
            language: caller.language.clone(),
            channelvars: None,
            protocol_id: Some(format!("sim-{n}@127.0.0.1")),
        };
        if matches!(self.st.owner, Owner::None) {
            self.st.ended.insert(
                id.clone(),
                ChannelEnd {
                    continued_to: None,
                    hung_up_by: None,
                    stasis_failed: true,
                    variables: BTreeMap::from([("STASISSTATUS".into(), "FAILED".into())]),
                },
            );
            return (id, false);
        }
        self.st
            .channels
            .insert(id.clone(), new_chan(snapshot, true));
        let args = caller.args.clone();
        self.emit_channel("StasisStart", &id, json!({ "args": args }));
        (id, true)
    }

    /// Common checks of channel control calls: exists (404), in Stasis (409), and optionally a
    /// state that accepts media (412).
    pub fn control(&self, id: &str, needs_media_state: bool) -> Result<(), Reply> {
        let chan = self
            .st
            .channels
            .get(id)
            .ok_or_else(|| error(404, NO_CHANNEL))?;
        if !chan.in_stasis {
            return Err(error(409, NOT_IN_STASIS));
        }
        if needs_media_state
            && matches!(
                chan.snapshot.state,
                ChannelState::Down | ChannelState::Rsrved | ChannelState::Ringing
            )
        {
            return Err(error(412, INVALID_STATE));
        }
        Ok(())
    }

    fn chan(&mut self, id: &str) -> Option<&mut Chan> {
        self.st.channels.get_mut(id)
    }

    pub fn set_state(&mut self, id: &str, state: ChannelState) {
        let Some(chan) = self.chan(id) else { return };
        if chan.snapshot.state == state {
            return;
        }
        chan.snapshot.state = state;
        self.emit_channel("ChannelStateChange", id, json!({}));
    }

    pub fn play(&mut self, id: &str, pb_id: &str, media: &str, lang: Option<&str>) -> Reply {
        if let Err(e) = self.control(id, true) {
            return e;
        }
        if self.st.playbacks.contains_key(pb_id) {
            return error(409, "Playback with the given ID already exists");
        }
        let language = lang.map(str::to_owned).or_else(|| {
            self.st
                .channels
                .get(id)
                .map(|c| c.snapshot.language.clone())
        });
        let playback = Playback {
            id: pb_id.to_owned(),
            media_uri: media.to_owned(),
            next_media_uri: None,
            target_uri: format!("channel:{id}"),
            language,
            state: PlaybackState::Queued,
        };
        let body = serde_json::to_value(&playback).ok();
        self.st.playbacks.insert(
            pb_id.to_owned(),
            Pb {
                playback,
                channel: id.to_owned(),
            },
        );
        if let Some(chan) = self.chan(id) {
            chan.queue.push_back(pb_id.to_owned());
            if chan.current.is_none() {
                self.start_next(id);
            }
        }
        (201, body)
    }

    fn start_next(&mut self, id: &str) {
        let Some(chan) = self.st.channels.get_mut(id) else {
            return;
        };
        let Some(pb_id) = chan.queue.pop_front() else {
            return;
        };
        chan.current = Some(pb_id.clone());
        let Some(pb) = self.st.playbacks.get_mut(&pb_id) else {
            return;
        };
        pb.playback.state = PlaybackState::Playing;
        let media = pb.playback.media_uri.clone();
        let body = json!({ "playback": pb.playback });
        if let Some(chan) = self.st.channels.get_mut(id) {
            chan.media_started.push(media.clone());
        }
        self.emit("PlaybackStarted", body);
        let missing = self.opts().missing_media.contains(&media);
        let (delay, outcome) = if missing {
            (Duration::ZERO, PlaybackState::Failed)
        } else {
            (self.opts().prompt_duration, PlaybackState::Done)
        };
        let shared = Arc::clone(self.shared);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            shared.with(|ctx| ctx.finish_playback(&pb_id, outcome));
        });
    }

    /// Ends a playback (timer, stop or cancel). Unknown ids are a no-op (already finished).
    pub fn finish_playback(&mut self, pb_id: &str, outcome: PlaybackState) {
        let Some(mut pb) = self.st.playbacks.remove(pb_id) else {
            return;
        };
        pb.playback.state = outcome;
        let channel = pb.channel.clone();
        let was_current = match self.st.channels.get_mut(&channel) {
            Some(chan) if chan.current.as_deref() == Some(pb_id) => {
                chan.current = None;
                true
            }
            Some(chan) => {
                chan.queue.retain(|q| q != pb_id);
                false
            }
            None => false,
        };
        self.emit("PlaybackFinished", json!({ "playback": pb.playback }));
        if was_current {
            self.start_next(&channel);
        }
    }

    pub fn stop_playback(&mut self, pb_id: &str) -> Reply {
        let Some(pb) = self.st.playbacks.get(pb_id) else {
            return error(404, NO_PLAYBACK);
        };
        let media = &pb.playback.media_uri;
        if ["number:", "digits:", "characters:"]
            .iter()
            .any(|p| media.starts_with(p))
        {
            return error(500, "Could not stop playback");
        }
        self.finish_playback(pb_id, PlaybackState::Done);
        (204, None)
    }

    /// Drops the channel's playbacks; the one playing reports `failed` when `report` is set.
    fn drop_playbacks(&mut self, id: &str, report: bool) {
        let Some(chan) = self.st.channels.get_mut(id) else {
            return;
        };
        let current = chan.current.take();
        let queued: Vec<String> = chan.queue.drain(..).collect();
        for pb in queued {
            self.st.playbacks.remove(&pb);
        }
        if let Some(pb) = current.and_then(|pb| self.st.playbacks.remove(&pb)) {
            if report {
                let mut playback = pb.playback;
                playback.state = PlaybackState::Failed;
                self.emit("PlaybackFinished", json!({ "playback": playback }));
            }
        }
    }

    pub fn moh(&mut self, id: &str, on: bool) -> Reply {
        if let Err(e) = self.control(id, true) {
            return e;
        }
        if let Some(chan) = self.chan(id) {
            if on && !chan.moh {
                chan.moh_starts += 1;
            }
            chan.moh = on;
        }
        (204, None)
    }

    pub fn set_variable(&mut self, id: &str, name: &str, value: &str) -> Reply {
        if let Err(e) = self.control(id, false) {
            return e;
        }
        if name.is_empty() {
            return error(400, "Variable name is required");
        }
        let plain = name.trim_start_matches('_');
        if let Some(chan) = self.chan(id) {
            chan.vars.insert(plain.to_owned(), value.to_owned());
        }
        self.emit_channel(
            "ChannelVarset",
            id,
            json!({ "variable": name, "value": value }),
        );
        (204, None)
    }

    /// `POST /channels/{id}/variables`: every name in the `variables` object, in one request.
    pub fn set_variables(&mut self, id: &str, vars: Option<&Value>) -> Reply {
        if let Err(e) = self.control(id, false) {
            return e;
        }
        let Some(vars) = vars.and_then(Value::as_object) else {
            return error(400, "The 'variables' field is required");
        };
        for (name, value) in vars {
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            self.set_variable(id, name, &value);
        }
        (204, None)
    }

    /// `GET /channels/{id}/variables?variables=a,b`: the ones that are set.
    pub fn get_variables(&self, id: &str, names: &str) -> Reply {
        if let Err(e) = self.control(id, false) {
            return e;
        }
        let Some(chan) = self.st.channels.get(id) else {
            return error(404, NO_CHANNEL);
        };
        let found: BTreeMap<&str, &String> = names
            .split(',')
            .filter_map(|n| chan.vars.get(n).map(|v| (n, v)))
            .collect();
        (200, Some(json!({ "variables": found })))
    }

    /// `GET /channels/{id}/variable`: any existing channel, in the application or not (Asterisk
    /// 22 answered it for the `;2` half of a Local pair, which never enters Stasis).
    pub fn get_variable(&self, id: &str, name: &str) -> Reply {
        if name.is_empty() {
            return error(400, "Variable name is required");
        }
        let Some(chan) = self.st.channels.get(id) else {
            return error(404, NO_CHANNEL);
        };
        let value = if let Some(inner) = function_args(name, "EVAL") {
            Some(self.substitute(chan, inner))
        } else {
            self.evaluate(chan, name)
        };
        match value {
            Some(value) => (200, Some(json!({ "value": value }))),
            None => error(404, NO_VARIABLE),
        }
    }

    /// One variable or the functions the fake knows (`DIALPLAN_EXISTS`, `CHANNEL(language)`).
    fn evaluate(&self, chan: &Chan, name: &str) -> Option<String> {
        if let Some(inner) = function_args(name, "DIALPLAN_EXISTS") {
            let mut parts = inner.split(',').map(str::trim);
            let context = parts.next().unwrap_or_default().to_owned();
            let exten = parts
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or("s")
                .to_owned();
            let priority = parts.next().and_then(|p| p.parse().ok()).unwrap_or(1);
            let exists = self.opts().dialplan.contains(&(context, exten, priority));
            Some(if exists { "1" } else { "0" }.to_owned())
        } else if name == "CHANNEL(language)" {
            Some(chan.snapshot.language.clone())
        } else if name == "CHANNEL(linkedid)" {
            Some(chan.linkedid.clone())
        } else if name == "CHANNEL(uniqueid)" {
            Some(chan.snapshot.id.clone())
        } else {
            chan.vars.get(name.trim_start_matches('_')).cloned()
        }
    }

    /// `EVAL`'s argument with every `${…}` replaced (unset: empty), as Asterisk substitutes it.
    fn substitute(&self, chan: &Chan, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                return out;
            };
            out.push_str(&self.evaluate(chan, &after[..end]).unwrap_or_default());
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }

    pub fn continue_in_dialplan(
        &mut self,
        id: &str,
        context: Option<&str>,
        extension: Option<&str>,
        priority: Option<u32>,
    ) -> Reply {
        if let Err(e) = self.control(id, true) {
            return e;
        }
        let Some(chan) = self.st.channels.get(id) else {
            return error(404, NO_CHANNEL);
        };
        let dp = &chan.snapshot.dialplan;
        let target = match (context, extension) {
            (None, None) => (
                dp.context.clone(),
                dp.exten.clone(),
                priority.unwrap_or(u32::try_from(dp.priority + 1).unwrap_or(1)),
            ),
            (Some(c), None) => (c.to_owned(), "s".to_owned(), priority.unwrap_or(1)),
            (c, Some(e)) => (
                c.map_or_else(|| dp.context.clone(), str::to_owned),
                e.to_owned(),
                priority.unwrap_or(1),
            ),
        };
        self.leave_stasis(id, Some(target), None);
        let shared = Arc::clone(self.shared);
        let linger = self.opts().dialplan_linger;
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            shared.with(|ctx| ctx.dialplan_done(&id));
        });
        (204, None)
    }

    /// A continued channel's dialplan ends: it is gone. One the application originated is
    /// reported destroyed, with the other half of its Local pair.
    fn dialplan_done(&mut self, id: &str) {
        let Some(chan) = self.st.channels.remove(id) else {
            return;
        };
        if chan.subscribed {
            self.st.channels.insert(id.to_owned(), chan);
            self.destroyed(id);
            let peer = self.st.channels.remove(id).and_then(|c| c.peer);
            if let Some(peer) = peer {
                if self.st.channels.contains_key(&peer) {
                    self.emit_channel("ChannelHangupRequest", &peer, json!({ "cause": 16 }));
                    self.destroyed(&peer);
                    self.end(&peer, None, Some(Party::Caller));
                    self.st.channels.remove(&peer);
                }
                for leg in self.st.legs.iter_mut().filter(|l| l.a == id) {
                    leg.ended = true;
                }
            }
        }
    }

    /// The channel leaves the application: out of its bridge, playbacks dropped, `StasisEnd`.
    fn leave_stasis(
        &mut self,
        id: &str,
        continued_to: Option<(String, String, u32)>,
        by: Option<Party>,
    ) {
        let in_stasis = self.st.channels.get(id).is_some_and(|c| c.in_stasis);
        if !in_stasis {
            return;
        }
        self.leave_bridge(id);
        self.drop_playbacks(id, by.is_some());
        self.end(id, continued_to, by);
        self.emit_channel("StasisEnd", id, json!({}));
        if let Some(chan) = self.chan(id) {
            chan.in_stasis = false;
            chan.moh = false;
        }
    }

    /// Hang-up from either side. From the app (`DELETE`) the request is soft with cause 32. A
    /// channel the application originated also gets `ChannelDestroyed`; a Local half takes its
    /// other half down with it.
    pub fn hangup(&mut self, id: &str, by: Party) -> Reply {
        let Some(chan) = self.st.channels.get(id) else {
            return error(404, NO_CHANNEL);
        };
        if chan.peer.is_some() {
            self.end_pair(id, by);
            return (204, None);
        }
        let subscribed = chan.subscribed;
        if chan.in_stasis || subscribed {
            self.emit_channel("ChannelHangupRequest", id, hangup_cause(by));
            self.stasis_exit(id, by);
        }
        if subscribed {
            self.destroyed(id);
        }
        self.st.channels.remove(id);
        (204, None)
    }

    /// A channel being hung up leaves the application, as Asterisk reports it: out of the
    /// bridge, `StasisEnd`, then `STASISSTATUS` for one that ran `Stasis()` as an application.
    fn stasis_exit(&mut self, id: &str, by: Party) {
        let Some(chan) = self.st.channels.get(id) else {
            return;
        };
        if !chan.in_stasis {
            return;
        }
        let subscribed = chan.subscribed;
        self.leave_stasis(id, None, Some(by));
        if subscribed {
            self.set_var_event(id, "STASISSTATUS", "SUCCESS");
        }
    }

    fn destroyed(&mut self, id: &str) {
        self.emit_channel(
            "ChannelDestroyed",
            id,
            json!({ "cause": 16, "cause_txt": "Normal Clearing" }),
        );
    }

    /// Ends both halves of a Local pair, `first` being the one hung up. Order as Asterisk 22 shows
    /// it: the `;1` half first leaves the application, then the `;2` half is hung up and both are
    /// destroyed; when the `;2` half ends first (its dialplan or the agent hung up), it is
    /// destroyed before the `;1` half is hung up.
    fn end_pair(&mut self, first: &str, by: Party) {
        let Some(second) = self.st.channels.get(first).and_then(|c| c.peer.clone()) else {
            return;
        };
        let first_is_a = self
            .st
            .channels
            .get(first)
            .is_some_and(|c| c.snapshot.name.ends_with(";1"));
        let (a, b) = if first_is_a {
            (first.to_owned(), second)
        } else {
            (second, first.to_owned())
        };
        if first_is_a {
            self.emit_channel("ChannelHangupRequest", &a, hangup_cause(by));
            self.stasis_exit(&a, by);
            self.emit_channel("ChannelHangupRequest", &b, json!({ "cause": 16 }));
            self.destroyed(&a);
            self.emit_channel(
                "ChannelHangupRequest",
                &b,
                json!({ "cause": 16, "soft": true }),
            );
            self.destroyed(&b);
        } else {
            self.emit_channel("ChannelHangupRequest", &b, hangup_cause(by));
            self.destroyed(&b);
            self.emit_channel("ChannelHangupRequest", &a, json!({ "cause": 16 }));
            self.stasis_exit(&a, Party::Caller);
            self.destroyed(&a);
        }
        let (by_a, by_b) = if first_is_a {
            (by, Party::Caller)
        } else {
            (Party::Caller, by)
        };
        self.end(&a, None, Some(by_a));
        self.end(&b, None, Some(by_b));
        self.st.channels.remove(&a);
        self.st.channels.remove(&b);
        for leg in self.st.legs.iter_mut().filter(|l| l.a == a) {
            leg.ended = true;
        }
    }

    fn bridge_event(&mut self, kind: &str, bridge: &str, id: &str) {
        let Some(b) = self.st.bridges.get(bridge) else {
            return;
        };
        let body = json!({ "bridge": b });
        self.emit_channel(kind, id, body);
    }

    /// Sets a variable Asterisk sets itself (no REST checks) and reports it.
    fn set_var_event(&mut self, id: &str, name: &str, value: &str) {
        let Some(chan) = self.chan(id) else { return };
        chan.vars.insert(name.to_owned(), value.to_owned());
        self.emit_channel(
            "ChannelVarset",
            id,
            json!({ "variable": name, "value": value }),
        );
    }

    fn leave_bridge(&mut self, id: &str) {
        let Some(chan) = self.chan(id) else { return };
        let Some(bridge) = chan.bridge.take() else {
            return;
        };
        chan.absorb_dtmf = false;
        chan.bridge_mute = false;
        let peered = chan.vars.contains_key("BRIDGEPEER");
        if let Some(b) = self.st.bridges.get_mut(&bridge) {
            b.channels.retain(|c| c != id);
        }
        if peered {
            self.set_var_event(id, "BRIDGEPEER", "");
        }
        self.bridge_event("ChannelLeftBridge", &bridge, id);
    }

    /// `POST /bridges/{id}` creates, or answers an existing bridge as Asterisk's create-or-update
    /// does: the same bridge when neither a type nor another name is given, else 500.
    /// `POST /bridges` with a taken `bridgeId` (`update: false`) cannot create it: 500.
    pub fn create_bridge(
        &mut self,
        id: &str,
        types: Option<&str>,
        name: &str,
        update: bool,
    ) -> Reply {
        if let Some(existing) = self.st.bridges.get(id) {
            if !update {
                return error(500, "Unable to create bridge");
            }
            if !name.is_empty() && name != existing.name {
                return error(500, "Changing bridge name is not implemented");
            }
            if types.is_some_and(|t| !t.is_empty()) {
                return error(
                    500,
                    "Supplying a bridge type when updating a bridge is not allowed.",
                );
            }
            return (200, serde_json::to_value(existing).ok());
        }
        let types = types.unwrap_or("mixing");
        let bridge = Bridge {
            id: id.to_owned(),
            technology: "simple_bridge".into(),
            bridge_type: if types.split(',').any(|t| t == "holding") {
                "holding"
            } else {
                "mixing"
            }
            .into(),
            bridge_class: "stasis".into(),
            creator: "Stasis".into(),
            name: name.to_owned(),
            channels: Vec::new(),
            creationtime: timestamp(),
            video_mode: Some("talker".into()),
        };
        let body = serde_json::to_value(&bridge).ok();
        self.st.bridges.insert(id.to_owned(), bridge);
        (200, body)
    }

    pub fn get_bridge(&self, id: &str) -> Reply {
        match self.st.bridges.get(id) {
            Some(b) => (200, serde_json::to_value(b).ok()),
            None => error(404, NO_BRIDGE),
        }
    }

    pub fn list_bridges(&self) -> Reply {
        let all: Vec<&Bridge> = self.st.bridges.values().collect();
        (200, serde_json::to_value(all).ok())
    }

    /// `POST /bridges/{id}/addChannel`: 404 unknown bridge, 400 unknown channel, 422 a channel not
    /// in the application. A channel in another bridge leaves it first. When the bridge has
    /// company, every member's `BRIDGEPEER` is (re)set, as Asterisk reports it.
    pub fn add_channel(&mut self, bridge: &str, id: &str, absorb_dtmf: bool, mute: bool) -> Reply {
        if !self.st.bridges.contains_key(bridge) {
            return error(404, NO_BRIDGE);
        }
        if id.is_empty() {
            return error(400, "Missing parameter channel");
        }
        match self.st.channels.get(id) {
            None => return error(400, NO_CHANNEL),
            Some(c) if !c.in_stasis => return error(422, NOT_IN_STASIS),
            Some(_) => {}
        }
        self.leave_bridge(id);
        if let Some(b) = self.st.bridges.get_mut(bridge) {
            b.channels.push(id.to_owned());
        }
        if let Some(chan) = self.chan(id) {
            chan.bridge = Some(bridge.to_owned());
            chan.absorb_dtmf = absorb_dtmf;
            chan.bridge_mute = mute;
        }
        self.bridge_event("ChannelEnteredBridge", bridge, id);
        let members = self
            .st
            .bridges
            .get(bridge)
            .map(|b| b.channels.clone())
            .unwrap_or_default();
        if members.len() > 1 {
            let names: BTreeMap<String, String> = members
                .iter()
                .filter_map(|m| {
                    let c = self.st.channels.get(m)?;
                    Some((m.clone(), c.snapshot.name.clone()))
                })
                .collect();
            for member in &members {
                let peers = names
                    .iter()
                    .filter(|(other, _)| *other != member)
                    .map(|(_, name)| name.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                self.set_var_event(member, "BRIDGEPEER", &peers);
            }
        }
        (204, None)
    }

    pub fn remove_channel(&mut self, bridge: &str, id: &str) -> Reply {
        if !self.st.bridges.contains_key(bridge) {
            return error(404, NO_BRIDGE);
        }
        match self.st.channels.get(id) {
            None => error(400, NO_CHANNEL),
            Some(c) if !c.in_stasis => error(422, NOT_IN_STASIS),
            Some(c) if c.bridge.as_deref() != Some(bridge) => {
                error(422, "Channel not in this bridge")
            }
            Some(_) => {
                self.leave_bridge(id);
                (204, None)
            }
        }
    }

    /// `DELETE /bridges/{id}`: members leave it (each stays in the application), then
    /// `BridgeDestroyed`; the bridge is gone at once (a second `DELETE` is 404).
    pub fn destroy_bridge(&mut self, bridge: &str) -> Reply {
        let Some(b) = self.st.bridges.get(bridge) else {
            return error(404, NO_BRIDGE);
        };
        for id in b.channels.clone() {
            self.leave_bridge(&id);
        }
        if let Some(b) = self.st.bridges.remove(bridge) {
            self.emit("BridgeDestroyed", json!({ "bridge": b }));
        }
        (204, None)
    }

    /// `POST /channels/{id}/mute` (`on`) and `DELETE …/mute`, `direction` `in`, `out` or `both`.
    pub fn mute(&mut self, id: &str, direction: Option<&str>, on: bool) -> Reply {
        if let Err(e) = self.control(id, true) {
            return e;
        }
        let direction = match direction.unwrap_or("both") {
            "in" => Direction::In,
            "out" => Direction::Out,
            "both" => Direction::Both,
            _ => return error(400, "Invalid direction specified"),
        };
        if let Some(chan) = self.chan(id) {
            if matches!(direction, Direction::In | Direction::Both) {
                chan.mute_in = on;
            }
            if matches!(direction, Direction::Out | Direction::Both) {
                chan.mute_out = on;
            }
        }
        (204, None)
    }

    /// `POST /channels[/{id}]` (originate) and `POST /channels/create`. With `app`, the channel
    /// enters the application (`Up` for originate, `Down` for create). A `Local/<exten>@<context>`
    /// originate into a context of [`SimOptions::agents`] dials both halves and runs the simulated
    /// queue on the `;2` half (see [`Ctx::dial_agent_leg`]); any other endpoint gets a plain
    /// channel, and the `;2` half of a Local originate stays outside Stasis, carrying the variables.
    pub fn originate(&mut self, req: OriginateReq<'_>) -> Reply {
        if req.endpoint.is_empty() {
            return error(400, "Endpoint must be specified");
        }
        let id = req.id.as_str();
        let other_app = req.app.filter(|a| *a != self.opts().app).map(str::to_owned);
        if self.st.channels.contains_key(id)
            || req.other.is_some_and(|o| self.st.channels.contains_key(o))
        {
            return error(409, "Channel with given unique ID already exists");
        }
        let linkedid = req
            .originator
            .and_then(|o| self.st.channels.get(o))
            .map_or_else(|| id.to_owned(), |c| c.linkedid.clone());
        if req.into_app && req.dial && other_app.is_none() {
            if let Some((exten, context)) = local_target(req.endpoint) {
                if self.opts().agents.contains_key(context) {
                    let (exten, context) = (exten.to_owned(), context.to_owned());
                    return self.dial_agent_leg(&req, &exten, &context, linkedid);
                }
            }
        }
        self.st.next_call += 1;
        let n = self.st.next_call;
        let ts = timestamp();
        let snapshot = Channel {
            id: id.to_owned(),
            name: format!("{}-{n:08x};1", req.endpoint),
            state: ChannelState::Down,
            dialplan: Dialplan {
                app_name: if req.into_app {
                    "Stasis".into()
                } else {
                    String::new()
                },
                app_data: if req.into_app {
                    std::iter::once(self.opts().app.as_str())
                        .chain(req.app_args)
                        .collect::<Vec<_>>()
                        .join(",")
                } else {
                    String::new()
                },
                ..Dialplan::default()
            },
            creationtime: ts,
            language: "en".into(),
            protocol_id: Some(String::new()),
            ..Channel::default()
        };
        let body = serde_json::to_value(&snapshot).ok();
        let vars: BTreeMap<String, String> = req
            .variables
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches('_').to_owned(), v))
            .collect();
        if let Some(other) = req.other {
            let mut half = snapshot.clone();
            half.id = other.to_owned();
            half.name = format!("{}-{n:08x};2", req.endpoint);
            half.state = ChannelState::Up;
            half.dialplan = Dialplan::default();
            let mut chan = new_chan(half, false);
            chan.vars = vars.clone();
            chan.linkedid = linkedid.clone();
            self.st.channels.insert(other.to_owned(), chan);
        }
        if let Some(other) = &other_app {
            if !self.other_app_active(other) {
                // Asterisk creates the channel, finds no such application and destroys it at once.
                return (200, body);
            }
        }
        let mut chan = new_chan(snapshot, req.into_app);
        chan.vars = vars;
        chan.linkedid = linkedid;
        chan.subscribed = req.into_app && other_app.is_none();
        chan.other_app = other_app;
        self.st.channels.insert(id.to_owned(), chan);
        if req.into_app {
            if req.dial {
                if let Some(chan) = self.chan(id) {
                    chan.snapshot.state = ChannelState::Up;
                }
            }
            let args: Vec<&str> = req
                .app_args
                .map(|a| a.split(',').collect())
                .unwrap_or_default();
            self.emit_channel("StasisStart", id, json!({ "args": args }));
        }
        (200, body)
    }

    /// The agent leg: answers 200 with the `;1` half (`Down`), then dials asynchronously as
    /// Asterisk does: the inheritable variables reach the `;2` half, which answers in the agent
    /// context and runs the queue; the `;1` half goes `Up` and enters the application with the
    /// `appArgs`. Both halves are subscribed.
    fn dial_agent_leg(
        &mut self,
        req: &OriginateReq<'_>,
        exten: &str,
        context: &str,
        linkedid: String,
    ) -> Reply {
        let a = req.id.clone();
        let b = req.other.map_or_else(|| format!("{a};2"), str::to_owned);
        self.st.next_local += 1;
        let n = self.st.next_local;
        let ts = timestamp();
        let caller = req.caller_id.map(parse_caller_id).unwrap_or_default();
        let app_data = std::iter::once(self.opts().app.as_str())
            .chain(req.app_args)
            .collect::<Vec<_>>()
            .join(",");
        let half_a = Channel {
            id: a.clone(),
            name: format!("Local/{exten}@{context}-{n:08x};1"),
            state: ChannelState::Down,
            caller: caller.clone(),
            connected: caller,
            dialplan: Dialplan {
                context: context.to_owned(),
                exten: exten.to_owned(),
                priority: 1,
                app_name: "AppDial2".into(),
                app_data: "(Outgoing Line)".into(),
            },
            creationtime: ts.clone(),
            language: "en".into(),
            protocol_id: Some(String::new()),
            ..Channel::default()
        };
        let half_b = Channel {
            id: b.clone(),
            name: format!("Local/{exten}@{context}-{n:08x};2"),
            state: ChannelState::Ring,
            dialplan: Dialplan {
                context: context.to_owned(),
                exten: exten.to_owned(),
                priority: 1,
                ..Dialplan::default()
            },
            creationtime: ts,
            language: "en".into(),
            protocol_id: Some(String::new()),
            ..Channel::default()
        };
        let body = serde_json::to_value(&half_a).ok();
        let mut chan_a = new_chan(half_a, false);
        chan_a.vars = req
            .variables
            .iter()
            .map(|(k, v)| (k.trim_start_matches('_').to_owned(), v.clone()))
            .collect();
        chan_a.linkedid = linkedid.clone();
        chan_a.subscribed = true;
        chan_a.peer = Some(b.clone());
        let mut chan_b = new_chan(half_b, false);
        chan_b.linkedid = linkedid;
        chan_b.subscribed = true;
        chan_b.peer = Some(a.clone());
        self.st.channels.insert(a.clone(), chan_a);
        self.st.channels.insert(b.clone(), chan_b);
        let args: Vec<String> = req
            .app_args
            .map(|s| s.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        self.st.legs.push(Leg {
            a: a.clone(),
            b: b.clone(),
            call: args.get(1).cloned(),
            context: context.to_owned(),
            agent: None,
            ended: false,
        });
        // Only inheritable variables cross to the `;2` half (`__X` stays inheritable, `_X` does
        // not).
        let inherited: Vec<(String, String)> = req
            .variables
            .iter()
            .filter(|(k, _)| k.starts_with('_'))
            .map(|(k, v)| {
                let name = if k.starts_with("__") {
                    k.clone()
                } else {
                    k.trim_start_matches('_').to_owned()
                };
                (name, v.clone())
            })
            .collect();
        let dialstring = format!("{exten}@{context}/n");
        let shared = Arc::clone(self.shared);
        tokio::spawn(async move {
            shared.with(|ctx| ctx.local_dialled(&a, &b, &inherited, &dialstring, &app_data, args));
        });
        (200, body)
    }

    /// The Local pair comes up (events in the order of the Asterisk 22 capture), then the queue
    /// behind the agent context starts ringing its members.
    fn local_dialled(
        &mut self,
        a: &str,
        b: &str,
        inherited: &[(String, String)],
        dialstring: &str,
        app_data: &str,
        args: Vec<String>,
    ) {
        if !self.st.channels.contains_key(a) || !self.st.channels.contains_key(b) {
            return;
        }
        for (name, value) in inherited {
            if let Some(chan) = self.chan(b) {
                chan.vars
                    .insert(name.trim_start_matches('_').to_owned(), value.clone());
            }
            self.emit_channel(
                "ChannelVarset",
                b,
                json!({ "variable": name, "value": value }),
            );
        }
        let identity = self
            .st
            .channels
            .get(a)
            .map(|c| c.snapshot.caller.clone())
            .unwrap_or_default();
        if let Some(chan) = self.chan(b) {
            chan.snapshot.caller = identity.clone();
        }
        self.emit_channel(
            "ChannelCallerId",
            b,
            json!({ "caller_presentation": 0,
                "caller_presentation_txt": "Presentation Allowed, Not Screened" }),
        );
        if let Some(chan) = self.chan(b) {
            chan.snapshot.connected = identity;
        }
        self.emit_channel("ChannelConnectedLine", b, json!({}));
        self.emit_dial(a, "", dialstring);
        self.dialplan_step(b, "Answer", "");
        self.set_state(b, ChannelState::Up);
        self.set_state(a, ChannelState::Up);
        self.emit_dial(a, "ANSWER", dialstring);
        if let Some(chan) = self.chan(a) {
            chan.snapshot.dialplan.app_name = "Stasis".into();
            chan.snapshot.dialplan.app_data = app_data.to_owned();
            chan.in_stasis = true;
        }
        self.set_var_event(a, "STASISSTATUS", "");
        self.emit_channel("StasisStart", a, json!({ "args": args }));
        let context = self
            .st
            .channels
            .get(b)
            .map(|c| c.snapshot.dialplan.context.clone())
            .unwrap_or_default();
        self.dialplan_step(b, "Queue", &context);
        self.ring_queue(a, &context);
    }

    fn emit_dial(&mut self, peer: &str, status: &str, dialstring: &str) {
        let peer = self.channel_json(peer);
        self.emit(
            "Dial",
            json!({ "dialstatus": status, "forward": "", "dialstring": dialstring, "peer": peer }),
        );
    }

    fn dialplan_step(&mut self, id: &str, app: &str, data: &str) {
        let Some(chan) = self.chan(id) else { return };
        chan.snapshot.dialplan.app_name = app.to_owned();
        chan.snapshot.dialplan.app_data = data.to_owned();
        self.emit_channel(
            "ChannelDialplan",
            id,
            json!({ "dialplan_app": app, "dialplan_app_data": data }),
        );
    }

    /// Arms the queue's timers: the first member to answer (smallest `answer_after`) wins unless
    /// the queue's timeout comes first, which ends the `;2` half.
    fn ring_queue(&mut self, a: &str, context: &str) {
        let Some(queue) = self.opts().agents.get(context) else {
            return;
        };
        let first = queue.members.iter().min_by_key(|m| m.answer_after).cloned();
        let timeout = queue.timeout;
        let (delay, answer) = match (first, timeout) {
            (Some(m), Some(t)) if t <= m.answer_after => (t, None),
            (Some(m), _) => (m.answer_after, Some(m.interface)),
            (None, Some(t)) => (t, None),
            (None, None) => return,
        };
        let shared = Arc::clone(self.shared);
        let a = a.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            shared.with(|ctx| match answer {
                Some(interface) => ctx.agent_answers(&a, &interface),
                None => ctx.queue_gave_up(&a),
            });
        });
    }

    fn open_leg(&self, a: &str) -> Option<&Leg> {
        self.st
            .legs
            .iter()
            .rev()
            .find(|l| l.a == a && !l.ended && l.agent.is_none())
    }

    /// `Queue()` connects a member: it sets the member variables on the channel running it.
    fn agent_answers(&mut self, a: &str, interface: &str) {
        let Some(b) = self.open_leg(a).map(|l| l.b.clone()) else {
            return;
        };
        for leg in self.st.legs.iter_mut().filter(|l| l.a == a) {
            leg.agent = Some(interface.to_owned());
        }
        for (name, value) in [
            ("MEMBERINTERFACE", interface),
            ("MEMBERNAME", interface),
            ("MEMBERCALLS", "0"),
            ("MEMBERLASTCALL", "0"),
            ("MEMBERPENALTY", "0"),
            ("MEMBERDYNAMIC", "0"),
            ("MEMBERREALTIME", "0"),
        ] {
            self.set_var_event(&b, name, value);
        }
    }

    /// Nobody answered within the queue's timeout: `Queue()` returns and the `;2` half's
    /// dialplan ends, taking the `;1` half with it.
    fn queue_gave_up(&mut self, a: &str) {
        let Some(b) = self.open_leg(a).map(|l| l.b.clone()) else {
            return;
        };
        if let Some(leg) = self.st.legs.iter_mut().rev().find(|l| l.a == a) {
            leg.ended = true;
        }
        self.end_pair(&b, Party::Caller);
    }

    /// The agent puts the phone down: the `;2` half ends, then the `;1` half.
    pub fn agent_hangup(&mut self, key: &str) -> bool {
        let Some(b) = self
            .st
            .legs
            .iter()
            .rev()
            .find(|l| l.matches(key) && !l.ended)
            .map(|l| l.b.clone())
        else {
            return false;
        };
        if !self.st.channels.contains_key(&b) {
            return false;
        }
        self.end_pair(&b, Party::Caller);
        true
    }

    pub fn application(&self, app: &str) -> Reply {
        let main = app == self.opts().app;
        let listed: Vec<String> = self
            .st
            .channels
            .iter()
            .filter(|(_, c)| {
                if main {
                    (c.in_stasis || c.subscribed) && c.other_app.is_none()
                } else {
                    c.in_stasis && c.other_app.as_deref() == Some(app)
                }
            })
            .map(|(id, _)| id.clone())
            .collect();
        let inactive = if main {
            matches!(self.st.owner, Owner::None) && listed.is_empty() && self.st.bridges.is_empty()
        } else {
            !self.other_app_active(app) && listed.is_empty()
        };
        if inactive {
            return error(404, "Application not found");
        }
        let bridges: Vec<&String> = if main {
            self.st.bridges.keys().collect()
        } else {
            Vec::new()
        };
        (
            200,
            Some(json!({
                "name": app,
                "channel_ids": listed,
                "bridge_ids": bridges,
                "endpoint_ids": [],
                "device_names": [],
                "events_allowed": [],
                "events_disallowed": self.st.disallowed.iter()
                    .map(|t| json!({ "type": t }))
                    .collect::<Vec<_>>(),
            })),
        )
    }

    /// `PUT /applications/{app}/eventFilter` with `{"disallowed":[{"type":…}]}` (an `allowed` list is
    /// not modelled: the fake sends every other type).
    pub fn event_filter(&mut self, app: &str, body: &Value) -> Reply {
        if let (404, e) = self.application(app) {
            return (404, e);
        }
        let types = |key: &str| -> Option<std::collections::BTreeSet<String>> {
            match body.get(key) {
                None => Some(Default::default()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| i.get("type").and_then(Value::as_str).map(str::to_owned))
                    .collect(),
                Some(_) => None,
            }
        };
        let Some(disallowed) = types("disallowed") else {
            return error(400, "Invalid format for the event filter");
        };
        self.st.disallowed = disallowed;
        self.application(app)
    }

    /// `GET /sounds/{id}`: the languages the sound exists in.
    pub fn sound(&self, id: &str) -> Reply {
        let formats: Vec<Value> = self
            .opts()
            .sounds
            .iter()
            .filter(|(_, sound)| sound == id)
            .map(|(lang, _)| json!({ "language": lang, "format": "wav" }))
            .collect();
        if formats.is_empty() {
            return error(404, "Sound not found");
        }
        (200, Some(json!({ "id": id, "formats": formats })))
    }

    /// A DTMF digit received on `id` (reported on it, muted or not: mute is audio only). Unless
    /// the channel was bridged with `absorbDTMF`, the digit passes through the bridge to the other
    /// members; a member that is the `;1` half of a subscribed Local pair hands it to its `;2`
    /// half, which reports it as received (what Asterisk 22 showed for the agent's half).
    pub fn dtmf(&mut self, id: &str, digit: char) -> bool {
        let Some(chan) = self.st.channels.get(id) else {
            return false;
        };
        if !chan.in_stasis {
            return false;
        }
        let passes = (!chan.absorb_dtmf)
            .then(|| chan.bridge.clone())
            .flatten()
            .and_then(|b| self.st.bridges.get(&b))
            .map(|b| b.channels.clone())
            .unwrap_or_default();
        let duration = self.opts().dtmf_duration_ms;
        let body = json!({ "digit": digit.to_string(), "duration_ms": duration });
        self.emit_channel("ChannelDtmfReceived", id, body.clone());
        for member in passes.iter().filter(|m| *m != id) {
            let receiver = self
                .st
                .channels
                .get(member)
                .and_then(|c| c.peer.clone())
                .filter(|p| self.st.channels.get(p).is_some_and(|c| c.subscribed));
            if let Some(receiver) = receiver {
                self.emit_channel("ChannelDtmfReceived", &receiver, body.clone());
            }
        }
        true
    }
}

fn hangup_cause(by: Party) -> Value {
    match by {
        Party::App => json!({ "cause": 32, "soft": true }),
        Party::Caller => json!({ "cause": 16 }),
    }
}

/// `Local/<exten>@<context>[/options]` → `(exten, context)`.
fn local_target(endpoint: &str) -> Option<(&str, &str)> {
    let rest = endpoint.strip_prefix("Local/")?;
    let rest = rest.split('/').next().unwrap_or(rest);
    rest.split_once('@')
}

/// `Name <number>` or a bare number.
fn parse_caller_id(text: &str) -> CallerId {
    match text.split_once('<') {
        Some((name, number)) => CallerId {
            name: name.trim().trim_matches('"').to_owned(),
            number: number.trim_end_matches('>').trim().to_owned(),
        },
        None => CallerId {
            name: String::new(),
            number: text.trim().to_owned(),
        },
    }
}

fn new_chan(snapshot: Channel, in_stasis: bool) -> Chan {
    Chan {
        linkedid: snapshot.id.clone(),
        subscribed: false,
        peer: None,
        mute_in: false,
        mute_out: false,
        absorb_dtmf: false,
        bridge_mute: false,
        snapshot,
        other_app: None,
        in_stasis,
        vars: BTreeMap::new(),
        moh: false,
        moh_starts: 0,
        media_started: Vec::new(),
        current: None,
        queue: VecDeque::new(),
        bridge: None,
    }
}

/// `NAME(args)` → `args` when the name matches.
fn function_args<'a>(expr: &'a str, name: &str) -> Option<&'a str> {
    expr.strip_prefix(name)?
        .strip_prefix('(')?
        .strip_suffix(')')
}
