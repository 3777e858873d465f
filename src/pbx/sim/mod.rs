//! An in-process fake Asterisk (ARI websocket + REST on 127.0.0.1:0) with scripted callers.
//!
//! It follows the recorded Asterisk 22 traffic in `fixtures/ari`: event shapes and order, status
//! codes and error bodies, channels that arrive `Ring` and go `Up` on answer, queued playbacks,
//! `StasisEnd` as the last event of a dialplan channel, events dropped while no socket is connected,
//! calls failing to enter Stasis (`STASISSTATUS=FAILED`) when no application is active, and
//! `ApplicationReplaced` when a second socket takes the application.
//!
//! Anchored calls follow the recorded anchored call with an agent: `mixing,dtmf_events` bridges
//! (create-or-update on `POST /bridges/{id}`, `BRIDGEPEER` noise, members leaving on `DELETE`),
//! `addChannel` with `absorbDTMF`/`mute`, channel mute, and agent legs: a
//! `Local/<exten>@<context>/n` originate into a context of [`SimOptions::agents`] answers with the
//! `;1` half, hands the inheritable variables to the `;2` half, brings `;1` into the application
//! with its `appArgs` and lets a simulated `Queue()` on `;2` connect an agent (member variables) or
//! give up. Both halves are subscribed (events up to `ChannelDestroyed`) and share the originator's
//! linkedid. DTMF not absorbed passes through a bridge and is reported on the agent leg's `;2` half.
//!
//! Invariant: inspection helpers wait on state changes (a `watch` counter), never on sleeps; the only
//! timers are the ones Asterisk has too (prompt length, digit gaps, the linger after `continue`, an
//! agent's ring time, a queue's timeout).
//! Limits: one application per fake that calls enter (other names may connect and get the channels
//! created into them, nothing else); other originates are minimal (no dialing, the `;2` half of
//! a Local endpoint outside an agent context is a plain channel that is not subscribed); no bridge
//! playback or MOH, roles, native bridging or Local optimisation; a second `DELETE /bridges` is
//! always 404 (Asterisk can answer 409 while tearing down); mute is tracked, not applied to audio.

mod http;
mod model;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::pbx::ari;
use crate::secret::Secret;
use model::{Owner, Shared};

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The one application name served.
    pub app: String,
    /// Asterisk's `systemname`: the prefix of channel ids (`<name>-1.<n>`), so that several fakes
    /// (several sites) hand out distinct ids, as real servers with distinct system names do.
    pub system_name: String,
    /// Credentials required on REST and websocket; empty `username` = no authentication.
    pub username: String,
    pub password: String,
    /// How long a `sound:` prompt plays before `PlaybackFinished` (`done`).
    pub prompt_duration: Duration,
    /// Media URIs that do not exist: their playback finishes at once with state `failed`.
    pub missing_media: BTreeSet<String>,
    /// Existing dialplan locations `(context, extension, priority)`, for `DIALPLAN_EXISTS(…)`.
    pub dialplan: BTreeSet<(String, String, u32)>,
    /// Whether `POST`/`GET /channels/{id}/variables` exist (Asterisk 22.10+); `false` answers them
    /// 404 `Resource not found`, as an older Asterisk does.
    pub multi_variables: bool,
    /// `duration_ms` reported for each DTMF digit.
    pub dtmf_duration_ms: u32,
    /// How long a continued channel stays in the dialplan (answering 409 to control calls)
    /// before it is gone (404).
    pub dialplan_linger: Duration,
    /// Context and extension inbound calls come from (the one running `Stasis(app,…)`).
    pub inbound_context: String,
    pub inbound_exten: String,
    pub asterisk_id: String,
    /// Agent contexts: a `Local/<exten>@<context>/n` originate into the application whose context
    /// is a key here dials both halves; the `;2` half answers and waits in this queue.
    pub agents: BTreeMap<String, SimQueue>,
    /// What `GET /asterisk/info` reports as `system.version`.
    pub version: String,
    /// Sound files that exist, as `(language, id)`, e.g. `("sv", "callgate/enter-number")`, for
    /// `GET /sounds/{id}`.
    pub sounds: BTreeSet<(String, String)>,
}

