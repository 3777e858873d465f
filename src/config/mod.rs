//! Configuration: TOML plus environment overrides, checked against the schema and validated into typed
//! values ([`Config`]), and the `check-config` report.
//!
//! Invariant: loading either yields a fully valid [`Config`] or *every* problem found, each as an
//! [`Issue`] with the dotted path of the offending key. Nothing here reads the process environment except
//! [`load_file`] / [`check_config`]; secrets only ever live in [`Secret`].
//!
//! # Loading
//! 1. The raw value tree: the TOML text, then overrides from variables named `CALLGATE__SECTION__KEY`
//!    (`__` separates levels: `CALLGATE__SERVER__LISTEN`, `CALLGATE__QUEUES__SUPPORT__MAX_ORDERS`).
//!    Override names are lowercased by the `config` crate, so **queue and provider names must be
//!    lowercase** (letters, digits, `-`, `_`; no `__`): a mixed-case name would be unreachable by an
//!    override and is reported. Override values are strings; numbers, booleans and durations are read
//!    from text, and a list is written comma-separated (`CALLGATE__QUEUES__SUPPORT__LANGUAGES=sv,en`).
//! 2. Every key is checked against the schema (all unknown keys are reported, with a hint when a known
//!    key is close), then each value is converted and validated, collecting every issue.
//!
//! String values (any value that is text, including numbers given as text) may reference environment
//! variables: `${VAR}` (an error naming the key and the variable when `VAR` is unset), `${VAR:-fallback}`
//! (the literal fallback when `VAR` is unset or empty) and `$$` for a literal `$`. Values land in
//! [`Secret`] where they are secrets (`server.pseudonym_key`, `pbx.ari.password`,
//! `idp.*.client_p12_password`, `webhooks.targets[i].secret`).
//!
//! # Keys and defaults
//! | key | default | rule |
//! |---|---|---|
//! | `server.listen` | `127.0.0.1:8080` | socket address |
//! | `server.ops_listen` | `127.0.0.1:9090` | socket address |
//! | `server.data_dir` | `/var/lib/callgate` | absolute path (not checked to exist; created at startup) |
//! | `server.shutdown_grace` | `30s` | duration, zero allowed |
//! | `server.on_shutdown` | `interrupt` | `interrupt` or `handover` |
//! | `server.pseudonym_key` | empty | secret, at least 16 bytes when set; required only when some queue (or `[defaults]`) discloses `pseudonym` |
//! | `pbx.kind` | `ari` | only `ari` |
//! | `pbx.ari.url` | `http://127.0.0.1:8088` | http(s), scheme/host/port only (`/ari` is added) |
//! | `pbx.ari.app` | `callgate` | non-empty, no spaces |
//! | `pbx.ari.username` | `callgate` | non-empty, no spaces or `:` |
//! | `pbx.ari.password` | — | secret, **required** |
//! | `pbx.ari.request_timeout` | `3s` | duration > 0 |
//! | `pbx.ari.ping_interval` | `5s` | duration > 0 |
//! | `pbx.ari.reconnect_min` / `reconnect_max` | `200ms` / `10s` | durations > 0, min ≤ max |
//! | `idp.<name>.kind` | — | **required**: `bankid` or `simulator` |
//! | `idp.<name>.url` (bankid) | `https://appapi2.test.bankid.com/rp/v6.0/` | https, or http on 127.0.0.1/localhost only; a missing trailing `/` is added |
//! | `idp.<name>.client_p12` + `client_p12_password` | — | https: exactly one identity, this or… |
//! | `idp.<name>.client_cert` + `client_key` | — | …this PEM pair (both) |
//! | `idp.<name>.server_ca` | — | required with https; every file key must name an existing file; http allows no file keys |
//! | `idp.<name>.request_timeout` / `connect_timeout` | `5s` / `3s` | durations > 0 |
//! | `idp.<name>.step` (simulator) | `1s` | duration, zero allowed |
//! | `limits.max_concurrent_orders` | `200` | 1..=1000000: open orders overall (refusal: `unavailable/provider_busy`) |
//! | `limits.max_concurrent_orders_per_idp` | `100` | 1..=1000000: open orders at each provider separately, besides the overall cap (refusal: `unavailable/provider_busy`) |
//! | `limits.max_starts_per_number_per_hour` | `6` | 1..=10000: orders per person (pseudonym), sliding hour |
//! | `limits.max_starts_per_line_per_hour` | `10` | 1..=10000: orders per caller line, sliding hour |
//! | `limits.max_checks_per_agent_per_hour` | `20` | 1..=10000: orders of checks during the call per agent (their interface; the API token's name on a call without an agent), sliding hour; gate orders do not count |
//! | `limits.max_starts_per_queue_per_minute` | `60` | 1..=100000: orders per queue, sliding minute |
//! | `limits.declined_cool_down` | `30m` | duration, zero = off: no new order for a person this long after they answered in the app that they are not on a call with us |
//! | `audit.retention_days` | `365` | 1..=36500: audit files older than this many days are deleted |
//! | `api.keep_verifications` | `1h` | duration > 0: how long a verification stays readable after its call ended |
//! | `api.max_body` | `16384` | request body limit in bytes, 1024..=1048576 |
//! | `api.tokens.<name>.sha256` | — | **required**: 64 hex digits, the SHA-256 of the bearer token (`callgate token-hash`); no two tokens alike |
//! | `api.tokens.<name>.role` | — | **required**: `agent`, `supervisor` or `ops` |
//! | `api.tokens.<name>.agent` | — | the agent's interface as the queue reports it (`MEMBERINTERFACE`, e.g. `PJSIP/1001`); required for role `agent`, not allowed for the others |
//! | `api.widget_frame_ancestors` | `[]` (`'self'` only) | list of origins (`https://crm.example.com`, `http` only for 127.0.0.1/localhost; a host may start with `*.`) that may show `/widget` in a frame, besides callgate's own; no path, query or repeats |
//! | `api.cors_origins` | `[]` (none) | list of exact origins (same rule, no `*`) whose pages may call `/v1` from the browser (CORS) |
//! | `switchboards.<name>.token_sha256` | — | **required**: 64 hex digits, the SHA-256 of the switchboard's bearer token for `/switchboard/v1`; distinct from every other token |
//! | `switchboards.<name>.queues` | — | **required**: the queues (`[queues.<name>]`) its verifications may name |
//! | `state.kind` | `memory` | `memory` (this process only) or `redis` (shared by several instances; needs `server.pseudonym_key`, the same on every instance) |
//! | `state.instance_id` | host name + `-` + ARI app | 1..=64 of letters, digits, `-`, `_`, `.`; unique per instance |
//! | `state.url` | — | **required** with `redis`: `redis://` or `rediss://` (TLS), secret (may carry a password) |
//! | `state.key_prefix` | `callgate` | like `instance_id`; every key and channel starts with it |
//! | `state.pool_size` | `2` | 1..=32 multiplexed connections |
//! | `state.connect_timeout` / `response_timeout` | `2s` / `1s` | 100ms..=60s / 50ms..=30s |
//! | `state.command_timeout` | `3s` | 100ms..=4s: wait for the owning instance to answer a forwarded start or cancel (below the API's 5 s) |
//! | `state.heartbeat_interval` | `2s` | 100ms..=60s; an instance is lost after three missed beats |
//! | `state.snapshot_ttl` | `60s` | 1s..=1h, at least three heartbeats: a call's snapshot outlives its owner this long |
//! | `state.on_unavailable` | `local_limits` | `local_limits` or `refuse`: new orders while Redis is unreachable |
//! | `switchboards.<name>.feed.url` | — | **required with a feed**: `wss://…` (`ws://` only on 127.0.0.1, [::1] or localhost), no credentials or query |
//! | `switchboards.<name>.feed.token` | — | **required with a feed**: bearer token for the feed (a secret; `${VAR}` allowed) |
//! | `switchboards.<name>.feed.keepalive` | `20s` | 50ms..=5m: ping interval; no frame for two intervals after a ping is a dead link |
//! | `switchboards.<name>.feed.reconnect_min` / `reconnect_max` | `1s` / `60s` | 10ms..=60s / 10ms..=1h, min ≤ max; jittered exponential backoff |
//! | `switchboards.<name>.feed.max_message` | `65536` | 1024..=16777216 bytes; larger messages drop the link |
//! | `switchboards.<name>.feed.max_call_age` | `4h` | 1s..=7d: a call the feed never reports as ended is forgotten after this |
//! | `switchboards.<name>.feed.mapping` | — | **required with a feed**: `generic_json` |
//! | `switchboards.<name>.feed.fields.<event\|call_id\|agent\|queue\|caller>` | the key's own name | where each value is in an event: a field name or a dotted path |
//! | `switchboards.<name>.feed.events.<feed value>` | — | **required, maps some value to `ended`**: `started`, `queued`, `answered`, `transferred` or `ended` |
//! | `webhooks.max_attempts` | `10` | 1..=100 |
//! | `webhooks.initial_backoff` / `max_backoff` | `1s` / `5m` | 10ms..=1h / 10ms..=6h, initial ≤ max |
//! | `webhooks.timeout` | `10s` | 100ms..=120s |
//! | `webhooks.outbox_max` | `10000` | 1..=1000000 |
//! | `webhooks.max_age` | `24h` | 1m..=30d |
//! | `webhooks.targets[i].name` | — | **required**, unique, the queue-name rule |
//! | `webhooks.targets[i].url` | — | **required**: https, or http on 127.0.0.1/[::1]/localhost; no user or password |
//! | `webhooks.targets[i].secret` | — | **required**, secret, at least 16 bytes |
//! | `webhooks.targets[i].queues` | `[]` (all) | configured queue names (any name when `[defaults]` exists), no repeats |
//! | `webhooks.targets[i].events` | `verification_completed`, `fraud_warning` | non-empty list of those and `call_ended` |
//!
//! Queue keys (`[queues.<name>]` and `[defaults]`), defaults as in [`QueuePolicy::with_defaults`]:
//!
//! | key | default | rule |
//! |---|---|---|
//! | `mode` | `before_agent` | `off`, `before_agent`, `during_call`, `both` |
//! | `idp` | the only provider, if exactly one is configured | must name a provider under `[idp]`; required otherwise (not for `off`) |
//! | `languages` | `["sv", "en"]` | non-empty list of `sv`, `en`, `nb`, no repeats; first is the default |
//! | `max_entry_attempts` | `3` | 1..=10 |
//! | `max_orders` | `2` | 1..=5 |
//! | `first_digit_timeout` | `8s` | duration > 0 |
//! | `inter_digit_timeout` | `5s` | duration > 0 |
//! | `verify_timeout` | `120s` | duration > 0 |
//! | `gate_deadline` | `300s` | duration > `verify_timeout + first_digit_timeout` |
//! | `accept` | `["se_personnummer", "se_samordningsnummer"]` | non-empty list of [`Kind`](crate::pnr::Kind) codes |
//! | `accept_10_digits` | `false` | needs a Swedish kind in `accept` |
//! | `user_visible_text` | none | at most 1000 characters; `""` = none |
//! | `pin_code` | `false` | |
//! | `progress_prompts` | `true` | |
//! | `announce_outcome` | `true` | |
//! | `moh_class` | `""` (channel default) | |
//! | `disclose` | `[]` (status only) | list of `name`, `pseudonym`, `masked_number`, `number` |
//! | `prompts.<prompt id>` | catalogue media | `"<media>"` for every language, or a table `<lang> = "<media>"`; media is an ARI URI (`sound:`, `recording:`, …) |
//! | `routes.verified` / `failed` / `unavailable` | — | **required**, `context,extension,priority` |
//! | `routes.skipped` / `interrupted` / `no_agent` | `unavailable` | route |
//! | `routes.after_agent` | hang up | route |
//! | `routes.agent` | — | route; required in modes `during_call` and `both` |
//! | `routes_by_reason.<reason code>` | none | route; keys are [`Reason`](crate::outcome::Reason) codes |
//! | `agent_keys` | `""` (off) | modes `during_call`/`both`: 2 to 8 of `0-9 * #` an agent presses on their phone to start a keypad check |
//!
//! # `[defaults]`
//! When present, `[defaults]` must itself be a complete queue (its three required routes included). It
//! is (a) the policy for queues the dialplan names but the file does not ([`Config::policy_for`]) and
//! (b) the base of every configured queue: a key a queue does not set is taken from `[defaults]`, and
//! the tables `prompts`, `routes` and `routes_by_reason` merge entry by entry (the queue's entry wins).
//! A bad value in `[defaults]` is reported once, at its `defaults.*` path.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::idp::BankIdSettings;
use crate::outcome::Field;
use crate::pbx::ari;
use crate::policy::{QueueName, QueuePolicy};
use crate::secret::Secret;

