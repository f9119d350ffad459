-- tbrm replay table: sample a batch under a lease (body; the prelude table_common.lua comes first).
-- KEYS: the table keys.  ARGV[9] batch size B (the sampler is the header's ARGV[1]), [10] learner_version,
--   [11] max_staleness_versions (-1 = off), [12] lease id (the client's request id), [13] lease seconds, [14] seed,
--   [15] most stale items dropped per call (bounds the work of one call), [16] a lease to renew first ('' = none: the
--   batch the caller trains next, leased by its previous call), [17..] leases to ack in full first (the previous
--   step's: renewal, ack and next sample in one round trip).
-- Order: expired leases return; the lease in [16], if not expired, now expires at now + lease seconds; the leases
-- in [17..] are acked; stale available items (learner_version - policy_version > max) are dropped
-- (counter dropped_stale); then all-or-nothing: B items are leased if the table holds >= min_size_to_sample
-- items, >= B are available and the rate limiter allows B samples. Leased items are not sampleable until acked
-- or expired. Returns {'ok', lease_expires_at, size, available_before, acked, renewed, refs, columns, id_1, ...,
-- id_B} where refs is 1 if the table holds any cached reference (else the client skips fetching them) and columns
-- one msgpack array of 3 x B numbers, column by column: times_handed, priority, probability, then one string of
-- B x 2 little-endian doubles, inserted_at and policy_version per item (the head of its `meta` entry, copied: parsing
-- texts and a ZMSCORE here cost a fifth of the script); one string instead of 5 B replies, as Lua's reply
-- conversion and the client's parsing were a large part of a step. The client HMGETs payloads and cached
-- references outside Lua, and drops an item evicted by a concurrent insert in between. Otherwise
-- {'paused'|'min_size'|'empty'|'rate', size, available, acked, renewed} (acked: items acked via [17..]; renewed:
-- 1 if the lease in [16] was renewed, else 0).
-- A lease id that is still live replays that lease (its items still held, nothing changes): a client retry
-- after a lost reply gets the same batch instead of stranding a second lease.
-- probability: fifo and lifo 1; uniform B / available (inclusion probability of a draw without replacement);
-- prioritized p_i^alpha / sum_j p_j^alpha over the items available at that draw.
local now = now_s()
reclaim(now)
local sampler = ARGV[1]
local B = tonumber(ARGV[9])
local lv = tonumber(ARGV[10])
local max_st = tonumber(ARGV[11])
local lease = ARGV[12]
local lease_s = tonumber(ARGV[13])
math.randomseed(tonumber(ARGV[14]))
local max_drop = tonumber(ARGV[15])
local renewed = 0
if ARGV[16] ~= '' and redis.call('HEXISTS', K.leases, ARGV[16]) == 1 then
  redis.call('ZADD', K.lease_exp, fmt(now + lease_s), ARGV[16])
  renewed = 1
end
local acked = 0
for i = 17, #ARGV do acked = acked + ack_lease(ARGV[i], nil) end

-- inserted_at and policy_version of `ids`, 16 bytes each: the binary head of their `meta` entries (entries written
-- before the head was binary, "inserted_at|reward|actor_id", are converted here, their versions read from byver).
local function meta_heads(ids)
  local metas = bulk_get('HMGET', K.meta, ids)
  local heads, old = {}, {}
  for i, m in ipairs(metas) do
    if m and string.byte(m, 1) == 0 then heads[i] = string.sub(m, 2, 17) else old[#old + 1] = i end
  end
  if #old > 0 then
    local oids = {}
    for j, i in ipairs(old) do oids[j] = ids[i] end
    local vers = bulk_get('ZMSCORE', K.byver, oids)
    for j, i in ipairs(old) do
      local stamp = tonumber(string.match(metas[i] or '', '^([^|]*)')) or 0
      heads[i] = struct.pack('<dd', stamp, tonumber(vers[j]) or 0)
    end
  end
  return table.concat(heads)
end

-- The reply for `ids` drawn with `probs` (see the header).
local function describe(ids, probs, handed, exp, size, navail)
  local res = {'ok', fmt(exp), size, navail, acked, renewed, redis.call('HLEN', K.refs) > 0 and 1 or 0, ''}
  local n = #ids
  if n == 0 then return res end
  local prios = nil  -- a table that never stored a priority has none to report (saves a call per batch)
  if PRIO or redis.call('HLEN', K.prio) > 0 then prios = bulk_get('HMGET', K.prio, ids) end
  local cols = {}
  for i, id in ipairs(ids) do
    cols[i] = tonumber(handed[i]) or 0
    cols[n + i] = prios and tonumber(prios[i] or '1') or 1
    cols[2 * n + i] = probs[i]
    res[8 + i] = id
  end
  cols[3 * n + 1] = meta_heads(ids)
  res[8] = cmsgpack.pack(cols)
  return res
end

local old = redis.call('HGET', K.leases, lease)
if old then
  local all = lease_list(old)
  local allp = lease_list(redis.call('HGET', K.leases, lease .. '\31p') or '[]')
  local held, probs = held_by(lease, all), {}
  local pos = {}
  for i, id in ipairs(all) do pos[id] = i end
  for i, id in ipairs(held) do probs[i] = allp[pos[id]] or 1 end
  local exp = tonumber(redis.call('ZSCORE', K.lease_exp, lease))
  return describe(held, probs, bulk_get('HMGET', K.handed, held), exp, redis.call('ZCARD', K.order),
                  pool_size())
end

if max_st >= 0 then
  -- Oldest versions first, at most max_drop per call: a version jump never makes one call O(N).
  local stale = redis.call('ZRANGEBYSCORE', K.byver, '-inf', '(' .. fmt(lv - max_st), 'LIMIT', 0, max_drop)
  if #stale > 0 then
    local av = pool_has(stale)
    local drop = {}
    for i, id in ipairs(stale) do if av[i] then drop[#drop + 1] = id end end
    remove_items(drop, 'dropped_stale')
  end
end

local size = redis.call('ZCARD', K.order)
local navail = pool_size()
if redis.call('HGET', K.paused, 'sampling') == '1' then return {'paused', size, navail, acked, renewed} end
if size < MINSIZE then return {'min_size', size, navail, acked, renewed} end
if navail < B then return {'empty', size, navail, acked, renewed} end
if SPI then
  local I, S = rl_state()
  if I * SPI - S - B < SPI * MINSIZE - EBUF then return {'rate', size, navail, acked, renewed} end
end

local picked, probs = {}, {}
if sampler == 'fifo' or sampler == 'lifo' then
  local popped = redis.call(sampler == 'fifo' and 'ZPOPMIN' or 'ZPOPMAX', POOL, B)
  for i = 1, #popped, 2 do picked[#picked + 1] = popped[i]; probs[#probs + 1] = 1 end
elseif sampler == 'uniform' or (sampler == 'prioritized' and tree_get(1) <= 0) then
  picked = redis.call(ORDERED and 'ZRANDMEMBER' or 'SRANDMEMBER', POOL, B)  -- B > 0: distinct members
  pool_remove(picked)
  for i = 1, #picked do probs[i] = B / navail end
  set_leaves(picked, true)
else
  for i = 1, B do
    local total = tree_get(1)
    local id = nil
    local leafv = 0
    for _ = 1, 20 do
      local u = math.random() * total
      local node = 1
      while node < CAP do
        local left = tree_get(2 * node)
        if u < left then node = 2 * node else u = u - left; node = 2 * node + 1 end
      end
      leafv = tree_get(node)
      local cand = redis.call('HGET', K.slot, '#' .. (node - CAP))
      if cand and leafv > 0 and pool_has({cand})[1] then id = cand; break end
    end
    if not id then  -- float round-off kept landing on empty leaves: take any available item
      if ORDERED then id = redis.call('ZRANGE', POOL, 0, 0)[1] else id = redis.call('SRANDMEMBER', POOL) end
      leafv = leaf_value(id)
    end
    probs[i] = (total > 0) and (leafv / total) or 0
    picked[i] = id
    pool_remove({id})
    set_leaf_of(id, 0)
  end
end

local exp = now + lease_s
local owner, handed_new = {}, {}
local handed = bulk_get('HMGET', K.handed, picked)
local first = 0
for i, id in ipairs(picked) do
  owner[#owner + 1] = id; owner[#owner + 1] = lease
  handed[i] = (tonumber(handed[i] or '0') or 0) + 1
  if handed[i] == 1 then first = first + 1 end
  handed_new[#handed_new + 1] = id; handed_new[#handed_new + 1] = handed[i]
end
bulk('HSET', K.lease_of, owner)
bulk('HSET', K.handed, handed_new)
redis.call('HSET', K.leases, lease, cmsgpack.pack(picked), lease .. '\31p', cmsgpack.pack(probs))
redis.call('ZADD', K.lease_exp, fmt(exp), lease)
redis.call('HINCRBY', K.counters, 'samples', B)
if first > 0 then redis.call('HINCRBY', K.counters, 'sampled_distinct', first) end
redis.call('HINCRBYFLOAT', K.counters, 'rl_samples', B)
return describe(picked, probs, handed, exp, size, navail)
