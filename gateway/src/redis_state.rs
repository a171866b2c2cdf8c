//! Shared state in Redis, so several replicas enforce one set of limits, continue each
//! other's `/chat` sessions and share the response cache.
//!
//! - Limits: one atomic Lua script per admission decision ([`ADMIT_LUA`]), evaluated with
//!   EVALSHA (the `redis` crate loads it again on NOSCRIPT). It reads the time from Redis
//!   (`TIME`, so replicas' clocks do not matter), checks every scope and, only if all
//!   pass, counts the request in each: per-minute request limits are exact sliding logs
//!   (sorted sets; above 10 000 a minute, 1-second slots over 61 s), tokens per minute
//!   count in 1-second slots over 61 s, hour and day limits in sixty sub-windows (hashes),
//!   the budget in one integer micro-USD counter per calendar month (UTC). Every key
//!   expires. Settling to real usage is one more script ([`SETTLE_LUA`]), run off the
//!   request path.
//! - Sessions: one list per tenant and session; appending and trimming is one script.
//! - Cache: one string per entry, `SET ... PX ttl`.
//!
//! Keys are `parley:v1:{<chatbot>:<tenant>}:...` (the version in the prefix changes with
//! the layout; the braces keep one decision's keys in one cluster slot; the Chatbot
//! `namespace/name` keeps two Chatbots that share a Redis and a Tenant apart). Every command is bounded
//! by a short timeout; the connection is multiplexed and reconnects by itself.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parley_crds::gateway_config::FailureMode;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use serde_json::Value;

use crate::limits::{LimitRequest, Refusal, RefusalKind};
use crate::metrics::{DecisionLabels, Metrics, OpLabel};
use crate::translate::Usage;

/// Key prefix; the version changes with the key layout or the scripts' semantics.
pub const PREFIX: &str = "parley:v1:";
/// Longest a request waits on Redis for one command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(100);
/// Up to this limit a per-minute request limit keeps an exact log.
const EXACT_LOG_MAX: u64 = 10_000;

/// The admission script. ARGV: member, number of checks, then per check
/// `kind limit width_ms slots amount` (kind `L` sliding log over `width_ms`, `S` `slots`
/// sub-windows of `width_ms`, `B` monthly budget). KEYS: one per check (the budget key
/// gets `:<month>` appended). Returns `{1, now_ms, month}` or
/// `{0, check index, retry_ms, spent}`.
pub const ADMIT_LUA: &str = r#"
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
"#;

/// The settle script. ARGV: number of token keys, slot, token delta, month, cost delta.
/// KEYS: the token slot hashes, then the budget key (if any). A slot that has left its
/// window is not touched; a slot never goes below zero.
pub const SETTLE_LUA: &str = r#"
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
"#;

/// Appends to a session and trims it. Each element is `t` (a tool result) or `m`,
/// followed by the message's JSON. ARGV: max messages, TTL ms, elements. The cut moves
/// forward past leading tool results (as `sessions::trim` does).
pub const SESSION_APPEND_LUA: &str = r#"
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
"#;

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT_LUA));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE_LUA));
static SESSION_APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(SESSION_APPEND_LUA));

/// A Redis connection for shared state.
pub struct Redis {
    conn: ConnectionManager,
    prefix: String,
    /// `namespace/name` of the Chatbot: in every key's hash tag.
    chatbot: String,
    /// Length of a "minute" in ms (60 000; tests shorten it; hours and days scale).
    minute_ms: u64,
    metrics: Arc<Metrics>,
    last_warning: AtomicU64,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it holds the password.
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .field("chatbot", &self.chatbot)
            .finish_non_exhaustive()
    }
}

/// What an admission reserved in Redis; hand it back to [`Redis::settle`].
#[derive(Debug, Clone)]
pub struct RedisReservation {
    token_keys: Vec<String>,
    budget_key: Option<String>,
    slot: u64,
    admitted_ms: u64,
    month: i64,
    tokens: u64,
    cost_micros: i64,
}

struct Check {
    key: String,
    kind: &'static str,
    limit: u64,
    width_ms: u64,
    slots: u64,
    amount: u64,
    what: String,
    unit: &'static str,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ceil_secs_ms(ms: i64) -> u64 {
    (ms.max(1) as u64).div_ceil(1000).max(1)
}

