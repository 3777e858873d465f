//! callgate on a real Asterisk 22: the project's own dialplan (`dialplans/asterisk/*.conf`), the shipped
//! prompts and the shipped `deploy/asterisk/callgate.toml`, with `callgate serve` and `callgate sim-idp
//! --tls` (the BankID simulator over mutual TLS) as separate processes, so either can be killed.
//!
//! Runs only when `CALLGATE_ASTERISK_START` names the `start` script of an Asterisk test build (see
//! `../shared/asterisk/README.md`; `.ci/run` sets it); otherwise every test passes at once and the binary
//! prints one line saying so. Asterisk is started once for the whole binary and stopped when the binary
//! exits (a small watcher process runs `stop` when our end of its stdin closes); the tests take turns on
//! it (one global lock), each with its own simulator and callgate processes.
//!
//! Callers are Local channels: `Local/100@callgate-inbound/n` enters the shipped inbound context (queue
//! `support`), and its `;1` half is put into the test's own ARI application, from which the test types
//! DTMF into the call and hangs up like a person would. The pair is created first, the test's
//! application subscribes to the `;2` half, then the call is dialled: that is how the test learns, from
//! Asterisk's events, which prompts played and which route each call took (the first `[queues]`
//! extension the channel ran) and when; the `CALLGATE_*` channel variables are then read back from
//! Asterisk over REST.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod support;

#[path = "asterisk/doctor.rs"]
mod doctor;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use callgate::idp::sim::{number_with_serial, Scenario, TABLE_DATE};
use support::proxy::Proxy;

/// The variable naming Asterisk's `start` script.
const START_VAR: &str = "CALLGATE_ASTERISK_START";
/// The ARI user of the shipped `ari.conf`, with a password the test sets.
const ARI_USER: &str = "callgate";
const ARI_PASSWORD: &str = "asterisk-test-ari-password";
/// The prefix of each test's own ARI application (callers' `;1` halves, and the event observer).
const TEST_APP: &str = "callgate-test";
/// The dialplan's safety net as shipped (`[globals] CALLGATE_SAFETY_NET`).
const SHIPPED_SAFETY_NET: &str = "330";
const ENTER_NUMBER: &str = "sound:callgate/enter-number";
const OPEN_APP: &str = "sound:callgate/open-app";
/// The link lost the caller's digits: "let's start again", then `enter-number` (one playback).
const START_AGAIN: &str = "sound:callgate/start-again";
/// The prompts after whose start a caller types the number (again).
const ASKING: &[&str] = &[ENTER_NUMBER, START_AGAIN];

// ---- the shared Asterisk ----

struct Pbx {
    workdir: PathBuf,
    port: u16,
    /// The watcher's stdin: when this process exits it closes, and the watcher stops Asterisk.
    _watcher: Mutex<std::process::Child>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shared Asterisk, started on first use; `None` (after one line on stderr) when not configured.
fn pbx() -> Option<&'static Pbx> {
    static PBX: OnceLock<Option<Pbx>> = OnceLock::new();
    PBX.get_or_init(|| {
        let start = std::env::var_os(START_VAR)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let start = match start {
            Some(path) if path.is_file() => path,
            other => {
                // Straight to the stream: libtest would swallow eprintln! of a passing test.
                let why = match other {
                    Some(path) => format!("{START_VAR}={} is not a file", path.display()),
                    None => format!("set {START_VAR} to ../shared/asterisk/start"),
                };
                let _ = writeln!(std::io::stderr(), "asterisk tests skipped: {why}");
                return None;
            }
        };
        Some(start_asterisk(&start))
    })
    .as_ref()
}

