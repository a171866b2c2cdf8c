-- parley:v1 admit
local t = redis.call('TIME')
local secs = tonumber(t[1])
local now = secs * 1000 + math.floor(tonumber(t[2]) / 1000)
local floor = math.floor
local function civil(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + ((m <= 2) and 1 or 0)
  return y, m
end
local function days_from_civil(y, m)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local y, m = civil(floor(secs / 86400))
local month = y * 12 + m - 1
local ny, nm = y, m + 1
if nm > 12 then ny, nm = y + 1, 1 end
local month_left = days_from_civil(ny, nm) * 86400 - secs
local member = ARGV[1]
local n = tonumber(ARGV[2])
local function arg(i, j) return ARGV[2 + (i - 1) * 5 + j] end
for i = 1, n do
  local kind, key = arg(i, 1), KEYS[i]
  local limit, width, slots, amount = tonumber(arg(i, 2)), tonumber(arg(i, 3)), tonumber(arg(i, 4)), tonumber(arg(i, 5))
  if kind == 'L' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - width)
    local count = redis.call('ZCARD', key)
    if count + amount > limit then
      local retry = width
      if limit > 0 and amount <= limit then
        local e = redis.call('ZRANGE', key, count - limit + amount - 1, count - limit + amount - 1, 'WITHSCORES')
        if e[2] then retry = tonumber(e[2]) + width - now end
      end
      return {0, i, retry, 0}
    end
  elseif kind == 'S' then
    -- Fields: one per sub-window index, plus 's' (their sum) and 'lo' (no index below it
    -- is present). Usually only the sub-windows that just left are read and removed.
    local first = floor(now / width) - slots + 1
    local meta = redis.call('HMGET', key, 's', 'lo')
    local sum, lo = tonumber(meta[1] or '0'), tonumber(meta[2] or first)
    if lo < first then
      if first - lo > slots then
        sum = 0
        local h = redis.call('HGETALL', key)
        for j = 1, #h, 2 do
          local idx = tonumber(h[j])
          if idx then
            if idx >= first then sum = sum + tonumber(h[j + 1]) else redis.call('HDEL', key, h[j]) end
          end
        end
      else
        for idx = lo, first - 1 do
          local v = redis.call('HGET', key, idx)
          if v then
            sum = sum - tonumber(v)
            redis.call('HDEL', key, idx)
          end
        end
      end
      redis.call('HSET', key, 's', sum, 'lo', first)
    end
    if sum + amount > limit then
      local retry = width * slots
      if amount <= limit then
        local live = {}
        local h = redis.call('HGETALL', key)
        for j = 1, #h, 2 do
          local idx = tonumber(h[j])
          if idx then live[#live + 1] = {idx, tonumber(h[j + 1])} end
        end
        table.sort(live, function(a, b) return a[1] < b[1] end)
        local freed = 0
        for _, s in ipairs(live) do
          freed = freed + s[2]
          if sum - freed + amount <= limit then
            retry = (s[1] + slots) * width - now
            break
          end
        end
      end
      return {0, i, retry, 0}
    end
  elseif kind == 'B' then
    local spent = tonumber(redis.call('GET', key .. ':' .. month) or '0')
    if spent >= limit or spent + amount > limit then
      return {0, i, month_left * 1000, spent}
    end
  end
end
for i = 1, n do
  local kind, key = arg(i, 1), KEYS[i]
  local width, slots = tonumber(arg(i, 3)), tonumber(arg(i, 4))
  if kind == 'L' then
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, width + 1000)
  elseif kind == 'S' then
    redis.call('HINCRBY', key, floor(now / width), arg(i, 5))
    redis.call('HINCRBY', key, 's', arg(i, 5))
    redis.call('HSETNX', key, 'lo', floor(now / width) - slots + 1)
    redis.call('PEXPIRE', key, width * slots + 1000)
  elseif kind == 'B' then
    local k = key .. ':' .. month
    redis.call('INCRBY', k, arg(i, 5))
    redis.call('EXPIRE', k, month_left + 40 * 86400)
  end
end
return {1, now, month}
