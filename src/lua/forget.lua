-- Forgets devices of one bucket that have been offline for at least `after` ms, counted from
-- the `since` of their offline status: their record and index entries go, and the clearing
-- of their retained status is staged in the outbox in the same step (a member with seq 0,
-- see common.lua), so the clear is published even if the caller dies right after.
-- Decided on the record as it is now and this master's clock: a device that came back online
-- meanwhile is not forgotten, and of two callers only the first finds anything to forget.
-- A device with a status still in the outbox (not yet acknowledged by the broker) waits for
-- a later call: that status could otherwise reach the broker after the clear.
-- The cutoff is the lowest of this master's clock, the caller's (before any heartbeat it has
-- not applied yet) and the live replicas' floors, as in expire.lua: a device is never
-- forgotten past a heartbeat that some replica holds.
-- Returns {1 if more may be due else 0, the clear members staged...}.
-- KEYS: 1 records hash, 2 deadlines zset, 3 online index, 4 offline index, 5 outbox zset,
--       6 floors hash, 7 offline-since zset (id -> since of its offline status),
--       8 group counts hash, 9 flap until zset, 10 flap lex index, 11 sessions hash
-- ARGV: 1 TTL key prefix, 2 cutoff, 3 outbox lease (ms), 4 limit, 5 floor lease (ms),
--       6 the caller's name in the floors, 7 flap rule (unused here), 8 forget after (ms)
local recs, offline, outbox, offsince = KEYS[1], KEYS[4], KEYS[5], KEYS[7]
local cutoff = tonumber(ARGV[2])
local lease, limit, floor_lease = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local after = tonumber(ARGV[8])
local now = redis_now()
if now < cutoff then cutoff = now end
local floor = lowest_floor(KEYS[6], floor_lease, now, ARGV[6])
if floor and floor - 1 < cutoff then cutoff = floor - 1 end
local due = redis.call('ZRANGEBYSCORE', offsince, '-inf', cutoff - after, 'LIMIT', 0, limit)
if #due == 0 then return {0} end
local more = 0
if #due >= limit then more = 1 end
-- Reading the whole outbox must stay cheap: while it is long (a mass expiry, a broker
-- outage) forgetting waits; it is never urgent.
if redis.call('ZCARD', outbox) > 2000 then return {0} end
-- Devices with a status not acknowledged yet.
local pending = {}
for _, m in ipairs(redis.call('ZRANGE', outbox, 0, -1)) do
  local id = member_id(m)
  if id then pending[id] = true end
end
local raw = redis.call('HMGET', recs, unpack(due))
local gone, stale, reindex, outbox_args, out = {}, {}, {}, {}, {}
for i, id in ipairs(due) do
  local state, seq, since, last, det, group = parse(raw[i])
  if state ~= '0' then
    -- Online again (or no record): nothing to forget.
    stale[#stale + 1] = id
  elseif tonumber(since) + after > cutoff then
    -- The index is behind the record: keep the device, indexed by its record's since.
    reindex[#reindex + 1] = since
    reindex[#reindex + 1] = id
  elseif not pending[id] then
    gone[#gone + 1] = id
    local member = outbox_member('0', '0', since, last, int(now), id, group)
    count(KEYS[8], '0', group, -1)
    outbox_args[#outbox_args + 1] = now + lease
    outbox_args[#outbox_args + 1] = member
    out[#out + 1] = member
  end
end
if #stale > 0 then redis.call('ZREM', offsince, unpack(stale)) end
if #reindex > 0 then redis.call('ZADD', offsince, unpack(reindex)) end
if #gone > 0 then
  redis.call('HDEL', recs, unpack(gone))
  redis.call('ZREM', offline, unpack(gone))
  redis.call('ZREM', offsince, unpack(gone))
  redis.call('ZREM', KEYS[9], unpack(gone))
  redis.call('ZREM', KEYS[10], unpack(gone))
  redis.call('HDEL', KEYS[11], unpack(gone))
  redis.call('ZADD', outbox, unpack(outbox_args))
end
local result = {more}
for _, m in ipairs(out) do result[#result + 1] = m end
return result
