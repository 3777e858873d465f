//! The Asterisk adapter: routes ARI events to call tasks, implements `calls::CallControl` over the ARI
//! REST client, reconciles after every (re)connect, and routes calls it will not gate (skipped,
//! draining, our own restart) straight on.
//!
//! Invariants: the router never waits on a REST call for one call while events for others queue up
//! (per-call work runs in the call's task or a spawned task); every channel that enters our Stasis app
//! is either gated by a call task or routed on (it is never left in Stasis); after a gap, local state is
//! reconciled with `GET /applications/{app}` before it is trusted.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ari::events::Incoming;
use super::ari::rest::{Client, Error, Originate};
use super::ari::wire::{Channel, Event, PlaybackState};
use super::routecheck::RouteCheck;
use crate::api::ops::Readiness;
use crate::audit;
use crate::calls::journal;
use crate::calls::task::{self, Deps, Resume, Setup};
use crate::calls::{
    AnchorControl, BoxFuture, CallControl, CallEvent, ControlError, Destination, Report,
};
use crate::config::Config;
use crate::outcome::{self, Outcome, Reason, Record};
use crate::policy::{QueuePolicy, Route};
use crate::prompts::Language;

/// `CallControl` for one ARI channel.
pub struct AriControl {
    client: Client,
    routes: Arc<RouteCheck>,
    channel: String,
    /// Where the channel sits in the dialplan (the `Stasis()` priority), for "continue at the next
    /// priority" when no route can be used.
    stasis_at: Option<(String, String, u32)>,
    /// The caller id to present on the agent leg (`Name <number>`).
    caller_id: String,
}

/// The bridge of an anchored call: its id derives from the call's, so it is found again after a
/// restart.
pub fn bridge_id(call: &str) -> String {
    format!("callgate-{call}")
}

/// The agent leg's half in our application (`;1`).
pub fn agent_leg_id(call: &str) -> String {
    format!("{call}{AGENT_LEG}")
}

/// The agent leg's half that runs the agent context and `Queue()` (`;2`).
pub fn agent_peer_id(call: &str) -> String {
    format!("{call}{AGENT_PEER}")
}

const AGENT_LEG: &str = "-agent";
const AGENT_PEER: &str = "-agent-q";

/// Which call an agent-leg channel belongs to, and whether it is the `;2` half.
pub fn agent_leg_of(channel: &str) -> Option<(&str, bool)> {
    if let Some(call) = channel.strip_suffix(AGENT_PEER) {
        return Some((call, true));
    }
    channel.strip_suffix(AGENT_LEG).map(|call| (call, false))
}

/// The variable `Queue()` sets on the channel running it when an agent answers.
const MEMBER_INTERFACE: &str = "MEMBERINTERFACE";

impl AriControl {
    pub fn new(client: Client, routes: Arc<RouteCheck>, channel: &Channel) -> AriControl {
        let d = &channel.dialplan;
        let stasis_at = (!d.context.is_empty())
            .then(|| (d.context.clone(), d.exten.clone(), d.priority.max(1) as u32));
        let c = &channel.caller;
        let caller_id = match (c.name.is_empty(), c.number.is_empty()) {
            (_, true) => c.name.clone(),
            (true, false) => format!("<{}>", c.number),
            (false, false) => format!("{} <{}>", c.name, c.number),
        };
        AriControl {
            client,
            routes,
            channel: channel.id.clone(),
            stasis_at,
            caller_id,
        }
    }

    /// Plays `media` (in order, one playback) to one channel.
    async fn play_on(
        &self,
        channel: &str,
        playback_id: &str,
        media: &[String],
        lang: Language,
    ) -> Result<(), ControlError> {
        self.client
            .play(channel, playback_id, &media.join(","), Some(lang.code()))
            .await
            .map(|_| ())
            .map_err(map)
    }

    /// Whether the route exists, from the answers [`RouteCheck`] remembers (one request for every
    /// configured route when it has none). A check that cannot be made trusts the validated config.
    async fn route_exists(&self, route: &Route) -> Result<bool, ControlError> {
        self.routes
            .exists(&self.client, &self.channel, route)
            .await
            .map_err(map)
    }
}

fn map(e: Error) -> ControlError {
    if e.is_gone() {
        ControlError::Gone
    } else {
        ControlError::Failed(e.to_string())
    }
}