pub mod duration;
pub mod feed;
mod queue;
mod sections;
mod source;
mod state;
mod walk;
mod webhooks;

#[cfg(test)]
mod tests;

pub use source::{interpolate, ENV_PREFIX, ENV_SEPARATOR};
pub use state::{redis_on_loopback, OnUnavailable, RedisSettings, State, StateKind};
pub use webhooks::{WebhookTarget, Webhooks};

/// Exit code of `check-config` (and of startup) when the configuration has problems (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;
/// Default `step` of a simulator provider.
pub const DEFAULT_SIMULATOR_STEP: Duration = Duration::from_secs(1);
const TOP_KEYS: [&str; 11] = [
    "server",
    "pbx",
    "idp",
    "queues",
    "defaults",
    "limits",
    "api",
    "webhooks",
    "audit",
    "switchboards",
    "state",
];
const NAME_RULE: &str =
    "must be lowercase letters, digits, '-' or '_' (no \"__\"), so environment overrides can address them";

/// One problem in the configuration: the dotted path of the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Issue {
    /// e.g. `queues.support.routes.failed`; empty for problems with the file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub pbx: Pbx,
    pub idps: BTreeMap<String, Idp>,
    pub queues: BTreeMap<String, Arc<QueuePolicy>>,
    /// The complete `[defaults]` policy (named `defaults`), if the file has one.
    pub defaults: Option<Arc<QueuePolicy>>,
    pub limits: Limits,
    pub api: Api,
    /// `[webhooks]`: signed events to CRMs.
    pub webhooks: Webhooks,
    pub audit: AuditSettings,
    /// `[switchboards.<name>]`: hosted switchboards calling the request-node API, by name.
    pub switchboards: BTreeMap<String, Switchboard>,
    /// `[state]`: in memory, or shared with other instances on Redis.
    pub state: State,
}

