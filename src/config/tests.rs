//! Tests of configuration loading: defaults, overrides, interpolation, every-issue reporting, the
//! `[defaults]` layer, the shipped example and the broken fixture.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::idp::ClientIdentity;
use crate::outcome::Reason;
use crate::policy::test_support::{route, routes};
use crate::policy::Mode;
use crate::prompts::{Language, PromptId};

const MINIMAL: &str = r#"
[pbx.ari]
password = "pw"

[idp.sim]
kind = "simulator"

[queues.support.routes]
verified = "queues,support,1"
failed = "queues,support-unverified,1"
unavailable = "queues,support-fallback,1"
"#;

const EXAMPLE: &str = include_str!("../../deploy/callgate.example.toml");
const BROKEN: &str = include_str!("../../fixtures/config/broken.toml");

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn try_load(
    toml: &str,
    env: &[(&str, &str)],
    lookup: &[(&str, &str)],
) -> Result<Config, Vec<Issue>> {
    let lookup = vars(lookup);
    load(toml, &vars(env), &|name| lookup.get(name).cloned())
}

fn ok(toml: &str) -> Config {
    match try_load(toml, &[], &[]) {
        Ok(c) => c,
        Err(issues) => panic!("unexpected issues: {issues:#?}"),
    }
}

fn issues(toml: &str) -> Vec<Issue> {
    match try_load(toml, &[], &[]) {
        Ok(_) => panic!("loaded, but issues were expected"),
        Err(issues) => issues,
    }
}

/// Asserts exactly one issue, at `path`, whose message contains `fragment`.
fn only_issue(toml: &str, path: &str, fragment: &str) {
    let got = issues(toml);
    assert_eq!(got.len(), 1, "expected one issue at {path}, got {got:#?}");
    assert_eq!(got[0].path, path, "{got:#?}");
    assert!(
        got[0].message.contains(fragment),
        "{:?} does not contain {fragment:?}",
        got[0].message
    );
}

fn minimal_with(extra: &str) -> String {
    format!("{MINIMAL}\n{extra}")
}

/// `MINIMAL` with the queue naming its provider, so more providers can be added.
fn explicit_with(extra: &str) -> String {
    let base = MINIMAL.replace(
        "[queues.support.routes]",
        "[queues.support]\nidp = \"sim\"\n[queues.support.routes]",
    );
    format!("{base}\n{extra}")
}

/// A fresh directory with the given (empty) files, removed on drop.
struct TempFiles(PathBuf);

