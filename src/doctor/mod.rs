//! `callgate doctor`: live checks of a config against the PBX and the identity providers, one line
//! per check (`ok`, `WARN`, `FAIL` with what to do, or `skip` after a failure it depends on).
//!
//! Invariants: nothing here places a call, creates an identity order or takes the ARI application
//! over. The route check uses a channel that is created into a private application
//! (`<app>-doctor-<random>`), never dialled (so no dialplan runs) and hung up again; the provider
//! check collects an order that cannot exist. Secrets and personal numbers never reach the report;
//! errors are shown with their whole chain.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::{self, Config, Idp, Pbx};
use crate::idp::bankid;
use crate::pbx::ari::{self, events, Client};
use crate::pbx::routecheck;
use crate::policy::{Mode, QueuePolicy, Route};
use crate::prompts::PromptId;

/// A certificate that expires within this many days is a warning.
pub const WARN_DAYS: i64 = 30;
/// The oldest Asterisk major version callgate supports.
pub const MIN_ASTERISK_MAJOR: u32 = 20;
/// The endpoint of the route-check channel: created, never dialled, so no dialplan runs.
const PROBE_ENDPOINT: &str = "Local/callgate-doctor@callgate-doctor";

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works today, needs attention soon (e.g. a certificate expiring within [`WARN_DAYS`]).
    Warn,
    Fail,
    /// Not run: an earlier check it depends on failed.
    Skip,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
            Level::Skip => "skip",
        }
    }
}

/// One check: a stable name (e.g. `ari.credentials`), its result, what was found and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    pub detail: String,
    /// What to do about a failure or warning; empty when nothing is to be done.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            level: Level::Ok,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            level: Level::Fail,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    fn skip(name: impl Into<String>, why: &str) -> Check {
        Check {
            name: name.into(),
            level: Level::Skip,
            detail: format!("not checked: {why}"),
            fix: String::new(),
        }
    }
}

/// Every check of one run, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// No check failed (warnings and skips after no failure pass).
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.level != Level::Fail)
    }

    /// The check named `name`.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Names of the failed checks.
    pub fn failed(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| c.level == Level::Fail)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// One line per check: `LEVEL name: detail` and, for a failure or warning, ` → what to do`.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let _ = write!(out, "{:<4} {}: {}", c.level.label(), c.name, c.detail);
            if !c.fix.is_empty() {
                let _ = write!(out, " → {}", c.fix);
            }
            out.push('\n');
        }
        out
    }

    /// `{"passed": bool, "checks": [{"name", "level", "detail", "fix"?}]}`.
    pub fn json(&self) -> String {
        serde_json::json!({ "passed": self.passed(), "checks": self.checks }).to_string()
    }

    fn push(&mut self, check: Check) {
        self.checks.push(check);
    }
}

/// `callgate doctor --config FILE`: the report and the exit code (0 all passed, 1 a check failed,
/// [`config::EXIT_CONFIG`] the config is not valid).
pub async fn run_file(path: &Path, now: OffsetDateTime) -> (Report, i32) {
    match config::load_file(path) {
        Err(issues) => {
            let mut report = Report::default();
            let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
            report.push(Check::fail(
                "config",
                format!("{}: {}", path.display(), text.join("; ")),
                format!(
                    "fix each key named (callgate check-config {} lists them)",
                    path.display()
                ),
            ));
            (report, config::EXIT_CONFIG)
        }
        Ok(cfg) => {
            let mut report = Report::default();
            report.push(Check::ok(
                "config",
                format!(
                    "{}: valid ({} queue(s){}, {} identity provider(s))",
                    path.display(),
                    cfg.queues.len(),
                    if cfg.defaults.is_some() {
                        " and [defaults]"
                    } else {
                        ""
                    },
                    cfg.idps.len()
                ),
            ));
            report.checks.extend(run(&cfg, now).await.checks);
            let code = if report.passed() { 0 } else { 1 };
            (report, code)
        }
    }
}

/// Every live check of a valid config. `now` is the wall-clock time certificates are measured from.
pub async fn run(cfg: &Config, now: OffsetDateTime) -> Report {
    let mut report = Report::default();
    let Pbx::Ari(settings) = &cfg.pbx;
    pbx_checks(cfg, settings, &mut report).await;
    for (name, idp) in &cfg.idps {
        idp_checks(name, idp, now, &mut report).await;
    }
    if let crate::config::StateKind::Redis(redis) = &cfg.state.kind {
        report.push(state_check(cfg, redis).await);
    }
    report
}

