-- Reads one bucket's event log (see log_events): {last id written, then per entry its id,
-- the id before it and its member}, at most ARGV[2] entries after ARGV[1].
-- KEYS: 1 event log stream
-- ARGV: 1 position (an id: the entries after it; '-': from the first kept), 2 most entries
--       (0: only the last id)
local from = ARGV[1]
if from ~= '-' then from = '(' .. from end
local out = {stream_last(KEYS[1])}
if ARGV[2] == '0' then return out end
for _, e in ipairs(redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', ARGV[2])) do
  local f, prev, m = e[2], '', ''
  for i = 1, #f, 2 do
    if f[i] == 'p' then prev = f[i + 1] elseif f[i] == 'm' then m = f[i + 1] end
  end
  out[#out + 1] = e[1]
  out[#out + 1] = prev
  out[#out + 1] = m
end
return out
