//! Scripted flows of `dialog::Call` on virtual time, each a short transcript, plus a randomized
//! input-sequence test of the dialogue's invariants.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::policy::test_support::{policy, route};
use crate::verify::testing::{identity, lines};
use crate::verify::{Poll, ProviderError, Started};

const NUMBER: &str = "199908072391";
const OTHER: &str = "196802020575";

/// A test driver: plays the PBX and the provider around one `Call`, on virtual time.
struct H {
    call: Call,
    now: Instant,
    start: Instant,
    timers: HashMap<Timer, Instant>,
    log: Vec<String>,
    playing: Vec<(PlaybackId, Instant, bool)>,
    finishes: Vec<(Outcome, Option<Route>)>,
    pbx_after_finish: usize,
    open_orders: Vec<OrderRef>,
    start_in_flight: bool,
    next_order: u32,
    hung_up: bool,
}

impl H {
    fn new(policy: QueuePolicy) -> H {
        #[allow(clippy::disallowed_methods)] // a test\'s base instant; time is virtual after it
        let now = Instant::now();
        let info = CallInfo {
            channel_language: "sv".into(),
            initiator: Initiator::Caller,
            today: time::macros::date!(2026 - 11 - 23),
        };
        let call = Call::new(Arc::new(policy), verify::Settings::default(), info, now);
        let mut h = H {
            call,
            now,
            start: now,
            timers: HashMap::new(),
            log: Vec::new(),
            playing: Vec::new(),
            finishes: Vec::new(),
            pbx_after_finish: 0,
            open_orders: Vec::new(),
            start_in_flight: false,
            next_order: 0,
            hung_up: false,
        };
        h.drain();
        h
    }

    fn drain(&mut self) {
        while let Some(c) = self.call.poll_command() {
            let finished = !self.finishes.is_empty();
            if finished && !matches!(c, Command::Idp(IdpCommand::Cancel(_))) {
                self.pbx_after_finish += 1;
            }
            match c {
                Command::ArmTimer { timer, at } => {
                    self.timers.insert(timer, at);
                }
                Command::DisarmTimer(timer) => {
                    self.timers.remove(&timer);
                }
                Command::Answer => self.log.push("answer".into()),
                Command::Play { id, prompts, .. } => {
                    let names: Vec<_> = prompts.iter().map(|p| p.code()).collect();
                    self.log.push(format!("play {}", names.join("+")));
                    self.playing.push((id, self.now, false));
                }
                Command::StopPlayback(id) => {
                    self.log.push("stop prompt".into());
                    if let Some(p) = self.playing.iter_mut().find(|p| p.0 == id) {
                        p.2 = true;
                    }
                }
                Command::CheckPlayback(id) => {
                    let running = self.playing.iter().any(|p| p.0 == id && !p.2);
                    self.log.push(format!(
                        "check prompt ({})",
                        if running { "playing" } else { "ended" }
                    ));
                }
                Command::StartMoh { .. } => self.log.push("moh on".into()),
                Command::StopMoh => self.log.push("moh off".into()),
                Command::Idp(IdpCommand::Start(order)) => {
                    assert!(!self.start_in_flight, "two starts in flight");
                    self.start_in_flight = true;
                    let who = if order.number.expose_for_idp() == NUMBER {
                        "number"
                    } else {
                        "other"
                    };
                    self.log.push(format!("idp start {who}"));
                }
                Command::Idp(IdpCommand::Poll(_)) => self.log.push("idp poll".into()),
                Command::Idp(IdpCommand::Cancel(r)) => {
                    self.log.push("idp cancel".into());
                    self.open_orders.retain(|o| *o != r);
                }
                Command::Progress(stage) => self.log.push(format!("progress {}", stage.code())),
                Command::Finish { outcome, route, .. } => {
                    let unended: Vec<_> = self.playing.iter().filter(|p| !p.2).collect();
                    assert!(
                        unended.is_empty(),
                        "finish while a prompt plays: {unended:?}"
                    );
                    let to = route
                        .as_ref()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "nowhere".into());
                    self.log.push(format!("finish {outcome} -> {to}"));
                    self.finishes.push((outcome, route));
                }
            }
        }
    }

    fn input(&mut self, i: Input) {
        self.call.handle(i, self.now);
        self.drain();
    }

    fn keys(&mut self, s: &str) {
        for d in s.chars() {
            self.now += Duration::from_millis(300);
            self.input(Input::Dtmf(d));
        }
    }

    /// The PBX reports the end of every stopped playback and of the oldest one still running.
    fn prompt_ends(&mut self) {
        assert!(!self.playing.is_empty(), "no prompt playing");
        self.now += Duration::from_secs(2);
        let stopped: Vec<_> = self.playing.iter().filter(|p| p.2).map(|p| p.0).collect();
        let running = self.playing.iter().find(|p| !p.2).map(|p| p.0);
        let mut ending = stopped;
        ending.extend(running);
        self.playing.retain(|p| !ending.contains(&p.0));
        for id in ending {
            self.input(Input::PlaybackEnded(id));
        }
    }

    fn hangup(&mut self) {
        self.hung_up = self.finishes.is_empty();
        self.playing.clear();
        self.input(Input::Hangup);
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
        assert!(self.start_in_flight);
        self.start_in_flight = false;
        self.next_order += 1;
        let order = OrderRef(format!("o{}", self.next_order));
        self.open_orders.push(order.clone());
        self.input(Input::Idp(verify::Input::Started(Ok(Started {
            order,
            poll_interval: None,
            word_pair: None,
        }))));
    }

    fn start_fails(&mut self, e: ProviderError) {
        assert!(self.start_in_flight);
        self.start_in_flight = false;
        self.input(Input::Idp(verify::Input::Started(Err(e))));
    }

    /// Fires the poll timer and answers the poll.
    fn poll(&mut self, answer: Poll) {
        self.fire(Timer::Verify(verify::Timer::Next));
        if matches!(answer, Poll::Complete(_) | Poll::Failed(_)) {
            self.open_orders.pop();
        }
        self.input(Input::Idp(verify::Input::Polled(Ok(answer))));
    }

    fn transcript(&self) -> String {
        self.log.join("\n")
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }
}