/// The queue an agent context runs (`Answer()` then `Queue()` on the `;2` half).
#[derive(Debug, Clone, Default)]
pub struct SimQueue {
    /// All members ring at once; the one with the smallest `answer_after` answers.
    pub members: Vec<SimAgent>,
    /// With no answer by then, `Queue()` gives up and the `;2` half hangs up (then the `;1` half).
    /// `None`: it waits for ever.
    pub timeout: Option<Duration>,
}

impl SimQueue {
    /// One agent answering after `answer_after`, no timeout.
    pub fn agent(interface: &str, answer_after: Duration) -> SimQueue {
        SimQueue {
            members: vec![SimAgent::new(interface, answer_after)],
            timeout: None,
        }
    }
}

/// A queue member: the agent's phone and how long it rings before they pick up.
#[derive(Debug, Clone)]
pub struct SimAgent {
    /// e.g. `PJSIP/agent1`; becomes `MEMBERINTERFACE` (and `MEMBERNAME`).
    pub interface: String,
    pub answer_after: Duration,
}

impl SimAgent {
    pub fn new(interface: &str, answer_after: Duration) -> SimAgent {
        SimAgent {
            interface: interface.to_owned(),
            answer_after,
        }
    }
}

/// Audio direction of a channel's mute, as `POST /channels/{id}/mute?direction=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// What the channel sends (towards the bridge).
    In,
    /// What the channel hears.
    Out,
    Both,
}

/// One originate (`POST /channels[/{id}]` or `/channels/create`) as the fake received it.
#[derive(Clone, PartialEq, Eq)]
pub struct Origination {
    /// The new channel's id (path segment or `channelId`).
    pub channel_id: String,
    /// Query parameters (`endpoint`, `app`, `appArgs`, `otherChannelId`, `callerId`,
    /// `originator`, `timeout`, …) as sent.
    pub params: BTreeMap<String, String>,
    /// The body's `variables`, names as sent (`__CALLGATE_STATUS`).
    pub variables: BTreeMap<String, String>,
}

impl std::fmt::Debug for Origination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origination")
            .field("channel_id", &self.channel_id)
            .field("params", &self.params.keys().collect::<Vec<_>>())
            .field("variables", &self.variables.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// An agent leg: the Local pair originated into an agent context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLeg {
    /// The `;1` half (`channelId`), in the application.
    pub a: String,
    /// The `;2` half (`otherChannelId`), running the queue.
    pub b: String,
    /// The second `appArgs` value (`agent,<call>`).
    pub call: Option<String>,
    pub context: String,
    /// The interface of the agent who answered.
    pub agent: Option<String>,
    /// Both halves are gone.
    pub ended: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            app: "callgate".into(),
            system_name: "sim".into(),
            username: "callgate".into(),
            password: "sim-secret".into(),
            prompt_duration: Duration::from_millis(50),
            missing_media: BTreeSet::new(),
            dialplan: BTreeSet::new(),
            multi_variables: true,
            dtmf_duration_ms: 100,
            dialplan_linger: Duration::from_millis(500),
            inbound_context: "callgate-in".into(),
            inbound_exten: "100".into(),
            asterisk_id: "02:fc:00:00:00:01".into(),
            agents: BTreeMap::new(),
            version: "22.10.1".into(),
            sounds: BTreeSet::new(),
        }
    }
}

/// Who hung a channel up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    Caller,
    App,
}

/// How a channel left the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelEnd {
    /// Set when the application continued it in the dialplan: `(context, extension, priority)`.
    pub continued_to: Option<(String, String, u32)>,
    /// Set when it was hung up while in the application.
    pub hung_up_by: Option<Party>,
    /// The call arrived while no application was connected and never entered it.
    pub stasis_failed: bool,
    /// Channel variables when it left (inheritable ones under their plain names).
    pub variables: BTreeMap<String, String>,
}

/// One REST exchange as the fake saw it (no query values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestEntry {
    pub method: String,
    /// Path below `/ari`, e.g. `/channels/sim-1.1/answer`.
    pub path: String,
    pub status: u16,
}

#[derive(Debug, Clone)]
enum Step {
    AwaitPrompt,
    AwaitMedia(String),
    AwaitMoh,
    AwaitAnswer,
    Press(String, Duration),
    Wait(Duration),
    HangUp,
}

