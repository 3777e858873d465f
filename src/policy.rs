//! A queue's flow policy: the typed, validated shape that `config` produces and the core consumes.
//!
//! Invariant: pure data. Every value here has passed validation; the core never re-checks it and never
//! reads configuration itself. A call keeps the `Arc<QueuePolicy>` it started with across reloads.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::outcome::{Disclosure, Outcome, Reason, Status};
use crate::pnr::Kind;
use crate::prompts::{Language, PromptId};

/// The name of a queue as the dialplan passes it in `Stasis(callgate,inbound,<queue>)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(pub String);

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// When a queue verifies its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    BeforeAgent,
    DuringCall,
    Both,
}

impl Mode {
    pub fn code(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::BeforeAgent => "before_agent",
            Mode::DuringCall => "during_call",
            Mode::Both => "both",
        }
    }

    pub fn gates_before_agent(self) -> bool {
        matches!(self, Mode::BeforeAgent | Mode::Both)
    }

    /// The caller stays in Stasis for the whole call, bridged with the agent leg, so that checks can
    /// run during the conversation.
    pub fn anchors(self) -> bool {
        matches!(self, Mode::DuringCall | Mode::Both)
    }
}

/// A dialplan location `context,extension,priority`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub context: String,
    pub extension: String,
    pub priority: u32,
}

impl Route {
    /// Parses `context,extension,priority`; every part must be non-empty and free of spaces,
    /// and the priority a positive integer.
    pub fn parse(s: &str) -> Result<Route, String> {
        let parts: Vec<&str> = s.split(',').collect();
        let bad = || format!("{s:?} is not context,extension,priority");
        let [context, extension, priority] = parts.as_slice() else {
            return Err(bad());
        };
        let ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| !c.is_whitespace() && !matches!(c, ',' | '(' | ')' | '"'))
        };
        if !ok(context) || !ok(extension) {
            return Err(bad());
        }
        let priority: u32 = priority.parse().map_err(|_| bad())?;
        if priority == 0 {
            return Err(bad());
        }
        Ok(Route {
            context: (*context).to_owned(),
            extension: (*extension).to_owned(),
            priority,
        })
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.context, self.extension, self.priority)
    }
}

/// Where a call goes for each status; optional routes fall back as documented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    pub verified: Route,
    pub failed: Route,
    pub unavailable: Route,
    /// Default: `unavailable`.
    pub skipped: Option<Route>,
    /// Default: `unavailable`.
    pub interrupted: Option<Route>,
    /// During-call mode: the agent leg ended before an agent answered. Default: `unavailable`.
    pub no_agent: Option<Route>,
    /// During-call mode: where the caller goes when the agent hangs up first. Default: hang up.
    pub after_agent: Option<Route>,
    /// During-call mode: the agent context the agent leg is originated into.
    pub agent: Option<Route>,
}

/// Which prompt media to play, per prompt and language, when the catalogue default is not wanted.
pub type PromptOverrides = BTreeMap<(PromptId, Language), String>;

/// Everything a call needs to know about its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePolicy {
    pub name: QueueName,
    pub mode: Mode,
    /// Name of the identity provider (a key of `[idp]`).
    pub idp: String,
    /// Non-empty; the first is the default.
    pub languages: Vec<Language>,
    pub max_entry_attempts: u32,
    pub max_orders: u32,
    pub first_digit_timeout: Duration,
    pub inter_digit_timeout: Duration,
    pub verify_timeout: Duration,
    pub gate_deadline: Duration,
    /// Number kinds accepted from the keypad. Non-empty.
    pub accept_kinds: Vec<Kind>,
    /// Accept a 10-digit Swedish number (century inferred, age under 100).
    pub accept_10_digits: bool,
    /// Text shown in the BankID app (`userVisibleData`).
    pub user_visible_text: Option<String>,
    /// Force PIN instead of biometrics in the app.
    pub pin_code: bool,
    /// Play short prompts on progress (confirm the call, identify) while holding.
    pub progress_prompts: bool,
    /// Play the outcome prompt before routing.
    pub announce_outcome: bool,
    /// Music-on-hold class (empty = the channel's default).
    pub moh_class: String,
    pub disclose: Disclosure,
    pub prompts: PromptOverrides,
    pub routes: Routes,
    pub routes_by_reason: BTreeMap<Reason, Route>,
    /// Anchored calls: the keys an agent presses on their own phone to start a keypad check (e.g.
    /// `*5`); empty = off.
    pub agent_keys: String,
}