impl TempFiles {
    fn new(names: &[&str]) -> TempFiles {
        let dir = std::env::temp_dir().join(format!("callgate-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        TempFiles(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// --- defaults --------------------------------------------------------------------------------------------

#[test]
fn minimal_file_gets_every_documented_default() {
    let c = ok(MINIMAL);
    assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.server.ops_listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(c.server.data_dir, PathBuf::from("/var/lib/callgate"));
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
    assert!(c.server.pseudonym_key.is_empty());
    let Pbx::Ari(a) = &c.pbx;
    assert_eq!(
        a,
        &ari::Settings {
            password: Secret::new("pw"),
            ..ari::Settings::default()
        }
    );
    assert_eq!(
        c.idps["sim"],
        Idp::Simulator {
            step: Duration::from_secs(1)
        }
    );
    assert_eq!(
        c.limits,
        Limits {
            max_concurrent_orders: 200,
            max_concurrent_orders_per_idp: 100,
            max_starts_per_number_per_hour: 6,
            max_starts_per_line_per_hour: 10,
            max_checks_per_agent_per_hour: 20,
            max_starts_per_queue_per_minute: 60,
            declined_cool_down: Duration::from_secs(30 * 60),
        }
    );
    // The only provider is the queue's provider; everything else is QueuePolicy::with_defaults.
    assert_eq!(
        *c.queues["support"],
        QueuePolicy::with_defaults("support", "sim", routes())
    );
    assert!(c.defaults.is_none());
}

#[test]
fn every_queue_key_is_read() {
    let c = ok(&explicit_with(
        r#"
[idp.other]
kind = "simulator"
step = "0s"

[queues.full]
mode = "both"
idp = "other"
languages = ["nb", "sv"]
max_entry_attempts = 10
max_orders = 5
first_digit_timeout = "500ms"
inter_digit_timeout = "2s"
verify_timeout = "1m"
gate_deadline = "1h"
accept = ["se_samordningsnummer", "se_personnummer"]
accept_10_digits = true
user_visible_text = "Hej"
pin_code = true
progress_prompts = false
announce_outcome = false
moh_class = "calm"
disclose = ["pseudonym", "name", "masked_number", "number"]

[queues.full.prompts]
enter-number = "sound:custom/enter"
[queues.full.prompts.verified]
sv = "recording:ok-sv"

[queues.full.routes]
verified = "a,b,1"
failed = "a,c,2"
unavailable = "a,d,3"
skipped = "a,e,1"
interrupted = "a,f,1"
no_agent = "a,g,1"
after_agent = "a,h,1"
agent = "agents,s,1"

[queues.full.routes_by_reason]
declined_call = "a,fraud,1"
expired = "a,late,1"

[server]
pseudonym_key = "0123456789abcdef"
"#,
    ));
    assert_eq!(
        c.idps["other"],
        Idp::Simulator {
            step: Duration::ZERO
        }
    );
    let p = &c.queues["full"];
    assert_eq!(p.mode, Mode::Both);
    assert_eq!(p.idp, "other");
    assert_eq!(p.languages, vec![Language::Nb, Language::Sv]);
    assert_eq!((p.max_entry_attempts, p.max_orders), (10, 5));
    assert_eq!(p.first_digit_timeout, Duration::from_millis(500));
    assert_eq!(p.inter_digit_timeout, Duration::from_secs(2));
    assert_eq!(p.verify_timeout, Duration::from_secs(60));
    assert_eq!(p.gate_deadline, Duration::from_secs(3600));
    assert_eq!(
        p.accept_kinds,
        vec![
            crate::pnr::Kind::SeSamordningsnummer,
            crate::pnr::Kind::SePersonnummer
        ]
    );
    assert!(p.accept_10_digits && p.pin_code && !p.progress_prompts && !p.announce_outcome);
    assert_eq!(p.user_visible_text.as_deref(), Some("Hej"));
    assert_eq!(p.moh_class, "calm");
    assert_eq!(p.disclose.fields().len(), 4);
    for lang in Language::ALL {
        assert_eq!(
            p.media_for(PromptId::EnterNumber, lang),
            "sound:custom/enter"
        );
    }
    assert_eq!(
        p.media_for(PromptId::Verified, Language::Sv),
        "recording:ok-sv"
    );
    assert_eq!(
        p.media_for(PromptId::Verified, Language::En),
        PromptId::Verified.default_media()
    );
    assert_eq!(p.routes.agent, Some(route("agents,s,1")));
    assert_eq!(p.routes.after_agent, Some(route("a,h,1")));
    assert_eq!(p.routes.skipped, Some(route("a,e,1")));
    assert_eq!(
        p.routes_by_reason[&Reason::DeclinedCall],
        route("a,fraud,1")
    );
    assert_eq!(p.routes_by_reason[&Reason::Expired], route("a,late,1"));
}

#[test]
fn an_empty_file_only_lacks_the_ari_password() {
    only_issue("", "pbx.ari.password", "required");
}

#[test]
fn abuse_limits_are_read_and_checked() {
    let c = try_load(
        &minimal_with(
            "[limits]\nmax_concurrent_orders_per_idp = 7\nmax_checks_per_agent_per_hour = 3\n\
             max_starts_per_queue_per_minute = 500\ndeclined_cool_down = \"0s\"\n",
        ),
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(c.limits.max_concurrent_orders_per_idp, 7);
    assert_eq!(c.limits.max_checks_per_agent_per_hour, 3);
    assert_eq!(c.limits.max_starts_per_queue_per_minute, 500);
    assert_eq!(c.limits.declined_cool_down, Duration::ZERO);
    let got = try_load(
        &minimal_with(
            "[limits]\nmax_concurrent_orders_per_idp = 0\nmax_checks_per_agent_per_hour = 0\n\
             max_starts_per_queue_per_minute = 100001\ndeclined_cool_down = \"soon\"\n",
        ),
        &[],
        &[],
    )
    .unwrap_err();
    let paths: std::collections::BTreeSet<_> = got.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "limits.declined_cool_down",
            "limits.max_checks_per_agent_per_hour",
            "limits.max_concurrent_orders_per_idp",
            "limits.max_starts_per_queue_per_minute",
        ]
        .into_iter()
        .collect(),
        "{got:#?}"
    );
}

// --- environment overrides ---------------------------------------------------------------------------------

#[test]
fn environment_overrides_win_and_are_coerced_from_text() {
    let c = try_load(
        &minimal_with("[limits]\nmax_concurrent_orders = 50\n"),
        &[
            ("CALLGATE__SERVER__LISTEN", "0.0.0.0:8081"),
            ("CALLGATE__PBX__ARI__PASSWORD", "from-env"),
            ("CALLGATE__QUEUES__SUPPORT__MAX_ORDERS", "1"),
            ("CALLGATE__QUEUES__SUPPORT__PIN_CODE", "TRUE"),
            ("CALLGATE__QUEUES__SUPPORT__LANGUAGES", "en, nb"),
            ("CALLGATE__QUEUES__SUPPORT__VERIFY_TIMEOUT", "90s"),
            (
                "CALLGATE__QUEUES__SUPPORT__ROUTES_BY_REASON__DECLINED_CALL",
                "q,fraud,1",
            ),
            ("CALLGATE__LIMITS__MAX_CONCURRENT_ORDERS", "5"),
            // Not overrides: wrong prefix or separator.
            ("CALLGATE_PSEUDONYM_KEY", "ignored"),
            ("OTHER__SERVER__LISTEN", "1.2.3.4:1"),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(c.server.listen, "0.0.0.0:8081".parse().unwrap());
    let Pbx::Ari(a) = &c.pbx;
    assert_eq!(a.password.expose(), "from-env");
    let p = &c.queues["support"];
    assert_eq!(p.max_orders, 1);
    assert!(p.pin_code);
    assert_eq!(p.languages, vec![Language::En, Language::Nb]);
    assert_eq!(p.verify_timeout, Duration::from_secs(90));
    assert_eq!(
        p.routes_by_reason[&Reason::DeclinedCall],
        route("q,fraud,1")
    );
    assert_eq!(c.limits.max_concurrent_orders, 5);
    assert!(c.server.pseudonym_key.is_empty());
}

#[test]
fn bad_and_unknown_overrides_are_reported_at_their_key() {
    let got = try_load(
        MINIMAL,
        &[
            ("CALLGATE__QUEUES__SUPPORT__MAX_ORDERS", "many"),
            ("CALLGATE__SERVER__BOGUS", "1"),
        ],
        &[],
    )
    .unwrap_err();
    assert_eq!(
        got,
        vec![
            Issue {
                path: "server.bogus".into(),
                message: "unknown key".into()
            },
            Issue {
                path: "queues.support.max_orders".into(),
                message: "expected a whole number from 1 to 5, found many".into()
            },
        ]
    );
}

#[test]
fn mixed_case_queue_names_survive_loading_and_are_rejected() {
    // The config crate keeps TOML key case (the name arrives intact), but overrides are lowercased, so
    // a mixed-case queue could never be overridden: such names are an error.
    let toml = MINIMAL.replace("queues.support.routes", "queues.Support.routes");
    let got = issues(&toml);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].path, "queues.Support");
    assert!(got[0].message.contains("lowercase"));
}

// --- ${VAR} interpolation -----------------------------------------------------------------------------------

#[test]
fn variables_resolve_into_secrets_and_any_text_value() {
    let toml = r#"
[server]
pseudonym_key = "${KEY}"
data_dir = "${STATE:-/srv/callgate}"
[pbx.ari]
password = "${ARI_PASSWORD}"
username = "cg$$1"
[idp.sim]
kind = "simulator"
[queues.support]
max_orders = "${ORDERS}"
[queues.support.routes]
verified = "queues,support,1"
failed = "queues,support-unverified,1"
unavailable = "queues,support-fallback,1"
"#;
    let c = try_load(
        toml,
        &[],
        &[
            ("KEY", "k3y-with-16-bytes!"),
            ("ARI_PASSWORD", "s3cret"),
            ("ORDERS", "1"),
            ("STATE", ""),
        ],
    )
    .unwrap();
    let Pbx::Ari(a) = &c.pbx;
    assert_eq!(a.password.expose(), "s3cret");
    assert_eq!(a.username, "cg$1");
    assert!(!format!("{c:?}").contains("s3cret"));
    assert_eq!(c.server.pseudonym_key.expose(), "k3y-with-16-bytes!");
    assert_eq!(c.server.data_dir, PathBuf::from("/srv/callgate"));
    assert_eq!(c.queues["support"].max_orders, 1);
}

#[test]
fn an_unset_variable_names_the_key_and_the_variable() {
    let toml = MINIMAL.replace("password = \"pw\"", "password = \"${ARI_PASSWORD}\"");
    let got = issues(&toml);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].path, "pbx.ari.password");
    assert!(got[0].message.contains("ARI_PASSWORD"), "{}", got[0]);
    assert!(got[0].message.contains("not set"), "{}", got[0]);
}

#[test]
fn interpolation_syntax() {
    let look = |n: &str| match n {
        "A" => Some("1".to_owned()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    assert_eq!(interpolate("x${A}y", &look).unwrap(), "x1y");
    assert_eq!(interpolate("${A}${A}", &look).unwrap(), "11");
    assert_eq!(interpolate("${NOPE:-d:e}", &look).unwrap(), "d:e");
    assert_eq!(interpolate("${EMPTY:-d}", &look).unwrap(), "d");
    assert_eq!(interpolate("${EMPTY}", &look).unwrap(), "");
    assert_eq!(interpolate("$$A $x $", &look).unwrap(), "$A $x $");
    assert_eq!(interpolate("$${A}", &look).unwrap(), "${A}");
    assert!(interpolate("${A", &look)
        .unwrap_err()
        .contains("unterminated"));
    assert!(interpolate("${1A}", &look)
        .unwrap_err()
        .contains("not a variable reference"));
    assert!(interpolate("${}", &look).is_err());
    assert!(interpolate("${NOPE}", &look).unwrap_err().contains("NOPE"));
}

// --- every problem, with its path ---------------------------------------------------------------------------

#[test]
fn the_broken_fixture_reports_every_problem() {
    let got = try_load(BROKEN, &[], &[]).unwrap_err();
    let paths: BTreeSet<&str> = got.iter().map(|i| i.path.as_str()).collect();
    let expected: BTreeSet<&str> = [
        "colour",
        "server.listen",
        "server.shutdown_grace",
        "server.tls",
        "pbx.ari.password",
        "pbx.ari.reconect_max",
        "idp.sim.step",
        "idp.bank.client_p12",
        "idp.bank.server_ca",
        "queues.support.idp",
        "queues.support.languages",
        "queues.support.max_attempts",
        "queues.support.verify_timeout",
        "queues.support.max_orders",
        "queues.support.disclose",
        "queues.support.routes.failed",
        "queues.support.routes.fallback",
        "queues.support.routes_by_reason.declined",
        "queues.support.prompts.enter-numbr",
        "queues.sales.mode",
        "queues.sales.gate_deadline",
        "queues.sales.routes.failed",
        "queues.sales.routes.unavailable",
        "queues.Mixed",
        "limits.max_concurrent_orders",
        "limits.per_caller",
    ]
    .into_iter()
    .collect();
    assert_eq!(paths, expected, "{got:#?}");
    // One issue per path: a bad value is not also reported as missing.
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    let text: Vec<String> = got.iter().map(Issue::to_string).collect();
    for line in [
        r#"queues.support.routes.failed: "queues,x" is not context,extension,priority"#,
        r#"queues.support.idp: no provider named "bankid2" (known: sim)"#,
        r#"queues.support.languages: unknown language "fr" (known: sv, en, nb)"#,
        r#"pbx.ari.reconect_max: unknown key (did you mean "reconnect_max"?)"#,
        r#"idp.bank.client_p12: file /nonexistent/callgate/rp.p12 does not exist"#,
        r#"queues.support.verify_timeout: "8 seconds" is not a duration (use a whole number with ms, s, m or h, e.g. "8s")"#,
        "queues.sales.gate_deadline: 1m must be longer than verify_timeout + first_digit_timeout (2m + 8s)",
        "queues.sales.routes.failed: required",
    ] {
        assert!(text.contains(&line.to_owned()), "missing {line:?} in {text:#?}");
    }
    assert!(text.iter().any(
        |l| l.starts_with("queues.support.routes_by_reason.declined: unknown reason (known: ")
    ));
}

#[test]
fn type_mismatches_are_reported() {
    only_issue(
        &minimal_with("[queues.b]\nroutes = \"x\"\n"),
        "queues.b.routes",
        "expected a table, found a string",
    );
    only_issue(
        &minimal_with("[queues.support]\npin_code = \"maybe\"\n"),
        "queues.support.pin_code",
        "expected true or false, found \"maybe\"",
    );
    only_issue(
        &minimal_with("[queues.support]\nlanguages = [[\"sv\"]]\n"),
        "queues.support.languages[0]",
        "expected a single value, found a list",
    );
    only_issue(
        &minimal_with("[queues.support]\nfirst_digit_timeout = 8\n"),
        "queues.support.first_digit_timeout",
        "\"8\" is not a duration",
    );
    only_issue(
        &minimal_with("[queues.support]\ninter_digit_timeout = \"0s\"\n"),
        "queues.support.inter_digit_timeout",
        "longer than zero",
    );
    only_issue(
        &MINIMAL.replace("[pbx.ari]", "[pbx.ari]\nurl = \"http://asterisk:8088/ari\""),
        "pbx.ari.url",
        "/ari prefix is added",
    );
}

#[test]
fn a_toml_syntax_error_is_one_issue_without_a_path() {
    let got = issues("[server\nlisten = 1");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "");
    assert!(!got[0].to_string().starts_with(':'));
}

#[test]
fn queue_rules_report_at_the_right_key() {
    only_issue(
        &minimal_with("[queues.support]\ngate_deadline = \"128s\"\n"),
        "queues.support.gate_deadline",
        "must be longer than verify_timeout + first_digit_timeout",
    );
    let got = issues(&minimal_with(
        "[queues.support]\naccept = [\"dk_cpr\"]\naccept_10_digits = true\n",
    ));
    let paths: Vec<&str> = got.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        ["queues.support.accept_10_digits", "queues.support.accept"],
        "{got:#?}"
    );
    only_issue(
        &minimal_with("[queues.support]\naccept = [\"se_personnummer\", \"no_fodselsnummer\"]\n"),
        "queues.support.accept",
        "Swedish numbers only: remove no_fodselsnummer",
    );
    only_issue(
        &minimal_with("[queues.support]\nmode = \"during_call\"\n"),
        "queues.support.routes.agent",
        "required in mode during_call",
    );
    only_issue(
        &minimal_with("[queues.support]\nlanguages = []\n"),
        "queues.support.languages",
        "must not be empty",
    );
    only_issue(
        &minimal_with("[queues.support]\nlanguages = [\"sv\", \"sv\"]\n"),
        "queues.support.languages",
        "listed twice",
    );
    only_issue(
        &minimal_with("[queues.support]\naccept = []\n"),
        "queues.support.accept",
        "must not be empty",
    );
    only_issue(
        &minimal_with("[queues.support]\nmax_entry_attempts = 0\n"),
        "queues.support.max_entry_attempts",
        "from 1 to 10",
    );
    only_issue(
        &minimal_with(&format!(
            "[queues.support]\nuser_visible_text = \"{}\"\n",
            "å".repeat(1001)
        )),
        "queues.support.user_visible_text",
        "at most 1000",
    );
    only_issue(
        &minimal_with("[queues.support.prompts]\nenter-number = \"custom/enter\"\n"),
        "queues.support.prompts.enter-number",
        "is not a media URI",
    );
    only_issue(
        &minimal_with("[queues.support.prompts.enter-number]\nfr = \"sound:x\"\n"),
        "queues.support.prompts.enter-number.fr",
        "unknown language",
    );
    only_issue(
        &minimal_with("[queues.support]\ndisclose = [\"pseudonym\"]\n"),
        "server.pseudonym_key",
        "required because support disclose \"pseudonym\"",
    );
    only_issue(
        &minimal_with("[server]\npseudonym_key = \"short\"\n"),
        "server.pseudonym_key",
        "at least 16 bytes",
    );
}

#[test]
fn the_provider_is_required_unless_exactly_one_is_configured() {
    let two = minimal_with("[idp.other]\nkind = \"simulator\"\n");
    only_issue(
        &two,
        "queues.support.idp",
        "required: several providers are configured (other, sim)",
    );
    let none = MINIMAL.replace("[idp.sim]\nkind = \"simulator\"", "");
    only_issue(
        &none,
        "queues.support.idp",
        "no identity provider is configured",
    );
    // A queue that does not verify needs no provider.
    let off = none.replace(
        "[queues.support.routes]",
        "[queues.support]\nmode = \"off\"\n[queues.support.routes]",
    );
    assert_eq!(ok(&off).queues["support"].idp, "");
}

#[test]
fn provider_kinds_and_keys() {
    only_issue(
        &explicit_with("[idp.x]\nstep = \"1s\"\n"),
        "idp.x.kind",
        "required (bankid, simulator, ciba or ciba_simulator)",
    );
    only_issue(
        &explicit_with("[idp.x]\nkind = \"saml\"\n"),
        "idp.x.kind",
        "unknown kind \"saml\"",
    );
    only_issue(
        &explicit_with("[idp.x]\nkind = \"simulator\"\nurl = \"http://127.0.0.1/\"\n"),
        "idp.x.url",
        "unknown key",
    );
}

fn bankid(body: &str) -> String {
    explicit_with(&format!("[idp.b]\nkind = \"bankid\"\n{body}\n"))
}

#[test]
fn bankid_over_https_needs_a_ca_and_exactly_one_identity() {
    let f = TempFiles::new(&["rp.p12", "ca.pem", "cert.pem", "key.pem"]);
    let (p12, ca, cert, key) = (
        f.path("rp.p12"),
        f.path("ca.pem"),
        f.path("cert.pem"),
        f.path("key.pem"),
    );

    let c = try_load(
        &bankid(&format!(
            "url = \"https://appapi2.test.bankid.com/rp/v6.0\"\nclient_p12 = \"{p12}\"\nclient_p12_password = \"${{PW}}\"\nserver_ca = \"{ca}\"\nrequest_timeout = \"4s\"\n"
        )),
        &[],
        &[("PW", "p12pw")],
    )
    .unwrap();
    let Idp::BankId(s) = &c.idps["b"] else {
        panic!("not bankid")
    };
    assert_eq!(
        s.url, "https://appapi2.test.bankid.com/rp/v6.0/",
        "trailing slash added"
    );
    assert_eq!(s.server_ca, Some(PathBuf::from(&ca)));
    assert_eq!(s.request_timeout, Duration::from_secs(4));
    assert_eq!(s.connect_timeout, Duration::from_secs(3));
    assert_eq!(
        s.identity,
        Some(ClientIdentity::Pkcs12 {
            path: PathBuf::from(&p12),
            password: Secret::new("p12pw")
        })
    );

    let c = ok(&bankid(&format!(
        "client_cert = \"{cert}\"\nclient_key = \"{key}\"\nserver_ca = \"{ca}\"\n"
    )));
    let Idp::BankId(s) = &c.idps["b"] else {
        panic!("not bankid")
    };
    assert_eq!(
        s.identity,
        Some(ClientIdentity::Pem {
            cert: cert.clone().into(),
            key: key.clone().into()
        })
    );

    only_issue(
        &bankid(&format!("client_cert = \"{cert}\"\nserver_ca = \"{ca}\"\n")),
        "idp.b.client_key",
        "required together with client_cert",
    );
    only_issue(
        &bankid(&format!(
            "client_p12 = \"{p12}\"\nclient_cert = \"{cert}\"\nclient_key = \"{key}\"\nserver_ca = \"{ca}\"\n"
        )),
        "idp.b.client_p12",
        "not both",
    );
    only_issue(
        &bankid(&format!(
            "client_p12 = \"{p12}\"\nserver_ca = \"{}\"\n",
            f.path("missing.pem")
        )),
        "idp.b.server_ca",
        "missing.pem does not exist",
    );
    let got = issues(&bankid(""));
    let paths: Vec<&str> = got.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(paths, ["idp.b.client_p12", "idp.b.server_ca"], "{got:#?}");
}

#[test]
fn bankid_over_http_only_on_loopback_and_without_files() {
    let c = ok(&bankid("url = \"http://127.0.0.1:18443/rp/v6.0\"\n"));
    let Idp::BankId(s) = &c.idps["b"] else {
        panic!("not bankid")
    };
    assert_eq!(s.url, "http://127.0.0.1:18443/rp/v6.0/");
    assert_eq!((&s.identity, &s.server_ca), (&None, &None));
    ok(&bankid("url = \"http://localhost:1/\"\n"));

    only_issue(
        &bankid("url = \"http://bankid.example/rp/v6.0/\"\n"),
        "idp.b.url",
        "loopback",
    );
    only_issue(
        &bankid("url = \"ftp://127.0.0.1/\"\n"),
        "idp.b.url",
        "not an https URL",
    );
    only_issue(
        &bankid("url = \"http://127.0.0.1/\"\nserver_ca = \"/nonexistent/ca.pem\"\n"),
        "idp.b.server_ca",
        "no effect with a plain http url",
    );
}

// --- [defaults] -----------------------------------------------------------------------------------------------

const WITH_DEFAULTS: &str = r#"
[pbx.ari]
password = "pw"
[idp.sim]
kind = "simulator"
[idp.other]
kind = "simulator"

[defaults]
idp = "sim"
max_orders = 1
languages = ["en"]
[defaults.routes]
verified = "d,verified,1"
failed = "d,failed,1"
unavailable = "d,unavailable,1"
[defaults.routes_by_reason]
expired = "d,expired,1"
[defaults.prompts]
verified = "sound:d/verified"

[queues.support]
max_orders = 3
[queues.support.routes]
verified = "s,verified,1"
[queues.support.routes_by_reason]
declined_call = "s,fraud,1"

[queues.bare]
idp = "other"
"#;

#[test]
fn queues_inherit_unset_keys_from_defaults_entry_by_entry() {
    let c = ok(WITH_DEFAULTS);
    let s = &c.queues["support"];
    assert_eq!(s.idp, "sim");
    assert_eq!(s.max_orders, 3);
    assert_eq!(s.languages, vec![Language::En]);
    assert_eq!(s.routes.verified, route("s,verified,1"));
    assert_eq!(s.routes.failed, route("d,failed,1"));
    assert_eq!(
        s.routes_by_reason[&Reason::DeclinedCall],
        route("s,fraud,1")
    );
    assert_eq!(s.routes_by_reason[&Reason::Expired], route("d,expired,1"));
    assert_eq!(
        s.media_for(PromptId::Verified, Language::En),
        "sound:d/verified"
    );
    let b = &c.queues["bare"];
    assert_eq!((b.idp.as_str(), b.max_orders), ("other", 1));
    assert_eq!(b.routes.unavailable, route("d,unavailable,1"));
    let d = c.defaults.as_ref().unwrap();
    assert_eq!(d.name.0, "defaults");
    assert_eq!(d.max_orders, 1);
}

#[test]
fn policy_for_uses_the_queue_then_defaults_then_nothing() {
    let c = ok(WITH_DEFAULTS);
    assert!(Arc::ptr_eq(
        &c.policy_for("support").unwrap(),
        &c.queues["support"]
    ));
    let p = c.policy_for("billing").unwrap();
    assert_eq!(p.name.0, "billing");
    assert_eq!(
        QueuePolicy {
            name: QueueName("defaults".into()),
            ..(*p).clone()
        },
        **c.defaults.as_ref().unwrap()
    );
    assert!(ok(MINIMAL).policy_for("billing").is_none());
    assert!(ok(MINIMAL).policy_for("support").is_some());
}

#[test]
fn a_bad_default_is_reported_once_at_its_own_path() {
    let toml = WITH_DEFAULTS.replace("max_orders = 1", "max_orders = 9");
    let got = issues(&toml);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].path, "defaults.max_orders");

    let toml = WITH_DEFAULTS.replace("idp = \"sim\"", "idp = \"gone\"");
    let got = issues(&toml);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        got[0].to_string(),
        "defaults.idp: no provider named \"gone\" (known: other, sim)"
    );
}