#[track_caller]
fn check(h: &H, expected: &str) {
    assert_eq!(h.transcript(), lines(expected));
}

/// Enters the number after the first prompt ended, and gets the order accepted.
fn to_holding(h: &mut H) {
    h.prompt_ends();
    h.keys(&format!("{NUMBER}#"));
    h.started();
    h.prompt_ends();
}

#[test]
fn verified_with_progress_prompts() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.poll(Poll::Pending(Stage::AwaitingApp));
    h.poll(Poll::Pending(Stage::ConfirmingCall));
    h.prompt_ends();
    h.poll(Poll::Pending(Stage::Identifying));
    h.prompt_ends();
    h.poll(Poll::Complete(identity(NUMBER)));
    h.prompt_ends();
    check(
        &h,
        "answer
         play enter-number
         idp start number
         progress order_created
         play open-app
         moh on
         idp poll
         progress awaiting_app
         idp poll
         progress confirming_call
         moh off
         play confirm-call
         moh on
         idp poll
         progress identifying
         moh off
         play identify
         moh on
         idp poll
         progress done
         moh off
         play verified
         finish verified -> queues,support,1",
    );
    assert!(h.call.is_done());
    assert!(h.open_orders.is_empty());
}

#[test]
fn first_digit_stops_the_prompt_and_hash_ends_entry() {
    let mut h = H::new(policy());
    h.keys(&format!("{NUMBER}#"));
    check(
        &h,
        "answer
         play enter-number
         stop prompt
         idp start number",
    );
}

#[test]
fn wrong_number_then_verified() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys("199908072392#");
    h.prompt_ends();
    h.keys(&format!("{NUMBER}#"));
    h.started();
    h.prompt_ends();
    h.poll(Poll::Complete(identity(NUMBER)));
    h.prompt_ends();
    check(
        &h,
        "answer
         play enter-number
         play invalid-number+enter-number
         idp start number
         progress order_created
         play open-app
         moh on
         idp poll
         progress done
         moh off
         play verified
         finish verified -> queues,support,1",
    );
}

