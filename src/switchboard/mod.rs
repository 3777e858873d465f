//! Hosted switchboards: verifications started by a switchboard's IVR through HTTP request nodes
//! (`/switchboard/v1`, see `api::switchboard`). The switchboard plays the prompts and collects the
//! digits; callgate validates the number and runs one `verify::Session` per verification in its own task.
//!
//! Invariants: a verification is keyed by switchboard, call id and attempt, so a retried node never
//! starts a second order; an invalid number never reaches the provider; the flat variables a node
//! receives come from `outcome::render` through the queue's `disclose` (while pending: status, stage
//! and reference only); each verification ends with exactly one record (audit trail, live view,
//! webhook) and is bounded by the queue's `verify_timeout` plus the provider's request timeouts.

pub mod calls;
pub mod feed;
pub(crate) mod shared;
pub mod sim;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::audit::{self, Event};
use crate::calls::journal;
use crate::calls::live::{
    CallState, CallView, CheckMethod, LiveKind, Refusal, StartedBy, TypedNumber, VerificationView,
};
use crate::calls::task::{self, Deps};
use crate::calls::{limits, CallEvent};
use crate::config::Config;
use crate::outcome::{self, Outcome, Reason, Record};
use crate::pnr::{ParseOptions, PersonalNumber};
use crate::policy::QueuePolicy;
use crate::state::{self, Shared};
use crate::verify::{self, Initiator, Order, ProviderError, Session, Stage};

/// Longest `wait` a status request may ask for: below the shortest timeout of the switchboards'
/// HTTP nodes that wait long (30 s).
pub const MAX_WAIT: Duration = Duration::from_secs(25);
/// Beyond `verify_timeout`, how long a verification's task may take to get its last provider answer.
const GRACE: Duration = Duration::from_secs(30);
/// Longest accepted call id, caller line and language.
const MAX_FIELD: usize = 128;
/// How long a verification waits for its order to be on disk before going on unjournalled.
const JOURNAL_WAIT: Duration = Duration::from_secs(2);
/// Highest accepted `attempt`.
pub const MAX_ATTEMPT: u32 = 99;

/// What a switchboard asks for.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The switchboard's call id.
    pub call_id: String,
    pub queue: String,
    /// As typed on the keypad (a trailing `#` is dropped).
    pub number: TypedNumber,
    /// The caller's line as the switchboard reports it (rate limits only, hashed in memory).
    pub caller: String,
    pub language: Option<String>,
    /// The IVR's attempt number (a new attempt after a failure starts a new verification).
    pub attempt: u32,
}

/// Why a start request was refused before anything started (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadStart {
    #[error("call_id is required (at most 128 characters)")]
    CallId,
    #[error("caller must be at most 128 characters")]
    Caller,
    #[error("queue is not one this switchboard may use")]
    Queue,
    #[error("language is not one of the queue's languages")]
    Language,
    #[error("attempt must be between 0 and 99")]
    Attempt,
}

/// A verification's state as the switchboard sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    pub stage: Option<Stage>,
    /// `Some` once the verification is over.
    pub outcome: Option<Outcome>,
    /// Once over: the record rendered through the queue's disclosure (`status`, `reason`, `ref`,
    /// `method`, `at` and only what the policy allows of the identity fields).
    pub fields: Vec<(String, String)>,
}

impl State {
    pub fn is_final(&self) -> bool {
        self.outcome.is_some()
    }

    /// The state a verification's published view shows (how an instance that does not run the
    /// verification answers for it).
    pub fn of_view(view: &VerificationView) -> State {
        State {
            stage: view.stage().filter(|s| *s != Stage::Done),
            outcome: view.outcome,
            fields: if view.outcome.is_some() {
                view.fields.clone()
            } else {
                Vec::new()
            },
        }
    }
}

/// The answer to a start or status request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Empty when nothing was started (invalid number).
    pub id: String,
    pub state: State,
}

impl Answer {
    /// The answer for a verification's published view.
    pub fn of_view(view: &VerificationView) -> Answer {
        Answer {
            id: view.id.clone(),
            state: State::of_view(view),
        }
    }