/// A scripted caller: who calls, into which queue, and what they do once in the application.
/// Steps run in order; the script stops as soon as the channel leaves the application.
#[derive(Debug, Clone)]
pub struct Caller {
    name: String,
    number: String,
    language: String,
    args: Vec<String>,
    steps: Vec<Step>,
}

impl Caller {
    /// A caller from `number` into queue `support` (`Stasis(app,inbound,support)`), language `sv`.
    pub fn new(number: &str) -> Caller {
        Caller {
            name: String::new(),
            number: number.to_owned(),
            language: "sv".into(),
            args: vec!["inbound".into(), "support".into()],
            steps: Vec::new(),
        }
    }

    /// Calls into `queue`: the `Stasis()` args become `inbound,<queue>`.
    pub fn queue(mut self, queue: &str) -> Caller {
        self.args = vec!["inbound".into(), queue.to_owned()];
        self
    }

    /// Raw `Stasis()` args (after the application name).
    pub fn args(mut self, args: &[&str]) -> Caller {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    pub fn language(mut self, language: &str) -> Caller {
        self.language = language.to_owned();
        self
    }

    pub fn name(mut self, name: &str) -> Caller {
        self.name = name.to_owned();
        self
    }

    /// Waits until the next prompt (any media) starts on the channel.
    pub fn await_prompt(mut self) -> Caller {
        self.steps.push(Step::AwaitPrompt);
        self
    }

    /// Waits until a playback whose media list includes `media` (e.g. `sound:callgate/retry-offer`)
    /// starts.
    pub fn await_media(mut self, media: &str) -> Caller {
        self.steps.push(Step::AwaitMedia(media.to_owned()));
        self
    }

    /// Waits until music on hold is (re)started.
    pub fn await_moh(mut self) -> Caller {
        self.steps.push(Step::AwaitMoh);
        self
    }

    /// Waits until the channel is answered (`Up`).
    pub fn await_answer(mut self) -> Caller {
        self.steps.push(Step::AwaitAnswer);
        self
    }

    /// Types `digits`, one DTMF event per digit, with `gap` between digits.
    pub fn press(mut self, digits: &str, gap: Duration) -> Caller {
        self.steps.push(Step::Press(digits.to_owned(), gap));
        self
    }

    pub fn wait(mut self, duration: Duration) -> Caller {
        self.steps.push(Step::Wait(duration));
        self
    }

    pub fn hang_up(mut self) -> Caller {
        self.steps.push(Step::HangUp);
        self
    }
}

/// A running fake Asterisk. Dropping it stops the server and closes its sockets.
pub struct FakeAsterisk {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
}

/// Starts the fake on an already-bound listener (bind `127.0.0.1:0` in tests).
pub async fn start(listener: TcpListener, opts: SimOptions) -> FakeAsterisk {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let shared = Shared::new(opts);
    let stop = CancellationToken::new();
    let app = http::router(Arc::clone(&shared), stop.clone());
    let until = stop.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(until.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "fake asterisk server stopped");
        }
    });
    FakeAsterisk { shared, addr, stop }
}

impl Drop for FakeAsterisk {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeAsterisk {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (what `ari::Settings::url` takes).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// ARI settings pointing at this fake, with short timings suited to tests.
    pub fn settings(&self) -> ari::Settings {
        ari::Settings {
            url: self.url(),
            app: self.shared.opts.app.clone(),
            username: self.shared.opts.username.clone(),
            password: Secret::new(self.shared.opts.password.clone()),
            request_timeout: Duration::from_secs(2),
            ping_interval: Duration::from_millis(200),
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
        }
    }

    /// Places a call. It enters the application (`StasisStart`) and its script starts, or — with no
    /// application connected — it fails to enter (see [`ChannelEnd::stasis_failed`]). Returns the
    /// channel id (`sim-1.<n>`).
    pub fn call(&self, caller: Caller) -> String {
        let (id, entered) = self.shared.with(|ctx| ctx.inbound(&caller));
        if entered {
            tokio::spawn(run_script(
                Arc::clone(&self.shared),
                id.clone(),
                caller.steps,
            ));
        }
        id
    }

    /// The caller hangs up now (outside any script).
    pub fn hang_up(&self, id: &str) {
        self.shared.with(|ctx| ctx.hangup(id, Party::Caller));
    }

