//! `[webhooks]`: delivery settings and `[[webhooks.targets]]`, the CRMs that receive signed events.
//!
//! Invariant: every target has a unique name (its metric label), an `https` URL (plain `http` only on
//! a loopback host), a secret of at least [`MIN_SECRET`] bytes and at least one event type; the
//! delivery bounds are within their documented ranges. Queue names a target lists must be configured
//! queues unless `[defaults]` exists (then any queue the dialplan names may be meant).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ::config::{Map, Value, ValueKind};
use reqwest::Url;

use super::walk::{join, Ctx};
use super::{valid_name, NAME_RULE};
use crate::policy::QueuePolicy;
use crate::secret::Secret;
use crate::webhooks::EventType;

pub const WEBHOOKS_KEYS: [&str; 7] = [
    "max_attempts",
    "initial_backoff",
    "max_backoff",
    "timeout",
    "outbox_max",
    "max_age",
    "targets",
];
pub const TARGET_KEYS: [&str; 5] = ["name", "url", "secret", "queues", "events"];
/// Shortest accepted target secret, in bytes.
pub const MIN_SECRET: usize = 16;
const HOUR: Duration = Duration::from_secs(3600);

/// `[webhooks]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhooks {
    /// Attempts per event and target, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled after each failure (with jitter) up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Whole-request timeout of one attempt.
    pub timeout: Duration,
    /// Undelivered deliveries (event × target) the outbox holds; past it the oldest are dropped.
    pub outbox_max: usize,
    /// An event not delivered this long after it occurred is dropped.
    pub max_age: Duration,
    pub targets: Vec<WebhookTarget>,
}

impl Default for Webhooks {
    fn default() -> Self {
        Webhooks {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            outbox_max: 10_000,
            max_age: 24 * HOUR,
            targets: Vec::new(),
        }
    }
}

/// One `[[webhooks.targets]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    /// Its label in metrics and logs (never the URL, which may carry a token).
    pub name: String,
    pub url: String,
    /// HMAC-SHA256 key of the `Callgate-Signature` header.
    pub secret: Secret,
    /// Queues whose events it receives; empty: every queue.
    pub queues: Vec<String>,
    pub events: Vec<EventType>,
}

impl WebhookTarget {
    /// Whether this target wants an event of `queue`.
    pub fn wants(&self, queue: &str, event: EventType) -> bool {
        self.events.contains(&event)
            && (self.queues.is_empty() || self.queues.iter().any(|q| q == queue))
    }
}

pub fn webhooks(
    ctx: &mut Ctx<'_>,
    t: Option<&Map<String, Value>>,
    queues: &BTreeMap<String, Arc<QueuePolicy>>,
    has_defaults: bool,
) -> Webhooks {
    let mut w = Webhooks::default();
    let Some(t) = t else { return w };
    ctx.known_keys("webhooks", t, &WEBHOOKS_KEYS);
    if let Some(v) = t.get("max_attempts") {
        if let Some(n) = ctx.number("webhooks.max_attempts", v, 1, 100) {
            w.max_attempts = u32::try_from(n).unwrap_or(w.max_attempts);
        }
    }
    if let Some(v) = t.get("outbox_max") {
        if let Some(n) = ctx.number("webhooks.outbox_max", v, 1, 1_000_000) {
            w.outbox_max = usize::try_from(n).unwrap_or(w.outbox_max);
        }
    }
    let bounded = |ctx: &mut Ctx<'_>, key: &str, min: Duration, max: Duration| {
        let path = join("webhooks", key);
        let v = t.get(key)?;
        let d = ctx.duration(&path, v, false)?;
        if d < min || d > max {
            ctx.issue(
                &path,
                format!(
                    "must be from {} to {}",
                    super::duration::format(min),
                    super::duration::format(max)
                ),
            );
            return None;
        }
        Some(d)
    };
    let ms = Duration::from_millis;
    if let Some(d) = bounded(ctx, "initial_backoff", ms(10), HOUR) {
        w.initial_backoff = d;
    }
    if let Some(d) = bounded(ctx, "max_backoff", ms(10), 6 * HOUR) {
        w.max_backoff = d;
    }
    if let Some(d) = bounded(ctx, "timeout", ms(100), Duration::from_secs(120)) {
        w.timeout = d;
    }
    if let Some(d) = bounded(ctx, "max_age", Duration::from_secs(60), 30 * 24 * HOUR) {
        w.max_age = d;
    }
    if w.initial_backoff > w.max_backoff {
        ctx.issue(
            "webhooks.max_backoff",
            "must be at least webhooks.initial_backoff",
        );
    }
    let Some(v) = t.get("targets") else { return w };
    let ValueKind::Array(items) = &v.kind else {
        ctx.issue(
            "webhooks.targets",
            "expected a list of tables ([[webhooks.targets]])",
        );
        return w;
    };
    for (i, item) in items.iter().enumerate() {
        let path = format!("webhooks.targets[{i}]");
        let Some(tt) = ctx.table(&path, item) else {
            continue;
        };
        if let Some(target) = target(ctx, &path, tt, queues, has_defaults) {
            if w.targets.iter().any(|o| o.name == target.name) {
                ctx.issue(
                    join(&path, "name"),
                    format!("{:?} is used by another target", target.name),
                );
                continue;
            }
            w.targets.push(target);
        }
    }
    w
}