    /// The flat variables a node stores: `callgate_status`, `callgate_reason`, `callgate_ref`,
    /// `callgate_stage`, then the disclosed fields (`callgate_name`, …).
    pub fn variables(&self) -> Vec<(String, String)> {
        let stage = match (&self.state.outcome, self.state.stage) {
            (Some(_), _) => Stage::Done.code(),
            (None, Some(s)) => s.code(),
            (None, None) => Stage::Starting.code(),
        };
        if self.state.outcome.is_none() {
            return vec![
                ("callgate_status".into(), "pending".into()),
                ("callgate_reason".into(), String::new()),
                ("callgate_ref".into(), self.id.clone()),
                ("callgate_stage".into(), stage.into()),
            ];
        }
        let field = |name: &str| {
            self.state
                .fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let mut out = vec![
            ("callgate_status".into(), field("status")),
            ("callgate_reason".into(), field("reason")),
            ("callgate_ref".into(), self.id.clone()),
            ("callgate_stage".into(), stage.into()),
        ];
        for (name, value) in &self.state.fields {
            if !matches!(name.as_str(), "status" | "reason" | "ref") {
                out.push((format!("callgate_{name}"), value.clone()));
            }
        }
        out
    }
}

#[derive(Clone)]
struct Run {
    board: String,
    call_id: String,
    state: watch::Receiver<State>,
    /// Why the verification is to end early (the caller hung up).
    cancel: Arc<watch::Sender<Option<Reason>>>,
}

/// The tasks of the calls a switchboard's feed reported, by (switchboard, call id): where a
/// verification of such a call sends its view, so the call has one publisher.
pub(crate) type FeedCalls = DashMap<(String, String), mpsc::Sender<calls::Update>>;

/// Who a verification is for and who started it.
#[derive(Debug, Clone)]
pub(crate) struct Check {
    pub board: String,
    pub call_id: String,
    /// The caller's line (limits only).
    pub caller: String,
    pub started_by: StartedBy,
    pub method: CheckMethod,
    /// The agent of the call, for a mid-call check (per-agent limit).
    pub agent: Option<String>,
}

/// Every switchboard verification of the process.
pub struct Switchboards {
    deps: Arc<Deps>,
    config: watch::Receiver<Arc<Config>>,
    tracker: TaskTracker,
    /// Fired at shutdown: verifications still running end `interrupted`/`restart`.
    stop: CancellationToken,
    /// How long a finished verification stays readable.
    keep: Duration,
    /// (switchboard, call id, attempt) → verification id.
    keys: DashMap<(String, String, u32), String>,
    runs: DashMap<String, Run>,
    /// Calls known from the switchboards' feeds.
    feed_calls: Arc<FeedCalls>,
    /// Whether each switchboard's feed is connected now.
    feeds: DashMap<String, watch::Receiver<bool>>,
    /// With shared state: whether this instance holds each switchboard's feed lease now.
    feed_leases: DashMap<String, watch::Receiver<bool>>,
    /// With shared state: claims of starts, and the answers for verifications other instances run.
    shared: Option<Arc<Shared>>,
}

/// Why a cancel did not reach its verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelError {
    /// No such verification of this switchboard, here or on another instance.
    Unknown,
    /// Another instance runs it and did not answer the forwarded cancel.
    OwnerUnreachable,
}

/// How long a start that lost its claim waits for the winner's verification to show in the view.
const CLAIM_WAIT: Duration = Duration::from_secs(2);

impl Switchboards {
    pub fn new(
        deps: Arc<Deps>,
        config: watch::Receiver<Arc<Config>>,
        tracker: TaskTracker,
        stop: CancellationToken,
        shared: Option<Arc<Shared>>,
    ) -> Arc<Switchboards> {
        let keep = config.borrow().api.keep_verifications;
        Arc::new(Switchboards {
            deps,
            config,
            tracker,
            stop,
            keep,
            keys: DashMap::new(),
            runs: DashMap::new(),
            feed_calls: Arc::new(DashMap::new()),
            feeds: DashMap::new(),
            feed_leases: DashMap::new(),
            shared,
        })
    }

    /// Starts a verification, or answers the one this call and attempt already has. An invalid
    /// number is answered `failed`/`invalid_number` at once, with nothing started.
    ///
    /// With shared state the start is claimed in Redis first, so the same call and attempt started
    /// on another instance gets that instance's verification; with Redis unreachable it starts here
    /// (logged, counted in `callgate_state_errors_total`), and the order's limits then follow
    /// `state.on_unavailable`.
    pub async fn start(
        self: &Arc<Self>,
        board: &str,
        req: StartRequest,
    ) -> Result<Answer, BadStart> {
        self.start_here_or_at_feed(board, req, true).await
    }

    /// A start another instance forwarded here because this one consumes the switchboard's feed:
    /// run here (never forwarded again).
    pub(crate) async fn start_forwarded(
        self: &Arc<Self>,
        board: &str,
        req: StartRequest,
    ) -> Result<Answer, BadStart> {
        self.start_here_or_at_feed(board, req, false).await
    }

