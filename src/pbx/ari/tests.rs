//! Tests of the ARI adapter: wire decoding of the recorded fixtures, REST status mapping and the
//! events connection, both against the in-process fake Asterisk.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events::{self, ConnState, Incoming};
use super::rest::{Client, Error};
use super::wire::{self, ChannelState, DecodeError, Event, PlaybackState};
use crate::pbx::sim::{self, Caller, FakeAsterisk, SimOptions};

const WAIT: Duration = Duration::from_secs(5);

fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/ari/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------- wire

#[test]
fn every_event_fixture_decodes_to_its_type() {
    let dir = format!("{}/fixtures/ari", env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with("rest_") {
            continue;
        }
        let text = fixture(&name);
        let event = wire::decode(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let raw: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event.kind(), raw["type"].as_str().unwrap(), "{name}");
        if name.starts_with("unknown_") {
            assert!(matches!(event, Event::Other { .. }), "{name}");
        } else {
            assert!(!matches!(event, Event::Other { .. }), "{name} fell through");
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} fixtures");
}

#[test]
fn stasis_start_carries_args_and_channel() {
    let Event::StasisStart(e) = wire::decode(&fixture("stasis_start.json")).unwrap() else {
        panic!("not StasisStart");
    };
    assert_eq!(e.args, ["inbound", "support"]);
    assert_eq!(e.channel.id, "ba-line");
    assert_eq!(e.channel.state, ChannelState::Ring);
    assert_eq!(e.channel.dialplan.app_data, "callgate,inbound,support");
    assert_eq!(e.channel.dialplan.priority, 1);
    assert_eq!(e.channel.language, "en");
    assert_eq!(e.timestamp, "2026-11-22T11:03:18.237+0000");
    assert!(e.replace_channel.is_none());
    let vars = e.channel.channelvars.unwrap();
    assert_eq!(vars.get("CALLGATE_RESULT").map(String::as_str), Some(""));
}

#[test]
fn unknown_fields_are_ignored_and_replace_channel_is_read() {
    let Event::StasisStart(e) = wire::decode(&fixture("stasis_start_extra_fields.json")).unwrap()
    else {
        panic!("not StasisStart");
    };
    assert_eq!(e.channel.id, "ba-line");
    assert_eq!(e.replace_channel.unwrap().id, "replaced-1");
}

#[test]
fn event_details_match_the_captures() {
    let Event::ChannelDtmfReceived(d) =
        wire::decode(&fixture("channel_dtmf_received.json")).unwrap()
    else {
        panic!()
    };
    assert_eq!((d.digit.as_str(), d.duration_ms), ("#", 100));
    assert!(!format!("{d:?}").contains('#'), "Debug must hide the digit");

    let Event::ChannelHangupRequest(h) =
        wire::decode(&fixture("channel_hangup_request_caller.json")).unwrap()
    else {
        panic!()
    };
    assert_eq!((h.cause, h.soft), (Some(16), None));
    let Event::ChannelHangupRequest(h) =
        wire::decode(&fixture("channel_hangup_request_app.json")).unwrap()
    else {
        panic!()
    };
    assert_eq!((h.cause, h.soft), (Some(32), Some(true)));

    let Event::PlaybackFinished(p) =
        wire::decode(&fixture("playback_finished_failed.json")).unwrap()
    else {
        panic!()
    };
    assert_eq!(p.playback.state, PlaybackState::Failed);
    assert_eq!(p.playback.target_channel(), Some("pf-line"));
    assert_eq!(p.playback.language.as_deref(), Some("sv"));

    let Event::ChannelVarset(v) = wire::decode(&fixture("channel_varset.json")).unwrap() else {
        panic!()
    };
    assert_eq!(v.variable, "__CALLGATE_STATUS");
    assert!(!format!("{v:?}").contains("verified"));

    let Event::ChannelDestroyed(d) = wire::decode(&fixture("channel_destroyed.json")).unwrap()
    else {
        panic!()
    };
    assert_eq!((d.cause, d.cause_txt.as_str()), (16, "Normal Clearing"));

    let Event::ChannelEnteredBridge(b) =
        wire::decode(&fixture("channel_entered_bridge.json")).unwrap()
    else {
        panic!()
    };
    assert_eq!(b.bridge.channels, ["br-line"]);
    assert_eq!(b.channel.unwrap().id, "br-line");

    let Event::ApplicationReplaced(r) =
        wire::decode(&fixture("application_replaced.json")).unwrap()
    else {
        panic!()
    };
    assert_eq!(r.application, "callgate");
}

#[test]
fn malformed_frames_are_errors_not_panics() {
    assert_eq!(wire::decode("{not json"), Err(DecodeError::NotAnEvent));
    assert_eq!(wire::decode("[1,2]"), Err(DecodeError::NotAnEvent));
    assert_eq!(wire::decode(r#"{"type":7}"#), Err(DecodeError::NotAnEvent));
    assert_eq!(
        wire::decode(r#"{"type":"StasisStart","args":[]}"#),
        Err(DecodeError::Invalid {
            kind: "StasisStart".into()
        })
    );
    assert_eq!(
        wire::decode(r#"{"type":"BrandNew","x":{"y":1}}"#),
        Ok(Event::Other {
            kind: "BrandNew".into()
        })
    );
    // Minimal channel: every field but the object itself is optional.
    let Event::StasisEnd(e) =
        wire::decode(r#"{"type":"StasisEnd","channel":{"id":"c1","state":"Weird"}}"#).unwrap()
    else {
        panic!()
    };
    assert_eq!(e.channel.state, ChannelState::Unknown);
}

#[test]
fn rest_bodies_decode() {
    let c: wire::Channel = serde_json::from_str(&fixture("rest_channel.json")).unwrap();
    assert_eq!((c.id.as_str(), c.state), ("rc-line", ChannelState::Up));
    let a: wire::Application = serde_json::from_str(&fixture("rest_application.json")).unwrap();
    assert_eq!(a.channel_ids, ["br-agent-1", "br-agent-2", "br-line"]);
    assert_eq!(a.bridge_ids, ["callgate-br"]);
    let p: wire::Playback = serde_json::from_str(&fixture("rest_playback.json")).unwrap();
    assert_eq!((p.id.as_str(), p.state), ("pb-ba-1", PlaybackState::Queued));
    let b: wire::Bridge = serde_json::from_str(&fixture("rest_bridge.json")).unwrap();
    assert_eq!(b.bridge_type, "mixing");
    let v: wire::Variable = serde_json::from_str(&fixture("rest_variable.json")).unwrap();
    assert_eq!(v.value, "verified");
    let e: wire::ErrorBody =
        serde_json::from_str(&fixture("rest_error_variable_not_found.json")).unwrap();
    assert_eq!(e.message, "Provided variable was not found");
}

#[test]
fn events_url_is_derived_from_the_http_url() {
    let mut s = super::Settings {
        url: "http://pbx:8088".into(),
        ..Default::default()
    };
    assert_eq!(
        events::events_url(&s).unwrap().as_str(),
        "ws://pbx:8088/ari/events?app=callgate&subscribeAll=false"
    );
    s.url = "https://pbx/asterisk/".into();
    assert_eq!(
        events::events_url(&s).unwrap().as_str(),
        "wss://pbx/asterisk/ari/events?app=callgate&subscribeAll=false"
    );
    s.url = "ftp://pbx".into();
    assert!(events::events_url(&s).is_err());
}

// ---------------------------------------------------------------- helpers

async fn fake(opts: SimOptions) -> FakeAsterisk {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::start(listener, opts).await
}

fn opts() -> SimOptions {
    SimOptions {
        dialplan: [("acc-routes".to_owned(), "verified".to_owned(), 1)].into(),
        missing_media: ["sound:callgate/does-not-exist".to_owned()].into(),
        prompt_duration: Duration::from_millis(30),
        ..SimOptions::default()
    }
}

struct Conn {
    rx: mpsc::Receiver<Incoming>,
    state: tokio::sync::watch::Receiver<ConnState>,
    handle: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn connect(settings: super::Settings) -> Conn {
    let (tx, rx) = mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let (handle, state) = events::spawn(settings, tx, shutdown.clone());
    Conn {
        rx,
        state,
        handle,
        shutdown,
    }
}

impl Conn {
    async fn next(&mut self) -> Incoming {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("no message in time")
            .expect("events task ended")
    }

    /// Next event of `kind`, skipping other events (but not connection changes).
    async fn event(&mut self, kind: &str) -> Event {
        loop {
            match self.next().await {
                Incoming::Event(e) if e.kind() == kind => return *e,
                Incoming::Event(_) => {}
                other => panic!("expected {kind}, got {other:?}"),
            }
        }
    }

    async fn expect(&mut self, want: Incoming) {
        loop {
            let got = self.next().await;
            if got == want {
                return;
            }
            assert!(
                matches!(got, Incoming::Event(_)),
                "expected {want:?}, got {got:?}"
            );
        }
    }

    async fn state(&mut self, want: ConnState) {
        tokio::time::timeout(WAIT, self.state.wait_for(|s| *s == want))
            .await
            .expect("state not reached")
            .unwrap();
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

// ---------------------------------------------------------------- REST

#[tokio::test]
async fn rest_status_mapping_follows_the_captures() {
    let fake = fake(opts()).await;
    let client = Client::new(&fake.settings()).unwrap();
    let mut conn = connect(fake.settings());
    conn.expect(Incoming::Connected).await;
    client.ping().await.unwrap();

    let id = fake.call(Caller::new("46701234567"));
    let Event::StasisStart(start) = conn.event("StasisStart").await else {
        panic!()
    };
    assert_eq!(start.channel.id, id);
    assert_eq!(start.args, ["inbound", "support"]);
    assert_eq!(start.channel.state, ChannelState::Ring);

    client.answer(&id).await.unwrap();
    let Event::ChannelStateChange(up) = conn.event("ChannelStateChange").await else {
        panic!()
    };
    assert_eq!(up.channel.state, ChannelState::Up);

    let pb = client
        .play(&id, "pb-1", "sound:hello-world", Some("sv"))
        .await
        .unwrap();
    assert_eq!(pb.state, PlaybackState::Queued);
    assert_eq!(pb.target_uri, format!("channel:{id}"));
    conn.event("PlaybackFinished").await;
    client.stop_playback("pb-1").await.unwrap(); // 404: already finished

    client.start_moh(&id, Some("default")).await.unwrap();
    client.stop_moh(&id).await.unwrap();

    client
        .set_variable(&id, "__CALLGATE_STATUS", "verified")
        .await
        .unwrap();
    assert_eq!(
        client.get_variable(&id, "CALLGATE_STATUS").await.unwrap(),
        Some("verified".into())
    );
    assert_eq!(client.get_variable(&id, "NOT_SET_ANYWHERE").await, Ok(None));
    assert_eq!(
        client
            .get_variable(&id, "DIALPLAN_EXISTS(acc-routes,verified,1)")
            .await,
        Ok(Some("1".into()))
    );
    assert_eq!(
        client
            .get_variable(&id, "DIALPLAN_EXISTS(no-such-context,verified,1)")
            .await,
        Ok(Some("0".into()))
    );
    let app = client.get_application("callgate").await.unwrap().unwrap();
    assert_eq!(app.channel_ids, [id.as_str()]);
    assert_eq!(client.get_application("nope").await, Ok(None));
    assert_eq!(
        client.get_channel(&id).await.unwrap().unwrap().state,
        ChannelState::Up
    );

    client
        .continue_in_dialplan(&id, "acc-routes", "verified", 1)
        .await
        .unwrap();
    conn.event("StasisEnd").await;
    let end = within(fake.wait_for_channel_end(&id)).await;
    assert_eq!(
        end.continued_to,
        Some(("acc-routes".into(), "verified".into(), 1))
    );
    assert_eq!(end.variables["CALLGATE_STATUS"], "verified");

    // Left Stasis but not destroyed yet: 409 on control calls.
    let err = client
        .play(&id, "pb-2", "sound:hello-world", None)
        .await
        .unwrap_err();
    assert_eq!(err, Error::NotInStasis);
    assert!(err.is_gone());
    assert_eq!(
        client.set_variable(&id, "X", "1").await,
        Err(Error::NotInStasis)
    );

    within(fake.wait_for_channel_gone(&id)).await;
    assert_eq!(client.get_channel(&id).await, Ok(None));
    assert_eq!(client.hangup(&id, None).await, Ok(()));
    assert_eq!(client.answer(&id).await, Err(Error::ChannelGone));
    assert_eq!(
        client.get_variable(&id, "CALLGATE_STATUS").await,
        Err(Error::ChannelGone)
    );
    assert_eq!(
        client.continue_in_dialplan(&id, "a", "b", 1).await,
        Err(Error::ChannelGone)
    );

    let log = fake.rest_log();
    assert!(log
        .iter()
        .any(|e| e.path == format!("/channels/{id}/continue") && e.status == 204));
    assert!(log
        .iter()
        .any(|e| e.path == "/playbacks/pb-1" && e.status == 404));
}

#[tokio::test]
async fn not_up_channel_answers_412() {
    let fake = fake(opts()).await;
    let client = Client::new(&fake.settings()).unwrap();
    let mut conn = connect(fake.settings());
    conn.expect(Incoming::Connected).await;
    // `POST /channels/create` is not part of the client; issue it raw.
    let tls = super::tls::client_config().unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .build()
        .unwrap();
    let s = fake.settings();
    let response = http
        .post(format!("{}/ari/channels/create", s.url))
        .basic_auth(&s.username, Some(s.password.expose()))
        .query(&[
            ("endpoint", "Local/agent@acc-agents/n"),
            ("app", "callgate"),
            ("channelId", "down-1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let Event::StasisStart(start) = conn.event("StasisStart").await else {
        panic!()
    };
    assert_eq!(start.channel.state, ChannelState::Down);
    assert!(start.args.is_empty());
    assert_eq!(client.start_moh("down-1", None).await, Err(Error::NotUp));
    assert_eq!(
        client.play("down-1", "p", "sound:x", None).await,
        Err(Error::NotUp)
    );
    client.hangup("down-1", Some("normal")).await.unwrap();
    let Event::ChannelHangupRequest(h) = conn.event("ChannelHangupRequest").await else {
        panic!()
    };
    assert_eq!((h.cause, h.soft), (Some(32), Some(true)));
    conn.event("StasisEnd").await;
}

#[tokio::test]
async fn bridges_and_originate() {
    let fake = fake(opts()).await;
    let client = Client::new(&fake.settings()).unwrap();
    let mut conn = connect(fake.settings());
    conn.expect(Incoming::Connected).await;
    let id = fake.call(Caller::new("46701234567"));
    conn.event("StasisStart").await;
    client.answer(&id).await.unwrap();

    let bridge = client
        .create_bridge("br-1", &["mixing", "dtmf_events"])
        .await
        .unwrap();
    assert_eq!(bridge.id, "br-1");
    client.add_channel("br-1", &id, true, false).await.unwrap();
    let Event::ChannelEnteredBridge(entered) = conn.event("ChannelEnteredBridge").await else {
        panic!()
    };
    assert_eq!(entered.bridge.channels, [id.as_str()]);
    assert_eq!(
        client.add_channel("br-1", "no-such", false, false).await,
        Err(Error::ChannelGone)
    );
    assert!(matches!(
        client.add_channel("no-bridge", &id, false, false).await,
        Err(Error::NotFound(m)) if m == "Bridge not found"
    ));

    let agent = client
        .originate(&super::Originate {
            endpoint: "Local/agent@acc-agents/n".into(),
            channel_id: "agent-1".into(),
            other_channel_id: Some("agent-2".into()),
            app_args: vec!["agent".into(), id.clone()],
            variables: [("__CALLGATE_STATUS".to_owned(), "verified".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(agent.id, "agent-1");
    let Event::StasisStart(start) = conn.event("StasisStart").await else {
        panic!()
    };
    assert_eq!(start.args, ["agent", id.as_str()]);
    assert_eq!(
        client.get_variable("agent-1", "CALLGATE_STATUS").await,
        Ok(Some("verified".into()))
    );

    client.remove_channel("br-1", &id).await.unwrap();
    conn.event("ChannelLeftBridge").await;
    client.destroy_bridge("br-1").await.unwrap();
    client.destroy_bridge("br-1").await.unwrap(); // 404 → Ok
}

#[tokio::test]
async fn unauthorized_slow_and_unreachable() {
    let fake = fake(opts()).await;
    let mut settings = fake.settings();
    settings.password = crate::secret::Secret::new("wrong");
    let client = Client::new(&settings).unwrap();
    assert_eq!(client.ping().await, Err(Error::Unauthorized));

    let mut settings = fake.settings();
    settings.request_timeout = Duration::from_millis(100);
    let client = Client::new(&settings).unwrap();
    fake.set_rest_delay(Duration::from_millis(400));
    let err = client.ping().await.unwrap_err();
    assert_eq!(err, Error::Timeout);
    assert!(err.is_transient());

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = Client::new(&super::Settings {
        url,
        ..fake.settings()
    })
    .unwrap();
    assert!(matches!(client.ping().await, Err(Error::Transport(_))));
}

#[tokio::test]
async fn odd_bodies_never_panic() {
    use axum::http::StatusCode;
    use axum::routing::any;
    let app = axum::Router::new()
        .route(
            "/ari/channels/{id}",
            any(|| async { (StatusCode::OK, "<html>not json") }),
        )
        .route(
            "/ari/channels/{id}/answer",
            any(|| async { (StatusCode::BAD_GATEWAY, "<html>proxy") }),
        )
        .route(
            "/ari/channels/{id}/moh",
            any(|| async { (StatusCode::IM_A_TEAPOT, r#"{"message": 5}"#) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::new(&super::Settings {
        url,
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(
        client.get_channel("c").await,
        Err(Error::Decode(_))
    ));
    assert_eq!(
        client.answer("c").await,
        Err(Error::Server {
            status: 502,
            msg: String::new()
        })
    );
    assert!(matches!(
        client.start_moh("c", None).await,
        Err(Error::Server { status: 418, .. })
    ));
}

// ---------------------------------------------------------------- events connection

#[tokio::test]
async fn reconnects_after_the_socket_drops_and_says_connected_again() {
    let fake = fake(opts()).await;
    let mut conn = connect(fake.settings());
    conn.expect(Incoming::Connected).await;
    within(fake.wait_for_connected()).await;
    fake.drop_websocket();
    conn.expect(Incoming::Disconnected).await;
    conn.expect(Incoming::Connected).await;
    conn.state(ConnState::Connected).await;
    assert_eq!(fake.connections(), 2);
    // Events flow on the new connection.
    let id = fake.call(Caller::new("46701234567"));
    let Event::StasisStart(start) = conn.event("StasisStart").await else {
        panic!()
    };
    assert_eq!(start.channel.id, id);
}

#[tokio::test]
async fn a_proven_connection_that_is_cut_is_replaced_at_once_whatever_the_backoff() {
    let fake = fake(opts()).await;
    let mut settings = fake.settings();
    // Any backoff delay would be 30 s or more: only an immediate reconnect passes.
    settings.reconnect_min = Duration::from_secs(60);
    settings.reconnect_max = Duration::from_secs(60);
    let mut conn = connect(settings);
    for round in 1..=3u64 {
        conn.expect(Incoming::Connected).await;
        within(fake.wait_for_connected()).await;
        // Proven: pings were answered on this connection.
        within(fake.wait_for_pings(2 * round)).await;
        fake.drop_websocket();
        conn.expect(Incoming::Disconnected).await;
    }
    conn.expect(Incoming::Connected).await;
    assert_eq!(fake.connections(), 4);
}

#[tokio::test]
async fn malformed_frame_is_skipped_and_the_stream_continues() {
    let fake = fake(opts()).await;
    let mut conn = connect(fake.settings());
    conn.expect(Incoming::Connected).await;
    within(fake.wait_for_connected()).await;
    fake.send_malformed_frame();
    let id = fake.call(Caller::new("46701234567"));
    // The very next message is the call: nothing for the bad frame, no reconnect.
    match conn.next().await {
        Incoming::Event(e) => assert_eq!(e.channel_id(), Some(id.as_str())),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(fake.connections(), 1);
}

#[tokio::test]
async fn application_replaced_stops_the_connection_without_reconnecting() {
    let fake = fake(opts()).await;
    let mut conn = connect(fake.settings());
    conn.expect(Incoming::Connected).await;
    within(fake.wait_for_connected()).await;
    fake.replace_app();
    conn.event("ApplicationReplaced").await;
    conn.state(ConnState::Replaced).await;
    // Calls now go to the other instance; nothing more reaches us and we did not reconnect.
    let id = fake.call(Caller::new("46701234567"));
    assert!(fake.in_application(&id));
    assert!(conn.rx.try_recv().is_err());
    assert_eq!(fake.connections(), 1);
    assert!(!conn.handle.is_finished());
    conn.shutdown.cancel();
    within(&mut conn.handle).await.unwrap();
}

#[tokio::test]
async fn second_instance_takes_over_the_application() {
    let fake = fake(opts()).await;
    let mut first = connect(fake.settings());
    first.expect(Incoming::Connected).await;
    let mut second = connect(fake.settings());
    second.expect(Incoming::Connected).await;
    first.event("ApplicationReplaced").await;
    first.state(ConnState::Replaced).await;
    let id = fake.call(Caller::new("46701234567"));
    let Event::StasisStart(start) = second.event("StasisStart").await else {
        panic!()
    };
    assert_eq!(start.channel.id, id);
}

#[tokio::test]
async fn pings_keep_a_healthy_connection_up() {
    let fake = fake(opts()).await;
    let mut settings = fake.settings();
    settings.ping_interval = Duration::from_millis(30);
    let mut conn = connect(settings);
    conn.expect(Incoming::Connected).await;
    // Well past two intervals with no events: pongs alone keep it alive.
    within(fake.wait_for_pings(6)).await;
    assert_eq!(*conn.state.borrow(), ConnState::Connected);
    assert_eq!(fake.connections(), 1);
    assert!(conn.rx.try_recv().is_err());
}

#[tokio::test]
async fn unanswered_pings_declare_the_connection_dead() {
    let fake = fake(opts()).await;
    let mut settings = fake.settings();
    settings.ping_interval = Duration::from_millis(30);
    let mut conn = connect(settings);
    conn.expect(Incoming::Connected).await;
    within(fake.wait_for_connected()).await;
    fake.stall_websocket();
    conn.expect(Incoming::Disconnected).await;
    conn.expect(Incoming::Connected).await;
    assert_eq!(fake.connections(), 2);
}

#[tokio::test]
async fn shutdown_stops_the_task() {
    let fake = fake(opts()).await;
    let mut conn = connect(fake.settings());
    conn.expect(Incoming::Connected).await;
    conn.shutdown.cancel();
    within(&mut conn.handle).await.unwrap();
    assert_eq!(*conn.state.borrow(), ConnState::Disconnected);
    within(fake.wait_for_disconnected()).await;
}

// ---------------------------------------------------------------- variables and route checks

/// A call in the application, answered, with a client for it.
async fn call_in_app(opts: SimOptions) -> (FakeAsterisk, Conn, Client, String) {
    let fake = fake(opts).await;
    let mut conn = connect(fake.settings());
    conn.expect(Incoming::Connected).await;
    within(fake.wait_for_connected()).await;
    let client = Client::new(&fake.settings()).unwrap();
    let id = fake.call(Caller::new("46701234567"));
    conn.event("StasisStart").await;
    (fake, conn, client, id)
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn variable_requests(fake: &FakeAsterisk) -> Vec<String> {
    fake.rest_log()
        .into_iter()
        .filter(|e| e.path.contains("/variable"))
        .map(|e| format!("{} {}", e.path.rsplit('/').next().unwrap_or(""), e.status))
        .collect()
}

#[tokio::test]
async fn variables_and_the_safety_net_timeout_are_set_in_one_request() {
    let (fake, _conn, client, id) = call_in_app(opts()).await;
    let set = vars(&[
        ("__CALLGATE_STATUS", "verified"),
        ("__CALLGATE_NAME", "Anna, Andersson"),
        ("TIMEOUT(absolute)", "0"),
    ]);
    assert_eq!(client.set_all_variables(&id, &set).await, Ok(Vec::new()));
    let got = fake.channel_vars(&id).unwrap();
    assert_eq!(got["CALLGATE_STATUS"], "verified");
    assert_eq!(got["CALLGATE_NAME"], "Anna, Andersson");
    assert_eq!(got["TIMEOUT(absolute)"], "0");
    assert_eq!(variable_requests(&fake), ["variables 204"]);
    // A channel that is gone is reported at once.
    fake.hang_up(&id);
    within(fake.wait_for_channel_gone(&id)).await;
    assert_eq!(
        client.set_all_variables(&id, &set).await,
        Err(Error::ChannelGone)
    );
}

#[tokio::test]
async fn an_asterisk_without_the_variables_resource_gets_one_request_per_variable() {
    let (fake, _conn, client, id) = call_in_app(SimOptions {
        multi_variables: false,
        ..opts()
    })
    .await;
    let set = vars(&[("__CALLGATE_STATUS", "failed"), ("TIMEOUT(absolute)", "0")]);
    assert_eq!(client.set_all_variables(&id, &set).await, Ok(Vec::new()));
    assert_eq!(fake.channel_vars(&id).unwrap()["CALLGATE_STATUS"], "failed");
    // Learnt once: the next call does not try the batch again.
    assert_eq!(client.set_all_variables(&id, &set).await, Ok(Vec::new()));
    assert_eq!(
        variable_requests(&fake),
        [
            "variables 404",
            "variable 204",
            "variable 204",
            "variable 204",
            "variable 204"
        ]
    );
}

#[tokio::test]
async fn dialplan_functions_are_evaluated_on_a_channel_only() {
    let (fake, _conn, client, id) = call_in_app(opts()).await;
    // As measured on Asterisk 22.10.1: EVAL substitutes several functions in one request ...
    assert_eq!(
        client
            .get_variable(
                &id,
                "EVAL(${DIALPLAN_EXISTS(acc-routes,verified,1)},${DIALPLAN_EXISTS(acc-routes,nope,1)})"
            )
            .await,
        Ok(Some("1,0".into()))
    );
    // ... and the global-variable resource evaluates no function at all.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "callgate:sim-secret",
    );
    let request = format!(
        "GET /ari/asterisk/variable?variable=DIALPLAN_EXISTS(acc-routes,verified,1) HTTP/1.1\r\n\
         Host: x\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(body, r#"{"value":""}"#);
}

#[tokio::test]
async fn routes_are_checked_once_in_one_request_and_missing_ones_are_reported() {
    use crate::pbx::routecheck::RouteCheck;
    use crate::policy::Route;
    let (fake, _conn, client, id) = call_in_app(opts()).await;
    let toml = r#"
[pbx]
kind = "ari"
[pbx.ari]
url = "http://127.0.0.1:1"
password = "x"
[idp.sim]
kind = "simulator"
[queues.support]
idp = "sim"
[queues.support.routes]
verified = "acc-routes,verified,1"
failed = "acc-routes,failed,1"
unavailable = "acc-routes,verified,1"
"#;
    let config = crate::config::load(toml, &Default::default(), &|_| None).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(config));
    let check = RouteCheck::new(rx);
    let verified = Route::parse("acc-routes,verified,1").unwrap();
    let failed = Route::parse("acc-routes,failed,1").unwrap();
    assert_eq!(check.exists(&client, &id, &verified).await, Ok(true));
    assert_eq!(check.exists(&client, &id, &failed).await, Ok(false));
    assert_eq!(check.exists(&client, &id, &verified).await, Ok(true));
    assert_eq!(variable_requests(&fake), ["variable 200"]);
    // A new connection checks again.
    check.forget();
    assert_eq!(check.exists(&client, &id, &failed).await, Ok(false));
    assert_eq!(variable_requests(&fake), ["variable 200", "variable 200"]);
    // A check that cannot be made (here: nothing listens) trusts the config, for a short while.
    check.forget();
    let unreachable = Client::new(&super::Settings {
        url: "http://127.0.0.1:1".into(),
        ..fake.settings()
    })
    .unwrap();
    assert_eq!(check.exists(&unreachable, &id, &failed).await, Ok(true));
    assert_eq!(check.exists(&client, &id, &failed).await, Ok(true));
    assert_eq!(variable_requests(&fake).len(), 2);
    // A channel found gone is the caller's problem alone.
    check.forget();
    fake.hang_up(&id);
    within(fake.wait_for_channel_gone(&id)).await;
    assert_eq!(
        check.exists(&client, &id, &failed).await,
        Err(Error::ChannelGone)
    );
}

#[tokio::test]
async fn an_event_filter_stops_the_filtered_types_only() {
    let (fake, mut conn, client, id) = call_in_app(opts()).await;
    client
        .set_event_filter(
            "callgate",
            &["ChannelVarset", "ChannelStateChange", "PlaybackStarted"],
        )
        .await
        .unwrap();
    client
        .set_variable(&id, "__CALLGATE_STATUS", "verified")
        .await
        .unwrap();
    client.answer(&id).await.unwrap();
    client.play(&id, "pb-f", "sound:x", None).await.unwrap();
    // The next event is the playback's end: no variable, state change or playback start came.
    match conn.next().await {
        Incoming::Event(e) => assert_eq!(e.kind(), "PlaybackFinished"),
        other => panic!("expected PlaybackFinished, got {other:?}"),
    }
    assert_eq!(
        client.set_event_filter("nope", &["ChannelVarset"]).await,
        Err(Error::NotFound("Application not found".into()))
    );
    drop(fake);
}

/// A server that drops the first connection after reading a request, then answers 204.
async fn flaky_server() -> (super::Settings, tokio::task::JoinHandle<usize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut requests = 0;
        while let Ok(Ok((mut tcp, _))) =
            tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
        {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            requests += 1;
            if requests > 1 {
                let _ = tcp
                    .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                    .await;
            }
        }
        requests
    });
    let settings = super::Settings {
        url,
        ..Default::default()
    };
    (settings, server)
}

#[tokio::test]
async fn a_request_safe_to_repeat_is_sent_again_after_the_connection_drops() {
    let (settings, server) = flaky_server().await;
    let client = Client::new(&settings).unwrap();
    assert_eq!(client.answer("ch").await, Ok(()));
    assert_eq!(server.await.unwrap(), 2);
    // A prompt is not repeated: a second one could play twice.
    let (settings, server) = flaky_server().await;
    let client = Client::new(&settings).unwrap();
    assert!(matches!(
        client.play("ch", "pb", "sound:x", None).await,
        Err(Error::Transport(_))
    ));
    assert_eq!(server.await.unwrap(), 1);
}