impl CallControl for AriControl {
    fn answer(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move { self.client.answer(&self.channel).await.map_err(map) })
    }

    fn play<'a>(
        &'a self,
        playback_id: &'a str,
        media: &'a [String],
        lang: Language,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move { self.play_on(&self.channel, playback_id, media, lang).await })
    }

    fn stop_playback<'a>(
        &'a self,
        playback_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            match self.client.stop_playback(playback_id).await {
                Ok(()) => Ok(()),
                // A playback that cannot be stopped ends by itself; its end event still comes.
                Err(Error::Server { .. }) => Ok(()),
                Err(e) => Err(map(e)),
            }
        })
    }

    fn playback_running<'a>(
        &'a self,
        playback_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, ControlError>> {
        Box::pin(async move { self.client.playback_exists(playback_id).await.map_err(map) })
    }

    fn start_moh<'a>(&'a self, class: &'a str) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let class = (!class.is_empty()).then_some(class);
            self.client
                .start_moh(&self.channel, class)
                .await
                .map_err(map)
        })
    }

    fn stop_moh(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move { self.client.stop_moh(&self.channel).await.map_err(map) })
    }

    fn conclude<'a>(
        &'a self,
        vars: &'a [(&'static str, String)],
        route: &'a Route,
        fallback: &'a Route,
    ) -> BoxFuture<'a, Result<Destination, ControlError>> {
        Box::pin(async move {
            self.set_metadata(vars).await?;
            let target = if self.route_exists(route).await? {
                Some(route)
            } else {
                tracing::error!(route = %route, "route does not exist in the dialplan; using the unavailable route");
                if self.route_exists(fallback).await? {
                    Some(fallback)
                } else {
                    tracing::error!(route = %fallback, "unavailable route does not exist either; continuing after Stasis()");
                    None
                }
            };
            self.go(target).await
        })
    }
}

fn inheritable(vars: &[(&'static str, String)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(name, value)| (format!("__{name}"), value.clone()))
        .collect()
}

impl AnchorControl for AriControl {
    fn keep<'a>(
        &'a self,
        vars: &'a [(&'static str, String)],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move { self.set_metadata(vars).await })
    }

    fn anchor<'a>(
        &'a self,
        agent: &'a Route,
        vars: &'a [(&'static str, String)],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let call = &self.channel;
            // A call anchored without a gate arrives unanswered; answering twice is harmless.
            self.client.answer(call).await.map_err(map)?;
            let bridge = bridge_id(call);
            self.client
                .create_bridge(&bridge, &["mixing", "dtmf_events"])
                .await
                .map_err(map)?;
            // Keys absorbed: the agent never hears or sees the caller's digits.
            self.client
                .add_channel(&bridge, call, true, false)
                .await
                .map_err(map)?;
            let originate = Originate {
                endpoint: format!("Local/{}@{}/n", agent.extension, agent.context),
                channel_id: agent_leg_id(call),
                other_channel_id: Some(agent_peer_id(call)),
                app_args: vec!["agent".to_owned(), call.clone()],
                caller_id: (!self.caller_id.is_empty()).then(|| self.caller_id.clone()),
                originator: Some(call.clone()),
                timeout_secs: Some(-1),
                variables: inheritable(vars).into_iter().collect(),
            };
            self.client.originate(&originate).await.map_err(map)?;
            Ok(())
        })
    }

    fn add_agent_leg(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move {
            let leg = agent_leg_id(&self.channel);
            // The agent's keys are ours too (the key sequence), never the caller's to hear.
            match self
                .client
                .add_channel(&bridge_id(&self.channel), &leg, true, false)
                .await
            {
                Ok(()) => Ok(()),
                // The agent leg is gone; its end event follows.
                Err(e) if e.is_gone() || matches!(e, Error::NotInStasis | Error::ChannelGone) => {
                    Ok(())
                }
                Err(e) => Err(map(e)),
            }
        })
    }

    fn hangup_agent_leg(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move {
            match self
                .client
                .hangup(&agent_leg_id(&self.channel), Some("normal"))
                .await
            {
                Ok(()) => Ok(()),
                Err(e) if e.is_gone() => Ok(()),
                Err(e) => Err(map(e)),
            }
        })
    }

    fn destroy_bridge(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move {
            self.client
                .destroy_bridge(&bridge_id(&self.channel))
                .await
                .map_err(map)
        })
    }

    fn mute_caller(&self, on: bool) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move { self.client.mute_in(&self.channel, on).await.map_err(map) })
    }

    fn play_to_agent<'a>(
        &'a self,
        playback_id: &'a str,
        media: &'a [String],
        lang: Language,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let leg = agent_leg_id(&self.channel);
            self.play_on(&leg, playback_id, media, lang).await
        })
    }

    fn set_result<'a>(
        &'a self,
        vars: &'a [(&'static str, String)],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let caller = self
                .client
                .set_all_variables(&self.channel, &inheritable(vars))
                .await;
            let plain: Vec<(String, String)> = vars
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.clone()))
                .collect();
            // The agent leg may be gone already; the caller's variables matter more.
            if let Err(e) = self
                .client
                .set_all_variables(&agent_leg_id(&self.channel), &plain)
                .await
            {
                tracing::debug!(error = %e, "could not set the result on the agent leg");
            }
            let failed = caller.map_err(map)?;
            for (i, e) in failed {
                if let Some((name, _)) = vars.get(i) {
                    tracing::error!(variable = name, error = %e, "could not set call metadata");
                }
            }
            Ok(())
        })
    }

    fn hangup_caller(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move {
            self.client
                .hangup(&self.channel, Some("normal"))
                .await
                .map_err(map)
        })
    }

    fn aliases(&self) -> BoxFuture<'_, Result<Vec<String>, ControlError>> {
        Box::pin(async move {
            let mut out = vec![agent_leg_id(&self.channel)];
            match self
                .client
                .get_variable(&self.channel, "CHANNEL(linkedid)")
                .await
            {
                Ok(Some(id)) if !id.is_empty() && id != self.channel => out.push(id),
                Ok(_) => {}
                Err(e) => return Err(map(e)),
            }
            Ok(out)
        })
    }
}

