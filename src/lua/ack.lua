-- Records the broker's acknowledgement of published statuses of one bucket. If a device
-- has moved on to a later seq meanwhile, the acknowledged (older) status may have reached
-- the broker after the newer one and overwritten the retained message: the current status
-- is staged again in the outbox and returned, to be published once more. The same for a
-- group's outage status (a member beginning with 'o'; its "id" is the group): its current
-- status is the one kept in the group states hash (see note.lua).
-- Batched: one ZREM and one HMGET for the whole batch.
-- KEYS: 1 records hash, 2 outbox zset, 3 group states hash
-- ARGV: 1 outbox lease (ms), then triples (member, id or group, seq)
local recs, outbox = KEYS[1], KEYS[2]
local lease = tonumber(ARGV[1])
local members, ids, seqs = {}, {}, {}
local out, again = {}, {}
for i = 2, #ARGV, 3 do
  members[#members + 1] = ARGV[i]
  if string.sub(ARGV[i], 1, 1) == 'o' then
    local current = group_current(KEYS[3], ARGV[i + 1])
    if current and group_seq(current) > tonumber(ARGV[i + 2]) and not again[current] then
      again[current] = true
      out[#out + 1] = current
    end
  else
    ids[#ids + 1] = ARGV[i + 1]
    seqs[#seqs + 1] = tonumber(ARGV[i + 2])
  end
end
if #members == 0 then return out end
redis.call('ZREM', outbox, unpack(members))
local raw = {}
if #ids > 0 then raw = redis.call('HMGET', recs, unpack(ids)) end
for i, id in ipairs(ids) do
  local state, seq, since, last, det, group, flap, will = parse(raw[i])
  if state and tonumber(seq) > seqs[i] then
    local seen = last
    if state == '1' then seen = since end
    local member = outbox_member(seq, state, since, seen, det, id, group, nil, status_flags(flap, will))
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
