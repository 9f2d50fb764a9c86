-- Records the broker's acknowledgement of published statuses of one bucket. If a device
-- has moved on to a later seq meanwhile, the acknowledged (older) status may have reached
-- the broker after the newer one and overwritten the retained message: the current status
-- is staged again in the outbox and returned, to be published once more.
-- KEYS: 1 records hash, 2 outbox zset
-- ARGV: 1 now, 2 outbox lease (ms), then triples (member, id, seq)
local recs, outbox = KEYS[1], KEYS[2]
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 3 do
  redis.call('ZREM', outbox, ARGV[i])
  local id = ARGV[i + 1]
  local state, seq, since, last, det = parse(redis.call('HGET', recs, id))
  if state and tonumber(seq) > tonumber(ARGV[i + 2]) then
    local seen = last
    if state == '1' then seen = since end
    local member = table.concat({seq, state, since, seen, det, id}, '|')
    redis.call('ZADD', outbox, now + lease, member)
    out[#out + 1] = member
  end
end
return out
