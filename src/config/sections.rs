//! `[server]`, `[pbx]`, `[idp.<name>]`, `[limits]`, `[api]` and `[audit]`: reading and checking each section.
//!
//! Invariant: every reader starts from the documented default and only replaces what the table sets;
//! file-valued keys are checked to exist so a missing certificate is reported before startup.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::config::{Map, Value};
use reqwest::Url;

use super::walk::{join, sorted_keys, Ctx};
use super::{
    valid_name, Api, ApiToken, AuditSettings, Idp, Limits, OnShutdown, Pbx, Role, Server,
    Switchboard, NAME_RULE,
};
use crate::idp::ciba::CibaSettings;
use crate::idp::{BankIdSettings, ClientIdentity};
use crate::pbx::ari;
use crate::policy::QueuePolicy;
use crate::secret::Secret;

pub const SERVER_KEYS: [&str; 6] = [
    "listen",
    "ops_listen",
    "data_dir",
    "shutdown_grace",
    "on_shutdown",
    "pseudonym_key",
];
pub const PBX_KEYS: [&str; 2] = ["kind", "ari"];
pub const ARI_KEYS: [&str; 8] = [
    "url",
    "app",
    "username",
    "password",
    "request_timeout",
    "ping_interval",
    "reconnect_min",
    "reconnect_max",
];
pub const BANKID_KEYS: [&str; 9] = [
    "kind",
    "url",
    "client_p12",
    "client_p12_password",
    "client_cert",
    "client_key",
    "server_ca",
    "request_timeout",
    "connect_timeout",
];
pub const SIMULATOR_KEYS: [&str; 2] = ["kind", "step"];
pub const CIBA_KEYS: [&str; 17] = [
    "kind",
    "client_key",
    "client_key_id",
    "word_pair",
    "issuer",
    "client_id",
    "client_secret",
    "login_hint",
    "acr_values",
    "binding_message",
    "requested_expiry",
    "authorization_details",
    "number_claim",
    "declined_call_description",
    "server_ca",
    "request_timeout",
    "connect_timeout",
];
pub const CIBA_SIMULATOR_KEYS: [&str; 1] = ["kind"];
pub const LIMITS_KEYS: [&str; 7] = [
    "max_concurrent_orders",
    "max_concurrent_orders_per_idp",
    "max_starts_per_number_per_hour",
    "max_starts_per_line_per_hour",
    "max_checks_per_agent_per_hour",
    "max_starts_per_queue_per_minute",
    "declined_cool_down",
];
pub const API_KEYS: [&str; 5] = [
    "keep_verifications",
    "max_body",
    "tokens",
    "widget_frame_ancestors",
    "cors_origins",
];
pub const TOKEN_KEYS: [&str; 3] = ["sha256", "role", "agent"];
/// Bounds of `api.max_body`, in bytes.
pub const MAX_BODY_RANGE: (u64, u64) = (1024, 1024 * 1024);
/// Shortest accepted `server.pseudonym_key`, in bytes.
pub const MIN_PSEUDONYM_KEY: usize = 16;

