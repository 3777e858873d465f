//! `doctor` against the fake Asterisk and the BankID simulator over mutual TLS: a correct setup
//! passes, and each broken thing (one at a time) fails its own check with a message naming it.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::idp::sim as idp_sim;
use crate::pbx::sim::{self as pbx_sim, FakeAsterisk};
use crate::prompts::Language;

struct World {
    pbx: FakeAsterisk,
    idp: idp_sim::Simulator,
    _stop: tokio_util::sync::DropGuard,
    dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const ROUTES: [&str; 4] = [
    "queues,support,1",
    "queues,support-unverified,1",
    "queues,support-fallback,1",
    "queues,fraud-desk,1",
];

fn dialplan(routes: &[&str]) -> BTreeSet<(String, String, u32)> {
    routes
        .iter()
        .map(|r| {
            let p = crate::policy::Route::parse(r).unwrap();
            (p.context, p.extension, p.priority)
        })
        .collect()
}

fn all_prompts(langs: &[Language]) -> BTreeSet<(String, String)> {
    langs
        .iter()
        .flat_map(|l| {
            PromptId::ALL
                .iter()
                .map(move |p| (l.code().to_owned(), format!("callgate/{}", p.code())))
        })
        .collect()
}

async fn world(opts: pbx_sim::SimOptions) -> World {
    let dir = std::env::temp_dir().join(format!("callgate-doctor-{}", uuid::Uuid::new_v4()));
    let pbx = pbx_sim::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), opts).await;
    let token = CancellationToken::new();
    let idp = idp_sim::start(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        idp_sim::SimOptions {
            tls: true,
            step: Duration::from_millis(50),
            cert_dir: Some(dir.join("bankid")),
        },
        token.clone(),
    )
    .await
    .unwrap();
    World {
        pbx,
        idp,
        _stop: token.drop_guard(),
        dir,
    }
}

fn good_pbx() -> pbx_sim::SimOptions {
    pbx_sim::SimOptions {
        dialplan: dialplan(&ROUTES),
        sounds: all_prompts(&[Language::Sv, Language::En]),
        ..Default::default()
    }
}

/// The config for this world; `set` overrides keys (`CALLGATE__…` names).
fn config(w: &World, set: &[(&str, &str)]) -> Config {
    let files = w.idp.files().unwrap();
    let toml = format!(
        r#"
[server]
ops_listen = "127.0.0.1:1"
[pbx.ari]
url = "{url}"
username = "callgate"
password = "${{ARI_PASSWORD}}"
[idp.bankid]
kind = "bankid"
url = "{idp}"
client_p12 = "{p12}"
client_p12_password = "${{P12_PASSWORD}}"
server_ca = "{ca}"
[queues.support]
languages = ["sv", "en"]
[queues.support.routes]
verified = "queues,support,1"
failed = "queues,support-unverified,1"
unavailable = "queues,support-fallback,1"
[queues.support.routes_by_reason]
declined_call = "queues,fraud-desk,1"
"#,
        url = w.pbx.url(),
        idp = w.idp.url(),
        p12 = files.client_p12.display(),
        ca = files.server_ca.display(),
    );
    let env: HashMap<String, String> = set
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let password = files.p12_password.expose().to_owned();
    let lookup = move |name: &str| match name {
        "ARI_PASSWORD" => Some("sim-secret".to_owned()),
        "P12_PASSWORD" => Some(password.clone()),
        _ => None,
    };
    config::load(&toml, &env, &lookup).unwrap()
}

fn now() -> OffsetDateTime {
    // Certificates of the simulator are valid from their generation until far in the future.
    OffsetDateTime::now_utc()
}

fn only_failures(report: &Report, expected: &[&str]) {
    assert_eq!(report.failed(), expected, "{}", report.text());
}

#[tokio::test]
async fn a_correct_setup_passes_every_check() {
    let w = world(good_pbx()).await;
    let report = run(&config(&w, &[]), now()).await;
    only_failures(&report, &[]);
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ari.reachable",
            "ari.credentials",
            "ari.version",
            "ari.app",
            "routes",
            "prompts",
            "idp.bankid.tls",
            "idp.bankid.rp_certificate",
            "idp.bankid.server_ca",
        ]
    );
    assert!(
        report.checks.iter().all(|c| c.level == Level::Ok),
        "{}",
        report.text()
    );
    assert!(report
        .get("ari.version")
        .unwrap()
        .detail
        .contains("22.10.1"));
    // The route check used its own application and left no channel behind; it created no order.
    let log = w.pbx.rest_log();
    assert!(log
        .iter()
        .any(|e| e.method == "POST" && e.path == "/channels/create"));
    assert!(log
        .iter()
        .any(|e| e.method == "DELETE" && e.path.starts_with("/channels/callgate-doctor-")));
    assert_eq!(w.pbx.connections(), 0, "the callgate application was taken");
    assert_eq!(w.idp.starts(), 0);
    // JSON for automation.
    let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
    assert_eq!(json["passed"], true);
    assert_eq!(json["checks"][0]["name"], "ari.reachable");
    assert_eq!(json["checks"][0]["level"], "ok");
}

