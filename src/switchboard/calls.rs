//! Switchboard calls known from a feed: one task per call owns its `CallView` in `calls::Live`
//! (waiting, talking with an agent, ended) and is registered in `calls::Registry`, so the agent
//! API's `StartCheck`/`CancelCheck` reach it as they reach an Asterisk call.
//!
//! A check an agent starts with a typed number runs the same [`Verification`] as an IVR request
//! node does. Collecting the number on the keypad is refused: the switchboard, not callgate, owns
//! the call's media.
//!
//! Invariants: the call's task is the only publisher of its view (verifications of the call send
//! their view to it); when the feed says the call ended, or it reaches `max_call_age`, every check
//! of the call still running is cancelled (`caller_hung_up`) and the view ends once they are over
//! (bounded by [`END_WAIT`]); a feed reconnect changes nothing by itself (the generic feeds offer
//! no snapshot), so a call whose end was missed lives at most `max_call_age`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::feed::{FeedEvent, FeedEventKind, Incoming};
use super::{Check, FeedCalls, Switchboards, Verification};
use crate::calls::live::{
    CallState, CallView, CheckMethod, CheckRequest, LiveKind, Refusal, VerificationView,
};
use crate::calls::registry::Handle;
use crate::calls::{task, CallEvent, Snapshot};
use crate::config::feed::Feed;
use crate::outcome::Reason;
use crate::pnr::{ParseOptions, PersonalNumber};
use crate::policy::QueuePolicy;

/// Inbox length of a call's task.
const INBOX: usize = 32;
/// How long an ended call waits for its checks to report their end before its view ends anyway.
pub const END_WAIT: Duration = Duration::from_secs(15);

/// What a switchboard call's task hears besides the registry's `CallEvent`s.
#[derive(Debug)]
pub enum Update {
    Feed(FeedEvent),
    /// A verification of this call published its view.
    Check(Box<VerificationView>, LiveKind),
}

/// A mid-call check in progress.
struct Running {
    id: String,
    cancel: watch::Sender<Option<Reason>>,
}

struct Call {
    sb: Arc<Switchboards>,
    board: String,
    call_id: String,
    policy: Arc<QueuePolicy>,
    caller: String,
    agent: Option<String>,
    state: CallState,
    started_at: SystemTime,
    verification: Option<VerificationView>,
    check: Option<Running>,
    snapshot: watch::Sender<Snapshot>,
}

impl Switchboards {
    /// Starts the feed of every switchboard that has one, and the task that turns its events into
    /// calls. Both end at `stop`.
    pub fn start_feeds(self: &Arc<Self>) {
        let cfg = Arc::clone(&self.config.borrow());
        for (board, sb) in &cfg.switchboards {
            let Some(feed) = sb.feed.clone() else {
                continue;
            };
            let (up, up_rx) = watch::channel(false);
            self.feeds.insert(board.clone(), up_rx);
            match &self.shared {
                None => {
                    self.deps.metrics.set_feed_connected(board, false);
                    self.consume(board, feed, up, self.stop.clone());
                }
                Some(shared) => {
                    let (held, held_rx) = watch::channel(false);
                    self.feed_leases.insert(board.clone(), held_rx);
                    let me = Arc::clone(self);
                    let shared = Arc::clone(shared);
                    let board = board.clone();
                    self.tracker.spawn(async move {
                        me.hold_feed(shared, board, feed, up, held).await;
                    });
                }
            }
        }
    }

    /// Connects to a switchboard's feed and turns its events into calls until `stop`; answers the
    /// feed's task.
    fn consume(
        self: &Arc<Self>,
        board: &str,
        feed: Feed,
        up: watch::Sender<bool>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (tx, rx) = mpsc::channel(256);
        let max_age = feed.max_call_age;
        let link = self.tracker.spawn(super::feed::run(
            board.to_owned(),
            feed,
            tx,
            up,
            Arc::clone(&self.deps.metrics),
            stop.clone(),
        ));
        let me = Arc::clone(self);
        let board = board.to_owned();
        self.tracker
            .spawn(async move { me.dispatch(board, rx, max_age, stop).await });
        link
    }

