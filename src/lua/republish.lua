-- Republishing every device's status after the broker lost its retained messages, as a job
-- kept in Redis per bucket, so it is done once (not once per replica) and resumes where it
-- stopped if its replica dies; the latest status of the groups whose name falls in the
-- bucket goes with the job's first page.
-- KEYS: 1 records hash, 2 outbox zset, 3 job key ("cursor|lease end|owner|started"),
--       4 group states hash
-- ARGV: 1 'start' or 'page', 2 owner, 3 page size, 4 outbox lease (ms), 5 job lease (ms)
-- start: begins a job unless one began within the last 10 s (replicas that noticed the
--   same loss). Returns 1 if it began one.
-- page: if the bucket has a job that no other replica holds, stages the current status of
--   the next page of devices in the outbox (so a status handed out is published even if this
--   replica dies: any replica claims it) and moves the cursor on; the job ends with the scan.
--   Returns the outbox members.
local recs, outbox, job = KEYS[1], KEYS[2], KEYS[3]
local me, count = ARGV[2], tonumber(ARGV[3])
local lease, job_lease = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = redis_now()
local cur = redis.call('GET', job)
local cursor, held_until, owner, started
if cur then
  cursor, held_until, owner, started = string.match(cur, '^(%d+)|(%d+)|([^|]*)|(%d+)$')
end
if ARGV[1] == 'start' then
  if started and tonumber(started) + 10000 > now then return 0 end
  redis.call('SET', job, table.concat({'0', '0', '', int(now)}, '|'))
  return 1
end
if not cursor then return {} end
if owner ~= me and tonumber(held_until) > now then return {} end
local scan = redis.call('HSCAN', recs, cursor, 'COUNT', count)
local out, args = {}, {}
if cursor == '0' then
  for _, v in ipairs(redis.call('HVALS', KEYS[4])) do
    local _, _, _, member = parse_group_state(v)
    if member then
      redis.call('ZADD', outbox, now + lease, member)
      out[#out + 1] = member
    end
  end
end
local flat = scan[2]
for i = 1, #flat, 2 do
  local state, seq, since, last, det, group, flap, will = parse(flat[i + 1])
  if state then
    local seen = last
    if state == '1' then seen = since end
    local member = outbox_member(seq, state, since, seen, det, flat[i], group, nil, status_flags(flap, will))
    out[#out + 1] = member
    args[#args + 1] = now + lease
    args[#args + 1] = member
  end
end
if #args > 0 then redis.call('ZADD', outbox, unpack(args)) end
if scan[1] == '0' then
  redis.call('DEL', job)
else
  redis.call('SET', job, table.concat({scan[1], int(now + job_lease), me, started}, '|'))
end
return out
