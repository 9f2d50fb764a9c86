-- Marks devices of one bucket offline whose deadline is at or before the cutoff: the given
-- ids, or (without ids) the earliest overdue ones, at most `limit`.
-- Returns {next deadline or -1, 1 if more may be overdue else 0, members...}.
-- KEYS: 1 records hash, 2 deadlines zset, 3 online index, 4 offline index, 5 outbox zset
-- ARGV: 1 TTL key prefix, 2 now, 3 cutoff, 4 outbox lease (ms), 5 limit, then ids
local recs, deadlines, online, offline, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ttl_prefix, now, cutoff = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local ids, more = {}, 0
if #ARGV > 5 then
  for i = 6, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGEBYSCORE', deadlines, '-inf', cutoff, 'LIMIT', 0, limit)
  if #ids >= limit then more = 1 end
end
local out = {}
for _, id in ipairs(ids) do
  local dl = tonumber(redis.call('ZSCORE', deadlines, id))
  -- No deadline: not online (another replica already decided). Later deadline: a
  -- heartbeat extended it.
  if dl and dl <= cutoff then
    redis.call('ZREM', deadlines, id)
    redis.call('UNLINK', ttl_prefix .. id)
    local state, seq, since, last, det = parse(redis.call('HGET', recs, id))
    if state == '1' then
      local nseq, since_off = int(tonumber(seq) + 1), int(dl)
      redis.call('HSET', recs, id, table.concat({'0', nseq, since_off, last, int(now)}, '|'))
      redis.call('ZREM', online, id)
      redis.call('ZADD', offline, 0, id)
      local member = table.concat({nseq, '0', since_off, last, int(now), id}, '|')
      redis.call('ZADD', outbox, now + lease, member)
      out[#out + 1] = member
    end
  end
end
local nxt = redis.call('ZRANGE', deadlines, 0, 0, 'WITHSCORES')
local result = {nxt[2] or '-1', more}
for _, m in ipairs(out) do result[#result + 1] = m end
return result
