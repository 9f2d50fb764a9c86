-- Shared helpers, prepended to every script.
-- A device record (hash field = device id) is "state|seq|since|last_seen|detected_at",
-- state "1" online, "0" offline, times in ms since the epoch.
-- An outbox member is "seq|state|since|status_last_seen|detected_at|id" (id last: it may hold '|').
-- Seq 0 ("before the first status") is a forgotten device's clear: an empty retained message.
-- Every time a script decides with or writes is this master's clock (TIME): replicas' clocks
-- may disagree, the master of a device's bucket is one clock for all of them.
local function parse(rec)
  if not rec then return nil end
  return string.match(rec, '^([01])|(%d+)|(%d+)|(%d+)|(%d+)$')
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
