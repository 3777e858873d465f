//! Abuse limits on identity-provider orders: one live order per person, starts per person and per
//! caller line per hour, and a cap on concurrent orders — so callgate cannot be used to flood someone's
//! BankID app ("push bombing") or to overload the provider.
//!
//! Invariant: persons are keyed by pseudonym (HMAC), never by number; caller lines likewise.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::outcome::Reason;

/// Limit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub max_concurrent_orders: usize,
    pub max_starts_per_number_per_hour: u32,
    pub max_starts_per_line_per_hour: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_concurrent_orders: 200,
            max_starts_per_number_per_hour: 6,
            max_starts_per_line_per_hour: 10,
        }
    }
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
    live: DashMap<String, String>,
    per_person: DashMap<String, VecDeque<Instant>>,
    per_line: DashMap<String, VecDeque<Instant>>,
    concurrent: AtomicUsize,
}

const HOUR: Duration = Duration::from_secs(3600);

impl Limits {
    pub fn new(settings: Settings) -> Limits {
        Limits {
            settings,
            ..Limits::default()
        }
    }

    /// Asks to start an order for `person` (pseudonym) from `line` (pseudonymised caller id) in `call`.
    pub fn acquire(
        &self,
        person: &str,
        line: &str,
        call: &str,
        now: Instant,
    ) -> Result<Grant, Reason> {
        if !within(
            &self.per_person,
            person,
            self.settings.max_starts_per_number_per_hour,
            now,
        ) || (!line.is_empty()
            && !within(
                &self.per_line,
                line,
                self.settings.max_starts_per_line_per_hour,
                now,
            ))
        {
            return Err(Reason::RateLimited);
        }
        let previous = self.live.insert(person.to_owned(), call.to_owned());
        let supersede = previous.filter(|p| p != call);
        if supersede.is_none() {
            let n = self.concurrent.fetch_add(1, Ordering::SeqCst);
            if n >= self.settings.max_concurrent_orders {
                self.concurrent.fetch_sub(1, Ordering::SeqCst);
                self.live.remove(person);
                return Err(Reason::ProviderBusy);
            }
        }
        record(&self.per_person, person, now);
        if !line.is_empty() {
            record(&self.per_line, line, now);
        }
        Ok(Grant { supersede })
    }

    /// The order of `call` for `person` is over.
    pub fn release(&self, person: &str, call: &str) {
        if self
            .live
            .remove_if(person, |_, holder| holder == call)
            .is_some()
        {
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn live_orders(&self) -> usize {
        self.concurrent.load(Ordering::SeqCst)
    }
}

fn within(map: &DashMap<String, VecDeque<Instant>>, key: &str, max: u32, now: Instant) -> bool {
    let Some(mut times) = map.get_mut(key) else {
        return max > 0;
    };
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= HOUR)
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

    #[test]
    fn one_live_order_per_person_supersedes_the_older_call() {
        let l = Limits::new(Settings::default());
        #[allow(clippy::disallowed_methods)] // a test\'s base instant; time is virtual after it
        let now = Instant::now();
        assert_eq!(l.acquire("p", "", "a", now), Ok(Grant { supersede: None }));
        assert_eq!(
            l.acquire("p", "", "b", now),
            Ok(Grant {
                supersede: Some("a".into())
            })
        );
        assert_eq!(l.live_orders(), 1);
        l.release("p", "a"); // the superseded call releases nothing
        assert_eq!(l.live_orders(), 1);
        l.release("p", "b");
        assert_eq!(l.live_orders(), 0);
    }

    #[test]
    fn starts_per_person_and_line_are_limited_per_hour() {
        let l = Limits::new(Settings {
            max_starts_per_number_per_hour: 2,
            max_starts_per_line_per_hour: 3,
            ..Settings::default()
        });
        #[allow(clippy::disallowed_methods)] // a test\'s base instant; time is virtual after it
        let t = Instant::now();
        for call in ["a", "b"] {
            assert!(l.acquire("p", "line", call, t).is_ok());
            l.release("p", call);
        }
        assert_eq!(l.acquire("p", "line", "c", t), Err(Reason::RateLimited));
        assert!(l.acquire("q", "line", "d", t).is_ok());
        assert_eq!(l.acquire("r", "line", "e", t), Err(Reason::RateLimited));
        assert!(l.acquire("p", "other", "f", t + HOUR).is_ok());
    }

    #[test]
    fn concurrent_orders_are_capped() {
        let l = Limits::new(Settings {
            max_concurrent_orders: 1,
            ..Settings::default()
        });
        #[allow(clippy::disallowed_methods)] // a test\'s base instant; time is virtual after it
        let t = Instant::now();
        assert!(l.acquire("p", "", "a", t).is_ok());
        assert_eq!(l.acquire("q", "", "b", t), Err(Reason::ProviderBusy));
        l.release("p", "a");
        assert!(l.acquire("q", "", "b", t).is_ok());
    }
}
