//! `dialog::Anchor`: the sans-IO side of an anchored call. The caller stays in our Stasis application
//! for the whole conversation, held in a bridge with an agent leg that the queue's agent context
//! connects to an agent; checks run on the live call when an agent (or their CRM) asks.
//!
//! The machine owns the legs' lifecycle (bridge and agent leg set up, agent known, either side gone,
//! where the caller goes next) and the mid-call checks: the number is typed by the agent or collected
//! on the caller's keypad (prompt to the caller only, caller muted towards the bridge while typing,
//! digits from the caller's channel only), then the same [`verify::Session`] as the gate runs.
//!
//! Invariants: no clock, no I/O, no async. At most one check is current; a new one supersedes it
//! (its order is cancelled, its session kept until quiet). Every check ends with exactly one
//! `CheckDone`. The caller is never left muted: every way out of the keypad entry unmutes. Every way
//! the call ends emits `Ended` (the caller is gone or routed, the bridge and the agent leg torn down)
//! or, on shutdown, `Released` (the bridged call is left running for the next start to adopt).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CallInfo, Digits, IdpCommand, PlaybackId};
use crate::outcome::{Identity, Outcome, Reason, Status};
use crate::pnr::{ParseOptions, PersonalNumber};
use crate::policy::{QueuePolicy, Route};
use crate::prompts::{Language, PromptId};
use crate::verify::{self, Order, Session, Stage};

/// How long the agent leg may take to enter our application after it was originated (its context
/// answers at once; `Queue()` then looks for an agent).
pub const AGENT_LEG_UP: Duration = Duration::from_secs(15);
/// How long to wait for a prompt's end before assuming it.
const PROMPT_GUARD: Duration = Duration::from_secs(20);
/// Playback ids of anchored prompts start here, above any the gate used on the same call.
const PLAYBACK_BASE: u32 = 1000;

/// How the number of a check was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckMethod {
    /// Typed by the caller in the before-agent IVR.
    Ivr,
    /// Typed by the caller on the keypad while talking to the agent.
    Keypad,
    /// Typed by the agent (the caller told them).
    AgentTyped,
}

impl CheckMethod {
    pub fn code(self) -> &'static str {
        match self {
            CheckMethod::Ivr => "ivr",
            CheckMethod::Keypad => "keypad",
            CheckMethod::AgentTyped => "agent_typed",
        }
    }
}

/// Why a call refused to start or cancel a check. Each maps to one HTTP status in the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The call is not with an agent (still in the gate, or its queue does not verify during calls):
    /// 409.
    #[error("the call is not connected to an agent")]
    NotAnchored,
    /// The call ended: 404.
    #[error("the call has ended")]
    Ended,
    /// The typed number is not a valid personal number for this queue: 422.
    #[error("not a valid personal number for this queue")]
    InvalidNumber,
    /// No check is in progress (cancel): 409.
    #[error("no verification in progress")]
    NothingToCancel,
    /// The call did not answer in time (overloaded or stuck): 503.
    #[error("the call did not answer in time")]
    Unavailable,
    /// The keypad was asked for on a call whose media callgate does not own (a hosted
    /// switchboard's call): 409.
    #[error("callgate cannot collect digits on this call (the switchboard owns its audio): type the number the caller tells you")]
    NoMedia,
    /// Several instances: the one owning the call did not answer a forwarded request: 503.
    #[error("the callgate instance owning the call did not answer")]
    OwnerUnreachable,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::NotAnchored,
        Refusal::Ended,
        Refusal::InvalidNumber,
        Refusal::NothingToCancel,
        Refusal::Unavailable,
        Refusal::NoMedia,
        Refusal::OwnerUnreachable,
    ];

    /// Stable code (the API's error code, and how another instance reports the refusal).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotAnchored => "not_with_agent",
            Refusal::Ended => "call_ended",
            Refusal::InvalidNumber => "invalid_number",
            Refusal::NothingToCancel => "nothing_to_cancel",
            Refusal::Unavailable => "call_unavailable",
            Refusal::NoMedia => "keypad_unavailable",
            Refusal::OwnerUnreachable => "instance_unavailable",
        }
    }

    pub fn from_code(code: &str) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| r.code() == code)
    }
}