/// Routes ARI traffic for one Stasis application.
pub struct Adapter {
    pub client: Client,
    pub app: String,
    pub deps: Arc<Deps>,
    pub config: watch::Receiver<Arc<Config>>,
    pub readiness: Arc<Readiness>,
    pub tracker: TaskTracker,
    /// Parent of every call's token; cancelling it interrupts the calls in the gate.
    pub calls: CancellationToken,
    /// Channels whose `StasisStart` was handled recently.
    pub seen: DashMap<String, tokio::time::Instant>,
    /// Orders the previous process left open (from the journal), settled by the first reconcile:
    /// resumed when their caller is still in our application, cancelled otherwise.
    pub left_open: std::sync::Mutex<Vec<journal::Entry>>,
    /// Which configured routes exist in the dialplan (checked once, not per call).
    pub routes: Arc<RouteCheck>,
}

impl Adapter {
    /// Consumes events until `shutdown` or until the events task ends.
    pub async fn run(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
    ) {
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => return,
                i = rx.recv() => match i {
                    Some(i) => i,
                    None => return,
                },
            };
            match incoming {
                Incoming::Connected => {
                    tracing::info!("ari connected; reconciling");
                    self.readiness.pbx_connected.store(true, Ordering::SeqCst);
                    self.deps.metrics.set_pbx_connected(true);
                    self.routes.forget();
                    let me = Arc::clone(&self);
                    self.tracker.spawn(async move { me.filter_events().await });
                    // Only calls that existed before this connect can have missed events.
                    let before = self.deps.registry.ids();
                    let me = Arc::clone(&self);
                    self.tracker
                        .spawn(async move { me.reconcile(before).await });
                }
                Incoming::Disconnected => {
                    tracing::warn!("ari disconnected");
                    self.readiness.pbx_connected.store(false, Ordering::SeqCst);
                    self.deps.metrics.set_pbx_connected(false);
                    // Digits and prompt ends are lost until the link is back: the calls must not charge
                    // that to the caller.
                    let registry = &self.deps.registry;
                    for id in registry.ids() {
                        registry.send(&id, CallEvent::LinkDown).await;
                    }
                }
                Incoming::Event(event) => self.route(*event).await,
            }
        }
    }

    async fn route(self: &Arc<Self>, event: Event) {
        let registry = &self.deps.registry;
        // Events of an anchored call's agent leg go to the call it belongs to.
        if let Some(ch) = event.channel_id() {
            if let Some((call, peer)) = agent_leg_of(ch) {
                if let Some(e) = agent_leg_event(&event, peer) {
                    let call = call.to_owned();
                    registry.send(&call, e).await;
                }
                if !matches!(event, Event::PlaybackFinished(_) | Event::StasisStart(_)) {
                    return;
                }
            }
        }
        match event {
            Event::StasisStart(s) => self.stasis_start(s.args, s.channel).await,
            Event::ChannelDtmfReceived(d) => {
                if let Some(digit) = d.digit.chars().next().filter(|_| d.digit.len() == 1) {
                    registry.send(&d.channel.id, CallEvent::Dtmf(digit)).await;
                }
            }
            Event::PlaybackFinished(p) => {
                if p.playback.state == PlaybackState::Failed {
                    // Usually a missing sound file: the call goes on, but the installation needs fixing.
                    tracing::warn!(media = %p.playback.media_uri, language = p.playback.language.as_deref().unwrap_or(""),
                        "prompt could not be played (missing sound file?)");
                }
                if let Some(ch) = p.playback.target_channel() {
                    // A prompt to an agent leg belongs to its call.
                    let call = agent_leg_of(ch).map(|(call, _)| call).unwrap_or(ch);
                    registry
                        .send(call, CallEvent::PlaybackEnded(p.playback.id.clone()))
                        .await;
                }
            }
            Event::ChannelHangupRequest(e) => {
                registry.send(&e.channel.id, CallEvent::Hangup).await;
            }
            Event::StasisEnd(e) => {
                registry.send(&e.channel.id, CallEvent::Hangup).await;
            }
            Event::ChannelDestroyed(e) => {
                registry.send(&e.channel.id, CallEvent::Hangup).await;
            }
            Event::ApplicationReplaced(_) => {
                tracing::error!(app = %self.app, "another instance took the ari application over; no longer acting on calls");
                self.readiness.replaced.store(true, Ordering::SeqCst);
                for id in registry.ids() {
                    registry.send(&id, CallEvent::Detach).await;
                }
            }
            _ => {}
        }
    }

    async fn stasis_start(self: &Arc<Self>, args: Vec<String>, channel: Channel) {
        self.remember(&channel.id);
        let config = Arc::clone(&self.config.borrow());
        let kind = args.first().map(String::as_str).unwrap_or("");
        let queue = args.get(1).cloned().unwrap_or_default();
        if kind == "agent" {
            // The agent leg of an anchored call entered the application: `queue` is the call. In
            // order with the leg's other events (the call learns of it before its agent).
            if !self.deps.registry.send(&queue, CallEvent::AgentLegUp).await {
                tracing::warn!(channel = %channel.id, "agent leg of a call that is gone; hanging it up");
                let me = Arc::clone(self);
                self.tracker.spawn(async move {
                    let _ = me.client.hangup(&channel.id, Some("normal")).await;
                });
            }
            return;
        }
        if kind != "inbound" {
            tracing::warn!(channel = %channel.id, args = kind, "unexpected Stasis arguments; continuing in the dialplan");
            self.route_untracked(channel, None, Outcome::NotVerified(Reason::NotGated));
            return;
        }
        let Some(policy) = config.policy_for(&queue) else {
            tracing::warn!(channel = %channel.id, queue = %queue, "unknown queue and no [defaults]; continuing in the dialplan");
            self.route_untracked(channel, None, Outcome::NotVerified(Reason::UnknownQueue));
            return;
        };
        if self.readiness.draining.load(Ordering::SeqCst) {
            self.route_untracked(
                channel,
                Some(policy),
                Outcome::NotVerified(Reason::Draining),
            );
            return;
        }
        if !policy.mode.gates_before_agent() && !policy.mode.anchors() {
            self.route_untracked(
                channel,
                Some(policy),
                Outcome::NotVerified(Reason::NotGated),
            );
            return;
        }
        let id = channel.id.clone();
        if !self.spawn_call(channel, policy, None, None) {
            tracing::warn!(channel = %id, "duplicate StasisStart ignored");
        }
    }

    /// Sets the metadata for an outcome decided without a dialogue and sends the call on.
    fn route_untracked(
        self: &Arc<Self>,
        channel: Channel,
        policy: Option<Arc<QueuePolicy>>,
        outcome: Outcome,
    ) {
        let me = Arc::clone(self);
        self.tracker.spawn(async move {
            let control = AriControl::new(me.client.clone(), Arc::clone(&me.routes), &channel);
            let record = Record {
                reference: uuid::Uuid::new_v4().to_string(),
                method: String::new(),
                outcome,
                at: task_wall_clock(),
                identity: None,
            };
            let queue = policy.as_ref().map(|p| p.name.0.clone()).unwrap_or_default();
            let vars = outcome::render(
                &record,
                &crate::outcome::Disclosure::status_only(),
                &me.deps.key,
            );
            // The record is on disk (or its bounded wait over) before the call goes on.
            let planned = match &policy {
                Some(p) => Destination::Route(p.route_for(outcome).clone()),
                None => Destination::NextPriority,
            };
            if let Some(a) = &me.deps.audit {
                a.record(
                    record.at,
                    audit::Event::Verification(audit::Entry {
                        reference: record.reference.clone(),
                        call_id: channel.id.clone(),
                        queue: queue.clone(),
                        status: outcome.status().code(),
                        reason: outcome.reason().map(|r| r.code()).unwrap_or(""),
                        method: String::new(),
                        started_by: String::new(),
                        person: String::new(),
                        evidence: String::new(),
                        stages: Vec::new(),
                        destination: planned.to_string(),
                        duration_ms: 0,
                    }),
                )
                .await;
            }
            let result = match &policy {
                Some(p) => {
                    control
                        .conclude(&vars, p.route_for(outcome), &p.routes.unavailable)
                        .await
                }
                // No route known: continue right after Stasis(); the dialplan decides.
                None => control.conclude_next(&vars).await,
            };
            let destination = result.unwrap_or(Destination::Gone);
            tracing::info!(channel = %channel.id, queue = %queue, status = %outcome.status(),
                reason = outcome.reason().map(|r| r.code()).unwrap_or(""), destination = %destination,
                "call passed on without a check");
            me.deps.metrics.call_ended(&queue, outcome);
            if let (Some(a), true) = (&me.deps.audit, destination != planned) {
                a.note(audit::Event::Rerouted {
                    reference: record.reference.clone(),
                    call_id: channel.id.clone(),
                    destination: destination.to_string(),
                });
            }
            let _ = me.deps.reports.send(Report {
                call_id: channel.id.clone(),
                queue,
                reference: record.reference,
                outcome,
                stages: Vec::new(),
                destination,
                duration: Duration::ZERO,
            });
        });
    }

    /// Notes that a channel's `StasisStart` was handled (so reconciliation never takes it for a stray).
    #[allow(clippy::disallowed_methods)] // the age of an entry in a bounded adapter-side cache
    fn remember(&self, channel: &str) {
        let now = tokio::time::Instant::now();
        if self.seen.len() > SEEN_MAX {
            self.seen
                .retain(|_, at| now.saturating_duration_since(*at) < SEEN_FOR);
        }
        self.seen.insert(channel.to_owned(), now);
    }

    /// After a (re)connect: calls (that existed before it) whose channels vanished end, surviving ones
    /// resync; channels in our app that no task owns and whose `StasisStart` we never handled (we
    /// restarted) are routed on as `interrupted`.
    async fn reconcile(self: Arc<Self>, before: Vec<String>) {
        let registry = &self.deps.registry;
        let (listed, bridges) = match self.client.get_application(&self.app).await {
            Ok(Some(app)) => (app.channel_ids, app.bridge_ids),
            Ok(None) => (Vec::new(), Vec::new()),
            Err(e) => {
                tracing::error!(error = %crate::telemetry::ErrorChain(&e), "reconcile: cannot read the application; calls resync without it");
                for id in before {
                    registry.send(&id, CallEvent::Resync).await;
                }
                return;
            }
        };
        // A channel the application lists is still in Stasis with us: no per-call round trip (a
        // flapping link would otherwise cost one request per call per reconnect).
        for id in before {
            let event = if listed.contains(&id) {
                CallEvent::Resync
            } else {
                CallEvent::Hangup
            };
            let anchored = bridges.contains(&bridge_id(&id));
            registry.send(&id, event).await;
            // An anchored call whose agent leg ended in the gap learns it now.
            if anchored && !listed.contains(&agent_leg_id(&id)) {
                registry.send(&id, CallEvent::AgentLegEnded).await;
            }
        }
        let mut left_open: std::collections::HashMap<String, journal::Entry> = self
            .left_open
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_else(|p| std::mem::take(&mut *p.into_inner()))
            .into_iter()
            .map(|e| (e.call.clone(), e))
            .collect();
        let settle_journal = !left_open.is_empty();
        let strays: Vec<String> = listed
            .iter()
            .filter(|id| !registry.contains(id) && !self.seen.contains_key(*id))
            .filter(|id| agent_leg_of(id).is_none())
            .cloned()
            .collect();
        if strays.is_empty() {
            self.cancel_left_open(left_open.into_values());
            self.clean_up_anchors(&listed, &bridges).await;
            return;
        }
        // A channel that entered after the connect may be listed before its StasisStart is routed:
        // give queued events a moment, then look again.
        tokio::time::sleep(STRAY_SETTLE).await;
        for id in strays {
            if registry.contains(&id) || self.seen.contains_key(&id) {
                continue;
            }
            let Ok(Some(channel)) = self.client.get_channel(&id).await else {
                continue;
            };
            let mut parts = channel.dialplan.app_data.split(',');
            let (app, kind, queue) = (parts.next(), parts.next(), parts.next());
            if channel.dialplan.app_name != "Stasis"
                || app != Some(self.app.as_str())
                || kind != Some("inbound")
            {
                continue;
            }
            self.remember(&id);
            let policy = queue.and_then(|q| self.config.borrow().policy_for(q));
            if let (true, Some(policy)) = (bridges.contains(&bridge_id(&id)), &policy) {
                // Bridged with an agent leg by the previous run: adopted, never cut. An order it
                // had open is cancelled (a check during the call is started again by the agent).
                self.adopt(
                    channel,
                    Arc::clone(policy),
                    listed.contains(&agent_leg_id(&id)),
                )
                .await;
                continue;
            }
            if let (Some(entry), Some(policy)) = (left_open.remove(&id), &policy) {
                if policy.idp == entry.idp && self.deps.providers.contains_key(&entry.idp) {
                    self.resume(channel, Arc::clone(policy), entry);
                    continue;
                }
                self.cancel_left_open(std::iter::once(entry));
            }
            tracing::warn!(channel = %id, "channel in the gate without a task (restart); routing it as interrupted");
            self.route_untracked(channel, policy, Outcome::NotVerified(Reason::Restart));
        }
        self.cancel_left_open(left_open.into_values());
        self.clean_up_anchors(&listed, &bridges).await;
        if settle_journal {
            if let Some(j) = &self.deps.journal {
                j.compact();
            }
        }
    }

    /// Takes over an anchored call the previous process left bridged with its agent leg.
    async fn adopt(&self, channel: Channel, policy: Arc<QueuePolicy>, agent_leg: bool) {
        let agent = match self
            .client
            .get_variable(&agent_peer_id(&channel.id), MEMBER_INTERFACE)
            .await
        {
            Ok(Some(a)) if !a.is_empty() => Some(a),
            _ => None,
        };
        tracing::info!(channel = %channel.id, agent = agent.as_deref().unwrap_or(""), "adopting a bridged call left by the previous run");
        self.spawn_call(
            channel,
            policy,
            None,
            Some(task::Adopt { agent, agent_leg }),
        );
    }

    /// After reconciling: agent legs whose call is no longer ours are hung up, and bridges of ours
    /// whose caller is gone are destroyed (nothing is left behind by a restart).
    async fn clean_up_anchors(&self, listed: &[String], bridges: &[String]) {
        let registry = &self.deps.registry;
        for id in listed {
            if let Some((call, false)) = agent_leg_of(id) {
                if !registry.contains(call) && !listed.iter().any(|c| c == call) {
                    tracing::warn!(channel = %id, "agent leg without its caller; hanging it up");
                    let _ = self.client.hangup(id, Some("normal")).await;
                }
            }
        }
        for b in bridges {
            let Some(call) = b.strip_prefix("callgate-") else {
                continue;
            };
            if !registry.contains(call) && !listed.iter().any(|c| c == call) {
                tracing::warn!(bridge = %b, "bridge without its caller; destroying it");
                let _ = self.client.destroy_bridge(b).await;
            }
        }
    }

    /// Takes over a call whose order the previous process started: its caller still waits.
    fn resume(&self, channel: Channel, policy: Arc<QueuePolicy>, entry: journal::Entry) {
        let elapsed = task_wall_clock()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Duration::from_millis(entry.started_ms));
        tracing::info!(channel = %channel.id, order = %entry.order, "resuming an order left open by the previous run");
        self.spawn_call(channel, policy, Some(Resume { entry, elapsed }), None);
    }

    /// Starts the task of a call (new, resumed with its order, or adopted with its bridge). `false`
    /// if the call has one already.
    fn spawn_call(
        &self,
        channel: Channel,
        policy: Arc<QueuePolicy>,
        resume: Option<Resume>,
        adopt: Option<task::Adopt>,
    ) -> bool {
        let control = Arc::new(AriControl::new(
            self.client.clone(),
            Arc::clone(&self.routes),
            &channel,
        ));
        let setup = Setup {
            call_id: channel.id,
            policy,
            info: task::call_info(&channel.language, task::today()),
            caller_line: channel.caller.number,
            resume,
            adopt,
        };
        task::spawn(
            Arc::clone(&self.deps),
            setup,
            control,
            &self.tracker,
            &self.calls,
        )
    }

    /// Cancels orders left open by the previous run whose callers are gone (no request may stay on a
    /// person's phone for a call that has moved on), and closes them in the journal.
    fn cancel_left_open(&self, entries: impl Iterator<Item = journal::Entry>) {
        for entry in entries {
            let deps = Arc::clone(&self.deps);
            self.tracker.spawn(async move {
                let order = crate::verify::OrderRef(entry.order.clone());
                match deps.providers.get(&entry.idp) {
                    Some(p) => match p.cancel(&order).await {
                        Ok(()) => tracing::info!(order = %entry.order, "order left open by the previous run cancelled"),
                        Err(e) => tracing::warn!(order = %entry.order, error = ?e, "could not cancel an order left open by the previous run"),
                    },
                    None => tracing::warn!(order = %entry.order, idp = %entry.idp, "order left open for an identity provider no longer configured"),
                }
                if let Some(j) = &deps.journal {
                    j.closed(&entry.order);
                }
            });
        }
    }
}

