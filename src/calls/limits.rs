//! Abuse limits on identity-provider orders, so callgate cannot be used to flood someone's BankID app
//! ("push bombing") or to overload a provider: one live order per person; sliding-window starts per
//! person, per caller line and per agent (an hour) and per queue (a minute); a cool-down for a person
//! after they declined a call in their app; and caps on concurrent orders, per provider and overall.
//!
//! Invariants: persons are keyed by pseudonym (HMAC), never by number; caller lines by a hash. A
//! refused start records nothing (it uses up no window); the clock is an argument, never read here;
//! keys whose windows emptied are swept every few hundred starts, so memory follows recent traffic.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use dashmap::DashMap;

use crate::config::OnUnavailable;
use crate::outcome::Reason;
use crate::state::limits::Acquired;
use crate::state::Shared;

/// Limit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub max_concurrent_orders: usize,
    /// Each provider separately; the global cap applies as well.
    pub max_concurrent_orders_per_idp: usize,
    pub max_starts_per_number_per_hour: u32,
    pub max_starts_per_line_per_hour: u32,
    /// Starts of checks during the call one agent may make per hour.
    pub max_checks_per_agent_per_hour: u32,
    pub max_starts_per_queue_per_minute: u32,
    /// No new order for a person for this long after they declined a call; zero turns it off.
    pub declined_cool_down: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_concurrent_orders: 200,
            max_concurrent_orders_per_idp: 100,
            max_starts_per_number_per_hour: 6,
            max_starts_per_line_per_hour: 10,
            max_checks_per_agent_per_hour: 20,
            max_starts_per_queue_per_minute: 60,
            declined_cool_down: Duration::from_secs(30 * 60),
        }
    }
}

/// Which limit refused a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    PerNumber,
    PerLine,
    PerAgent,
    PerQueue,
    CoolDown,
    PerIdp,
    Concurrent,
    /// Several instances: the shared state (Redis) could not be reached and `state.on_unavailable`
    /// is `refuse`.
    SharedState,
}

impl Limit {
    pub const ALL: [Limit; 8] = [
        Limit::PerNumber,
        Limit::PerLine,
        Limit::PerAgent,
        Limit::PerQueue,
        Limit::CoolDown,
        Limit::PerIdp,
        Limit::Concurrent,
        Limit::SharedState,
    ];

    pub fn from_code(code: &str) -> Option<Limit> {
        Limit::ALL.into_iter().find(|l| l.code() == code)
    }

    /// Stable code, shown to the agent as the verification's `limit`.
    pub fn code(self) -> &'static str {
        match self {
            Limit::PerNumber => "per_number",
            Limit::PerLine => "per_line",
            Limit::PerAgent => "per_agent",
            Limit::PerQueue => "per_queue",
            Limit::CoolDown => "cool_down",
            Limit::PerIdp => "per_idp",
            Limit::Concurrent => "concurrent",
            Limit::SharedState => "shared_state",
        }
    }

    /// How the refused check ends: `rate_limited` for limits on who asks, `provider_busy` for
    /// capacity caps.
    pub fn reason(self) -> Reason {
        match self {
            Limit::PerIdp | Limit::Concurrent | Limit::SharedState => Reason::ProviderBusy,
            _ => Reason::RateLimited,
        }
    }
}

/// One request to start an order.
#[derive(Debug, Clone, Copy)]
pub struct Start<'a> {
    /// The person's pseudonym.
    pub person: &'a str,
    /// The hashed caller line; empty when unknown.
    pub line: &'a str,
    pub call: &'a str,
    pub queue: &'a str,
    pub idp: &'a str,
    /// For a check started during the call: the agent it counts for (their interface, or the API
    /// token's name when the call has no agent). `None` for the gate.
    pub agent: Option<&'a str>,
}

/// A granted start. The caller must `release` it when the order is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Another call of ours with a live order for the same person: it must be superseded.
    pub supersede: Option<String>,
}

