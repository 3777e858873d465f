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
