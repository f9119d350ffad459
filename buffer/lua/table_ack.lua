-- tbrm replay table: acknowledge leased items after the learner's optimizer step (body after the prelude).
-- KEYS: the table keys.  ARGV[9] lease id, [10] '*' for every item of the lease, else a JSON list of item ids.
-- Expired leases are reclaimed first, so acking an expired lease acks nothing (its items were returned).
-- See ack_lease in the prelude. Returns the number of items acked.
reclaim(now_s())
local ids = nil
if ARGV[10] ~= '*' then ids = cjson.decode(ARGV[10]) end
return ack_lease(ARGV[9], ids)
