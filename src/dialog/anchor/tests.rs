//! Scripted anchored calls on virtual time: each test is a short transcript of what the machine asked
//! the PBX and the provider to do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::policy::test_support::{policy, route};
use crate::policy::Mode;
use crate::verify::testing::{identity, lines};
use crate::verify::{Initiator, OrderRef, Poll, Started};

const NUMBER: &str = "199908072391";

struct H {
    a: Anchor,
    now: Instant,
    timers: HashMap<Timer, Instant>,
    log: Vec<String>,
    muted: bool,
    /// Check generation → its open order.
    orders: HashMap<u32, OrderRef>,
    starts_in_flight: Vec<u32>,
    next_order: u32,
    playing: HashMap<Leg, PlaybackId>,
}

fn anchored_policy() -> QueuePolicy {
    let mut p = policy();
    p.mode = Mode::DuringCall;
    p.routes.agent = Some(route("agents,support,1"));
    p.routes.no_agent = Some(route("queues,support-noagent,1"));
    p.routes.after_agent = Some(route("queues,survey,1"));
    p.agent_keys = "*5".into();
    p
}

impl H {
    fn new(p: QueuePolicy) -> H {
        #[allow(clippy::disallowed_methods)] // a test's base instant; time is virtual after it
        let now = Instant::now();
        let info = CallInfo {
            channel_language: "en".into(),
            initiator: Initiator::Caller,
            today: time::macros::date!(2026 - 11 - 23),
        };
        let a = Anchor::new(
            Arc::new(p),
            verify::Settings::default(),
            info,
            route("queues,support-fallback,1"),
            now,
        );
        let mut h = H {
            a,
            now,
            timers: HashMap::new(),
            log: Vec::new(),
            muted: false,
            orders: HashMap::new(),
            starts_in_flight: Vec::new(),
            next_order: 0,
            playing: HashMap::new(),
        };
        h.drain();
        h
    }

    /// Anchored with an agent talking to the caller.
    fn talking() -> H {
        let mut h = H::new(anchored_policy());
        h.input(Input::Anchored(true));
        h.input(Input::AgentLegUp);
        h.input(Input::AgentAnswered("PJSIP/1001".into()));
        h.log.clear();
        h
    }

    fn drain(&mut self) {
        while let Some(c) = self.a.poll_command() {
            match c {
                Command::ArmTimer { timer, at } => {
                    self.timers.insert(timer, at);
                }
                Command::DisarmTimer(t) => {
                    self.timers.remove(&t);
                }
                Command::Anchor => self.log.push("anchor".into()),
                Command::AddAgentLeg => self.log.push("add agent leg".into()),
                Command::HangupAgentLeg => self.log.push("hang up agent leg".into()),
                Command::DestroyBridge => self.log.push("destroy bridge".into()),
                Command::MuteCaller(on) => {
                    assert_ne!(self.muted, on, "mute state repeated");
                    self.muted = on;
                    self.log
                        .push(if on { "mute caller" } else { "unmute caller" }.into());
                }
                Command::Play {
                    leg, id, prompts, ..
                } => {
                    let names: Vec<_> = prompts.iter().map(|p| p.code()).collect();
                    self.log
                        .push(format!("play to {leg:?}: {}", names.join("+")).to_lowercase());
                    self.playing.insert(leg, id);
                }
                Command::StopPlayback(id) => {
                    self.playing.retain(|_, p| *p != id);
                    self.log.push("stop prompt".into());
                }
                Command::Idp(gen, IdpCommand::Start(o)) => {
                    assert_eq!(o.number.expose_for_idp(), NUMBER);
                    self.starts_in_flight.push(gen);
                    self.log.push(format!("idp start #{gen}"));
                }
                Command::Idp(gen, IdpCommand::Poll(_)) => self.log.push(format!("idp poll #{gen}")),
                Command::Idp(gen, IdpCommand::Cancel(_)) => {
                    self.orders.remove(&gen);
                    self.log.push(format!("idp cancel #{gen}"));
                }
                Command::Progress { gen, stage } => {
                    self.log.push(format!("progress #{gen} {}", stage.code()))
                }
                Command::AgentConnected(a) => self.log.push(format!("agent {a}")),
                Command::CheckStarted { gen, method, .. } => self
                    .log
                    .push(format!("check #{gen} started ({})", method.code())),
                Command::CheckDone { gen, outcome, .. } => {
                    self.log.push(format!("check #{gen} done: {outcome}"))
                }
                Command::Route { route, why } => {
                    self.log.push(format!("route {route} ({})", why.code()))
                }
                Command::HangupCaller => self.log.push("hang up caller".into()),
                Command::Ended => self.log.push("ended".into()),
                Command::Released => self.log.push("released".into()),
            }
        }
    }

