-- parley:v1 admit (pending settles, then a batch of decisions, each in turn)
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
-- Checks: {KEYS index, kind, limit, width, slots, total, count}, shared by the requests
-- of the batch; total and count are the sum of the amounts and the number of requests
-- with this check.
local nspec = tonumber(ARGV[2])
local spec = {}
for j = 1, nspec do
  local a = 3 + (j - 1) * 7
  spec[j] = {tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])}
end
-- Per key (index into KEYS): its state read once per batch, and what settles and admitted
-- requests of this batch add to it (written once at the end).
local state = {}
local function load(ki, kind, width, slots)
  local st = state[ki]
  if st then return st end
  local key = KEYS[ki]
  st = {kind = kind, width = width, slots = slots, add = 0, members = {}}
  if kind == 'L' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - width)
    st.count = redis.call('ZCARD', key)
  elseif kind == 'S' then
    -- Fields: one per sub-window index, plus 's' (their sum) and 'lo' (no index below it
    -- is present). Usually only the sub-windows that just left are read and removed.
    local cur = floor(now / width)
    local first = cur - slots + 1
    local meta = redis.call('HMGET', key, 's', 'lo', cur)
    local sum, lo = tonumber(meta[1] or '0'), tonumber(meta[2] or first)
    st.cur, st.first = cur, first
    st.curv, st.curnew = tonumber(meta[3] or '0'), not meta[3]
    if lo < first then
      st.dirty = true
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
    end
    st.sum = sum
  else
    local v = redis.call('GET', key .. ':' .. month)
    st.exists = v and true or false
    st.spent = tonumber(v or '0')
  end
  state[ki] = st
  return st
end
-- Settles (summed by the client), before the decisions: they happened first. Each:
-- number of token keys, their KEYS indices, budget KEYS index (0: none), slot, token
-- delta, month, cost delta, slot width, slots. As settle.lua: a slot that has left the
-- window is not touched, a slot never goes below zero, a budget counter is only changed
-- while it exists.
local p = 3 + nspec * 7
local nsettle = tonumber(ARGV[p])
p = p + 1
for _ = 1, nsettle do
  local nt = tonumber(ARGV[p])
  local q = p + nt
  local bki, slot, dt = tonumber(ARGV[q + 1]), tonumber(ARGV[q + 2]), tonumber(ARGV[q + 3])
  local smonth, dc = tonumber(ARGV[q + 4]), tonumber(ARGV[q + 5])
  local width, slots = tonumber(ARGV[q + 6]), tonumber(ARGV[q + 7])
  if dt ~= 0 then
    for i = 1, nt do
      local ki = tonumber(ARGV[p + i])
      local st = load(ki, 'S', width, slots)
      if slot == st.cur then
        if not st.curnew then
          local d = dt
          if st.curv + st.add + d < 0 then d = -(st.curv + st.add) end
          st.add = st.add + d
        end
      elseif slot >= st.first and slot < st.cur then
        local v = redis.call('HGET', KEYS[ki], slot)
        if v then
          local d = dt
          if tonumber(v) + d < 0 then d = -tonumber(v) end
          if d ~= 0 then
            redis.call('HINCRBY', KEYS[ki], slot, d)
            st.sum = st.sum + d
            st.dirty = true
          end
        end
      end
    end
  end
  if bki > 0 and dc ~= 0 then
    if smonth == month then
      local st = load(bki, 'B', 0, 0)
      if st.exists then st.add = st.add + dc end
    else
      local k = KEYS[bki] .. ':' .. smonth
      if redis.call('EXISTS', k) == 1 then redis.call('INCRBY', k, dc) end
    end
  end
  p = q + 8
end
local nreq, fast, R = tonumber(ARGV[p]), ARGV[p + 1] == '1', {}
-- When the whole batch fits (for each check, the key's state plus the batch's total stays
-- within the limit; the client sends fast = 1 only if no key has two checks), deciding
-- the requests in turn would admit every one: count the totals and answer {now, month}.
if fast then
  for j = 1, nspec do
    local sp = spec[j]
    local kind, limit, total = sp[2], sp[3], sp[6]
    local st = load(sp[1], kind, sp[4], sp[5])
    if kind == 'L' then
      if st.count + total > limit then fast = false break end
    elseif kind == 'S' then
      if st.sum + st.add + total > limit then fast = false break end
    elseif st.spent + st.add + total >= limit then
      fast = false
      break
    end
  end
