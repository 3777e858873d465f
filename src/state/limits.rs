//! The abuse limits on Redis: each decision is one Lua script, atomic across instances.
//!
//! Keys (under the prefix): `limit:cool:<person>` (until when, Unix ms), `limit:win:{person,line,
//! agent}:<name>` and `limit:win:queue:<queue>` (sorted sets of starts scored by Unix ms), and
//! `limit:live:<person>` (the instance and call holding the person's live order). Persons, lines and
//! agents appear only as `Shared::name` HMACs.
//!
//! Semantics are those of `calls::limits::Limits` (the in-memory limits): a refused start records
//! nothing; windows slide over the clock the caller passes (Unix ms; instances keep their clocks in
//! step with NTP); a live order held by another call is taken over and its holder returned, so the
//! caller can supersede it. Every key has a TTL, so a crashed instance's live orders end on their own
//! (`ORDER_TTL`) and idle windows disappear. The concurrency caps stay per instance (capacity of this
//! process and its provider connections), in `calls::limits`.

use std::time::Duration;

use redis::Script;

use super::{Shared, StateError};
use crate::calls::limits::{Limit, Settings, Start};

/// How long a live order's claim outlives its instance at most: beyond any `verify_timeout` plus the
/// provider's own grace.
pub const ORDER_TTL: Duration = Duration::from_secs(15 * 60);
const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;

const ACQUIRE: &str = r#"
local now = tonumber(ARGV[1])
local until_ms = redis.call('GET', KEYS[1])
if until_ms and tonumber(until_ms) > now then
  return {'refused', 'cool_down'}
end
local function full(key, max, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  return redis.call('ZCARD', key) >= max
end
local hour = tonumber(ARGV[7])
local minute = tonumber(ARGV[8])
if full(KEYS[2], tonumber(ARGV[3]), hour) then return {'refused', 'per_number'} end
if ARGV[11] == '1' and full(KEYS[3], tonumber(ARGV[4]), hour) then return {'refused', 'per_line'} end
if ARGV[12] == '1' and full(KEYS[4], tonumber(ARGV[5]), hour) then return {'refused', 'per_agent'} end
if full(KEYS[5], tonumber(ARGV[6]), minute) then return {'refused', 'per_queue'} end
local previous = redis.call('GET', KEYS[6]) or ''
redis.call('SET', KEYS[6], ARGV[9], 'PX', ARGV[10])
local function add(key, window)
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, window)
end
add(KEYS[2], hour)
if ARGV[11] == '1' then add(KEYS[3], hour) end
if ARGV[12] == '1' then add(KEYS[4], hour) end
add(KEYS[5], minute)
return {'granted', previous}
"#;

const UNDO: &str = r#"
for i = 2, 5 do redis.call('ZREM', KEYS[i], ARGV[1]) end
if redis.call('GET', KEYS[6]) == ARGV[2] then
  if ARGV[3] ~= '' then
    redis.call('SET', KEYS[6], ARGV[3], 'PX', ARGV[4])
  else
    redis.call('DEL', KEYS[6])
  end
end
return 1
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// The instance and call holding a person's live order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub instance: String,
    pub call: String,
}

impl Holder {
    fn encode(&self) -> String {
        format!("{}\n{}", self.instance, self.call)
    }

    fn decode(s: &str) -> Option<Holder> {
        let (instance, call) = s.split_once('\n')?;
        Some(Holder {
            instance: instance.to_owned(),
            call: call.to_owned(),
        })
    }
}

/// What undoes a granted start (when this instance's own caps refuse it after Redis granted it).
#[derive(Debug, Clone)]
pub struct Undo {
    keys: [String; 6],
    member: String,
    holder: String,
    previous: String,
}

/// The answer of Redis to a start.
#[derive(Debug, Clone)]
pub enum Acquired {
    Granted {
        /// Another call held the person's live order: it must be superseded.
        previous: Option<Holder>,
        undo: Box<Undo>,
    },
    Refused(Limit),
}

impl Shared {
    fn limit_keys(&self, s: &Start<'_>) -> [String; 6] {
        let person = self.name(s.person);
        [
            self.key(&["limit", "cool", &person]),
            self.key(&["limit", "win", "person", &person]),
            self.key(&["limit", "win", "line", &self.name(s.line)]),
            self.key(&["limit", "win", "agent", &self.name(s.agent.unwrap_or(""))]),
            self.key(&["limit", "win", "queue", s.queue]),
            self.key(&["limit", "live", &person]),
        ]
    }