    fn input(&mut self, i: Input) {
        self.a.handle(i, self.now);
        self.drain();
    }

    fn keys(&mut self, s: &str) {
        for d in s.chars() {
            self.now += Duration::from_millis(300);
            self.input(Input::CallerDtmf(d));
        }
    }

    fn fire(&mut self, t: Timer) {
        let at = self
            .timers
            .remove(&t)
            .unwrap_or_else(|| panic!("{t:?} not armed"));
        self.now = self.now.max(at);
        self.input(Input::Timer(t));
    }

    fn started(&mut self) {
        let gen = self.starts_in_flight.remove(0);
        self.next_order += 1;
        let order = OrderRef(format!("o{}", self.next_order));
        self.orders.insert(gen, order.clone());
        self.input(Input::Idp(
            gen,
            verify::Input::Started(Ok(Started {
                order,
                poll_interval: None,
                word_pair: None,
            })),
        ));
    }

    fn poll(&mut self, gen: u32, answer: Poll) {
        self.fire(Timer::Verify(gen, verify::Timer::Next));
        if matches!(answer, Poll::Complete(_) | Poll::Failed(_)) {
            self.orders.remove(&gen);
        }
        self.input(Input::Idp(gen, verify::Input::Polled(Ok(answer))));
    }

    fn prompt_ends(&mut self, leg: Leg) {
        let id = self.playing.remove(&leg).expect("a prompt plays there");
        self.now += Duration::from_secs(2);
        self.input(Input::PlaybackEnded(id));
    }

    fn transcript(&mut self) -> String {
        std::mem::take(&mut self.log).join("\n")
    }
}

#[test]
fn anchoring_then_an_agent_answers() {
    let mut h = H::new(anchored_policy());
    assert!(h.timers.contains_key(&Timer::AgentLegUp));
    h.input(Input::Anchored(true));
    assert_eq!(
        h.a.start_check(None, false, h.now),
        Err(Refusal::NotAnchored)
    );
    h.input(Input::AgentLegUp);
    assert!(!h.timers.contains_key(&Timer::AgentLegUp));
    h.input(Input::AgentAnswered("PJSIP/1001".into()));
    assert_eq!(
        h.transcript(),
        lines(
            "
            anchor
            add agent leg
            agent PJSIP/1001
            "
        )
    );
    assert!(h.a.can_verify());
    assert_eq!(h.a.agent(), Some("PJSIP/1001"));
}

#[test]
fn keypad_check_mutes_the_caller_while_typing_and_verifies() {
    let mut h = H::talking();
    h.a.start_check(None, false, h.now).unwrap();
    h.drain();
    h.keys("1999");
    h.keys("08072391#");
    h.started();
    h.prompt_ends(Leg::Caller);
    h.poll(1, Poll::Pending(Stage::Identifying));
    h.poll(1, Poll::Complete(identity(NUMBER)));
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (keypad)
            mute caller
            play to caller: enter-number
            stop prompt
            unmute caller
            idp start #1
            progress #1 order_created
            play to caller: open-app
            idp poll #1
            progress #1 identifying
            idp poll #1
            progress #1 done
            check #1 done: verified
            "
        )
    );
    assert!(!h.muted && h.orders.is_empty());
}

#[test]
fn a_number_the_agent_typed_starts_at_once_without_prompts() {
    let mut h = H::talking();
    let n = h.a.parse_number(NUMBER).unwrap();
    h.a.start_check(Some(n), false, h.now).unwrap();
    h.drain();
    h.started();
    h.poll(1, Poll::Complete(identity(NUMBER)));
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (agent_typed)
            idp start #1
            progress #1 order_created
            idp poll #1
            progress #1 done
            check #1 done: verified
            "
        )
    );
    assert_eq!(h.a.parse_number("123").err(), Some(Refusal::InvalidNumber));
}

