//! `dialog::Call`: the sans-IO caller dialogue of the before-agent gate.
//!
//! Answer, ask for the personal number (barge-in), collect and validate digits, run a
//! [`verify::Session`], hold with music (restarted after progress prompts), announce the outcome and end
//! with exactly one [`Command::Finish`] naming the outcome and where the call goes.
//!
//! Invariants: no clock, no I/O, no async (time comes in with every input). A hard gate deadline is armed
//! at creation. `Finish` is emitted exactly once, only when no prompt is playing (or a bounded guard has
//! passed); after it no PBX command is emitted — only the provider `Cancel` of an order whose start was
//! still in flight may follow, so no order is left open on a person's phone.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::outcome::{Identity, Outcome, Reason, Status};
use crate::pnr::{Kind, ParseOptions, PersonalNumber};
use crate::policy::{QueuePolicy, Route};
use crate::prompts::{Language, PromptId};
use crate::verify::{self, Expect, Initiator, Order, OrderRef, Session, Stage};

pub mod anchor;
#[cfg(test)]
mod tests;

/// Identifies one playback of this call; the adapter maps it to the PBX's playback id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlaybackId(pub u32);

/// What the dialogue needs to know about the call when it starts.
#[derive(Debug, Clone)]
pub struct CallInfo {
    /// The channel's language as the PBX reports it (e.g. `sv`, `en`).
    pub channel_language: String,
    /// Who placed the call (inbound calls: the caller).
    pub initiator: Initiator,
    /// Today's date, for validating birth dates in personal numbers.
    pub today: time::Date,
}

/// Timers the dialogue arms. Re-arming one replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The hard gate deadline.
    Deadline,
    /// No first digit after the prompt.
    FirstDigit,
    /// No further digit.
    InterDigit,
    /// No answer to "press 1 to try again".
    RetryOffer,
    /// A prompt's end was not reported in time (a lost event must not stall the call).
    PromptGuard,
    /// A timer of the verification session.
    Verify(verify::Timer),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A keypad digit from the caller's channel (`0-9`, `*`, `#`, `A-D`).
    Dtmf(char),
    /// A playback ended, completed, stopped or failed (a missing file must not stall the flow).
    PlaybackEnded(PlaybackId),
    Timer(Timer),
    /// The caller hung up, or the channel is gone / left our control.
    Hangup,
    /// We lost control of the call for this reason (another instance took the PBX application over):
    /// end without touching the call.
    Detached(Reason),
    /// End the gate now for this reason (shutdown, restart) and route the call.
    Interrupt(Reason),
    /// A planned restart: a caller holding for an open order is left as they are (hold music, order
    /// open) for the next start to resume; any other call is interrupted for `restart`.
    Handover,
    /// The link to the PBX was lost: events (typed digits, prompt ends) may be lost until `Resync`.
    LinkDown,
    /// The link is back and the call is still ours; events may have been lost: resume from a safe
    /// point.
    Resync,
    /// An answer from the identity provider.
    Idp(verify::Input),
}

/// A request to the identity provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdpCommand {
    Start(Order),
    Poll(OrderRef),
    Cancel(OrderRef),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Answer,
    /// Play the media in order as one playback.
    Play {
        id: PlaybackId,
        prompts: Vec<PromptId>,
        media: Vec<String>,
        lang: Language,
    },
    StopPlayback(PlaybackId),
    /// Ask the PBX whether this playback still runs (its end may have been lost in a gap); the answer
    /// comes back as `PlaybackEnded` when it does not.
    CheckPlayback(PlaybackId),
    StartMoh {
        class: String,
    },
    StopMoh,
    ArmTimer {
        timer: Timer,
        at: Instant,
    },
    DisarmTimer(Timer),
    Idp(IdpCommand),
    /// The verification's progress changed.
    Progress(Stage),
    /// The gate is over: record the outcome, set the call metadata, and send the call to `route`
    /// (`None`: the caller is gone; nothing to route).
    Finish {
        outcome: Outcome,
        identity: Option<Identity>,
        route: Option<Route>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Asking for the number; digits barge in.
    Prompting,
    /// Waiting for digits.
    Collecting,
    /// A verification session runs; the caller holds.
    Verifying,
    /// "Press 1 to try again" is offered.
    RetryOffer,
    /// The outcome is decided; stopping or announcing before `Finish`.
    Concluding,
    Ended,
}

