"""The Lua scripts shared state runs inside Redis: each check-and-change is one atomic step.

Times are Redis's own clock (TIME), so replicas whose clocks differ still count one window.
"""

from __future__ import annotations

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# Calls in sliding windows, counted together or not at all: a request's call is counted in its
# client's rpm window and its upstream key's window in one step. Each window is a sorted set
# of calls by the time they count from, beside a sorted set of calls in flight by the time
# they lapse. A call under way counts from `hold` seconds ahead (it lapses if its process
# dies); once its answer lands it counts from then (a landing, below).
# KEYS: per window its calls and in-flight sets, then per landing the same two.
# ARGV: the number of windows and of landings; per window: seconds, limit (-1: none),
# reserve, member, hold, most in flight (-1: none); per landing: member, seconds since it landed
# (-1: the call was never made: it leaves the window).
# Answers {1, 0, 0} when every window counted the call, else {0, which (1-based), seconds to wait}.
TAKE = _NOW + """
local windows, landings = tonumber(ARGV[1]), tonumber(ARGV[2])
local at = 3 + 6 * windows
for j = 0, landings - 1 do
  local calls, busy = KEYS[2 * windows + 2 * j + 1], KEYS[2 * windows + 2 * j + 2]
  local member, age = ARGV[at + 2 * j], tonumber(ARGV[at + 2 * j + 1])
  if age < 0 then redis.call('ZREM', calls, member) else redis.call('ZADD', calls, 'XX', now - age, member) end
  redis.call('ZREM', busy, member)
end
for i = 0, windows - 1 do
  local calls, busy, a = KEYS[2 * i + 1], KEYS[2 * i + 2], 3 + 6 * i
  local window, limit, reserve = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local most = tonumber(ARGV[a + 5])
  redis.call('ZREMRANGEBYSCORE', calls, '-inf', now - window)
  if most >= 0 then
    redis.call('ZREMRANGEBYSCORE', busy, '-inf', now)
    if redis.call('ZCARD', busy) >= most then return {0, i + 1, '0.05'} end
  end
  if limit >= 0 then
    local room = limit - reserve
    local count = redis.call('ZCARD', calls)
    if count >= room then
      local wait = 0.05
      if room > 0 then
        local entry = redis.call('ZRANGE', calls, count - room, count - room, 'WITHSCORES')
        if entry[2] then wait = math.max(0.005, tonumber(entry[2]) + window - now) end
      end
      return {0, i + 1, tostring(wait)}
    end
  end
end
for i = 0, windows - 1 do
  local calls, busy, a = KEYS[2 * i + 1], KEYS[2 * i + 2], 3 + 6 * i
  local window, member, hold, most = tonumber(ARGV[a]), ARGV[a + 3], tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  redis.call('ZADD', calls, now + hold, member)
  redis.call('PEXPIRE', calls, math.ceil((window + hold) * 1000) + 1000)
  if most >= 0 then
    redis.call('ZADD', busy, now + hold, member)
    redis.call('PEXPIRE', busy, math.ceil(hold * 1000) + 1000)
  end
end
return {1, 0, '0'}
"""

# A budget hold. KEYS: the period's spend (a hash with `spent`), its holds by expiry (a sorted
# set) and their amounts (a hash). ARGV: the spend the store knows (taken when it is more),
# the budget, the expected cost, the hold's id, seconds it may live, seconds the keys live.
# Answers {1|0, spent, held}.
RESERVE = _NOW + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do redis.call('HDEL', KEYS[3], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '-1')
if spent < tonumber(ARGV[1]) then  -- spend that never went through here (a replica cut off for a while)
  spent = tonumber(ARGV[1])
  redis.call('HSET', KEYS[1], 'spent', ARGV[1])
end
local held = 0
for _, amount in ipairs(redis.call('HVALS', KEYS[3])) do held = held + tonumber(amount) end
local budget, expected = tonumber(ARGV[2]), tonumber(ARGV[3])
if spent + held + expected > budget + 1e-9 or (expected == 0 and spent >= budget) then
  return {0, tostring(spent), tostring(held)}
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
redis.call('HSET', KEYS[3], ARGV[4], expected)
local life = math.ceil(tonumber(ARGV[6]) * 1000)
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, life) end
return {1, tostring(spent), tostring(held)}
"""

# One call of a hold ended: its cost is spent, its share of the hold given back.
# ARGV: the hold's id, its share, the cost (0: the call cost nothing).
SETTLE = """
local cost = tonumber(ARGV[3])
if cost ~= 0 and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBYFLOAT', KEYS[1], 'spent', cost) end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  local left = tonumber(redis.call('HINCRBYFLOAT', KEYS[3], ARGV[1], -tonumber(ARGV[2])))
  if left <= 1e-9 then
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
end
return 1
"""

# Holds still under way, renewed: they lapse HOLD_LIFE after their process stops renewing
# them. KEYS: the holds by expiry. ARGV: seconds to live, then the holds' ids.
RENEW = _NOW + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
return 1
"""