/// Which side of the bridge a prompt is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    Caller,
    /// The agent leg's half in our application (`;1`): what is played there reaches the agent only.
    Agent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The agent leg did not enter our application in time.
    AgentLegUp,
    FirstDigit,
    InterDigit,
    /// A prompt's end was not reported in time.
    PromptGuard(Leg),
    /// A timer of the session of check `gen`.
    Verify(u32, verify::Timer),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The bridge exists with the caller in it and the agent leg was originated (`true`), or that
    /// failed (`false`).
    Anchored(bool),
    /// The agent leg entered our application.
    AgentLegUp,
    /// The queue connected an agent (its interface, e.g. `PJSIP/1001`).
    AgentAnswered(String),
    /// The agent leg ended.
    AgentLegEnded,
    /// The caller hung up or their channel is gone.
    CallerGone,
    /// A key from the caller's channel (absorbed by the bridge: the agent does not hear it).
    CallerDtmf(char),
    /// A key from the agent leg.
    AgentDtmf(char),
    PlaybackEnded(PlaybackId),
    Timer(Timer),
    /// An answer from the provider for the session of check `gen`.
    Idp(u32, verify::Input),
    /// Another call of ours started an order for the same person: the current check's order goes.
    Superseded,
    /// Shutdown: leave the bridged call running for the next start; cancel the check in progress.
    Shutdown,
    /// Another instance owns the application: end without touching the call.
    Detached,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Create the call's bridge, add the caller (DTMF absorbed) and originate the agent leg.
    Anchor,
    /// Add the agent leg (now in our application) to the bridge.
    AddAgentLeg,
    HangupAgentLeg,
    DestroyBridge,
    /// Mute (or unmute) the caller towards the bridge.
    MuteCaller(bool),
    Play {
        leg: Leg,
        id: PlaybackId,
        prompts: Vec<PromptId>,
        media: Vec<String>,
        lang: Language,
    },
    StopPlayback(PlaybackId),
    ArmTimer {
        timer: Timer,
        at: Instant,
    },
    DisarmTimer(Timer),
    /// A request to the provider for the session of check `gen`.
    Idp(u32, IdpCommand),
    /// Check `gen` starts (after the one it supersedes ended).
    CheckStarted {
        gen: u32,
        method: CheckMethod,
        by_agent_keys: bool,
    },
    /// Check `gen` reached a stage.
    Progress {
        gen: u32,
        stage: Stage,
    },
    /// The queue connected an agent.
    AgentConnected(String),
    /// Check `gen` is over: record it, set its result on both legs, tell the API.
    CheckDone {
        gen: u32,
        outcome: Outcome,
        identity: Option<Identity>,
    },
    /// The caller leaves the bridge for this dialplan location.
    Route {
        route: Route,
        why: Leaving,
    },
    HangupCaller,
    /// The call is over here (caller gone or routed on).
    Ended,
    /// Shutdown: the bridged call is left as it is for the next start.
    Released,
}

/// Why the caller leaves the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// The bridge or the agent leg could not be set up: the caller goes to the gate outcome's route.
    NotAnchored,
    /// The agent leg ended before an agent answered.
    NoAgent,
    /// The agent hung up first.
    AfterAgent,
}

impl Leaving {
    pub fn code(self) -> &'static str {
        match self {
            Leaving::NotAnchored => "not_anchored",
            Leaving::NoAgent => "no_agent",
            Leaving::AfterAgent => "after_agent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bridge and agent leg being set up.
    Connecting,
    /// The agent leg is in the bridge; the queue looks for an agent.
    WaitingForAgent,
    Talking,
    Ended,
    Released,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// The prompt plays; the first key stops it.
    Prompting,
    Collecting,
    /// The number is known; the session runs.
    Verifying,
    Done,
}

/// One mid-call check.
struct Check {
    gen: u32,
    method: CheckMethod,
    /// Started from the agent's phone keys: the outcome is played to the agent.
    by_agent_keys: bool,
    entry: Entry,
    digits: Digits,
    failures: u32,
    any_digit: bool,
    last_invalid: bool,
    session: Option<Session>,
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("gen", &self.gen)
            .field("method", &self.method)
            .field("entry", &self.entry)
            .field("digits", &self.digits)
            .field("session", &self.session)
            .finish()
    }
}

