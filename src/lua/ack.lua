-- Records the broker's acknowledgement of published statuses of one bucket. If a device
-- has moved on to a later seq meanwhile, the acknowledged (older) status may have reached
-- the broker after the newer one and overwritten the retained message: the current status
-- is staged again in the outbox and returned, to be published once more.
-- Batched: one ZREM and one HMGET for the whole batch.
-- KEYS: 1 records hash, 2 outbox zset
-- ARGV: 1 outbox lease (ms), then triples (member, id, seq)
local recs, outbox = KEYS[1], KEYS[2]
local lease = tonumber(ARGV[1])
local members, ids, seqs = {}, {}, {}
for i = 2, #ARGV, 3 do
  members[#members + 1] = ARGV[i]
  ids[#ids + 1] = ARGV[i + 1]
  seqs[#seqs + 1] = tonumber(ARGV[i + 2])
end
local out = {}
if #members == 0 then return out end
redis.call('ZREM', outbox, unpack(members))
local raw = redis.call('HMGET', recs, unpack(ids))
local again = {}
for i, id in ipairs(ids) do
  local state, seq, since, last, det, group = parse(raw[i])
  if state and tonumber(seq) > seqs[i] then
    local seen = last
    if state == '1' then seen = since end
    local member = outbox_member(seq, state, since, seen, det, id, group)
    if not again[member] then
      again[member] = true
      out[#out + 1] = member
    end
  end
end
if #out > 0 then
  local now = redis_now()
  local args = {}
  for _, m in ipairs(out) do
    args[#args + 1] = now + lease
    args[#args + 1] = m
  end
  redis.call('ZADD', outbox, unpack(args))
end
return out
