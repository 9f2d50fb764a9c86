-- Notes device transitions in their groups and decides the groups' outages: all the groups
-- whose name falls in this bucket. Called for every device status of a group before its
-- acknowledgement is recorded (ack.lua), so a transition whose publisher died is noted when
-- another replica claims and publishes it; a note repeated (republished, claimed twice) or
-- older than one already noted (seq order) changes nothing.
-- Per group G (keys under ARGV[1] .. name, all in this bucket's slot):
--   dev:G  hash id -> "seq|state|since" of the latest noted transition (the seq order)
--   off:G  zset id -> since, the offline devices (the window and the affected count)
--   rec:G  set, the devices recovered (online again) in the current outage
-- An outage opens when, within the window, at least `min` devices went offline (their since
-- in the window) and they are at least `fraction` of the group's devices; it closes when the
-- recovered reach `recovery` x affected. Affected: the offline devices with since from
-- `window` before the crossing transition's on, plus the recovered. Each opening or closing
-- is staged in the outbox
-- (member "o<len>|G|seq|state|since|detected_at|devices|online|offline|affected|recovered")
-- and kept in the group states hash (see common.lua) in the same step: decided exactly once,
-- published even if the caller dies.
-- KEYS: 1 group states hash, 2 outbox zset
-- ARGV: 1 group key prefix, 2 outbox lease (ms), 3 min devices, 4 fraction, 5 window (ms),
--       6 recovery fraction, then per note 8 values: group, its devices, online and offline
--       (fleet-wide, read just before), id, seq, state ('1' online, '0' offline, 'x'
--       forgotten, 'm' back online in another group), since
-- Returns the group statuses staged.
local states, outbox = KEYS[1], KEYS[2]
local prefix, lease = ARGV[1], tonumber(ARGV[2])
local min, fraction = tonumber(ARGV[3]), tonumber(ARGV[4])
local window, recovery = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = redis_now()
local out = {}

local function stage(g, seq, flag, since, totals, affected, recovered, from)
  local m = table.concat({'o' .. #g, g, seq, flag, int(since), int(now), totals[1], totals[2],
    totals[3], int(affected), int(recovered)}, '|')
  redis.call('ZADD', outbox, now + lease, m)
  redis.call('HSET', states, g, table.concat({int(from), int(affected), int(recovered), m}, '|'))
  out[#out + 1] = m
end

-- The figures of G's current outage: affected, recovered.
local function figures(off, rec, from)
  local recovered = redis.call('SCARD', rec)
  return redis.call('ZCOUNT', off, from, '+inf') + recovered, recovered
end

-- Openings decided in this call, staged at its end: the devices of one mass expiry noted
-- together all count in the opening status's figures (it is decided at the crossing, and
-- told as of the end of this atomic step).
local opened = {}
local function finish(g)
  local o = opened[g]
  if not o then return end
  opened[g] = nil
  local affected, recovered = figures(o.off, o.rec, o.from)
  stage(g, o.seq, '1', o.since, o.totals, affected, recovered, o.from)
end

local function offline(g, id, since, totals, off, rec)
  redis.call('ZADD', off, since, id)
  redis.call('SREM', rec, id)
  if opened[g] then return end
  local from, _, _, m = group_state(states, g)
  if m and select(2, group_fields(m)) == '1' then
    local affected, recovered = figures(off, rec, tonumber(from))
    redis.call('HSET', states, g, table.concat({from, int(affected), int(recovered), m}, '|'))
    return
  end
  -- The windows that hold this transition: the one ending with it, the one starting with it
  -- (notes come in any order: a device may be noted after others that went offline later).
  local back = redis.call('ZCOUNT', off, since - window, since)
  local ahead = redis.call('ZCOUNT', off, since, since + window)
  -- Affected counts from the start of the earlier window either way: a device of the burst
  -- noted after the crossing, with a since before the crossing one, opened it as well.
  local n, start = math.max(back, ahead), since - window
  if n >= min and n >= fraction * tonumber(totals[1]) then
    redis.call('DEL', rec)
    local seq = 1
    if m then seq = group_seq(m) + 1 end
    opened[g] = {seq = seq, since = since, totals = totals, from = start, off = off, rec = rec}
  end
end

-- G's open outage after a device left its offline devices (`was`: its since there, if it
-- was one): counted recovered if it was affected (`back`), and the outage closes when the
-- recovered reach `recovery` x affected.
local function settle(g, id, was, back, since, totals, off, rec)
  finish(g)
  local from, _, _, m = group_state(states, g)
  if not (m and select(2, group_fields(m)) == '1') then return end
  from = tonumber(from)
  if back and was and was >= from then redis.call('SADD', rec, id) end
  local affected, recovered = figures(off, rec, from)
  if recovered >= recovery * affected then
    redis.call('DEL', rec)
    stage(g, group_seq(m) + 1, '0', since, totals, affected, recovered, from)
  else
    redis.call('HSET', states, g, table.concat({int(from), int(affected), int(recovered), m}, '|'))
  end
end

-- Online again, here or (moved) in another group.
local function online(g, id, since, totals, off, rec)
  local was = tonumber(redis.call('ZSCORE', off, id))
  redis.call('ZREM', off, id)
  settle(g, id, was, true, since, totals, off, rec)
end

for i = 7, #ARGV, 8 do
  local g, id, seq, state, since = ARGV[i], ARGV[i + 4], tonumber(ARGV[i + 5]), ARGV[i + 6], tonumber(ARGV[i + 7])
  local totals = {ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
  local dev, off, rec = prefix .. 'dev:' .. g, prefix .. 'off:' .. g, prefix .. 'rec:' .. g
  local noted = redis.call('HGET', dev, id)
  local noted_seq = tonumber(noted and string.match(noted, '^(%d+)|') or '0')
  if state == 'x' then
    -- Forgotten: no longer of G, in no figure; an outage it kept open may close now.
    if noted then
      local was = tonumber(redis.call('ZSCORE', off, id))
      redis.call('HDEL', dev, id)
      redis.call('ZREM', off, id)
      redis.call('SREM', rec, id)
      settle(g, id, was, false, now, totals, off, rec)
    end
  elseif seq > noted_seq then
    redis.call('HSET', dev, id, table.concat({int(seq), state, int(since)}, '|'))
    -- 'm': back online in another group (kept as a mark, so that a late note of its
    -- offline here changes nothing).
    if state == '0' then
      offline(g, id, since, totals, off, rec)
    else
      online(g, id, since, totals, off, rec)
    end
  end
end
for g in pairs(opened) do finish(g) end
return out