    /// With shared state and a feed another instance consumes, a start (`forward`) goes to that
    /// instance, so the verification runs beside the feed's call (one publisher per call, hang-ups
    /// from the feed reach it); if it does not answer, the start runs here.
    async fn start_here_or_at_feed(
        self: &Arc<Self>,
        board: &str,
        req: StartRequest,
        forward: bool,
    ) -> Result<Answer, BadStart> {
        if req.call_id.is_empty()
            || req.call_id.len() > MAX_FIELD
            || req.call_id.chars().any(char::is_control)
        {
            return Err(BadStart::CallId);
        }
        if req.caller.len() > MAX_FIELD {
            return Err(BadStart::Caller);
        }
        if req.attempt > MAX_ATTEMPT {
            return Err(BadStart::Attempt);
        }
        let policy = {
            let cfg = self.config.borrow();
            let allowed = cfg
                .switchboards
                .get(board)
                .is_some_and(|b| b.queues.contains(&req.queue));
            match cfg.queues.get(&req.queue) {
                Some(p) if allowed => Arc::clone(p),
                _ => return Err(BadStart::Queue),
            }
        };
        if let Some(lang) = &req.language {
            let known = policy
                .languages
                .iter()
                .any(|l| l.code().eq_ignore_ascii_case(lang));
            if lang.len() > MAX_FIELD || !known {
                return Err(BadStart::Language);
            }
        }
        let key = (board.to_owned(), req.call_id.clone(), req.attempt);
        if let Some(id) = self.keys.get(&key).map(|e| e.value().clone()) {
            if let Some(answer) = self.answer(board, &id) {
                return Ok(answer);
            }
        }
        let opts = ParseOptions {
            kinds: &policy.accept_kinds,
            accept_10_digits: policy.accept_10_digits,
            today: task::today(),
        };
        let typed = req.number.0.trim().trim_end_matches('#');
        let Ok(number) = PersonalNumber::parse(typed, &opts) else {
            tracing::info!(switchboard = board, queue = %policy.name, "invalid number refused");
            self.deps
                .metrics
                .call_ended(&policy.name.0, Outcome::NotVerified(Reason::InvalidNumber));
            let record = Record {
                reference: String::new(),
                method: String::new(),
                outcome: Outcome::NotVerified(Reason::InvalidNumber),
                at: task::wall_clock(),
                identity: None,
            };
            let vars = outcome::render(&record, &policy.disclose, &self.deps.key);
            return Ok(Answer {
                id: String::new(),
                state: State {
                    stage: None,
                    outcome: Some(record.outcome),
                    fields: task::live_fields(&vars),
                },
            });
        };
        // While Redis is known to be down, nothing waits on it (the heartbeat finds it back).
        let reachable = self.shared.as_ref().filter(|sh| !sh.is_known_down());
        if let (true, Some(shared), Some(false)) = (forward, reachable, self.feed_lease_held(board))
        {
            if let Some(answer) = self.forward_start(shared, board, &req).await {
                return Ok(answer);
            }
        }
        let mut fresh = uuid::Uuid::new_v4().to_string();
        if let (Some(shared), None) = (&self.shared, reachable) {
            shared.metrics().state_error("switchboard_claim");
            tracing::warn!(
                switchboard = board,
                "shared state unreachable; switchboard start not claimed, starting here"
            );
        }
        if let Some(shared) = reachable {
            let ttl = self.keep + policy.verify_timeout + GRACE;
            match shared::claim(shared, board, &req.call_id, req.attempt, &fresh, ttl).await {
                Ok(shared::Claim::Won) => {}
                Ok(shared::Claim::Taken {
                    instance,
                    verification,
                }) if instance != shared.instance() || !self.runs.contains_key(&verification) => {
                    drop(number);
                    return Ok(self.claimed(board, &instance, &verification).await);
                }
                // Ours, already running here.
                Ok(shared::Claim::Taken { verification, .. }) => fresh = verification,
                Err(e) => {
                    tracing::warn!(switchboard = board, error = %e, "switchboard start not claimed in the shared state; starting here");
                }
            }
        }
        let id = match self.keys.entry(key) {
            MapEntry::Occupied(e) => e.get().clone(),
            MapEntry::Vacant(v) if self.runs.contains_key(&fresh) => {
                v.insert(fresh.clone());
                fresh
            }
            MapEntry::Vacant(v) => {
                let id = fresh;
                let (tx, rx) = watch::channel(State::default());
                let (cancel, cancelled) = watch::channel(None);
                self.runs.insert(
                    id.clone(),
                    Run {
                        board: board.to_owned(),
                        call_id: req.call_id.clone(),
                        state: rx,
                        cancel: Arc::new(cancel),
                    },
                );
                v.insert(id.clone());
                let check = Check {
                    board: board.to_owned(),
                    call_id: req.call_id.clone(),
                    caller: req.caller.clone(),
                    started_by: StartedBy::Switchboard(board.to_owned()),
                    method: CheckMethod::Ivr,
                    agent: None,
                };
                let verification = Verification::new(
                    Arc::clone(&self.deps),
                    policy,
                    check,
                    id.clone(),
                    tx,
                    Arc::clone(&self.feed_calls),
                );
                let span = tracing::info_span!("verify", r#ref = %id, switchboard = board, call.id = %req.call_id);
                let me = Arc::clone(self);
                let stop = self.stop.clone();
                let id2 = id.clone();
                let board_key = (board.to_owned(), req.call_id.clone(), req.attempt);
                self.tracker.spawn(
                    async move {
                        verification.run(number, cancelled, stop).await;
                        // Readable for `keep` (or until shutdown), then forgotten (the audit trail
                        // keeps the record).
                        tokio::select! {
                            _ = tokio::time::sleep(me.keep) => {}
                            _ = me.stop.cancelled() => {}
                        }
                        me.runs.remove(&id2);
                        me.keys.remove(&board_key);
                    }
                    .instrument(span),
                );
                id
            }
        };
        self.answer(board, &id).ok_or(BadStart::CallId)
    }

    /// The current answer of a verification of this switchboard.
    pub fn answer(&self, board: &str, id: &str) -> Option<Answer> {
        let run = self.run(board, id)?;
        let state = run.state.borrow().clone();
        Some(Answer {
            id: id.to_owned(),
            state,
        })
    }

    fn run(&self, board: &str, id: &str) -> Option<Run> {
        self.runs
            .get(id)
            .filter(|r| r.board == board)
            .map(|r| r.value().clone())
    }

    /// Waits up to `wait` for the verification to change (or, with `until_final`, to be over); answers
    /// its state then. `None` if there is no such verification of this switchboard. With shared
    /// state, a verification another instance runs is answered from its replicated view.
    pub async fn wait(
        &self,
        board: &str,
        id: &str,
        wait: Duration,
        until_final: bool,
    ) -> Option<Answer> {
        let Some(mut run) = self.run(board, id) else {
            return self.remote_wait(board, id, wait, until_final).await;
        };
        let seen = run.state.borrow_and_update().clone();
        if !seen.is_final() && !wait.is_zero() {
            let deadline = task::now() + wait.min(MAX_WAIT);
            // Ends on timeout, or when the task is gone (its last state stays readable).
            while let Ok(Ok(())) = tokio::time::timeout_at(deadline, run.state.changed()).await {
                let now = run.state.borrow_and_update().clone();
                if now.is_final() || (!until_final && now != seen) {
                    break;
                }
            }
        }
        self.answer(board, id)
    }

    /// Forwards a start to the instance holding the switchboard's feed lease; `None` when there is
    /// none or it did not take the start (the caller starts here instead).
    async fn forward_start(
        &self,
        shared: &Arc<Shared>,
        board: &str,
        req: &StartRequest,
    ) -> Option<Answer> {
        let holder = match shared::lease_holder(shared, board).await {
            Ok(Some(h)) if h != shared.instance() => h,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(switchboard = board, error = %e, "switchboard feed holder unknown; starting here");
                return None;
            }
        };
        let op = state::wire::Op::SwitchboardStart {
            board: board.to_owned(),
            queue: req.queue.clone(),
            number: req.number.clone(),
            caller: req.caller.clone(),
            language: req.language.clone(),
            attempt: req.attempt,
        };
        let by = StartedBy::Switchboard(board.to_owned());
        match shared.forward(&holder, &req.call_id, by, op).await {
            Ok(id) => Some(self.claimed(board, &holder, &id).await),
            Err(refusal) => {
                tracing::warn!(switchboard = board, instance = %holder, refusal = refusal.code(), "the instance consuming the switchboard's feed did not take the start; starting here");
                None
            }
        }
    }

