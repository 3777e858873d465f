//! Wiring: builds the identity providers, the PBX adapter, the call registry, the agent API and the ops
//! API from a `Config`, runs until shutdown, then drains.
//!
//! Drain: `/readyz` turns false and new calls are passed on as `skipped/draining`; calls in the gate get
//! `shutdown_grace` to finish; the rest are interrupted (each cancels its order, sets its metadata and
//! continues in the dialplan); then every task is awaited under a hard timeout.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::agent::{self, AgentState};
use crate::api::ops::{self, OpsState, Readiness, ReloadRequest};
use crate::api::switchboard::{self as switchboard_api, BoardTokens, SwitchboardState};
use crate::api::widget;
use crate::audit::{self, Audit};
use crate::calls::journal::Journal;
use crate::calls::limits::{self, Limiter, Limits};
use crate::calls::task::Deps;
use crate::calls::{Live, Registry, Report};
use crate::config::{self, Config, Idp, Pbx, StateKind};
use crate::idp::{self, Provider};
use crate::pbx::ari;
use crate::pbx::asterisk::Adapter;
use crate::pbx::routecheck::RouteCheck;
use crate::pnr::PseudonymKey;
use crate::state::{KeyCheck, Shared};
use crate::switchboard::Switchboards;
use crate::telemetry::Metrics;
use crate::verify;

/// How to run, beyond the config file.
#[derive(Default)]
pub struct Options {
    /// The file to re-read on reload (`POST /reload`, SIGHUP).
    pub config_path: Option<PathBuf>,
    /// Overrides of the verification timing (tests and the demo use shorter polls).
    pub verify: Option<verify::Settings>,
    /// A pre-bound ops listener (tests bind 127.0.0.1:0); default: bind `server.ops_listen`.
    pub ops_listener: Option<TcpListener>,
    /// A pre-bound agent API listener (tests bind 127.0.0.1:0); default: bind `server.listen`.
    pub api_listener: Option<TcpListener>,
    /// Reload on SIGHUP.
    pub sighup: bool,
}

/// A running callgate.
pub struct Running {
    pub ops_addr: SocketAddr,
    /// Where the agent API listens.
    pub api_addr: SocketAddr,
    pub registry: Registry,
    /// What the agent API sees of calls and checks.
    pub live: Arc<Live>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub reports: broadcast::Sender<Report>,
    /// The audit trail's directory (`<data_dir>/audit`).
    pub audit_dir: PathBuf,
    /// The switchboards' verifications and the calls their feeds reported.
    pub switchboards: Arc<Switchboards>,
    pub done: JoinHandle<()>,
}