/// What an event of an anchored call's agent leg (`peer`: the `;2` half) means to its call.
fn agent_leg_event(event: &Event, peer: bool) -> Option<CallEvent> {
    match event {
        Event::ChannelDtmfReceived(d) if !peer => d
            .digit
            .chars()
            .next()
            .filter(|_| d.digit.len() == 1)
            .map(CallEvent::AgentDtmf),
        Event::ChannelVarset(v)
            if peer && v.variable == MEMBER_INTERFACE && !v.value.is_empty() =>
        {
            Some(CallEvent::AgentAnswered(v.value.clone()))
        }
        Event::StasisEnd(_) if !peer => Some(CallEvent::AgentLegEnded),
        Event::ChannelDestroyed(_) => Some(CallEvent::AgentLegEnded),
        _ => None,
    }
}

/// Event types no call acts on. Asterisk sends a `ChannelVarset` for every variable set, a
/// `PlaybackStarted` for every prompt and a `ChannelStateChange` at every answer, each with a whole
/// channel snapshot: filtering them at the source saves Asterisk and callgate encoding and decoding
/// about a third of a call's events.
pub const IGNORED_EVENTS: [&str; 7] = [
    "ChannelVarset",
    "ChannelStateChange",
    "PlaybackStarted",
    "PlaybackContinuing",
    "ChannelDialplan",
    "ChannelCallerId",
    "ChannelConnectedLine",
];

