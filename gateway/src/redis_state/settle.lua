-- parley:v1 settle
local nt = tonumber(ARGV[1])
local slot, dt = ARGV[2], tonumber(ARGV[3])
for i = 1, nt do
  local v = redis.call('HGET', KEYS[i], slot)
  if v then
    local d = dt
    if tonumber(v) + d < 0 then d = -tonumber(v) end
    redis.call('HINCRBY', KEYS[i], slot, d)
    redis.call('HINCRBY', KEYS[i], 's', d)
  end
end
if #KEYS > nt and ARGV[5] ~= '0' then
  local k = KEYS[nt + 1] .. ':' .. ARGV[4]
  if redis.call('EXISTS', k) == 1 then redis.call('INCRBY', k, ARGV[5]) end
end
return 1
