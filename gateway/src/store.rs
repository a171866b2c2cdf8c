//! The one seam for shared state: admission limits, settling, `/chat` sessions and the
//! response cache, kept in this process or in Redis. Handlers ask a [`Store`] and never
//! learn which one they have.
//!
//! In process (`limits::MemoryLimiter`, `sessions::MemorySessions`, `cache::ResponseCache`)
//! everything is bounded and each decision touches one tenant's lock. In Redis
//! (`redis_state::Redis`) each decision is one atomic script; while Redis is unreachable
//! limits follow `rateLimitFailureMode`, sessions answer 503 and the cache misses.

use std::sync::Arc;
use std::time::Duration;

use parley_crds::gateway_config::FailureMode;
use serde_json::Value;

use crate::cache;
use crate::error::{ApiError, ErrorKind};
use crate::limits::{LimitRequest, Refusal, Reservation};
use crate::metrics::{DecisionLabels, Label};
use crate::redis_state::{CachedEntry, Redis, RedisReservation};
use crate::runtime::Runtime;
use crate::state::AppState;
use crate::translate::Usage;

/// Where shared state lives for one request (borrowed from the process state and the
/// config snapshot the request is served with).
pub enum Store<'a> {
    /// This process only (one replica).
    Memory(&'a AppState),
    /// Redis, shared by every replica.
    Redis {
        /// The client.
        redis: &'a Arc<Redis>,
        /// What limits do while Redis is unreachable.
        mode: FailureMode,
    },
    /// The config names a Redis whose URL cannot be read (its secret file is missing):
    /// everything behaves as while Redis is unreachable.
    RedisDown {
        /// What limits do meanwhile.
        mode: FailureMode,
        /// For the metrics.
        state: &'a AppState,
    },
}

const RESPONSES_DOWN: &str = "the response store (Redis) is unreachable, so stored responses cannot be read or written; retry shortly, or send the request with store: false and no previous_response_id";
const SESSIONS_DOWN: &str = "the session store (Redis) is unreachable, so the conversation cannot be continued; retry shortly";

/// What an admission reserved; [`Held::settle`] replaces it by what was used.
#[derive(Debug, Default)]
pub enum Held {
    /// Nothing (no limits apply, or Redis was down in `open` mode).
    #[default]
    Nothing,
    /// In this process.
    Memory(Reservation),
    /// In Redis.
    Redis(Arc<Redis>, RedisReservation),
}

impl Held {
    /// Replaces the reservation by real usage: in process at once (one tenant's lock),
    /// in Redis through the client's settle batcher (off the request path; nothing can
    /// cancel it).
    pub fn settle(self, state: &AppState, tokens: u64, cost_micros: i64) {
        match self {
            Self::Nothing => {}
            Self::Memory(r) => state.limiter.settle_now(r, tokens, cost_micros),
            Self::Redis(redis, r) => redis.settle_later(r, tokens, cost_micros),
        }
    }
}

impl<'a> Store<'a> {
    /// The store of `rt` (Redis when the config has one).
    pub fn of(state: &'a AppState, rt: &'a Runtime) -> Self {
        let mode = rt.config.rate_limit_failure_mode;
        match (&rt.redis, &rt.config.redis) {
            (Some(redis), _) => Self::Redis { redis, mode },
            (None, Some(_)) => Self::RedisDown { mode, state },
            (None, None) => Self::Memory(state),
        }
    }

    /// Admits (reserving tokens and cost) or refuses a request: every scope is checked,
    /// and only an admitted request is counted.
    pub async fn admit(&self, req: &LimitRequest<'_>) -> Result<Held, Refusal> {
        match self {
            Self::Memory(state) => {
                let decided = state.limiter.admit_at(req, std::time::Instant::now());
                state
                    .metrics
                    .limit_decisions
                    .get_or_create(&DecisionLabels {
                        backend: "local",
                        result: if decided.is_ok() {
                            "admitted"
                        } else {
                            "refused"
                        },
                    })
                    .inc();
                decided.map(Held::Memory)
            }
            Self::Redis { redis, mode } => Ok(match redis.admit(req, *mode).await? {
                Some(r) => Held::Redis(Arc::clone(redis), r),
                None => Held::Nothing,
            }),
            Self::RedisDown { mode, state } => {
                let (result, decided) = match mode {
                    FailureMode::Open => ("redis_down_open", Ok(Held::Nothing)),
                    FailureMode::Closed => (
                        "redis_down_closed",
                        Err(Refusal {
                            kind: crate::limits::RefusalKind::Unavailable,
                            message: "the shared limit store (Redis) is not configured yet (its URL cannot be read) and rateLimitFailureMode is closed, so requests are refused until it is; retry shortly".into(),
                            retry_after: 1,
                            limit: 0,
                            unit: "requests",
                        }),
                    ),
                };
                state
                    .metrics
                    .limit_decisions
                    .get_or_create(&DecisionLabels {
                        backend: "redis",
                        result,
                    })
                    .inc();
                decided
            }
        }
    }