/// An anchored call.
pub struct Anchor {
    policy: Arc<QueuePolicy>,
    settings: verify::Settings,
    info: CallInfo,
    lang: Language,
    state: State,
    /// Where the caller goes when the bridge cannot be set up.
    fallback: Route,
    agent: Option<String>,
    check: Option<Check>,
    /// Sessions of superseded checks, kept until they have nothing left to tell the provider.
    retiring: Vec<(u32, Session)>,
    next_gen: u32,
    playing: [Option<PlaybackId>; 2],
    next_playback: u32,
    muted: bool,
    /// The agent's last keys, to match `agent_keys`.
    agent_keys: String,
    /// The agent leg was added to the bridge (or was in it already: adopted).
    agent_leg_added: bool,
    out: VecDeque<Command>,
}

impl fmt::Debug for Anchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Anchor")
            .field("queue", &self.policy.name)
            .field("state", &self.state)
            .field("agent", &self.agent)
            .field("check", &self.check)
            .field("retiring", &self.retiring.len())
            .finish()
    }
}

fn slot(leg: Leg) -> usize {
    match leg {
        Leg::Caller => 0,
        Leg::Agent => 1,
    }
}

impl Anchor {
    /// Anchors a call: bridge, caller in it, agent leg originated. `fallback` is where the caller goes
    /// if that cannot be done (the gate outcome's route, or `unavailable`).
    pub fn new(
        policy: Arc<QueuePolicy>,
        settings: verify::Settings,
        info: CallInfo,
        fallback: Route,
        now: Instant,
    ) -> Anchor {
        let mut a = Anchor::blank(policy, settings, info, fallback, State::Connecting);
        a.emit(Command::Anchor);
        a.arm(Timer::AgentLegUp, now + AGENT_LEG_UP);
        a
    }

    /// Takes over an anchored call a previous process left bridged (restart): its agent leg is in
    /// the bridge already; `agent` is the agent if the queue had connected one.
    pub fn adopt(
        policy: Arc<QueuePolicy>,
        settings: verify::Settings,
        info: CallInfo,
        agent: Option<String>,
    ) -> Anchor {
        let fallback = policy.routes.unavailable.clone();
        let state = if agent.is_some() {
            State::Talking
        } else {
            State::WaitingForAgent
        };
        let mut a = Anchor::blank(policy, settings, info, fallback, state);
        a.agent = agent;
        a.agent_leg_added = true;
        a
    }

    fn blank(
        policy: Arc<QueuePolicy>,
        settings: verify::Settings,
        info: CallInfo,
        fallback: Route,
        state: State,
    ) -> Anchor {
        let lang = policy.language_for(&info.channel_language);
        Anchor {
            policy,
            settings,
            info,
            lang,
            state,
            fallback,
            agent: None,
            check: None,
            retiring: Vec::new(),
            next_gen: 0,
            playing: [None, None],
            next_playback: PLAYBACK_BASE,
            muted: false,
            agent_keys: String::new(),
            agent_leg_added: false,
            out: VecDeque::new(),
        }
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// The agent, once the queue connected one.
    pub fn agent(&self) -> Option<&str> {
        self.agent.as_deref()
    }

    /// Waiting for an agent or talking to one (the call is live in its bridge).
    pub fn is_waiting_for_agent(&self) -> bool {
        matches!(self.state, State::Connecting | State::WaitingForAgent)
    }

    pub fn is_talking(&self) -> bool {
        self.state == State::Talking
    }

    /// Whether a check can start now.
    pub fn can_verify(&self) -> bool {
        self.state == State::Talking
    }

    /// The current check's stage, if one runs.
    pub fn stage(&self) -> Option<Stage> {
        let c = self.check.as_ref()?;
        match (&c.session, c.entry) {
            (_, Entry::Done) => None,
            (Some(s), _) => Some(s.stage()),
            (None, _) => Some(Stage::Starting),
        }
    }

    /// The current check's generation (the id the driver tags its provider requests with).
    pub fn current_gen(&self) -> Option<u32> {
        self.check.as_ref().map(|c| c.gen)
    }

    /// Over (ended or released) and nothing left to tell the provider.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Ended | State::Released)
            && self.out.is_empty()
            && self
                .check
                .as_ref()
                .and_then(|c| c.session.as_ref())
                .is_none_or(Session::is_quiescent)
            && self.retiring.iter().all(|(_, s)| s.is_quiescent())
    }

