-- Applies a batch of heartbeats of one bucket; returns the outbox members of the
-- online transitions it committed.
-- KEYS: 1 records hash, 2 deadlines zset, 3 online index, 4 offline index, 5 outbox zset
-- ARGV: 1 TTL key prefix, 2 now, 3 outbox lease (ms), then triples (id, arrival, ttl_ms)
local recs, deadlines, online, offline, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ttl_prefix, now, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV, 3 do
  local id, arrival = ARGV[i], tonumber(ARGV[i + 1])
  local deadline = arrival + tonumber(ARGV[i + 2])
  local state, seq, since, last, det = parse(redis.call('HGET', recs, id))
  if state == '1' then
    -- Online: extend the deadline (never shorten it: a late, held heartbeat may carry an
    -- older arrival) and remember the latest heartbeat.
    if redis.call('ZADD', deadlines, 'GT', 'CH', deadline, id) == 1 then
      redis.call('SET', ttl_prefix .. id, '1', 'PXAT', int(deadline))
    end
    if arrival > tonumber(last) then
      redis.call('HSET', recs, id, table.concat({state, seq, since, int(arrival), det}, '|'))
    end
  elseif deadline > now then
    -- New or offline: a transition to online. A heartbeat whose deadline already passed
    -- (held while Redis was away) proves presence only for a time gone by, so it does not
    -- bring a device online.
    local s = arrival
    if since and tonumber(since) > s then s = tonumber(since) end
    local nseq = int((tonumber(seq) or 0) + 1)
    redis.call('HSET', recs, id, table.concat({'1', nseq, int(s), int(arrival), int(now)}, '|'))
    redis.call('ZADD', deadlines, deadline, id)
    redis.call('SET', ttl_prefix .. id, '1', 'PXAT', int(deadline))
    redis.call('ZREM', offline, id)
    redis.call('ZADD', online, 0, id)
    local member = table.concat({nseq, '1', int(s), int(s), int(now), id}, '|')
    redis.call('ZADD', outbox, now + lease, member)
    out[#out + 1] = member
  end
end
return out
