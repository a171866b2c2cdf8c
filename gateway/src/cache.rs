//! Exact-match response cache (non-streaming responses of routes with `cache`, requests
//! with an explicit `temperature: 0`). In process it is a bounded cache (`moka`): each
//! entry lives its route's TTL, and the whole holds at most [`MAX_BYTES`] of bodies (the
//! least used go first); no request ever sweeps it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::ApiFormat;
use crate::translate::Usage;

/// A cached response.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The body as sent to the client.
    pub body: Bytes,
    /// The model that served it.
    pub model: Arc<String>,
    /// The backend that served it.
    pub backend: Arc<String>,
    /// Its usage (not charged again on a hit).
    pub usage: Usage,
}

/// Most body bytes kept in one process.
pub const MAX_BYTES: u64 = 128 * 1024 * 1024;

#[derive(Clone)]
struct Stored {
    entry: Entry,
    ttl: Duration,
}

struct ByTtl;

impl moka::Expiry<[u8; 32], Stored> for ByTtl {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Stored,
        _now: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The cache.
pub struct ResponseCache {
    inner: moka::sync::Cache<[u8; 32], Stored>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

impl Default for ResponseCache {
    fn default() -> Self {
        Self::with_max_bytes(MAX_BYTES)
    }
}

/// The cache key: tenant, API format, model, effective system prompt, messages, tools,
/// `response_format`, `stop`, `max_tokens`, `seed`, `n`.
pub fn key(tenant: &str, format: ApiFormat, model: &str, req: &Map<String, Value>) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |name: &str, v: &[u8]| {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    };
    field("tenant", tenant.as_bytes());
    field("format", format.as_str().as_bytes());
    field("model", model.as_bytes());
    for name in [
        "system",
        "messages",
        "tools",
        "tool_choice",
        "response_format",
        "stop",
        "stop_sequences",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "n",
    ] {
        if let Some(v) = req.get(name) {
            field(name, v.to_string().as_bytes());
        }
    }
    h.finalize().into()
}

impl ResponseCache {
    /// A cache of at most `max` body bytes (each entry also counts 256 bytes).
    pub fn with_max_bytes(max: u64) -> Self {
        Self {
            inner: moka::sync::Cache::builder()
                .max_capacity(max)
                .weigher(|_k, v: &Stored| {
                    u32::try_from(v.entry.body.len().saturating_add(256)).unwrap_or(u32::MAX)
                })
                .expire_after(ByTtl)
                .build(),
        }
    }

    /// A live entry.
    pub fn get(&self, key: &[u8; 32]) -> Option<Entry> {
        self.inner.get(key).map(|s| s.entry)
    }

    /// Stores an entry for `ttl`.
    pub fn put(&self, key: [u8; 32], entry: Entry, ttl: Duration) {
        if ttl.is_zero() {
            self.inner.invalidate(&key);
            return;
        }
        self.inner.insert(key, Stored { entry, ttl });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_separate_tenants_and_formats() {
        let req = json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0});
        let req = req.as_object().unwrap();
        let a = key("a", ApiFormat::OpenAi, "m", req);
        assert_ne!(a, key("b", ApiFormat::OpenAi, "m", req));
        assert_ne!(a, key("a", ApiFormat::Anthropic, "m", req));
        assert_eq!(a, key("a", ApiFormat::OpenAi, "m", req));
        let c = ResponseCache::default();
        let entry = Entry {
            body: Bytes::from_static(b"x"),
            model: Arc::new("m".into()),
            backend: Arc::new("b".into()),
            usage: Usage::default(),
        };
        c.put(a, entry.clone(), Duration::from_secs(5));
        assert!(c.get(&a).is_some());
        c.put(a, entry.clone(), Duration::ZERO);
        assert!(c.get(&a).is_none());
        c.put(a, entry, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.get(&a).is_none());
    }
}
