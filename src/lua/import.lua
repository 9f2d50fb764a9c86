-- Imports device statuses (the broker's retained messages) into one bucket whose data Redis
-- lost, in chunks; the last chunk marks the bucket as present (its epoch key). A device is
-- written only if it has no record or a lower seq: several replicas may import at once, and
-- the higher seq wins. An online device gets one TTL (its class's) from now to heartbeat
-- again. Its flap state starts again from what its status says: a flapping device at the
-- threshold as of its last transition (so it stays flapping for one half-life from then),
-- any other at 0.
-- A chunk after the first goes on only if this import's token is still registered: if Redis
-- lost the bucket again meanwhile, the earlier chunks are gone and the import starts over.
-- KEYS: 1 records hash, 2 deadlines zset, 3 online index, 4 offline index, 5 epoch key,
--       6 importers set (tokens of the imports under way), 7 offline-since zset (forget.lua),
--       8 group counts hash, 9 flap until zset, 10 flap lex index
-- ARGV: 1 TTL key prefix, 2 token, 3 '1' first chunk, 4 '1' last chunk, 5 flap rule
--       ("threshold|half_life ms"), then per device 9 values: id, state ('1'/'0'), seq,
--       since, last_seen, detected_at, group ('' for none), TTL (ms), status flags ('p'
--       flapping, 'w' reason will)
-- Returns DONE (the bucket is present: nothing to import), AGAIN (start over), or the
-- number of devices written.
local recs, deadlines, online, offline, epoch, importers = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('EXISTS', epoch) == 1 then return redis.status_reply('DONE') end
local ttl_prefix, token = ARGV[1], ARGV[2]
if ARGV[3] == '1' then
  redis.call('SADD', importers, token)
  redis.call('PEXPIRE', importers, 600000)
elseif redis.call('SISMEMBER', importers, token) == 0 then
  return redis.status_reply('AGAIN')
end
local thr, half = flap_rule(ARGV[5])
local now = redis_now()
local written = 0
for i = 6, #ARGV, 9 do
  local id, state, seq = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local cur_state, cur, _, _, _, cur_group = parse(redis.call('HGET', recs, id))
  if not cur or tonumber(cur) < seq then
    local group, flags = ARGV[i + 6], ARGV[i + 8]
    local flap, will = nil, ''
    redis.call('ZREM', KEYS[9], id)
    redis.call('ZREM', KEYS[10], id)
    if string.find(flags, 'p', 1, true) then
      local at = tonumber(ARGV[i + 5])
      flap = table.concat({int(thr), int(at), int(at + half)}, ',')
      if at + half >= now then
        redis.call('ZADD', KEYS[9], at + half, id)
        redis.call('ZADD', KEYS[10], 0, id)
      end
    end
    if string.find(flags, 'w', 1, true) then will = '1' end
    redis.call('HSET', recs, id, make_record(state, ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], group, flap, will))
    if cur_state then count(KEYS[8], cur_state, cur_group, -1) end
    count(KEYS[8], state, group, 1)
    if state == '1' then
      local deadline = int(now + tonumber(ARGV[i + 7]))
      redis.call('ZADD', deadlines, deadline, id)
      redis.call('SET', ttl_prefix .. id, '1', 'PXAT', deadline)
      redis.call('ZREM', offline, id)
      redis.call('ZADD', online, 0, id)
      redis.call('ZREM', KEYS[7], id) -- forget index
    else
      redis.call('ZREM', deadlines, id)
      redis.call('UNLINK', ttl_prefix .. id)
      redis.call('ZREM', online, id)
      redis.call('ZADD', offline, 0, id)
      redis.call('ZADD', KEYS[7], ARGV[i + 3], id) -- forget index
    end
    written = written + 1
  end
end
if ARGV[4] == '1' then
  redis.call('SET', epoch, token .. '|' .. int(now))
  redis.call('DEL', importers)
end
return written
