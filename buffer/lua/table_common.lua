-- tbrm replay table: shared prelude of every table script (buffer/table.py prepends it, then the script body).
--
-- KEYS: the table's keys in the order of buffer.keys.TableKeys.FIELDS; the Python side generates the
--       `local K = {...}` mapping line just above this prelude, so K.items == KEYS[2] etc.
-- ARGV (common header, then script-specific arguments from ARGV[9]):
--   [1] sampler kind        [2] priority exponent alpha   [3] samples_per_insert ("" = no ratio limit)
--   [4] error_buffer        [5] min_size_to_sample        [6] max_size     [7] max_times_sampled (0 = unlimited)
--   [8] remember_removed_ids (how many removed ids the `gone` zset keeps; 0 = none)
--
-- Large values never pass through Lua (converting a 16 KB string into Lua costs ~30 us, 25x a native
-- command): payloads are HSET by the client in the same MULTI/EXEC as the insert script, and read back by
-- the client with HMGET after the sample script picked the ids.
-- Needs Redis >= 6.2 (ZMSCORE, ZRANDMEMBER). Time comes from the server (TIME), so clocks of actors and learners on other hosts do not matter.
-- Sum tree (prioritized sampler): capacity C = smallest power of two >= max_size; leaf of slot s is node C+s,
-- node i = node 2i + node 2i+1, root = node 1. An available item's leaf holds p_i^alpha; a leased or free slot 0.

if redis.replicate_commands then redis.replicate_commands() end

local PRIO = ARGV[1] == 'prioritized'
local ALPHA = tonumber(ARGV[2])
local SPI = tonumber(ARGV[3])            -- nil when the ratio limit is off
local EBUF = tonumber(ARGV[4])
local MINSIZE = tonumber(ARGV[5])
local MAXSIZE = tonumber(ARGV[6])
local MAXTS = tonumber(ARGV[7])
local REMEMBER = tonumber(ARGV[8])
-- Times acked are stored only where an item can be acked and stay (max_times_sampled 0 or > 1); at 1 the ack
-- removes it, so a stored item's count is always 0.
local KEEP_ACKED = MAXTS ~= 1

local CAP = 1
while CAP < MAXSIZE do CAP = CAP * 2 end

local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function fmt(x) return string.format('%.17g', x) end

local function tree_get(node)
  return tonumber(redis.call('HGET', K.tree, node) or '0') or 0
end

