//! `callgate doctor` as a process against the real Asterisk with the shipped dialplan, prompts and
//! `deploy/asterisk/callgate.toml`, and `callgate sim-idp --tls`: the correct setup passes; then one
//! broken thing at a time fails its own check, named.

use std::process::Stdio;

use serde_json::Value;

use super::{free_port, repo, Lab, ARI_PASSWORD};

/// Runs the doctor with the lab's settings plus `extra` overrides: exit code and JSON report.
async fn doctor(lab: &Lab, ops: u16, extra: &[(&str, &str)]) -> (i32, Value) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_callgate"));
    cmd.args(["doctor", "--format", "json", "--config"])
        .arg(repo().join("deploy/asterisk/callgate.toml"))
        .env("NO_COLOR", "1")
        .env("ARI_PASSWORD", ARI_PASSWORD)
        .env("BANKID_P12_PASSWORD", &lab.sim.p12_password)
        .env(
            "CALLGATE_PSEUDONYM_KEY",
            "asterisk-test-pseudonym-key-0123456789",
        )
        .env("CALLGATE__SERVER__OPS_LISTEN", format!("127.0.0.1:{ops}"))
        .env(
            "CALLGATE__PBX__ARI__URL",
            format!("http://127.0.0.1:{}", lab.pbx.port),
        )
        .env("CALLGATE__IDP__BANKID__URL", &lab.sim.url)
        .env("CALLGATE__IDP__BANKID__CLIENT_P12", &lab.sim.client_p12)
        .env("CALLGATE__IDP__BANKID__SERVER_CA", &lab.sim.server_ca);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.stdin(Stdio::null()).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {text}"));
    (out.status.code().unwrap_or(-1), report)
}

fn failed(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] == "fail")
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

fn detail<'r>(report: &'r Value, name: &str) -> &'r str {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["detail"].as_str())
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

#[tokio::test]
async fn doctor_passes_on_the_shipped_setup_and_names_each_broken_thing() {
    let Some(mut lab) = Lab::take("doctor").await else {
        return;
    };
    let began = super::now();
    let idle_ops = free_port();

    // The shipped setup, callgate not running: every check passes.
    let (code, report) = doctor(&lab, idle_ops, &[]).await;
    assert_eq!((code, failed(&report)), (0, vec![]), "{report:#}");
    assert!(detail(&report, "ari.version").starts_with("Asterisk 22."));
    assert!(
        detail(&report, "routes").starts_with("all 12 routes exist"),
        "{report:#}"
    );
    assert!(detail(&report, "ari.app").contains("is free"));
    // Nothing of the route check is left in Asterisk.
    assert!(lab.ari.channel_ids().await.is_empty());

    // Wrong ARI password.
    let (code, report) = doctor(&lab, idle_ops, &[("ARI_PASSWORD", "not-the-password")]).await;
    assert_eq!(
        (code, failed(&report)),
        (1, vec!["ari.credentials".to_owned()]),
        "{report:#}"
    );

    // A route the dialplan does not have.
    let (code, report) = doctor(
        &lab,
        idle_ops,
        &[(
            "CALLGATE__QUEUES__SUPPORT__ROUTES__VERIFIED",
            "queues,no-such-queue,1",
        )],
    )
    .await;
    assert_eq!(
        (code, failed(&report)),
        (1, vec!["routes".to_owned()]),
        "{report:#}"
    );
    assert_eq!(
        detail(&report, "routes"),
        "missing from the dialplan: queues,no-such-queue,1 (queues.support.routes.verified)"
    );
    assert!(lab.ari.channel_ids().await.is_empty());

    // A prompt that was never recorded.
    let (code, report) = doctor(
        &lab,
        idle_ops,
        &[(
            "CALLGATE__QUEUES__SALES__PROMPTS__IDENTIFY",
            "sound:callgate/not-recorded",
        )],
    )
    .await;
    assert_eq!(
        (code, failed(&report)),
        (1, vec!["prompts".to_owned()]),
        "{report:#}"
    );
    assert_eq!(
        detail(&report, "prompts"),
        "missing on the PBX: en/callgate/not-recorded (queues.sales); \
         nb/callgate/not-recorded (queues.sales); sv/callgate/not-recorded (queues.sales)"
    );

    // A server_ca that did not issue the provider's certificate.
    let unrelated = lab.dir.join("unrelated-root.pem");
    callgate::idp::sim::write_unrelated_root(&unrelated).unwrap();
    let unrelated = unrelated.display().to_string();
    let (code, report) = doctor(
        &lab,
        idle_ops,
        &[("CALLGATE__IDP__BANKID__SERVER_CA", unrelated.as_str())],
    )
    .await;
    assert_eq!(
        (code, failed(&report)),
        (1, vec!["idp.bankid.tls".to_owned()]),
        "{report:#}"
    );
    assert!(
        detail(&report, "idp.bankid.tls").contains(&format!(
            "server certificate not trusted by server_ca ({unrelated}): UnknownIssuer"
        )),
        "{report:#}"
    );

    // An RP certificate that has expired (issued by the simulator's own RP root).
    let files = callgate::idp::sim::SimFiles {
        dir: lab.dir.join("bankid-sim"),
        server_ca: lab.sim.server_ca.clone().into(),
        client_cert: lab.dir.join("bankid-sim/client.pem"),
        client_key: lab.dir.join("bankid-sim/client.key"),
        client_p12: lab.sim.client_p12.clone().into(),
        p12_password: callgate::secret::Secret::new(lab.sim.p12_password.clone()),
    };
    let now = time::OffsetDateTime::now_utc();
    let ended = now - time::Duration::days(2);
    let expired = callgate::idp::sim::issue_rp_certificate(
        &files,
        "expired",
        ended - time::Duration::days(365),
        ended,
    )
    .unwrap();
    let callgate::idp::ClientIdentity::Pkcs12 { path, .. } = expired else {
        panic!("not a PKCS#12 identity")
    };
    let path = path.display().to_string();
    let (code, report) = doctor(
        &lab,
        idle_ops,
        &[("CALLGATE__IDP__BANKID__CLIENT_P12", path.as_str())],
    )
    .await;
    assert_eq!(
        (code, failed(&report)),
        (
            1,
            vec![
                "idp.bankid.tls".to_owned(),
                "idp.bankid.rp_certificate".to_owned()
            ]
        ),
        "{report:#}"
    );
    assert!(
        detail(&report, "idp.bankid.tls")
            .contains("the server refused the RP certificate: CertificateExpired"),
        "{report:#}"
    );
    assert_eq!(
        detail(&report, "idp.bankid.rp_certificate"),
        format!("the RP certificate expired on {}", ended.date())
    );

    // While callgate runs with this config, the application is held by it, which passes; the
    // doctor does not take it over (callgate stays connected and ready).
    let mut gate = lab.gate(None, &[]).await;
    let (code, report) = doctor(&lab, gate.ops, &[]).await;
    assert_eq!((code, failed(&report)), (0, vec![]), "{report:#}");
    assert!(
        detail(&report, "ari.app").contains("held by the callgate running with this config"),
        "{report:#}"
    );
    lab.wait_ready(&mut gate).await;
    // …but another client holding it (here: a callgate with another ops listener) fails.
    let (code, report) = doctor(&lab, idle_ops, &[]).await;
    assert_eq!(
        (code, failed(&report)),
        (1, vec!["ari.app".to_owned()]),
        "{report:#}"
    );
    drop(gate);
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "asterisk doctor: 8 doctor runs in {:.1} s\n",
            super::now().duration_since(began).as_secs_f64()
        )
        .as_bytes(),
    );
    lab.finish().await;
}