    /// A session's stored history, its TTL refreshed.
    pub async fn session_load(
        &self,
        tenant: &str,
        session: &str,
        ttl: Duration,
    ) -> Result<Vec<Value>, ApiError> {
        match self {
            Self::Memory(state) => Ok(state.sessions.load(tenant, session, ttl)),
            Self::Redis { redis, .. } => redis
                .session_load(tenant, session, ttl)
                .await
                .ok_or_else(|| ApiError::new(ErrorKind::Unavailable, SESSIONS_DOWN)),
            Self::RedisDown { .. } => Err(ApiError::new(ErrorKind::Unavailable, SESSIONS_DOWN)),
        }
    }

    /// Appends to a session (trimmed to `max` messages, TTL refreshed).
    pub async fn session_append(
        &self,
        tenant: &str,
        session: &str,
        messages: Vec<Value>,
        max: usize,
        ttl: Duration,
    ) -> Result<(), ApiError> {
        match self {
            Self::Memory(state) => {
                state.sessions.append(tenant, session, messages, max, ttl);
                Ok(())
            }
            Self::Redis { redis, .. }
                if redis
                    .session_append(tenant, session, &messages, max, ttl)
                    .await =>
            {
                Ok(())
            }
            Self::Redis { .. } | Self::RedisDown { .. } => Err(ApiError::new(
                ErrorKind::Unavailable,
                "the reply could not be stored in the session (Redis is unreachable), so this turn is not part of the conversation; send it again shortly",
            )),
        }
    }

    /// Stores a Responses API record for `ttl`.
    pub async fn response_put(
        &self,
        tenant: &str,
        id: &str,
        record: bytes::Bytes,
        ttl: Duration,
    ) -> Result<(), ApiError> {
        match self {
            Self::Memory(state) => {
                state.sessions.response_put(tenant, id, record, ttl);
                Ok(())
            }
            Self::Redis { redis, .. } if redis.response_put(tenant, id, &record, ttl).await => {
                Ok(())
            }
            Self::Redis { .. } | Self::RedisDown { .. } => {
                Err(ApiError::new(ErrorKind::Unavailable, RESPONSES_DOWN))
            }
        }
    }

    /// A stored Responses API record of this tenant (`None`: it has none of that id).
    pub async fn response_get(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<bytes::Bytes>, ApiError> {
        match self {
            Self::Memory(state) => Ok(state.sessions.response_get(tenant, id)),
            Self::Redis { redis, .. } => redis
                .response_get(tenant, id)
                .await
                .ok_or_else(|| ApiError::new(ErrorKind::Unavailable, RESPONSES_DOWN)),
            Self::RedisDown { .. } => Err(ApiError::new(ErrorKind::Unavailable, RESPONSES_DOWN)),
        }
    }

    /// Deletes a stored Responses API record; `false` if this tenant had none of that id.
    pub async fn response_delete(&self, tenant: &str, id: &str) -> Result<bool, ApiError> {
        match self {
            Self::Memory(state) => Ok(state.sessions.response_delete(tenant, id)),
            Self::Redis { redis, .. } => redis
                .response_delete(tenant, id)
                .await
                .ok_or_else(|| ApiError::new(ErrorKind::Unavailable, RESPONSES_DOWN)),
            Self::RedisDown { .. } => Err(ApiError::new(ErrorKind::Unavailable, RESPONSES_DOWN)),
        }
    }

    /// A cached answer. Model and backend labels only ever carry names of `rt` (an
    /// entry another replica wrote under another config says `unknown`).
    pub async fn cache_get(
        &self,
        rt: &Runtime,
        tenant: &str,
        key: &[u8; 32],
    ) -> Option<cache::Entry> {
        match self {
            Self::Memory(state) => state.cache.get(key),
            Self::Redis { redis, .. } => {
                let e = redis.cache_get(tenant, key).await?;
                let served = rt.models.get(&e.model);
                let unknown = || -> Label { Arc::new("unknown".to_string()) };
                let backend = served
                    .and_then(|m| m.backends.iter().find(|b| *b.name == e.backend))
                    .map(|b| Arc::clone(&b.name));
                Some(cache::Entry {
                    model: served.map(|m| Arc::clone(&m.name)).unwrap_or_else(unknown),
                    backend: backend.unwrap_or_else(unknown),
                    usage: e.usage,
                    body: e.body,
                })
            }
            Self::RedisDown { .. } => None,
        }
    }

    /// Stores an answer for `ttl` (in Redis from a spawned task: off the request path).
    pub fn cache_put(&self, tenant: &Label, key: [u8; 32], entry: cache::Entry, ttl: Duration) {
        match self {
            Self::Memory(state) => state.cache.put(key, entry, ttl),
            Self::Redis { redis, .. } => {
                let redis = Arc::clone(redis);
                let tenant = Arc::clone(tenant);
                let entry = CachedEntry {
                    model: entry.model.to_string(),
                    backend: entry.backend.to_string(),
                    usage: Usage {
                        input: entry.usage.input,
                        output: entry.usage.output,
                    },
                    body: entry.body,
                };
                tokio::spawn(async move { redis.cache_put(&tenant, &key, &entry, ttl).await });
            }
            Self::RedisDown { .. } => {}
        }
    }
}