fn start_asterisk(start: &Path) -> Pbx {
    let start = std::fs::canonicalize(start).unwrap();
    let stop = start.with_file_name("stop");
    // The control socket path must stay short: a fixed pattern under /tmp.
    let workdir = PathBuf::from(format!("/tmp/callgate-asterisk-{}", std::process::id()));
    let confdir = workdir.with_extension("conf");
    std::fs::create_dir_all(&confdir).unwrap();
    let port = free_port();
    write_asterisk_configs(&confdir, port);
    let began = now();
    // Through bash, so a copy of the scripts without execute bits works too.
    let out = std::process::Command::new("bash")
        .arg(&start)
        .arg(&workdir)
        .args(["--http-port", &port.to_string(), "--config-dir"])
        .arg(&confdir)
        .args(["--ari-auth", &format!("{ARI_USER}:{ARI_PASSWORD}")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}{}",
        start.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Stop it when this process ends, however it ends.
    let watcher = std::process::Command::new("sh")
        .arg("-c")
        .arg("cat >/dev/null; bash \"$0\" \"$1\"; [ -n \"$2\" ] || rm -rf \"$1\" \"$1\".*")
        .arg(&stop)
        .arg(&workdir)
        .arg(std::env::var("CALLGATE_ASTERISK_KEEP").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The shipped prompts, as the README installs them.
    let sounds = workdir.join("asterisk/var/lib/asterisk/sounds");
    for lang in ["sv", "en", "nb"] {
        let from = repo().join("deploy/sounds").join(lang).join("callgate");
        let to = sounds.join(lang).join("callgate");
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "asterisk tests: Asterisk ready on 127.0.0.1:{port} in {:.1} s ({})",
        began.elapsed().as_secs_f64(),
        workdir.display()
    );
    Pbx {
        workdir,
        port,
        _watcher: Mutex::new(watcher),
    }
}

/// Whether the shared Asterisk still runs, and the end of its logs: for a test that cannot reach it.
fn asterisk_state() -> String {
    let Some(pbx) = pbx() else {
        return String::new();
    };
    let pid = std::fs::read_to_string(pbx.workdir.join("asterisk.pid")).unwrap_or_default();
    let alive = Path::new("/proc").join(pid.trim()).exists();
    let tail = |name: &str| {
        let text = std::fs::read_to_string(pbx.workdir.join("log").join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    format!(
        "Asterisk pid {} {}\n--- log/messages (end)\n{}\n--- log/console.log (end)\n{}",
        pid.trim(),
        if alive { "is running" } else { "is gone" },
        tail("messages"),
        tail("console.log")
    )
}

/// The shipped Asterisk configs, changed only where a test host needs it.
fn write_asterisk_configs(dir: &Path, port: u16) {
    let shipped =
        |name: &str| std::fs::read_to_string(repo().join("dialplans/asterisk").join(name)).unwrap();
    let replace_line = |text: &str, key: &str, line: &str| {
        let mut found = false;
        let out: Vec<String> = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with(key) {
                    found = true;
                    line.to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect();
        assert!(found, "no `{key}` line to replace");
        out.join("\n") + "\n"
    };
    // Our port, our password; everything else as shipped.
    let http = replace_line(
        &shipped("http.conf"),
        "bindport",
        &format!("bindport = {port}"),
    );
    let ari = replace_line(
        &shipped("ari.conf"),
        "password =",
        &format!("password = {ARI_PASSWORD}"),
    );
    std::fs::write(dir.join("http.conf"), http).unwrap();
    std::fs::write(dir.join("ari.conf"), ari).unwrap();
    std::fs::write(dir.join("musiconhold.conf"), shipped("musiconhold.conf")).unwrap();
    // The anchored queue's agent: a Local member whose other half answers and enters the test's
    // application (named by the global TEST_AGENT_APP), which types and hangs up as the agent.
    let queues = shipped("queues.conf");
    let (head, care) = queues.split_once("[care](callgate-queue)").unwrap();
    let (_, rest) = care.split_once("\n\n").unwrap();
    let queues = format!(
        "{head}[care](callgate-queue)\nmember => Local/agent@callgate-test-agent/n,0,Test Agent\n\n{rest}"
    );
    std::fs::write(dir.join("queues.conf"), queues).unwrap();
    let extensions = shipped("extensions.conf")
        + "\n[callgate-test-agent]\n\
           exten => agent,1,Answer()\n\
           same => n,Stasis(${TEST_AGENT_APP},agent)\n\
           same => n,Hangup()\n\
           \n[callgate-test-agents-closed]\n\
           exten => care,1,Answer()\n\
           same => n,Wait(1)\n\
           same => n,Hangup()\n";
    std::fs::write(dir.join("extensions.conf"), extensions).unwrap();
    // This build's codec_gsm and bridge_softmix use CPU instructions (AVX512-FP16) that not every
    // x86-64 host has, and the gate needs neither.
    std::fs::write(
        dir.join("modules.conf"),
        "[modules]\nautoload = yes\nnoload => codec_gsm.so\nnoload => bridge_softmix.so\n",
    )
    .unwrap();
}

// ---- ARI, as the test sees it ----

fn http_client() -> reqwest::Client {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[derive(Clone)]
struct Ari {
    http: reqwest::Client,
    base: String,
}

impl Ari {
    fn new(port: u16) -> Ari {
        Ari {
            http: http_client(),
            base: format!("http://127.0.0.1:{port}/ari"),
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> (u16, Value) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(ARI_USER, Some(ARI_PASSWORD))
            .query(query)
            .send()
            .await
            .unwrap_or_else(|e| panic!("ARI {path}: {e}\n{}", asterisk_state()));
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, query).await
    }

    async fn post(&self, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, query).await
    }

    async fn delete(&self, path: &str) -> u16 {
        self.request(reqwest::Method::DELETE, path, &[]).await.0
    }

    /// A channel variable as Asterisk has it; `None` when unset.
    async fn var(&self, channel: &str, name: &str) -> Option<String> {
        let (status, body) = self
            .get(
                &format!("/channels/{channel}/variable"),
                &[("variable", name)],
            )
            .await;
        match status {
            200 => body["value"]
                .as_str()
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
            _ => None,
        }
    }

    async fn set_global(&self, name: &str, value: &str) {
        let (status, body) = self
            .post(
                "/asterisk/variable",
                &[("variable", name), ("value", value)],
            )
            .await;
        assert_eq!(status, 204, "setting {name}: {body}");
    }

    async fn channel_ids(&self) -> Vec<String> {
        let (status, body) = self.get("/channels", &[]).await;
        assert_eq!(status, 200, "{body}");
        body.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Channels currently in the `Stasis()` application `app`.
    async fn in_app(&self, app: &str) -> Vec<String> {
        let (status, body) = self.get(&format!("/applications/{app}"), &[]).await;
        if status != 200 {
            return Vec::new();
        }
        body["channel_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

// ---- the observer: every Asterisk event, per channel ----

#[derive(Debug, Default, Clone)]
struct ChannelLog {
    /// `(context, extension)` of every dialplan application the channel ran, in order.
    dialplan: Vec<(String, String)>,
    /// Media of every playback started on the channel, in order.
    media: Vec<String>,
    /// The channel entered the test's own application.
    in_test_app: bool,
    /// Its `StasisStart` arguments there.
    args: Vec<String>,
    destroyed: bool,
}

impl ChannelLog {
    /// The route the call took: the first `[queues]` extension it ran, as `queues,<exten>`.
    fn route(&self) -> Option<String> {
        self.dialplan
            .iter()
            .find(|(c, _)| c == "queues")
            .map(|(c, e)| format!("{c},{e}"))
    }

    fn prompts(&self, media: &str) -> usize {
        self.media.iter().filter(|m| *m == media).count()
    }

    /// How often the caller has been asked for the number.
    fn asks(&self) -> usize {
        self.media
            .iter()
            .filter(|m| ASKING.contains(&m.as_str()))
            .count()
    }
}

#[derive(Default)]
struct Seen {
    channels: HashMap<String, ChannelLog>,
}

#[derive(Clone)]
struct Observer {
    app: String,
    seen: Arc<Mutex<Seen>>,
    changed: watch::Sender<u64>,
}

impl Observer {
    /// Registers the test's application `app`; each call subscribes it to its gated half.
    ///
    /// Not `subscribeAll`: with it (and its device-state subscriptions) Asterisk 22.10.1 deadlocked
    /// its ARI websocket handling when one such application disconnected while another connected.
    async fn connect(port: u16, app: &str) -> (Observer, tokio::task::JoinHandle<()>) {
        let url = format!(
            "ws://127.0.0.1:{port}/ari/events?app={app}&subscribeAll=false&api_key={ARI_USER}:{ARI_PASSWORD}"
        );
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("the ARI websocket did not open")
        .unwrap();
        let observer = Observer {
            app: app.to_owned(),
            seen: Arc::default(),
            changed: watch::Sender::new(0),
        };
        let o = observer.clone();
        let task = tokio::spawn(async move {
            let (_, mut read) = ws.split();
            while let Some(Ok(msg)) = read.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = msg {
                    if let Ok(event) = serde_json::from_str::<Value>(&text) {
                        o.record(&event);
                    }
                }
            }
        });
        (observer, task)
    }

    fn record(&self, e: &Value) {
        let kind = e["type"].as_str().unwrap_or_default();
        let channel = e["channel"]["id"].as_str().map(str::to_owned);
        {
            let mut seen = self.seen.lock().unwrap();
            match (kind, channel) {
                ("ChannelDialplan", Some(id)) => {
                    let plan = &e["channel"]["dialplan"];
                    let at = (
                        plan["context"].as_str().unwrap_or_default().to_owned(),
                        plan["exten"].as_str().unwrap_or_default().to_owned(),
                    );
                    seen.channels.entry(id).or_default().dialplan.push(at);
                }
                ("StasisStart", Some(id)) if e["application"] == self.app.as_str() => {
                    let log = seen.channels.entry(id).or_default();
                    log.in_test_app = true;
                    log.args = e["args"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                }
                ("ChannelDestroyed", Some(id)) => {
                    seen.channels.entry(id).or_default().destroyed = true;
                }
                // Records the first media of each playback: a re-prompt shows as its first part
                // (`no-input`, `invalid-number`, `start-again`).
                ("PlaybackStarted", _) => {
                    let target = e["playback"]["target_uri"].as_str().unwrap_or_default();
                    if let Some(id) = target.strip_prefix("channel:") {
                        let media = e["playback"]["media_uri"].as_str().unwrap_or_default();
                        seen.channels
                            .entry(id.to_owned())
                            .or_default()
                            .media
                            .push(media.to_owned());
                    }
                }
                _ => return,
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn log(&self, id: &str) -> ChannelLog {
        self.seen
            .lock()
            .unwrap()
            .channels
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits (at most `limit`) until `f` returns `Some`, re-checking after every event.
    async fn until<R>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Seen) -> Option<R>,
    ) -> R {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if let Some(r) = f(&self.seen.lock().unwrap()) {
                    return r;
                }
                rx.changed().await.unwrap();
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
    }
}

// ---- callers ----

/// What the person on a test call does.
#[derive(Debug, Clone)]
enum Does {
    /// Never types.
    Nothing,
    /// Types `number#` whenever asked for the number (at the start of every `enter-number` prompt),
    /// breaking off and starting over when asked again mid-way (a key already pressed still counts).
    Types(String),
}

struct Call {
    /// The caller's half (`;1`, in the test's application).
    caller: String,
    /// The half that runs the dialplan (`;2`): the channel callgate gates.
    gated: String,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One person at the keypad: a key every 200 ms (80 ms tone), as a quick typist.
async fn drive(ari: Ari, obs: Observer, call_caller: String, gated: String, does: Does) {
    let Does::Types(number) = does else { return };
    let mut asked = 0usize;
    loop {
        // Wait to be asked (again), with our half in the test application so it can send DTMF.
        let (caller, gated2) = (call_caller.clone(), gated.clone());
        let n = obs
            .until("a prompt to type at", Duration::from_secs(600), move |s| {
                let g = s.channels.get(&gated2)?;
                if g.destroyed || g.route().is_some() {
                    return Some(None);
                }
                let ready = s.channels.get(&caller).is_some_and(|c| c.in_test_app);
                let prompts = g.asks();
                (ready && prompts > asked).then_some(Some(prompts))
            })
            .await;
        let Some(n) = n else { return };
        asked = n;
        let keys = format!("{number}#");
        for key in keys.chars() {
            if obs.log(&gated).asks() > asked {
                break; // asked again: start over
            }
            let k = key.to_string();
            let (status, _) = ari
                .post(
                    &format!("/channels/{call_caller}/dtmf"),
                    &[("dtmf", k.as_str()), ("duration", "80")],
                )
                .await;
            if status != 204 {
                return;
            }
            // The next key 200 ms later, unless asked again before.
            let mut rx = obs.changed.subscribe();
            let pause = tokio::time::sleep(Duration::from_millis(200));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    r = rx.changed() => {
                        if r.is_err() || obs.log(&gated).asks() > asked {
                            break;
                        }
                    }
                }
            }
        }
    }
}

// ---- the BankID simulator process ----

struct Sim {
    child: Child,
    url: String,
    server_ca: String,
    client_p12: String,
    p12_password: String,
    counts: watch::Receiver<(usize, usize, usize)>,
}

impl Sim {
    async fn start(dir: &Path) -> Sim {
        let certs = dir.join("bankid-sim");
        let mut child = Command::new(env!("CARGO_BIN_EXE_callgate"))
            .args([
                "sim-idp",
                "--listen",
                "127.0.0.1:0",
                "--tls",
                "--step",
                "1s",
            ])
            .arg("--cert-dir")
            .arg(&certs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("sim-idp.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut settings = HashMap::new();
        let (tx, counts) = watch::channel((usize::MAX, 0, 0));
        let header = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some((key, value)) = line.trim().split_once(" = ") {
                    if let Ok(value) = serde_json::from_str::<String>(value) {
                        settings.insert(key.to_owned(), value);
                    }
                }
                if let Some(c) = parse_counts(&line) {
                    tx.send_replace(c);
                    return;
                }
            }
            panic!("the simulator exited before it was ready");
        };
        tokio::time::timeout(Duration::from_secs(20), header)
            .await
            .expect("the simulator did not start");
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(c) = parse_counts(&line) {
                    tx.send_replace(c);
                }
            }
        });
        let get = |k: &str| settings.get(k).cloned().unwrap_or_default();
        Sim {
            url: get("url"),
            server_ca: get("server_ca"),
            client_p12: get("client_p12"),
            p12_password: get("client_p12_password"),
            counts,
            child,
        }
    }

    /// `(open orders, starts, cancels)`.
    fn counts(&self) -> (usize, usize, usize) {
        *self.counts.borrow()
    }

    async fn wait_counts(&self, what: &str, f: impl Fn((usize, usize, usize)) -> bool) {
        let mut rx = self.counts.clone();
        let r = tokio::time::timeout(Duration::from_secs(45), rx.wait_for(|c| f(*c))).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "the simulator never reported {what}; last (open, starts, cancels) = {:?}",
            self.counts()
        );
    }

    async fn no_open_orders(&self) {
        self.wait_counts("0 open orders", |c| c.0 == 0).await;
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn parse_counts(line: &str) -> Option<(usize, usize, usize)> {
    let rest = line.strip_prefix("orders: open ")?;
    let (open, rest) = rest.split_once(", starts ")?;
    let (starts, cancels) = rest.split_once(", cancels ")?;
    Some((
        open.parse().ok()?,
        starts.parse().ok()?,
        cancels.parse().ok()?,
    ))
}

// ---- callgate processes ----

struct Gate {
    child: Child,
    ops: u16,
    /// The agent API's port.
    api: u16,
    log: PathBuf,
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Gate {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn sigkill(&mut self) {
        self.child.start_kill().unwrap();
    }

    fn sigterm(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    async fn exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("callgate did not exit within {limit:?}"))
            .unwrap()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

// ---- one test's world ----

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Lab {
    pbx: &'static Pbx,
    ari: Ari,
    obs: Observer,
    sim: Sim,
    dir: PathBuf,
    gates: u32,
    began: Instant,
    name: &'static str,
    _observer: tokio::task::JoinHandle<()>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

/// A failed test prints the end of each callgate log it started (and the simulator's), so that a
/// failure in CI, where the working directory is removed, can still be read.
impl Drop for Lab {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|x| x == "log"));
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.contains(" DEBUG ")).collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            let _ = writeln!(
                std::io::stderr(),
                "---- last {} lines (DEBUG left out) of {} ----\n{}",
                tail.len(),
                log.display(),
                tail.join("\n")
            );
        }
    }
}

impl Lab {
    /// Takes Asterisk for this test (or `None`: skipped), clears what an earlier test left, starts a
    /// simulator and the observer.
    async fn take(name: &'static str) -> Option<Lab> {
        let pbx = pbx()?;
        let turn = TURN.lock().await;
        let ari = Ari::new(pbx.port);
        // Whatever an earlier (failed) test left: hang it up.
        for id in ari.channel_ids().await {
            ari.delete(&format!("/channels/{id}")).await;
        }
        let deadline = now() + Duration::from_secs(15);
        while !ari.channel_ids().await.is_empty() {
            assert!(now() < deadline, "channels left over from an earlier test");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ari.set_global("CALLGATE_SAFETY_NET", SHIPPED_SAFETY_NET)
            .await;
        let dir = pbx.workdir.with_extension(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sim = Sim::start(&dir).await;
        let (obs, task) = Observer::connect(pbx.port, &format!("{TEST_APP}-{name}")).await;
        Some(Lab {
            pbx,
            ari,
            obs,
            sim,
            dir,
            gates: 0,
            began: now(),
            name,
            _observer: task,
            _turn: turn,
        })
    }

    /// Starts `callgate serve` with the shipped config, pointed at this lab by environment
    /// overrides (plus `extra`), and waits until it is ready (connected to ARI).
    async fn gate(&mut self, ari_url: Option<&str>, extra: &[(&str, &str)]) -> Gate {
        self.gates += 1;
        let ops = free_port();
        let api = free_port();
        let log = self.dir.join(format!("callgate-{}.log", self.gates));
        let data = self.dir.join("data");
        let url = ari_url
            .map(str::to_owned)
            .unwrap_or_else(|| format!("http://127.0.0.1:{}", self.pbx.port));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_callgate"));
        cmd.args(["serve", "--config"])
            .arg(repo().join("deploy/asterisk/callgate.toml"))
            .env("RUST_LOG", "info,callgate=debug")
            .env("NO_COLOR", "1")
            .env("ARI_PASSWORD", ARI_PASSWORD)
            .env("BANKID_P12_PASSWORD", &self.sim.p12_password)
            .env(
                "CALLGATE_PSEUDONYM_KEY",
                "asterisk-test-pseudonym-key-0123456789",
            )
            .env("CALLGATE__SERVER__OPS_LISTEN", format!("127.0.0.1:{ops}"))
            .env("CALLGATE__SERVER__LISTEN", format!("127.0.0.1:{api}"))
            // The test agent's token for the agent API.
            .env(
                "CALLGATE__API__TOKENS__TESTAGENT__SHA256",
                sha256_hex(AGENT_TOKEN),
            )
            .env("CALLGATE__API__TOKENS__TESTAGENT__ROLE", "agent")
            .env("CALLGATE__API__TOKENS__TESTAGENT__AGENT", TEST_AGENT)
            .env("CALLGATE__SERVER__DATA_DIR", &data)
            .env("CALLGATE__PBX__ARI__URL", url)
            .env("CALLGATE__IDP__BANKID__URL", &self.sim.url)
            .env("CALLGATE__IDP__BANKID__CLIENT_P12", &self.sim.client_p12)
            .env("CALLGATE__IDP__BANKID__SERVER_CA", &self.sim.server_ca)
            // Local channels all share one calling line.
            .env("CALLGATE__LIMITS__MAX_STARTS_PER_LINE_PER_HOUR", "1000");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut gate = Gate {
            child,
            ops,
            api,
            log,
        };
        self.wait_ready(&mut gate).await;
        gate
    }

    async fn wait_ready(&self, gate: &mut Gate) {
        let url = format!("http://127.0.0.1:{}/readyz", gate.ops);
        let deadline = now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.ari.http.get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Ok(Some(status)) = gate.child.try_wait() {
                panic!("callgate exited ({status}):\n{}", gate.log_tail());
            }
            assert!(now() < deadline, "callgate not ready:\n{}", gate.log_tail());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Places a call to the support line (`100`, Swedish): creates the Local pair with the caller's
    /// half in the test's application, subscribes to the gated half, then dials (so no event of the
    /// gated half is missed).
    async fn call(&self, from: &str, does: Does) -> Call {
        self.call_line("100", from, does).await
    }

    /// Places a call to an inbound line (`100` support, `300` care) as [`Lab::call`] does.
    async fn call_line(&self, line: &str, from: &str, does: Does) -> Call {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let endpoint = format!("Local/{line}@callgate-inbound/n");
        let (caller, gated) = (format!("{id}-caller"), format!("{id}-gated"));
        let response = self
            .ari
            .http
            .post(format!("{}/channels/create", self.ari.base))
            .basic_auth(ARI_USER, Some(ARI_PASSWORD))
            .query(&[
                ("endpoint", endpoint.as_str()),
                ("app", self.obs.app.as_str()),
                ("appArgs", "caller"),
                ("channelId", caller.as_str()),
                ("otherChannelId", gated.as_str()),
            ])
            .json(&serde_json::json!({ "variables": { "CALLERID(num)": from } }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "create: {:?}",
            response.text().await
        );
        let (status, body) = self
            .ari
            .post(
                &format!("/applications/{}/subscription", self.obs.app),
                &[("eventSource", &format!("channel:{gated}"))],
            )
            .await;
        assert_eq!(status, 200, "subscribe: {body}");
        // `create` answers before the channel's Stasis thread runs; a dial before that is refused
        // with 409 (seen under load).
        let half = caller.clone();
        self.obs
            .until(
                "the caller's half in the test application",
                Duration::from_secs(10),
                |s| s.channels.get(&half)?.in_test_app.then_some(()),
            )
            .await;
        let (status, body) = self
            .ari
            .post(&format!("/channels/{caller}/dial"), &[("timeout", "600")])
            .await;
        assert_eq!(status, 204, "dial: {body}");
        let driver = tokio::spawn(drive(
            self.ari.clone(),
            self.obs.clone(),
            caller.clone(),
            gated.clone(),
            does,
        ));
        Call {
            caller,
            gated,
            driver,
        }
    }

    /// Waits until the call took a route and returns it (`queues,<exten>`).
    async fn routed(&self, call: &Call, limit: Duration) -> String {
        let id = call.gated.clone();
        self.obs
            .until(&format!("a route for {id}"), limit, |s| {
                s.channels.get(&id).and_then(ChannelLog::route)
            })
            .await
    }

    /// Waits until the gated half entered the gate (callgate's first prompt started).
    async fn in_gate(&self, call: &Call) {
        let id = call.gated.clone();
        self.obs
            .until("the first prompt", Duration::from_secs(30), |s| {
                (s.channels.get(&id)?.asks() > 0).then_some(())
            })
            .await;
    }

    /// Waits until the caller was told to open the BankID app (`open-app` started).
    async fn told_to_open_the_app(&self, call: &Call) {
        let id = call.gated.clone();
        self.obs
            .until("open-app", Duration::from_secs(30), |s| {
                s.channels
                    .get(&id)?
                    .media
                    .iter()
                    .any(|m| m.split(',').any(|one| one == OPEN_APP))
                    .then_some(())
            })
            .await;
    }

    async fn var(&self, call: &Call, name: &str) -> Option<String> {
        self.ari.var(&call.gated, name).await
    }

    /// Status and reason as the dialplan sees them.
    async fn outcome(&self, call: &Call) -> (String, String) {
        (
            self.var(call, "CALLGATE_STATUS").await.unwrap_or_default(),
            self.var(call, "CALLGATE_REASON").await.unwrap_or_default(),
        )
    }

    /// callgate's verification record of a call (the trail's daily files, in order).
    fn audit(&self, call: &Call) -> Option<Value> {
        let records = callgate::audit::chain::read_all(&self.dir.join("data/audit")).ok()?;
        records
            .into_iter()
            .map(|r| r.value)
            .find(|r| r["kind"] == "verification" && r["call_id"] == call.gated.as_str())
    }

    /// The agent's phone in an anchored call: the test agent's channel once it answered (it entered
    /// the test's application with the argument `agent`).
    async fn agent_answered(&self) -> String {
        self.obs
            .until("an agent to answer", Duration::from_secs(30), |s| {
                s.channels
                    .iter()
                    .find(|(_, c)| c.args == ["agent"] && !c.destroyed)
                    .map(|(id, _)| id.clone())
            })
            .await
    }

    /// Polls ARI (bounded) until a channel variable has the wanted value.
    async fn until_var(&self, channel: &str, name: &str, want: impl Fn(Option<&str>) -> bool) {
        let deadline = now() + Duration::from_secs(60);
        loop {
            let v = self.ari.var(channel, name).await;
            if want(v.as_deref()) {
                return;
            }
            assert!(
                now() < deadline,
                "{name} on {channel} is {v:?}\n{}",
                asterisk_state()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Subscribes the test's application to a channel of callgate's (once it exists).
    async fn watch(&self, channel: &str) {
        let deadline = now() + Duration::from_secs(20);
        loop {
            let (status, body) = self
                .ari
                .post(
                    &format!("/applications/{}/subscription", self.obs.app),
                    &[("eventSource", &format!("channel:{channel}"))],
                )
                .await;
            if status == 200 {
                return;
            }
            assert!(now() < deadline, "cannot watch {channel}: {status} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ids of callgate's bridges on Asterisk (not the ones `Queue()` makes).
    async fn bridges(&self) -> Vec<String> {
        let (status, body) = self.ari.get("/bridges", &[]).await;
        assert_eq!(status, 200, "{body}");
        body.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b["id"].as_str().map(str::to_owned))
                    .filter(|id| id.starts_with("callgate-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until no bridge and no channel of callgate's is left.
    async fn nothing_left(&self) {
        let deadline = now() + Duration::from_secs(20);
        loop {
            let bridges = self.bridges().await;
            let stranded = self.ari.in_app("callgate").await;
            if bridges.is_empty() && stranded.is_empty() {
                return;
            }
            assert!(
                now() < deadline,
                "left behind: bridges {bridges:?}, in Stasis {stranded:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts nothing of this test is left in callgate's application, then reports the time taken.
    async fn finish(self) {
        let stranded = self.ari.in_app("callgate").await;
        assert!(stranded.is_empty(), "left in Stasis: {stranded:?}");
        let _ = writeln!(
            std::io::stderr(),
            "asterisk test {}: {:.1} s",
            self.name,
            self.began.elapsed().as_secs_f64()
        );
    }
}

/// The wall clock: these tests drive real processes and measure them.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn person(serial: u16) -> String {
    number_with_serial(TABLE_DATE, serial)
}

const ROUTE_LIMIT: Duration = Duration::from_secs(90);

// ---- outcomes ----

#[tokio::test]
async fn verified_caller_reaches_the_queue_with_the_outcome_variables() {
    let Some(mut lab) = Lab::take("verified").await else {
        return;
    };
    let _gate = lab.gate(None, &[]).await;
    let call = lab.call("46700000101", Does::Types(person(101))).await;
    assert_eq!(lab.routed(&call, ROUTE_LIMIT).await, "queues,support");
    assert_eq!(lab.outcome(&call).await, ("verified".into(), String::new()));
    assert_eq!(
        lab.var(&call, "CALLGATE_METHOD").await.as_deref(),
        Some("bankid_phone")
    );
    // The support queue discloses the name and nothing else.
    assert!(lab.var(&call, "CALLGATE_NAME").await.is_some());
    assert_eq!(lab.var(&call, "CALLGATE_NUMBER").await, None);
    assert_eq!(lab.var(&call, "CALLGATE_PSEUDONYM").await, None);
    let reference = lab.var(&call, "CALLGATE_REF").await.unwrap();
    assert_eq!(reference.len(), 36, "{reference}");
    assert!(lab.var(&call, "CALLGATE_AT").await.unwrap().ends_with('Z'));
    // The shipped [queues] extension ran: verified callers queue at priority 10.
    assert_eq!(lab.var(&call, "QUEUE_PRIO").await.as_deref(), Some("10"));
    // Prompts played from the shipped Swedish files, then the outcome.
    let log = lab.obs.log(&call.gated);
    assert!(
        log.media.iter().any(|m| m == "sound:callgate/open-app"),
        "{log:?}"
    );
    assert!(
        log.media.iter().any(|m| m == "sound:callgate/verified"),
        "{log:?}"
    );
    lab.sim.no_open_orders().await;
    let audit = lab.audit(&call).expect("an audit record");
    assert_eq!(audit["status"], "verified");
    assert_eq!(audit["reference"], reference.as_str());
    assert_eq!(audit["destination"], "queues,support,1");
    lab.finish().await;
}

#[tokio::test]
async fn declined_call_goes_to_the_fraud_desk() {
    let Some(mut lab) = Lab::take("declined").await else {
        return;
    };
    let _gate = lab.gate(None, &[]).await;
    let call = lab
        .call("46700000102", Does::Types(Scenario::DeclinesCall.number()))
        .await;
    assert_eq!(lab.routed(&call, ROUTE_LIMIT).await, "queues,fraud-desk");
    assert_eq!(
        lab.outcome(&call).await,
        ("failed".into(), "declined_call".into())
    );
    assert_eq!(
        lab.var(&call, "GATE_ALERT").await.as_deref(),
        Some("declined_call")
    );
    assert_eq!(lab.var(&call, "CALLGATE_NAME").await, None);
    lab.sim.no_open_orders().await;
    lab.finish().await;
}

#[tokio::test]
async fn bankid_maintenance_goes_to_the_fallback_route() {
    let Some(mut lab) = Lab::take("maintenance").await else {
        return;
    };
    let _gate = lab.gate(None, &[]).await;
    let call = lab
        .call("46700000103", Does::Types(Scenario::Maintenance.number()))
        .await;
    assert_eq!(
        lab.routed(&call, ROUTE_LIMIT).await,
        "queues,support-fallback"
    );
    assert_eq!(
        lab.outcome(&call).await,
        ("unavailable".into(), "provider_unavailable".into())
    );
    assert_eq!(lab.var(&call, "QUEUE_PRIO").await.as_deref(), Some("5"));
    let (open, starts, _) = lab.sim.counts();
    assert_eq!(open, 0);
    assert!(starts >= 2, "maintenance starts are retried; saw {starts}");
    lab.finish().await;
}

#[tokio::test]
async fn no_input_ends_failed_no_input_on_the_unverified_route() {
    let Some(mut lab) = Lab::take("no-input").await else {
        return;
    };
    let _gate = lab
        .gate(
            None,
            &[("CALLGATE__QUEUES__SUPPORT__FIRST_DIGIT_TIMEOUT", "2s")],
        )
        .await;
    let call = lab.call("46700000104", Does::Nothing).await;
    assert_eq!(
        lab.routed(&call, ROUTE_LIMIT).await,
        "queues,support-unverified"
    );
    assert_eq!(
        lab.outcome(&call).await,
        ("failed".into(), "no_input".into())
    );
    let log = lab.obs.log(&call.gated);
    // Asked three times (max_entry_attempts), told twice that nothing was typed.
    assert_eq!(log.prompts(ENTER_NUMBER), 3, "{log:?}");
    assert_eq!(log.prompts("sound:callgate/no-input"), 2, "{log:?}");
    assert_eq!(lab.sim.counts().1, 0, "no order may start");
    lab.finish().await;
}

#[tokio::test]
async fn caller_hanging_up_while_approving_cancels_the_order() {
    let Some(mut lab) = Lab::take("hang-up").await else {
        return;
    };
    let _gate = lab.gate(None, &[]).await;
    let call = lab.call("46700000105", Does::Types(person(105))).await;
    lab.sim.wait_counts("an open order", |c| c.0 == 1).await;
    let gated = call.gated.clone();
    lab.obs
        .until("the open-app prompt", Duration::from_secs(30), |s| {
            (s.channels.get(&gated)?.prompts("sound:callgate/open-app") > 0).then_some(())
        })
        .await;
    assert_eq!(
        lab.ari.delete(&format!("/channels/{}", call.caller)).await,
        204
    );
    lab.sim
        .wait_counts("the order cancelled", |c| c.0 == 0 && c.2 == 1)
        .await;
    let id = call.gated.clone();
    lab.obs
        .until("the gated half gone", Duration::from_secs(10), |s| {
            s.channels.get(&id)?.destroyed.then_some(())
        })
        .await;
    assert_eq!(lab.obs.log(&call.gated).route(), None);
    let deadline = now() + Duration::from_secs(10);
    let audit = loop {
        if let Some(a) = lab.audit(&call) {
            break a;
        }
        assert!(now() < deadline, "no audit record");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(audit["status"], "failed");
    assert_eq!(audit["reason"], "caller_hung_up");
    lab.finish().await;
}

// ---- callgate not there ----

#[tokio::test]
async fn callgate_not_running_sends_callers_unverified_at_once() {
    let Some(lab) = Lab::take("not-running").await else {
        return;
    };
    let began = now();
    let call = lab.call("46700000106", Does::Nothing).await;
    assert_eq!(
        lab.routed(&call, Duration::from_secs(10)).await,
        "queues,support-unverified"
    );
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(
        lab.var(&call, "STASISSTATUS").await.as_deref(),
        Some("FAILED")
    );
    assert_eq!(
        lab.var(&call, "GATE_BYPASS").await.as_deref(),
        Some("not_connected")
    );
    assert_eq!(lab.var(&call, "CALLGATE_STATUS").await, None);
    lab.finish().await;
}

#[tokio::test]
async fn callgate_killed_and_not_restarted_the_safety_net_routes_the_caller() {
    let Some(mut lab) = Lab::take("safety-net").await else {
        return;
    };
    let mut gate = lab.gate(None, &[]).await;
    // A short safety net for this call only (the global is read when the call enters the gate).
    lab.ari.set_global("CALLGATE_SAFETY_NET", "6").await;
    let call = lab.call("46700000107", Does::Nothing).await;
    lab.in_gate(&call).await;
    lab.ari
        .set_global("CALLGATE_SAFETY_NET", SHIPPED_SAFETY_NET)
        .await;
    gate.sigkill();
    gate.exited(Duration::from_secs(5)).await;
    let entered = now();
    assert_eq!(
        lab.routed(&call, Duration::from_secs(20)).await,
        "queues,support-unverified"
    );
    assert!(entered.elapsed() < Duration::from_secs(8));
    assert_eq!(
        lab.var(&call, "GATE_BYPASS").await.as_deref(),
        Some("safety_net")
    );
    assert_eq!(lab.var(&call, "CALLGATE_STATUS").await, None);
    let dialplan = lab.obs.log(&call.gated).dialplan;
    assert!(
        dialplan
            .iter()
            .any(|(c, e)| c == "callgate-gate" && e == "T"),
        "{dialplan:?}"
    );
    lab.finish().await;
}

#[tokio::test]
async fn restart_with_a_call_in_the_gate_ends_it_verified_and_serves_the_next_call() {
    let Some(mut lab) = Lab::take("restart").await else {
        return;
    };
    let mut gate = lab
        .gate(None, &[("CALLGATE__SERVER__SHUTDOWN_GRACE", "30s")])
        .await;
    let call = lab.call("46700000108", Does::Types(person(108))).await;
    lab.sim.wait_counts("an open order", |c| c.0 == 1).await;
    gate.sigterm();
    let status = gate.exited(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "callgate exited with {status}:\n{}",
        gate.log_tail()
    );
    let _next = lab.gate(None, &[]).await;
    assert_eq!(lab.routed(&call, ROUTE_LIMIT).await, "queues,support");
    assert_eq!(lab.outcome(&call).await, ("verified".into(), String::new()));
    let later = lab.call("46700000109", Does::Types(person(109))).await;
    assert_eq!(lab.routed(&later, ROUTE_LIMIT).await, "queues,support");
    assert_eq!(
        lab.outcome(&later).await,
        ("verified".into(), String::new())
    );
    lab.sim.no_open_orders().await;
    lab.finish().await;
}

#[tokio::test]
async fn ten_callers_at_once_are_all_verified() {
    let Some(mut lab) = Lab::take("ten").await else {
        return;
    };
    let _gate = lab.gate(None, &[]).await;
    let mut calls = Vec::new();
    for i in 0..10u16 {
        calls.push(
            lab.call(&format!("4670000011{i}"), Does::Types(person(110 + i)))
                .await,
        );
    }
    for call in &calls {
        assert_eq!(lab.routed(call, ROUTE_LIMIT).await, "queues,support");
        assert_eq!(lab.outcome(call).await, ("verified".into(), String::new()));
    }
    lab.sim.no_open_orders().await;
    assert_eq!(lab.sim.counts().1, 10, "one order per caller");
    lab.finish().await;
}

// ---- issue 8: a crash mid-approval (part 2) and a flapping link (part 1) ----

/// SIGKILL while ten people approve, then start again: the orders are resumed from the journal.
#[tokio::test]
async fn sigkill_mid_approval_then_restart_every_approving_caller_is_verified() {
    let Some(mut lab) = Lab::take("sigkill").await else {
        return;
    };
    let mut gate = lab.gate(None, &[]).await;
    let mut calls = Vec::new();
    for i in 0..10u16 {
        calls.push(
            lab.call(&format!("4670000012{i}"), Does::Types(person(120 + i)))
                .await,
        );
    }
    lab.sim.wait_counts("ten open orders", |c| c.0 == 10).await;
    // Approving: each caller has been told to open the app (so the order is journalled).
    for call in &calls {
        lab.told_to_open_the_app(call).await;
    }
    gate.sigkill();
    gate.exited(Duration::from_secs(5)).await;
    let _again = lab.gate(None, &[]).await;
    let mut outcomes = Vec::new();
    for call in &calls {
        let route = lab.routed(call, ROUTE_LIMIT).await;
        outcomes.push((route, lab.outcome(call).await));
    }
    let verified = outcomes
        .iter()
        .filter(|(r, o)| r == "queues,support" && o.0 == "verified")
        .count();
    assert_eq!(
        verified, 10,
        "every approving caller verified: {outcomes:?}"
    );
    lab.sim.no_open_orders().await;
    lab.finish().await;
}

/// Every ARI connection (websocket and REST) reset every 4 s, thirty callers placed 0.3 s apart while
/// the link flaps (never within 0.3 s of a reset), each typing the number again whenever asked.
#[tokio::test]
async fn flapping_ari_link_every_caller_who_types_again_is_verified() {
    let Some(mut lab) = Lab::take("flapping").await else {
        return;
    };
    let proxy = Proxy::start(Some(([127, 0, 0, 1], lab.pbx.port).into()))
        .await
        .unwrap();
    let _gate = lab.gate(Some(&proxy.url()), &[]).await;
    const CALLERS: u16 = 30;
    const PERIOD: Duration = Duration::from_secs(4);
    const SPACING: Duration = Duration::from_millis(300);
    let mut calls = Vec::new();
    let start = tokio::time::Instant::from_std(now());
    let mut round = 0u32;
    // The test drives the fault: a reset at the start of every 4 s round, calls in between.
    loop {
        let at = start + PERIOD * round;
        tokio::time::sleep_until(at).await;
        proxy.reset_all();
        for j in 1..=10u32 {
            if calls.len() < usize::from(CALLERS) {
                tokio::time::sleep_until(at + SPACING * j).await;
                let i = u16::try_from(calls.len()).unwrap();
                calls.push(
                    lab.call(&format!("467000013{i:02}"), Does::Types(person(300 + i)))
                        .await,
                );
            }
        }
        round += 1;
        let seen = lab.obs.seen.lock().unwrap().channels.clone();
        let all_routed = calls.len() == usize::from(CALLERS)
            && calls.iter().all(|c| {
                seen.get(&c.gated)
                    .is_some_and(|l| l.route().is_some() || l.destroyed)
            });
        if all_routed || start.elapsed() > Duration::from_secs(200) {
            break;
        }
    }
    let resets = proxy.counts().resets;
    let mut outcomes = Vec::new();
    for call in &calls {
        // A call without a route is stranded (or gone without one): listed as such.
        let route = lab
            .obs
            .log(&call.gated)
            .route()
            .unwrap_or_else(|| "none".into());
        outcomes.push((route, lab.outcome(call).await));
    }
    assert!(resets >= 3, "{:?}", proxy.counts());
    assert!(
        outcomes.iter().all(|(_, o)| o.1 != "invalid_number"),
        "{outcomes:?}"
    );
    let verified = outcomes
        .iter()
        .filter(|(r, o)| r == "queues,support" && o.0 == "verified")
        .count();
    let started_again = calls
        .iter()
        .filter(|c| lab.obs.log(&c.gated).prompts(START_AGAIN) > 0)
        .count();
    let _ = writeln!(
        std::io::stderr(),
        "asterisk flapping link: {resets} resets, {verified} of {} verified, {started_again} asked to start again",
        calls.len()
    );
    assert_eq!(
        verified,
        calls.len(),
        "every caller verified ({resets} resets): {outcomes:?}"
    );
    lab.sim.no_open_orders().await;
    lab.finish().await;
}

/// The same flapping link and a caller who never types: the link's own bound ends the call
/// `interrupted/pbx_lost`, well before the gate deadline (300 s).
#[tokio::test]
async fn flapping_ari_link_a_caller_who_never_types_ends_pbx_lost() {
    let Some(mut lab) = Lab::take("flapping-silent").await else {
        return;
    };
    let proxy = Proxy::start(Some(([127, 0, 0, 1], lab.pbx.port).into()))
        .await
        .unwrap();
    let _gate = lab.gate(Some(&proxy.url()), &[]).await;
    let call = lab.call("46700000140", Does::Nothing).await;
    lab.in_gate(&call).await;
    let began = now();
    let flapping = proxy.reset_every(Duration::from_secs(4));
    let route = lab.routed(&call, Duration::from_secs(75)).await;
    drop(flapping);
    let _ = writeln!(
        std::io::stderr(),
        "asterisk flapping link, silent caller: routed after {:.1} s, asked {} times",
        began.elapsed().as_secs_f64(),
        lab.obs.log(&call.gated).asks()
    );
    assert_eq!(
        lab.outcome(&call).await,
        ("interrupted".into(), "pbx_lost".into()),
        "after {:.0} s",
        began.elapsed().as_secs_f64()
    );
    assert_eq!(route, "queues,support-unverified");
    lab.finish().await;
}

// ---- anchored calls: agents verify during the call ----

/// What `Queue()` reports as the test agent's interface.
const TEST_AGENT: &str = "Local/agent@callgate-test-agent/n";
/// The test agent's bearer token for the agent API.
const AGENT_TOKEN: &str = "asterisk-test-agent-token-0123456789";

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A request to the agent API as the test agent.
async fn agent_api(
    gate: &Gate,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http_client()
        .request(method, format!("http://127.0.0.1:{}{path}", gate.api))
        .bearer_auth(AGENT_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Reads a call's live stream until a completed check, returning the event names and stages seen.
async fn read_stream(gate: &Gate, call: &str) -> tokio::task::JoinHandle<Vec<String>> {
    let response = http_client()
        .get(format!(
            "http://127.0.0.1:{}/v1/calls/{call}/events",
            gate.api
        ))
        .bearer_auth(AGENT_TOKEN)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    tokio::spawn(async move {
        let mut response = response;
        let mut text = String::new();
        let mut seen = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some((event, rest)) = text.split_once("\n\n") {
                let name = event
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .unwrap_or_default()
                    .to_owned();
                let data: Value = event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or(Value::Null);
                if let Some(stage) = data["verification"]["stage"].as_str() {
                    seen.push(format!("{name}:{stage}"));
                } else if !name.is_empty() {
                    seen.push(name.clone());
                }
                text = rest.to_owned();
                if name == "verification_completed" {
                    return seen;
                }
            }
        }
        seen
    })
}

#[tokio::test]
async fn a_bridged_caller_is_checked_again_when_the_agent_presses_keys_and_goes_on_when_the_agent_hangs_up(
) {
    let Some(mut lab) = Lab::take("anchored-keys").await else {
        return;
    };
    lab.ari.set_global("TEST_AGENT_APP", &lab.obs.app).await;
    let _gate = lab.gate(None, &[]).await;
    let number = person(501);
    let call = lab
        .call_line("300", "46701234567", Does::Types(number))
        .await;
    let agent = lab.agent_answered().await;
    let (leg, peer) = (
        format!("{}-agent", call.gated),
        format!("{}-agent-q", call.gated),
    );
    // Queue() names the agent on callgate's agent leg, which carries the gate's result.
    lab.until_var(&peer, "MEMBERINTERFACE", |v| v == Some(TEST_AGENT))
        .await;
    assert_eq!(
        lab.ari.var(&peer, "CALLGATE_STATUS").await.as_deref(),
        Some("verified")
    );
    let gate_ref = lab.var(&call, "CALLGATE_REF").await.unwrap();
    assert_eq!(lab.bridges().await, [format!("callgate-{}", call.gated)]);
    lab.watch(&leg).await;

    // The agent presses *5 on their phone: the caller is asked again (the test caller types when
    // asked) and verified; the result lands on both legs; the agent alone hears it.
    let (status, body) = lab
        .ari
        .post(
            &format!("/channels/{agent}/dtmf"),
            &[("dtmf", "*5"), ("duration", "80"), ("between", "200")],
        )
        .await;
    assert_eq!(status, 204, "{body}");
    lab.until_var(&call.gated, "CALLGATE_REF", |v| {
        v.is_some_and(|r| r != gate_ref)
    })
    .await;
    let check_ref = lab.var(&call, "CALLGATE_REF").await.unwrap();
    assert_eq!(lab.outcome(&call).await, ("verified".into(), String::new()));
    assert_eq!(
        lab.ari.var(&leg, "CALLGATE_REF").await.as_deref(),
        Some(check_ref.as_str())
    );
    assert_eq!(
        lab.ari.var(&leg, "CALLGATE_STATUS").await.as_deref(),
        Some("verified")
    );
    let leg2 = leg.clone();
    lab.obs
        .until(
            "the agent to hear the outcome",
            Duration::from_secs(20),
            |s| {
                s.channels
                    .get(&leg2)?
                    .media
                    .iter()
                    .any(|m| m.contains("agent-verified"))
                    .then_some(())
            },
        )
        .await;
    let heard = lab.obs.log(&call.gated);
    assert_eq!(
        heard.asks(),
        2,
        "asked in the gate and once during the call: {:?}",
        heard.media
    );
    assert!(!heard.media.iter().any(|m| m.contains("agent-")));

    // The agent hangs up first: the caller goes to the after_agent route; nothing is left.
    assert_eq!(lab.ari.delete(&format!("/channels/{agent}")).await, 204);
    assert_eq!(lab.routed(&call, ROUTE_LIMIT).await, "queues,care-survey");
    lab.nothing_left().await;
    lab.sim.no_open_orders().await;
    lab.finish().await;
}

#[tokio::test]
async fn an_agent_leg_that_ends_before_an_agent_answers_sends_the_caller_to_no_agent() {
    let Some(mut lab) = Lab::take("anchored-no-agent").await else {
        return;
    };
    let _gate = lab
        .gate(
            None,
            &[
                ("CALLGATE__QUEUES__CARE__MODE", "during_call"),
                (
                    "CALLGATE__QUEUES__CARE__ROUTES__AGENT",
                    "callgate-test-agents-closed,care,1",
                ),
            ],
        )
        .await;
    let call = lab.call_line("300", "46701234567", Does::Nothing).await;
    assert_eq!(lab.routed(&call, ROUTE_LIMIT).await, "queues,care-noagent");
    lab.nothing_left().await;
    lab.finish().await;
}

#[tokio::test]
async fn a_restart_leaves_a_bridged_call_running_and_adopts_it() {
    let Some(mut lab) = Lab::take("anchored-restart").await else {
        return;
    };
    lab.ari.set_global("TEST_AGENT_APP", &lab.obs.app).await;
    let during_call = [("CALLGATE__QUEUES__CARE__MODE", "during_call")];
    let mut gate = lab.gate(None, &during_call).await;
    let number = person(502);
    let call = lab
        .call_line("300", "46701234567", Does::Types(number))
        .await;
    let agent = lab.agent_answered().await;
    let peer = format!("{}-agent-q", call.gated);
    lab.until_var(&peer, "MEMBERINTERFACE", |v| v == Some(TEST_AGENT))
        .await;

    // A planned stop: the bridged call is left as it is.
    gate.sigterm();
    assert!(gate.exited(Duration::from_secs(30)).await.success());
    let bridge = format!("callgate-{}", call.gated);
    assert_eq!(lab.bridges().await, std::slice::from_ref(&bridge));
    let (status, body) = lab.ari.get(&format!("/bridges/{bridge}"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body["channels"].as_array().map(Vec::len), Some(2), "{body}");

    // The next start adopts it: the agent sees it in the API and starts a keypad check there.
    let gate = lab.gate(None, &during_call).await;
    let path = format!("/v1/calls/{}", call.gated);
    let deadline = now() + Duration::from_secs(20);
    loop {
        let (status, body) = agent_api(&gate, reqwest::Method::GET, &path, None).await;
        if status == 200 && body["can_verify"] == true {
            assert_eq!(body["agent"], TEST_AGENT);
            break;
        }
        assert!(now() < deadline, "not adopted: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stream = read_stream(&gate, &call.gated).await;
    let (status, body) = agent_api(
        &gate,
        reqwest::Method::POST,
        &format!("{path}/verifications"),
        Some(serde_json::json!({ "collect": "keypad" })),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let check = body["verification_id"].as_str().unwrap().to_owned();
    let seen = tokio::time::timeout(Duration::from_secs(90), stream)
        .await
        .expect("the stream ended the check")
        .unwrap();
    assert!(
        seen.iter().any(|e| e.ends_with(":order_created"))
            && seen.last().map(String::as_str) == Some("verification_completed:done"),
        "{seen:?}"
    );
    let (status, body) = agent_api(
        &gate,
        reqwest::Method::GET,
        &format!("/v1/verifications/{check}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "verified", "{body}");
    assert_eq!(
        lab.var(&call, "CALLGATE_REF").await.as_deref(),
        Some(check.as_str())
    );
    assert_eq!(lab.outcome(&call).await, ("verified".into(), String::new()));

    // The caller hangs up: callgate ends the agent leg and the bridge.
    assert_eq!(
        lab.ari.delete(&format!("/channels/{}", call.caller)).await,
        204
    );
    lab.nothing_left().await;
    // The agent's phone hangs up too: no channel at all is left.
    let deadline = now() + Duration::from_secs(20);
    loop {
        let left = lab.ari.channel_ids().await;
        if left.is_empty() {
            break;
        }
        if now() >= deadline {
            let (_, detail) = lab.ari.get(&format!("/channels/{agent}"), &[]).await;
            panic!("channels left: {left:?}\nagent: {detail}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lab.sim.no_open_orders().await;
    lab.finish().await;
}
