//! `callgate demo` and the lab it runs in: a fake Asterisk and the BankID simulator on loopback, and
//! callgate configured against both, in one process. Scripted callers go through every before-agent
//! outcome; the demo prints a table and exits 0 when every call ended as expected.
//!
//! The same [`Lab`] drives the end-to-end tests, so what the demo shows is what the tests check.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use crate::app::{self, Running};
use crate::calls::Report;
use crate::idp::sim::{self as idp_sim, Scenario, Simulator};
use crate::outcome::{Outcome, Reason};
use crate::pbx::sim::{self as pbx_sim, Caller, ChannelEnd, FakeAsterisk};
use crate::pnr::PersonalNumber;
use crate::telemetry::LogFormat;
use crate::verify;

/// Timings of a lab: fast for tests, slower for a demo a person watches.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// One step of the BankID simulator's scenarios.
    pub step: Duration,
    /// How long a prompt plays.
    pub prompt: Duration,
    /// How often callgate polls the provider.
    pub poll: Duration,
    pub first_digit_timeout: Duration,
    pub inter_digit_timeout: Duration,
    pub verify_timeout: Duration,
    pub gate_deadline: Duration,
    pub shutdown_grace: Duration,
    /// Prompt media the fake Asterisk does not have (their playback fails).
    pub missing_media: BTreeSet<String>,
    /// Gap between a scripted caller's key presses.
    pub key_gap: Duration,
    /// `reason = "context,extension,priority"` rows of the queue's `routes_by_reason`.
    pub routes_by_reason: Vec<(String, String)>,
    /// `server.on_shutdown = "handover"` instead of `"interrupt"`.
    pub handover: bool,
    /// The ARI URL callgate is given instead of the fake Asterisk's own, e.g. a proxy in front of it.
    pub ari_url: Option<String>,
    /// `[limits] max_concurrent_orders` (the bench raises it to its load; written only when it is not
    /// the default).
    pub max_concurrent_orders: usize,
    /// Agent API tokens written to `[api.tokens]` (as their hashes).
    pub api_tokens: Vec<LabToken>,
    /// The anchored queues' agent context has nobody to answer (`agents-closed`).
    pub agents_closed: bool,
    /// A `[[webhooks.targets]]` entry named `lab` with this URL and [`LAB_WEBHOOK_SECRET`], for every
    /// queue and event.
    pub webhook_url: Option<String>,
    /// The `desk` queue checks through an embedded CIBA simulator (`[idp.ciba] kind = "ciba_simulator"`)
    /// instead of the BankID simulator.
    pub desk_ciba: bool,
    /// More `[limits]` keys, `key = value` (the value as TOML, e.g. `"0s"` or `1`).
    pub limits: Vec<(String, String)>,
    /// The `support` queue's `disclose` list, as TOML.
    pub disclose: String,
    /// The body of a `[state]` section (shared state on Redis), as TOML; none = in memory.
    pub state: Option<String>,
    /// The fake Asterisk's system name, the prefix of its channel ids (several sites need distinct
    /// ones).
    pub system_name: String,
    /// The lab switchboard's call-event feed (`[switchboards.lab.feed]`), set by [`Lab::start`] to
    /// its feed simulator unless given.
    pub switchboard_feed: Option<String>,
    /// The lab switchboard has no call-event feed.
    pub without_feed: bool,
}

/// The secret of the lab's webhook target.
pub const LAB_WEBHOOK_SECRET: &str = "lab-webhook-secret-0123456789";

/// An agent API token of a lab.
#[derive(Debug, Clone)]
pub struct LabToken {
    /// `[api.tokens.<name>]`.
    pub name: String,
    /// The bearer token itself; the config gets its SHA-256.
    pub token: String,
    pub role: crate::config::Role,
    /// The agent's interface, for role agent (`PJSIP/1001`).
    pub agent: Option<String>,
}

impl LabOptions {
    pub fn fast() -> LabOptions {
        LabOptions {
            step: Duration::from_millis(40),
            prompt: Duration::from_millis(30),
            poll: Duration::from_millis(20),
            first_digit_timeout: Duration::from_millis(600),
            inter_digit_timeout: Duration::from_millis(400),
            verify_timeout: Duration::from_secs(5),
            gate_deadline: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(5),
            missing_media: BTreeSet::new(),
            key_gap: Duration::from_millis(5),
            routes_by_reason: vec![("declined_call".into(), "queues,fraud-desk,1".into())],
            handover: false,
            ari_url: None,
            max_concurrent_orders: crate::config::Limits::default().max_concurrent_orders,
            api_tokens: Vec::new(),
            agents_closed: false,
            webhook_url: None,
            desk_ciba: false,
            limits: Vec::new(),
            disclose: r#"["name", "masked_number"]"#.to_owned(),
            state: None,
            system_name: "sim".to_owned(),
            switchboard_feed: None,
            without_feed: false,
        }
    }

