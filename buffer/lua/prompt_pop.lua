-- tbrm prompt queue: atomically claim up to n prompts for one consumer.
-- KEYS: [1] data (HASH index -> Prompt JSON) [2] queue (LIST of "epoch:index") [3] claims (HASH
--   consumer\x1fprompt_id -> JSON list of tokens) [4] claim_exp (ZSET field -> expiry) [5] meta (HASH)
--   [6] pops (HASH consumer_id -> JSON {req, rounds: {round: {status, epoch, toks}}} of its last request id)
-- ARGV: [1] n  [2] consumer_id  [3] lease seconds  [4] request id ('' = none)  [5] round of that request
-- A pop repeated with the request id of the consumer's last pop (a client retry after a lost reply) claims
-- nothing new: it returns that pop's answer again, limited to the tokens the consumer still holds.
-- First every expired claim goes back to the head of the queue (a crashed actor's prompts are re-served).
-- Returns {status, epoch, token1, json1, token2, json2, ...}: status 'ok', or 'refill' when the current
-- epoch is exhausted but more epochs remain (the client pushes the next shuffled epoch, then pops again),
-- or 'done' (no epochs left; possibly fewer than n prompts returned).
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('%.17g', now))
for _, field in ipairs(expired) do
  local toks = redis.call('HGET', KEYS[3], field)
  if toks then
    local list = cjson.decode(toks)
    for i = #list, 1, -1 do redis.call('LPUSH', KEYS[2], list[i]) end
    redis.call('HINCRBY', KEYS[5], 'reclaimed', #list)
  end
  redis.call('HDEL', KEYS[3], field)
  redis.call('ZREM', KEYS[4], field)
end
local n = tonumber(ARGV[1])
local consumer = ARGV[2]
local exp = string.format('%.17g', now + tonumber(ARGV[3]))
local req = ARGV[4] or ''
local round = tostring(ARGV[5] or '0')
local rec = nil
if req ~= '' then
  local last = redis.call('HGET', KEYS[6], consumer)
  if last then rec = cjson.decode(last) end
  if rec and rec.req ~= req then rec = nil end
  local done = rec and rec.rounds[round]
  if done then
    local res = {done.status, done.epoch}
    for _, tok in ipairs(done.toks) do
      local js = redis.call('HGET', KEYS[1], string.match(tok, ':(.*)$'))
      local held = js and redis.call('HGET', KEYS[3], consumer .. '\31' .. cjson.decode(js).prompt_id)
      if held and string.find(held, '"' .. tok .. '"', 1, true) then
        res[#res + 1] = tok
        res[#res + 1] = js
      end
    end
    return res
  end
end
local epoch = tonumber(redis.call('HGET', KEYS[5], 'epoch') or '0')
local epochs = tonumber(redis.call('HGET', KEYS[5], 'epochs') or '0')
local res = {'ok', epoch}
local got = 0
while got < n do
  local tok = redis.call('LPOP', KEYS[2])
  if not tok then break end
  local idx = string.match(tok, ':(.*)$')
  local js = redis.call('HGET', KEYS[1], idx)
  if js then
    local field = consumer .. '\31' .. cjson.decode(js).prompt_id
    local cur = redis.call('HGET', KEYS[3], field)
    local list = {}
    if cur then list = cjson.decode(cur) end
    list[#list + 1] = tok
    redis.call('HSET', KEYS[3], field, cjson.encode(list))
    redis.call('ZADD', KEYS[4], exp, field)
    res[#res + 1] = tok
    res[#res + 1] = js
    got = got + 1
  end
end
if got < n then
  if epoch + 1 < epochs then res[1] = 'refill' else res[1] = 'done' end
end
if req ~= '' then
  local toks = {}
  for i = 3, #res, 2 do toks[#toks + 1] = res[i] end
  rec = rec or {req = req, rounds = {}}
  rec.rounds[round] = {status = res[1], epoch = epoch, toks = toks}
  redis.call('HSET', KEYS[6], consumer, cjson.encode(rec))
end
return res
