//! `verify::Session`: the sans-IO lifecycle of one identity check, independent of telephony and of the
//! provider's wire protocol.
//!
//! Input events and the current time go in ([`Session::handle`]); commands come out
//! ([`Session::poll_command`]): start / poll / cancel an order, arm a timer, report progress, finish.
//! Invariants: no clock, no I/O, no async. At most one provider request is in flight. A start whose outcome
//! is unknown is never retried. `Finished` is emitted exactly once; after it the only command that can
//! still follow is the `Cancel` of an order whose start was in flight when the check ended (so no order is
//! ever left open on a person's phone).

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::outcome::{Identity, Outcome, Reason};
use crate::pnr::{PersonalNumber, PseudonymKey};

#[cfg(test)]
mod tests;

/// Helpers shared by the core's scripted tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::outcome::Identity;
    use crate::pnr::PersonalNumber;

    /// A verified identity for a valid 12-digit Swedish number.
    pub fn identity(number: &str) -> Identity {
        Identity {
            number: PersonalNumber::parse_swedish_12(number).unwrap(),
            name: Some("Anna Andersson".into()),
            given_name: None,
            surname: None,
            evidence_digest: None,
        }
    }

    /// An expected transcript written as an indented block: trimmed lines, blank lines dropped.
    pub fn lines(s: &str) -> String {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The provider's reference for an order (BankID `orderRef`, CIBA `auth_req_id`). Opaque.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OrderRef(pub String);

impl fmt::Debug for OrderRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OrderRef({})", self.0)
    }
}

/// Who placed the call the person is on: BankID's `callInitiator` (`user` / `RP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The person called us (inbound call).
    Caller,
    /// We called the person (outbound call).
    Us,
}

/// What to ask the provider for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub number: PersonalNumber,
    pub initiator: Initiator,
    /// Shown in the app (BankID `userVisibleData`).
    pub text: Option<String>,
    /// Require PIN rather than biometrics.
    pub pin_code: bool,
}

/// Whose identity a completed order must carry.
#[derive(Clone)]
pub enum Expect {
    /// The number the order was started for.
    Number(PersonalNumber),
    /// An order resumed after a restart: only the person's pseudonym under this key is known.
    Pseudonym { key: PseudonymKey, person: String },
}

impl Expect {
    fn matches(&self, number: &PersonalNumber) -> bool {
        match self {
            Expect::Number(n) => n == number,
            Expect::Pseudonym { key, person } => number.pseudonym(key) == *person,
        }
    }
}

impl fmt::Debug for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Number(_) => f.write_str("Expect::Number(<redacted>)"),
            Expect::Pseudonym { .. } => f.write_str("Expect::Pseudonym(<redacted>)"),
        }
    }
}

/// Progress of a check, as shown to agents and used for optional caller prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Not yet accepted by the provider.
    Starting,
    OrderCreated,
    AwaitingApp,
    ConfirmingCall,
    Identifying,
    Done,
}

impl Stage {
    pub fn code(self) -> &'static str {
        match self {
            Stage::Starting => "starting",
            Stage::OrderCreated => "order_created",
            Stage::AwaitingApp => "awaiting_app",
            Stage::ConfirmingCall => "confirming_call",
            Stage::Identifying => "identifying",
            Stage::Done => "done",
        }
    }
}

/// A provider request that did not produce a protocol answer, classified by what is safe to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// The request never reached the provider (connection refused, DNS): safe to retry.
    NotSent,
    /// It may have reached the provider and we cannot know whether it acted (timeout after sending,
    /// 408, 500, unreadable answer). A start in this state is never retried.
    OutcomeUnknown,
    /// The provider says it is down (503 maintenance): may be retried quietly within a budget.
    Unavailable,
    /// 429: back off at least this long.
    RateLimited { retry_after: Option<Duration> },
    /// The provider refused for a business reason (e.g. `already_in_progress`, `invalid_number`).
    Rejected(Reason),
    /// Our request or credentials are wrong (401/403/404/405/415, `invalidParameters`): never retried.
    Fatal,
}

impl ProviderError {
    /// The class as a stable code (metric label): `not_sent`, `outcome_unknown`, `unavailable`,
    /// `rate_limited`, `rejected`, `fatal`.
    pub fn class(&self) -> &'static str {
        match self {
            ProviderError::NotSent => "not_sent",
            ProviderError::OutcomeUnknown => "outcome_unknown",
            ProviderError::Unavailable => "unavailable",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Rejected(_) => "rejected",
            ProviderError::Fatal => "fatal",
        }
    }
}