    pub fn demo() -> LabOptions {
        LabOptions {
            step: Duration::from_millis(500),
            prompt: Duration::from_millis(400),
            poll: Duration::from_millis(250),
            first_digit_timeout: Duration::from_secs(2),
            inter_digit_timeout: Duration::from_millis(1500),
            verify_timeout: Duration::from_secs(20),
            gate_deadline: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            missing_media: BTreeSet::new(),
            key_gap: Duration::from_millis(60),
            routes_by_reason: vec![("declined_call".into(), "queues,fraud-desk,1".into())],
            handover: false,
            ari_url: None,
            max_concurrent_orders: crate::config::Limits::default().max_concurrent_orders,
            api_tokens: Vec::new(),
            agents_closed: false,
            webhook_url: None,
            desk_ciba: false,
            limits: Vec::new(),
            disclose: r#"["name", "masked_number"]"#.to_owned(),
            state: None,
            system_name: "sim".to_owned(),
            switchboard_feed: None,
            without_feed: false,
        }
    }
}

/// The routes of the lab's queue, which the fake dialplan knows.
pub const ROUTES: [(&str, &str, u32); 9] = [
    ("queues", "support", 1),
    ("queues", "support-unverified", 1),
    ("queues", "support-fallback", 1),
    ("queues", "fraud-desk", 1),
    ("queues", "care-fallback", 1),
    ("queues", "care-noagent", 1),
    ("queues", "care-survey", 1),
    ("agents", "care", 1),
    ("agents-closed", "care", 1),
];

/// The lab's agent: the interface `Queue()` reports when they answer a `care` or `desk` call.
pub const LAB_AGENT: &str = "PJSIP/agent1";

/// A fake Asterisk, the BankID simulator and callgate, wired together on loopback.
pub struct Lab {
    pub asterisk: FakeAsterisk,
    pub bankid: Simulator,
    pub app: Running,
    pub options: LabOptions,
    pub data_dir: PathBuf,
    /// The config file callgate was started with (rewrite it and reload to test reloads).
    pub config_path: PathBuf,
    /// The lab switchboard's call-event feed (a simulator callgate connects to).
    pub feed: crate::switchboard::sim::FeedSim,
    reports: broadcast::Receiver<Report>,
    seen: HashMap<String, Report>,
    stop: Option<oneshot::Sender<()>>,
    _idp_token: CancellationToken,
}

impl Lab {
    pub async fn start(options: LabOptions) -> anyhow::Result<Lab> {
        Lab::start_after(options, async |_, _, _| {}).await
    }

    /// Starts the fakes, runs `prepare` against the fake Asterisk, the BankID simulator and the data
    /// directory (a previous run's leftovers), then starts callgate.
    pub async fn start_after(
        options: LabOptions,
        prepare: impl AsyncFnOnce(&FakeAsterisk, &Simulator, &std::path::Path),
    ) -> anyhow::Result<Lab> {
        let (asterisk, bankid, idp_token, data_dir) = start_fakes(&options, "lab").await?;
        let feed = crate::switchboard::sim::FeedSim::start(
            TcpListener::bind("127.0.0.1:0").await?,
            crate::switchboard::sim::FEED_TOKEN,
            idp_token.clone(),
        )?;
        let mut options = options;
        // Its own feed simulator unless the test points it at another one (several sites).
        if options.without_feed {
            options.switchboard_feed = None;
        } else if options.switchboard_feed.is_none() {
            options.switchboard_feed = Some(feed.url());
        }
        let ari = asterisk.settings();
        let toml = lab_toml(&options, &ari, &bankid.url(), &data_dir, None);
        std::fs::create_dir_all(&data_dir)?;
        let config_path = data_dir.join("callgate.toml");
        std::fs::write(&config_path, &toml)?;
        prepare(&asterisk, &bankid, &data_dir).await;
        let (app, stop) = start_app(&toml, &options, &config_path).await?;
        let reports = app.reports.subscribe();
        asterisk.wait_for_connected().await;
        Ok(Lab {
            asterisk,
            bankid,
            app,
            options,
            data_dir,
            config_path,
            feed,
            reports,
            seen: HashMap::new(),
            stop: Some(stop),
            _idp_token: idp_token,
        })
    }

    /// A valid personal number that makes the simulator play `scenario`.
    pub fn number(scenario: Scenario) -> String {
        scenario.number()
    }

    /// A scripted caller who waits for the first prompt and types `number` followed by `#`.
    pub fn caller_typing(&self, number: &str) -> Caller {
        Caller::new("46701234567")
            .await_prompt()
            .press(&format!("{number}#"), self.options.key_gap)
    }

    /// Waits for callgate's report of a call.
    pub async fn report(&mut self, call_id: &str) -> anyhow::Result<Report> {
        loop {
            if let Some(r) = self.seen.remove(call_id) {
                return Ok(r);
            }
            let r = self
                .reports
                .recv()
                .await
                .context("callgate stopped reporting")?;
            self.seen.insert(r.call_id.clone(), r);
        }
    }

    /// Places a call and waits until callgate reported it and the channel left the application.
    pub async fn run_call(&mut self, caller: Caller) -> anyhow::Result<(Report, ChannelEnd)> {
        let id = self.asterisk.call(caller);
        let limit = self.options.gate_deadline + Duration::from_secs(30);
        let report = tokio::time::timeout(limit, self.report(&id))
            .await
            .context("no report before the deadline")??;
        let end = tokio::time::timeout(limit, self.asterisk.wait_for_channel_end(&id))
            .await
            .context("the channel never left the application")?;
        Ok((report, end))
    }

