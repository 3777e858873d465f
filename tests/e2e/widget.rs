//! The agent widget in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`)
//! driven over WebDriver, against callgate on the lab's fakes. Skipped with one line when the browser
//! or its driver is missing.

use std::io::Write as _;
use std::time::Duration;

use callgate::demo::{self, Lab, LabOptions};
use callgate::idp::sim::Scenario;
use callgate::pbx::sim::{Caller, Direction};
use serde_json::{json, Value};

use super::webdriver::{self, Driver, Session};
use super::{lab, talking, until};

const TOKEN: &str = "widget-agent-token-in-a-browser-7";

/// The state (`pending`, `active`, `done`) of one step of the call's card.
const STEP_STATE: &str = r#"
const card = document.querySelector('[data-test="call"][data-call-id="' + arguments[0] + '"]');
const li = card && card.querySelector('li[data-step="' + arguments[1] + '"]');
return li && li.dataset.state !== 'pending' ? li.dataset.state : null;
"#;

/// The outcome shown on the call's card for a verification other than `arguments[1]`:
/// `{id, status, text, fields: {name: value}}`.
const OUTCOME: &str = r#"
const card = document.querySelector('[data-test="call"][data-call-id="' + arguments[0] + '"]');
if (!card || card.dataset.verification === arguments[1]) return null;
const o = card.querySelector('[data-test="outcome"]');
if (o.hidden || !o.dataset.status) return null;
const fields = {};
for (const dd of o.querySelectorAll('dd[data-field]')) fields[dd.dataset.field] = dd.textContent;
return {id: card.dataset.verification, status: o.dataset.status, text: o.innerText, fields};
"#;

