//! Token quota reserves held in Redis until settled or released (CONTRACT §11).
//!
//! Per bucket, in the slot of its window hashes (`{<bucket>}` tag): a hash `tollgate:holds:{b}` (request id ->
//! `<reserve> <JSON list of the window keys charged>`, or `released`) and a sorted set `tollgate:holds:{b}:due`
//! with `h:<id>` scored by when the hold is released and `r:<id>` by when its `released` mark is forgotten (the
//! end of its last window). A settlement and a release of the same id are each one script over the hold and
//! the windows it names, so exactly one of them gives the reserve back: a settlement that finds `released` adds
//! the reported count afresh, otherwise it replaces the reserve by it, in the windows the Check charged. The set
//! `tollgate:holds:buckets` lists buckets that may hold something, for [`release_expired`]; a bucket is dropped
//! from it once its `due` set is empty (a hold racing that drop is still settled by its access-log entry, only
//! its timeout is lost).
//!
//! The hash and the set expire with the last window held (plus the grace); while a bucket stays busy its marks
//! are pruned by [`release_expired`] once their window ended.

use redis::Script;

use super::super::{Hold, Settled, StoreError};
use super::keys::{HOLDS_INDEX, KEY_GRACE_SECS, holds_due_key, holds_key, ttl, window_key};
use super::lease::Engine;

/// Holds released per bucket per call of [`release_expired`].
const RELEASE_BATCH: usize = 256;

/// The three scripts.
pub(super) struct Scripts {
    hold: Script,
    settle: Script,
    release: Script,
    forget: Script,
}

impl Scripts {
    /// Loads nothing yet: the `redis` crate sends a script on its first `NOSCRIPT`.
    pub(super) fn new() -> Scripts {
        Scripts {
            // KEYS: holds, due. ARGV: id, record, until, ttl. Extends the keys' TTL, never shortens it.
            hold: Script::new(
                "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], 'h:' .. ARGV[1])
local ttl = tonumber(ARGV[4])
for i = 1, 2 do
  if redis.call('TTL', KEYS[i]) < ttl then redis.call('EXPIRE', KEYS[i], ttl) end
end
return {}",
            ),
            // KEYS: holds, due, window hashes. ARGV: id, reserve, used. Returns {1} when the hold had been
            // released (the count is added afresh), {0} otherwise.
            settle: Script::new(
                "local state = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], 'h:' .. ARGV[1], 'r:' .. ARGV[1])
local used = tonumber(ARGV[3])
local delta = used - tonumber(ARGV[2])
local released = 0
if state == 'released' then
  delta = used
  released = 1
end
if delta ~= 0 then
  for i = 3, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      local u = (tonumber(redis.call('HGET', KEYS[i], 'used')) or 0) + delta
      if u < 0 then u = 0 end
      redis.call('HSET', KEYS[i], 'used', u)
    end
  end
end
return {released}",
            ),
            // KEYS: holds, due, window hashes. ARGV: id, now, forget. Releases the hold if it is still held and
            // due; its mark is forgotten at `forget`.
            release: Script::new(
                "local state = redis.call('HGET', KEYS[1], ARGV[1])
local due = tonumber(redis.call('ZSCORE', KEYS[2], 'h:' .. ARGV[1]))
if not state or state == 'released' then
  redis.call('ZREM', KEYS[2], 'h:' .. ARGV[1])
  return {0}
end
if not due or due >= tonumber(ARGV[2]) then return {0} end
local reserve = tonumber(string.match(state, '^(%d+)')) or 0
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local u = (tonumber(redis.call('HGET', KEYS[i], 'used')) or 0) - reserve
    if u < 0 then u = 0 end
    redis.call('HSET', KEYS[i], 'used', u)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], 'released')
redis.call('ZREM', KEYS[2], 'h:' .. ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], 'r:' .. ARGV[1])
return {1}",
            ),
            // KEYS: holds, due. ARGV: id. Forgets a release mark whose window ended.
            forget: Script::new(
                "if redis.call('HGET', KEYS[1], ARGV[1]) == 'released' then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('ZREM', KEYS[2], 'r:' .. ARGV[1])
return {}",
            ),
        }
    }
}

/// The window hashes a hold charged.
fn windows(hold: &Hold<'_>) -> Vec<String> {
    hold.limits
        .iter()
        .map(|l| window_key(hold.bucket, l.unit, l.interval, l.window(hold.at).start))
        .collect()
}

/// Records `hold` and lists its bucket for [`release_expired`].
pub(super) async fn hold(
    engine: &Engine,
    scripts: &Scripts,
    hold: &Hold<'_>,
) -> Result<(), StoreError> {
    let last_end = hold
        .limits
        .iter()
        .map(|l| l.window(hold.at).end)
        .max()
        .unwrap_or(hold.until)
        .max(hold.until);
    // Bucket names may hold any character: the keys go as JSON, never joined by a separator.
    let record = format!(
        "{} {} {}",
        hold.reserve,
        last_end.saturating_add(KEY_GRACE_SECS),
        serde_json::to_string(&windows(hold)).unwrap_or_default()
    );
    let mut call = scripts.hold.prepare_invoke();
    call.key(holds_key(hold.bucket))
        .key(holds_due_key(hold.bucket))
        .arg(hold.id)
        .arg(record)
        .arg(hold.until)
        .arg(ttl(last_end, hold.at));
    engine
        .client
        .eval(&engine.metrics, "hold", &call)
        .await
        .map(drop)?;
    let mut index = redis::cmd("SADD");
    index.arg(HOLDS_INDEX).arg(hold.bucket);
    engine
        .client
        .query::<i64>(&engine.metrics, "hold", &index)
        .await
        .map(drop)
}

