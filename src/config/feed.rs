//! `[switchboards.<name>.feed]`: the switchboard's call-event websocket (where, how to authenticate,
//! keepalive and reconnect timings) and how its JSON events map onto callgate's call events.
//!
//! Invariant: the URL is `wss://` (plain `ws://` only on a loopback host) without credentials or a
//! query; the token is a [`Secret`]; every timing is within its documented range; the mapping names
//! an event type and a call id field and maps at least the `ended` event, so a call can end.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use ::config::{Map, Value};
use reqwest::Url;

use super::walk::{join, sorted_keys, Ctx};
use crate::secret::Secret;

/// Keys of `[switchboards.<name>.feed]`.
pub const FEED_KEYS: [&str; 10] = [
    "url",
    "token",
    "keepalive",
    "reconnect_min",
    "reconnect_max",
    "max_message",
    "max_call_age",
    "mapping",
    "fields",
    "events",
];
/// Keys of `[switchboards.<name>.feed.fields]`.
pub const FIELD_KEYS: [&str; 5] = ["event", "call_id", "agent", "queue", "caller"];
/// The one mapping built in so far.
pub const GENERIC_JSON: &str = "generic_json";

/// What happened to a call, in callgate's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FeedEventKind {
    Started,
    Queued,
    Answered,
    Transferred,
    Ended,
}

impl FeedEventKind {
    pub const ALL: [FeedEventKind; 5] = [
        FeedEventKind::Started,
        FeedEventKind::Queued,
        FeedEventKind::Answered,
        FeedEventKind::Transferred,
        FeedEventKind::Ended,
    ];

    pub fn code(self) -> &'static str {
        match self {
            FeedEventKind::Started => "started",
            FeedEventKind::Queued => "queued",
            FeedEventKind::Answered => "answered",
            FeedEventKind::Transferred => "transferred",
            FeedEventKind::Ended => "ended",
        }
    }

    pub fn from_code(code: &str) -> Option<FeedEventKind> {
        FeedEventKind::ALL.into_iter().find(|k| k.code() == code)
    }
}

/// Where each piece of an event is in the feed's JSON: a field name, or a dotted path into nested
/// objects (`call.agent.id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub event: String,
    pub call_id: String,
    pub agent: String,
    pub queue: String,
    pub caller: String,
}

impl Default for Fields {
    fn default() -> Fields {
        Fields {
            event: "event".into(),
            call_id: "call_id".into(),
            agent: "agent".into(),
            queue: "queue".into(),
            caller: "caller".into(),
        }
    }
}

/// How the feed's events become callgate's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    /// One JSON object per text message; `fields` says where things are, `events` maps the values
    /// of the event-type field (values not listed are skipped).
    GenericJson {
        fields: Fields,
        events: BTreeMap<String, FeedEventKind>,
    },
}

/// `[switchboards.<name>.feed]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Feed {
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Secret,
    /// Ping interval; a link with no frame for two intervals after a ping is dead.
    pub keepalive: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Largest accepted message, in bytes.
    pub max_message: usize,
    /// A call the feed never reports as ended is forgotten after this long.
    pub max_call_age: Duration,
    pub mapping: Mapping,
}

impl Feed {
    /// The defaults of everything but the URL, the token and the mapping.
    pub fn defaults(url: String, token: Secret, mapping: Mapping) -> Feed {
        Feed {
            url,
            token,
            keepalive: Duration::from_secs(20),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            max_message: 64 * 1024,
            max_call_age: Duration::from_secs(4 * 3600),
            mapping,
        }
    }
}

impl fmt::Debug for Feed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Feed")
            .field("url", &self.url)
            .field("token", &self.token)
            .field("keepalive", &self.keepalive)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("max_message", &self.max_message)
            .field("max_call_age", &self.max_call_age)
            .field("mapping", &self.mapping)
            .finish()
    }
}