    /// With shared state: consumes the switchboard's feed while this instance holds its lease (see
    /// `shared`), tries to take the lease every heartbeat while another instance holds it, and gives
    /// it up at shutdown. `held` says whether we hold it now.
    async fn hold_feed(
        self: Arc<Self>,
        shared: Arc<crate::state::Shared>,
        board: String,
        feed: Feed,
        up: watch::Sender<bool>,
        held: watch::Sender<bool>,
    ) {
        let every = shared.settings().heartbeat_interval;
        let ttl = every * 3;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The feed's stop token and task, and until when the lease is surely ours, while we hold it.
        let mut holding: Option<(CancellationToken, tokio::task::JoinHandle<()>, Instant)> = None;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = task::now();
            let result = super::shared::lease(&shared, &board, ttl).await;
            let keep = match (&result, &holding) {
                (Ok(true), _) => true,
                (Ok(false), _) => false,
                // Unconfirmed: ours until one heartbeat before it could lapse.
                (Err(_), Some((_, _, until))) => now < *until,
                (Err(_), None) => false,
            };
            match (keep, holding.take()) {
                (true, Some((stop, link, until))) => {
                    let until = if result.is_ok() {
                        now + ttl - every
                    } else {
                        until
                    };
                    holding = Some((stop, link, until));
                }
                (true, None) => {
                    tracing::info!(switchboard = %board, "this instance consumes the switchboard's feed");
                    self.deps.metrics.set_feed_connected(&board, false);
                    let stop = self.stop.child_token();
                    let link = self.consume(&board, feed.clone(), up.clone(), stop.clone());
                    holding = Some((stop, link, now + ttl - every));
                    held.send_replace(true);
                }
                (false, Some((stop, link, _))) => {
                    tracing::warn!(switchboard = %board, "switchboard feed lease lost; another instance consumes the feed");
                    stop.cancel();
                    let _ = link.await;
                    held.send_replace(false);
                    // Only the holder exports the feed's link state (its alert is for the holder).
                    self.deps.metrics.forget_feed_connected(&board);
                }
                (false, None) => {}
            }
        }
        if let Some((stop, link, _)) = holding.take() {
            stop.cancel();
            let _ = link.await;
            held.send_replace(false);
            if let Err(e) = super::shared::release(&shared, &board).await {
                tracing::debug!(switchboard = %board, error = %e, "switchboard feed lease not released; it lapses");
            }
        }
    }

    /// Routes a feed's events to its calls' tasks, starting a task for a call not seen before.
    async fn dispatch(
        self: Arc<Self>,
        board: String,
        mut rx: mpsc::Receiver<Incoming>,
        max_age: Duration,
        stop: CancellationToken,
    ) {
        loop {
            let incoming = tokio::select! {
                _ = stop.cancelled() => break,
                i = rx.recv() => match i { Some(i) => i, None => break },
            };
            let event = match incoming {
                Incoming::Connected => {
                    // No snapshot to reconcile with: known calls stay until their end event or
                    // max_call_age.
                    tracing::debug!(switchboard = %board, calls = self.feed_calls.len(), "switchboard feed (re)connected");
                    continue;
                }
                Incoming::Disconnected => continue,
                Incoming::Event(e) => e,
            };
            let key = (board.clone(), event.call_id.clone());
            let existing = self.feed_calls.get(&key).map(|tx| tx.clone());
            let tx = match existing {
                Some(tx) => tx,
                None if event.kind == FeedEventKind::Ended => continue,
                None => match self.spawn_call(&board, &event, max_age) {
                    Some(tx) => tx,
                    None => continue,
                },
            };
            if tx.send(Update::Feed(event)).await.is_err() {
                tracing::debug!(switchboard = %board, "feed event for a call that just ended; dropped");
            }
        }
    }

    fn spawn_call(
        self: &Arc<Self>,
        board: &str,
        first: &FeedEvent,
        max_age: Duration,
    ) -> Option<mpsc::Sender<Update>> {
        let policy = {
            let cfg = self.config.borrow();
            let sb = cfg.switchboards.get(board)?;
            let queue = first
                .queue
                .as_ref()
                .filter(|q| sb.queues.contains(q))
                .or_else(|| sb.queues.first())?;
            Arc::clone(cfg.queues.get(queue)?)
        };
        let (updates, updates_rx) = mpsc::channel(INBOX);
        let (inbox, inbox_rx) = mpsc::channel(INBOX);
        let started_at = task::wall_clock();
        let (snapshot, snapshot_rx) = watch::channel(Snapshot {
            call_id: first.call_id.clone(),
            queue: policy.name.0.clone(),
            reference: String::new(),
            stage: None,
            outcome: None,
            started_at,
        });
        let cancel = self.stop.child_token();
        let entry = self.deps.registry.insert(
            &first.call_id,
            Handle {
                inbox,
                snapshot: snapshot_rx,
                cancel: cancel.clone(),
            },
        );
        let Some(entry) = entry else {
            tracing::warn!(switchboard = board, call.id = %first.call_id, "a call with this id is already in progress; feed events for it ignored");
            return None;
        };
        let key = (board.to_owned(), first.call_id.clone());
        self.feed_calls.insert(key.clone(), updates.clone());
        let call = Call {
            sb: Arc::clone(self),
            board: board.to_owned(),
            call_id: first.call_id.clone(),
            policy,
            caller: first.caller.clone().unwrap_or_default(),
            agent: None,
            state: CallState::Gate,
            started_at,
            verification: None,
            check: None,
            snapshot,
        };
        let feed_calls = Arc::clone(&self.feed_calls);
        let span = tracing::info_span!("call", call.id = %first.call_id, switchboard = board);
        self.tracker.spawn(
            async move {
                call.run(inbox_rx, updates_rx, cancel, max_age).await;
                feed_calls.remove(&key);
                drop(entry);
            }
            .instrument(span),
        );
        Some(updates)
    }
}

