//! Routing a request to an upstream: backend choice, attempts with backoff, breakers,
//! fallbacks, and the first-byte rule for streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use parley_crds::gateway_config::{ModelKind, Provider};
use serde_json::{Map, Value};
use tokio::time::timeout_at;

use crate::breaker::{BreakerState, Outcome};
use crate::error::{ApiError, ApiFormat, ErrorKind};
use crate::metrics::AttemptLabels;
use crate::overhead::ConnTiming;
use crate::runtime::{Backend, Model, Tenant};
use crate::state::AppState;
use crate::translate::sse::{MAX_EVENT_BYTES, SseEvent, SseParser};
use crate::translate::stream::{StreamTranslator, Upstream};
use crate::translate::{self, Usage, request, response};

/// The client's request, validated.
pub struct ClientRequest {
    /// The API it came in on.
    pub format: ApiFormat,
    /// The JSON body.
    pub body: Map<String, Value>,
    /// Streaming.
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub wants_usage: bool,
    /// `x-request-id` (forwarded upstream).
    pub request_id: HeaderValue,
    /// `anthropic-beta` (forwarded to Anthropic upstreams).
    pub anthropic_beta: Option<HeaderValue>,
}

/// A served request, before it is turned into a response.
pub enum Served {
    /// A whole body in the client's format.
    Full {
        /// Body bytes.
        body: Bytes,
        /// Usage.
        usage: Usage,
    },
    /// A stream whose first event arrived.
    Stream(Box<StreamStart>),
}

/// A stream that passed the first-byte point.
pub struct StreamStart {
    /// Client bytes already translated.
    pub first: Bytes,
    /// Translator state.
    pub translator: StreamTranslator,
    /// Parser with any partial event.
    pub parser: SseParser,
    /// The rest of the upstream body.
    pub body: crate::upstream::UpstreamBody,
    /// End of the whole call.
    pub deadline: tokio::time::Instant,
}

/// Who served and how long the gateway waited on upstreams.
pub struct ServedBy {
    /// The model.
    pub model: Arc<Model>,
    /// Backend index in the model.
    pub backend: usize,
    /// Time spent waiting on upstreams, taken at the edges of each exchange (sending the
    /// request to its response headers and body, or a stream's first event), and
    /// backing off between attempts. Everything else is Parley's own overhead.
    pub upstream_wait: Duration,
}

#[derive(Debug)]
enum Failure {
    /// 429.
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// 5xx, a broken stream before its first byte, or an unreadable body.
    Server { message: String },
    /// Connect / first token / total timeout.
    Timeout { message: String },
    /// Connect refused, reset, DNS.
    Connection { message: String },
}

impl Failure {
    fn outcome_label(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited",
            Self::Server { .. } => "server_error",
            Self::Timeout { .. } => "timeout",
            Self::Connection { .. } => "connection",
        }
    }
    fn message(&self) -> &str {
        match self {
            Self::RateLimited { message, .. }
            | Self::Server { message }
            | Self::Timeout { message }
            | Self::Connection { message } => message,
        }
    }
}

enum AttemptError {
    Retry(Failure),
    Fatal(ApiError),
}

fn parse_retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_millis(ms as u64));
    }
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Backoff before retry number `n` (0 = the first retry): exponential, capped, with
/// jitter in [half, full].
pub fn backoff(initial_ms: u64, max_ms: u64, n: u32) -> Duration {
    let base = initial_ms.saturating_mul(1u64 << n.min(20)).min(max_ms);
    let half = base / 2;
    Duration::from_millis(half + fastrand::u64(0..=base - half))
}

