//! The live view across instances, the heartbeats and the forwarded commands: three tasks per
//! instance.
//!
//! - `outbound`: this instance's live events become snapshots (`call:<id>` with a TTL of
//!   `snapshot_ttl`, `verification:<id>` kept `api.keep_verifications`) and messages on `events`.
//!   While Redis is unreachable nothing is written; the next beat that reaches it rewrites every
//!   snapshot and republishes every call, so the others catch up.
//! - `heartbeat`: every `heartbeat_interval`, `instance:<me>` (TTL three beats) and every snapshot of
//!   ours are rewritten; an instance whose key is gone is lost (its calls here are marked), and a lost
//!   instance's calls are forgotten once their snapshots expired.
//! - `inbound`: one subscription to `events`, `cmd:<me>` and `reply:<me>`; every (re)subscription
//!   first reloads all snapshots (what was missed while apart), then applies the others' events to
//!   `calls::Live`, runs the commands forwarded to us through `calls::Registry` (exactly as the API
//!   would locally; a hosted switchboard's cancel through `Switchboards::cancel`) and hands replies to the waiting requests. Our own beats are published on
//!   `beat:<me>`, so a subscription silent for three beats is taken for dead and renewed. Reconnects
//!   back off with jitter.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{json, Value};
use tokio::sync::{broadcast, oneshot, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{wire, Shared, StateError};
use crate::calls::live::CallState;
use crate::calls::live::{CallView, CancelRequest, CheckRequest, LiveKind, Refusal};
use crate::calls::{CallEvent, Live, Registry};
use crate::switchboard::Switchboards;

/// How long the owner waits for its own call task to answer a forwarded command (below
/// `command_timeout`'s lower bound, so the asker hears the real answer).
const TASK_ANSWER: Duration = Duration::from_millis(2500);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts the three tasks; they end when `stop` fires. `switchboards` runs the hosted switchboards'
/// cancels forwarded to this instance (none: they are refused as unknown).
pub fn spawn(
    shared: Arc<Shared>,
    live: Arc<Live>,
    registry: Registry,
    switchboards: Option<Arc<Switchboards>>,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let dirty = Arc::new(AtomicBool::new(true));
    // Snapshot writes of the two writers are serialised, so a beat cannot write back a call whose
    // end the outbound task just deleted.
    let writing = Arc::new(Mutex::new(Written::new()));
    vec![
        tokio::spawn(outbound(
            Arc::clone(&shared),
            Arc::clone(&live),
            Arc::clone(&dirty),
            Arc::clone(&writing),
            stop.clone(),
        )),
        tokio::spawn(heartbeat(
            Arc::clone(&shared),
            Arc::clone(&live),
            dirty,
            writing,
            stop.clone(),
        )),
        tokio::spawn(inbound(shared, live, registry, switchboards, stop)),
    ]
}

/// The last view of each of our calls whose snapshot is in Redis.
struct Written(HashMap<String, CallView>);

impl Written {
    fn new() -> Written {
        Written(HashMap::new())
    }

    fn note(&mut self, kind: LiveKind, call: &CallView) {
        if kind == LiveKind::CallEnded {
            self.0.remove(&call.call_id);
        } else {
            self.0.insert(call.call_id.clone(), call.clone());
        }
    }

    /// Calls written once that are no longer among `live`.
    fn gone(&self, live: &[CallView]) -> Vec<CallView> {
        self.0
            .values()
            .filter(|w| !live.iter().any(|c| c.call_id == w.call_id))
            .cloned()
            .collect()
    }
}

fn sealed(shared: &Shared, purpose: &str, value: &Value) -> Option<Vec<u8>> {
    let plain = serde_json::to_vec(value).ok()?;
    shared.seal().seal(purpose, &plain)
}

fn opened(shared: &Shared, purpose: &str, data: &[u8]) -> Option<Value> {
    let plain = shared.seal().open(purpose, data)?;
    serde_json::from_slice(&plain).ok()
}

/// Adds the writes of one of our calls' event to `pipe`: its snapshot (deleted when the call ended),
/// its verification's, and (with `publish`) the event itself.
fn add_write(
    pipe: &mut redis::Pipeline,
    shared: &Shared,
    kind: LiveKind,
    call: &CallView,
    publish: bool,
) -> Result<(), StateError> {
    let call_key = shared.key(&["call", &call.call_id]);
    let ttl = u64::try_from(shared.settings().snapshot_ttl.as_millis()).unwrap_or(u64::MAX);
    let keep = u64::try_from(shared.keep().as_millis()).unwrap_or(u64::MAX);
    if kind == LiveKind::CallEnded {
        pipe.cmd("DEL").arg(&call_key).ignore();
    } else {
        let snapshot =
            sealed(shared, "call", &wire::call_to_json(call)).ok_or(StateError::Corrupt)?;
        pipe.cmd("SET")
            .arg(&call_key)
            .arg(snapshot)
            .arg("PX")
            .arg(ttl)
            .ignore();
    }
    if let Some(v) = &call.verification {
        let value = sealed(
            shared,
            "verification",
            &json!({"verification": wire::verification_to_json(v), "agent": call.agent}),
        )
        .ok_or(StateError::Corrupt)?;
        pipe.cmd("SET")
            .arg(shared.key(&["verification", &v.id]))
            .arg(value)
            .arg("PX")
            .arg(keep)
            .ignore();
    }
    if publish {
        let event =
            sealed(shared, "event", &wire::event_to_json(kind, call)).ok_or(StateError::Corrupt)?;
        pipe.cmd("PUBLISH")
            .arg(shared.key(&["events"]))
            .arg(event)
            .ignore();
    }
    Ok(())
}

/// Writes a batch of our calls' events in one round trip; on success they are noted as written.
async fn write_batch(
    shared: &Shared,
    written: &mut Written,
    batch: &[(LiveKind, CallView)],
    publish: bool,
) -> Result<(), StateError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for (kind, call) in batch {
        add_write(&mut pipe, shared, *kind, call, publish)?;
    }
    shared
        .run("publish", |mut c| async move {
            pipe.query_async::<()>(&mut c).await
        })
        .await?;
    for (kind, call) in batch {
        written.note(*kind, call);
    }
    Ok(())
}

