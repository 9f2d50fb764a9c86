-- Marks devices of one bucket offline whose deadline is at or before the cutoff: the given
-- ids, or (without ids) the earliest overdue ones, at most `limit`. Writes are batched (one
-- call per structure, not per device): a mass expiry is decided at Redis speed.
-- The cutoff is the lowest of: this master's clock, the caller's (before any heartbeat it
-- has not applied yet), and every live replica's floor (before any heartbeat *it* has not
-- applied yet; a floor whose writer stopped renewing it for `floor lease` ms is ignored).
-- Returns {next deadline or -1, 1 if more may be overdue else 0, the cutoff used, members...}.
-- KEYS: 1 records hash, 2 deadlines zset, 3 online index, 4 offline index, 5 outbox zset,
--       6 floors hash (replica -> "floor|written at"), 7 offline-since zset (forget.lua),
--       8 group counts hash, 9 flap until zset, 10 flap lex index (see flap_index),
--       11 event log stream (see log_events)
-- ARGV: 1 TTL key prefix, 2 cutoff, 3 outbox lease (ms), 4 limit, 5 floor lease (ms),
--       6 the caller's name in the floors, 7 flap rule ("threshold|half_life ms"), 8 event
--       log rule ("retention ms|most entries"), then ids
local recs, deadlines, online, offline, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ttl_prefix, cutoff = ARGV[1], tonumber(ARGV[2])
local lease, limit, floor_lease = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local thr, half = flap_rule(ARGV[7])
local now = redis_now()
if now < cutoff then cutoff = now end
local floor = lowest_floor(KEYS[6], floor_lease, now, ARGV[6])
if floor and floor - 1 < cutoff then cutoff = floor - 1 end
local ids, dls, more = {}, {}, 0
if #ARGV > 8 then
  local seen = {}
  for i = 9, #ARGV do
    -- No deadline: not online (another replica already decided). Later deadline: a
    -- heartbeat extended it. An id named twice is decided once.
    local dl = tonumber(redis.call('ZSCORE', deadlines, ARGV[i]))
    if dl and dl <= cutoff and not seen[ARGV[i]] then
      seen[ARGV[i]] = true
      ids[#ids + 1] = ARGV[i]
      dls[#dls + 1] = dl
    end
  end
else
  local due = redis.call('ZRANGEBYSCORE', deadlines, '-inf', cutoff, 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #due, 2 do
    ids[#ids + 1] = due[i]
    dls[#dls + 1] = tonumber(due[i + 1])
  end
  if #ids >= limit then more = 1 end
end
local out = {}
if #ids > 0 then
  local raw = redis.call('HMGET', recs, unpack(ids))
  local ttl_keys, rec_args, gone, off_args, outbox_args = {}, {}, {}, {}, {}
  local offsince_args = {} -- forget index
  local flap_args, lex_args = {}, {}
  for i, id in ipairs(ids) do
    ttl_keys[i] = ttl_prefix .. id
    local state, seq, since, last, det, group, flap = parse(raw[i])
    if state == '1' then
      count(KEYS[8], '1', group, -1)
      count(KEYS[8], '0', group, 1)
      local nseq, since_off = int(tonumber(seq) + 1), int(dls[i])
      local nflap, flapping = flap_next(flap, now, thr, half)
      local flags = ''
      if flapping then
        flags = 'p'
        flap_args[#flap_args + 1] = flap_until(nflap)
        flap_args[#flap_args + 1] = id
        lex_args[#lex_args + 1] = 0
        lex_args[#lex_args + 1] = id
      end
      rec_args[#rec_args + 1] = id
      rec_args[#rec_args + 1] = make_record('0', nseq, since_off, last, int(now), group, nflap)
      gone[#gone + 1] = id
      off_args[#off_args + 1] = 0
      off_args[#off_args + 1] = id
      local member = outbox_member(nseq, '0', since_off, last, int(now), id, group, nil, flags)
      outbox_args[#outbox_args + 1] = now + lease
      outbox_args[#outbox_args + 1] = member
      out[#out + 1] = member
      offsince_args[#offsince_args + 1] = since_off -- forget index
      offsince_args[#offsince_args + 1] = id -- forget index
    end
  end
  redis.call('ZREM', deadlines, unpack(ids))
  redis.call('UNLINK', unpack(ttl_keys))
  if #gone > 0 then
    redis.call('HSET', recs, unpack(rec_args))
    redis.call('ZREM', online, unpack(gone))
    redis.call('ZADD', offline, unpack(off_args))
    redis.call('ZADD', outbox, unpack(outbox_args))
    redis.call('ZADD', KEYS[7], unpack(offsince_args)) -- forget index
  end
  if #flap_args > 0 then
    redis.call('ZADD', KEYS[9], unpack(flap_args))
    redis.call('ZADD', KEYS[10], unpack(lex_args))
  end
  flap_index(KEYS[9], KEYS[10], nil, 0, now)
  log_events(KEYS[11], ARGV[8], out, now)
end
local nxt = redis.call('ZRANGE', deadlines, 0, 0, 'WITHSCORES')
local result = {nxt[2] or '-1', more, int(cutoff)}
for _, m in ipairs(out) do result[#result + 1] = m end
return result