/// Picks a backend: weighted among available ones with weight > 0 not yet tried, then
/// any available with weight > 0, then standby (weight 0) ones. Takes the breaker's
/// permit (the single half-open probe, if that is where it stands).
pub fn pick_backend(model: &Model, tried: &[usize], now: Instant) -> Option<usize> {
    let mut excluded: Vec<usize> = Vec::new();
    // Tiers in order: (standby backends?, backends already tried allowed?).
    const TIERS: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];
    loop {
        let mut chosen = None;
        for (standby, retried) in TIERS {
            let candidates: Vec<usize> = model
                .backends
                .iter()
                .enumerate()
                .filter(|(i, b)| {
                    (b.weight == 0) == standby
                        && (retried || !tried.contains(i))
                        && !excluded.contains(i)
                        && b.breaker.available(now)
                })
                .map(|(i, _)| i)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let total: u64 = candidates
                .iter()
                .map(|i| u64::from(model.backends[*i].weight.max(1)))
                .sum();
            let mut r = fastrand::u64(0..total);
            for i in &candidates {
                let w = u64::from(model.backends[*i].weight.max(1));
                if r < w {
                    chosen = Some(*i);
                    break;
                }
                r -= w;
            }
            break;
        }
        let i = chosen?;
        if model.backends[i].breaker.acquire(now) {
            return Some(i);
        }
        excluded.push(i);
    }
}

/// Serves `req` from `chain` (the requested model first, then the fallbacks the tenant
/// may use).
pub async fn route(
    state: &AppState,
    tenant: &Tenant,
    chain: &[Arc<Model>],
    req: &ClientRequest,
) -> Result<(Served, ServedBy), (ApiError, Duration)> {
    route_with(state, tenant, chain, req, None).await
}

/// [`route`] for a Responses API request: `req` is its chat completions translation;
/// a backend that speaks the Responses API (`responsesApi`) is sent `responses` instead,
/// and what it serves (a response object, or its event stream passed through) is left
/// in the Responses format.
pub async fn route_with(
    state: &AppState,
    tenant: &Tenant,
    chain: &[Arc<Model>],
    req: &ClientRequest,
    responses: Option<&Map<String, Value>>,
) -> Result<(Served, ServedBy), (ApiError, Duration)> {
    let start = tokio::time::Instant::now();
    let budget_ms = chain
        .first()
        .and_then(|m| m.backends.iter().map(|b| b.timeouts.total_ms).max())
        .unwrap_or(300_000);
    let overall = start + Duration::from_millis(budget_ms);
    let mut wait = Duration::ZERO;
    let mut failures: Vec<String> = Vec::new();
    let mut last_timeout = false;
    let mut attempted = false;
    let mut unsupported: Option<ApiError> = None;

    for (mi, model) in chain.iter().enumerate() {
        // The request as this model's providers need it (built lazily, once per provider).
        let mut bodies: [Option<Result<Prepared, ApiError>>; 3] = [None, None, None];
        let mut tried: Vec<usize> = Vec::new();
        let retry = model.config.retry;
        let mut n = 0;
        'attempts: while n < retry.max_attempts {
            if tokio::time::Instant::now() >= overall {
                break;
            }
            let Some(bi) = pick_backend(model, &tried, Instant::now()) else {
                failures.push(format!(
                    "{}: no backend available (circuit breakers open)",
                    model.name
                ));
                last_timeout = false;
                break;
            };
            tried.push(bi);
            n += 1;
            let backend = &model.backends[bi];
            let passthrough = responses.filter(|_| backend.responses_url.is_some());
            let slot = match (backend.provider, passthrough) {
                (_, Some(_)) => 2,
                (Provider::Openai, None) => 0,
                (Provider::Anthropic, None) => 1,
            };
            let prepared = bodies[slot].get_or_insert_with(|| match passthrough {
                Some(r) => Ok(Prepared::Responses(r.clone())),
                None => prepare(req, backend.provider, model),
            });
            let prepared = match prepared {
                Ok(p) => p,
                Err(e) => {
                    // The primary model cannot take this request: the client must fix it.
                    // A fallback that cannot is skipped.
                    backend.breaker.record(Outcome::Neutral, Instant::now());
                    if mi == 0 {
                        return Err((e.clone(), wait));
                    }
                    unsupported.get_or_insert_with(|| e.clone());
                    break 'attempts;
                }
            };
            attempted = true;
            let result = attempt(
                state, tenant, model, backend, prepared, req, overall, &mut wait,
            )
            .await;
            match result {
                Ok(served) => {
                    record_attempt(state, model, backend, Outcome::Success, "success");
                    return Ok((
                        served,
                        ServedBy {
                            model: Arc::clone(model),
                            backend: bi,
                            upstream_wait: wait,
                        },
                    ));
                }
                Err(AttemptError::Fatal(e)) => {
                    record_attempt(state, model, backend, Outcome::Neutral, "client_error");
                    return Err((e, wait));
                }
                Err(AttemptError::Retry(f)) => {
                    let outcome = match f {
                        Failure::RateLimited { .. } => Outcome::Neutral,
                        _ => Outcome::Failure,
                    };
                    record_attempt(state, model, backend, outcome, f.outcome_label());
                    tracing::info!(
                        request_id = req.request_id.to_str().unwrap_or(""),
                        model = %model.name, backend = %backend.name, outcome = f.outcome_label(),
                        "upstream attempt failed: {}", f.message()
                    );
                    last_timeout = matches!(f, Failure::Timeout { .. });
                    failures.push(format!("{}/{}: {}", model.name, backend.name, f.message()));
                    if n >= retry.max_attempts {
                        break;
                    }
                    let left = overall.saturating_duration_since(tokio::time::Instant::now());
                    let mut pause = backoff(retry.initial_backoff_ms, retry.max_backoff_ms, n - 1);
                    if let Failure::RateLimited {
                        retry_after: Some(ra),
                        ..
                    } = f
                    {
                        if ra > Duration::from_millis(retry.max_backoff_ms) || ra >= left {
                            // Waiting is pointless: move on to the next model at once.
                            break;
                        }
                        pause = pause.max(ra);
                    }
                    if pause >= left {
                        break;
                    }
                    tokio::time::sleep(pause).await;
                    wait += pause;
                }
            }
        }
    }
    if !attempted && let Some(e) = unsupported {
        return Err((e, wait));
    }
    let summary = failures.join("; ");
    tracing::warn!(
        request_id = req.request_id.to_str().unwrap_or(""),
        model = chain.first().map(|m| m.name.as_str()).unwrap_or(""),
        "no backend could serve the request: {summary}"
    );
    let err = if !attempted {
        ApiError::new(
            ErrorKind::Unavailable,
            format!(
                "no backend is available for model {:?} or its fallbacks: {summary}; retry later",
                chain.first().map(|m| m.name.as_str()).unwrap_or("")
            ),
        )
    } else if last_timeout {
        ApiError::new(
            ErrorKind::Timeout,
            format!("upstream timed out and no fallback could serve: {summary}"),
        )
    } else {
        ApiError::new(
            ErrorKind::Upstream,
            format!("every backend and fallback failed: {summary}"),
        )
    };
    Err((err, wait))
}