#[derive(Debug, Default)]
pub struct Limits {
    settings: Settings,
    /// person → (call, idp) holding the person's live order.
    live: DashMap<String, (String, String)>,
    per_person: DashMap<String, VecDeque<Instant>>,
    per_line: DashMap<String, VecDeque<Instant>>,
    per_agent: DashMap<String, VecDeque<Instant>>,
    per_queue: DashMap<String, VecDeque<Instant>>,
    /// person → until when they are cooling down.
    cool_down: DashMap<String, Instant>,
    per_idp: DashMap<String, usize>,
    concurrent: AtomicUsize,
    /// Starts asked for, to sweep keys that left their windows now and then.
    asked: AtomicUsize,
}

/// Every this many starts asked for, keys whose windows are empty are dropped.
const SWEEP_EVERY: usize = 256;

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

impl Limits {
    pub fn new(settings: Settings) -> Limits {
        Limits {
            settings,
            ..Limits::default()
        }
    }

    /// Asks to start an order; which limit refused it otherwise.
    pub fn acquire(&self, s: Start<'_>, now: Instant) -> Result<Grant, Limit> {
        if self.asked.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep(now);
        }
        let set = &self.settings;
        self.cool_down.remove_if(s.person, |_, until| now >= *until);
        if self.cool_down.contains_key(s.person) {
            return Err(Limit::CoolDown);
        }
        if !within(
            &self.per_person,
            s.person,
            set.max_starts_per_number_per_hour,
            HOUR,
            now,
        ) {
            return Err(Limit::PerNumber);
        }
        if !s.line.is_empty()
            && !within(
                &self.per_line,
                s.line,
                set.max_starts_per_line_per_hour,
                HOUR,
                now,
            )
        {
            return Err(Limit::PerLine);
        }
        if let Some(agent) = s.agent {
            if !within(
                &self.per_agent,
                agent,
                set.max_checks_per_agent_per_hour,
                HOUR,
                now,
            ) {
                return Err(Limit::PerAgent);
            }
        }
        if !within(
            &self.per_queue,
            s.queue,
            set.max_starts_per_queue_per_minute,
            MINUTE,
            now,
        ) {
            return Err(Limit::PerQueue);
        }
        let previous = self
            .live
            .insert(s.person.to_owned(), (s.call.to_owned(), s.idp.to_owned()));
        let supersede = match previous {
            Some((call, idp)) if call != s.call => {
                // The older call's slot passes to this one (its release will find it gone).
                if idp != s.idp {
                    if let Err(limit) = self.idp_add(s.idp) {
                        self.live.insert(s.person.to_owned(), (call, idp));
                        return Err(limit);
                    }
                    self.idp_sub(&idp);
                }
                Some(call)
            }
            Some(_) => None,
            None => {
                let n = self.concurrent.fetch_add(1, Ordering::SeqCst);
                if n >= set.max_concurrent_orders {
                    self.concurrent.fetch_sub(1, Ordering::SeqCst);
                    self.live.remove(s.person);
                    return Err(Limit::Concurrent);
                }
                if let Err(limit) = self.idp_add(s.idp) {
                    self.concurrent.fetch_sub(1, Ordering::SeqCst);
                    self.live.remove(s.person);
                    return Err(limit);
                }
                None
            }
        };
        record(&self.per_person, s.person, now);
        if !s.line.is_empty() {
            record(&self.per_line, s.line, now);
        }
        if let Some(agent) = s.agent {
            record(&self.per_agent, agent, now);
        }
        record(&self.per_queue, s.queue, now);
        Ok(Grant { supersede })
    }

    /// Takes one slot of the concurrency caps (overall and at `idp`) for an order whose other limits
    /// were decided elsewhere (the shared state).
    pub fn capacity_take(&self, idp: &str) -> Result<(), Limit> {
        let n = self.concurrent.fetch_add(1, Ordering::SeqCst);
        if n >= self.settings.max_concurrent_orders {
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
            return Err(Limit::Concurrent);
        }
        if let Err(limit) = self.idp_add(idp) {
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
            return Err(limit);
        }
        Ok(())
    }

    /// Gives back a slot of [`Limits::capacity_take`].
    pub fn capacity_give(&self, idp: &str) {
        self.concurrent.fetch_sub(1, Ordering::SeqCst);
        self.idp_sub(idp);
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn idp_add(&self, idp: &str) -> Result<(), Limit> {
        let mut n = self.per_idp.entry(idp.to_owned()).or_default();
        if *n >= self.settings.max_concurrent_orders_per_idp {
            return Err(Limit::PerIdp);
        }
        *n += 1;
        Ok(())
    }

    fn idp_sub(&self, idp: &str) {
        if let Some(mut n) = self.per_idp.get_mut(idp) {
            *n = n.saturating_sub(1);
        }
    }

    /// The order of `call` for `person` is over.
    pub fn release(&self, person: &str, call: &str) {
        if let Some((_, (_, idp))) = self.live.remove_if(person, |_, (holder, _)| holder == call) {
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
            self.idp_sub(&idp);
        }
    }

    /// The person declined a call in their app: no new order for them until the cool-down is over.
    pub fn declined(&self, person: &str, now: Instant) {
        if !self.settings.declined_cool_down.is_zero() {
            self.cool_down
                .insert(person.to_owned(), now + self.settings.declined_cool_down);
        }
    }

    /// Drops the keys nothing counts for any more, so memory follows recent traffic only.
    pub fn sweep(&self, now: Instant) {
        for (map, window) in [
            (&self.per_person, HOUR),
            (&self.per_line, HOUR),
            (&self.per_agent, HOUR),
            (&self.per_queue, MINUTE),
        ] {
            map.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < window)
            });
        }
        self.cool_down.retain(|_, until| now < *until);
    }

    /// Keys held in the windows and cool-downs.
    #[cfg(test)]
    fn keys_held(&self) -> usize {
        self.per_person.len()
            + self.per_line.len()
            + self.per_agent.len()
            + self.per_queue.len()
            + self.cool_down.len()
    }

    pub fn live_orders(&self) -> usize {
        self.concurrent.load(Ordering::SeqCst)
    }

    /// Live orders at one provider.
    pub fn live_orders_at(&self, idp: &str) -> usize {
        self.per_idp.get(idp).map(|n| *n).unwrap_or(0)
    }
}