// ---- shared state ----

/// `[state] kind = "redis"`: Redis answers, and the instances already there use the same pseudonym
/// key (a fingerprint; nothing else is written).
async fn state_check(cfg: &Config, redis: &crate::config::RedisSettings) -> Check {
    use crate::state::{KeyCheck, Shared};
    let key = crate::pnr::PseudonymKey::new(cfg.server.pseudonym_key.expose().as_bytes().to_vec());
    let Pbx::Ari(ari) = &cfg.pbx;
    let instance = cfg.state.instance_or("doctor", &ari.app);
    let shared = match Shared::new(
        redis,
        &instance,
        &key,
        std::sync::Arc::new(crate::telemetry::Metrics::new()),
        cfg.api.keep_verifications,
    ) {
        Ok(s) => s,
        Err(e) => return Check::fail("state.redis", e.to_string(), "check state.url"),
    };
    match shared.check_key().await {
        Ok(KeyCheck::Same) => Check::ok(
            "state.redis",
            format!(
                "Redis answers; key prefix {:?}; the pseudonym key matches the other instances'",
                redis.key_prefix
            ),
        ),
        Ok(KeyCheck::Different) => Check::fail(
            "state.redis",
            format!(
                "the instances already under key prefix {:?} use another server.pseudonym_key",
                redis.key_prefix
            ),
            "give every instance the same server.pseudonym_key (CALLGATE_PSEUDONYM_KEY), or another state.key_prefix",
        ),
        Err(e) => Check::fail(
            "state.redis",
            format!("Redis does not answer: {e}"),
            "check state.url (host, port, password, rediss:// for TLS) and that Redis runs",
        ),
    }
}

// ---- PBX ----

async fn pbx_checks(cfg: &Config, settings: &ari::Settings, report: &mut Report) {
    let dependents = [
        "ari.credentials",
        "ari.version",
        "ari.app",
        "routes",
        "prompts",
    ];
    let client = match Client::new(settings) {
        Ok(c) => c,
        Err(e) => {
            report.push(Check::fail(
                "ari.reachable",
                format!("cannot build the ARI client: {e}"),
                "check pbx.ari.url",
            ));
            for d in dependents {
                report.push(Check::skip(d, "ARI is not reachable"));
            }
            return;
        }
    };
    let info = client.info().await;
    match &info {
        Err(ari::Error::Unauthorized) => {
            report.push(Check::ok(
                "ari.reachable",
                format!("{} answers", settings.url),
            ));
            report.push(Check::fail(
                "ari.credentials",
                format!(
                    "Asterisk refused user {:?} (401/403: wrong password, unknown or read-only user)",
                    settings.username
                ),
                "set pbx.ari.username and pbx.ari.password (ARI_PASSWORD in /etc/callgate/env) to a \
                 user of ari.conf with read_only = no",
            ));
            for d in &dependents[1..] {
                report.push(Check::skip(*d, "ARI refused the credentials"));
            }
            return;
        }
        Err(e) => {
            report.push(Check::fail(
                "ari.reachable",
                format!("{}: {e}", settings.url),
                "check pbx.ari.url against http.conf (enabled = yes, bindaddr, bindport) and that \
                 Asterisk runs with res_ari loaded",
            ));
            for d in dependents {
                report.push(Check::skip(d, "ARI is not reachable"));
            }
            return;
        }
        Ok(_) => {}
    }
    report.push(Check::ok(
        "ari.reachable",
        format!("{} answers", settings.url),
    ));
    report.push(Check::ok(
        "ari.credentials",
        format!("user {:?} accepted", settings.username),
    ));
    if let Ok(info) = info {
        report.push(version_check(&info.system.version));
    }
    report.push(app_check(cfg, settings, &client).await);
    report.push(route_check(cfg, settings, &client).await);
    report.push(prompt_check(cfg, &client).await);
}

