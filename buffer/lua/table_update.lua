-- tbrm replay table: small maintenance operations (body after the prelude).
-- KEYS: the table keys.  ARGV[9] operation:
--   'prio'    ARGV[10..]: item_id, priority pairs -> store priorities (sum-tree leaf updated unless leased);
--             returns how many items existed
--   'ref'     ARGV[10..]: item_id, encoded reference record pairs -> cached for items that still exist and will
--             be sampled again (a leased item whose ack will be its last, acked + 1 >= max_times_sampled, is
--             skipped: the reference would never be read); returns how many were cached
--   'reclaim' return expired leases' items to the pool; returns the number of items returned
--   'probe'   ARGV[10] n, [11] insert call id, [12] items the call still wants -> {status, allowed}: could n items be
--             inserted now (no side effects but reclaim and the call's place in the line of blocked inserters)
--   'leave'   ARGV[10] insert call id -> the call leaves the line of blocked inserters (it gave up); returns 1 if it
--             was in it
--   'renew'   ARGV[10] lease seconds, ARGV[11..] lease ids -> every lease that has not expired yet now expires at
--             now + lease seconds; returns how many leases were renewed (an expired one was reclaimed first)
--   'release' ARGV[10..] lease ids -> those leases end now, unacked: their items return to the pool at once, as
--             if the leases had expired (counted with the expired ones); returns the number of items returned
local now = now_s()
local op = ARGV[9]
if op == 'reclaim' then return reclaim(now) end
if op == 'probe' then
  reclaim(now)
  local n, who = tonumber(ARGV[10]), ARGV[11] or ''
  local status, allowed, first = insert_allowance(n, who, now)
  wait_in_line(who, first, tonumber(ARGV[12] or n), status == 'rate', now)
  return {status, allowed}
end
if op == 'leave' then
  local was = waiting_since(ARGV[10]) and 1 or 0
  leave_line({ARGV[10]})
  return was
end
if op == 'renew' then
  reclaim(now)
  local exp = fmt(now + tonumber(ARGV[10]))
  local n = 0
  for i = 11, #ARGV do
    if redis.call('HEXISTS', K.leases, ARGV[i]) == 1 then
      redis.call('ZADD', K.lease_exp, exp, ARGV[i])
      n = n + 1
    end
  end
  return n
end
if op == 'release' then
  for i = 10, #ARGV do
    if redis.call('HEXISTS', K.leases, ARGV[i]) == 1 then redis.call('ZADD', K.lease_exp, fmt(now), ARGV[i]) end
  end
  return reclaim(now)
end
if op == 'ref' then
  local ids = {}
  for i = 10, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
  local stored = bulk_get('ZMSCORE', K.order, ids)
  local acked = bulk_get('HMGET', K.acked, ids)
  local owner = bulk_get('HMGET', K.lease_of, ids)
  local kv = {}
  for j, id in ipairs(ids) do
    local last = owner[j] and MAXTS > 0 and (tonumber(acked[j] or '0') or 0) + 1 >= MAXTS
    if stored[j] and not last then kv[#kv + 1] = id; kv[#kv + 1] = ARGV[9 + 2 * j] end
  end
  bulk('HSET', K.refs, kv)
  return #kv / 2
end
if op == 'prio' then
  local ids, ps = {}, {}
  for i = 10, #ARGV, 2 do ids[#ids + 1] = ARGV[i]; ps[#ps + 1] = ARGV[i + 1] end
  local stored = bulk_get('ZMSCORE', K.order, ids)
  local avail = pool_has(ids)
  local kv, live, given = {}, {}, {}
  for i, id in ipairs(ids) do
    if stored[i] then
      kv[#kv + 1] = id; kv[#kv + 1] = ps[i]
      given[#given + 1] = tonumber(ps[i])
      if avail[i] then live[#live + 1] = id end  -- a leased item's leaf stays 0 until it comes back
    end
  end
  bulk('HSET', K.prio, kv)
  raise_max_priority(given)
  set_leaves(live, false)
  return #given
end
return redis.error_reply('unknown operation ' .. tostring(op))