# What the holds under way add up to. KEYS: as RESERVE's. Answers the sum.
HELD = _NOW + """
local held = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')) do
  held = held + tonumber(redis.call('HGET', KEYS[3], id) or '0')
end
return tostring(held)
"""

# A hold given back whole (its request ended).
RELEASE = """
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# Renew or drop a mark only while this process owns it. ARGV: the owner, milliseconds (0: drop).
OWNED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""

# Keep a blob for a while within its owner's share and a total (uploads, conversations).
# KEYS: expiries by name (sorted set), "size owner" by name (hash), bytes held (hash: "" for
# all, and per owner), the blob's key. ARGV: the blob, its name, its owner, the owner's share,
# the total, seconds to keep it, whether to evict the owner's oldest to make room (1) or refuse
# (0), the prefix of blob keys and of each owner's expiries ("<prefix>owner:<owner>").
# Answers {1} when kept; {0, 'owner'|'total', seconds until room} when refused.
KEEP = _NOW + """
local prefix = ARGV[8]
local function forget(name)
  local meta = redis.call('HGET', KEYS[2], name)
  if meta then
    local size, owner = string.match(meta, '^(%d+) (.*)$')
    redis.call('HINCRBY', KEYS[3], '', -tonumber(size))
    redis.call('HINCRBY', KEYS[3], owner, -tonumber(size))
    redis.call('ZREM', prefix .. 'owner:' .. owner, name)
    redis.call('HDEL', KEYS[2], name)
  end
  redis.call('ZREM', KEYS[1], name)
  redis.call('DEL', prefix .. name)
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do forget(name) end
local size, name, owner = string.len(ARGV[1]), ARGV[2], ARGV[3]
local share, total = tonumber(ARGV[4]), tonumber(ARGV[5])
local mine_key = prefix .. 'owner:' .. owner
local function mine() return tonumber(redis.call('HGET', KEYS[3], owner) or '0') end
local function all() return tonumber(redis.call('HGET', KEYS[3], '') or '0') end
while ARGV[7] == '1' and (mine() + size > share or all() + size > total) do
  local oldest = redis.call('ZRANGE', mine_key, 0, 0)[1]
  if not oldest then break end
  forget(oldest)
end
if mine() + size > share or all() + size > total then
  local which = 'total'
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if mine() + size > share then
    which = 'owner'
    first = redis.call('ZRANGE', mine_key, 0, 0, 'WITHSCORES')
  end
  return {0, which, tostring(first[2] and math.max(1, tonumber(first[2]) - now) or 1)}
end
local ttl = tonumber(ARGV[6])
local life = math.ceil(ttl * 1000)
redis.call('SET', KEYS[4], ARGV[1], 'PX', life)
redis.call('ZADD', KEYS[1], now + ttl, name)
redis.call('ZADD', mine_key, now + ttl, name)
redis.call('HSET', KEYS[2], name, size .. ' ' .. owner)
redis.call('HINCRBY', KEYS[3], '', size)
redis.call('HINCRBY', KEYS[3], owner, size)
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], mine_key}) do redis.call('PEXPIRE', key, life + 60000) end
return {1}
"""

# Forget blobs by name. KEYS as KEEP's first three; ARGV: KEEP's prefix, then the names.
FORGET = """
local prefix = ARGV[1]
for i = 2, #ARGV do
  local name = ARGV[i]
  local meta = redis.call('HGET', KEYS[2], name)
  if meta then
    local size, owner = string.match(meta, '^(%d+) (.*)$')
    redis.call('HINCRBY', KEYS[3], '', -tonumber(size))
    redis.call('HINCRBY', KEYS[3], owner, -tonumber(size))
    redis.call('ZREM', prefix .. 'owner:' .. owner, name)
    redis.call('HDEL', KEYS[2], name)
  end
  redis.call('ZREM', KEYS[1], name)
  redis.call('DEL', prefix .. name)
end
return 1
"""