    /// Released for the next start rather than ended.
    pub fn is_released(&self) -> bool {
        self.state == State::Released
    }

    /// Starts a check: with the number the agent typed, or (`None`) collected from the caller's
    /// keypad. A check in progress is superseded.
    pub fn start_check(
        &mut self,
        number: Option<PersonalNumber>,
        by_agent_keys: bool,
        now: Instant,
    ) -> Result<(), Refusal> {
        match self.state {
            State::Ended | State::Released => return Err(Refusal::Ended),
            State::Connecting | State::WaitingForAgent => return Err(Refusal::NotAnchored),
            State::Talking => {}
        }
        self.end_check(Reason::Superseded, now);
        self.next_gen += 1;
        let method = match (&number, by_agent_keys) {
            (Some(_), _) => CheckMethod::AgentTyped,
            (None, _) => CheckMethod::Keypad,
        };
        self.check = Some(Check {
            gen: self.next_gen,
            method,
            by_agent_keys,
            entry: Entry::Prompting,
            digits: Digits::new(super::max_len(&self.policy)),
            failures: 0,
            any_digit: false,
            last_invalid: false,
            session: None,
        });
        self.emit(Command::CheckStarted {
            gen: self.next_gen,
            method,
            by_agent_keys,
        });
        match number {
            Some(n) => self.start_session(n, now),
            None => {
                self.mute(true);
                self.play(Leg::Caller, vec![PromptId::EnterNumber], now);
            }
        }
        Ok(())
    }

    /// Cancels the check in progress (`agent_cancelled`).
    pub fn cancel_check(&mut self, now: Instant) -> Result<(), Refusal> {
        if matches!(self.state, State::Ended | State::Released) {
            return Err(Refusal::Ended);
        }
        if !self.check.as_ref().is_some_and(|c| c.entry != Entry::Done) {
            return Err(Refusal::NothingToCancel);
        }
        self.end_check(Reason::AgentCancelled, now);
        Ok(())
    }

