//! Exact-match response cache (non-streaming responses of routes with `cache`, requests
//! with an explicit `temperature: 0`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
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
    /// When it stops being served (in-process entries).
    pub expires: Instant,
}

/// Most entries kept.
const MAX_ENTRIES: usize = 10_000;

/// The cache.
#[derive(Debug, Default)]
pub struct ResponseCache {
    inner: Mutex<HashMap<[u8; 32], Entry>>,
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
    /// A live entry.
    pub fn get(&self, key: &[u8; 32]) -> Option<Entry> {
        let now = Instant::now();
        let mut map = self.inner.lock();
        match map.get(key) {
            Some(e) if e.expires > now => Some(e.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stores an entry for `ttl`.
    pub fn put(
        &self,
        key: [u8; 32],
        body: Bytes,
        model: Arc<String>,
        backend: Arc<String>,
        usage: Usage,
        ttl: Duration,
    ) {
        let now = Instant::now();
        let mut map = self.inner.lock();
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, e| e.expires > now);
            if map.len() >= MAX_ENTRIES {
                return;
            }
        }
        map.insert(
            key,
            Entry {
                body,
                model,
                backend,
                usage,
                expires: now + ttl,
            },
        );
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
        c.put(
            a,
            Bytes::from_static(b"x"),
            Arc::new("m".into()),
            Arc::new("b".into()),
            Usage::default(),
            Duration::from_secs(5),
        );
        assert!(c.get(&a).is_some());
        c.put(
            a,
            Bytes::from_static(b"x"),
            Arc::new("m".into()),
            Arc::new("b".into()),
            Usage::default(),
            Duration::ZERO,
        );
        assert!(c.get(&a).is_none());
    }
}