/// The limits a call task asks: this process's own ([`Limits`]), or with shared state the limits on
/// Redis (`state::limits`) plus this process's concurrency caps.
///
/// With shared state, a start asks Redis first (one atomic script); a grant is then checked against
/// the local caps and taken back from Redis if they refuse, so a refused start records nothing. While
/// Redis cannot be reached, `state.on_unavailable` decides: this process's own limits
/// (`callgate_state_fallbacks_total`, a warning per start) or a refusal (`shared_state`).
#[derive(Debug)]
pub struct Limiter {
    local: Limits,
    shared: Option<Arc<Shared>>,
    /// (person, call) of orders granted by Redis → their provider (for the local caps at release).
    held: DashMap<(String, String), String>,
}

impl Limiter {
    /// Limits of this process only.
    pub fn local(limits: Limits) -> Limiter {
        Limiter {
            local: limits,
            shared: None,
            held: DashMap::new(),
        }
    }

    /// Limits shared through Redis.
    pub fn shared(limits: Limits, shared: Arc<Shared>) -> Limiter {
        Limiter {
            local: limits,
            shared: Some(shared),
            held: DashMap::new(),
        }
    }

    /// Asks to start an order; which limit refused it otherwise. `now` drives the local limits,
    /// the wall clock the shared ones.
    pub async fn acquire(&self, s: Start<'_>, now: Instant) -> Result<Grant, Limit> {
        let Some(shared) = &self.shared else {
            return self.local.acquire(s, now);
        };
        let now_ms = crate::state::wire::millis(super::task::wall_clock());
        match shared
            .limits_acquire(&s, self.local.settings(), now_ms)
            .await
        {
            Ok(Acquired::Refused(limit)) => Err(limit),
            Ok(Acquired::Granted { previous, undo }) => {
                let key = (s.person.to_owned(), s.call.to_owned());
                if !self.held.contains_key(&key) {
                    if let Err(limit) = self.local.capacity_take(s.idp) {
                        if let Err(e) = shared.limits_undo(&undo).await {
                            tracing::warn!(error = %e, "could not take back a start refused by this instance's caps; its window entries stay");
                        }
                        return Err(limit);
                    }
                    self.held.insert(key, s.idp.to_owned());
                }
                let supersede = match previous {
                    Some(h) if h.instance == shared.instance() => Some(h.call),
                    Some(h) => {
                        // The person's older order is on another instance's call: it ends there.
                        let shared = Arc::clone(shared);
                        tokio::spawn(async move {
                            let by = super::live::StartedBy::Gate;
                            let _ = shared
                                .forward(
                                    &h.instance,
                                    &h.call,
                                    by,
                                    crate::state::wire::Op::Superseded,
                                )
                                .await;
                        });
                        None
                    }
                    None => None,
                };
                Ok(Grant { supersede })
            }
            Err(e) => match shared.on_unavailable() {
                OnUnavailable::LocalLimits => {
                    shared.metrics().state_fallback();
                    tracing::warn!(error = %e, "shared state unreachable: this order's limits are decided by this instance alone");
                    self.local.acquire(s, now)
                }
                OnUnavailable::Refuse => {
                    tracing::warn!(error = %e, "shared state unreachable: order refused (state.on_unavailable = refuse)");
                    Err(Limit::SharedState)
                }
            },
        }
    }