    /// The channel receives `digits` (one `ChannelDtmfReceived` each, `gap` apart), e.g. a caller
    /// typing while bridged. Returns `false` when the channel left the application first.
    pub async fn press(&self, channel: &str, digits: &str, gap: Duration) -> bool {
        press(&self.shared, channel, digits, gap).await
    }

    /// The agent types `digits` on their phone: they arrive as DTMF on the agent leg's `;1` half
    /// (`call_or_channel`: the call id of `appArgs`, or either half's id).
    pub async fn agent_press(&self, call_or_channel: &str, digits: &str, gap: Duration) -> bool {
        let Some(leg) = self.agent_leg(call_or_channel) else {
            return false;
        };
        press(&self.shared, &leg.a, digits, gap).await
    }

    /// The agent puts the phone down: the `;2` half ends (`ChannelHangupRequest`,
    /// `ChannelDestroyed`), then the `;1` half leaves the bridge and the application and is
    /// destroyed. `false` when there is no live leg.
    pub fn agent_hang_up(&self, call_or_channel: &str) -> bool {
        self.shared.with(|ctx| ctx.agent_hangup(call_or_channel))
    }

    /// The latest agent leg for a call id (`appArgs`) or either half's id.
    pub fn agent_leg(&self, call_or_channel: &str) -> Option<AgentLeg> {
        self.shared.read(|st| find_leg(st, call_or_channel))
    }

    /// Waits until an agent leg for `call_or_channel` was originated.
    pub async fn wait_for_agent_leg(&self, call_or_channel: &str) -> AgentLeg {
        self.shared
            .wait_until(|st| find_leg(st, call_or_channel))
            .await
    }

    /// Waits until the agent leg's queue connected an agent (`Some(interface)`) or the leg ended
    /// without one (`None`). Waits for the leg to be originated first.
    pub async fn wait_for_agent(&self, call_or_channel: &str) -> Option<String> {
        self.shared
            .wait_until(|st| {
                let leg = find_leg(st, call_or_channel)?;
                match leg.agent {
                    Some(agent) => Some(Some(agent)),
                    None if leg.ended => Some(None),
                    None => None,
                }
            })
            .await
    }

    /// Bridges and their members, in the order they joined.
    pub fn bridges(&self) -> BTreeMap<String, Vec<String>> {
        self.shared.read(|st| {
            st.bridges
                .iter()
                .map(|(id, b)| (id.clone(), b.channels.clone()))
                .collect()
        })
    }

    /// The bridge the channel is in.
    pub fn bridge_of(&self, channel: &str) -> Option<String> {
        self.shared
            .read(|st| st.channels.get(channel).and_then(|c| c.bridge.clone()))
    }

    /// Whether the channel's audio is muted in `direction` (`Both`: in and out). `In` also counts
    /// a bridge membership added with `mute=true`.
    pub fn is_muted(&self, channel: &str, direction: Direction) -> bool {
        self.shared.read(|st| {
            st.channels.get(channel).is_some_and(|c| {
                let muted_in = c.mute_in || c.bridge_mute;
                match direction {
                    Direction::In => muted_in,
                    Direction::Out => c.mute_out,
                    Direction::Both => muted_in && c.mute_out,
                }
            })
        })
    }

    /// Whether the channel is bridged with `absorbDTMF=true`.
    pub fn absorbs_dtmf(&self, channel: &str) -> bool {
        self.shared.read(|st| {
            st.channels
                .get(channel)
                .is_some_and(|c| c.bridge.is_some() && c.absorb_dtmf)
        })
    }

    /// One variable of a live channel (or of one that left the application), plain name.
    pub fn channel_var(&self, channel: &str, name: &str) -> Option<String> {
        self.channel_vars(channel)
            .and_then(|vars| vars.get(name.trim_start_matches('_')).cloned())
    }

    /// Every originate so far, in order.
    pub fn originations(&self) -> Vec<Origination> {
        self.shared.read(|st| st.originations.clone())
    }

    /// Waits until the bridge no longer exists.
    pub async fn wait_for_bridge_gone(&self, id: &str) {
        self.shared
            .wait_until(|st| (!st.bridges.contains_key(id)).then_some(()))
            .await;
    }

    /// Waits until the channel is in a bridge; returns the bridge id.
    pub async fn wait_for_in_bridge(&self, channel: &str) -> String {
        self.shared
            .wait_until(|st| st.channels.get(channel).and_then(|c| c.bridge.clone()))
            .await
    }

