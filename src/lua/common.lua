-- Shared helpers, prepended to every script.
-- A device record (hash field = device id) is "state|seq|since|last_seen|detected_at" plus,
-- for a device with a group, "|group" (last: a group name may hold '|'); state "1" online,
-- "0" offline, times in ms since the epoch. Two optional prefixes come first: "w|" when its
-- last transition was taken by the device's will ("w<session>|" for a will that named its
-- session), and before that "p<penalty>,<at>,<until>|",
-- its flap state (see flap_next). A record never begins with 'p' or 'w' otherwise, so records
-- written before those prefixes existed read the same.
-- An outbox member is "seq|state|since|status_last_seen|detected_at|id" (id last: it may hold
-- '|'), prefixed by "f<flags>|" when the status has flags ('p' flapping, 'w' reason will),
-- then by "l<length>|group|" for the group an offline device left by coming back online in
-- another, then by "g<length>|group|" for a device with a group.
-- Seq 0 ("before the first status") is a forgotten device's clear: an empty retained message.
-- Every time a script decides with or writes is this master's clock (TIME): replicas' clocks
-- may disagree, the master of a device's bucket is one clock for all of them.
-- Returns state, seq, since, last_seen, detected_at, group ('' for none), flap (nil for
-- none), will ('1' if a will took the device offline), the session that will named ('' for
-- none), or nil.
local function parse(rec)
  if not rec then return nil end
  local flap, will, will_session = nil, '', ''
  local f, body = string.match(rec, '^p([^|]*)|(.*)$')
  if f then flap, rec = f, body end
  local ws, rest_w = string.match(rec, '^w(%d*)|(.*)$')
  if ws then will, will_session, rec = '1', ws, rest_w end
  local state, seq, since, last, det, rest = string.match(rec, '^([01])|(%d+)|(%d+)|(%d+)|(%d+)(.*)$')
  if not state then return nil end
  if rest ~= '' then
    if string.sub(rest, 1, 1) ~= '|' then return nil end
    rest = string.sub(rest, 2)
  end
  return state, seq, since, last, det, rest, flap, will, will_session
end
local function make_record(state, seq, since, last, det, group, flap, will, will_session)
  local r = table.concat({state, seq, since, last, det}, '|')
  if group ~= nil and group ~= '' then r = r .. '|' .. group end
  if will == '1' then r = 'w' .. (will_session or '') .. '|' .. r end
  if flap ~= nil and flap ~= '' then r = 'p' .. flap .. '|' .. r end
  return r
end
-- `left`: the group an offline device left by coming back online in another one (its old
-- group's outage counts it recovered), prefixed as "l<len>|<group>|" after the group's.
-- `flags`: '' or some of 'p' (flapping as of this transition) and 'w' (its reason is a will).
local function outbox_member(seq, state, since, seen, det, id, group, left, flags)
  local m = table.concat({seq, state, since, seen, det, id}, '|')
  if flags ~= nil and flags ~= '' then m = 'f' .. flags .. '|' .. m end
  if left ~= nil and left ~= '' and left ~= group then
    m = 'l' .. #left .. '|' .. left .. '|' .. m
  end
  if group ~= nil and group ~= '' then m = 'g' .. #group .. '|' .. group .. '|' .. m end
  return m
end
-- Flapping (route-flap damping, RFC 2439): every transition adds 1 to a device's penalty,
-- which halves every half-life (continuously); the device is flapping from the transition
-- whose penalty reaches the threshold until the penalty decays below half of it. The flap
-- state "penalty,at,until" is the penalty as of `at` (its latest transition) and `until`,
-- the moment it stops flapping (0: it is not). Flapping only labels: it decides nothing.
-- The rule (threshold, half-life ms) comes as one argument "threshold|half_life".
local function flap_rule(arg)
  local thr, half = string.match(arg, '^(%d+)|(%d+)$')
  return tonumber(thr), tonumber(half)
end
local function flap_until(flap)
  if not flap then return 0 end
  return tonumber(string.match(flap, ',(%d+)$')) or 0
end
-- Whether a record's flap state says flapping at `t`.
local function flapping_at(flap, t)
  local u = flap_until(flap)
  return u > 0 and t <= u
end
-- The flap state after a transition at `now`, and whether the device is flapping as of it.
local function flap_next(flap, now, thr, half)
  local pen, at = 0, now
  if flap then
    local p, a = string.match(flap, '^([%d.]+),(%d+),')
    if p then pen, at = tonumber(p), tonumber(a) end
  end
  local dt = now - at
  if dt < 0 then dt = 0 end
  local p = pen * math.pow(0.5, dt / half) + 1
  local flapping = p >= thr or flapping_at(flap, now)
  local u = 0
  if flapping then
    u = math.floor(now + half * math.log(2 * p / thr) / math.log(2))
    if u < now then u = now end
  end
  return string.format('%.4f,%d,%d', p, now, u), flapping
end
-- The flags of a status from its record's flap state and will mark.
local function status_flags(flap, will)
  local f = ''
  if flap_until(flap) > 0 then f = 'p' end
  if will == '1' then f = f .. 'w' end
  return f
end
-- Keeps a device's entries in the flap indexes (KEYS `until_key`: zset id -> until, for the
-- fleet-wide count; `lex_key`: zset of the same ids at score 0, for listing) in step with
-- its flap state, and drops up to 100 entries whose flapping ended (each was added by one
-- transition, so this keeps up with them).
local function flap_index(until_key, lex_key, id, u, now)
  if u > 0 then
    redis.call('ZADD', until_key, u, id)
    redis.call('ZADD', lex_key, 0, id)
  end
  local ended = redis.call('ZRANGEBYSCORE', until_key, '-inf', '(' .. now, 'LIMIT', 0, 100)
  if #ended > 0 then
    redis.call('ZREM', until_key, unpack(ended))
    redis.call('ZREM', lex_key, unpack(ended))
  end