    /// The answer for a start that lost its claim to `instance`'s `verification`: its view once it
    /// shows here (waiting at most [`CLAIM_WAIT`]), else `pending` at stage `starting`.
    async fn claimed(&self, board: &str, instance: &str, verification: &str) -> Answer {
        let mut rx = self.deps.live.subscribe();
        let deadline = task::now() + CLAIM_WAIT;
        let mut first = true;
        loop {
            if let Some(answer) = self.answer(board, verification) {
                return answer;
            }
            let view = if first {
                self.remote_view(board, verification).await
            } else {
                self.live_view(board, verification)
            };
            first = false;
            if let Some(view) = view {
                return Answer {
                    id: view.id.clone(),
                    state: self.remote_state(&view).await,
                };
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) | Err(_) => break,
            }
        }
        tracing::debug!(
            switchboard = board,
            instance,
            "claimed start not yet in the view; answered pending"
        );
        Answer {
            id: verification.to_owned(),
            state: State::default(),
        }
    }

    /// A verification of this switchboard that another instance runs: from the replicated view,
    /// else (once) from its snapshot in Redis. `None` without shared state.
    async fn remote_view(&self, board: &str, id: &str) -> Option<VerificationView> {
        let shared = self.shared.as_ref()?;
        if self.deps.live.verification(id).is_some() {
            return self.live_view(board, id);
        }
        match state::replica::read_verification(shared, id).await {
            Ok(Some((view, _))) => is_request_node(board, &view).then_some(view),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "verification snapshot unreadable");
                None
            }
        }
    }

    /// A request node's verification of this switchboard in the live view (with shared state, also
    /// those other instances run).
    fn live_view(&self, board: &str, id: &str) -> Option<VerificationView> {
        self.shared.as_ref()?;
        self.deps
            .live
            .verification(id)
            .filter(|v| is_request_node(board, v))
    }

    /// [`Switchboards::wait`] for a verification another instance runs: its replicated view, and
    /// the view's changes as the live events bring them.
    async fn remote_wait(
        &self,
        board: &str,
        id: &str,
        wait: Duration,
        until_final: bool,
    ) -> Option<Answer> {
        use tokio::sync::broadcast::error::RecvError;
        // Subscribed before reading, so no change falls between the two.
        let mut rx = self.deps.live.subscribe();
        let view = self.remote_view(board, id).await?;
        let seen = self.remote_state(&view).await;
        let mut now = seen.clone();
        if !seen.is_final() && !wait.is_zero() {
            let deadline = task::now() + wait.min(MAX_WAIT);
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Ok(event)) => match event.call.verification {
                        Some(v) if v.id == id => now = self.remote_state(&v).await,
                        _ => continue,
                    },
                    Ok(Err(RecvError::Lagged(_))) => {
                        if let Some(v) = self.deps.live.verification(id) {
                            now = self.remote_state(&v).await;
                        }
                    }
                    Ok(Err(RecvError::Closed)) | Err(_) => break,
                }
                if now.is_final() || (!until_final && now != seen) {
                    break;
                }
            }
        }
        Some(Answer {
            id: id.to_owned(),
            state: now,
        })
    }

    /// What a verification another instance runs shows: its view, or, once that instance is lost
    /// (its heartbeat stopped) with the verification still running, `interrupted`/`restart` (as its
    /// own restart would answer), so a loop node routes on instead of waiting for a dead instance.
    ///
    /// A running verification whose call left the view (its instance was lost and then forgotten,
    /// or its end was missed while this instance was not listening) answers its snapshot's end if
    /// Redis has one, else the same `interrupted`/`restart`.
    async fn remote_state(&self, view: &VerificationView) -> State {
        let state = State::of_view(view);
        if state.is_final() || self.deps.live.verification(&view.id).is_none() {
            // Over, or read from its snapshot (its call's view may not have arrived yet).
            return state;
        }
        let (lost, gone) = match self.deps.live.call(&view.call_id) {
            Some(call) => (call.owner.is_some_and(|o| o.lost), false),
            None => (false, true),
        };
        if !lost && !gone {
            return state;
        }
        if let (true, Some(shared)) = (gone, &self.shared) {
            if let Ok(Some((v, _))) = state::replica::read_verification(shared, &view.id).await {
                if v.is_over() {
                    return State::of_view(&v);
                }
            }
            // Read while its first view was half published (the verification before the call).
            if self.deps.live.call(&view.call_id).is_some() {
                return state;
            }
        }
        let Some(policy) = self.config.borrow().queues.get(&view.queue).cloned() else {
            return state;
        };
        let outcome = Outcome::NotVerified(Reason::Restart);
        let record = Record {
            reference: view.id.clone(),
            method: self
                .deps
                .providers
                .get(&view.idp)
                .map(|p| p.method().to_owned())
                .unwrap_or_default(),
            outcome,
            // The last moment the instance was known to run it.
            at: view.stages.last().map_or(view.started_at, |(_, at)| *at),
            identity: None,
        };
        State {
            stage: state.stage,
            outcome: Some(outcome),
            fields: task::live_fields(&outcome::render(&record, &policy.disclose, &self.deps.key)),
        }
    }

    /// The caller hung up: the verification is cancelled where it runs, here or (with shared state)
    /// on the instance that runs it, through a forwarded request. A verification already over is
    /// left as it is.
    pub async fn cancel_anywhere(&self, board: &str, id: &str) -> Result<(), CancelError> {
        if self.cancel(board, id) {
            return Ok(());
        }
        let (Some(shared), Some(view)) = (&self.shared, self.remote_view(board, id).await) else {
            return Err(CancelError::Unknown);
        };
        if view.is_over() {
            return Ok(());
        }
        let Some(call) = self.deps.live.call(&view.call_id) else {
            // Its call left the view: nothing to reach; the state answers what is known.
            return Ok(());
        };
        let owner = call.owner.ok_or(CancelError::OwnerUnreachable)?;
        if owner.lost || owner.instance == shared.instance() {
            // Lost: its verification answers `interrupted`/`restart`, and the instance's next start
            // cancels the journalled order. Ours: it is no longer running here.
            return Ok(());
        }
        let op = state::wire::Op::SwitchboardCancel {
            board: board.to_owned(),
            verification: id.to_owned(),
        };
        let by = StartedBy::Switchboard(board.to_owned());
        match shared.forward(&owner.instance, &view.call_id, by, op).await {
            Ok(_) => Ok(()),
            Err(Refusal::OwnerUnreachable | Refusal::Unavailable) => {
                tracing::warn!(switchboard = board, instance = %owner.instance, "switchboard cancel not answered by the instance running the verification");
                Err(CancelError::OwnerUnreachable)
            }
            // The owner no longer runs it: its end is on its way to the view.
            Err(_) => Ok(()),
        }
    }

    /// The caller hung up: the order is cancelled and the verification ends `caller_hung_up`.
    pub fn cancel(&self, board: &str, id: &str) -> bool {
        self.cancel_with(board, id, Reason::CallerHungUp)
    }

    fn cancel_with(&self, board: &str, id: &str, reason: Reason) -> bool {
        match self.run(board, id) {
            Some(run) => {
                run.cancel.send_if_modified(|r| {
                    r.get_or_insert(reason);
                    true
                });
                true
            }
            None => false,
        }
    }

    /// The caller of a switchboard call hung up: every verification its IVR started is cancelled.
    /// Answers how many were still running.
    pub fn hang_up_call(&self, board: &str, call_id: &str) -> usize {
        self.cancel_call(board, call_id, Reason::CallerHungUp)
    }

    /// Cancels every verification of a switchboard call its IVR started that still runs, for
    /// `reason`; answers how many there were.
    pub(crate) fn cancel_call(&self, board: &str, call_id: &str, reason: Reason) -> usize {
        let ids: Vec<String> = self
            .runs
            .iter()
            .filter(|r| r.board == board && r.call_id == call_id && !r.state.borrow().is_final())
            .map(|r| r.key().clone())
            .collect();
        for id in &ids {
            self.cancel_with(board, id, reason);
        }
        ids.len()
    }

    /// Whether a switchboard's feed is connected now (`None`: it has no feed).
    pub fn feed_connected(&self, board: &str) -> Option<bool> {
        self.feeds.get(board).map(|r| *r.borrow())
    }

    /// Waits until a switchboard's feed is connected (or not), as tests and the demo need.
    pub async fn wait_for_feed(&self, board: &str, connected: bool) {
        let Some(mut rx) = self.feeds.get(board).map(|r| r.clone()) else {
            return;
        };
        let _ = rx.wait_for(|up| *up == connected).await;
    }

    /// Whether this instance is draining (it takes no forwarded starts then).
    pub(crate) fn draining(&self) -> bool {
        self.deps.drain.is_cancelled()
    }

    /// With shared state: whether this instance holds the switchboard's feed lease (consumes its
    /// feed) now; `None` without shared state or without a feed.
    pub fn feed_lease_held(&self, board: &str) -> Option<bool> {
        self.feed_leases.get(board).map(|r| *r.borrow())
    }

    /// Waits until this instance holds the switchboard's feed lease (or not), as tests need.
    pub async fn wait_for_feed_lease(&self, board: &str, held: bool) {
        let Some(mut rx) = self.feed_leases.get(board).map(|r| r.clone()) else {
            return;
        };
        let _ = rx.wait_for(|h| *h == held).await;
    }

    /// Whether the feed reported this call and it has not ended (or been forgotten).
    pub fn feed_knows(&self, board: &str, call_id: &str) -> bool {
        self.feed_calls
            .contains_key(&(board.to_owned(), call_id.to_owned()))
    }
}

