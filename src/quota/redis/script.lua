-- tollgate quota: settle one replica's leases and charge every limit of one bucket, atomically.
--
-- Each KEY is a hash for one (bucket, unit, interval, window start):
--   used      units allowed so far in the window (what billing-grade counting relies on)
--   reserved  units leased to replicas and not yet reported as served
--   s:<id>    units replica <id> has reported as served in this window (its share of `used`)
--   r:<id>    units currently leased to replica <id> (its share of `reserved`; never above max_lease)
--   q:<id>    sequence number of the last call of replica <id> applied to this key
-- Invariant kept by every call that charges or leases: used + reserved <= limit.
--
-- KEYS: n_settle keys of windows the replica is leaving, then the keys of the windows to charge.
-- ARGV: replica id, seq (0 = anonymous charge: no settling, no lease), n_settle, cost, max_lease,
--       lease divisor, keep, then one claim per settle key, then (claim, limit, ttl) per charge key.
-- A claim is the replica's absolute served total for that key, or -1 when it holds no local record.
-- `keep` is how much of its current lease the replica goes on serving while this call is in flight: it
-- stays reserved (never more than the replica holds on every charge key), only the rest is released.
-- Returns {-1} for a stale call, {0, index, used, reserved, kept} when limit `index` has no room,
-- {1, lease, kept, s_1, used_1, reserved_1, ...} when charged; `kept` is the part of `keep` honoured and
-- the replica's lease is then kept + lease.

local id = ARGV[1]
local seq = tonumber(ARGV[2])
local n_settle = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local max_lease = tonumber(ARGV[5])
local divisor = tonumber(ARGV[6])
local keep = tonumber(ARGV[7])
local n_charge = #KEYS - n_settle
local f_s, f_r, f_q = 's:' .. id, 'r:' .. id, 'q:' .. id

if seq > 0 then
  -- A call that arrives after a newer one of the same replica (a retry of a timed-out call that was
  -- still queued on a dead connection) must not undo the newer state.
  for i = 1, #KEYS do
    local q = tonumber(redis.call('HGET', KEYS[i], f_q))
    if q and q >= seq then
      return {-1}
    end
  end
end

-- Reports the replica's served total for `key` and releases its lease there, except `kept` units.
local function settle(key, claim, kept)
  local v = redis.call('HMGET', key, f_s, f_r)
  local s_old = tonumber(v[1]) or 0
  local r_old = tonumber(v[2]) or 0
  local s_new = s_old
  if claim >= 0 then
    s_new = claim
  end
  if s_new ~= s_old then
    redis.call('HINCRBY', key, 'used', s_new - s_old)
  end
  if r_old ~= kept then
    redis.call('HINCRBY', key, 'reserved', kept - r_old)
  end
  redis.call('HSET', key, f_s, s_new, f_r, kept, f_q, seq)
end

local arg = 8
for i = 1, n_settle do
  local claim = tonumber(ARGV[arg])
  arg = arg + 1
  if redis.call('EXISTS', KEYS[i]) == 1 then
    settle(KEYS[i], claim, 0)
  end
end

local keys, claims, limits, ttls, used, reserved = {}, {}, {}, {}, {}, {}
for j = 1, n_charge do
  keys[j] = KEYS[n_settle + j]
  claims[j] = tonumber(ARGV[arg])
  limits[j] = tonumber(ARGV[arg + 1])
  ttls[j] = tonumber(ARGV[arg + 2])
  arg = arg + 3
end

-- Only units reserved for this replica on every key can be kept: anything else would be served without
-- a reservation.
if seq == 0 or n_charge == 0 or keep < 0 then
  keep = 0
end
for j = 1, n_charge do
  if keep > 0 then
    local r = tonumber(redis.call('HGET', keys[j], f_r)) or 0
    if r < keep then
      keep = r
    end
  end
end

for j = 1, n_charge do
  local key = keys[j]
  if seq > 0 then
    settle(key, claims[j], keep)
  end
  local v = redis.call('HMGET', key, 'used', 'reserved')
  used[j] = tonumber(v[1]) or 0
  reserved[j] = tonumber(v[2]) or 0
end

-- Every key written gets its TTL after the writes, so a key created by this call never lives forever.
local function expire_all()
  for j = 1, n_charge do
    redis.call('EXPIRE', keys[j], ttls[j])
  end
end

for j = 1, n_charge do
  if used[j] + reserved[j] + cost > limits[j] then
    expire_all()
    return {0, j, used[j], reserved[j], keep}
  end
end

-- The lease is the same block on every limit, so serving from it spends all limits together; it takes
-- at most 1/divisor of the least free limit, which drops it to 0 (per-request charging) near any limit,
-- and with what the replica keeps it never exceeds max_lease.
local lease = 0
if seq > 0 then
  lease = max_lease - keep
  for j = 1, n_charge do
    local l = math.floor((limits[j] - used[j] - reserved[j] - cost) / divisor)
    if l < lease then
      lease = l
    end
  end
  if lease < 0 then
    lease = 0
  end
end

local out = {1, lease, keep}
for j = 1, n_charge do
  local key = keys[j]
  local s = 0
  if cost > 0 then
    redis.call('HINCRBY', key, 'used', cost)
  end
  if seq > 0 then
    s = redis.call('HINCRBY', key, f_s, cost)
    if lease > 0 then
      redis.call('HINCRBY', key, 'reserved', lease)
      redis.call('HSET', key, f_r, keep + lease)
    end
  end
  out[#out + 1] = s
  out[#out + 1] = used[j] + cost
  out[#out + 1] = reserved[j] + lease
end
expire_all()
return out