fn version_check(version: &str) -> Check {
    let major = version
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if m >= MIN_ASTERISK_MAJOR => {
            Check::ok("ari.version", format!("Asterisk {version}"))
        }
        Some(_) => Check::fail(
            "ari.version",
            format!("Asterisk {version} is older than {MIN_ASTERISK_MAJOR}"),
            format!("upgrade to Asterisk {MIN_ASTERISK_MAJOR} or 22 (LTS)"),
        ),
        None => Check {
            name: "ari.version".into(),
            level: Level::Warn,
            detail: format!("Asterisk reports version {version:?}, which callgate cannot read"),
            fix: format!("make sure it is Asterisk {MIN_ASTERISK_MAJOR} or later"),
        },
    }
}

/// The application name must be free, or held by the callgate that runs with this config here.
async fn app_check(cfg: &Config, settings: &ari::Settings, client: &Client) -> Check {
    let app = &settings.app;
    match client.get_application(app).await {
        Err(e) => Check::fail(
            "ari.app",
            format!("cannot read application {app:?}: {e}"),
            "check that the ARI user may read applications",
        ),
        Ok(None) => Check::ok(
            "ari.app",
            format!("application {app:?} is free (no client holds it)"),
        ),
        Ok(Some(found)) => {
            if local_callgate_connected(cfg.server.ops_listen).await {
                Check::ok(
                    "ari.app",
                    format!(
                        "application {app:?} is held by the callgate running with this config \
                         (its ops listener {} reports the PBX connected)",
                        cfg.server.ops_listen
                    ),
                )
            } else {
                Check::fail(
                    "ari.app",
                    format!(
                        "application {app:?} is held by another client ({} channel(s) in it), \
                         and the callgate of this config is not the one connected",
                        found.channel_ids.len()
                    ),
                    "stop the other client (another callgate?) or give this one its own \
                     pbx.ari.app and Stasis() name; starting now would take the application over",
                )
            }
        }
    }
}

