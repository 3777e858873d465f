//! `calls::Live`: what the agent API and the live stream see of calls in progress and of the checks
//! made on them.
//!
//! Call tasks publish; the API reads and subscribes. Every identity field here has passed through the
//! queue's disclosure renderer (`outcome::render`) before it was published: nothing in this module
//! can hold a personal number the policy does not allow.
//!
//! Invariants: a call's view is replaced as a whole by its task (never patched by readers); a call's
//! entry is removed when it ends; a finished verification stays readable by id for `keep` after its
//! call ended (the audit trail keeps the record for good); the broadcast channel is bounded (a slow
//! subscriber misses events and is told so, then gets the current state again).

use std::fmt;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::sync::{broadcast, oneshot};

pub use super::limits::Limit;
pub use crate::dialog::anchor::{CheckMethod, Refusal};
use crate::outcome::{Outcome, Reason, Status};
use crate::verify::Stage;

/// How many events a subscriber may fall behind before it misses some.
const CHANNEL: usize = 1024;

/// Where an anchored call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// In the before-agent gate.
    Gate,
    /// In its bridge; the agent leg is being set up or the queue is looking for an agent.
    WaitingForAgent,
    /// An agent answered.
    Talking,
    /// The call ended (hang-up or routed on); the last event of a call carries this.
    Ended,
}

impl CallState {
    pub fn code(self) -> &'static str {
        match self {
            CallState::Gate => "gate",
            CallState::WaitingForAgent => "waiting_for_agent",
            CallState::Talking => "talking",
            CallState::Ended => "ended",
        }
    }
}

/// Who started a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartedBy {
    /// The before-agent gate.
    Gate,
    /// An API client: the name of its token (`[api.tokens.<name>]`).
    Api(String),
    /// The agent pressed the queue's key sequence on their phone.
    AgentKeys,
    /// A hosted switchboard's IVR (`[switchboards.<name>]`), through the request-node API.
    Switchboard(String),
}

impl fmt::Display for StartedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartedBy::Gate => f.write_str("gate"),
            StartedBy::Api(name) => write!(f, "api:{name}"),
            StartedBy::AgentKeys => f.write_str("agent_keys"),
            StartedBy::Switchboard(name) => write!(f, "switchboard:{name}"),
        }
    }
}

/// One identity check as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationView {
    /// Also `CALLGATE_REF` on the channels.
    pub id: String,
    pub call_id: String,
    pub queue: String,
    pub idp: String,
    pub method: CheckMethod,
    pub started_by: StartedBy,
    pub started_at: SystemTime,
    pub ended_at: Option<SystemTime>,
    /// The stages reached, with when.
    pub stages: Vec<(Stage, SystemTime)>,
    /// `Some` once the check is over.
    pub outcome: Option<Outcome>,
    /// The record rendered through the queue's disclosure policy (`outcome::render`): the variable
    /// names without the `CALLGATE_` prefix, lower case (`status`, `reason`, `ref`, `method`, `at`, and
    /// only what the policy allows of `name`, `pseudonym`, `number_masked`, `number`). Empty until
    /// the check is over.
    pub fields: Vec<(String, String)>,
    /// The abuse limit that refused the check's order (its reason is then `rate_limited` or
    /// `provider_busy`).
    pub limit: Option<Limit>,
    /// Words the agent reads to the caller so they pick the right request in their app (CIBA word pair).
    pub word_pair: Option<String>,
}

impl VerificationView {
    /// The current stage (the last one reached).
    pub fn stage(&self) -> Option<Stage> {
        self.stages.last().map(|(s, _)| *s)
    }

    pub fn is_over(&self) -> bool {
        self.outcome.is_some()
    }
}