/// How long to wait for a prompt's end before assuming it (events can be lost).
const PROMPT_GUARD: Duration = Duration::from_secs(20);
/// How long to wait for a stopped prompt to report its end.
const STOP_GUARD: Duration = Duration::from_secs(2);
/// Entries (or "press 1" offers) restarted because the PBX link dropped during them. They are the
/// link's fault, never counted as the caller's attempts; past this bound the call is routed as
/// `interrupted/pbx_lost`.
pub const MAX_LINK_REPROMPTS: u32 = 3;
/// Time a resumed call has beyond its order's own timeout to announce and route.
pub const RESUME_SLACK: Duration = Duration::from_secs(30);

/// One caller's way through the gate.
pub struct Call {
    policy: Arc<QueuePolicy>,
    settings: verify::Settings,
    info: CallInfo,
    lang: Language,
    phase: Phase,
    digits: Digits,
    entry_failures: u32,
    any_digit_entered: bool,
    last_entry_invalid: bool,
    orders: u32,
    number: Option<PersonalNumber>,
    session: Option<Session>,
    playing: Option<PlaybackId>,
    stopping: bool,
    next_playback: u32,
    moh: bool,
    /// Decided outcome (Concluding / Ended).
    outcome: Option<(Outcome, Option<Identity>)>,
    /// The caller is gone: nothing left to play or route.
    gone: bool,
    /// The outcome prompt to play once nothing else plays.
    announcement: Option<PromptId>,
    /// The last entry ended at the maximum length; a '#' right after it is part of it.
    swallow_hash: bool,
    /// The PBX link is down (between `LinkDown` and `Resync`).
    link_down: bool,
    /// The link dropped during the current entry or offer: digits may have been lost, so a failed
    /// entry is the link's fault, not the caller's.
    gap_in_entry: bool,
    /// An entry failed while the link was down: ask again once it is back.
    reprompt_on_resync: bool,
    link_reprompts: u32,
    /// Left for the next start: this process ends without a `Finish`.
    handed_over: bool,
    out: VecDeque<Command>,
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("queue", &self.policy.name)
            .field("phase", &self.phase)
            .field("digits", &self.digits)
            .field("entry_failures", &self.entry_failures)
            .field("orders", &self.orders)
            .field("link_reprompts", &self.link_reprompts)
            .field("session", &self.session)
            .field("outcome", &self.outcome.as_ref().map(|(o, _)| *o))
            .finish()
    }
}

impl Call {
    /// Starts the dialogue: arms the deadline, answers, asks for the number.
    pub fn new(
        policy: Arc<QueuePolicy>,
        settings: verify::Settings,
        info: CallInfo,
        now: Instant,
    ) -> Call {
        let mut call = Call::new_in(policy, settings, info, Phase::Prompting);
        call.arm(Timer::Deadline, now + call.policy.gate_deadline);
        call.emit(Command::Answer);
        call.play(vec![PromptId::EnterNumber], now);
        call
    }

    fn new_in(
        policy: Arc<QueuePolicy>,
        settings: verify::Settings,
        info: CallInfo,
        phase: Phase,
    ) -> Call {
        let lang = policy.language_for(&info.channel_language);
        let max_len = max_len(&policy);
        Call {
            policy,
            settings,
            info,
            lang,
            phase,
            digits: Digits::new(max_len),
            entry_failures: 0,
            any_digit_entered: false,
            last_entry_invalid: false,
            orders: 0,
            number: None,
            session: None,
            playing: None,
            stopping: false,
            next_playback: 0,
            moh: false,
            outcome: None,
            gone: false,
            announcement: None,
            swallow_hash: false,
            link_down: false,
            gap_in_entry: false,
            reprompt_on_resync: false,
            link_reprompts: 0,
            handed_over: false,
            out: VecDeque::new(),
        }
    }

