//! Hosted switchboards across several instances (`[state] kind = "redis"`): which instance runs a
//! request node's verification, and which one consumes a switchboard's call-event feed.
//!
//! - **Claims.** `switchboard:<name>:claim:<call id>:<attempt>` is set once (`SET NX PX`, in one
//!   script that answers the value already there): the instance that set it runs the verification,
//!   every other start of the same call and attempt is answered with that verification. The value
//!   (the owner instance and the verification id) is sealed like every other value; it lives
//!   `api.keep_verifications` plus the queue's `verify_timeout` and a grace, so no retried node
//!   outlives it.
//! - **The feed lease.** `switchboard:<name>:feed-lease` holds the id of the instance consuming the
//!   feed, with a TTL of three heartbeats. The holder renews it every heartbeat (only while it is
//!   still its own); any instance takes it when it has lapsed. A holder that cannot renew stops
//!   consuming one heartbeat before its lease can lapse, so two instances never consume at once.
//!
//! Invariants: key names carry switchboard names, call ids and attempts, never a number; nothing here
//! is waited on by a running verification.

use std::time::Duration;

use redis::Script;
use serde_json::{json, Value};

use crate::state::{Shared, StateError};

/// Sets the claim if there is none; answers the existing value otherwise.
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
";

/// Takes a lapsed lease or renews our own: 1 when we hold it now, 0 when another instance does.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Gives up our lease (and only ours).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Who runs the verification of a call and attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// This instance claimed it: start the verification.
    Won,
    /// Another start claimed it first (here or on another instance).
    Taken {
        instance: String,
        verification: String,
    },
}

fn claim_key(shared: &Shared, board: &str, call_id: &str, attempt: u32) -> String {
    shared.key(&["switchboard", board, "claim", call_id, &attempt.to_string()])
}

fn lease_key(shared: &Shared, board: &str) -> String {
    shared.key(&["switchboard", board, "feed-lease"])
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Claims `(board, call_id, attempt)` for `verification` on this instance, for `ttl`.
pub(crate) async fn claim(
    shared: &Shared,
    board: &str,
    call_id: &str,
    attempt: u32,
    verification: &str,
    ttl: Duration,
) -> Result<Claim, StateError> {
    let plain = json!({"instance": shared.instance(), "verification": verification});
    let value = serde_json::to_vec(&plain)
        .ok()
        .and_then(|p| shared.seal().seal("switchboard_claim", &p))
        .ok_or(StateError::Corrupt)?;
    let key = claim_key(shared, board, call_id, attempt);
    let existing: Option<Vec<u8>> = shared
        .run("switchboard_claim", |mut c| async move {
            Script::new(CLAIM)
                .key(&key)
                .arg(value)
                .arg(millis(ttl))
                .invoke_async(&mut c)
                .await
        })
        .await?;
    let Some(raw) = existing else {
        return Ok(Claim::Won);
    };
    let opened = shared
        .seal()
        .open("switchboard_claim", &raw)
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .ok_or(StateError::Corrupt)?;
    let field = |name: &str| opened.get(name).and_then(Value::as_str).map(str::to_owned);
    match (field("instance"), field("verification")) {
        (Some(instance), Some(verification)) => Ok(Claim::Taken {
            instance,
            verification,
        }),
        _ => Err(StateError::Corrupt),
    }
}

/// Takes the switchboard's feed lease if it lapsed, or renews ours; `true` when we hold it now.
pub(crate) async fn lease(shared: &Shared, board: &str, ttl: Duration) -> Result<bool, StateError> {
    let key = lease_key(shared, board);
    let me = shared.instance().to_owned();
    let held: i64 = shared
        .run("switchboard_feed_lease", |mut c| async move {
            Script::new(LEASE)
                .key(&key)
                .arg(me)
                .arg(millis(ttl))
                .invoke_async(&mut c)
                .await
        })
        .await?;
    Ok(held == 1)
}

/// The instance holding the switchboard's feed lease, if any.
pub(crate) async fn lease_holder(
    shared: &Shared,
    board: &str,
) -> Result<Option<String>, StateError> {
    let key = lease_key(shared, board);
    shared
        .run("switchboard_feed_holder", |mut c| async move {
            redis::cmd("GET").arg(&key).query_async(&mut c).await
        })
        .await
}

/// Gives up the switchboard's feed lease if it is ours (leaving: another instance takes it at its
/// next heartbeat instead of after the TTL).
pub(crate) async fn release(shared: &Shared, board: &str) -> Result<(), StateError> {
    let key = lease_key(shared, board);
    let me = shared.instance().to_owned();
    shared
        .run("switchboard_feed_release", |mut c| async move {
            Script::new(RELEASE)
                .key(&key)
                .arg(me)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await?;
    Ok(())
}
