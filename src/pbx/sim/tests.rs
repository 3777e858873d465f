//! Tests of the fake Asterisk itself: scripted callers, playback queueing, hang-ups, the
//! no-application path and the REST log, driven through the real ARI client and events task.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{start, Caller, FakeAsterisk, Party, SimOptions};
use crate::pbx::ari::events::{self, Incoming};
use crate::pbx::ari::wire::{Event, PlaybackState};
use crate::pbx::ari::{Client, Error};

const WAIT: Duration = Duration::from_secs(5);
const GAP: Duration = Duration::from_millis(2);

async fn fake(opts: SimOptions) -> FakeAsterisk {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start(listener, opts).await
}

struct App {
    client: Client,
    rx: mpsc::Receiver<Incoming>,
    shutdown: CancellationToken,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn app(fake: &FakeAsterisk) -> App {
    let (tx, mut rx) = mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let _ = events::spawn(fake.settings(), tx, shutdown.clone());
    let first = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
    assert_eq!(first, Some(Incoming::Connected));
    App {
        client: Client::new(&fake.settings()).unwrap(),
        rx,
        shutdown,
    }
}

impl App {
    async fn next(&mut self) -> Event {
        loop {
            let got = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("no event in time")
                .expect("events ended");
            if let Incoming::Event(e) = got {
                return *e;
            }
        }
    }

