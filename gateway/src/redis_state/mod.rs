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
//!   expires. Settling to real usage happens off the request path: settles are summed
//!   and ride along with the tenant's next admission script call, or, when none comes
//!   within [`SETTLE_DELAY`], go out as one more script ([`SETTLE_LUA`]).
//! - Sessions: one list per tenant and session; appending and trimming is one script.
//! - Cache: one string per entry, `SET ... PX ttl`.
//!
//! Keys are `parley:v1:{<chatbot>:<tenant>}:...` (the version in the prefix changes with
//! the layout; the braces keep one decision's keys in one cluster slot; the Chatbot
//! `namespace/name` keeps two Chatbots that share a Redis and a Tenant apart). Every command is bounded
//! by a short timeout; the connection is multiplexed and reconnects by itself.
//!
//! Redis Cluster: a `redis+cluster://` (or `rediss+cluster://`) URL names one or more seed
//! nodes (`redis+cluster://:pw@host1:6379,host2:6379`); the client learns the slot map
//! from them, sends each script to the master of its keys' slot, follows MOVED/ASK and
//! refreshes the map when a master fails over.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parley_crds::gateway_config::FailureMode;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Script};
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

/// The admission script: settles, then a batch of decisions in order. ARGV: member,
/// number of specs, per spec `key_index kind limit width_ms slots total count` (kind `L`
/// sliding log over `width_ms`, `S` `slots` sub-windows of `width_ms`, `B` monthly
/// budget; the batch's sum of amounts and number of requests with it), number of settles,
/// per settle `n key_index... budget_key_index slot token_delta month cost_delta width_ms
/// slots`, number of requests, `1` if no key has two specs (else `0`), the requests in one
/// argument (per request `n` then `n` times `spec amount`, space-separated). KEYS: every
/// key once (the budget key gets `:<month>` appended). Returns `{now_ms, month}` when the
/// whole batch fits and is admitted (the script then never reads the requests), else
/// `{now_ms, month}` followed by four numbers per request: `{1, 0, 0, 0}` or
/// `{0, check index, retry_ms, spent}`.
pub const ADMIT_LUA: &str = include_str!("admit.lua");

/// The settle script. ARGV: number of token keys, slot, token delta, month, cost delta.
/// KEYS: the token slot hashes, then the budget key (if any). A slot that has left its
/// window is not touched; a slot never goes below zero.
pub const SETTLE_LUA: &str = include_str!("settle.lua");

/// Appends to a session and trims it. Each element is `t` (a tool result) or `m`,
/// followed by the message's JSON. ARGV: max messages, TTL ms, elements. The cut moves
/// forward past leading tool results (as `sessions::trim` does).
pub const SESSION_APPEND_LUA: &str = include_str!("session_append.lua");

static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT_LUA));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(SETTLE_LUA));
static SESSION_APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(SESSION_APPEND_LUA));

/// One multiplexed connection to a single Redis, or to a Redis Cluster (connected on first
/// use: building the client does no network I/O).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

struct LazyCluster {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
}

