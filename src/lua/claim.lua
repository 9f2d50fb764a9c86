-- Claims outbox entries of one bucket whose lease ran out (their publisher died or is
-- stuck): extends their lease to this caller and returns them, at most `limit`.
-- KEYS: 1 outbox zset
-- ARGV: 1 now, 2 lease (ms), 3 limit, 4 highest lease end to claim
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], now + lease, m) end
return due
