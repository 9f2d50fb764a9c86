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
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
