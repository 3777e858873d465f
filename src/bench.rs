//! `callgate bench`: measures, and prints, how fast the pieces are — the sans-IO dialogue on its own, and
//! whole calls through callgate against the loopback fakes. Figures, not assertions: speed goals are
//! judged by reading them, never by a timed test.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::demo::{lab_toml, start_fakes, LabOptions};
use crate::dialog::{Call, CallInfo, Command, IdpCommand, Input};
use crate::idp::sim::{self as idp_sim, number_with_serial, TABLE_DATE};
use crate::outcome::{Identity, Outcome};
use crate::pbx::sim::{Caller, FakeAsterisk};
use crate::pnr::PersonalNumber;
use crate::policy::{QueuePolicy, Routes};
use crate::verify::{self, Initiator, OrderRef, Poll, Stage, Started};

/// Runs both measurements and prints the figures.
pub async fn run(calls: usize, hold: &[usize]) -> anyhow::Result<()> {
    println!("callgate bench{}\n", build_note());
    let (flows, took) = core_flows(Duration::from_secs(1))?;
    println!(
        "core: {flows} complete verified dialogues in {:.2} s = {:.0} per second on one core",
        took.as_secs_f64(),
        flows as f64 / took.as_secs_f64()
    );
    let figures = whole_calls(calls, hold).await?;
    print!("{figures}");
    Ok(())
}

/// What the figures of this build are worth.
pub fn build_note() -> &'static str {
    if cfg!(debug_assertions) {
        " (a debug build: several times slower; use --release for real figures)"
    } else {
        " (release build)"
    }
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
                            word_pair: None,
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

/// Places `calls` verifying callers at once through a callgate process of its own (`callgate serve`,
/// started from this binary) against the loopback fakes running in this process, so that the CPU and
/// memory figures are callgate's alone. Then, for each count in `hold`, keeps that many silent callers
/// in the gate at once and reports the growth of callgate's resident memory per call.
#[allow(clippy::disallowed_methods)] // the benchmark is the driver: it reads the clock
pub async fn whole_calls(calls: usize, hold: &[usize]) -> anyhow::Result<String> {
    let mut options = LabOptions::fast();
    options.gate_deadline = Duration::from_secs(300);
    options.verify_timeout = Duration::from_secs(60);
    // Production's pause between keys: a driver busy placing thousands of calls may delay a key.
    options.inter_digit_timeout = Duration::from_secs(5);
    // Silent callers stay in the gate for the memory figure.
    options.first_digit_timeout = Duration::from_secs(120);
    // Sized to the load: every caller may hold an order at once.
    options.max_concurrent_orders = calls.max(1);
    // callgate polls at its production pace (every 2 s); the simulator expires an order nobody
    // collects for 30 steps, so a step must be well above 2 s / 30.
    options.step = Duration::from_millis(200);
    let fakes = Fakes::start(&options).await?;
    let mut child = fakes.spawn_callgate(&options)?;
    let result = measure(&fakes, &mut child, calls, hold).await;
    child.stop();
    result
}