/// The request for one provider: the client's own (patched while serialising) or a
/// translation.
enum Prepared {
    Same,
    Translated(Map<String, Value>),
    /// A Responses API request for a backend that speaks it.
    Responses(Map<String, Value>),
}

/// Feeds an attempt's outcome to the backend's breaker and records it in the metrics.
fn record_attempt(
    state: &AppState,
    model: &Model,
    backend: &Backend,
    outcome: Outcome,
    label: &'static str,
) {
    let (before, breaker) = backend.breaker.record_transition(outcome, Instant::now());
    match (before, breaker) {
        (BreakerState::Open, _) | (_, BreakerState::HalfOpen) => {}
        (_, BreakerState::Open) => tracing::warn!(
            model = %model.name, backend = %backend.name, outcome = label,
            "circuit breaker opened: the backend takes no requests until a probe succeeds"
        ),
        (BreakerState::HalfOpen, BreakerState::Closed) => tracing::info!(
            model = %model.name, backend = %backend.name,
            "circuit breaker closed: the probe succeeded"
        ),
        (BreakerState::Closed, BreakerState::Closed) => {}
    }
    state
        .metrics
        .breaker
        .get_or_create(&backend.labels)
        .set(breaker.gauge());
    let labels = AttemptLabels {
        model: Arc::clone(&model.name),
        backend: Arc::clone(&backend.name),
        outcome: label,
    };
    state.metrics.attempts.get_or_create(&labels).inc();
}

