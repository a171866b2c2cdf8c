//! Admission limits: tenant requests per minute/hour/day, tokens per minute, per-model
//! quotas, per-session requests per minute and the monthly budget.
//!
//! This file holds the in-process implementation, used when no Redis is configured
//! (`redis_state` has the shared one; `store::Store` chooses). A per-minute limit of N
//! admits at most N requests in any 60 s (an exact sliding log); hour and day limits
//! count in sixty sub-windows. Tokens and cost are reserved at admission and settled to
//! real usage afterwards.
//!
//! Each tenant's state has its own lock (one tenant's traffic never waits on another's),
//! and per-session logs live in a bounded cache that forgets idle sessions: nothing on
//! the request path sweeps a whole table.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use parley_crds::gateway_config::{ModelQuotaConfig, RateLimitConfig};

/// What a request asks the limiter for.
#[derive(Debug, Clone)]
pub struct LimitRequest<'a> {
    /// Tenant id.
    pub tenant: &'a str,
    /// Tenant-wide limits.
    pub rate_limit: Option<&'a RateLimitConfig>,
    /// The tenant's quota on the requested model.
    pub quota: Option<&'a ModelQuotaConfig>,
    /// The requested model.
    pub model: &'a str,
    /// `(session id, requests per minute)` for `/chat`.
    pub session: Option<(&'a str, u64)>,
    /// Tokens reserved (prompt estimate + max output).
    pub tokens: u64,
    /// Monthly budget in micro-USD, if any.
    pub budget_micros: Option<i64>,
    /// Cost reserved in micro-USD.
    pub cost_micros: i64,
}

/// What kind of refusal it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// A rate limit or quota (429).
    Rate,
    /// The monthly budget (402).
    Budget,
    /// The shared limit store is unreachable and the failure mode is `closed` (503).
    Unavailable,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Which status it becomes.
    pub kind: RefusalKind,
    /// Names the limit.
    pub message: String,
    /// Whole seconds until it could pass.
    pub retry_after: u64,
    /// The limit that refused.
    pub limit: u64,
    /// `requests` or `tokens`.
    pub unit: &'static str,
}

/// What was reserved; hand it back to [`Limiter::settle`].
#[derive(Debug, Clone, Default)]
pub struct Reservation {
    tenant: String,
    model: String,
    slot: u64,
    tokens: u64,
    cost_micros: i64,
    month: u32,
}

/// Exact sliding log of request times.
#[derive(Debug, Default)]
struct RequestLog {
    times: VecDeque<Instant>,
}

impl RequestLog {
    fn evict(&mut self, now: Instant, window: Duration) {
        while let Some(&t) = self.times.front() {
            if now.duration_since(t) >= window {
                self.times.pop_front();
            } else {
                break;
            }
        }
    }
    /// `Err(seconds)` if one more would exceed `limit`.
    fn check(&mut self, now: Instant, window: Duration, limit: u64) -> Result<(), u64> {
        self.evict(now, window);
        if (self.times.len() as u64) < limit {
            return Ok(());
        }
        // The request can pass once the entry that makes the log full leaves the window.
        let idx = (self.times.len() as u64 - limit) as usize;
        let wait = self
            .times
            .get(idx)
            .map(|t| (*t + window).saturating_duration_since(now))
            .unwrap_or(window);
        Err(ceil_secs(wait))
    }
    fn add(&mut self, now: Instant) {
        self.times.push_back(now);
    }
}

/// Counts in `S` fixed slots of one width. The live window is the last `S` slots
/// including the current one, so it spans between `S - 1` and `S` slot widths. Memory is
/// fixed whatever the traffic.
#[derive(Debug)]
struct Slots<const S: usize> {
    slots: [(u64, u64); S],
}

impl<const S: usize> Default for Slots<S> {
    fn default() -> Self {
        Self {
            slots: [(u64::MAX, 0); S],
        }
    }
}

impl<const S: usize> Slots<S> {
    fn index(base: Instant, now: Instant, width: Duration) -> u64 {
        (now.duration_since(base).as_nanos() / width.as_nanos().max(1)) as u64
    }

    fn live(&self, current: u64) -> impl Iterator<Item = &(u64, u64)> {
        self.slots
            .iter()
            .filter(move |(i, _)| *i != u64::MAX && *i + S as u64 > current)
    }

