//! Calls in progress: one task per call (the only place where the sans-IO core meets I/O), the registry
//! of call handles, and abuse limits on identity-provider orders.
//!
//! Invariants: a call's mutable state lives only inside its task; the registry holds handles (inbox,
//! snapshot receiver, cancellation token) and never a lock across an await. Adapters reach a call only
//! through its bounded inbox.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::outcome::Outcome;
use crate::policy::Route;
use crate::prompts::Language;
use crate::verify::Stage;

pub mod journal;
pub mod limits;
pub mod live;
pub mod registry;
pub mod task;

pub use live::Live;
pub use registry::Registry;

/// A boxed future for object-safe adapter traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that happened to a call, routed to its task by the PBX adapter or the API.
#[derive(Debug)]
pub enum CallEvent {
    Dtmf(char),
    /// A playback of ours ended (done, stopped or failed); the id is the PBX playback id we chose.
    PlaybackEnded(String),
    /// The caller hung up or the channel left our control.
    Hangup,
    /// The link to the PBX dropped: events may be lost until `Resync`.
    LinkDown,
    /// Events may have been lost (PBX reconnect): resume from a safe point.
    Resync,
    /// Another instance owns the PBX application now: end without touching the call.
    Detach,
    /// Anchored calls: the agent leg entered our application.
    AgentLegUp,
    /// Anchored calls: the queue connected an agent (its interface).
    AgentAnswered(String),
    /// Anchored calls: the agent leg ended.
    AgentLegEnded,
    /// Anchored calls: a key from the agent leg.
    AgentDtmf(char),
    /// A newer order of ours for the same person replaces this call's order.
    Superseded,
    /// The agent API asks for a mid-call check.
    StartCheck(live::CheckRequest),
    /// The agent API cancels the check in progress.
    CancelCheck(live::CancelRequest),
}

/// Why a PBX request failed, as far as the call is concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The channel is gone or no longer ours (ARI 404/409).
    #[error("channel gone")]
    Gone,
    #[error("pbx request failed: {0}")]
    Failed(String),
}

/// Where a concluded call went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Continued at this dialplan location.
    Route(Route),
    /// No usable route existed: continued at the next priority after `Stasis()` (the dialplan's safety net).
    NextPriority,
    /// No dialplan location was known to continue at: the call was hung up.
    HungUp,
    /// The channel was gone.
    Gone,
    /// Kept in our application and bridged with an agent leg (anchored modes).
    Agent,
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Route(r) => write!(f, "{r}"),
            Destination::NextPriority => f.write_str("next priority"),
            Destination::HungUp => f.write_str("hung up"),
            Destination::Gone => f.write_str("-"),
            Destination::Agent => f.write_str("agent"),
        }
    }
}

/// Per-call PBX operations, implemented by each PBX adapter for one channel.
pub trait CallControl: AnchorControl {
    fn answer(&self) -> BoxFuture<'_, Result<(), ControlError>>;
    /// Play `media` in order as one playback with our own `playback_id`.
    fn play<'a>(
        &'a self,
        playback_id: &'a str,
        media: &'a [String],
        lang: Language,
    ) -> BoxFuture<'a, Result<(), ControlError>>;
    fn stop_playback<'a>(&'a self, playback_id: &'a str)
        -> BoxFuture<'a, Result<(), ControlError>>;
    /// Whether our playback still runs (`false` once it has ended, however).
    fn playback_running<'a>(
        &'a self,
        playback_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, ControlError>>;
    fn start_moh<'a>(&'a self, class: &'a str) -> BoxFuture<'a, Result<(), ControlError>>;
    fn stop_moh(&self) -> BoxFuture<'_, Result<(), ControlError>>;
    /// Sets the call metadata (inheritable), clears the dialplan's safety-net timeout, checks that the
    /// route exists (else `fallback`, else the next priority) and continues the call there.
    fn conclude<'a>(
        &'a self,
        vars: &'a [(&'static str, String)],
        route: &'a Route,
        fallback: &'a Route,
    ) -> BoxFuture<'a, Result<Destination, ControlError>>;
}

fn unsupported<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T, ControlError>> {
    Box::pin(async { Err(ControlError::Failed("not supported by this pbx".to_owned())) })
}

/// PBX operations of an anchored call (caller in a bridge with an agent leg for the whole call).
/// The ids of the bridge and of the agent leg derive from the call's, so they can be found again
/// after a restart. Adapters without anchoring keep the defaults, which fail.
pub trait AnchorControl: Send + Sync + 'static {
    /// Sets `vars` (the gate's result, inheritable) and clears the dialplan's safety-net timeout,
    /// without leaving our application.
    fn keep<'a>(
        &'a self,
        vars: &'a [(&'static str, String)],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        let _ = vars;
        unsupported()
    }
    /// Answers the caller if needed, creates the call's bridge, adds the caller (keys absorbed) and
    /// originates the agent leg into `agent` with `vars` (inheritable) on it.
    fn anchor<'a>(
        &'a self,
        agent: &'a Route,
        vars: &'a [(&'static str, String)],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        let _ = (agent, vars);
        unsupported()
    }
    fn add_agent_leg(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        unsupported()
    }
    fn hangup_agent_leg(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        unsupported()
    }
    fn destroy_bridge(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        unsupported()
    }
    fn mute_caller(&self, on: bool) -> BoxFuture<'_, Result<(), ControlError>> {
        let _ = on;
        unsupported()
    }
    /// Plays to the agent leg only.
    fn play_to_agent<'a>(
        &'a self,
        playback_id: &'a str,
        media: &'a [String],
        lang: Language,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        let _ = (playback_id, media, lang);
        unsupported()
    }
    /// Sets a check's result on the caller (inheritable) and on the agent leg.
    fn set_result<'a>(
        &'a self,
        vars: &'a [(&'static str, String)],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        let _ = vars;
        unsupported()
    }
    fn hangup_caller(&self) -> BoxFuture<'_, Result<(), ControlError>> {
        unsupported()
    }
    /// Other ids a CRM may know the call by (the PBX's linked id, the agent leg).
    fn aliases(&self) -> BoxFuture<'_, Result<Vec<String>, ControlError>> {
        unsupported()
    }
}

/// A read-only view of a call for the API, the demo and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub call_id: String,
    pub queue: String,
    pub reference: String,
    pub stage: Option<Stage>,
    pub outcome: Option<Outcome>,
    pub started_at: SystemTime,
}

/// How a call ended, as reported by its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub call_id: String,
    pub queue: String,
    pub reference: String,
    pub outcome: Outcome,
    /// Every stage the verification passed through, in order.
    pub stages: Vec<Stage>,
    pub destination: Destination,
    pub duration: Duration,
}