/// The provider accepted a start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub order: OrderRef,
    /// The provider's minimum poll interval (CIBA `interval`), if it states one.
    pub poll_interval: Option<Duration>,
    /// Words the person must hear to pick the right request in their app (a CIBA broker's word pair).
    /// The call task shows them to the agent; the session itself ignores them.
    pub word_pair: Option<String>,
}

/// The provider's answer to a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    Pending(Stage),
    /// Still pending, and the provider asks for slower polling (CIBA `slow_down`): the interval grows by
    /// [`SLOW_DOWN_STEP`] for the rest of the check.
    SlowDown(Stage),
    Complete(Identity),
    Failed(Reason),
}

/// How much a `Poll::SlowDown` adds to the poll interval.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// The timers a session arms. Re-arming a timer replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Time for the next poll or the next start attempt.
    Next,
    /// The check's own timeout (`verify_timeout`).
    Deadline,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Started(Result<Started, ProviderError>),
    Polled(Result<Poll, ProviderError>),
    /// The answer to a cancel; informational.
    CancelDone(Result<(), ProviderError>),
    Timer(Timer),
    /// Stop the check (caller hung up, agent cancelled, gate deadline, shutdown).
    Cancel(Reason),
    /// Events may have been lost (PBX reconnect, restart): poll again now.
    Resume,
}

/// How a check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conclusion {
    pub outcome: Outcome,
    /// Present only when verified.
    pub identity: Option<Identity>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Start(Order),
    Poll(OrderRef),
    Cancel(OrderRef),
    ArmTimer { timer: Timer, at: Instant },
    DisarmTimer(Timer),
    Progress(Stage),
    Finished(Conclusion),
}

/// Tunables of a session; the defaults follow BankID's guidance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub verify_timeout: Duration,
    /// Poll interval when the provider states none (BankID: 2 s).
    pub poll_interval: Duration,
    /// Never poll faster than this (BankID: 1 s).
    pub min_poll_interval: Duration,
    /// Consecutive retries of a request that was not sent (or a poll with an unknown outcome).
    pub max_retries: u32,
    pub retry_delay: Duration,
    /// How long a provider in maintenance is retried quietly before the check ends `unavailable`.
    pub unavailable_budget: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            verify_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_secs(2),
            min_poll_interval: Duration::from_secs(1),
            max_retries: 2,
            retry_delay: Duration::from_secs(1),
            unavailable_budget: Duration::from_secs(4),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InFlight {
    None,
    Start,
    Poll,
}

/// One identity check.
pub struct Session {
    /// What to start; `None` for an order resumed after a restart (it is never started again).
    order: Option<Order>,
    expect: Expect,
    settings: Settings,
    stage: Stage,
    order_ref: Option<OrderRef>,
    interval: Duration,
    in_flight: InFlight,
    /// The next scheduled request once `Timer::Next` fires.
    next_is_start: bool,
    retries: u32,
    unavailable_since: Option<Instant>,
    already_in_progress_seen: bool,
    conclusion: Option<Conclusion>,
    /// The check ended while a start was in flight: cancel the order as soon as its reference arrives.
    cancel_when_started: bool,
    out: VecDeque<Command>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("stage", &self.stage)
            .field("order_ref", &self.order_ref)
            .field("in_flight", &self.in_flight)
            .field("conclusion", &self.conclusion.as_ref().map(|c| c.outcome))
            .finish()
    }
}

impl Session {
    /// Creates a session and emits the start of its first order.
    pub fn new(order: Order, settings: Settings, now: Instant) -> Session {
        let expect = Expect::Number(order.number.clone());
        let mut s = Session::blank(Some(order), expect, settings);
        s.out.push_back(Command::ArmTimer {
            timer: Timer::Deadline,
            at: now + s.settings.verify_timeout,
        });
        s.send_start();
        s
    }

    /// Takes over an order a previous process started (its caller still waits): polls it at once and
    /// ends it by `verify_timeout` counted from its start (`elapsed` ago).
    pub fn resume(
        order: OrderRef,
        expect: Expect,
        settings: Settings,
        elapsed: Duration,
        now: Instant,
    ) -> Session {
        let left = settings.verify_timeout.saturating_sub(elapsed);
        let mut s = Session::blank(None, expect, settings);
        s.stage = Stage::OrderCreated;
        s.order_ref = Some(order);
        s.next_is_start = false;
        s.out.push_back(Command::ArmTimer {
            timer: Timer::Deadline,
            at: now + left,
        });
        s.send_poll();
        s
    }