/// One verification's task state.
pub(crate) struct Verification {
    deps: Arc<Deps>,
    policy: Arc<QueuePolicy>,
    call_id: String,
    caller: String,
    agent: Option<String>,
    /// (switchboard, call id): the feed call this verification's view goes to, if the feed knows it.
    route: (String, String),
    feed_calls: Arc<FeedCalls>,
    /// Set once a view went to the feed call's task: the call's view is its, never ours again.
    routed: bool,
    state: watch::Sender<State>,
    view: VerificationView,
    stages: Vec<Stage>,
    /// Pseudonym of the person whose order this verification holds in the limits.
    person: Option<String>,
    /// The person of the last granted order (kept for the cool-down after a declined call).
    last_person: Option<String>,
    /// The journal's pseudonym of the person (only for the journal).
    journal_person: String,
    /// The order of this verification that is open in the journal.
    journalled: Option<String>,
    started: Instant,
}

impl Verification {
    pub(crate) fn new(
        deps: Arc<Deps>,
        policy: Arc<QueuePolicy>,
        check: Check,
        id: String,
        state: watch::Sender<State>,
        feed_calls: Arc<FeedCalls>,
    ) -> Verification {
        let view = VerificationView {
            id,
            call_id: check.call_id.clone(),
            queue: policy.name.0.clone(),
            idp: policy.idp.clone(),
            method: check.method,
            started_by: check.started_by,
            started_at: task::wall_clock(),
            ended_at: None,
            stages: Vec::new(),
            outcome: None,
            fields: Vec::new(),
            limit: None,
            word_pair: None,
        };
        Verification {
            deps,
            policy,
            route: (check.board, check.call_id.clone()),
            call_id: check.call_id,
            caller: check.caller,
            agent: check.agent,
            feed_calls,
            routed: false,
            state,
            view,
            stages: Vec::new(),
            person: None,
            last_person: None,
            journal_person: String::new(),
            journalled: None,
            started: task::now(),
        }
    }