/// One hosted switchboard allowed to call `/switchboard/v1`. Only its token's SHA-256 is configured.
#[derive(Clone, PartialEq, Eq)]
pub struct Switchboard {
    pub token_sha256: [u8; 32],
    /// The queues (`[queues.<name>]`) its verifications may name.
    pub queues: Vec<String>,
    /// `[switchboards.<name>.feed]`: its call-event websocket, if it has one.
    pub feed: Option<feed::Feed>,
}

impl fmt::Debug for Switchboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Switchboard")
            .field("queues", &self.queues)
            .field("feed", &self.feed)
            .finish_non_exhaustive()
    }
}

/// `[api]`: the agent API's limits and its bearer tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Api {
    /// How long a verification stays readable by id after its call ended.
    pub keep_verifications: Duration,
    /// Largest accepted request body, in bytes.
    pub max_body: usize,
    /// `[api.tokens.<name>]`, by name.
    pub tokens: BTreeMap<String, ApiToken>,
    /// Origins (`scheme://host[:port]`) that may frame `/widget`, besides callgate's own.
    pub widget_frame_ancestors: Vec<String>,
    /// Origins whose pages may call `/v1` from a browser (CORS).
    pub cors_origins: Vec<String>,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            keep_verifications: Duration::from_secs(3600),
            max_body: 16 * 1024,
            tokens: BTreeMap::new(),
            widget_frame_ancestors: Vec::new(),
            cors_origins: Vec::new(),
        }
    }
}