/// Whether an event of the view is ours to write.
fn ours(live: &Live, kind: LiveKind, call: &CallView) -> bool {
    // `fraud_warning` is derived from `verification_completed` by each instance's view.
    live.is_local(call) && !matches!(kind, LiveKind::Fraud | LiveKind::InstanceLost)
}

/// Most events written in one round trip.
const BATCH: usize = 256;

async fn outbound(
    shared: Arc<Shared>,
    live: Arc<Live>,
    dirty: Arc<AtomicBool>,
    writing: Arc<Mutex<Written>>,
    stop: CancellationToken,
) {
    let mut rx = live.subscribe();
    loop {
        let first = tokio::select! {
            biased;
            e = rx.recv() => e,
            _ = stop.cancelled() => {
                // Leaving: what our last calls did is still written (bounded), and the snapshots
                // of calls that ended unwritten are deleted, so the others see them end.
                let flush = async {
                    let mut batch = Vec::new();
                    while let Ok(e) = rx.try_recv() {
                        if ours(&live, e.kind, &e.call) {
                            batch.push((e.kind, e.call));
                        }
                    }
                    let mut written = writing.lock().await;
                    let _ = write_batch(&shared, &mut written, &batch, true).await;
                    let _ = settle(&shared, &live, &mut written, false).await;
                };
                let _ = tokio::time::timeout(shared.settings().response_timeout * 4, flush).await;
                return;
            }
        };
        let mut batch = Vec::new();
        let mut lagged = false;
        let mut next = Some(first);
        while let Some(event) = next.take() {
            match event {
                Ok(e) if ours(&live, e.kind, &e.call) => batch.push((e.kind, e.call)),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "shared state fell behind the live view; republishing every call"
                    );
                    lagged = true;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
            if batch.len() < BATCH {
                next = match rx.try_recv() {
                    Ok(e) => Some(Ok(e)),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Some(Err(broadcast::error::RecvError::Lagged(n)))
                    }
                    Err(_) => None,
                };
            }
        }
        if lagged {
            dirty.store(true, Ordering::SeqCst);
        }
        // While dirty, the next beat that reaches Redis rewrites everything.
        if batch.is_empty() || dirty.load(Ordering::SeqCst) {
            continue;
        }
        let mut written = writing.lock().await;
        if write_batch(&shared, &mut written, &batch, true)
            .await
            .is_err()
        {
            dirty.store(true, Ordering::SeqCst);
        }
    }
}