    /// Takes over a call whose order a previous process started (it crashed or was restarted while
    /// the caller held): hold music again and the order collected at once. The gate ends no later
    /// than the order's own timeout plus [`RESUME_SLACK`] (and never later than `gate_deadline`).
    pub fn resume(
        policy: Arc<QueuePolicy>,
        settings: verify::Settings,
        info: CallInfo,
        order: OrderRef,
        expect: Expect,
        elapsed: Duration,
        now: Instant,
    ) -> Call {
        let mut call = Call::new_in(policy, settings, info, Phase::Verifying);
        call.orders = 1;
        let mut settings = call.settings.clone();
        settings.verify_timeout = call.policy.verify_timeout;
        let left = settings.verify_timeout.saturating_sub(elapsed) + RESUME_SLACK;
        call.arm(Timer::Deadline, now + left.min(call.policy.gate_deadline));
        call.session = Some(Session::resume(order, expect, settings, elapsed, now));
        call.start_moh();
        call.drain_session(now);
        call
    }

    pub fn language(&self) -> Language {
        self.lang
    }

    /// The verification stage, if a check has started.
    pub fn stage(&self) -> Option<Stage> {
        self.session.as_ref().map(Session::stage)
    }

    /// The decided outcome, once there is one.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome.as_ref().map(|(o, _)| *o)
    }

    /// `Finish` has been emitted.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// Handed over to the next start (see [`Input::Handover`]): no `Finish` was emitted, the order
    /// stays open.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over
    }

    /// Finished (or handed over), and nothing is left to tell the provider: the driver may stop.
    pub fn is_done(&self) -> bool {
        self.handed_over
            || self.phase == Phase::Ended
                && self.out.is_empty()
                && self.session.as_ref().is_none_or(Session::is_quiescent)
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Dtmf(d) => self.on_digit(d, now),
            Input::PlaybackEnded(id) => self.on_playback_ended(id, now),
            Input::Timer(t) => self.on_timer(t, now),
            Input::Hangup => self.on_gone(Reason::CallerHungUp, now),
            Input::Detached(reason) => self.on_gone(reason, now),
            Input::Interrupt(reason) => self.on_interrupt(reason, now),
            Input::Handover => self.on_handover(now),
            Input::LinkDown => self.on_link_down(),
            Input::Resync => self.on_resync(now),
            Input::Idp(i) => self.on_idp(i, now),
        }
    }

    // ---- inputs ----

    fn on_digit(&mut self, d: char, now: Instant) {
        // Entry ended at the maximum length: the '#' typed out of habit right after belongs to it.
        if std::mem::take(&mut self.swallow_hash) && d == '#' {
            return;
        }
        match self.phase {
            Phase::Prompting | Phase::Collecting => {
                if !matches!(d, '0'..='9' | '*' | '#') {
                    return;
                }
                if self.phase == Phase::Prompting {
                    // Barge-in: the first key stops the prompt.
                    self.stop_prompt(now);
                    self.phase = Phase::Collecting;
                }
                match d {
                    '*' => {
                        self.digits.clear();
                        self.disarm(Timer::InterDigit);
                        self.arm(Timer::FirstDigit, now + self.policy.first_digit_timeout);
                    }
                    '#' => self.submit(now),
                    _ => {
                        self.any_digit_entered = true;
                        self.digits.push(d);
                        self.disarm(Timer::FirstDigit);
                        if self.digits.len() >= self.digits.max {
                            self.submit(now);
                            self.swallow_hash = true;
                        } else {
                            self.arm(Timer::InterDigit, now + self.policy.inter_digit_timeout);
                        }
                    }
                }
            }
            Phase::RetryOffer => {
                self.disarm(Timer::RetryOffer);
                self.stop_prompt(now);
                if d == '1' {
                    self.start_order(now);
                } else {
                    let reason = self.last_failure().unwrap_or(Reason::UserCancelled);
                    self.conclude(Outcome::NotVerified(reason), None, true, now);
                }
            }
            Phase::Verifying | Phase::Concluding | Phase::Ended => {}
        }
    }

    fn on_playback_ended(&mut self, id: PlaybackId, now: Instant) {
        if self.playing != Some(id) {
            return;
        }
        self.playing = None;
        self.stopping = false;
        self.disarm(Timer::PromptGuard);
        self.after_prompt(now);
    }

    /// What follows the end of the current prompt in each phase.
    fn after_prompt(&mut self, now: Instant) {
        match self.phase {
            Phase::Prompting => {
                self.phase = Phase::Collecting;
                self.arm(Timer::FirstDigit, now + self.policy.first_digit_timeout);
            }
            Phase::Collecting => {}
            Phase::Verifying => self.start_moh(),
            Phase::RetryOffer => {
                self.arm(Timer::RetryOffer, now + self.policy.first_digit_timeout);
            }
            Phase::Concluding => self.announce_or_finish(now),
            Phase::Ended => {}
        }
    }

    fn on_timer(&mut self, timer: Timer, now: Instant) {
        match timer {
            Timer::Deadline => {
                if matches!(self.phase, Phase::Concluding | Phase::Ended) {
                    if self.phase == Phase::Concluding {
                        // The outcome is known; do not wait any longer for a prompt, but never set
                        // metadata under one that may still be playing.
                        if let Some(id) = self.playing.take() {
                            if !std::mem::take(&mut self.stopping) {
                                self.emit(Command::StopPlayback(id));
                            }
                        }
                        self.finish();
                    }
                    return;
                }
                self.cancel_session(Reason::Timeout, now);
                self.conclude(Outcome::NotVerified(Reason::Timeout), None, false, now);
            }
            Timer::FirstDigit if self.phase == Phase::Collecting && self.digits.len() == 0 => {
                self.entry_failed(false, now)
            }
            Timer::InterDigit if self.phase == Phase::Collecting => {
                if self.digits.is_complete(&self.policy) {
                    self.submit(now);
                } else {
                    self.entry_failed(true, now);
                }
            }
            Timer::RetryOffer if self.phase == Phase::RetryOffer && self.link_cut() => {
                self.link_cut_entry(now)
            }
            Timer::RetryOffer if self.phase == Phase::RetryOffer => {
                let reason = self.last_failure().unwrap_or(Reason::UserCancelled);
                self.conclude(Outcome::NotVerified(reason), None, true, now);
            }
            Timer::PromptGuard => {
                if self.playing.is_some() {
                    self.playing = None;
                    self.stopping = false;
                    self.after_prompt(now);
                }
            }
            Timer::Verify(t) => self.feed_session(verify::Input::Timer(t), now),
            Timer::FirstDigit | Timer::InterDigit | Timer::RetryOffer => {}
        }
    }

    fn on_gone(&mut self, reason: Reason, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        self.gone = true;
        self.playing = None;
        self.moh = false;
        if self.outcome.is_none() {
            self.cancel_session(reason, now);
            self.outcome = Some((Outcome::NotVerified(reason), None));
        }
        self.phase = Phase::Concluding;
        self.finish();
    }

    fn on_interrupt(&mut self, reason: Reason, now: Instant) {
        match self.phase {
            Phase::Ended => {}
            Phase::Concluding => {
                // Keep the decided outcome; skip the announcement.
                self.announcement = None;
                if self.playing.is_some() && !self.stopping {
                    self.stop_prompt(now);
                }
                if self.playing.is_none() {
                    self.finish();
                }
            }
            _ => {
                self.cancel_session(reason, now);
                self.conclude(Outcome::NotVerified(reason), None, false, now);
            }
        }
    }

    fn on_handover(&mut self, now: Instant) {
        let holding = self.phase == Phase::Verifying
            && self
                .session
                .as_ref()
                .is_some_and(|s| s.conclusion().is_none() && s.order_ref().is_some());
        if !holding {
            self.on_interrupt(Reason::Restart, now);
            return;
        }
        // Nothing more is said to the PBX or the provider: the next start resumes the order.
        self.out.clear();
        self.handed_over = true;
        self.phase = Phase::Ended;
    }

    fn on_link_down(&mut self) {
        self.link_down = true;
        if matches!(
            self.phase,
            Phase::Prompting | Phase::Collecting | Phase::RetryOffer
        ) {
            self.gap_in_entry = true;
        }
    }

    fn on_resync(&mut self, now: Instant) {
        self.link_down = false;
        // A prompt's end may have been lost: ask whether it still plays rather than cut it short or
        // play it again (a flapping link would otherwise loop the caller through the same prompt).
        if let Some(id) = self.playing {
            if !self.stopping {
                self.emit(Command::CheckPlayback(id));
            }
        }
        match self.phase {
            Phase::Prompting | Phase::Collecting | Phase::RetryOffer => {
                // Digits typed in the gap are lost without trace: keep what arrived, but an entry
                // that then fails is the link's fault.
                self.gap_in_entry = true;
                if std::mem::take(&mut self.reprompt_on_resync) {
                    self.link_reprompt(now);
                }
            }
            Phase::Verifying => {
                if self.playing.is_none() {
                    // Music on hold may have failed to start in the gap; starting it again is harmless.
                    self.moh = false;
                    self.start_moh();
                }
                self.feed_session(verify::Input::Resume, now);
            }
            Phase::Concluding | Phase::Ended => {}
        }
    }

    fn on_idp(&mut self, input: verify::Input, now: Instant) {
        self.feed_session(input, now);
    }

    // ---- digits ----

    fn submit(&mut self, now: Instant) {
        self.disarm(Timer::FirstDigit);
        self.disarm(Timer::InterDigit);
        if self.digits.len() == 0 {
            self.entry_failed(false, now);
            return;
        }
        let opts = ParseOptions {
            kinds: &self.policy.accept_kinds,
            accept_10_digits: self.policy.accept_10_digits,
            today: self.info.today,
        };
        let parsed = PersonalNumber::parse(self.digits.as_str(), &opts);
        self.digits.clear();
        match parsed {
            Ok(number) => {
                self.number = Some(number);
                self.start_order(now);
            }
            Err(_) => self.entry_failed(true, now),
        }
    }

    /// The link dropped during this entry or offer (or is down now).
    fn link_cut(&self) -> bool {
        self.link_down || self.gap_in_entry
    }

    fn entry_failed(&mut self, invalid: bool, now: Instant) {
        if self.link_cut() {
            self.link_cut_entry(now);
            return;
        }
        self.digits.clear();
        self.entry_failures += 1;
        self.last_entry_invalid = invalid;
        if self.entry_failures >= self.policy.max_entry_attempts {
            let reason = if !self.any_digit_entered {
                Reason::NoInput
            } else if self.last_entry_invalid {
                Reason::InvalidNumber
            } else {
                Reason::TooManyAttempts
            };
            self.conclude(Outcome::NotVerified(reason), None, true, now);
            return;
        }
        let first = if invalid {
            PromptId::InvalidNumber
        } else {
            PromptId::NoInput
        };
        self.phase = Phase::Prompting;
        self.gap_in_entry = self.link_down;
        self.play(vec![first, PromptId::EnterNumber], now);
    }

    /// An entry (or offer) failed after the link dropped during it: start it again without counting
    /// it against the caller — once the link is back.
    fn link_cut_entry(&mut self, now: Instant) {
        self.digits.clear();
        self.disarm(Timer::FirstDigit);
        self.disarm(Timer::InterDigit);
        self.disarm(Timer::RetryOffer);
        if self.link_down {
            self.reprompt_on_resync = true;
        } else {
            self.link_reprompt(now);
        }
    }

    /// "Let's start again": the link's own re-prompt, bounded by [`MAX_LINK_REPROMPTS`].
    fn link_reprompt(&mut self, now: Instant) {
        self.link_reprompts += 1;
        if self.link_reprompts > MAX_LINK_REPROMPTS {
            self.conclude(Outcome::NotVerified(Reason::PbxLost), None, false, now);
            return;
        }
        self.digits.clear();
        self.gap_in_entry = false;
        if self.phase == Phase::RetryOffer {
            self.play(vec![PromptId::StartAgain, PromptId::RetryOffer], now);
        } else {
            self.phase = Phase::Prompting;
            self.play(vec![PromptId::StartAgain, PromptId::EnterNumber], now);
        }
    }

    // ---- verification ----

    fn start_order(&mut self, now: Instant) {
        let Some(number) = self.number.clone() else {
            self.conclude(Outcome::NotVerified(Reason::InvalidNumber), None, true, now);
            return;
        };
        self.orders += 1;
        self.phase = Phase::Verifying;
        let order = Order {
            number,
            initiator: self.info.initiator,
            text: self.policy.user_visible_text.clone(),
            pin_code: self.policy.pin_code,
        };
        let mut settings = self.settings.clone();
        settings.verify_timeout = self.policy.verify_timeout;
        self.gap_in_entry = false;
        self.session = Some(Session::new(order, settings, now));
        // "Open the app" waits for the order to exist (and to be journalled): a caller is never told
        // to approve something that was not created.
        self.drain_session(now);
    }

    fn feed_session(&mut self, input: verify::Input, now: Instant) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        session.handle(input, now);
        self.drain_session(now);
    }

    fn cancel_session(&mut self, reason: Reason, now: Instant) {
        // The caller of this decides the outcome; the session's `Finished` only confirms it.
        self.phase = Phase::Concluding;
        if let Some(session) = self.session.as_mut() {
            if session.conclusion().is_none() {
                session.handle(verify::Input::Cancel(reason), now);
                self.drain_session(now);
            }
        }
    }

    fn drain_session(&mut self, now: Instant) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let mut cmds = Vec::new();
        while let Some(c) = session.poll_command() {
            cmds.push(c);
        }
        for c in cmds {
            match c {
                verify::Command::Start(order) => self.emit(Command::Idp(IdpCommand::Start(order))),
                verify::Command::Poll(r) => self.emit(Command::Idp(IdpCommand::Poll(r))),
                verify::Command::Cancel(r) => self.emit(Command::Idp(IdpCommand::Cancel(r))),
                verify::Command::ArmTimer { timer, at } => self.arm(Timer::Verify(timer), at),
                verify::Command::DisarmTimer(timer) => self.disarm(Timer::Verify(timer)),
                verify::Command::Progress(stage) => self.on_progress(stage, now),
                verify::Command::Finished(c) => self.on_verified(c.outcome, c.identity, now),
            }
        }
    }

    fn on_progress(&mut self, stage: Stage, now: Instant) {
        self.emit(Command::Progress(stage));
        if self.phase == Phase::Verifying && stage == Stage::OrderCreated {
            self.stop_moh();
            self.play(vec![PromptId::OpenApp], now);
            return;
        }
        if self.phase != Phase::Verifying || !self.policy.progress_prompts || self.playing.is_some()
        {
            return;
        }
        let prompt = match stage {
            Stage::ConfirmingCall => PromptId::ConfirmCall,
            Stage::Identifying => PromptId::Identify,
            _ => return,
        };
        self.stop_moh();
        self.play(vec![prompt], now);
    }

    fn on_verified(&mut self, outcome: Outcome, identity: Option<Identity>, now: Instant) {
        if self.phase != Phase::Verifying {
            // Concluded by hang-up, deadline or interrupt: the session only confirms it.
            return;
        }
        let retriable = matches!(
            outcome.reason(),
            Some(
                Reason::UserCancelled
                    | Reason::Expired
                    | Reason::AlreadyInProgress
                    | Reason::Superseded
            )
        );
        // A resumed call does not know the number, so it cannot offer a new order.
        if retriable && self.number.is_some() && self.orders < self.policy.max_orders {
            self.stop_moh();
            if self.playing.is_some() {
                self.stop_prompt(now);
            }
            self.phase = Phase::RetryOffer;
            self.gap_in_entry = self.link_down;
            self.play(vec![PromptId::RetryOffer], now);
            return;
        }
        self.conclude(outcome, identity, true, now);
    }

    fn last_failure(&self) -> Option<Reason> {
        self.session
            .as_ref()
            .and_then(|s| s.conclusion())
            .and_then(|c| c.outcome.reason())
    }

    // ---- ending ----

    /// Decides the outcome, then announces it (if wanted) once nothing else plays, then finishes.
    fn conclude(
        &mut self,
        outcome: Outcome,
        identity: Option<Identity>,
        announce: bool,
        now: Instant,
    ) {
        if self.phase == Phase::Ended || self.outcome.is_some() {
            return;
        }
        self.phase = Phase::Concluding;
        self.outcome = Some((outcome, identity));
        for t in [Timer::FirstDigit, Timer::InterDigit, Timer::RetryOffer] {
            self.disarm(t);
        }
        self.digits.clear();
        self.stop_moh();
        if announce && self.policy.announce_outcome {
            self.announcement = Some(match outcome.status() {
                Status::Verified => PromptId::Verified,
                Status::Unavailable => PromptId::Unavailable,
                _ if outcome == Outcome::NotVerified(Reason::RateLimited) => PromptId::RateLimited,
                _ => PromptId::NotVerified,
            });
        }
        if self.playing.is_some() {
            // Wait for the stopped prompt to end before announcing or setting metadata.
            self.stop_prompt(now);
            return;
        }
        self.announce_or_finish(now);
    }

    fn announce_or_finish(&mut self, now: Instant) {
        match self.announcement.take() {
            Some(prompt) if !self.gone => self.play(vec![prompt], now),
            _ => self.finish(),
        }
    }

    fn finish(&mut self) {
        if self.phase == Phase::Ended || self.playing.is_some() {
            return;
        }
        let (outcome, identity) = self
            .outcome
            .clone()
            .unwrap_or((Outcome::NotVerified(Reason::CallerHungUp), None));
        for t in [
            Timer::Deadline,
            Timer::FirstDigit,
            Timer::InterDigit,
            Timer::RetryOffer,
            Timer::PromptGuard,
        ] {
            self.disarm(t);
        }
        if self.moh && !self.gone {
            self.emit(Command::StopMoh);
        }
        self.moh = false;
        let route = (!self.gone).then(|| self.policy.route_for(outcome).clone());
        self.emit(Command::Finish {
            outcome,
            identity,
            route,
        });
        self.phase = Phase::Ended;
    }

    // ---- media ----

    fn play(&mut self, prompts: Vec<PromptId>, now: Instant) {
        if self.gone {
            return;
        }
        self.next_playback += 1;
        let id = PlaybackId(self.next_playback);
        let media = prompts
            .iter()
            .map(|p| self.policy.media_for(*p, self.lang))
            .collect();
        self.stop_moh();
        self.playing = Some(id);
        self.stopping = false;
        self.emit(Command::Play {
            id,
            prompts,
            media,
            lang: self.lang,
        });
        self.arm(Timer::PromptGuard, now + PROMPT_GUARD);
    }

    fn stop_prompt(&mut self, now: Instant) {
        let Some(id) = self.playing else {
            return;
        };
        if !self.stopping {
            self.stopping = true;
            self.emit(Command::StopPlayback(id));
        }
        if self.phase == Phase::Concluding {
            // Metadata waits until the stopped prompt has ended, but only briefly.
            self.arm(Timer::PromptGuard, now + STOP_GUARD);
        } else {
            // Outside the end, nothing waits on a stopped prompt: forget it now.
            self.playing = None;
            self.stopping = false;
            self.disarm(Timer::PromptGuard);
        }
    }

    fn start_moh(&mut self) {
        if !self.moh && !self.gone && self.playing.is_none() {
            self.moh = true;
            self.emit(Command::StartMoh {
                class: self.policy.moh_class.clone(),
            });
        }
    }

    fn stop_moh(&mut self) {
        if self.moh {
            self.moh = false;
            if !self.gone {
                self.emit(Command::StopMoh);
            }
        }
    }

    // ---- plumbing ----

    fn arm(&mut self, timer: Timer, at: Instant) {
        self.emit(Command::ArmTimer { timer, at });
    }

    fn disarm(&mut self, timer: Timer) {
        self.emit(Command::DisarmTimer(timer));
    }

    fn emit(&mut self, cmd: Command) {
        if self.phase == Phase::Ended && !matches!(cmd, Command::Idp(IdpCommand::Cancel(_))) {
            return;
        }
        self.out.push_back(cmd);
    }
}