fn prepare(req: &ClientRequest, provider: Provider, model: &Model) -> Result<Prepared, ApiError> {
    // The model field is filled per backend; translation only depends on the provider.
    let max = model.config.max_output_tokens;
    let v = match (req.format, provider) {
        (ApiFormat::OpenAi, Provider::Openai) | (ApiFormat::Anthropic, Provider::Anthropic) => {
            return Ok(Prepared::Same);
        }
        (ApiFormat::OpenAi, Provider::Anthropic) => {
            request::openai_to_anthropic(&req.body, "", max)?
        }
        (ApiFormat::Anthropic, Provider::Openai) => {
            request::anthropic_to_openai(&req.body, "", req.stream)?
        }
    };
    match v {
        Value::Object(m) => Ok(Prepared::Translated(m)),
        _ => Err(ApiError::new(
            ErrorKind::Internal,
            "translation produced no object",
        )),
    }
}

fn upstream_kind(p: Provider) -> Upstream {
    match p {
        Provider::Openai => Upstream::OpenAi,
        Provider::Anthropic => Upstream::Anthropic,
    }
}

/// One upstream attempt; adds the time spent waiting on the upstream to `wait`.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    state: &AppState,
    tenant: &Tenant,
    model: &Model,
    backend: &Backend,
    prepared: &mut Prepared,
    req: &ClientRequest,
    overall: tokio::time::Instant,
    wait: &mut Duration,
) -> Result<Served, AttemptError> {
    let _ = state;
    let encoded = match prepared {
        Prepared::Same => serde_json::to_vec(&request::Patched {
            base: &req.body,
            model: &backend.upstream_model,
            stream_usage: req.stream && backend.provider == Provider::Openai,
            max_tokens: (backend.provider == Provider::Anthropic)
                .then_some(model.config.max_output_tokens),
        }),
        Prepared::Translated(map) | Prepared::Responses(map) => {
            map.insert(
                "model".into(),
                Value::String(backend.upstream_model.clone()),
            );
            serde_json::to_vec(map)
        }
    };
    let body = encoded.map_err(|e| {
        AttemptError::Fatal(ApiError::new(ErrorKind::Internal, format!("encoding: {e}")))
    })?;
    let passthrough = matches!(prepared, Prepared::Responses(_));
    let url = match (&backend.responses_url, passthrough) {
        (Some(u), true) => u.clone(),
        _ => backend.url.clone(),
    };
    let mut builder = Request::post(url)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header("x-request-id", req.request_id.clone());
    let auth = if tenant.upstream_keys.is_empty() {
        backend.auth.as_ref()
    } else {
        tenant
            .upstream_keys
            .get(&((*model.name).clone(), (*backend.name).clone()))
            .or(backend.auth.as_ref())
    };
    if let Some(a) = auth {
        builder = builder.header(a.name.clone(), a.value.clone());
    }
    if backend.provider == Provider::Anthropic {
        builder = builder.header("anthropic-version", HeaderValue::from_static("2023-06-01"));
        if let Some(beta) = &req.anthropic_beta
            && req.format == ApiFormat::Anthropic
        {
            builder = builder.header("anthropic-beta", beta.clone());
        }
    }
    if req.stream {
        builder = builder.header(
            http::header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
    }
    let request = builder.body(Bytes::from(body)).map_err(|e| {
        AttemptError::Fatal(ApiError::new(
            ErrorKind::Internal,
            format!("building the upstream request: {e}"),
        ))
    })?;

    let now = tokio::time::Instant::now();
    let t = backend.timeouts;
    let total_deadline = overall.min(now + Duration::from_millis(t.total_ms));
    let first_deadline = total_deadline.min(now + Duration::from_millis(t.first_token_ms));
    // The wait is first taken around each await on the upstream (`coarse`); once the
    // exchange is over, the connection's own clock narrows it to the time bytes took:
    // from the connect (a new connection) or the request's first byte to the last byte
    // read (`narrow_wait`). Pool checkout, hyper's work and task hand-offs are Parley's.
    let coarse_before = *wait;
    let since = crate::overhead::mark();
    let sent = tokio::time::Instant::now();
    let answered = timeout_at(first_deadline, backend.client.request(request)).await;
    *wait += sent.elapsed();
    let clock = answered
        .as_ref()
        .ok()
        .and_then(|r| r.as_ref().ok())
        .and_then(|r| r.extensions().get::<ConnTiming>().cloned());
    let narrow = |wait: &mut Duration| narrow_wait(wait, coarse_before, since, clock.as_ref());
    let response = match answered {
        Err(_) => {
            return Err(AttemptError::Retry(Failure::Timeout {
                message: format!(
                    "no response within {} ms",
                    first_deadline.duration_since(now).as_millis()
                ),
            }));
        }
        Ok(Err(e)) => {
            let message = if e.is_connect() {
                format!("cannot connect: {}", error_chain(&e))
            } else {
                format!("connection failed: {}", error_chain(&e))
            };
            return Err(AttemptError::Retry(Failure::Connection { message }));
        }
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    if !status.is_success() {
        let retry_after = parse_retry_after(response.headers());
        let t0 = tokio::time::Instant::now();
        let collected = timeout_at(
            total_deadline.min(t0 + Duration::from_secs(2)),
            response.into_body().collect(),
        )
        .await;
        *wait += t0.elapsed();
        narrow(wait);
        let body = match collected {
            Ok(Ok(c)) => c.to_bytes(),
            _ => Bytes::new(),
        };
        // Never the upstream's body verbatim: only the message of a JSON error, bounded
        // and without control characters.
        let upstream_msg = response::upstream_error_message(&body)
            .map(|m| sanitize_upstream_message(&m))
            .unwrap_or_else(|| format!("a {}-byte answer that is not a JSON error", body.len()));
        let message = format!("HTTP {}: {}", status.as_u16(), upstream_msg);
        return Err(match status.as_u16() {
            429 => AttemptError::Retry(Failure::RateLimited {
                retry_after,
                message,
            }),
            // The provider's message is not repeated: it may quote part of the key.
            401 | 403 => AttemptError::Fatal(ApiError::new(
                ErrorKind::Upstream,
                format!(
                    "the provider rejected the gateway's API key for model {:?} backend {:?} (HTTP {}); the operator must fix the backend's apiKey or the tenant's upstreamKeys",
                    model.name.as_str(),
                    backend.name.as_str(),
                    status.as_u16()
                ),
            )),
            408 => AttemptError::Retry(Failure::Timeout { message }),
            s if s >= 500 => AttemptError::Retry(Failure::Server { message }),
            _ => {
                let mut e =
                    ApiError::invalid(format!("the upstream refused the request: {upstream_msg}"));
                if status != StatusCode::BAD_REQUEST {
                    e.status_override = Some(status);
                }
                AttemptError::Fatal(e)
            }
        });
    }

    let mut body = response.into_body();
    if !req.stream {
        let t0 = tokio::time::Instant::now();
        let collected = timeout_at(total_deadline, body.collect()).await;
        *wait += t0.elapsed();
        let bytes = match collected {
            Err(_) => {
                return Err(AttemptError::Retry(Failure::Timeout {
                    message: format!("response body not complete within {} ms", t.total_ms),
                }));
            }
            Ok(Err(e)) => {
                return Err(AttemptError::Retry(Failure::Connection {
                    message: format!("response body broken: {}", error_chain(&e)),
                }));
            }
            Ok(Ok(c)) => c.to_bytes(),
        };
        narrow(wait);
        if passthrough {
            let usage = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| translate::responses::usage_of(&v))
                .ok_or_else(|| {
                    AttemptError::Retry(Failure::Server {
                        message: "the upstream answered 2xx with a body that is not a response"
                            .into(),
                    })
                })?;
            return Ok(Served::Full { body: bytes, usage });
        }
        if model.config.kind == ModelKind::Embeddings {
            return crate::api::embeddings::upstream_usage(&bytes)
                .map(|usage| Served::Full { body: bytes, usage })
                .ok_or_else(|| {
                    AttemptError::Retry(Failure::Server {
                        message:
                            "the upstream answered 2xx with a body that is not an embeddings list"
                                .into(),
                    })
                });
        }
        return full_response(req.format, backend.provider, bytes, &model.name);
    }

    // Streaming: wait for the first complete event before committing to this backend.
    // A Responses stream is watched by the caller, never changed here: the usage event
    // must pass (`wants_usage`).
    let mut translator = StreamTranslator::new(
        req.format,
        upstream_kind(backend.provider),
        req.wants_usage || passthrough,
        &model.name,
    );
    let mut parser = SseParser::default();
    let mut out = BytesMut::new();
    let mut first: Option<SseEvent> = None;
    while first.is_none() {
        let t0 = tokio::time::Instant::now();
        let frame = timeout_at(first_deadline, body.frame()).await;
        *wait += t0.elapsed();
        match frame {
            Err(_) => {
                return Err(AttemptError::Retry(Failure::Timeout {
                    message: format!("no first token within {} ms", t.first_token_ms),
                }));
            }
            Ok(None) => {
                return Err(AttemptError::Retry(Failure::Server {
                    message: "stream ended before its first event".into(),
                }));
            }
            Ok(Some(Err(e))) => {
                return Err(AttemptError::Retry(Failure::Connection {
                    message: format!("stream broken before its first event: {}", error_chain(&e)),
                }));
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    parser.push(&data);
                    if parser.pending() > MAX_EVENT_BYTES {
                        return Err(AttemptError::Retry(Failure::Server {
                            message: "oversized stream event".into(),
                        }));
                    }
                    first = parser.next_event();
                }
            }
        }
    }
    if let Some(ev) = first {
        let responses_error =
            passthrough && matches!(ev.event.as_deref(), Some("error" | "response.failed"));
        if responses_error || translator.is_error_event(&ev) {
            return Err(AttemptError::Retry(Failure::Server {
                message: format!(
                    "stream failed before its first token: {}",
                    response::upstream_error_message(ev.data.as_bytes())
                        .map(|m| sanitize_upstream_message(&m))
                        .unwrap_or_else(|| "an error event".into())
                ),
            }));
        }
        translator.on_event(&ev, &mut out);
        while let Some(ev) = parser.next_event() {
            translator.on_event(&ev, &mut out);
        }
    }
    narrow(wait);
    Ok(Served::Stream(Box::new(StreamStart {
        first: out.freeze(),
        translator,
        parser,
        body,
        deadline: total_deadline,
    })))
}