#[tokio::test]
async fn a_wrong_ari_password_fails_the_credentials_check() {
    let w = world(good_pbx()).await;
    let cfg = config(&w, &[("CALLGATE__PBX__ARI__PASSWORD", "not-the-pw-7x")]);
    let report = run(&cfg, now()).await;
    only_failures(&report, &["ari.credentials"]);
    let line = report.text();
    assert!(
        line.contains("FAIL ari.credentials: Asterisk refused user \"callgate\""),
        "{line}"
    );
    assert!(line.contains("ARI_PASSWORD"), "{line}");
    assert_eq!(report.get("routes").unwrap().level, Level::Skip);
    assert!(
        !line.contains("not-the-pw-7x"),
        "the password is in the report: {line}"
    );
}

#[tokio::test]
async fn an_unreachable_pbx_fails_reachability_and_skips_the_rest() {
    let w = world(good_pbx()).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let cfg = config(&w, &[("CALLGATE__PBX__ARI__URL", url.as_str())]);
    let report = run(&cfg, now()).await;
    only_failures(&report, &["ari.reachable"]);
    assert!(
        report
            .get("ari.reachable")
            .unwrap()
            .detail
            .contains("transport"),
        "{}",
        report.text()
    );
}

#[tokio::test]
async fn a_missing_route_is_named_with_the_keys_that_use_it() {
    let w = world(pbx_sim::SimOptions {
        dialplan: dialplan(&ROUTES[..3]),
        ..good_pbx()
    })
    .await;
    let report = run(&config(&w, &[]), now()).await;
    only_failures(&report, &["routes"]);
    let detail = &report.get("routes").unwrap().detail;
    assert_eq!(
        detail,
        "missing from the dialplan: queues,fraud-desk,1 (queues.support.routes_by_reason.declined_call)"
    );
}

#[tokio::test]
async fn a_missing_prompt_is_named_with_its_language() {
    let mut sounds = all_prompts(&[Language::Sv, Language::En]);
    sounds.remove(&("en".to_owned(), "callgate/open-app".to_owned()));
    let w = world(pbx_sim::SimOptions {
        sounds,
        ..good_pbx()
    })
    .await;
    let report = run(&config(&w, &[]), now()).await;
    only_failures(&report, &["prompts"]);
    assert_eq!(
        report.get("prompts").unwrap().detail,
        "missing on the PBX: en/callgate/open-app (queues.support)"
    );
    // A language the queue does not offer is not needed; a prompt override is checked instead.
    let cfg = config(
        &w,
        &[
            ("CALLGATE__QUEUES__SUPPORT__LANGUAGES", "sv"),
            (
                "CALLGATE__QUEUES__SUPPORT__PROMPTS__IDENTIFY",
                "sound:custom/identify",
            ),
        ],
    );
    let report = run(&cfg, now()).await;
    assert_eq!(
        report.get("prompts").unwrap().detail,
        "missing on the PBX: sv/custom/identify (queues.support)"
    );
}

#[tokio::test]
async fn an_application_held_by_another_client_fails() {
    let w = world(good_pbx()).await;
    w.pbx.hold_app_elsewhere();
    let report = run(&config(&w, &[]), now()).await;
    only_failures(&report, &["ari.app"]);
    assert!(report
        .get("ari.app")
        .unwrap()
        .detail
        .contains("held by another client"));
}

#[tokio::test]
async fn an_untrusted_server_certificate_is_named_as_such() {
    let w = world(good_pbx()).await;
    let other = w.dir.join("unrelated-root.pem");
    idp_sim::write_unrelated_root(&other).unwrap();
    let other = other.display().to_string();
    let cfg = config(&w, &[("CALLGATE__IDP__BANKID__SERVER_CA", other.as_str())]);
    let report = run(&cfg, now()).await;
    only_failures(&report, &["idp.bankid.tls"]);
    let tls = report.get("idp.bankid.tls").unwrap();
    assert!(
        tls.detail.contains(&format!(
            "server certificate not trusted by server_ca ({other}): UnknownIssuer"
        )),
        "{}",
        tls.detail
    );
    assert!(
        tls.fix.contains("server_ca must be the root"),
        "{}",
        tls.fix
    );
}

