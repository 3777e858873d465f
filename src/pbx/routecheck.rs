//! Which configured routes exist in Asterisk's dialplan, checked once rather than once per call.
//!
//! Asterisk evaluates a dialplan function such as `DIALPLAN_EXISTS()` only on a channel:
//! `GET /asterisk/variable` reads global variables and answers `""` for any function (measured on
//! 22.10.1). So the check runs on the channel of the first call that concludes, and checks every
//! route of the current config in that one request:
//! `GET /channels/{id}/variable?variable=EVAL(${DIALPLAN_EXISTS(c,e,p)},${DIALPLAN_EXISTS(…)},…)`
//! answers `1,0,…`. Later calls use the answers without a request until the ARI connection is made
//! again ([`RouteCheck::forget`]), the config is reloaded (another `Arc<Config>`), or
//! [`CHECKED_FOR`] has passed (an operator may reload the dialplan at any time).
//!
//! Invariants: at most one check is in flight (the others wait for its answers); a check that cannot
//! be made (timeout, server error) trusts the validated config, as a per-call check did, and is tried
//! again after [`UNVERIFIED_FOR`]; a channel found gone during the check is the caller's problem only
//! (nothing is remembered). No lock is held across an await except the async `refresh` gate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::ari::rest::{Client, Error};
use crate::config::Config;
use crate::policy::{QueuePolicy, Route};

/// How long a checked answer is used before it is checked again.
pub const CHECKED_FOR: Duration = Duration::from_secs(60);
/// How long routes are trusted unchecked after a check could not be made.
pub const UNVERIFIED_FOR: Duration = Duration::from_secs(5);
/// Routes per `EVAL` request (keeps the URL short).
const PER_REQUEST: usize = 24;

/// Shared by every call of one ARI connection's adapter.
pub struct RouteCheck {
    config: watch::Receiver<Arc<Config>>,
    known: Mutex<Known>,
    /// Held while a check is in flight, so that concurrent calls wait for its answers.
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Known {
    /// The config the answers were made for (compared by pointer: a reload makes a new one).
    config: Option<Arc<Config>>,
    until: Option<Instant>,
    exists: HashMap<Route, bool>,
}

impl RouteCheck {
    pub fn new(config: watch::Receiver<Arc<Config>>) -> RouteCheck {
        RouteCheck {
            config,
            known: Mutex::new(Known::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// Forgets every answer (a new ARI connection may lead to another Asterisk or dialplan).
    pub fn forget(&self) {
        *self.lock() = Known::default();
    }

    fn lock(&self) -> MutexGuard<'_, Known> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The remembered answer for `route`, if it is still good.
    fn lookup(&self, route: &Route, now: Instant) -> Option<bool> {
        let config = Arc::clone(&self.config.borrow());
        let known = self.lock();
        let fresh = known.until.is_some_and(|u| now < u)
            && known
                .config
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &config));
        fresh.then(|| known.exists.get(route).copied()).flatten()
    }

    /// Whether `route` exists, checking (on `channel`, which must be in the application) only when
    /// no good answer is remembered. `Err` only when the channel is gone.
    pub async fn exists(
        &self,
        client: &Client,
        channel: &str,
        route: &Route,
    ) -> Result<bool, Error> {
        if let Some(answer) = self.lookup(route, now()) {
            return Ok(answer);
        }
        let _gate = self.refresh.lock().await;
        // Another call may have checked while this one waited.
        if let Some(answer) = self.lookup(route, now()) {
            return Ok(answer);
        }
        let config = Arc::clone(&self.config.borrow());
        let mut routes = configured_routes(&config);
        if !routes.contains(route) {
            // A call that started before a reload may use a route the new config does not name.
            routes.push(route.clone());
        }
        let (exists, lifetime) = match check(client, channel, &routes).await {
            Ok(exists) => {
                let missing: Vec<String> = exists
                    .iter()
                    .filter(|(_, e)| !**e)
                    .map(|(r, _)| r.to_string())
                    .collect();
                if missing.is_empty() {
                    tracing::debug!(
                        routes = routes.len(),
                        "every configured route exists in the dialplan"
                    );
                } else {
                    tracing::error!(missing = %missing.join(" "), "configured routes missing from the dialplan; calls for them take the unavailable route");
                }
                (exists, CHECKED_FOR)
            }
            Err(e) if e.is_gone() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %crate::telemetry::ErrorChain(&e), "could not check the routes; using them as configured");
                let all = routes.iter().map(|r| (r.clone(), true)).collect();
                (all, UNVERIFIED_FOR)
            }
        };
        let answer = exists.get(route).copied().unwrap_or(true);
        *self.lock() = Known {
            config: Some(config),
            until: Some(now() + lifetime),
            exists,
        };
        Ok(answer)
    }
}

#[allow(clippy::disallowed_methods)] // the age of a cached answer, adapter side
fn now() -> Instant {
    Instant::now()
}

/// Every route a call of `config` can be continued to, without duplicates, in a stable order.
pub fn configured_routes(config: &Config) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::new();
    let policies = config.queues.values().chain(config.defaults.iter());
    for p in policies {
        for r in policy_routes(p) {
            if !out.contains(r) {
                out.push(r.clone());
            }
        }
    }
    out
}

fn policy_routes(p: &QueuePolicy) -> impl Iterator<Item = &Route> {
    let r = &p.routes;
    [&r.verified, &r.failed, &r.unavailable]
        .into_iter()
        .chain(
            [&r.skipped, &r.interrupted, &r.no_agent, &r.after_agent]
                .into_iter()
                .flatten(),
        )
        .chain(p.routes_by_reason.values())
}

/// A route that can go inside `EVAL(${…})` unchanged: nothing Asterisk would substitute or escape.
fn plain(route: &Route) -> bool {
    let ok = |s: &str| !s.contains(['$', '{', '}', '[', ']', '\\']);
    ok(&route.context) && ok(&route.extension)
}

fn exists_call(route: &Route) -> String {
    format!(
        "DIALPLAN_EXISTS({},{},{})",
        route.context, route.extension, route.priority
    )
}

/// Asks Asterisk, on `channel`, which of `routes` exist.
pub(crate) async fn check(
    client: &Client,
    channel: &str,
    routes: &[Route],
) -> Result<HashMap<Route, bool>, Error> {
    let mut out = HashMap::with_capacity(routes.len());
    let (batch, single): (Vec<&Route>, Vec<&Route>) = routes.iter().partition(|r| plain(r));
    for chunk in batch.chunks(PER_REQUEST) {
        let expr = format!(
            "EVAL({})",
            chunk
                .iter()
                .map(|r| format!("${{{}}}", exists_call(r)))
                .collect::<Vec<_>>()
                .join(",")
        );
        let value = client
            .get_variable(channel, &expr)
            .await?
            .unwrap_or_default();
        let answers: Vec<&str> = value.split(',').collect();
        if answers.len() != chunk.len() || answers.iter().any(|a| !matches!(*a, "0" | "1")) {
            return Err(Error::Decode(format!(
                "{} answers to {} route checks",
                answers.len(),
                chunk.len()
            )));
        }
        for (r, a) in chunk.iter().zip(answers) {
            out.insert((*r).clone(), a == "1");
        }
    }
    for r in single {
        let value = client.get_variable(channel, &exists_call(r)).await?;
        out.insert(r.clone(), value.as_deref() == Some("1"));
    }
    Ok(out)
}
