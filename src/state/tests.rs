//! The shared state against a real `redis-server` on loopback (skipped, with one line, where none is
//! installed): limit semantics across two instances, the replicated view, forwarded commands,
//! heartbeats, and what happens while Redis is down.
#![allow(clippy::disallowed_methods)] // real time: these tests talk to a real server

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::limits::{Acquired, Holder};
use super::local::LocalRedis;
use super::wire::Op;
use super::*;
use crate::calls::limits::{self as call_limits, Limit, Limiter, Limits, Start};
use crate::calls::live::{CallState, CallView, LiveKind, Owner, TypedNumber};
use crate::calls::registry::{Entry, Handle};
use crate::calls::{CallEvent, Live, Registry, Snapshot};
use crate::config::RedisSettings;
use crate::secret::Secret;

const HOUR: u64 = 3_600_000;

async fn redis() -> Option<LocalRedis> {
    if LocalRedis::binary().is_none() {
        eprintln!("skipped: no redis-server installed (the shared-state tests need one)");
        return None;
    }
    Some(LocalRedis::start().await.expect("redis-server starts"))
}

fn settings(url: &str) -> RedisSettings {
    RedisSettings {
        url: Secret::new(url),
        key_prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        heartbeat_interval: Duration::from_millis(100),
        snapshot_ttl: Duration::from_secs(1),
        response_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_secs(2),
        ..RedisSettings::default()
    }
}

fn key() -> PseudonymKey {
    PseudonymKey::new(b"test-pseudonym-key-0123456789".to_vec())
}

fn instance(s: &RedisSettings, name: &str) -> Arc<Shared> {
    Shared::new(
        s,
        name,
        &key(),
        Arc::new(Metrics::new()),
        Duration::from_secs(60),
    )
    .unwrap()
}

fn limit_settings() -> call_limits::Settings {
    call_limits::Settings {
        max_starts_per_number_per_hour: 2,
        max_starts_per_line_per_hour: 3,
        max_checks_per_agent_per_hour: 2,
        max_starts_per_queue_per_minute: 5,
        ..call_limits::Settings::default()
    }
}

fn start<'a>(person: &'a str, line: &'a str, call: &'a str) -> Start<'a> {
    Start {
        person,
        line,
        call,
        queue: "support",
        idp: "bankid",
        agent: None,
    }
}

async fn granted(a: &Shared, s: Start<'_>, now: u64) -> Option<Holder> {
    match a.limits_acquire(&s, &limit_settings(), now).await.unwrap() {
        Acquired::Granted { previous, .. } => previous,
        Acquired::Refused(l) => panic!("refused by {}", l.code()),
    }
}

async fn refused(a: &Shared, s: Start<'_>, now: u64) -> Limit {
    match a.limits_acquire(&s, &limit_settings(), now).await.unwrap() {
        Acquired::Refused(l) => l,
        Acquired::Granted { .. } => panic!("granted"),
    }
}