    /// Drains callgate and waits until it stopped.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.app.done).await?;
        let _ = std::fs::remove_dir_all(&self.data_dir);
        Ok(())
    }

    /// Drains callgate as SIGTERM does, then starts it again on the same config, data directory and
    /// fakes (a planned restart).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.app.done).await?;
        self.asterisk.wait_for_disconnected().await;
        let toml = std::fs::read_to_string(&self.config_path)?;
        let (app, stop) = start_app(&toml, &self.options, &self.config_path).await?;
        self.reports = app.reports.subscribe();
        self.app = app;
        self.stop = Some(stop);
        self.asterisk.wait_for_connected().await;
        Ok(())
    }

    /// Triggers the drain without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The lab's fakes: a fake Asterisk whose dialplan has [`ROUTES`], the BankID simulator (stopped by
/// the token), and a fresh data directory path (`callgate-<prefix>-<uuid>` under the temp dir).
pub async fn start_fakes(
    options: &LabOptions,
    prefix: &str,
) -> anyhow::Result<(FakeAsterisk, Simulator, CancellationToken, PathBuf)> {
    let asterisk = pbx_sim::start(
        TcpListener::bind("127.0.0.1:0").await?,
        pbx_sim::SimOptions {
            system_name: options.system_name.clone(),
            prompt_duration: options.prompt,
            missing_media: options.missing_media.clone(),
            dialplan: ROUTES
                .iter()
                .map(|(c, e, p)| ((*c).to_owned(), (*e).to_owned(), *p))
                .collect(),
            // `agents`: one agent who answers after a step; `agents-closed`: nobody answers, the
            // queue gives up after a few steps.
            agents: [
                (
                    "agents".to_owned(),
                    pbx_sim::SimQueue::agent(LAB_AGENT, options.step),
                ),
                (
                    "agents-closed".to_owned(),
                    pbx_sim::SimQueue {
                        members: Vec::new(),
                        timeout: Some(options.step * 3),
                    },
                ),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        },
    )
    .await;
    let token = CancellationToken::new();
    let bankid = idp_sim::start(
        TcpListener::bind("127.0.0.1:0").await?,
        idp_sim::SimOptions {
            step: options.step,
            ..Default::default()
        },
        token.clone(),
    )
    .await?;
    let data_dir = std::env::temp_dir().join(format!("callgate-{prefix}-{}", uuid::Uuid::new_v4()));
    Ok((asterisk, bankid, token, data_dir))
}

/// Starts callgate on the lab's config; the sender stops it.
async fn start_app(
    toml: &str,
    options: &LabOptions,
    config_path: &std::path::Path,
) -> anyhow::Result<(Running, oneshot::Sender<()>)> {
    let cfg = crate::config::load(toml, &HashMap::new(), &|_| None).map_err(|issues| {
        anyhow::anyhow!(
            "lab config: {}",
            issues
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let (stop, stopped) = oneshot::channel::<()>();
    let app = app::start(
        cfg,
        app::Options {
            verify: Some(verify::Settings {
                poll_interval: options.poll,
                min_poll_interval: options.poll.min(Duration::from_millis(10)),
                retry_delay: options.poll,
                unavailable_budget: options.poll * 4,
                ..verify::Settings::default()
            }),
            ops_listener: Some(TcpListener::bind("127.0.0.1:0").await?),
            api_listener: Some(TcpListener::bind("127.0.0.1:0").await?),
            config_path: Some(config_path.to_path_buf()),
            sighup: false,
        },
        async move {
            let _ = stopped.await;
        },
    )
    .await?;
    Ok((app, stop))
}

/// The config of a lab's callgate: the fake Asterisk at `ari`, the BankID simulator at `idp_url`, one
/// gated queue `support` whose routes are [`ROUTES`]. `ops_listen` is left at its default when `None`.
pub fn lab_toml(
    options: &LabOptions,
    ari: &crate::pbx::ari::Settings,
    idp_url: &str,
    data_dir: &std::path::Path,
    ops_listen: Option<std::net::SocketAddr>,
) -> String {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let ops = ops_listen
        .map(|a| format!("ops_listen = \"{a}\""))
        .unwrap_or_default();
    // Only when something differs from the default, so that tests can append a `[limits]` table.
    let mut limit_keys = options.limits.clone();
    if options.max_concurrent_orders != crate::config::Limits::default().max_concurrent_orders {
        // A load sized to `max_concurrent_orders` goes through one provider and one queue.
        let n = options.max_concurrent_orders;
        for (key, value) in [
            ("max_concurrent_orders", n),
            ("max_concurrent_orders_per_idp", n),
            ("max_starts_per_queue_per_minute", n.min(100_000)),
        ] {
            if !limit_keys.iter().any(|(k, _)| k == key) {
                limit_keys.push((key.to_owned(), value.to_string()));
            }
        }
    }
    let limits = if limit_keys.is_empty() {
        String::new()
    } else {
        let mut t = "[limits]\n".to_owned();
        for (k, v) in &limit_keys {
            let _ = writeln!(t, "{k} = {v}");
        }
        t
    };
    let api_tokens = lab_api_tokens(&options.api_tokens);
    let webhooks = options
        .webhook_url
        .as_ref()
        .map(|url| {
            format!(
                "[webhooks]\ninitial_backoff = \"20ms\"\nmax_backoff = \"200ms\"\n\n\
                 [[webhooks.targets]]\nname = \"lab\"\nurl = \"{url}\"\nsecret = \"{LAB_WEBHOOK_SECRET}\"\n\
                 events = [\"verification_completed\", \"fraud_warning\", \"call_ended\"]\n"
            )
        })
        .unwrap_or_default();
    format!(
        r#"
[server]
data_dir = "{data_dir}"
shutdown_grace = "{grace}"
on_shutdown = "{on_shutdown}"
pseudonym_key = "lab-pseudonym-key-0123456789abcdef"
{ops}

[pbx]
kind = "ari"

[pbx.ari]
url = "{ari_url}"
app = "{app}"
username = "{user}"
password = "{password}"
request_timeout = "2s"
ping_interval = "{ping}"
reconnect_min = "{rmin}"
reconnect_max = "{rmax}"

[idp.bankid]
kind = "bankid"
url = "{idp_url}"
request_timeout = "2s"
{ciba_idp}
{limits}
{api_tokens}
{webhooks}
{state}
[queues.support]
idp = "bankid"
languages = ["sv", "en"]
first_digit_timeout = "{first}"
inter_digit_timeout = "{inter}"
verify_timeout = "{verify}"
gate_deadline = "{deadline}"
user_visible_text = "Du legitimerar dig mot Exempelbolagets kundtjänst."
disclose = {disclose}

[queues.support.routes]
verified = "queues,support,1"
failed = "queues,support-unverified,1"
unavailable = "queues,support-fallback,1"

[queues.support.routes_by_reason]
{by_reason}

# Anchored: checked before the agent, kept in a bridge with them, checked again on request.
[queues.care]
idp = "bankid"
mode = "both"
languages = ["sv", "en"]
first_digit_timeout = "{first}"
inter_digit_timeout = "{inter}"
verify_timeout = "{verify}"
gate_deadline = "{deadline}"
disclose = ["name", "masked_number"]
agent_keys = "*5"

[queues.care.routes]
verified = "queues,support,1"
failed = "queues,support-unverified,1"
unavailable = "queues,care-fallback,1"
agent = "{agent_context},care,1"
no_agent = "queues,care-noagent,1"
after_agent = "queues,care-survey,1"

[queues.care.routes_by_reason]
declined_call = "queues,fraud-desk,1"

# Anchored without a gate: checked only when an agent asks.
[queues.desk]
idp = "{desk_idp}"
mode = "during_call"
languages = ["sv", "en"]
first_digit_timeout = "{first}"
inter_digit_timeout = "{inter}"
verify_timeout = "{verify}"
gate_deadline = "{deadline}"
disclose = ["name"]
agent_keys = "*5"

[queues.desk.routes]
verified = "queues,support,1"
failed = "queues,support-unverified,1"
unavailable = "queues,care-fallback,1"
agent = "{agent_context},care,1"
no_agent = "queues,care-noagent,1"

# A hosted switchboard's IVR calling the request-node API.
[switchboards.lab]
token_sha256 = "{switchboard_hash}"
queues = ["support"]
{feed}"#,
        feed = options
            .switchboard_feed
            .as_ref()
            .map(|url| {
                let (min, max, keepalive) = if options.step < Duration::from_millis(200) {
                    ("20ms", "200ms", "200ms")
                } else {
                    ("200ms", "2s", "5s")
                };
                format!(
                    "\n[switchboards.lab.feed]\nurl = \"{url}\"\ntoken = \"{token}\"\nkeepalive = \"{keepalive}\"\n\
                     reconnect_min = \"{min}\"\nreconnect_max = \"{max}\"\n{mapping}",
                    token = crate::switchboard::sim::FEED_TOKEN,
                    mapping = crate::switchboard::sim::FEED_MAPPING,
                )
            })
            .unwrap_or_default(),
        switchboard_hash =
            crate::api::agent::auth::token_hash(LAB_SWITCHBOARD_TOKEN).unwrap_or_default(),
        state = options
            .state
            .as_ref()
            .map(|body| format!("[state]\n{body}\n"))
            .unwrap_or_default(),
        data_dir = data_dir.display(),
        grace = ms(options.shutdown_grace),
        on_shutdown = if options.handover {
            "handover"
        } else {
            "interrupt"
        },
        ari_url = options.ari_url.as_deref().unwrap_or(&ari.url),
        app = ari.app,
        user = ari.username,
        password = ari.password.expose(),
        ping = ms(ari.ping_interval),
        rmin = ms(ari.reconnect_min),
        rmax = ms(ari.reconnect_max),
        limits = limits,
        ciba_idp = if options.desk_ciba {
            "\n[idp.ciba]\nkind = \"ciba_simulator\"\n"
        } else {
            ""
        },
        desk_idp = if options.desk_ciba { "ciba" } else { "bankid" },
        disclose = options.disclose,
        api_tokens = api_tokens,
        webhooks = webhooks,
        first = ms(options.first_digit_timeout),
        inter = ms(options.inter_digit_timeout),
        verify = ms(options.verify_timeout),
        deadline = ms(options.gate_deadline),
        agent_context = if options.agents_closed {
            "agents-closed"
        } else {
            "agents"
        },
        by_reason = options
            .routes_by_reason
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// `[api.tokens.<name>]` tables for a lab's tokens.
fn lab_api_tokens(tokens: &[LabToken]) -> String {
    let mut out = String::new();
    for t in tokens {
        let hash = crate::api::agent::auth::token_hash(&t.token).unwrap_or_default();
        // An invalid token leaves the hash empty: the lab's config then says which.
        let _ = writeln!(
            out,
            "[api.tokens.{}]\nsha256 = \"{hash}\"\nrole = \"{}\"",
            t.name,
            t.role.code()
        );
        if let Some(agent) = &t.agent {
            let _ = writeln!(out, "agent = \"{agent}\"");
        }
    }
    out
}

/// The bearer token of the lab's switchboard (`[switchboards.lab]`, queue `support`).
pub const LAB_SWITCHBOARD_TOKEN: &str = "lab-switchboard-token-not-for-production";

/// One scripted call of the demo.
pub struct DemoCall {
    pub title: &'static str,
    pub number: Option<String>,
    pub expected: Outcome,
    pub caller: Caller,
}

/// The demo's calls: every before-agent outcome.
pub fn demo_calls(lab: &Lab) -> Vec<DemoCall> {
    let gap = lab.options.key_gap;
    // Approving numbers: any serial without a scenario row. Distinct people, so the one-order-per-person
    // rule and the per-person rate limits do not couple the calls.
    let person = |serial: u16| idp_sim::number_with_serial(idp_sim::TABLE_DATE, serial);
    let approve = person(101);
    let wrong = {
        // The approving number with its check digit changed: fails the checksum.
        let mut n = approve.clone().into_bytes();
        let last = n.len() - 1;
        n[last] = b'0' + (n[last] - b'0' + 1) % 10;
        String::from_utf8(n).unwrap_or_default()
    };
    let typed = |s: Scenario| -> (Option<String>, Caller) {
        let n = Lab::number(s);
        (Some(n.clone()), lab.caller_typing(&n))
    };
    let mut calls = Vec::new();
    let mut add = |title, (number, caller): (Option<String>, Caller), expected| {
        calls.push(DemoCall {
            title,
            number,
            expected,
            caller,
        })
    };
    let first = person(100);
    add(
        "verified",
        (Some(first.clone()), lab.caller_typing(&first)),
        Outcome::Verified,
    );
    add(
        "wrong number, then verified",
        (
            Some(approve.clone()),
            Caller::new("46701234568")
                .await_prompt()
                .press(&format!("{wrong}#"), gap)
                .await_prompt()
                .press(&format!("{approve}#"), gap),
        ),
        Outcome::Verified,
    );
    add(
        "cancelled in the app",
        typed(Scenario::UserCancels),
        Outcome::NotVerified(Reason::UserCancelled),
    );
    add(
        "not on a call (declined)",
        typed(Scenario::DeclinesCall),
        Outcome::NotVerified(Reason::DeclinedCall),
    );
    add(
        "order expired",
        typed(Scenario::Expires),
        Outcome::NotVerified(Reason::Expired),
    );
    add(
        "BankID blocked",
        typed(Scenario::BlockedId),
        Outcome::NotVerified(Reason::IdBlocked),
    );
    add(
        "another person approved",
        typed(Scenario::WrongPerson),
        Outcome::NotVerified(Reason::IdentityMismatch),
    );
    add(
        "BankID down (maintenance)",
        typed(Scenario::Maintenance),
        Outcome::NotVerified(Reason::ProviderUnavailable),
    );
    let n = person(102);
    add(
        "caller hangs up while approving",
        (
            Some(n.clone()),
            Caller::new("46701234569")
                .await_prompt()
                .press(&format!("{n}#"), gap)
                .await_media("sound:callgate/open-app")
                .hang_up(),
        ),
        Outcome::NotVerified(Reason::CallerHungUp),
    );
    add(
        "no input",
        (None, Caller::new("46701234570")),
        Outcome::NotVerified(Reason::NoInput),
    );
    calls
}

/// One row of the demo's table.
#[derive(Debug, Clone)]
pub struct Row {
    pub title: &'static str,
    pub call: String,
    pub masked: String,
    pub stages: String,
    pub outcome: Outcome,
    pub expected: Outcome,
    pub route: String,
    pub duration: Duration,
}

/// Runs every demo call at once through a lab and returns the rows.
pub async fn run_calls(lab: &mut Lab) -> anyhow::Result<Vec<Row>> {
    let calls = demo_calls(lab);
    let mut placed = Vec::new();
    for c in calls {
        let id = lab.asterisk.call(c.caller);
        placed.push((id, c.title, c.number, c.expected));
    }
    let mut rows = Vec::new();
    let limit = lab.options.gate_deadline + Duration::from_secs(30);
    for (id, title, number, expected) in placed {
        let report = tokio::time::timeout(limit, lab.report(&id))
            .await
            .with_context(|| format!("{title}: no outcome in time"))??;
        let masked = number
            .as_deref()
            .and_then(|n| PersonalNumber::parse_swedish_12(n).ok())
            .map(|n| n.masked())
            .unwrap_or_else(|| "-".into());
        let stages = report
            .stages
            .iter()
            .filter(|s| **s != verify::Stage::Done)
            .map(|s| s.code())
            .collect::<Vec<_>>()
            .join(" > ");
        rows.push(Row {
            title,
            call: id,
            masked,
            stages: if stages.is_empty() {
                "-".into()
            } else {
                stages
            },
            outcome: report.outcome,
            expected,
            route: report.destination.to_string(),
            duration: report.duration,
        });
    }
    Ok(rows)
}

/// Renders rows as a plain-text table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "call", "scenario", "number", "stages", "status", "reason", "route", "secs", "",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.call.clone(),
                r.title.to_owned(),
                r.masked.clone(),
                r.stages.clone(),
                r.outcome.status().code().to_owned(),
                r.outcome
                    .reason()
                    .map(|x| x.code().to_owned())
                    .unwrap_or_else(|| "-".into()),
                r.route.clone(),
                format!("{:.1}", r.duration.as_secs_f64()),
                if r.outcome == r.expected {
                    "ok".into()
                } else {
                    format!("EXPECTED {}", r.expected)
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[&str]| {
        let padded: Vec<String> = row
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&mut out, &header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(
        &mut out,
        &rule.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for row in &cells {
        line(
            &mut out,
            &row.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
    out
}

/// `callgate demo`: prints the table; `Ok(true)` when every call ended as expected.
pub async fn run(format: LogFormat) -> anyhow::Result<bool> {
    if std::env::var_os("RUST_LOG").is_none() {
        // Keep the table readable: only problems are logged unless RUST_LOG asks for more.
        crate::telemetry::init_logging_with(format, "warn");
    } else {
        crate::telemetry::init_logging(format);
    }
    println!("callgate demo: a simulated Asterisk and a simulated BankID on 127.0.0.1, scripted callers\n");
    let mut options = LabOptions::demo();
    options.api_tokens.push(demo_agent());
    let mut lab = Lab::start(options).await?;
    let rows = run_calls(&mut lab).await?;
    let orders_left = lab.bankid.open_orders();
    print!("{}", table(&rows));
    // Each call's record is on disk before the call goes on to its route.
    let audit = crate::audit::chain::verify(&lab.app.audit_dir);
    let audit_lines = match &audit {
        Ok(intact) => format!("{} (hash chain intact)", intact.records),
        Err(broken) => format!("chain broken at {broken}"),
    };
    println!(
        "\n{} calls, {} as expected; BankID orders left open: {orders_left}; audit records written: {audit_lines}",
        rows.len(),
        rows.iter().filter(|r| r.outcome == r.expected).count(),
    );
    println!("\nDuring a call: a caller of queue `desk` talks to agent {LAB_AGENT}, whose CRM asks callgate");
    println!("(POST /v1/calls/<call>/verifications, {{\"collect\":\"keypad\"}}) to verify them; the live stream shows:\n");
    let mid_call = mid_call(&lab).await?;
    println!("\nHosted switchboard: its IVR's HTTP request nodes start a verification with the typed number");
    println!("(POST /switchboard/v1/verifications), loop on its status and route on the flat variables:\n");
    let (sb_table, sb_ok) = switchboard_calls(&lab).await?;
    print!("{sb_table}");
    println!("\nThe switchboard's call-event feed tells callgate which agent has which call and when it ends:\n");
    let (feed_lines, feed_ok) = switchboard_feed_calls(&lab).await?;
    print!("{feed_lines}");
    let orders_left = lab.bankid.open_orders();
    lab.shutdown().await?;
    let ok = rows.iter().all(|r| r.outcome == r.expected)
        && mid_call
        && sb_ok
        && feed_ok
        && orders_left == 0
        && audit.is_ok();
    Ok(ok)
}

/// The demo's switchboard calls: the lab's switchboard IVR (`[switchboards.lab]`) verifies callers
/// through the request-node API, each flow at once. Returns the table and whether every call ended
/// as expected (a retried node included: it must get the same verification).
pub async fn switchboard_calls(lab: &Lab) -> anyhow::Result<(String, bool)> {
    use crate::switchboard::sim::{Ivr, Typed};
    let nodes = Ivr::new(
        &format!("http://{}", lab.app.api_addr),
        LAB_SWITCHBOARD_TOKEN,
    )?;
    // People of their own (born 1975), so the gate calls' limits and cool-downs do not apply.
    let number = |s: Scenario| idp_sim::number_with_serial("19750505", s.serial());
    let cases: [(&str, String, &str, &str); 4] = [
        (
            "approved in the app",
            number(Scenario::Approve),
            "verified",
            "",
        ),
        (
            "cancelled in the app",
            number(Scenario::UserCancels),
            "failed",
            "user_cancelled",
        ),
        (
            "mistyped number",
            "19811218".to_owned(),
            "failed",
            "invalid_number",
        ),
        (
            "not on a call (declined)",
            number(Scenario::DeclinesCall),
            "failed",
            "declined_call",
        ),
    ];
    let mut runs = Vec::new();
    for (i, (title, number, status, reason)) in cases.into_iter().enumerate() {
        let nodes = nodes.clone();
        runs.push(tokio::spawn(async move {
            let call_id = format!("sb-demo-{i}");
            let t = Typed {
                call_id: &call_id,
                queue: "support",
                number: &number,
                caller: "+46701234567",
                attempt: 0,
            };
            let answer = nodes.verify(&t, 20).await;
            // The switchboard retries the start node: same verification, no second order.
            let again = nodes.start(&t).await;
            (title, status, reason, answer, again)
        }));
    }
    let mut out = format!(
        "{:<28} {:<10} {:<16} {:<16} {}\n",
        "switchboard call", "status", "reason", "name", "retried node"
    );
    let mut ok = true;
    for run in runs {
        let (title, status, reason, answer, again) = run.await?;
        let (answer, again) = (answer?, again?);
        let same = again.var("callgate_ref") == answer.var("callgate_ref");
        ok &= answer.var("callgate_status") == status
            && answer.var("callgate_reason") == reason
            && same;
        let _ = writeln!(
            out,
            "{:<28} {:<10} {:<16} {:<16} {}",
            title,
            answer.var("callgate_status"),
            answer.var("callgate_reason"),
            answer.var("callgate_name"),
            match (same, answer.var("callgate_ref").is_empty()) {
                (true, true) => "nothing started",
                (true, false) => "same verification",
                (false, _) => "NEW ORDER",
            }
        );
    }
    Ok((out, ok))
}

#[allow(clippy::disallowed_methods)] // the demo prints when each event arrived
fn demo_clock() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// The demo agent's bearer token (the lab's config holds only its SHA-256).
pub const DEMO_AGENT_TOKEN: &str = "demo-agent-token-not-for-production";

/// The demo agent's token entry: role agent, interface [`LAB_AGENT`].
pub fn demo_agent() -> LabToken {
    LabToken {
        name: "demo-agent".into(),
        token: DEMO_AGENT_TOKEN.into(),
        role: crate::config::Role::Agent,
        agent: Some(LAB_AGENT.into()),
    }
}

/// Re-checks `cond` until it holds (at most 30 s).
async fn settle(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// The demo's switchboard calls through the call-event feed (the lab's feed simulator): one call is
/// verified by the IVR, answered by agent [`LAB_AGENT`] (needs [`demo_agent`]'s token in the lab),
/// refused a keypad check and verified again with the number the agent types; another caller hangs
/// up while the IVR's check is pending. Returns the lines printed and whether all went as expected.
pub async fn switchboard_feed_calls(lab: &Lab) -> anyhow::Result<(String, bool)> {
    use crate::switchboard::sim::{feed_event, Ivr, Typed};
    tokio::time::timeout(
        Duration::from_secs(30),
        lab.app.switchboards.wait_for_feed("lab", true),
    )
    .await
    .context("the switchboard's feed did not connect")?;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*crate::pbx::ari::tls::client_config()?).clone())
        .build()?;
    let base = format!("http://{}", lab.app.api_addr);
    let nodes = Ivr::new(&base, LAB_SWITCHBOARD_TOKEN)?;
    let began = demo_clock();
    let mut out = String::new();
    let mut ok = true;
    let say = |out: &mut String, what: String| {
        let _ = writeln!(out, "  {:>6.2} s  {what}", began.elapsed().as_secs_f64());
    };

    // A caller verified by the IVR, then by the agent who answered.
    let call = "sb-feed-1";
    let first = idp_sim::number_with_serial("19750606", Scenario::Approve.serial());
    lab.feed.push(&feed_event("CALL_RINGING", call, None));
    settle("the feed's call", || {
        lab.app.switchboards.feed_knows("lab", call)
    })
    .await?;
    say(
        &mut out,
        format!("{call}: feed CALL_RINGING -> call_started (state gate)"),
    );
    let t = Typed {
        call_id: call,
        queue: "support",
        number: &first,
        caller: "+46701234567",
        attempt: 0,
    };
    let ivr = nodes.verify(&t, 20).await?;
    ok &= ivr.var("callgate_status") == "verified";
    say(
        &mut out,
        format!(
            "{call}: IVR request nodes -> callgate_status={}",
            ivr.var("callgate_status")
        ),
    );
    lab.feed.push(&feed_event("CALL_QUEUED", call, None));
    lab.feed
        .push(&feed_event("CALL_ANSWERED", call, Some(LAB_AGENT)));
    settle("the agent on the call", || {
        lab.app.live.call(call).is_some_and(|c| c.can_verify)
    })
    .await?;
    let shown = lab
        .app
        .live
        .call(call)
        .and_then(|c| c.verification)
        .and_then(|v| v.outcome)
        .map_or("-", |o| o.status().code());
    say(
        &mut out,
        format!("{call}: feed CALL_ANSWERED -> agent_connected ({LAB_AGENT} sees the IVR's result: {shown})"),
    );
    let path = format!("{base}/v1/calls/{call}/verifications");
    let keypad = http
        .post(&path)
        .bearer_auth(DEMO_AGENT_TOKEN)
        .json(&serde_json::json!({ "collect": "keypad" }))
        .send()
        .await?;
    let status = keypad.status().as_u16();
    let body: serde_json::Value = keypad.json().await.unwrap_or_default();
    ok &= status == 409 && body["error"] == "keypad_unavailable";
    say(
        &mut out,
        format!(
            "{call}: agent asks for the keypad -> {status} {}",
            body["error"].as_str().unwrap_or("")
        ),
    );
    let typed = http
        .post(&path)
        .bearer_auth(DEMO_AGENT_TOKEN)
        .json(&serde_json::json!({ "number": first }))
        .send()
        .await?;
    let status = typed.status().as_u16();
    let body: serde_json::Value = typed.json().await.unwrap_or_default();
    let id = body["verification_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ok &= status == 202 && !id.is_empty();
    settle("the agent's check", || {
        id.is_empty() || lab.app.live.verification(&id).is_some_and(|v| v.is_over())
    })
    .await?;
    let outcome = lab.app.live.verification(&id).and_then(|v| v.outcome);
    ok &= outcome == Some(Outcome::Verified);
    say(
        &mut out,
        format!(
            "{call}: agent types the number the caller reads out -> {status}, then {}",
            outcome.map_or("-", |o| o.status().code())
        ),
    );
    lab.feed.push(&feed_event("CALL_HANGUP", call, None));
    settle("the call's end", || lab.app.live.call(call).is_none()).await?;
    say(&mut out, format!("{call}: feed CALL_HANGUP -> call_ended"));

    // A caller who hangs up while the IVR's check is pending.
    let call = "sb-feed-2";
    let second = idp_sim::number_with_serial("19750707", Scenario::Approve.serial());
    lab.feed.push(&feed_event("CALL_RINGING", call, None));
    settle("the feed's call", || {
        lab.app.switchboards.feed_knows("lab", call)
    })
    .await?;
    let t = Typed {
        call_id: call,
        queue: "support",
        number: &second,
        caller: "+46701234568",
        attempt: 0,
    };
    let started = nodes.start(&t).await?;
    let id = started.var("callgate_ref").to_owned();
    lab.feed.push(&feed_event("CALL_HANGUP", call, None));
    let polled = nodes.status(&id, 20, true).await?;
    ok &= polled.var("callgate_reason") == "caller_hung_up";
    say(
        &mut out,
        format!(
            "{call}: caller hangs up during the IVR's check -> status node sees {}/{}",
            polled.var("callgate_status"),
            polled.var("callgate_reason")
        ),
    );
    Ok((out, ok))
}

/// The demo's mid-call check: an anchored call, the agent's CRM starts a keypad check through the
/// agent API and prints the call's live stream until the check is over. `true` when verified.
async fn mid_call(lab: &Lab) -> anyhow::Result<bool> {
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*crate::pbx::ari::tls::client_config()?).clone())
        .build()?;
    let base = format!("http://{}", lab.app.api_addr);
    let number = Lab::number(Scenario::Approve);
    let call = lab.asterisk.call(Caller::new("46701234567").queue("desk"));
    let began = demo_clock();
    if lab.asterisk.wait_for_agent(&call).await.is_none() {
        anyhow::bail!("no agent answered the demo call");
    }
    // The agent's token sees the call once callgate's view has the agent (the queue's answer reaches
    // callgate a moment after the fake Asterisk's): wait for that, bounded.
    let mut rx = lab.app.live.subscribe();
    let has_agent = |lab: &Lab| {
        lab.app
            .live
            .call(&call)
            .is_some_and(|c| c.agent.as_deref() == Some(LAB_AGENT))
    };
    let wait = async {
        while !has_agent(lab) {
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .is_err()
    {
        anyhow::bail!("callgate never saw the demo call's agent");
    }
    let mut stream = http
        .get(format!("{base}/v1/calls/{call}/events"))
        .bearer_auth(DEMO_AGENT_TOKEN)
        .send()
        .await?
        .error_for_status()?;
    // Wait until the agent may verify (the agent is connected), then ask.
    let mut text = String::new();
    let mut asked = false;
    let mut verified = false;
    'read: while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(60), stream.chunk()).await??
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some((event, rest)) = text.split_once("\n\n") {
            let name = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default()
                .to_owned();
            let data: serde_json::Value = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or_default();
            text = rest.to_owned();
            if name.is_empty() {
                continue;
            }
            let v = &data["verification"];
            let detail = match name.as_str() {
                "verification_progress" => match v["stage"].as_str() {
                    Some(stage) if !stage.is_empty() => stage.to_owned(),
                    _ => format!("started ({})", v["method"].as_str().unwrap_or("")),
                },
                "verification_completed" => format!(
                    "{} {}",
                    v["status"].as_str().unwrap_or(""),
                    v["fields"]
                        .as_object()
                        .map(|f| f
                            .iter()
                            .filter(|(k, _)| !matches!(
                                k.as_str(),
                                "status" | "reason" | "ref" | "at" | "method"
                            ))
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(" "))
                        .unwrap_or_default()
                ),
                _ => format!(
                    "state={} agent={}",
                    data["state"].as_str().unwrap_or(""),
                    data["agent"].as_str().unwrap_or("-")
                ),
            };
            println!(
                "  {:>6.2} s  {name:<24} {detail}",
                began.elapsed().as_secs_f64()
            );
            if !asked && data["can_verify"] == true {
                asked = true;
                let answer = http
                    .post(format!("{base}/v1/calls/{call}/verifications"))
                    .bearer_auth(DEMO_AGENT_TOKEN)
                    .json(&serde_json::json!({ "collect": "keypad" }))
                    .send()
                    .await?;
                if !answer.status().is_success() {
                    anyhow::bail!("the agent API refused the check: {}", answer.status());
                }
                // The caller is asked on the keypad (muted towards the agent while typing) and types;
                // the stream's next events wait in the socket meanwhile.
                while !lab.asterisk.is_muted(&call, pbx_sim::Direction::In) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                lab.asterisk
                    .press(&call, &format!("{number}#"), lab.options.key_gap)
                    .await;
            }
            if name == "verification_completed" {
                verified = v["status"] == "verified";
                break 'read;
            }
        }
    }
    lab.asterisk.hang_up(&call);
    lab.asterisk
        .wait_for_bridge_gone(&crate::pbx::asterisk::bridge_id(&call))
        .await;
    println!("\nThe caller hung up: callgate ended the agent leg and removed the bridge.");
    Ok(verified)
}