async fn heartbeat(
    shared: Arc<Shared>,
    live: Arc<Live>,
    dirty: Arc<AtomicBool>,
    writing: Arc<Mutex<Written>>,
    stop: CancellationToken,
) {
    let every = shared.settings().heartbeat_interval;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if beat(&shared, &live, &dirty, &writing).await.is_err() {
            dirty.store(true, Ordering::SeqCst);
        }
    }
    // Leaving: the others see us gone at once rather than after three beats.
    let key = shared.key(&["instance", shared.instance()]);
    let _ = shared
        .run("leave", |mut c| async move {
            redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await
        })
        .await;
}

/// Rewrites the snapshots of all our calls (announcing them again with `republish`), and deletes and
/// announces the end of those written once that are no longer live.
async fn settle(
    shared: &Shared,
    live: &Live,
    written: &mut Written,
    republish: bool,
) -> Result<(), StateError> {
    let kind = if republish {
        LiveKind::Progress
    } else {
        LiveKind::CallStarted
    };
    let current: Vec<CallView> = live
        .calls()
        .into_iter()
        .filter(|c| live.is_local(c))
        .collect();
    let mut batch: Vec<(LiveKind, CallView)> = Vec::new();
    for call in &current {
        batch.push((kind, call.clone()));
        if batch.len() == BATCH {
            write_batch(shared, written, &batch, republish).await?;
            batch.clear();
        }
    }
    write_batch(shared, written, &batch, republish).await?;
    let gone: Vec<(LiveKind, CallView)> = written
        .gone(&current)
        .into_iter()
        .map(|mut c| {
            c.state = CallState::Ended;
            (LiveKind::CallEnded, c)
        })
        .collect();
    write_batch(shared, written, &gone, true).await
}