#[test]
fn silence_three_times_is_no_input() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.fire(Timer::FirstDigit);
    h.prompt_ends();
    h.fire(Timer::FirstDigit);
    h.prompt_ends();
    h.fire(Timer::FirstDigit);
    h.prompt_ends();
    check(
        &h,
        "answer
         play enter-number
         play no-input+enter-number
         play no-input+enter-number
         play not-verified
         finish failed/no_input -> queues,support-unverified,1",
    );
}

#[test]
fn invalid_numbers_until_attempts_run_out() {
    let mut h = H::new(policy());
    for _ in 0..3 {
        h.prompt_ends();
        h.keys("123#");
    }
    h.prompt_ends();
    assert_eq!(
        h.finishes,
        vec![(
            Outcome::NotVerified(Reason::InvalidNumber),
            Some(route("queues,support-unverified,1"))
        )]
    );
}

#[test]
fn star_starts_over_and_max_length_ends_entry() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys("1999*");
    h.keys(NUMBER); // twelve digits: entry ends without '#'
    check(
        &h,
        "answer
         play enter-number
         idp start number",
    );
}

#[test]
fn between_digit_timeout_submits_a_complete_number_only() {
    let mut p = policy();
    p.accept_10_digits = true;
    let mut h = H::new(p);
    h.prompt_ends();
    h.keys("9908072391");
    h.fire(Timer::InterDigit);
    assert!(h.transcript().ends_with("idp start number"));

    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys("9908072391");
    h.fire(Timer::InterDigit);
    assert!(h.transcript().ends_with("play invalid-number+enter-number"));
}

#[test]
fn cancelled_approval_offers_a_new_order() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.poll(Poll::Failed(Reason::UserCancelled));
    h.keys("1");
    h.started();
    h.prompt_ends();
    h.poll(Poll::Complete(identity(NUMBER)));
    h.prompt_ends();
    check(
        &h,
        "answer
         play enter-number
         idp start number
         progress order_created
         play open-app
         moh on
         idp poll
         progress done
         moh off
         play retry-offer
         stop prompt
         idp start number
         progress order_created
         play open-app
         moh on
         idp poll
         progress done
         moh off
         play verified
         finish verified -> queues,support,1",
    );
}

#[test]
fn unanswered_retry_offer_ends_with_the_failure() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.poll(Poll::Failed(Reason::Expired));
    h.prompt_ends();
    h.fire(Timer::RetryOffer);
    h.prompt_ends();
    assert_eq!(h.finishes[0].0, Outcome::NotVerified(Reason::Expired));
}

#[test]
fn orders_are_bounded_by_max_orders() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.poll(Poll::Failed(Reason::UserCancelled));
    h.keys("1");
    h.started();
    h.prompt_ends();
    h.poll(Poll::Failed(Reason::UserCancelled));
    h.prompt_ends();
    assert_eq!(h.transcript().matches("play retry-offer").count(), 1);
    assert_eq!(h.transcript().matches("idp start").count(), 2);
    assert_eq!(h.finishes[0].0, Outcome::NotVerified(Reason::UserCancelled));
}

#[test]
fn declined_call_is_never_retried_and_routes_by_reason() {
    let mut p = policy();
    p.routes_by_reason
        .insert(Reason::DeclinedCall, route("queues,fraud-desk,1"));
    let mut h = H::new(p);
    to_holding(&mut h);
    h.poll(Poll::Failed(Reason::DeclinedCall));
    h.prompt_ends();
    assert!(!h.transcript().contains("retry-offer"));
    assert_eq!(
        h.finishes,
        vec![(
            Outcome::NotVerified(Reason::DeclinedCall),
            Some(route("queues,fraud-desk,1"))
        )]
    );
}

#[test]
fn provider_down_goes_to_the_unavailable_route() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys(&format!("{NUMBER}#"));
    for _ in 0..2 {
        h.start_fails(ProviderError::NotSent);
        h.fire(Timer::Verify(verify::Timer::Next));
    }
    h.start_fails(ProviderError::NotSent);
    h.prompt_ends();
    check(
        &h,
        "answer
         play enter-number
         idp start number
         idp start number
         idp start number
         progress done
         play unavailable
         finish unavailable/provider_unavailable -> queues,support-fallback,1",
    );
    assert!(h.elapsed() < Duration::from_secs(20));
}

