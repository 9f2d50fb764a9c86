-- Indexes offline devices of one bucket missing from the offline-since zset (they went
-- offline under a version that did not write it), by their record's `since`, so that they
-- can be forgotten too. Re-reads each record: a device online or gone meanwhile is skipped,
-- and an entry already there (a newer offline period) is kept (NX).
-- KEYS: 1 records hash, 2 offline-since zset
-- ARGV: ids
-- Returns how many were added.
if #ARGV == 0 then return 0 end
local raw = redis.call('HMGET', KEYS[1], unpack(ARGV))
local n = 0
for i, id in ipairs(ARGV) do
  local state, seq, since = parse(raw[i])
  if state == '0' then
    n = n + redis.call('ZADD', KEYS[2], 'NX', since, id)
  end
end
return n