/// One bearer token of the agent API. Only its SHA-256 is configured.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub sha256: [u8; 32],
    pub role: Role,
    /// The agent's interface as the queue reports it (`MEMBERINTERFACE`, e.g. `PJSIP/1001`); set for
    /// role agent only.
    pub agent: Option<String>,
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("role", &self.role)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sees and verifies only the calls it is the agent of.
    Agent,
    /// Sees every call (by queue), starts and cancels checks on any.
    Supervisor,
    /// Sees every call; starts nothing.
    Ops,
}

impl Role {
    pub fn code(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Supervisor => "supervisor",
            Role::Ops => "ops",
        }
    }

    pub fn from_code(code: &str) -> Option<Role> {
        [Role::Agent, Role::Supervisor, Role::Ops]
            .into_iter()
            .find(|r| r.code() == code)
    }
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub listen: SocketAddr,
    pub ops_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub shutdown_grace: Duration,
    /// What a drain does with callers still holding for an order after `shutdown_grace`.
    pub on_shutdown: OnShutdown,
    /// HMAC key for caller pseudonyms. May be empty unless a queue discloses `pseudonym`.
    pub pseudonym_key: Secret,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            ops_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9090)),
            data_dir: PathBuf::from("/var/lib/callgate"),
            shutdown_grace: Duration::from_secs(30),
            on_shutdown: OnShutdown::Interrupt,
            pseudonym_key: Secret::default(),
        }
    }
}

