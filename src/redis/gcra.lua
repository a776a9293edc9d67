-- valve's GCRA for limits held in Redis. One call takes, reserves and gives back tokens of one
-- or more limits (KEYS: one per limit, all in one hash slot), all or nothing.
--
-- Time is Redis's own (TIME), in whole microseconds; a limit's token interval T is q + r/d us
-- (integers, r < d <= 2^20), and its state, the theoretical arrival time (TAT), is us + f/d us
-- with 0 <= f < d. Every number stays an integer below 2^53, so Lua's doubles hold it exactly:
-- no floats, no drift. A quotient is computed as floor(x / d) and then set right by its
-- remainder, since the division of a double may round it up by one.
--
-- A key holds the TAT as "us" when f is 0, else as "us:f:d" (read with another d after a rate
-- change, the fraction is rounded up). A key is deleted or expires once its bucket is full.
--
-- ARGV[1]  now in us, for tests only ("" = Redis TIME); keys then get no expiry (their TTL
--          would be counted in Redis's real time, not the test's)
-- ARGV[2]  tokens to give back first (cancelled reservations): TAT moves back, not before now
-- then per key: q, r, d, burst
-- then per waiter: n (tokens), max_wait (us; 0 = now or never)
-- Returns {free, w1, w2, ...}: free = microseconds of tokens the first limit holds after the
-- call (negative in debt); wj >= 0: waiter j's slot is wj us from now (taken);
-- wj < 0: not taken, its slot would have been -wj - 1 us from now.
--
-- One limit (nearly every call) runs a path of its own, written out in full with no tables or
-- closures: the body runs anew on every call, and this halves what the script costs Redis.
-- test/redis.cpp checks both paths against bucket_core and each other.

-- Redis < 5 replicates scripts verbatim unless told otherwise, and TIME would then forbid writes.
if redis.replicate_commands then redis.replicate_commands() end

local tonumber, floor, format = tonumber, math.floor, string.format
local now
local test_time = ARGV[1] ~= ''
if test_time then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local give = tonumber(ARGV[2])
local nk, last = #KEYS, #ARGV
local out = {0}
local changed = give > 0

