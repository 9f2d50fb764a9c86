-- Applies a batch of heartbeats of one bucket; returns the outbox members of the
-- transitions it committed, in order.
-- KEYS: 1 records hash, 2 deadlines zset, 3 online index, 4 offline index, 5 outbox zset,
--       6 floors hash (see expire.lua), 7 offline-since zset (forget.lua), 8 group counts
--       hash, 9 flap until zset, 10 flap lex index (see flap_index), 11 epoch key (present
--       exactly when the bucket's state is in Redis), 12 sessions hash (see will.lua),
--       13 event log stream (see log_events)
-- ARGV: 1 TTL key prefix, 2 outbox lease (ms), 3 floor lease (ms), 4 the caller's name in the
--       floors, 5 flap rule ("threshold|half_life ms"), 6 event log rule ("retention
--       ms|most entries"), then per device 9 values:
--   id, first arrival, latest arrival, latest deadline, lapse from, lapse to (0 0: none),
--   timing ('1': queued while the monitor was away, counts as on time; '0': live),
--   group named by the latest heartbeat ('': none named, the device keeps its group),
--   session named by the latest heartbeat that named one ('': none)
-- Rules: the latest heartbeat wins (its deadline replaces the earlier one, by arrival, across
-- replicas); a heartbeat that arrived after the deadline ends an offline period (offline
-- since the deadline, then online); a gap inside the held heartbeats is one such period.
-- A heartbeat that arrived before the will that took its device offline makes no transition
-- (it only proves presence before the will); one at or after it brings the device online.
-- Such a period is only known once no replica can hold an earlier heartbeat that covers it
-- (the deadline is before every live floor); until then the heartbeat counts as on time.
-- Without the epoch key Redis lost the bucket's data (or it was never imported): nothing
-- is written, so that no seq starts over; the caller holds the heartbeats until the rebuild.
if redis.call('EXISTS', KEYS[11]) == 0 then return redis.status_reply('LOST') end
local recs, deadlines, online, offline, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local groups = KEYS[8]
local ttl_prefix, lease = ARGV[1], tonumber(ARGV[2])
local thr, half = flap_rule(ARGV[5])
local now = redis_now()
local floor = lowest_floor(KEYS[6], tonumber(ARGV[3]), now, ARGV[4])
local function settled(t) return not floor or t < floor end
local out = {}
-- A transition's flap state and its status flags (it counts in the device's penalty).
local function flap_step(id, flap)
  local nflap, flapping = flap_next(flap, now, thr, half)
  flap_index(KEYS[9], KEYS[10], id, flap_until(nflap), now)
  if flapping then return nflap, 'p' end
  return nflap, ''
end
local function stage(id, nseq, state, since, seen, group, left, flags)
  local member = outbox_member(nseq, state, int(since), int(seen), int(now), id, group, left, flags)
  redis.call('ZADD', outbox, now + lease, member)
  out[#out + 1] = member
end
for i = 7, #ARGV, 9 do
  local id, first, arrival = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local deadline, lapse_from, lapse_to = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local on_time = ARGV[i + 6] == '1'
  local named, session = ARGV[i + 7], ARGV[i + 8]
  -- Arrivals are the caller's clock shifted to ours (within half a round trip): never later
  -- than now, so that no published time runs ahead of the decision.
  if first > now then first = now end
  if lapse_to > now then lapse_to = now end
  if arrival > now then deadline, arrival = deadline - (arrival - now), now end
  local state, seq, since, last, det, group, flap, will, will_session = parse(redis.call('HGET', recs, id))
  -- The group the device has after this heartbeat: the one it names, if it is the latest.
  local new_group = group or ''
  local latest = not last or arrival > tonumber(last)
  if named ~= '' and latest then new_group = named end
  if session ~= '' and latest and (state or deadline > now) then
    redis.call('HSET', KEYS[12], id, session)
  end
  local online_since = first
  -- Offline by a will: only a heartbeat from at or after the will ends it, and the offline
  -- period lasts until the first such heartbeat (coalesced ones: the latest is one). A
  -- heartbeat of a later session than the will's ends it whenever it arrived: that will
  -- was stale (this heartbeat was held elsewhere when it was applied).
  local before_will = state == '0' and will == '1' and arrival < tonumber(since)
    and not (session ~= '' and will_session ~= '' and tonumber(session) > tonumber(will_session))
  if state == '0' and will == '1' and first < tonumber(since) then online_since = arrival end
  if state == '1' then
    local dl = tonumber(redis.call('ZSCORE', deadlines, id))
    local off_at
    if dl and not on_time and first > dl and settled(dl) then
      off_at = dl
    end
    if lapse_to > 0 and not off_at then
      local from = lapse_from
      if dl and dl > from then from = dl end
      if from < lapse_to and settled(from) then
        off_at = off_at or from
        online_since = lapse_to
      end
    end
    if off_at then
      -- The device was silent past its deadline: that offline period is history to publish.
      if off_at < tonumber(since) then off_at = tonumber(since) end
      seq = int(tonumber(seq) + 1)
      since = int(off_at)
      state = '0'
      local flags
      flap, flags = flap_step(id, flap)
      redis.call('HSET', recs, id, make_record('0', seq, since, last, int(now), group, flap))
      count(groups, '1', group, -1)
      count(groups, '0', group, 1)
      redis.call('ZREM', deadlines, id)
      redis.call('UNLINK', ttl_prefix .. id)
      redis.call('ZREM', online, id)
      redis.call('ZADD', offline, 0, id)
      redis.call('ZADD', KEYS[7], since, id) -- forget index
      stage(id, seq, '0', off_at, last, group, nil, flags)
    elseif arrival > tonumber(last) then
      -- Online, and this is the latest heartbeat: its deadline replaces the earlier one.
      redis.call('ZADD', deadlines, deadline, id)
      redis.call('SET', ttl_prefix .. id, '1', 'PXAT', int(deadline))
      redis.call('HSET', recs, id, make_record(state, seq, since, int(arrival), det, new_group, flap))
      if new_group ~= group then
        count(groups, '1', group, -1)
        count(groups, '1', new_group, 1)
      end
    end
    -- Otherwise an older heartbeat than one already applied (another replica's): no change.
  end
  if state ~= '1' then
    if deadline > now and not before_will then
      -- New or offline: a transition to online.
      local s = online_since
      if since and tonumber(since) > s then s = tonumber(since) end
      local nseq = int((tonumber(seq) or 0) + 1)
      local nflap, flags = flap_step(id, flap)
      redis.call('HSET', recs, id, make_record('1', nseq, int(s), int(arrival), int(now), new_group, nflap))
      if state then count(groups, '0', group, -1) end
      count(groups, '1', new_group, 1)
      redis.call('ZADD', deadlines, deadline, id)
      redis.call('SET', ttl_prefix .. id, '1', 'PXAT', int(deadline))
      redis.call('ZREM', offline, id)
      redis.call('ZADD', online, 0, id)
      redis.call('ZREM', KEYS[7], id) -- forget index
      -- Offline in one group, online in another: the old group's outage counts it back.
      local left = nil
      if state == '0' then left = group end
      stage(id, nseq, '1', s, s, new_group, left, flags)
    elseif state == '0' and arrival > tonumber(last) then
      -- Proves presence only for a time gone by (held while Redis was away): no transition,
      -- but the record knows the latest heartbeat. The device stays offline in the group its
      -- offline status was noted in: its next online status tells that group it is back
      -- (the `left` of its member), wherever it comes back.
      redis.call('HSET', recs, id, make_record('0', seq, since, int(arrival), det, group, flap, will, will_session))
    end
  end
end
log_events(KEYS[13], ARGV[6], out, now)
return out