#[test]
fn hang_up_while_holding_cancels_the_order() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.poll(Poll::Pending(Stage::AwaitingApp));
    h.hangup();
    assert!(h.transcript().ends_with(
        "progress awaiting_app\nidp cancel\nprogress done\nfinish failed/caller_hung_up -> nowhere"
    ));
    assert!(h.open_orders.is_empty());
    assert!(h.call.is_done());
}

#[test]
fn hang_up_while_the_start_is_in_flight_cancels_the_order_when_it_arrives() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys(&format!("{NUMBER}#"));
    h.hangup();
    assert!(!h.call.is_done(), "must wait for the start to cancel it");
    h.started();
    assert!(h
        .transcript()
        .ends_with("finish failed/caller_hung_up -> nowhere\nidp cancel"));
    assert!(h.open_orders.is_empty());
    assert!(h.call.is_done());
    assert_eq!(h.pbx_after_finish, 0);
}

#[test]
fn gate_deadline_ends_a_slow_check() {
    let mut p = policy();
    p.gate_deadline = Duration::from_secs(60);
    let mut h = H::new(p);
    to_holding(&mut h);
    h.fire(Timer::Deadline);
    assert!(h.transcript().ends_with(
        "idp cancel\nprogress done\nmoh off\nfinish failed/timeout -> queues,support-unverified,1"
    ));
    assert!(h.open_orders.is_empty());
}

#[test]
fn the_gate_deadline_during_the_announcement_stops_it_before_finishing() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.poll(Poll::Complete(identity(NUMBER)));
    assert!(h.transcript().ends_with("play verified"));
    h.fire(Timer::Deadline);
    assert!(h
        .transcript()
        .ends_with("play verified\nstop prompt\nfinish verified -> queues,support,1"));
}

#[test]
fn verify_timeout_cancels_the_order() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.fire(Timer::Verify(verify::Timer::Deadline));
    h.prompt_ends();
    assert_eq!(h.finishes[0].0, Outcome::NotVerified(Reason::Timeout));
    assert!(h.open_orders.is_empty());
}

#[test]
fn interrupt_routes_as_interrupted_after_stopping_the_prompt() {
    let mut h = H::new(policy());
    h.input(Input::Interrupt(Reason::Restart));
    assert!(h.finishes.is_empty(), "waits for the stopped prompt");
    h.prompt_ends();
    check(
        &h,
        "answer
         play enter-number
         stop prompt
         finish interrupted/restart -> queues,support-fallback,1",
    );
}

#[test]
fn a_lost_prompt_end_does_not_stall_the_call() {
    let mut h = H::new(policy());
    h.fire(Timer::PromptGuard);
    h.fire(Timer::FirstDigit);
    assert!(h.transcript().ends_with("play no-input+enter-number"));
}

fn resumed(h_policy: QueuePolicy, elapsed: Duration) -> H {
    let key = crate::pnr::PseudonymKey::new(b"journal-key".to_vec());
    let person = PersonalNumber::parse_swedish_12(NUMBER)
        .unwrap()
        .pseudonym(&key);
    let mut h = H::new(h_policy);
    let now = h.now;
    h.call = Call::resume(
        Arc::clone(&h.call.policy),
        verify::Settings::default(),
        h.call.info.clone(),
        OrderRef("o-old".into()),
        verify::Expect::Pseudonym { key, person },
        elapsed,
        now,
    );
    h.log.clear();
    h.timers.clear();
    h.playing.clear();
    h.open_orders = vec![OrderRef("o-old".into())];
    h.drain();
    h
}

#[test]
fn a_resumed_call_holds_polls_at_once_and_ends_verified_for_the_same_person() {
    let mut h = resumed(policy(), Duration::from_secs(30));
    h.input(Input::Idp(verify::Input::Polled(Ok(Poll::Complete(
        identity(NUMBER),
    )))));
    h.open_orders.clear();
    h.prompt_ends();
    check(
        &h,
        "moh on
         idp poll
         progress done
         moh off
         play verified
         finish verified -> queues,support,1",
    );
}

