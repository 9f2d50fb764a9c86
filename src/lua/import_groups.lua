-- Imports the retained group statuses of the groups whose name falls in this bucket, read
-- back from the broker after Redis lost its data: a group gets its latest status back where
-- it has none or an older one, so that its seq goes on. An outage that was open is open
-- again, its window starting where the caller says; the offline notes of its devices (the
-- rebuild notes them after their import) make up its figures.
-- KEYS: 1 group states hash
-- ARGV: per group 5 values: name, status member, window start, affected, recovered
-- Returns how many groups were written.
local states = KEYS[1]
local n = 0
for i = 1, #ARGV, 5 do
  local g, m = ARGV[i], ARGV[i + 1]
  local cur = group_current(states, g)
  if not cur or group_seq(cur) < group_seq(m) then
    redis.call('HSET', states, g, table.concat({ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], m}, '|'))
    n = n + 1
  end
end
return n