fn card(call: &str) -> String {
    format!(r#"[data-test="call"][data-call-id="{call}"]"#)
}

/// Opens the verify menu of the call's card and picks `choice` (`verify-typed`, `verify-keypad`).
async fn choose(browser: &Session, call: &str, choice: &str) {
    let verify = browser
        .element(&format!(r#"{} [data-test="verify"]"#, card(call)))
        .await;
    browser.click(&verify).await;
    let option = browser
        .element(&format!(r#"{} [data-test="{choice}"]"#, card(call)))
        .await;
    browser.click(&option).await;
}

/// Picks "I'll type the number" and types `number`; sends it with Enter (`enter`) or the button.
async fn type_number(browser: &Session, call: &str, number: &str, enter: bool) {
    choose(browser, call, "verify-typed").await;
    // The field has the focus, so the agent can type at once.
    let focused = browser
        .execute(
            "return document.activeElement && document.activeElement.dataset.test",
            json!([]),
        )
        .await;
    assert_eq!(focused, "number");
    let field = browser
        .element(&format!(r#"{} [data-test="number"]"#, card(call)))
        .await;
    if enter {
        browser
            .send_keys(&field, &format!("{number}\u{E007}"))
            .await;
    } else {
        browser.send_keys(&field, number).await;
        let send = browser
            .element(&format!(r#"{} [data-test="send-number"]"#, card(call)))
            .await;
        browser.click(&send).await;
    }
    // The field is emptied once sent.
    let left = browser
        .execute(
            "return document.querySelector(arguments[0]).value",
            json!([format!(r#"{} [data-test="number"]"#, card(call))]),
        )
        .await;
    assert_eq!(left, "", "the number stayed in the field");
}

async fn outcome_after(browser: &Session, call: &str, previous: &str) -> Value {
    browser
        .wait("the outcome", OUTCOME, json!([call, previous]))
        .await
}

#[tokio::test]
async fn an_agent_verifies_callers_in_the_widget_in_a_real_browser() {
    if let Some(why) = webdriver::missing() {
        // Straight to stderr, past the test harness's capture, so the skip shows in every run.
        let _ = writeln!(std::io::stderr(), "widget browser test skipped: {why}");
        return;
    }
    let options = LabOptions {
        api_tokens: vec![demo::LabToken {
            name: "desk-agent1".into(),
            token: TOKEN.into(),
            role: callgate::config::Role::Agent,
            agent: Some(demo::LAB_AGENT.into()),
        }],
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    talking(&lab, &id).await;

    let driver = Driver::start().await;
    let profile = std::env::temp_dir().join(format!("callgate-widget-{}", std::process::id()));
    let browser = driver.session(&profile, "en-US").await;
    let url = format!("http://{}/widget", lab.app.api_addr);
    browser.goto(&url).await;

    // The token, once.
    let field = browser.element(r#"[data-test="token"]"#).await;
    browser.send_keys(&field, TOKEN).await;
    browser
        .click(&browser.element(r#"[data-test="connect"]"#).await)
        .await;
    browser
        .wait(
            "the stream to be live",
            r#"return document.querySelector('[data-test="connection"]').dataset.state === 'live'"#,
            json!([]),
        )
        .await;
    let title = browser
        .text(
            &browser
                .element(&format!(r#"{} [data-test="call-title"]"#, card(&id)))
                .await,
        )
        .await;
    assert!(title.contains("desk"), "{title}");

    // "I'll type the number": each step lights up, then the outcome with the disclosed name.
    type_number(&browser, &id, &Lab::number(Scenario::Approve), false).await;
    for step in [
        "order_created",
        "awaiting_app",
        "confirming_call",
        "identifying",
    ] {
        browser
            .wait(&format!("step {step}"), STEP_STATE, json!([id, step]))
            .await;
    }
    let verified = outcome_after(&browser, &id, "").await;
    assert_eq!(verified["status"], "verified", "{verified}");
    let check = verified["id"].as_str().unwrap().to_owned();
    let view = lab.app.live.verification(&check).unwrap();
    let name = view
        .fields
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.clone())
        .expect("the desk queue discloses the name");
    assert_eq!(verified["fields"]["name"], name.as_str(), "{verified}");
    // Only what the API disclosed: the desk queue shows the name (and the reference), no number.
    for field in verified["fields"].as_object().unwrap().keys() {
        assert!(["name", "ref"].contains(&field.as_str()), "{verified}");
    }
    let done = browser
        .execute(
            r#"return [...document.querySelectorAll(arguments[0] + ' li[data-step]')].map(li => li.dataset.state)"#,
            json!([card(&id)]),
        )
        .await;
    assert_eq!(done, json!(["done", "done", "done", "done"]));
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/widget-verified.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    std::fs::write(&shot, browser.screenshot().await).unwrap();
    println!("widget screenshot: {}", shot.display());

    // The token is in this tab's sessionStorage only: not in the URL, not in localStorage.
    let storage = browser
        .execute(
            r#"return {href: document.location.href, local: JSON.stringify({...localStorage}), session: sessionStorage.getItem('callgate.token')}"#,
            json!([]),
        )
        .await;
    assert!(
        !storage["href"].as_str().unwrap().contains(TOKEN),
        "{storage}"
    );
    assert!(
        !storage["local"].as_str().unwrap().contains(TOKEN),
        "{storage}"
    );
    assert_eq!(storage["local"], "{}");
    assert_eq!(storage["session"], TOKEN);

    // A declined call: the red fraud warning.
    let declines = Lab::number(Scenario::DeclinesCall);
    type_number(&browser, &id, &declines, true).await;
    let failed = outcome_after(&browser, &id, &check).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let fraud = browser
        .wait(
            "the fraud warning",
            r#"
            const f = document.querySelector(arguments[0] + ' [data-test="fraud"]');
            if (!f || f.hidden) return null;
            const s = getComputedStyle(f);
            return {text: f.innerText, background: s.backgroundColor, role: f.getAttribute('role'), visible: f.offsetHeight > 0};
            "#,
            json!([card(&id)]),
        )
        .await;
    assert_eq!(fraud["role"], "alert");
    assert_eq!(fraud["visible"], true);
    assert_eq!(fraud["background"], "rgb(176, 0, 32)", "{fraud}");
    assert!(
        fraud["text"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("fraud"),
        "{fraud}"
    );
    let href = browser
        .execute("return document.location.href", json!([]))
        .await;
    assert!(!href.as_str().unwrap().contains(&declines));
    let second = failed["id"].as_str().unwrap().to_owned();

    // "Collect on keypad": the caller types once muted.
    assert!(!lab.asterisk.is_muted(&id, Direction::In));
    choose(&browser, &id, "verify-keypad").await;
    until("the caller to be muted", || {
        lab.asterisk.is_muted(&id, Direction::In)
    })
    .await;
    let number = Lab::number(Scenario::Approve);
    assert!(
        lab.asterisk
            .press(&id, &format!("{number}#"), lab.options.key_gap)
            .await
    );
    let keyed = outcome_after(&browser, &id, &second).await;
    assert_eq!(keyed["status"], "verified", "{keyed}");
    assert_eq!(keyed["fields"]["name"], name.as_str(), "{keyed}");
    let fraud_hidden = browser
        .execute(
            r#"return document.querySelector(arguments[0] + ' [data-test="fraud"]').hidden"#,
            json!([card(&id)]),
        )
        .await;
    assert_eq!(
        fraud_hidden, true,
        "the warning belongs to the declined check only"
    );
    let third = keyed["id"].as_str().unwrap().to_owned();

    // Cancel a check waiting for the keypad.
    choose(&browser, &id, "verify-keypad").await;
    let cancel = format!(r#"{} [data-test="cancel"]"#, card(&id));
    browser
        .wait(
            "the cancel button",
            "const b = document.querySelector(arguments[0]); return b && !b.hidden",
            json!([cancel]),
        )
        .await;
    browser.click(&browser.element(&cancel).await).await;
    let cancelled = outcome_after(&browser, &id, &third).await;
    assert_eq!(cancelled["status"], "failed", "{cancelled}");
    let fourth = cancelled["id"].as_str().unwrap();
    assert_eq!(
        lab.app
            .live
            .verification(fourth)
            .unwrap()
            .outcome
            .and_then(|o| o.reason()),
        Some(callgate::outcome::Reason::AgentCancelled)
    );

    // A browser that prefers Swedish gets the Swedish text; its tab needs the token again.
    let swedish = driver.session(&profile.with_extension("sv"), "sv-SE").await;
    swedish.goto(&url).await;
    let field = swedish.element(r#"[data-test="token"]"#).await;
    swedish.send_keys(&field, TOKEN).await;
    swedish
        .click(&swedish.element(r#"[data-test="connect"]"#).await)
        .await;
    let verify = swedish
        .element(&format!(r#"{} [data-test="verify"]"#, card(&id)))
        .await;
    assert_eq!(swedish.text(&verify).await, "Legitimera uppringaren");
    let lang = swedish
        .execute("return document.documentElement.lang", json!([]))
        .await;
    assert_eq!(lang, "sv");
    swedish.quit().await;

    // The caller hangs up: the card goes.
    lab.asterisk.hang_up(&id);
    browser
        .wait(
            "the call to leave the widget",
            "return !document.querySelector(arguments[0]) && !document.querySelector('[data-test=\"no-calls\"]').hidden",
            json!([card(&id)]),
        )
        .await;
    browser.quit().await;
    drop(driver);
    tokio::time::timeout(Duration::from_secs(20), lab.shutdown())
        .await
        .unwrap()
        .unwrap();
}