/// Narrows an attempt's upstream wait (`wait - coarse_before`, taken around the awaits)
/// to what the connection's clock saw of the exchange that began at `since`, when it saw
/// it (never more than the coarse measure).
fn narrow_wait(
    wait: &mut Duration,
    coarse_before: Duration,
    since: u64,
    clock: Option<&ConnTiming>,
) {
    let coarse = wait.saturating_sub(coarse_before);
    if let Some(io) = clock.and_then(|c| c.waited_since(since))
        && io < coarse
    {
        *wait = coarse_before + io;
    }
}

fn full_response(
    format: ApiFormat,
    provider: Provider,
    bytes: Bytes,
    model: &str,
) -> Result<Served, AttemptError> {
    let bad = |what: &str| {
        AttemptError::Retry(Failure::Server {
            message: format!("the upstream answered 2xx with {what}"),
        })
    };
    match (format, provider) {
        (ApiFormat::OpenAi, Provider::Openai) => {
            let usage = translate::openai_usage(&bytes)
                .ok_or_else(|| bad("a body that is not a chat completion"))?;
            Ok(Served::Full { body: bytes, usage })
        }
        (ApiFormat::Anthropic, Provider::Anthropic) => {
            let usage = translate::anthropic_usage(&bytes)
                .ok_or_else(|| bad("a body that is not a message"))?;
            Ok(Served::Full { body: bytes, usage })
        }
        (ApiFormat::Anthropic, Provider::Openai) => {
            let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad("invalid JSON"))?;
            let (out, usage) = response::openai_to_anthropic(&v, model);
            Ok(Served::Full {
                body: Bytes::from(out.to_string()),
                usage,
            })
        }
        (ApiFormat::OpenAi, Provider::Anthropic) => {
            let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad("invalid JSON"))?;
            let (out, usage) = response::anthropic_to_openai(&v, model);
            Ok(Served::Full {
                body: Bytes::from(out.to_string()),
                usage,
            })
        }
    }
}

