-- Shared helpers, prepended to every script.
-- A device record (hash field = device id) is "state|seq|since|last_seen|detected_at" plus,
-- for a device with a group, "|group" (last: a group name may hold '|'); state "1" online,
-- "0" offline, times in ms since the epoch.
-- An outbox member is "seq|state|since|status_last_seen|detected_at|id" (id last: it may hold
-- '|'), prefixed by "g<length>|group|" for a device with a group, then by "l<length>|group|"
-- for the group an offline device left by coming back online in another.
-- Seq 0 ("before the first status") is a forgotten device's clear: an empty retained message.
-- Every time a script decides with or writes is this master's clock (TIME): replicas' clocks
-- may disagree, the master of a device's bucket is one clock for all of them.
-- Returns state, seq, since, last_seen, detected_at, group ('' for none), or nil.
local function parse(rec)
  if not rec then return nil end
  local state, seq, since, last, det, rest = string.match(rec, '^([01])|(%d+)|(%d+)|(%d+)|(%d+)(.*)$')
  if not state then return nil end
  if rest ~= '' then
    if string.sub(rest, 1, 1) ~= '|' then return nil end
    rest = string.sub(rest, 2)
  end
  return state, seq, since, last, det, rest
end
local function make_record(state, seq, since, last, det, group)
  local r = table.concat({state, seq, since, last, det}, '|')
  if group ~= nil and group ~= '' then r = r .. '|' .. group end
  return r
end
-- `left`: the group an offline device left by coming back online in another one (its old
-- group's outage counts it recovered), prefixed as "l<len>|<group>|" after the group's.
local function outbox_member(seq, state, since, seen, det, id, group, left)
  local m = table.concat({seq, state, since, seen, det, id}, '|')
  if left ~= nil and left ~= '' and left ~= group then
    m = 'l' .. #left .. '|' .. left .. '|' .. m
  end
  if group ~= nil and group ~= '' then m = 'g' .. #group .. '|' .. group .. '|' .. m end
  return m
end
-- The device id of an outbox member (nil if it is not a device status).
local function member_id(m)
  for _, p in ipairs({'g', 'l'}) do
    local len = string.match(m, '^' .. p .. '(%d+)|')
    if len then m = string.sub(m, #len + 4 + tonumber(len)) end
  end
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
