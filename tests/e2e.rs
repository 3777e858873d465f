//! End to end: callgate against the in-process fake Asterisk and the BankID simulator on 127.0.0.1,
//! for every before-agent outcome and every fault the gate must survive. Each test asserts that the call
//! ended routed (or hung up) with the right metadata, and that no BankID order was left open.
//!
//! All tests log at trace level into one capture; the privacy test greps it for personal numbers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[path = "e2e/instances.rs"]
mod instances;
mod support;
#[path = "e2e/switchboard.rs"]
mod switchboard;
#[path = "support/webdriver.rs"]
mod webdriver;
#[path = "e2e/widget.rs"]
mod widget;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use callgate::calls::live::{
    CallState, CancelRequest, CheckMethod, CheckRequest, LiveKind, Refusal, StartedBy, TypedNumber,
};
use callgate::calls::CallEvent;
use callgate::demo::{self, Lab, LabOptions};
use callgate::idp::sim::{number_with_serial, Scenario, TABLE_DATE};
use callgate::outcome::{Outcome, Reason};
use callgate::pbx::asterisk;
use callgate::pbx::sim::{Caller, ChannelEnd, Direction};
use support::proxy::Proxy;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

// ---- log capture ----

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

fn logs() -> &'static Capture {
    static LOGS: OnceLock<Capture> = OnceLock::new();
    LOGS.get_or_init(|| {
        let capture = Capture::default();
        tracing_subscriber::fmt()
            .with_env_filter(callgate::telemetry::safe_filter(
                tracing_subscriber::EnvFilter::new("trace"),
            ))
            .with_ansi(false)
            .with_writer(capture.clone())
            .init();
        capture
    })
}

fn captured() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

// ---- helpers ----

async fn lab(options: LabOptions) -> Lab {
    logs();
    Lab::start(options).await.unwrap()
}

/// Options under which an order stays outstanding (a 30 s simulator step) until the caller hangs up
/// or the test cancels it.
fn orders_held(options: LabOptions) -> LabOptions {
    LabOptions {
        step: Duration::from_secs(30),
        verify_timeout: Duration::from_secs(60),
        gate_deadline: Duration::from_secs(90),
        ..options
    }
}

fn person(serial: u16) -> String {
    number_with_serial(TABLE_DATE, serial)
}

fn var<'a>(end: &'a ChannelEnd, name: &str) -> &'a str {
    end.variables.get(name).map(String::as_str).unwrap_or("")
}

fn route(end: &ChannelEnd) -> String {
    end.continued_to
        .as_ref()
        .map(|(c, e, p)| format!("{c},{e},{p}"))
        .unwrap_or_default()
}

/// Waits (bounded) until `cond` holds, re-checking as state changes in the fakes.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

async fn no_open_orders(lab: &Lab) {
    tokio::time::timeout(Duration::from_secs(10), lab.bankid.wait_for_open_orders(0))
        .await
        .expect("a BankID order was left open");
}

// ---- every outcome ----

#[tokio::test]
async fn every_before_agent_outcome_ends_routed_with_its_metadata() {
    let mut lab = lab(LabOptions::fast()).await;
    let rows = demo::run_calls(&mut lab).await.unwrap();
    let table = demo::table(&rows);
    for row in &rows {
        assert_eq!(row.outcome, row.expected, "{}\n{table}", row.title);
    }
    no_open_orders(&lab).await;
    for row in &rows {
        let end = lab.asterisk.wait_for_channel_end(&row.call).await;
        match row.outcome {
            Outcome::NotVerified(Reason::CallerHungUp) => {
                assert!(end.continued_to.is_none(), "{table}");
            }
            outcome => {
                assert_eq!(route(&end), row.route, "{table}");
                assert_eq!(var(&end, "CALLGATE_STATUS"), outcome.status().code());
                assert_eq!(
                    var(&end, "CALLGATE_REASON"),
                    outcome.reason().map(|r| r.code()).unwrap_or("")
                );
                assert!(!var(&end, "CALLGATE_REF").is_empty());
                assert!(var(&end, "CALLGATE_AT").ends_with('Z'));
                assert_eq!(
                    var(&end, "TIMEOUT(absolute)"),
                    "0",
                    "safety net not cleared"
                );
                // The queue discloses name and masked number, never the number.
                assert!(!end.variables.contains_key("CALLGATE_NUMBER"));
                if outcome == Outcome::Verified {
                    assert_eq!(var(&end, "CALLGATE_METHOD"), "bankid_phone");
                    assert!(!var(&end, "CALLGATE_NAME").is_empty());
                    assert!(var(&end, "CALLGATE_NUMBER_MASKED").ends_with("-****"));
                } else {
                    assert!(!end.variables.contains_key("CALLGATE_NAME"));
                }
            }
        }
    }
    assert_eq!(
        rows.iter()
            .find(|r| r.expected == Outcome::NotVerified(Reason::DeclinedCall))
            .unwrap()
            .route,
        "queues,fraud-desk,1"
    );
    lab.shutdown().await.unwrap();
}

// ---- faults ----

#[tokio::test]
async fn websocket_dropped_while_typing_reprompts_and_verifies() {
    let mut options = LabOptions::fast();
    // No timer may fire during the gap: only the reconnect decides what happens next.
    options.prompt = Duration::from_secs(1);
    options.first_digit_timeout = Duration::from_secs(10);
    options.inter_digit_timeout = Duration::from_secs(10);
    let mut lab = lab(options).await;
    let n = person(201);
    let id = lab.asterisk.call(
        Caller::new("46700000201")
            .await_prompt()
            .wait(Duration::from_millis(300))
            .press("1980", lab.options.key_gap)
            .await_prompt()
            .press(&format!("{n}#"), lab.options.key_gap),
    );
    until("the first prompt", || {
        !lab.asterisk.media_started(&id).is_empty()
    })
    .await;
    lab.asterisk.set_accepting(false);
    lab.asterisk.drop_websocket();
    // The digits typed during the gap are lost, as on a real Asterisk.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        lab.asterisk.wait_for_dropped_events(4),
    )
    .await;
    lab.asterisk.set_accepting(true);
    let report = lab.report(&id).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    assert!(lab.asterisk.connections() >= 2);
    // The caller was asked again after the gap (the partial entry was not trusted).
    assert!(lab.asterisk.media_started(&id).len() >= 2);
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