#[tokio::test]
async fn an_expired_rp_certificate_fails_its_expiry_and_the_handshake() {
    let w = world(good_pbx()).await;
    let files = w.idp.files().unwrap();
    let day = time::Duration::days(1);
    let ended = now() - day;
    let expired = idp_sim::issue_rp_certificate(files, "expired", ended - day * 30, ended).unwrap();
    let crate::idp::ClientIdentity::Pkcs12 { path, .. } = expired else {
        panic!("not a PKCS#12 identity")
    };
    let path = path.display().to_string();
    let cfg = config(&w, &[("CALLGATE__IDP__BANKID__CLIENT_P12", path.as_str())]);
    let report = run(&cfg, now()).await;
    only_failures(&report, &["idp.bankid.tls", "idp.bankid.rp_certificate"]);
    let tls = &report.get("idp.bankid.tls").unwrap().detail;
    assert!(
        tls.contains("the server refused the RP certificate: CertificateExpired"),
        "{tls}"
    );
    let rp = &report.get("idp.bankid.rp_certificate").unwrap().detail;
    assert_eq!(
        rp,
        &format!("the RP certificate expired on {}", ended.date())
    );
}

#[tokio::test]
async fn a_certificate_expiring_within_30_days_warns_but_passes() {
    let w = world(good_pbx()).await;
    let files = w.idp.files().unwrap();
    let soon = now() + time::Duration::days(10) + time::Duration::hours(1);
    let identity =
        idp_sim::issue_rp_certificate(files, "soon", now() - time::Duration::days(1), soon)
            .unwrap();
    let crate::idp::ClientIdentity::Pkcs12 { path, .. } = identity else {
        panic!("not a PKCS#12 identity")
    };
    let path = path.display().to_string();
    let cfg = config(&w, &[("CALLGATE__IDP__BANKID__CLIENT_P12", path.as_str())]);
    let report = run(&cfg, now()).await;
    only_failures(&report, &[]);
    let rp = report.get("idp.bankid.rp_certificate").unwrap();
    assert_eq!(rp.level, Level::Warn, "{}", report.text());
    assert!(rp.detail.ends_with("in 10 day(s)"), "{}", rp.detail);
    assert!(report.text().contains("WARN idp.bankid.rp_certificate:"));
}

#[test]
fn versions_before_20_fail_and_unreadable_ones_warn() {
    assert_eq!(version_check("22.10.1").level, Level::Ok);
    assert_eq!(version_check("20.5.0-cert1").level, Level::Ok);
    assert_eq!(version_check("18.20.0").level, Level::Fail);
    assert_eq!(version_check("GIT-master-abc").level, Level::Warn);
}

#[test]
fn certificate_dates_are_read_from_utc_and_generalized_time() {
    let at = |y: i32, m: u8, d: u8| {
        time::Date::from_calendar_date(y, time::Month::try_from(m).unwrap(), d)
            .unwrap()
            .midnight()
            .assume_utc()
    };
    let files_dir = std::env::temp_dir().join(format!("callgate-doctor-{}", uuid::Uuid::new_v4()));
    for (not_before, not_after) in [
        (at(2020, 1, 1), at(2049, 12, 31)),
        (at(2020, 1, 1), at(2051, 6, 1)),
    ] {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x".to_owned()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key).unwrap();
        std::fs::create_dir_all(&files_dir).unwrap();
        let path = files_dir.join("ca.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        // 2049 is a UTCTime, 2051 a GeneralizedTime (RFC 5280).
        assert_eq!(bankid::ca_not_after(&path).unwrap(), not_after);
    }
    let _ = std::fs::remove_dir_all(&files_dir);
}

#[tokio::test]
async fn shared_state_is_checked_for_reachability_and_the_same_key() {
    let w = world(good_pbx()).await;
    let Some(redis) = (match crate::state::local::LocalRedis::binary() {
        Some(_) => Some(crate::state::local::LocalRedis::start().await.unwrap()),
        None => {
            eprintln!(
                "skipped: no redis-server installed (the shared-state doctor check needs one)"
            );
            None
        }
    }) else {
        return;
    };
    let url = redis.url();
    let with = |key: &'static str| {
        config(
            &w,
            &[
                ("CALLGATE__STATE__KIND", "redis"),
                ("CALLGATE__STATE__URL", url.as_str()),
                ("CALLGATE__SERVER__PSEUDONYM_KEY", key),
            ],
        )
    };
    let report = run(&with("the-first-pseudonym-key-000"), now()).await;
    assert_eq!(
        report.get("state.redis").unwrap().level,
        Level::Ok,
        "{report:?}"
    );
    let report = run(&with("another-pseudonym-key-00000"), now()).await;
    let check = report.get("state.redis").unwrap();
    assert_eq!(check.level, Level::Fail);
    assert!(
        check.detail.contains("another server.pseudonym_key"),
        "{check:?}"
    );
    let mut redis = redis;
    redis.stop();
    let report = run(&with("the-first-pseudonym-key-000"), now()).await;
    let check = report.get("state.redis").unwrap();
    assert_eq!(check.level, Level::Fail);
    assert!(check.detail.contains("does not answer"), "{check:?}");
}