-- Batched commands: one redis.call per (key, chunk) instead of one per item (the per-call overhead of
-- redis.call dominated batches of 32+ items). Chunks stay far below Lua's unpack limit.
local CHUNK = 2000
local function bulk(cmd, key, args)
  for i = 1, #args, CHUNK do
    redis.call(cmd, key, unpack(args, i, math.min(i + CHUNK - 1, #args)))
  end
end
local function bulk_get(cmd, key, ids)
  if #ids == 0 then return {} end
  if #ids <= CHUNK then return redis.call(cmd, key, unpack(ids)) end
  local out = {}
  for i = 1, #ids, CHUNK do
    local r = redis.call(cmd, key, unpack(ids, i, math.min(i + CHUNK - 1, #ids)))
    for j = 1, #r do out[#out + 1] = r[j] end
  end
  return out
end

-- The pool of available items (stored and not out on a lease). fifo and lifo need its order: the `avail` zset,
-- scored by insertion sequence. uniform and prioritized do not: the `avail_set` set, whose adds and removes skip the
-- skiplist and the scores (making a 32-item lease available again no longer reads 32 scores and inserts 32
-- skiplist nodes). A table created before the set existed keeps its zset until it empties (every item leased or
-- removed: Redis deletes an empty zset), then goes on with the set.
local ORDERED = ARGV[1] == 'fifo' or ARGV[1] == 'lifo' or redis.call('EXISTS', K.avail) == 1
local POOL = ORDERED and K.avail or K.avail_set

local function pool_size() return redis.call(ORDERED and 'ZCARD' or 'SCARD', POOL) end

local function pool_remove(ids) bulk(ORDERED and 'ZREM' or 'SREM', POOL, ids) end

-- Add items given as (insertion sequence, id) pairs (a set keeps the ids only).
local function pool_add(pairs_)
  if ORDERED then return bulk('ZADD', POOL, pairs_) end
  local ids = {}
  for j = 2, #pairs_, 2 do ids[#ids + 1] = pairs_[j] end
  bulk('SADD', POOL, ids)
end

-- Whether each of `ids` is in the pool (a list of booleans).
local function pool_has(ids)
  local got = bulk_get(ORDERED and 'ZMSCORE' or 'SMISMEMBER', POOL, ids)
  local out = {}
  for i = 1, #ids do out[i] = (got[i] or 0) ~= 0 end
  return out
end

-- Set the leaves of `slots` to `values` and recompute the sums above them level by level: one HSET of the
-- leaves, then per tree level one HMGET of the children and one HSET of the parents touched (a batch of B
-- leaves costs ~2 log2(C) commands instead of 2 B log2(C)). Parents are recomputed from their children, so
-- round-off never accumulates.
local function tree_set_many(slots, values)
  if #slots == 0 then return end
  local kv, level, seen = {}, {}, {}
  for i, s in ipairs(slots) do
    local node = CAP + tonumber(s)
    kv[#kv + 1] = node; kv[#kv + 1] = fmt(values[i])
    local p = math.floor(node / 2)
    if p >= 1 and not seen[p] then seen[p] = true; level[#level + 1] = p end
  end
  bulk('HSET', K.tree, kv)
  while #level > 0 do
    local kids = {}
    for _, p in ipairs(level) do kids[#kids + 1] = 2 * p; kids[#kids + 1] = 2 * p + 1 end
    local sums = bulk_get('HMGET', K.tree, kids)
    local out, up = {}, {}
    seen = {}
    for j, p in ipairs(level) do
      out[#out + 1] = p
      out[#out + 1] = fmt((tonumber(sums[2 * j - 1] or '0') or 0) + (tonumber(sums[2 * j] or '0') or 0))
      local q = math.floor(p / 2)
      if q >= 1 and not seen[q] then seen[q] = true; up[#up + 1] = q end
    end
    bulk('HSET', K.tree, out)
    level = up
  end
end

local function tree_set(slot, value) tree_set_many({slot}, {value}) end

-- Sum-tree leaf value of a stored priority string (missing = 1).
local function leaf_of(p)
  p = tonumber(p or '1') or 1
  if p <= 0 then return 0 end
  return p ^ ALPHA
end

local function leaf_value(id) return leaf_of(redis.call('HGET', K.prio, id)) end

-- Leaves of `ids` (those holding a slot) set to their priority's value, or to 0 when `zero`.
local function set_leaves(ids, zero)
  if not PRIO or #ids == 0 then return end
  local slots = bulk_get('HMGET', K.slot, ids)
  local ps = {}
  if not zero then ps = bulk_get('HMGET', K.prio, ids) end
  local s2, v2 = {}, {}
  for i = 1, #ids do
    if slots[i] then
      s2[#s2 + 1] = slots[i]
      if zero then v2[#v2 + 1] = 0 else v2[#v2 + 1] = leaf_of(ps[i]) end
    end
  end
  tree_set_many(s2, v2)
end

local function set_leaf_of(id, value)
  if not PRIO then return end
  local slot = redis.call('HGET', K.slot, id)
  if slot then tree_set(tonumber(slot), value) end
end

-- Largest priority ever set (explicitly at insert or by update_priorities); new items without an explicit
-- priority enter with it, so each is likely to be seen soon (prioritized experience replay).
local function max_priority()
  return tonumber(redis.call('HGET', K.counters, 'maxprio') or '1') or 1
end
local function raise_max_priority(ps)
  if #ps == 0 then return end
  local cur = tonumber(redis.call('HGET', K.counters, 'maxprio') or '-1') or -1
  local m = cur
  for _, p in ipairs(ps) do if p > m then m = p end end
  if m > cur then redis.call('HSET', K.counters, 'maxprio', fmt(m)) end
end

-- Put items back into the pool (after a lease expires or an ack below max_times_sampled). `ids` are items a lease
-- held, so they are stored: removing an item deletes its `lease_of` entry.
local function make_available(ids)
  if #ids == 0 then return end
  if not ORDERED then
    bulk('SADD', POOL, ids)
    set_leaves(ids, false)
    return
  end
  local seqs = bulk_get('ZMSCORE', K.order, ids)
  local pairs_ = {}
  for i, id in ipairs(ids) do
    if seqs[i] then pairs_[#pairs_ + 1] = seqs[i]; pairs_[#pairs_ + 1] = id end
  end
  pool_add(pairs_)
  set_leaves(ids, false)
end

-- Removed ids are remembered (zset id -> removal sequence number), the newest REMEMBER of them, so a retried insert of a
-- consumed, evicted or dropped trajectory is recognised as a duplicate instead of being trained again.
local function remember_gone(ids)
  if REMEMBER <= 0 then return end
  local seq0, kv = redis.call('HINCRBY', K.counters, 'gone_seq', #ids) - #ids, {}
  for i, id in ipairs(ids) do kv[#kv + 1] = seq0 + i; kv[#kv + 1] = id end
  bulk('ZADD', K.gone, kv)
  redis.call('ZREMRANGEBYRANK', K.gone, 0, -REMEMBER - 1)  -- all but the newest REMEMBER (none if fewer)
end

-- Remove items everywhere; `reason` is the counter to bump. For the rate limiter an item that leaves the
-- table counts as max(0, samples_per_insert - times_handed_out) samples: the samples it will never get, so
-- evictions, staleness drops and max_times_sampled < samples_per_insert cannot deadlock the two sides.
-- `released`: the ids were just taken off their lease (not available, no lease_of entry left to delete).
local function remove_items(ids, reason, released)
  if #ids == 0 then return end
  local handed = bulk_get('HMGET', K.handed, ids)
  local credit, unsampled = 0, 0
  for i = 1, #ids do
    local h = tonumber(handed[i] or '0') or 0
    if h == 0 then unsampled = unsampled + 1 end
    if SPI and SPI > h then credit = credit + SPI - h end
  end
  if credit > 0 then redis.call('HINCRBYFLOAT', K.counters, 'rl_samples', fmt(credit)) end
  if unsampled > 0 then redis.call('HINCRBY', K.counters, 'removed_unsampled', unsampled) end
  if PRIO then
    local slots = bulk_get('HMGET', K.slot, ids)
    local dels, free, zeros = {}, {}, {}
    for i, id in ipairs(ids) do
      if slots[i] then
        dels[#dels + 1] = id
        dels[#dels + 1] = '#' .. slots[i]
        free[#free + 1] = slots[i]
        zeros[#zeros + 1] = 0
      end
    end
    tree_set_many(free, zeros)
    bulk('HDEL', K.slot, dels)
    bulk('RPUSH', K.slotfree, free)
  end
  local hashes = {K.items, K.meta}
  for _, key in ipairs({K.prio, K.refs}) do  -- often empty: a length check is cheaper than deleting B fields
    if redis.call('HLEN', key) > 0 then hashes[#hashes + 1] = key end
  end
  if unsampled < #ids then  -- handed, acked and lease_of hold only items handed out at least once
    hashes[#hashes + 1] = K.handed
    if KEEP_ACKED then hashes[#hashes + 1] = K.acked end
    if not released then hashes[#hashes + 1] = K.lease_of end
  end
  for _, key in ipairs(hashes) do bulk('HDEL', key, ids) end
  for _, key in ipairs({K.order, K.byver}) do bulk('ZREM', key, ids) end
  if not released then  -- from both pools: clients of two versions sharing the table may have used both
    bulk('ZREM', K.avail, ids)
    bulk('SREM', K.avail_set, ids)
  end
  redis.call('HINCRBY', K.counters, reason, #ids)
  remember_gone(ids)
end

-- A stored list of a lease (below): msgpack (packing 32 floats costs a fifth of JSON's); JSON as written by
-- earlier versions, whose leases may still be out.
local function lease_list(s)
  if string.byte(s, 1) == 91 then return cjson.decode(s) end  -- '['
  return cmsgpack.unpack(s)
end

-- Ids of `ids` currently held by `lease`.
local function held_by(lease, ids)
  local owners = bulk_get('HMGET', K.lease_of, ids)
  local held, seen = {}, {}
  for i, id in ipairs(ids) do
    if owners[i] == lease and not seen[id] then held[#held + 1] = id; seen[id] = true end
  end
  return held
end

-- A lease is `leases[lease]` (msgpack list of its item ids), `leases[lease .. '\31p']` (msgpack list of the
-- probabilities they were drawn with, for replaying a retried sample) and its expiry in `lease_exp`.
local function drop_lease(lease)
  redis.call('HDEL', K.leases, lease, lease .. '\31p')
  redis.call('ZREM', K.lease_exp, lease)
end

-- Return the items of every expired lease to the pool (lazy lease expiry; no background thread needed).
local function reclaim(now)
  local expired = redis.call('ZRANGEBYSCORE', K.lease_exp, '-inf', fmt(now))
  local n = 0
  for _, lease in ipairs(expired) do
    local ids = redis.call('HGET', K.leases, lease)
    if ids then
      local held = held_by(lease, lease_list(ids))
      bulk('HDEL', K.lease_of, held)
      make_available(held)
      n = n + #held
    end
    drop_lease(lease)
  end
  if n > 0 then redis.call('HINCRBY', K.counters, 'expired', n) end
  return n
end

-- Reverb's SampleToInsertRatio over cumulative counters I (inserts) and S (samples handed out, plus the
-- removal credits above): diff = I * spi - S, min_diff = spi * min_size - error_buffer,
-- max_diff = spi * min_size + error_buffer. Inserting k items is allowed while I + k <= min_size or
-- diff + k * spi <= max_diff; sampling k items while diff - k >= min_diff.
local function rl_state()
  local c = redis.call('HMGET', K.counters, 'rl_inserts', 'rl_samples')
  local I = tonumber(c[1] or '0') or 0
  local S = tonumber(c[2] or '0') or 0
  return I, S
end

-- Blocked inserters wait in line, so one polling fast cannot take every slot the sampler frees from one that has
-- waited long. The `waiters` zset holds each insert call the rate limiter refused (the client's call id), scored by
-- when it was first refused; `waiter_info` when it was last seen and how many items it still wants. An insert may
-- use only the room left after the items wanted by the calls ahead of it (every waiting call, if it has not been
-- refused yet). A call not seen for WAIT_TTL_S leaves the line (clients poll every 20 ms at most while they wait),
-- so a dead inserter holds the others back that long at most. A call without an id (clients of earlier versions)
-- skips the line. The line is read from its head only until the calls read want all the room, so a poll costs
-- O(room + expired calls), not O(calls waiting).
local WAIT_TTL_S = 1

-- When call `who` was first refused (false: not in line).
local function waiting_since(who) return redis.call('ZSCORE', K.waiters, who) end

local function leave_line(calls)
  bulk('ZREM', K.waiters, calls)
  bulk('HDEL', K.waiter_info, calls)
end

-- The items wanted by live calls ahead of `who`, counted until they reach `free` (at least one call: whether anyone
-- is ahead), and when `who` was first refused (false: not waiting). Expired calls met on the way leave the line.
local function wait_line(who, free, now)
  local mine = waiting_since(who)
  local ahead, start, met = 0, 0, false
  while ahead < math.max(free, 1) and not met do
    local ids = redis.call('ZRANGE', K.waiters, start, start + 15)
    if #ids == 0 then break end
    local info = redis.call('HMGET', K.waiter_info, unpack(ids))
    local gone = {}
    for i, id in ipairs(ids) do
      met = id == who
      if met then break end
      local last, want = 0, 0
      if info[i] then last, want = struct.unpack('<dd', info[i]) end
      if last < now - WAIT_TTL_S then gone[#gone + 1] = id else ahead = ahead + want end
    end
    if #gone > 0 then leave_line(gone) end
    start = start + #ids - #gone
  end
  return ahead, mine
end

-- After an insert attempt of call `who` (first: when it was first refused, false/nil if not waiting): it keeps
-- waiting while items are `left` and it was refused now or before, else it leaves the line.
local function wait_in_line(who, first, left, refused, now)
  if who == '' then return end
  if left > 0 and (first or refused) then
    if not first then redis.call('ZADD', K.waiters, fmt(now), who) end
    redis.call('HSET', K.waiter_info, who, struct.pack('<dd', now, left))
  elseif first then
    leave_line({who})
  end
end

local function fits(I, S, k)
  return I + k <= MINSIZE or (I + k) * SPI - S <= SPI * MINSIZE + EBUF
end

-- The most items the limiter lets in now (the largest k that fits; 0 if none).
local function room(I, S)
  local k = math.max(0, MINSIZE - I, math.floor((SPI * MINSIZE + EBUF + S) / SPI - I))
  while k > 0 and not fits(I, S, k) do k = k - 1 end  -- float round-off either way: one step at most
  while fits(I, S, k + 1) do k = k + 1 end
  return k
end

-- How many of n items insert call `who` ('' = none) may insert now: returns status ('ok' | 'rate' | 'paused'),
-- the allowed count, and when `who` was first refused (false/nil: not waiting; see wait_line).
local function insert_allowance(n, who, now)
  if redis.call('HGET', K.paused, 'inserts') == '1' then return 'paused', 0, nil end
  if not SPI then return 'ok', n, nil end
  local I, S = rl_state()
  local free = room(I, S)
  local ahead, first = 0, nil
  if who ~= '' then ahead, first = wait_line(who, free, now) end
  local allowed = math.min(n, math.max(0, free - ahead))
  -- An empty table can never be sampled, so blocking its inserters could only deadlock (the first in line gets in).
  if allowed == 0 and n > 0 and ahead == 0 and redis.call('ZCARD', K.order) == 0 then allowed = 1 end
  if allowed < n then return 'rate', allowed, first end
  return 'ok', n, first
end

-- Acknowledge `ids` (nil: every item) of `lease`: each acked item's acked += 1; if max_times_sampled > 0 and
-- acked >= max_times_sampled it is removed (counter 'consumed'), else it becomes sampleable again.
-- Returns how many items the lease still held and were acked (0 for an unknown, finished or expired lease).
local function ack_lease(lease, ids)
  local stored = redis.call('HGET', K.leases, lease)
  if not stored then return 0 end
  local all = lease_list(stored)
  local held = held_by(lease, ids or all)
  bulk('HDEL', K.lease_of, held)
  if MAXTS == 1 then  -- every acked item is used up
    remove_items(held, 'consumed', true)
  else
    local acked = bulk_get('HMGET', K.acked, held)
    local gone, keep, counts = {}, {}, {}
    for i, id in ipairs(held) do
      local a = (tonumber(acked[i] or '0') or 0) + 1
      if MAXTS > 0 and a >= MAXTS then
        gone[#gone + 1] = id
      else
        keep[#keep + 1] = id
        counts[#counts + 1] = id; counts[#counts + 1] = a
      end
    end
    bulk('HSET', K.acked, counts)
    remove_items(gone, 'consumed', true)
    make_available(keep)
  end
  -- The lease's item list stays as drawn (a retried sample replays it); held_by tells which are still out.
  if ids == nil or #held_by(lease, all) == 0 then drop_lease(lease) end
  if #held > 0 then redis.call('HINCRBY', K.counters, 'acks', #held) end
  return #held
end
