-- tbrm replay table: acknowledge leased items after the learner's optimizer step (body after the prelude).
-- KEYS: the table keys.  ARGV[9] lease id, [10] '*' for every item of the lease, else a JSON list of item ids.
-- Expired leases are reclaimed first, so acking an expired lease acks nothing (its items were returned).
-- Each acked item: acked += 1; if max_times_sampled > 0 and acked >= max_times_sampled it is removed
-- (counter 'consumed'), else it becomes sampleable again. Returns the number of items acked.
local now = now_s()
reclaim(now)
local lease = ARGV[9]
local stored = redis.call('HGET', K.leases, lease)
if not stored then return 0 end
local all = cjson.decode(stored)
local ids = all
if ARGV[10] ~= '*' then ids = cjson.decode(ARGV[10]) end
local held = held_by(lease, ids)
bulk('HDEL', K.lease_of, held)
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
remove_items(gone, 'consumed')
make_available(keep)
-- The lease's item list stays as drawn (a retried sample replays it); held_by tells which are still out.
if #held_by(lease, all) == 0 then drop_lease(lease) end
if #held > 0 then redis.call('HINCRBY', K.counters, 'acks', #held) end
return #held