/// A proxy between callgate and the fake Asterisk resets every connection (websocket and REST) again
/// and again, each time once callgate has reconnected and resynced the calls. Callers who type the
/// number again whenever asked are all verified and none is charged an invalid number; a caller who
/// never types is ended by the link's own bound (`interrupted/pbx_lost`), long before the deadline.
/// (That a proven connection is replaced at once is tested in `pbx::ari` without timing.)
#[tokio::test]
async fn flapping_link_callers_who_type_again_are_verified_and_a_silent_one_ends_pbx_lost() {
    logs();
    let proxy = Proxy::start(None).await.unwrap();
    let mut options = LabOptions::fast();
    options.ari_url = Some(proxy.url());
    // Entry timers short enough for the silent caller to use up the link's bound well before the
    // gate deadline.
    options.first_digit_timeout = Duration::from_secs(1);
    options.inter_digit_timeout = Duration::from_secs(1);
    options.key_gap = Duration::from_millis(20);
    options.step = Duration::from_millis(200);
    let mut lab = Lab::start_after(options, async |asterisk, _, _| {
        proxy.set_target(asterisk.addr())
    })
    .await
    .unwrap();
    let ask = "sound:callgate/enter-number";
    let typists: Vec<(String, String)> = (0..4u16)
        .map(|i| {
            let n = person(230 + i);
            let mut caller = Caller::new(&format!("4670000023{i}"));
            for _ in 0..8 {
                caller = caller
                    .await_media(ask)
                    .press(&format!("{n}#"), lab.options.key_gap);
            }
            (lab.asterisk.call(caller), n)
        })
        .collect();
    let silent = lab.asterisk.call(Caller::new("46700000239"));
    // Asked for the number: `enter-number` alone, or after `start-again` / `invalid-number`.
    let asked = |id: &str| {
        lab.asterisk
            .media_started(id)
            .iter()
            .filter(|m| m.split(',').any(|one| one == ask))
            .count()
    };
    until("every caller asked for the number", || {
        typists.iter().all(|(id, _)| asked(id) > 0) && asked(&silent) > 0
    })
    .await;
    // First reset while the typists are typing; then one reset each time callgate has reconnected
    // and asked the silent caller again, until that caller has left the gate.
    for _ in 0..12 {
        if !lab.asterisk.in_application(&silent) {
            break;
        }
        let connections = lab.asterisk.connections();
        let asked_before = asked(&silent);
        proxy.reset_all();
        tokio::time::timeout(
            Duration::from_secs(10),
            lab.asterisk.wait_for_connections(connections + 1),
        )
        .await
        .expect("callgate never reconnected");
        until("the silent caller asked again, or gone", || {
            asked(&silent) > asked_before || !lab.asterisk.in_application(&silent)
        })
        .await;
    }
    for (id, _) in &typists {
        let report = lab.report(id).await.unwrap();
        assert_eq!(report.outcome, Outcome::Verified, "{id}");
        let end = lab.asterisk.wait_for_channel_end(id).await;
        assert_eq!(route(&end), "queues,support,1");
    }
    let report = lab.report(&silent).await.unwrap();
    assert_eq!(
        report.outcome,
        Outcome::NotVerified(Reason::PbxLost),
        "the silent caller after {:?}",
        report.duration
    );
    assert!(
        report.duration < lab.options.gate_deadline / 2,
        "{:?}",
        report.duration
    );
    for (id, _) in &typists {
        let end = lab.asterisk.wait_for_channel_end(id).await;
        assert_ne!(var(&end, "CALLGATE_REASON"), "invalid_number");
    }
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn websocket_dropped_while_verifying_collects_again() {
    let mut options = LabOptions::fast();
    options.step = Duration::from_millis(300);
    let mut lab = lab(options).await;
    let n = person(202);
    let id = lab.asterisk.call(lab.caller_typing(&n));
    until("hold music", || lab.asterisk.moh_on(&id)).await;
    lab.asterisk.drop_websocket();
    let report = lab.report(&id).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    let end = lab.asterisk.wait_for_channel_end(&id).await;
    assert_eq!(route(&end), "queues,support,1");
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn hang_up_during_a_prompt_cancels_nothing_and_leaves_no_order() {
    let mut lab = lab(LabOptions::fast()).await;
    let n = person(203);
    let (report, end) = lab
        .run_call(
            Caller::new("46700000203")
                .await_prompt()
                .press(&format!("{n}#"), lab.options.key_gap)
                .await_prompt()
                .hang_up(),
        )
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::NotVerified(Reason::CallerHungUp));
    assert!(end.continued_to.is_none());
    no_open_orders(&lab).await;
    // Requests racing the hang-up got 404s and ended the call quietly.
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_prompt_file_does_not_stall_the_caller() {
    let mut options = LabOptions::fast();
    options.missing_media = ["sound:callgate/enter-number".to_owned()].into();
    let mut lab = lab(options).await;
    let n = person(204);
    let (report, end) = lab.run_call(lab.caller_typing(&n)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    assert_eq!(route(&end), "queues,support,1");
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn provider_down_goes_to_plan_b_at_once() {
    let mut lab = lab(LabOptions::fast()).await;
    for scenario in [Scenario::Maintenance, Scenario::InternalError] {
        let n = Lab::number(scenario);
        let (report, end) = lab.run_call(lab.caller_typing(&n)).await.unwrap();
        assert_eq!(
            report.outcome.status().code(),
            "unavailable",
            "{scenario:?}"
        );
        assert_eq!(route(&end), "queues,support-fallback,1");
        assert!(
            report.duration < Duration::from_secs(5),
            "{:?}",
            report.duration
        );
    }
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_route_missing_from_the_dialplan_falls_back_to_unavailable() {
    let mut options = LabOptions::fast();
    options
        .routes_by_reason
        .push(("id_blocked".into(), "queues,no-such-extension,1".into()));
    let mut lab = lab(options).await;
    let n = Lab::number(Scenario::BlockedId);
    let (report, end) = lab.run_call(lab.caller_typing(&n)).await.unwrap();
    assert_eq!(report.outcome, Outcome::NotVerified(Reason::IdBlocked));
    assert_eq!(route(&end), "queues,support-fallback,1");
    assert_eq!(var(&end, "CALLGATE_REASON"), "id_blocked");
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_queue_without_defaults_continues_in_the_dialplan() {
    let mut lab = lab(LabOptions::fast()).await;
    let (report, end) = lab
        .run_call(Caller::new("46700000205").queue("no-such-queue"))
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::NotVerified(Reason::UnknownQueue));
    assert_eq!(route(&end), "callgate-in,100,3");
    assert_eq!(var(&end, "CALLGATE_STATUS"), "skipped");
    lab.shutdown().await.unwrap();
}

/// A callgate run before the one under test: it holds the ARI application until it dies.
struct PreviousRun {
    events: tokio::sync::mpsc::Receiver<callgate::pbx::ari::events::Incoming>,
    token: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl PreviousRun {
    async fn connect(asterisk: &callgate::pbx::sim::FakeAsterisk) -> PreviousRun {
        let (tx, events) = tokio::sync::mpsc::channel(64);
        let token = tokio_util::sync::CancellationToken::new();
        let (task, _) = callgate::pbx::ari::events::spawn(asterisk.settings(), tx, token.clone());
        asterisk.wait_for_connected().await;
        PreviousRun {
            events,
            token,
            task,
        }
    }

    /// Places a call and waits until it is in the previous run's application.
    async fn takes(
        &mut self,
        asterisk: &callgate::pbx::sim::FakeAsterisk,
        caller: Caller,
    ) -> String {
        let id = asterisk.call(caller);
        while let Some(i) = self.events.recv().await {
            if matches!(i, callgate::pbx::ari::events::Incoming::Event(ref e) if e.kind() == "StasisStart")
            {
                break;
            }
        }
        id
    }

    async fn dies(self, asterisk: &callgate::pbx::sim::FakeAsterisk) {
        self.token.cancel();
        self.task.await.unwrap();
        asterisk.wait_for_disconnected().await;
    }
}

#[tokio::test]
async fn after_our_restart_callers_left_in_stasis_are_routed_as_interrupted() {
    logs();
    let mut stranded = String::new();
    let mut lab = Lab::start_after(LabOptions::fast(), async |asterisk, _, _| {
        // A previous callgate took the call into Stasis, then died.
        let mut previous = PreviousRun::connect(asterisk).await;
        stranded = previous.takes(asterisk, Caller::new("46700000206")).await;
        previous.dies(asterisk).await;
    })
    .await
    .unwrap();
    let report = lab.report(&stranded).await.unwrap();
    assert_eq!(report.outcome, Outcome::NotVerified(Reason::Restart));
    let end = lab.asterisk.wait_for_channel_end(&stranded).await;
    assert_eq!(route(&end), "queues,support-fallback,1");
    assert_eq!(var(&end, "CALLGATE_STATUS"), "interrupted");
    assert_eq!(var(&end, "CALLGATE_REASON"), "restart");
    lab.shutdown().await.unwrap();
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // the test plays the previous run, which read the clock
async fn a_crash_mid_approval_resumes_the_waiting_caller_and_cancels_the_orphaned_order() {
    use callgate::calls::journal::{Entry, Journal};
    use callgate::idp::Provider as _;
    use callgate::pnr::PersonalNumber;
    use callgate::verify::{Initiator, Order};

    logs();
    let mut options = LabOptions::fast();
    options.step = Duration::from_millis(300);
    let waiting_number = person(211);
    let gone_number = person(212);
    let mut waiting = String::new();
    let mut lab = Lab::start_after(options, async |asterisk, bankid, data_dir| {
        // The previous run: took the caller into Stasis, started and journalled two orders (the other
        // caller hung up while it was down), then was killed.
        let mut previous = PreviousRun::connect(asterisk).await;
        waiting = previous.takes(asterisk, Caller::new("46700000211")).await;
        let client = callgate::idp::bankid::Client::new(&bankid.settings()).unwrap();
        let (journal, left) = Journal::open(data_dir).unwrap();
        assert!(left.is_empty());
        for (number, call) in [
            (&waiting_number, waiting.clone()),
            (&gone_number, "gone.1".into()),
        ] {
            let number = PersonalNumber::parse_swedish_12(number).unwrap();
            let started = client
                .start(&Order {
                    number: number.clone(),
                    initiator: Initiator::Caller,
                    text: None,
                    pin_code: false,
                })
                .await
                .unwrap();
            assert!(
                journal
                    .opened(Entry {
                        order: started.order.0,
                        call,
                        queue: "support".into(),
                        idp: "bankid".into(),
                        reference: format!("ref-{}", &number.pseudonym(journal.key())[..8]),
                        person: journal.person(&number),
                        started_ms: callgate::calls::task::unix_ms(std::time::SystemTime::now()),
                    })
                    .await
            );
        }
        assert_eq!(bankid.open_orders(), 2);
        previous.dies(asterisk).await;
    })
    .await
    .unwrap();
    let report = lab.report(&waiting).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    assert!(report.reference.starts_with("ref-"));
    let end = lab.asterisk.wait_for_channel_end(&waiting).await;
    assert_eq!(route(&end), "queues,support,1");
    assert_eq!(var(&end, "CALLGATE_STATUS"), "verified");
    assert_eq!(var(&end, "CALLGATE_REF"), report.reference);
    // The order of the caller who is gone was cancelled; none is left on anyone's phone.
    lab.bankid.wait_for_open_orders(0).await;
    assert!(lab.bankid.cancels() >= 1);
    let journal = std::fs::read_to_string(lab.data_dir.join("orders.journal")).unwrap();
    lab.shutdown().await.unwrap();
    assert!(!journal.contains(&waiting_number[2..]));
}

#[tokio::test]
async fn a_planned_restart_with_handover_resumes_the_holding_caller_without_a_new_order() {
    let mut options = LabOptions::fast();
    options.handover = true;
    options.shutdown_grace = Duration::ZERO;
    // Approval takes three steps: long enough to restart while the caller holds.
    options.step = Duration::from_secs(1);
    let mut lab = lab(options).await;
    let n = person(213);
    let id = lab.asterisk.call(lab.caller_typing(&n));
    until("hold music", || lab.asterisk.moh_on(&id)).await;
    lab.restart().await.unwrap();
    let report = lab.report(&id).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    let end = lab.asterisk.wait_for_channel_end(&id).await;
    assert_eq!(route(&end), "queues,support,1");
    assert_eq!(var(&end, "CALLGATE_STATUS"), "verified");
    lab.bankid.wait_for_open_orders(0).await;
    assert_eq!(
        lab.bankid.starts(),
        1,
        "the order was taken over, not started again"
    );
    assert_eq!(lab.bankid.cancels(), 0);
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn application_replaced_stops_acting_and_cancels_the_order() {
    let mut options = LabOptions::fast();
    options.step = Duration::from_secs(2);
    let mut lab = lab(options).await;
    let n = person(207);
    let id = lab.asterisk.call(lab.caller_typing(&n));
    until("hold music", || lab.asterisk.moh_on(&id)).await;
    lab.asterisk.replace_app();
    let report = lab.report(&id).await.unwrap();
    assert_eq!(report.outcome, Outcome::NotVerified(Reason::PbxLost));
    no_open_orders(&lab).await;
    let (status, body) = http(lab.app.ops_addr, "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("another instance"), "{body}");
    // The channel is left to the instance that owns the application now.
    assert!(lab.asterisk.in_application(&id));
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_interrupts_calls_after_the_grace_and_skips_new_ones() {
    let mut options = LabOptions::fast();
    options.step = Duration::from_secs(2);
    options.shutdown_grace = Duration::from_millis(800);
    let mut lab = lab(options).await;
    let n = person(208);
    let held = lab.asterisk.call(lab.caller_typing(&n));
    until("hold music", || lab.asterisk.moh_on(&held)).await;
    lab.begin_shutdown();
    until("draining", || {
        lab.app
            .readiness
            .draining
            .load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let late = lab.asterisk.call(Caller::new("46700000209"));
    let late_report = lab.report(&late).await.unwrap();
    assert_eq!(late_report.outcome, Outcome::NotVerified(Reason::Draining));
    let report = lab.report(&held).await.unwrap();
    assert_eq!(report.outcome, Outcome::NotVerified(Reason::Restart));
    let end = lab.asterisk.wait_for_channel_end(&held).await;
    assert_eq!(route(&end), "queues,support-fallback,1");
    assert_eq!(var(&end, "CALLGATE_STATUS"), "interrupted");
    let late_end = lab.asterisk.wait_for_channel_end(&late).await;
    assert_eq!(var(&late_end, "CALLGATE_STATUS"), "skipped");
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

// ---- operations ----

#[tokio::test]
async fn metrics_show_the_funnel_and_reload_keeps_serving_on_a_broken_file() {
    let mut lab = lab(LabOptions::fast()).await;
    let n = person(210);
    let (report, _) = lab.run_call(lab.caller_typing(&n)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    let declined = Lab::number(Scenario::DeclinesCall);
    lab.run_call(lab.caller_typing(&declined)).await.unwrap();

    let (status, metrics) = http(lab.app.ops_addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    // Prometheus text: every sample line is `name{labels} value`, every name has HELP and TYPE.
    for line in metrics
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample: {line}");
        let base = name.split('{').next().unwrap();
        let family = base
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "no TYPE for {base}"
        );
    }
    for (step, calls) in [
        ("entered", 2),
        ("number_accepted", 2),
        ("order_created", 2),
        ("app_opened", 2),
        ("call_confirmed", 1),
        ("declined", 1),
        ("verified", 1),
    ] {
        assert!(
            metrics.contains(&format!(
                "callgate_funnel_total{{queue=\"support\",idp=\"bankid\",step=\"{step}\"}} {calls}\n"
            )),
            "funnel step {step} is not {calls}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("callgate_build_info{version="),
        "{metrics}"
    );
    assert!(metrics.contains("callgate_pbx_connected 1"));

    let good = std::fs::read_to_string(&lab.config_path).unwrap();
    std::fs::write(&lab.config_path, "[queues.support]\nmode = \"sometimes\"\n").unwrap();
    let (status, body) = http(lab.app.ops_addr, "POST", "/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("queues.support.mode"), "{body}");
    let (status, _) = http(lab.app.ops_addr, "GET", "/readyz").await;
    assert_eq!(status, 200);
    let n = person(211);
    let (report, _) = lab.run_call(lab.caller_typing(&n)).await.unwrap();
    assert_eq!(
        report.outcome,
        Outcome::Verified,
        "still serving after a bad reload"
    );

    // A file that needs a restart (new limits) is refused as a whole, not half applied.
    std::fs::write(
        &lab.config_path,
        format!("{good}\n[limits]\nmax_concurrent_orders = 5\n"),
    )
    .unwrap();
    let (status, body) = http(lab.app.ops_addr, "POST", "/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limits: changed"), "{body}");

    // A good file is taken: the queue now discloses nothing.
    std::fs::write(
        &lab.config_path,
        good.replace("disclose = [\"name\", \"masked_number\"]", "disclose = []"),
    )
    .unwrap();
    let (status, body) = http(lab.app.ops_addr, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let n = person(212);
    let (report, end) = lab.run_call(lab.caller_typing(&n)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    assert!(!end.variables.contains_key("CALLGATE_NAME"));
    lab.shutdown().await.unwrap();
}

// ---- privacy ----

#[tokio::test]
async fn personal_numbers_never_reach_logs_metrics_the_audit_trail_webhooks_or_the_stream() {
    // Every surface is watched: a CRM receives every webhook, a supervisor's live stream every event.
    let crm = Crm::start().await;
    let options = LabOptions {
        api_tokens: vec![lead()],
        webhook_url: Some(crm.url.clone()),
        ..LabOptions::fast()
    };
    let mut lab = lab(options).await;
    let mut stream = RawStream::open(lab.app.api_addr, "/v1/events", LEAD_TOKEN).await;
    stream.until("snapshot_complete").await;
    let rows = demo::run_calls(&mut lab).await.unwrap();
    assert!(rows.iter().all(|r| r.outcome == r.expected));
    // And the checks during a call: a number the agent types through the API, then one the caller
    // types on the keypad.
    let call = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    talking(&lab, &call).await;
    let path = format!("/v1/calls/{call}/verifications");
    for body in [
        format!(r#"{{"number":"{}"}}"#, person(213)),
        r#"{"collect":"keypad"}"#.to_owned(),
    ] {
        let keypad = body.contains("keypad");
        let (status, answer) =
            api_request(lab.app.api_addr, "POST", &path, LEAD_TOKEN, &body).await;
        assert_eq!(status, 202, "{answer}");
        if keypad {
            until("the caller to be muted", || {
                lab.asterisk.is_muted(&call, Direction::In)
            })
            .await;
            let typed = format!("{}#", person(214));
            assert!(lab.asterisk.press(&call, &typed, lab.options.key_gap).await);
        }
        let done = loop {
            let (_, e) = stream.until("verification_completed").await;
            if e["call_id"] == call.as_str() {
                break e;
            }
        };
        assert_eq!(done["verification"]["status"], "verified", "{done}");
    }
    lab.asterisk.hang_up(&call);
    all_gone(&lab, &call).await;
    loop {
        let (_, e) = stream.until("call_ended").await;
        if e["call_id"] == call.as_str() {
            break;
        }
    }
    crm.event("verification_completed", &call).await;
    let webhooks: String = crm
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, body)| String::from_utf8_lossy(body).into_owned())
        .collect();
    assert!(
        webhooks.len() > 1_000,
        "too few webhook bodies to prove anything"
    );
    let streamed = stream.text.clone();
    assert!(
        streamed.len() > 1_000,
        "too little streamed to prove anything"
    );
    let (_, metrics) = http(lab.app.ops_addr, "GET", "/metrics").await;
    // Each call's record is on disk before the call went on to its route.
    let audit = audit_text(&lab.app.audit_dir);
    assert!(audit.lines().count() >= rows.len());
    callgate::audit::chain::verify(&lab.app.audit_dir).unwrap();
    let mut canaries: Vec<String> = Scenario::ALL.iter().map(|s| s.number()).collect();
    canaries.extend((100..=102).map(person));
    canaries.extend((201..=214).map(person));
    let logs = captured();
    assert!(
        logs.len() > 10_000,
        "too little was logged to prove anything"
    );
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"));
    for number in &canaries {
        // The 12-digit form and the 10-digit form without the century.
        for form in [number.as_str(), &number[2..]] {
            assert!(!logs.contains(form), "a personal number reached the logs");
            assert!(
                !metrics.contains(form),
                "a personal number reached /metrics"
            );
            assert!(
                !audit.contains(form),
                "a personal number reached the audit trail"
            );
            assert!(
                !webhooks.contains(form),
                "a personal number reached a webhook body"
            );
            assert!(
                !streamed.contains(form),
                "a personal number reached the live stream"
            );
        }
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "privacy: {} bytes of logs checked", logs.len());
    lab.shutdown().await.unwrap();
}

/// Every record of the audit trail, all files, oldest first.
fn audit_text(dir: &std::path::Path) -> String {
    callgate::audit::chain::read_all(dir)
        .unwrap()
        .iter()
        .map(|r| String::from_utf8(r.bytes.clone()).unwrap() + "\n")
        .collect()
}

#[tokio::test]
async fn the_audit_trail_records_every_check_and_agent_action_in_an_intact_chain() {
    const TOKEN: &str = "lab-care-agent-token-1";
    let options = LabOptions {
        api_tokens: vec![demo::LabToken {
            name: "care-agent".into(),
            token: TOKEN.into(),
            role: callgate::config::Role::Agent,
            agent: Some(demo::LAB_AGENT.into()),
        }],
        step: Duration::from_millis(200),
        ..LabOptions::fast()
    };
    let mut lab = lab(options).await;
    let addr = lab.app.api_addr;
    // The gate verifies the caller, then an agent checks again with a typed number, reads the
    // result, starts one more check and cancels it.
    let gated = person(601);
    let id = lab.asterisk.call(lab.caller_typing(&gated).queue("care"));
    let gate = lab.report(&id).await.unwrap();
    assert_eq!(gate.outcome, Outcome::Verified);
    talking(&lab, &id).await;
    let typed = person(602);
    let path = format!("/v1/calls/{id}/verifications");
    let body = format!("{{\"number\":\"{typed}\"}}");
    let (status, text) = api_request(addr, "POST", &path, TOKEN, &body).await;
    assert_eq!(status, 202, "{text}");
    let accepted: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    let check = accepted["verification_id"].as_str().unwrap().to_owned();
    assert_eq!(check_over(&lab, &check).await, Outcome::Verified);
    let (status, text) = api_request(
        addr,
        "GET",
        &format!("/v1/verifications/{check}"),
        TOKEN,
        "",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let shown: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    let name = shown["fields"]["name"].as_str().unwrap().to_owned();
    let slow = Lab::number(Scenario::Expires);
    let body = format!("{{\"number\":\"{slow}\"}}");
    let (status, text) = api_request(addr, "POST", &path, TOKEN, &body).await;
    assert_eq!(status, 202, "{text}");
    let accepted: serde_json::Value =
        serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    let cancelled = accepted["verification_id"].as_str().unwrap().to_owned();
    let (status, text) = api_request(
        addr,
        "DELETE",
        &format!("/v1/calls/{id}/verification"),
        TOKEN,
        "",
    )
    .await;
    assert_eq!(status, 202, "{text}");
    assert_eq!(
        check_over(&lab, &cancelled).await,
        Outcome::NotVerified(Reason::AgentCancelled)
    );
    lab.asterisk.hang_up(&id);
    all_gone(&lab, &id).await;
    // Every record above was acknowledged on disk before the next step went on.
    let intact = callgate::audit::chain::verify(&lab.app.audit_dir).unwrap();
    let text = audit_text(&lab.app.audit_dir);
    let cli = audit_cli(&lab, &typed);
    lab.shutdown().await.unwrap();
    assert!(cli.verify.starts_with("intact: "), "{}", cli.verify);
    // The person whose number was typed: their check, who started it and who viewed it.
    let exported: Vec<serde_json::Value> = cli
        .export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = exported
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["check_started", "verification", "identity_viewed"],
        "{}",
        cli.export
    );
    assert!(exported.iter().all(|r| r["reference"] == check.as_str()));
    assert!(cli.tampered.starts_with("broken: "), "{}", cli.tampered);
    assert!(
        cli.tampered.contains(" line 2 (seq 2): changed"),
        "{}",
        cli.tampered
    );
    assert_eq!(intact.records, text.lines().count() as u64);
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r["call_id"] == id.as_str())
        .collect();
    let summary: Vec<String> = records
        .iter()
        .map(|r| {
            let who = r["by"].as_str().or(r["started_by"].as_str()).unwrap_or("");
            let what = r["status"].as_str().or(r["method"].as_str()).unwrap_or("");
            format!("{} {who} {what}", r["kind"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        summary,
        [
            "verification gate verified",
            "check_started api:care-agent agent_typed",
            "verification api:care-agent verified",
            "identity_viewed api:care-agent ",
            "check_started api:care-agent agent_typed",
            "check_cancelled api:care-agent ",
            "verification api:care-agent failed",
        ],
        "{text}"
    );
    let by_ref = |kind: &str| {
        records
            .iter()
            .find(|r| r["kind"] == kind)
            .map(|r| r["reference"].as_str().unwrap().to_owned())
    };
    assert_eq!(by_ref("identity_viewed").as_deref(), Some(check.as_str()));
    assert_eq!(
        by_ref("check_cancelled").as_deref(),
        Some(cancelled.as_str())
    );
    let viewed = records
        .iter()
        .find(|r| r["kind"] == "identity_viewed")
        .unwrap();
    assert_eq!(
        viewed["fields"],
        serde_json::json!(["name", "number_masked"])
    );
    assert_eq!(records[0]["destination"], "agent");
    assert_eq!(records[6]["reason"], "agent_cancelled");
    // The verified person is named by a pseudonym, never by number or name.
    let gate_person = records[0]["person"].as_str().unwrap();
    assert_eq!(gate_person.len(), 64);
    for form in [
        &gated[..],
        &gated[2..],
        &typed,
        &typed[2..],
        &slow,
        &slow[2..],
    ] {
        assert!(
            !text.contains(form),
            "a personal number reached the audit trail"
        );
    }
    assert!(!text.contains(&name), "a name reached the audit trail");
}

/// What `callgate audit` printed.
struct AuditCli {
    verify: String,
    export: String,
    /// `verify` of a copy of the trail with one character changed in its second record.
    tampered: String,
}

/// Runs the binary's `audit verify` and `audit export` (the number on stdin) on the lab's trail, and
/// `audit verify --dir` on a tampered copy.
fn audit_cli(lab: &Lab, number: &str) -> AuditCli {
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_callgate");
    let config = lab.config_path.to_str().unwrap();
    let verify = Command::new(bin)
        .args(["audit", "verify", "--config", config])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
    let mut child = Command::new(bin)
        .args(["audit", "export", "--config", config])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{number}\n").as_bytes())
        .unwrap();
    let export = child.wait_with_output().unwrap();
    assert!(export.status.success(), "{export:?}");
    let copy = lab.config_path.with_file_name("audit-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for (_, path) in callgate::audit::files(&lab.app.audit_dir).unwrap() {
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(copy.join(path.file_name().unwrap()), text).unwrap();
    }
    let (_, first) = callgate::audit::files(&copy).unwrap().remove(0);
    let text = std::fs::read_to_string(&first).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[1] = lines[1].replacen("\"seq\":2,", "\"seq\":2, ", 1);
    std::fs::write(&first, lines.join("\n") + "\n").unwrap();
    let tampered = Command::new(bin)
        .args(["audit", "verify", "--dir", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(tampered.status.code(), Some(1), "{tampered:?}");
    AuditCli {
        verify: String::from_utf8(verify.stdout).unwrap(),
        export: String::from_utf8(export.stdout).unwrap(),
        tampered: String::from_utf8(tampered.stdout).unwrap(),
    }
}

// ---- BankID pacing ----

/// Drives a `verify::Session` against the simulator with its production pacing: however short the
/// configured interval, no two collects of an order are less than a second apart.
#[tokio::test]
async fn no_collect_is_sent_faster_than_once_a_second() {
    use callgate::idp::Provider as _;
    use callgate::verify::{self, Command, Input, Session};
    logs();
    let token = tokio_util::sync::CancellationToken::new();
    let sim = callgate::idp::sim::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        callgate::idp::sim::SimOptions {
            step: Duration::from_millis(40),
            ..Default::default()
        },
        token.clone(),
    )
    .await
    .unwrap();
    let client = callgate::idp::bankid::Client::new(&sim.settings()).unwrap();
    let order = verify::Order {
        number: callgate::pnr::PersonalNumber::parse_swedish_12(&person(230)).unwrap(),
        initiator: verify::Initiator::Caller,
        text: None,
        pin_code: false,
    };
    let settings = verify::Settings {
        poll_interval: Duration::from_millis(50),
        ..verify::Settings::default()
    };
    #[allow(clippy::disallowed_methods)] // this test is the driver, so it reads the clock
    let now = || tokio::time::Instant::now().into_std();
    let mut session = Session::new(order, settings, now());
    let mut next: Option<std::time::Instant> = None;
    let mut order_ref = None;
    let outcome = loop {
        let mut inputs = Vec::new();
        let mut finished = None;
        while let Some(c) = session.poll_command() {
            match c {
                Command::Start(o) => {
                    let r = client.start(&o).await;
                    if let Ok(s) = &r {
                        order_ref = Some(s.order.clone());
                    }
                    inputs.push(Input::Started(r));
                }
                Command::Poll(r) => inputs.push(Input::Polled(client.poll(&r).await)),
                Command::Cancel(r) => inputs.push(Input::CancelDone(client.cancel(&r).await)),
                Command::ArmTimer {
                    timer: verify::Timer::Next,
                    at,
                } => next = Some(at),
                Command::Finished(c) => finished = Some(c.outcome),
                _ => {}
            }
        }
        if let Some(o) = finished {
            break o;
        }
        if inputs.is_empty() {
            let at = next.take().expect("nothing scheduled");
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            inputs.push(Input::Timer(verify::Timer::Next));
        }
        for i in inputs {
            session.handle(i, now());
        }
    };
    assert_eq!(outcome, Outcome::Verified);
    let times = sim.collect_times(&order_ref.unwrap().0);
    assert!(times.len() >= 4, "{} collects", times.len());
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(gap >= Duration::from_millis(990), "collects {gap:?} apart");
    }
    token.cancel();
}

#[tokio::test]
async fn slow_rest_and_a_malformed_frame_do_not_derail_a_call() {
    let mut lab = lab(LabOptions::fast()).await;
    lab.asterisk.set_rest_delay(Duration::from_millis(150));
    lab.asterisk.send_malformed_frame();
    let n = person(213);
    let (report, end) = lab.run_call(lab.caller_typing(&n)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    assert_eq!(route(&end), "queues,support,1");
    lab.asterisk.set_rest_delay(Duration::ZERO);
    lab.shutdown().await.unwrap();
}

// ---- ARI requests per call ----

/// The ARI requests a verified call made: those on its channel and on its playbacks.
fn requests_of(lab: &Lab, call: &str, reference: &str) -> Vec<String> {
    lab.asterisk
        .rest_log()
        .into_iter()
        .filter(|e| e.path.contains(call) || e.path.contains(reference))
        .map(|e| format!("{} {} {}", e.method, e.path, e.status))
        .collect()
}

/// Counts the requests of one verified call, so that a request added per call fails here. How many
/// prompts and hold-music changes a call has depends on timing (a progress prompt may be skipped or cut
/// short), so those are counted apart; everything else is fixed: answer, the metadata and the safety-net
/// timeout in one request, continue. Routes are checked once per connection: only the first call after
/// the connect makes that request.
#[tokio::test]
async fn a_verified_call_makes_three_ari_requests_besides_its_prompts_and_checks_routes_once() {
    let mut lab = lab(LabOptions::fast()).await;
    // The events no call acts on are filtered out by Asterisk, after the connect. `ChannelVarset`
    // stays: the lab has anchored queues, which learn their agent from `MEMBERINTERFACE`.
    until("the event filter", || {
        let ignored = lab.asterisk.disallowed_events();
        ignored.contains("PlaybackStarted") && !ignored.contains("ChannelVarset")
    })
    .await;
    let mut calls = Vec::new();
    for serial in [301, 302] {
        let (report, end) = lab
            .run_call(lab.caller_typing(&person(serial)))
            .await
            .unwrap();
        assert_eq!(report.outcome, Outcome::Verified);
        assert_eq!(route(&end), "queues,support,1");
        assert_eq!(var(&end, "TIMEOUT(absolute)"), "0");
        assert_eq!(var(&end, "CALLGATE_STATUS"), "verified");
        calls.push(requests_of(&lab, &report.call_id, &report.reference));
    }
    let media =
        |e: &String| e.contains("/play/") || e.contains("/playbacks/") || e.contains("/moh ");
    let others = |r: &[String]| -> Vec<String> {
        r.iter()
            .filter(|e| !media(e))
            .map(|e| {
                let mut parts = e.split(' ');
                let method = parts.next().unwrap_or_default();
                let last = parts
                    .next()
                    .unwrap_or_default()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default();
                format!("{method} {last}")
            })
            .collect()
    };
    let [first, second] = &calls[..] else {
        unreachable!()
    };
    assert_eq!(
        others(first),
        [
            "POST answer",
            "POST variables",
            "GET variable",
            "POST continue"
        ],
        "{first:#?}"
    );
    assert_eq!(
        others(second),
        ["POST answer", "POST variables", "POST continue"],
        "{second:#?}"
    );
    // enter-number, open-app, hold music, stop it, the announcement; more with progress prompts.
    let prompts = second.iter().filter(|e| media(e)).count();
    assert!(prompts >= 5, "{second:#?}");
    lab.shutdown().await.unwrap();
}

// ---- agent API ----

/// The agent API listens next to the ops API, answers with the lab's tokens, and a live stream left
/// open does not hold up the drain: it ends with it.
#[tokio::test]
async fn the_agent_api_serves_tokens_and_its_streams_end_with_the_drain() {
    const LEAD: &str = "lab-supervisor-token-0123";
    let options = LabOptions {
        api_tokens: vec![demo::LabToken {
            name: "lead".into(),
            token: LEAD.into(),
            role: callgate::config::Role::Supervisor,
            agent: None,
        }],
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    let addr = lab.app.api_addr;
    assert_ne!(addr, lab.app.ops_addr);
    let (status, body) = http(addr, "GET", "/v1/calls").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"unauthorized\""), "{body}");

    let request = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {LEAD}\r\nConnection: close\r\n\r\n"
        )
    };
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request("/v1/calls").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("{\"calls\":[]}"), "{text}");

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(request("/v1/events").as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("event: snapshot_complete") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("no snapshot_complete on the stream")
            .unwrap();
        assert!(n > 0, "the stream closed early");
        seen.extend_from_slice(&chunk[..n]);
    }
    tokio::time::timeout(Duration::from_secs(30), lab.shutdown())
        .await
        .expect("an open stream held up the drain")
        .unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut seen))
        .await
        .expect("the stream stayed open after the drain");
    assert!(rest.is_ok());
}

async fn api_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A number an agent types reaches the call as a `TypedNumber` and nothing else: not the logs (at
/// trace level, the HTTP server's included), not an answer, not an error about a misplaced number.
#[tokio::test]
async fn a_number_typed_through_the_agent_api_reaches_no_log_and_no_answer() {
    use callgate::calls::live::{CallState, CallView, LiveKind};
    use callgate::calls::registry::Handle;
    use callgate::calls::{CallEvent, Snapshot};

    const AGENT: &str = "lab-agent-token-1001-abcdef";
    let number = person(777);
    let options = LabOptions {
        api_tokens: vec![demo::LabToken {
            name: "desk-1001".into(),
            token: AGENT.into(),
            role: callgate::config::Role::Agent,
            agent: Some("PJSIP/1001".into()),
        }],
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    // A call with the agent, answered by a stand-in for its task.
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let (_snapshot_tx, snapshot) = tokio::sync::watch::channel(Snapshot {
        call_id: "api-call-1".into(),
        queue: "support".into(),
        reference: String::new(),
        stage: None,
        outcome: None,
        started_at: std::time::SystemTime::UNIX_EPOCH,
    });
    let entry = lab
        .app
        .registry
        .insert(
            "api-call-1",
            Handle {
                inbox: tx,
                snapshot,
                cancel: tokio_util::sync::CancellationToken::new(),
            },
        )
        .unwrap();
    let typed = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&typed);
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            if let CallEvent::StartCheck(req) = event {
                seen.lock().unwrap().push(req.number.map(|n| n.0));
                let _ = req.reply.send(Ok("v-api-1".into()));
            }
        }
    });
    lab.app.live.publish(
        LiveKind::AgentConnected,
        CallView {
            call_id: "api-call-1".into(),
            queue: "support".into(),
            state: CallState::Talking,
            agent: Some("PJSIP/1001".into()),
            aliases: vec![],
            started_at: std::time::SystemTime::UNIX_EPOCH,
            can_verify: true,
            verification: None,
            keypad: true,
            owner: None,
        },
    );
    let addr = lab.app.api_addr;
    let path = "/v1/calls/api-call-1/verifications";
    let mut answers = Vec::new();
    let (status, text) = api_request(
        addr,
        "POST",
        path,
        AGENT,
        &format!(r#"{{"number":"{number}"}}"#),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    answers.push(text);
    for (path, body) in [
        (
            format!("{path}?number={number}"),
            r#"{"collect":"keypad"}"#.to_owned(),
        ),
        (path.to_owned(), format!(r#"{{"number":{number}}}"#)),
        (path.to_owned(), format!(r#"{{"number":"{number}","x":1}}"#)),
    ] {
        let (status, text) = api_request(addr, "POST", &path, AGENT, &body).await;
        assert_eq!(status, 422, "{text}");
        answers.push(text);
    }
    assert_eq!(*typed.lock().unwrap(), [Some(number.clone())]);
    let logs = captured();
    assert!(
        logs.contains("route=\"/v1/calls/{id}/verifications\" token=\"desk-1001\""),
        "the requests were not traced"
    );
    for form in [number.as_str(), &number[2..]] {
        assert!(!logs.contains(form), "a typed number reached the logs");
        for a in &answers {
            assert!(!a.contains(form), "a typed number reached an answer");
        }
    }
    // The stand-in call ends, so the drain has nothing to wait for.
    drop(entry);
    lab.shutdown().await.unwrap();
}

// ---- anchored calls: agents verify during the call ----

/// Asks a call for a check as the agent API does; the verification id or why not.
async fn start_check(lab: &Lab, call: &str, number: Option<&str>) -> Result<String, Refusal> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = CheckRequest {
        by: StartedBy::Api("test".into()),
        number: number.map(|n| TypedNumber(n.to_owned())),
        reply,
    };
    assert!(
        lab.app
            .registry
            .send(call, CallEvent::StartCheck(request))
            .await,
        "call {call} is not live"
    );
    answer.await.unwrap()
}

async fn cancel_check(lab: &Lab, call: &str) -> Result<String, Refusal> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = CancelRequest {
        by: StartedBy::Api("test".into()),
        reply,
    };
    assert!(
        lab.app
            .registry
            .send(call, CallEvent::CancelCheck(request))
            .await
    );
    answer.await.unwrap()
}

async fn talking(lab: &Lab, call: &str) {
    assert_eq!(
        lab.asterisk.wait_for_agent(call).await.as_deref(),
        Some(demo::LAB_AGENT)
    );
    until("the call to be talking", || {
        lab.app
            .live
            .call(call)
            .is_some_and(|c| c.state == CallState::Talking && c.can_verify)
    })
    .await;
}

async fn check_over(lab: &Lab, id: &str) -> Outcome {
    until("the check to end", || {
        lab.app
            .live
            .verification(id)
            .is_some_and(|v| v.outcome.is_some())
    })
    .await;
    lab.app.live.verification(id).unwrap().outcome.unwrap()
}

/// Nothing of the call is left: no bridge, no agent leg, no task.
async fn all_gone(lab: &Lab, call: &str) {
    lab.asterisk
        .wait_for_bridge_gone(&asterisk::bridge_id(call))
        .await;
    until("the agent leg to end", || {
        lab.asterisk.agent_leg(call).is_none_or(|l| l.ended)
    })
    .await;
    until("the call task to end", || !lab.app.registry.contains(call)).await;
    assert!(
        lab.asterisk.bridges().is_empty(),
        "{:?}",
        lab.asterisk.bridges()
    );
    no_open_orders(lab).await;
}

#[tokio::test]
async fn a_gated_caller_is_bridged_with_an_agent_who_verifies_them_again_on_the_keypad() {
    let mut lab = lab(LabOptions::fast()).await;
    let mut stream = lab.app.live.subscribe();
    let number = person(401);
    let id = lab.asterisk.call(lab.caller_typing(&number).queue("care"));
    let gate = lab.report(&id).await.unwrap();
    assert_eq!(gate.outcome, Outcome::Verified);
    assert_eq!(gate.destination.to_string(), "agent");
    talking(&lab, &id).await;

    // The agent leg: a Local channel into the agent context, on behalf of the caller, no timeout,
    // carrying the gate's result; both sides' keys absorbed by the bridge.
    let leg = lab.asterisk.agent_leg(&id).unwrap();
    let origination = lab
        .asterisk
        .originations()
        .into_iter()
        .find(|o| o.channel_id == leg.a)
        .unwrap();
    assert_eq!(origination.params["endpoint"], "Local/care@agents/n");
    assert_eq!(origination.params["originator"], id);
    assert_eq!(origination.params["timeout"], "-1");
    assert_eq!(origination.params["appArgs"], format!("agent,{id}"));
    assert!(origination.params["callerId"].contains("46701234567"));
    assert_eq!(
        lab.asterisk
            .channel_var(&leg.b, "CALLGATE_STATUS")
            .as_deref(),
        Some("verified")
    );
    assert_eq!(lab.asterisk.bridge_of(&id), lab.asterisk.bridge_of(&leg.a));
    assert!(lab.asterisk.absorbs_dtmf(&id) && lab.asterisk.absorbs_dtmf(&leg.a));
    assert!(
        lab.asterisk
            .channel_var(&id, "TIMEOUT(absolute)")
            .as_deref()
            == Some("0"),
        "the gate's safety net is cleared for the conversation"
    );

    // The agent asks for a keypad check: the caller is muted towards the bridge while typing.
    let check = start_check(&lab, &id, None).await.unwrap();
    until("the caller to be muted", || {
        lab.asterisk.is_muted(&id, Direction::In)
    })
    .await;
    assert!(
        lab.asterisk
            .press(&id, &format!("{number}#"), lab.options.key_gap)
            .await
    );
    assert_eq!(check_over(&lab, &check).await, Outcome::Verified);
    assert!(!lab.asterisk.is_muted(&id, Direction::In));
    let view = lab.app.live.verification(&check).unwrap();
    assert_eq!(view.method, CheckMethod::Keypad);
    let stages: Vec<&str> = view.stages.iter().map(|(s, _)| s.code()).collect();
    assert!(stages.starts_with(&["order_created"]), "{stages:?}");
    let fields: std::collections::BTreeMap<_, _> = view.fields.iter().cloned().collect();
    assert_eq!(fields["status"], "verified");
    assert_eq!(fields["ref"], check);
    assert!(fields.contains_key("name") && fields.contains_key("number_masked"));
    assert!(
        !fields.contains_key("number"),
        "not disclosed in this queue"
    );
    // The result is on the caller (inheritable) and on the agent leg.
    until("the result on both legs", || {
        lab.asterisk.channel_var(&id, "__CALLGATE_REF").as_deref() == Some(check.as_str())
            && lab.asterisk.channel_var(&leg.a, "CALLGATE_REF").as_deref() == Some(check.as_str())
    })
    .await;

    // The caller hangs up: the agent leg and the bridge go with them.
    lab.asterisk.hang_up(&id);
    all_gone(&lab, &id).await;

    let mut kinds = Vec::new();
    while let Ok(e) = stream.try_recv() {
        if e.call.call_id == id {
            kinds.push(e.kind);
        }
    }
    let first = |k: LiveKind| kinds.iter().position(|x| *x == k).unwrap();
    assert_eq!(kinds.first(), Some(&LiveKind::CallStarted));
    assert_eq!(kinds.last(), Some(&LiveKind::CallEnded));
    assert!(first(LiveKind::Completed) < first(LiveKind::AgentConnected));
    assert_eq!(
        kinds.iter().filter(|k| **k == LiveKind::Completed).count(),
        2,
        "{kinds:?}"
    );
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_agent_with_a_desk_phone_starts_a_check_with_keys_and_hears_the_outcome() {
    let lab = lab(LabOptions::fast()).await;
    let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    talking(&lab, &id).await;
    // In a queue without the gate nothing is set on the agent leg.
    let leg = lab.asterisk.agent_leg(&id).unwrap();
    assert_eq!(lab.asterisk.channel_var(&leg.b, "CALLGATE_STATUS"), None);
    assert!(
        lab.asterisk
            .agent_press(&id, "*5", lab.options.key_gap)
            .await
    );
    until("the caller to be muted", || {
        lab.asterisk.is_muted(&id, Direction::In)
    })
    .await;
    let check = lab.app.live.call(&id).unwrap().verification.unwrap();
    assert_eq!(check.started_by, StartedBy::AgentKeys);
    let number = Lab::number(Scenario::DeclinesCall);
    assert!(
        lab.asterisk
            .press(&id, &format!("{number}#"), lab.options.key_gap)
            .await
    );
    assert_eq!(
        check_over(&lab, &check.id).await,
        Outcome::NotVerified(Reason::DeclinedCall)
    );
    until("the agent to hear the fraud warning", || {
        lab.asterisk
            .media_started(&leg.a)
            .iter()
            .any(|m| m.contains("agent-fraud"))
    })
    .await;
    assert!(
        !lab.asterisk
            .media_started(&id)
            .iter()
            .any(|m| m.contains("agent-")),
        "the outcome is for the agent only"
    );
    // The agent hangs up; this queue has no after_agent route: the caller is hung up.
    lab.asterisk.agent_hang_up(&id);
    let end = lab.asterisk.wait_for_channel_end(&id).await;
    assert_eq!(route(&end), "");
    all_gone(&lab, &id).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_new_check_supersedes_the_running_one_and_the_agent_can_cancel() {
    let mut options = LabOptions::fast();
    options.step = Duration::from_millis(400);
    let lab = lab(options).await;
    let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    talking(&lab, &id).await;
    assert_eq!(
        start_check(&lab, &id, Some("123")).await,
        Err(Refusal::InvalidNumber)
    );
    let slow = Lab::number(Scenario::Expires);
    let first = start_check(&lab, &id, Some(&slow)).await.unwrap();
    until("the first order", || {
        lab.app
            .live
            .verification(&first)
            .is_some_and(|v| !v.stages.is_empty())
    })
    .await;
    let second = start_check(&lab, &id, Some(&slow)).await.unwrap();
    assert_eq!(
        check_over(&lab, &first).await,
        Outcome::NotVerified(Reason::Superseded)
    );
    assert_eq!(cancel_check(&lab, &id).await, Ok(second.clone()));
    assert_eq!(
        check_over(&lab, &second).await,
        Outcome::NotVerified(Reason::AgentCancelled)
    );
    assert_eq!(cancel_check(&lab, &id).await, Err(Refusal::NothingToCancel));
    no_open_orders(&lab).await;
    // The agent hangs up first: the caller goes to the queue's after_agent route… which `desk`
    // lacks, so check with `care`'s in the next test; here the caller hangs up.
    lab.asterisk.hang_up(&id);
    all_gone(&lab, &id).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_agent_hangs_up_first_and_the_caller_takes_the_after_agent_route() {
    let mut lab = lab(LabOptions::fast()).await;
    let id = lab
        .asterisk
        .call(lab.caller_typing(&person(402)).queue("care"));
    talking(&lab, &id).await;
    lab.asterisk.agent_hang_up(&id);
    let end = lab.asterisk.wait_for_channel_end(&id).await;
    assert_eq!(route(&end), "queues,care-survey,1");
    assert_eq!(var(&end, "CALLGATE_STATUS"), "verified");
    all_gone(&lab, &id).await;
    assert_eq!(lab.report(&id).await.unwrap().outcome, Outcome::Verified);
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn no_agent_answers_and_the_caller_takes_the_no_agent_route() {
    let mut options = LabOptions::fast();
    options.agents_closed = true;
    let lab = lab(options).await;
    let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    assert_eq!(lab.asterisk.wait_for_agent(&id).await, None);
    let end = lab.asterisk.wait_for_channel_end(&id).await;
    assert_eq!(route(&end), "queues,care-noagent,1");
    all_gone(&lab, &id).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_check_on_a_call_still_in_the_gate_is_refused() {
    let lab = lab(LabOptions::fast()).await;
    let id = lab
        .asterisk
        .call(Caller::new("46701234567").queue("care").await_prompt());
    until("the call task", || lab.app.registry.contains(&id)).await;
    assert_eq!(
        start_check(&lab, &id, None).await,
        Err(Refusal::NotAnchored)
    );
    lab.asterisk.hang_up(&id);
    until("the call task to end", || !lab.app.registry.contains(&id)).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restart_leaves_bridged_calls_running_and_adopts_them() {
    let mut lab = lab(LabOptions::fast()).await;
    let number = person(403);
    let id = lab.asterisk.call(lab.caller_typing(&number).queue("care"));
    talking(&lab, &id).await;
    let leg = lab.asterisk.agent_leg(&id).unwrap();
    lab.restart().await.unwrap();
    // Never cut: still bridged with the same agent leg, and ours again.
    assert_eq!(lab.asterisk.bridge_of(&id), Some(asterisk::bridge_id(&id)));
    assert!(!lab.asterisk.agent_leg(&id).unwrap().ended);
    assert_eq!(
        lab.asterisk.bridge_of(&leg.a),
        Some(asterisk::bridge_id(&id))
    );
    until("the call to be adopted", || {
        lab.app.live.call(&id).is_some_and(|c| {
            c.state == CallState::Talking && c.agent.as_deref() == Some(demo::LAB_AGENT)
        })
    })
    .await;
    let check = start_check(&lab, &id, Some(&number)).await.unwrap();
    assert_eq!(check_over(&lab, &check).await, Outcome::Verified);
    lab.asterisk.hang_up(&id);
    all_gone(&lab, &id).await;
    lab.shutdown().await.unwrap();
}

// ---- the agent API on anchored calls ----

/// A live stream read over HTTP/1.0 (no chunking), for events in the order they came.
struct RawStream {
    socket: tokio::net::TcpStream,
    text: String,
    /// How far events were taken.
    read: usize,
}

impl RawStream {
    async fn open(addr: SocketAddr, path: &str, token: &str) -> RawStream {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n");
        socket.write_all(req.as_bytes()).await.unwrap();
        RawStream {
            socket,
            text: String::new(),
            read: 0,
        }
    }

    /// The next event (name, data).
    async fn next(&mut self) -> (String, serde_json::Value) {
        loop {
            let rest = &self.text[self.read..];
            if let Some(start) = rest.find("event: ") {
                if let Some(len) = rest[start..].find("\n\n") {
                    let block = &rest[start..start + len];
                    self.read += start + len + 2;
                    let mut name = String::new();
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event: ") {
                            name = v.to_owned();
                        } else if let Some(v) = line.strip_prefix("data: ") {
                            data.push_str(v);
                        }
                    }
                    return (name, serde_json::from_str(&data).unwrap());
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(20), self.socket.read(&mut chunk))
                .await
                .expect("no event on the stream")
                .unwrap();
            assert!(n > 0, "the stream ended; so far:\n{}", self.text);
            self.text.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }

    /// Events up to and including `name`; the names of those skipped.
    async fn until(&mut self, name: &str) -> (Vec<String>, serde_json::Value) {
        let mut skipped = Vec::new();
        loop {
            let (got, data) = self.next().await;
            if got == name {
                return (skipped, data);
            }
            skipped.push(got);
        }
    }
}

/// The agent who answered a call starts a keypad check through the API, watches it on the live
/// stream to the fraud warning and reads the result after the call; another agent sees nothing.
#[tokio::test]
async fn an_agent_verifies_a_caller_through_the_api_and_watches_the_stream() {
    const MINE: &str = "lab-agent-token-answering-1";
    const OTHER: &str = "lab-agent-token-elsewhere-2";
    let options = LabOptions {
        api_tokens: vec![
            demo::LabToken {
                name: "desk-agent1".into(),
                token: MINE.into(),
                role: callgate::config::Role::Agent,
                agent: Some(demo::LAB_AGENT.into()),
            },
            demo::LabToken {
                name: "desk-other".into(),
                token: OTHER.into(),
                role: callgate::config::Role::Agent,
                agent: Some("PJSIP/nobody".into()),
            },
        ],
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    let addr = lab.app.api_addr;
    let mut mine = RawStream::open(addr, "/v1/events", MINE).await;
    assert_eq!(mine.until("snapshot_complete").await.1["calls"], 0);
    let mut other = RawStream::open(addr, "/v1/events", OTHER).await;
    other.until("snapshot_complete").await;

    let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    talking(&lab, &id).await;
    let (skipped, call) = mine.until("agent_connected").await;
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(call["call_id"], id.as_str());
    assert_eq!(call["agent"], demo::LAB_AGENT);
    assert_eq!(call["state"], "talking");
    assert_eq!(call["keypad"], true);

    let path = format!("/v1/calls/{id}/verifications");
    let (status, text) = api_request(addr, "POST", &path, OTHER, r#"{"collect":"keypad"}"#).await;
    assert_eq!(status, 403, "{text}");
    let (status, text) = api_request(addr, "POST", &path, MINE, r#"{"collect":"keypad"}"#).await;
    assert_eq!(status, 202, "{text}");
    let body = text.split_once("\r\n\r\n").unwrap().1;
    let accepted: serde_json::Value = serde_json::from_str(body).unwrap();
    let check = accepted["verification_id"].as_str().unwrap().to_owned();

    until("the caller to be muted", || {
        lab.asterisk.is_muted(&id, Direction::In)
    })
    .await;
    let number = Lab::number(Scenario::DeclinesCall);
    assert!(
        lab.asterisk
            .press(&id, &format!("{number}#"), lab.options.key_gap)
            .await
    );
    let (progress, done) = mine.until("verification_completed").await;
    assert!(
        !progress.is_empty() && progress.iter().all(|e| e == "verification_progress"),
        "{progress:?}"
    );
    let v = &done["verification"];
    assert_eq!(v["verification_id"], check.as_str());
    assert_eq!(v["method"], "keypad");
    assert_eq!(v["started_by"], "api:desk-agent1");
    assert_eq!(v["reason"], "declined_call");
    let (skipped, fraud) = mine.until("fraud_warning").await;
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(fraud["verification"]["fraud"], true);

    lab.asterisk.hang_up(&id);
    all_gone(&lab, &id).await;
    mine.until("call_ended").await;
    let (status, text) = http(addr, "GET", &format!("/v1/calls/{id}")).await;
    assert_eq!(status, 401, "{text}");
    let (status, text) =
        api_request(addr, "GET", &format!("/v1/verifications/{check}"), MINE, "").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"fraud\":true"), "{text}");
    let (status, _) = api_request(
        addr,
        "GET",
        &format!("/v1/verifications/{check}"),
        OTHER,
        "",
    )
    .await;
    assert_eq!(status, 403);
    // The other agent's stream saw none of it.
    drop(mine);
    lab.shutdown().await.unwrap();
    let mut rest = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        other.socket.read_to_string(&mut rest),
    )
    .await
    .expect("the stream stayed open after the drain");
    other.text.push_str(&rest);
    assert!(
        !other.text[other.read..].contains("event: "),
        "{}",
        other.text
    );
}

// ---- webhooks ----

/// Requests a [`Crm`] received: signature header and body.
type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A CRM's webhook endpoint on 127.0.0.1: keeps every request, answers 204.
struct Crm {
    url: String,
    seen: Requests,
    count: tokio::sync::watch::Sender<usize>,
}

impl Crm {
    async fn start() -> Crm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/callgate", listener.local_addr().unwrap());
        let seen: Requests = Arc::default();
        let (count, _) = tokio::sync::watch::channel(0usize);
        let (s, c) = (Arc::clone(&seen), count.clone());
        let app = axum::Router::new().route(
            "/hooks/callgate",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                    let sig = headers
                        .get(callgate::webhooks::SIGNATURE_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    s.lock().unwrap().push((sig, body.to_vec()));
                    c.send_modify(|n| *n += 1);
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Crm { url, seen, count }
    }

    /// Waits until an event of `kind` for `call` arrived; returns its body, after checking its
    /// signature as a receiver would.
    async fn event(&self, kind: &str, call: &str) -> serde_json::Value {
        let mut rx = self.count.subscribe();
        let find = || {
            self.seen.lock().unwrap().iter().find_map(|(sig, body)| {
                let v: serde_json::Value = serde_json::from_slice(body).unwrap();
                (v["type"] == kind && v["call"]["call_id"] == call)
                    .then(|| (sig.clone(), body.clone(), v))
            })
        };
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(f) = find() {
                    return f;
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind} webhook for {call}"));
        let (sig, body, v) = found;
        #[allow(clippy::disallowed_methods)] // test clock
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            callgate::webhooks::verify(demo::LAB_WEBHOOK_SECRET.as_bytes(), &sig, &body, now, 300),
            "bad signature {sig}"
        );
        v
    }
}

#[tokio::test]
async fn crms_get_signed_webhooks_with_exactly_the_fields_the_queue_discloses() {
    let crm = Crm::start().await;
    let options = LabOptions {
        webhook_url: Some(crm.url.clone()),
        ..LabOptions::fast()
    };
    let mut lab = lab(options).await;
    let n = person(230);
    let (report, _) = lab.run_call(lab.caller_typing(&n)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Verified);
    let declined = Lab::number(Scenario::DeclinesCall);
    let (fraud_report, _) = lab.run_call(lab.caller_typing(&declined)).await.unwrap();
    assert_eq!(
        fraud_report.outcome,
        Outcome::NotVerified(Reason::DeclinedCall)
    );

    // Verified: the queue `support` discloses name and masked number, so exactly those appear.
    let v = crm.event("verification_completed", &report.call_id).await;
    assert_eq!(v["version"], 1);
    assert!(v["occurred_at"].as_str().unwrap().ends_with('Z'));
    let check = &v["verification"];
    assert_eq!(check["verification_id"], report.reference.as_str());
    assert_eq!(check["status"], "verified");
    assert_eq!(check["queue"], "support");
    assert_eq!(v["call"]["verification"], *check);
    let mut keys: Vec<&str> = check["fields"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "at",
            "method",
            "name",
            "number_masked",
            "reason",
            "ref",
            "status"
        ]
    );
    assert!(check["fields"]["number_masked"]
        .as_str()
        .unwrap()
        .ends_with("-****"));

    // Declined: the completion, then a fraud warning, with status fields only.
    let done = crm
        .event("verification_completed", &fraud_report.call_id)
        .await;
    let warning = crm.event("fraud_warning", &fraud_report.call_id).await;
    assert_ne!(done["id"], warning["id"]);
    for v in [&done, &warning] {
        let check = &v["verification"];
        assert_eq!(check["reason"], "declined_call");
        assert_eq!(check["fraud"], true);
        let mut keys: Vec<&str> = check["fields"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(keys, ["at", "method", "reason", "ref", "status"]);
    }
    let ended = crm.event("call_ended", &report.call_id).await;
    assert_eq!(ended["call"]["state"], "ended");

    // No personal number in any body.
    let short = &n[2..];
    let short_declined = &declined[2..];
    for (_, body) in crm.seen.lock().unwrap().iter() {
        let text = String::from_utf8_lossy(body);
        assert!(!text.contains(short) && !text.contains(short_declined));
    }
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_check_during_the_call_reaches_the_crm_with_the_queues_fields() {
    let crm = Crm::start().await;
    let options = LabOptions {
        webhook_url: Some(crm.url.clone()),
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    talking(&lab, &id).await;
    assert!(
        lab.asterisk
            .agent_press(&id, "*5", lab.options.key_gap)
            .await
    );
    until("the caller to be muted", || {
        lab.asterisk.is_muted(&id, Direction::In)
    })
    .await;
    let check = lab.app.live.call(&id).unwrap().verification.unwrap();
    let n = person(231);
    assert!(
        lab.asterisk
            .press(&id, &format!("{n}#"), lab.options.key_gap)
            .await
    );
    assert_eq!(check_over(&lab, &check.id).await, Outcome::Verified);
    let v = crm.event("verification_completed", &id).await;
    let got = &v["verification"];
    assert_eq!(got["verification_id"], check.id.as_str());
    assert_eq!(got["started_by"], "agent_keys");
    assert_eq!(got["method"], "keypad");
    assert_eq!(v["call"]["state"], "talking");
    // The queue `desk` discloses the name only.
    let mut keys: Vec<&str> = got["fields"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["at", "method", "name", "reason", "ref", "status"]);
    lab.shutdown().await.unwrap();
}

// ---- abuse limits ----

const LEAD_TOKEN: &str = "lab-supervisor-token-limits-0";

fn lead() -> demo::LabToken {
    demo::LabToken {
        name: "lead".into(),
        token: LEAD_TOKEN.into(),
        role: callgate::config::Role::Supervisor,
        agent: None,
    }
}

/// `GET /v1/verifications/{id}` as JSON.
async fn verification_json(addr: SocketAddr, id: &str, token: &str) -> serde_json::Value {
    let (status, text) =
        api_request(addr, "GET", &format!("/v1/verifications/{id}"), token, "").await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
}

/// The person says "not me" in their app; a new call for the same number right after is refused by
/// the cool-down: no order reaches their phone, the caller hears `rate-limited`, the agent API names
/// the limit.
#[tokio::test]
async fn a_declined_call_cools_the_number_down_and_the_retry_hears_rate_limited() {
    let options = LabOptions {
        api_tokens: vec![lead()],
        ..LabOptions::fast()
    };
    let mut lab = lab(options).await;
    let number = Lab::number(Scenario::DeclinesCall);
    let (first, end) = lab.run_call(lab.caller_typing(&number)).await.unwrap();
    assert_eq!(first.outcome, Outcome::NotVerified(Reason::DeclinedCall));
    assert_eq!(route(&end), "queues,fraud-desk,1");
    let orders = lab.bankid.starts();

    let id = lab.asterisk.call(lab.caller_typing(&number));
    let report = lab.report(&id).await.unwrap();
    let end = lab.asterisk.wait_for_channel_end(&id).await;
    assert_eq!(report.outcome, Outcome::NotVerified(Reason::RateLimited));
    assert_eq!(var(&end, "CALLGATE_STATUS"), "failed");
    assert_eq!(var(&end, "CALLGATE_REASON"), "rate_limited");
    assert_eq!(route(&end), "queues,support-unverified,1");
    let media = lab.asterisk.media_started(&id);
    assert!(
        media.iter().any(|m| m == "sound:callgate/rate-limited"),
        "{media:?}"
    );
    assert!(
        !media
            .iter()
            .any(|m| m == "sound:callgate/not-verified" || m == "sound:callgate/open-app"),
        "{media:?}"
    );
    assert_eq!(lab.bankid.starts(), orders, "an order reached the phone");

    let v = verification_json(lab.app.api_addr, var(&end, "CALLGATE_REF"), LEAD_TOKEN).await;
    assert_eq!(v["status"], "failed");
    assert_eq!(v["reason"], "rate_limited");
    assert_eq!(v["limit"], "cool_down");
    assert_eq!(v["fields"]["reason"], "rate_limited");
    assert!(captured().contains("limit=\"cool_down\""));
    let (_, metrics) = http(lab.app.ops_addr, "GET", "/metrics").await;
    assert!(
        metrics.contains(r#"callgate_limit_refusals_total{queue="support",limit="cool_down"} 1"#),
        "{metrics}"
    );

    // Another person is not affected.
    let (other, _) = lab.run_call(lab.caller_typing(&person(330))).await.unwrap();
    assert_eq!(other.outcome, Outcome::Verified);
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

/// An agent over their hourly allowance of checks gets `202` (the check is accepted like any other),
/// then the verification ends `failed/rate_limited` with `limit: "per_agent"`, on REST and the stream.
#[tokio::test]
async fn an_agent_over_their_hourly_checks_gets_rate_limited_with_the_limit_named() {
    const MINE: &str = "lab-agent-token-limited-01";
    let options = LabOptions {
        api_tokens: vec![demo::LabToken {
            name: "desk-agent1".into(),
            token: MINE.into(),
            role: callgate::config::Role::Agent,
            agent: Some(demo::LAB_AGENT.into()),
        }],
        limits: vec![("max_checks_per_agent_per_hour".into(), "1".into())],
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    let addr = lab.app.api_addr;
    let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    talking(&lab, &id).await;
    let mut stream = RawStream::open(addr, &format!("/v1/calls/{id}/events"), MINE).await;
    stream.until("snapshot").await;
    let path = format!("/v1/calls/{id}/verifications");
    let start = async |number: &str| {
        let (status, text) = api_request(
            addr,
            "POST",
            &path,
            MINE,
            &format!(r#"{{"number":"{number}"}}"#),
        )
        .await;
        assert_eq!(status, 202, "{text}");
        let body: serde_json::Value =
            serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
        body["verification_id"].as_str().unwrap().to_owned()
    };
    let first = start(&person(340)).await;
    assert_eq!(check_over(&lab, &first).await, Outcome::Verified);
    let (_, done) = stream.until("verification_completed").await;
    assert_eq!(done["verification"]["limit"], serde_json::Value::Null);
    let orders = lab.bankid.starts();

    let second = start(&person(341)).await;
    assert_eq!(
        check_over(&lab, &second).await,
        Outcome::NotVerified(Reason::RateLimited)
    );
    assert_eq!(lab.bankid.starts(), orders, "an order reached the phone");
    let (_, done) = stream.until("verification_completed").await;
    let v = &done["verification"];
    assert_eq!(v["verification_id"], second.as_str());
    assert_eq!(v["reason"], "rate_limited");
    assert_eq!(v["limit"], "per_agent");
    let v = verification_json(addr, &second, MINE).await;
    assert_eq!(
        (v["reason"].as_str(), v["limit"].as_str()),
        (Some("rate_limited"), Some("per_agent"))
    );
    assert_eq!(
        lab.asterisk.channel_var(&id, "CALLGATE_REASON").as_deref(),
        Some("rate_limited")
    );
    // The number was typed by the agent: nothing is played to the caller.
    assert!(!lab
        .asterisk
        .media_started(&id)
        .iter()
        .any(|m| m == "sound:callgate/rate-limited"));
    lab.asterisk.hang_up(&id);
    all_gone(&lab, &id).await;
    lab.shutdown().await.unwrap();
}

// ---- one record on every surface: what each disclose setting shows where ----

/// What one surface shows of a verification: field name (lower case, without `CALLGATE_`, as the
/// REST API names them) → value.
type Shown = std::collections::BTreeMap<String, String>;

/// The fields every surface shows whatever the policy: the result without identity.
const ALWAYS: [&str; 5] = ["status", "reason", "ref", "method", "at"];

/// What each surface showed of the gate call `call` (already ended): `channel` (the variables the
/// fake Asterisk recorded), `rest` (`GET /v1/verifications/{id}`), `stream` (its
/// `verification_completed` event on `/v1/events`). The audit line is returned apart: it is not
/// rendered by policy. Further surfaces (webhook bodies, the hash-chained audit trail) belong here
/// as more entries of the map, checked by the same table.
async fn surfaces_of_a_gate_call(
    lab: &Lab,
    call: &str,
    stream: &mut RawStream,
    crm: &Crm,
) -> (
    std::collections::BTreeMap<&'static str, Shown>,
    serde_json::Value,
) {
    let end = lab.asterisk.wait_for_channel_end(call).await;
    let channel: Shown = end
        .variables
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("CALLGATE_")
                .map(|n| (n.to_ascii_lowercase(), v.clone()))
        })
        .collect();
    let reference = var(&end, "CALLGATE_REF").to_owned();
    let as_shown = |fields: &serde_json::Value| -> Shown {
        fields
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect()
    };
    let rest = verification_json(lab.app.api_addr, &reference, LEAD_TOKEN).await;
    let streamed = loop {
        let (_, event) = stream.until("verification_completed").await;
        if event["verification"]["verification_id"] == reference.as_str() {
            break event;
        }
    };
    let audit_dir = lab.app.audit_dir.clone();
    let record_of = |text: &str| -> Option<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|r| r["kind"] == "verification" && r["reference"] == reference.as_str())
    };
    until("the audit record", || {
        record_of(&audit_text(&audit_dir)).is_some()
    })
    .await;
    let audit = record_of(&audit_text(&audit_dir)).unwrap();
    let hook = crm.event("verification_completed", call).await;
    let surfaces = [
        ("channel", channel),
        ("rest", as_shown(&rest["fields"])),
        ("stream", as_shown(&streamed["verification"]["fields"])),
        ("webhook", as_shown(&hook["verification"]["fields"])),
    ]
    .into_iter()
    .collect();
    (surfaces, audit)
}

/// For each `disclose` setting, exactly the fields it allows appear on every surface, with the same
/// values; a failed check shows none, even with an identity and every field allowed; the audit line
/// holds the pseudonym of a verified person and never a number or a name, whatever the setting.
#[tokio::test]
async fn each_disclose_setting_shows_exactly_its_fields_on_every_surface() {
    use callgate::pnr::{PersonalNumber, PseudonymKey};
    let key = PseudonymKey::new(b"lab-pseudonym-key-0123456789abcdef".to_vec());
    let cases: [(&str, &[&str]); 6] = [
        ("[]", &[]),
        (r#"["name"]"#, &["name"]),
        (r#"["pseudonym"]"#, &["pseudonym"]),
        (r#"["masked_number"]"#, &["number_masked"]),
        (r#"["number"]"#, &["number"]),
        (
            r#"["name", "pseudonym", "masked_number", "number"]"#,
            &["name", "pseudonym", "number_masked", "number"],
        ),
    ];
    for (serial, (disclose, extra)) in (350u16..).zip(cases) {
        let crm = Crm::start().await;
        let options = LabOptions {
            api_tokens: vec![lead()],
            disclose: disclose.to_owned(),
            webhook_url: Some(crm.url.clone()),
            ..LabOptions::fast()
        };
        let mut lab = lab(options).await;
        let mut stream = RawStream::open(lab.app.api_addr, "/v1/events", LEAD_TOKEN).await;
        stream.until("snapshot_complete").await;
        let number = person(serial);
        let parsed = PersonalNumber::parse_swedish_12(&number).unwrap();
        let (report, _) = lab.run_call(lab.caller_typing(&number)).await.unwrap();
        assert_eq!(report.outcome, Outcome::Verified, "{disclose}");
        let (surfaces, audit) =
            surfaces_of_a_gate_call(&lab, &report.call_id, &mut stream, &crm).await;

        let expected: std::collections::BTreeSet<&str> =
            ALWAYS.iter().chain(extra.iter()).copied().collect();
        for (surface, shown) in &surfaces {
            let names: std::collections::BTreeSet<&str> =
                shown.keys().map(String::as_str).collect();
            assert_eq!(names, expected, "disclose = {disclose}, surface {surface}");
            assert_eq!(shown, &surfaces["channel"], "{disclose}: {surface} differs");
            assert_eq!(shown["status"], "verified");
        }
        let shown = &surfaces["rest"];
        if let Some(n) = shown.get("number") {
            assert_eq!(n, &number);
        }
        if let Some(m) = shown.get("number_masked") {
            assert_eq!(m, &parsed.masked());
            assert!(!m.contains(&number[8..]));
        }
        if let Some(p) = shown.get("pseudonym") {
            assert_eq!(p, &parsed.pseudonym(&key));
        }
        if let Some(n) = shown.get("name") {
            assert!(!n.is_empty());
        }
        // Where the number is not disclosed, no form of it is shown anywhere.
        if !extra.contains(&"number") {
            for (surface, shown) in &surfaces {
                for v in shown.values() {
                    assert!(
                        !v.contains(&number[2..]),
                        "{disclose}: the number on {surface}"
                    );
                }
            }
        }
        audit_holds_only_the_pseudonym(&audit, &number, Some(&parsed.pseudonym(&key)));

        // A failed check with an identity (BankID vouched for someone else) shows none of it.
        let wrong = Lab::number(Scenario::WrongPerson);
        let (report, _) = lab.run_call(lab.caller_typing(&wrong)).await.unwrap();
        assert_eq!(
            report.outcome,
            Outcome::NotVerified(Reason::IdentityMismatch)
        );
        let (surfaces, audit) =
            surfaces_of_a_gate_call(&lab, &report.call_id, &mut stream, &crm).await;
        for (surface, shown) in &surfaces {
            let names: Vec<&str> = shown.keys().map(String::as_str).collect();
            let mut always = ALWAYS.to_vec();
            always.sort();
            assert_eq!(names, always, "{disclose}: failed check on {surface}");
            assert_eq!(shown["reason"], "identity_mismatch");
        }
        audit_holds_only_the_pseudonym(&audit, &wrong, None);
        lab.shutdown().await.unwrap();
    }
}

/// The audit line: the same fields whatever the policy, the pseudonym (`person`) only when verified,
/// never the number (either form) or a masked number.
fn audit_holds_only_the_pseudonym(audit: &serde_json::Value, number: &str, person: Option<&str>) {
    let keys: Vec<&str> = audit
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for k in ["name", "number", "number_masked", "pseudonym"] {
        assert!(!keys.contains(&k), "the audit line has {k}: {audit}");
    }
    assert_eq!(audit["person"].as_str().unwrap_or(""), person.unwrap_or(""));
    let text = audit.to_string();
    assert!(!text.contains(&number[2..]), "a number in the audit line");
    assert!(
        !text.contains(&number[..8]),
        "a birth date in the audit line"
    );
}

/// A `desk` call checked through a CIBA provider (the embedded CIBA simulator) from the agent API: the
/// word pair the provider returns is shown while the caller picks it, and the caller is verified.
#[tokio::test]
async fn an_agent_verifies_a_desk_caller_through_ciba_and_sees_the_word_pair() {
    const AGENT: &str = "lab-agent-token-ciba-0123456789";
    let options = LabOptions {
        api_tokens: vec![demo::LabToken {
            name: "desk-ciba".into(),
            token: AGENT.into(),
            role: callgate::config::Role::Agent,
            agent: Some(demo::LAB_AGENT.into()),
        }],
        desk_ciba: true,
        ..LabOptions::fast()
    };
    let lab = lab(options).await;
    let id = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    talking(&lab, &id).await;
    let number = callgate::idp::sim::CibaScenario::WordPair.number();
    let (status, text) = api_request(
        lab.app.api_addr,
        "POST",
        &format!("/v1/calls/{id}/verifications"),
        AGENT,
        &format!(r#"{{"number":"{number}"}}"#),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    let check = lab.app.live.call(&id).unwrap().verification.unwrap();
    until("the word pair", || {
        lab.app
            .live
            .verification(&check.id)
            .is_some_and(|v| v.word_pair.is_some())
    })
    .await;
    let path = format!("/v1/verifications/{}", check.id);
    let (status, text) = api_request(lab.app.api_addr, "GET", &path, AGENT, "").await;
    assert_eq!(status, 200, "{text}");
    let json_of = |text: &str| -> serde_json::Value {
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    };
    let v = json_of(&text);
    assert_eq!(v["idp"], "ciba");
    assert_eq!(v["word_pair"], callgate::idp::sim::CIBA_WORD_PAIR);
    assert_eq!(v["status"], "in_progress");
    assert_eq!(check_over(&lab, &check.id).await, Outcome::Verified);
    let (_, text) = api_request(lab.app.api_addr, "GET", &path, AGENT, "").await;
    let v = json_of(&text);
    assert_eq!(v["status"], "verified");
    assert!(v["word_pair"].is_null(), "{v}");
    assert!(!text.contains(&number));
    assert!(
        !captured().contains(&number[2..]),
        "a personal number reached the logs"
    );
    lab.asterisk.hang_up(&id);
    all_gone(&lab, &id).await;
    lab.shutdown().await.unwrap();
}

// ---- hosted switchboards: the request-node API ----

fn ivr(lab: &Lab, token: &str) -> callgate::switchboard::sim::Ivr {
    callgate::switchboard::sim::Ivr::new(&format!("http://{}", lab.app.api_addr), token).unwrap()
}

fn typed<'a>(
    call_id: &'a str,
    number: &'a str,
    attempt: u32,
) -> callgate::switchboard::sim::Typed<'a> {
    callgate::switchboard::sim::Typed {
        call_id,
        queue: "support",
        number,
        caller: "+46701234567",
        attempt,
    }
}

#[tokio::test]
async fn switchboard_every_outcome_through_the_request_node_api() {
    let lab = lab(LabOptions::fast()).await;
    let nodes = ivr(&lab, demo::LAB_SWITCHBOARD_TOKEN);
    let cases = [
        (Scenario::Approve, Outcome::Verified),
        (
            Scenario::UserCancels,
            Outcome::NotVerified(Reason::UserCancelled),
        ),
        (
            Scenario::DeclinesCall,
            Outcome::NotVerified(Reason::DeclinedCall),
        ),
        (Scenario::Expires, Outcome::NotVerified(Reason::Expired)),
        (Scenario::BlockedId, Outcome::NotVerified(Reason::IdBlocked)),
        (
            Scenario::WrongPerson,
            Outcome::NotVerified(Reason::IdentityMismatch),
        ),
        (
            Scenario::Maintenance,
            Outcome::NotVerified(Reason::ProviderUnavailable),
        ),
    ];
    let mut runs = Vec::new();
    for (i, (scenario, expected)) in cases.iter().enumerate() {
        let nodes = nodes.clone();
        let number = scenario.number();
        let call = format!("sb-outcome-{i}");
        let expected = *expected;
        runs.push(tokio::spawn(async move {
            let a = nodes.verify(&typed(&call, &number, 0), 20).await.unwrap();
            (call, number, expected, a)
        }));
    }
    for run in runs {
        let (call, number, expected, a) = run.await.unwrap();
        assert_eq!(a.status, 200, "{call}: {a:?}");
        assert_eq!(
            a.var("callgate_status"),
            expected.status().code(),
            "{call}: {a:?}"
        );
        assert_eq!(
            a.var("callgate_reason"),
            expected.reason().map(|r| r.code()).unwrap_or(""),
            "{call}: {a:?}"
        );
        assert_eq!(a.var("callgate_stage"), "done");
        let id = a.var("callgate_ref");
        assert_eq!(a.var("verification_id"), id);
        assert!(a.var("callgate_at").ends_with('Z'));
        // The queue discloses name and masked number, never the number.
        assert!(!a.vars.contains_key("callgate_number"), "{a:?}");
        assert!(!a.vars.values().any(|v| v.contains(&number[2..])), "{a:?}");
        if expected == Outcome::Verified {
            assert!(!a.var("callgate_name").is_empty());
            assert!(a.var("callgate_number_masked").ends_with("-****"), "{a:?}");
        } else {
            assert!(!a.vars.contains_key("callgate_name"), "{a:?}");
        }
        // The agent API and the stream see the same record, started by the switchboard.
        let v = lab
            .app
            .live
            .verification(id)
            .expect("the verification is readable");
        assert_eq!(v.started_by, StartedBy::Switchboard("lab".into()));
        assert_eq!(v.outcome, Some(expected));
        assert!(!captured().contains(&number), "a number in the logs");
    }
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn switchboard_retried_nodes_get_the_same_verification_and_bad_input_starts_nothing() {
    let lab = lab(LabOptions::fast()).await;
    let nodes = ivr(&lab, demo::LAB_SWITCHBOARD_TOKEN);
    let number = Scenario::Approve.number();

    // Bad tokens: 401, nothing started.
    for token in ["", "not-a-switchboard-token-at-all"] {
        let a = ivr(&lab, token)
            .start(&typed("sb-bad", &number, 0))
            .await
            .unwrap();
        assert_eq!(a.status, 401, "{a:?}");
    }
    // Bad input: 400 with a reason, nothing started.
    let bad = [
        typed("", &number, 0),
        callgate::switchboard::sim::Typed {
            queue: "care",
            ..typed("sb-bad", &number, 0)
        },
        callgate::switchboard::sim::Typed {
            queue: "nope",
            ..typed("sb-bad", &number, 0)
        },
        typed("sb-bad", &number, 1000),
    ];
    for t in &bad {
        let a = nodes.start(t).await.unwrap();
        assert_eq!(a.status, 400, "{t:?}: {a:?}");
        assert_eq!(a.var("error"), "bad_request");
        assert!(!a.var("reason").is_empty());
    }
    // The number in a URL is refused.
    let (status, _) = {
        let r = nodes
            .http()
            .post(format!(
                "http://{}/switchboard/v1/verifications?number={number}",
                lab.app.api_addr
            ))
            .bearer_auth(demo::LAB_SWITCHBOARD_TOKEN)
            .json(&serde_json::json!({"call_id": "sb-url", "queue": "support", "number": number}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(status, 400);
    // An invalid number: answered at once with a reason the IVR can branch on, no order.
    let a = nodes
        .start(&typed("sb-invalid", "19811218987", 0))
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.var("callgate_status"), "failed");
    assert_eq!(a.var("callgate_reason"), "invalid_number");
    assert_eq!(a.var("callgate_ref"), "");
    assert_eq!(lab.bankid.starts(), 0, "something reached BankID");

    // A retried node (same call and attempt) gets the same verification: one order.
    let first = nodes.start(&typed("sb-retry", &number, 0)).await.unwrap();
    let again = nodes.start(&typed("sb-retry", &number, 0)).await.unwrap();
    assert_eq!(first.status, 200);
    assert!(!first.var("callgate_ref").is_empty());
    assert_eq!(first.var("callgate_ref"), again.var("callgate_ref"));
    let id = first.var("callgate_ref").to_owned();
    let done = nodes.status(&id, 20, true).await.unwrap();
    assert_eq!(done.var("callgate_status"), "verified", "{done:?}");
    let retried = nodes.start(&typed("sb-retry", &number, 0)).await.unwrap();
    assert_eq!(retried.var("callgate_ref"), id);
    assert_eq!(retried.var("callgate_status"), "verified");
    assert_eq!(lab.bankid.starts(), 1);
    // An unknown id is 404.
    let missing = nodes.status("no-such-id", 0, false).await.unwrap();
    assert_eq!(missing.status, 404);
    // A new attempt is a new verification.
    let next = nodes.start(&typed("sb-retry", &number, 1)).await.unwrap();
    assert_ne!(next.var("callgate_ref"), id);
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn switchboard_caller_hangs_up_mid_check_cancels_the_order_and_wakes_the_long_poll() {
    let mut options = LabOptions::fast();
    options = orders_held(options);
    let lab = lab(options).await;
    let nodes = ivr(&lab, demo::LAB_SWITCHBOARD_TOKEN);
    let number = Scenario::Approve.number();
    let a = nodes.start(&typed("sb-hangup", &number, 0)).await.unwrap();
    assert_eq!(a.var("callgate_status"), "pending", "{a:?}");
    let id = a.var("callgate_ref").to_owned();
    lab.bankid.wait_for_open_orders(1).await;
    // A loop node long-polls; the hang-up ends its wait with the final state.
    let poll = {
        let nodes = nodes.clone();
        let id = id.clone();
        tokio::spawn(async move { nodes.status(&id, 25, true).await.unwrap() })
    };
    until("a started order", || {
        lab.app
            .live
            .verification(&id)
            .is_some_and(|v| v.stage().is_some())
    })
    .await;
    let c = nodes.cancel(&id).await.unwrap();
    assert_eq!(c.status, 200);
    let polled = poll.await.unwrap();
    for a in [&c, &polled] {
        assert_eq!(a.var("callgate_status"), "failed", "{a:?}");
        assert_eq!(a.var("callgate_reason"), "caller_hung_up", "{a:?}");
    }
    no_open_orders(&lab).await;
    assert!(lab.bankid.cancels() >= 1);
    lab.shutdown().await.unwrap();
}

#[tokio::test]
async fn demo_switchboard_calls_end_as_expected_and_retried_nodes_reuse_the_verification() {
    let lab = lab(LabOptions::fast()).await;
    let (table, ok) = demo::switchboard_calls(&lab).await.unwrap();
    assert!(ok, "{table}");
    assert!(table.contains("same verification"), "{table}");
    no_open_orders(&lab).await;
    lab.shutdown().await.unwrap();
}