pub fn server(ctx: &mut Ctx<'_>, t: Option<&Map<String, Value>>) -> Server {
    let mut s = Server::default();
    let Some(t) = t else { return s };
    ctx.known_keys("server", t, &SERVER_KEYS);
    if let Some(v) = t.get("listen") {
        s.listen = ctx
            .parsed("server.listen", v, socket_addr)
            .unwrap_or(s.listen);
    }
    if let Some(v) = t.get("ops_listen") {
        s.ops_listen = ctx
            .parsed("server.ops_listen", v, socket_addr)
            .unwrap_or(s.ops_listen);
    }
    if let Some(v) = t.get("data_dir") {
        s.data_dir = ctx
            .parsed("server.data_dir", v, |x| {
                let p = PathBuf::from(x);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(format!("{x:?} is not an absolute path"))
                }
            })
            .unwrap_or(s.data_dir);
    }
    if let Some(v) = t.get("shutdown_grace") {
        s.shutdown_grace = ctx
            .duration("server.shutdown_grace", v, true)
            .unwrap_or(s.shutdown_grace);
    }
    if let Some(v) = t.get("on_shutdown") {
        s.on_shutdown = ctx
            .parsed("server.on_shutdown", v, |x| match x {
                "interrupt" => Ok(OnShutdown::Interrupt),
                "handover" => Ok(OnShutdown::Handover),
                _ => Err(format!("{x:?} is not one of \"interrupt\", \"handover\"")),
            })
            .unwrap_or(s.on_shutdown);
    }
    if let Some(v) = t.get("pseudonym_key") {
        if let Some(key) = ctx.text("server.pseudonym_key", v) {
            if !key.is_empty() && key.len() < MIN_PSEUDONYM_KEY {
                ctx.issue(
                    "server.pseudonym_key",
                    format!("must be at least {MIN_PSEUDONYM_KEY} bytes long"),
                );
            }
            s.pseudonym_key = Secret::new(key);
        }
    }
    s
}

fn socket_addr(x: &str) -> Result<SocketAddr, String> {
    x.parse()
        .map_err(|_| format!("{x:?} is not an address like \"127.0.0.1:8080\""))
}

pub fn pbx(ctx: &mut Ctx<'_>, t: Option<&Map<String, Value>>) -> Pbx {
    let mut a = ari::Settings::default();
    let empty = Map::new();
    let t = t.unwrap_or(&empty);
    ctx.known_keys("pbx", t, &PBX_KEYS);
    if let Some(v) = t.get("kind") {
        if let Some(kind) = ctx.text("pbx.kind", v) {
            if kind != "ari" {
                ctx.issue("pbx.kind", format!("unknown kind {kind:?} (known: ari)"));
            }
        }
    }
    let at = t.get("ari").and_then(|v| ctx.table("pbx.ari", v));
    let mut password_reported = false;
    if let Some(at) = at {
        ctx.known_keys("pbx.ari", at, &ARI_KEYS);
        if let Some(v) = at.get("url") {
            a.url = ctx.parsed("pbx.ari.url", v, ari_url).unwrap_or(a.url);
        }
        for (key, field) in [("app", &mut a.app), ("username", &mut a.username)] {
            if let Some(v) = at.get(key) {
                let p = join("pbx.ari", key);
                if let Some(x) = ctx.text(&p, v) {
                    if x.is_empty() || x.contains(|c: char| c.is_whitespace() || c == ':') {
                        ctx.issue(p, "must be non-empty, without spaces or ':'");
                    } else {
                        *field = x;
                    }
                }
            }
        }
        if let Some(v) = at.get("password") {
            match ctx.text("pbx.ari.password", v) {
                Some(x) => a.password = Secret::new(x),
                None => password_reported = true,
            }
        }
        for (key, field) in [
            ("request_timeout", &mut a.request_timeout),
            ("ping_interval", &mut a.ping_interval),
            ("reconnect_min", &mut a.reconnect_min),
            ("reconnect_max", &mut a.reconnect_max),
        ] {
            if let Some(v) = at.get(key) {
                if let Some(d) = ctx.duration(&join("pbx.ari", key), v, false) {
                    *field = d;
                }
            }
        }
    }
    if a.password.is_empty() && !password_reported {
        ctx.issue(
            "pbx.ari.password",
            "required (e.g. password = \"${ARI_PASSWORD}\")",
        );
    }
    if a.reconnect_min > a.reconnect_max {
        ctx.issue(
            "pbx.ari.reconnect_min",
            "must not be longer than reconnect_max",
        );
    }
    Pbx::Ari(a)
}

