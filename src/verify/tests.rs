//! Scripted lifecycles of `verify::Session` on virtual time.

use std::time::{Duration, Instant};

use super::testing::{identity, lines};
use super::*;

const NUMBER: &str = "199908072391";

struct H {
    s: Session,
    now: Instant,
    t0: Instant,
    log: Vec<String>,
    timers: Vec<(Timer, Instant)>,
}

impl H {
    fn new(settings: Settings) -> H {
        #[allow(clippy::disallowed_methods)] // a test\'s base instant; time is virtual after it
        let now = Instant::now();
        let order = Order {
            number: PersonalNumber::parse_swedish_12(NUMBER).unwrap(),
            initiator: Initiator::Caller,
            text: None,
            pin_code: false,
        };
        let s = Session::new(order, settings, now);
        let mut h = H {
            s,
            now,
            t0: now,
            log: vec![],
            timers: vec![],
        };
        h.drain();
        h
    }

    fn drain(&mut self) {
        while let Some(c) = self.s.poll_command() {
            match c {
                Command::ArmTimer { timer, at } => {
                    self.timers.retain(|(t, _)| *t != timer);
                    self.timers.push((timer, at));
                    if timer == Timer::Next {
                        self.log
                            .push(format!("next +{}ms", (at - self.now).as_millis()));
                    }
                }
                Command::DisarmTimer(timer) => self.timers.retain(|(t, _)| *t != timer),
                Command::Start(_) => self.log.push("start".into()),
                Command::Poll(r) => self.log.push(format!("poll {}", r.0)),
                Command::Cancel(r) => self.log.push(format!("cancel {}", r.0)),
                Command::Progress(s) => self.log.push(format!("progress {}", s.code())),
                Command::Finished(c) => self.log.push(format!("finished {}", c.outcome)),
            }
        }
    }

    fn input(&mut self, i: Input) {
        self.s.handle(i, self.now);
        self.drain();
    }

    fn fire(&mut self, timer: Timer) {
        let pos = self
            .timers
            .iter()
            .position(|(t, _)| *t == timer)
            .unwrap_or_else(|| panic!("{timer:?} not armed"));
        let (_, at) = self.timers.remove(pos);
        self.now = self.now.max(at);
        self.input(Input::Timer(timer));
    }

    fn started(&mut self, interval: Option<Duration>) {
        self.input(Input::Started(Ok(Started {
            order: OrderRef("o1".into()),
            poll_interval: interval,
            word_pair: None,
        })));
    }

    fn transcript(&self) -> String {
        self.log.join("\n")
    }
}

#[test]
fn polls_every_two_seconds_through_the_stages_to_verified() {
    let mut h = H::new(Settings::default());
    h.started(None);
    for stage in [
        Stage::AwaitingApp,
        Stage::ConfirmingCall,
        Stage::Identifying,
    ] {
        h.fire(Timer::Next);
        h.input(Input::Polled(Ok(Poll::Pending(stage))));
    }
    h.fire(Timer::Next);
    h.input(Input::Polled(Ok(Poll::Complete(identity(NUMBER)))));
    assert_eq!(
        h.transcript(),
        lines(
            "start
             progress order_created
             next +2000ms
             poll o1
             progress awaiting_app
             next +2000ms
             poll o1
             progress confirming_call
             next +2000ms
             poll o1
             progress identifying
             next +2000ms
             poll o1
             progress done
             finished verified"
        )
    );
    assert!(h.s.is_quiescent());
    assert!(h.timers.is_empty());
}

#[test]
fn never_polls_faster_than_the_floor() {
    let mut h = H::new(Settings {
        poll_interval: Duration::from_millis(10),
        ..Settings::default()
    });
    h.started(Some(Duration::from_millis(100)));
    h.fire(Timer::Next);
    h.input(Input::Polled(Ok(Poll::Pending(Stage::AwaitingApp))));
    h.fire(Timer::Next);
    assert_eq!(h.now - h.t0, Duration::from_secs(2));
    // A provider's slower interval (CIBA) is honoured.
    let mut h = H::new(Settings::default());
    h.started(Some(Duration::from_secs(5)));
    assert!(h.transcript().ends_with("next +5000ms"));
}

#[test]
fn a_start_not_sent_is_retried_then_unavailable() {
    let mut h = H::new(Settings::default());
    for _ in 0..2 {
        h.input(Input::Started(Err(ProviderError::NotSent)));
        h.fire(Timer::Next);
    }
    h.input(Input::Started(Err(ProviderError::NotSent)));
    assert_eq!(
        h.transcript(),
        lines(
            "start
             next +1000ms
             start
             next +1000ms
             start
             progress done
             finished unavailable/provider_unavailable"
        )
    );
}

#[test]
fn a_start_with_unknown_outcome_is_never_retried() {
    let mut h = H::new(Settings::default());
    h.input(Input::Started(Err(ProviderError::OutcomeUnknown)));
    assert_eq!(
        h.transcript(),
        lines("start\nprogress done\nfinished unavailable/provider_error")
    );
}

#[test]
fn maintenance_is_retried_quietly_within_a_budget() {
    let mut h = H::new(Settings::default());
    let mut starts = 1;
    loop {
        h.input(Input::Started(Err(ProviderError::Unavailable)));
        if h.s.conclusion().is_some() {
            break;
        }
        h.fire(Timer::Next);
        starts += 1;
    }
    assert_eq!(starts, 5);
    assert!(h.now - h.t0 <= Settings::default().unavailable_budget);
    assert!(h
        .transcript()
        .ends_with("finished unavailable/provider_unavailable"));
}