impl Adapter {
    /// Asks Asterisk not to send [`IGNORED_EVENTS`] (after every connect; the filter belongs to the
    /// application). Where Asterisk has no such resource or refuses, the events are decoded and
    /// dropped as before.
    async fn filter_events(self: Arc<Self>) {
        // Anchored calls learn their agent from `Queue()` setting `MEMBERINTERFACE`.
        let anchoring = {
            let config = self.config.borrow();
            config.queues.values().any(|q| q.mode.anchors())
                || config.defaults.as_ref().is_some_and(|d| d.mode.anchors())
        };
        let ignored: Vec<&str> = IGNORED_EVENTS
            .into_iter()
            .filter(|e| !(anchoring && *e == "ChannelVarset"))
            .collect();
        if let Err(e) = self.client.set_event_filter(&self.app, &ignored).await {
            tracing::info!(error = %crate::telemetry::ErrorChain(&e), "could not set the application's event filter; ignored events are dropped here");
        }
    }
}

/// Waits before each attempt to continue a call (the first is immediate).
const CONTINUE_RETRIES: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_millis(800),
];
/// Seconds after which the dialplan's `T` extension routes a caller we could not continue.
const SAFETY_NET_RETRY: &str = "5";

/// How long a handled `StasisStart` is remembered, and how many before old ones are pruned.
const SEEN_FOR: Duration = Duration::from_secs(120);
const SEEN_MAX: usize = 10_000;
/// How long reconciliation waits before routing a channel it found without a task.
const STRAY_SETTLE: Duration = Duration::from_millis(500);

