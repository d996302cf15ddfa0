//! Token quota reserves held in Redis until settled or released (CONTRACT §11).
//!
//! Per bucket, in the slot of its window hashes (`{<bucket>}` tag): a hash `tollgate:holds:{b}` (request id ->
//! `reserve|window key|…`, or `released`) and a sorted set `tollgate:holds:{b}:due` (request id -> when it is
//! released). A settlement and a release of the same id are each one script over the hold and its windows, so
//! exactly one of them gives the reserve back: a settlement that finds `released` adds the reported count
//! afresh, otherwise it replaces the reserve by it. The set `tollgate:holds:buckets` lists buckets that may
//! hold something, for [`release_expired`]; a bucket is dropped from it once its `due` set is empty (a hold
//! racing that drop is still settled by its access-log entry, only its timeout is lost).
//!
//! The holds of a bucket expire with its last window (plus the grace), so `released` marks and holds whose
//! entries never came do not outlive the windows they are about.

use redis::Script;

use super::super::{Hold, Settled, StoreError};
use super::keys::{HOLDS_INDEX, holds_due_key, holds_key, ttl, window_key};
use super::lease::Engine;

/// Holds released per bucket per call of [`release_expired`].
const RELEASE_BATCH: usize = 256;

/// The three scripts.
pub(super) struct Scripts {
    hold: Script,
    settle: Script,
    release: Script,
}

impl Scripts {
    /// Loads nothing yet: the `redis` crate sends a script on its first `NOSCRIPT`.
    pub(super) fn new() -> Scripts {
        Scripts {
            // KEYS: holds, due. ARGV: id, record, until, ttl. Extends the keys' TTL, never shortens it.
            hold: Script::new(
                "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
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
redis.call('ZREM', KEYS[2], ARGV[1])
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
            // KEYS: holds, due, window hashes. ARGV: id, now. Releases the hold if it is still held and due.
            release: Script::new(
                "local state = redis.call('HGET', KEYS[1], ARGV[1])
local due = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if not state or state == 'released' then
  redis.call('ZREM', KEYS[2], ARGV[1])
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
redis.call('ZREM', KEYS[2], ARGV[1])
return {1}",
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
    let windows = windows(hold);
    let mut record = hold.reserve.to_string();
    for key in &windows {
        record.push('|');
        record.push_str(key);
    }
    let last_end = hold
        .limits
        .iter()
        .map(|l| l.window(hold.at).end)
        .max()
        .unwrap_or(hold.until)
        .max(hold.until);
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
    let mut call = scripts.settle.prepare_invoke();
    call.key(holds_key(hold.bucket))
        .key(holds_due_key(hold.bucket));
    for key in windows(hold) {
        call.key(key);
    }
    call.arg(hold.id).arg(hold.reserve).arg(used);
    let answer = engine.client.eval(&engine.metrics, "settle", &call).await?;
    Ok(match answer.first() {
        Some(1) => Settled::Released,
        _ => Settled::Held,
    })
}

/// Releases the holds due before `now` on every listed bucket; returns how many.
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
        let (holds, due) = (holds_key(&bucket), holds_due_key(&bucket));
        let mut range = redis::cmd("ZRANGEBYSCORE");
        range
            .arg(&due)
            .arg("-inf")
            .arg(format!("({now}"))
            .arg("LIMIT")
            .arg(0)
            .arg(RELEASE_BATCH);
        let ids: Vec<String> = engine
            .client
            .query(&engine.metrics, "release", &range)
            .await?;
        if !ids.is_empty() {
            let mut read = redis::cmd("HMGET");
            read.arg(&holds).arg(&ids);
            let records: Vec<Option<String>> = engine
                .client
                .query(&engine.metrics, "release", &read)
                .await?;
            for (id, record) in ids.iter().zip(records) {
                let mut call = scripts.release.prepare_invoke();
                call.key(&holds).key(&due);
                // The window keys were named at hold time; a `released` or missing record has none.
                for key in record.iter().flat_map(|r| r.split('|').skip(1)) {
                    call.key(key);
                }
                call.arg(id).arg(now);
                let answer = engine
                    .client
                    .eval(&engine.metrics, "release", &call)
                    .await?;
                if answer.first() == Some(&1) {
                    released += 1;
                }
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
            drop_bucket.arg(HOLDS_INDEX).arg(&bucket);
            engine
                .client
                .query::<i64>(&engine.metrics, "release", &drop_bucket)
                .await?;
        }
    }
    Ok(released)
}
