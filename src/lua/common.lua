-- Shared helpers, prepended to every script.
-- A device record (hash field = device id) is "state|seq|since|last_seen|detected_at",
-- state "1" online, "0" offline, times in ms since the epoch.
-- An outbox member is "seq|state|since|status_last_seen|detected_at|id" (id last: it may hold '|').
local function parse(rec)
  if not rec then return nil end
  return string.match(rec, '^([01])|(%d+)|(%d+)|(%d+)|(%d+)$')
end
local function int(n) return string.format('%d', n) end