/// Starts everything; the returned handle's `done` completes after `shutdown` fired and the drain ended.
pub async fn start(
    cfg: Config,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    let root = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let tracker = TaskTracker::new();
    let registry = Registry::new();
    let (reports, _) = broadcast::channel(256);

    let (journal, left_open) = Journal::open(&cfg.server.data_dir).with_context(|| {
        format!(
            "opening the order journal in {}",
            cfg.server.data_dir.display()
        )
    })?;
    // Switchboard orders are settled by `Switchboards::recover`, the rest by the PBX adapter.
    let (switchboard_left, left_open): (Vec<_>, Vec<_>) = left_open
        .into_iter()
        .partition(crate::switchboard::is_journalled);
    if !left_open.is_empty() || !switchboard_left.is_empty() {
        tracing::warn!(
            orders = left_open.len() + switchboard_left.len(),
            "orders left open by the previous run: resuming those whose callers still wait, cancelling the rest"
        );
    }

    let mut simulators = Vec::new();
    let mut ciba_simulators = Vec::new();
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    for (name, idp_cfg) in &cfg.idps {
        let settings = match idp_cfg {
            Idp::Ciba(s) => {
                let client = idp::ciba::Client::new(s)
                    .with_context(|| format!("idp.{name}: building the CIBA client"))?;
                providers.insert(name.clone(), Arc::new(client));
                continue;
            }
            Idp::CibaSimulator => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let sim = idp::sim::start_ciba(listener, root.child_token())
                    .await
                    .with_context(|| format!("starting the CIBA simulator for idp.{name}"))?;
                tracing::info!(idp = %name, addr = %sim.addr(), "CIBA simulator started");
                let client = idp::ciba::Client::new(&sim.settings())
                    .with_context(|| format!("idp.{name}: building the CIBA client"))?;
                providers.insert(name.clone(), Arc::new(client));
                ciba_simulators.push(sim);
                continue;
            }
            Idp::BankId(s) => {
                let rp = s
                    .identity
                    .as_ref()
                    .and_then(|i| idp::bankid::rp_certificate_not_after(i).ok());
                let ca = s
                    .server_ca
                    .as_deref()
                    .and_then(|p| idp::bankid::ca_not_after(p).ok());
                metrics.certificate_expiry(name, rp, ca);
                s.clone()
            }
            Idp::Simulator { step } => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let sim = idp::sim::start(
                    listener,
                    idp::sim::SimOptions {
                        step: *step,
                        ..Default::default()
                    },
                    root.child_token(),
                )
                .await
                .with_context(|| format!("starting the simulator for idp.{name}"))?;
                let s = sim.settings();
                tracing::info!(idp = %name, addr = %sim.addr(), "identity-provider simulator started");
                simulators.push(sim);
                s
            }
        };
        let client = idp::bankid::Client::new(&settings)
            .with_context(|| format!("idp.{name}: building the BankID client"))?;
        providers.insert(name.clone(), Arc::new(client));
    }

    let key = if cfg.server.pseudonym_key.is_empty() {
        // Without a configured key, pseudonyms must still not be recomputable from a number: use a
        // random key, at the price of pseudonyms that change at every start.
        tracing::warn!("server.pseudonym_key is not set: using a random key for disclosed pseudonyms (they change at every start); the audit trail uses its own key file");
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| anyhow::anyhow!("no system randomness for the pseudonym key"))?;
        PseudonymKey::new(bytes.to_vec())
    } else {
        PseudonymKey::new(cfg.server.pseudonym_key.expose().as_bytes().to_vec())
    };
    let webhooks = crate::webhooks::Webhooks::start(
        &cfg.webhooks,
        &cfg.server.data_dir,
        Arc::clone(&metrics),
        root.child_token(),
    )
    .with_context(|| {
        format!(
            "opening the webhook outbox in {}",
            cfg.server.data_dir.display()
        )
    })?;
    let (webhooks, webhook_dispatcher) = match webhooks {
        Some(w) => (Some(w.webhooks), Some(w.dispatcher)),
        None => (None, None),
    };
    let audit_key = (!cfg.server.pseudonym_key.is_empty()).then(|| key.clone());
    let audit = Audit::open(
        &cfg.server.data_dir,
        audit::Settings::new(cfg.audit.retention_days, audit_key),
    )
    .with_context(|| {
        format!(
            "opening the audit trail in {}",
            cfg.server.data_dir.display()
        )
    })?;
    let audit_dir = audit.dir().to_path_buf();
    {
        // Retention is also applied at each daily roll; this covers a trail with no records for days.
        let audit = audit.clone();
        let stop = root.child_token();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = every.tick() => audit.sweep(),
                }
            }
        });
    }
    let shared = shared_state(&cfg, &key, &metrics).await?;
    let live = Arc::new(match &shared {
        Some(sh) => Live::with_instance(cfg.api.keep_verifications, sh.instance()),
        None => Live::new(cfg.api.keep_verifications),
    });
    let drain_token = CancellationToken::new();
    let deps = Arc::new(Deps {
        providers,
        limits: {
            let own = Limits::new(limits::Settings {
                max_concurrent_orders: cfg.limits.max_concurrent_orders,
                max_concurrent_orders_per_idp: cfg.limits.max_concurrent_orders_per_idp,
                max_starts_per_number_per_hour: cfg.limits.max_starts_per_number_per_hour,
                max_starts_per_line_per_hour: cfg.limits.max_starts_per_line_per_hour,
                max_checks_per_agent_per_hour: cfg.limits.max_checks_per_agent_per_hour,
                max_starts_per_queue_per_minute: cfg.limits.max_starts_per_queue_per_minute,
                declined_cool_down: cfg.limits.declined_cool_down,
            });
            match &shared {
                Some(sh) => Limiter::shared(own, Arc::clone(sh)),
                None => Limiter::local(own),
            }
        },
        key,
        verify: opts.verify.clone().unwrap_or_default(),
        audit: Some(audit.clone()),
        journal: Some(journal),
        on_shutdown: cfg.server.on_shutdown,
        metrics: Arc::clone(&metrics),
        registry: registry.clone(),
        reports: reports.clone(),
        live: Arc::clone(&live),
        drain: drain_token.clone(),
        webhooks,
    });

    let (config_tx, config_rx) = watch::channel(Arc::clone(&cfg));
    let config_rx_api = config_rx.clone();

    // The PBX adapter.
    let Pbx::Ari(ari_settings) = &cfg.pbx;
    let client = ari::rest::Client::new(ari_settings).context("building the ARI client")?;
    let (events_tx, events_rx) = mpsc::channel(1024);
    let events_token = CancellationToken::new();
    let (events_task, _conn) =
        ari::events::spawn(ari_settings.clone(), events_tx, events_token.clone());
    let calls_token = root.child_token();
    let adapter = Arc::new(Adapter {
        client,
        app: ari_settings.app.clone(),
        deps: Arc::clone(&deps),
        routes: Arc::new(RouteCheck::new(config_rx.clone())),
        config: config_rx,
        readiness: Arc::clone(&readiness),
        tracker: tracker.clone(),
        calls: calls_token.clone(),
        seen: Default::default(),
        left_open: std::sync::Mutex::new(left_open),
    });
    let router_token = CancellationToken::new();
    let router = tokio::spawn(Arc::clone(&adapter).run(events_rx, router_token.clone()));

    // Hosted switchboards' verifications (their request-node API joins the agent API below).
    let switchboards = Switchboards::new(
        Arc::clone(&deps),
        config_rx_api.clone(),
        tracker.clone(),
        calls_token.clone(),
        shared.clone(),
    );

    // The view shared with the other instances.
    let replica = match &shared {
        Some(sh) => crate::state::replica::spawn(
            Arc::clone(sh),
            Arc::clone(&live),
            registry.clone(),
            Some(Arc::clone(&switchboards)),
            root.child_token(),
        ),
        None => Vec::new(),
    };

    // The ops listener.
    let listener = match opts.ops_listener {
        Some(l) => l,
        None => TcpListener::bind(cfg.server.ops_listen)
            .await
            .with_context(|| format!("binding server.ops_listen {}", cfg.server.ops_listen))?,
    };
    let ops_addr = listener.local_addr()?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let ops_router = ops::router(OpsState {
        readiness: Arc::clone(&readiness),
        metrics: Arc::clone(&metrics),
        reload: reload_tx.clone(),
    })
    // A 503 from /readyz is an answer, not a failure of ours: keep it out of the error log.
    .layer(
        tower_http::trace::TraceLayer::new_for_http()
            .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG)),
    );
    let ops_token = CancellationToken::new();
    let ops_stop = ops_token.clone();
    let ops_task = tokio::spawn(async move {
        let serve = axum::serve(listener, ops_router)
            .with_graceful_shutdown(async move { ops_stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %crate::telemetry::ErrorChain(&e), "ops listener failed");
        }
    });
    // The agent API.
    let listener = match opts.api_listener {
        Some(l) => l,
        None => TcpListener::bind(cfg.server.listen)
            .await
            .with_context(|| format!("binding server.listen {}", cfg.server.listen))?,
    };
    let api_addr = listener.local_addr()?;
    let api_token = CancellationToken::new();
    let api_router = agent::router(
        AgentState {
            live: Arc::clone(&live),
            registry: registry.clone(),
            tokens: Arc::new(agent::auth::Tokens::from_config(&cfg.api)),
            limits: agent::Limits {
                max_body: cfg.api.max_body,
                ..agent::Limits::default()
            },
            readiness: Arc::clone(&readiness),
            stop: api_token.clone(),
            audit: Some(audit.clone()),
            shared: shared.clone(),
        },
        &widget::Embedding::from_config(&cfg.api),
    );
    if cfg.api.tokens.is_empty() {
        tracing::info!("no [api.tokens]: the agent API answers 401 to every request");
    }
    // The switchboards' request-node API, on the same listener.
    switchboards.recover(switchboard_left);
    switchboards.start_feeds();
    let api_router = api_router.merge(switchboard_api::router(SwitchboardState {
        engine: Arc::clone(&switchboards),
        tokens: Arc::new(BoardTokens::from_config(&cfg)),
        readiness: Arc::clone(&readiness),
        max_body: cfg.api.max_body,
    }));
    let api_stop = api_token.clone();
    let api_task = tokio::spawn(async move {
        let serve = axum::serve(listener, api_router)
            .with_graceful_shutdown(async move { api_stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "agent api listener failed");
        }
    });
    tracing::info!(ops = %ops_addr, api = %api_addr, "callgate started");

    // Reloads: validate the whole file first; keep the old config on any error.
    let config_path = opts.config_path.clone();
    let running = Arc::clone(&cfg);
    let reload_task = tokio::spawn(async move {
        while let Some(answer) = reload_rx.recv().await {
            let result = match &config_path {
                None => Err(vec![
                    "no config file to reload (started without --config)".to_owned()
                ]),
                Some(path) => match config::load_file(path) {
                    Ok(new) => match reloadable(&running, &new) {
                        Err(problems) => {
                            tracing::error!(
                                issues = problems.len(),
                                "config reload refused; keeping the running config"
                            );
                            Err(problems)
                        }
                        Ok(()) => {
                            let summary = config::summary(&new);
                            config_tx.send_replace(Arc::new(new));
                            tracing::info!("config reloaded");
                            Ok(summary)
                        }
                    },
                    Err(issues) => {
                        tracing::error!(
                            issues = issues.len(),
                            "config reload refused; keeping the running config"
                        );
                        Err(issues.iter().map(ToString::to_string).collect())
                    }
                },
            };
            let _ = answer.send(result);
        }
    });
    if opts.sighup {
        spawn_sighup(reload_tx.clone());
    }

    let grace = cfg.server.shutdown_grace;
    let done_registry = registry.clone();
    let done_readiness = Arc::clone(&readiness);
    let done_journal = deps.journal.clone();
    let done_webhooks = deps.webhooks.clone();
    let done_audit = deps.audit.clone();
    let done = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("draining");
        done_readiness.draining.store(true, Ordering::SeqCst);
        drain_token.cancel();
        if !wait_empty(&done_registry, grace).await {
            tracing::warn!(
                calls = done_registry.len(),
                "grace period over; interrupting calls still in the gate"
            );
        }
        calls_token.cancel();
        // Interrupted calls need the PBX connection to route their callers: keep it until they are done.
        if !wait_empty(&done_registry, Duration::from_secs(20)).await {
            tracing::error!(calls = ?done_registry.ids(), "calls overran the drain");
        }
        router_token.cancel();
        events_token.cancel();
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .is_err()
        {
            tracing::error!("tasks still running after the drain");
        }
        if let Some(journal) = &done_journal {
            // Closed orders are recorded before the next start reads the journal.
            if !journal.flush().await {
                tracing::error!("the order journal could not be written at shutdown");
            }
        }
        if let Some(webhooks) = &done_webhooks {
            // Events of the last calls are on disk before the dispatcher stops; what is undelivered
            // is delivered by the next start.
            if !webhooks.flush().await {
                tracing::error!("the webhook outbox could not be written at shutdown");
            }
        }
        if let Some(audit) = &done_audit {
            if !audit.flush().await {
                tracing::error!("the audit trail could not be written at shutdown");
            }
        }
        ops_token.cancel();
        // Also ends every live stream, so the graceful shutdown does not wait for them.
        api_token.cancel();
        root.cancel();
        let _ = ops_task.await;
        let _ = api_task.await;
        let _ = router.await;
        let _ = events_task.await;
        if let Some(dispatcher) = webhook_dispatcher {
            let _ = dispatcher.await;
        }
        for task in replica {
            let _ = task.await;
        }
        reload_task.abort();
        drop(simulators);
        drop(ciba_simulators);
        drop(reload_tx);
        tracing::info!("stopped");
    });

    Ok(Running {
        ops_addr,
        api_addr,
        registry,
        live,
        readiness,
        metrics,
        reports,
        audit_dir,
        switchboards,
        done,
    })
}

