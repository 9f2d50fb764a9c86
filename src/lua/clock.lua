-- Reads this master's clock and, for a replica sharing heartbeats with others, records its
-- floor for the bucket: every heartbeat it received before the floor is applied. Expiries on
-- any replica respect the floors of the replicas that renewed them within the floor lease
-- (see expire.lua), so a heartbeat held by one replica is never overtaken by another's sweep.
-- KEYS: 1 floors hash
-- ARGV: 1 replica ('' for none), 2 floor ms, or '-' to remove the replica's floor
-- Returns this master's time in ms.
local now = redis_now()
if ARGV[1] ~= '' then
  if ARGV[2] == '-' then
    redis.call('HDEL', KEYS[1], ARGV[1])
  else
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. int(now))
  end
end
return now