#[test]
fn defaults_must_be_complete_and_missing_routes_mention_them() {
    let toml = WITH_DEFAULTS.replace("failed = \"d,failed,1\"\n", "");
    let got: Vec<String> = issues(&toml).iter().map(Issue::to_string).collect();
    assert_eq!(
        got,
        [
            "defaults.routes.failed: required",
            "queues.bare.routes.failed: required (here or in [defaults])",
            "queues.support.routes.failed: required (here or in [defaults])",
        ]
    );
}

// --- the shipped example and check-config ----------------------------------------------------------------------

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn the_example_loads_on_a_fresh_machine() {
    let c = ok(EXAMPLE);
    let Pbx::Ari(a) = &c.pbx;
    assert_eq!(a.password.expose(), "changeme");
    let s = &c.queues["support"];
    assert_eq!((s.mode, s.idp.as_str()), (Mode::BeforeAgent, "sim"));
    assert!(s.disclose.allows(crate::outcome::Field::Name));
    assert_eq!(
        s.routes_by_reason[&Reason::DeclinedCall],
        route("queues,fraud-desk,1")
    );
    let sales = &c.queues["sales"];
    assert_eq!(sales.routes.failed, route("queues,general-unverified,1"));
    assert_eq!(sales.max_orders, 1);
    assert!(c.policy_for("anything").is_some());
    // The example's [defaults] spells out the built-in defaults.
    let d = c.defaults.as_ref().unwrap();
    let mut expected = QueuePolicy::with_defaults("defaults", "sim", d.routes.clone());
    expected.routes_by_reason = d.routes_by_reason.clone();
    assert_eq!(**d, expected);
}