#[tokio::test]
async fn limits_hold_across_instances_with_the_in_memory_semantics() {
    let Some(server) = redis().await else { return };
    let s = settings(&server.url());
    let (a, b) = (instance(&s, "site-a"), instance(&s, "site-b"));
    assert_eq!(a.check_key().await.unwrap(), KeyCheck::Same);
    assert_eq!(b.check_key().await.unwrap(), KeyCheck::Same);
    let t = 1_800_000_000_000;

    // One live order per person: the second site takes it over and learns the holder.
    assert_eq!(granted(&a, start("p1", "l1", "a1"), t).await, None);
    assert_eq!(
        granted(&b, start("p1", "l2", "b1"), t + 1).await,
        Some(Holder {
            instance: "site-a".into(),
            call: "a1".into()
        })
    );
    // Per number, counted on both sites; the window slides.
    assert_eq!(
        refused(&a, start("p1", "l3", "a2"), t + 2).await,
        Limit::PerNumber
    );
    assert_eq!(
        refused(&b, start("p1", "l3", "b2"), t + HOUR - 1).await,
        Limit::PerNumber
    );
    granted(&b, start("p1", "l3", "b2"), t + HOUR).await;

    let t2 = t + 3 * HOUR;
    // A refused start records nothing: p2's refusal by its line leaves p2's window untouched.
    granted(&a, start("p3", "line", "c1"), t2).await;
    granted(&b, start("p4", "line", "c2"), t2).await;
    granted(&a, start("p5", "line", "c3"), t2).await;
    assert_eq!(
        refused(&b, start("p2", "line", "c4"), t2).await,
        Limit::PerLine
    );
    granted(&a, start("p2", "other", "c5"), t2).await;
    granted(&b, start("p2", "other2", "c6"), t2).await;

    // Per agent (checks during calls), across sites.
    let with_agent = |person: &'static str, call: &'static str| Start {
        agent: Some("PJSIP/7"),
        ..start(person, "", call)
    };
    let t4 = t + 4 * HOUR;
    granted(&a, with_agent("q1", "d1"), t4).await;
    granted(&b, with_agent("q2", "d2"), t4).await;
    assert_eq!(
        refused(&a, with_agent("q3", "d3"), t4).await,
        Limit::PerAgent
    );

    // Per queue and minute (a queue of its own, so the starts above do not count).
    let queued = |person: &'static str, call: &'static str| Start {
        queue: "sales",
        ..start(person, "", call)
    };
    for (i, p) in ["r1", "r2", "r3", "r4", "r5"].iter().enumerate() {
        granted(if i % 2 == 0 { &a } else { &b }, queued(p, p), t).await;
    }
    assert_eq!(
        refused(&a, queued("r6", "r6"), t + 59_999).await,
        Limit::PerQueue
    );
    granted(&b, queued("r6", "r6"), t + 60_000).await;

    // The cool-down after a declined call holds on the other site.
    let t3 = t + 5 * HOUR;
    a.limits_declined("p9", t3, Duration::from_secs(1800))
        .await
        .unwrap();
    assert_eq!(
        refused(&b, start("p9", "", "e1"), t3 + 1).await,
        Limit::CoolDown
    );
    granted(&b, start("p9", "", "e1"), t3 + 1_800_001).await;

    // Undo gives the person's order back to its previous holder; release is the holder's only.
    let grant = a
        .limits_acquire(
            &start("p1", "l9", "a9"),
            &call_limits::Settings::default(),
            t + 9 * HOUR,
        )
        .await
        .unwrap();
    let Acquired::Granted { previous, undo } = grant else {
        panic!("refused")
    };
    assert_eq!(previous.unwrap().call, "b2");
    a.limits_undo(&undo).await.unwrap();
    assert_eq!(a.live_holder("p1").await.unwrap().unwrap().call, "b2");
    a.limits_release("p1", "b2").await.unwrap(); // site-a does not hold it
    assert!(a.live_holder("p1").await.unwrap().is_some());
    b.limits_release("p1", "b2").await.unwrap();
    assert!(a.live_holder("p1").await.unwrap().is_none());

    // Every key expires on its own, and none carries a person's pseudonym or a line as such.
    let mut c = a.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", s.key_prefix))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(keys.len() > 10);
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query_async(&mut c).await.unwrap();
        assert!(ttl > 0 || k.ends_with("key-fingerprint"), "{k} has no TTL");
        for plain in ["p1", "p2", "l1", "l2", "other", "PJSIP/7"] {
            assert!(!k.split(':').any(|part| part == plain), "{k} names {plain}");
        }
    }
}

