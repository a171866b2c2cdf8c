//! Request counters (`GET /_mock/stats`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use axum::http::{HeaderMap, Method};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// How many recent requests `recent_requests` keeps.
pub const RECENT_REQUESTS: usize = 32;

/// The fingerprint the mock records instead of an API key: the first 12 hex digits of
/// the SHA-256 of the key.
pub fn key_fingerprint(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut s = hex::encode(digest);
    s.truncate(12);
    s
}

/// Snapshot of the counters, as served by `GET /_mock/stats`.
///
/// Only API requests (`/v1/...` and unknown paths) are counted, not `/_mock/*` or
/// `/healthz`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Stats {
    pub requests_total: u64,
    /// Request path -> count.
    pub by_path: BTreeMap<String, u64>,
    /// Response status ("200", "429", ...) -> count (hanging requests have none).
    pub by_status: BTreeMap<String, u64>,
    /// Requested `model` -> count.
    pub by_model: BTreeMap<String, u64>,
    /// API key fingerprint -> count.
    pub by_api_key: BTreeMap<String, u64>,
    /// Requests answered with an injected failure status.
    pub faults_injected: u64,
    pub streams_started: u64,
    /// Streams that ran to their normal end.
    pub streams_completed: u64,
    /// Streams the client went away from before their end.
    pub streams_cancelled: u64,
    /// Streams cut on purpose by `drop_after_tokens`.
    pub streams_dropped: u64,
    /// Streams ended by an injected error event (`error_event_after_tokens`).
    pub streams_error_events: u64,
    /// Sum of the prompt tokens of the requests answered with a reply (or a stream).
    pub prompt_tokens_total: u64,
    /// Sum of the completion tokens actually sent.
    pub completion_tokens_total: u64,
    /// Fingerprints ([`key_fingerprint`]) of the API keys seen, in first-seen order.
    pub api_keys_seen: Vec<String>,
    pub last_request: Option<RecordedRequest>,
    /// The last [`RECENT_REQUESTS`] requests, oldest first.
    pub recent_requests: Vec<RecordedRequest>,
}

/// One recorded request. Key-bearing headers (`authorization`, `x-api-key`, `api-key`,
/// `proxy-authorization`) are replaced by `sha256:<fingerprint>` (with `Bearer ` kept).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    /// Fingerprint of the key the mock used for this request.
    pub api_key: Option<String>,
    /// The body as JSON, or as a string when it is not JSON.
    pub body: Value,
}

struct RawRequest {
    method: Method,
    path: String,
    headers: HeaderMap,
    api_key: Option<String>,
    body: Bytes,
}

#[derive(Default)]
struct Counters {
    requests_total: u64,
    by_path: BTreeMap<String, u64>,
    by_status: BTreeMap<u16, u64>,
    by_model: BTreeMap<String, u64>,
    by_api_key: BTreeMap<String, u64>,
    faults_injected: u64,
    streams_started: u64,
    streams_completed: u64,
    streams_cancelled: u64,
    streams_dropped: u64,
    streams_error_events: u64,
    prompt_tokens_total: u64,
    completion_tokens_total: u64,
    api_keys_seen: Vec<String>,
    recent: VecDeque<RawRequest>,
}

/// How a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    Completed,
    Cancelled,
    Dropped,
    ErrorEvent,
}

/// The shared, thread-safe counters.
#[derive(Default)]
pub struct Recorder {
    inner: Mutex<Counters>,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an incoming API request.
    pub fn request(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
        model: Option<&str>,
        api_key: Option<&str>,
    ) {
        let mut c = self.lock();
        c.requests_total += 1;
        bump(&mut c.by_path, path);
        if let Some(m) = model {
            bump(&mut c.by_model, m);
        }
        if let Some(k) = api_key {
            bump(&mut c.by_api_key, k);
            if !c.api_keys_seen.iter().any(|s| s == k) {
                c.api_keys_seen.push(k.to_owned());
            }
        }
        if c.recent.len() >= RECENT_REQUESTS {
            c.recent.pop_front();
        }
        c.recent.push_back(RawRequest {
            method: method.clone(),
            path: path.to_owned(),
            headers: headers.clone(),
            api_key: api_key.map(str::to_owned),
            body: body.clone(),
        });
    }

    /// Records the status a request was answered with.
    pub fn status(&self, status: u16, injected: bool) {
        let mut c = self.lock();
        *c.by_status.entry(status).or_insert(0) += 1;
        if injected {
            c.faults_injected += 1;
        }
    }

    /// Records the usage of a complete (non-streamed) reply.
    pub fn usage(&self, prompt: u64, completion: u64) {
        let mut c = self.lock();
        c.prompt_tokens_total += prompt;
        c.completion_tokens_total += completion;
    }

    pub fn stream_started(&self, prompt: u64) {
        let mut c = self.lock();
        c.streams_started += 1;
        c.prompt_tokens_total += prompt;
    }

    pub fn stream_ended(&self, end: StreamEnd, completion_tokens_sent: u64) {
        let mut c = self.lock();
        c.completion_tokens_total += completion_tokens_sent;
        match end {
            StreamEnd::Completed => c.streams_completed += 1,
            StreamEnd::Cancelled => c.streams_cancelled += 1,
            StreamEnd::Dropped => c.streams_dropped += 1,
            StreamEnd::ErrorEvent => c.streams_error_events += 1,
        }
    }

    pub fn reset(&self) {
        *self.lock() = Counters::default();
    }

    pub fn snapshot(&self) -> Stats {
        let c = self.lock();
        let recent: Vec<RecordedRequest> = c.recent.iter().map(record).collect();
        Stats {
            requests_total: c.requests_total,
            by_path: c.by_path.clone(),
            by_status: c
                .by_status
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            by_model: c.by_model.clone(),
            by_api_key: c.by_api_key.clone(),
            faults_injected: c.faults_injected,
            streams_started: c.streams_started,
            streams_completed: c.streams_completed,
            streams_cancelled: c.streams_cancelled,
            streams_dropped: c.streams_dropped,
            streams_error_events: c.streams_error_events,
            prompt_tokens_total: c.prompt_tokens_total,
            completion_tokens_total: c.completion_tokens_total,
            api_keys_seen: c.api_keys_seen.clone(),
            last_request: recent.last().cloned(),
            recent_requests: recent,
        }
    }
}

fn record(r: &RawRequest) -> RecordedRequest {
    let mut headers = BTreeMap::new();
    for (name, value) in &r.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        let shown = match name.as_str() {
            "authorization" | "proxy-authorization" => match v.strip_prefix("Bearer ") {
                Some(k) => format!("Bearer sha256:{}", key_fingerprint(k.trim())),
                None => format!("sha256:{}", key_fingerprint(v.trim())),
            },
            "x-api-key" | "api-key" => format!("sha256:{}", key_fingerprint(v.trim())),
            _ => v.into_owned(),
        };
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|old: &mut String| {
                old.push_str(", ");
                old.push_str(&shown);
            })
            .or_insert(shown);
    }
    let body = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()))
    };
    RecordedRequest {
        method: r.method.to_string(),
        path: r.path.clone(),
        headers,
        api_key: r.api_key.clone(),
        body,
    }
}