/// Whether a URL is one this gateway accepts for Redis (never echo the URL itself).
pub fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err("redis.url must start with redis:// or rediss://".into());
    }
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("redis.url is not a valid Redis URL ({})", e.kind_name()))
}

trait KindName {
    fn kind_name(&self) -> String;
}
impl KindName for RedisError {
    fn kind_name(&self) -> String {
        format!("{:?}", self.kind())
    }
}

impl Redis {
    /// A lazily connecting, self-reconnecting client (no network I/O here).
    pub fn connect(
        url: &str,
        prefix: &str,
        chatbot: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        check_url(url)?;
        let client = redis::Client::open(url)
            .map_err(|e| format!("redis.url is not a valid Redis URL ({})", e.kind_name()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(50));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("redis: cannot set up the connection ({})", e.kind_name()))?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            chatbot: chatbot.to_string(),
            minute_ms: 60_000,
            metrics,
            last_warning: AtomicU64::new(0),
        })
    }

    /// Shortens every limit window proportionally (tests): a "minute" of `ms`.
    pub fn with_minute_ms(mut self, ms: u64) -> Self {
        self.minute_ms = ms.max(60);
        self
    }

    /// `<prefix>{<chatbot>:<tenant>}:<rest>`: one hash slot per Chatbot and tenant.
    fn tenant_key(&self, tenant: &str, rest: &str) -> String {
        format!("{}{{{}:{tenant}}}:{rest}", self.prefix, self.chatbot)
    }

    fn error(&self, op: &'static str, e: &str) {
        self.metrics
            .redis_errors
            .get_or_create(&OpLabel { op })
            .inc();
        // At most one line every ten seconds; never the URL.
        let now = now_secs();
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(op, error = e, "redis is unreachable or failing");
        }
    }

    async fn run<T, F>(&self, op: &'static str, fut: F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.error(op, &e.kind_name());
                None
            }
            Err(_) => {
                self.error(op, "timeout");
                None
            }
        }
    }

    fn checks(&self, req: &LimitRequest<'_>) -> Vec<Check> {
        let minute = self.minute_ms;
        let second = minute / 60;
        let t = req.tenant;
        let mut out = Vec::new();
        let per_minute = |key: String, n: u64, what: String| {
            if n <= EXACT_LOG_MAX {
                Check {
                    key,
                    kind: "L",
                    limit: n,
                    width_ms: minute,
                    slots: 1,
                    amount: 1,
                    what,
                    unit: "requests",
                }
            } else {
                // Its own key: a limit moved across EXACT_LOG_MAX by a reload must not
                // meet a sorted set where it expects a hash.
                Check {
                    key: format!("{key}:slots"),
                    kind: "S",
                    limit: n,
                    width_ms: second,
                    slots: 61,
                    amount: 1,
                    what,
                    unit: "requests",
                }
            }
        };
        if let Some((session, rpm)) = req.session {
            out.push(per_minute(
                self.tenant_key(t, &format!("s:{session}:rpm")),
                rpm,
                format!("session requests per minute ({rpm}) for session {session:?}"),
            ));
        }
        if let Some(rl) = req.rate_limit {
            if let Some(n) = rl.requests_per_minute {
                out.push(per_minute(
                    self.tenant_key(t, "rpm"),
                    n,
                    format!("tenant limit requestsPerMinute ({n})"),
                ));
            }
            for (n, name, width) in [
                (rl.requests_per_hour, "requestsPerHour", minute),
                (rl.requests_per_day, "requestsPerDay", minute * 24),
            ] {
                if let Some(n) = n {
                    out.push(Check {
                        key: self.tenant_key(t, if width == minute { "rph" } else { "rpd" }),
                        kind: "S",
                        limit: n,
                        width_ms: width,
                        slots: 60,
                        amount: 1,
                        what: format!("tenant limit {name} ({n})"),
                        unit: "requests",
                    });
                }
            }
            if let Some(n) = rl.tokens_per_minute {
                out.push(Check {
                    key: self.tenant_key(t, "tpm"),
                    kind: "S",
                    limit: n,
                    width_ms: second,
                    slots: 61,
                    amount: req.tokens,
                    what: format!(
                        "tenant limit tokensPerMinute ({n}; this request reserves {} tokens: prompt + max_tokens)",
                        req.tokens
                    ),
                    unit: "tokens",
                });
            }
        }
        if let Some(q) = req.quota {
            if let Some(n) = q.requests_per_minute {
                out.push(per_minute(
                    self.tenant_key(t, &format!("m:{}:rpm", req.model)),
                    n,
                    format!("model quota requestsPerMinute ({n}) on {}", req.model),
                ));
            }
            if let Some(n) = q.tokens_per_minute {
                out.push(Check {
                    key: self.tenant_key(t, &format!("m:{}:tpm", req.model)),
                    kind: "S",
                    limit: n,
                    width_ms: second,
                    slots: 61,
                    amount: req.tokens,
                    what: format!("model quota tokensPerMinute ({n}) on {}", req.model),
                    unit: "tokens",
                });
            }
        }
        if let Some(budget) = req.budget_micros {
            out.push(Check {
                key: self.tenant_key(t, "budget"),
                kind: "B",
                limit: budget.max(0) as u64,
                width_ms: 0,
                slots: 0,
                amount: req.cost_micros.max(0) as u64,
                what: String::new(),
                unit: "usd",
            });
        }
        out
    }

    /// One admission decision. `Ok(None)`: admitted without Redis (it is unreachable and
    /// the failure mode is `open`).
    pub async fn admit(
        &self,
        req: &LimitRequest<'_>,
        mode: FailureMode,
    ) -> Result<Option<RedisReservation>, Refusal> {
        let checks = self.checks(req);
        if checks.is_empty() {
            self.decision("admitted");
            return Ok(None);
        }
        let mut inv = ADMIT.prepare_invoke();
        inv.arg(format!("{:016x}", fastrand::u64(..)))
            .arg(checks.len());
        for c in &checks {
            inv.key(&c.key)
                .arg(c.kind)
                .arg(c.limit)
                .arg(c.width_ms)
                .arg(c.slots)
                .arg(c.amount);
        }
        let mut conn = self.conn.clone();
        let result: Option<Vec<i64>> = self
            .run("admit", inv.invoke_async::<Vec<i64>>(&mut conn))
            .await;
        let Some(r) = result else {
            return match mode {
                FailureMode::Open => {
                    self.decision("redis_down_open");
                    Ok(None)
                }
                FailureMode::Closed => {
                    self.decision("redis_down_closed");
                    Err(Refusal {
                        kind: RefusalKind::Unavailable,
                        message: "the shared limit store (Redis) is unreachable and rateLimitFailureMode is closed, so requests are refused until it is back; retry shortly".into(),
                        retry_after: 1,
                        limit: 0,
                        unit: "requests",
                    })
                }
            };
        };
        match r.as_slice() {
            [1, now, month] => {
                self.decision("admitted");
                let token_width = self.minute_ms / 60;
                Ok(Some(RedisReservation {
                    token_keys: checks
                        .iter()
                        .filter(|c| c.unit == "tokens")
                        .map(|c| c.key.clone())
                        .collect(),
                    budget_key: checks.iter().find(|c| c.kind == "B").map(|c| c.key.clone()),
                    slot: (*now).max(0) as u64 / token_width.max(1),
                    admitted_ms: (*now).max(0) as u64,
                    month: *month,
                    tokens: req.tokens,
                    cost_micros: req.cost_micros,
                }))
            }
            [0, idx, retry_ms, spent] => {
                self.decision("refused");
                let c = usize::try_from(*idx - 1).ok().and_then(|i| checks.get(i));
                let Some(c) = c else {
                    return Err(refusal("a limit".into(), 1, 0, "requests"));
                };
                let secs = ceil_secs_ms(*retry_ms);
                if c.kind == "B" {
                    return Err(Refusal {
                        kind: RefusalKind::Budget,
                        message: format!(
                            "monthly budget of {} USD is spent ({} USD used or reserved); it resets at the start of next month (UTC)",
                            parley_crds::money::format_usd_micros(c.limit as i64),
                            parley_crds::money::format_usd_micros(*spent)
                        ),
                        retry_after: secs,
                        limit: 0,
                        unit: "usd",
                    });
                }
                Err(refusal(c.what.clone(), secs, c.limit, c.unit))
            }
            _ => {
                self.error("admit", "unexpected script reply");
                match mode {
                    FailureMode::Open => Ok(None),
                    FailureMode::Closed => Err(refusal("a limit".into(), 1, 0, "requests")),
                }
            }
        }
    }

    fn decision(&self, result: &'static str) {
        self.metrics
            .limit_decisions
            .get_or_create(&DecisionLabels {
                backend: "redis",
                result,
            })
            .inc();
    }

    /// Replaces a reservation by what was really used.
    pub async fn settle(&self, r: RedisReservation, tokens: u64, cost_micros: i64) {
        let dt = i128::from(tokens) - i128::from(r.tokens);
        let dc = cost_micros.saturating_sub(r.cost_micros);
        if (dt == 0 || r.token_keys.is_empty()) && (dc == 0 || r.budget_key.is_none()) {
            return;
        }
        let mut inv = SETTLE.prepare_invoke();
        for k in &r.token_keys {
            inv.key(k);
        }
        if let Some(b) = &r.budget_key {
            inv.key(b);
        }
        inv.arg(r.token_keys.len())
            .arg(r.slot)
            .arg(dt.to_string())
            .arg(r.month)
            .arg(dc);
        let mut conn = self.conn.clone();
        let _ = self.run("settle", inv.invoke_async::<i64>(&mut conn)).await;
    }

    /// Micro-USD used and reserved this month by a tenant (`None` if Redis fails).
    pub async fn spent(&self, tenant: &str, month: i64) -> Option<i64> {
        let key = format!("{}:{month}", self.tenant_key(tenant, "budget"));
        let mut conn = self.conn.clone();
        self.run(
            "spent",
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<i64>>(&mut conn),
        )
        .await
        .map(|v| v.unwrap_or(0))
    }

    /// The stored history of a session, refreshing its TTL; `None` if Redis fails.
    pub async fn session_load(
        &self,
        tenant: &str,
        session: &str,
        ttl: Duration,
    ) -> Option<Vec<Value>> {
        let key = self.tenant_key(tenant, &format!("session:{session}"));
        let mut pipe = redis::pipe();
        pipe.cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl.as_millis().max(1) as u64)
            .ignore();
        let mut conn = self.conn.clone();
        let (items,): (Vec<Vec<u8>>,) = self
            .run("session_load", pipe.query_async(&mut conn))
            .await?;
        Some(
            items
                .iter()
                .filter_map(|b| b.get(1..))
                .filter_map(|json| serde_json::from_slice(json).ok())
                .collect(),
        )
    }

    /// Appends to a session, trims it to `max` messages (never separating a tool result
    /// from its call) and refreshes its TTL. `false` if Redis fails.
    pub async fn session_append(
        &self,
        tenant: &str,
        session: &str,
        messages: &[Value],
        max: usize,
        ttl: Duration,
    ) -> bool {
        let key = self.tenant_key(tenant, &format!("session:{session}"));
        let mut inv = SESSION_APPEND.prepare_invoke();
        inv.key(key).arg(max).arg(ttl.as_millis().max(1) as u64);
        for m in messages {
            let tool = m.get("role").and_then(Value::as_str) == Some("tool");
            let mut el = Vec::with_capacity(64);
            el.push(if tool { b't' } else { b'm' });
            if serde_json::to_writer(&mut el, m).is_err() {
                continue;
            }
            inv.arg(el);
        }
        let mut conn = self.conn.clone();
        self.run("session_append", inv.invoke_async::<i64>(&mut conn))
            .await
            .is_some()
    }

    fn cache_key(&self, tenant: &str, key: &[u8; 32]) -> String {
        self.tenant_key(tenant, &format!("cache:{}", hex::encode(key)))
    }

    /// A cached response, if there is one (`None` also when Redis fails).
    pub async fn cache_get(&self, tenant: &str, key: &[u8; 32]) -> Option<CachedEntry> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = self
            .run(
                "cache_get",
                redis::cmd("GET")
                    .arg(self.cache_key(tenant, key))
                    .query_async(&mut conn),
            )
            .await?;
        CachedEntry::decode(&raw?)
    }

    /// Stores a response for `ttl`.
    pub async fn cache_put(
        &self,
        tenant: &str,
        key: &[u8; 32],
        entry: &CachedEntry,
        ttl: Duration,
    ) {
        let mut conn = self.conn.clone();
        let _ = self
            .run(
                "cache_put",
                redis::cmd("SET")
                    .arg(self.cache_key(tenant, key))
                    .arg(entry.encode())
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64)
                    .query_async::<()>(&mut conn),
            )
            .await;
    }
}