    /// Waits until the channel is in no bridge (or gone).
    pub async fn wait_for_out_of_bridge(&self, channel: &str) {
        self.shared
            .wait_until(|st| {
                st.channels
                    .get(channel)
                    .is_none_or(|c| c.bridge.is_none())
                    .then_some(())
            })
            .await;
    }

    /// Closes the application's websocket. Events until the client reconnects are lost.
    pub fn drop_websocket(&self) {
        self.shared.with(|ctx| ctx.drop_socket());
    }

    /// Delays every following REST answer by `delay`.
    pub fn set_rest_delay(&self, delay: Duration) {
        self.shared.with(|ctx| ctx.st.rest_delay = delay);
    }

    /// The application's websocket hangs: the fake stops reading it (so pings go unanswered) and
    /// sends nothing more, but keeps the TCP connection open. The application counts as disconnected.
    pub fn stall_websocket(&self) {
        self.shared.with(|ctx| ctx.stall_socket());
    }

    /// Websocket pings received so far (all connections).
    pub fn pings(&self) -> u64 {
        self.shared.read(|st| st.pings)
    }

    /// While `false`, new websocket connections are refused (503), as if Asterisk's HTTP server
    /// were unreachable; REST keeps working.
    pub fn set_accepting(&self, accepting: bool) {
        self.shared.with(|ctx| ctx.st.accepting = accepting);
    }

    /// Acts like another client holding the application while callgate's is not connected:
    /// `GET /applications/{app}` finds it.
    pub fn hold_app_elsewhere(&self) {
        self.shared.with(|ctx| ctx.hold_elsewhere());
    }

    /// Websockets of other application names connected now.
    pub fn other_app_sockets(&self) -> usize {
        self.shared.read(|st| st.other_sockets.len())
    }

    /// Waits until at least `n` events were lost because no socket owned the application.
    pub async fn wait_for_dropped_events(&self, n: u64) {
        self.shared
            .wait_until(|st| (st.dropped_events >= n).then_some(()))
            .await;
    }

    /// Waits until at least `n` websocket pings have arrived.
    pub async fn wait_for_pings(&self, n: u64) {
        self.shared
            .wait_until(|st| (st.pings >= n).then_some(()))
            .await;
    }

    /// Whether the channel exists and is in the application.
    pub fn in_application(&self, id: &str) -> bool {
        self.shared
            .read(|st| st.channels.get(id).is_some_and(|c| c.in_stasis))
    }

    /// Waits until the channel no longer exists (`GET /channels/{id}` answers 404).
    pub async fn wait_for_channel_gone(&self, id: &str) {
        self.shared
            .wait_until(|st| (!st.channels.contains_key(id)).then_some(()))
            .await;
    }

