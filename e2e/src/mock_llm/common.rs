//! What both API flavours share: reply selection, stream planning, error bodies.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::config::MockConfig;
use super::sse::{Ending, Plan};
use super::stats::Recorder;
use super::text::TOOL_CALL_TOKENS;

/// Which provider API a request speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

/// The reply the mock decided to give.
pub enum Reply {
    /// `tokens[..n]`; `cut` when `max_tokens` shortened it.
    Text {
        tokens: Arc<[String]>,
        n: usize,
        cut: bool,
    },
    /// A call of the tool `name`.
    ToolCall { name: String },
}

impl Reply {
    pub fn text(tokens: Arc<[String]>, max_tokens: Option<u64>) -> Reply {
        let len = tokens.len();
        let n = match max_tokens {
            Some(m) if (m as usize) < len => m as usize,
            _ => len,
        };
        Reply::Text {
            tokens,
            n,
            cut: n < len,
        }
    }

    pub fn completion_tokens(&self) -> u64 {
        match self {
            Reply::Text { n, .. } => *n as u64,
            Reply::ToolCall { .. } => TOOL_CALL_TOKENS,
        }
    }

    /// The full reply text (text replies).
    pub fn joined(&self) -> String {
        match self {
            Reply::Text { tokens, n, .. } => tokens[..*n].concat(),
            Reply::ToolCall { .. } => String::new(),
        }
    }
}

/// The events of a stream, rendered, before pacing.
pub struct StreamEvents {
    /// Sent together with the first token.
    pub preamble: String,
    /// One rendered event per token.
    pub tokens: Vec<String>,
    /// Sent after the last token on a normal end.
    pub closing: String,
    /// Sent instead of the closing events by `error_event_after_tokens`.
    pub error_event: String,
}

/// Turns rendered events into a paced, fault-injected streaming response.
pub fn stream_response(
    events: StreamEvents,
    cfg: &MockConfig,
    stats: &Arc<Recorder>,
    prompt_tokens: u64,
) -> Response {
    let ttft = Duration::from_millis(cfg.ttft_ms);
    let interval = if cfg.tokens_per_second > 0.0 {
        Duration::from_secs_f64(1.0 / cfg.tokens_per_second)
    } else {
        Duration::ZERO
    };
    let due = |i: usize| ttft + interval.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
    let total = events.tokens.len();
    // The earliest cut wins; on a tie, the error event.
    let cut = match (cfg.error_event_after_tokens, cfg.drop_after_tokens) {
        (Some(e), Some(d)) if d < e => Some((d, Ending::Drop)),
        (Some(e), _) => Some((e, Ending::ErrorEvent)),
        (None, Some(d)) => Some((d, Ending::Drop)),
        (None, None) => None,
    };
    let k = cut.map_or(total, |(c, _)| {
        usize::try_from(c).unwrap_or(usize::MAX).min(total)
    });
    let mut plan = Plan::new();
    if k > 0 || cut.is_none() {
        plan.push(due(0), events.preamble.as_bytes(), 0);
    }
    for (i, ev) in events.tokens.iter().take(k).enumerate() {
        plan.push(due(i), ev.as_bytes(), 1);
    }
    let ending = match cut {
        None => {
            plan.push(due(k.saturating_sub(1)), events.closing.as_bytes(), 0);
            Ending::Complete
        }
        Some((_, Ending::ErrorEvent)) => {
            plan.push(due(k), events.error_event.as_bytes(), 0);
            Ending::ErrorEvent
        }
        Some((_, ending)) => ending,
    };
    stats.stream_started(prompt_tokens);
    let body = plan.into_body(ending, Arc::clone(stats), due(k));
    let mut resp = Response::new(Body::new(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A JSON response from pre-serialized bytes.
pub fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn json_value(status: StatusCode, body: &Value) -> Response {
    json_ser(status, body)
}

/// A JSON response serialized from `body` (fields in declaration order).
pub fn json_ser<T: serde::Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    json_bytes(status, serde_json::to_vec(body).unwrap_or_default())
}

/// An error in the shape of `api`.
pub fn error(api: Api, status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match api {
        Api::OpenAi => {
            let (ty, code_str): (&str, Value) = match status {
                401 => ("invalid_request_error", json!("invalid_api_key")),
                404 => ("invalid_request_error", json!("model_not_found")),
                429 => ("requests", json!("rate_limit_exceeded")),
                400..=499 => ("invalid_request_error", Value::Null),
                _ => ("server_error", json!("server_error")),
            };
            json!({"error": {"message": message, "type": ty, "param": null, "code": code_str}})
        }
        Api::Anthropic => {
            json!({"type": "error", "error": {"type": anthropic_error_type(status), "message": message}})
        }
    };
    json_value(code, &body)
}

pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// The response to an injected failure.
pub fn fault(api: Api, status: u16, cfg: &MockConfig) -> Response {
    let message = format!("{}: injected failure (status {status})", cfg.name);
    let mut resp = error(api, status, &message);
    let h = resp.headers_mut();
    if let Some(secs) = cfg.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    h.insert("x-mock-fault", HeaderValue::from_static("injected"));
    resp
}

/// The API key of a request: for Anthropic `x-api-key` first, for OpenAI
/// `Authorization: Bearer` first; then the other one, then `api-key`.
pub fn api_key(headers: &HeaderMap, api: Api) -> Option<&str> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let bearer = get("authorization")
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim())
        .filter(|s| !s.is_empty());
    let x = get("x-api-key");
    let first = match api {
        Api::OpenAi => bearer.or(x),
        Api::Anthropic => x.or(bearer),
    };
    first.or_else(|| get("api-key"))
}

/// `Some(401 response)` when the key is missing or not accepted.
pub fn check_auth(api: Api, key: Option<&str>, cfg: &MockConfig) -> Option<Response> {
    match key {
        None if cfg.require_api_key => {
            let msg = match api {
                Api::OpenAi => "You didn't provide an API key (Authorization: Bearer KEY).",
                Api::Anthropic => "x-api-key header is required",
            };
            Some(error(api, 401, msg))
        }
        Some(k) if !cfg.api_keys.is_empty() && !cfg.api_keys.iter().any(|a| a == k) => {
            let msg = match api {
                Api::OpenAi => "Incorrect API key provided.",
                Api::Anthropic => "invalid x-api-key",
            };
            Some(error(api, 401, msg))
        }
        _ => None,
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `s` as a JSON string literal.
pub fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// 400 helper.
pub fn bad_request(api: Api, message: &str) -> Response {
    error(api, 400, message)
}

impl IntoResponse for super::config::ConfigError {
    fn into_response(self) -> Response {
        json_value(StatusCode::BAD_REQUEST, &json!({"error": self.0}))
    }
}
