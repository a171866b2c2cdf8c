//! `parley-mock-llm`: a fast, deterministic, OpenAI- and Anthropic-compatible fake LLM
//! upstream with latency, streaming pace and fault injection, for tests, demos and load
//! tests.
//!
//! Endpoints:
//!
//! * `POST /v1/chat/completions` (OpenAI), `POST /v1/responses` (OpenAI Responses) and
//!   `POST /v1/messages` (Anthropic), streaming
//!   or not, with tool calls; `POST /v1/embeddings` (OpenAI; deterministic vectors, see
//!   [`embeddings`]); `GET /v1/models` (Anthropic's shape when the request has an
//!   `anthropic-version` header); `GET /healthz`.
//! * `GET|POST /_mock/config`: read / partially update the [`MockConfig`] knobs (fields
//!   present replace the current values, `null` clears optional ones, unknown fields are
//!   a 400; `{"reset": true}` first restores the start-up configuration). The answer is
//!   the resulting configuration.
//! * `GET /_mock/stats` ([`Stats`]), `POST /_mock/reset-stats` (204).
//!
//! Behaviour:
//!
//! * Both APIs need a key (`Authorization: Bearer`, `x-api-key` or `api-key`) unless
//!   `require_api_key` is false; `api_keys`, when not empty, lists the accepted keys.
//!   Keys are recorded only as [`key_fingerprint`]s.
//! * The reply is `reply_tokens` words, "Hello from NAME: lorem ipsum ...", cut at
//!   `max_tokens` (`finish_reason: "length"` / `stop_reason: "max_tokens"`). When the
//!   request has tools and the last user message contains "weather" or "call_tool" (or
//!   the tool choice forces a tool), the reply is a call of the first (or forced) tool
//!   with arguments `{"location":"Paris"}`; when the last message carries tool results
//!   (OpenAI `tool` messages, Anthropic `tool_result` blocks) the reply is
//!   "Tool result: CONTENT". See [`text`] for the token counting rule.
//! * Order of events for a request: recorded in the stats, `hang`, `latency_ms`, fault
//!   injection (`fail_first`, `fail_rate`), key check, validation, reply. Non-streamed
//!   replies ignore `ttft_ms` and `tokens_per_second`.
//! * Streams: headers after `latency_ms`; the first body bytes (OpenAI role chunk /
//!   Anthropic `message_start`...`ping`, with the first token) `ttft_ms` later; then one
//!   token per event every `1/tokens_per_second` s. `drop_after_tokens: N` cuts the
//!   connection (no terminating chunk) after N tokens, `error_event_after_tokens: N`
//!   sends the provider's error event after N tokens and ends the body; either way the
//!   closing events (`[DONE]`, usage, `message_stop`) are never sent, even when the
//!   reply has fewer than N tokens.
//!
//! From Rust tests, [`spawn`] starts a server on `127.0.0.1:0`:
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use parley_e2e::mock_llm::{spawn, MockConfig};
//! let mock = spawn(MockConfig::default()).await?;
//! let base_url = mock.openai_base_url(); // http://127.0.0.1:PORT/v1
//! mock.update(|c| {
//!     c.fail_first = 2;
//!     c.fail_status = 500;
//! })?;
//! // ... send requests ...
//! assert_eq!(mock.stats().faults_injected, 2);
//! # Ok(()) }
//! ```

mod anthropic;
pub mod cli;
mod common;
mod config;
pub mod embeddings;
mod openai;
mod responses;
mod sse;
mod stats;
pub mod text;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::task::{JoinHandle, JoinSet};

pub use config::{ConfigError, MockConfig};
pub use stats::{RECENT_REQUESTS, RecordedRequest, Stats, key_fingerprint};

use common::Api;
use config::Live;
use stats::Recorder;