/// What a drain does with calls still in the gate once `shutdown_grace` is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnShutdown {
    /// Cancel their orders and route them `interrupted/restart`.
    Interrupt,
    /// Leave callers who hold for a journalled order in place (hold music, order open) for the next
    /// start to resume; interrupt the others.
    Handover,
}

/// `[pbx]`: which PBX adapter to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pbx {
    Ari(ari::Settings),
}

/// `[idp.<name>]`: an identity provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idp {
    BankId(BankIdSettings),
    /// In-process simulator; `step` is the delay between its simulated order states.
    Simulator {
        step: Duration,
    },
    /// An OpenID CIBA provider (an eID broker).
    Ciba(Box<crate::idp::ciba::CibaSettings>),
    /// In-process CIBA simulator on its own loopback listener.
    CibaSimulator,
}

/// `[limits]`: global bounds on identity orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent_orders: usize,
    pub max_concurrent_orders_per_idp: usize,
    pub max_starts_per_number_per_hour: u32,
    pub max_starts_per_line_per_hour: u32,
    pub max_checks_per_agent_per_hour: u32,
    pub max_starts_per_queue_per_minute: u32,
    pub declined_cool_down: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
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

/// `[audit]`: how long the audit trail is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    pub retention_days: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            retention_days: crate::audit::DEFAULT_RETENTION_DAYS,
        }
    }
}

impl Config {
    /// The policy for a queue the dialplan names: the configured queue (exact, case-sensitive name), else
    /// `[defaults]` under that name, else `None` (the call is not gated by callgate's policy).
    pub fn policy_for(&self, queue: &str) -> Option<Arc<QueuePolicy>> {
        if let Some(p) = self.queues.get(queue) {
            return Some(Arc::clone(p));
        }
        self.defaults.as_ref().map(|d| {
            let mut p = QueuePolicy::clone(d);
            p.name = QueueName(queue.to_owned());
            Arc::new(p)
        })
    }
}