/// `wss://…`, or `ws://` on a loopback host; no user, password or query (the token goes in a header).
pub fn feed_url(x: &str) -> Result<String, String> {
    let url = Url::parse(x).map_err(|e| format!("not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
        return Err("must not carry a user, password or query (the token goes in a header)".into());
    }
    let host = url.host_str().unwrap_or_default();
    let loopback = matches!(host, "127.0.0.1" | "localhost" | "[::1]");
    match url.scheme() {
        "wss" if !host.is_empty() => Ok(url.to_string()),
        "ws" if loopback => Ok(url.to_string()),
        "ws" => Err("must be wss (ws only on 127.0.0.1, [::1] or localhost)".into()),
        _ => Err("must be a wss URL".into()),
    }
}

/// A field path: dot-separated names, each non-empty.
fn field_path(x: &str) -> Result<String, String> {
    if x.is_empty() || x.len() > 128 || x.split('.').any(str::is_empty) {
        return Err("expected a field name or a dotted path (e.g. \"call.id\")".into());
    }
    Ok(x.to_owned())
}

/// Reads `[switchboards.<name>.feed]` at `path`.
pub fn feed(ctx: &mut Ctx<'_>, path: &str, v: &Value) -> Option<Feed> {
    let t = ctx.table(path, v)?;
    let before = ctx.issues.len();
    ctx.known_keys(path, t, &FEED_KEYS);
    let url = match t.get("url") {
        Some(v) => ctx.parsed(&join(path, "url"), v, feed_url),
        None => {
            ctx.issue(
                join(path, "url"),
                "required: the feed's websocket URL (wss://…)",
            );
            None
        }
    };
    let token = match t.get("token") {
        Some(v) => ctx.text(&join(path, "token"), v).and_then(|s| {
            if s.is_empty() {
                ctx.issue(join(path, "token"), "must not be empty");
                None
            } else {
                Some(Secret::new(s))
            }
        }),
        None => {
            ctx.issue(
                join(path, "token"),
                "required: the bearer token the feed accepts (e.g. \"${TELAVOX_FEED_TOKEN}\")",
            );
            None
        }
    };
    let mapping = mapping(ctx, path, t);
    let mut f = Feed::defaults(url.unwrap_or_default(), token.unwrap_or_default(), mapping?);
    let dur = |ctx: &mut Ctx<'_>, key: &str, min: Duration, max: Duration, slot: &mut Duration| {
        if let Some(v) = t.get(key) {
            let p = join(path, key);
            if let Some(d) = ctx.duration(&p, v, false) {
                if d < min || d > max {
                    ctx.issue(
                        &p,
                        format!(
                            "must be from {} to {}",
                            super::duration::format(min),
                            super::duration::format(max)
                        ),
                    );
                } else {
                    *slot = d;
                }
            }
        }
    };
    let ms = Duration::from_millis;
    let s = Duration::from_secs;
    dur(ctx, "keepalive", ms(50), s(300), &mut f.keepalive);
    dur(ctx, "reconnect_min", ms(10), s(60), &mut f.reconnect_min);
    dur(ctx, "reconnect_max", ms(10), s(3600), &mut f.reconnect_max);
    dur(
        ctx,
        "max_call_age",
        s(1),
        s(7 * 24 * 3600),
        &mut f.max_call_age,
    );
    if f.reconnect_max < f.reconnect_min {
        ctx.issue(
            join(path, "reconnect_max"),
            "must not be shorter than reconnect_min",
        );
    }
    if let Some(v) = t.get("max_message") {
        if let Some(n) = ctx.number(&join(path, "max_message"), v, 1024, 16 * 1024 * 1024) {
            f.max_message = usize::try_from(n).unwrap_or(usize::MAX);
        }
    }
    (ctx.issues.len() == before).then_some(f)
}

fn mapping(ctx: &mut Ctx<'_>, path: &str, t: &Map<String, Value>) -> Option<Mapping> {
    let mapping_path = join(path, "mapping");
    match t.get("mapping") {
        Some(v) => {
            let name = ctx.text(&mapping_path, v)?;
            if name != GENERIC_JSON {
                ctx.issue(
                    &mapping_path,
                    format!("unknown mapping {name:?} (known: \"{GENERIC_JSON}\")"),
                );
                return None;
            }
        }
        None => {
            ctx.issue(
                &mapping_path,
                format!("required: how the feed's events are read (\"{GENERIC_JSON}\")"),
            );
            return None;
        }
    }
    let mut fields = Fields::default();
    let fields_path = join(path, "fields");
    if let Some(v) = t.get("fields") {
        if let Some(ft) = ctx.table(&fields_path, v) {
            ctx.known_keys(&fields_path, ft, &FIELD_KEYS);
            for key in FIELD_KEYS {
                let Some(v) = ft.get(key) else { continue };
                let Some(p) = ctx.parsed(&join(&fields_path, key), v, field_path) else {
                    continue;
                };
                match key {
                    "event" => fields.event = p,
                    "call_id" => fields.call_id = p,
                    "agent" => fields.agent = p,
                    "queue" => fields.queue = p,
                    _ => fields.caller = p,
                }
            }
        }
    }
    let events_path = join(path, "events");
    let mut events = BTreeMap::new();
    match t.get("events") {
        Some(v) => {
            if let Some(et) = ctx.table(&events_path, v) {
                for value in sorted_keys(et) {
                    let p = join(&events_path, value);
                    let Some(code) = ctx.text(&p, &et[value]) else {
                        continue;
                    };
                    match FeedEventKind::from_code(&code) {
                        Some(kind) => {
                            events.insert(value.clone(), kind);
                        }
                        None => ctx.issue(
                            &p,
                            format!(
                                "unknown event {code:?} (known: started, queued, answered, transferred, ended)"
                            ),
                        ),
                    }
                }
                if !events.values().any(|k| *k == FeedEventKind::Ended) {
                    ctx.issue(
                        &events_path,
                        "must map at least one feed event to \"ended\" (else no call would end)",
                    );
                }
            }
        }
        None => ctx.issue(
            &events_path,
            "required: the feed's event types and the callgate events they are (e.g. hangup = \"ended\")",
        ),
    }
    Some(Mapping::GenericJson { fields, events })
}
