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

use super::{ChannelEnd, Party, RestEntry, SimOptions};
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
        let id = format!("sim-1.{n}");
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

    pub fn get_variable(&self, id: &str, name: &str) -> Reply {
        if let Err(e) = self.control(id, false) {
            return e;
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
            shared.with(|ctx| {
                ctx.st.channels.remove(&id);
            });
        });
        (204, None)
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

    /// Hang-up from either side. From the app (`DELETE`) the request is soft with cause 32.
    pub fn hangup(&mut self, id: &str, by: Party) -> Reply {
        let Some(chan) = self.st.channels.get(id) else {
            return error(404, NO_CHANNEL);
        };
        if chan.in_stasis {
            let extra = match by {
                Party::App => json!({ "cause": 32, "soft": true }),
                Party::Caller => json!({ "cause": 16 }),
            };
            self.emit_channel("ChannelHangupRequest", id, extra);
            self.leave_stasis(id, None, Some(by));
        }
        self.st.channels.remove(id);
        (204, None)
    }

    fn bridge_event(&mut self, kind: &str, bridge: &str, id: &str) {
        let Some(b) = self.st.bridges.get(bridge) else {
            return;
        };
        let body = json!({ "bridge": b });
        self.emit_channel(kind, id, body);
    }

    fn leave_bridge(&mut self, id: &str) {
        let Some(bridge) = self.chan(id).and_then(|c| c.bridge.take()) else {
            return;
        };
        if let Some(b) = self.st.bridges.get_mut(&bridge) {
            b.channels.retain(|c| c != id);
        }
        self.bridge_event("ChannelLeftBridge", &bridge, id);
    }

    pub fn create_bridge(&mut self, id: &str, types: &str, name: &str) -> Reply {
        if self.st.bridges.contains_key(id) {
            return error(409, "Bridge with id already exists");
        }
        let bridge = Bridge {
            id: id.to_owned(),
            technology: "simple_bridge".into(),
            bridge_type: if types.contains("holding") {
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

    pub fn add_channel(&mut self, bridge: &str, id: &str) -> Reply {
        if !self.st.bridges.contains_key(bridge) {
            return error(404, NO_BRIDGE);
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
        }
        self.bridge_event("ChannelEnteredBridge", bridge, id);
        (204, None)
    }

    pub fn remove_channel(&mut self, bridge: &str, id: &str) -> Reply {
        if !self.st.bridges.contains_key(bridge) {
            return error(404, NO_BRIDGE);
        }
        match self.st.channels.get(id) {
            None => error(400, NO_CHANNEL),
            Some(c) if c.bridge.as_deref() != Some(bridge) => {
                error(422, "Channel not in this bridge")
            }
            Some(_) => {
                self.leave_bridge(id);
                (204, None)
            }
        }
    }

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

    /// `POST /channels[/{id}]` (originate) and `POST /channels/create`. With `app`, the channel
    /// enters the application (`Up` for originate, `Down` for create); the `;2` half of a Local
    /// originate exists outside Stasis and carries the variables.
    #[allow(clippy::too_many_arguments)]
    pub fn originate(
        &mut self,
        id: &str,
        other: Option<&str>,
        endpoint: &str,
        app_args: Option<&str>,
        app: Option<&str>,
        up: bool,
        variables: BTreeMap<String, String>,
    ) -> Reply {
        if endpoint.is_empty() {
            return error(400, "Endpoint must be specified");
        }
        let other_app = app.filter(|a| *a != self.opts().app).map(str::to_owned);
        let into_app = app.is_some();
        if self.st.channels.contains_key(id)
            || other.is_some_and(|o| self.st.channels.contains_key(o))
        {
            return error(409, "Channel with given unique ID already exists");
        }
        self.st.next_call += 1;
        let n = self.st.next_call;
        let ts = timestamp();
        let snapshot = Channel {
            id: id.to_owned(),
            name: format!("{endpoint}-{n:08x};1"),
            state: ChannelState::Down,
            dialplan: Dialplan {
                app_name: if into_app {
                    "Stasis".into()
                } else {
                    String::new()
                },
                app_data: if into_app {
                    std::iter::once(self.opts().app.as_str())
                        .chain(app_args)
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
        let vars: BTreeMap<String, String> = variables
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches('_').to_owned(), v))
            .collect();
        if let Some(other) = other {
            let mut half = snapshot.clone();
            half.id = other.to_owned();
            half.name = format!("{endpoint}-{n:08x};2");
            half.state = ChannelState::Up;
            half.dialplan = Dialplan::default();
            let mut chan = new_chan(half, false);
            chan.vars = vars.clone();
            self.st.channels.insert(other.to_owned(), chan);
        }
        if let Some(other) = &other_app {
            if !self.other_app_active(other) {
                // Asterisk creates the channel, finds no such application and destroys it at once.
                return (200, body);
            }
        }
        let mut chan = new_chan(snapshot, into_app);
        chan.vars = vars;
        chan.other_app = other_app;
        self.st.channels.insert(id.to_owned(), chan);
        if into_app {
            if up {
                if let Some(chan) = self.chan(id) {
                    chan.snapshot.state = ChannelState::Up;
                }
            }
            let args: Vec<&str> = app_args.map(|a| a.split(',').collect()).unwrap_or_default();
            self.emit_channel("StasisStart", id, json!({ "args": args }));
        }
        (200, body)
    }

    pub fn application(&self, app: &str) -> Reply {
        let main = app == self.opts().app;
        let in_stasis: Vec<String> = self
            .st
            .channels
            .iter()
            .filter(|(_, c)| c.in_stasis && c.other_app.as_deref() == (!main).then_some(app))
            .map(|(id, _)| id.clone())
            .collect();
        let inactive = if main {
            matches!(self.st.owner, Owner::None) && in_stasis.is_empty()
        } else {
            !self.other_app_active(app) && in_stasis.is_empty()
        };
        if inactive {
            return error(404, "Application not found");
        }
        let bridges: Vec<&String> = self.st.bridges.keys().collect();
        (
            200,
            Some(json!({
                "name": app,
                "channel_ids": in_stasis,
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

    pub fn dtmf(&mut self, id: &str, digit: char) -> bool {
        if !self.st.channels.get(id).is_some_and(|c| c.in_stasis) {
            return false;
        }
        let duration = self.opts().dtmf_duration_ms;
        self.emit_channel(
            "ChannelDtmfReceived",
            id,
            json!({ "digit": digit.to_string(), "duration_ms": duration }),
        );
        true
    }
}

fn new_chan(snapshot: Channel, in_stasis: bool) -> Chan {
    Chan {
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