struct Shared {
    live: Mutex<Live>,
    stats: Arc<Recorder>,
    seq: AtomicU64,
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running mock server. Dropping it stops the server and closes every connection.
pub struct MockHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl MockHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADDR/v1`: the base URL for OpenAI and Anthropic clients (and for a
    /// ModelRoute backend's `baseUrl`).
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats.snapshot()
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        self.shared.stats.reset();
    }

    /// The current configuration (`fail_first` shows what is left).
    pub fn config(&self) -> MockConfig {
        self.shared.live().current().clone()
    }

    /// Replaces the whole configuration.
    pub fn set(&self, config: MockConfig) -> Result<(), ConfigError> {
        self.shared.live().install(config)
    }

    /// Changes the current configuration in place, e.g.
    /// `mock.update(|c| c.latency_ms = 50)`. An invalid result is refused.
    pub fn update(&self, f: impl FnOnce(&mut MockConfig)) -> Result<(), ConfigError> {
        let mut live = self.shared.live();
        let mut cfg = live.current().clone();
        f(&mut cfg);
        live.install(cfg)
    }

    /// Applies a partial JSON update exactly like `POST /_mock/config`.
    pub fn patch(&self, update: &Value) -> Result<MockConfig, ConfigError> {
        patch_config(&self.shared, update)
    }

    /// Restores the configuration the server was started with.
    pub fn reset_config(&self) -> Result<(), ConfigError> {
        let mut live = self.shared.live();
        let flags = live.flags().clone();
        live.install(flags)
    }

    /// Stops the server (same as dropping the handle).
    pub fn shutdown(self) {}
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a mock on `127.0.0.1:0` (a free port) with `config`.
pub async fn spawn(config: MockConfig) -> std::io::Result<MockHandle> {
    bind("127.0.0.1:0", config).await
}

/// Starts a mock listening on `addr` with `config`.
pub async fn bind(addr: impl ToSocketAddrs, config: MockConfig) -> std::io::Result<MockHandle> {
    bind_with(addr, config, None).await
}

/// As [`bind`], with HTTP/2 connections that allow at most `h2_max_streams` concurrent
/// streams (`None`: no limit), as providers' servers do.
pub async fn bind_with(
    addr: impl ToSocketAddrs,
    config: MockConfig,
    h2_max_streams: Option<u32>,
) -> std::io::Result<MockHandle> {
    let live =
        Live::new(config).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        live: Mutex::new(live),
        stats: Arc::new(Recorder::default()),
        seq: AtomicU64::new(1),
    });
    let app = router(Arc::clone(&shared));
    let task = tokio::spawn(accept_loop(listener, app, h2_max_streams));
    tracing::info!(%addr, "parley-mock-llm listening");
    Ok(MockHandle { addr, shared, task })
}

async fn accept_loop(listener: TcpListener, app: Router, h2_max_streams: Option<u32>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A gateway speaking h2c (a backend with `h2c: true`) may send all its streams over
    // one connection: no cap below the benchmarks' 10,000 unless asked for.
    builder.http2().max_concurrent_streams(h2_max_streams);
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let svc = TowerToHyperService::new(app.clone());
                    let builder = builder.clone();
                    conns.spawn(async move {
                        if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(messages))
        .route("/v1/responses", post(chat_completions))
        .route("/v1/embeddings", post(embeddings_request))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/_mock/config", get(get_config).post(post_config))
        .route("/_mock/stats", get(get_stats))
        .route("/_mock/reset-stats", post(reset_stats))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(shared)
}

async fn chat_completions(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    api_request(&s, Api::OpenAi, &method, uri.path(), &headers, body).await
}

async fn embeddings_request(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    api_request(&s, Api::OpenAi, &method, uri.path(), &headers, body).await
}

async fn messages(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    api_request(&s, Api::Anthropic, &method, uri.path(), &headers, body).await
}

async fn api_request(
    s: &Arc<Shared>,
    api: Api,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Result<Value, _> = serde_json::from_slice(&body);
    let model = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.get("model"))
        .and_then(Value::as_str);
    let key = common::api_key(headers, api);
    let key_fp = key.map(key_fingerprint);
    s.stats
        .request(method, path, headers, &body, model, key_fp.as_deref());
    let admission = s.live().admit(model);
    let profile = admission.profile;
    let cfg = &profile.cfg;
    if cfg.hang {
        tracing::debug!(path, "hanging (hang = true)");
        std::future::pending::<()>().await;
    }
    if cfg.latency_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(cfg.latency_ms)).await;
    }
    let seq = s.seq.fetch_add(1, Ordering::Relaxed);
    let injected = admission.fault.is_some();
    let mut resp = if let Some(status) = admission.fault {
        tracing::debug!(path, status, "injecting a failure");
        common::fault(api, status, cfg)
    } else if let Some(r) = common::check_auth(api, key, cfg) {
        r
    } else {
        match &parsed {
            Err(e) => common::bad_request(api, &format!("The request body is not valid JSON: {e}")),
            Ok(v) => match api {
                Api::OpenAi if path.ends_with("/embeddings") => {
                    embeddings::respond(&profile, &s.stats, seq, v)
                }
                Api::OpenAi if path.ends_with("/responses") => {
                    responses::respond(&profile, &s.stats, seq, v)
                }
                Api::OpenAi => openai::respond(&profile, &s.stats, seq, v),
                Api::Anthropic => anthropic::respond(&profile, &s.stats, seq, v),
            },
        }
    };
    let h = resp.headers_mut();
    h.insert("x-mock-name", profile.name_header.clone());
    let rid = HeaderValue::from(seq);
    if api == Api::Anthropic {
        h.insert("request-id", rid.clone());
    }
    h.insert("x-request-id", rid);
    s.stats.status(resp.status().as_u16(), injected);
    resp
}

async fn models(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    s.stats
        .request(&method, uri.path(), &headers, &Bytes::new(), None, None);
    let mut ids: Vec<String> = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for m in s.live().current().models.keys() {
        if !ids.contains(m) {
            ids.push(m.clone());
        }
    }
    let body = if headers.contains_key("anthropic-version") {
        let data: Vec<Value> = ids
            .iter()
            .map(|id| json!({"type": "model", "id": id, "display_name": id, "created_at": "2025-01-01T00:00:00Z"}))
            .collect();
        json!({"data": data, "has_more": false, "first_id": ids.first(), "last_id": ids.last()})
    } else {
        let data: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "parley-mock-llm"}))
            .collect();
        json!({"object": "list", "data": data})
    };
    s.stats.status(200, false);
    common::json_value(StatusCode::OK, &body)
}

async fn not_found(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    s.stats
        .request(&method, uri.path(), &headers, &Bytes::new(), None, None);
    s.stats.status(404, false);
    let api = if uri.path().starts_with("/v1/messages") {
        Api::Anthropic
    } else {
        Api::OpenAi
    };
    common::error(
        api,
        404,
        &format!("parley-mock-llm: no route for {method} {}", uri.path()),
    )
}

async fn get_config(State(s): State<Arc<Shared>>) -> Response {
    let cfg = s.live().current().clone();
    common::json_ser(StatusCode::OK, &cfg)
}

fn patch_config(s: &Shared, update: &Value) -> Result<MockConfig, ConfigError> {
    let mut live = s.live();
    let new = live.current().patched(live.flags(), update)?;
    live.install(new.clone())?;
    tracing::info!(?update, "configuration updated");
    Ok(new)
}

async fn post_config(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let update: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return ConfigError(format!("invalid JSON: {e}")).into_response(),
    };
    match patch_config(&s, &update) {
        Ok(cfg) => common::json_ser(StatusCode::OK, &cfg),
        Err(e) => e.into_response(),
    }
}

async fn get_stats(State(s): State<Arc<Shared>>) -> Response {
    common::json_ser(StatusCode::OK, &s.stats.snapshot())
}

async fn reset_stats(State(s): State<Arc<Shared>>) -> StatusCode {
    s.stats.reset();
    StatusCode::NO_CONTENT
}
