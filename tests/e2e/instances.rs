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

/// Waits until `site`'s view has `call` with the lab's agent (so the agent's token may act on it).
async fn seen_with_agent(site: &Lab, call: &str, what: &str) {
    until(what, || {
        site.app
            .live
            .call(call)
            .is_some_and(|c| c.agent.as_deref() == Some(demo::LAB_AGENT))
    })
    .await;
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
    seen_with_agent(&site_b, &talking_call, "the call on site B").await;

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
    seen_with_agent(&site_b, &new_call, "the new call on site B").await;
    seen_with_agent(&site_b, &talking_call, "the old call on site B").await;
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

// ---- hosted switchboards behind several instances ----

#[tokio::test]
async fn switchboard_nodes_started_on_one_site_answer_and_retry_on_the_other() {
    let Some(redis) = redis().await else { return };
    let prefix = prefix();
    // Without a feed, the start's claim alone decides where a verification runs.
    let options = LabOptions {
        without_feed: true,
        ..LabOptions::fast()
    };
    let site_a = site(&redis, &prefix, "site-a", options.clone()).await;
    let site_b = site(&redis, &prefix, "site-b", options).await;
    let (nodes_a, nodes_b) = (
        super::ivr(&site_a, demo::LAB_SWITCHBOARD_TOKEN),
        super::ivr(&site_b, demo::LAB_SWITCHBOARD_TOKEN),
    );
    let number = Scenario::Approve.number();

    // The start node reaches A; the loop node B.
    let started = nodes_a
        .start(&super::typed("sb-sites-1", &number, 0))
        .await
        .unwrap();
    assert_eq!(started.status, 200, "{started:?}");
    assert_eq!(started.var("callgate_status"), "pending", "{started:?}");
    let id = started.var("callgate_ref").to_owned();
    let mut answer = nodes_b.status(&id, 20, true).await.unwrap();
    for _ in 0..10 {
        if answer.var("callgate_status") != "pending" {
            break;
        }
        answer = nodes_b.status(&id, 20, true).await.unwrap();
    }
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.var("callgate_status"), "verified", "{answer:?}");
    assert_eq!(answer.var("callgate_reason"), "");
    assert_eq!(answer.var("callgate_stage"), "done");
    assert_eq!(answer.var("verification_id"), id);
    assert_eq!(answer.var("callgate_method"), "bankid_phone");
    assert!(answer.var("callgate_at").ends_with('Z'), "{answer:?}");
    assert!(!answer.var("callgate_name").is_empty(), "{answer:?}");
    assert!(answer.var("callgate_number_masked").ends_with("-****"));
    assert!(!answer.vars.contains_key("callgate_number"), "{answer:?}");
    // B renders exactly what A, which ran it, answers.
    let on_a = nodes_a.status(&id, 0, false).await.unwrap();
    assert_eq!(on_a.vars, answer.vars);

    // A retried start node reaching B gets A's verification, and no second order.
    let retried = nodes_b
        .start(&super::typed("sb-sites-1", &number, 0))
        .await
        .unwrap();
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(retried.var("callgate_ref"), id);
    assert_eq!(retried.vars, answer.vars);
    assert_eq!(site_a.bankid.starts() + site_b.bankid.starts(), 1);

    // Both starts of a new call at once, one on each site: one verification, one order.
    let both = super::typed("sb-sites-2", &number, 0);
    let (x, y) = tokio::join!(nodes_a.start(&both), nodes_b.start(&both));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.status, 200, "{x:?}");
    assert_eq!(y.status, 200, "{y:?}");
    assert!(!x.var("callgate_ref").is_empty());
    assert_eq!(x.var("callgate_ref"), y.var("callgate_ref"));
    let second = x.var("callgate_ref").to_owned();
    let done = nodes_b.status(&second, 20, true).await.unwrap();
    let done = if done.var("callgate_status") == "pending" {
        nodes_a.status(&second, 20, true).await.unwrap()
    } else {
        done
    };
    assert_eq!(done.var("callgate_status"), "verified", "{done:?}");
    assert_eq!(site_a.bankid.starts() + site_b.bankid.starts(), 2);

    // Unknown on every site: 404, as with one instance.
    assert_eq!(
        nodes_b.status("no-such-id", 0, false).await.unwrap().status,
        404
    );
    assert_eq!(nodes_b.cancel("no-such-id").await.unwrap().status, 404);
    assert!(!captured().contains(&number), "a number in the logs");
    no_open_orders(&site_a).await;
    no_open_orders(&site_b).await;
    site_a.shutdown().await.unwrap();
    site_b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_switchboard_cancel_on_one_site_ends_the_order_the_other_runs() {
    let Some(redis) = redis().await else { return };
    let prefix = prefix();
    let mut options = LabOptions {
        without_feed: true,
        ..LabOptions::fast()
    };
    options = orders_held(options);
    let site_a = site(&redis, &prefix, "site-a", options.clone()).await;
    let site_b = site(&redis, &prefix, "site-b", options).await;
    let (nodes_a, nodes_b) = (
        super::ivr(&site_a, demo::LAB_SWITCHBOARD_TOKEN),
        super::ivr(&site_b, demo::LAB_SWITCHBOARD_TOKEN),
    );
    let number = Scenario::Approve.number();
    let a = nodes_a
        .start(&super::typed("sb-sites-hangup", &number, 0))
        .await
        .unwrap();
    assert_eq!(a.var("callgate_status"), "pending", "{a:?}");
    let id = a.var("callgate_ref").to_owned();
    site_a.bankid.wait_for_open_orders(1).await;
    until("the order's stage on site B", || {
        site_b
            .app
            .live
            .verification(&id)
            .is_some_and(|v| v.stage().is_some())
    })
    .await;
    // A loop node long-polling B; its wait ends with the hang-up.
    let poll = {
        let nodes = nodes_b.clone();
        let id = id.clone();
        tokio::spawn(async move { nodes.status(&id, 25, true).await.unwrap() })
    };
    let c = nodes_b.cancel(&id).await.unwrap();
    assert_eq!(c.status, 200, "{c:?}");
    let polled = poll.await.unwrap();
    for x in [&c, &polled] {
        assert_eq!(x.var("callgate_status"), "failed", "{x:?}");
        assert_eq!(x.var("callgate_reason"), "caller_hung_up", "{x:?}");
        assert_eq!(x.var("callgate_ref"), id);
    }
    // A ran the order and cancelled it; B started nothing.
    no_open_orders(&site_a).await;
    assert!(site_a.bankid.cancels() >= 1);
    assert_eq!(site_b.bankid.starts(), 0);
    let on_a = nodes_a.status(&id, 0, false).await.unwrap();
    assert_eq!(on_a.var("callgate_reason"), "caller_hung_up");
    site_a.shutdown().await.unwrap();
    site_b.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_redis_unreachable_a_switchboard_start_runs_where_it_arrived() {
    let Some(mut redis) = redis().await else {
        return;
    };
    let prefix = prefix();
    let site_a = site(&redis, &prefix, "site-a", LabOptions::fast()).await;
    redis.stop();
    let nodes = super::ivr(&site_a, demo::LAB_SWITCHBOARD_TOKEN);
    let number = Scenario::Approve.number();
    let a = nodes
        .verify(&super::typed("sb-no-redis", &number, 0), 20)
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.var("callgate_status"), "verified", "{a:?}");
    // Counted, and a retried node on the same site still gets the same verification.
    let metrics = site_a.app.metrics.render();
    assert!(
        metrics.contains("callgate_state_errors_total{op=\"switchboard_claim\"}"),
        "{metrics}"
    );
    let again = nodes
        .start(&super::typed("sb-no-redis", &number, 0))
        .await
        .unwrap();
    assert_eq!(again.var("callgate_ref"), a.var("callgate_ref"));
    assert_eq!(again.vars, a.vars);
    assert_eq!(site_a.bankid.starts(), 1);
    no_open_orders(&site_a).await;
    site_a.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_switchboard_verification_of_an_instance_that_does_not_answer_is_a_503_to_cancel_then_interrupted_once_it_is_lost(
) {
    use callgate::calls::live::{CallView, Owner, VerificationView};
    let Some(redis) = redis().await else { return };
    let prefix = prefix();
    let options = LabOptions {
        without_feed: true,
        ..LabOptions::fast()
    };
    let site_b = site(&redis, &prefix, "site-b", options).await;
    // Another instance that beats but no longer listens ...
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SET")
        .arg(format!("{prefix}:instance:site-ghost"))
        .arg("1")
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    // ... published a running verification.
    let at = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let view = VerificationView {
        id: "v-ghost".into(),
        call_id: "sb-ghost".into(),
        queue: "support".into(),
        idp: "bankid".into(),
        method: CheckMethod::Ivr,
        started_by: StartedBy::Switchboard("lab".into()),
        started_at: at,
        ended_at: None,
        stages: vec![(callgate::verify::Stage::AwaitingApp, at)],
        outcome: None,
        fields: Vec::new(),
        limit: None,
        word_pair: None,
    };
    site_b.app.live.publish(
        LiveKind::CallStarted,
        CallView {
            call_id: "sb-ghost".into(),
            queue: "support".into(),
            state: CallState::Gate,
            agent: None,
            aliases: Vec::new(),
            started_at: at,
            can_verify: false,
            verification: Some(view),
            keypad: false,
            owner: Some(Owner {
                instance: "site-ghost".into(),
                lost: false,
            }),
        },
    );
    let nodes = super::ivr(&site_b, demo::LAB_SWITCHBOARD_TOKEN);
    let status = nodes.status("v-ghost", 0, false).await.unwrap();
    assert_eq!(status.var("callgate_status"), "pending", "{status:?}");
    assert_eq!(status.var("callgate_stage"), "awaiting_app", "{status:?}");
    let c = nodes.cancel("v-ghost").await.unwrap();
    assert_eq!(c.status, 503, "{c:?}");
    assert_eq!(c.var("error"), "instance_unavailable", "{c:?}");
    assert!(c.var("reason").contains("did not answer"), "{c:?}");

    // Its heartbeat stops: the loop node hears `interrupted`/`restart` and routes on; a cancel
    // answers the same.
    redis::cmd("DEL")
        .arg(format!("{prefix}:instance:site-ghost"))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let status = nodes.status("v-ghost", 20, true).await.unwrap();
    assert_eq!(status.var("callgate_status"), "interrupted", "{status:?}");
    assert_eq!(status.var("callgate_reason"), "restart", "{status:?}");
    assert_eq!(status.var("callgate_ref"), "v-ghost", "{status:?}");
    assert_eq!(status.var("callgate_stage"), "done", "{status:?}");
    let c = nodes.cancel("v-ghost").await.unwrap();
    assert_eq!(c.status, 200, "{c:?}");
    assert_eq!(c.vars, status.vars);
    site_b.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_site_consumes_a_switchboard_feed_runs_its_starts_and_the_other_takes_over_when_it_stops(
) {
    let Some(redis) = redis().await else { return };
    let prefix = prefix();
    let stop = tokio_util::sync::CancellationToken::new();
    let feed = callgate::switchboard::sim::FeedSim::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        callgate::switchboard::sim::FEED_TOKEN,
        stop.clone(),
    )
    .unwrap();
    let mut options = LabOptions {
        switchboard_feed: Some(feed.url()),
        ..LabOptions::fast()
    };
    options = orders_held(options);
    let site_a = site(&redis, &prefix, "site-a", options.clone()).await;
    let site_b = site(&redis, &prefix, "site-b", options).await;
    let held = |lab: &Lab| lab.app.switchboards.feed_lease_held("lab") == Some(true);
    until("one site to hold the feed lease", || {
        held(&site_a) || held(&site_b)
    })
    .await;
    let (holder, other) = if held(&site_a) {
        (site_a, site_b)
    } else {
        (site_b, site_a)
    };
    holder.app.switchboards.wait_for_feed("lab", true).await;
    feed.wait_for_connections(1).await;
    assert!(held(&holder) && !held(&other));
    assert_eq!(other.app.switchboards.feed_connected("lab"), Some(false));
    assert_eq!(feed.connections(), 1);
    assert_eq!(feed.accepted(), 1);
    // Only the holder exports the feed's link state.
    assert!(holder
        .app
        .metrics
        .render()
        .contains("callgate_switchboard_feed_connected{switchboard=\"lab\"} 1"));
    assert!(!other
        .app
        .metrics
        .render()
        .contains("callgate_switchboard_feed_connected{"));

    // A start node reaching the other site runs beside the feed's call, on the holder: the feed's
    // hang-up ends it, and a loop node on the other site hears it.
    feed.push(&callgate::switchboard::sim::feed_event(
        "CALL_RINGING",
        "sb-lease-0",
        None,
    ));
    until("the feed's call on the holder", || {
        holder.app.switchboards.feed_knows("lab", "sb-lease-0")
    })
    .await;
    let number = Scenario::Approve.number();
    let started = super::ivr(&other, demo::LAB_SWITCHBOARD_TOKEN)
        .start(&super::typed("sb-lease-0", &number, 0))
        .await
        .unwrap();
    assert_eq!(started.var("callgate_status"), "pending", "{started:?}");
    let id = started.var("callgate_ref").to_owned();
    holder.bankid.wait_for_open_orders(1).await;
    assert_eq!(other.bankid.starts(), 0);
    until("the verification in the feed call's view", || {
        holder
            .app
            .live
            .call("sb-lease-0")
            .and_then(|c| c.verification)
            .is_some_and(|v| v.id == id)
    })
    .await;
    let poll = {
        let nodes = super::ivr(&other, demo::LAB_SWITCHBOARD_TOKEN);
        let id = id.clone();
        tokio::spawn(async move { nodes.status(&id, 25, true).await.unwrap() })
    };
    feed.push(&callgate::switchboard::sim::feed_event(
        "CALL_HANGUP",
        "sb-lease-0",
        None,
    ));
    let polled = poll.await.unwrap();
    assert_eq!(polled.var("callgate_status"), "failed", "{polled:?}");
    assert_eq!(
        polled.var("callgate_reason"),
        "caller_hung_up",
        "{polled:?}"
    );
    no_open_orders(&holder).await;

    // The holder stops: the other takes the lease and connects; events reach its calls.
    holder.shutdown().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        other.app.switchboards.wait_for_feed_lease("lab", true),
    )
    .await
    .expect("the other site takes the feed over");
    other.app.switchboards.wait_for_feed("lab", true).await;
    feed.wait_for_connections(1).await;
    // Exactly one connection at a time: the first holder's, then the new holder's.
    assert_eq!(feed.accepted(), 2);
    feed.push(&callgate::switchboard::sim::feed_event(
        "CALL_RINGING",
        "sb-lease-1",
        None,
    ));
    until("the call from the feed on the new holder", || {
        other.app.switchboards.feed_knows("lab", "sb-lease-1")
    })
    .await;
    other.shutdown().await.unwrap();
    stop.cancel();
}