/// One call as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallView {
    /// callgate's call id: the caller's channel id.
    pub call_id: String,
    pub queue: String,
    pub state: CallState,
    /// The agent's interface as the queue reports it (`MEMBERINTERFACE`, e.g. `PJSIP/1001`), once an
    /// agent answered.
    pub agent: Option<String>,
    /// Other ids a CRM may know the call by: the Asterisk linkedid, the agent leg's channel ids.
    pub aliases: Vec<String>,
    pub started_at: SystemTime,
    /// Whether a mid-call check can be started on it now (anchored, caller present).
    pub can_verify: bool,
    /// The current or last check of this call.
    pub verification: Option<VerificationView>,
    /// Whether callgate can collect a number on the caller's keypad (it handles the call's audio:
    /// an Asterisk call; not a hosted switchboard's).
    pub keypad: bool,
    /// With shared state (`[state] kind = "redis"`): the instance whose task owns the call. `None`
    /// with state in memory.
    pub owner: Option<Owner>,
}

/// The instance owning a call, when several share their state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Its `state.instance_id`.
    pub instance: String,
    /// Its heartbeat stopped: the call is no longer followed (its PBX's dialplan routes the caller).
    pub lost: bool,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveKind {
    CallStarted,
    AgentConnected,
    /// A check started or passed a stage.
    Progress,
    /// A check ended; `Fraud` follows for `declined_call`.
    Completed,
    /// The person said in their app that they are not on a call with us: someone else is calling in
    /// their name.
    Fraud,
    CallEnded,
    /// The instance owning the call stopped beating (several instances only).
    InstanceLost,
}

impl LiveKind {
    pub const ALL: [LiveKind; 7] = [
        LiveKind::CallStarted,
        LiveKind::AgentConnected,
        LiveKind::Progress,
        LiveKind::Completed,
        LiveKind::Fraud,
        LiveKind::CallEnded,
        LiveKind::InstanceLost,
    ];

    pub fn from_code(code: &str) -> Option<LiveKind> {
        LiveKind::ALL.into_iter().find(|k| k.code() == code)
    }

    pub fn code(self) -> &'static str {
        match self {
            LiveKind::CallStarted => "call_started",
            LiveKind::AgentConnected => "agent_connected",
            LiveKind::Progress => "verification_progress",
            LiveKind::Completed => "verification_completed",
            LiveKind::Fraud => "fraud_warning",
            LiveKind::CallEnded => "call_ended",
            LiveKind::InstanceLost => "instance_lost",
        }
    }
}

/// An event of the live stream: what happened, and the call's whole view after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEvent {
    pub kind: LiveKind,
    pub call: CallView,
}

/// A verification as kept by [`Live`].
#[derive(Debug, Clone)]
struct Kept {
    view: VerificationView,
    /// The agent of its call when it was last published (an agent may read only checks of its calls).
    agent: Option<String>,
    /// Once its call ended: when it may be forgotten.
    expiry: Option<tokio::time::Instant>,
}

/// The live view of one process.
#[derive(Debug)]
pub struct Live {
    calls: DashMap<String, CallView>,
    /// Alias → call id.
    aliases: DashMap<String, String>,
    /// Verification id → what is kept of it.
    verifications: DashMap<String, Kept>,
    keep: Duration,
    tx: broadcast::Sender<LiveEvent>,
    /// With shared state: this instance's id, stamped on the calls it publishes.
    instance: Option<String>,
}

impl Live {
    /// `keep`: how long a verification stays readable by id after its call ended.
    pub fn new(keep: Duration) -> Live {
        let (tx, _) = broadcast::channel(CHANNEL);
        Live {
            calls: DashMap::new(),
            aliases: DashMap::new(),
            verifications: DashMap::new(),
            keep,
            tx,
            instance: None,
        }
    }

    /// A view that also holds other instances' calls: this process's own calls are stamped with
    /// `instance` as their owner.
    pub fn with_instance(keep: Duration, instance: &str) -> Live {
        Live {
            instance: Some(instance.to_owned()),
            ..Live::new(keep)
        }
    }