/// Longest upstream error message passed on.
const MAX_UPSTREAM_MESSAGE: usize = 300;

/// An upstream's error message as the gateway repeats it: at most
/// [`MAX_UPSTREAM_MESSAGE`] characters, control characters replaced by spaces.
pub fn sanitize_upstream_message(message: &str) -> String {
    let mut out: String = message
        .chars()
        .take(MAX_UPSTREAM_MESSAGE)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if message.chars().nth(MAX_UPSTREAM_MESSAGE).is_some() {
        out.push_str("...");
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let b0 = backoff(100, 2000, 0).as_millis();
            assert!((50..=100).contains(&b0), "{b0}");
            let b3 = backoff(100, 2000, 3).as_millis();
            assert!((400..=800).contains(&b3), "{b3}");
            let b9 = backoff(100, 2000, 9).as_millis();
            assert!((1000..=2000).contains(&b9), "{b9}");
        }
    }

    fn model(yaml_backends: &str) -> Arc<Model> {
        let text = format!(
            "apiVersion: parley.dev/gateway/v1\ndefaultModel: m\nmodels:\n- name: m\n  circuitBreaker: {{failureThreshold: 1, openSeconds: 60}}\n  backends:\n{yaml_backends}"
        );
        let cfg = parley_crds::GatewayConfig::from_yaml(&text).unwrap();
        let shared = crate::runtime::Shared::new(Arc::new(crate::metrics::Metrics::new())).unwrap();
        let rt =
            crate::runtime::build(cfg, &text, std::path::Path::new("/x/c.yaml"), &shared).unwrap();
        Arc::clone(&rt.models["m"])
    }

    #[test]
    fn weighted_choice_standby_and_breakers() {
        let m = model(
            "  - {name: a, provider: openai, baseUrl: 'http://127.0.0.1:1/v1', weight: 3}\n  - {name: b, provider: openai, baseUrl: 'http://127.0.0.1:2/v1', weight: 1}\n  - {name: s, provider: openai, baseUrl: 'http://127.0.0.1:3/v1', weight: 0}\n",
        );
        let now = Instant::now();
        let mut counts = [0; 3];
        for _ in 0..4000 {
            counts[pick_backend(&m, &[], now).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0, "weight 0 is standby only");
        assert!((2700..3300).contains(&counts[0]), "{counts:?}");
        // A retry prefers a backend not tried yet.
        assert_eq!(pick_backend(&m, &[0], now), Some(1));
        // Open breakers take backends out; then the standby serves.
        m.backends[0].breaker.record(Outcome::Failure, now);
        m.backends[1].breaker.record(Outcome::Failure, now);
        assert_eq!(pick_backend(&m, &[], now), Some(2));
        m.backends[2].breaker.record(Outcome::Failure, now);
        assert_eq!(pick_backend(&m, &[], now), None);
        // After openSeconds, one probe per backend.
        let later = now + Duration::from_secs(60);
        let first = pick_backend(&m, &[], later).unwrap();
        let second = pick_backend(&m, &[], later).unwrap();
        assert_ne!(first, second);
        assert!(first < 2 && second < 2, "positive weights first");
        assert_eq!(pick_backend(&m, &[], later), Some(2));
        assert_eq!(pick_backend(&m, &[], later), None);
    }

    #[test]
    fn upstream_messages_are_bounded_and_clean() {
        assert_eq!(
            sanitize_upstream_message("bad\nthing\u{1b}[31m"),
            "bad thing [31m"
        );
        let long = "x".repeat(1000);
        let s = sanitize_upstream_message(&long);
        assert_eq!(s.len(), MAX_UPSTREAM_MESSAGE + 3);
    }

    #[test]
    fn retry_after_is_read() {
        let mut h = http::HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_millis(250)));
    }
}
