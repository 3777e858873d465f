//! Two callgate instances, each with its own fake Asterisk and BankID simulator, sharing one real
//! `redis-server` on loopback (skipped, with one line, where none is installed): the agent API of
//! either answers for calls of both, limits and the one live order per person hold across them, and
//! Redis going away and coming back strands nothing.

use super::*;
use callgate::state::local::LocalRedis;

const SUPERVISOR: &str = "sites-supervisor-token-0001";
const AGENT: &str = "sites-agent1-token-000000001";

async fn redis() -> Option<LocalRedis> {
    if LocalRedis::binary().is_none() {
        eprintln!("skipped: no redis-server installed (the several-instances tests need one)");
        return None;
    }
    Some(LocalRedis::start().await.expect("redis-server starts"))
}

fn tokens() -> Vec<demo::LabToken> {
    vec![
        demo::LabToken {
            name: "lead".into(),
            token: SUPERVISOR.into(),
            role: callgate::config::Role::Supervisor,
            agent: None,
        },
        demo::LabToken {
            name: "agent1".into(),
            token: AGENT.into(),
            role: callgate::config::Role::Agent,
            agent: Some(demo::LAB_AGENT.into()),
        },
    ]
}

/// A site: its own fake Asterisk (channel ids `<site>-1.<n>`), simulator and callgate, on the shared
/// Redis under `prefix`.
async fn site(redis: &LocalRedis, prefix: &str, name: &str, options: LabOptions) -> Lab {
    site_on(&redis.url(), prefix, name, options).await
}

async fn site_on(url: &str, prefix: &str, name: &str, options: LabOptions) -> Lab {
    let state = format!(
        "kind = \"redis\"\nurl = \"{}\"\ninstance_id = \"{name}\"\nkey_prefix = \"{prefix}\"\n\
         heartbeat_interval = \"200ms\"\nsnapshot_ttl = \"2s\"\nconnect_timeout = \"300ms\"\n\
         response_timeout = \"300ms\"\n",
        url
    );
    let lab = lab(LabOptions {
        api_tokens: tokens(),
        state: Some(state),
        system_name: name.to_owned(),
        ..options
    })
    .await;
    until("the site to listen on Redis", || {
        lab.app
            .metrics
            .render()
            .contains("callgate_state_subscribed 1")
    })
    .await;
    lab
}

