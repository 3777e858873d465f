//! The per-call driver: owns one `dialog::Call` (and through it the `verify::Session`), feeds it PBX
//! events, provider answers and timers, and executes its commands.
//!
//! Invariants: this is the only place where the core meets I/O and the clock. Provider requests run as
//! child futures that report back, so a slow provider never delays a hang-up. The task ends only when
//! the dialogue is done (outcome recorded, call routed or gone, no order left open), bounded by the
//! gate deadline plus request timeouts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::journal::{self, Journal};
use super::limits::{self, Limiter};
use super::live::{
    CallState, CallView, CheckMethod, Live, LiveKind, Refusal, StartedBy, VerificationView,
};
use super::registry::{Entry, Handle, Registry};
use super::{CallControl, CallEvent, ControlError, Destination, Report, Snapshot};
use crate::audit::{self, Audit, Event};
use crate::config::OnShutdown;
use crate::dialog::anchor::{self, Anchor, Leg};
use crate::dialog::{Call, CallInfo, Command, IdpCommand, Input, PlaybackId, Timer};
use crate::idp::Provider;
use crate::outcome::{self, Identity, Outcome, Reason, Record, Status};
use crate::pnr::PseudonymKey;
use crate::policy::{Mode, QueuePolicy, Route};
use crate::telemetry::{FunnelStep, Metrics};
use crate::verify::{self, ProviderError, Stage};

/// Shared by every call of one process.
pub struct Deps {
    pub providers: HashMap<String, Arc<dyn Provider>>,
    pub limits: Limiter,
    pub key: PseudonymKey,
    pub verify: verify::Settings,
    pub audit: Option<Audit>,
    /// Open orders, kept durably so that a restart can resume or cancel them.
    pub journal: Option<Journal>,
    /// What a drain does with calls still in the gate (`Handover` needs the journal).
    pub on_shutdown: OnShutdown,
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    pub reports: broadcast::Sender<Report>,
    /// The agent API's view of calls and checks.
    pub live: Arc<Live>,
    /// Fired when the drain starts: bridged calls are released at once (left running for the next
    /// start), calls in the gate get the grace period.
    pub drain: CancellationToken,
    /// Signed webhooks to CRMs, when targets are configured.
    pub webhooks: Option<crate::webhooks::Webhooks>,
}

/// What a new call starts with.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The caller's channel id.
    pub call_id: String,
    pub policy: Arc<QueuePolicy>,
    pub info: CallInfo,
    /// The caller's number as the PBX reports it (used only, hashed, for rate limits).
    pub caller_line: String,
    /// Set when the call's order was started by a previous process: take it over.
    pub resume: Option<Resume>,
    /// Set when a previous process left the call bridged with an agent leg: take it over.
    pub adopt: Option<Adopt>,
}

/// An anchored call a previous process left in its bridge.
#[derive(Debug, Clone)]
pub struct Adopt {
    /// The agent the queue had connected, if any.
    pub agent: Option<String>,
    /// Whether the agent leg is still there.
    pub agent_leg: bool,
}

/// An order a previous process started and journalled, whose caller still waits.
#[derive(Debug, Clone)]
pub struct Resume {
    pub entry: journal::Entry,
    /// How long ago the order was created.
    pub elapsed: Duration,
}

const INBOX: usize = 64;
/// How long a call waits for its order to be on disk before it goes on without.
const JOURNAL_WAIT: Duration = Duration::from_secs(2);