#[test]
fn a_new_check_supersedes_the_one_in_progress() {
    let mut h = H::talking();
    let n = h.a.parse_number(NUMBER).unwrap();
    h.a.start_check(Some(n.clone()), false, h.now).unwrap();
    h.drain();
    h.started();
    h.a.start_check(Some(n), false, h.now).unwrap();
    h.drain();
    h.started();
    // A late answer for the first order does not touch the second check.
    h.input(Input::Idp(1, verify::Input::CancelDone(Ok(()))));
    h.poll(2, Poll::Complete(identity(NUMBER)));
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (agent_typed)
            idp start #1
            progress #1 order_created
            idp cancel #1
            progress #1 done
            check #1 done: failed/superseded
            check #2 started (agent_typed)
            idp start #2
            progress #2 order_created
            idp poll #2
            progress #2 done
            check #2 done: verified
            "
        )
    );
    assert!(h.a.retiring.is_empty());
}

#[test]
fn the_agent_cancels_while_the_caller_types_and_the_caller_is_unmuted() {
    let mut h = H::talking();
    h.a.start_check(None, false, h.now).unwrap();
    h.drain();
    h.prompt_ends(Leg::Caller);
    h.keys("1999");
    h.a.cancel_check(h.now).unwrap();
    h.drain();
    assert_eq!(h.a.cancel_check(h.now), Err(Refusal::NothingToCancel));
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (keypad)
            mute caller
            play to caller: enter-number
            unmute caller
            check #1 done: failed/agent_cancelled
            "
        )
    );
    assert!(!h.timers.contains_key(&Timer::InterDigit));
}

#[test]
fn bad_entries_end_the_check_unmuted() {
    let mut h = H::talking();
    h.a.start_check(None, false, h.now).unwrap();
    h.drain();
    h.prompt_ends(Leg::Caller);
    h.keys("123#");
    h.prompt_ends(Leg::Caller);
    h.fire(Timer::FirstDigit);
    h.prompt_ends(Leg::Caller);
    h.keys("199908072390#");
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (keypad)
            mute caller
            play to caller: enter-number
            play to caller: invalid-number+enter-number
            play to caller: no-input+enter-number
            unmute caller
            check #1 done: failed/invalid_number
            "
        )
    );
}

#[test]
fn agent_keys_start_a_keypad_check_and_the_agent_hears_the_outcome() {
    let mut h = H::talking();
    h.input(Input::AgentDtmf('*'));
    h.input(Input::AgentDtmf('5'));
    h.keys("199908072391#");
    h.started();
    h.prompt_ends(Leg::Caller);
    h.poll(1, Poll::Failed(Reason::DeclinedCall));
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (keypad)
            mute caller
            play to caller: enter-number
            stop prompt
            unmute caller
            idp start #1
            progress #1 order_created
            play to caller: open-app
            idp poll #1
            progress #1 done
            check #1 done: failed/declined_call
            play to agent: agent-fraud
            "
        )
    );
}

#[test]
fn an_agent_named_before_the_leg_entered_stasis_is_still_bridged_once() {
    let mut h = H::new(anchored_policy());
    h.input(Input::Anchored(true));
    h.input(Input::AgentAnswered("PJSIP/1001".into()));
    h.input(Input::AgentLegUp);
    assert_eq!(
        h.transcript(),
        lines(
            "
            anchor
            add agent leg
            agent PJSIP/1001
            "
        )
    );
    assert!(h.a.can_verify());
}

#[test]
fn no_agent_answers_and_the_caller_takes_the_no_agent_route() {
    let mut h = H::new(anchored_policy());
    h.input(Input::Anchored(true));
    h.input(Input::AgentLegUp);
    h.log.clear();
    h.input(Input::AgentLegEnded);
    assert_eq!(
        h.transcript(),
        lines(
            "
            hang up agent leg
            destroy bridge
            route queues,support-noagent,1 (no_agent)
            ended
            "
        )
    );
    assert!(h.a.is_done());
}

#[test]
fn an_agent_leg_that_never_comes_up_is_no_agent_too() {
    let mut h = H::new(anchored_policy());
    h.input(Input::Anchored(true));
    h.log.clear();
    h.fire(Timer::AgentLegUp);
    assert!(h.transcript().contains("(no_agent)"));
}

