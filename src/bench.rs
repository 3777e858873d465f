//! `callgate bench`: measures, and prints, how fast the pieces are — the sans-IO dialogue on its own, and
//! whole calls through callgate against the loopback fakes. Figures, not assertions: speed goals are
//! judged by reading them, never by a timed test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::demo::{Lab, LabOptions};
use crate::dialog::{Call, CallInfo, Command, IdpCommand, Input};
use crate::idp::sim::{number_with_serial, TABLE_DATE};
use crate::outcome::{Identity, Outcome};
use crate::pbx::sim::Caller;
use crate::pnr::PersonalNumber;
use crate::policy::{QueuePolicy, Routes};
use crate::verify::{self, Initiator, OrderRef, Poll, Stage, Started};

/// Runs both measurements and prints the figures.
pub async fn run(calls: usize) -> anyhow::Result<()> {
    println!(
        "callgate bench (debug builds are several times slower; use --release for real figures)\n"
    );
    let (flows, took) = core_flows(Duration::from_secs(1))?;
    println!(
        "core: {flows} complete verified dialogues in {:.2} s = {:.0} per second on one core",
        took.as_secs_f64(),
        flows as f64 / took.as_secs_f64()
    );
    let figures = whole_calls(calls).await?;
    println!("{figures}");
    Ok(())
}

/// Drives scripted verified dialogues (answer, prompt, 13 keys, start, 4 polls, outcome) for `budget`.
#[allow(clippy::disallowed_methods)] // the benchmark is the driver: it reads the clock
pub fn core_flows(budget: Duration) -> anyhow::Result<(u64, Duration)> {
    let number = number_with_serial(TABLE_DATE, 123);
    let identity = Identity {
        number: PersonalNumber::parse_swedish_12(&number)
            .map_err(|e| anyhow::anyhow!("bench number: {e}"))?,
        name: None,
        given_name: None,
        surname: None,
        evidence_digest: None,
    };
    let routes = Routes {
        verified: crate::policy::Route::parse("q,v,1").map_err(anyhow::Error::msg)?,
        failed: crate::policy::Route::parse("q,f,1").map_err(anyhow::Error::msg)?,
        unavailable: crate::policy::Route::parse("q,u,1").map_err(anyhow::Error::msg)?,
        skipped: None,
        interrupted: None,
        no_agent: None,
        after_agent: None,
        agent: None,
    };
    let policy = Arc::new(QueuePolicy::with_defaults("bench", "bankid", routes));
    let info = CallInfo {
        channel_language: "sv".into(),
        initiator: Initiator::Caller,
        today: time::macros::date!(2026 - 11 - 23),
    };
    let start = Instant::now();
    let mut flows = 0u64;
    while start.elapsed() < budget {
        let mut now = start;
        let mut call = Call::new(
            Arc::clone(&policy),
            verify::Settings::default(),
            info.clone(),
            now,
        );
        let mut playing = None;
        let mut polls = 0;
        let mut inputs: Vec<Input> = Vec::new();
        let mut keys = format!("{number}#").chars().collect::<Vec<_>>().into_iter();
        loop {
            while let Some(c) = call.poll_command() {
                match c {
                    Command::Play { id, .. } => playing = Some(id),
                    Command::Idp(IdpCommand::Start(_)) => {
                        inputs.push(Input::Idp(verify::Input::Started(Ok(Started {
                            order: OrderRef("o".into()),
                            poll_interval: None,
                        }))))
                    }
                    Command::Idp(IdpCommand::Poll(_)) => {
                        polls += 1;
                        let answer = if polls < 4 {
                            Poll::Pending(Stage::AwaitingApp)
                        } else {
                            Poll::Complete(identity.clone())
                        };
                        inputs.push(Input::Idp(verify::Input::Polled(Ok(answer))));
                    }
                    _ => {}
                }
            }
            if call.is_done() {
                break;
            }
            now += Duration::from_millis(500);
            let next = if let Some(i) = inputs.pop() {
                i
            } else if let Some(k) = keys.next() {
                Input::Dtmf(k)
            } else if let Some(id) = playing.take() {
                Input::PlaybackEnded(id)
            } else {
                Input::Timer(crate::dialog::Timer::Verify(verify::Timer::Next))
            };
            call.handle(next, now);
        }
        if call.outcome() != Some(Outcome::Verified) {
            anyhow::bail!("bench dialogue ended {:?}", call.outcome());
        }
        flows += 1;
    }
    Ok((flows, start.elapsed()))
}

/// Places `calls` verifying callers at once through callgate and the fakes; reports throughput and the
/// spread of gate durations (dominated by the simulated prompts, keypresses and approvals).
#[allow(clippy::disallowed_methods)] // the benchmark is the driver: it reads the clock
pub async fn whole_calls(calls: usize) -> anyhow::Result<String> {
    let mut options = LabOptions::fast();
    options.gate_deadline = Duration::from_secs(60);
    let mut lab = Lab::start(options).await?;
    let start = Instant::now();
    let mut ids = Vec::with_capacity(calls);
    for i in 0..calls {
        let serial = 100 + u16::try_from(i % 800).unwrap_or(0);
        let number = number_with_serial(&format!("19{:02}0101", 50 + i / 800), serial);
        ids.push(
            lab.asterisk.call(
                Caller::new(&format!("4670{i:07}"))
                    .await_prompt()
                    .press(&format!("{number}#"), lab.options.key_gap),
            ),
        );
    }
    let mut durations = Vec::with_capacity(calls);
    let mut verified = 0;
    for id in &ids {
        let r = lab.report(id).await?;
        if r.outcome == Outcome::Verified {
            verified += 1;
        }
        durations.push(r.duration);
    }
    let took = start.elapsed();
    durations.sort();
    let pct = |p: f64| {
        let i = ((durations.len() as f64 - 1.0) * p).round() as usize;
        durations.get(i).copied().unwrap_or_default()
    };
    let orders_left = lab.bankid.open_orders();
    lab.shutdown().await?;
    Ok(format!(
        "calls: {calls} concurrent verifying callers, {verified} verified, in {:.2} s = {:.1} calls/s; \
         gate duration p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; orders left open: {orders_left}",
        took.as_secs_f64(),
        calls as f64 / took.as_secs_f64(),
        pct(0.5).as_secs_f64() * 1000.0,
        pct(0.95).as_secs_f64() * 1000.0,
        pct(1.0).as_secs_f64() * 1000.0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_benchmark_runs_verified_dialogues() {
        let (flows, _) = core_flows(Duration::from_millis(20)).unwrap();
        assert!(flows > 0);
    }
}
