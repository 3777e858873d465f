//! The live stream (Server-Sent Events): the current state first, then every event the token may see.
//!
//! Invariants: a feed subscribes before it reads the state, so nothing falls between; a feed that
//! fell behind (`Lagged`) is sent the current state again; agents see only calls whose agent is
//! theirs; every feed ends when the server stops; the first time a feed shows identity fields of a
//! verification, an `identity_viewed` audit record names the token, the verification and the fields.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::Event;
use futures_util::Stream;
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::auth::Principal;
use super::render;
use crate::audit::{self, Audit};
use crate::calls::live::{CallView, LiveEvent, LiveKind};
use crate::calls::Live;

/// Event name of a call's current state, sent first and after a gap.
pub const SNAPSHOT: &str = "snapshot";
/// Event name that ends a set of snapshots of `/v1/events` (data: `{"calls": n}`).
pub const SNAPSHOT_COMPLETE: &str = "snapshot_complete";

/// Which calls a feed follows.
#[derive(Debug, Clone)]
pub enum Scope {
    /// One call (its callgate id); the feed ends after its `call_ended`.
    Call(String),
    /// Every call the principal sees, optionally of one queue.
    All { queue: Option<String> },
}

pub struct Feed {
    rx: broadcast::Receiver<LiveEvent>,
    scope: Scope,
    principal: Arc<Principal>,
    live: Arc<Live>,
    stop: CancellationToken,
    pending: VecDeque<Event>,
    done: bool,
    audit: Option<Audit>,
    /// Verifications whose identity fields this feed has shown (and recorded) already.
    shown: HashSet<String>,
}

impl Feed {
    /// A feed whose receiver `rx` was subscribed before this call reads the state.
    pub fn new(
        rx: broadcast::Receiver<LiveEvent>,
        scope: Scope,
        principal: Arc<Principal>,
        live: Arc<Live>,
        stop: CancellationToken,
        audit: Option<Audit>,
    ) -> Feed {
        let mut feed = Feed {
            rx,
            scope,
            principal,
            live,
            stop,
            pending: VecDeque::new(),
            done: false,
            audit,
            shown: HashSet::new(),
        };
        feed.snapshot();
        feed
    }

    fn admits(&self, call: &CallView) -> bool {
        self.principal.sees(call)
            && match &self.scope {
                Scope::Call(id) => &call.call_id == id,
                Scope::All { queue } => queue.as_ref().is_none_or(|q| q == &call.queue),
            }
    }

    /// Queues the current state.
    fn snapshot(&mut self) {
        match &self.scope {
            Scope::Call(id) => match self.live.call(id).filter(|c| self.admits(c)) {
                Some(c) => self.push(SNAPSHOT, &c),
                // Gone (or no longer visible) while we were behind: the client asks again.
                None => self.done = true,
            },
            Scope::All { .. } => {
                let calls: Vec<CallView> = self
                    .live
                    .calls()
                    .into_iter()
                    .filter(|c| self.admits(c))
                    .collect();
                for c in &calls {
                    self.push(SNAPSHOT, c);
                }
                self.pending.push_back(
                    Event::default()
                        .event(SNAPSHOT_COMPLETE)
                        .data(json!({"calls": calls.len()}).to_string()),
                );
            }
        }
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            let received = tokio::select! {
                _ = self.stop.cancelled() => return None,
                r = self.rx.recv() => r,
            };
            match received {
                Ok(e) if self.admits(&e.call) => {
                    self.push(e.kind.code(), &e.call);
                    if matches!(self.scope, Scope::Call(_)) && e.kind == LiveKind::CallEnded {
                        self.done = true;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "live stream fell behind; sending the state again");
                    self.snapshot();
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// Queues an event; records the first showing of a verification's identity fields.
    fn push(&mut self, name: &str, call: &CallView) {
        if let (Some(audit), Some(v)) = (&self.audit, &call.verification) {
            let fields = render::identity_fields(v);
            if !fields.is_empty() && self.shown.insert(v.id.clone()) {
                audit.note(audit::Event::IdentityViewed {
                    reference: v.id.clone(),
                    call_id: v.call_id.clone(),
                    by: self.principal.started_by().to_string(),
                    fields,
                });
            }
        }
        self.pending.push_back(event(name, call));
    }

    pub fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures_util::stream::unfold(self, |mut feed| async move {
            feed.next().await.map(|e| (Ok(e), feed))
        })
    }
}

fn event(name: &str, call: &CallView) -> Event {
    Event::default()
        .event(name)
        .data(render::call(call).to_string())
}
