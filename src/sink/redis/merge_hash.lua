-- pgferry: hash mode, an update whose TOASTed values were not sent.
-- KEYS[1] new key, KEYS[2] old key (= KEYS[1] unless the key changed),
-- KEYS[3] the table's key set.
-- ARGV[1] ttl seconds (0: none), ARGV[2] u, ARGV[3] s, then u names of the
-- unchanged columns, s pairs (column, text) to set, and the remaining
-- arguments are the NULL columns (removed from the hash).
-- The unchanged fields are kept (or carried over to the new key). When the
-- stored hash or one of them is missing, the row is dropped from the cache
-- instead of being stored incomplete (returns 0).
local dst, src, set = KEYS[1], KEYS[2], KEYS[3]
local ttl, u, s = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local function drop()
  redis.call('DEL', dst)
  redis.call('SREM', set, dst)
  if src ~= dst then
    redis.call('DEL', src)
    redis.call('SREM', set, src)
  end
  return 0
end

if redis.call('TYPE', src).ok ~= 'hash' then return drop() end
local names = {}
for i = 1, u do names[i] = ARGV[3 + i] end
local keep = redis.call('HMGET', src, unpack(names))
for i = 1, u do
  if not keep[i] then return drop() end
end
local base = 3 + u
if src ~= dst then
  redis.call('DEL', dst)
  local args = {}
  for i = 1, u do
    args[#args + 1] = names[i]
    args[#args + 1] = keep[i]
  end
  redis.call('HSET', dst, unpack(args))
  redis.call('DEL', src)
  redis.call('SREM', set, src)
else
  local dels = {}
  for i = base + 2 * s + 1, #ARGV do dels[#dels + 1] = ARGV[i] end
  if #dels > 0 then redis.call('HDEL', dst, unpack(dels)) end
end
if s > 0 then
  local args = {}
  for i = base + 1, base + 2 * s do args[#args + 1] = ARGV[i] end
  redis.call('HSET', dst, unpack(args))
end
if ttl > 0 then redis.call('EXPIRE', dst, ttl) end
redis.call('SADD', set, dst)
return 1
