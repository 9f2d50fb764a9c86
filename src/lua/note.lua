-- Notes device transitions in their groups and decides the groups' outages: all the groups
-- whose name falls in this bucket. Called for every device status of a group before its
-- acknowledgement is recorded (ack.lua), so a transition whose publisher died is noted when
-- another replica claims and publishes it; a note repeated (republished, claimed twice) or
-- older than one already noted (seq order) changes nothing.
-- Per group G (keys under ARGV[1] .. name, all in this bucket's slot):
--   dev:G   hash id -> "seq|state|since" of the latest noted transition (the seq order);
--           a note is taken if newer by seq and not older by since (since never goes back
--           within a device's life); state 'x' (forgotten, since: of the offline it ended)
--           and 'm' (back online in another group) are fences, passed also by a newer since
--           (a forgotten device starts again at seq 1), so that a late copy of an older note
--           changes nothing
--   off:G   zset id -> since, the offline devices (the window and the affected count)
--   rec:G   set, the devices recovered (online again) in the current outage
--   fence:G zset id -> when fenced; fences older than `FENCE_LEASES` outbox leases go (no
--           copy of a note is that late), so that dev:G does not keep every device ever
-- An outage opens when, within the window, at least `min` devices went offline (their since
-- in the window) and they are at least `fraction` of the group's devices; it closes when the
-- recovered reach `recovery` x affected. Affected: the offline devices with since from
-- `window` before the crossing transition's on, plus the recovered. Each opening or closing
-- is staged in the outbox
-- (member "o<len>|G|seq|state|since|detected_at|devices|online|offline|affected|recovered")
-- and kept in the group states hash (see common.lua) in the same step: decided exactly once,
-- published even if the caller dies. The live figures of an open outage are written at the
-- end of the call.
-- KEYS: 1 group states hash, 2 outbox zset, 3 epoch key (present exactly when the bucket's
--       state is in Redis: without it the group states were lost, and deciding from none
--       would start a group's seq over; the caller keeps its notes until the rebuild),
--       4 event log stream (see log_events)
-- ARGV: 1 group key prefix, 2 outbox lease (ms), 3 min devices, 4 fraction, 5 window (ms),
--       6 recovery fraction, 7 'decide' or 'quiet' (the rebuild's notes of imported offline
--       devices: they make up figures and open nothing, their burst is history), 8 event log
--       rule ("retention ms|most entries"), then per note 8 values: group, its devices, online and offline
--       (fleet-wide, read just before), id, seq, state ('1' online, '0' offline, 'x'
--       forgotten, 'm' back online in another group), since
-- Returns the group statuses staged.
if redis.call('EXISTS', KEYS[3]) == 0 then return redis.status_reply('LOST') end
local states, outbox = KEYS[1], KEYS[2]
local prefix, lease = ARGV[1], tonumber(ARGV[2])
local min, fraction = tonumber(ARGV[3]), tonumber(ARGV[4])
local window, recovery = tonumber(ARGV[5]), tonumber(ARGV[6])
local decide = ARGV[7] == 'decide'
local FENCE_LEASES, PRUNE = 10, 100
local now = redis_now()
local out = {}

-- The groups this call touches: their keys and state, read once.
--   from, m, open: the window start of the open outage, the latest group status (member)
--   opening: an opening decided in this call, staged at its end (see finish)
--   dirty: the open outage's live figures are to be written
local groups = {}
local function group(g)
  local s = groups[g]
  if s then return s end
  local from, _, _, m = group_state(states, g)
  s = {dev = prefix .. 'dev:' .. g, off = prefix .. 'off:' .. g, rec = prefix .. 'rec:' .. g,
    fence = prefix .. 'fence:' .. g, from = tonumber(from), m = m,
    open = m ~= nil and select(2, group_fields(m)) == '1', dirty = false}
  groups[g] = s
  return s
end

-- The figures of G's current outage: affected, recovered.
local function figures(s)
  local recovered = redis.call('SCARD', s.rec)
  return redis.call('ZCOUNT', s.off, s.from, '+inf') + recovered, recovered
end

local function stage(g, s, seq, flag, since, totals, from, affected, recovered)
  local m = table.concat({'o' .. #g, g, seq, flag, int(since), int(now), totals[1], totals[2],
    totals[3], int(affected), int(recovered)}, '|')
  redis.call('ZADD', outbox, now + lease, m)
  redis.call('HSET', states, g, table.concat({int(from), int(affected), int(recovered), m}, '|'))
  s.m, s.open, s.dirty, s.from = m, flag == '1', false, from
  out[#out + 1] = m
end

-- Openings decided in this call are staged at its end (or before the group's next online
-- or forgotten note): the devices of one mass expiry noted together all count in the
-- opening status's figures (it is decided at the crossing, and told as of the end of this
-- atomic step).
local function finish(g, s)
  local o = s.opening
  if not o then return end
  s.opening = nil
  s.from = o.from
  local affected, recovered = figures(s)
  stage(g, s, o.seq, '1', o.since, o.totals, o.from, affected, recovered)
end

local function offline(g, s, id, since, totals)
  redis.call('ZADD', s.off, since, id)
  redis.call('SREM', s.rec, id)
  if s.opening then return end
  if s.open then
    s.dirty = true
    return
  end
  if not decide then return end
  -- The windows that hold this transition: the one ending with it, the one starting with it
  -- (notes come in any order: a device may be noted after others that went offline later).
  local back = redis.call('ZCOUNT', s.off, since - window, since)
  local ahead = redis.call('ZCOUNT', s.off, since, since + window)
  -- Affected counts from the start of the earlier window either way: a device of the burst
  -- noted after the crossing, with a since before the crossing one, opened it as well.
  local n = math.max(back, ahead)
  if n >= min and n >= fraction * tonumber(totals[1]) then
    redis.call('DEL', s.rec)
    local seq = 1
    if s.m then seq = group_seq(s.m) + 1 end
    s.opening = {seq = seq, since = since, totals = totals, from = since - window}
  end
end

-- G's open outage after a device left its offline devices (`was`: its since there, if it
-- was one): counted recovered if it was affected (`back`), and the outage closes when the
-- recovered reach `recovery` x affected. An outage without affected devices closes only by
-- forgetting: after a rebuild its figures are made up from the imported devices' notes,
-- and a device back before those is no reason to close it.
local function settle(g, s, id, was, back, since, totals)
  finish(g, s)
  if not s.open then return end
  if back and was and was >= s.from then redis.call('SADD', s.rec, id) end
  local affected, recovered = figures(s)
  if recovered >= recovery * affected and (affected > 0 or not back) then
    redis.call('DEL', s.rec)
    stage(g, s, group_seq(s.m) + 1, '0', since, totals, s.from, affected, recovered)
  else
    s.dirty = true
  end
end

-- Online again, here or (moved) in another group.
local function online(g, s, id, since, totals)
  local was = tonumber(redis.call('ZSCORE', s.off, id))
  redis.call('ZREM', s.off, id)
  settle(g, s, id, was, true, since, totals)
end

local function fence(s, id, entry)
  redis.call('HSET', s.dev, id, entry)
  redis.call('ZADD', s.fence, now, id)
end

for i = 9, #ARGV, 8 do
  local g, id, seq, state, since = ARGV[i], ARGV[i + 4], tonumber(ARGV[i + 5]), ARGV[i + 6], tonumber(ARGV[i + 7])
  local totals = {ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
  local s = group(g)
  local noted = redis.call('HGET', s.dev, id)
  local nseq, nstate, nsince = 0, nil, 0
  if noted then
    local a, b, c = string.match(noted, '^(%d+)|(%w)|(%d+)$')
    nseq, nstate, nsince = tonumber(a) or 0, b, tonumber(c) or 0
  end
  local fenced = nstate == 'x' or nstate == 'm'
  if state == 'x' then
    -- Forgotten (since: of the offline status it ends): no longer of G, in no figure; an
    -- outage it kept open may close now. The clear of an earlier life changes nothing.
    if noted and not fenced and nsince <= since then
      local was = tonumber(redis.call('ZSCORE', s.off, id))
      fence(s, id, table.concat({int(nseq), 'x', int(since)}, '|'))
      redis.call('ZREM', s.off, id)
      redis.call('SREM', s.rec, id)
      settle(g, s, id, was, false, now, totals)
    end
  elseif (seq > nseq and since >= nsince) or (fenced and since > nsince) then
    local entry = table.concat({int(seq), state, int(since)}, '|')
    if state == 'm' then fence(s, id, entry) else redis.call('HSET', s.dev, id, entry) end
    if state == '0' then
      offline(g, s, id, since, totals)
    else
      online(g, s, id, since, totals)
    end
  end
end
for g, s in pairs(groups) do
  finish(g, s)
  if s.open and s.dirty then
    local affected, recovered = figures(s)
    redis.call('HSET', states, g, table.concat({int(s.from), int(affected), int(recovered), s.m}, '|'))
  end
  -- Fences no late copy of a note can reach any more.
  local old = redis.call('ZRANGEBYSCORE', s.fence, '-inf', now - FENCE_LEASES * lease, 'LIMIT', 0, PRUNE)
  for _, id in ipairs(old) do
    local e = redis.call('HGET', s.dev, id)
    if e and string.match(e, '^%d+|[xm]|') then redis.call('HDEL', s.dev, id) end
    redis.call('ZREM', s.fence, id)
  end
end
log_events(KEYS[4], ARGV[8], out, now)
return out