#[allow(clippy::disallowed_methods)] // the benchmark is the driver: it reads the clock
async fn measure(
    fakes: &Fakes,
    child: &mut Callgate,
    calls: usize,
    hold: &[usize],
) -> anyhow::Result<String> {
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), fakes.asterisk.wait_for_connected())
        .await
        .map_err(|_| anyhow::anyhow!("callgate did not connect to the fake Asterisk"))?;
    // Memory first, while the process is fresh: growth is then not hidden by memory freed earlier.
    for &n in hold.iter().filter(|n| **n > 0) {
        let before = child.memory_kib("VmRSS")?;
        let ids: Vec<String> = (0..n)
            .map(|i| {
                fakes.asterisk.call(
                    Caller::new(&format!("4671{i:07}"))
                        .await_answer()
                        .wait(Duration::from_secs(3600)),
                )
            })
            .collect();
        child.wait_active(n).await?;
        let during = child.memory_kib("VmRSS")?;
        for id in &ids {
            fakes.asterisk.hang_up(id);
        }
        child.wait_active(0).await?;
        let _ = writeln!(
            out,
            "memory: {n} silent callers in the gate at once: callgate RSS {:.1} → {:.1} MiB = {:.1} KiB per in-flight call",
            before as f64 / 1024.0,
            during as f64 / 1024.0,
            during.saturating_sub(before) as f64 / n as f64,
        );
    }
    let (cpu0, own0) = (child.cpu()?, own_cpu()?);
    let start = Instant::now();
    let mut ids = Vec::with_capacity(calls);
    for i in 0..calls {
        let serial = 100 + u16::try_from(i % 800).unwrap_or(0);
        let number = number_with_serial(&format!("19{:02}0101", 50 + i / 800), serial);
        ids.push(
            fakes.asterisk.call(
                Caller::new(&format!("4670{i:07}"))
                    .await_prompt()
                    .press(&format!("{number}#"), Duration::from_millis(5)),
            ),
        );
    }
    let mut verified = 0;
    let mut others: std::collections::BTreeMap<String, usize> = Default::default();
    for id in &ids {
        let end = tokio::time::timeout(
            Duration::from_secs(600),
            fakes.asterisk.wait_for_channel_end(id),
        )
        .await
        .map_err(|_| anyhow::anyhow!("a call never left the gate"))?;
        let var = |n: &str| end.variables.get(n).cloned().unwrap_or_default();
        if var("CALLGATE_STATUS") == "verified" {
            verified += 1;
        } else {
            *others
                .entry(format!(
                    "{}/{}",
                    var("CALLGATE_STATUS"),
                    var("CALLGATE_REASON")
                ))
                .or_default() += 1;
        }
    }
    child.wait_active(0).await?;
    let took = start.elapsed();
    let (cpu, own) = (child.cpu()? - cpu0, own_cpu()? - own0);
    let per_call = |s: f64| s * 1000.0 / calls.max(1) as f64;
    let _ = writeln!(
        out,
        "calls: {calls} concurrent verifying callers, {verified} verified{}, in {:.2} s = {:.1} calls/s; \
         orders left open: {}",
        others
            .iter()
            .map(|(k, n)| format!(", {n} {k}"))
            .collect::<String>(),
        took.as_secs_f64(),
        calls as f64 / took.as_secs_f64(),
        fakes.bankid.open_orders(),
    );
    let _ = writeln!(
        out,
        "cpu: callgate {cpu:.2} CPU-s = {:.2} ms per call (its own process, fakes excluded); \
         fakes and driver {own:.2} CPU-s = {:.2} ms per call; callgate peak RSS {:.1} MiB",
        per_call(cpu),
        per_call(own),
        child.memory_kib("VmHWM")? as f64 / 1024.0,
    );
    Ok(out)
}

/// The fake Asterisk and the BankID simulator, in this process.
struct Fakes {
    asterisk: FakeAsterisk,
    bankid: idp_sim::Simulator,
    data_dir: PathBuf,
    _token: CancellationToken,
}

impl Fakes {
    async fn start(options: &LabOptions) -> anyhow::Result<Fakes> {
        let (asterisk, bankid, token, data_dir) = start_fakes(options, "bench").await?;
        std::fs::create_dir_all(&data_dir)?;
        Ok(Fakes {
            asterisk,
            bankid,
            data_dir,
            _token: token,
        })
    }

    /// Starts `callgate serve` (this binary) against the fakes; its log goes to the data directory.
    fn spawn_callgate(&self, options: &LabOptions) -> anyhow::Result<Callgate> {
        let ops = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let api = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let toml = lab_toml(
            options,
            &self.asterisk.settings(),
            &self.bankid.url(),
            &self.data_dir,
            Some(ops),
        );
        let config = self.data_dir.join("callgate.toml");
        std::fs::write(&config, toml)?;
        let log = std::fs::File::create(self.data_dir.join("callgate.log"))?;
        let process = std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("CALLGATE_BENCH_LOG").unwrap_or_else(|_| "error".into()),
            )
            .env("NO_COLOR", "1")
            // The agent API on a free port, not the default one.
            .env("CALLGATE__SERVER__LISTEN", api.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Callgate {
            process,
            ops,
            data_dir: self.data_dir.clone(),
        })
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        if std::env::var_os("CALLGATE_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// The callgate process under measurement.
struct Callgate {
    process: std::process::Child,
    ops: std::net::SocketAddr,
    data_dir: PathBuf,
}

impl Callgate {
    fn proc_file(&self, name: &str) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(format!(
            "/proc/{}/{name}",
            self.process.id()
        ))?)
    }

    /// CPU seconds (user + system) the process used so far.
    fn cpu(&self) -> anyhow::Result<f64> {
        cpu_of(&self.proc_file("stat")?)
    }

    /// A `/proc/<pid>/status` memory line (`VmRSS`, `VmHWM`) in KiB.
    fn memory_kib(&self, key: &str) -> anyhow::Result<u64> {
        let status = self.proc_file("status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {key} in /proc status"))
    }

    /// Waits until `callgate_calls_active` is `n`.
    #[allow(clippy::disallowed_methods)] // the benchmark is the driver: it reads the clock
    async fn wait_active(&mut self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(status) = self.process.try_wait()? {
                anyhow::bail!(
                    "callgate exited ({status}); see {}",
                    self.data_dir.join("callgate.log").display()
                );
            }
            if active_calls(self.ops).await == Some(n) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "calls in the gate never reached {n}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `callgate_calls_active` from the ops listener's `/metrics`.
async fn active_calls(addr: std::net::SocketAddr) -> Option<usize> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.ok()?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("callgate_calls_active "))?;
    value.trim().parse::<f64>().ok().map(|v| v as usize)
}