    async fn event(&mut self, kind: &str) -> Event {
        loop {
            let e = self.next().await;
            if e.kind() == kind {
                return e;
            }
        }
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.expect("timed out")
}

#[tokio::test]
async fn scripted_caller_types_digits_after_the_first_prompt() {
    let fake = fake(SimOptions::default()).await;
    let mut app = app(&fake).await;
    let id = fake.call(
        Caller::new("46701234567")
            .queue("sales")
            .language("en")
            .await_prompt()
            .press("1234#", GAP),
    );
    assert_eq!(id, "sim-1.1");
    let Event::StasisStart(start) = app.next().await else {
        panic!()
    };
    assert_eq!(start.args, ["inbound", "sales"]);
    assert_eq!(start.channel.language, "en");
    assert_eq!(start.channel.caller.number, "46701234567");
    assert_eq!(start.channel.dialplan.app_data, "callgate,inbound,sales");
    app.client.answer(&id).await.unwrap();
    app.client
        .play(&id, "pb-1", "sound:callgate/welcome", None)
        .await
        .unwrap();
    let mut digits = String::new();
    while digits.len() < 5 {
        if let Event::ChannelDtmfReceived(d) = app.next().await {
            assert_eq!(d.channel.id, id);
            assert_eq!(d.duration_ms, 100);
            digits.push_str(&d.digit);
        }
    }
    assert_eq!(digits, "1234#");
    assert_eq!(fake.media_started(&id), ["sound:callgate/welcome"]);
}

#[tokio::test]
async fn playbacks_queue_and_missing_media_fails() {
    let opts = SimOptions {
        missing_media: ["sound:callgate/missing".to_owned()].into(),
        ..SimOptions::default()
    };
    let fake = fake(opts).await;
    let mut app = app(&fake).await;
    let id = fake.call(Caller::new("1"));
    app.event("StasisStart").await;
    for (pb, media) in [
        ("a", "sound:one"),
        ("b", "sound:callgate/missing"),
        ("c", "sound:three"),
    ] {
        app.client.play(&id, pb, media, Some("sv")).await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 6 {
        match app.next().await {
            Event::PlaybackStarted(p) => seen.push(format!("start {}", p.playback.id)),
            Event::PlaybackFinished(p) => {
                seen.push(format!("finish {} {:?}", p.playback.id, p.playback.state))
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            "start a",
            "finish a Done",
            "start b",
            "finish b Failed",
            "start c",
            "finish c Done"
        ]
    );
}

#[tokio::test]
async fn stopping_a_playback_finishes_it_and_later_stops_are_404() {
    let opts = SimOptions {
        prompt_duration: Duration::from_secs(60),
        ..SimOptions::default()
    };
    let fake = fake(opts).await;
    let mut app = app(&fake).await;
    let id = fake.call(Caller::new("1"));
    app.event("StasisStart").await;
    app.client.play(&id, "long", "sound:x", None).await.unwrap();
    app.event("PlaybackStarted").await;
    app.client.stop_playback("long").await.unwrap();
    let Event::PlaybackFinished(p) = app.event("PlaybackFinished").await else {
        panic!()
    };
    assert_eq!(p.playback.state, PlaybackState::Done);
    app.client.stop_playback("long").await.unwrap();
    let statuses: Vec<u16> = fake
        .rest_log()
        .iter()
        .filter(|e| e.path == "/playbacks/long")
        .map(|e| e.status)
        .collect();
    assert_eq!(statuses, [204, 404]);
    // `digits:` cannot be stopped (Asterisk answers 500).
    app.client.play(&id, "d", "digits:12", None).await.unwrap();
    assert!(matches!(
        app.client.stop_playback("d").await,
        Err(Error::Server { status: 500, .. })
    ));
}

#[tokio::test]
async fn caller_hangs_up_on_hold() {
    let fake = fake(SimOptions::default()).await;
    let mut app = app(&fake).await;
    let id = fake.call(Caller::new("1").await_moh().hang_up());
    app.event("StasisStart").await;
    app.client.answer(&id).await.unwrap();
    app.client.start_moh(&id, None).await.unwrap();
    let Event::ChannelHangupRequest(h) = app.event("ChannelHangupRequest").await else {
        panic!()
    };
    assert_eq!((h.cause, h.soft), (Some(16), None));
    app.event("StasisEnd").await;
    let end = within(fake.wait_for_channel_end(&id)).await;
    assert_eq!(end.hung_up_by, Some(Party::Caller));
    assert_eq!(end.continued_to, None);
    assert_eq!(
        app.client
            .set_variable(&id, "__CALLGATE_STATUS", "failed")
            .await,
        Err(Error::ChannelGone)
    );
    assert_eq!(app.client.stop_moh(&id).await, Err(Error::ChannelGone));
    assert_eq!(app.client.hangup(&id, None).await, Ok(()));
}

#[tokio::test]
async fn app_hangup_is_soft_and_recorded() {
    let fake = fake(SimOptions::default()).await;
    let mut app = app(&fake).await;
    let id = fake.call(Caller::new("1"));
    app.event("StasisStart").await;
    app.client.hangup(&id, Some("normal")).await.unwrap();
    let Event::ChannelHangupRequest(h) = app.event("ChannelHangupRequest").await else {
        panic!()
    };
    assert_eq!((h.cause, h.soft), (Some(32), Some(true)));
    app.event("StasisEnd").await;
    let end = within(fake.wait_for_channel_end(&id)).await;
    assert_eq!(end.hung_up_by, Some(Party::App));
    assert_eq!(app.client.get_channel(&id).await, Ok(None));
}

#[tokio::test]
async fn continue_reports_target_and_inheritable_variables() {
    let fake = fake(SimOptions::default()).await;
    let mut app = app(&fake).await;
    let id = fake.call(Caller::new("1"));
    app.event("StasisStart").await;
    app.client
        .set_variable(&id, "__CALLGATE_STATUS", "verified")
        .await
        .unwrap();
    let Event::ChannelVarset(v) = app.event("ChannelVarset").await else {
        panic!()
    };
    assert_eq!(v.variable, "__CALLGATE_STATUS");
    app.client
        .set_variable(&id, "TIMEOUT(absolute)", "600")
        .await
        .unwrap();
    assert_eq!(
        app.client.get_variable(&id, "TIMEOUT(absolute)").await,
        Ok(Some("600".into()))
    );
    assert_eq!(
        fake.channel_vars(&id).unwrap()["CALLGATE_STATUS"],
        "verified"
    );
    app.client
        .continue_in_dialplan(&id, "acc-routes", "verified", 1)
        .await
        .unwrap();
    app.event("StasisEnd").await;
    let end = within(fake.wait_for_channel_end(&id)).await;
    assert_eq!(
        end.continued_to,
        Some(("acc-routes".into(), "verified".into(), 1))
    );
    assert_eq!(end.hung_up_by, None);
    assert_eq!(end.variables["CALLGATE_STATUS"], "verified");
    assert_eq!(end.variables["TIMEOUT(absolute)"], "600");
    // DELETE still works on a channel that left Stasis.
    app.client.hangup(&id, None).await.unwrap();
    assert_eq!(app.client.get_channel(&id).await, Ok(None));
}

#[tokio::test]
async fn calls_without_a_connected_application_fail_to_enter() {
    let fake = fake(SimOptions::default()).await;
    let id = fake.call(Caller::new("1"));
    let end = within(fake.wait_for_channel_end(&id)).await;
    assert!(end.stasis_failed);
    assert_eq!(end.variables["STASISSTATUS"], "FAILED");
    let client = Client::new(&fake.settings()).unwrap();
    assert_eq!(client.get_channel(&id).await, Ok(None));
    assert_eq!(client.get_application("callgate").await, Ok(None));

    // While connected, then dropped: live channels stay in the app, new calls fail.
    let mut app = app(&fake).await;
    let live = fake.call(Caller::new("2"));
    app.event("StasisStart").await;
    fake.drop_websocket();
    within(fake.wait_for_disconnected()).await;
    let failed = fake.call(Caller::new("3"));
    assert!(
        within(fake.wait_for_channel_end(&failed))
            .await
            .stasis_failed
    );
    let application = client.get_application("callgate").await.unwrap().unwrap();
    assert_eq!(application.channel_ids, [live.as_str()]);
    assert!(fake.in_application(&live));
}

#[tokio::test]
async fn events_during_a_gap_are_lost() {
    let fake = fake(SimOptions::default()).await;
    let mut app = app(&fake).await;
    let id = fake.call(
        Caller::new("1")
            .await_moh()
            .press("12", GAP)
            .await_moh()
            .press("3", GAP),
    );
    app.event("StasisStart").await;
    app.client.answer(&id).await.unwrap();
    fake.set_accepting(false);
    fake.drop_websocket();
    // REST works without the socket; "1" and "2" are typed into the gap and lost.
    app.client.start_moh(&id, None).await.unwrap();
    within(fake.wait_for_dropped_events(2)).await;
    fake.set_accepting(true);
    loop {
        match tokio::time::timeout(WAIT, app.rx.recv()).await.unwrap() {
            Some(Incoming::Connected) => break,
            Some(Incoming::Event(e)) => {
                assert!(
                    !matches!(*e, Event::ChannelDtmfReceived(_)),
                    "gap digit leaked"
                );
            }
            _ => {}
        }
    }
    assert!(fake.in_application(&id), "channel survives the gap");
    app.client.stop_moh(&id).await.unwrap();
    app.client.start_moh(&id, None).await.unwrap();
    let Event::ChannelDtmfReceived(d) = app.event("ChannelDtmfReceived").await else {
        panic!()
    };
    assert_eq!(d.digit, "3");
}

#[tokio::test]
async fn await_media_waits_for_the_named_prompt() {
    let fake = fake(SimOptions::default()).await;
    let mut app = app(&fake).await;
    let id = fake.call(
        Caller::new("1")
            .await_media("sound:callgate/retry-offer")
            .press("1", GAP),
    );
    app.event("StasisStart").await;
    app.client
        .play(&id, "p1", "sound:callgate/welcome", None)
        .await
        .unwrap();
    app.event("PlaybackFinished").await;
    app.client
        .play(&id, "p2", "sound:callgate/retry-offer", None)
        .await
        .unwrap();
    // No digit before the named prompt started.
    loop {
        match app.next().await {
            Event::ChannelDtmfReceived(_) => panic!("digit before the awaited prompt"),
            Event::PlaybackStarted(p) if p.playback.id == "p2" => break,
            _ => {}
        }
    }
    app.event("ChannelDtmfReceived").await;
}

#[tokio::test]
async fn requires_credentials() {
    let fake = fake(SimOptions::default()).await;
    let mut settings = fake.settings();
    settings.username = "intruder".into();
    let client = Client::new(&settings).unwrap();
    assert_eq!(client.ping().await, Err(Error::Unauthorized));
    let (tx, _rx) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let (_h, mut state) = events::spawn(settings, tx, shutdown.clone());
    within(state.wait_for(|s| *s == events::ConnState::Disconnected))
        .await
        .unwrap();
    assert_eq!(fake.connections(), 0);
    shutdown.cancel();
}

// ---- Anchored calls: bridges, agent legs, mute, DTMF through a bridge ----

use std::collections::BTreeMap;

use super::{Direction, SimAgent, SimQueue};

use crate::pbx::ari::wire::ChannelState;
use crate::pbx::ari::Originate;

const AGENTS: &str = "acc-agents";

fn agent_opts(queue: SimQueue) -> SimOptions {
    SimOptions {
        agents: BTreeMap::from([(AGENTS.to_owned(), queue)]),
        ..SimOptions::default()
    }
}

/// One raw REST exchange (for what `Client` has no method for): status and JSON body.
async fn rest(fake: &FakeAsterisk, method: &str, path_and_query: &str) -> (u16, serde_json::Value) {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = fake.settings();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        s.username,
        s.password.expose()
    ));
    let mut stream = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let request = format!(
        "{method} /ari{path_and_query} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {auth}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        fake.addr()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or_default())
}

fn agent_leg(caller: &str, a: &str, b: &str) -> Originate {
    Originate {
        endpoint: format!("Local/agent@{AGENTS}/n"),
        channel_id: a.into(),
        other_channel_id: Some(b.into()),
        app_args: vec!["agent".into(), caller.into()],
        caller_id: Some("Caller <46701234567>".into()),
        originator: Some(caller.into()),
        timeout_secs: Some(-1),
        variables: [("__CALLGATE_STATUS".to_owned(), "verified".to_owned())].into(),
    }
}

/// `type channel-id [variable]` of an event, for comparing orders with the capture.
fn line(e: &Event) -> String {
    let mut out = format!("{} {}", e.kind(), e.channel_id().unwrap_or("-"));
    if let Event::ChannelVarset(v) = e {
        out.push_str(&format!(" {}={}", v.variable, v.value));
    }
    out
}

impl App {
    /// Events up to and including the first one that `last` accepts, as [`line`]s.
    async fn until(&mut self, last: impl Fn(&Event) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await;
            seen.push(line(&e));
            if last(&e) {
                return seen;
            }
        }
    }
}

/// A caller in the app, answered, in bridge `br` (absorbDTMF as given), and an agent leg
/// `ag-1`/`ag-2` in the app; events read up to the leg's `StasisStart`.
async fn anchored(fake: &FakeAsterisk, app: &mut App, absorb: bool) -> String {
    let caller = fake.call(Caller::new("46701234567"));
    app.event("StasisStart").await;
    app.client.answer(&caller).await.unwrap();
    app.client
        .create_bridge("br", &["mixing", "dtmf_events"])
        .await
        .unwrap();
    app.client
        .add_channel("br", &caller, absorb, false)
        .await
        .unwrap();
    app.client
        .originate(&agent_leg(&caller, "ag-1", "ag-2"))
        .await
        .unwrap();
    app.until(|e| matches!(e, Event::StasisStart(s) if s.channel.id == "ag-1"))
        .await;
    // The `;2` half goes on to `Queue()`.
    app.event("ChannelDialplan").await;
    caller
}

#[tokio::test]
async fn anchored_call_follows_the_capture() {
    let fake = fake(agent_opts(SimQueue::agent(
        "PJSIP/agent1",
        Duration::from_millis(20),
    )))
    .await;
    let mut app = app(&fake).await;
    let caller = fake.call(Caller::new("46701234567"));
    app.event("StasisStart").await;
    app.client.answer(&caller).await.unwrap();
    app.event("ChannelStateChange").await;

    // Bridge create: the snapshot as Asterisk 22 answers it.
    let bridge = app
        .client
        .create_bridge("callgate-br", &["mixing", "dtmf_events"])
        .await
        .unwrap();
    assert_eq!(
        (
            bridge.technology.as_str(),
            bridge.bridge_type.as_str(),
            bridge.bridge_class.as_str(),
            bridge.creator.as_str(),
            bridge.name.as_str(),
            bridge.video_mode.as_deref()
        ),
        (
            "simple_bridge",
            "mixing",
            "stasis",
            "Stasis",
            "callgate-br",
            Some("talker")
        )
    );
    assert!(bridge.channels.is_empty());
    app.client
        .add_channel("callgate-br", &caller, true, false)
        .await
        .unwrap();
    let Event::ChannelEnteredBridge(entered) = app.next().await else {
        panic!()
    };
    assert_eq!(entered.bridge.channels, [caller.as_str()]);
    assert!(fake.absorbs_dtmf(&caller));

    // Originate: 200 with the `;1` half, Down; then the capture's order up to its StasisStart.
    let a = app
        .client
        .originate(&agent_leg(&caller, "br-agent-1", "br-agent-2"))
        .await
        .unwrap();
    assert_eq!(
        (a.id.as_str(), a.name.as_str(), a.state),
        (
            "br-agent-1",
            "Local/agent@acc-agents-00000001;1",
            ChannelState::Down
        )
    );
    assert_eq!(a.caller.number, "46701234567");
    assert_eq!(
        (a.dialplan.app_name.as_str(), a.dialplan.app_data.as_str()),
        ("AppDial2", "(Outgoing Line)")
    );
    let seen = app
        .until(|e| matches!(e, Event::StasisStart(s) if s.channel.id == "br-agent-1"))
        .await;
    assert_eq!(
        seen,
        [
            "ChannelVarset br-agent-2 __CALLGATE_STATUS=verified",
            "ChannelCallerId -",      // no `channel` in the decoded form
            "ChannelConnectedLine -", // no `channel` in the decoded form
            "Dial -",
            "ChannelDialplan -", // no `channel` in the decoded form
            "ChannelStateChange br-agent-2",
            "ChannelStateChange br-agent-1",
            "Dial -",
            "ChannelVarset br-agent-1 STASISSTATUS=",
            "StasisStart br-agent-1",
        ]
    );
    let channel = app.client.get_channel("br-agent-1").await.unwrap().unwrap();
    assert_eq!(channel.state, ChannelState::Up);
    assert_eq!(
        channel.dialplan.app_data,
        format!("callgate,agent,{caller}")
    );
    let origination = &fake.originations()[0];
    assert_eq!(origination.channel_id, "br-agent-1");
    for (key, value) in [
        ("endpoint", "Local/agent@acc-agents/n"),
        ("appArgs", &format!("agent,{caller}")),
        ("originator", &caller),
        ("callerId", "Caller <46701234567>"),
        ("timeout", "-1"),
        ("otherChannelId", "br-agent-2"),
    ] {
        assert_eq!(origination.params[key], value, "{key}");
    }
    assert_eq!(origination.variables["__CALLGATE_STATUS"], "verified");

    // The inheritable variable is on the `;2` half (not in Stasis, readable); one linkedid.
    assert_eq!(
        app.client
            .get_variable("br-agent-2", "CALLGATE_STATUS")
            .await,
        Ok(Some("verified".into()))
    );
    for id in [&caller, "br-agent-1", "br-agent-2"] {
        assert_eq!(
            app.client.get_variable(id, "CHANNEL(linkedid)").await,
            Ok(Some(caller.clone())),
            "{id}"
        );
    }

    // The queue connects the agent: member variables on the `;2` half.
    assert_eq!(
        within(fake.wait_for_agent(&caller)).await.as_deref(),
        Some("PJSIP/agent1")
    );
    let seen = app
        .until(|e| matches!(e, Event::ChannelVarset(v) if v.variable == "MEMBERREALTIME"))
        .await;
    assert!(seen.contains(&"ChannelVarset br-agent-2 MEMBERINTERFACE=PJSIP/agent1".to_owned()));
    assert_eq!(
        fake.channel_var("br-agent-2", "MEMBERINTERFACE").as_deref(),
        Some("PJSIP/agent1")
    );

    // Agent into the bridge, caller muted in, a prompt to the caller only.
    app.client
        .add_channel("callgate-br", "br-agent-1", false, false)
        .await
        .unwrap();
    let Event::ChannelEnteredBridge(entered) = app.next().await else {
        panic!()
    };
    assert_eq!(entered.bridge.channels, [caller.as_str(), "br-agent-1"]);
    let peers = app
        .until(|e| matches!(e, Event::ChannelVarset(v) if v.variable == "BRIDGEPEER" && e.channel_id() == Some("br-agent-1")))
        .await;
    assert_eq!(
        peers,
        [
            format!("ChannelVarset {caller} BRIDGEPEER=Local/agent@acc-agents-00000001;1"),
            "ChannelVarset br-agent-1 BRIDGEPEER=PJSIP/sim-00000001".to_owned(),
        ]
    );
    assert_eq!(
        rest(
            &fake,
            "POST",
            &format!("/channels/{caller}/mute?direction=in")
        )
        .await
        .0,
        204
    );
    assert!(fake.is_muted(&caller, Direction::In));
    assert!(!fake.is_muted(&caller, Direction::Out));
    app.client
        .play(&caller, "pb-br-1", "sound:hello-world", None)
        .await
        .unwrap();
    let Event::PlaybackStarted(p) = app.event("PlaybackStarted").await else {
        panic!()
    };
    assert_eq!(p.playback.target_uri, format!("channel:{caller}"));
    app.event("PlaybackFinished").await;

    // The muted, absorbing caller types: reported on the caller only.
    assert!(fake.press(&caller, "1999#", GAP).await);
    let mut digits = String::new();
    while digits.len() < 5 {
        if let Event::ChannelDtmfReceived(d) = app.next().await {
            assert_eq!(
                d.channel.id, caller,
                "digit passed through an absorbing bridge"
            );
            digits.push_str(&d.digit);
        }
    }
    assert_eq!(digits, "1999#");
    assert_eq!(
        rest(
            &fake,
            "DELETE",
            &format!("/channels/{caller}/mute?direction=in")
        )
        .await
        .0,
        204
    );
    assert!(!fake.is_muted(&caller, Direction::In));

    let application = app
        .client
        .get_application("callgate")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        application.channel_ids,
        ["br-agent-1", "br-agent-2", caller.as_str()]
    );
    assert_eq!(application.bridge_ids, ["callgate-br"]);