/// Loads a configuration from TOML text, override variables `env` (only `CALLGATE__…` names are used)
/// and a lookup for `${VAR}` references.
pub fn load(
    toml_text: &str,
    env: &HashMap<String, String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<Issue>> {
    let tree = source::raw_tree(toml_text, env).map_err(|message| {
        vec![Issue {
            path: String::new(),
            message,
        }]
    })?;
    let mut ctx = walk::Ctx::new(lookup);
    ctx.known_keys("", &tree, &TOP_KEYS);
    let section =
        |ctx: &mut walk::Ctx<'_>, key: &str| tree.get(key).and_then(|v| ctx.table(key, v));

    let server_t = section(&mut ctx, "server");
    let server = sections::server(&mut ctx, server_t);
    let pbx_t = section(&mut ctx, "pbx");
    let pbx = sections::pbx(&mut ctx, pbx_t);
    let idp_t = section(&mut ctx, "idp");
    let idps = sections::idps(&mut ctx, idp_t);
    let limits_t = section(&mut ctx, "limits");
    let limits = sections::limits(&mut ctx, limits_t);
    let api_t = section(&mut ctx, "api");
    let api = sections::api(&mut ctx, api_t);
    let audit_t = section(&mut ctx, "audit");
    let audit = sections::audit(&mut ctx, audit_t);
    let state_t = section(&mut ctx, "state");
    let state = state::state(&mut ctx, state_t);
    if matches!(state.kind, StateKind::Redis(_)) && server.pseudonym_key.is_empty() {
        // Limits key persons by pseudonym and shared records are sealed with a key derived from it:
        // every instance must have the same one.
        ctx.issue(
            "server.pseudonym_key",
            "required with state.kind = \"redis\": every instance must use the same key",
        );
    }

    let defaults_spec =
        section(&mut ctx, "defaults").map(|t| queue::parse(&mut ctx, "defaults", t));
    let defaults = defaults_spec.clone().and_then(|spec| {
        queue::finish(&mut ctx, "defaults", "defaults", spec, &idps, false).map(Arc::new)
    });
    let base = defaults_spec.unwrap_or_default();

    let mut queues = BTreeMap::new();
    if let Some(qt) = section(&mut ctx, "queues") {
        for name in walk::sorted_keys(qt) {
            let path = walk::join("queues", name);
            if !valid_name(name) {
                ctx.issue(&path, format!("queue names {NAME_RULE}"));
                continue;
            }
            let Some(t) = ctx.table(&path, &qt[name]) else {
                continue;
            };
            let spec = queue::parse(&mut ctx, &path, t).over(&base);
            let inherits = tree.contains_key("defaults");
            if let Some(p) = queue::finish(&mut ctx, &path, name, spec, &idps, inherits) {
                queues.insert(name.clone(), Arc::new(p));
            }
        }
    }

    let webhooks_t = section(&mut ctx, "webhooks");
    let webhooks = webhooks::webhooks(&mut ctx, webhooks_t, &queues, tree.contains_key("defaults"));

    if server.pseudonym_key.is_empty() {
        let disclosing: Vec<&str> = queues
            .iter()
            .chain(defaults.as_ref().map(|d| (&d.name.0, d)))
            .filter(|(_, p)| p.disclose.allows(Field::Pseudonym))
            .map(|(n, _)| n.as_str())
            .collect();
        if !disclosing.is_empty() {
            ctx.issue(
                "server.pseudonym_key",
                format!(
                    "required because {} disclose \"pseudonym\"",
                    disclosing.join(", ")
                ),
            );
        }
    }

    let switchboards_t = section(&mut ctx, "switchboards");
    let switchboards = sections::switchboards(&mut ctx, switchboards_t, &queues, &api);

    let mut issues = ctx.issues;
    let mut seen = std::collections::HashSet::new();
    issues.retain(|i| seen.insert(i.clone()));
    if issues.is_empty() {
        Ok(Config {
            server,
            pbx,
            idps,
            queues,
            defaults,
            limits,
            api,
            webhooks,
            audit,
            switchboards,
            state,
        })
    } else {
        Err(issues)
    }
}

/// Loads a file, with overrides and `${VAR}` values from the process environment.
pub fn load_file(path: &Path) -> Result<Config, Vec<Issue>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Issue {
            path: String::new(),
            message: format!("cannot read {}: {e}", path.display()),
        }]
    })?;
    let env: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
        .collect();
    load(&text, &env, &|name| std::env::var(name).ok())
}

/// `callgate check-config FILE`: the report to print and the exit code (0, or [`EXIT_CONFIG`] with one
/// issue per line).
pub fn check_config(path: &Path) -> (String, i32) {
    match load_file(path) {
        Ok(cfg) => {
            let mut out = summary(&cfg);
            for w in warnings(&cfg) {
                out.push_str(&format!("warning: {w}\n"));
            }
            (out, 0)
        }
        Err(issues) => {
            let mut out = String::new();
            for issue in &issues {
                out.push_str(&issue.to_string());
                out.push('\n');
            }
            (out, EXIT_CONFIG)
        }
    }
}