/// Registers the call and spawns its task. `false` if a task for this call already exists.
pub fn spawn(
    deps: Arc<Deps>,
    setup: Setup,
    control: Arc<dyn CallControl>,
    tracker: &TaskTracker,
    parent: &CancellationToken,
) -> bool {
    let (tx, rx) = mpsc::channel(INBOX);
    let reference = match &setup.resume {
        Some(r) => r.entry.reference.clone(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let (snap_tx, snap_rx) = watch::channel(Snapshot {
        call_id: setup.call_id.clone(),
        queue: setup.policy.name.0.clone(),
        reference: reference.clone(),
        stage: None,
        outcome: None,
        started_at: wall_clock(),
    });
    let cancel = parent.child_token();
    let handle = Handle {
        inbox: tx,
        snapshot: snap_rx,
        cancel: cancel.clone(),
    };
    let Some(entry) = deps.registry.insert(&setup.call_id, handle) else {
        return false;
    };
    let span = tracing::info_span!("call", call.id = %setup.call_id, queue = %setup.policy.name);
    let driver = Driver {
        deps,
        control,
        reference,
        snapshot: snap_tx,
        stages: Vec::new(),
        timers: HashMap::new(),
        idp: JoinSet::new(),
        playback_prefix: String::new(),
        view_state: CallState::Gate,
        agent: None,
        aliases: Vec::new(),
        can_verify: false,
        check: None,
        check_gen: 0,
        anchor_to: None,
        next_check: None,
        pending: Vec::new(),
        order_person: None,
        check_person: None,
        start_person: None,
        journalled: None,
        funnel: Default::default(),
        started: now(),
        setup,
        _entry: entry,
    };
    let mut driver = driver;
    driver.playback_prefix = driver.reference.clone();
    let registry = driver.deps.registry.clone();
    let metrics = Arc::clone(&driver.deps.metrics);
    metrics.set_gauge("callgate_calls_active", registry.len() as f64);
    tracker.spawn(
        async move {
            driver.run(rx, cancel).await;
            // The driver (and with it the registry entry) is gone now.
            metrics.set_gauge("callgate_calls_active", registry.len() as f64);
        }
        .instrument(span),
    );
    true
}

#[allow(clippy::disallowed_methods)] // the call task is where the wall clock is read
pub(crate) fn wall_clock() -> SystemTime {
    SystemTime::now()
}

#[allow(clippy::disallowed_methods)] // the call task is where the clock is read
pub(crate) fn now() -> Instant {
    Instant::now()
}

struct Driver {
    deps: Arc<Deps>,
    control: Arc<dyn CallControl>,
    setup: Setup,
    reference: String,
    snapshot: watch::Sender<Snapshot>,
    stages: Vec<Stage>,
    timers: HashMap<Timer, Instant>,
    /// Provider requests in flight, tagged with the check they belong to (0: the gate's).
    idp: JoinSet<(u32, verify::Input)>,
    /// Playback ids are `<prefix>-<n>` for the whole call.
    playback_prefix: String,
    /// What the live view shows.
    view_state: CallState,
    agent: Option<String>,
    aliases: Vec<String>,
    can_verify: bool,
    /// The current (or last) check as the API sees it.
    check: Option<VerificationView>,
    /// The anchored machine's generation of `check`.
    check_gen: u32,
    /// The gate handed the call to its agent: anchor it, or route it here if that cannot be done.
    anchor_to: Option<Route>,
    /// The id and starter of the check the API just asked for, until the machine starts it.
    next_check: Option<(String, StartedBy)>,
    /// Inputs produced while executing commands (e.g. a channel found gone).
    pending: Vec<Input>,
    /// Pseudonym of the person whose order this call holds in the limits.
    order_person: Option<String>,
    /// Pseudonym of the person of the current check's last granted order (kept past the order's end,
    /// for the cool-down after a declined call).
    check_person: Option<String>,
    /// The journal's pseudonym of the person of the start in flight.
    start_person: Option<String>,
    /// The order of this call that is open in the journal.
    journalled: Option<String>,
    /// Funnel steps this call has reached (each counted once).
    funnel: std::collections::BTreeSet<FunnelStep>,
    started: Instant,
    _entry: Entry,
}

impl Driver {
    async fn run(mut self, mut inbox: mpsc::Receiver<CallEvent>, cancel: CancellationToken) {
        self.publish(LiveKind::CallStarted);
        let policy = Arc::clone(&self.setup.policy);
        if let Some(adopt) = self.setup.adopt.clone() {
            tracing::info!("bridged call adopted after a restart");
            let mut anchor = Anchor::adopt(
                Arc::clone(&policy),
                self.deps.verify.clone(),
                self.setup.info.clone(),
                adopt.agent.clone(),
            );
            self.agent = adopt.agent;
            if !adopt.agent_leg {
                anchor.handle(anchor::Input::AgentLegEnded, now().into_std());
            }
            self.run_anchored(anchor, &mut inbox, &cancel).await;
        } else if policy.mode == Mode::DuringCall && self.setup.resume.is_none() {
            tracing::info!("call anchored for checks during the call");
            let anchor = Anchor::new(
                Arc::clone(&policy),
                self.deps.verify.clone(),
                self.setup.info.clone(),
                policy.routes.unavailable.clone(),
                now().into_std(),
            );
            self.run_anchored(anchor, &mut inbox, &cancel).await;
        } else {
            self.run_gate(&mut inbox, &cancel).await;
            if let Some(fallback) = self.anchor_to.take() {
                if cancel.is_cancelled() || self.deps.drain.is_cancelled() {
                    // Shutting down between the gate and the bridge: route the caller as before.
                    self.route_without_agent(&fallback).await;
                } else {
                    let anchor = Anchor::new(
                        Arc::clone(&policy),
                        self.deps.verify.clone(),
                        self.setup.info.clone(),
                        fallback,
                        now().into_std(),
                    );
                    self.run_anchored(anchor, &mut inbox, &cancel).await;
                }
            }
        }
        // Let outstanding provider requests (a final cancel) complete; each is bounded by its timeout.
        let drain = async { while self.idp.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(15), drain)
            .await
            .is_err()
        {
            tracing::warn!("provider requests still running at the end of the call");
        }
        self.release_order();
        self.view_state = CallState::Ended;
        self.can_verify = false;
        self.publish(LiveKind::CallEnded);
        self.webhook(LiveKind::CallEnded);
    }

    /// The before-agent gate.
    async fn run_gate(
        &mut self,
        inbox: &mut mpsc::Receiver<CallEvent>,
        cancel: &CancellationToken,
    ) {
        let mut call = match self.setup.resume.clone() {
            None => {
                tracing::info!("call entered the gate");
                self.step(FunnelStep::Entered);
                Call::new(
                    Arc::clone(&self.setup.policy),
                    self.deps.verify.clone(),
                    self.setup.info.clone(),
                    now().into_std(),
                )
            }
            Some(resume) => self.resume(resume),
        };
        let mut interrupted = false;
        loop {
            self.execute(&mut call).await;
            if call.is_done() {
                break;
            }
            let next = self.timers.values().min().copied();
            let input = tokio::select! {
                _ = cancel.cancelled(), if !interrupted => {
                    interrupted = true;
                    Some(match self.deps.on_shutdown {
                        OnShutdown::Interrupt => Input::Interrupt(Reason::Restart),
                        OnShutdown::Handover => Input::Handover,
                    })
                }
                event = inbox.recv() => Some(match event {
                    Some(e) => match self.translate(e) {
                        Some(i) => i,
                        None => continue,
                    },
                    None => Input::Hangup,
                }),
                Some(done) = self.idp.join_next(), if !self.idp.is_empty() => match done {
                    Ok((_, i)) => Some(Input::Idp(i)),
                    Err(e) => {
                        tracing::error!(error = %crate::telemetry::ErrorChain(&e), "provider request task failed");
                        None
                    }
                },
                _ = sleep_until(next), if next.is_some() => None,
            };
            if let Some(input) = input {
                if let Input::Idp(verify::Input::Started(Ok(started))) = &input {
                    // Durable before the caller is told to open the app.
                    self.journal_open(&started.order.0).await;
                    self.step(FunnelStep::OrderCreated);
                }
                call.handle(input, now().into_std());
            }
            self.fire_due(&mut call);
        }
        if self.anchor_to.is_some() {
            // The gate's order is over; the call goes on with its agent.
            self.journal_close();
            return;
        }
        let drain = async { while self.idp.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(15), drain)
            .await
            .is_err()
        {
            tracing::warn!("provider requests still running at the end of the call");
        }
        self.release_order();
        if call.is_handed_over() {
            tracing::info!(
                order = self.journalled.as_deref().unwrap_or(""),
                "call handed over to the next start: order left open in the journal"
            );
        } else {
            self.journal_close();
        }
    }

    fn resume(&mut self, resume: Resume) -> Call {
        tracing::info!(order = %resume.entry.order, "call resumed after a restart; collecting its order again");
        self.journalled = Some(resume.entry.order.clone());
        self.stages.push(Stage::OrderCreated);
        let expect = match &self.deps.journal {
            Some(j) => verify::Expect::Pseudonym {
                key: j.key().clone(),
                person: resume.entry.person.clone(),
            },
            // Without the journal there is nothing to resume from; the session fails closed.
            None => verify::Expect::Pseudonym {
                key: self.deps.key.clone(),
                person: String::new(),
            },
        };
        Call::resume(
            Arc::clone(&self.setup.policy),
            self.deps.verify.clone(),
            self.setup.info.clone(),
            verify::OrderRef(resume.entry.order),
            expect,
            resume.elapsed,
            now().into_std(),
        )
    }

    async fn journal_open(&mut self, order: &str) {
        let Some(journal) = self.deps.journal.clone() else {
            return;
        };
        self.journal_close();
        let entry = journal::Entry {
            order: order.to_owned(),
            call: self.setup.call_id.clone(),
            queue: self.setup.policy.name.0.clone(),
            idp: self.setup.policy.idp.clone(),
            reference: self.reference.clone(),
            person: self.start_person.clone().unwrap_or_default(),
            started_ms: unix_ms(wall_clock()),
        };
        // A stalled disk must not hold the caller: past the bound the call goes on unjournalled.
        let written = tokio::time::timeout(JOURNAL_WAIT, journal.opened(entry)).await;
        if written != Ok(true) {
            tracing::error!(
                "order could not be journalled in time; it may not be resumed after a crash"
            );
        }
        // Closed at the end all the same, in case a late write lands.
        self.journalled = Some(order.to_owned());
    }

    fn journal_close(&mut self) {
        if let (Some(journal), Some(order)) = (&self.deps.journal, self.journalled.take()) {
            journal.closed(&order);
        }
    }

    fn translate(&self, event: CallEvent) -> Option<Input> {
        Some(match event {
            CallEvent::Dtmf(d) => Input::Dtmf(d),
            CallEvent::PlaybackEnded(id) => Input::PlaybackEnded(self.playback_from(&id)?),
            CallEvent::Hangup => Input::Hangup,
            CallEvent::LinkDown => Input::LinkDown,
            CallEvent::Resync => Input::Resync,
            CallEvent::Detach => Input::Detached(Reason::PbxLost),
            CallEvent::Superseded => Input::Idp(verify::Input::Cancel(Reason::Superseded)),
            CallEvent::StartCheck(req) => {
                // In the gate, the call is not with an agent yet.
                let _ = req.reply.send(Err(Refusal::NotAnchored));
                return None;
            }
            CallEvent::CancelCheck(req) => {
                let _ = req.reply.send(Err(Refusal::NotAnchored));
                return None;
            }
            CallEvent::AgentLegUp
            | CallEvent::AgentAnswered(_)
            | CallEvent::AgentLegEnded
            | CallEvent::AgentDtmf(_) => return None,
        })
    }

    fn playback_id(&self, id: PlaybackId) -> String {
        format!("{}-{}", self.playback_prefix, id.0)
    }

    fn playback_from(&self, s: &str) -> Option<PlaybackId> {
        let n = s.strip_prefix(&self.playback_prefix)?.strip_prefix('-')?;
        n.parse().ok().map(PlaybackId)
    }

    fn fire_due(&mut self, call: &mut Call) {
        let now = now();
        let mut due: Vec<(Timer, Instant)> = self
            .timers
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(t, at)| (*t, *at))
            .collect();
        due.sort_by_key(|(_, at)| *at);
        for (t, _) in due {
            // Firing one may disarm or re-arm others.
            if self.timers.get(&t).is_some_and(|at| *at <= now) {
                self.timers.remove(&t);
                call.handle(Input::Timer(t), now.into_std());
            }
        }
    }

    /// Runs every command the dialogue has, feeding back what their execution produced.
    async fn execute(&mut self, call: &mut Call) {
        loop {
            while let Some(cmd) = call.poll_command() {
                self.command(cmd).await;
            }
            if self.pending.is_empty() {
                break;
            }
            for input in std::mem::take(&mut self.pending) {
                call.handle(input, now().into_std());
            }
        }
        let stage = call.stage();
        let outcome = call.outcome();
        self.snapshot.send_if_modified(|s| {
            let changed = s.stage != stage || s.outcome != outcome;
            s.stage = stage;
            s.outcome = outcome;
            changed
        });
    }

    /// Publishes the call's view to the agent API.
    fn publish(&self, kind: LiveKind) {
        self.deps.live.publish(
            kind,
            CallView {
                call_id: self.setup.call_id.clone(),
                queue: self.setup.policy.name.0.clone(),
                state: self.view_state,
                agent: self.agent.clone(),
                aliases: self.aliases.clone(),
                started_at: self.snapshot.borrow().started_at,
                can_verify: self.can_verify,
                verification: self.check.clone(),
                keypad: true,
                owner: None,
            },
        );
    }

    /// A new check's view (the gate's, or one started during the call).
    fn new_check(&mut self, id: String, method: CheckMethod, by: StartedBy) {
        self.reference = id.clone();
        self.check = Some(VerificationView {
            id,
            call_id: self.setup.call_id.clone(),
            queue: self.setup.policy.name.0.clone(),
            idp: self.setup.policy.idp.clone(),
            method,
            started_by: by,
            started_at: wall_clock(),
            ended_at: None,
            stages: Vec::new(),
            outcome: None,
            fields: Vec::new(),
            limit: None,
            word_pair: None,
        });
    }

    fn gone_or_warn(&mut self, what: &'static str, r: Result<(), ControlError>) {
        match r {
            Ok(()) => {}
            Err(ControlError::Gone) => self.pending.push(Input::Hangup),
            Err(ControlError::Failed(e)) => {
                tracing::warn!(op = what, error = %e, "pbx request failed")
            }
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Answer => {
                let r = self.control.answer().await;
                self.gone_or_warn("answer", r);
            }
            Command::Play {
                id, media, lang, ..
            } => {
                let pb = self.playback_id(id);
                match self.control.play(&pb, &media, lang).await {
                    Ok(()) => {}
                    Err(ControlError::Gone) => self.pending.push(Input::Hangup),
                    Err(ControlError::Failed(e)) => {
                        // A prompt that cannot play must not stall the caller.
                        tracing::warn!(error = %e, "prompt could not be played");
                        self.pending.push(Input::PlaybackEnded(id));
                    }
                }
            }
            Command::StopPlayback(id) => {
                let pb = self.playback_id(id);
                let r = self.control.stop_playback(&pb).await;
                self.gone_or_warn("stop_playback", r);
            }
            Command::CheckPlayback(id) => {
                let pb = self.playback_id(id);
                match self.control.playback_running(&pb).await {
                    Ok(true) => {}
                    Ok(false) => self.pending.push(Input::PlaybackEnded(id)),
                    Err(ControlError::Gone) => self.pending.push(Input::Hangup),
                    // Unknown: the prompt guard still bounds the wait for its end.
                    Err(ControlError::Failed(e)) => {
                        tracing::warn!(op = "check_playback", error = %e, "pbx request failed")
                    }
                }
            }
            Command::StartMoh { class } => {
                let r = self.control.start_moh(&class).await;
                self.gone_or_warn("start_moh", r);
            }
            Command::StopMoh => {
                let r = self.control.stop_moh().await;
                self.gone_or_warn("stop_moh", r);
            }
            Command::ArmTimer { timer, at } => {
                self.timers.insert(timer, Instant::from_std(at));
            }
            Command::DisarmTimer(timer) => {
                self.timers.remove(&timer);
            }
            Command::Idp(req) => {
                if let Some(answer) = self.provider_request(0, req).await {
                    self.pending.push(Input::Idp(answer));
                }
            }
            Command::Progress(stage) => {
                if self.check.is_none() {
                    let id = self.reference.clone();
                    self.new_check(id, CheckMethod::Ivr, StartedBy::Gate);
                }
                self.progress(stage);
            }
            Command::Finish {
                outcome,
                identity,
                route,
            } => self.finish(outcome, identity, route).await,
        }
    }

    fn provider(&self) -> Option<Arc<dyn Provider>> {
        self.deps.providers.get(&self.setup.policy.idp).cloned()
    }

    /// Sends a provider request for check `gen` as a child future; an answer known at once (no such
    /// provider, refused by the limits) is returned instead.
    async fn provider_request(&mut self, gen: u32, req: IdpCommand) -> Option<verify::Input> {
        let Some(provider) = self.provider() else {
            tracing::error!(idp = %self.setup.policy.idp, "no such identity provider");
            if let IdpCommand::Start(_) = req {
                return Some(verify::Input::Started(Err(ProviderError::Fatal)));
            }
            return None;
        };
        let idp_name = self.setup.policy.idp.clone();
        let metrics = Arc::clone(&self.deps.metrics);
        if let (IdpCommand::Start(order), Some(journal)) = (&req, &self.deps.journal) {
            self.start_person = Some(journal.person(&order.number));
        }
        match req {
            IdpCommand::Start(order) if self.order_person.is_some() => {
                // A retry of the same order (not sent, maintenance, already in progress): the person's
                // slot is held already and a retry is not a new start for the rate limits.
                self.spawn_start(gen, provider, order, idp_name, metrics);
            }
            IdpCommand::Start(order) => {
                self.step(FunnelStep::NumberAccepted);
                let person = order.number.pseudonym(&self.deps.key);
                let line = line_key(&self.setup.caller_line);
                let agent = self.agent_key();
                let start = limits::Start {
                    person: &person,
                    line: &line,
                    call: &self.setup.call_id,
                    queue: &self.setup.policy.name.0,
                    idp: &self.setup.policy.idp,
                    agent: agent.as_deref(),
                };
                match self.deps.limits.acquire(start, now().into_std()).await {
                    Err(limit) => {
                        let reason = limit.reason();
                        tracing::warn!(reason = %reason, limit = limit.code(), "order refused by limits");
                        self.deps
                            .metrics
                            .limit_refused(&self.setup.policy.name.0, limit.code());
                        if self.check.is_none() {
                            let id = self.reference.clone();
                            self.new_check(id, CheckMethod::Ivr, StartedBy::Gate);
                        }
                        if let Some(v) = self.check.as_mut() {
                            v.limit = Some(limit);
                        }
                        return Some(verify::Input::Started(Err(ProviderError::Rejected(reason))));
                    }
                    Ok(grant) => {
                        self.order_person = Some(person.clone());
                        self.check_person = Some(person);
                        if let Some(other) = grant.supersede {
                            tracing::info!(other.call = %other, "superseding an older order for the same person");
                            let registry = self.deps.registry.clone();
                            tokio::spawn(async move {
                                registry.send(&other, CallEvent::Superseded).await;
                            });
                        }
                    }
                }
                self.spawn_start(gen, provider, order, idp_name, metrics);
            }
            IdpCommand::Poll(order) => {
                self.idp.spawn(async move {
                    let r = timed(&metrics, &idp_name, "poll", provider.poll(&order)).await;
                    (gen, verify::Input::Polled(r))
                });
            }
            IdpCommand::Cancel(order) => {
                self.idp.spawn(async move {
                    let r = timed(&metrics, &idp_name, "cancel", provider.cancel(&order)).await;
                    (gen, verify::Input::CancelDone(r))
                });
            }
        }
        None
    }

    fn spawn_start(
        &mut self,
        gen: u32,
        provider: Arc<dyn Provider>,
        order: verify::Order,
        idp_name: String,
        metrics: Arc<Metrics>,
    ) {
        self.idp.spawn(async move {
            let r = timed(&metrics, &idp_name, "start", provider.start(&order)).await;
            (gen, verify::Input::Started(r))
        });
    }

    fn progress(&mut self, stage: Stage) {
        tracing::debug!(stage = stage.code(), "verification progress");
        self.stages.push(stage);
        if let Some(v) = self.check.as_mut() {
            v.stages.push((stage, wall_clock()));
        }
        if stage != Stage::Done {
            self.publish(LiveKind::Progress);
        }
        match stage {
            Stage::ConfirmingCall | Stage::Identifying => {
                self.step(FunnelStep::AppOpened);
                if stage == Stage::Identifying {
                    self.step(FunnelStep::CallConfirmed);
                }
            }
            Stage::Done => {
                self.release_order();
                self.journal_close();
            }
            _ => {}
        }
    }

    /// Counts a funnel step the first time this call reaches it.
    fn step(&mut self, step: FunnelStep) {
        if self.funnel.insert(step) {
            let policy = &self.setup.policy;
            self.deps.metrics.funnel(&policy.name.0, &policy.idp, step);
        }
    }

    /// Who a start counts for in the per-agent limit: nobody for the gate; for a check during the
    /// call, the call's agent (their interface), else the API token that asked for it.
    fn agent_key(&self) -> Option<String> {
        let by = &self.check.as_ref()?.started_by;
        match (by, &self.agent) {
            (StartedBy::Gate, _) => None,
            (_, Some(agent)) => Some(format!("agent:{agent}")),
            (StartedBy::Api(token), None) => Some(format!("token:{token}")),
            (StartedBy::AgentKeys, None) => Some("agent:".to_owned()),
            (StartedBy::Switchboard(name), None) => Some(format!("switchboard:{name}")),
        }
    }

    /// A check ended: a person who declined the call in their app cools down.
    fn note_outcome_for_limits(&mut self, outcome: Outcome) {
        let person = self.check_person.take();
        if outcome == Outcome::NotVerified(Reason::DeclinedCall) {
            if let Some(person) = person {
                self.deps.limits.declined(&person, now().into_std());
            }
        }
    }

    fn release_order(&mut self) {
        if let Some(person) = self.order_person.take() {
            self.deps.limits.release(&person, &self.setup.call_id);
        }
    }

    async fn finish(
        &mut self,
        outcome: Outcome,
        identity: Option<Identity>,
        route: Option<crate::policy::Route>,
    ) {
        let policy = Arc::clone(&self.setup.policy);
        let checked = !self.stages.is_empty();
        let method = if checked {
            self.provider()
                .map(|p| p.method().to_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let record = Record {
            reference: self.reference.clone(),
            method,
            outcome,
            at: wall_clock(),
            identity,
        };
        let vars = outcome::render(&record, &policy.disclose, &self.deps.key);
        // The record is on disk (or its bounded wait is over) before the result is set on the
        // channel and the call goes on; it names where the call is being sent.
        let planned = match &route {
            None => Destination::Gone,
            Some(_) if policy.anchors_after(outcome) => Destination::Agent,
            Some(r) => Destination::Route(r.clone()),
        };
        let duration = self.started.elapsed();
        if let Some(audit) = &self.deps.audit {
            let entry = self.audit_entry(audit, &record, &planned, duration);
            audit.record(record.at, Event::Verification(entry)).await;
        }
        let destination = match route {
            None => Destination::Gone,
            Some(route) if policy.anchors_after(outcome) => {
                // On to the agent in the call's bridge: the result stays on the channel, the call
                // stays ours.
                match self.control.keep(&vars).await {
                    Ok(()) => {
                        self.anchor_to = Some(route);
                        Destination::Agent
                    }
                    Err(ControlError::Gone) => Destination::Gone,
                    Err(ControlError::Failed(e)) => {
                        tracing::error!(error = %e, "could not keep the call for its agent; routing it");
                        let fallback = policy.routes.unavailable.clone();
                        self.control
                            .conclude(&vars, &route, &fallback)
                            .await
                            .unwrap_or(Destination::Gone)
                    }
                }
            }
            Some(route) => {
                let fallback = policy.routes.unavailable.clone();
                match self.control.conclude(&vars, &route, &fallback).await {
                    Ok(d) => d,
                    Err(ControlError::Gone) => Destination::Gone,
                    Err(ControlError::Failed(e)) => {
                        tracing::error!(error = %e, "could not route the caller");
                        Destination::Gone
                    }
                }
            }
        };
        if let (Some(audit), true) = (&self.deps.audit, destination != planned) {
            audit.note(Event::Rerouted {
                reference: self.reference.clone(),
                call_id: self.setup.call_id.clone(),
                destination: destination.to_string(),
            });
        }
        if let Some(v) = self.check.as_mut() {
            v.outcome = Some(outcome);
            v.ended_at = Some(record.at);
            v.fields = live_fields(&vars);
        }
        if checked {
            self.publish(LiveKind::Completed);
            self.webhook(LiveKind::Completed);
        }
        self.deps.metrics.call_ended(&policy.name.0, outcome);
        self.count_outcome(outcome, checked);
        self.note_outcome_for_limits(outcome);
        let level_error = matches!(outcome.status(), Status::Unavailable | Status::Interrupted)
            || destination == Destination::NextPriority;
        if level_error {
            tracing::warn!(status = %outcome.status(), reason = outcome.reason().map(|r| r.code()).unwrap_or(""), destination = %destination, reference = %self.reference, "call left the gate");
        } else {
            tracing::info!(status = %outcome.status(), reason = outcome.reason().map(|r| r.code()).unwrap_or(""), destination = %destination, reference = %self.reference, "call left the gate");
        }
        let _ = self.deps.reports.send(Report {
            call_id: self.setup.call_id.clone(),
            queue: policy.name.0.clone(),
            reference: self.reference.clone(),
            outcome,
            stages: self.stages.clone(),
            destination,
            duration,
        });
    }
}

impl Driver {
    /// An anchored call: the caller in a bridge with the agent leg until either side leaves.
    async fn run_anchored(
        &mut self,
        mut anchor: Anchor,
        inbox: &mut mpsc::Receiver<CallEvent>,
        cancel: &CancellationToken,
    ) {
        let mut timers: HashMap<anchor::Timer, Instant> = HashMap::new();
        let mut released = false;
        let drain = self.deps.drain.clone();
        self.view_state = if anchor.is_talking() {
            CallState::Talking
        } else {
            CallState::WaitingForAgent
        };
        self.can_verify = anchor.can_verify();
        match self.control.aliases().await {
            Ok(a) => self.aliases = a,
            Err(e) => tracing::debug!(error = %e, "no aliases for the call"),
        }
        self.publish(LiveKind::Progress);
        loop {
            self.execute_anchor(&mut anchor, &mut timers).await;
            if anchor.is_done() {
                break;
            }
            let next = timers.values().min().copied();
            let input = tokio::select! {
                _ = cancel.cancelled(), if !released => {
                    released = true;
                    Some(anchor::Input::Shutdown)
                }
                _ = drain.cancelled(), if !released => {
                    released = true;
                    Some(anchor::Input::Shutdown)
                }
                event = inbox.recv() => match event {
                    Some(e) => self.translate_anchored(e, &mut anchor),
                    None => Some(anchor::Input::CallerGone),
                },
                Some(done) = self.idp.join_next(), if !self.idp.is_empty() => match done {
                    Ok((gen, i)) => Some(anchor::Input::Idp(gen, i)),
                    Err(e) => {
                        tracing::error!(error = %e, "provider request task failed");
                        None
                    }
                },
                _ = sleep_until(next), if next.is_some() => None,
            };
            if let Some(input) = input {
                if let anchor::Input::Idp(gen, verify::Input::Started(Ok(started))) = &input {
                    if *gen == self.check_gen {
                        self.step(FunnelStep::OrderCreated);
                        self.journal_open(&started.order.0).await;
                        // Shown to the agent with the order's first progress.
                        if let Some(check) = self.check.as_mut() {
                            check.word_pair.clone_from(&started.word_pair);
                        }
                    }
                }
                anchor.handle(input, now().into_std());
            }
            let at = now();
            let mut due: Vec<(anchor::Timer, Instant)> = timers
                .iter()
                .filter(|(_, t)| **t <= at)
                .map(|(k, t)| (*k, *t))
                .collect();
            due.sort_by_key(|(_, t)| *t);
            for (t, _) in due {
                if timers.get(&t).is_some_and(|x| *x <= at) {
                    timers.remove(&t);
                    anchor.handle(anchor::Input::Timer(t), at.into_std());
                }
            }
        }
        if anchor.is_released() {
            tracing::info!("bridged call left running for the next start");
        }
    }

    fn translate_anchored(
        &mut self,
        event: CallEvent,
        anchor: &mut Anchor,
    ) -> Option<anchor::Input> {
        use anchor::Input as A;
        Some(match event {
            CallEvent::Dtmf(d) => A::CallerDtmf(d),
            CallEvent::AgentDtmf(d) => A::AgentDtmf(d),
            CallEvent::PlaybackEnded(id) => A::PlaybackEnded(self.playback_from(&id)?),
            CallEvent::Hangup => A::CallerGone,
            CallEvent::Detach => A::Detached,
            CallEvent::AgentLegUp => A::AgentLegUp,
            CallEvent::AgentAnswered(agent) => A::AgentAnswered(agent),
            CallEvent::AgentLegEnded => A::AgentLegEnded,
            CallEvent::Superseded => A::Superseded,
            // The bridge holds the call across a link gap; reconciliation reports what ended.
            CallEvent::LinkDown | CallEvent::Resync => return None,
            CallEvent::StartCheck(req) => {
                let result = self.start_check(anchor, req.by, req.number.map(|n| n.0));
                let _ = req.reply.send(result);
                return None;
            }
            CallEvent::CancelCheck(req) => {
                let id = self.check.as_ref().map(|c| c.id.clone());
                let result = anchor
                    .cancel_check(now().into_std())
                    .and_then(|()| id.ok_or(Refusal::NothingToCancel));
                if let Ok(reference) = &result {
                    tracing::info!(by = %req.by, "check cancelled");
                    if let Some(audit) = &self.deps.audit {
                        audit.note(Event::CheckCancelled {
                            reference: reference.clone(),
                            call_id: self.setup.call_id.clone(),
                            queue: self.setup.policy.name.0.clone(),
                            by: req.by.to_string(),
                        });
                    }
                }
                let _ = req.reply.send(result);
                return None;
            }
        })
    }

    /// Starts a check from the API (or the agent's keys, through the machine); its id, or why not.
    fn start_check(
        &mut self,
        anchor: &mut Anchor,
        by: StartedBy,
        typed: Option<String>,
    ) -> Result<String, Refusal> {
        let number = match typed {
            Some(t) => Some(anchor.parse_number(&t)?),
            None => None,
        };
        let method = if number.is_some() {
            CheckMethod::AgentTyped
        } else {
            CheckMethod::Keypad
        };
        let id = uuid::Uuid::new_v4().to_string();
        self.next_check = Some((id.clone(), by));
        if let Err(refused) = anchor.start_check(number, false, now().into_std()) {
            self.next_check = None;
            return Err(refused);
        }
        tracing::info!(method = method.code(), reference = %id, "check requested during the call");
        Ok(id)
    }

    /// The machine started check `gen` (requested through the API, or by the agent's keys).
    fn begin_check(&mut self, gen: u32, method: CheckMethod) {
        let (id, by) = self
            .next_check
            .take()
            .unwrap_or_else(|| (uuid::Uuid::new_v4().to_string(), StartedBy::AgentKeys));
        tracing::info!(by = %by, method = method.code(), reference = %id, "check started during the call");
        if let Some(audit) = &self.deps.audit {
            audit.note(Event::CheckStarted {
                reference: id.clone(),
                call_id: self.setup.call_id.clone(),
                queue: self.setup.policy.name.0.clone(),
                by: by.to_string(),
                method: method.code().to_owned(),
            });
        }
        self.check_gen = gen;
        self.stages.clear();
        // Each check during the call is its own way through the funnel, from the number on.
        self.funnel.clear();
        self.new_check(id, method, by);
        self.publish(LiveKind::Progress);
    }

    async fn execute_anchor(
        &mut self,
        anchor: &mut Anchor,
        timers: &mut HashMap<anchor::Timer, Instant>,
    ) {
        loop {
            let mut fed = Vec::new();
            while let Some(cmd) = anchor.poll_command() {
                if let Some(input) = self.anchor_command(cmd, anchor, timers).await {
                    fed.push(input);
                }
            }
            if fed.is_empty() {
                break;
            }
            for input in fed {
                anchor.handle(input, now().into_std());
            }
        }
        let can = anchor.can_verify();
        if can != self.can_verify {
            self.can_verify = can;
            self.publish(LiveKind::Progress);
        }
    }

    /// Executes one command of the anchored call; an input it produced is returned.
    async fn anchor_command(
        &mut self,
        cmd: anchor::Command,
        anchor: &mut Anchor,
        timers: &mut HashMap<anchor::Timer, Instant>,
    ) -> Option<anchor::Input> {
        use anchor::Command as C;
        use anchor::Input as A;
        let gone = |r: Result<(), ControlError>, what: &'static str| match r {
            Ok(()) => None,
            Err(ControlError::Gone) => Some(A::CallerGone),
            Err(ControlError::Failed(e)) => {
                tracing::warn!(op = what, error = %e, "pbx request failed");
                None
            }
        };
        match cmd {
            C::Anchor => {
                let policy = Arc::clone(&self.setup.policy);
                let Some(agent) = policy.routes.agent.as_ref() else {
                    return Some(A::Anchored(false));
                };
                let vars = self
                    .check
                    .as_ref()
                    .filter(|c| c.outcome.is_some())
                    .map(|_| self.gate_vars())
                    .unwrap_or_default();
                match self.control.anchor(agent, &vars).await {
                    Ok(()) => Some(A::Anchored(true)),
                    Err(ControlError::Gone) => Some(A::CallerGone),
                    Err(ControlError::Failed(e)) => {
                        tracing::error!(error = %e, "could not bridge the call with an agent leg");
                        Some(A::Anchored(false))
                    }
                }
            }
            C::AddAgentLeg => {
                let r = self.control.add_agent_leg().await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "could not add the agent leg to the bridge");
                }
                None
            }
            C::HangupAgentLeg => {
                if let Err(e) = self.control.hangup_agent_leg().await {
                    tracing::warn!(error = %e, "could not hang up the agent leg");
                }
                None
            }
            C::DestroyBridge => {
                if let Err(e) = self.control.destroy_bridge().await {
                    tracing::warn!(error = %e, "could not destroy the bridge");
                }
                None
            }
            C::MuteCaller(on) => gone(self.control.mute_caller(on).await, "mute"),
            C::Play {
                leg,
                id,
                media,
                lang,
                ..
            } => {
                let pb = self.playback_id(id);
                let r = match leg {
                    Leg::Caller => self.control.play(&pb, &media, lang).await,
                    Leg::Agent => self.control.play_to_agent(&pb, &media, lang).await,
                };
                match r {
                    Ok(()) => None,
                    Err(ControlError::Gone) if leg == Leg::Caller => Some(A::CallerGone),
                    Err(e) => {
                        tracing::warn!(error = %e, "prompt could not be played");
                        Some(A::PlaybackEnded(id))
                    }
                }
            }
            C::StopPlayback(id) => {
                let pb = self.playback_id(id);
                if let Err(e) = self.control.stop_playback(&pb).await {
                    tracing::debug!(error = %e, "could not stop a prompt");
                }
                None
            }
            C::ArmTimer { timer, at } => {
                timers.insert(timer, Instant::from_std(at));
                None
            }
            C::DisarmTimer(t) => {
                timers.remove(&t);
                None
            }
            C::Idp(gen, req) => {
                if gen == self.check_gen {
                    if let IdpCommand::Start(order) = &req {
                        if let Some(j) = &self.deps.journal {
                            self.start_person = Some(j.person(&order.number));
                        }
                    }
                }
                self.provider_request(gen, req)
                    .await
                    .map(|a| A::Idp(gen, a))
            }
            C::Progress { gen, stage } => {
                if gen == self.check_gen {
                    self.progress(stage);
                }
                None
            }
            C::CheckStarted { gen, method, .. } => {
                self.begin_check(gen, method);
                None
            }
            C::AgentConnected(agent) => {
                tracing::info!(agent = %agent, "agent connected");
                self.agent = Some(agent);
                self.view_state = CallState::Talking;
                self.can_verify = anchor.can_verify();
                self.publish(LiveKind::AgentConnected);
                None
            }
            C::CheckDone {
                gen,
                outcome,
                identity,
            } => {
                if gen == self.check_gen {
                    self.check_done(outcome, identity).await;
                }
                None
            }
            C::Route { route, why } => {
                tracing::info!(route = %route, why = why.code(), "caller leaves the bridge");
                self.view_state = CallState::Ended;
                let fallback = self.setup.policy.routes.unavailable.clone();
                match self.control.conclude(&[], &route, &fallback).await {
                    Ok(d) => tracing::info!(destination = %d, "caller routed on"),
                    Err(e) => tracing::warn!(error = %e, "could not route the caller"),
                }
                None
            }
            C::HangupCaller => {
                if let Err(e) = self.control.hangup_caller().await {
                    tracing::debug!(error = %e, "could not hang up the caller");
                }
                None
            }
            C::Ended => {
                self.view_state = CallState::Ended;
                None
            }
            C::Released => None,
        }
    }

    /// Counts a check's outcome: verifications (when a check ran) and the funnel's last step.
    fn count_outcome(&mut self, outcome: Outcome, checked: bool) {
        if checked {
            self.deps
                .metrics
                .verification_ended(&self.setup.policy.idp, outcome);
        }
        match outcome {
            Outcome::Verified => self.step(FunnelStep::Verified),
            Outcome::NotVerified(Reason::DeclinedCall) => self.step(FunnelStep::Declined),
            Outcome::NotVerified(Reason::Expired) => self.step(FunnelStep::Expired),
            _ if outcome.status() == Status::Unavailable => self.step(FunnelStep::Unavailable),
            _ => {}
        }
    }

    /// The audit line of a check (the gate's, or one during the call): pseudonym and evidence only
    /// when verified, never a number.
    fn audit_entry(
        &self,
        audit: &Audit,
        record: &Record,
        destination: &Destination,
        duration: Duration,
    ) -> audit::Entry {
        audit::Entry::of_check(
            audit,
            record,
            audit::CheckContext {
                call_id: &self.setup.call_id,
                queue: &self.setup.policy.name.0,
                started_by: self
                    .check
                    .as_ref()
                    .map(|c| c.started_by.to_string())
                    .unwrap_or_default(),
                stages: &self.stages,
                destination: destination.to_string(),
                duration,
            },
        )
    }

    /// The gate's result, for the agent leg's inheritable variables.
    fn gate_vars(&self) -> Vec<(&'static str, String)> {
        let Some(v) = &self.check else {
            return Vec::new();
        };
        v.fields
            .iter()
            .filter_map(|(name, value)| {
                crate::outcome::vars::ALL
                    .iter()
                    .find(|n| {
                        n.strip_prefix("CALLGATE_")
                            .is_some_and(|s| s.eq_ignore_ascii_case(name))
                    })
                    .map(|n| (*n, value.clone()))
            })
            .collect()
    }

    /// A mid-call check ended: its result on both legs, the record, the API.
    async fn check_done(&mut self, outcome: Outcome, identity: Option<Identity>) {
        let policy = Arc::clone(&self.setup.policy);
        let method = self
            .provider()
            .map(|p| p.method().to_owned())
            .unwrap_or_default();
        let record = Record {
            reference: self.reference.clone(),
            method,
            outcome,
            at: wall_clock(),
            identity,
        };
        let vars = outcome::render(&record, &policy.disclose, &self.deps.key);
        let started = self.check.as_ref().map(|c| c.started_at);
        // On disk (or its bounded wait over) before the result reaches the channels and the API.
        if let Some(audit) = &self.deps.audit {
            let duration = started
                .and_then(|s| record.at.duration_since(s).ok())
                .unwrap_or_default();
            let entry = self.audit_entry(audit, &record, &Destination::Agent, duration);
            audit.record(record.at, Event::Verification(entry)).await;
        }
        if self.view_state != CallState::Ended {
            if let Err(e) = self.control.set_result(&vars).await {
                tracing::debug!(error = %e, "could not set the check's result on the call");
            }
        }
        self.journal_close();
        self.release_order();
        if let Some(v) = self.check.as_mut() {
            v.outcome = Some(outcome);
            v.ended_at = Some(record.at);
            v.fields = live_fields(&vars);
        }
        let checked = !self.stages.is_empty();
        self.count_outcome(outcome, checked);
        self.note_outcome_for_limits(outcome);
        if outcome == Outcome::NotVerified(Reason::DeclinedCall) {
            tracing::warn!(reference = %self.reference, "the person declined the call in their app: someone may be calling in their name");
        } else {
            tracing::info!(status = %outcome.status(), reason = outcome.reason().map(|r| r.code()).unwrap_or(""), reference = %self.reference, "check during the call ended");
        }
        self.publish(LiveKind::Completed);
        self.webhook(LiveKind::Completed);
    }

    /// The gate handed the call to its agent but the process is stopping: route it as the gate
    /// would have.
    async fn route_without_agent(&mut self, route: &Route) {
        let fallback = self.setup.policy.routes.unavailable.clone();
        match self.control.conclude(&[], route, &fallback).await {
            Ok(d) => tracing::info!(destination = %d, "stopping: caller routed instead of bridged"),
            Err(e) => tracing::warn!(error = %e, "stopping: could not route the caller"),
        }
    }
}