#[test]
fn a_resumed_call_fails_closed_for_another_person_and_offers_no_new_order() {
    let mut h = resumed(policy(), Duration::from_secs(30));
    h.input(Input::Idp(verify::Input::Polled(Ok(Poll::Complete(
        identity(OTHER),
    )))));
    h.prompt_ends();
    assert_eq!(
        h.finishes.last().map(|f| f.0),
        Some(Outcome::NotVerified(Reason::IdentityMismatch))
    );

    let mut h = resumed(policy(), Duration::from_secs(30));
    h.input(Input::Idp(verify::Input::Polled(Ok(Poll::Failed(
        Reason::UserCancelled,
    )))));
    h.prompt_ends();
    assert!(!h.transcript().contains("retry-offer"));
    assert_eq!(
        h.finishes.last().map(|f| f.0),
        Some(Outcome::NotVerified(Reason::UserCancelled))
    );
}

#[test]
fn a_resumed_call_keeps_the_order_timeout_counted_from_its_start() {
    let p = policy();
    let verify_timeout = p.verify_timeout;
    let h = resumed(p, verify_timeout - Duration::from_secs(10));
    let deadline = h.timers[&Timer::Deadline];
    assert!(deadline <= h.now + Duration::from_secs(10) + RESUME_SLACK);
    let order_deadline = h.timers[&Timer::Verify(verify::Timer::Deadline)];
    assert_eq!(order_deadline, h.now + Duration::from_secs(10));
}

#[test]
fn a_handover_leaves_a_holding_caller_and_the_open_order_to_the_next_start() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    let before = h.transcript();
    h.input(Input::Handover);
    assert_eq!(
        h.transcript(),
        before,
        "nothing is said to the PBX or the provider"
    );
    assert!(h.call.is_handed_over() && h.call.is_done());
    assert!(h.finishes.is_empty());
    assert_eq!(h.open_orders.len(), 1);
}

#[test]
fn a_handover_interrupts_a_caller_who_is_not_holding_for_an_order() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys("1999");
    h.input(Input::Handover);
    assert!(!h.call.is_handed_over());
    assert_eq!(
        h.finishes.last().map(|f| f.0),
        Some(Outcome::NotVerified(Reason::Restart))
    );
    // A start in flight is not holding yet: interrupted, and the order cancelled once it exists.
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys(&format!("{NUMBER}#"));
    h.input(Input::Handover);
    h.started();
    assert!(!h.call.is_handed_over());
    assert!(h.open_orders.is_empty());
}

#[test]
fn a_gap_that_loses_no_digit_changes_nothing() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys(&NUMBER[..6]);
    h.input(Input::LinkDown);
    h.input(Input::Resync);
    h.keys(&format!("{}#", &NUMBER[6..]));
    check(
        &h,
        "answer
         play enter-number
         idp start number",
    );
}

#[test]
fn digits_lost_in_a_gap_start_the_entry_again_without_counting_it() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys(&NUMBER[..6]);
    h.input(Input::LinkDown);
    h.input(Input::Resync);
    h.keys(&format!("{}#", &NUMBER[8..])); // two digits were typed in the gap
    h.prompt_ends();
    h.keys(&format!("{NUMBER}#"));
    check(
        &h,
        "answer
         play enter-number
         play start-again+enter-number
         idp start number",
    );
    assert_eq!(h.call.entry_failures, 0);
}

#[test]
fn an_entry_cut_while_the_link_is_down_is_asked_again_once_it_is_back() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys(&NUMBER[..3]);
    h.input(Input::LinkDown);
    h.fire(Timer::InterDigit);
    assert_eq!(h.transcript(), lines("answer\nplay enter-number"));
    h.input(Input::Resync);
    assert!(h.transcript().ends_with("play start-again+enter-number"));
    assert_eq!(h.call.entry_failures, 0);
}

#[test]
fn a_resync_asks_whether_the_prompt_still_plays_instead_of_replaying_it() {
    let mut h = H::new(policy());
    h.input(Input::LinkDown);
    h.input(Input::Resync);
    check(
        &h,
        "answer
         play enter-number
         check prompt (playing)",
    );
    // The end was lost in the gap: the adapter reports it, and collection starts.
    let id = h.playing[0].0;
    h.playing.clear();
    h.input(Input::PlaybackEnded(id));
    assert!(h.timers.contains_key(&Timer::FirstDigit));
}