/// What is valid but probably not meant, as `path: message` lines; `check-config` prints them and
/// still succeeds.
pub fn warnings(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if let StateKind::Redis(r) = &cfg.state.kind {
        let url = r.url.expose();
        if url.starts_with("redis://") && !redis_on_loopback(url) {
            out.push("state.url: plain redis:// to another host sends the password and key names in clear; use rediss://".to_owned());
        }
    }
    for (name, idp) in &cfg.idps {
        let Idp::Ciba(c) = idp else {
            continue;
        };
        let Some(details) = c.authorization_details.as_deref() else {
            continue;
        };
        // A call initiator written as a value rather than the placeholder: the provider is told the
        // same direction for every call, inbound or outbound.
        let fixed = details.contains("callInitiator")
            && !details.contains("{call_initiator}")
            && ["\"user\"", "\"RP\"", "\"rp\""]
                .iter()
                .any(|v| details.contains(v));
        if fixed {
            out.push(format!(
                "idp.{name}.authorization_details: the call initiator is fixed; write \"{{call_initiator}}\" so that each call tells the provider who called whom"
            ));
        }
    }
    out
}

/// One line per queue (and `[defaults]`): name, mode, idp, languages, the three status routes and the
/// disclosed fields.
pub fn summary(cfg: &Config) -> String {
    let mut out = String::new();
    let line = |label: &str, p: &QueuePolicy| {
        let langs: Vec<&str> = p.languages.iter().map(|l| l.code()).collect();
        let disclose: Vec<&str> = p.disclose.fields().iter().map(|f| f.code()).collect();
        format!(
            "{label}: mode={} idp={} languages={} verified={} failed={} unavailable={} disclose={}\n",
            p.mode.code(),
            if p.idp.is_empty() { "-" } else { &p.idp },
            langs.join(","),
            p.routes.verified,
            p.routes.failed,
            p.routes.unavailable,
            if disclose.is_empty() {
                "none".to_owned()
            } else {
                disclose.join(",")
            },
        )
    };
    for (name, p) in &cfg.queues {
        out.push_str(&line(&format!("queue {name}"), p));
    }
    if let Some(d) = &cfg.defaults {
        out.push_str(&line("[defaults]", d));
    }
    if out.is_empty() {
        out.push_str("no queues configured\n");
    }
    let roles: Vec<String> = [Role::Agent, Role::Supervisor, Role::Ops]
        .into_iter()
        .map(|r| {
            let n = cfg.api.tokens.values().filter(|t| t.role == r).count();
            format!("{}={n}", r.code())
        })
        .collect();
    out.push_str(&format!(
        "api: listen={} tokens={} ({}) keep_verifications={}s max_body={} widget_frame_ancestors={} cors_origins={}\n",
        cfg.server.listen,
        cfg.api.tokens.len(),
        roles.join(","),
        cfg.api.keep_verifications.as_secs(),
        cfg.api.max_body,
        list_or_none(&cfg.api.widget_frame_ancestors),
        list_or_none(&cfg.api.cors_origins),
    ));
    if !cfg.webhooks.targets.is_empty() {
        let targets: Vec<&str> = cfg
            .webhooks
            .targets
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        out.push_str(&format!(
            "webhooks: targets={} max_attempts={} outbox_max={}\n",
            targets.join(","),
            cfg.webhooks.max_attempts,
            cfg.webhooks.outbox_max,
        ));
    }
    for (name, sb) in &cfg.switchboards {
        let feed = match &sb.feed {
            // The URL only: the token never appears.
            Some(f) => format!(
                "{} keepalive={} max_call_age={}",
                f.url,
                duration::format(f.keepalive),
                duration::format(f.max_call_age)
            ),
            None => "-".to_owned(),
        };
        out.push_str(&format!(
            "switchboard {name}: queues={} feed={feed}\n",
            list_or_none(&sb.queues),
        ));
    }
    out
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// Queue and provider names: lowercase ASCII letters, digits, `-`, `_`; not empty; no `__`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains("__")
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}