    /// Runs the verification to its end. `cancel` says why it is to end early (caller hung up,
    /// agent cancelled, superseded); `stop` is the shutdown (`interrupted`/`restart`).
    pub(crate) async fn run(
        mut self,
        number: PersonalNumber,
        mut cancel: watch::Receiver<Option<Reason>>,
        stop: CancellationToken,
    ) {
        self.publish(LiveKind::CallStarted).await;
        tracing::info!("switchboard verification started");
        if let Some(j) = &self.deps.journal {
            self.journal_person = j.person(&number);
        }
        let order = Order {
            number,
            initiator: Initiator::Caller,
            text: self.policy.user_visible_text.clone(),
            pin_code: self.policy.pin_code,
        };
        let mut settings = self.deps.verify.clone();
        settings.verify_timeout = self.policy.verify_timeout;
        let hard_deadline = self.started + self.policy.verify_timeout + GRACE;
        let mut session = Session::new(order, settings, task::now().into_std());
        let mut idp: JoinSet<verify::Input> = JoinSet::new();
        let mut timers: HashMap<verify::Timer, Instant> = HashMap::new();
        let mut stopping = false;
        let mut restarting = false;
        let mut cancel_open = true;
        loop {
            let mut at_once = Vec::new();
            while let Some(cmd) = session.poll_command() {
                if let Some(input) = self.command(cmd, &mut idp, &mut timers).await {
                    at_once.push(input);
                }
            }
            if !at_once.is_empty() {
                for input in at_once {
                    session.handle(input, task::now().into_std());
                }
                continue;
            }
            if session.is_quiescent() && idp.is_empty() {
                break;
            }
            let next = timers.values().min().copied();
            tokio::select! {
                Some(done) = idp.join_next(), if !idp.is_empty() => {
                    if let Ok(input) = done {
                        if let verify::Input::Started(Ok(started)) = &input {
                            // Durable before the caller is told to open the app.
                            self.journal_open(&started.order.0).await;
                        }
                        session.handle(input, task::now().into_std());
                    }
                }
                _ = task::sleep_until(next) => {
                    let now = task::now();
                    let due: Vec<verify::Timer> =
                        timers.iter().filter(|(_, at)| **at <= now).map(|(t, _)| *t).collect();
                    for t in due {
                        timers.remove(&t);
                        session.handle(verify::Input::Timer(t), now.into_std());
                    }
                }
                changed = cancel.changed(), if !stopping && cancel_open => {
                    if changed.is_err() {
                        cancel_open = false;
                        continue;
                    }
                    let reason = *cancel.borrow_and_update();
                    if let Some(reason) = reason {
                        stopping = true;
                        tracing::info!(reason = reason.code(), "verification cancelled");
                        session.handle(verify::Input::Cancel(reason), task::now().into_std());
                    }
                }
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    restarting = true;
                    session.handle(verify::Input::Cancel(Reason::Restart), task::now().into_std());
                }
                _ = tokio::time::sleep_until(hard_deadline) => {
                    tracing::warn!("verification overran its deadline; left without its last answers");
                    if session.conclusion().is_none() {
                        self.finish(Outcome::NotVerified(Reason::Timeout), None).await;
                    }
                    break;
                }
            }
        }
        self.release();
        if restarting {
            // Left open: the next start cancels it again (harmless) and answers the switchboard's
            // status node `interrupted`/`restart` instead of 404.
            tracing::info!("switchboard order left open in the journal for the next start");
        } else if let (Some(journal), Some(order)) = (&self.deps.journal, self.journalled.take()) {
            journal.closed(&order);
        }
        self.publish(LiveKind::CallEnded).await;
    }

    async fn journal_open(&mut self, order: &str) {
        let Some(journal) = self.deps.journal.clone() else {
            return;
        };
        if let Some(old) = self.journalled.take() {
            journal.closed(&old);
        }
        let entry = journal::Entry {
            order: order.to_owned(),
            call: format!("{JOURNAL_PREFIX}{}:{}", self.route.0, self.call_id),
            queue: self.policy.name.0.clone(),
            idp: self.policy.idp.clone(),
            reference: self.view.id.clone(),
            person: self.journal_person.clone(),
            started_ms: task::unix_ms(task::wall_clock()),
        };
        let written = tokio::time::timeout(JOURNAL_WAIT, journal.opened(entry)).await;
        if written != Ok(true) {
            tracing::error!("switchboard order could not be journalled in time");
        }
        self.journalled = Some(order.to_owned());
    }

    /// Runs one command; an answer known at once (refused by the limits) is returned.
    async fn command(
        &mut self,
        cmd: verify::Command,
        idp: &mut JoinSet<verify::Input>,
        timers: &mut HashMap<verify::Timer, Instant>,
    ) -> Option<verify::Input> {
        use verify::Command as C;
        match cmd {
            C::Start(order) => {
                let Some(provider) = self.deps.providers.get(&self.policy.idp).cloned() else {
                    tracing::error!(idp = %self.policy.idp, "no such identity provider");
                    return Some(verify::Input::Started(Err(ProviderError::Fatal)));
                };
                if self.person.is_none() {
                    let person = order.number.pseudonym(&self.deps.key);
                    let line = task::line_key(&self.caller);
                    let start = limits::Start {
                        person: &person,
                        line: &line,
                        call: &self.call_id,
                        queue: &self.policy.name.0,
                        idp: &self.policy.idp,
                        agent: self.agent.as_deref(),
                    };
                    match self
                        .deps
                        .limits
                        .acquire(start, task::now().into_std())
                        .await
                    {
                        Err(limit) => {
                            tracing::warn!(limit = limit.code(), "order refused by limits");
                            self.deps
                                .metrics
                                .limit_refused(&self.policy.name.0, limit.code());
                            self.view.limit = Some(limit);
                            return Some(verify::Input::Started(Err(ProviderError::Rejected(
                                limit.reason(),
                            ))));
                        }
                        Ok(grant) => {
                            self.person = Some(person);
                            if let Some(other) = grant.supersede {
                                let registry = self.deps.registry.clone();
                                tokio::spawn(async move {
                                    registry.send(&other, CallEvent::Superseded).await;
                                });
                            }
                        }
                    }
                }
                let metrics = Arc::clone(&self.deps.metrics);
                let name = self.policy.idp.clone();
                idp.spawn(async move {
                    let r = task::timed(&metrics, &name, "start", provider.start(&order)).await;
                    verify::Input::Started(r)
                });
            }
            C::Poll(_) | C::Cancel(_) => {
                let poll = matches!(cmd, C::Poll(_));
                let (C::Poll(order) | C::Cancel(order)) = cmd else {
                    return None;
                };
                let provider = self.deps.providers.get(&self.policy.idp).cloned()?;
                let metrics = Arc::clone(&self.deps.metrics);
                let name = self.policy.idp.clone();
                idp.spawn(async move {
                    if poll {
                        let r = task::timed(&metrics, &name, "poll", provider.poll(&order)).await;
                        verify::Input::Polled(r)
                    } else {
                        let r =
                            task::timed(&metrics, &name, "cancel", provider.cancel(&order)).await;
                        verify::Input::CancelDone(r)
                    }
                });
            }
            C::ArmTimer { timer, at } => {
                timers.insert(timer, Instant::from_std(at));
            }
            C::DisarmTimer(timer) => {
                timers.remove(&timer);
            }
            C::Progress(stage) => {
                tracing::debug!(stage = stage.code(), "verification progress");
                self.stages.push(stage);
                self.view.stages.push((stage, task::wall_clock()));
                if stage == Stage::Done {
                    self.release();
                } else {
                    self.state.send_modify(|s| s.stage = Some(stage));
                    self.publish(LiveKind::Progress).await;
                }
            }
            C::Finished(conclusion) => self.finish(conclusion.outcome, conclusion.identity).await,
        }
        None
    }

    async fn finish(&mut self, outcome: Outcome, identity: Option<outcome::Identity>) {
        let method = self
            .deps
            .providers
            .get(&self.policy.idp)
            .map(|p| p.method().to_owned())
            .unwrap_or_default();
        let record = Record {
            reference: self.view.id.clone(),
            method,
            outcome,
            at: task::wall_clock(),
            identity,
        };
        let vars = outcome::render(&record, &self.policy.disclose, &self.deps.key);
        let fields = task::live_fields(&vars);
        // On disk (or its bounded wait over) before the switchboard hears the result.
        if let Some(audit) = &self.deps.audit {
            let entry = self.audit_entry(audit, &record);
            audit.record(record.at, Event::Verification(entry)).await;
        }
        self.release();
        self.view.outcome = Some(outcome);
        self.view.ended_at = Some(record.at);
        self.view.fields = fields.clone();
        self.deps
            .metrics
            .verification_ended(&self.policy.idp, outcome);
        // A request node's verification is the switchboard's gate for the call; an agent's check
        // during the call is a verification only.
        if self.view.method == CheckMethod::Ivr {
            self.deps.metrics.call_ended(&self.policy.name.0, outcome);
        }
        if outcome == Outcome::NotVerified(Reason::DeclinedCall) {
            if let Some(person) = &self.view_person() {
                self.deps.limits.declined(person, task::now().into_std());
            }
            tracing::warn!(reference = %self.view.id, "the person declined the call in their app: someone may be calling in their name");
        } else {
            tracing::info!(status = %outcome.status(), reason = outcome.reason().map(|r| r.code()).unwrap_or(""), "switchboard verification ended");
        }
        self.state.send_modify(|s| {
            s.outcome = Some(outcome);
            s.fields = fields;
        });
        self.publish(LiveKind::Completed).await;
        if let Some(webhooks) = &self.deps.webhooks {
            webhooks.call_event(LiveKind::Completed, &self.call_view(), task::wall_clock());
        }
    }

    /// The pseudonym the limits know the person by (kept past the order's release for the
    /// cool-down after a declined call).
    fn view_person(&self) -> Option<String> {
        self.last_person.clone()
    }

    fn release(&mut self) {
        if let Some(person) = self.person.take() {
            self.deps.limits.release(&person, &self.call_id);
            self.last_person = Some(person);
        }
    }

    fn audit_entry(&self, audit: &audit::Audit, record: &Record) -> audit::Entry {
        audit::Entry::of_check(
            audit,
            record,
            audit::CheckContext {
                call_id: &self.call_id,
                queue: &self.policy.name.0,
                started_by: self.view.started_by.to_string(),
                stages: &self.stages,
                destination: "switchboard".to_owned(),
                duration: self.started.elapsed(),
            },
        )
    }

    fn call_view(&self) -> CallView {
        CallView {
            call_id: self.call_id.clone(),
            queue: self.policy.name.0.clone(),
            state: if self.view.outcome.is_some() {
                CallState::Ended
            } else {
                CallState::Gate
            },
            agent: self.agent.clone(),
            aliases: Vec::new(),
            started_at: self.view.started_at,
            can_verify: false,
            verification: Some(self.view.clone()),
            keypad: false,
            owner: None,
        }
    }

    /// Publishes the verification: through the feed call's task when the feed knows the call (one
    /// publisher per call), else as a call of its own. Once routed, a view the call's task can no
    /// longer take (it ended) is published as ended, so it never brings the call back.
    async fn publish(&mut self, kind: LiveKind) {
        let route = self.feed_calls.get(&self.route).map(|tx| tx.clone());
        if let Some(tx) = route {
            self.routed = true;
            let update = calls::Update::Check(Box::new(self.view.clone()), kind);
            if tx.send(update).await.is_ok() {
                return;
            }
        }
        let mut view = self.call_view();
        if self.routed {
            view.state = CallState::Ended;
        } else if kind != LiveKind::CallEnded {
            view.state = CallState::Gate;
        }
        self.deps.live.publish(kind, view);
    }
}