/// The example with its commented-out `[idp.bankid]` block enabled.
fn example_with_bankid() -> String {
    let mut on = false;
    let mut out = String::new();
    for line in EXAMPLE.lines() {
        if line.starts_with("# [idp.bankid]") {
            on = true;
        }
        if on && line.starts_with("# ") {
            out.push_str(&line[2..]);
        } else {
            on = false;
            out.push_str(line);
        }
        out.push('\n');
    }
    assert!(out.contains("\n[idp.bankid]\n"));
    out
}

#[test]
fn the_examples_bankid_block_is_valid_once_its_files_exist() {
    let got = try_load(
        &example_with_bankid(),
        &[],
        &[("BANKID_P12_PASSWORD", "pw")],
    )
    .unwrap_err();
    let got: Vec<String> = got.iter().map(Issue::to_string).collect();
    assert_eq!(
        got,
        [
            "idp.bankid.client_p12: file /etc/callgate/rp.p12 does not exist",
            "idp.bankid.server_ca: file /etc/callgate/bankid-test-root.pem does not exist",
        ]
    );
    let f = TempFiles::new(&["rp.p12", "root.pem"]);
    let text = example_with_bankid()
        .replace("/etc/callgate/rp.p12", &f.path("rp.p12"))
        .replace("/etc/callgate/bankid-test-root.pem", &f.path("root.pem"))
        .replace(
            "idp = \"sim\"                         # \"bankid\"",
            "idp = \"bankid\" #",
        );
    let c = try_load(&text, &[], &[("BANKID_P12_PASSWORD", "pw")]).unwrap();
    assert_eq!(c.queues["support"].idp, "bankid");
    assert!(matches!(c.idps["bankid"], Idp::BankId(_)));
}