/// One beat: say we are alive, refresh our snapshots (republishing them after an outage), and look
/// after the other instances' calls.
async fn beat(
    shared: &Shared,
    live: &Live,
    dirty: &AtomicBool,
    writing: &Mutex<Written>,
) -> Result<(), StateError> {
    let every = shared.settings().heartbeat_interval;
    let key = shared.key(&["instance", shared.instance()]);
    let alive_ms = u64::try_from((every * 3).as_millis()).unwrap_or(u64::MAX);
    let stamp = wire::millis(crate::calls::task::wall_clock()).to_string();
    let beat_channel = shared.key(&["beat", shared.instance()]);
    shared
        .run("heartbeat", |mut c| async move {
            redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg(stamp)
                .arg("PX")
                .arg(alive_ms)
                .ignore()
                .cmd("PUBLISH")
                .arg(&beat_channel)
                .arg("")
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
    if !shared.is_subscribed() {
        shared.wake();
    }
    let mut written = writing.lock().await;
    let republish = dirty.swap(false, Ordering::SeqCst);
    if republish {
        tracing::info!("rewriting this instance's calls in the shared state");
    }
    if let Err(e) = settle(shared, live, &mut written, republish).await {
        dirty.store(true, Ordering::SeqCst);
        return Err(e);
    }
    drop(written);
    // Other instances: lost when their key expired; their calls forgotten once the snapshots are gone.
    let mut owners = HashSet::new();
    for call in live.remote_calls() {
        if let Some(o) = &call.owner {
            owners.insert(o.instance.clone());
        }
    }
    for owner in owners {
        let key = shared.key(&["instance", &owner]);
        let alive: bool = shared
            .run("instance_alive", |mut c| async move {
                redis::cmd("EXISTS").arg(&key).query_async(&mut c).await
            })
            .await?;
        if !alive {
            tracing::warn!(instance = %owner, "instance lost: its calls are no longer followed");
            live.mark_lost(&owner);
        }
    }
    for call in live.remote_calls() {
        if !call.owner.as_ref().is_some_and(|o| o.lost) {
            continue;
        }
        let key = shared.key(&["call", &call.call_id]);
        let exists: bool = shared
            .run("snapshot_exists", |mut c| async move {
                redis::cmd("EXISTS").arg(&key).query_async(&mut c).await
            })
            .await?;
        if !exists {
            live.forget_remote(&call.call_id);
        }
    }
    let pattern = shared.key(&["instance", "*"]);
    let instances: Vec<String> = shared
        .run("instances", |mut c| async move {
            let mut iter: redis::AsyncIter<String> = c.scan_match(&pattern).await?;
            let mut out = Vec::new();
            while let Some(k) = iter.next_item().await {
                out.push(k?);
            }
            Ok(out)
        })
        .await?;
    shared
        .metrics()
        .set_gauge("callgate_state_instances", instances.len() as f64);
    Ok(())
}

async fn inbound(
    shared: Arc<Shared>,
    live: Arc<Live>,
    registry: Registry,
    switchboards: Option<Arc<Switchboards>>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if stop.is_cancelled() {
            return;
        }
        match subscribe(&shared).await {
            Ok(pubsub) => {
                backoff = BACKOFF_MIN;
                if let Err(e) = reload(&shared, &live).await {
                    tracing::warn!(error = %e, "reloading the other instances' calls failed");
                }
                tracing::info!("subscribed to the shared state");
                shared.set_subscribed(true);
                listen(&shared, &live, &registry, &switchboards, pubsub, &stop).await;
                shared.set_subscribed(false);
                if stop.is_cancelled() {
                    return;
                }
                tracing::warn!("subscription to the shared state lost; reconnecting");
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot subscribe to the shared state");
                shared.set_up(false);
            }
        }
        let jittered = crate::backoff::jittered(backoff);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
            // A beat reached Redis: no need to wait out the backoff.
            _ = shared.woken() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn subscribe(shared: &Shared) -> Result<redis::aio::PubSub, StateError> {
    let bound = shared.settings().connect_timeout + shared.settings().response_timeout;
    let channels = [
        shared.key(&["events"]),
        shared.key(&["cmd", shared.instance()]),
        shared.key(&["reply", shared.instance()]),
        shared.key(&["beat", shared.instance()]),
    ];
    let connect = async {
        let mut pubsub = shared.client().get_async_pubsub().await?;
        for c in &channels {
            pubsub.subscribe(c).await?;
        }
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(bound, connect).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(StateError::Redis(e)),
        Err(_) => Err(StateError::Timeout),
    }
}

/// Loads every snapshot of the other instances' calls; forgets those that are gone.
async fn reload(shared: &Shared, live: &Live) -> Result<(), StateError> {
    let pattern = shared.key(&["call", "*"]);
    let values: Vec<Option<Vec<u8>>> = shared
        .run("reload", |mut c| async move {
            let mut keys = Vec::new();
            {
                let mut iter: redis::AsyncIter<String> = c.scan_match(&pattern).await?;
                while let Some(k) = iter.next_item().await {
                    keys.push(k?);
                }
            }
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            redis::cmd("MGET").arg(keys).query_async(&mut c).await
        })
        .await?;
    let mut present = HashSet::new();
    for raw in values.into_iter().flatten() {
        let Some(call) = opened(shared, "call", &raw).and_then(|v| wire::call_from_json(&v)) else {
            continue;
        };
        if live.is_local(&call) {
            continue;
        }
        present.insert(call.call_id.clone());
        apply(live, None, call);
    }
    for call in live.remote_calls() {
        if !present.contains(&call.call_id) {
            live.forget_remote(&call.call_id);
        }
    }
    Ok(())
}

/// Applies another instance's view of a call (unchanged views are not announced again).
fn apply(live: &Live, kind: Option<LiveKind>, call: CallView) {
    let known = live.call(&call.call_id);
    if kind.is_none() && known.as_ref() == Some(&call) {
        return;
    }
    let kind = kind.unwrap_or(if known.is_some() {
        LiveKind::Progress
    } else {
        LiveKind::CallStarted
    });
    live.publish(kind, call);
}

async fn listen(
    shared: &Arc<Shared>,
    live: &Live,
    registry: &Registry,
    switchboards: &Option<Arc<Switchboards>>,
    pubsub: redis::aio::PubSub,
    stop: &CancellationToken,
) {
    let events = shared.key(&["events"]);
    let commands = shared.key(&["cmd", shared.instance()]);
    let replies = shared.key(&["reply", shared.instance()]);
    let mut stream = pubsub.into_on_message();
    // Our own heartbeat publishes on `beat:<me>` every beat: a subscription that hears nothing for
    // three beats is dead even if its socket did not say so.
    let silence = shared.settings().heartbeat_interval * 3;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = tokio::time::timeout(silence, stream.next()) => match m {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => return,
            },
        };
        let channel = msg.get_channel_name().to_owned();
        let payload = msg.get_payload_bytes();
        if channel == events {
            let Some((kind, call)) =
                opened(shared, "event", payload).and_then(|v| wire::event_from_json(&v))
            else {
                tracing::warn!(
                    "an unreadable live event in the shared state (another key or version?)"
                );
                continue;
            };
            if !live.is_local(&call) {
                apply(live, Some(kind), call);
            }
        } else if channel == commands {
            let Some(command) =
                opened(shared, "command", payload).and_then(|v| wire::command_from_json(&v))
            else {
                tracing::warn!("an unreadable forwarded command (another key or version?)");
                continue;
            };
            let shared = Arc::clone(shared);
            let registry = registry.clone();
            let switchboards = switchboards.clone();
            tokio::spawn(async move {
                run_command(&shared, &registry, switchboards.as_ref(), command).await
            });
        } else if channel == replies {
            if let Some((id, answer)) =
                opened(shared, "reply", payload).and_then(|v| wire::reply_from_json(&v))
            {
                shared.replied(&id, answer);
            }
        }
    }
}

/// Runs a command forwarded to us on our call, exactly as our own API would, and replies.
async fn run_command(
    shared: &Shared,
    registry: &Registry,
    switchboards: Option<&Arc<Switchboards>>,
    command: wire::Command,
) {
    let call_id = command.call_id.clone();
    let answer = match command.op {
        wire::Op::SwitchboardStart {
            board,
            queue,
            number,
            caller,
            language,
            attempt,
        } => match switchboards {
            // Draining: the asker starts it itself.
            Some(sb) if sb.draining() => Err(Refusal::Unavailable),
            Some(sb) => {
                let request = crate::switchboard::StartRequest {
                    call_id: call_id.clone(),
                    queue,
                    number,
                    caller,
                    language,
                    attempt,
                };
                match sb.start_forwarded(&board, request).await {
                    Ok(answer) if !answer.id.is_empty() => Ok(answer.id),
                    _ => Err(Refusal::InvalidNumber),
                }
            }
            None => Err(Refusal::Unavailable),
        },
        wire::Op::SwitchboardCancel {
            board,
            verification,
        } => match switchboards {
            Some(sb) if sb.cancel(&board, &verification) => Ok(verification),
            _ => Err(Refusal::Ended),
        },
        wire::Op::Superseded => {
            registry.send(&call_id, CallEvent::Superseded).await;
            return;
        }
        wire::Op::Start { number } => {
            let (tx, rx) = oneshot::channel();
            let request = CheckRequest {
                by: command.by,
                number,
                reply: tx,
            };
            registry
                .ask(&call_id, CallEvent::StartCheck(request), rx, TASK_ANSWER)
                .await
        }
        wire::Op::Cancel => {
            let (tx, rx) = oneshot::channel();
            let request = CancelRequest {
                by: command.by,
                reply: tx,
            };
            registry
                .ask(&call_id, CallEvent::CancelCheck(request), rx, TASK_ANSWER)
                .await
        }
    };
    tracing::info!(call.id = %call_id, from = %command.from, ok = answer.is_ok(), "ran a request forwarded by another instance");
    let Some(reply) = sealed(shared, "reply", &wire::reply_to_json(&command.id, &answer)) else {
        return;
    };
    let channel = shared.key(&["reply", &command.from]);
    let _ = shared
        .run("reply", |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(reply)
                .query_async::<i64>(&mut c)
                .await
        })
        .await;
}

/// Reads a verification's snapshot (for an id this instance's view no longer or never held).
pub async fn read_verification(
    shared: &Shared,
    id: &str,
) -> Result<Option<(crate::calls::live::VerificationView, Option<String>)>, StateError> {
    let key = shared.key(&["verification", id]);
    let raw: Option<Vec<u8>> = shared
        .run("read_verification", |mut c| async move {
            redis::cmd("GET").arg(&key).query_async(&mut c).await
        })
        .await?;
    let Some(raw) = raw else { return Ok(None) };
    let value = opened(shared, "verification", &raw).ok_or(StateError::Corrupt)?;
    let view = value
        .get("verification")
        .and_then(wire::verification_from_json)
        .ok_or(StateError::Corrupt)?;
    let agent = value
        .get("agent")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Some((view, agent)))
}