    /// `Err(seconds)` if `amount` more would exceed `limit`.
    fn check(
        &self,
        base: Instant,
        now: Instant,
        width: Duration,
        limit: u64,
        amount: u64,
    ) -> Result<(), u64> {
        let current = Self::index(base, now, width);
        let sum: u64 = self.live(current).fold(0u64, |a, s| a.saturating_add(s.1));
        if sum.saturating_add(amount) <= limit {
            return Ok(());
        }
        let span = width * S as u32;
        if amount > limit {
            return Err(ceil_secs(span));
        }
        let mut live: Vec<(u64, u64)> = self.live(current).copied().collect();
        live.sort_unstable();
        let mut freed: u64 = 0;
        for (idx, n) in live {
            freed = freed.saturating_add(n);
            if sum.saturating_sub(freed).saturating_add(amount) <= limit {
                let frees_at = base + width * u32::try_from(idx + S as u64).unwrap_or(u32::MAX);
                return Err(ceil_secs(frees_at.saturating_duration_since(now)));
            }
        }
        Err(ceil_secs(span))
    }

    /// Counts `amount` now; returns the slot (for [`Slots::adjust`]).
    fn add(&mut self, base: Instant, now: Instant, width: Duration, amount: u64) -> u64 {
        let current = Self::index(base, now, width);
        let slot = &mut self.slots[(current % S as u64) as usize];
        if slot.0 != current {
            *slot = (current, 0);
        }
        slot.1 = slot.1.saturating_add(amount);
        current
    }

    /// Replaces `old` counted in slot `idx` by `new` (if the slot is still there).
    fn adjust(&mut self, idx: u64, old: u64, new: u64) {
        let slot = &mut self.slots[(idx % S as u64) as usize];
        if slot.0 == idx {
            slot.1 = slot.1.saturating_sub(old).saturating_add(new);
        }
    }
}

/// Per-minute token counting: 1-second slots over 61 s, so no 60-second window ever
/// holds more than the limit.
type TokenSlots = Slots<61>;
/// Hour and day limits count in sixty sub-windows.
type SubWindows = Slots<60>;
const SECOND: Duration = Duration::from_secs(1);
/// Up to this limit a per-minute request limit keeps an exact log of request times;
/// above it, 1-second slots (bounded memory, at most one second conservative).
const EXACT_LOG_MAX: u64 = 10_000;

/// Requests per minute: exact below [`EXACT_LOG_MAX`], slotted above.
#[derive(Debug, Default)]
struct MinuteRequests {
    exact: RequestLog,
    slots: Slots<61>,
}

impl MinuteRequests {
    fn check(&mut self, base: Instant, now: Instant, limit: u64) -> Result<(), u64> {
        if limit <= EXACT_LOG_MAX {
            self.exact.check(now, MINUTE, limit)
        } else {
            self.slots.check(base, now, SECOND, limit, 1)
        }
    }
    fn add(&mut self, base: Instant, now: Instant, limit: u64) {
        if limit <= EXACT_LOG_MAX {
            self.exact.add(now);
        } else {
            self.slots.add(base, now, SECOND, 1);
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs();
    if d.subsec_nanos() > 0 {
        s + 1
    } else {
        s.max(1)
    }
}

#[derive(Debug, Default)]
struct TenantState {
    rpm: MinuteRequests,
    rph: SubWindows,
    rpd: SubWindows,
    tpm: TokenSlots,
    models: HashMap<String, (MinuteRequests, TokenSlots)>,
    month: u32,
    spent_micros: i64,
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Most session logs kept (the least recently used are forgotten first; an idle one
/// after a minute, when it cannot refuse anything any more).
const MAX_SESSION_LOGS: u64 = 100_000;

/// The in-process limiter (one gateway replica).
pub struct MemoryLimiter {
    base: Instant,
    /// Tenant id -> its state, each behind its own lock. Tenants come from the config,
    /// so the map is as large as the config.
    tenants: RwLock<HashMap<String, Arc<Mutex<TenantState>>>>,
    /// `(tenant, session)` -> its request log.
    sessions: moka::sync::Cache<(String, String), Arc<Mutex<RequestLog>>>,
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter").finish_non_exhaustive()
    }
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            tenants: RwLock::new(HashMap::new()),
            sessions: moka::sync::Cache::builder()
                .max_capacity(MAX_SESSION_LOGS)
                .time_to_idle(MINUTE + SECOND)
                .build(),
        }
    }
}

/// The current UTC month as `year * 12 + month0`.
pub fn current_month() -> u32 {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    let (y, m) = civil_from_days(days);
    (y * 12 + (m - 1)) as u32
}

/// Seconds until the next UTC month starts.
pub fn secs_to_month_end() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m) = civil_from_days((now / 86_400) as i64);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let start = days_from_civil(ny, nm) as u64 * 86_400;
    start.saturating_sub(now).max(1)
}