#[test]
fn check_config_summarises_a_good_file_and_lists_every_issue_of_a_bad_one() {
    let (out, code) = check_config(&repo_file("deploy/callgate.example.toml"));
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[1],
        "queue support: mode=before_agent idp=sim languages=sv,en verified=queues,support,1 \
         failed=queues,support-unverified,1 unavailable=queues,support-fallback,1 disclose=name"
    );
    assert!(lines[0].starts_with("queue sales: "), "{out}");
    assert!(lines[2].starts_with("[defaults]: "), "{out}");
    assert!(
        lines[3].starts_with("api: listen=127.0.0.1:8080 tokens="),
        "{out}"
    );

    let (out, code) = check_config(&repo_file("fixtures/config/broken.toml"));
    assert_eq!(code, EXIT_CONFIG);
    let expected = try_load(BROKEN, &[], &[]).unwrap_err();
    assert_eq!(out.lines().count(), expected.len(), "{out}");
    assert!(
        out.contains("queues.support.idp: no provider named \"bankid2\""),
        "{out}"
    );

    let (out, code) = check_config(&repo_file("fixtures/config/does-not-exist.toml"));
    assert_eq!(code, EXIT_CONFIG);
    assert!(out.starts_with("cannot read "), "{out}");
}

// --- durations -----------------------------------------------------------------------------------------------------

#[test]
fn durations_parse_strictly() {
    for (s, d) in [
        ("500ms", Duration::from_millis(500)),
        ("8s", Duration::from_secs(8)),
        ("2m", Duration::from_secs(120)),
        ("1h", Duration::from_secs(3600)),
        ("0s", Duration::ZERO),
    ] {
        assert_eq!(duration::parse(s), Ok(d), "{s}");
    }
    for bad in [
        "8",
        "8 seconds",
        " 8s",
        "8s ",
        "-1s",
        "1.5s",
        "s",
        "",
        "8S",
        "1d",
        "99999999999999999999h",
    ] {
        assert!(duration::parse(bad).is_err(), "{bad:?} parsed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn formatted_durations_parse_back(ms in 0u64..10_000_000_000) {
        let d = Duration::from_millis(ms);
        prop_assert_eq!(duration::parse(&duration::format(d)), Ok(d));
    }
}

#[test]
fn on_shutdown_is_interrupt_by_default_and_handover_on_request() {
    assert_eq!(
        ok(MINIMAL).server.on_shutdown,
        crate::config::OnShutdown::Interrupt
    );
    let c = ok(&format!("[server]\non_shutdown = \"handover\"\n{MINIMAL}"));
    assert_eq!(c.server.on_shutdown, crate::config::OnShutdown::Handover);
    let issues = try_load(
        &format!("[server]\non_shutdown = \"wait\"\n{MINIMAL}"),
        &[],
        &[],
    )
    .unwrap_err();
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].path, "server.on_shutdown");
    assert!(issues[0].message.contains("handover"));
}

const HASH_A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const HASH_B: &str = "60303AE22B998861BCE3B28F33EEC1BE758A213C86C93C076DBE9F558C11C752";

