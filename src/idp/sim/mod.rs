//! Loopback identity-provider simulator speaking the BankID RP v6 wire protocol (`phone/auth`,
//! `collect`, `cancel`), over plain HTTP or mutual TLS with a generated PKI. Used by tests, the demo and
//! `callgate sim-idp`.
//!
//! Behaviour is chosen by the 3-digit serial of the (Luhn-valid, 12-digit) personal number:
//!
//! | serial | behaviour |
//! |---|---|
//! | any other | approves: `outstandingTransaction` → `userCallConfirm` → `userSign` → complete |
//! | 901 | user cancels after confirming the call: failed `userCancel` |
//! | 902 | user says they are not in a call with us: failed `userDeclinedCall` |
//! | 903 | pending `outstandingTransaction` for 3 steps, then failed `expiredTransaction` |
//! | 904 | blocked BankID: failed `certificateErr` |
//! | 905 | every start: 400 `alreadyInProgress` |
//! | 906 | every start: 503 `maintenance` |
//! | 907 | every start: 500 `internalError` |
//! | 908 | every start: 429 `tooManyRequests` with `RateLimit-Limit/Remaining/Reset` (reset 7 s) |
//! | 909 | the order is created at once but the start is answered only after 10 s, then approves |
//! | 910 | pending with the unknown hint `someNewHint`, then completes |
//! | 911 | completes, but `completionData` names another valid personal number |
//! | 912 | fails with the unknown hint `someNewFailure` |
//!
//! [`Scenario::number`] gives a number for each row; [`scenario_table`] lists them. Each pending phase
//! lasts at least its steps *and* is reported by at least one collect, so a poller sees every stage.
//!
//! BankID rules kept: one live order per person (a second start cancels the first, whose collect then
//! says failed `cancelled`, and answers 400 `alreadyInProgress`); collect of an unknown order and cancel of
//! an ended one answer 400 `invalidParameters`; non-POST → 405; a `Content-Type` other than exactly
//! `application/json` → 415; malformed JSON or an invalid number → 400 `invalidParameters`; an order not
//! collected for 30 steps expires (`expiredTransaction`); ended orders are forgotten 30 steps later.
//!
//! [`Simulator::counts`] follows open orders, starts and cancels; `callgate sim-idp` prints them as a
//! line `orders: open N, starts N, cancels N` whenever they change, so a supervising process can tell
//! whether orders were left open.
//!
//! Invariants: binds nothing itself (takes a listener); all tasks end when the shutdown token fires or
//! the [`Simulator`] handle is dropped; no personal number or body is logged.

mod certs;
mod ciba;
mod scenario;
mod server;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, DropGuard};

#[cfg(test)]
pub(crate) use certs::foreign_client;
pub use certs::{issue_rp_certificate, write_unrelated_root, SimFiles};
pub use ciba::{
    start_ciba, CibaScenario, CibaSimulator, KID as CIBA_KID, WORD_PAIR as CIBA_WORD_PAIR,
};
pub use scenario::{
    is_valid_number, luhn_check_digit, number_with_serial, scenario_table, Scenario,
    RATE_LIMIT_RESET_SECS, SLOW_DELAY, TABLE_DATE, UNKNOWN_FAILED_HINT, UNKNOWN_PENDING_HINT,
};

use crate::idp::BankIdSettings;
pub use server::OrderCounts;
use server::Shared;

/// How to run the simulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOptions {
    /// Serve mutual TLS with a generated PKI (files written to `cert_dir`).
    pub tls: bool,
    /// Duration of one scenario step.
    pub step: Duration,
    /// Where to write the generated certificates; default: a fresh directory under the system temp
    /// directory, removed when the simulator is dropped.
    pub cert_dir: Option<PathBuf>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            tls: false,
            step: Duration::from_secs(1),
            cert_dir: None,
        }
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("generating the simulator PKI: {0}")]
    Pki(String),
    #[error("listener: {0}")]
    Listener(#[source] std::io::Error),
}

/// A running simulator. Dropping it stops the server.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    files: Option<SimFiles>,
    /// A generated temp directory to remove on drop.
    temp_dir: Option<PathBuf>,
    _stop: DropGuard,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .field("tls", &self.files.is_some())
            .finish_non_exhaustive()
    }
}