impl Call {
    fn view(&self) -> CallView {
        CallView {
            call_id: self.call_id.clone(),
            queue: self.policy.name.0.clone(),
            state: self.state,
            agent: self.agent.clone(),
            aliases: vec![format!("{}:{}", self.board, self.call_id)],
            started_at: self.started_at,
            can_verify: self.agent.is_some() && self.state != CallState::Ended,
            verification: self.verification.clone(),
            keypad: false,
            owner: None,
        }
    }

    fn publish(&self, kind: LiveKind) {
        let view = self.view();
        let v = view.verification.as_ref();
        self.snapshot.send_replace(Snapshot {
            call_id: self.call_id.clone(),
            queue: view.queue.clone(),
            reference: v.map(|v| v.id.clone()).unwrap_or_default(),
            stage: v.and_then(VerificationView::stage),
            outcome: v.and_then(|v| v.outcome),
            started_at: self.started_at,
        });
        if kind != LiveKind::Completed {
            if let Some(webhooks) = &self.sb.deps.webhooks {
                if matches!(
                    kind,
                    LiveKind::CallStarted | LiveKind::AgentConnected | LiveKind::CallEnded
                ) {
                    webhooks.call_event(kind, &view, task::wall_clock());
                }
            }
        }
        self.sb.deps.live.publish(kind, view);
    }