fn prefix() -> String {
    format!("e2e{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn body(text: &str) -> serde_json::Value {
    serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
}

/// Waits until the stream brings `name` for `call`; the events of other calls are skipped.
async fn event_of(stream: &mut RawStream, name: &str, call: &str) -> serde_json::Value {
    loop {
        let (_, data) = stream.until(name).await;
        if data["call_id"] == call {
            return data;
        }
    }
}

#[tokio::test]
async fn an_agent_on_one_site_verifies_a_call_of_the_other_and_watches_it_there() {
    let Some(redis) = redis().await else { return };
    let prefix = prefix();
    let site_a = site(&redis, &prefix, "site-a", LabOptions::fast()).await;
    let site_b = site(&redis, &prefix, "site-b", LabOptions::fast()).await;
    let b = site_b.app.api_addr;
    let mut stream = RawStream::open(b, "/v1/events", AGENT).await;
    stream.until("snapshot_complete").await;

    // The call is on site A's Asterisk; the agent's widget talks to site B.
    let id = site_a
        .asterisk
        .call(Caller::new("46701234567").queue("desk"));
    assert!(id.starts_with("site-a-"), "{id}");
    talking(&site_a, &id).await;
    let call = event_of(&mut stream, "agent_connected", &id).await;
    assert_eq!(call["instance"], "site-a");
    assert_eq!(call["instance_lost"], false);
    assert_eq!(call["agent"], demo::LAB_AGENT);
    let (status, text) = api_request(b, "GET", &format!("/v1/calls/{id}"), AGENT, "").await;
    assert_eq!(status, 200, "{text}");

    let number = person(401);
    let path = format!("/v1/calls/{id}/verifications");
    let (status, text) = api_request(
        b,
        "POST",
        &path,
        AGENT,
        &format!(r#"{{"number":"{number}"}}"#),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    assert!(!text.contains(&number));
    let check = body(&text)["verification_id"].as_str().unwrap().to_owned();
    // Site A ran it: its own view and its simulator have it.
    assert_eq!(check_over(&site_a, &check).await, Outcome::Verified);
    let done = event_of(&mut stream, "verification_completed", &id).await;
    assert_eq!(done["verification"]["verification_id"], check.as_str());
    assert_eq!(done["verification"]["status"], "verified");
    assert_eq!(done["verification"]["method"], "agent_typed");
    assert_eq!(done["verification"]["started_by"], "api:agent1");
    let v = verification_json(b, &check, SUPERVISOR).await;
    assert_eq!(v["status"], "verified");

    // A cancel through B with nothing running is A's refusal, relayed.
    let (status, text) = api_request(
        b,
        "DELETE",
        &format!("/v1/calls/{id}/verification"),
        AGENT,
        "",
    )
    .await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("nothing_to_cancel"), "{text}");

    site_a.asterisk.hang_up(&id);
    all_gone(&site_a, &id).await;
    event_of(&mut stream, "call_ended", &id).await;
    let (status, _) = api_request(b, "GET", &format!("/v1/calls/{id}"), AGENT, "").await;
    assert_eq!(status, 404);
    // The verification stays readable through B after the call.
    assert_eq!(
        verification_json(b, &check, SUPERVISOR).await["status"],
        "verified"
    );
    let (_, metrics) = http(site_b.app.ops_addr, "GET", "/metrics").await;
    assert!(metrics.contains("callgate_state_up 1"), "{metrics}");
    assert!(
        metrics.contains(r#"callgate_state_forwarded_total{result="answered"} 1"#),
        "{metrics}"
    );
    drop(stream);
    site_a.shutdown().await.unwrap();
    site_b.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_person_calling_both_sites_at_once_gets_one_live_order_and_limits_count_on_both() {
    let Some(redis) = redis().await else { return };
    let prefix = prefix();
    // Slower steps, so the first order is still open when the second call types the same number.
    let options = || LabOptions {
        step: Duration::from_millis(600),
        limits: vec![("max_starts_per_number_per_hour".into(), "3".into())],
        ..LabOptions::fast()
    };
    let mut site_a = site(&redis, &prefix, "site-a", options()).await;
    let mut site_b = site(&redis, &prefix, "site-b", options()).await;
    let number = person(402);

    let first = site_a.asterisk.call(site_a.caller_typing(&number));
    tokio::time::timeout(
        Duration::from_secs(10),
        site_a.bankid.wait_for_open_orders(1),
    )
    .await
    .expect("site A's order");
    let second = site_b.asterisk.call(site_b.caller_typing(&number));
    // B's order takes the person's one live order over: A's call is superseded there.
    let a = site_a.report(&first).await.unwrap();
    assert_eq!(a.outcome, Outcome::NotVerified(Reason::Superseded));
    no_open_orders(&site_a).await;
    let b = site_b.report(&second).await.unwrap();
    assert_eq!(b.outcome, Outcome::Verified);

    // Two starts on two sites; the third (on A again) is one too many for the hour.
    let (third, _) = site_a
        .run_call(site_a.caller_typing(&number))
        .await
        .unwrap();
    assert_eq!(third.outcome, Outcome::Verified);
    let (fourth, end) = site_b
        .run_call(site_b.caller_typing(&number))
        .await
        .unwrap();
    assert_eq!(fourth.outcome, Outcome::NotVerified(Reason::RateLimited));
    let v = verification_json(site_b.app.api_addr, var(&end, "CALLGATE_REF"), SUPERVISOR).await;
    assert_eq!(v["limit"], "per_number");
    // Someone else is not affected.
    let (other, _) = site_b
        .run_call(site_b.caller_typing(&person(403)))
        .await
        .unwrap();
    assert_eq!(other.outcome, Outcome::Verified);
    no_open_orders(&site_a).await;
    no_open_orders(&site_b).await;
    site_a.shutdown().await.unwrap();
    site_b.shutdown().await.unwrap();
}

#[tokio::test]
async fn redis_stopped_and_started_mid_run_strands_nothing() {
    let Some(mut redis) = redis().await else {
        return;
    };
    let prefix = prefix();
    let mut site_a = site(&redis, &prefix, "site-a", LabOptions::fast()).await;
    let site_b = site(&redis, &prefix, "site-b", LabOptions::fast()).await;
    let b = site_b.app.api_addr;

    let talking_call = site_a
        .asterisk
        .call(Caller::new("46701234567").queue("desk"));
    talking(&site_a, &talking_call).await;
    until("the call on site B", || {
        site_b.app.live.call(&talking_call).is_some()
    })
    .await;

    redis.stop();
    // Calls go on: a gated call verifies with this site's own limits (counted, logged) ...
    let (report, end) = site_a
        .run_call(site_a.caller_typing(&person(404)))
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    assert_eq!(var(&end, "CALLGATE_STATUS"), "verified");
    // ... and the agent of the bridged call verifies through its own site.
    let (status, text) = api_request(
        site_a.app.api_addr,
        "POST",
        &format!("/v1/calls/{talking_call}/verifications"),
        AGENT,
        &format!(r#"{{"number":"{}"}}"#, person(405)),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    let check = body(&text)["verification_id"].as_str().unwrap().to_owned();
    assert_eq!(check_over(&site_a, &check).await, Outcome::Verified);
    // Through the other site, the owner cannot be reached: a clear 503, at once.
    let (status, text) = api_request(
        b,
        "POST",
        &format!("/v1/calls/{talking_call}/verifications"),
        AGENT,
        r#"{"collect":"keypad"}"#,
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("instance_unavailable"), "{text}");
    let (_, metrics) = http(site_a.app.ops_addr, "GET", "/metrics").await;
    assert!(metrics.contains("callgate_state_up 0"), "{metrics}");
    // Two orders (the gated call's and the check's), each decided by site A alone.
    assert!(
        metrics.contains("callgate_state_fallbacks_total 2"),
        "{metrics}"
    );

    // Redis is back (empty: it keeps nothing): each site rewrites its calls, B forwards again.
    redis.restart().await.unwrap();
    for site in [&site_a, &site_b] {
        until("both sites back on Redis", || {
            let m = site.app.metrics.render();
            m.contains("callgate_state_up 1") && m.contains("callgate_state_subscribed 1")
        })
        .await;
    }
    let new_call = site_a
        .asterisk
        .call(Caller::new("46701234568").queue("desk"));
    talking(&site_a, &new_call).await;
    until("the new call on site B", || {
        site_b.app.live.call(&new_call).is_some()
    })
    .await;
    until("the old call on site B", || {
        site_b.app.live.call(&talking_call).is_some()
    })
    .await;
    let (status, text) = api_request(
        b,
        "POST",
        &format!("/v1/calls/{new_call}/verifications"),
        AGENT,
        &format!(r#"{{"number":"{}"}}"#, person(406)),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    let check = body(&text)["verification_id"].as_str().unwrap().to_owned();
    assert_eq!(check_over(&site_a, &check).await, Outcome::Verified);

    for call in [&talking_call, &new_call] {
        site_a.asterisk.hang_up(call);
    }
    for call in [&talking_call, &new_call] {
        all_gone(&site_a, call).await;
    }
    until("site B to forget them", || {
        site_b.app.live.calls().is_empty()
    })
    .await;
    no_open_orders(&site_a).await;
    site_a.restart().await.unwrap();
    site_a.shutdown().await.unwrap();
    site_b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_dies_shows_its_calls_lost_on_the_other() {
    let Some(redis) = redis().await else { return };
    let prefix = prefix();
    let site_b = site(&redis, &prefix, "site-b", LabOptions::fast()).await;
    let mut stream = RawStream::open(site_b.app.api_addr, "/v1/events", SUPERVISOR).await;
    stream.until("snapshot_complete").await;

    // Site A runs on a runtime of its own, so that it can die at once, without a drain, as a
    // killed process does (its bridged call stays up on its Asterisk, whose dialplan takes over).
    let (url, p) = (redis.url(), prefix.clone());
    let (id, runtime, site_a) = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (id, lab) = runtime.block_on(async {
            let lab = site_on(&url, &p, "site-a", LabOptions::fast()).await;
            let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
            talking(&lab, &id).await;
            (id, lab)
        });
        (id, runtime, lab)
    })
    .await
    .unwrap();
    event_of(&mut stream, "agent_connected", &id).await;
    tokio::task::spawn_blocking(move || {
        runtime.shutdown_background();
        // Its tasks are gone; what they held is leaked rather than dropped outside a runtime.
        std::mem::forget(site_a);
    })
    .await
    .unwrap();

    let lost = event_of(&mut stream, "instance_lost", &id).await;
    assert_eq!(lost["instance"], "site-a");
    assert_eq!(lost["instance_lost"], true);
    let (status, text) = api_request(
        site_b.app.api_addr,
        "POST",
        &format!("/v1/calls/{id}/verifications"),
        SUPERVISOR,
        r#"{"collect":"keypad"}"#,
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("instance_unavailable"), "{text}");
    // Once its snapshot expired, the call is gone from B too.
    event_of(&mut stream, "call_ended", &id).await;
    site_b.shutdown().await.unwrap();
}