impl AriControl {
    /// Sets the call metadata (inheritable, so the agent's channel created through the queue carries
    /// it) and clears the dialplan's safety-net timeout: we decided in time.
    async fn set_metadata(&self, vars: &[(&'static str, String)]) -> Result<(), ControlError> {
        let mut all: Vec<(String, String)> = vars
            .iter()
            .map(|(name, value)| (format!("__{name}"), value.clone()))
            .collect();
        all.push(("TIMEOUT(absolute)".to_owned(), "0".to_owned()));
        let failed = self
            .client
            .set_all_variables(&self.channel, &all)
            .await
            .map_err(map)?;
        // Routing the caller matters more than the metadata: go on without what could not be set.
        for (i, e) in failed {
            match vars.get(i) {
                Some((name, _)) => {
                    tracing::error!(variable = name, error = %crate::telemetry::ErrorChain(&e), "could not set call metadata")
                }
                None => {
                    tracing::warn!(error = %crate::telemetry::ErrorChain(&e), "could not clear the safety-net timeout")
                }
            }
        }
        Ok(())
    }

    /// Continues at `target`, or at the next priority after `Stasis()` when there is none. A continue
    /// that fails for another reason than the channel being gone is retried; if it never succeeds the
    /// dialplan's safety net is re-armed so that the caller is still routed, by Asterisk.
    async fn go(&self, target: Option<&Route>) -> Result<Destination, ControlError> {
        let (ctx, ext, pri, destination) = match (target, &self.stasis_at) {
            (Some(r), _) => (
                r.context.as_str(),
                r.extension.as_str(),
                r.priority,
                Destination::Route(r.clone()),
            ),
            (None, Some((ctx, ext, pri))) => (
                ctx.as_str(),
                ext.as_str(),
                pri + 1,
                Destination::NextPriority,
            ),
            (None, None) => {
                self.client
                    .hangup(&self.channel, Some("normal"))
                    .await
                    .map_err(map)?;
                return Ok(Destination::HungUp);
            }
        };
        let mut last = None;
        for delay in CONTINUE_RETRIES {
            tokio::time::sleep(delay).await;
            match self
                .client
                .continue_in_dialplan(&self.channel, ctx, ext, pri)
                .await
            {
                Ok(()) => return Ok(destination),
                Err(e) if e.is_gone() => return Err(ControlError::Gone),
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::ErrorChain(&e), "continue failed");
                    last = Some(e);
                }
            }
        }
        tracing::error!("could not continue the call; re-arming the dialplan safety net");
        let _ = self
            .client
            .set_variable(&self.channel, "TIMEOUT(absolute)", SAFETY_NET_RETRY)
            .await;
        Err(ControlError::Failed(
            last.map(|e| e.to_string()).unwrap_or_default(),
        ))
    }

    /// Sets the metadata and continues at the next priority after `Stasis()`.
    async fn conclude_next(
        &self,
        vars: &[(&'static str, String)],
    ) -> Result<Destination, ControlError> {
        self.set_metadata(vars).await?;
        self.go(None).await
    }
}

#[allow(clippy::disallowed_methods)] // wall-clock time of an outcome decided by the adapter
fn task_wall_clock() -> std::time::SystemTime {
    std::time::SystemTime::now()
}