#[test]
fn anchoring_that_fails_sends_the_caller_to_the_fallback() {
    let mut h = H::new(anchored_policy());
    h.log.clear();
    h.input(Input::Anchored(false));
    assert!(h
        .transcript()
        .contains("route queues,support-fallback,1 (not_anchored)"));
}

#[test]
fn the_agent_hangs_up_mid_check_and_the_caller_goes_after_agent() {
    let mut h = H::talking();
    let n = h.a.parse_number(NUMBER).unwrap();
    h.a.start_check(Some(n), false, h.now).unwrap();
    h.drain();
    h.started();
    h.input(Input::AgentLegEnded);
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (agent_typed)
            idp start #1
            progress #1 order_created
            idp cancel #1
            progress #1 done
            check #1 done: failed/agent_cancelled
            hang up agent leg
            destroy bridge
            route queues,survey,1 (after_agent)
            ended
            "
        )
    );
    assert!(h.orders.is_empty());
}

#[test]
fn the_caller_hangs_up_with_a_start_in_flight_and_its_order_is_still_cancelled() {
    let mut h = H::talking();
    let n = h.a.parse_number(NUMBER).unwrap();
    h.a.start_check(Some(n), false, h.now).unwrap();
    h.drain();
    h.input(Input::CallerGone);
    assert!(!h.a.is_done(), "a start is in flight");
    h.started();
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (agent_typed)
            idp start #1
            progress #1 done
            check #1 done: failed/caller_hung_up
            hang up agent leg
            destroy bridge
            ended
            idp cancel #1
            "
        )
    );
    h.input(Input::Idp(1, verify::Input::CancelDone(Ok(()))));
    assert!(h.a.is_done());
}

#[test]
fn shutdown_releases_the_bridged_call_and_cancels_the_check() {
    let mut h = H::talking();
    h.a.start_check(None, false, h.now).unwrap();
    h.drain();
    h.input(Input::Shutdown);
    assert_eq!(
        h.transcript(),
        lines(
            "
            check #1 started (keypad)
            mute caller
            play to caller: enter-number
            stop prompt
            unmute caller
            check #1 done: interrupted/restart
            released
            "
        )
    );
    assert!(h.a.is_done() && h.a.is_released());
}

#[test]
fn an_adopted_call_can_be_verified_once_its_agent_is_known() {
    #[allow(clippy::disallowed_methods)] // a test's base instant
    let now = Instant::now();
    let info = CallInfo {
        channel_language: "sv".into(),
        initiator: Initiator::Caller,
        today: time::macros::date!(2026 - 11 - 23),
    };
    let p = Arc::new(anchored_policy());
    let mut waiting = Anchor::adopt(
        Arc::clone(&p),
        verify::Settings::default(),
        info.clone(),
        None,
    );
    assert_eq!(
        waiting.start_check(None, false, now),
        Err(Refusal::NotAnchored)
    );
    waiting.handle(Input::AgentAnswered("PJSIP/7".into()), now);
    assert!(waiting.can_verify());
    let mut talking = Anchor::adopt(p, verify::Settings::default(), info, Some("PJSIP/7".into()));
    assert!(talking.start_check(None, false, now).is_ok());
}

#[test]
fn a_keypad_check_refused_by_the_limits_tells_the_caller() {
    let mut h = H::talking();
    h.a.start_check(None, false, h.now).unwrap();
    h.drain();
    h.keys("199908072391#");
    let gen = h.starts_in_flight.remove(0);
    h.input(Input::Idp(
        gen,
        verify::Input::Started(Err(verify::ProviderError::Rejected(Reason::RateLimited))),
    ));
    let t = h.transcript();
    assert!(
        t.ends_with("check #1 done: failed/rate_limited\nplay to caller: rate-limited"),
        "{t}"
    );
}

#[test]
fn an_agent_typed_check_refused_by_the_limits_plays_nothing_to_the_caller() {
    let mut h = H::talking();
    let n = h.a.parse_number(NUMBER).unwrap();
    h.a.start_check(Some(n), false, h.now).unwrap();
    h.drain();
    let gen = h.starts_in_flight.remove(0);
    h.input(Input::Idp(
        gen,
        verify::Input::Started(Err(verify::ProviderError::Rejected(Reason::RateLimited))),
    ));
    let t = h.transcript();
    assert!(t.ends_with("check #1 done: failed/rate_limited"), "{t}");
    assert!(!t.contains("rate-limited"), "{t}");
}