/// Whether a callgate answers on `ops` and reports its PBX link up (`callgate_pbx_connected 1`).
async fn local_callgate_connected(ops: SocketAddr) -> bool {
    let ip = match ops.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let fetch = async {
        let mut tcp = tokio::net::TcpStream::connect((ip, ops.port()))
            .await
            .ok()?;
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        tcp.take(1 << 20).read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    text.lines().any(|l| l.trim() == "callgate_pbx_connected 1")
}

/// Every route of the config with the keys that name it, in config order.
fn labelled_routes(cfg: &Config) -> Vec<(Route, Vec<String>)> {
    let mut out: Vec<(Route, Vec<String>)> = Vec::new();
    let mut add = |route: &Route, label: String| match out.iter_mut().find(|(r, _)| r == route) {
        Some((_, labels)) => labels.push(label),
        None => out.push((route.clone(), vec![label])),
    };
    let policies = cfg
        .queues
        .iter()
        .map(|(n, p)| (format!("queues.{n}"), p))
        .chain(cfg.defaults.iter().map(|p| ("defaults".to_owned(), p)));
    for (base, p) in policies {
        let r = &p.routes;
        let fixed = [
            ("verified", Some(&r.verified)),
            ("failed", Some(&r.failed)),
            ("unavailable", Some(&r.unavailable)),
            ("skipped", r.skipped.as_ref()),
            ("interrupted", r.interrupted.as_ref()),
            ("no_agent", r.no_agent.as_ref()),
            ("after_agent", r.after_agent.as_ref()),
            ("agent", r.agent.as_ref()),
        ];
        for (key, route) in fixed {
            if let Some(route) = route {
                add(route, format!("{base}.routes.{key}"));
            }
        }
        for (reason, route) in &p.routes_by_reason {
            add(route, format!("{base}.routes_by_reason.{}", reason.code()));
        }
    }
    out
}

/// Checks every route with `DIALPLAN_EXISTS` on a channel that never runs any dialplan.
async fn route_check(cfg: &Config, settings: &ari::Settings, client: &Client) -> Check {
    let labelled = labelled_routes(cfg);
    if labelled.is_empty() {
        return Check::ok("routes", "no routes configured");
    }
    let routes: Vec<Route> = labelled.iter().map(|(r, _)| r.clone()).collect();
    let answers = match probe_routes(settings, client, &routes).await {
        Ok(a) => a,
        Err(why) => {
            return Check::fail(
                "routes",
                format!("could not check the routes: {why}"),
                "check that the ARI user may create channels (read_only = no)",
            )
        }
    };
    let missing: Vec<String> = labelled
        .iter()
        .filter(|(r, _)| answers.get(r) == Some(&false))
        .map(|(r, labels)| format!("{r} ({})", labels.join(", ")))
        .collect();
    if missing.is_empty() {
        Check::ok(
            "routes",
            format!("all {} routes exist in the dialplan", routes.len()),
        )
    } else {
        Check::fail(
            "routes",
            format!("missing from the dialplan: {}", missing.join("; ")),
            "add the extensions to extensions.conf (then `dialplan reload`) or correct the routes \
             in the config; calls routed there would take the unavailable route",
        )
    }
}

/// A private application, a channel in it that is never dialled, one `EVAL` of
/// `DIALPLAN_EXISTS` for every route, hang-up.
async fn probe_routes(
    settings: &ari::Settings,
    client: &Client,
    routes: &[Route],
) -> Result<std::collections::HashMap<Route, bool>, String> {
    let app = format!("{}-doctor-{:08x}", settings.app, fastrand::u32(..));
    let private = ari::Settings {
        app: app.clone(),
        ..settings.clone()
    };
    let url = events::events_url(&private)?;
    let mut socket =
        tokio::time::timeout(settings.request_timeout, events::connect(&url, &private))
            .await
            .map_err(|_| "the events websocket did not open in time".to_owned())?
            .map_err(|e| format!("cannot open the events websocket: {e}"))?;
    let channel = format!("{app}-probe");
    let checked = async {
        client
            .create_channel(PROBE_ENDPOINT, &app, &channel)
            .await
            .map_err(|e| format!("cannot create a channel: {e}"))?;
        // The channel is usable once Asterisk has put it into the application.
        let entered = async {
            while let Some(Ok(frame)) = socket.next().await {
                if let Ok(text) = frame.to_text() {
                    if text.contains("\"StasisStart\"") && text.contains(&channel) {
                        return;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(settings.request_timeout, entered).await;
        routecheck::check(client, &channel, routes)
            .await
            .map_err(|e| format!("evaluating DIALPLAN_EXISTS: {e}"))
    }
    .await;
    let _ = client.hangup(&channel, None).await;
    let _ = socket.close(None).await;
    checked
}

/// The sound files a queue's prompts use in each of its languages.
fn needed_sounds(cfg: &Config) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let policies = cfg
        .queues
        .iter()
        .map(|(n, p)| (format!("queues.{n}"), p))
        .chain(cfg.defaults.iter().map(|p| ("defaults".to_owned(), p)));
    for (label, p) in policies {
        if p.mode == Mode::Off {
            continue;
        }
        for lang in &p.languages {
            for prompt in plays(p) {
                for media in p.media_for(prompt, *lang).split(',') {
                    let Some(id) = media.strip_prefix("sound:") else {
                        continue;
                    };
                    if id.contains("://") {
                        continue;
                    }
                    out.entry((id.to_owned(), lang.code().to_owned()))
                        .or_default()
                        .insert(label.clone());
                }
            }
        }
    }
    out
}

/// The prompts a queue can play.
fn plays(p: &QueuePolicy) -> impl Iterator<Item = PromptId> + '_ {
    PromptId::ALL.into_iter().filter(|id| match id {
        PromptId::ConfirmCall | PromptId::Identify => p.progress_prompts,
        PromptId::Verified | PromptId::NotVerified | PromptId::Unavailable => p.announce_outcome,
        _ => true,
    })
}

/// Every prompt of every configured language exists on the PBX (`GET /sounds/{id}`).
async fn prompt_check(cfg: &Config, client: &Client) -> Check {
    let needed = needed_sounds(cfg);
    let ids: BTreeSet<&String> = needed.keys().map(|(id, _)| id).collect();
    let mut found: BTreeMap<&String, BTreeSet<String>> = BTreeMap::new();
    for id in ids {
        match client.sound(id).await {
            Ok(sound) => {
                let langs = sound
                    .map(|s| s.formats.into_iter().map(|f| f.language).collect())
                    .unwrap_or_default();
                found.insert(id, langs);
            }
            Err(e) => {
                return Check::fail(
                    "prompts",
                    format!("cannot list sound {id:?}: {e}"),
                    "check that res_ari_sounds is loaded",
                )
            }
        }
    }
    let missing: Vec<String> = needed
        .iter()
        .filter(|((id, lang), _)| !found.get(id).is_some_and(|l| l.contains(lang)))
        .map(|((id, lang), queues)| {
            let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
            format!("{lang}/{id} ({})", queues.join(", "))
        })
        .collect();
    if missing.is_empty() {
        Check::ok(
            "prompts",
            format!(
                "all {} prompt files exist ({} sounds in their languages)",
                needed.len(),
                found.len()
            ),
        )
    } else {
        Check::fail(
            "prompts",
            format!("missing on the PBX: {}", missing.join("; ")),
            "install the prompts into <sounds dir>/<lang>/callgate/ (the package ships them in \
             /usr/share/callgate/sounds; see README \"Prompts\"), or fix the queue's prompts.* media",
        )
    }
}

// ---- identity providers ----

async fn idp_checks(name: &str, idp: &Idp, now: OffsetDateTime, report: &mut Report) {
    let base = format!("idp.{name}");
    let settings = match idp {
        Idp::Simulator { .. } => {
            report.push(Check::ok(
                base,
                "embedded simulator (started by callgate itself; nothing to reach)",
            ));
            return;
        }
        Idp::CibaSimulator => {
            report.push(Check::ok(
                base,
                "embedded CIBA simulator (started by callgate itself; nothing to reach)",
            ));
            return;
        }
        Idp::Ciba(s) => {
            report.push(Check::ok(
                base,
                format!("CIBA provider {} (not probed by doctor)", s.issuer),
            ));
            return;
        }
        Idp::BankId(s) => s,
    };
    match bankid::Client::new(settings) {
        Err(e) => report.push(Check::fail(
            format!("{base}.tls"),
            format!(
                "cannot build the client: {}",
                crate::telemetry::ErrorChain(&e)
            ),
            "fix the certificate files and password named",
        )),
        Ok(client) => match client.probe().await {
            Ok(answer) => report.push(Check::ok(
                format!("{base}.tls"),
                format!("{} {answer}", settings.url),
            )),
            Err(cause) => report.push(Check::fail(
                format!("{base}.tls"),
                format!("{}: {cause}", settings.url),
                tls_fix(&cause),
            )),
        },
    }
    if let Some(identity) = &settings.identity {
        let check = match bankid::rp_certificate_not_after(identity) {
            Ok(not_after) => expiry_check(
                format!("{base}.rp_certificate"),
                "the RP certificate",
                not_after,
                now,
                "order a new RP certificate from the bank and install it as client_p12 (or \
                 client_cert/client_key)",
            ),
            Err(e) => Check::fail(
                format!("{base}.rp_certificate"),
                crate::telemetry::ErrorChain(&e).to_string(),
                "fix the RP certificate file or its password",
            ),
        };
        report.push(check);
    }
    if let Some(ca) = &settings.server_ca {
        let check = match bankid::ca_not_after(ca) {
            Ok(not_after) => expiry_check(
                format!("{base}.server_ca"),
                &format!("server_ca ({})", ca.display()),
                not_after,
                now,
                "install the provider's current root certificate as server_ca",
            ),
            Err(e) => Check::fail(
                format!("{base}.server_ca"),
                crate::telemetry::ErrorChain(&e).to_string(),
                "point server_ca at the provider's root certificate (PEM)",
            ),
        };
        report.push(check);
    }
}

fn tls_fix(cause: &str) -> String {
    if cause.contains("not trusted by server_ca") {
        "server_ca must be the root that issued the provider's server certificate (BankID: the test \
         or production root matching the url)"
            .into()
    } else if cause.contains("refused the RP certificate") {
        "the provider does not accept the RP certificate: renew it if it expired, or use the one \
         issued for this environment (test or production)"
            .into()
    } else {
        "check the url, the network path (firewall, proxy) and that the provider is up".into()
    }
}

/// `ok` with the date, `WARN` within [`WARN_DAYS`], `FAIL` once expired.
fn expiry_check(
    name: String,
    what: &str,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    fix: &str,
) -> Check {
    let days = (not_after - now).whole_days();
    let date = not_after.date();
    if not_after <= now {
        Check::fail(name, format!("{what} expired on {date}"), fix)
    } else if days < WARN_DAYS {
        Check {
            name,
            level: Level::Warn,
            detail: format!("{what} expires on {date}, in {days} day(s)"),
            fix: fix.to_owned(),
        }
    } else {
        Check::ok(name, format!("{what} valid until {date} ({days} days)"))
    }
}

#[cfg(test)]
mod tests;