/// CPU seconds of this process (the fakes and the driver).
fn own_cpu() -> anyhow::Result<f64> {
    cpu_of(&std::fs::read_to_string("/proc/self/stat")?)
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds (Linux counts them in USER_HZ = 100).
fn cpu_of(stat: &str) -> anyhow::Result<f64> {
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3 of the line; utime and stime are fields 14 and 15.
    let tick = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("short /proc stat line"))?
            .parse::<f64>()?)
    };
    Ok((tick(11)? + tick(12)?) / 100.0)
}

/// `callgate bench --instances 2`: two callgate instances (in this process, each with its own fake
/// Asterisk and BankID simulator) sharing a `redis-server` started on a loopback port. Prints the
/// agent API's latency for a start and a cancel on the owning instance and through the other one
/// (forwarded over Redis), how long a call's event takes to reach the other instance's live view,
/// and verified checks per second per instance with the limits on Redis, beside one instance with
/// its limits in memory.
#[allow(clippy::disallowed_methods)] // the benchmark is the driver: it reads the clock
pub async fn instances(calls: usize, samples: usize) -> anyhow::Result<String> {
    use crate::demo::{Lab, LabToken};
    use crate::state::local::LocalRedis;

    const TOKEN: &str = "bench-supervisor-token-0001";
    let redis = LocalRedis::start()
        .await
        .map_err(|e| anyhow::anyhow!("{e}: the two-instance bench needs redis-server"))?;
    let options = |site: Option<&str>| {
        let mut o = LabOptions::fast();
        o.step = Duration::from_millis(100);
        o.poll = Duration::from_millis(50);
        o.verify_timeout = Duration::from_secs(60);
        o.gate_deadline = Duration::from_secs(300);
        o.inter_digit_timeout = Duration::from_secs(5);
        o.max_concurrent_orders = calls.max(1) * 2;
        o.limits = vec![
            (
                "max_concurrent_orders_per_idp".into(),
                (calls.max(1) * 2).to_string(),
            ),
            ("max_starts_per_queue_per_minute".into(), "100000".into()),
            ("max_checks_per_agent_per_hour".into(), "10000".into()),
        ];
        o.api_tokens = vec![LabToken {
            name: "bench".into(),
            token: TOKEN.into(),
            role: crate::config::Role::Supervisor,
            agent: None,
        }];
        if let Some(site) = site {
            o.system_name = site.to_owned();
            o.state = Some(format!(
                "kind = \"redis\"\nurl = \"{}\"\ninstance_id = \"{site}\"\nkey_prefix = \"bench\"\nheartbeat_interval = \"500ms\"\n",
                redis.url()
            ));
        }
        o
    };
    let mut out = String::new();
    let a = Lab::start(options(Some("site-a"))).await?;
    let b = Lab::start(options(Some("site-b"))).await?;

    // A call on A, bridged with its agent; checks are started and cancelled on it.
    let id = a.asterisk.call(Caller::new("46709999999").queue("desk"));
    tokio::time::timeout(Duration::from_secs(30), a.asterisk.wait_for_agent(&id))
        .await
        .map_err(|_| anyhow::anyhow!("no agent answered the bench call"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.app.live.call(&id).is_none() || !a.app.live.call(&id).is_some_and(|c| c.can_verify) {
        anyhow::ensure!(Instant::now() < deadline, "the call never reached site B");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start_path = format!("/v1/calls/{id}/verifications");
    let cancel_path = format!("/v1/calls/{id}/verification");
    for (label, addr) in [
        ("on the owning instance", a.app.api_addr),
        ("through the other instance (over Redis)", b.app.api_addr),
    ] {
        let (mut starts, mut cancels) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            let t = Instant::now();
            let status = api(addr, "POST", &start_path, TOKEN, r#"{"collect":"keypad"}"#).await?;
            starts.push(t.elapsed());
            anyhow::ensure!(status == 202, "start answered {status}");
            let t = Instant::now();
            let status = api(addr, "DELETE", &cancel_path, TOKEN, "").await?;
            cancels.push(t.elapsed());
            anyhow::ensure!(status == 202, "cancel answered {status}");
        }
        let _ = writeln!(
            out,
            "api {label}: start p50 {} p99 {}, cancel p50 {} p99 {} ({samples} each)",
            ms(percentile(&mut starts, 50)),
            ms(percentile(&mut starts, 99)),
            ms(percentile(&mut cancels, 50)),
            ms(percentile(&mut cancels, 99)),
        );
    }
    // Event propagation: each start above changed the call on A; time A's publish to B's view.
    let mut delays = Vec::new();
    let mut rx = b.app.live.subscribe();
    for _ in 0..samples.min(50) {
        let t = Instant::now();
        let status = api(
            a.app.api_addr,
            "POST",
            &start_path,
            TOKEN,
            r#"{"collect":"keypad"}"#,
        )
        .await?;
        anyhow::ensure!(status == 202, "start answered {status}");
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .map_err(|_| anyhow::anyhow!("site B saw no event"))??;
            if e.call.call_id == id && e.kind == crate::calls::live::LiveKind::Progress {
                break;
            }
        }
        delays.push(t.elapsed());
        let _ = api(a.app.api_addr, "DELETE", &cancel_path, TOKEN, "").await?;
    }
    let _ = writeln!(
        out,
        "events: a start on site A reaches site B's live view in p50 {} p99 {} (API call included)",
        ms(percentile(&mut delays, 50)),
        ms(percentile(&mut delays, 99)),
    );
    a.asterisk.hang_up(&id);

    // Checks per second: `calls` verifying callers on each site at once, limits on Redis.
    let t = Instant::now();
    let (ra, rb) = tokio::join!(verify_many(&a, calls, 0), verify_many(&b, calls, 1));
    let took = t.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "checks: {calls} verifying callers on each of two sites at once (limits on Redis): site A {} verified, site B {} verified, in {took:.2} s = {:.1} checks/s per instance",
        ra?,
        rb?,
        calls as f64 / took,
    );
    a.shutdown().await?;
    b.shutdown().await?;
    let single = Lab::start(options(None)).await?;
    let t = Instant::now();
    let n = verify_many(&single, calls, 2).await?;
    let took = t.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "checks: {calls} verifying callers on one instance with its limits in memory: {n} verified in {took:.2} s = {:.1} checks/s",
        calls as f64 / took,
    );
    single.shutdown().await?;
    Ok(out)
}