if nk == 1 then
  local key = KEYS[1]
  local q, r, d, b = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  -- the burst, b * T
  local bq, br = b * q, b * r
  if br >= d then
    local c = floor(br / d)
    br = br - c * d
    if br < 0 then c = c - 1; br = br + d elseif br >= d then c = c + 1; br = br - d end
    bq = bq + c
  end
  local u, f = now, 0
  local v = redis.call('GET', key)
  if v then
    local a, c = tonumber(v), 0
    if not a then
      local sd
      a, c, sd = string.match(v, '^(%-?%d+):(%d+):(%d+)$')
      a, c, sd = tonumber(a), tonumber(c), tonumber(sd)
      if a and sd ~= d then
        c = math.ceil(c * d / sd)
        if c >= d then a = a + 1; c = c - d end
      end
    end
    if a and (a > now or (a == now and c > 0)) then u, f = a, c end
  end
  if changed then
    local gu, gf = give * q, give * r
    if gf >= d then
      local c = floor(gf / d)
      gf = gf - c * d
      if gf < 0 then c = c - 1; gf = gf + d elseif gf >= d then c = c + 1; gf = gf - d end
      gu = gu + c
    end
    u, f = u - gu, f - gf
    if f < 0 then u = u - 1; f = f + d end
    if u < now then u, f = now, 0 end
  end
  for j = 7, last, 2 do
    local n, maxw = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
    local nu, nf = u + n * q, f + n * r
    if nf >= d then
      local c = floor(nf / d)
      nf = nf - c * d
      if nf < 0 then c = c - 1; nf = nf + d elseif nf >= d then c = c + 1; nf = nf - d end
      nu = nu + c
    end
    -- its slot: when the new TAT is a burst or less ahead, rounded up to a whole us
    local wu, wf = nu - bq, nf - br
    if wf < 0 then wu = wu - 1; wf = wf + d end
    if wf > 0 then wu = wu + 1 end
    local w = wu - now
    if w < 0 then w = 0 end
    if w <= maxw then
      u, f, changed = nu, nf, true
      out[#out + 1] = w
    else
      out[#out + 1] = -1 - w
    end
  end
  if changed then
    if u == now and f == 0 then
      redis.call('DEL', key)
    else
      local s
      if f == 0 then s = format('%d', u) else s = format('%d:%d:%d', u, f, d) end -- %d: exact below 2^53
      if test_time then
        redis.call('SET', key, s)
      else
        local ttl = u - now
        if f > 0 then ttl = ttl + 1 end
        redis.call('SET', key, s, 'PX', math.ceil(ttl / 1000))
      end
    end
  end
  u, f = u - bq, f - br
  if f < 0 then u = u - 1; f = f + d end
  out[1] = now - u
  if f > 0 then out[1] = out[1] - 1 end
  return out
end

-- Several limits: the same steps, with helpers.

-- n intervals of q + r/d us: whole us and a fraction in [0, d).
local function times(n, q, r, d)
  if n == 1 then return q, r end
  local x = n * r
  local c = floor(x / d)
  x = x - c * d
  if x < 0 then c = c - 1; x = x + d elseif x >= d then c = c + 1; x = x - d end
  return n * q + c, x
end

-- A limit's TAT, not before now.
local function load(key, d)
  local v = redis.call('GET', key)
  if not v then return now, 0 end
  local u, f = tonumber(v), 0
  if not u then
    local a, c, sd = string.match(v, '^(%-?%d+):(%d+):(%d+)$')
    if not a then return now, 0 end
    u, f, sd = tonumber(a), tonumber(c), tonumber(sd)
    if sd ~= d then
      f = math.ceil(f * d / sd)
      if f >= d then u = u + 1; f = f - d end
    end
  end
  if u > now or (u == now and f > 0) then return u, f end
  return now, 0
end

-- Whole us from now until a TAT of (u, f) is a burst (bq, br) or less ahead, rounded up;
-- negative when it already is.
local function wait_for(u, f, d, bq, br)
  u, f = u - bq, f - br
  if f < 0 then u = u - 1; f = f + d end
  if f > 0 then u = u + 1 end
  return u - now
end

local function store(key, u, f, d)
  if u == now and f == 0 then return redis.call('DEL', key) end
  local s
  if f == 0 then s = format('%d', u) else s = format('%d:%d:%d', u, f, d) end
  if test_time then return redis.call('SET', key, s) end
  local ttl = u - now
  if f > 0 then ttl = ttl + 1 end
  redis.call('SET', key, s, 'PX', math.ceil(ttl / 1000))
end

local us, fr, q, r, d, bq, br, nu, nf = {}, {}, {}, {}, {}, {}, {}, {}, {}
for i = 1, nk do
  local o = 2 + (i - 1) * 4
  q[i], r[i], d[i] = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  bq[i], br[i] = times(tonumber(ARGV[o + 4]), q[i], r[i], d[i])
  us[i], fr[i] = load(KEYS[i], d[i])
  if changed then
    local gu, gf = times(give, q[i], r[i], d[i])
    local u, f = us[i] - gu, fr[i] - gf
    if f < 0 then u = u - 1; f = f + d[i] end
    if u < now then u, f = now, 0 end
    us[i], fr[i] = u, f
  end
end
for j = 3 + nk * 4, last, 2 do
  local n, maxw = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
  local wait = 0
  for i = 1, nk do
    local nq, nr = times(n, q[i], r[i], d[i])
    local u, f = us[i] + nq, fr[i] + nr
    if f >= d[i] then u = u + 1; f = f - d[i] end
    nu[i], nf[i] = u, f
    local w = wait_for(u, f, d[i], bq[i], br[i])
    if w > wait then wait = w end
  end
  if wait <= maxw then
    for i = 1, nk do us[i], fr[i] = nu[i], nf[i] end
    changed = true
    out[#out + 1] = wait
  else
    out[#out + 1] = -1 - wait
  end
end
if changed then
  for i = 1, nk do store(KEYS[i], us[i], fr[i], d[i]) end
end
out[1] = -wait_for(us[1], fr[1], d[1], bq[1], br[1])
return out
