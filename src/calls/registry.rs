//! `calls::Registry`: one map from call id (the caller's channel id) to the call's handle.
//!
//! Invariants: the registry holds no mutable call state, only handles; no map reference is held across
//! an `.await`; an entry is removed by the [`Entry`] guard its task holds, however the task ends.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{CallEvent, Snapshot};

/// How a task is reached.
#[derive(Debug, Clone)]
pub struct Handle {
    pub inbox: mpsc::Sender<CallEvent>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub cancel: CancellationToken,
}

#[derive(Debug, Default, Clone)]
pub struct Registry {
    calls: Arc<DashMap<String, Handle>>,
}

/// Removes its call from the registry when dropped.
#[derive(Debug)]
pub struct Entry {
    calls: Arc<DashMap<String, Handle>>,
    id: String,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.calls.remove(&self.id);
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers a call; `None` if the id is already registered.
    pub fn insert(&self, id: &str, handle: Handle) -> Option<Entry> {
        use dashmap::mapref::entry::Entry as E;
        match self.calls.entry(id.to_owned()) {
            E::Occupied(_) => None,
            E::Vacant(v) => {
                v.insert(handle);
                Some(Entry {
                    calls: Arc::clone(&self.calls),
                    id: id.to_owned(),
                })
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.calls.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    pub fn ids(&self) -> Vec<String> {
        self.calls.iter().map(|e| e.key().clone()).collect()
    }

    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        self.calls.get(id).map(|h| h.snapshot.borrow().clone())
    }

    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.calls
            .iter()
            .map(|h| h.snapshot.borrow().clone())
            .collect()
    }

    /// Cancels every call's token (each task then runs its interrupted path).
    pub fn cancel_all(&self) {
        for h in self.calls.iter() {
            h.cancel.cancel();
        }
    }

    /// Delivers an event to a call. Waits briefly when its inbox is full; `false` if the call is
    /// unknown or did not take the event in time.
    pub async fn send(&self, id: &str, event: CallEvent) -> bool {
        let Some(inbox) = self.calls.get(id).map(|h| h.inbox.clone()) else {
            return false;
        };
        match inbox.send_timeout(event, Duration::from_secs(2)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(call.id = id, error = %crate::telemetry::ErrorChain(&e), "call did not take an event");
                false
            }
        }
    }

    /// Delivers a request (`StartCheck`, `CancelCheck`) to a call task and waits up to `wait` for its
    /// answer: `Ended` when the call is gone (or ends meanwhile), `Unavailable` when it did not take
    /// the request or answer in time.
    pub async fn ask(
        &self,
        id: &str,
        event: CallEvent,
        reply: tokio::sync::oneshot::Receiver<Result<String, super::live::Refusal>>,
        wait: Duration,
    ) -> Result<String, super::live::Refusal> {
        use super::live::Refusal;
        if !self.contains(id) {
            return Err(Refusal::Ended);
        }
        if !self.send(id, event).await {
            return Err(Refusal::Unavailable);
        }
        match tokio::time::timeout(wait, reply).await {
            Ok(Ok(answer)) => answer,
            // The task dropped the request: it ended meanwhile.
            Ok(Err(_)) => Err(Refusal::Ended),
            Err(_) => Err(Refusal::Unavailable),
        }
    }
}
