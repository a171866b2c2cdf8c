-- parley:v1 session append
local key = KEYS[1]
local max, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV do redis.call('RPUSH', key, ARGV[i]) end
local len = redis.call('LLEN', key)
if len > max then
  local cut = len - max
  while cut < len and string.sub(redis.call('LINDEX', key, cut), 1, 1) == 't' do cut = cut + 1 end
  if cut >= len then redis.call('DEL', key) else redis.call('LTRIM', key, cut, -1) end
end
redis.call('PEXPIRE', key, ttl)
return len