    fn check_running(&self) -> bool {
        self.verification.as_ref().is_some_and(|v| !v.is_over())
    }

    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<CallEvent>,
        mut updates: mpsc::Receiver<Update>,
        cancel: CancellationToken,
        max_age: Duration,
    ) {
        tracing::info!("switchboard call started");
        self.publish(LiveKind::CallStarted);
        let expiry = task::now() + max_age;
        loop {
            tokio::select! {
                Some(event) = inbox.recv() => match event {
                    CallEvent::StartCheck(req) => self.start_check(req),
                    CallEvent::CancelCheck(req) => {
                        let answer = match &self.check {
                            Some(r) if self.check_running() && self.verification.as_ref().is_some_and(|v| v.id == r.id) => {
                                r.cancel.send_replace(Some(Reason::AgentCancelled));
                                Ok(r.id.clone())
                            }
                            _ => Err(Refusal::NothingToCancel),
                        };
                        let _ = req.reply.send(answer);
                    }
                    CallEvent::Superseded => {
                        // A newer order of another call is for the same person.
                        self.sb.cancel_call(&self.board, &self.call_id, Reason::Superseded);
                        if let Some(r) = &self.check {
                            r.cancel.send_replace(Some(Reason::Superseded));
                        }
                    }
                    CallEvent::Hangup => break,
                    _ => {}
                },
                Some(update) = updates.recv() => match update {
                    Update::Feed(e) => {
                        if self.apply(e) {
                            break;
                        }
                    }
                    Update::Check(view, kind) => self.take_check(*view, kind),
                },
                _ = cancel.cancelled() => {
                    self.state = CallState::Ended;
                    self.publish(LiveKind::CallEnded);
                    return;
                }
                _ = self.sb.deps.drain.cancelled() => {
                    // Drain: the call is the switchboard's, not ours; its view ends now (the drain
                    // does not wait for it) and its checks end `interrupted`/`restart` on their own.
                    self.state = CallState::Ended;
                    self.publish(LiveKind::CallEnded);
                    return;
                }
                _ = tokio::time::sleep_until(expiry) => {
                    tracing::warn!("switchboard call reached max_call_age without an end event; forgotten");
                    break;
                }
            }
        }
        self.end(&mut inbox, &mut updates).await;
    }

    /// Applies a feed event; `true` when the call ended.
    fn apply(&mut self, e: FeedEvent) -> bool {
        if self.caller.is_empty() {
            if let Some(c) = e.caller {
                self.caller = c;
            }
        }
        match e.kind {
            FeedEventKind::Started => false,
            FeedEventKind::Queued => {
                if self.state == CallState::Gate {
                    self.state = CallState::WaitingForAgent;
                    self.publish(LiveKind::Progress);
                }
                false
            }
            FeedEventKind::Answered | FeedEventKind::Transferred => {
                let Some(agent) = e.agent else {
                    tracing::debug!(
                        event = e.kind.code(),
                        "feed event without an agent; skipped"
                    );
                    return false;
                };
                if self.agent.as_deref() != Some(agent.as_str()) {
                    tracing::info!(event = e.kind.code(), "agent connected");
                    self.agent = Some(agent);
                    self.state = CallState::Talking;
                    self.publish(LiveKind::AgentConnected);
                }
                false
            }
            FeedEventKind::Ended => true,
        }
    }

    /// A verification of this call published its view.
    fn take_check(&mut self, view: VerificationView, kind: LiveKind) {
        // A superseded or older check must not replace a newer one in the view.
        if let Some(current) = &self.verification {
            if current.id != view.id && !current.is_over() && view.started_at < current.started_at {
                return;
            }
        }
        self.verification = Some(view);
        if kind != LiveKind::CallEnded {
            self.publish(kind);
        }
    }

    fn start_check(&mut self, req: CheckRequest) {
        let answer = self.try_start(&req);
        let _ = req.reply.send(answer);
    }

    fn try_start(&mut self, req: &CheckRequest) -> Result<String, Refusal> {
        let Some(typed) = &req.number else {
            return Err(Refusal::NoMedia);
        };
        let Some(agent) = self.agent.clone() else {
            return Err(Refusal::NotAnchored);
        };
        let opts = ParseOptions {
            kinds: &self.policy.accept_kinds,
            accept_10_digits: self.policy.accept_10_digits,
            today: task::today(),
        };
        let number =
            PersonalNumber::parse(typed.0.trim(), &opts).map_err(|_| Refusal::InvalidNumber)?;
        if let Some(old) = self.check.take() {
            old.cancel.send_replace(Some(Reason::Superseded));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let (state, _) = watch::channel(super::State::default());
        let (cancel, cancelled) = watch::channel(None);
        let check = Check {
            board: self.board.clone(),
            call_id: self.call_id.clone(),
            caller: self.caller.clone(),
            started_by: req.by.clone(),
            method: CheckMethod::AgentTyped,
            agent: Some(agent),
        };
        let feed_calls: Arc<FeedCalls> = Arc::clone(&self.sb.feed_calls);
        let verification = Verification::new(
            Arc::clone(&self.sb.deps),
            Arc::clone(&self.policy),
            check,
            id.clone(),
            state,
            feed_calls,
        );
        let stop = self.sb.stop.clone();
        let span = tracing::info_span!("verify", r#ref = %id);
        self.sb
            .tracker
            .spawn(async move { verification.run(number, cancelled, stop).await }.instrument(span));
        self.check = Some(Running {
            id: id.clone(),
            cancel,
        });
        tracing::info!(verification = %id, "mid-call check started on a switchboard call");
        Ok(id)
    }

    /// The call ended: cancel what still runs, wait (bounded) for the checks' last views, end the
    /// view.
    async fn end(
        mut self,
        inbox: &mut mpsc::Receiver<CallEvent>,
        updates: &mut mpsc::Receiver<Update>,
    ) {
        tracing::info!("switchboard call ended");
        let ivr = self.sb.hang_up_call(&self.board, &self.call_id);
        if let Some(r) = &self.check {
            r.cancel.send_replace(Some(Reason::CallerHungUp));
        }
        let deadline = task::now() + END_WAIT;
        while ivr > 0 && !self.all_over() || self.check_running() {
            tokio::select! {
                Some(event) = inbox.recv() => match event {
                    CallEvent::StartCheck(req) => { let _ = req.reply.send(Err(Refusal::Ended)); }
                    CallEvent::CancelCheck(req) => { let _ = req.reply.send(Err(Refusal::Ended)); }
                    _ => {}
                },
                Some(update) = updates.recv() => {
                    if let Update::Check(view, kind) = update {
                        self.take_check(*view, kind);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("checks of an ended switchboard call did not end in time");
                    break;
                }
            }
        }
        // A check that just ended may have sent its last view as the loop ended.
        tokio::task::yield_now().await;
        while let Ok(update) = updates.try_recv() {
            if let Update::Check(view, kind) = update {
                self.take_check(*view, kind);
            }
        }
        self.state = CallState::Ended;
        self.publish(LiveKind::CallEnded);
    }

    /// Whether no IVR verification of this call is running any more.
    fn all_over(&self) -> bool {
        !self.sb.runs.iter().any(|r| {
            r.board == self.board && r.call_id == self.call_id && !r.state.borrow().is_final()
        })
    }
}