/// Settles `hold` to `used` units.
pub(super) async fn settle(
    engine: &Engine,
    scripts: &Scripts,
    hold: &Hold<'_>,
    used: u64,
) -> Result<Settled, StoreError> {
    let holds = holds_key(hold.bucket);
    // The windows the Check charged, as its hold recorded them (the access log's start time may lie across a
    // window boundary from the Check's); computed from `hold.at` only without a hold.
    let mut read = redis::cmd("HGET");
    read.arg(&holds).arg(hold.id);
    let record: Option<String> = engine
        .client
        .query(&engine.metrics, "settle", &read)
        .await?;
    let keys = record
        .as_deref()
        .and_then(self::record)
        .map_or_else(|| windows(hold), |r| r.keys);
    let mut call = scripts.settle.prepare_invoke();
    call.key(&holds).key(holds_due_key(hold.bucket));
    for key in keys {
        call.key(key);
    }
    call.arg(hold.id).arg(hold.reserve).arg(used);
    let answer = engine.client.eval(&engine.metrics, "settle", &call).await?;
    Ok(match answer.first() {
        Some(1) => Settled::Released,
        _ => Settled::Held,
    })
}

/// A hold record: `<reserve> <when its mark may be forgotten> <JSON list of window keys>`.
struct Record {
    forget: i64,
    keys: Vec<String>,
}

/// The record of a hold; `None` for a `released` mark or garbage.
fn record(text: &str) -> Option<Record> {
    let (_, rest) = text.split_once(' ')?;
    let (forget, keys) = rest.split_once(' ')?;
    Some(Record {
        forget: forget.parse().ok()?,
        keys: serde_json::from_str(keys).ok()?,
    })
}

/// Releases the holds due before `now` on every listed bucket and forgets marks whose window ended; returns
/// how many holds were released. A bucket that fails is logged and left for the next pass.
pub(super) async fn release_expired(
    engine: &Engine,
    scripts: &Scripts,
    now: i64,
) -> Result<usize, StoreError> {
    let mut members = redis::cmd("SMEMBERS");
    members.arg(HOLDS_INDEX);
    let buckets: Vec<String> = engine
        .client
        .query(&engine.metrics, "release", &members)
        .await?;
    let mut released = 0;
    for bucket in buckets {
        match release_bucket(engine, scripts, &bucket, now).await {
            Ok(n) => released += n,
            Err(e) => {
                tracing::warn!(error = %e, "token quota holds of one bucket not released; retried next pass")
            }
        }
    }
    Ok(released)
}

async fn release_bucket(
    engine: &Engine,
    scripts: &Scripts,
    bucket: &str,
    now: i64,
) -> Result<usize, StoreError> {
    let (holds, due) = (holds_key(bucket), holds_due_key(bucket));
    let mut range = redis::cmd("ZRANGEBYSCORE");
    range
        .arg(&due)
        .arg("-inf")
        .arg(format!("({now}"))
        .arg("LIMIT")
        .arg(0)
        .arg(RELEASE_BATCH);
    let members: Vec<String> = engine
        .client
        .query(&engine.metrics, "release", &range)
        .await?;
    let mut released = 0;
    for member in &members {
        if let Some(id) = member.strip_prefix("r:") {
            let mut call = scripts.forget.prepare_invoke();
            call.key(&holds).key(&due).arg(id);
            engine
                .client
                .eval(&engine.metrics, "release", &call)
                .await?;
            continue;
        }
        let Some(id) = member.strip_prefix("h:") else {
            continue;
        };
        let mut read = redis::cmd("HGET");
        read.arg(&holds).arg(id);
        let record: Option<String> = engine
            .client
            .query(&engine.metrics, "release", &read)
            .await?;
        let (keys, forget) = record
            .as_deref()
            .and_then(self::record)
            .map_or((Vec::new(), now), |r| (r.keys, r.forget));
        let mut call = scripts.release.prepare_invoke();
        call.key(&holds).key(&due);
        for key in &keys {
            call.key(key);
        }
        call.arg(id).arg(now).arg(forget);
        let answer = engine
            .client
            .eval(&engine.metrics, "release", &call)
            .await?;
        if answer.first() == Some(&1) {
            released += 1;
        }
    }
    let mut left = redis::cmd("ZCARD");
    left.arg(&due);
    let left: i64 = engine
        .client
        .query(&engine.metrics, "release", &left)
        .await?;
    if left == 0 {
        let mut drop_bucket = redis::cmd("SREM");
        drop_bucket.arg(HOLDS_INDEX).arg(bucket);
        engine
            .client
            .query::<i64>(&engine.metrics, "release", &drop_bucket)
            .await?;
    }
    Ok(released)
}
