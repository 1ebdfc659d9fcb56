-- pgferry: json mode, an update whose TOASTed values were not sent.
-- KEYS[1] new key, KEYS[2] old key (= KEYS[1] unless the key changed),
-- KEYS[3] the table's key set.
-- ARGV[1] ttl seconds (0: none); ARGV[2] piece0; then pairs (name, piece):
-- the new document is piece0 value1 piece1 value2 piece2 ..., where value_i
-- is the JSON text of column name_i (a JSON string, quotes included) in the
-- stored document. Values are spliced as text, never decoded, so numbers
-- and strings stay byte-exact. When the stored document or one of the
-- values is missing, the row is dropped from the cache instead of being
-- stored incomplete (returns 0).
local dst, src, set = KEYS[1], KEYS[2], KEYS[3]
local ttl = tonumber(ARGV[1])

local function drop()
  redis.call('DEL', dst)
  redis.call('SREM', set, dst)
  if src ~= dst then
    redis.call('DEL', src)
    redis.call('SREM', set, src)
  end
  return 0
end

if redis.call('TYPE', src).ok ~= 'string' then return drop() end
local old = redis.call('GET', src)

local want = {}
for i = 3, #ARGV, 2 do want[ARGV[i]] = false end

local byte, find, sub = string.byte, string.find, string.sub

-- s[i] is '"': the index of the closing quote.
local function str_end(s, i)
  local j = i + 1
  while true do
    local k = find(s, '["\\]', j)
    if not k then return nil end
    if byte(s, k) == 92 then j = k + 2 else return k end
  end
end

local function ws(s, i) return find(s, '[^ \t\r\n]', i) end

-- The index of the last byte of the JSON value starting at s[i].
local function value_end(s, i)
  local c = byte(s, i)
  if c == 34 then return str_end(s, i) end
  if c == 123 or c == 91 then
    local depth, j = 0, i
    while true do
      local k = find(s, '[%[%]{}"]', j)
      if not k then return nil end
      local d = byte(s, k)
      if d == 34 then
        k = str_end(s, k)
        if not k then return nil end
      elseif d == 123 or d == 91 then
        depth = depth + 1
      else
        depth = depth - 1
        if depth == 0 then return k end
      end
      j = k + 1
    end
  end
  local k = find(s, '[,}%]%s]', i)
  if not k then return nil end
  return k - 1
end

local i = ws(old, 1)
if not i or byte(old, i) ~= 123 then return drop() end
i = ws(old, i + 1)
while i and byte(old, i) ~= 125 do
  if byte(old, i) ~= 34 then return drop() end
  local ne = str_end(old, i)
  if not ne then return drop() end
  local name = sub(old, i, ne)
  i = ws(old, ne + 1)
  if not i or byte(old, i) ~= 58 then return drop() end
  i = ws(old, i + 1)
  if not i then return drop() end
  local ve = value_end(old, i)
  if not ve then return drop() end
  if want[name] == false then want[name] = sub(old, i, ve) end
  i = ws(old, ve + 1)
  if not i then return drop() end
  if byte(old, i) == 44 then i = ws(old, i + 1) end
end

local parts = { ARGV[2] }
for k = 3, #ARGV, 2 do
  local v = want[ARGV[k]]
  if not v then return drop() end
  parts[#parts + 1] = v
  parts[#parts + 1] = ARGV[k + 1]
end
local doc = table.concat(parts)
if ttl > 0 then
  redis.call('SET', dst, doc, 'EX', ttl)
else
  redis.call('SET', dst, doc)
end
redis.call('SADD', set, dst)
if src ~= dst then
  redis.call('DEL', src)
  redis.call('SREM', set, src)
end
return 1