    /// The order of `call` for `person` is over. Never waits: the shared release runs on its own
    /// (should Redis be unreachable, the claim expires by itself).
    pub fn release(&self, person: &str, call: &str) {
        match self.held.remove(&(person.to_owned(), call.to_owned())) {
            Some((_, idp)) => {
                self.local.capacity_give(&idp);
                if let Some(shared) = &self.shared {
                    let shared = Arc::clone(shared);
                    let (person, call) = (person.to_owned(), call.to_owned());
                    tokio::spawn(async move {
                        let _ = shared.limits_release(&person, &call).await;
                    });
                }
            }
            None => self.local.release(person, call),
        }
    }

    /// The person declined a call in their app: the cool-down, here and (without waiting) on Redis.
    pub fn declined(&self, person: &str, now: Instant) {
        self.local.declined(person, now);
        if let Some(shared) = &self.shared {
            let shared = Arc::clone(shared);
            let person = person.to_owned();
            let cool_down = self.local.settings().declined_cool_down;
            let now_ms = crate::state::wire::millis(super::task::wall_clock());
            tokio::spawn(async move {
                let _ = shared.limits_declined(&person, now_ms, cool_down).await;
            });
        }
    }

    pub fn live_orders(&self) -> usize {
        self.local.live_orders()
    }

    pub fn live_orders_at(&self, idp: &str) -> usize {
        self.local.live_orders_at(idp)
    }
}

/// Whether another start fits in the sliding window ending at `now`; drops the starts that left it.
fn within(
    map: &DashMap<String, VecDeque<Instant>>,
    key: &str,
    max: u32,
    window: Duration,
    now: Instant,
) -> bool {
    let Some(mut times) = map.get_mut(key) else {
        return max > 0;
    };
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        times.pop_front();
    }
    times.len() < max as usize
}