impl QueuePolicy {
    /// The route for an outcome: `routes_by_reason` first, then the status route and its fallback.
    pub fn route_for(&self, outcome: Outcome) -> &Route {
        if let Some(route) = outcome.reason().and_then(|r| self.routes_by_reason.get(&r)) {
            return route;
        }
        let r = &self.routes;
        match outcome.status() {
            Status::Verified => &r.verified,
            Status::Failed => &r.failed,
            Status::Unavailable => &r.unavailable,
            Status::Skipped => r.skipped.as_ref().unwrap_or(&r.unavailable),
            Status::Interrupted => r.interrupted.as_ref().unwrap_or(&r.unavailable),
        }
    }

    /// Whether a call that ended the gate with this outcome goes on to the agent in its bridge
    /// (anchored modes) rather than to the outcome's route: every outcome does, except a reason with
    /// its own route in `routes_by_reason` (e.g. `declined_call` to a fraud desk).
    pub fn anchors_after(&self, outcome: Outcome) -> bool {
        self.mode.anchors()
            && self.routes.agent.is_some()
            && outcome
                .reason()
                .is_none_or(|r| !self.routes_by_reason.contains_key(&r))
    }

    /// Where the caller goes when the agent leg ended before an agent answered.
    pub fn no_agent_route(&self) -> &Route {
        self.routes
            .no_agent
            .as_ref()
            .unwrap_or(&self.routes.unavailable)
    }

    /// The language for a channel: its own if the queue offers it, else the queue's first.
    pub fn language_for(&self, channel_language: &str) -> Language {
        Language::from_code(channel_language)
            .filter(|l| self.languages.contains(l))
            .or_else(|| self.languages.first().copied())
            .unwrap_or(Language::Sv)
    }

    /// Media for a prompt in a language: an override if configured, else the catalogue's.
    pub fn media_for(&self, prompt: PromptId, lang: Language) -> String {
        self.prompts
            .get(&(prompt, lang))
            .cloned()
            .unwrap_or_else(|| prompt.default_media())
    }

    /// A policy with the documented defaults and the given routes; used by `[defaults]`, tests and the demo.
    pub fn with_defaults(name: &str, idp: &str, routes: Routes) -> QueuePolicy {
        QueuePolicy {
            name: QueueName(name.to_owned()),
            mode: Mode::BeforeAgent,
            idp: idp.to_owned(),
            languages: vec![Language::Sv, Language::En],
            max_entry_attempts: 3,
            max_orders: 2,
            first_digit_timeout: Duration::from_secs(8),
            inter_digit_timeout: Duration::from_secs(5),
            verify_timeout: Duration::from_secs(120),
            gate_deadline: Duration::from_secs(300),
            accept_kinds: vec![Kind::SePersonnummer, Kind::SeSamordningsnummer],
            accept_10_digits: false,
            user_visible_text: None,
            pin_code: false,
            progress_prompts: true,
            announce_outcome: true,
            moh_class: String::new(),
            disclose: Disclosure::status_only(),
            prompts: PromptOverrides::new(),
            routes,
            routes_by_reason: BTreeMap::new(),
            agent_keys: String::new(),
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn route(s: &str) -> Route {
        Route::parse(s).unwrap()
    }

    pub fn routes() -> Routes {
        Routes {
            verified: route("queues,support,1"),
            failed: route("queues,support-unverified,1"),
            unavailable: route("queues,support-fallback,1"),
            skipped: None,
            interrupted: None,
            no_agent: None,
            after_agent: None,
            agent: None,
        }
    }

    pub fn policy() -> QueuePolicy {
        QueuePolicy::with_defaults("support", "bankid", routes())
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn routes_parse_and_reject() {
        assert_eq!(route("queues,support,1").to_string(), "queues,support,1");
        for bad in ["queues,x", "a,b,0", "a,b,c", ",b,1", "a b,c,1", "a,b,1,2"] {
            let err = Route::parse(bad).unwrap_err();
            assert!(
                err.contains("is not context,extension,priority"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn route_by_reason_wins_then_status_then_fallback() {
        let mut p = policy();
        p.routes_by_reason
            .insert(Reason::DeclinedCall, route("queues,fraud-desk,1"));
        assert_eq!(
            p.route_for(Outcome::NotVerified(Reason::DeclinedCall))
                .extension,
            "fraud-desk"
        );
        assert_eq!(
            p.route_for(Outcome::NotVerified(Reason::UserCancelled))
                .extension,
            "support-unverified"
        );
        assert_eq!(p.route_for(Outcome::Verified).extension, "support");
        assert_eq!(
            p.route_for(Outcome::NotVerified(Reason::Restart)).extension,
            "support-fallback"
        );
        assert_eq!(
            p.route_for(Outcome::NotVerified(Reason::NotGated))
                .extension,
            "support-fallback"
        );
    }

    #[test]
    fn language_is_the_channels_if_offered() {
        let p = policy();
        assert_eq!(p.language_for("en"), Language::En);
        assert_eq!(p.language_for("nb"), Language::Sv);
        assert_eq!(p.language_for(""), Language::Sv);
    }
}