impl RedisReservation {
    /// When it was admitted, in Redis's clock (ms since the epoch).
    pub fn admitted_at_ms(&self) -> u64 {
        self.admitted_ms
    }
}

fn refusal(what: String, retry_after: u64, limit: u64, unit: &'static str) -> Refusal {
    Refusal {
        kind: RefusalKind::Rate,
        message: format!("{what} exceeded; retry after {retry_after} s or ask for a higher limit"),
        retry_after,
        limit,
        unit,
    }
}

/// A response in the shared cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedEntry {
    /// The model that served it.
    pub model: String,
    /// The backend that served it.
    pub backend: String,
    /// Its usage.
    pub usage: Usage,
    /// The body as sent to the client.
    pub body: Bytes,
}

impl CachedEntry {
    /// A JSON header line, then the body.
    fn encode(&self) -> Vec<u8> {
        let head = serde_json::json!({"model": self.model, "backend": self.backend,
            "input": self.usage.input, "output": self.usage.output});
        let mut out = head.to_string().into_bytes();
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let nl = raw.iter().position(|b| *b == b'\n')?;
        let head: Value = serde_json::from_slice(&raw[..nl]).ok()?;
        Some(Self {
            model: head.get("model")?.as_str()?.to_string(),
            backend: head.get("backend")?.as_str()?.to_string(),
            usage: Usage {
                input: head.get("input")?.as_u64()?,
                output: head.get("output")?.as_u64()?,
            },
            body: Bytes::copy_from_slice(&raw[nl + 1..]),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    //! Against a real Redis: 127.0.0.1:6379 (`scripts/services.sh` starts it) or
    //! `PARLEY_TEST_REDIS_URL`. Every test uses its own key prefix.
    use super::*;
    use crate::sessions::trim;
    use parley_crds::gateway_config::{ModelQuotaConfig, RateLimitConfig};
    use serde_json::json;
    use std::time::Instant;

    fn url() -> String {
        std::env::var("PARLEY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    fn redis_at(url: &str) -> Redis {
        let prefix = format!("parley:test:{:016x}:", fastrand::u64(..));
        Redis::connect(url, &prefix, "ns/cb", Arc::new(Metrics::new())).unwrap()
    }

    async fn redis() -> Redis {
        let r = redis_at(&url());
        let mut conn = r.conn.clone();
        let pong: Result<String, _> = tokio::time::timeout(
            Duration::from_secs(2),
            redis::cmd("PING").query_async(&mut conn),
        )
        .await
        .expect("Redis did not answer within 2 s");
        assert_eq!(
            pong.expect("no Redis: run scripts/services.sh or set PARLEY_TEST_REDIS_URL"),
            "PONG"
        );
        r
    }

    fn req<'a>(rl: &'a RateLimitConfig, tokens: u64) -> LimitRequest<'a> {
        LimitRequest {
            tenant: "ns/t",
            rate_limit: Some(rl),
            quota: None,
            model: "m",
            session: None,
            tokens,
            budget_micros: None,
            cost_micros: 0,
        }
    }

    #[tokio::test]
    async fn sliding_window_admits_exactly_n_in_any_window() {
        // A "minute" of 600 ms: the script takes the window length as a parameter.
        let r = redis().await.with_minute_ms(600);
        let rl = RateLimitConfig {
            requests_per_minute: Some(5),
            ..Default::default()
        };
        let mut admitted = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {
            if let Ok(Some(res)) = r.admit(&req(&rl, 0), FailureMode::Closed).await {
                admitted.push(res.admitted_at_ms());
            }
            tokio::time::sleep(Duration::from_millis(7)).await;
        }
        // Redis's own timestamps: any N + 1 consecutive admissions span at least a window.
        assert!(admitted.len() >= 10, "{admitted:?}");
        for w in admitted.windows(6) {
            assert!(w[5] - w[0] >= 600, "6 admitted within one window: {w:?}");
        }
        // And it is a sliding window, not a refilling bucket: the first five pass at once,
        // then nothing until the first leaves the window.
        assert!(admitted[4] - admitted[0] < 100, "{admitted:?}");
        assert!(admitted[5] - admitted[0] >= 600, "{admitted:?}");
    }

    #[tokio::test]
    async fn retry_after_is_whole_seconds_until_it_could_pass() {
        let r = redis().await;
        let rl = RateLimitConfig {
            requests_per_minute: Some(2),
            ..Default::default()
        };
        r.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
        r.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
        let e = r
            .admit(&req(&rl, 0), FailureMode::Closed)
            .await
            .unwrap_err();
        assert_eq!(e.kind, RefusalKind::Rate);
        assert!((59..=60).contains(&e.retry_after), "{e:?}");
        assert!(e.message.contains("requestsPerMinute (2)"), "{}", e.message);
        assert_eq!((e.limit, e.unit), (2, "requests"));
        // Hour limits: sixty sub-windows of a minute.
        let rl = RateLimitConfig {
            requests_per_hour: Some(1),
            ..Default::default()
        };
        let mut q = req(&rl, 0);
        q.tenant = "ns/hourly";
        r.admit(&q, FailureMode::Closed).await.unwrap();
        let e = r.admit(&q, FailureMode::Closed).await.unwrap_err();
        assert!((3540..=3600).contains(&e.retry_after), "{e:?}");
    }

    #[tokio::test]
    async fn tokens_are_reserved_then_settled_to_real_usage() {
        let r = redis().await;
        let rl = RateLimitConfig {
            tokens_per_minute: Some(100),
            requests_per_minute: Some(100),
            ..Default::default()
        };
        let res = r
            .admit(&req(&rl, 90), FailureMode::Closed)
            .await
            .unwrap()
            .unwrap();
        let e = r
            .admit(&req(&rl, 20), FailureMode::Closed)
            .await
            .unwrap_err();
        assert_eq!(e.unit, "tokens");
        assert!(e.message.contains("tokensPerMinute"), "{}", e.message);
        assert!((1..=61).contains(&e.retry_after), "{e:?}");
        // More than the whole limit can never pass: wait a full window.
        let e = r
            .admit(&req(&rl, 500), FailureMode::Closed)
            .await
            .unwrap_err();
        assert_eq!(e.retry_after, 61);
        r.settle(res, 10, 0).await;
        r.admit(&req(&rl, 20), FailureMode::Closed).await.unwrap();
        // A model quota is its own scope.
        let q = ModelQuotaConfig {
            model: "m".into(),
            requests_per_minute: Some(1),
            tokens_per_minute: Some(50),
        };
        let mut m = req(&rl, 40);
        m.quota = Some(&q);
        m.tenant = "ns/q";
        r.admit(&m, FailureMode::Closed).await.unwrap();
        let e = r.admit(&m, FailureMode::Closed).await.unwrap_err();
        assert!(e.message.contains("model quota"), "{}", e.message);
        // Sessions: per tenant and session id; a refused request counts nowhere.
        let mut s = req(&rl, 0);
        s.tenant = "ns/s";
        s.session = Some(("s1", 1));
        r.admit(&s, FailureMode::Closed).await.unwrap();
        let e = r.admit(&s, FailureMode::Closed).await.unwrap_err();
        assert!(e.message.contains("session"), "{}", e.message);
        s.session = Some(("s2", 1));
        r.admit(&s, FailureMode::Closed).await.unwrap();
        s.tenant = "ns/s-other";
        s.session = Some(("s1", 1));
        r.admit(&s, FailureMode::Closed).await.unwrap();
        let mut conn = r.conn.clone();
        let count: u64 = redis::cmd("ZCARD")
            .arg(r.tenant_key("ns/s", "rpm"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(count, 2, "the refused session request was not counted");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(r.tenant_key("ns/s", "rpm"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 61_000, "keys expire: {ttl}");
    }

    #[tokio::test]
    async fn token_slots_free_as_they_leave_the_window() {
        // A "minute" of 600 ms: 1-slot = 10 ms, 61 slots.
        let r = redis().await.with_minute_ms(600);
        let rl = RateLimitConfig {
            tokens_per_minute: Some(100),
            ..Default::default()
        };
        let t0 = Instant::now();
        let first = r
            .admit(&req(&rl, 60), FailureMode::Closed)
            .await
            .unwrap()
            .unwrap();
        assert!(r.admit(&req(&rl, 50), FailureMode::Closed).await.is_err());
        tokio::time::sleep(Duration::from_millis(300)).await;
        r.admit(&req(&rl, 40), FailureMode::Closed).await.unwrap();
        assert!(r.admit(&req(&rl, 1), FailureMode::Closed).await.is_err());
        // Once the first request's slot has left the window, its 60 tokens are free.
        let left = Duration::from_millis(620).saturating_sub(t0.elapsed());
        tokio::time::sleep(left).await;
        r.admit(&req(&rl, 50), FailureMode::Closed).await.unwrap();
        // Settling a reservation whose slot has left changes nothing.
        r.settle(first, 0, 0).await;
        assert!(r.admit(&req(&rl, 11), FailureMode::Closed).await.is_err());
        // After a long idle time everything is free again.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        r.admit(&req(&rl, 100), FailureMode::Closed).await.unwrap();
        // The running sum matches the sub-windows.
        let mut conn = r.conn.clone();
        let h: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(r.tenant_key("ns/t", "tpm"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let slots: i64 = h
            .iter()
            .filter(|(k, _)| k.parse::<u64>().is_ok())
            .map(|(_, v)| v)
            .sum();
        assert_eq!(h["s"], slots, "{h:?}");
        assert_eq!(slots, 100, "{h:?}");
    }

    #[tokio::test]
    async fn a_limit_moved_across_the_exact_log_bound_keeps_working() {
        let r = redis().await;
        for n in [5, 20_000, 5] {
            let rl = RateLimitConfig {
                requests_per_minute: Some(n),
                ..Default::default()
            };
            r.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
        }
        assert_eq!(
            r.metrics
                .redis_errors
                .get_or_create(&OpLabel { op: "admit" })
                .get(),
            0
        );
    }

    #[tokio::test]
    async fn budget_is_reserved_per_month_and_settled() {
        let r = redis().await;
        let none = RateLimitConfig::default();
        let mut q = req(&none, 0);
        q.rate_limit = None;
        q.budget_micros = Some(1_000);
        q.cost_micros = 600;
        let res = r.admit(&q, FailureMode::Closed).await.unwrap().unwrap();
        let e = r.admit(&q, FailureMode::Closed).await.unwrap_err();
        assert_eq!(e.kind, RefusalKind::Budget);
        assert!(e.message.contains("0.001"), "{}", e.message);
        assert!(e.retry_after <= 31 * 86_400 && e.retry_after >= 1);
        let month = res.month;
        assert_eq!(i64::from(crate::limits::current_month()), month);
        r.settle(res, 0, 100).await;
        assert_eq!(r.spent("ns/t", month).await, Some(100));
        r.admit(&q, FailureMode::Closed).await.unwrap();
        assert_eq!(r.spent("ns/t", month).await, Some(700));
    }

    #[tokio::test]
    async fn replicas_share_one_limit_under_concurrency() {
        let a = Arc::new(redis().await);
        // A second client (another replica) on the same keys.
        let b = Arc::new(Redis {
            prefix: a.prefix.clone(),
            ..redis_at(&url())
        });
        let rl = RateLimitConfig {
            requests_per_minute: Some(7),
            ..Default::default()
        };
        let mut tasks = Vec::new();
        for i in 0..40 {
            let r = if i % 2 == 0 {
                Arc::clone(&a)
            } else {
                Arc::clone(&b)
            };
            tasks.push(tokio::spawn(async move {
                r.admit(&req(&rl, 0), FailureMode::Closed).await.is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        assert_eq!(ok, 7);
    }

    #[tokio::test]
    async fn two_chatbots_share_no_keys() {
        let a = redis().await;
        let b = Redis {
            prefix: a.prefix.clone(),
            ..Redis::connect(&url(), "x", "ns/other-cb", Arc::new(Metrics::new())).unwrap()
        };
        let k = a.tenant_key("ns/t", "rpm");
        assert!(
            k.starts_with(&format!("{}{{ns/cb:ns/t}}:", a.prefix)),
            "{k}"
        );
        let rl = RateLimitConfig {
            requests_per_minute: Some(1),
            ..Default::default()
        };
        a.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
        assert!(a.admit(&req(&rl, 0), FailureMode::Closed).await.is_err());
        b.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
        let ttl = Duration::from_secs(60);
        assert!(
            a.session_append(
                "ns/t",
                "s",
                &[json!({"role": "user", "content": "x"})],
                10,
                ttl
            )
            .await
        );
        assert!(b.session_load("ns/t", "s", ttl).await.unwrap().is_empty());
        let e = CachedEntry {
            model: "m".into(),
            backend: "b".into(),
            usage: Usage::default(),
            body: Bytes::from_static(b"{}"),
        };
        a.cache_put("ns/t", &[1; 32], &e, ttl).await;
        assert_eq!(b.cache_get("ns/t", &[1; 32]).await, None);
        assert_eq!(a.cache_get("ns/t", &[1; 32]).await, Some(e));
    }

    #[tokio::test]
    async fn unreachable_redis_follows_the_failure_mode_quickly() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = redis_at(&format!("redis://127.0.0.1:{port}"));
        let rl = RateLimitConfig {
            requests_per_minute: Some(1),
            ..Default::default()
        };
        let t = Instant::now();
        assert!(
            r.admit(&req(&rl, 0), FailureMode::Open)
                .await
                .unwrap()
                .is_none()
        );
        let e = r
            .admit(&req(&rl, 0), FailureMode::Closed)
            .await
            .unwrap_err();
        assert_eq!(e.kind, RefusalKind::Unavailable);
        assert!(e.message.contains("Redis"), "{}", e.message);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(
            r.metrics
                .encode()
                .contains("parley_redis_errors_total{op=\"admit\"} 2")
        );
    }

    #[tokio::test]
    async fn sessions_trim_like_the_local_store_and_stay_per_tenant() {
        let r = redis().await;
        let ttl = Duration::from_secs(60);
        let msgs = [
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "tool_calls": [{"id": "1"}]}),
            json!({"role": "tool", "tool_call_id": "1", "content": "r"}),
            json!({"role": "tool", "tool_call_id": "2", "content": "r"}),
            json!({"role": "assistant", "content": "done"}),
            json!({"role": "user", "content": "b"}),
        ];
        for max in 1..=7 {
            let session = format!("s{max}");
            for chunk in msgs.chunks(2) {
                assert!(r.session_append("ns/a", &session, chunk, max, ttl).await);
            }
            let mut expected = Vec::new();
            for chunk in msgs.chunks(2) {
                expected.extend(chunk.iter().cloned());
                trim(&mut expected, max);
            }
            let got = r.session_load("ns/a", &session, ttl).await.unwrap();
            assert_eq!(got, expected, "max {max}");
        }
        assert!(r.session_load("ns/b", "s7", ttl).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn cache_entries_round_trip_and_expire() {
        let r = redis().await;
        let e = CachedEntry {
            model: "m".into(),
            backend: "b".into(),
            usage: Usage {
                input: 3,
                output: 4,
            },
            body: Bytes::from_static(b"{\"x\":\n1}"),
        };
        let k = [7u8; 32];
        r.cache_put("ns/a", &k, &e, Duration::from_millis(300))
            .await;
        assert_eq!(r.cache_get("ns/a", &k).await, Some(e));
        assert_eq!(r.cache_get("ns/b", &k).await, None);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(r.cache_get("ns/a", &k).await, None);
    }
}