/// The shared state of `[state] kind = "redis"`: built lazily (a Redis that is down at start does not
/// keep callgate from starting), with the pseudonym key's fingerprint checked when Redis answers.
async fn shared_state(
    cfg: &Config,
    key: &crate::pnr::PseudonymKey,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<Shared>>> {
    let StateKind::Redis(settings) = &cfg.state.kind else {
        return Ok(None);
    };
    let Pbx::Ari(ari_settings) = &cfg.pbx;
    let instance = cfg.state.instance_or(&host_name(), &ari_settings.app);
    let shared = Shared::new(
        settings,
        &instance,
        key,
        Arc::clone(metrics),
        cfg.api.keep_verifications,
    )?;
    match shared.check_key().await {
        Ok(KeyCheck::Same) => {
            tracing::info!(instance = %instance, "shared state on Redis");
        }
        Ok(KeyCheck::Different) => anyhow::bail!(
            "state: the instances already in Redis (key prefix {:?}) use another server.pseudonym_key; every instance must use the same one",
            settings.key_prefix
        ),
        Err(e) => {
            tracing::warn!(instance = %instance, error = %e, on_unavailable = settings.on_unavailable.code(), "shared state unreachable at start; calls are taken and Redis is retried");
        }
    }
    Ok(Some(shared))
}

/// This machine's host name, for the default instance id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "callgate".to_owned())
}