/// How a switchboard order's call is written in the order journal: `switchboard:<name>:<call id>`
/// (no Asterisk channel id looks like this).
const JOURNAL_PREFIX: &str = "switchboard:";

/// Whether a journal entry is a switchboard verification's order.
pub fn is_journalled(entry: &journal::Entry) -> bool {
    entry.call.starts_with(JOURNAL_PREFIX)
}

impl Switchboards {
    /// Settles the switchboard orders a previous process left open in the journal (it crashed, or
    /// stopped while they ran): each is cancelled at its provider and closed, and its verification
    /// answers `interrupted`/`restart` for `api.keep_verifications` instead of 404.
    pub fn recover(self: &Arc<Self>, entries: Vec<journal::Entry>) {
        for entry in entries {
            let Some((board, call_id)) = entry
                .call
                .strip_prefix(JOURNAL_PREFIX)
                .and_then(|rest| rest.split_once(':'))
            else {
                continue;
            };
            let (board, call_id) = (board.to_owned(), call_id.to_owned());
            let deps = Arc::clone(&self.deps);
            let order = verify::OrderRef(entry.order.clone());
            let idp = entry.idp.clone();
            self.tracker.spawn(async move {
                match deps.providers.get(&idp) {
                    Some(p) => match p.cancel(&order).await {
                        Ok(()) => tracing::info!(order = %order.0, "switchboard order left open by the previous run cancelled"),
                        Err(e) => tracing::warn!(order = %order.0, error = ?e, "could not cancel a switchboard order left open by the previous run"),
                    },
                    None => tracing::warn!(order = %order.0, idp = %idp, "switchboard order left open for an identity provider no longer configured"),
                }
                if let Some(j) = &deps.journal {
                    j.closed(&order.0);
                }
            });
            let outcome = Outcome::NotVerified(Reason::Restart);
            let policy = self.config.borrow().queues.get(&entry.queue).cloned();
            let fields = policy
                .map(|p| {
                    let record = Record {
                        reference: entry.reference.clone(),
                        method: self
                            .deps
                            .providers
                            .get(&entry.idp)
                            .map(|p| p.method().to_owned())
                            .unwrap_or_default(),
                        outcome,
                        at: task::wall_clock(),
                        identity: None,
                    };
                    task::live_fields(&outcome::render(&record, &p.disclose, &self.deps.key))
                })
                .unwrap_or_default();
            let (_, state) = watch::channel(State {
                stage: None,
                outcome: Some(outcome),
                fields,
            });
            let (cancel, _) = watch::channel(None);
            self.runs.insert(
                entry.reference.clone(),
                Run {
                    board,
                    call_id,
                    state,
                    cancel: Arc::new(cancel),
                },
            );
            let me = Arc::clone(self);
            let id = entry.reference;
            self.tracker.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(me.keep) => {}
                    _ = me.stop.cancelled() => {}
                }
                me.runs.remove(&id);
            });
        }
    }
}

/// Whether a verification was started by this switchboard's request nodes (a switchboard sees only
/// those).
fn is_request_node(board: &str, view: &VerificationView) -> bool {
    view.method == CheckMethod::Ivr
        && matches!(&view.started_by, StartedBy::Switchboard(name) if name == board)
}

/// Seconds as a `Duration`, bounded by [`MAX_WAIT`].
pub fn bounded_wait(seconds: u64) -> Duration {
    Duration::from_secs(seconds).min(MAX_WAIT)
}