/// The base URL of Asterisk's HTTP server, stored without a trailing `/` (the client adds `/ari`).
fn ari_url(x: &str) -> Result<String, String> {
    let u = Url::parse(x).map_err(|e| format!("{x:?} is not a URL ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!("{x:?} is not an http(s) URL"));
    }
    if !matches!(u.path(), "" | "/") || u.query().is_some() || !u.username().is_empty() {
        return Err(format!(
            "{x:?}: give only scheme, host and port (the /ari prefix is added), e.g. \"http://127.0.0.1:8088\""
        ));
    }
    Ok(x.trim_end_matches('/').to_owned())
}

pub fn idps(ctx: &mut Ctx<'_>, t: Option<&Map<String, Value>>) -> BTreeMap<String, Idp> {
    let mut out = BTreeMap::new();
    let Some(t) = t else { return out };
    for name in sorted_keys(t) {
        let path = join("idp", name);
        if !valid_name(name) {
            ctx.issue(&path, format!("provider names {NAME_RULE}"));
            continue;
        }
        let Some(it) = ctx.table(&path, &t[name]) else {
            continue;
        };
        let kind = match it.get("kind") {
            Some(v) => ctx.text(&join(&path, "kind"), v),
            None => {
                ctx.issue(
                    join(&path, "kind"),
                    "required (bankid, simulator, ciba or ciba_simulator)",
                );
                None
            }
        };
        let idp = match kind.as_deref() {
            Some("bankid") => bankid(ctx, &path, it).map(Idp::BankId),
            Some("simulator") => {
                ctx.known_keys(&path, it, &SIMULATOR_KEYS);
                let mut step = super::DEFAULT_SIMULATOR_STEP;
                if let Some(v) = it.get("step") {
                    step = ctx.duration(&join(&path, "step"), v, true).unwrap_or(step);
                }
                Some(Idp::Simulator { step })
            }
            Some("ciba") => ciba(ctx, &path, it).map(|s| Idp::Ciba(Box::new(s))),
            Some("ciba_simulator") => {
                ctx.known_keys(&path, it, &CIBA_SIMULATOR_KEYS);
                Some(Idp::CibaSimulator)
            }
            Some(other) => {
                ctx.issue(
                    join(&path, "kind"),
                    format!(
                        "unknown kind {other:?} (known: bankid, simulator, ciba, ciba_simulator)"
                    ),
                );
                None
            }
            None => None,
        };
        if let Some(idp) = idp {
            out.insert(name.clone(), idp);
        }
    }
    out
}

fn bankid(ctx: &mut Ctx<'_>, path: &str, t: &Map<String, Value>) -> Option<BankIdSettings> {
    ctx.known_keys(path, t, &BANKID_KEYS);
    let mut s = BankIdSettings::default();
    let mut ok = true;
    let url_path = join(path, "url");
    // With a bad url it is unknown which identity rules apply: those checks are skipped.
    let mut url_known = true;
    if let Some(v) = t.get("url") {
        match ctx.parsed(&url_path, v, bankid_url) {
            Some(u) => s.url = u,
            None => {
                ok = false;
                url_known = false;
            }
        }
    }
    let https = s.url.starts_with("https://");
    for (key, field) in [
        ("request_timeout", &mut s.request_timeout),
        ("connect_timeout", &mut s.connect_timeout),
    ] {
        if let Some(v) = t.get(key) {
            match ctx.duration(&join(path, key), v, false) {
                Some(d) => *field = d,
                None => ok = false,
            }
        }
    }
    // Over plain http the file keys are rejected below, so their files are not looked for.
    let check_files = https || !url_known;
    let mut file = |ctx: &mut Ctx<'_>, key: &str| -> Option<PathBuf> {
        let p = join(path, key);
        let v = t.get(key).filter(|_| check_files)?;
        let text = ctx.text(&p, v)?;
        match existing_file(Path::new(&text)) {
            Ok(()) => Some(PathBuf::from(text)),
            Err(message) => {
                ctx.issue(p, message);
                ok = false;
                None
            }
        }
    };
    let p12 = file(ctx, "client_p12");
    let cert = file(ctx, "client_cert");
    let key = file(ctx, "client_key");
    let ca = file(ctx, "server_ca");
    let password = match t.get("client_p12_password") {
        Some(v) => ctx
            .text(&join(path, "client_p12_password"), v)
            .map(Secret::new),
        None => Some(Secret::default()),
    };
    // Which identity keys are written, whether or not their files exist.
    let has = |k: &str| t.contains_key(k);
    let written_p12 = has("client_p12");
    let written_pem = has("client_cert") || has("client_key");
    if url_known && https {
        if written_p12 && written_pem {
            ctx.issue(
                join(path, "client_p12"),
                "give either client_p12 or client_cert + client_key, not both",
            );
            ok = false;
        } else if !written_p12 && !written_pem {
            ctx.issue(
                join(path, "client_p12"),
                "an https url needs a client identity: client_p12 or client_cert + client_key",
            );
            ok = false;
        } else if written_pem {
            for (k, other) in [("client_cert", "client_key"), ("client_key", "client_cert")] {
                if !has(k) {
                    ctx.issue(join(path, k), format!("required together with {other}"));
                    ok = false;
                }
            }
        }
        if !has("server_ca") {
            ctx.issue(
                join(path, "server_ca"),
                "required with an https url (the BankID root CA, PEM)",
            );
            ok = false;
        }
        if has("client_p12_password") && !written_p12 {
            ctx.issue(
                join(path, "client_p12_password"),
                "has no effect without client_p12",
            );
            ok = false;
        }
    } else if url_known {
        for k in [
            "client_p12",
            "client_p12_password",
            "client_cert",
            "client_key",
            "server_ca",
        ] {
            if has(k) {
                ctx.issue(
                    join(path, k),
                    "has no effect with a plain http url (only the loopback simulator uses http)",
                );
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    s.server_ca = ca;
    s.identity = match (p12, cert, key) {
        (Some(path), None, None) => Some(ClientIdentity::Pkcs12 {
            path,
            password: password.unwrap_or_default(),
        }),
        (None, Some(cert), Some(key)) => Some(ClientIdentity::Pem { cert, key }),
        _ => None,
    };
    Some(s)
}

fn ciba(ctx: &mut Ctx<'_>, path: &str, t: &Map<String, Value>) -> Option<CibaSettings> {
    ctx.known_keys(path, t, &CIBA_KEYS);
    let before = ctx.issues.len();
    let mut s = CibaSettings::default();
    let key = |k: &str| join(path, k);
    match t.get("issuer") {
        Some(v) => {
            if let Some(u) = ctx.parsed(&key("issuer"), v, ciba_issuer) {
                s.issuer = u;
            }
        }
        None => ctx.issue(key("issuer"), "required (the provider's issuer URL)"),
    }
    for (k, field) in [("client_id", &mut s.client_id)] {
        match t.get(k) {
            Some(v) => *field = ctx.text(&key(k), v).unwrap_or_default(),
            None => ctx.issue(key(k), "required"),
        }
    }
    match (t.get("client_secret"), t.get("client_key")) {
        (Some(_), Some(_)) => ctx.issue(
            key("client_key"),
            "give either client_secret (client_secret_basic) or client_key (private_key_jwt), not both",
        ),
        (Some(v), None) => {
            s.client_secret = Secret::new(ctx.text(&key("client_secret"), v).unwrap_or_default())
        }
        (None, Some(v)) => {
            if let Some(text) = ctx.text(&key("client_key"), v) {
                match existing_file(Path::new(&text)) {
                    Ok(()) => s.client_key = Some(PathBuf::from(text)),
                    Err(message) => ctx.issue(key("client_key"), message),
                }
            }
        }
        (None, None) => ctx.issue(
            key("client_secret"),
            "required: client_secret (client_secret_basic) or client_key (private_key_jwt)",
        ),
    }
    if let Some(v) = t.get("client_key_id") {
        s.client_key_id = ctx.text(&key("client_key_id"), v);
    }
    if let Some(v) = t.get("login_hint") {
        if let Some(h) = ctx.parsed(&key("login_hint"), v, |h| {
            if h.contains("{number}") {
                Ok(h.to_owned())
            } else {
                Err(format!("{h:?} must contain {{number}}"))
            }
        }) {
            s.login_hint = h;
        }
    }
    if let Some(v) = t.get("authorization_details") {
        s.authorization_details = ctx.parsed(&key("authorization_details"), v, |d| {
            let filled = d.replace("{call_initiator}", "RP");
            match serde_json::from_str::<serde_json::Value>(&filled) {
                Ok(serde_json::Value::Array(_)) => Ok(d.to_owned()),
                Ok(_) => Err("must be a JSON array of objects".to_owned()),
                Err(e) => Err(format!(
                    "not JSON once {{call_initiator}} is filled in ({e})"
                )),
            }
        });
    }
    for (k, field) in [
        ("acr_values", &mut s.acr_values),
        ("binding_message", &mut s.binding_message),
        (
            "declined_call_description",
            &mut s.declined_call_description,
        ),
    ] {
        if let Some(v) = t.get(k) {
            *field = ctx.text(&key(k), v).filter(|x| !x.is_empty());
        }
    }
    if let Some(v) = t.get("word_pair") {
        s.word_pair = ctx.boolean(&key("word_pair"), v).unwrap_or(false);
    }
    if let Some(v) = t.get("number_claim") {
        if let Some(c) = ctx.text(&key("number_claim"), v) {
            s.number_claim = c;
        }
    }
    if let Some(v) = t.get("requested_expiry") {
        s.requested_expiry = ctx.number(&key("requested_expiry"), v, 1, 86_400);
    }
    for (k, field) in [
        ("request_timeout", &mut s.request_timeout),
        ("connect_timeout", &mut s.connect_timeout),
    ] {
        if let Some(v) = t.get(k) {
            if let Some(d) = ctx.duration(&key(k), v, false) {
                *field = d;
            }
        }
    }
    let https = s.issuer.starts_with("https://");
    match t.get("server_ca") {
        Some(v) if https => {
            if let Some(text) = ctx.text(&key("server_ca"), v) {
                match existing_file(Path::new(&text)) {
                    Ok(()) => s.server_ca = Some(PathBuf::from(text)),
                    Err(message) => ctx.issue(key("server_ca"), message),
                }
            }
        }
        Some(_) => ctx.issue(
            key("server_ca"),
            "has no effect with a plain http issuer (only a loopback simulator uses http)",
        ),
        None if https => ctx.issue(
            key("server_ca"),
            "required with an https issuer (the CA certificates the provider's TLS chains to, PEM)",
        ),
        None => {}
    }
    (ctx.issues.len() == before).then_some(s)
}

/// A CIBA issuer URL: https anywhere, plain http only on loopback; no trailing `/`.
fn ciba_issuer(x: &str) -> Result<String, String> {
    bankid_url(x).map(|u| u.trim_end_matches('/').to_owned())
}

/// The BankID base URL: https anywhere, plain http only on loopback; a missing trailing `/` is added
/// (relative endpoint paths are joined onto it).
fn bankid_url(x: &str) -> Result<String, String> {
    let u = Url::parse(x).map_err(|e| format!("{x:?} is not a URL ({e})"))?;
    match u.scheme() {
        "https" => {}
        "http" => {
            if !matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")) {
                return Err(format!(
                    "{x:?}: plain http is allowed only for a loopback simulator (127.0.0.1 or localhost)"
                ));
            }
        }
        _ => return Err(format!("{x:?} is not an https URL")),
    }
    if u.query().is_some() || !u.username().is_empty() {
        return Err(format!("{x:?}: no query or credentials in the URL"));
    }
    let mut s = x.to_owned();
    if !s.ends_with('/') {
        s.push('/');
    }
    Ok(s)
}

fn existing_file(p: &Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{} is not a file", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("file {} does not exist", p.display()))
        }
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

pub fn limits(ctx: &mut Ctx<'_>, t: Option<&Map<String, Value>>) -> Limits {
    let mut l = Limits::default();
    let Some(t) = t else { return l };
    ctx.known_keys("limits", t, &LIMITS_KEYS);
    for (key, field) in [
        ("max_concurrent_orders", &mut l.max_concurrent_orders),
        (
            "max_concurrent_orders_per_idp",
            &mut l.max_concurrent_orders_per_idp,
        ),
    ] {
        if let Some(v) = t.get(key) {
            if let Some(n) = ctx.number(&join("limits", key), v, 1, 1_000_000) {
                *field = usize::try_from(n).unwrap_or(*field);
            }
        }
    }
    for (key, field, max) in [
        (
            "max_starts_per_number_per_hour",
            &mut l.max_starts_per_number_per_hour,
            10_000,
        ),
        (
            "max_starts_per_line_per_hour",
            &mut l.max_starts_per_line_per_hour,
            10_000,
        ),
        (
            "max_checks_per_agent_per_hour",
            &mut l.max_checks_per_agent_per_hour,
            10_000,
        ),
        (
            "max_starts_per_queue_per_minute",
            &mut l.max_starts_per_queue_per_minute,
            100_000,
        ),
    ] {
        if let Some(v) = t.get(key) {
            if let Some(n) = ctx.number(&join("limits", key), v, 1, max) {
                *field = u32::try_from(n).unwrap_or(*field);
            }
        }
    }
    if let Some(v) = t.get("declined_cool_down") {
        if let Some(d) = ctx.duration("limits.declined_cool_down", v, true) {
            l.declined_cool_down = d;
        }
    }
    l
}

pub fn audit(ctx: &mut Ctx<'_>, t: Option<&Map<String, Value>>) -> AuditSettings {
    let mut a = AuditSettings::default();
    let Some(t) = t else { return a };
    ctx.known_keys("audit", t, &["retention_days"]);
    if let Some(v) = t.get("retention_days") {
        if let Some(n) = ctx.number("audit.retention_days", v, 1, 36_500) {
            a.retention_days = u32::try_from(n).unwrap_or(a.retention_days);
        }
    }
    a
}

pub fn api(ctx: &mut Ctx<'_>, t: Option<&Map<String, Value>>) -> Api {
    let mut a = Api::default();
    let Some(t) = t else { return a };
    ctx.known_keys("api", t, &API_KEYS);
    if let Some(v) = t.get("keep_verifications") {
        a.keep_verifications = ctx
            .duration("api.keep_verifications", v, false)
            .unwrap_or(a.keep_verifications);
    }
    if let Some(v) = t.get("max_body") {
        let (min, max) = MAX_BODY_RANGE;
        if let Some(n) = ctx.number("api.max_body", v, min, max) {
            a.max_body = usize::try_from(n).unwrap_or(a.max_body);
        }
    }
    if let Some(v) = t.get("widget_frame_ancestors") {
        a.widget_frame_ancestors = origins(ctx, "api.widget_frame_ancestors", v, true);
    }
    if let Some(v) = t.get("cors_origins") {
        a.cors_origins = origins(ctx, "api.cors_origins", v, false);
    }
    let Some(tt) = t.get("tokens").and_then(|v| ctx.table("api.tokens", v)) else {
        return a;
    };
    for name in sorted_keys(tt) {
        let path = join("api.tokens", name);
        if !valid_name(name) {
            ctx.issue(&path, format!("token names {NAME_RULE}"));
            continue;
        }
        let Some(it) = ctx.table(&path, &tt[name]) else {
            continue;
        };
        if let Some(token) = api_token(ctx, &path, it) {
            if let Some((other, _)) = a.tokens.iter().find(|(_, o)| o.sha256 == token.sha256) {
                ctx.issue(
                    join(&path, "sha256"),
                    format!("the same hash as api.tokens.{other}: each token must be distinct"),
                );
                continue;
            }
            a.tokens.insert(name.clone(), token);
        }
    }
    a
}

/// A list of web origins, each normalised to `scheme://host[:port]`; problems at `path[i]`.
fn origins(ctx: &mut Ctx<'_>, path: &str, v: &Value, wildcard: bool) -> Vec<String> {
    let Some(items) = ctx.list(path, v) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        match origin(item, wildcard) {
            Ok(o) if out.contains(&o) => ctx.issue(at, format!("{o} is listed twice")),
            Ok(o) => out.push(o),
            Err(message) => ctx.issue(at, message),
        }
    }
    out
}

/// `https://host[:port]` (http only on loopback names), lowercased, without a default port. With
/// `wildcard`, the host may start with `*.` (as CSP allows).
pub fn origin(x: &str, wildcard: bool) -> Result<String, String> {
    let shape =
        "expected an origin such as \"https://crm.example.com\" (scheme, host and port only)";
    if x.chars()
        .any(|c| c.is_whitespace() || matches!(c, ';' | ',' | '\'' | '"'))
    {
        return Err(shape.to_owned());
    }
    let (probe, star) = match x.split_once("://*.") {
        Some((scheme, rest)) if wildcard => (format!("{scheme}://wildcard.{rest}"), true),
        Some(_) => return Err(format!("{shape}; no wildcards here")),
        None => (x.to_owned(), false),
    };
    let url = Url::parse(&probe).map_err(|_| shape.to_owned())?;
    let host = match url.host_str() {
        Some(h) if !h.is_empty() => h.to_owned(),
        _ => return Err(shape.to_owned()),
    };
    if !url.username().is_empty()
        || url.password().is_some()
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(shape.to_owned());
    }
    let loopback = matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]");
    match url.scheme() {
        "https" => {}
        "http" if loopback && !star => {}
        "http" => return Err("must be https (http only for 127.0.0.1 or localhost)".to_owned()),
        _ => return Err(shape.to_owned()),
    }
    let host = if star {
        format!("*.{}", host.trim_start_matches("wildcard."))
    } else {
        host
    };
    Ok(match url.port() {
        Some(p) => format!("{}://{host}:{p}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

fn api_token(ctx: &mut Ctx<'_>, path: &str, t: &Map<String, Value>) -> Option<ApiToken> {
    ctx.known_keys(path, t, &TOKEN_KEYS);
    let sha256 = match t.get("sha256") {
        Some(v) => ctx.parsed(&join(path, "sha256"), v, sha256_hex),
        None => {
            ctx.issue(
                join(path, "sha256"),
                "required: the SHA-256 of the token in hex (callgate token-hash)",
            );
            None
        }
    };
    let role = match t.get("role") {
        Some(v) => ctx.parsed(&join(path, "role"), v, |x| {
            Role::from_code(x)
                .ok_or_else(|| format!("{x:?} is not one of \"agent\", \"supervisor\", \"ops\""))
        }),
        None => {
            ctx.issue(join(path, "role"), "required (agent, supervisor or ops)");
            None
        }
    };
    let agent_path = join(path, "agent");
    let agent = match t.get("agent") {
        Some(v) => match ctx.text(&agent_path, v) {
            Some(x) if x.is_empty() || x.contains(char::is_whitespace) => {
                ctx.issue(
                    &agent_path,
                    "must be non-empty, without spaces (e.g. \"PJSIP/1001\")",
                );
                return None;
            }
            Some(x) => Some(x),
            None => return None,
        },
        None => None,
    };
    let role = role?;
    match (role, &agent) {
        (Role::Agent, None) => {
            ctx.issue(
                &agent_path,
                "required for role agent: the agent's interface as the queue reports it (e.g. \"PJSIP/1001\")",
            );
            return None;
        }
        (Role::Supervisor | Role::Ops, Some(_)) => {
            ctx.issue(&agent_path, "only for role agent");
            return None;
        }
        _ => {}
    }
    Some(ApiToken {
        sha256: sha256?,
        role,
        agent,
    })
}

/// 64 hex digits (either case) → 32 bytes. The message never quotes the value.
fn sha256_hex(x: &str) -> Result<[u8; 32], String> {
    let err =
        || "expected 64 hex digits (the SHA-256 of the token; see callgate token-hash)".to_owned();
    let bytes = x.as_bytes();
    if bytes.len() != 64 {
        return Err(err());
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or_else(err)?;
        let lo = (pair[1] as char).to_digit(16).ok_or_else(err)?;
        out[i] = u8::try_from(hi * 16 + lo).map_err(|_| err())?;
    }
    Ok(out)
}

/// Keys of `[switchboards.<name>]`.
pub const SWITCHBOARD_KEYS: [&str; 3] = ["token_sha256", "queues", "feed"];

/// `[switchboards.<name>]`: a token hash (distinct from every other token) and the queues it may use.
pub fn switchboards(
    ctx: &mut Ctx<'_>,
    t: Option<&Map<String, Value>>,
    queues: &BTreeMap<String, Arc<QueuePolicy>>,
    api: &Api,
) -> BTreeMap<String, Switchboard> {
    let mut out: BTreeMap<String, Switchboard> = BTreeMap::new();
    let Some(t) = t else { return out };
    for name in sorted_keys(t) {
        let path = join("switchboards", name);
        if !valid_name(name) {
            ctx.issue(&path, format!("switchboard names {NAME_RULE}"));
            continue;
        }
        let Some(it) = ctx.table(&path, &t[name]) else {
            continue;
        };
        ctx.known_keys(&path, it, &SWITCHBOARD_KEYS);
        let hash_path = join(&path, "token_sha256");
        let hash = match it.get("token_sha256") {
            Some(v) => ctx.parsed(&hash_path, v, sha256_hex),
            None => {
                ctx.issue(
                    &hash_path,
                    "required: the SHA-256 of the switchboard's token in hex (callgate token-hash)",
                );
                None
            }
        };
        let queues_path = join(&path, "queues");
        let names = match it.get("queues") {
            Some(v) => ctx.list(&queues_path, v).unwrap_or_default(),
            None => {
                ctx.issue(
                    &queues_path,
                    "required: the queues its verifications may name",
                );
                Vec::new()
            }
        };
        for (i, q) in names.iter().enumerate() {
            if !queues.contains_key(q) {
                ctx.issue(
                    format!("{queues_path}[{i}]"),
                    format!("no queue named {q:?}"),
                );
            }
        }
        let feed = it
            .get("feed")
            .and_then(|v| super::feed::feed(ctx, &join(&path, "feed"), v));
        let Some(hash) = hash else { continue };
        let clash = api
            .tokens
            .iter()
            .find(|(_, o)| o.sha256 == hash)
            .map(|(n, _)| format!("api.tokens.{n}"))
            .or_else(|| {
                out.iter()
                    .find(|(_, o)| o.token_sha256 == hash)
                    .map(|(n, _)| format!("switchboards.{n}"))
            });
        if let Some(other) = clash {
            ctx.issue(
                &hash_path,
                format!("the same hash as {other}: each token must be distinct"),
            );
            continue;
        }
        out.insert(
            name.clone(),
            Switchboard {
                token_sha256: hash,
                queues: names,
                feed,
            },
        );
    }
    out
}