impl LazyCluster {
    /// The connection, connecting first if needed. A failed (or cancelled) first connect
    /// leaves the cell empty, so the next command tries again.
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(lazy) => Box::pin(async move {
                let mut c = lazy.get().await?;
                c.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(lazy) => Box::pin(async move {
                let mut c = lazy.get().await?;
                c.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

/// A Redis connection for shared state.
pub struct Redis {
    conn: Conn,
    prefix: String,
    /// `namespace/name` of the Chatbot: in every key's hash tag.
    chatbot: String,
    /// The same, as the `chatbot` label of `parley_redis_up`.
    chatbot_label: Arc<String>,
    /// Length of a "minute" in ms (60 000; tests shorten it; hours and days scale).
    minute_ms: u64,
    metrics: Arc<Metrics>,
    last_warning: AtomicU64,
    /// Feeds the admission batcher (started on the first admission, see [`admit_batcher`]).
    admits: std::sync::OnceLock<tokio::sync::mpsc::Sender<AdmitJob>>,
    /// Summed settles waiting for an admission of their tenant or for the flusher.
    pending: SettleQueue,
    /// Set once the settle flusher runs (started on the first settle, see
    /// [`Redis::settle_later`]).
    flusher: std::sync::OnceLock<()>,
}

/// The client's pending settles; dropping it (with the client) wakes the flusher, which
/// sends what is still pending, then ends.
#[derive(Default)]
struct SettleQueue(Arc<PendingSettles>);

impl std::ops::Deref for SettleQueue {
    type Target = Arc<PendingSettles>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for SettleQueue {
    fn drop(&mut self) {
        self.0.wake.notify_one();
    }
}

/// Settles not sent yet, summed per tenant (keys' hash tag), then per (keys, slot, month):
/// a tenant has a handful of sums at a time, so finding one is a short scan.
#[derive(Default)]
struct PendingSettles {
    inner: Mutex<PendingInner>,
    /// Woken when the first sum arrives (and when the client is dropped).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct PendingInner {
    by_tag: HashMap<String, Vec<SettleSum>>,
    len: usize,
}

/// The sum of settles of the same keys, slot and month.
struct SettleSum {
    r: RedisReservation,
    dt: i128,
    dc: i64,
    /// When its first settle arrived.
    since: std::time::Instant,
}

impl PendingSettles {
    /// Adds a settle; `false` if too many sums are waiting (it is dropped).
    fn add(&self, r: RedisReservation, dt: i128, dc: i64) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let first = inner.len == 0;
        let full = inner.len >= SETTLE_QUEUE;
        let sums = match inner.by_tag.get_mut(r.tag()) {
            Some(sums) => sums,
            None if full => return false,
            None => inner.by_tag.entry(r.tag().to_string()).or_default(),
        };
        if let Some(s) = sums
            .iter_mut()
            .find(|s| s.r.slot == r.slot && s.r.month == r.month && s.r.same_keys(&r))
        {
            s.dt += dt;
            s.dc = s.dc.saturating_add(dc);
            return true;
        }
        if full {
            return false;
        }
        sums.push(SettleSum {
            r,
            dt,
            dc,
            since: std::time::Instant::now(),
        });
        inner.len += 1;
        drop(inner);
        if first {
            self.wake.notify_one();
        }
        true
    }

    /// The sums of one tenant (they go with its admissions).
    fn take(&self, tag: &str) -> Vec<SettleSum> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.len == 0 {
            return Vec::new();
        }
        let sums = inner.by_tag.remove(tag).unwrap_or_default();
        inner.len -= sums.len();
        sums
    }

    /// The sums that have waited [`SETTLE_DELAY`] at `now` (all of them if `all`), and
    /// when the oldest of the others will have.
    fn take_due(
        &self,
        now: std::time::Instant,
        all: bool,
    ) -> (Vec<SettleSum>, Option<std::time::Instant>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut due = Vec::new();
        let mut next: Option<std::time::Instant> = None;
        inner.by_tag.retain(|_, sums| {
            let mut i = 0;
            while i < sums.len() {
                let at = sums[i].since + SETTLE_DELAY;
                if all || at <= now {
                    due.push(sums.swap_remove(i));
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                    i += 1;
                }
            }
            !sums.is_empty()
        });
        inner.len -= due.len();
        (due, next)
    }
}

/// An admission waiting for the batcher.
struct AdmitJob {
    /// Never empty; all with one hash tag (the tenant).
    checks: Arc<Vec<Check>>,
    reply: tokio::sync::oneshot::Sender<Result<Decided, String>>,
}

impl AdmitJob {
    /// Its keys' hash tag (the tenant; the Chatbot is the same for every job of a client):
    /// one script call per tag, so in a cluster each goes to its slot's master.
    fn tag(&self) -> &str {
        self.checks.first().map_or("", |c| tag(&c.key))
    }
}

/// A key up to the end of its hash tag.
fn tag(key: &str) -> &str {
    key.find('}').map_or(key, |i| &key[..=i])
}

/// The script's answer for one admission: `reply` is `[1, 0, 0, 0]` (admitted) or
/// `[0, check, retry_ms, spent]`; `now` and `month` are Redis's.
struct Decided {
    now: i64,
    month: i64,
    reply: [i64; 4],
}

/// Most admissions one batch takes off the queue.
const ADMIT_BATCH: usize = 512;
/// Admissions waiting beyond this many are refused as if Redis were down.
const ADMIT_QUEUE: usize = 16_384;

/// Longest a settle waits for an admission of its tenant to ride along with before it is
/// sent on its own.
pub const SETTLE_DELAY: Duration = Duration::from_millis(5);
/// Distinct settle sums waiting beyond this many (Redis slow or down) are dropped and
/// counted as errors: settling only corrects a reservation, and memory must stay bounded.
const SETTLE_QUEUE: usize = 65_536;

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
    /// The admission's checks (their keys), shared with it rather than copied.
    checks: Arc<Vec<Check>>,
    slot: u64,
    admitted_ms: u64,
    month: i64,
    tokens: u64,
    cost_micros: i64,
}

#[derive(Debug)]
struct Check {
    key: String,
    kind: &'static str,
    limit: u64,
    width_ms: u64,
    slots: u64,
    amount: u64,
    scope: Scope,
}

/// What a check limits: its refusal message is only written when it refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    SessionRpm,
    TenantRpm,
    TenantRph,
    TenantRpd,
    TenantTpm,
    ModelRpm,
    ModelTpm,
    Budget,
}

impl Scope {
    fn unit(self) -> &'static str {
        match self {
            Self::TenantTpm | Self::ModelTpm => "tokens",
            Self::Budget => "usd",
            _ => "requests",
        }
    }

    fn what(self, limit: u64, req: &LimitRequest<'_>) -> String {
        match self {
            Self::SessionRpm => format!(
                "session requests per minute ({limit}) for session {:?}",
                req.session.map_or("", |s| s.0)
            ),
            Self::TenantRpm => format!("tenant limit requestsPerMinute ({limit})"),
            Self::TenantRph => format!("tenant limit requestsPerHour ({limit})"),
            Self::TenantRpd => format!("tenant limit requestsPerDay ({limit})"),
            Self::TenantTpm => format!(
                "tenant limit tokensPerMinute ({limit}; this request reserves {} tokens: prompt + max_tokens)",
                req.tokens
            ),
            Self::ModelRpm => format!("model quota requestsPerMinute ({limit}) on {}", req.model),
            Self::ModelTpm => format!("model quota tokensPerMinute ({limit}) on {}", req.model),
            Self::Budget => String::new(),
        }
    }
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

/// Where a `redis.url` points.
enum Target {
    /// One Redis (`redis://`, `rediss://`).
    Single(Box<redis::Client>),
    /// A Redis Cluster: the seed nodes as plain `redis://` / `rediss://` URLs.
    Cluster(Vec<String>),
}

const URL_SCHEMES: &str =
    "redis.url must start with redis://, rediss://, redis+cluster:// or rediss+cluster://";

/// Parses a `redis.url` (never echoing it: it may hold a password).
fn parse_url(url: &str) -> Result<Target, String> {
    let invalid = |e: RedisError| format!("redis.url is not a valid Redis URL ({})", e.kind_name());
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return redis::Client::open(url)
            .map(|c| Target::Single(Box::new(c)))
            .map_err(invalid);
    }
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Err(URL_SCHEMES.into());
    };
    // `[user:password@]host:port[,host:port...][/0]`: credentials apply to every node.
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, rest),
    };
    let (hosts, db) = hosts.split_once('/').unwrap_or((hosts, ""));
    if !(db.is_empty() || db == "0") {
        return Err("redis.url: a Redis Cluster has only database 0 (drop the /<db> of the redis+cluster:// URL)".into());
    }
    let mut nodes = Vec::new();
    for host in hosts.split(',').map(str::trim) {
        if host.is_empty() {
            return Err("redis.url: a redis+cluster:// URL needs at least one host:port, and no empty entries between commas".into());
        }
        let node = match auth {
            Some(auth) => format!("{scheme}://{auth}@{host}"),
            None => format!("{scheme}://{host}"),
        };
        redis::Client::open(node.as_str()).map_err(invalid)?;
        nodes.push(node);
    }
    Ok(Target::Cluster(nodes))
}

