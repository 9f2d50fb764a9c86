-- Claims outbox entries of one bucket whose lease ran out (their publisher died or is
-- stuck): extends their lease to this caller and returns them, at most `limit`.
-- KEYS: 1 outbox zset
-- ARGV: 1 lease (ms), 2 limit, 3 also claim leases ending this much (ms) after now (at a
--       start: everything a previous run of this replica leased)
local lease = tonumber(ARGV[1])
local now = redis_now()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now + tonumber(ARGV[3]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], now + lease, m) end
return due