    /// Asks Redis to start an order at `now_ms` (Unix ms).
    pub async fn limits_acquire(
        &self,
        s: &Start<'_>,
        settings: &Settings,
        now_ms: u64,
    ) -> Result<Acquired, StateError> {
        let keys = self.limit_keys(s);
        let holder = Holder {
            instance: self.instance.clone(),
            call: s.call.to_owned(),
        }
        .encode();
        let member = format!("{}:{}", self.instance, uuid::Uuid::new_v4());
        let script = Script::new(ACQUIRE);
        let mut attempt = 0;
        let (verdict, detail): (String, String) = loop {
            let mut invocation = script.prepare_invoke();
            for k in &keys {
                invocation.key(k);
            }
            invocation
                .arg(now_ms)
                .arg(&member)
                .arg(settings.max_starts_per_number_per_hour)
                .arg(settings.max_starts_per_line_per_hour)
                .arg(settings.max_checks_per_agent_per_hour)
                .arg(settings.max_starts_per_queue_per_minute)
                .arg(HOUR_MS)
                .arg(MINUTE_MS)
                .arg(&holder)
                .arg(ORDER_TTL.as_millis() as u64)
                .arg(if s.line.is_empty() { "0" } else { "1" })
                .arg(if s.agent.is_some() { "1" } else { "0" });
            match self
                .run("limits_acquire", |mut c| async move {
                    invocation.invoke_async(&mut c).await
                })
                .await
            {
                // A connection to a Redis that restarted fails once, then reconnects: the one
                // decision a caller waits for is worth a second try (the script never ran).
                Err(StateError::Redis(e)) if attempt == 0 && e.is_connection_dropped() => {
                    attempt += 1;
                }
                other => break other?,
            }
        };
        match verdict.as_str() {
            "refused" => Limit::from_code(&detail)
                .map(Acquired::Refused)
                .ok_or(StateError::Corrupt),
            "granted" => {
                let previous = Holder::decode(&detail).filter(|h| h.encode() != holder);
                Ok(Acquired::Granted {
                    previous,
                    undo: Box::new(Undo {
                        keys,
                        member,
                        holder,
                        previous: detail,
                    }),
                })
            }
            _ => Err(StateError::Corrupt),
        }
    }

    /// Takes back a granted start: its window entries go, and the previous holder gets the person's
    /// live order back.
    pub async fn limits_undo(&self, undo: &Undo) -> Result<(), StateError> {
        let script = Script::new(UNDO);
        let mut invocation = script.prepare_invoke();
        for k in &undo.keys {
            invocation.key(k);
        }
        invocation
            .arg(&undo.member)
            .arg(&undo.holder)
            .arg(&undo.previous)
            .arg(ORDER_TTL.as_millis() as u64);
        let _: i64 = self
            .run("limits_undo", |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    /// The order of `call` for `person` is over (a no-op when another call took it over).
    pub async fn limits_release(&self, person: &str, call: &str) -> Result<(), StateError> {
        let key = self.key(&["limit", "live", &self.name(person)]);
        let holder = Holder {
            instance: self.instance.clone(),
            call: call.to_owned(),
        }
        .encode();
        let script = Script::new(RELEASE);
        let mut invocation = script.prepare_invoke();
        invocation.key(key).arg(holder);
        let _: i64 = self
            .run("limits_release", |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    /// The person declined a call: no new order for them until `now_ms + cool_down`.
    pub async fn limits_declined(
        &self,
        person: &str,
        now_ms: u64,
        cool_down: Duration,
    ) -> Result<(), StateError> {
        if cool_down.is_zero() {
            return Ok(());
        }
        let key = self.key(&["limit", "cool", &self.name(person)]);
        let ms = u64::try_from(cool_down.as_millis()).unwrap_or(u64::MAX);
        let until = now_ms.saturating_add(ms);
        self.run("limits_declined", |mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(until)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// The holder of a person's live order, if any (tests and diagnostics).
    pub async fn live_holder(&self, person: &str) -> Result<Option<Holder>, StateError> {
        let key = self.key(&["limit", "live", &self.name(person)]);
        let raw: Option<String> = self
            .run("live_holder", |mut c| async move {
                redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await?;
        Ok(raw.as_deref().and_then(Holder::decode))
    }
}