    fn blank(order: Option<Order>, expect: Expect, settings: Settings) -> Session {
        Session {
            order,
            expect,
            interval: settings.poll_interval.max(settings.min_poll_interval),
            settings,
            stage: Stage::Starting,
            order_ref: None,
            in_flight: InFlight::None,
            next_is_start: true,
            retries: 0,
            unavailable_since: None,
            already_in_progress_seen: false,
            conclusion: None,
            cancel_when_started: false,
            out: VecDeque::new(),
        }
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    pub fn order_ref(&self) -> Option<&OrderRef> {
        self.order_ref.as_ref()
    }

    /// The conclusion, once the check has ended.
    pub fn conclusion(&self) -> Option<&Conclusion> {
        self.conclusion.as_ref()
    }

    /// Ended, and nothing left to tell the provider.
    pub fn is_quiescent(&self) -> bool {
        self.conclusion.is_some() && !self.cancel_when_started && self.out.is_empty()
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Started(result) => self.on_started(result, now),
            Input::Polled(result) => self.on_polled(result, now),
            Input::CancelDone(_) => {}
            Input::Timer(Timer::Deadline) => self.stop(Reason::Timeout),
            Input::Timer(Timer::Next) => self.on_next(),
            Input::Cancel(reason) => self.stop(reason),
            Input::Resume => {
                if self.conclusion.is_none()
                    && self.in_flight == InFlight::None
                    && !self.next_is_start
                {
                    self.out.push_back(Command::DisarmTimer(Timer::Next));
                    self.send_poll();
                }
            }
        }
    }

    fn on_started(&mut self, result: Result<Started, ProviderError>, now: Instant) {
        if self.in_flight != InFlight::Start {
            return;
        }
        self.in_flight = InFlight::None;
        if self.cancel_when_started {
            self.cancel_when_started = false;
            if let Ok(started) = result {
                self.out.push_back(Command::Cancel(started.order));
            }
            return;
        }
        if self.conclusion.is_some() {
            return;
        }
        match result {
            Ok(started) => {
                if let Some(i) = started.poll_interval {
                    self.interval = i.max(self.settings.min_poll_interval);
                }
                self.order_ref = Some(started.order);
                self.next_is_start = false;
                self.retries = 0;
                self.unavailable_since = None;
                self.set_stage(Stage::OrderCreated);
                self.arm_next(now + self.interval);
            }
            Err(ProviderError::NotSent) => {
                if self.retries < self.settings.max_retries {
                    self.retries += 1;
                    self.arm_next(now + self.settings.retry_delay);
                } else {
                    self.finish(Outcome::NotVerified(Reason::ProviderUnavailable), None);
                }
            }
            Err(ProviderError::OutcomeUnknown) => {
                self.finish(Outcome::NotVerified(Reason::ProviderError), None)
            }
            Err(ProviderError::Unavailable) => {
                if self.within_unavailable_budget(now, self.settings.retry_delay) {
                    self.arm_next(now + self.settings.retry_delay);
                } else {
                    self.finish(Outcome::NotVerified(Reason::ProviderUnavailable), None);
                }
            }
            Err(ProviderError::RateLimited { retry_after }) => {
                let wait = retry_after.unwrap_or(self.settings.retry_delay);
                if retry_after.is_some() && self.within_unavailable_budget(now, wait) {
                    self.arm_next(now + wait);
                } else {
                    self.finish(Outcome::NotVerified(Reason::ProviderBusy), None);
                }
            }
            Err(ProviderError::Rejected(Reason::AlreadyInProgress))
                if !self.already_in_progress_seen =>
            {
                // The provider has now cancelled the other order for this person; one later start may
                // succeed. A second refusal ends the check: never loop.
                self.already_in_progress_seen = true;
                self.arm_next(now + self.settings.retry_delay);
            }
            Err(ProviderError::Rejected(reason)) => self.finish(Outcome::NotVerified(reason), None),
            Err(ProviderError::Fatal) => {
                self.finish(Outcome::NotVerified(Reason::ProviderError), None)
            }
        }
    }