/// Starts serving on `listener` until `shutdown` fires (or the returned handle is dropped).
pub async fn start(
    listener: TcpListener,
    opts: SimOptions,
    shutdown: CancellationToken,
) -> Result<Simulator, Error> {
    let addr = listener.local_addr().map_err(Error::Listener)?;
    let token = shutdown.child_token();
    let shared = Arc::new(Shared::new(opts.step, token.clone()));
    let (files, temp_dir, acceptor) = if opts.tls {
        let (dir, temp) = match &opts.cert_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let dir = std::env::temp_dir()
                    .join(format!("callgate-bankid-sim-{}", uuid::Uuid::new_v4()));
                (dir.clone(), Some(dir))
            }
        };
        let material = certs::generate(&dir)?;
        (
            Some(material.files),
            temp,
            Some(TlsAcceptor::from(material.server_config)),
        )
    } else {
        (None, None, None)
    };
    tokio::spawn(server::serve(listener, acceptor, shared.clone()));
    Ok(Simulator {
        addr,
        shared,
        files,
        temp_dir,
        _stop: token.drop_guard(),
    })
}

impl Simulator {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, `http(s)://127.0.0.1:<port>/rp/v6.0/`.
    pub fn url(&self) -> String {
        let scheme = if self.files.is_some() {
            "https"
        } else {
            "http"
        };
        format!(
            "{scheme}://127.0.0.1:{}{}",
            self.addr.port(),
            server::BASE_PATH
        )
    }

    /// Ready-to-use client settings; with TLS the identity is the PKCS#12 file.
    pub fn settings(&self) -> BankIdSettings {
        match &self.files {
            Some(files) => files.settings(self.url(), files.pkcs12_identity()),
            None => BankIdSettings {
                url: self.url(),
                ..BankIdSettings::default()
            },
        }
    }

    /// Like [`Simulator::settings`] but with the PEM identity (same as `settings()` without TLS).
    pub fn settings_pem(&self) -> BankIdSettings {
        match &self.files {
            Some(files) => files.settings(self.url(), files.pem_identity()),
            None => self.settings(),
        }
    }

    /// The generated certificate files (TLS only).
    pub fn files(&self) -> Option<&SimFiles> {
        self.files.as_ref()
    }

    /// Orders not yet complete, failed, cancelled or expired.
    pub fn open_orders(&self) -> usize {
        *self.shared.open.borrow()
    }

    /// Waits until exactly `n` orders are open.
    pub async fn wait_for_open_orders(&self, n: usize) {
        let mut rx = self.shared.open.subscribe();
        // The sender lives in `self.shared`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|open| *open == n).await;
    }

    /// The order figures, updated after every request and every expiry.
    pub fn counts(&self) -> tokio::sync::watch::Receiver<OrderCounts> {
        self.shared.counts.subscribe()
    }

    /// When each collect of `order_ref` arrived.
    pub fn collect_times(&self, order_ref: &str) -> Vec<Instant> {
        self.shared
            .lock()
            .collect_times
            .get(order_ref)
            .map(|times| times.iter().map(|t| t.into_std()).collect())
            .unwrap_or_default()
    }

    /// `phone/auth` requests received (whatever their answer).
    pub fn starts(&self) -> usize {
        self.shared.lock().starts
    }

    /// `cancel` requests received (whatever their answer).
    pub fn cancels(&self) -> usize {
        self.shared.lock().cancels
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(dir) = &self.temp_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs the simulator for `callgate sim-idp`: binds `listen`, prints the address, the client settings
/// and the scenario table, and serves until `shutdown` completes.
pub async fn run_cli(
    listen: SocketAddr,
    opts: SimOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let listener = TcpListener::bind(listen).await.map_err(Error::Listener)?;
    let token = CancellationToken::new();
    let sim = start(listener, opts, token.clone()).await?;
    println!("BankID RP v6 simulator listening on {}", sim.addr());
    println!("client settings:");
    println!("  url = {:?}", sim.url());
    if let Some(files) = sim.files() {
        println!("  server_ca = {:?}", files.server_ca.display().to_string());
        println!("  # PKCS#12 identity (AES-256, HMAC-SHA-256):");
        println!(
            "  client_p12 = {:?}",
            files.client_p12.display().to_string()
        );
        // A generated throw-away credential for a loopback simulator, printed on purpose.
        println!("  client_p12_password = {:?}", files.p12_password.expose());
        println!("  # or the PEM identity:");
        println!(
            "  client_cert = {:?}",
            files.client_cert.display().to_string()
        );
        println!(
            "  client_key = {:?}",
            files.client_key.display().to_string()
        );
    }
    println!("scenarios (personal number → behaviour):");
    for (number, description) in scenario_table() {
        println!("  {number}  {description}");
    }
    // One line whenever the figures change, so a supervising process (e.g. a test) can tell which
    // orders are still open without talking to the simulator.
    let mut counts = sim.counts();
    let report = async {
        loop {
            let c = *counts.borrow_and_update();
            println!(
                "orders: open {}, starts {}, cancels {}",
                c.open, c.starts, c.cancels
            );
            if counts.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = shutdown => {}
        () = report => {}
    }
    token.cancel();
    Ok(())
}