fn target(
    ctx: &mut Ctx<'_>,
    path: &str,
    t: &Map<String, Value>,
    queues: &BTreeMap<String, Arc<QueuePolicy>>,
    has_defaults: bool,
) -> Option<WebhookTarget> {
    ctx.known_keys(path, t, &TARGET_KEYS);
    let mut ok = true;
    let mut required = |ctx: &mut Ctx<'_>, key: &str| {
        let v = t.get(key);
        if v.is_none() {
            ctx.issue(join(path, key), "required");
            ok = false;
        }
        v
    };
    let name_v = required(ctx, "name");
    let url_v = required(ctx, "url");
    let secret_v = required(ctx, "secret");
    let name = name_v.and_then(|v| {
        ctx.parsed(&join(path, "name"), v, |s| {
            if valid_name(s) {
                Ok(s.to_owned())
            } else {
                Err(format!("target names {NAME_RULE}"))
            }
        })
    });
    let url = url_v.and_then(|v| ctx.parsed(&join(path, "url"), v, target_url));
    let secret = secret_v.and_then(|v| {
        ctx.parsed(&join(path, "secret"), v, |s| {
            if s.len() >= MIN_SECRET {
                Ok(Secret::new(s))
            } else {
                Err(format!("must be at least {MIN_SECRET} bytes"))
            }
        })
    });
    let mut target_queues = Vec::new();
    if let Some(v) = t.get("queues") {
        let qpath = join(path, "queues");
        match ctx.list(&qpath, v) {
            Some(list) => {
                for q in list {
                    if target_queues.contains(&q) {
                        ctx.issue(&qpath, format!("{q:?} is listed twice"));
                        ok = false;
                    } else if !queues.contains_key(&q) && !has_defaults {
                        ctx.issue(
                            &qpath,
                            format!("{q:?} is not a configured queue (and there is no [defaults])"),
                        );
                        ok = false;
                    } else {
                        target_queues.push(q);
                    }
                }
            }
            None => ok = false,
        }
    }
    let mut events = EventType::DEFAULT.to_vec();
    if let Some(v) = t.get("events") {
        let known: Vec<&str> = EventType::ALL.iter().map(|e| e.code()).collect();
        match ctx.codes(
            &join(path, "events"),
            v,
            "event",
            &known,
            EventType::from_code,
        ) {
            Some(list) if list.is_empty() => {
                ctx.issue(join(path, "events"), "must name at least one event");
                ok = false;
            }
            Some(list) => events = list,
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    Some(WebhookTarget {
        name: name?,
        url: url?,
        secret: secret?,
        queues: target_queues,
        events,
    })
}

/// `https://…`, or `http://` on a loopback host (tests, a local relay); no user or password in it.
pub fn target_url(x: &str) -> Result<String, String> {
    let url = Url::parse(x).map_err(|e| format!("not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a user or password (the signature authenticates)".into());
    }
    let host = url.host_str().unwrap_or_default();
    let loopback = matches!(host, "127.0.0.1" | "localhost" | "[::1]");
    match url.scheme() {
        "https" if !host.is_empty() => Ok(url.to_string()),
        "http" if loopback => Ok(url.to_string()),
        "http" => Err("must be https (http only on 127.0.0.1, [::1] or localhost)".into()),
        _ => Err("must be an https URL".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{load, Config, Issue};

    const BASE: &str = r#"
[pbx.ari]
password = "pw"

[idp.sim]
kind = "simulator"

[queues.support.routes]
verified = "queues,support,1"
failed = "queues,support-unverified,1"
unavailable = "queues,support-fallback,1"
"#;

    fn try_load(extra: &str) -> Result<Config, Vec<Issue>> {
        let lookup: HashMap<&str, &str> =
            [("CRM_WEBHOOK_SECRET", "0123456789abcdef-secret")].into();
        load(&format!("{BASE}\n{extra}"), &HashMap::new(), &|name| {
            lookup.get(name).map(|s| (*s).to_owned())
        })
    }

    fn paths(extra: &str) -> Vec<String> {
        match try_load(extra) {
            Ok(_) => panic!("loaded, but issues were expected"),
            Err(issues) => issues.into_iter().map(|i| i.path).collect(),
        }
    }

    #[test]
    fn defaults_and_a_target_with_its_secret_from_the_environment() {
        let cfg = try_load("").unwrap();
        assert_eq!(cfg.webhooks, Webhooks::default());
        let cfg = try_load(
            r#"
[webhooks]
max_attempts = 5
initial_backoff = "500ms"
max_backoff = "1m"
timeout = "5s"
outbox_max = 100
max_age = "2h"

[[webhooks.targets]]
name = "crm"
url = "https://crm.example/hooks/callgate"
secret = "${CRM_WEBHOOK_SECRET}"
queues = ["support"]
events = ["verification_completed", "fraud_warning", "call_ended"]

[[webhooks.targets]]
name = "local"
url = "http://127.0.0.1:9000/hook"
secret = "another-secret-of-16+"
"#,
        )
        .unwrap();
        let w = &cfg.webhooks;
        assert_eq!(w.max_attempts, 5);
        assert_eq!(w.initial_backoff, Duration::from_millis(500));
        assert_eq!(w.max_backoff, Duration::from_secs(60));
        assert_eq!(w.timeout, Duration::from_secs(5));
        assert_eq!(w.outbox_max, 100);
        assert_eq!(w.max_age, Duration::from_secs(7200));
        assert_eq!(w.targets[0].secret.expose(), "0123456789abcdef-secret");
        assert!(w.targets[0].wants("support", EventType::CallEnded));
        assert!(!w.targets[0].wants("care", EventType::VerificationCompleted));
        assert_eq!(w.targets[1].events, EventType::DEFAULT);
        assert!(w.targets[1].wants("care", EventType::FraudWarning));
        assert!(!w.targets[1].wants("care", EventType::CallEnded));
        assert!(!format!("{cfg:?}").contains("0123456789abcdef-secret"));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let found = paths(
            r#"
[webhooks]
max_attempts = 0
initial_backoff = "2m"
max_backoff = "1m"
timeout = "0s"
outbox_max = 0
retries = 3

[[webhooks.targets]]
name = "Crm"
url = "http://crm.example/hook"
secret = "short"
queues = ["nope"]
events = ["verification_done"]

[[webhooks.targets]]
url = "https://user:pw@crm.example/hook"
secret = "0123456789abcdef"

[[webhooks.targets]]
name = "a"
url = "https://a.example/"
secret = "0123456789abcdef"
events = []

[[webhooks.targets]]
name = "b"
url = "https://b.example/"
secret = "0123456789abcdef"

[[webhooks.targets]]
name = "b"
url = "https://b.example/"
secret = "0123456789abcdef"
"#,
        );
        for expected in [
            "webhooks.max_attempts",
            "webhooks.max_backoff",
            "webhooks.timeout",
            "webhooks.outbox_max",
            "webhooks.retries",
            "webhooks.targets[0].name",
            "webhooks.targets[0].url",
            "webhooks.targets[0].secret",
            "webhooks.targets[0].queues",
            "webhooks.targets[0].events",
            "webhooks.targets[1].name",
            "webhooks.targets[1].url",
            "webhooks.targets[2].events",
            "webhooks.targets[4].name",
        ] {
            assert!(
                found.iter().any(|p| p == expected),
                "{expected} not in {found:?}"
            );
        }
        assert!(!found.iter().any(|p| p.starts_with("webhooks.targets[3]")));
    }

    #[test]
    fn urls_are_https_or_loopback_http() {
        assert!(target_url("https://crm.example/x?y=1").is_ok());
        assert!(target_url("http://127.0.0.1:8080/x").is_ok());
        assert!(target_url("http://localhost/x").is_ok());
        assert!(target_url("http://[::1]:1/x").is_ok());
        assert!(target_url("http://10.0.0.1/x").is_err());
        assert!(target_url("ftp://crm.example/").is_err());
        assert!(target_url("not a url").is_err());
    }
}