#[test]
fn api_defaults_tokens_and_overrides() {
    let cfg = ok(MINIMAL);
    assert_eq!(cfg.api, Api::default());
    assert_eq!(cfg.api.keep_verifications, Duration::from_secs(3600));
    assert_eq!(cfg.api.max_body, 16 * 1024);
    let cfg = ok(&minimal_with(&format!(
        r#"
[api]
keep_verifications = "10m"
max_body = 4096

[api.tokens.desk-1001]
sha256 = "{HASH_A}"
role = "agent"
agent = "PJSIP/1001"

[api.tokens.lead]
sha256 = "{HASH_B}"
role = "supervisor"
"#
    )));
    assert_eq!(cfg.api.keep_verifications, Duration::from_secs(600));
    assert_eq!(cfg.api.max_body, 4096);
    let desk = &cfg.api.tokens["desk-1001"];
    assert_eq!(desk.role, Role::Agent);
    assert_eq!(desk.agent.as_deref(), Some("PJSIP/1001"));
    assert_eq!(desk.sha256[0], 0x9f);
    assert_eq!(cfg.api.tokens["lead"].sha256[0], 0x60);
    assert!(
        !format!("{desk:?}").contains("9f86"),
        "Debug shows the hash"
    );

    // A token from the environment alone.
    let cfg = try_load(
        MINIMAL,
        &[
            ("CALLGATE__API__TOKENS__CRM__SHA256", HASH_A),
            ("CALLGATE__API__TOKENS__CRM__ROLE", "ops"),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(cfg.api.tokens["crm"].role, Role::Ops);
    let summary = summary(&cfg);
    assert!(
        summary.contains("tokens=1 (agent=0,supervisor=0,ops=1)"),
        "{summary}"
    );
}

#[test]
fn widget_frame_ancestors_and_cors_origins_are_origins() {
    let cfg = ok(MINIMAL);
    assert!(cfg.api.widget_frame_ancestors.is_empty());
    assert!(cfg.api.cors_origins.is_empty());
    let cfg = ok(&minimal_with(
        r#"
[api]
widget_frame_ancestors = ["https://CRM.example.com/", "https://*.example.org:8443", "http://127.0.0.1:3000"]
cors_origins = ["https://crm.example.com:443", "http://localhost:5173"]
"#,
    ));
    assert_eq!(
        cfg.api.widget_frame_ancestors,
        [
            "https://crm.example.com",
            "https://*.example.org:8443",
            "http://127.0.0.1:3000"
        ]
    );
    assert_eq!(
        cfg.api.cors_origins,
        ["https://crm.example.com", "http://localhost:5173"]
    );
    let summary = summary(&cfg);
    assert!(
        summary.contains("cors_origins=https://crm.example.com,http://localhost:5173"),
        "{summary}"
    );
    // From the environment, comma-separated.
    let cfg = try_load(
        MINIMAL,
        &[(
            "CALLGATE__API__CORS_ORIGINS",
            "https://a.example.com, https://b.example.com",
        )],
        &[],
    )
    .unwrap();
    assert_eq!(cfg.api.cors_origins.len(), 2);

    // Every bad entry is reported at its index.
    let got = issues(&minimal_with(
        r#"
[api]
widget_frame_ancestors = ["https://crm.example.com/path", "http://crm.example.com", "https://ok.example.com", "https://ok.example.com", "'self'"]
cors_origins = ["https://*.example.com", "*", "https://crm.example.com?x=1", "ftp://crm.example.com"]
"#,
    ));
    let paths: Vec<&str> = got.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "api.widget_frame_ancestors[0]",
            "api.widget_frame_ancestors[1]",
            "api.widget_frame_ancestors[3]",
            "api.widget_frame_ancestors[4]",
            "api.cors_origins[0]",
            "api.cors_origins[1]",
            "api.cors_origins[2]",
            "api.cors_origins[3]",
        ],
        "{got:#?}"
    );
    assert!(got[1].message.contains("must be https"), "{got:#?}");
    assert!(got[2].message.contains("listed twice"), "{got:#?}");
    assert!(got[4].message.contains("no wildcards"), "{got:#?}");
    only_issue(
        &minimal_with("[api]\nwidget_frame_ancestor = []"),
        "api.widget_frame_ancestor",
        "did you mean \"widget_frame_ancestors\"",
    );
}

#[test]
fn api_token_problems_are_reported_at_their_key() {
    only_issue(
        &minimal_with("[api.tokens.a]\nsha256 = \"abc\"\nrole = \"ops\""),
        "api.tokens.a.sha256",
        "64 hex digits",
    );
    only_issue(
        &minimal_with(&format!(
            "[api.tokens.a]\nsha256 = \"{}\"\nrole = \"ops\"",
            "g".repeat(64)
        )),
        "api.tokens.a.sha256",
        "64 hex digits",
    );
    only_issue(
        &minimal_with(&format!(
            "[api.tokens.a]\nsha256 = \"{HASH_A}\"\nrole = \"boss\""
        )),
        "api.tokens.a.role",
        "not one of",
    );
    only_issue(
        &minimal_with(&format!(
            "[api.tokens.a]\nsha256 = \"{HASH_A}\"\nrole = \"agent\""
        )),
        "api.tokens.a.agent",
        "required for role agent",
    );
    only_issue(
        &minimal_with(&format!(
            "[api.tokens.a]\nsha256 = \"{HASH_A}\"\nrole = \"ops\"\nagent = \"PJSIP/1\""
        )),
        "api.tokens.a.agent",
        "only for role agent",
    );
    only_issue(
        &minimal_with("[api.tokens.a]\nrole = \"ops\""),
        "api.tokens.a.sha256",
        "required",
    );
    only_issue(
        &minimal_with(&format!(
            "[api.tokens.a]\nsha256 = \"{HASH_A}\"\nrole = \"ops\"\n[api.tokens.b]\nsha256 = \"{}\"\nrole = \"supervisor\"",
            HASH_A.to_uppercase()
        )),
        "api.tokens.b.sha256",
        "api.tokens.a",
    );
    only_issue(
        &minimal_with(&format!(
            "[api.tokens.a]\nsha256 = \"{HASH_A}\"\nrole = \"ops\"\nrol = \"x\""
        )),
        "api.tokens.a.rol",
        "did you mean \"role\"",
    );
    only_issue(
        &minimal_with("[api]\nmax_body = 10"),
        "api.max_body",
        "from 1024",
    );
    only_issue(
        &minimal_with("[api]\nkeep_verifications = \"0s\""),
        "api.keep_verifications",
        "longer than zero",
    );
    only_issue(
        &minimal_with("[api]\ntoken = 1"),
        "api.token",
        "did you mean \"tokens\"",
    );
}

// --- [audit] -----------------------------------------------------------------------------------------------

#[test]
fn audit_retention_has_a_default_and_a_range() {
    let c = try_load(MINIMAL, &[], &[]).unwrap();
    assert_eq!(c.audit.retention_days, 365);
    let c = try_load(&minimal_with("[audit]\nretention_days = 30\n"), &[], &[]).unwrap();
    assert_eq!(c.audit.retention_days, 30);
    only_issue(
        &minimal_with("[audit]\nretention_days = 0\n"),
        "audit.retention_days",
        "",
    );
    only_issue(&minimal_with("[audit]\nkeep = \"1y\"\n"), "audit.keep", "");
}

// --- CIBA providers --------------------------------------------------------------------------------------

#[test]
fn a_ciba_provider_is_read_with_its_templates() {
    let files = TempFiles::new(&["broker-ca.pem"]);
    let c = ok(&explicit_with(&format!(
        r#"[idp.broker]
kind = "ciba"
issuer = "https://example.idura.broker/"
client_id = "urn:my:application"
client_secret = "s3cret"
login_hint = "sub:ssn:{{number}}"
acr_values = "urn:grn:authn:se:bankid"
binding_message = "Callgate"
requested_expiry = 120
authorization_details = '[{{"type":"phoneAuth","callInitiator":"{{call_initiator}}"}}]'
number_claim = "ssn"
declined_call_description = "declined"
server_ca = "{}"
request_timeout = "4s"
[idp.cibasim]
kind = "ciba_simulator"
"#,
        files.path("broker-ca.pem")
    )));
    let Idp::Ciba(s) = &c.idps["broker"] else {
        panic!("not ciba")
    };
    assert_eq!(s.issuer, "https://example.idura.broker");
    assert_eq!(s.client_secret.expose(), "s3cret");
    assert_eq!(s.requested_expiry, Some(120));
    assert_eq!(s.request_timeout, std::time::Duration::from_secs(4));
    assert!(s
        .authorization_details
        .as_deref()
        .unwrap()
        .contains("{call_initiator}"));
    assert!(matches!(c.idps["cibasim"], Idp::CibaSimulator));
    let with_key = explicit_with(&format!(
        "[idp.broker]\nkind = \"ciba\"\nissuer = \"http://127.0.0.1:9\"\nclient_id = \"a\"\nclient_key = \"{}\"\nclient_key_id = \"k1\"\n",
        files.path("broker-ca.pem")
    ));
    let c = ok(&with_key);
    let Idp::Ciba(s) = &c.idps["broker"] else {
        panic!("not ciba")
    };
    assert!(s.client_key.is_some());
    assert_eq!(s.client_key_id.as_deref(), Some("k1"));
    only_issue(
        &with_key.replace("client_key_id", "client_secret"),
        "idp.broker.client_key",
        "not both",
    );
}