impl Driver {
    /// Hands the call's event to the webhooks (never waits): the view as just published, so the
    /// webhook and the agent API show the same disclosed fields.
    fn webhook(&self, kind: LiveKind) {
        let Some(webhooks) = &self.deps.webhooks else {
            return;
        };
        let view = CallView {
            call_id: self.setup.call_id.clone(),
            queue: self.setup.policy.name.0.clone(),
            state: self.view_state,
            agent: self.agent.clone(),
            aliases: self.aliases.clone(),
            started_at: self.snapshot.borrow().started_at,
            can_verify: self.can_verify,
            verification: self.check.clone(),
            keypad: true,
            owner: None,
        };
        webhooks.call_event(kind, &view, wall_clock());
    }
}

/// The disclosed fields as the API shows them: `CALLGATE_STATUS` → `status`.
pub(crate) fn live_fields(vars: &[(&'static str, String)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(n, v)| {
            let name = n
                .strip_prefix("CALLGATE_")
                .unwrap_or(n)
                .to_ascii_lowercase();
            (name, v.clone())
        })
        .collect()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs one provider request, recording its latency and logging a failure (never a body).
pub(crate) async fn timed<T>(
    metrics: &Metrics,
    idp: &str,
    op: &'static str,
    request: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    use futures_util::FutureExt as _;
    let t = now();
    // A provider bug must not leave the session waiting for an answer that never comes.
    let r = std::panic::AssertUnwindSafe(request)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!(op, "provider request panicked");
            Err(ProviderError::OutcomeUnknown)
        });
    metrics.provider_latency(idp, op, t.elapsed());
    if let Err(e) = &r {
        metrics.provider_error(idp, op, e.class());
        tracing::warn!(op, error = ?e, "provider request failed");
    }
    r
}

pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A stable in-memory key for a caller line (rate limits only; never stored or logged).
pub(crate) fn line_key(line: &str) -> String {
    if line.is_empty() {
        return String::new();
    }
    let d = ring::digest::digest(&ring::digest::SHA256, line.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// For adapters: the dialogue's view of the call's PBX-facing identity.
pub fn call_info(channel_language: &str, today: time::Date) -> CallInfo {
    CallInfo {
        channel_language: channel_language.to_owned(),
        initiator: verify::Initiator::Caller,
        today,
    }
}

/// Today's date (UTC) for personal-number validation.
pub fn today() -> time::Date {
    time::OffsetDateTime::now_utc().date()
}