#[test]
fn a_silent_caller_on_a_flapping_link_ends_pbx_lost_before_the_deadline() {
    let mut h = H::new(policy());
    h.prompt_ends();
    for _ in 0..=MAX_LINK_REPROMPTS {
        h.input(Input::LinkDown);
        h.input(Input::Resync);
        h.fire(Timer::FirstDigit);
        if !h.playing.is_empty() {
            h.prompt_ends();
        }
    }
    let finish = h.finishes.last().expect("finished");
    assert_eq!(finish.0, Outcome::NotVerified(Reason::PbxLost));
    assert_eq!(finish.1, Some(route("queues,support-fallback,1")));
    assert_eq!(h.call.entry_failures, 0);
    assert!(h.elapsed() < policy().gate_deadline / 2);
    assert_eq!(
        h.transcript()
            .matches("play start-again+enter-number")
            .count(),
        MAX_LINK_REPROMPTS as usize
    );
}

#[test]
fn a_gap_during_the_retry_offer_plays_it_again() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.poll(Poll::Failed(Reason::UserCancelled));
    h.prompt_ends();
    h.input(Input::LinkDown);
    h.input(Input::Resync);
    h.fire(Timer::RetryOffer);
    assert!(h.transcript().ends_with("play start-again+retry-offer"));
    h.prompt_ends();
    h.keys("1");
    assert!(h.transcript().ends_with("idp start number"));
}

#[test]
fn resync_while_holding_polls_again_at_once() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.input(Input::Resync);
    assert!(h.transcript().ends_with("moh on\nmoh on\nidp poll"));
}

#[test]
fn identity_of_another_person_fails_closed() {
    let mut h = H::new(policy());
    to_holding(&mut h);
    h.poll(Poll::Complete(identity(OTHER)));
    h.prompt_ends();
    assert_eq!(
        h.finishes[0].0,
        Outcome::NotVerified(Reason::IdentityMismatch)
    );
}

#[test]
fn no_announcement_when_the_queue_does_not_want_it() {
    let mut p = policy();
    p.announce_outcome = false;
    p.progress_prompts = false;
    let mut h = H::new(p);
    to_holding(&mut h);
    h.poll(Poll::Pending(Stage::ConfirmingCall));
    h.poll(Poll::Complete(identity(NUMBER)));
    assert!(h
        .transcript()
        .ends_with("moh off\nfinish verified -> queues,support,1"));
    assert!(!h.transcript().contains("confirm-call"));
}

// ---- randomized input sequences ----

#[derive(Debug, Clone)]
enum Step {
    Key(char),
    PromptEnds,
    NextTimer,
    Hangup,
    Interrupt,
    LinkDown,
    Resync,
    StartOk,
    StartErr(u8),
    Answer(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::sample::select(vec!['1', '9', '0', '8', '7', '2', '3', '#', '*']).prop_map(Step::Key),
        4 => Just(Step::PromptEnds),
        4 => Just(Step::NextTimer),
        1 => Just(Step::Hangup),
        1 => Just(Step::Interrupt),
        1 => Just(Step::LinkDown),
        1 => Just(Step::Resync),
        3 => Just(Step::StartOk),
        1 => (0u8..6).prop_map(Step::StartErr),
        4 => (0u8..8).prop_map(Step::Answer),
    ]
}