/// The digits typed so far. Debug never shows them.
pub(crate) struct Digits {
    buf: String,
    max: usize,
}

impl Digits {
    fn new(max: usize) -> Digits {
        Digits {
            buf: String::with_capacity(max),
            max,
        }
    }

    fn push(&mut self, d: char) {
        if self.buf.len() < self.max {
            self.buf.push(d);
        }
    }

    fn clear(&mut self) {
        self.buf.clear();
    }

    fn len(&self) -> usize {
        self.buf.len()
    }

    fn as_str(&self) -> &str {
        &self.buf
    }

    fn is_complete(&self, policy: &QueuePolicy) -> bool {
        lengths(policy).contains(&self.buf.len())
    }
}

impl fmt::Debug for Digits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digits(<{} redacted>)", self.buf.len())
    }
}

/// Lengths of a complete keypad entry for the queue's accepted kinds.
pub(crate) fn lengths(policy: &QueuePolicy) -> Vec<usize> {
    let mut out = Vec::new();
    for kind in &policy.accept_kinds {
        match kind {
            Kind::SePersonnummer | Kind::SeSamordningsnummer => {
                out.push(12);
                if policy.accept_10_digits {
                    out.push(10);
                }
            }
            Kind::NoFodselsnummer | Kind::NoDNumber => out.push(11),
            Kind::DkCpr => out.push(10),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

pub(crate) fn max_len(policy: &QueuePolicy) -> usize {
    lengths(policy).into_iter().max().unwrap_or(12)
}
