-- Applies device wills of one bucket: a will takes an online device offline at once, reason
-- will (the record's "w|" mark and the member's 'w' flag), since = the will's arrival, through
-- the same step as an expiry (seq + 1, indexes, group counts, flap state, outbox); its TTL key
-- and deadline go, so that no second offline follows.
-- A will of a device that is offline or unknown changes nothing (ignored). A will is stale,
-- and changes nothing, when it names a session lower than that of the device's latest
-- heartbeat, or when it did not arrive after that heartbeat (the later arrival wins; on equal
-- arrivals the heartbeat).
-- Returns {applied, stale, ignored, members...}, or LOST without the epoch key (nothing is
-- written; the caller holds the wills until the rebuild).
-- KEYS: 1 records hash, 2 deadlines zset, 3 online index, 4 offline index, 5 outbox zset,
--       6 floors hash (unused here), 7 offline-since zset (forget.lua), 8 group counts hash,
--       9 flap until zset, 10 flap lex index, 11 epoch key, 12 sessions hash (id -> the
--       session of its latest heartbeat that named one; heartbeat.lua), 13 event log stream
--       (see log_events)
-- ARGV: 1 TTL key prefix, 2 outbox lease (ms), 3 flap rule ("threshold|half_life ms"),
--       4 event log rule ("retention ms|most entries"), then per will 3 values: id, arrival,
--       session ('' for none)
if redis.call('EXISTS', KEYS[11]) == 0 then return redis.status_reply('LOST') end
local recs, outbox = KEYS[1], KEYS[5]
local ttl_prefix, lease = ARGV[1], tonumber(ARGV[2])
local thr, half = flap_rule(ARGV[3])
local now = redis_now()
local applied, stale, ignored = 0, 0, 0
local out = {}
local function is_stale(id, arrival, session, last)
  -- The arrival as the caller gave it: capping it to `now` could tie it with a heartbeat it
  -- follows.
  if arrival <= tonumber(last) then return true end
  if session == '' then return false end
  local known = tonumber(redis.call('HGET', KEYS[12], id))
  return known ~= nil and tonumber(session) < known
end
for i = 5, #ARGV, 3 do
  local id, arrival, session = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local state, seq, since, last, _, group, flap = parse(redis.call('HGET', recs, id))
  if state ~= '1' then
    ignored = ignored + 1
  elseif is_stale(id, arrival, session, last) then
    stale = stale + 1
  else
    -- As for heartbeats: no published time runs ahead of the decision.
    local s = arrival
    if s > now then s = now end
    if s < tonumber(since) then s = tonumber(since) end
    local nseq = int(tonumber(seq) + 1)
    local nflap, flapping = flap_next(flap, now, thr, half)
    flap_index(KEYS[9], KEYS[10], id, flap_until(nflap), now)
    local flags = 'w'
    if flapping then flags = 'pw' end
    redis.call('HSET', recs, id, make_record('0', nseq, int(s), last, int(now), group, nflap, '1', session))
    count(KEYS[8], '1', group, -1)
    count(KEYS[8], '0', group, 1)
    redis.call('ZREM', KEYS[2], id)
    redis.call('UNLINK', ttl_prefix .. id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZADD', KEYS[4], 0, id)
    redis.call('ZADD', KEYS[7], int(s), id) -- forget index
    local member = outbox_member(nseq, '0', int(s), last, int(now), id, group, nil, flags)
    redis.call('ZADD', outbox, now + lease, member)
    out[#out + 1] = member
    applied = applied + 1
  end
end
log_events(KEYS[13], ARGV[4], out, now)
local result = {applied, stale, ignored}
for _, m in ipairs(out) do result[#result + 1] = m end
return result