#[test]
fn ciba_problems_are_reported_at_their_keys() {
    let got = issues(&explicit_with(
        r#"[idp.broker]
kind = "ciba"
issuer = "https://example.idura.broker"
login_hint = "sub:ssn:"
authorization_details = "[{not json"
"#,
    ));
    let paths: Vec<&str> = got.iter().map(|i| i.path.as_str()).collect();
    for p in [
        "idp.broker.client_id",
        "idp.broker.client_secret",
        "idp.broker.login_hint",
        "idp.broker.authorization_details",
        "idp.broker.server_ca",
    ] {
        assert!(paths.contains(&p), "{p} missing from {got:#?}");
    }
    only_issue(
        &explicit_with(
            "[idp.broker]\nkind = \"ciba\"\nissuer = \"http://broker.example\"\nclient_id = \"a\"\nclient_secret = \"b\"\n",
        ),
        "idp.broker.issuer",
        "loopback",
    );
}

#[test]
fn a_word_pair_provider_is_refused_where_the_gate_checks() {
    let provider = "[idp.no]\nkind = \"ciba\"\nissuer = \"http://127.0.0.1:9\"\nclient_id = \"a\"\nclient_secret = \"b\"\nword_pair = true\n";
    let toml = explicit_with(provider).replace("idp = \"sim\"", "idp = \"no\"");
    only_issue(&toml, "queues.support.mode", "word pair");
    let during = toml
        .replace(
            "[queues.support]\n",
            "[queues.support]\nmode = \"during_call\"\n",
        )
        .replace("verified = ", "agent = \"queues,support,1\"\nverified = ");
    let c = ok(&during);
    let Idp::Ciba(s) = &c.idps["no"] else {
        panic!("not ciba")
    };
    assert!(s.word_pair);
}

#[test]
fn switchboards_take_a_token_hash_and_known_queues() {
    let cfg = ok(&minimal_with(&format!(
        "[switchboards.telavox]\ntoken_sha256 = \"{HASH_A}\"\nqueues = [\"support\"]"
    )));
    let b = &cfg.switchboards["telavox"];
    assert_eq!(b.queues, vec!["support".to_owned()]);
    assert_eq!(b.token_sha256[0], 0x9f);
    assert!(!format!("{b:?}").contains("9f86"), "the hash in Debug");
    assert!(ok(MINIMAL).switchboards.is_empty());
    only_issue(
        &minimal_with(&format!(
            "[switchboards.t]\ntoken_sha256 = \"{HASH_A}\"\nqueues = [\"nope\"]"
        )),
        "switchboards.t.queues[0]",
        "no queue named",
    );
    only_issue(
        &minimal_with("[switchboards.t]\nqueues = [\"support\"]"),
        "switchboards.t.token_sha256",
        "required",
    );
    only_issue(
        &minimal_with(&format!(
            "[switchboards.t]\ntoken_sha256 = \"{HASH_A}\"\nqueues = [\"support\"]\nurl = \"x\""
        )),
        "switchboards.t.url",
        "",
    );
    only_issue(
        &minimal_with(&format!(
            "[api.tokens.a]\nsha256 = \"{HASH_A}\"\nrole = \"ops\"\n\
             [switchboards.t]\ntoken_sha256 = \"{HASH_A}\"\nqueues = [\"support\"]"
        )),
        "switchboards.t.token_sha256",
        "api.tokens.a",
    );
}

#[test]
fn a_fixed_call_initiator_is_a_warning_and_the_placeholder_is_not() {
    let with = |details: &str| {
        ok(&explicit_with(&format!(
            "[idp.broker]\nkind = \"ciba\"\nissuer = \"http://127.0.0.1:9\"\nclient_id = \"a\"\nclient_secret = \"s3cret\"\nauthorization_details = '{details}'\n"
        )))
    };
    let fixed = with(r#"[{"type":"phoneAuth","callInitiator":"RP"}]"#);
    let w = warnings(&fixed);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("idp.broker.authorization_details: the call initiator is fixed"));
    let placeholder = with(r#"[{"type":"phoneAuth","callInitiator":"{call_initiator}"}]"#);
    assert!(warnings(&placeholder).is_empty());
}

// --- [state] ---------------------------------------------------------------------------------------------

#[test]
fn state_is_in_memory_unless_redis_is_configured_with_a_shared_key() {
    let c = ok(MINIMAL);
    assert_eq!(c.state.kind, StateKind::Memory);
    assert_eq!(
        c.state.instance_or("pbx1.example", "callgate"),
        "pbx1.example-callgate"
    );
    assert_eq!(
        c.state.instance_or("weird host/", "app"),
        "weird-host--app",
        "characters outside the id rule become '-'"
    );

    let c = ok(&minimal_with(
        r#"
[server]
pseudonym_key = "a-key-of-sixteen-bytes-or-more"
[state]
kind = "redis"
url = "rediss://:secret@redis.example:6380/2"
instance_id = "site-a"
key_prefix = "cc.prod"
pool_size = 4
command_timeout = "2s"
heartbeat_interval = "1s"
snapshot_ttl = "30s"
on_unavailable = "refuse"
"#,
    ));
    let StateKind::Redis(r) = &c.state.kind else {
        panic!("not redis")
    };
    assert_eq!(c.state.instance_id, "site-a");
    assert_eq!(r.url.expose(), "rediss://:secret@redis.example:6380/2");
    assert_eq!(r.key_prefix, "cc.prod");
    assert_eq!(r.pool_size, 4);
    assert_eq!(r.command_timeout, Duration::from_secs(2));
    assert_eq!(r.heartbeat_interval, Duration::from_secs(1));
    assert_eq!(r.snapshot_ttl, Duration::from_secs(30));
    assert_eq!(r.on_unavailable, OnUnavailable::Refuse);
    assert!(!format!("{c:?}").contains("secret@"), "the URL is a secret");
    assert!(warnings(&c).is_empty(), "{:?}", warnings(&c));

    let plain = ok(&minimal_with(
        "[server]\npseudonym_key = \"a-key-of-sixteen-bytes-or-more\"\n[state]\nkind = \"redis\"\nurl = \"redis://10.0.0.5:6379\"\n",
    ));
    let StateKind::Redis(r) = &plain.state.kind else {
        panic!("not redis")
    };
    assert_eq!(r.on_unavailable, OnUnavailable::LocalLimits);
    assert_eq!(r.key_prefix, "callgate");
    assert!(warnings(&plain)
        .iter()
        .any(|w| w.starts_with("state.url:") && w.contains("rediss://")));
    let local = ok(&minimal_with(
        "[server]\npseudonym_key = \"a-key-of-sixteen-bytes-or-more\"\n[state]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n",
    ));
    assert!(warnings(&local).is_empty());
}

#[test]
fn state_problems_are_each_reported_at_their_key() {
    only_issue(
        &minimal_with("[state]\nkind = \"redis\"\nurl = \"redis://127.0.0.1\"\n"),
        "server.pseudonym_key",
        "state.kind = \"redis\"",
    );
    let keyed = "[server]\npseudonym_key = \"a-key-of-sixteen-bytes-or-more\"\n";
    only_issue(
        &minimal_with(&format!("{keyed}[state]\nkind = \"redis\"\n")),
        "state.url",
        "required",
    );
    only_issue(
        &minimal_with(&format!(
            "{keyed}[state]\nkind = \"redis\"\nurl = \"http://127.0.0.1\"\n"
        )),
        "state.url",
        "redis://",
    );
    only_issue(
        &minimal_with("[state]\nkind = \"etcd\"\n"),
        "state.kind",
        "\"memory\", \"redis\"",
    );
    only_issue(
        &minimal_with("[state]\nurl = \"redis://127.0.0.1\"\n"),
        "state.url",
        "only with kind = \"redis\"",
    );
    only_issue(
        &minimal_with("[state]\ninstance_id = \"site a\"\n"),
        "state.instance_id",
        "letters, digits",
    );
    let got = issues(&minimal_with(&format!(
        "{keyed}[state]\nkind = \"redis\"\nurl = \"redis://127.0.0.1\"\npool_size = 0\n\
         command_timeout = \"10s\"\nheartbeat_interval = \"30s\"\non_unavailable = \"panic\"\nkey_prefx = \"x\"\n"
    )));
    let paths: BTreeSet<&str> = got.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        BTreeSet::from([
            "state.pool_size",
            "state.command_timeout",
            "state.snapshot_ttl",
            "state.on_unavailable",
            "state.key_prefx",
        ]),
        "{got:#?}"
    );
}

