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
use super::limits::Limits;
use super::registry::{Entry, Handle, Registry};
use super::{CallControl, CallEvent, ControlError, Destination, Report, Snapshot};
use crate::audit::{self, Audit};
use crate::config::OnShutdown;
use crate::dialog::{Call, CallInfo, Command, IdpCommand, Input, PlaybackId, Timer};
use crate::idp::Provider;
use crate::outcome::{self, Identity, Outcome, Reason, Record, Status};
use crate::pnr::PseudonymKey;
use crate::policy::QueuePolicy;
use crate::telemetry::{FunnelStep, Metrics};
use crate::verify::{self, ProviderError, Stage};

/// Shared by every call of one process.
pub struct Deps {
    pub providers: HashMap<String, Arc<dyn Provider>>,
    pub limits: Limits,
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
        pending: Vec::new(),
        order_person: None,
        start_person: None,
        journalled: None,
        funnel: Default::default(),
        started: now(),
        setup,
        _entry: entry,
    };
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
fn wall_clock() -> SystemTime {
    SystemTime::now()
}

#[allow(clippy::disallowed_methods)] // the call task is where the clock is read
fn now() -> Instant {
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
    idp: JoinSet<verify::Input>,
    /// Inputs produced while executing commands (e.g. a channel found gone).
    pending: Vec<Input>,
    /// Pseudonym of the person whose order this call holds in the limits.
    order_person: Option<String>,
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
                    Ok(i) => Some(Input::Idp(i)),
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
        // Let outstanding provider requests (a final cancel) complete; each is bounded by its timeout.
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
        })
    }

    fn playback_id(&self, id: PlaybackId) -> String {
        format!("{}-{}", self.reference, id.0)
    }

    fn playback_from(&self, s: &str) -> Option<PlaybackId> {
        let n = s.strip_prefix(&self.reference)?.strip_prefix('-')?;
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
            Command::Idp(req) => self.provider_request(req).await,
            Command::Progress(stage) => self.progress(stage),
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

    async fn provider_request(&mut self, req: IdpCommand) {
        let Some(provider) = self.provider() else {
            tracing::error!(idp = %self.setup.policy.idp, "no such identity provider");
            if let IdpCommand::Start(_) = req {
                self.pending.push(Input::Idp(verify::Input::Started(Err(
                    ProviderError::Fatal,
                ))));
            }
            return;
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
                self.spawn_start(provider, order, idp_name, metrics);
            }
            IdpCommand::Start(order) => {
                self.step(FunnelStep::NumberAccepted);
                let person = order.number.pseudonym(&self.deps.key);
                let line = line_key(&self.setup.caller_line);
                match self.deps.limits.acquire(
                    &person,
                    &line,
                    &self.setup.call_id,
                    now().into_std(),
                ) {
                    Err(reason) => {
                        tracing::warn!(reason = %reason, "order refused by limits");
                        self.pending.push(Input::Idp(verify::Input::Started(Err(
                            ProviderError::Rejected(reason),
                        ))));
                        return;
                    }
                    Ok(grant) => {
                        self.order_person = Some(person);
                        if let Some(other) = grant.supersede {
                            tracing::info!(other.call = %other, "superseding an older order for the same person");
                            let registry = self.deps.registry.clone();
                            tokio::spawn(async move {
                                registry.send(&other, CallEvent::Superseded).await;
                            });
                        }
                    }
                }
                self.spawn_start(provider, order, idp_name, metrics);
            }
            IdpCommand::Poll(order) => {
                self.idp.spawn(async move {
                    let r = timed(&metrics, &idp_name, "poll", provider.poll(&order)).await;
                    verify::Input::Polled(r)
                });
            }
            IdpCommand::Cancel(order) => {
                self.idp.spawn(async move {
                    let r = timed(&metrics, &idp_name, "cancel", provider.cancel(&order)).await;
                    verify::Input::CancelDone(r)
                });
            }
        }
    }

    fn spawn_start(
        &mut self,
        provider: Arc<dyn Provider>,
        order: verify::Order,
        idp_name: String,
        metrics: Arc<Metrics>,
    ) {
        self.idp.spawn(async move {
            let r = timed(&metrics, &idp_name, "start", provider.start(&order)).await;
            verify::Input::Started(r)
        });
    }

    fn progress(&mut self, stage: Stage) {
        tracing::debug!(stage = stage.code(), "verification progress");
        self.stages.push(stage);
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
            method: method.clone(),
            outcome,
            at: wall_clock(),
            identity,
        };
        let destination = match route {
            None => Destination::Gone,
            Some(route) => {
                let vars = outcome::render(&record, &policy.disclose, &self.deps.key);
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
        let duration = self.started.elapsed();
        self.deps.metrics.call_ended(&policy.name.0, outcome);
        if checked {
            self.deps.metrics.verification_ended(&policy.idp, outcome);
        }
        match outcome {
            Outcome::Verified => self.step(FunnelStep::Verified),
            Outcome::NotVerified(Reason::DeclinedCall) => self.step(FunnelStep::Declined),
            Outcome::NotVerified(Reason::Expired) => self.step(FunnelStep::Expired),
            _ if outcome.status() == Status::Unavailable => self.step(FunnelStep::Unavailable),
            _ => {}
        }
        let level_error = matches!(outcome.status(), Status::Unavailable | Status::Interrupted)
            || destination == Destination::NextPriority;
        if level_error {
            tracing::warn!(status = %outcome.status(), reason = outcome.reason().map(|r| r.code()).unwrap_or(""), destination = %destination, reference = %self.reference, "call left the gate");
        } else {
            tracing::info!(status = %outcome.status(), reason = outcome.reason().map(|r| r.code()).unwrap_or(""), destination = %destination, reference = %self.reference, "call left the gate");
        }
        if let Some(audit) = &self.deps.audit {
            let verified = record
                .identity
                .as_ref()
                .filter(|_| outcome == Outcome::Verified);
            audit
                .record(audit::Entry {
                    at: outcome::rfc3339(record.at),
                    reference: record.reference.clone(),
                    call_id: self.setup.call_id.clone(),
                    queue: policy.name.0.clone(),
                    status: outcome.status().code(),
                    reason: outcome.reason().map(|r| r.code()).unwrap_or(""),
                    method,
                    person: verified
                        .map(|i| i.number.pseudonym(&self.deps.key))
                        .unwrap_or_default(),
                    evidence: verified
                        .and_then(|i| i.evidence_digest.clone())
                        .unwrap_or_default(),
                    stages: self.stages.iter().map(|s| s.code()).collect(),
                    destination: destination.to_string(),
                    duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                })
                .await;
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

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs one provider request, recording its latency and logging a failure (never a body).
async fn timed<T>(
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A stable in-memory key for a caller line (rate limits only; never stored or logged).
fn line_key(line: &str) -> String {
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