    /// Sends a frame that is not valid JSON to the connected socket.
    pub fn send_malformed_frame(&self) {
        self.shared
            .with(|ctx| ctx.send_raw(r#"{"type":"ChannelDtmfReceived","digit":"#));
    }

    /// Acts like another instance connecting for the same application: the current socket gets
    /// `ApplicationReplaced` and no further events (it stays open).
    pub fn replace_app(&self) {
        self.shared.with(|ctx| ctx.replace_owner());
    }

    /// Waits until the channel left the application (continued, hung up, or failed to enter).
    pub async fn wait_for_channel_end(&self, id: &str) -> ChannelEnd {
        self.shared.wait_until(|st| st.ended.get(id).cloned()).await
    }

    /// Current variables of a live channel, or those it had when it left the application.
    pub fn channel_vars(&self, id: &str) -> Option<BTreeMap<String, String>> {
        self.shared.read(|st| {
            st.channels
                .get(id)
                .map(|c| c.vars.clone())
                .or_else(|| st.ended.get(id).map(|e| e.variables.clone()))
        })
    }

    /// Media URIs started on the channel so far, in order.
    pub fn media_started(&self, id: &str) -> Vec<String> {
        self.shared.read(|st| {
            st.channels
                .get(id)
                .map(|c| c.media_started.clone())
                .unwrap_or_default()
        })
    }

    /// Whether music on hold is playing on the channel.
    pub fn moh_on(&self, id: &str) -> bool {
        self.shared
            .read(|st| st.channels.get(id).is_some_and(|c| c.moh))
    }

    /// Event types the application filtered out (`PUT /applications/{app}/eventFilter`).
    pub fn disallowed_events(&self) -> BTreeSet<String> {
        self.shared.read(|st| st.disallowed.clone())
    }

    pub fn rest_log(&self) -> Vec<RestEntry> {
        self.shared.read(|st| st.rest_log.clone())
    }

    /// Number of websocket connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.read(|st| st.connections)
    }

    pub fn is_connected(&self) -> bool {
        self.shared
            .read(|st| matches!(st.owner, Owner::Socket { .. }))
    }

    /// Waits until a websocket owns the application.
    pub async fn wait_for_connected(&self) {
        self.shared
            .wait_until(|st| matches!(st.owner, Owner::Socket { .. }).then_some(()))
            .await;
    }

    /// Waits until at least `n` websocket connections have been accepted and one owns the app.
    pub async fn wait_for_connections(&self, n: u64) {
        self.shared
            .wait_until(|st| {
                (st.connections >= n && matches!(st.owner, Owner::Socket { .. })).then_some(())
            })
            .await;
    }

    /// Waits until no websocket owns the application.
    pub async fn wait_for_disconnected(&self) {
        self.shared
            .wait_until(|st| (!matches!(st.owner, Owner::Socket { .. })).then_some(()))
            .await;
    }
}

/// Runs a caller's steps; stops when the channel leaves the application.
async fn run_script(shared: Arc<Shared>, id: String, steps: Vec<Step>) {
    let mut prompts_seen = 0usize;
    let mut moh_seen = 0u64;
    for step in steps {
        let alive = match step {
            Step::AwaitPrompt => {
                let seen = wait_chan(&shared, &id, |c| {
                    (c.media_started.len() > prompts_seen).then_some(prompts_seen + 1)
                })
                .await;
                seen.map(|n| prompts_seen = n).is_some()
            }
            Step::AwaitMedia(media) => {
                let seen = wait_chan(&shared, &id, |c| {
                    c.media_started
                        .iter()
                        .skip(prompts_seen)
                        .position(|m| m.split(',').any(|one| one == media))
                        .map(|i| prompts_seen + i + 1)
                })
                .await;
                seen.map(|n| prompts_seen = n).is_some()
            }
            Step::AwaitMoh => {
                let seen = wait_chan(&shared, &id, |c| {
                    (c.moh && c.moh_starts > moh_seen).then_some(c.moh_starts)
                })
                .await;
                seen.map(|n| moh_seen = n).is_some()
            }
            Step::AwaitAnswer => wait_chan(&shared, &id, |c| {
                (c.snapshot.state == ari::wire::ChannelState::Up).then_some(())
            })
            .await
            .is_some(),
            Step::Press(digits, gap) => press(&shared, &id, &digits, gap).await,
            Step::Wait(duration) => {
                tokio::time::sleep(duration).await;
                true
            }
            Step::HangUp => {
                shared.with(|ctx| ctx.hangup(&id, Party::Caller));
                false
            }
        };
        if !alive {
            return;
        }
    }
}

/// Types `digits` into a channel, `gap` apart; `false` once it left the application.
async fn press(shared: &Arc<Shared>, id: &str, digits: &str, gap: Duration) -> bool {
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        if !shared.with(|ctx| ctx.dtmf(id, digit)) {
            return false;
        }
    }
    true
}

fn find_leg(st: &model::State, key: &str) -> Option<AgentLeg> {
    st.legs
        .iter()
        .rev()
        .find(|l| l.matches(key))
        .map(|l| AgentLeg {
            a: l.a.clone(),
            b: l.b.clone(),
            call: l.call.clone(),
            context: l.context.clone(),
            agent: l.agent.clone(),
            ended: l.ended,
        })
}

/// Waits for a condition on a channel still in the application; `None` once it left.
async fn wait_chan<R>(
    shared: &Shared,
    id: &str,
    mut f: impl FnMut(&model::Chan) -> Option<R>,
) -> Option<R> {
    shared
        .wait_until(|st| match st.channels.get(id) {
            Some(c) if c.in_stasis => f(c).map(Some),
            _ => Some(None),
        })
        .await
}