    /// This instance's id, with shared state.
    pub fn instance(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    /// Whether a call is owned by this process (always so with state in memory).
    pub fn is_local(&self, call: &CallView) -> bool {
        match (&call.owner, &self.instance) {
            (None, _) | (_, None) => true,
            (Some(o), Some(me)) => &o.instance == me,
        }
    }

    /// The calls other instances own that are known here.
    pub fn remote_calls(&self) -> Vec<CallView> {
        self.calls()
            .into_iter()
            .filter(|c| !self.is_local(c))
            .collect()
    }

    /// An instance stopped beating: its calls here are marked lost (each announced once).
    pub fn mark_lost(&self, instance: &str) {
        let lost: Vec<CallView> = self
            .calls
            .iter()
            .filter(|c| {
                c.owner
                    .as_ref()
                    .is_some_and(|o| o.instance == instance && !o.lost)
            })
            .map(|c| c.clone())
            .collect();
        for mut call in lost {
            if let Some(o) = &mut call.owner {
                o.lost = true;
            }
            self.publish(LiveKind::InstanceLost, call);
        }
    }

    /// Forgets a call another instance owned (its snapshot is gone): announced as ended.
    pub fn forget_remote(&self, call_id: &str) {
        let Some(mut call) = self.calls.get(call_id).map(|c| c.clone()) else {
            return;
        };
        if self.is_local(&call) {
            return;
        }
        call.state = CallState::Ended;
        self.publish(LiveKind::CallEnded, call);
    }

    /// Publishes a call's new view (its task is the only writer).
    pub fn publish(&self, kind: LiveKind, mut call: CallView) {
        let now = instant_now();
        if call.owner.is_none() {
            if let Some(me) = &self.instance {
                call.owner = Some(Owner {
                    instance: me.clone(),
                    lost: false,
                });
            }
        }
        for alias in &call.aliases {
            self.aliases.insert(alias.clone(), call.call_id.clone());
        }
        if let Some(v) = &call.verification {
            let expiry = (call.state == CallState::Ended).then(|| now + self.keep);
            let agent = call
                .agent
                .clone()
                .or_else(|| self.verifications.get(&v.id).and_then(|k| k.agent.clone()));
            self.verifications.insert(
                v.id.clone(),
                Kept {
                    view: v.clone(),
                    agent,
                    expiry,
                },
            );
        }
        if call.state == CallState::Ended {
            self.calls.remove(&call.call_id);
            for alias in &call.aliases {
                self.aliases.remove(alias);
            }
            // The call's earlier checks may be forgotten after `keep` too.
            for mut e in self.verifications.iter_mut() {
                if e.view.call_id == call.call_id && e.expiry.is_none() {
                    e.expiry = Some(now + self.keep);
                }
            }
            self.verifications
                .retain(|_, k| k.expiry.is_none_or(|at| at > now));
        } else {
            self.calls.insert(call.call_id.clone(), call.clone());
        }
        let fraud = kind == LiveKind::Completed
            && call
                .verification
                .as_ref()
                .and_then(|v| v.outcome)
                .is_some_and(|o| o == Outcome::NotVerified(Reason::DeclinedCall));
        let _ = self.tx.send(LiveEvent {
            kind,
            call: call.clone(),
        });
        if fraud {
            let _ = self.tx.send(LiveEvent {
                kind: LiveKind::Fraud,
                call,
            });
        }
    }

    /// A call by its id or one of its aliases.
    pub fn call(&self, id: &str) -> Option<CallView> {
        if let Some(c) = self.calls.get(id) {
            return Some(c.clone());
        }
        let target = self.aliases.get(id).map(|a| a.clone())?;
        self.calls.get(&target).map(|c| c.clone())
    }

    /// The call id behind an id or alias, if the call is live.
    pub fn resolve(&self, id: &str) -> Option<String> {
        self.call(id).map(|c| c.call_id)
    }

    /// Every live call.
    pub fn calls(&self) -> Vec<CallView> {
        let mut all: Vec<CallView> = self.calls.iter().map(|c| c.clone()).collect();
        all.sort_by_key(|c| c.started_at);
        all
    }

    /// A verification by id: live, or ended less than `keep` ago.
    pub fn verification(&self, id: &str) -> Option<VerificationView> {
        self.verification_with_agent(id).map(|(v, _)| v)
    }

    /// A verification by id (as [`Live::verification`]) and the agent its call had when it was last
    /// published, if any.
    pub fn verification_with_agent(&self, id: &str) -> Option<(VerificationView, Option<String>)> {
        let now = instant_now();
        self.verifications
            .get(id)
            .filter(|k| k.expiry.is_none_or(|at| at > now))
            .map(|k| (k.view.clone(), k.agent.clone()))
    }

    /// Events from now on. Read the current state ([`Live::calls`]) after subscribing, so nothing
    /// falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }
}

impl Default for Live {
    fn default() -> Live {
        Live::new(Duration::from_secs(3600))
    }
}

#[allow(clippy::disallowed_methods)] // expiry of kept verifications, an adapter-side cache
fn instant_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// A number as typed by an agent, on its way to the call task that parses it. `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct TypedNumber(pub String);

impl fmt::Debug for TypedNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TypedNumber(<{} redacted>)", self.0.len())
    }
}