#[test]
fn rate_limited_start_waits_if_short_else_busy() {
    let mut h = H::new(Settings::default());
    h.input(Input::Started(Err(ProviderError::RateLimited {
        retry_after: Some(Duration::from_secs(1)),
    })));
    assert!(h.transcript().ends_with("next +1000ms"));
    let mut h = H::new(Settings::default());
    h.input(Input::Started(Err(ProviderError::RateLimited {
        retry_after: Some(Duration::from_secs(60)),
    })));
    assert!(h
        .transcript()
        .ends_with("finished unavailable/provider_busy"));
}

#[test]
fn already_in_progress_is_retried_once_never_looped() {
    let mut h = H::new(Settings::default());
    let aip = || Input::Started(Err(ProviderError::Rejected(Reason::AlreadyInProgress)));
    h.input(aip());
    h.fire(Timer::Next);
    h.input(aip());
    assert_eq!(
        h.transcript(),
        lines(
            "start
             next +1000ms
             start
             progress done
             finished failed/already_in_progress"
        )
    );
}

#[test]
fn a_refused_number_fails_at_once() {
    let mut h = H::new(Settings::default());
    h.input(Input::Started(Err(ProviderError::Rejected(
        Reason::InvalidNumber,
    ))));
    assert!(h.transcript().ends_with("finished failed/invalid_number"));
}

#[test]
fn failed_polls_are_retried_then_the_order_is_cancelled() {
    let mut h = H::new(Settings::default());
    h.started(None);
    for _ in 0..3 {
        h.fire(Timer::Next);
        h.input(Input::Polled(Err(ProviderError::OutcomeUnknown)));
    }
    assert!(h
        .transcript()
        .ends_with("poll o1\ncancel o1\nprogress done\nfinished unavailable/provider_unavailable"));
}

#[test]
fn timeout_cancels_the_order() {
    let mut h = H::new(Settings::default());
    h.started(None);
    h.fire(Timer::Deadline);
    assert_eq!(h.now - h.t0, Duration::from_secs(120));
    assert!(h
        .transcript()
        .ends_with("cancel o1\nprogress done\nfinished failed/timeout"));
}

#[test]
fn cancel_during_start_cancels_the_order_once_it_exists() {
    let mut h = H::new(Settings::default());
    h.input(Input::Cancel(Reason::CallerHungUp));
    assert!(!h.s.is_quiescent());
    h.started(None);
    assert_eq!(
        h.transcript(),
        lines(
            "start
             progress done
             finished failed/caller_hung_up
             cancel o1"
        )
    );
    assert!(h.s.is_quiescent());
}

#[test]
fn another_persons_identity_fails_closed() {
    let mut h = H::new(Settings::default());
    h.started(None);
    h.fire(Timer::Next);
    h.input(Input::Polled(Ok(Poll::Complete(identity("196802020575")))));
    assert!(h
        .transcript()
        .ends_with("finished failed/identity_mismatch"));
    assert!(h.s.conclusion().and_then(|c| c.identity.as_ref()).is_none());
}

#[test]
fn provider_failure_reasons_pass_through_and_end_the_check() {
    for reason in [
        Reason::UserCancelled,
        Reason::DeclinedCall,
        Reason::IdBlocked,
    ] {
        let mut h = H::new(Settings::default());
        h.started(None);
        h.fire(Timer::Next);
        h.input(Input::Polled(Ok(Poll::Failed(reason))));
        assert!(h
            .transcript()
            .ends_with(&format!("finished failed/{reason}")));
        // Nothing happens after the end.
        h.input(Input::Resume);
        h.input(Input::Cancel(Reason::CallerHungUp));
        assert!(h
            .transcript()
            .ends_with(&format!("finished failed/{reason}")));
    }
}

#[test]
fn resume_polls_at_once() {
    let mut h = H::new(Settings::default());
    h.started(None);
    h.input(Input::Resume);
    assert!(h.transcript().ends_with("next +2000ms\npoll o1"));
    assert!(!h.timers.iter().any(|(t, _)| *t == Timer::Next));
}

#[test]
fn a_poll_the_provider_cannot_serve_ends_the_check_and_cancels_the_order() {
    let mut h = H::new(Settings::default());
    h.started(None);
    h.fire(Timer::Next);
    h.input(Input::Polled(Err(ProviderError::Fatal)));
    assert!(h
        .transcript()
        .ends_with("poll o1\ncancel o1\nprogress done\nfinished unavailable/provider_error"));
}

#[test]
fn slow_down_adds_five_seconds_for_the_rest_of_the_check() {
    let mut h = H::new(Settings::default());
    h.started(Some(Duration::from_secs(5)));
    h.fire(Timer::Next);
    h.input(Input::Polled(Ok(Poll::SlowDown(Stage::AwaitingApp))));
    h.fire(Timer::Next);
    h.input(Input::Polled(Ok(Poll::Pending(Stage::AwaitingApp))));
    h.fire(Timer::Next);
    h.input(Input::Polled(Ok(Poll::SlowDown(Stage::AwaitingApp))));
    h.fire(Timer::Next);
    h.input(Input::Polled(Ok(Poll::Complete(identity(NUMBER)))));
    assert_eq!(
        h.transcript(),
        lines(
            "start
             progress order_created
             next +5000ms
             poll o1
             progress awaiting_app
             next +10000ms
             poll o1
             next +10000ms
             poll o1
             next +15000ms
             poll o1
             progress done
             finished verified"
        )
    );
}