    /// Parses a number typed by an agent with the queue's rules.
    pub fn parse_number(&self, digits: &str) -> Result<PersonalNumber, Refusal> {
        let opts = ParseOptions {
            kinds: &self.policy.accept_kinds,
            accept_10_digits: self.policy.accept_10_digits,
            today: self.info.today,
        };
        PersonalNumber::parse(digits, &opts).map_err(|_| Refusal::InvalidNumber)
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Anchored(true) => {}
            Input::Anchored(false) => {
                let route = self.fallback.clone();
                self.leave(Some((route, Leaving::NotAnchored)), now);
            }
            Input::AgentLegUp => {
                // Its `StasisStart` may be routed after the queue already named the agent.
                if !self.agent_leg_added && !matches!(self.state, State::Ended | State::Released) {
                    self.agent_leg_added = true;
                    if self.state == State::Connecting {
                        self.state = State::WaitingForAgent;
                    }
                    self.disarm(Timer::AgentLegUp);
                    self.emit(Command::AddAgentLeg);
                }
            }
            Input::AgentAnswered(agent) => {
                if matches!(self.state, State::Connecting | State::WaitingForAgent) {
                    if !self.agent_leg_added {
                        // The leg is up (an agent answered on it); its `StasisStart` is on its way.
                        self.agent_leg_added = true;
                        self.emit(Command::AddAgentLeg);
                    }
                    self.disarm(Timer::AgentLegUp);
                    self.state = State::Talking;
                    self.agent = Some(agent.clone());
                    self.emit(Command::AgentConnected(agent));
                }
            }
            Input::AgentLegEnded => match self.state {
                State::Connecting | State::WaitingForAgent => {
                    let route = self.policy.no_agent_route().clone();
                    self.leave(Some((route, Leaving::NoAgent)), now);
                }
                State::Talking => {
                    let after = self
                        .policy
                        .routes
                        .after_agent
                        .clone()
                        .map(|r| (r, Leaving::AfterAgent));
                    self.playing[slot(Leg::Agent)] = None;
                    self.leave(after, now);
                }
                State::Ended | State::Released => {}
            },
            Input::CallerGone => self.caller_gone(now),
            Input::CallerDtmf(d) => self.on_caller_digit(d, now),
            Input::AgentDtmf(d) => self.on_agent_digit(d, now),
            Input::PlaybackEnded(id) => self.on_playback_ended(id, now),
            Input::Timer(t) => self.on_timer(t, now),
            Input::Idp(gen, i) => self.feed(gen, i, now),
            Input::Superseded => {
                if let Some(gen) = self.current_gen() {
                    self.feed(gen, verify::Input::Cancel(Reason::Superseded), now);
                }
            }
            Input::Shutdown => self.release(Reason::Restart, true, now),
            Input::Detached => self.release(Reason::PbxLost, false, now),
        }
    }

    // ---- the legs ----

    /// The caller leaves the bridge (routed) or, with `None`, is hung up: the check ends, the agent
    /// leg and the bridge go.
    fn leave(&mut self, to: Option<(Route, Leaving)>, now: Instant) {
        if matches!(self.state, State::Ended | State::Released) {
            return;
        }
        self.disarm(Timer::AgentLegUp);
        let reason = if self.state == State::Talking {
            Reason::AgentCancelled
        } else {
            Reason::CallerHungUp
        };
        self.end_check(reason, now);
        self.stop_prompts();
        self.mute(false);
        self.emit(Command::HangupAgentLeg);
        self.emit(Command::DestroyBridge);
        match to {
            Some((route, why)) => self.emit(Command::Route { route, why }),
            None => self.emit(Command::HangupCaller),
        }
        self.emit(Command::Ended);
        self.state = State::Ended;
    }

    fn caller_gone(&mut self, now: Instant) {
        if matches!(self.state, State::Ended | State::Released) {
            return;
        }
        self.disarm(Timer::AgentLegUp);
        self.playing = [None, None];
        self.muted = false;
        self.end_check(Reason::CallerHungUp, now);
        self.emit(Command::HangupAgentLeg);
        self.emit(Command::DestroyBridge);
        self.emit(Command::Ended);
        self.state = State::Ended;
    }

    /// Shutdown (`touch`: unmute a caller typing) or detach (`!touch`: nothing is sent to the PBX).
    fn release(&mut self, reason: Reason, touch: bool, now: Instant) {
        if matches!(self.state, State::Ended | State::Released) {
            return;
        }
        if !touch {
            self.playing = [None, None];
            self.muted = false;
        }
        self.end_check(reason, now);
        if touch {
            self.mute(false);
        } else {
            self.out
                .retain(|c| matches!(c, Command::Idp(..) | Command::CheckDone { .. }));
        }
        self.disarm(Timer::AgentLegUp);
        self.emit(Command::Released);
        self.state = State::Released;
    }

    // ---- checks ----

    /// Ends the current check (if one runs) for `reason`; its `CheckDone` follows from its session,
    /// or at once when it had none yet.
    fn end_check(&mut self, reason: Reason, now: Instant) {
        let Some(check) = self.check.as_mut() else {
            return;
        };
        if check.entry == Entry::Done {
            return;
        }
        let gen = check.gen;
        let has_session = check.session.is_some();
        let collecting = matches!(check.entry, Entry::Prompting | Entry::Collecting);
        if collecting {
            self.disarm(Timer::FirstDigit);
            self.disarm(Timer::InterDigit);
            self.stop_prompt(Leg::Caller);
            self.mute(false);
        }
        if has_session {
            self.feed(gen, verify::Input::Cancel(reason), now);
        } else {
            self.check_done(Outcome::NotVerified(reason), None, now);
        }
        // A superseded session stays until it has told the provider everything.
        if let Some(c) = self.check.as_mut() {
            if c.entry == Entry::Done {
                if let Some(s) = c.session.take() {
                    if !s.is_quiescent() {
                        self.retiring.push((gen, s));
                    }
                }
            }
        }
    }

    fn on_caller_digit(&mut self, d: char, now: Instant) {
        let Some(check) = self.check.as_mut() else {
            return;
        };
        if !matches!(check.entry, Entry::Prompting | Entry::Collecting)
            || !matches!(d, '0'..='9' | '*' | '#')
        {
            return;
        }
        if check.entry == Entry::Prompting {
            check.entry = Entry::Collecting;
            self.stop_prompt(Leg::Caller);
        }
        let Some(check) = self.check.as_mut() else {
            return;
        };
        match d {
            '*' => {
                check.digits.clear();
                self.disarm(Timer::InterDigit);
                self.arm(Timer::FirstDigit, now + self.policy.first_digit_timeout);
            }
            '#' => self.submit(now),
            _ => {
                check.any_digit = true;
                check.digits.push(d);
                let full = check.digits.len() >= check.digits.max;
                self.disarm(Timer::FirstDigit);
                if full {
                    self.submit(now);
                } else {
                    self.arm(Timer::InterDigit, now + self.policy.inter_digit_timeout);
                }
            }
        }
    }

    fn on_agent_digit(&mut self, d: char, now: Instant) {
        let keys = &self.policy.agent_keys;
        if keys.is_empty() || self.state != State::Talking {
            return;
        }
        self.agent_keys.push(d);
        if self.agent_keys.len() > keys.len() {
            self.agent_keys.remove(0);
        }
        if self.agent_keys == *keys {
            self.agent_keys.clear();
            let _ = self.start_check(None, true, now);
        }
    }

    fn submit(&mut self, now: Instant) {
        self.disarm(Timer::FirstDigit);
        self.disarm(Timer::InterDigit);
        let Some(check) = self.check.as_mut() else {
            return;
        };
        let typed = check.digits.as_str().to_owned();
        check.digits.clear();
        if typed.is_empty() {
            self.entry_failed(false, now);
            return;
        }
        match self.parse_number(&typed) {
            Ok(number) => {
                self.mute(false);
                self.start_session(number, now);
            }
            Err(_) => self.entry_failed(true, now),
        }
    }

    fn entry_failed(&mut self, invalid: bool, now: Instant) {
        let max = self.policy.max_entry_attempts;
        let Some(check) = self.check.as_mut() else {
            return;
        };
        check.failures += 1;
        check.last_invalid = invalid;
        if check.failures >= max {
            let reason = if !check.any_digit {
                Reason::NoInput
            } else if check.last_invalid {
                Reason::InvalidNumber
            } else {
                Reason::TooManyAttempts
            };
            self.stop_prompt(Leg::Caller);
            self.mute(false);
            self.check_done(Outcome::NotVerified(reason), None, now);
            return;
        }
        check.entry = Entry::Prompting;
        let first = if invalid {
            PromptId::InvalidNumber
        } else {
            PromptId::NoInput
        };
        self.play(Leg::Caller, vec![first, PromptId::EnterNumber], now);
    }

    fn start_session(&mut self, number: PersonalNumber, now: Instant) {
        let Some(check) = self.check.as_mut() else {
            return;
        };
        check.entry = Entry::Verifying;
        let order = Order {
            number,
            initiator: self.info.initiator,
            text: self.policy.user_visible_text.clone(),
            pin_code: self.policy.pin_code,
        };
        let mut settings = self.settings.clone();
        settings.verify_timeout = self.policy.verify_timeout;
        let gen = check.gen;
        check.session = Some(Session::new(order, settings, now));
        self.drain(gen, now);
    }

    fn feed(&mut self, gen: u32, input: verify::Input, now: Instant) {
        let current = self
            .check
            .as_mut()
            .filter(|c| c.gen == gen)
            .and_then(|c| c.session.as_mut());
        if let Some(s) = current {
            s.handle(input, now);
            self.drain(gen, now);
            return;
        }
        if let Some(i) = self.retiring.iter().position(|(g, _)| *g == gen) {
            let (_, s) = &mut self.retiring[i];
            s.handle(input, now);
            let mut cmds = Vec::new();
            while let Some(c) = s.poll_command() {
                cmds.push(c);
            }
            for c in cmds {
                // A superseded check's progress and end were reported when it was superseded.
                if !matches!(
                    c,
                    verify::Command::Progress(_) | verify::Command::Finished(_)
                ) {
                    self.session_command(gen, c, now);
                }
            }
            self.retiring.retain(|(_, s)| !s.is_quiescent());
        }
    }

    fn drain(&mut self, gen: u32, now: Instant) {
        let mut cmds = Vec::new();
        if let Some(s) = self.check.as_mut().and_then(|c| c.session.as_mut()) {
            while let Some(c) = s.poll_command() {
                cmds.push(c);
            }
        }
        for c in cmds {
            self.session_command(gen, c, now);
        }
    }

    /// What a command of the session of check `gen` means for the call.
    fn session_command(&mut self, gen: u32, c: verify::Command, now: Instant) {
        match c {
            verify::Command::Start(o) => self.emit(Command::Idp(gen, IdpCommand::Start(o))),
            verify::Command::Poll(r) => self.emit(Command::Idp(gen, IdpCommand::Poll(r))),
            verify::Command::Cancel(r) => self.emit(Command::Idp(gen, IdpCommand::Cancel(r))),
            verify::Command::ArmTimer { timer, at } => self.arm(Timer::Verify(gen, timer), at),
            verify::Command::DisarmTimer(t) => self.disarm(Timer::Verify(gen, t)),
            verify::Command::Progress(stage) => self.on_progress(gen, stage, now),
            verify::Command::Finished(c) => self.check_done(c.outcome, c.identity, now),
        }
    }

    fn on_progress(&mut self, gen: u32, stage: Stage, now: Instant) {
        self.emit(Command::Progress { gen, stage });
        let keypad = self
            .check
            .as_ref()
            .is_some_and(|c| c.method == CheckMethod::Keypad && c.entry == Entry::Verifying);
        // The caller who typed on the keypad is told to open the app; when the agent typed the
        // number, the agent tells them.
        if stage == Stage::OrderCreated && keypad && self.state == State::Talking {
            self.play(Leg::Caller, vec![PromptId::OpenApp], now);
        }
    }

    fn check_done(&mut self, outcome: Outcome, identity: Option<Identity>, now: Instant) {
        let Some(check) = self.check.as_mut() else {
            return;
        };
        if check.entry == Entry::Done {
            return;
        }
        check.entry = Entry::Done;
        let by_agent_keys = check.by_agent_keys;
        let keypad = check.method == CheckMethod::Keypad;
        let gen = check.gen;
        self.emit(Command::CheckDone {
            gen,
            outcome,
            identity,
        });
        // Ended by us (a new check, the agent, a hang-up, shutdown): nothing to tell the agent.
        let ours = matches!(
            outcome.reason(),
            Some(
                Reason::Superseded
                    | Reason::AgentCancelled
                    | Reason::CallerHungUp
                    | Reason::Restart
                    | Reason::PbxLost
            )
        );
        if by_agent_keys && !ours && self.state == State::Talking {
            let prompt = match outcome.status() {
                Status::Verified => PromptId::AgentVerified,
                _ if outcome == Outcome::NotVerified(Reason::DeclinedCall) => PromptId::AgentFraud,
                _ => PromptId::AgentNotVerified,
            };
            self.play(Leg::Agent, vec![prompt], now);
        }
        // The caller who typed their number is told why nothing reaches their app.
        if keypad
            && outcome == Outcome::NotVerified(Reason::RateLimited)
            && self.state == State::Talking
        {
            self.play(Leg::Caller, vec![PromptId::RateLimited], now);
        }
    }

    // ---- timers and media ----

    fn on_timer(&mut self, t: Timer, now: Instant) {
        match t {
            Timer::AgentLegUp => {
                if self.state == State::Connecting {
                    let route = self.policy.no_agent_route().clone();
                    self.leave(Some((route, Leaving::NoAgent)), now);
                }
            }
            Timer::FirstDigit => {
                if self
                    .check
                    .as_ref()
                    .is_some_and(|c| c.entry == Entry::Collecting && c.digits.len() == 0)
                {
                    self.entry_failed(false, now);
                }
            }
            Timer::InterDigit => {
                let complete = self.check.as_ref().map(|c| {
                    (
                        c.entry == Entry::Collecting,
                        c.digits.is_complete(&self.policy),
                    )
                });
                match complete {
                    Some((true, true)) => self.submit(now),
                    Some((true, false)) => {
                        if let Some(c) = self.check.as_mut() {
                            c.digits.clear();
                        }
                        self.entry_failed(true, now);
                    }
                    _ => {}
                }
            }
            Timer::PromptGuard(leg) => {
                if let Some(id) = self.playing[slot(leg)] {
                    self.on_playback_ended(id, now);
                }
            }
            Timer::Verify(gen, vt) => self.feed(gen, verify::Input::Timer(vt), now),
        }
    }

    fn on_playback_ended(&mut self, id: PlaybackId, now: Instant) {
        let Some(leg) = [Leg::Caller, Leg::Agent]
            .into_iter()
            .find(|l| self.playing[slot(*l)] == Some(id))
        else {
            return;
        };
        self.playing[slot(leg)] = None;
        self.disarm(Timer::PromptGuard(leg));
        if leg == Leg::Caller {
            if let Some(c) = self.check.as_mut() {
                if c.entry == Entry::Prompting {
                    c.entry = Entry::Collecting;
                    self.arm(Timer::FirstDigit, now + self.policy.first_digit_timeout);
                }
            }
        }
    }

    fn play(&mut self, leg: Leg, prompts: Vec<PromptId>, now: Instant) {
        if matches!(self.state, State::Ended | State::Released) {
            return;
        }
        self.stop_prompt(leg);
        self.next_playback += 1;
        let id = PlaybackId(self.next_playback);
        let media = prompts
            .iter()
            .map(|p| self.policy.media_for(*p, self.lang))
            .collect();
        self.playing[slot(leg)] = Some(id);
        self.emit(Command::Play {
            leg,
            id,
            prompts,
            media,
            lang: self.lang,
        });
        self.arm(Timer::PromptGuard(leg), now + PROMPT_GUARD);
    }

    fn stop_prompt(&mut self, leg: Leg) {
        if let Some(id) = self.playing[slot(leg)].take() {
            self.emit(Command::StopPlayback(id));
            self.disarm(Timer::PromptGuard(leg));
        }
    }

    fn stop_prompts(&mut self) {
        self.stop_prompt(Leg::Caller);
        self.stop_prompt(Leg::Agent);
    }

    fn mute(&mut self, on: bool) {
        if self.muted != on {
            self.muted = on;
            self.emit(Command::MuteCaller(on));
        }
    }

    fn arm(&mut self, timer: Timer, at: Instant) {
        self.emit(Command::ArmTimer { timer, at });
    }

    fn disarm(&mut self, timer: Timer) {
        self.emit(Command::DisarmTimer(timer));
    }

    fn emit(&mut self, cmd: Command) {
        if matches!(self.state, State::Ended | State::Released)
            && !matches!(
                cmd,
                Command::Idp(_, IdpCommand::Cancel(_)) | Command::CheckDone { .. }
            )
        {
            return;
        }
        self.out.push_back(cmd);
    }
}

#[cfg(test)]
mod tests;
