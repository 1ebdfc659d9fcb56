-- pgferry: TRUNCATE in json and hash modes. KEYS[1] is the table's key set:
-- every key in it is removed, then the set itself. SPOP in slices keeps the
-- script's memory bounded however large the table.
while true do
  local m = redis.call('SPOP', KEYS[1], 1000)
  if #m == 0 then break end
  redis.call('UNLINK', unpack(m))
end
redis.call('DEL', KEYS[1])
return 0
