//! A loopback TCP proxy that can reset every connection through it, for link-fault tests.
//!
//! It binds `127.0.0.1:0` and forwards bytes both ways to a target. [`Proxy::reset_all`] aborts every
//! live connection on both sides with a TCP RST (`SO_LINGER` 0, then close), the way a middlebox or a
//! crashed peer cuts a link; [`Proxy::reset_every`] does so periodically until the returned guard is
//! dropped. New connections are accepted again at once, so a client sees a flapping link, not an
//! outage. Tasks run on the runtime of the test that started the proxy and end with it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Figures of a proxy: connections accepted so far and connections open now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    pub accepted: u64,
    pub live: u64,
    pub resets: u64,
}

struct Inner {
    target: Mutex<Option<SocketAddr>>,
    /// Cancelled (and replaced) by every reset; each connection watches the one current when it opened.
    generation: Mutex<CancellationToken>,
    counts: watch::Sender<ProxyCounts>,
    live: AtomicU64,
    stop: CancellationToken,
}

/// A running proxy. Dropping it stops accepting and closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        self.reset_all();
    }
}

/// Stops the periodic resets of [`Proxy::reset_every`] when dropped.
pub struct Flapping(#[allow(dead_code)] tokio_util::sync::DropGuard);

#[allow(dead_code)] // each test binary uses a different part of the support code
impl Proxy {
    /// Binds `127.0.0.1:0`; forwards to `target` once it is set ([`Proxy::set_target`]). A
    /// connection that arrives before a target is known is closed at once.
    pub async fn start(target: Option<SocketAddr>) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            target: Mutex::new(target),
            generation: Mutex::new(CancellationToken::new()),
            counts: watch::Sender::new(ProxyCounts::default()),
            live: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, inner.clone()));
        Ok(Proxy { addr, inner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_target(&self, target: SocketAddr) {
        *self.inner.target.lock().unwrap() = Some(target);
    }

    /// Resets every live connection (both sides get an RST). Returns how many were open.
    pub fn reset_all(&self) -> u64 {
        let old = {
            let mut generation = self.inner.generation.lock().unwrap();
            std::mem::replace(&mut *generation, CancellationToken::new())
        };
        old.cancel();
        let live = self.inner.live.load(Ordering::SeqCst);
        self.inner.counts.send_modify(|c| c.resets += 1);
        live
    }

    /// Resets every live connection every `period` until the guard is dropped.
    pub fn reset_every(&self, period: Duration) -> Flapping {
        let stop = self.inner.stop.child_token();
        let inner = self.inner.clone();
        let until = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.tick().await; // the first tick is immediate
            loop {
                tokio::select! {
                    () = until.cancelled() => return,
                    _ = tick.tick() => {
                        let old = {
                            let mut generation = inner.generation.lock().unwrap();
                            std::mem::replace(&mut *generation, CancellationToken::new())
                        };
                        old.cancel();
                        inner.counts.send_modify(|c| c.resets += 1);
                    }
                }
            }
        });
        Flapping(stop.drop_guard())
    }

    pub fn counts(&self) -> ProxyCounts {
        *self.inner.counts.borrow()
    }

    /// Waits until at least `n` connections were accepted in total.
    pub async fn wait_for_accepted(&self, n: u64) {
        let mut rx = self.inner.counts.subscribe();
        let _ = rx.wait_for(|c| c.accepted >= n).await;
    }

    /// Waits until exactly `n` connections are open.
    pub async fn wait_for_live(&self, n: u64) {
        let mut rx = self.inner.counts.subscribe();
        let _ = rx.wait_for(|c| c.live == n).await;
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = inner.stop.cancelled() => return,
        };
        let Ok((client, _)) = accepted else {
            continue;
        };
        let target = *inner.target.lock().unwrap();
        let generation = inner.generation.lock().unwrap().clone();
        let inner = inner.clone();
        tokio::spawn(async move {
            let Some(target) = target else {
                abort(&client);
                return;
            };
            let Ok(server) = TcpStream::connect(target).await else {
                abort(&client);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            inner.live.fetch_add(1, Ordering::SeqCst);
            inner.counts.send_modify(|c| {
                c.accepted += 1;
                c.live += 1;
            });
            pump(client, server, &generation).await;
            inner.live.fetch_sub(1, Ordering::SeqCst);
            inner.counts.send_modify(|c| c.live -= 1);
        });
    }
}

/// Copies both ways until either side closes (then closes the other normally) or `reset` fires
/// (then both sides are aborted with an RST).
async fn pump(mut client: TcpStream, mut server: TcpStream, reset: &CancellationToken) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        () = reset.cancelled() => {
            abort(&client);
            abort(&server);
        }
    }
}

/// Makes the close of `stream` send an RST instead of a FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}