/// Whether a URL is one this gateway accepts for Redis (never echo the URL itself).
pub fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(|_| ())
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
        let conn = match parse_url(url)? {
            Target::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(50));
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(*client, config).map_err(|e| {
                        format!("redis: cannot set up the connection ({})", e.kind_name())
                    })?,
                )
            }
            Target::Cluster(nodes) => {
                // Every call is bounded by COMMAND_TIMEOUT around it (a request gets a
                // clear answer, never a hang); inside it the client may reconnect and
                // follow MOVED/ASK while a master fails over.
                let client = ClusterClientBuilder::new(nodes)
                    .connection_timeout(Duration::from_secs(1))
                    .overall_response_timeout(None)
                    .retries(3)
                    .min_retry_wait(5)
                    .max_retry_wait(30)
                    .build()
                    .map_err(|e| {
                        format!(
                            "redis.url is not a valid Redis Cluster URL ({})",
                            e.kind_name()
                        )
                    })?;
                Conn::Cluster(Arc::new(LazyCluster {
                    client,
                    conn: tokio::sync::OnceCell::new(),
                }))
            }
        };
        // Connect and load the scripts now rather than on the first requests (a cluster
        // connects to every master; a failover's new master loads them on NOSCRIPT).
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let mut c = conn.clone();
            handle.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    ADMIT.load_async(&mut c).await?;
                    SETTLE.load_async(&mut c).await
                })
                .await;
            });
        }
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            chatbot: chatbot.to_string(),
            chatbot_label: Arc::new(chatbot.to_string()),
            minute_ms: 60_000,
            metrics,
            last_warning: AtomicU64::new(0),
            admits: std::sync::OnceLock::new(),
            pending: SettleQueue::default(),
            flusher: std::sync::OnceLock::new(),
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

    fn up(&self, up: bool) {
        self.metrics
            .redis_up
            .get_or_create(&crate::metrics::ChatbotLabel {
                chatbot: Arc::clone(&self.chatbot_label),
            })
            .set(i64::from(up));
    }

    fn error(&self, op: &'static str, e: &str) {
        self.up(false);
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
            Ok(Ok(v)) => {
                self.up(true);
                Some(v)
            }
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
        let per_minute = |key: String, n: u64, scope: Scope| {
            if n <= EXACT_LOG_MAX {
                Check {
                    key,
                    kind: "L",
                    limit: n,
                    width_ms: minute,
                    slots: 1,
                    amount: 1,
                    scope,
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
                    scope,
                }
            }
        };
        if let Some((session, rpm)) = req.session {
            out.push(per_minute(
                self.tenant_key(t, &format!("s:{session}:rpm")),
                rpm,
                Scope::SessionRpm,
            ));
        }
        if let Some(rl) = req.rate_limit {
            if let Some(n) = rl.requests_per_minute {
                out.push(per_minute(self.tenant_key(t, "rpm"), n, Scope::TenantRpm));
            }
            for (n, scope, width) in [
                (rl.requests_per_hour, Scope::TenantRph, minute),
                (rl.requests_per_day, Scope::TenantRpd, minute * 24),
            ] {
                if let Some(n) = n {
                    out.push(Check {
                        key: self.tenant_key(t, if width == minute { "rph" } else { "rpd" }),
                        kind: "S",
                        limit: n,
                        width_ms: width,
                        slots: 60,
                        amount: 1,
                        scope,
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
                    scope: Scope::TenantTpm,
                });
            }
        }
        if let Some(q) = req.quota {
            if let Some(n) = q.requests_per_minute {
                out.push(per_minute(
                    self.tenant_key(t, &format!("m:{}:rpm", req.model)),
                    n,
                    Scope::ModelRpm,
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
                    scope: Scope::ModelTpm,
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
                scope: Scope::Budget,
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
        // Shared with the batcher: the keys are not copied again.
        let checks = Arc::new(self.checks(req));
        if checks.is_empty() {
            self.decision("admitted");
            return Ok(None);
        }
        let result = self.decide(Arc::clone(&checks)).await;
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
        match r {
            Decided {
                now,
                month,
                reply: [1, ..],
            } => {
                self.decision("admitted");
                let token_width = self.minute_ms / 60;
                Ok(Some(RedisReservation {
                    checks,
                    slot: now.max(0) as u64 / token_width.max(1),
                    admitted_ms: now.max(0) as u64,
                    month,
                    tokens: req.tokens,
                    cost_micros: req.cost_micros,
                }))
            }
            Decided {
                reply: [0, idx, retry_ms, spent],
                ..
            } => {
                self.decision("refused");
                let c = usize::try_from(idx - 1).ok().and_then(|i| checks.get(i));
                let Some(c) = c else {
                    return Err(refusal("a limit".into(), 1, 0, "requests"));
                };
                let secs = ceil_secs_ms(retry_ms);
                if c.kind == "B" {
                    return Err(Refusal {
                        kind: RefusalKind::Budget,
                        message: format!(
                            "monthly budget of {} USD is spent ({} USD used or reserved); it resets at the start of next month (UTC)",
                            parley_crds::money::format_usd_micros(c.limit as i64),
                            parley_crds::money::format_usd_micros(spent)
                        ),
                        retry_after: secs,
                        limit: 0,
                        unit: "usd",
                    });
                }
                Err(refusal(
                    c.scope.what(c.limit, req),
                    secs,
                    c.limit,
                    c.scope.unit(),
                ))
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

    /// Hands the decision to the admission batcher and waits for it. `None`: Redis failed
    /// or did not answer in time (counted as an error).
    async fn decide(&self, checks: Arc<Vec<Check>>) -> Option<Decided> {
        let tx = self.admits.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(ADMIT_QUEUE);
            // It ends when this client is dropped (the channel closes).
            tokio::spawn(admit_batcher(
                self.conn.clone(),
                rx,
                Arc::clone(&self.pending.0),
                Arc::clone(&self.metrics),
            ));
            tx
        });
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = AdmitJob { checks, reply };
        if tx.try_send(job).is_err() {
            self.error("admit", "admission queue full");
            return None;
        }
        // The batch itself is bounded by COMMAND_TIMEOUT; waiting for the batch ahead of
        // it can add at most as much again.
        match tokio::time::timeout(2 * COMMAND_TIMEOUT, rx).await {
            Ok(Ok(Ok(d))) => {
                self.up(true);
                Some(d)
            }
            Ok(Ok(Err(e))) => {
                self.error("admit", &e);
                None
            }
            Ok(Err(_)) => {
                self.error("admit", "admission batcher stopped");
                None
            }
            Err(_) => {
                self.error("admit", "timeout");
                None
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

    /// Replaces a reservation by what was really used, now.
    pub async fn settle(&self, r: RedisReservation, tokens: u64, cost_micros: i64) {
        let dt = i128::from(tokens) - i128::from(r.tokens);
        let dc = cost_micros.saturating_sub(r.cost_micros);
        if settles_nothing(&r, dt, dc) {
            return;
        }
        self.settle_sum(&r, dt, dc).await;
    }

    /// One settle script call for the sum of settles of the same keys and slot.
    async fn settle_sum(&self, r: &RedisReservation, dt: i128, dc: i64) {
        let _ = self
            .run("settle", send_settle(self.conn.clone(), r, dt, dc))
            .await;
    }

    /// Settles off the request path: the delta is added to a sum per tenant and (keys,
    /// slot, month), and the sums go out with the tenant's next admission script call
    /// (applied before its decisions), so under load a settle costs no command of its
    /// own. Sums no admission took within [`SETTLE_DELAY`] are sent by a flusher task,
    /// one settle script call each, pipelined. Settles only correct token and budget
    /// reservations (never request counts), and adding deltas commutes, so summing them
    /// changes no decision.
    pub fn settle_later(self: &Arc<Self>, r: RedisReservation, tokens: u64, cost_micros: i64) {
        let dt = i128::from(tokens) - i128::from(r.tokens);
        let dc = cost_micros.saturating_sub(r.cost_micros);
        if settles_nothing(&r, dt, dc) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.flusher.get_or_init(|| {
            // A weak reference: the task ends when the client is dropped (a reload
            // replaced it), after sending what is still pending.
            handle.spawn(settle_flusher(
                Arc::downgrade(self),
                self.conn.clone(),
                Arc::clone(&self.pending.0),
            ));
        });
        if !self.pending.add(r, dt, dc) {
            self.error("settle", "settle queue full");
        }
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

    fn token_checks(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.scope.unit() == "tokens")
    }

    fn budget_key(&self) -> Option<&str> {
        self.checks
            .iter()
            .find(|c| c.kind == "B")
            .map(|c| c.key.as_str())
    }

    fn tag(&self) -> &str {
        self.checks.first().map_or("", |c| tag(&c.key))
    }

    /// Whether a settle of `o` changes the same keys.
    fn same_keys(&self, o: &Self) -> bool {
        Arc::ptr_eq(&self.checks, &o.checks)
            || (self
                .token_checks()
                .map(|c| &c.key)
                .eq(o.token_checks().map(|c| &c.key))
                && self.budget_key() == o.budget_key())
    }
}

/// Decides admissions in batches: whatever is queued when it wakes (up to
/// [`ADMIT_BATCH`]) becomes one [`ADMIT_LUA`] call per tenant, all of them pipelined on the
/// multiplexed connection, while the next admissions queue up. Each script call is atomic:
/// it first applies the tenant's pending settles, then decides its admissions one after the
/// other, exactly as one call each would, but reads each key once and writes it once, so
/// Redis works per batch, not per request.
async fn admit_batcher(
    conn: Conn,
    mut rx: tokio::sync::mpsc::Receiver<AdmitJob>,
    pending: Arc<PendingSettles>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, ADMIT_BATCH).await > 0 {
        gather(&mut rx, &mut batch).await;
        // Requests that gave up (timed out) are not decided: nobody would be served.
        batch.retain(|j| !j.reply.is_closed());
        // Stable: each tenant's admissions keep their order.
        batch.sort_by(|a, b| a.tag().cmp(b.tag()));
        let mut groups: Vec<Vec<AdmitJob>> = Vec::new();
        for job in batch.drain(..) {
            match groups.last_mut() {
                Some(g) if g[0].tag() == job.tag() => g.push(job),
                _ => groups.push(vec![job]),
            }
        }
        futures_util::future::join_all(groups.into_iter().map(|g| {
            let settles = pending.take(g[0].tag());
            admit_group(conn.clone(), g, settles, &metrics)
        }))
        .await;
    }
}

/// Most times the batcher yields to let a batch grow (see [`gather`]).
const GATHER_YIELDS: usize = 4;

/// Lets a batch that arrived with company grow before it is sent: yields to the
/// runtime (no timer, so no added latency when nothing else is runnable), and takes
/// what the request tasks polled meanwhile queued, as long as each yield brings more.
/// Under load a script call costs Redis far more than one more request in it (its Lua
/// set-up, `TIME`, and one read and one write per key do not grow with the batch), so
/// larger batches leave more CPU to everything else; a lone admission is sent at once.
async fn gather(rx: &mut tokio::sync::mpsc::Receiver<AdmitJob>, batch: &mut Vec<AdmitJob>) {
    for _ in 0..GATHER_YIELDS {
        if batch.len() < 2 || batch.len() >= ADMIT_BATCH {
            return;
        }
        tokio::task::yield_now().await;
        let before = batch.len();
        while batch.len() < ADMIT_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if batch.len() == before {
            return;
        }
    }
}

/// A distinct check of a batch, with the batch's total amount and number of requests.
struct Spec<'a> {
    /// 1-based index in KEYS.
    ki: usize,
    c: &'a Check,
    total: u64,
    count: u64,
}

/// The 1-based index of `key` in `keys`, added if new.
fn key_index<'a>(keys: &mut Vec<&'a str>, key: &'a str) -> usize {
    match keys.iter().position(|k| *k == key) {
        Some(i) => i + 1,
        None => {
            keys.push(key);
            keys.len()
        }
    }
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// One script call applying `settles` and deciding `jobs` (all of one tenant) in order;
/// answers each. Built as one command buffer (no allocation per argument).
async fn admit_group(
    mut conn: Conn,
    jobs: Vec<AdmitJob>,
    settles: Vec<SettleSum>,
    metrics: &Metrics,
) {
    let mut keys: Vec<&str> = Vec::new();
    // Distinct (key, kind, limit, width, slots) with the batch's total and count: most
    // requests of a batch share them, and when the totals fit the script reads nothing
    // per request. The requests go in one argument, read only when they do not.
    let mut specs: Vec<Spec<'_>> = Vec::new();
    let mut packed = String::with_capacity(jobs.len() * 16);
    for job in &jobs {
        let _ = write!(packed, "{} ", job.checks.len());
        for c in job.checks.iter() {
            let ki = key_index(&mut keys, &c.key);
            let j = match specs.iter().position(|s| {
                s.ki == ki
                    && s.c.kind == c.kind
                    && s.c.limit == c.limit
                    && s.c.width_ms == c.width_ms
                    && s.c.slots == c.slots
            }) {
                Some(j) => j,
                None => {
                    specs.push(Spec {
                        ki,
                        c,
                        total: 0,
                        count: 0,
                    });
                    specs.len() - 1
                }
            };
            specs[j].total = specs[j].total.saturating_add(c.amount);
            specs[j].count += 1;
            let _ = write!(packed, "{} {} ", j + 1, c.amount);
        }
    }
    let fast = specs
        .iter()
        .enumerate()
        .all(|(i, s)| specs[..i].iter().all(|o| o.ki != s.ki));
    let mut settle_keys: Vec<usize> = Vec::new();
    for s in &settles {
        for c in s.r.token_checks() {
            settle_keys.push(key_index(&mut keys, &c.key));
        }
        settle_keys.push(s.r.budget_key().map_or(0, |b| key_index(&mut keys, b)));
    }
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(ADMIT.get_hash()).arg(keys.len());
    for k in &keys {
        cmd.arg(*k);
    }
    cmd.arg(fastrand::u64(..)).arg(specs.len());
    for s in &specs {
        cmd.arg(s.ki)
            .arg(s.c.kind)
            .arg(s.c.limit)
            .arg(s.c.width_ms)
            .arg(s.c.slots)
            .arg(s.total)
            .arg(s.count);
    }
    cmd.arg(settles.len());
    let mut sk = settle_keys.iter();
    for s in &settles {
        let (width, slots) =
            s.r.token_checks()
                .next()
                .map_or((1, 1), |c| (c.width_ms, c.slots));
        cmd.arg(s.r.token_checks().count());
        for _ in s.r.token_checks() {
            cmd.arg(sk.next().copied().unwrap_or(0));
        }
        cmd.arg(sk.next().copied().unwrap_or(0))
            .arg(s.r.slot)
            .arg(clamp_i64(s.dt))
            .arg(s.r.month)
            .arg(s.dc)
            .arg(width)
            .arg(slots);
    }
    cmd.arg(jobs.len()).arg(u8::from(fast)).arg(packed.as_str());
    let result = match tokio::time::timeout(
        COMMAND_TIMEOUT,
        eval::<Vec<i64>>(&ADMIT, &cmd, &mut conn),
    )
    .await
    {
        Ok(Ok(v)) if v.len() == 2 || v.len() == 2 + 4 * jobs.len() => Ok(v),
        Ok(Ok(_)) => Err("unexpected script reply".to_string()),
        Ok(Err(e)) => Err(e.kind_name()),
        Err(_) => Err("timeout".to_string()),
    };
    if result.is_err() && !settles.is_empty() {
        // Like a failed settle script call: the settles may not have been applied.
        metrics
            .redis_errors
            .get_or_create(&OpLabel { op: "settle" })
            .inc();
    }
    for (i, job) in jobs.into_iter().enumerate() {
        let answer = match &result {
            Ok(v) => {
                let at = 2 + 4 * i;
                Ok(Decided {
                    now: v[0],
                    month: v[1],
                    reply: match v.get(at..at + 4) {
                        Some(&[a, b, c, d]) => [a, b, c, d],
                        // The whole batch was admitted.
                        _ => [1, 0, 0, 0],
                    },
                })
            }
            Err(e) => Err(e.clone()),
        };
        let _ = job.reply.send(answer);
    }
}

/// Runs an `EVALSHA` command of `script`, loading the script first if Redis lacks it
/// (a restart or a failover to a new master).
async fn eval<T: redis::FromRedisValue>(
    script: &Script,
    cmd: &Cmd,
    conn: &mut Conn,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

/// One [`SETTLE_LUA`] call.
async fn send_settle(
    mut conn: Conn,
    r: &RedisReservation,
    dt: i128,
    dc: i64,
) -> redis::RedisResult<i64> {
    let nt = r.token_checks().count();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(SETTLE.get_hash())
        .arg(nt + usize::from(r.budget_key().is_some()));
    for c in r.token_checks() {
        cmd.arg(&c.key);
    }
    if let Some(b) = r.budget_key() {
        cmd.arg(b);
    }
    cmd.arg(nt)
        .arg(r.slot)
        .arg(clamp_i64(dt))
        .arg(r.month)
        .arg(dc);
    eval(&SETTLE, &cmd, &mut conn).await
}

fn settles_nothing(r: &RedisReservation, dt: i128, dc: i64) -> bool {
    (dt == 0 || r.token_checks().next().is_none()) && (dc == 0 || r.budget_key().is_none())
}

/// Sends each settle sum that no admission took within [`SETTLE_DELAY`] of its first
/// settle (under load admissions take nearly all of them); once the client is gone,
/// sends what is left and ends.
async fn settle_flusher(redis: Weak<Redis>, conn: Conn, pending: Arc<PendingSettles>) {
    loop {
        // Woken by the first sum after the queue was empty (or by the client's drop).
        pending.wake.notified().await;
        let mut at = tokio::time::Instant::now() + SETTLE_DELAY;
        loop {
            tokio::time::sleep_until(at).await;
            let closing = redis.strong_count() == 0;
            let (due, next) = pending.take_due(std::time::Instant::now(), closing);
            let due = due.iter().filter(|s| !settles_nothing(&s.r, s.dt, s.dc));
            match redis.upgrade() {
                Some(redis) => {
                    futures_util::future::join_all(due.map(|s| redis.settle_sum(&s.r, s.dt, s.dc)))
                        .await;
                }
                None => {
                    futures_util::future::join_all(due.map(|s| {
                        tokio::time::timeout(
                            COMMAND_TIMEOUT,
                            send_settle(conn.clone(), &s.r, s.dt, s.dc),
                        )
                    }))
                    .await;
                    if closing {
                        return;
                    }
                }
            }
            match next {
                Some(t) => at = t.into(),
                None => break,
            }
        }
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

mod responses;

#[cfg(test)]
mod tests;