#[test]
fn a_switchboard_feed_takes_a_url_token_timings_and_a_mapping() {
    let board = |feed: &str| {
        minimal_with(&format!(
            "[switchboards.telavox]\ntoken_sha256 = \"{HASH_A}\"\nqueues = [\"support\"]\n{feed}"
        ))
    };
    let good = r#"
[switchboards.telavox.feed]
url = "wss://events.example.com/v1/calls"
token = "${FEED_TOKEN}"
keepalive = "10s"
max_call_age = "2h"
mapping = "generic_json"
[switchboards.telavox.feed.fields]
event = "type"
call_id = "call.id"
agent = "call.agent.extension"
[switchboards.telavox.feed.events]
CALL_RINGING = "started"
CALL_ANSWERED = "answered"
CALL_HANGUP = "ended"
"#;
    let cfg = try_load(&board(good), &[], &[("FEED_TOKEN", "s3cret-feed")]).unwrap();
    let feed = cfg.switchboards["telavox"].feed.clone().unwrap();
    assert_eq!(feed.url, "wss://events.example.com/v1/calls");
    assert_eq!(feed.token.expose(), "s3cret-feed");
    assert_eq!(feed.keepalive, Duration::from_secs(10));
    assert_eq!(feed.reconnect_min, Duration::from_secs(1));
    assert_eq!(feed.max_call_age, Duration::from_secs(7200));
    let crate::config::feed::Mapping::GenericJson { fields, events } = &feed.mapping;
    assert_eq!(fields.call_id, "call.id");
    assert_eq!(
        fields.queue, "queue",
        "unset fields keep their default name"
    );
    assert_eq!(
        events["CALL_HANGUP"],
        crate::config::feed::FeedEventKind::Ended
    );
    assert!(
        !format!("{cfg:?}").contains("s3cret-feed"),
        "the token in Debug"
    );
    let summary = crate::config::summary(&cfg);
    assert!(
        summary.contains("switchboard telavox: queues=support feed=wss://events.example.com/v1/calls keepalive=10s max_call_age=2h"),
        "{summary}"
    );
    assert!(!summary.contains("s3cret-feed"));
    assert!(ok(&board("")).switchboards["telavox"].feed.is_none());

    let base = "[switchboards.telavox.feed]\nurl = \"wss://e.example.com\"\ntoken = \"t\"\nmapping = \"generic_json\"\n";
    let ended = "[switchboards.telavox.feed.events]\nhangup = \"ended\"\n";
    // Plain ws only on loopback; no credentials in the URL.
    only_issue(
        &board(&(base.replace("wss://e.example.com", "ws://e.example.com") + ended)),
        "switchboards.telavox.feed.url",
        "ws only on 127.0.0.1",
    );
    assert!(ok(&board(
        &(base.replace("wss://e.example.com", "ws://127.0.0.1:9") + ended)
    ))
    .switchboards["telavox"]
        .feed
        .is_some());
    only_issue(
        &board(&(base.replace("wss://e.example.com", "wss://u:p@e.example.com") + ended)),
        "switchboards.telavox.feed.url",
        "must not carry",
    );
    only_issue(
        &board(&(base.replace("wss://e.example.com", "https://e.example.com") + ended)),
        "switchboards.telavox.feed.url",
        "wss URL",
    );
    only_issue(
        &board(&(base.replace("token = \"t\"\n", "") + ended)),
        "switchboards.telavox.feed.token",
        "required",
    );
    only_issue(
        &board(&(base.replace("generic_json", "telavox_v9") + ended)),
        "switchboards.telavox.feed.mapping",
        "unknown mapping",
    );
    only_issue(
        &board(&(base.to_owned() + "keepalive = \"10m\"\n" + ended)),
        "switchboards.telavox.feed.keepalive",
        "must be from",
    );
    only_issue(
        &board(&(base.to_owned() + "reconnect_min = \"30s\"\nreconnect_max = \"2s\"\n" + ended)),
        "switchboards.telavox.feed.reconnect_max",
        "reconnect_min",
    );
    only_issue(
        &board(&(base.to_owned() + "pings = \"1s\"\n" + ended)),
        "switchboards.telavox.feed.pings",
        "unknown key",
    );
    only_issue(
        &board(
            &(base.to_owned()
                + "[switchboards.telavox.feed.events]\nhangup = \"over\"\nbye = \"ended\"\n"),
        ),
        "switchboards.telavox.feed.events.hangup",
        "unknown event",
    );
    only_issue(
        &board(&(base.to_owned() + "[switchboards.telavox.feed.events]\nring = \"started\"\n")),
        "switchboards.telavox.feed.events",
        "\"ended\"",
    );
    only_issue(
        &board(
            &(base.to_owned()
                + "[switchboards.telavox.feed.fields]\ncall_id = \"call..id\"\n"
                + ended),
        ),
        "switchboards.telavox.feed.fields.call_id",
        "dotted path",
    );
    only_issue(
        &board(
            &(base.to_owned() + "[switchboards.telavox.feed.fields]\ncallid = \"id\"\n" + ended),
        ),
        "switchboards.telavox.feed.fields.callid",
        "unknown key",
    );
}