end
-- Otherwise the requests, each `n` then `n` times `spec amount`, packed in one argument.
if not fast then
  local n = 0
  for x in string.gmatch(ARGV[p + 2], '%d+') do
    n = n + 1
    R[n] = tonumber(x)
  end
end
-- The first check of a request (`n` checks of {spec, amount} from R[q]) that refuses it:
-- {0, check, retry_ms, spent}, or nil.
local function refuse(q, n)
  for i = 1, n do
    local a = q + (i - 1) * 2
    local sp, amount = spec[R[a]], R[a + 1]
    local ki, kind, limit, width, slots = sp[1], sp[2], sp[3], sp[4], sp[5]
    local st = load(ki, kind, width, slots)
    if kind == 'L' then
      local count = st.count + #st.members
      if count + amount > limit then
        local retry = width
        if limit > 0 and amount <= limit then
          -- The entry whose leaving lets this request in; entries of this batch are at now.
          local at = count - limit + amount - 1
          if at < st.count then
            local e = redis.call('ZRANGE', KEYS[ki], at, at, 'WITHSCORES')
            if e[2] then retry = tonumber(e[2]) + width - now end
          end
        end
        return {0, i, retry, 0}
      end
    elseif kind == 'S' then
      local sum = st.sum + st.add
      if sum + amount > limit then
        local retry = width * slots
        if amount <= limit then
          local live = {}
          local cur = st.cur
          local h = redis.call('HGETALL', KEYS[ki])
          for j = 1, #h, 2 do
            local idx = tonumber(h[j])
            if idx then
              local v = tonumber(h[j + 1])
              if idx == cur then v = v + st.add end
              live[#live + 1] = {idx, v}
            end
          end
          if st.add > 0 and st.curnew then live[#live + 1] = {cur, st.add} end
          table.sort(live, function(x, y) return x[1] < y[1] end)
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
    else
      local spent = st.spent + st.add
      if spent >= limit or spent + amount > limit then
        return {0, i, month_left * 1000, spent}
      end
    end
  end
  return nil
end
local out = {now, month}
if fast then
  for j = 1, nspec do
    local sp = spec[j]
    local st = state[sp[1]]
    if sp[2] == 'L' then
      for r = 1, sp[7] do st.members[#st.members + 1] = member .. ':' .. r end
    else
      st.add = st.add + sp[6]
    end
  end
else
  local q, o = 1, 2
  for r = 1, nreq do
    local n = R[q]
    q = q + 1
    local no = refuse(q, n) or {1, 0, 0, 0}
    if no[1] == 1 then
      for i = 1, n do
        local a = q + (i - 1) * 2
        local st = state[spec[R[a]][1]]
        if st.kind == 'L' then
          st.members[#st.members + 1] = member .. ':' .. r
        else
          st.add = st.add + R[a + 1]
        end
      end
    end
    for k = 1, 4 do out[o + k] = no[k] end
    o = o + 4
    q = q + n * 2
  end
end
-- One write per key. A sub-window hash gets its TTL when its current sub-window is first
-- written: that covers every sub-window up to it (each leaves at most slots + 1 widths
-- later), so later writes in the same sub-window need none. A budget counter gets its TTL
-- (an absolute time: next month + 40 days) when it is created.
for ki, st in pairs(state) do
  local key = KEYS[ki]
  if st.kind == 'L' then
    if #st.members > 0 then
      -- ZADD in chunks: Lua's unpack has a stack limit.
      for c = 1, #st.members, 500 do
        local args = {}
        for j = c, math.min(c + 499, #st.members) do
          args[#args + 1] = now
          args[#args + 1] = st.members[j]
        end
        redis.call('ZADD', key, unpack(args))
      end
      redis.call('PEXPIRE', key, st.width + 1000)
    end
  elseif st.kind == 'S' then
    if st.add ~= 0 then
      redis.call('HSET', key, st.cur, st.curv + st.add, 's', st.sum + st.add, 'lo', st.first)
      if st.curnew then redis.call('PEXPIRE', key, st.width * (st.slots + 1) + 1000) end
    elseif st.dirty then
      redis.call('HSET', key, 's', st.sum, 'lo', st.first)
    end
  else
    if st.add ~= 0 then
      local k = key .. ':' .. month
      redis.call('INCRBY', k, st.add)
      if not st.exists then redis.call('EXPIRE', k, month_left + 40 * 86400) end
    end
  end
end
return out
