//! Conversation history of the `/chat` session API.
//!
//! [`SessionStore`] is the seam for the Redis implementation; [`MemorySessions`] keeps
//! sessions in this process. Sessions are keyed by tenant and session id, so one tenant
//! never sees another's.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

/// Stored conversations.
pub trait SessionStore: Send + Sync + 'static {
    /// The stored history (OpenAI-format messages), refreshing its TTL.
    fn load(
        &self,
        tenant: &str,
        session: &str,
        ttl: Duration,
    ) -> impl Future<Output = Vec<Value>> + Send;
    /// Appends messages, trims to `max_messages` and refreshes the TTL.
    fn append(
        &self,
        tenant: &str,
        session: &str,
        messages: Vec<Value>,
        max_messages: usize,
        ttl: Duration,
    ) -> impl Future<Output = ()> + Send;
}

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

#[derive(Debug)]
struct Session {
    messages: Vec<Value>,
    expires: Instant,
}

/// Sessions in this process.
#[derive(Debug, Default)]
pub struct MemorySessions {
    inner: Mutex<HashMap<(String, String), Session>>,
}

impl MemorySessions {
    fn sweep(map: &mut HashMap<(String, String), Session>, now: Instant) {
        if map.len() > 1024 {
            map.retain(|_, s| s.expires > now);
        }
    }
}

impl SessionStore for std::sync::Arc<MemorySessions> {
    async fn load(&self, tenant: &str, session: &str, ttl: Duration) -> Vec<Value> {
        let now = Instant::now();
        let mut map = self.inner.lock();
        let key = (tenant.to_string(), session.to_string());
        match map.get_mut(&key) {
            Some(s) if s.expires > now => {
                s.expires = now + ttl;
                s.messages.clone()
            }
            Some(_) => {
                map.remove(&key);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    async fn append(
        &self,
        tenant: &str,
        session: &str,
        mut messages: Vec<Value>,
        max: usize,
        ttl: Duration,
    ) {
        let now = Instant::now();
        let mut map = self.inner.lock();
        MemorySessions::sweep(&mut map, now);
        let s = map
            .entry((tenant.to_string(), session.to_string()))
            .or_insert_with(|| Session {
                messages: Vec::new(),
                expires: now + ttl,
            });
        if s.expires <= now {
            s.messages.clear();
        }
        s.messages.append(&mut messages);
        trim(&mut s.messages, max);
        s.expires = now + ttl;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

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

    #[tokio::test]
    async fn sessions_are_per_tenant_and_expire() {
        let s = Arc::new(MemorySessions::default());
        let ttl = Duration::from_secs(60);
        s.append(
            "a",
            "s1",
            vec![json!({"role": "user", "content": "hi"})],
            10,
            ttl,
        )
        .await;
        assert_eq!(s.load("a", "s1", ttl).await.len(), 1);
        assert!(s.load("b", "s1", ttl).await.is_empty());
        s.append("a", "s2", vec![json!({"role": "user"})], 10, Duration::ZERO)
            .await;
        assert!(s.load("a", "s2", ttl).await.is_empty());
    }
}
