-- valve's GCRA for limits held in Redis. One call takes, reserves and gives back tokens of one
-- or more limits (KEYS: one per limit, all in one hash slot), all or nothing.
--
-- Time is Redis's own (TIME), in whole microseconds; a limit's token interval T is q + r/d us
-- (integers, d <= 2^20), and its state, the theoretical arrival time (TAT), is kept as
-- "us:frac:d" (us + frac/d; read with another d after a rate change, the fraction is rounded up). Every number stays an integer below 2^53, so Lua's doubles hold it
-- exactly: no floats, no drift.
--
-- ARGV[1]  now in us, for tests only ("" = Redis TIME); keys then get no expiry (their TTL
--          would be counted in Redis's real time, not the test's)
-- ARGV[2]  tokens to give back first (cancelled reservations): TAT moves back, not before now
-- then per key: q, r, d, burst
-- then per waiter: n (tokens), max_wait (us; 0 = now or never)
-- Returns {free, w1, w2, ...}: free = microseconds of tokens the first limit holds after the
-- call (negative in debt); wj >= 0: waiter j's slot is wj us from now (taken);
-- wj < 0: not taken, its slot would have been -wj - 1 us from now.
local function norm(u, f, d)
  local c = math.floor(f / d)
  u = u + c
  f = f - c * d
  if f < 0 then u = u - 1; f = f + d elseif f >= d then u = u + 1; f = f - d end
  return u, f
end

-- Redis < 5 replicates scripts verbatim unless told otherwise, and TIME would then forbid writes.
if redis.replicate_commands then redis.replicate_commands() end

local now
local test_time = ARGV[1] ~= ''
if test_time then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local give = tonumber(ARGV[2])
local nk = #KEYS
local us, fr, q, r, d, b = {}, {}, {}, {}, {}, {}
for i = 1, nk do
  local o = 2 + (i - 1) * 4
  q[i] = tonumber(ARGV[o + 1]); r[i] = tonumber(ARGV[o + 2])
  d[i] = tonumber(ARGV[o + 3]); b[i] = tonumber(ARGV[o + 4])
  local tu, tf = now, 0
  local v = redis.call('GET', KEYS[i])
  if v then
    local a, c, sd = string.match(v, '^(%-?%d+):(%d+):(%d+)$')
    if a then
      a = tonumber(a); c = tonumber(c); sd = tonumber(sd)
      if sd ~= d[i] then a, c = norm(a, math.ceil(c * d[i] / sd), d[i]) end
      if a > now or (a == now and c > 0) then tu, tf = a, c end
    end
  end
  if give > 0 then
    tu, tf = norm(tu - give * q[i], tf - give * r[i], d[i])
    if tu < now then tu, tf = now, 0 end
  end
  us[i], fr[i] = tu, tf
end

local out = {0}
local changed = give > 0
local j = 3 + nk * 4
while j <= #ARGV do
  local n = tonumber(ARGV[j])
  local maxw = tonumber(ARGV[j + 1])
  local wait = 0
  local nu, nf = {}, {}
  for i = 1, nk do
    nu[i], nf[i] = norm(us[i] + n * q[i], fr[i] + n * r[i], d[i])
    local au, af = norm(nu[i] - b[i] * q[i], nf[i] - b[i] * r[i], d[i])
    local w = au - now
    if af > 0 then w = w + 1 end
    if w > wait then wait = w end
  end
  if wait <= maxw then
    for i = 1, nk do us[i], fr[i] = nu[i], nf[i] end
    changed = true
    out[#out + 1] = wait
  else
    out[#out + 1] = -1 - wait
  end
  j = j + 2
end

if changed then
  for i = 1, nk do
    if us[i] > now or (us[i] == now and fr[i] > 0) then
      local ttl = us[i] - now
      if fr[i] > 0 then ttl = ttl + 1 end
      local v = string.format('%d:%d:%d', us[i], fr[i], d[i]) -- %d: Lua 5.1 formats a long, exact below 2^53
      if test_time then
        redis.call('SET', KEYS[i], v)
      else
        redis.call('SET', KEYS[i], v, 'PX', math.ceil(ttl / 1000))
      end
    else
      redis.call('DEL', KEYS[i])
    end
  end
end

local au, af = norm(us[1] - b[1] * q[1], fr[1] - b[1] * r[1], d[1])
out[1] = now - au
if af > 0 then out[1] = out[1] - 1 end
return out