end
-- The device id of an outbox member (nil if it is not a device status).
local function member_id(m)
  for _, p in ipairs({'g', 'l'}) do
    local len = string.match(m, '^' .. p .. '(%d+)|')
    if len then m = string.sub(m, #len + 4 + tonumber(len)) end
  end
  m = string.gsub(m, '^f[pw]*|', '')
  return string.match(m, '^%d+|[01]|%d+|%d+|%d+|(.*)$')
end
-- Per-bucket device counts per group: hash field "<state>|<group>" -> devices of that group
-- in this bucket in that state (fleet-wide counts are the sum over the buckets). A field that
-- reaches 0 is removed, so that a group without devices leaves no trace.
local function count(key, state, group, delta)
  if group == nil or group == '' then return end
  local field = state .. '|' .. group
  if redis.call('HINCRBY', key, field, delta) <= 0 then redis.call('HDEL', key, field) end
end
local function int(n) return string.format('%d', n) end
-- The lowest floor among the other replicas (not `me`, whose own unapplied heartbeats the
-- caller accounts for) that renewed theirs within `lease` ms (nil: none): every heartbeat
-- they received before it is applied. Floors of replicas gone for long (stopped without
-- leaving) are removed.
local function lowest_floor(key, lease, now, me)
  local low
  local floors = redis.call('HGETALL', key)
  for i = 1, #floors, 2 do
    local f, at = string.match(floors[i + 1], '^(%d+)|(%d+)$')
    if floors[i] == me then
      -- ours
    elseif f and tonumber(at) + lease > now then
      if not low or tonumber(f) < low then low = tonumber(f) end
    elseif not f or tonumber(at) + 100 * lease < now then
      redis.call('HDEL', key, floors[i])
    end
  end
  return low
end
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- A group's state (group states hash, field = group name): "from|affected|recovered|member"
-- where member is its latest outage status as staged in the outbox (see note.lua), `from`
-- the start of the window that opened the current outage, affected and recovered its live
-- figures. Returns from, affected, recovered, member (nil for a group never in an outage).
local function parse_group_state(raw)
  return string.match(raw, '^(%d+)|(%d+)|(%d+)|(.*)$')
end
local function group_state(key, group)
  local raw = redis.call('HGET', key, group)
  if not raw then return nil end
  return parse_group_state(raw)
end
local function group_current(key, group)
  local _, _, _, m = group_state(key, group)
  return m
end
-- The seq and the state flag ('1' outage, '0' ok) of a group status member.
local function group_fields(m)
  local len = string.match(m, '^o(%d+)|')
  local rest = string.sub(m, #len + 4 + tonumber(len))
  local seq, flag = string.match(rest, '^(%d+)|([01])|')
  return tonumber(seq), flag
end
local function group_seq(m)
  local seq = group_fields(m)
  return seq
end
-- The event log behind /events: one stream per bucket, appended to in the step that commits
-- each transition (so an event is in the log exactly when its transition is committed), field
-- "m" the outbox member. Every entry names the one before it ("p", the stream's last id before
-- it was added), so that a reader can tell a contiguous read from one with a hole (entries
-- trimmed away, or a Redis that lost its data). `rule` is "retention ms|most entries".
local function stream_last(key)
  if redis.call('EXISTS', key) == 0 then return '0-0' end
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return info[i + 1] end
  end
  return '0-0'
end
local function log_events(key, rule, members, now)
  if #members == 0 then return end
  local keep, cap = string.match(rule, '^(%d+)|(%d+)$')
  local prev = stream_last(key)
  for _, m in ipairs(members) do
    prev = redis.call('XADD', key, 'MAXLEN', '~', cap, '*', 'p', prev, 'm', m)
  end
  -- Exact by age (what aged out since the last call: a few entries), so that a resume from
  -- past the retention is told `gap`; approximate by length (whole nodes, cheap).
  redis.call('XTRIM', key, 'MINID', string.format('%d', now - tonumber(keep)))
end