    fn on_polled(&mut self, result: Result<Poll, ProviderError>, now: Instant) {
        if self.in_flight != InFlight::Poll || self.conclusion.is_some() {
            self.in_flight = InFlight::None;
            return;
        }
        self.in_flight = InFlight::None;
        match result {
            Ok(Poll::Pending(stage)) => {
                self.retries = 0;
                self.unavailable_since = None;
                if !matches!(stage, Stage::Starting | Stage::Done) {
                    self.set_stage(stage);
                }
                self.arm_next(now + self.interval);
            }
            Ok(Poll::SlowDown(stage)) => {
                self.interval += SLOW_DOWN_STEP;
                self.retries = 0;
                self.unavailable_since = None;
                if !matches!(stage, Stage::Starting | Stage::Done) {
                    self.set_stage(stage);
                }
                self.arm_next(now + self.interval);
            }
            Ok(Poll::Complete(identity)) => {
                if self.expect.matches(&identity.number) {
                    self.finish(Outcome::Verified, Some(identity));
                } else {
                    self.finish(Outcome::NotVerified(Reason::IdentityMismatch), None);
                }
            }
            Ok(Poll::Failed(reason)) => self.finish(Outcome::NotVerified(reason), None),
            Err(ProviderError::NotSent | ProviderError::OutcomeUnknown) => {
                // A poll is idempotent: retrying it is safe.
                if self.retries < self.settings.max_retries {
                    self.retries += 1;
                    self.arm_next(now + self.interval);
                } else {
                    self.end_with_cancel(Reason::ProviderUnavailable);
                }
            }
            Err(ProviderError::Unavailable) => {
                if self.within_unavailable_budget(now, self.interval) {
                    self.arm_next(now + self.interval);
                } else {
                    self.end_with_cancel(Reason::ProviderUnavailable);
                }
            }
            Err(ProviderError::RateLimited { retry_after }) => {
                let wait = retry_after.unwrap_or(self.interval).max(self.interval);
                self.arm_next(now + wait);
            }
            Err(ProviderError::Rejected(reason)) => self.end_with_cancel(reason),
            // The provider cannot go on with this order: end, and tell it to drop the order.
            Err(ProviderError::Fatal) => self.end_with_cancel(Reason::ProviderError),
        }
    }

    fn on_next(&mut self) {
        if self.conclusion.is_some() || self.in_flight != InFlight::None {
            return;
        }
        if self.next_is_start {
            self.send_start();
        } else {
            self.send_poll();
        }
    }

    /// Ends the check for `reason`, cancelling any order at the provider.
    fn stop(&mut self, reason: Reason) {
        if self.conclusion.is_some() {
            return;
        }
        if self.in_flight == InFlight::Start {
            self.cancel_when_started = true;
        }
        self.end_with_cancel(reason);
    }

    fn end_with_cancel(&mut self, reason: Reason) {
        if let Some(order) = self.order_ref.clone() {
            self.out.push_back(Command::Cancel(order));
        }
        self.finish(Outcome::NotVerified(reason), None);
    }

    fn finish(&mut self, outcome: Outcome, identity: Option<Identity>) {
        if self.conclusion.is_some() {
            return;
        }
        self.out.push_back(Command::DisarmTimer(Timer::Next));
        self.out.push_back(Command::DisarmTimer(Timer::Deadline));
        self.set_stage(Stage::Done);
        let conclusion = Conclusion { outcome, identity };
        self.conclusion = Some(conclusion.clone());
        self.out.push_back(Command::Finished(conclusion));
    }

    fn within_unavailable_budget(&mut self, now: Instant, wait: Duration) -> bool {
        let since = *self.unavailable_since.get_or_insert(now);
        now + wait <= since + self.settings.unavailable_budget
    }

    fn set_stage(&mut self, stage: Stage) {
        if self.stage != stage {
            self.stage = stage;
            self.out.push_back(Command::Progress(stage));
        }
    }

    fn arm_next(&mut self, at: Instant) {
        self.out.push_back(Command::ArmTimer {
            timer: Timer::Next,
            at,
        });
    }

    fn send_start(&mut self) {
        match self.order.clone() {
            Some(order) => {
                self.in_flight = InFlight::Start;
                self.out.push_back(Command::Start(order));
            }
            // A resumed order is never started again.
            None => self.finish(Outcome::NotVerified(Reason::ProviderError), None),
        }
    }

    fn send_poll(&mut self) {
        if let Some(order) = self.order_ref.clone() {
            self.in_flight = InFlight::Poll;
            self.out.push_back(Command::Poll(order));
        }
    }
}
