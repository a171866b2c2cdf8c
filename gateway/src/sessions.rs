//! Conversation history of the `/chat` session API.
//!
//! [`MemorySessions`] keeps sessions in this process (`redis_state` keeps them in Redis;
//! `store::Store` chooses). Sessions are keyed by tenant and session id, so one tenant
//! never sees another's. The map is a bounded cache (`moka`): each session expires its
//! TTL after its last use, and beyond [`MAX_SESSIONS`] the least recently used go first;
//! no request ever sweeps the whole map.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

/// Most sessions kept in one process.
pub const MAX_SESSIONS: u64 = 100_000;

/// Keeps the last `max` messages without leaving a tool result whose call was cut off:
/// the cut moves forward past any leading `tool` messages.
pub fn trim(messages: &mut Vec<Value>, max: usize) {
    if messages.len() <= max {
        return;
    }
    let mut cut = messages.len() - max;
    while cut < messages.len() && messages[cut].get("role").and_then(Value::as_str) == Some("tool")
    {
        cut += 1;
    }
    messages.drain(..cut);
}

/// One session: its messages and its TTL (read by the cache's expiry on every use).
#[derive(Debug, Default)]
struct Session {
    ttl_ms: AtomicU64,
    messages: Mutex<Vec<Value>>,
}

struct SessionExpiry;

impl moka::Expiry<(String, String), Arc<Session>> for SessionExpiry {
    fn expire_after_create(
        &self,
        _key: &(String, String),
        value: &Arc<Session>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(value.ttl_ms.load(Ordering::Relaxed)))
    }
    fn expire_after_read(
        &self,
        _key: &(String, String),
        value: &Arc<Session>,
        _now: Instant,
        _current: Option<Duration>,
        _last_modified_at: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(value.ttl_ms.load(Ordering::Relaxed)))
    }
    fn expire_after_update(
        &self,
        _key: &(String, String),
        value: &Arc<Session>,
        _now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(Duration::from_millis(value.ttl_ms.load(Ordering::Relaxed)))
    }
}

/// Sessions in this process.
pub struct MemorySessions {
    inner: moka::sync::Cache<(String, String), Arc<Session>>,
    /// Stored Responses API responses by `(tenant, id)`: each a JSON record, expiring
    /// its TTL after it was stored.
    responses: moka::sync::Cache<(String, String), StoredResponse>,
}

/// A stored response and its TTL.
#[derive(Clone, Debug)]
struct StoredResponse {
    ttl: Duration,
    record: bytes::Bytes,
}

struct ResponseExpiry;

impl moka::Expiry<(String, String), StoredResponse> for ResponseExpiry {
    fn expire_after_create(
        &self,
        _key: &(String, String),
        value: &StoredResponse,
        _now: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl std::fmt::Debug for MemorySessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySessions")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

impl Default for MemorySessions {
    fn default() -> Self {
        Self::with_capacity(MAX_SESSIONS)
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl MemorySessions {
    /// At most `max` sessions.
    pub fn with_capacity(max: u64) -> Self {
        Self {
            inner: moka::sync::Cache::builder()
                .max_capacity(max)
                .expire_after(SessionExpiry)
                .build(),
            responses: moka::sync::Cache::builder()
                .max_capacity(max)
                .expire_after(ResponseExpiry)
                .build(),
        }
    }

    /// Stores a Responses API record for `ttl` (replacing one of the same id).
    pub fn response_put(&self, tenant: &str, id: &str, record: bytes::Bytes, ttl: Duration) {
        self.responses.insert(
            (tenant.to_string(), id.to_string()),
            StoredResponse { ttl, record },
        );
    }

    /// A stored Responses API record of this tenant.
    pub fn response_get(&self, tenant: &str, id: &str) -> Option<bytes::Bytes> {
        self.responses
            .get(&(tenant.to_string(), id.to_string()))
            .map(|s| s.record)
    }

    /// Deletes a stored record; `false` if this tenant had none of that id.
    pub fn response_delete(&self, tenant: &str, id: &str) -> bool {
        self.responses
            .remove(&(tenant.to_string(), id.to_string()))
            .is_some()
    }

    /// The stored history (OpenAI-format messages), refreshing its TTL.
    pub fn load(&self, tenant: &str, session: &str, ttl: Duration) -> Vec<Value> {
        match self.inner.get(&(tenant.to_string(), session.to_string())) {
            Some(s) => {
                s.ttl_ms.store(ttl_ms(ttl), Ordering::Relaxed);
                s.messages.lock().clone()
            }
            None => Vec::new(),
        }
    }

    /// Appends messages, trims to `max` and refreshes the TTL.
    pub fn append(
        &self,
        tenant: &str,
        session: &str,
        mut messages: Vec<Value>,
        max: usize,
        ttl: Duration,
    ) {
        let s = self
            .inner
            .get_with((tenant.to_string(), session.to_string()), || {
                Arc::new(Session {
                    ttl_ms: AtomicU64::new(ttl_ms(ttl)),
                    messages: Mutex::new(Vec::new()),
                })
            });
        s.ttl_ms.store(ttl_ms(ttl), Ordering::Relaxed);
        let mut m = s.messages.lock();
        m.append(&mut messages);
        trim(&mut m, max);
    }

    /// Sessions held (approximate; for tests and metrics).
    pub fn len(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn trim_keeps_tool_calls_with_results() {
        let mut m = vec![
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "tool_calls": [{"id": "1"}]}),
            json!({"role": "tool", "tool_call_id": "1", "content": "r"}),
            json!({"role": "tool", "tool_call_id": "2", "content": "r"}),
            json!({"role": "assistant", "content": "done"}),
        ];
        trim(&mut m, 3);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["content"], "done");
        let mut m = vec![
            json!({"role": "user"}),
            json!({"role": "assistant"}),
            json!({"role": "user"}),
        ];
        trim(&mut m, 2);
        assert_eq!(m[0]["role"], "assistant");
    }

    #[test]
    fn sessions_are_per_tenant_expire_and_stay_bounded() {
        let s = MemorySessions::default();
        let ttl = Duration::from_secs(60);
        s.append(
            "a",
            "s1",
            vec![json!({"role": "user", "content": "hi"})],
            10,
            ttl,
        );
        assert_eq!(s.load("a", "s1", ttl).len(), 1);
        assert!(s.load("b", "s1", ttl).is_empty());
        s.append("a", "s2", vec![json!({"role": "user"})], 10, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.load("a", "s2", ttl).is_empty());
        let small = MemorySessions::with_capacity(100);
        for i in 0..1000 {
            small.append(
                "a",
                &format!("s{i}"),
                vec![json!({"role": "user"})],
                10,
                ttl,
            );
        }
        assert!(small.len() <= 100, "{}", small.len());
    }

    #[test]
    fn stored_responses_are_per_tenant_and_expire() {
        let s = MemorySessions::default();
        let rec = bytes::Bytes::from_static(b"{}");
        s.response_put("a", "resp_1", rec.clone(), Duration::from_secs(60));
        assert_eq!(s.response_get("a", "resp_1"), Some(rec.clone()));
        assert_eq!(s.response_get("b", "resp_1"), None);
        assert!(!s.response_delete("b", "resp_1"));
        assert!(s.response_delete("a", "resp_1"));
        assert_eq!(s.response_get("a", "resp_1"), None);
        s.response_put("a", "resp_2", rec, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.response_get("a", "resp_2"), None);
    }
}