/// Howard Hinnant's algorithm: days since 1970-01-01 -> (year, month 1..=12).
fn civil_from_days(z: i64) -> (i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

fn days_from_civil(y: i64, m: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn refuse(what: String, retry_after: u64, limit: u64, unit: &'static str) -> Refusal {
    Refusal {
        kind: RefusalKind::Rate,
        message: format!("{what} exceeded; retry after {retry_after} s or ask for a higher limit"),
        retry_after,
        limit,
        unit,
    }
}

impl MemoryLimiter {
    /// Admission at `now` (a parameter so tests can move time).
    pub fn admit_at(&self, req: &LimitRequest<'_>, now: Instant) -> Result<Reservation, Refusal> {
        let base = self.base;
        let month = current_month();
        // Lock order: the session's log, then the tenant's state.
        let session_log = req.session.map(|(session, _)| {
            self.sessions
                .get_with((req.tenant.to_string(), session.to_string()), || {
                    Arc::new(Mutex::new(RequestLog::default()))
                })
        });
        let mut session_guard = session_log.as_ref().map(|l| l.lock());
        if let (Some((session, rpm)), Some(log)) = (req.session, session_guard.as_deref_mut()) {
            log.check(now, MINUTE, rpm).map_err(|s| {
                refuse(
                    format!("session requests per minute ({rpm}) for session {session:?}"),
                    s,
                    rpm,
                    "requests",
                )
            })?;
        }
        let tenant = self.tenant(req.tenant);
        let mut guard = tenant.lock();
        let t = &mut *guard;
        if let Some(rl) = req.rate_limit {
            if let Some(n) = rl.requests_per_minute {
                t.rpm.check(base, now, n).map_err(|s| {
                    refuse(
                        format!("tenant limit requestsPerMinute ({n})"),
                        s,
                        n,
                        "requests",
                    )
                })?;
            }
            if let Some(n) = rl.requests_per_hour {
                t.rph.check(base, now, HOUR / 60, n, 1).map_err(|s| {
                    refuse(
                        format!("tenant limit requestsPerHour ({n})"),
                        s,
                        n,
                        "requests",
                    )
                })?;
            }
            if let Some(n) = rl.requests_per_day {
                t.rpd.check(base, now, DAY / 60, n, 1).map_err(|s| {
                    refuse(
                        format!("tenant limit requestsPerDay ({n})"),
                        s,
                        n,
                        "requests",
                    )
                })?;
            }
            if let Some(n) = rl.tokens_per_minute {
                t.tpm.check(base, now, SECOND, n, req.tokens).map_err(|s| {
                    refuse(format!("tenant limit tokensPerMinute ({n}; this request reserves {} tokens: prompt + max_tokens)", req.tokens), s, n, "tokens")
                })?;
            }
        }
        if req.quota.is_some() && !t.models.contains_key(req.model) {
            t.models.insert(req.model.to_string(), Default::default());
        }
        if let Some(q) = req.quota
            && let Some((rlog, tlog)) = t.models.get_mut(req.model)
        {
            if let Some(n) = q.requests_per_minute {
                rlog.check(base, now, n).map_err(|s| {
                    refuse(
                        format!("model quota requestsPerMinute ({n}) on {}", req.model),
                        s,
                        n,
                        "requests",
                    )
                })?;
            }
            if let Some(n) = q.tokens_per_minute {
                tlog.check(base, now, SECOND, n, req.tokens).map_err(|s| {
                    refuse(
                        format!("model quota tokensPerMinute ({n}) on {}", req.model),
                        s,
                        n,
                        "tokens",
                    )
                })?;
            }
        }
        if t.month != month {
            t.month = month;
            t.spent_micros = 0;
        }
        if let Some(budget) = req.budget_micros
            && (t.spent_micros >= budget || t.spent_micros.saturating_add(req.cost_micros) > budget)
        {
            return Err(Refusal {
                kind: RefusalKind::Budget,
                message: format!(
                    "monthly budget of {} USD is spent ({} USD used or reserved); it resets at the start of next month (UTC)",
                    parley_crds::money::format_usd_micros(budget),
                    parley_crds::money::format_usd_micros(t.spent_micros)
                ),
                retry_after: secs_to_month_end(),
                limit: 0,
                unit: "usd",
            });
        }
        // Every scope passed: count the request in each.
        let mut slot = 0;
        if let Some(rl) = req.rate_limit {
            if let Some(n) = rl.requests_per_minute {
                t.rpm.add(base, now, n);
            }
            if rl.requests_per_hour.is_some() {
                t.rph.add(base, now, HOUR / 60, 1);
            }
            if rl.requests_per_day.is_some() {
                t.rpd.add(base, now, DAY / 60, 1);
            }
            if rl.tokens_per_minute.is_some() {
                slot = t.tpm.add(base, now, SECOND, req.tokens);
            }
        }
        if let Some(q) = req.quota
            && let Some((rlog, tlog)) = t.models.get_mut(req.model)
        {
            if let Some(n) = q.requests_per_minute {
                rlog.add(base, now, n);
            }
            if q.tokens_per_minute.is_some() {
                slot = tlog.add(base, now, SECOND, req.tokens);
            }
        }
        t.spent_micros = t.spent_micros.saturating_add(req.cost_micros);
        if let Some(log) = session_guard.as_deref_mut() {
            log.add(now);
        }
        Ok(Reservation {
            tenant: req.tenant.to_string(),
            model: req.model.to_string(),
            slot,
            tokens: req.tokens,
            cost_micros: req.cost_micros,
            month,
        })
    }

    /// Settles a reservation.
    pub fn settle_now(&self, r: Reservation, tokens: u64, cost_micros: i64) {
        let Some(tenant) = self.tenants.read().get(&r.tenant).cloned() else {
            return;
        };
        let mut guard = tenant.lock();
        let t = &mut *guard;
        t.tpm.adjust(r.slot, r.tokens, tokens);
        if let Some((_, tlog)) = t.models.get_mut(&r.model) {
            tlog.adjust(r.slot, r.tokens, tokens);
        }
        if t.month == r.month {
            t.spent_micros = t
                .spent_micros
                .saturating_add(cost_micros.saturating_sub(r.cost_micros));
        }
    }

    /// Adds spend recorded elsewhere (the usage ledger, read at start) to a tenant's
    /// `month` (see [`current_month`]).
    pub fn add_spent(&self, tenant: &str, month: u32, micros: i64) {
        let t = self.tenant(tenant);
        let mut t = t.lock();
        if t.month != month {
            t.month = month;
            t.spent_micros = 0;
        }
        t.spent_micros = t.spent_micros.saturating_add(micros);
    }

    /// Micro-USD spent (and reserved) by a tenant this month.
    pub fn spent(&self, tenant: &str) -> i64 {
        self.tenants
            .read()
            .get(tenant)
            .map(|t| t.lock().spent_micros)
            .unwrap_or(0)
    }

    /// A tenant's state (made on first use).
    fn tenant(&self, id: &str) -> Arc<Mutex<TenantState>> {
        if let Some(t) = self.tenants.read().get(id) {
            return Arc::clone(t);
        }
        Arc::clone(self.tenants.write().entry(id.to_string()).or_default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req<'a>(rl: &'a RateLimitConfig, tokens: u64) -> LimitRequest<'a> {
        LimitRequest {
            tenant: "t",
            rate_limit: Some(rl),
            quota: None,
            model: "m",
            session: None,
            tokens,
            budget_micros: None,
            cost_micros: 0,
        }
    }

    #[test]
    fn per_minute_is_a_sliding_window() {
        let l = MemoryLimiter::default();
        let rl = RateLimitConfig {
            requests_per_minute: Some(3),
            ..Default::default()
        };
        let t0 = Instant::now();
        l.admit_at(&req(&rl, 0), t0).unwrap();
        l.admit_at(&req(&rl, 0), t0 + Duration::from_secs(30))
            .unwrap();
        l.admit_at(&req(&rl, 0), t0 + Duration::from_secs(59))
            .unwrap();
        // Full until the first request leaves the window at t0 + 60 s.
        let e = l
            .admit_at(&req(&rl, 0), t0 + Duration::from_secs(59))
            .unwrap_err();
        assert_eq!(e.retry_after, 1);
        assert!(e.message.contains("requestsPerMinute"));
        l.admit_at(&req(&rl, 0), t0 + Duration::from_secs(60))
            .unwrap();
        let e = l
            .admit_at(&req(&rl, 0), t0 + Duration::from_secs(61))
            .unwrap_err();
        assert_eq!(e.retry_after, 29);
    }

    #[test]
    fn large_per_minute_limits_use_bounded_slots() {
        let l = MemoryLimiter::default();
        let rl = RateLimitConfig {
            requests_per_minute: Some(20_000),
            ..Default::default()
        };
        let t0 = l.base;
        for _ in 0..20_000 {
            l.admit_at(&req(&rl, 0), t0).unwrap();
        }
        let e = l
            .admit_at(&req(&rl, 0), t0 + Duration::from_secs(59))
            .unwrap_err();
        assert_eq!(e.retry_after, 2, "conservative by at most one second");
        assert!(
            l.admit_at(&req(&rl, 0), t0 + Duration::from_millis(60_500))
                .is_err()
        );
        l.admit_at(&req(&rl, 0), t0 + Duration::from_secs(61))
            .unwrap();
    }

    #[test]
    fn refused_requests_are_not_counted_elsewhere() {
        let l = MemoryLimiter::default();
        let rl = RateLimitConfig {
            requests_per_minute: Some(10),
            tokens_per_minute: Some(100),
            ..Default::default()
        };
        let t0 = Instant::now();
        l.admit_at(&req(&rl, 80), t0).unwrap();
        assert!(l.admit_at(&req(&rl, 30), t0).is_err());
        // The refused request did not take a request slot: 9 more fit.
        for _ in 0..9 {
            l.admit_at(&req(&rl, 0), t0).unwrap();
        }
        assert!(l.admit_at(&req(&rl, 0), t0).is_err());
    }

    #[test]
    fn tokens_settle_to_real_usage() {
        let l = MemoryLimiter::default();
        let rl = RateLimitConfig {
            tokens_per_minute: Some(100),
            ..Default::default()
        };
        let t0 = Instant::now();
        let r = l.admit_at(&req(&rl, 90), t0).unwrap();
        assert!(l.admit_at(&req(&rl, 20), t0).is_err());
        l.settle_now(r, 10, 0);
        l.admit_at(&req(&rl, 20), t0).unwrap();
    }

    #[test]
    fn hour_limit_counts_in_sub_windows() {
        let l = MemoryLimiter::default();
        let rl = RateLimitConfig {
            requests_per_hour: Some(2),
            ..Default::default()
        };
        let t0 = l.base;
        l.admit_at(&req(&rl, 0), t0).unwrap();
        l.admit_at(&req(&rl, 0), t0 + Duration::from_secs(600))
            .unwrap();
        let e = l
            .admit_at(&req(&rl, 0), t0 + Duration::from_secs(1200))
            .unwrap_err();
        assert_eq!(e.retry_after, 2400);
        l.admit_at(&req(&rl, 0), t0 + Duration::from_secs(3600))
            .unwrap();
    }

    #[test]
    fn budget_refuses_once_spent() {
        let l = MemoryLimiter::default();
        let none = RateLimitConfig::default();
        let mut r = req(&none, 0);
        r.rate_limit = None;
        r.budget_micros = Some(1_000);
        r.cost_micros = 600;
        let res = l.admit_at(&r, Instant::now()).unwrap();
        assert_eq!(
            l.admit_at(&r, Instant::now()).unwrap_err().kind,
            RefusalKind::Budget
        );
        l.settle_now(res, 0, 100);
        assert_eq!(l.spent("t"), 100);
        l.admit_at(&r, Instant::now()).unwrap();
    }

    #[test]
    fn model_quotas_and_sessions_are_separate_scopes() {
        let l = MemoryLimiter::default();
        let q = ModelQuotaConfig {
            model: "m".into(),
            requests_per_minute: Some(1),
            tokens_per_minute: None,
        };
        let none = RateLimitConfig::default();
        let mut r = req(&none, 0);
        r.rate_limit = None;
        r.quota = Some(&q);
        let t0 = Instant::now();
        l.admit_at(&r, t0).unwrap();
        let e = l.admit_at(&r, t0).unwrap_err();
        assert!(e.message.contains("model quota"), "{}", e.message);
        // Another model of the same tenant is not limited by that quota.
        let mut other = r.clone();
        other.model = "n";
        other.quota = None;
        l.admit_at(&other, t0).unwrap();
        // Sessions: per tenant and session id.
        let mut s = other.clone();
        s.session = Some(("s1", 1));
        l.admit_at(&s, t0).unwrap();
        assert!(l.admit_at(&s, t0).unwrap_err().message.contains("session"));
        s.session = Some(("s2", 1));
        l.admit_at(&s, t0).unwrap();
        s.tenant = "other";
        s.session = Some(("s1", 1));
        l.admit_at(&s, t0).unwrap();
    }

    #[test]
    fn month_arithmetic() {
        assert_eq!(civil_from_days(0), (1970, 1));
        assert_eq!(days_from_civil(2024, 3), 19_783);
        assert_eq!(civil_from_days(19_783), (2024, 3));
        assert!(secs_to_month_end() <= 31 * 86_400);
    }
}
