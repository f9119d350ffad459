-- tbrm replay table: register a batch of items (body; the prelude table_common.lua comes first).
-- Runs inside MULTI/EXEC right after the client's `HSET items id payload` of the same batch.
-- KEYS: the table keys (see the prelude).  ARGV[9] = n (<= max_size; the client chunks), ARGV[10] a msgpack array of
--   5 values per item: item_id, policy_version, reward, actor_id, priority ('' = none given: the largest priority ever
--   set, 1 at first), [11] the insert call's id ('' or absent: none, the call skips the line of blocked inserters, see
--   wait_line in the prelude), [12] how many items the call still wants to insert, these n included
-- An item is a duplicate when its id is stored, was removed not longer than remember_removed_ids removals ago
-- (consumed, evicted, dropped), or appeared earlier in the batch: duplicates are skipped, so a retried insert never
-- brings back a trajectory. The rate limiter may admit only the first k new items; the payloads of new items not
-- admitted, and of remembered removed ones, are deleted again (only ids not stored: a repeated id in the batch
-- never deletes the admitted copy), so nothing half-inserted stays behind. When the table would exceed max_size
-- the fifo remover first evicts the oldest items (lowest insertion sequence; leased or not).
-- Returns {status, flags}: status 'ok', 'paused' or 'rate'; flags one character per item: 'N' new (stored now),
-- 'D' duplicate, 'P' pending (new but not admitted: retry it).
local now = now_s()
reclaim(now)
local n = tonumber(ARGV[9])
local rows = cmsgpack.unpack(ARGV[10])
local ids = {}
for k = 1, n do ids[k] = rows[(k - 1) * 5 + 1] end
local stored = bulk_get('ZMSCORE', K.order, ids)
local gone = {}
if REMEMBER > 0 then gone = bulk_get('ZMSCORE', K.gone, ids) end
local cand, seen, flags = {}, {}, {}
for k = 1, n do
  if stored[k] or gone[k] or seen[ids[k]] then
    flags[k] = 'D'
  else
    seen[ids[k]] = true
    cand[#cand + 1] = k
  end
end
local who, wanting = ARGV[11] or '', tonumber(ARGV[12] or n)
local status, allowed, first = 'ok', 0, nil
if #cand > 0 then
  status, allowed, first = insert_allowance(#cand, who, now)
elseif who ~= '' and SPI then  -- only duplicates: nothing to hold back, but the call may be waiting in line
  first = waiting_since(who)
end
local fresh, undo = {}, {}
for j, k in ipairs(cand) do
  if j <= allowed then fresh[#fresh + 1] = k; flags[k] = 'N' else flags[k] = 'P'; undo[#undo + 1] = ids[k] end
end
for k = 1, n do
  if gone[k] and not stored[k] then undo[#undo + 1] = ids[k] end
end
wait_in_line(who, first, wanting - n + #cand - allowed, status == 'rate', now)
bulk('HDEL', K.items, undo)

local m = #fresh
if m > 0 then
  local evict = redis.call('ZCARD', K.order) + m - MAXSIZE
  if evict > 0 then remove_items(redis.call('ZRANGE', K.order, 0, evict - 1), 'removed') end
  local seq0 = redis.call('HINCRBY', K.counters, 'seq', m) - m
  local order, byver, meta, prio, given = {}, {}, {}, {}, {}
  local head = '\0' .. struct.pack('<d', now)  -- the `meta` entry: see buffer.keys
  local pmax = nil
  for j, k in ipairs(fresh) do
    local b = (k - 1) * 5
    local id = rows[b + 1]
    order[#order + 1] = seq0 + j; order[#order + 1] = id
    byver[#byver + 1] = rows[b + 2]; byver[#byver + 1] = id
    meta[#meta + 1] = id
    meta[#meta + 1] = head .. struct.pack('<d', rows[b + 2]) .. rows[b + 3] .. '|' .. rows[b + 4]
    local p = rows[b + 5]
    if p ~= '' then
      given[#given + 1] = tonumber(p)
    elseif PRIO then  -- no explicit priority: the largest ever set, so the new item is likely seen soon
      pmax = pmax or fmt(max_priority())
      p = pmax
    end
    if p ~= '' then prio[#prio + 1] = id; prio[#prio + 1] = p end
  end
  bulk('ZADD', K.order, order)
  pool_add(order)
  bulk('ZADD', K.byver, byver)
  bulk('HSET', K.meta, meta)
  bulk('HSET', K.prio, prio)
  raise_max_priority(given)
  if PRIO then
    local slots = redis.call('LPOP', K.slotfree, m) or {}
    if #slots < m then
      local top = redis.call('HINCRBY', K.counters, 'nextslot', m - #slots)
      for s = top - (m - #slots), top - 1 do slots[#slots + 1] = s end
    end
    local sl, leaves = {}, {}
    for j, k in ipairs(fresh) do
      local id = ids[k]
      sl[#sl + 1] = id; sl[#sl + 1] = slots[j]; sl[#sl + 1] = '#' .. slots[j]; sl[#sl + 1] = id
      leaves[j] = leaf_of(prio[2 * j])
    end
    bulk('HSET', K.slot, sl)
    tree_set_many(slots, leaves)
  end
  redis.call('HINCRBY', K.counters, 'inserts', m)
  redis.call('HINCRBYFLOAT', K.counters, 'rl_inserts', m)
end
return {status, table.concat(flags)}
