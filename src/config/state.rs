//! `[state]`: where the state shared between callgate instances lives.

use std::time::Duration;

use ::config::{Map, Value};

use super::walk::Ctx;
use crate::secret::Secret;

/// Keys of `[state]`.
const STATE_KEYS: [&str; 11] = [
    "kind",
    "instance_id",
    "url",
    "key_prefix",
    "pool_size",
    "connect_timeout",
    "response_timeout",
    "command_timeout",
    "heartbeat_interval",
    "on_unavailable",
    "snapshot_ttl",
];

/// Longest instance id and key prefix.
const MAX_NAME: usize = 64;

/// `[state]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    pub kind: StateKind,
    /// This process among the instances sharing the store; empty = host name + ARI app (filled in at
    /// start, see [`State::instance_or`]).
    pub instance_id: String,
}

impl State {
    /// The configured instance id, or the default built from the host name and the ARI app.
    pub fn instance_or(&self, host: &str, app: &str) -> String {
        if self.instance_id.is_empty() {
            let id: String = format!("{host}-{app}")
                .chars()
                .map(|c| if valid_char(c) { c } else { '-' })
                .take(MAX_NAME)
                .collect();
            id
        } else {
            self.instance_id.clone()
        }
    }
}

/// `state.kind`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StateKind {
    /// Each process keeps its own state in memory (one instance, or instances that share nothing).
    #[default]
    Memory,
    Redis(RedisSettings),
}

/// `[state]` with `kind = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (TLS); may carry a password, hence a secret.
    pub url: Secret,
    /// Every key and channel starts with this and a `:`.
    pub key_prefix: String,
    /// Multiplexed connections used round-robin.
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// Longest wait for one answer of Redis before the operation counts as failed.
    pub response_timeout: Duration,
    /// Longest wait for the instance owning a call to answer a forwarded command (then 503).
    pub command_timeout: Duration,
    /// How often this instance says it is alive; it counts as lost after three missed beats.
    pub heartbeat_interval: Duration,
    /// What new orders do while Redis cannot be reached.
    pub on_unavailable: OnUnavailable,
    /// How long a call's snapshot lives without being refreshed (its owner refreshes it every beat).
    pub snapshot_ttl: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: Secret::default(),
            key_prefix: "callgate".to_owned(),
            pool_size: 2,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(2),
            on_unavailable: OnUnavailable::LocalLimits,
            snapshot_ttl: Duration::from_secs(60),
        }
    }
}

/// `state.on_unavailable`: new orders while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Decided by this instance's own limits (counted in `callgate_state_fallbacks_total`, logged).
    LocalLimits,
    /// Refused: the check ends `unavailable/provider_busy` (limit `shared_state`).
    Refuse,
}

impl OnUnavailable {
    pub fn code(self) -> &'static str {
        match self {
            OnUnavailable::LocalLimits => "local_limits",
            OnUnavailable::Refuse => "refuse",
        }
    }
}

fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn name_rule(ctx: &mut Ctx<'_>, path: &str, v: &Value) -> Option<String> {
    ctx.parsed(path, v, |x| {
        if x.is_empty() || x.len() > MAX_NAME || !x.chars().all(valid_char) {
            Err(format!(
                "{x:?} must be 1 to {MAX_NAME} of letters, digits, '-', '_' or '.'"
            ))
        } else {
            Ok(x.to_owned())
        }
    })
}

/// Whether a Redis URL's host is a loopback name.
pub fn redis_on_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or("");
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    let host = if let Some(h) = host_port.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    matches!(host, "127.0.0.1" | "localhost" | "::1")
}

pub fn state(ctx: &mut Ctx<'_>, t: Option<&Map<String, Value>>) -> State {
    let mut s = State::default();
    let Some(t) = t else { return s };
    ctx.known_keys("state", t, &STATE_KEYS);
    if let Some(v) = t.get("instance_id") {
        if let Some(id) = name_rule(ctx, "state.instance_id", v) {
            s.instance_id = id;
        }
    }
    let kind = match t.get("kind") {
        None => "memory".to_owned(),
        Some(v) => match ctx.text("state.kind", v) {
            Some(k) => k,
            None => return s,
        },
    };
    let redis_keys = STATE_KEYS
        .iter()
        .filter(|k| !matches!(**k, "kind" | "instance_id"));
    match kind.as_str() {
        "memory" => {
            for key in redis_keys {
                if t.contains_key(*key) {
                    ctx.issue(format!("state.{key}"), "applies only with kind = \"redis\"");
                }
            }
        }
        "redis" => s.kind = StateKind::Redis(redis(ctx, t)),
        other => ctx.issue(
            "state.kind",
            format!("{other:?} is not one of \"memory\", \"redis\""),
        ),
    }
    s
}

fn redis(ctx: &mut Ctx<'_>, t: &Map<String, Value>) -> RedisSettings {
    let mut r = RedisSettings::default();
    match t.get("url") {
        None => ctx.issue(
            "state.url",
            "required with kind = \"redis\": redis://host:port or rediss://host:port",
        ),
        Some(v) => {
            if let Some(url) = ctx.text("state.url", v) {
                let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
                if !scheme_ok {
                    ctx.issue("state.url", "must start with redis:// or rediss:// (TLS)");
                } else if redis::Client::open(url.as_str()).is_err() {
                    // The parser's message may quote the URL and its password: not repeated.
                    ctx.issue("state.url", "is not a valid Redis URL");
                }
                r.url = Secret::new(url);
            }
        }
    }
    if let Some(v) = t.get("key_prefix") {
        if let Some(p) = name_rule(ctx, "state.key_prefix", v) {
            r.key_prefix = p;
        }
    }
    if let Some(v) = t.get("pool_size") {
        if let Some(n) = ctx.number("state.pool_size", v, 1, 32) {
            r.pool_size = usize::try_from(n).unwrap_or(r.pool_size);
        }
    }
    for (key, field, min, max) in [
        (
            "connect_timeout",
            &mut r.connect_timeout,
            Duration::from_millis(100),
            Duration::from_secs(60),
        ),
        (
            "response_timeout",
            &mut r.response_timeout,
            Duration::from_millis(50),
            Duration::from_secs(30),
        ),
        (
            "command_timeout",
            &mut r.command_timeout,
            Duration::from_millis(100),
            Duration::from_secs(4),
        ),
        (
            "heartbeat_interval",
            &mut r.heartbeat_interval,
            Duration::from_millis(100),
            Duration::from_secs(60),
        ),
        (
            "snapshot_ttl",
            &mut r.snapshot_ttl,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        ),
    ] {
        if let Some(v) = t.get(key) {
            let path = format!("state.{key}");
            if let Some(d) = ctx.duration(&path, v, false) {
                if d < min || d > max {
                    ctx.issue(path, format!("must be between {min:?} and {max:?}"));
                } else {
                    *field = d;
                }
            }
        }
    }
    if r.snapshot_ttl < r.heartbeat_interval * 3 {
        ctx.issue(
            "state.snapshot_ttl",
            "must be at least three heartbeat intervals (an owner refreshes its snapshots every beat)",
        );
    }
    if let Some(v) = t.get("on_unavailable") {
        if let Some(p) = ctx.parsed("state.on_unavailable", v, |x| match x {
            "local_limits" => Ok(OnUnavailable::LocalLimits),
            "refuse" => Ok(OnUnavailable::Refuse),
            _ => Err(format!("{x:?} is not one of \"local_limits\", \"refuse\"")),
        }) {
            r.on_unavailable = p;
        }
    }
    r
}
