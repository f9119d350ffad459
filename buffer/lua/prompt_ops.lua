-- tbrm prompt queue: claim bookkeeping and epoch refills.
if redis.replicate_commands then redis.replicate_commands() end
-- KEYS: same five keys as prompt_pop.lua (data, queue, claims, claim_exp, meta).
-- ARGV[1] operation:
--   'done'      [2] consumer, [3..] prompt ids: drop the oldest claim of each (finished); returns how many
--   'give_back' [2] consumer, [3..] prompt_id, epoch pairs: return those claimed tokens to the queue head
--   'renew'     [2] consumer, [3] lease seconds, [4..] prompt ids: move the expiry of those claims (still held)
--               to now + lease; returns how many were renewed
--   'refill_claim' [2] expected current epoch, [3] lock seconds -> 1 if the caller should push the next epoch
--   'refill'    [2] expected current epoch, [3..] tokens of the next epoch: pushed only if the queue's epoch
--               still equals [2] (several actors may race to refill; exactly one wins); returns 1/0
local op = ARGV[1]
local function drop_token(field, pick)
  local cur = redis.call('HGET', KEYS[3], field)
  if not cur then return nil end
  local list = cjson.decode(cur)
  local tok = nil
  local keep = {}
  for _, x in ipairs(list) do
    if tok == nil and pick(x) then tok = x else keep[#keep + 1] = x end
  end
  if #keep == 0 then
    redis.call('HDEL', KEYS[3], field)
    redis.call('ZREM', KEYS[4], field)
  else
    redis.call('HSET', KEYS[3], field, cjson.encode(keep))
  end
  return tok
end
if op == 'done' then
  local n = 0
  for i = 3, #ARGV do
    if drop_token(ARGV[2] .. '\31' .. ARGV[i], function(_) return true end) then n = n + 1 end
  end
  redis.call('HINCRBY', KEYS[5], 'done', n)
  return n
elseif op == 'give_back' then
  local n = 0
  for i = 3, #ARGV, 2 do
    local prefix = ARGV[i + 1] .. ':'
    local tok = drop_token(ARGV[2] .. '\31' .. ARGV[i],
      function(x) return string.sub(x, 1, #prefix) == prefix end)
    if tok then redis.call('LPUSH', KEYS[2], tok); n = n + 1 end
  end
  return n
elseif op == 'renew' then
  local t = redis.call('TIME')
  local exp = string.format('%.17g', tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[3]))
  local n = 0
  for i = 4, #ARGV do
    local field = ARGV[2] .. '\31' .. ARGV[i]
    if redis.call('HEXISTS', KEYS[3], field) == 1 then
      redis.call('ZADD', KEYS[4], exp, field)
      n = n + 1
    end
  end
  return n
elseif op == 'refill_claim' then
  -- [2] expected current epoch, [3] lock seconds: 1 if the caller should push the next epoch, else 0 (the epoch
  -- moved on already, or another consumer holds an unexpired claim for it)
  if tonumber(redis.call('HGET', KEYS[5], 'epoch') or '-1') ~= tonumber(ARGV[2]) then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local cur = redis.call('HGET', KEYS[5], 'refilling')
  if cur then
    local e, exp = string.match(cur, '^(%-?%d+)|(.+)$')
    if tonumber(e) == tonumber(ARGV[2]) and tonumber(exp) > now then return 0 end
  end
  redis.call('HSET', KEYS[5], 'refilling', ARGV[2] .. '|' .. string.format('%.17g', now + tonumber(ARGV[3])))
  return 1
elseif op == 'refill' then
  if tonumber(redis.call('HGET', KEYS[5], 'epoch') or '-1') ~= tonumber(ARGV[2]) then return 0 end
  for i = 3, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  redis.call('HSET', KEYS[5], 'epoch', tonumber(ARGV[2]) + 1)
  return 1
end
return redis.error_reply('unknown operation ' .. tostring(op))