/// Runs until `shutdown`, then drains.
pub async fn run(
    cfg: Config,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let running = start(cfg, opts, shutdown).await?;
    running.done.await.context("the main task failed")?;
    Ok(())
}

/// What a reload can change: the queues and `[defaults]`. Providers, the PBX connection, the listeners,
/// the limits, the API tokens, the webhook targets and the audit trail are built once at start; a new file that needs different ones is refused rather than
/// half applied.
fn reloadable(running: &Config, new: &Config) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let restart = |what: &str| format!("{what}: changed; takes effect only at a restart");
    if new.server != running.server {
        problems.push(restart("server"));
    }
    if new.pbx != running.pbx {
        problems.push(restart("pbx"));
    }
    if new.idps != running.idps {
        problems.push(restart("idp"));
    }
    if new.limits != running.limits {
        problems.push(restart("limits"));
    }
    if new.api != running.api {
        problems.push(restart("api"));
    }
    if new.webhooks != running.webhooks {
        problems.push(restart("webhooks"));
    }
    if new.audit != running.audit {
        problems.push(restart("audit"));
    }
    if new.switchboards != running.switchboards {
        problems.push(restart("switchboards"));
    }
    if new.state != running.state {
        problems.push(restart("state"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Waits until no call is registered, up to `limit`. `true` if it emptied.
async fn wait_empty(registry: &Registry, limit: Duration) -> bool {
    let wait = async {
        while !registry.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(limit, wait).await.is_ok()
}

#[cfg(unix)]
fn spawn_sighup(reload: mpsc::Sender<ReloadRequest>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot listen for SIGHUP");
            return;
        };
        while hup.recv().await.is_some() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if reload.send(tx).await.is_err() {
                return;
            }
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(issues)) => {
                    for i in issues {
                        tracing::error!(issue = %i, "config problem");
                    }
                }
                Err(_) => return,
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_sighup(_reload: mpsc::Sender<ReloadRequest>) {}