#[tokio::test]
async fn a_different_pseudonym_key_is_detected() {
    let Some(server) = redis().await else { return };
    let s = settings(&server.url());
    assert_eq!(instance(&s, "a").check_key().await.unwrap(), KeyCheck::Same);
    let other = Shared::new(
        &s,
        "b",
        &PseudonymKey::new(b"another-pseudonym-key-000000".to_vec()),
        Arc::new(Metrics::new()),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(other.check_key().await.unwrap(), KeyCheck::Different);
}

#[tokio::test]
async fn redis_down_falls_back_to_local_limits_or_refuses_as_configured() {
    let Some(mut server) = redis().await else {
        return;
    };
    let mut s = settings(&server.url());
    let local_fallback = Limiter::shared(Limits::new(limit_settings()), instance(&s, "a"));
    s.on_unavailable = OnUnavailable::Refuse;
    let refusing_shared = instance(&s, "b");
    let refusing = Limiter::shared(Limits::new(limit_settings()), Arc::clone(&refusing_shared));
    // Up: granted through Redis, released through Redis.
    refusing
        .acquire(start("p1", "", "c0"), Instant::now())
        .await
        .unwrap();
    refusing.release("p1", "c0");
    assert_eq!(refusing.live_orders(), 0);

    server.stop();
    let now = Instant::now();
    let g = local_fallback.acquire(start("p1", "", "c1"), now).await;
    assert!(g.is_ok(), "local limits decide while Redis is down");
    assert!(local_fallback
        .acquire(start("p1", "", "c2"), now)
        .await
        .is_ok());
    // Only this instance's own per-number window (2) still holds.
    assert_eq!(
        local_fallback.acquire(start("p1", "", "c3"), now).await,
        Err(Limit::PerNumber)
    );
    assert_eq!(
        refusing.acquire(start("p2", "", "c4"), now).await,
        Err(Limit::SharedState)
    );
    assert_eq!(
        Limit::SharedState.reason(),
        crate::outcome::Reason::ProviderBusy
    );
    assert!(!refusing_shared.is_up());
    let text = refusing_shared.metrics().render();
    assert!(text.contains("callgate_state_up 0"), "{text}");

    // Back: decided by Redis again.
    server.restart().await.unwrap();
    // The first request on a connection to the old server finds it broken; the next one reconnects.
    refusing
        .acquire(start("p2", "", "c5"), Instant::now())
        .await
        .unwrap();
    assert!(refusing_shared.is_up());
}

/// A fake call task: answers starts with `v-<call>` and records the typed numbers it got.
fn fake_call(registry: &Registry, id: &str, numbers: Arc<Mutex<Vec<Option<String>>>>) -> Entry {
    let (tx, mut rx) = mpsc::channel(8);
    let (_snap_tx, snap_rx) = watch::channel(Snapshot {
        call_id: id.to_owned(),
        queue: "care".to_owned(),
        reference: String::new(),
        stage: None,
        outcome: None,
        started_at: SystemTime::UNIX_EPOCH,
    });
    let entry = registry
        .insert(
            id,
            Handle {
                inbox: tx,
                snapshot: snap_rx,
                cancel: CancellationToken::new(),
            },
        )
        .unwrap();
    let call = id.to_owned();
    tokio::spawn(async move {
        let _keep = _snap_tx;
        while let Some(event) = rx.recv().await {
            if let CallEvent::StartCheck(req) = event {
                numbers
                    .lock()
                    .unwrap()
                    .push(req.number.map(|TypedNumber(n)| n));
                let _ = req.reply.send(Ok(format!("v-{call}")));
            }
        }
    });
    entry
}

fn talking(id: &str) -> CallView {
    CallView {
        call_id: id.to_owned(),
        queue: "care".to_owned(),
        state: CallState::Talking,
        agent: Some("PJSIP/agent1".to_owned()),
        aliases: vec![format!("{id}-linked")],
        started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        can_verify: true,
        verification: None,
        keypad: true,
        owner: None,
    }
}

/// Waits (bounded) until `f` holds for the view, re-checking on each of its events.
async fn until(live: &Live, what: &str, f: impl Fn(&Live) -> bool) {
    let mut rx = live.subscribe();
    let wait = async {
        while !f(live) {
            let _ = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn two_instances_share_one_view_and_forward_requests_to_the_owner() {
    let Some(server) = redis().await else { return };
    let s = settings(&server.url());
    let (a, b) = (instance(&s, "site-a"), instance(&s, "site-b"));
    let (live_a, live_b) = (
        Arc::new(Live::with_instance(Duration::from_secs(60), "site-a")),
        Arc::new(Live::with_instance(Duration::from_secs(60), "site-b")),
    );
    let (reg_a, reg_b) = (Registry::new(), Registry::new());
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let tasks_a = replica::spawn(
        Arc::clone(&a),
        Arc::clone(&live_a),
        reg_a.clone(),
        None,
        stop_a.clone(),
    );
    let _tasks_b = replica::spawn(
        Arc::clone(&b),
        Arc::clone(&live_b),
        reg_b.clone(),
        None,
        stop_b.clone(),
    );

    for x in [&a, &b] {
        tokio::time::timeout(Duration::from_secs(10), x.wait_subscribed())
            .await
            .expect("subscribed");
    }
    // A call on A shows on B, owned by A.
    let numbers = Arc::new(Mutex::new(Vec::new()));
    let _entry = fake_call(&reg_a, "call-1", Arc::clone(&numbers));
    live_a.publish(LiveKind::AgentConnected, talking("call-1"));
    until(&live_b, "the call on B", |l| {
        l.call("call-1-linked").is_some()
    })
    .await;
    let seen = live_b.call("call-1").unwrap();
    assert_eq!(
        seen.owner,
        Some(Owner {
            instance: "site-a".into(),
            lost: false
        })
    );
    assert!(!live_b.is_local(&seen) && live_a.is_local(&live_a.call("call-1").unwrap()));

    // A start asked of B reaches A's call task, typed number included, and A's answer comes back.
    let answer = b
        .forward(
            "site-a",
            "call-1",
            crate::calls::live::StartedBy::Api("crm".into()),
            Op::Start {
                number: Some(TypedNumber("199001011234".into())),
            },
        )
        .await;
    assert_eq!(answer, Ok("v-call-1".to_owned()));
    assert_eq!(
        *numbers.lock().unwrap(),
        vec![Some("199001011234".to_owned())]
    );
    // The number never lies in Redis (messages are sealed and not stored).
    let mut c = a.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        if kind == "string" {
            let v: Vec<u8> = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
            assert!(!v.windows(12).any(|w| w == b"199001011234"), "{k}");
        }
    }
    // A call on no instance that listens: 503 at once.
    let t0 = Instant::now();
    let nobody = b
        .forward(
            "site-x",
            "call-9",
            crate::calls::live::StartedBy::Gate,
            Op::Cancel,
        )
        .await;
    assert_eq!(nobody, Err(Refusal::OwnerUnreachable));
    assert!(t0.elapsed() < Duration::from_secs(2));
    // A call A does not have: its refusal, relayed.
    let ended = b
        .forward(
            "site-a",
            "gone",
            crate::calls::live::StartedBy::Gate,
            Op::Cancel,
        )
        .await;
    assert_eq!(ended, Err(Refusal::Ended));

    // The end on A removes it on B.
    let mut end = talking("call-1");
    end.state = CallState::Ended;
    live_a.publish(LiveKind::CallEnded, end);
    until(&live_b, "the end on B", |l| l.call("call-1").is_none()).await;

    // B joins late: it loads A's calls from their snapshots.
    live_a.publish(LiveKind::AgentConnected, talking("call-2"));
    until(&live_b, "call-2 on B", |l| l.call("call-2").is_some()).await;
    let live_c = Arc::new(Live::with_instance(Duration::from_secs(60), "site-c"));
    let stop_c = CancellationToken::new();
    let _tasks_c = replica::spawn(
        instance(&s, "site-c"),
        Arc::clone(&live_c),
        Registry::new(),
        None,
        stop_c.clone(),
    );
    until(&live_c, "call-2 on a late instance", |l| {
        l.call("call-2").is_some()
    })
    .await;

    // A stops beating: its call is shown lost on B, then forgotten once its snapshot expired.
    stop_a.cancel();
    for t in tasks_a {
        let _ = t.await;
    }
    until(&live_b, "call-2 marked lost", |l| {
        l.call("call-2")
            .and_then(|c| c.owner)
            .is_some_and(|o| o.lost)
    })
    .await;
    until(&live_b, "call-2 forgotten", |l| l.call("call-2").is_none()).await;
    stop_b.cancel();
    stop_c.cancel();
}