/// Places `calls` gated callers, each typing a distinct number, and counts the verified ones.
async fn verify_many(lab: &crate::demo::Lab, calls: usize, site: usize) -> anyhow::Result<usize> {
    let ids: Vec<String> = (0..calls)
        .map(|i| {
            let serial = 100 + u16::try_from((site * calls + i) % 800).unwrap_or(0);
            let year = 50 + (site * calls + i) / 800;
            let number = number_with_serial(&format!("19{year:02}0101"), serial);
            lab.asterisk.call(
                Caller::new(&format!("46{site}{i:07}"))
                    .await_prompt()
                    .press(&format!("{number}#"), Duration::from_millis(5)),
            )
        })
        .collect();
    let mut verified = 0;
    for id in &ids {
        let end = tokio::time::timeout(
            Duration::from_secs(600),
            lab.asterisk.wait_for_channel_end(id),
        )
        .await
        .map_err(|_| anyhow::anyhow!("a call never left the gate"))?;
        if end.variables.get("CALLGATE_STATUS").map(String::as_str) == Some("verified") {
            verified += 1;
        }
    }
    Ok(verified)
}

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let i = ((samples.len() - 1) * p).div_ceil(100);
    samples[i.min(samples.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// One agent API request; its status code.
async fn api(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await?;
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_process_name() {
        let stat = "4242 (call gate) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0";
        assert_eq!(cpu_of(stat).unwrap(), 3.0);
    }

    #[test]
    fn percentiles_pick_the_sample_at_or_above() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut v, 50), Duration::from_millis(51));
        assert_eq!(percentile(&mut v, 99), Duration::from_millis(100));
        assert_eq!(percentile(&mut [], 99), Duration::ZERO);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_two_instance_bench_prints_its_figures() {
        if crate::state::local::LocalRedis::binary().is_none() {
            eprintln!("skipped: no redis-server installed (the two-instance bench needs one)");
            return;
        }
        let figures = instances(4, 5).await.unwrap();
        for line in [
            "api on the owning instance: start p50",
            "api through the other instance (over Redis): start p50",
            "events: a start on site A reaches site B",
            "site A 4 verified, site B 4 verified",
            "limits in memory: 4 verified",
        ] {
            assert!(figures.contains(line), "{line:?} not in:\n{figures}");
        }
    }

    #[test]
    fn the_core_benchmark_runs_verified_dialogues() {
        let (flows, _) = core_flows(Duration::from_millis(20)).unwrap();
        assert!(flows > 0);
    }
}