/// A request to start a check on a live call.
#[derive(Debug)]
pub struct CheckRequest {
    pub by: StartedBy,
    /// `None`: collect it from the caller's keypad.
    pub number: Option<TypedNumber>,
    /// The new verification's id, or why not. A check in progress is superseded.
    pub reply: oneshot::Sender<Result<String, Refusal>>,
}

/// A request to cancel the check in progress (`agent_cancelled`).
#[derive(Debug)]
pub struct CancelRequest {
    pub by: StartedBy,
    /// The cancelled verification's id, or why not.
    pub reply: oneshot::Sender<Result<String, Refusal>>,
}

/// Whether an outcome is a fraud signal for agents (also used by the stream to flag it).
pub fn is_fraud(outcome: Outcome) -> bool {
    outcome == Outcome::NotVerified(Reason::DeclinedCall)
}

/// Whether an outcome counts as verified.
pub fn is_verified(outcome: Outcome) -> bool {
    outcome.status() == Status::Verified
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, state: CallState, v: Option<VerificationView>) -> CallView {
        CallView {
            call_id: id.to_owned(),
            queue: "support".to_owned(),
            state,
            agent: None,
            aliases: vec![format!("{id}-linked")],
            started_at: SystemTime::UNIX_EPOCH,
            can_verify: true,
            verification: v,
            keypad: true,
            owner: None,
        }
    }

    fn check(id: &str, call: &str, outcome: Option<Outcome>) -> VerificationView {
        VerificationView {
            id: id.to_owned(),
            call_id: call.to_owned(),
            queue: "support".to_owned(),
            idp: "bankid".to_owned(),
            method: CheckMethod::Keypad,
            started_by: StartedBy::AgentKeys,
            started_at: SystemTime::UNIX_EPOCH,
            ended_at: None,
            stages: Vec::new(),
            outcome,
            fields: Vec::new(),
            limit: None,
            word_pair: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_by_alias_verifications_kept_after_the_call() {
        let live = Live::new(Duration::from_secs(60));
        let mut rx = live.subscribe();
        live.publish(
            LiveKind::CallStarted,
            view("c1", CallState::WaitingForAgent, None),
        );
        assert_eq!(live.call("c1-linked").unwrap().call_id, "c1");
        let declined = Outcome::NotVerified(Reason::DeclinedCall);
        live.publish(
            LiveKind::Completed,
            view(
                "c1",
                CallState::Talking,
                Some(check("v1", "c1", Some(declined))),
            ),
        );
        live.publish(
            LiveKind::CallEnded,
            view(
                "c1",
                CallState::Ended,
                Some(check("v1", "c1", Some(declined))),
            ),
        );
        let kinds: Vec<LiveKind> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                LiveKind::CallStarted,
                LiveKind::Completed,
                LiveKind::Fraud,
                LiveKind::CallEnded
            ]
        );
        assert!(live.call("c1").is_none() && live.call("c1-linked").is_none());
        assert!(live.verification("v1").is_some());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(live.verification("v1").is_none());
    }
}