impl H {
    fn apply(&mut self, s: &Step) {
        if self.call.is_finished() && !matches!(s, Step::StartOk | Step::StartErr(_)) {
            return;
        }
        match s {
            Step::Key(d) => self.keys(&d.to_string()),
            Step::PromptEnds => {
                if !self.playing.is_empty() {
                    self.prompt_ends();
                }
            }
            Step::NextTimer => {
                // Prompts take a few seconds: any prompt older than 5 s has ended by then.
                if let Some((&t, &at)) = self.timers.iter().min_by_key(|(_, at)| **at) {
                    while let Some(pos) = self
                        .playing
                        .iter()
                        .position(|p| p.1 + Duration::from_secs(5) <= at)
                    {
                        let (id, _, _) = self.playing.remove(pos);
                        self.input(Input::PlaybackEnded(id));
                    }
                    if self.timers.get(&t) == Some(&at) {
                        self.fire(t);
                    }
                }
            }
            Step::Hangup => self.hangup(),
            Step::Interrupt => self.input(Input::Interrupt(Reason::Restart)),
            Step::LinkDown => self.input(Input::LinkDown),
            Step::Resync => self.input(Input::Resync),
            Step::StartOk => {
                if self.start_in_flight {
                    self.started()
                }
            }
            Step::StartErr(k) => {
                if self.start_in_flight {
                    let e = match k {
                        0 => ProviderError::NotSent,
                        1 => ProviderError::OutcomeUnknown,
                        2 => ProviderError::Unavailable,
                        3 => ProviderError::RateLimited {
                            retry_after: Some(Duration::from_secs(1)),
                        },
                        4 => ProviderError::Rejected(Reason::AlreadyInProgress),
                        _ => ProviderError::Fatal,
                    };
                    self.start_fails(e)
                }
            }
            Step::Answer(k) => {
                if self
                    .timers
                    .contains_key(&Timer::Verify(verify::Timer::Next))
                    && !self.open_orders.is_empty()
                {
                    let answer = match k {
                        0 => Poll::Pending(Stage::AwaitingApp),
                        1 => Poll::Pending(Stage::ConfirmingCall),
                        2 => Poll::Pending(Stage::Identifying),
                        3 => Poll::Complete(identity(NUMBER)),
                        4 => Poll::Failed(Reason::UserCancelled),
                        5 => Poll::Failed(Reason::DeclinedCall),
                        6 => Poll::Failed(Reason::Expired),
                        _ => Poll::Complete(identity(OTHER)),
                    };
                    self.poll(answer);
                }
            }
        }
    }

    /// Lets time run with prompts ending normally and the provider answering, until the call is done.
    fn run_out(&mut self) {
        for _ in 0..500 {
            if self.call.is_done() {
                return;
            }
            if self.start_in_flight {
                self.started();
                continue;
            }
            if !self.playing.is_empty() {
                self.prompt_ends();
                continue;
            }
            if self
                .timers
                .contains_key(&Timer::Verify(verify::Timer::Next))
            {
                self.poll(Poll::Pending(Stage::AwaitingApp));
                continue;
            }
            self.apply(&Step::NextTimer);
        }
        panic!(
            "call never finished: {:?}\n{}",
            self.call,
            self.transcript()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_path_ends_in_exactly_one_outcome(steps in prop::collection::vec(step(), 0..60)) {
        let mut h = H::new(policy());
        for s in &steps {
            h.apply(s);
        }
        h.run_out();
        prop_assert_eq!(h.finishes.len(), 1, "{}", h.transcript());
        prop_assert_eq!(h.pbx_after_finish, 0, "{}", h.transcript());
        prop_assert!(h.open_orders.is_empty(), "order left open\n{}", h.transcript());
        // The gate deadline bounds the gate, plus the short guard for a stopped prompt.
        prop_assert!(h.elapsed() <= policy().gate_deadline + Duration::from_secs(30), "{:?}", h.elapsed());
        let (outcome, route) = &h.finishes[0];
        prop_assert_eq!(route.is_none(), h.hung_up, "{}", h.transcript());
        if *outcome == Outcome::NotVerified(Reason::CallerHungUp) {
            prop_assert!(h.hung_up);
        }
    }
}

#[test]
fn a_start_refused_by_the_limits_tells_the_caller_to_try_later() {
    let mut h = H::new(policy());
    h.prompt_ends();
    h.keys(&format!("{NUMBER}#"));
    h.start_in_flight = false;
    h.input(Input::Idp(verify::Input::Started(Err(
        ProviderError::Rejected(Reason::RateLimited),
    ))));
    h.prompt_ends();
    let t = h.transcript();
    assert!(t.contains("play rate-limited"), "{t}");
    assert!(
        !t.contains("not-verified") && !t.contains("open-app"),
        "{t}"
    );
    assert_eq!(h.finishes[0].0, Outcome::NotVerified(Reason::RateLimited));
}