    // Teardown in the capture's order.
    app.client.hangup(&caller, None).await.unwrap();
    let seen = app
        .until(|e| matches!(e, Event::StasisEnd(s) if s.channel.id == caller))
        .await;
    assert_eq!(
        seen,
        [
            format!("ChannelHangupRequest {caller}"),
            format!("ChannelVarset {caller} BRIDGEPEER="),
            format!("ChannelLeftBridge {caller}"),
            format!("StasisEnd {caller}"),
        ]
    );
    app.client.hangup("br-agent-1", None).await.unwrap();
    let seen = app
        .until(|e| matches!(e, Event::ChannelDestroyed(d) if d.channel.id == "br-agent-2"))
        .await;
    assert_eq!(
        seen,
        [
            "ChannelHangupRequest br-agent-1",
            "ChannelVarset br-agent-1 BRIDGEPEER=",
            "ChannelLeftBridge br-agent-1",
            "StasisEnd br-agent-1",
            "ChannelVarset br-agent-1 STASISSTATUS=SUCCESS",
            "ChannelHangupRequest br-agent-2",
            "ChannelDestroyed br-agent-1",
            "ChannelHangupRequest br-agent-2",
            "ChannelDestroyed br-agent-2",
        ]
    );
    assert_eq!(fake.bridges()["callgate-br"], Vec::<String>::new());
    assert_eq!(rest(&fake, "DELETE", "/bridges/callgate-br").await.0, 204);
    let (status, body) = rest(&fake, "DELETE", "/bridges/callgate-br").await;
    assert_eq!(
        (status, body["message"].as_str()),
        (404, Some("Bridge not found"))
    );
    let Event::Other { kind } = app.next().await else {
        panic!()
    };
    assert_eq!(kind, "BridgeDestroyed");
    within(fake.wait_for_bridge_gone("callgate-br")).await;
    assert!(fake.wait_for_agent_leg(&caller).await.ended);
}

#[tokio::test]
async fn an_existing_bridge_id_is_answered_as_create_or_update() {
    let fake = fake(SimOptions::default()).await;
    let _app = app(&fake).await;
    let (status, body) = rest(&fake, "POST", "/bridges/b1?type=mixing,dtmf_events&name=b1").await;
    assert_eq!((status, body["id"].as_str()), (200, Some("b1")));
    let (status, body) = rest(&fake, "POST", "/bridges/b1?type=mixing,dtmf_events&name=b1").await;
    assert_eq!(
        (status, body["message"].as_str()),
        (
            500,
            Some("Supplying a bridge type when updating a bridge is not allowed.")
        )
    );
    assert_eq!(rest(&fake, "POST", "/bridges/b1?name=other").await.0, 500);
    let (status, body) = rest(&fake, "POST", "/bridges/b1?name=b1").await;
    assert_eq!(
        (status, body["bridge_class"].as_str()),
        (200, Some("stasis"))
    );
    assert_eq!(rest(&fake, "POST", "/bridges?bridgeId=b1").await.0, 500);
    let (status, body) = rest(&fake, "GET", "/bridges").await;
    assert_eq!((status, body[0]["id"].as_str()), (200, Some("b1")));
    assert_eq!(rest(&fake, "GET", "/bridges/b1").await.0, 200);
    let (status, body) = rest(&fake, "GET", "/bridges/nope").await;
    assert_eq!(
        (status, body["message"].as_str()),
        (404, Some("Bridge not found"))
    );
    assert_eq!(rest(&fake, "DELETE", "/bridges/b1").await.0, 204);
    assert_eq!(rest(&fake, "DELETE", "/bridges/b1").await.0, 404);
    assert!(fake.bridges().is_empty());
}

#[tokio::test]
async fn bridge_membership_errors_and_moves() {
    let fake = fake(agent_opts(SimQueue::default())).await;
    let mut app = app(&fake).await;
    let caller = anchored(&fake, &mut app, true).await;
    let (status, body) = rest(&fake, "POST", "/bridges/nope/addChannel?channel=ag-1").await;
    assert_eq!(
        (status, body["message"].as_str()),
        (404, Some("Bridge not found"))
    );
    let (status, body) = rest(&fake, "POST", "/bridges/br/addChannel?channel=nobody").await;
    assert_eq!(
        (status, body["message"].as_str()),
        (400, Some("Channel not found"))
    );
    // The `;2` half never enters Stasis.
    let (status, body) = rest(&fake, "POST", "/bridges/br/addChannel?channel=ag-2").await;
    assert_eq!(
        (status, body["message"].as_str()),
        (422, Some("Channel not in Stasis application"))
    );
    let (status, body) = rest(&fake, "POST", "/bridges/br/removeChannel?channel=ag-1").await;
    assert_eq!(
        (status, body["message"].as_str()),
        (422, Some("Channel not in this bridge"))
    );
    // A channel is in one bridge at most: adding it elsewhere moves it.
    app.client
        .create_bridge("other", &["mixing"])
        .await
        .unwrap();
    app.client
        .add_channel("other", &caller, false, true)
        .await
        .unwrap();
    let seen = app
        .until(|e| matches!(e, Event::ChannelEnteredBridge(_)))
        .await;
    assert_eq!(
        seen,
        [
            format!("ChannelLeftBridge {caller}"),
            format!("ChannelEnteredBridge {caller}"),
        ]
    );
    assert_eq!(fake.bridge_of(&caller).as_deref(), Some("other"));
    assert_eq!(fake.bridges()["br"], Vec::<String>::new());
    assert!(!fake.absorbs_dtmf(&caller));
    assert!(
        fake.is_muted(&caller, Direction::In),
        "addChannel mute=true"
    );
    app.client.remove_channel("other", &caller).await.unwrap();
    app.event("ChannelLeftBridge").await;
    assert!(!fake.is_muted(&caller, Direction::In));
    within(fake.wait_for_out_of_bridge(&caller)).await;
}

#[tokio::test]
async fn dtmf_passes_through_a_bridge_unless_absorbed() {
    for absorb in [false, true] {
        let fake = fake(agent_opts(SimQueue::default())).await;
        let mut app = app(&fake).await;
        let caller = anchored(&fake, &mut app, absorb).await;
        app.client
            .add_channel("br", "ag-1", false, false)
            .await
            .unwrap();
        within(fake.wait_for_in_bridge("ag-1")).await;
        // Muting is audio only: the digit is still reported.
        assert_eq!(
            rest(&fake, "POST", &format!("/channels/{caller}/mute"))
                .await
                .0,
            204
        );
        assert!(fake.is_muted(&caller, Direction::Both));
        assert!(fake.press(&caller, "4", GAP).await);
        // The agent's key reaches `;1`; it passes on to the caller, a phone, where nothing reports it.
        assert!(fake.agent_press(&caller, "*", GAP).await);
        let seen = app
            .until(|e| matches!(e, Event::ChannelDtmfReceived(d) if d.digit == "*"))
            .await;
        let dtmf: Vec<&String> = seen
            .iter()
            .filter(|l| l.starts_with("ChannelDtmfReceived"))
            .collect();
        let mut expected = vec![format!("ChannelDtmfReceived {caller}")];
        if !absorb {
            // The agent leg's `;2` half reports the caller's digit as received.
            expected.push("ChannelDtmfReceived ag-2".into());
        }
        expected.push("ChannelDtmfReceived ag-1".into());
        assert_eq!(dtmf, expected.iter().collect::<Vec<_>>(), "absorb {absorb}");
    }
}

#[tokio::test]
async fn no_agent_within_the_queue_timeout_ends_the_leg() {
    let fake = fake(agent_opts(SimQueue {
        members: vec![SimAgent::new("PJSIP/agent1", Duration::from_secs(60))],
        timeout: Some(Duration::from_millis(30)),
    }))
    .await;
    let mut app = app(&fake).await;
    let caller = anchored(&fake, &mut app, true).await;
    app.client
        .add_channel("br", "ag-1", false, false)
        .await
        .unwrap();
    assert_eq!(within(fake.wait_for_agent(&caller)).await, None);
    let seen = app
        .until(|e| matches!(e, Event::ChannelDestroyed(d) if d.channel.id == "ag-1"))
        .await;
    let tail: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .skip_while(|l| !l.starts_with("ChannelHangupRequest"))
        .collect();
    assert_eq!(
        tail,
        [
            "ChannelHangupRequest ag-2",
            "ChannelDestroyed ag-2",
            "ChannelHangupRequest ag-1",
            "ChannelVarset ag-1 BRIDGEPEER=",
            "ChannelLeftBridge ag-1",
            "StasisEnd ag-1",
            "ChannelVarset ag-1 STASISSTATUS=SUCCESS",
            "ChannelDestroyed ag-1",
        ]
    );
    assert!(fake.in_application(&caller));
    assert_eq!(fake.bridges()["br"], [caller.as_str()]);
    assert_eq!(app.client.get_channel("ag-2").await, Ok(None));
}

#[tokio::test]
async fn agent_hang_up_ends_the_leg_and_leaves_the_caller_bridged() {
    let fake = fake(agent_opts(SimQueue::agent("PJSIP/agent7", Duration::ZERO))).await;
    let mut app = app(&fake).await;
    let caller = anchored(&fake, &mut app, true).await;
    assert_eq!(
        within(fake.wait_for_agent("ag-2")).await.as_deref(),
        Some("PJSIP/agent7")
    );
    app.client
        .add_channel("br", "ag-1", false, false)
        .await
        .unwrap();
    within(fake.wait_for_in_bridge("ag-1")).await;
    assert!(fake.agent_hang_up(&caller));
    let seen = app
        .until(|e| matches!(e, Event::ChannelDestroyed(d) if d.channel.id == "ag-1"))
        .await;
    let tail: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .skip_while(|l| !l.starts_with("ChannelHangupRequest"))
        .collect();
    assert_eq!(
        tail[..3],
        [
            "ChannelHangupRequest ag-2",
            "ChannelDestroyed ag-2",
            "ChannelHangupRequest ag-1"
        ]
    );
    assert!(tail.contains(&"ChannelLeftBridge ag-1"));
    assert!(fake.wait_for_agent_leg(&caller).await.ended);
    assert!(!fake.agent_hang_up(&caller), "no live leg left");
    assert_eq!(fake.bridge_of(&caller).as_deref(), Some("br"));
    let end = within(fake.wait_for_channel_end("ag-1")).await;
    assert_eq!(end.hung_up_by, Some(Party::Caller));
}

#[tokio::test]
async fn caller_hang_up_while_bridged_and_continue_out_of_a_bridge() {
    let fake = fake(agent_opts(SimQueue::default())).await;
    let mut app = app(&fake).await;
    let caller = anchored(&fake, &mut app, true).await;
    // `continue` on a bridged channel: out of the bridge first.
    app.client
        .add_channel("br", "ag-1", false, false)
        .await
        .unwrap();
    within(fake.wait_for_in_bridge("ag-1")).await;
    app.client
        .continue_in_dialplan("ag-1", "acc-after", "s", 1)
        .await
        .unwrap();
    let seen = app
        .until(|e| matches!(e, Event::StasisEnd(s) if s.channel.id == "ag-1"))
        .await;
    let tail: Vec<&str> = seen.iter().map(String::as_str).rev().take(3).collect();
    assert_eq!(
        tail,
        [
            "StasisEnd ag-1",
            "ChannelLeftBridge ag-1",
            "ChannelVarset ag-1 BRIDGEPEER="
        ]
    );
    // Mute on a channel that left Stasis: 409; once gone: 404.
    assert_eq!(
        rest(&fake, "POST", "/channels/ag-1/mute?direction=in")
            .await
            .0,
        409
    );
    let (status, body) = rest(
        &fake,
        "POST",
        &format!("/channels/{caller}/mute?direction=up"),
    )
    .await;
    assert_eq!(
        (status, body["message"].as_str()),
        (400, Some("Invalid direction specified"))
    );
    within(fake.wait_for_channel_gone("ag-1")).await;
    assert_eq!(
        rest(&fake, "POST", "/channels/ag-1/mute?direction=in")
            .await
            .0,
        404
    );
    assert_eq!(rest(&fake, "DELETE", "/channels/ag-1/mute").await.0, 404);
    within(fake.wait_for_channel_gone("ag-2")).await;

    // The caller hangs up while bridged: no ChannelDestroyed after StasisEnd for a dialplan call.
    fake.hang_up(&caller);
    let seen = app
        .until(|e| matches!(e, Event::StasisEnd(s) if s.channel.id == caller))
        .await;
    let tail: Vec<String> = seen.into_iter().rev().take(2).collect();
    assert_eq!(
        tail,
        [
            format!("StasisEnd {caller}"),
            format!("ChannelLeftBridge {caller}")
        ]
    );
    assert_eq!(fake.bridges()["br"], Vec::<String>::new());
}

#[tokio::test]
async fn bridges_and_legs_survive_without_a_socket() {
    let fake = fake(agent_opts(SimQueue::agent(
        "PJSIP/agent1",
        Duration::from_millis(30),
    )))
    .await;
    let mut app = app(&fake).await;
    let caller = anchored(&fake, &mut app, true).await;
    app.client
        .add_channel("br", "ag-1", false, false)
        .await
        .unwrap();
    within(fake.wait_for_in_bridge("ag-1")).await;
    fake.set_accepting(false);
    fake.drop_websocket();
    within(fake.wait_for_disconnected()).await;
    // The agent answers during the gap: state changes, the events are lost.
    assert!(within(fake.wait_for_agent(&caller)).await.is_some());
    assert!(fake.in_application(&caller) && fake.in_application("ag-1"));
    assert_eq!(fake.bridges()["br"], [caller.as_str(), "ag-1"]);
    let application = app
        .client
        .get_application("callgate")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(application.bridge_ids, ["br"]);
    assert_eq!(application.channel_ids, ["ag-1", "ag-2", caller.as_str()]);
    assert_eq!(
        app.client.get_variable("ag-2", "MEMBERINTERFACE").await,
        Ok(Some("PJSIP/agent1".into()))
    );
    fake.set_accepting(true);
    loop {
        match tokio::time::timeout(WAIT, app.rx.recv()).await.unwrap() {
            Some(Incoming::Connected) => break,
            Some(Incoming::Event(e)) => {
                let member =
                    matches!(&*e, Event::ChannelVarset(v) if v.variable.starts_with("MEMBER"));
                assert!(!member, "gap event leaked");
            }
            _ => {}
        }
    }
    // Control and events work again for the re-adopted bridge.
    app.client.remove_channel("br", &caller).await.unwrap();
    let Event::ChannelLeftBridge(left) = app.event("ChannelLeftBridge").await else {
        panic!()
    };
    assert_eq!(left.bridge.channels, ["ag-1"]);
}