fn record(map: &DashMap<String, VecDeque<Instant>>, key: &str, now: Instant) {
    map.entry(key.to_owned()).or_default().push_back(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start<'a>(person: &'a str, line: &'a str, call: &'a str) -> Start<'a> {
        Start {
            person,
            line,
            call,
            queue: "support",
            idp: "bankid",
            agent: None,
        }
    }

    #[allow(clippy::disallowed_methods)] // a test's base instant; time is virtual after it
    fn base() -> Instant {
        Instant::now()
    }

    #[test]
    fn one_live_order_per_person_supersedes_the_older_call() {
        let l = Limits::new(Settings::default());
        let now = base();
        assert_eq!(
            l.acquire(start("p", "", "a"), now),
            Ok(Grant { supersede: None })
        );
        assert_eq!(
            l.acquire(start("p", "", "b"), now),
            Ok(Grant {
                supersede: Some("a".into())
            })
        );
        assert_eq!(l.live_orders(), 1);
        assert_eq!(l.live_orders_at("bankid"), 1);
        l.release("p", "a"); // the superseded call releases nothing
        assert_eq!(l.live_orders(), 1);
        l.release("p", "b");
        assert_eq!(l.live_orders(), 0);
        assert_eq!(l.live_orders_at("bankid"), 0);
    }

    #[test]
    fn starts_per_person_and_line_are_limited_per_hour() {
        let l = Limits::new(Settings {
            max_starts_per_number_per_hour: 2,
            max_starts_per_line_per_hour: 3,
            ..Settings::default()
        });
        let t = base();
        for call in ["a", "b"] {
            assert!(l.acquire(start("p", "line", call), t).is_ok());
            l.release("p", call);
        }
        assert_eq!(l.acquire(start("p", "line", "c"), t), Err(Limit::PerNumber));
        assert!(l.acquire(start("q", "line", "d"), t).is_ok());
        assert_eq!(l.acquire(start("r", "line", "e"), t), Err(Limit::PerLine));
        assert!(l.acquire(start("p", "other", "f"), t + HOUR).is_ok());
    }

    #[test]
    fn the_window_slides_over_the_hour() {
        let l = Limits::new(Settings {
            max_starts_per_number_per_hour: 2,
            ..Settings::default()
        });
        let t = base();
        let min = Duration::from_secs(60);
        assert!(l.acquire(start("p", "", "a"), t).is_ok());
        assert!(l.acquire(start("p", "", "b"), t + 30 * min).is_ok());
        // 59 minutes after the first: both still count.
        assert_eq!(
            l.acquire(start("p", "", "c"), t + 59 * min),
            Err(Limit::PerNumber)
        );
        // The first left the window; the second (at 30 min) still counts.
        assert!(l.acquire(start("p", "", "c"), t + 60 * min).is_ok());
        assert_eq!(
            l.acquire(start("p", "", "d"), t + 89 * min),
            Err(Limit::PerNumber)
        );
        assert!(l.acquire(start("p", "", "d"), t + 90 * min).is_ok());
    }

    #[test]
    fn a_refused_start_uses_up_no_window() {
        let l = Limits::new(Settings {
            max_starts_per_number_per_hour: 1,
            max_starts_per_queue_per_minute: 2,
            ..Settings::default()
        });
        let t = base();
        assert!(l.acquire(start("p", "", "a"), t).is_ok());
        for _ in 0..5 {
            assert_eq!(l.acquire(start("p", "", "b"), t), Err(Limit::PerNumber));
        }
        // The refusals did not count for the queue.
        assert!(l.acquire(start("q", "", "c"), t).is_ok());
        assert_eq!(l.acquire(start("r", "", "d"), t), Err(Limit::PerQueue));
    }

    #[test]
    fn starts_per_queue_are_limited_per_minute_and_per_queue() {
        let l = Limits::new(Settings {
            max_starts_per_queue_per_minute: 2,
            ..Settings::default()
        });
        let t = base();
        assert!(l.acquire(start("p", "", "a"), t).is_ok());
        assert!(l.acquire(start("q", "", "b"), t).is_ok());
        assert_eq!(l.acquire(start("r", "", "c"), t), Err(Limit::PerQueue));
        let other = Start {
            queue: "sales",
            ..start("r", "", "c")
        };
        assert!(l.acquire(other, t).is_ok());
        assert!(l.acquire(start("s", "", "d"), t + MINUTE).is_ok());
    }

    #[test]
    fn the_cool_down_after_a_declined_call_expires() {
        let l = Limits::new(Settings {
            declined_cool_down: Duration::from_secs(30 * 60),
            ..Settings::default()
        });
        let t = base();
        assert!(l.acquire(start("p", "", "a"), t).is_ok());
        l.release("p", "a");
        l.declined("p", t);
        let min = Duration::from_secs(60);
        assert_eq!(
            l.acquire(start("p", "", "b"), t + min),
            Err(Limit::CoolDown)
        );
        assert_eq!(
            l.acquire(start("p", "", "b"), t + 29 * min),
            Err(Limit::CoolDown)
        );
        // Someone else is not affected.
        assert!(l.acquire(start("q", "", "c"), t + min).is_ok());
        assert!(l.acquire(start("p", "", "b"), t + 30 * min).is_ok());
        assert_eq!(Limit::CoolDown.reason(), Reason::RateLimited);
    }

    #[test]
    fn a_zero_cool_down_is_off() {
        let l = Limits::new(Settings {
            declined_cool_down: Duration::ZERO,
            ..Settings::default()
        });
        let t = base();
        l.declined("p", t);
        assert!(l.acquire(start("p", "", "a"), t).is_ok());
    }

    #[test]
    fn per_agent_counts_only_that_agents_checks() {
        let l = Limits::new(Settings {
            max_checks_per_agent_per_hour: 2,
            ..Settings::default()
        });
        let t = base();
        let by = |agent, person, call| Start {
            agent: Some(agent),
            ..start(person, "", call)
        };
        assert!(l.acquire(by("PJSIP/1001", "p", "a"), t).is_ok());
        assert!(l.acquire(by("PJSIP/1001", "q", "b"), t).is_ok());
        // Gate starts and other agents' checks are not counted for PJSIP/1001 ...
        assert!(l.acquire(start("r", "", "c"), t).is_ok());
        assert!(l.acquire(by("PJSIP/1002", "s", "d"), t).is_ok());
        // ... and do not use up its allowance either.
        assert_eq!(
            l.acquire(by("PJSIP/1001", "u", "e"), t),
            Err(Limit::PerAgent)
        );
        assert!(l.acquire(by("PJSIP/1002", "u", "e"), t).is_ok());
        assert!(l.acquire(by("PJSIP/1001", "v", "f"), t + HOUR).is_ok());
    }

    #[test]
    fn concurrent_orders_are_capped() {
        let l = Limits::new(Settings {
            max_concurrent_orders: 1,
            ..Settings::default()
        });
        let t = base();
        assert!(l.acquire(start("p", "", "a"), t).is_ok());
        assert_eq!(l.acquire(start("q", "", "b"), t), Err(Limit::Concurrent));
        assert_eq!(Limit::Concurrent.reason(), Reason::ProviderBusy);
        l.release("p", "a");
        assert!(l.acquire(start("q", "", "b"), t).is_ok());
    }

    #[test]
    fn concurrent_orders_per_provider_are_capped_and_released_on_order_end() {
        let l = Limits::new(Settings {
            max_concurrent_orders_per_idp: 1,
            ..Settings::default()
        });
        let t = base();
        let at = |idp, person, call| Start {
            idp,
            ..start(person, "", call)
        };
        assert!(l.acquire(at("bankid", "p", "a"), t).is_ok());
        assert_eq!(l.acquire(at("bankid", "q", "b"), t), Err(Limit::PerIdp));
        assert_eq!(Limit::PerIdp.reason(), Reason::ProviderBusy);
        // The refused start holds nothing.
        assert_eq!(l.live_orders(), 1);
        // Another provider has its own cap.
        assert!(l.acquire(at("ciba", "q", "c"), t).is_ok());
        assert_eq!(l.live_orders_at("ciba"), 1);
        l.release("p", "a");
        assert_eq!(l.live_orders_at("bankid"), 0);
        assert!(l.acquire(at("bankid", "r", "d"), t).is_ok());
        // A superseding order at another provider moves the slot.
        assert!(l.acquire(at("bankid", "q", "e"), t).is_err());
        l.release("r", "d");
        assert_eq!(
            l.acquire(at("bankid", "q", "e"), t),
            Ok(Grant {
                supersede: Some("c".into())
            })
        );
        assert_eq!(l.live_orders_at("ciba"), 0);
        assert_eq!(l.live_orders_at("bankid"), 1);
        assert_eq!(l.live_orders(), 1);
    }

    #[test]
    fn keys_that_left_their_windows_are_swept() {
        let l = Limits::new(Settings::default());
        let t = base();
        let by_agent = Start {
            agent: Some("PJSIP/1001"),
            ..start("p", "line", "a")
        };
        assert!(l.acquire(by_agent, t).is_ok());
        l.release("p", "a");
        l.declined("p", t);
        assert_eq!(l.keys_held(), 5);
        l.sweep(t + MINUTE);
        assert_eq!(l.keys_held(), 4, "the queue's minute is over");
        l.sweep(t + HOUR);
        assert_eq!(l.keys_held(), 0);
        // Sweeping forgets nothing that still counts.
        assert!(l.acquire(start("q", "", "b"), t + HOUR).is_ok());
        l.sweep(t + HOUR);
        assert_eq!(l.keys_held(), 2);
    }

    #[test]
    fn limit_codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for l in Limit::ALL {
            assert!(seen.insert(l.code()));
            assert!(l.code().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
    }
}
