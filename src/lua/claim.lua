-- Claims outbox entries of one bucket whose lease ran out (their publisher died or is
-- stuck): extends their lease to this caller and returns them, at most `limit`.
-- KEYS: 1 outbox zset
-- ARGV: 1 lease (ms), 2 limit, 3 the latest lease end to claim ('' for now; at a start: the
--       time this process could first have leased anything plus the lease, so that whatever
--       a previous run left is taken at once, and nothing leased since)
local lease = tonumber(ARGV[1])
local now = redis_now()
local upto = now
if ARGV[3] ~= '' then upto = tonumber(ARGV[3]) end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', upto, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], now + lease, m) end
return due
