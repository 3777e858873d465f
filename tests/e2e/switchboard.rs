//! Hosted switchboards' call-event feed: calls known from the feed in the live view, the feed
//! dropping and reconnecting, a hang-up through the feed ending an IVR check, and an agent's
//! mid-call check on a switchboard call.

use std::time::Duration;

use callgate::demo::{self, Lab, LabOptions};
use callgate::idp::sim::Scenario;
use callgate::outcome::{Outcome, Reason};
use callgate::switchboard::sim::{feed_event, FEED_TOKEN};

use super::{
    api_request, audit_text, captured, ivr, lab, no_open_orders, orders_held, typed, until,
    RawStream,
};

/// Waits (bounded) until the lab switchboard's feed is connected or not.
async fn feed_up(lab: &Lab, up: bool) {
    tokio::time::timeout(
        Duration::from_secs(20),
        lab.app.switchboards.wait_for_feed("lab", up),
    )
    .await
    .unwrap_or_else(|_| panic!("the feed never became connected={up}"));
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn metrics(lab: &Lab) -> String {
    lab.app.metrics.render()
}

#[tokio::test]
async fn the_feed_drops_and_reconnects_and_a_bad_token_is_retried_while_not_connected() {
    let lab = lab(LabOptions::fast()).await;
    feed_up(&lab, true).await;
    assert!(metrics(&lab).contains("callgate_switchboard_feed_connected{switchboard=\"lab\"} 1"));
    lab.feed.push(&feed_event("CALL_RINGING", "fd-1", None));
    until("the call from the feed", || {
        lab.app.live.call("fd-1").is_some()
    })
    .await;
    let call = lab.app.live.call("lab:fd-1").expect("the alias resolves");
    assert_eq!(call.queue, "support");
    assert_eq!(call.agent, None);
    assert!(!call.can_verify);
    assert!(lab.app.registry.contains("fd-1"));

    // The link drops: callgate reconnects, and events after the reconnect are applied.
    let before = lab.feed.accepted();
    lab.feed.drop_connections();
    bounded("a reconnect", lab.feed.wait_for_accepted(before + 1)).await;
    feed_up(&lab, true).await;
    bounded("the new connection", lab.feed.wait_for_connections(1)).await;
    lab.feed
        .push(&feed_event("CALL_ANSWERED", "fd-1", Some("agent-204")));
    until("the agent from the feed", || {
        lab.app
            .live
            .call("fd-1")
            .is_some_and(|c| c.agent.as_deref() == Some("agent-204"))
    })
    .await;
    assert!(lab.app.live.call("fd-1").unwrap().can_verify);

    // Malformed and unknown messages are counted and skipped; the link stays up.
    lab.feed.push_raw("{not json");
    lab.feed.push(&feed_event("CALL_PARKED", "fd-1", None));
    until("the skipped messages counted", || {
        let m = metrics(&lab);
        m.contains("reason=\"malformed\",switchboard=\"lab\"} 1")
            || m.contains("switchboard=\"lab\",reason=\"malformed\"} 1")
    })
    .await;
    until("the unknown event counted", || {
        metrics(&lab).contains("\"unknown\"")
    })
    .await;
    assert_eq!(lab.app.switchboards.feed_connected("lab"), Some(true));

    // The feed no longer takes callgate's token: retried with backoff, shown as not connected.
    lab.feed.set_token("a-token-callgate-does-not-have");
    lab.feed.drop_connections();
    bounded("refused reconnects", lab.feed.wait_for_unauthorized(3)).await;
    assert_eq!(lab.app.switchboards.feed_connected("lab"), Some(false));
    assert!(metrics(&lab).contains("callgate_switchboard_feed_connected{switchboard=\"lab\"} 0"));
    // The call the feed reported stays known meanwhile.
    assert!(lab.app.live.call("fd-1").is_some());
    lab.feed.set_token(FEED_TOKEN);
    feed_up(&lab, true).await;
    bounded("the new connection", lab.feed.wait_for_connections(1)).await;
    lab.feed.push(&feed_event("CALL_HANGUP", "fd-1", None));
    until("the call ended", || lab.app.live.call("fd-1").is_none()).await;
    until("the call left the registry", || {
        !lab.app.registry.contains("fd-1")
    })
    .await;
    let logs = captured();
    let leaked: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(FEED_TOKEN))
        .take(3)
        .collect();
    assert!(leaked.is_empty(), "the feed token in the logs: {leaked:#?}");
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_hang_up_on_the_feed_cancels_the_pending_ivr_order_and_the_status_node_sees_it() {
    let mut options = LabOptions::fast();
    options = orders_held(options);
    let lab = lab(options).await;
    feed_up(&lab, true).await;
    lab.feed.push(&feed_event("CALL_RINGING", "fh-1", None));
    until("the call from the feed", || {
        lab.app.switchboards.feed_knows("lab", "fh-1")
    })
    .await;
    let nodes = ivr(&lab, demo::LAB_SWITCHBOARD_TOKEN);
    let number = Scenario::Approve.number();
    let a = nodes.start(&typed("fh-1", &number, 0)).await.unwrap();
    assert_eq!(a.var("callgate_status"), "pending", "{a:?}");
    let id = a.var("callgate_ref").to_owned();
    bounded("the order", lab.bankid.wait_for_open_orders(1)).await;
    // One view for the call: the feed's call shows the IVR's verification.
    until("the verification on the call's view", || {
        lab.app.live.call("fh-1").is_some_and(|c| {
            c.verification
                .as_ref()
                .is_some_and(|v| v.id == id && v.stage().is_some())
        })
    })
    .await;
    assert_eq!(lab.app.live.calls().len(), 1);
    let poll = {
        let nodes = nodes.clone();
        let id = id.clone();
        tokio::spawn(async move { nodes.status(&id, 25, true).await.unwrap() })
    };
    lab.feed.push(&feed_event("CALL_HANGUP", "fh-1", None));
    let polled = bounded("the status node", poll).await.unwrap();
    assert_eq!(polled.var("callgate_status"), "failed", "{polled:?}");
    assert_eq!(
        polled.var("callgate_reason"),
        "caller_hung_up",
        "{polled:?}"
    );
    until("the call's view ended", || {
        lab.app.live.call("fh-1").is_none()
    })
    .await;
    let v = lab.app.live.verification(&id).expect("kept after the call");
    assert_eq!(v.outcome, Some(Outcome::NotVerified(Reason::CallerHungUp)));
    no_open_orders(&lab).await;
    assert!(lab.bankid.cancels() >= 1);
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_agent_verifies_a_switchboard_caller_with_a_typed_number_and_the_keypad_is_refused() {
    const MINE: &str = "switchboard-agent-token-204";
    const OTHER: &str = "switchboard-agent-token-999";
    let options = LabOptions {
        api_tokens: vec![
            demo::LabToken {
                name: "eva".into(),
                token: MINE.into(),
                role: callgate::config::Role::Agent,
                agent: Some("agent-204".into()),
            },
            demo::LabToken {
                name: "other".into(),
                token: OTHER.into(),
                role: callgate::config::Role::Agent,
                agent: Some("agent-999".into()),
            },
        ],
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    let addr = lab.app.api_addr;
    feed_up(&lab, true).await;
    let mut mine = RawStream::open(addr, "/v1/events", MINE).await;
    mine.until("snapshot_complete").await;

    lab.feed.push(&feed_event("CALL_RINGING", "fa-1", None));
    lab.feed.push(&feed_event("CALL_QUEUED", "fa-1", None));
    lab.feed
        .push(&feed_event("CALL_ANSWERED", "fa-1", Some("agent-204")));
    let (_, call) = mine.until("agent_connected").await;
    assert_eq!(call["call_id"], "fa-1");
    assert_eq!(call["agent"], "agent-204");
    assert_eq!(call["state"], "talking");
    assert_eq!(call["can_verify"], true);
    assert_eq!(
        call["keypad"], false,
        "the switchboard has the call's audio"
    );

    let path = "/v1/calls/fa-1/verifications";
    let (status, text) = api_request(addr, "POST", path, MINE, r#"{"collect":"keypad"}"#).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("\"keypad_unavailable\""), "{text}");
    assert!(text.contains("type the number"), "{text}");
    let number = Lab::number(Scenario::Approve);
    let typed_body = format!(r#"{{"number":"{number}"}}"#);
    let (status, text) = api_request(addr, "POST", path, OTHER, &typed_body).await;
    assert_eq!(status, 403, "{text}");
    let (status, text) = api_request(addr, "POST", path, MINE, &typed_body).await;
    assert_eq!(status, 202, "{text}");
    assert!(!text.contains(&number[2..]), "the number echoed: {text}");
    let body = text.split_once("\r\n\r\n").unwrap().1;
    let accepted: serde_json::Value = serde_json::from_str(body).unwrap();
    let check = accepted["verification_id"].as_str().unwrap().to_owned();

    let (_, done) = mine.until("verification_completed").await;
    let v = &done["verification"];
    assert_eq!(v["verification_id"], check.as_str());
    assert_eq!(v["status"], "verified");
    assert_eq!(v["method"], "agent_typed");
    assert_eq!(v["started_by"], "api:eva");
    assert_eq!(done["agent"], "agent-204");
    let (status, text) = api_request(addr, "GET", "/v1/calls/fa-1", MINE, "").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"status\":\"verified\""), "{text}");
    let (status, _) = api_request(addr, "GET", "/v1/calls/fa-1", OTHER, "").await;
    assert_eq!(status, 403);
    let (status, _) = api_request(
        addr,
        "GET",
        &format!("/v1/verifications/{check}"),
        OTHER,
        "",
    )
    .await;
    assert_eq!(status, 403);
    // Nothing left to cancel.
    let (status, text) = api_request(addr, "DELETE", "/v1/calls/fa-1/verification", MINE, "").await;
    assert_eq!(status, 409, "{text}");

    lab.feed.push(&feed_event("CALL_HANGUP", "fa-1", None));
    let (_, ended) = mine.until("call_ended").await;
    assert_eq!(ended["state"], "ended");
    let (status, text) =
        api_request(addr, "GET", &format!("/v1/verifications/{check}"), MINE, "").await;
    assert_eq!(status, 200, "{text}");
    assert!(!captured().contains(&number), "a number in the logs");
    // The check is in the audit trail like any other, by the agent's token, without the number.
    let audit = audit_text(&lab.app.audit_dir);
    let line = audit
        .lines()
        .find(|l| l.contains(&check))
        .expect("the check's audit record");
    assert!(line.contains("api:eva"), "{line}");
    assert!(!audit.contains(&number), "a number in the audit trail");
    callgate::audit::chain::verify(&lab.app.audit_dir).unwrap();
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn hanging_up_during_an_agents_check_ends_it_caller_hung_up() {
    const MINE: &str = "switchboard-agent-token-311";
    let mut options = LabOptions {
        api_tokens: vec![demo::LabToken {
            name: "ola".into(),
            token: MINE.into(),
            role: callgate::config::Role::Agent,
            agent: Some("agent-311".into()),
        }],
        ..LabOptions::fast()
    };
    options = orders_held(options);
    let lab = lab(options).await;
    let addr = lab.app.api_addr;
    feed_up(&lab, true).await;
    lab.feed
        .push(&feed_event("CALL_ANSWERED", "fm-1", Some("agent-311")));
    until("the agent's call", || {
        lab.app.live.call("fm-1").is_some_and(|c| c.can_verify)
    })
    .await;
    let body = format!(r#"{{"number":"{}"}}"#, Lab::number(Scenario::Approve));
    let (status, text) =
        api_request(addr, "POST", "/v1/calls/fm-1/verifications", MINE, &body).await;
    assert_eq!(status, 202, "{text}");
    bounded("the order", lab.bankid.wait_for_open_orders(1)).await;
    lab.feed.push(&feed_event("CALL_HANGUP", "fm-1", None));
    until("the call's view ended", || {
        lab.app.live.call("fm-1").is_none()
    })
    .await;
    let accepted: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    let id = accepted["verification_id"].as_str().unwrap();
    let done = lab.app.live.verification(id).expect("kept");
    assert_eq!(
        done.outcome,
        Some(Outcome::NotVerified(Reason::CallerHungUp))
    );
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn demo_switchboard_calls_through_the_feed_end_as_expected() {
    let options = LabOptions {
        api_tokens: vec![demo::demo_agent()],
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    let (lines, ok) = demo::switchboard_feed_calls(&lab).await.unwrap();
    assert!(ok, "{lines}");
    assert!(lines.contains("keypad_unavailable"), "{lines}");
    assert!(lines.contains("caller_hung_up"), "{lines}");
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_pending_switchboard_order_is_cancelled_after_a_restart_and_its_status_says_so() {
    let mut options = LabOptions::fast();
    options = orders_held(options);
    let mut lab = lab(options).await;
    let number = Scenario::Approve.number();
    let a = ivr(&lab, demo::LAB_SWITCHBOARD_TOKEN)
        .start(&typed("fr-1", &number, 0))
        .await
        .unwrap();
    assert_eq!(a.var("callgate_status"), "pending", "{a:?}");
    let id = a.var("callgate_ref").to_owned();
    bounded("the order", lab.bankid.wait_for_open_orders(1)).await;
    until("the order journalled", || {
        std::fs::read_to_string(lab.data_dir.join("orders.journal"))
            .is_ok_and(|j| j.contains("switchboard:lab:fr-1"))
    })
    .await;
    lab.restart().await.unwrap();
    // The new process cancels the order and answers for the verification.
    no_open_orders(&lab).await;
    let nodes = ivr(&lab, demo::LAB_SWITCHBOARD_TOKEN);
    let s = nodes.status(&id, 0, false).await.unwrap();
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.var("callgate_status"), "interrupted", "{s:?}");
    assert_eq!(s.var("callgate_reason"), "restart", "{s:?}");
    assert_eq!(s.var("callgate_stage"), "done", "{s:?}");
    let journal = std::fs::read_to_string(lab.data_dir.join("orders.journal")).unwrap();
    assert!(!journal.contains(&number), "a number in the journal");
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_feed_that_stops_answering_pings_is_declared_dead_and_reconnected() {
    let lab = lab(LabOptions::fast()).await;
    feed_up(&lab, true).await;
    let before = lab.feed.accepted();
    // The link stays open but silent: no pong comes back, so callgate gives it up.
    lab.feed.stall(true);
    feed_up(&lab, false).await;
    lab.feed.stall(false);
    bounded("a reconnect", lab.feed.wait_for_accepted(before + 1)).await;
    feed_up(&lab, true).await;
    // The stalled connection is gone (callgate closed it); the new one is live.
    bounded("one live connection", lab.feed.wait_for_connections(1)).await;
    lab.feed
        .push(&feed_event("CALL_ANSWERED", "fk-1", Some("agent-1")));
    until("the event after the reconnect", || {
        lab.app
            .live
            .call("fk-1")
            .is_some_and(|c| c.agent.as_deref() == Some("agent-1"))
    })
    .await;
    lab.feed.push(&feed_event("CALL_HANGUP", "fk-1", None));
    until("the call ended", || lab.app.live.call("fk-1").is_none()).await;
    lab.shutdown().await.unwrap();
}
