//! The chat API handlers: `/v1/chat/completions`, `/v1/messages`, `/v1/models`, `/chat`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};

use crate::cache;
use crate::error::{ApiError, ApiFormat, ErrorKind};
use crate::limits::{LimitRequest, Limiter, RefusalKind, Reservation};
use crate::metrics::{Label, ModelLabel, RefusalLabels, RequestLabels, TenantModel, TokenLabels};
use crate::proxy::{self, ClientRequest, Served, StreamStart};
use crate::redis_state::{CachedEntry, Redis, RedisReservation};
use crate::runtime::{Model, Runtime, Tenant, cost_at};
use crate::sessions::SessionStore;
use crate::state::AppState;
use crate::translate::Usage;

/// Most messages accepted in one request.
pub const MAX_MESSAGES: usize = 10_000;
/// Bytes read past the body limit before answering 413 (so the client gets the answer
/// instead of a reset).
const DRAIN_BYTES: u64 = 64 * 1024 * 1024;

/// The request id, set by the middleware.
#[derive(Clone, Debug)]
pub struct RequestId(pub HeaderValue);

fn label(s: &str) -> Label {
    Arc::new(s.to_string())
}

/// What admission reserved, and where.
enum Held {
    /// In this process.
    Local(Reservation),
    /// In Redis.
    Shared(Arc<Redis>, RedisReservation),
}

/// Everything recorded about a request once it ends (also when the client goes away).
struct Accounting {
    state: Arc<AppState>,
    api: &'static str,
    tenant: Label,
    model: Label,
    backend: Label,
    start: Instant,
    reservation: Option<Held>,
    price: Option<(i64, i64)>,
    done: bool,
}

impl Accounting {
    fn new(state: &Arc<AppState>, api: &'static str, start: Instant) -> Self {
        Self {
            state: Arc::clone(state),
            api,
            tenant: label("unknown"),
            model: label("unknown"),
            backend: label("none"),
            start,
            reservation: None,
            price: None,
            done: false,
        }
    }

    fn finish(&mut self, status: u16, usage: Usage) {
        if self.done {
            return;
        }
        self.done = true;
        let m = &self.state.metrics;
        m.requests
            .get_or_create(&RequestLabels {
                tenant: Arc::clone(&self.tenant),
                model: Arc::clone(&self.model),
                backend: Arc::clone(&self.backend),
                status,
                api: self.api,
            })
            .inc();
        let tm = TenantModel {
            tenant: Arc::clone(&self.tenant),
            model: Arc::clone(&self.model),
        };
        m.latency
            .get_or_create(&tm)
            .observe(self.start.elapsed().as_secs_f64());
        let cost = self
            .price
            .map(|p| cost_at(p, usage.input, usage.output))
            .unwrap_or(0);
        if usage.input > 0 || usage.output > 0 {
            m.tokens
                .get_or_create(&TokenLabels {
                    tenant: Arc::clone(&self.tenant),
                    model: Arc::clone(&self.model),
                    kind: "input",
                })
                .inc_by(usage.input);
            m.tokens
                .get_or_create(&TokenLabels {
                    tenant: Arc::clone(&self.tenant),
                    model: Arc::clone(&self.model),
                    kind: "output",
                })
                .inc_by(usage.output);
        }
        if cost > 0 {
            m.cost.get_or_create(&tm).inc_by(cost as u64);
        }
        let tokens = usage.input.saturating_add(usage.output);
        match self.reservation.take() {
            None => {}
            Some(Held::Local(r)) => {
                let limiter = Arc::clone(&self.state.limiter);
                // Settled off the request path; outside a runtime (shutdown), right here.
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => {
                        handle.spawn(async move { limiter.settle(r, tokens, cost).await });
                    }
                    Err(_) => limiter.settle_now(r, tokens, cost),
                }
            }
            Some(Held::Shared(redis, r)) => {
                // One more round trip, in a spawned task (off the request path; a client
                // that went away cannot cancel it).
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move { redis.settle(r, tokens, cost).await });
                }
            }
        }
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        // The client went away before the answer was complete.
        self.finish(499, Usage::default());
    }
}

struct InFlight(Arc<AppState>);
impl InFlight {
    fn new(state: &Arc<AppState>) -> Self {
        state.metrics.in_flight.inc();
        Self(Arc::clone(state))
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}

fn api_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let b = v.as_bytes();
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(trim_ascii(&b[7..]));
        }
    }
    headers.get("x-api-key").map(|v| trim_ascii(v.as_bytes()))
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

fn authenticate<'a>(rt: &'a Runtime, headers: &HeaderMap) -> Result<&'a Tenant, ApiError> {
    let Some(key) = api_key(headers).filter(|k| !k.is_empty()) else {
        return Err(ApiError::new(
            ErrorKind::Authentication,
            "missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`",
        ));
    };
    rt.tenant_for_key(key).ok_or_else(|| {
        ApiError::new(
            ErrorKind::Authentication,
            "invalid API key: check the key you were given",
        )
    })
}

/// Reads the body up to `limit` bytes; a larger body is drained (up to a bound) and
/// answered with 413, so the client reads the answer rather than a reset.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: u64) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "request body is larger than the limit of {limit} bytes; send a shorter conversation"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit) as usize);
    let mut total: u64 = 0;
    let mut over = declared.is_some_and(|n| n > limit);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::invalid(
                    "request body was not received within 30 s",
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ApiError::invalid("request body could not be read")),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > limit {
                over = true;
            }
            if over {
                if total > DRAIN_BYTES {
                    break;
                }
            } else {
                buf.extend_from_slice(&data);
            }
        }
    }
    if over {
        return Err(too_large());
    }
    Ok(buf.freeze())
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid("the request body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

fn check_messages(body: &Map<String, Value>) -> Result<usize, ApiError> {
    match body.get("messages") {
        Some(Value::Array(m)) if m.is_empty() => Err(ApiError::invalid(
            "`messages` must contain at least one message",
        )),
        Some(Value::Array(m)) if m.len() > MAX_MESSAGES => Err(ApiError::invalid(format!(
            "`messages` has {} messages; at most {MAX_MESSAGES} are accepted: shorten the conversation",
            m.len()
        ))),
        Some(Value::Array(m)) => {
            for (i, msg) in m.iter().enumerate() {
                if !msg.get("role").is_some_and(Value::is_string) {
                    return Err(ApiError::invalid(format!(
                        "`messages[{i}].role` is required and must be a string"
                    )));
                }
            }
            Ok(m.len())
        }
        Some(_) => Err(ApiError::invalid("`messages` must be an array")),
        None => Err(ApiError::invalid("`messages` is required")),
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn set_common(resp: &mut Response, model: &str, backend: &str, overhead: Duration) {
    let h = resp.headers_mut();
    h.insert("x-parley-model", header_value(model));
    h.insert("x-parley-backend", header_value(backend));
    h.insert(
        "x-parley-overhead-ms",
        header_value(&format!("{:.3}", overhead.as_secs_f64() * 1000.0)),
    );
}

/// Resolves the model a request may use and its fallback chain.
/// The model a request names and its fallback chain as this tenant may use it. Once the
/// model is known it is recorded in `acct`, so refusals are counted under it.
fn resolve_model(
    rt: &Runtime,
    tenant: &Tenant,
    name: &str,
    acct: &mut Accounting,
) -> Result<(Arc<Model>, Vec<Arc<Model>>), ApiError> {
    let Some(model) = rt.models.get(name) else {
        let mut known: Vec<&str> = rt
            .models
            .keys()
            .map(String::as_str)
            .filter(|m| tenant.may_use(m))
            .collect();
        known.sort_unstable();
        return Err(ApiError::new(
            ErrorKind::NotFound,
            format!(
                "model {name:?} does not exist; available models: {}",
                known.join(", ")
            ),
        ));
    };
    acct.model = Arc::clone(&model.name);
    if !tenant.may_use(name) {
        return Err(ApiError::new(
            ErrorKind::Permission,
            format!(
                "model {name:?} is not allowed for your API key; ask for it to be added to your allowedModels"
            ),
        ));
    }
    let chain = rt
        .chain(name)
        .into_iter()
        .filter(|m| tenant.may_use(&m.name))
        .collect();
    Ok((Arc::clone(model), chain))
}

/// Input-token estimate (about 4 bytes a token) of a request body.
fn estimate_prompt_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

fn requested_max_tokens(body: &Map<String, Value>) -> Option<u64> {
    body.get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
}

struct Admission {
    reservation: Option<Held>,
}

async fn admit(
    state: &AppState,
    rt: &Runtime,
    tenant: &Tenant,
    model: &Model,
    body: &Map<String, Value>,
    body_len: usize,
    session: Option<(&str, u64)>,
) -> Result<Admission, ApiError> {
    let prompt = estimate_prompt_tokens(body_len);
    let max_out = requested_max_tokens(body).unwrap_or(u64::from(model.config.max_output_tokens));
    let tokens = prompt.saturating_add(max_out);
    let cost = cost_at(model.chain_price, prompt, max_out);
    let req = LimitRequest {
        tenant: &tenant.id,
        rate_limit: tenant.rate_limit.as_ref(),
        quota: tenant.quotas.get(model.name.as_str()),
        model: &model.name,
        session,
        tokens,
        budget_micros: tenant.budget_micros,
        cost_micros: cost,
    };
    let decided = match &rt.redis {
        Some(redis) => redis
            .admit(&req, rt.config.rate_limit_failure_mode)
            .await
            .map(|r| r.map(|r| Held::Shared(Arc::clone(redis), r))),
        None => {
            let d = state
                .limiter
                .admit(&req)
                .await
                .map(|r| Some(Held::Local(r)));
            state
                .metrics
                .limit_decisions
                .get_or_create(&crate::metrics::DecisionLabels {
                    backend: "local",
                    result: if d.is_ok() { "admitted" } else { "refused" },
                })
                .inc();
            d
        }
    };
    match decided {
        Ok(reservation) => Ok(Admission { reservation }),
        Err(refusal) => {
            state
                .metrics
                .refusals
                .get_or_create(&RefusalLabels {
                    tenant: Arc::clone(&tenant.id),
                    limit: match refusal.kind {
                        RefusalKind::Rate => "rate",
                        RefusalKind::Budget => "budget",
                        RefusalKind::Unavailable => "unavailable",
                    },
                })
                .inc();
            let mut e = ApiError::new(
                match refusal.kind {
                    RefusalKind::Rate => ErrorKind::RateLimited,
                    RefusalKind::Budget => ErrorKind::Budget,
                    RefusalKind::Unavailable => ErrorKind::Unavailable,
                },
                refusal.message,
            );
            if refusal.kind == RefusalKind::Unavailable {
                e.retry_after = Some(refusal.retry_after);
            }
            if refusal.kind == RefusalKind::Rate {
                e.retry_after = Some(refusal.retry_after);
                e.rate_headers = vec![
                    (
                        if refusal.unit == "tokens" {
                            "x-ratelimit-limit-tokens"
                        } else {
                            "x-ratelimit-limit-requests"
                        },
                        refusal.limit.to_string(),
                    ),
                    (
                        if refusal.unit == "tokens" {
                            "x-ratelimit-remaining-tokens"
                        } else {
                            "x-ratelimit-remaining-requests"
                        },
                        "0".into(),
                    ),
                    (
                        if refusal.unit == "tokens" {
                            "x-ratelimit-reset-tokens"
                        } else {
                            "x-ratelimit-reset-requests"
                        },
                        format!("{}s", refusal.retry_after),
                    ),
                ];
            }
            Err(e)
        }
    }
}

/// The config snapshot a request is served with, and its body. The body is read before
/// anything can fail (it is bounded), so an early error never leaves unread bytes on a
/// keep-alive connection.
async fn snapshot_and_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Arc<Runtime>, Bytes), ApiError> {
    if let Some(e) = not_loaded(state) {
        return Err(e);
    }
    let rt = state.runtime.load_full();
    let bytes = read_body(headers, body, rt.config.limits.max_body_bytes).await?;
    Ok((rt, bytes))
}

fn error_response(
    e: ApiError,
    format: ApiFormat,
    model: &str,
    start: Instant,
    acct: &mut Accounting,
) -> Response {
    let status = e.status().as_u16();
    let mut resp = e.into_response_for(format);
    set_common(&mut resp, model, "none", start.elapsed());
    acct.finish(status, Usage::default());
    resp
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve_api(state, ApiFormat::OpenAi, rid, headers, body).await
}

/// `POST /v1/messages`.
pub async fn messages(
    State(state): State<Arc<AppState>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve_api(state, ApiFormat::Anthropic, rid, headers, body).await
}

async fn serve_api(
    state: Arc<AppState>,
    format: ApiFormat,
    rid: RequestId,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let _in_flight = InFlight::new(&state);
    let mut acct = Accounting::new(&state, format.as_str(), start);
    let (rt, bytes) = match snapshot_and_body(&state, &headers, body).await {
        Ok(x) => x,
        Err(e) => return error_response(e, format, "none", start, &mut acct),
    };
    let tenant = match authenticate(&rt, &headers) {
        Ok(t) => t,
        Err(e) => return error_response(e, format, "none", start, &mut acct),
    };
    acct.tenant = Arc::clone(&tenant.id);
    let parsed = parse_object(&bytes).and_then(|b| check_messages(&b).map(|_| b));
    let body = match parsed {
        Ok(b) => b,
        Err(e) => return error_response(e, format, "none", start, &mut acct),
    };
    let model_name = match body.get("model") {
        None | Some(Value::Null) => rt.config.default_model.clone(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return error_response(
                ApiError::invalid("`model` must be a string"),
                format,
                "none",
                start,
                &mut acct,
            );
        }
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return error_response(
                ApiError::invalid("`stream` must be true or false"),
                format,
                "none",
                start,
                &mut acct,
            );
        }
    };
    let (model, chain) = match resolve_model(&rt, tenant, &model_name, &mut acct) {
        Ok(x) => x,
        Err(e) => return error_response(e, format, "none", start, &mut acct),
    };
    acct.price = Some(model.price);
    let admission = match admit(&state, &rt, tenant, &model, &body, bytes.len(), None).await {
        Ok(a) => a,
        Err(e) => return error_response(e, format, &model.name, start, &mut acct),
    };
    acct.reservation = admission.reservation;
    let wants_usage = format == ApiFormat::OpenAi
        && body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let req = ClientRequest {
        format,
        body,
        stream,
        wants_usage,
        request_id: rid.0,
        anthropic_beta: headers.get("anthropic-beta").cloned(),
    };

    // Cache: explicit temperature 0 on a route with a cache, non-streaming.
    let zero_temperature = req.body.get("temperature").and_then(Value::as_f64) == Some(0.0);
    let cache_key = (model.config.cache.is_some() && !stream && zero_temperature)
        .then(|| cache::key(&tenant.id, format, &model.name, &req.body));
    if let Some(key) = &cache_key {
        let hit = match &rt.redis {
            Some(redis) => redis.cache_get(&tenant.id, key).await.map(|e| {
                // Labels only ever carry names from this config.
                let served = rt.models.get(&e.model);
                let backend = served
                    .and_then(|m| m.backends.iter().find(|b| *b.name == e.backend))
                    .map(|b| Arc::clone(&b.name));
                cache::Entry {
                    model: served
                        .map(|m| Arc::clone(&m.name))
                        .unwrap_or_else(|| label("unknown")),
                    backend: backend.unwrap_or_else(|| label("unknown")),
                    usage: e.usage,
                    body: e.body,
                    expires: Instant::now(),
                }
            }),
            None => state.cache.get(key),
        };
        if let Some(hit) = hit {
            state
                .metrics
                .cache
                .get_or_create(&crate::metrics::ResultLabel { result: "hit" })
                .inc();
            acct.model = Arc::clone(&hit.model);
            acct.backend = Arc::clone(&hit.backend);
            acct.price = None;
            let mut resp = json_response(hit.body);
            set_common(&mut resp, &hit.model, &hit.backend, start.elapsed());
            resp.headers_mut()
                .insert("x-parley-cache", HeaderValue::from_static("hit"));
            acct.finish(200, Usage::default());
            return resp;
        }
        state
            .metrics
            .cache
            .get_or_create(&crate::metrics::ResultLabel { result: "miss" })
            .inc();
    }

    match proxy::route(&state, tenant, &chain, &req).await {
        Err((e, wait)) => {
            let status = e.status().as_u16();
            let mut resp = e.into_response_for(format);
            let overhead = start.elapsed().saturating_sub(wait);
            state.metrics.overhead.observe(overhead.as_secs_f64());
            set_common(&mut resp, &model.name, "none", overhead);
            acct.finish(status, Usage::default());
            resp
        }
        Ok((served, by)) => {
            let backend = &by.model.backends[by.backend];
            acct.model = Arc::clone(&by.model.name);
            acct.backend = Arc::clone(&backend.name);
            acct.price = Some(by.model.price);
            let overhead = start.elapsed().saturating_sub(by.upstream_wait);
            state.metrics.overhead.observe(overhead.as_secs_f64());
            match served {
                Served::Full { body, usage } => {
                    if let (Some(key), Some(c)) = (cache_key, &model.config.cache) {
                        let ttl = Duration::from_secs(c.ttl_seconds);
                        match &rt.redis {
                            Some(redis) => {
                                let redis = Arc::clone(redis);
                                let tenant_id = Arc::clone(&tenant.id);
                                let entry = CachedEntry {
                                    model: by.model.name.to_string(),
                                    backend: backend.name.to_string(),
                                    usage,
                                    body: body.clone(),
                                };
                                tokio::spawn(async move {
                                    redis.cache_put(&tenant_id, &key, &entry, ttl).await;
                                });
                            }
                            None => state.cache.put(
                                key,
                                body.clone(),
                                Arc::clone(&by.model.name),
                                Arc::clone(&backend.name),
                                usage,
                                ttl,
                            ),
                        }
                    }
                    let mut resp = json_response(body);
                    set_common(&mut resp, &by.model.name, &backend.name, overhead);
                    if cache_key.is_some() {
                        resp.headers_mut()
                            .insert("x-parley-cache", HeaderValue::from_static("miss"));
                    }
                    acct.finish(200, usage);
                    resp
                }
                Served::Stream(start_state) => {
                    state
                        .metrics
                        .ttft
                        .get_or_create(&ModelLabel {
                            model: Arc::clone(&by.model.name),
                        })
                        .observe(start.elapsed().as_secs_f64());
                    let model_name = Arc::clone(&by.model.name);
                    let backend_name = Arc::clone(&backend.name);
                    let mut resp = stream_response(*start_state, acct);
                    set_common(&mut resp, &model_name, &backend_name, overhead);
                    resp
                }
            }
        }
    }
}

fn json_response(body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Holds the stream's state so that dropping the body (client gone) still settles.
struct StreamGuard {
    s: StreamStart,
    acct: Accounting,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let t = &self.s.translator;
        let mut usage = t.usage;
        if usage.output == 0 {
            usage.output = t.deltas;
        }
        let status = if t.finished {
            200
        } else if t.failed.is_some() {
            502
        } else {
            499
        };
        self.acct.finish(status, usage);
    }
}

fn stream_response(s: StreamStart, acct: Accounting) -> Response {
    let mut guard = StreamGuard { s, acct };
    let stream = async_stream::stream! {
        let first = std::mem::take(&mut guard.s.first);
        if !first.is_empty() {
            yield Ok::<Bytes, std::convert::Infallible>(first);
        }
        let mut out = BytesMut::new();
        while !guard.s.translator.finished && guard.s.translator.failed.is_none() {
            let next = tokio::time::timeout_at(guard.s.deadline, guard.s.body.frame()).await;
            match next {
                Err(_) => {
                    let e = ApiError::new(ErrorKind::Timeout, "the upstream did not finish the stream within its total timeout");
                    guard.s.translator.abort(&e, &mut out);
                }
                Ok(None) => {
                    let e = ApiError::new(ErrorKind::Upstream, "the upstream closed the stream before it was complete");
                    guard.s.translator.abort(&e, &mut out);
                }
                Ok(Some(Err(_))) => {
                    let e = ApiError::new(ErrorKind::Upstream, "the upstream connection broke in the middle of the stream");
                    guard.s.translator.abort(&e, &mut out);
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        guard.s.parser.push(&data);
                        while let Some(ev) = guard.s.parser.next_event() {
                            guard.s.translator.on_event(&ev, &mut out);
                        }
                        if guard.s.parser.pending() > crate::translate::sse::MAX_EVENT_BYTES {
                            let e = ApiError::new(ErrorKind::Upstream, "the upstream sent an oversized stream event");
                            guard.s.translator.abort(&e, &mut out);
                        }
                    }
                }
            }
            if !out.is_empty() {
                yield Ok(out.split().freeze());
            }
        }
    };
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// `GET /v1/models`: the models this tenant may use (Anthropic's list shape when the
/// client sends `anthropic-version`).
pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let rt = state.runtime.load_full();
    let anthropic = headers.contains_key("anthropic-version");
    let format = if anthropic {
        ApiFormat::Anthropic
    } else {
        ApiFormat::OpenAi
    };
    if let Some(e) = not_loaded(&state) {
        return e.into_response_for(format);
    }
    let tenant = match authenticate(&rt, &headers) {
        Ok(t) => t,
        Err(e) => return e.into_response_for(format),
    };
    let mut names: Vec<&str> = rt
        .models
        .keys()
        .map(String::as_str)
        .filter(|m| tenant.may_use(m))
        .collect();
    names.sort_unstable();
    let body = if anthropic {
        let data: Vec<Value> = names
            .iter()
            .map(|n| json!({"type": "model", "id": n, "display_name": n, "created_at": "1970-01-01T00:00:00Z"}))
            .collect();
        json!({"data": data, "has_more": false, "first_id": names.first(), "last_id": names.last()})
    } else {
        let data: Vec<Value> = names
            .iter()
            .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "parley"}))
            .collect();
        json!({"object": "list", "data": data})
    };
    json_response(Bytes::from(body.to_string()))
}

/// `POST /chat`: the session API.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    axum::Extension(rid): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let format = ApiFormat::OpenAi;
    let start = Instant::now();
    let _in_flight = InFlight::new(&state);
    let mut acct = Accounting::new(&state, "chat", start);
    let (rt, bytes) = match snapshot_and_body(&state, &headers, body).await {
        Ok(x) => x,
        Err(e) => return error_response(e, format, "none", start, &mut acct),
    };
    let tenant = match authenticate(&rt, &headers) {
        Ok(t) => t,
        Err(e) => return error_response(e, format, "none", start, &mut acct),
    };
    acct.tenant = Arc::clone(&tenant.id);
    let input = match parse_object(&bytes).and_then(|b| parse_chat(b, &rt.config.default_model)) {
        Ok(i) => i,
        Err(e) => return error_response(e, format, "none", start, &mut acct),
    };
    let (model, chain) = match resolve_model(&rt, tenant, &input.model, &mut acct) {
        Ok(x) => x,
        Err(e) => return error_response(e, format, "none", start, &mut acct),
    };
    acct.price = Some(model.price);
    let sessions_cfg = rt.config.sessions;
    let ttl = Duration::from_secs(sessions_cfg.ttl_seconds);
    let history = match &rt.redis {
        Some(redis) => match redis.session_load(&tenant.id, &input.session_id, ttl).await {
            Some(h) => h,
            None => {
                let e = ApiError::new(
                    ErrorKind::Unavailable,
                    "the session store (Redis) is unreachable, so the conversation cannot be continued; retry shortly",
                );
                return error_response(e, format, &model.name, start, &mut acct);
            }
        },
        None => {
            state
                .sessions
                .load(&tenant.id, &input.session_id, ttl)
                .await
        }
    };
    let mut messages = Vec::with_capacity(history.len() + input.messages.len() + 1);
    if let Some(sp) = &rt.config.system_prompt {
        messages.push(json!({"role": "system", "content": sp}));
    }
    messages.extend(history);
    messages.extend(input.messages.iter().cloned());
    let mut req_body = Map::new();
    req_body.insert("model".into(), Value::String(input.model.clone()));
    req_body.insert("messages".into(), Value::Array(messages));
    if let Some(m) = input.max_tokens {
        req_body.insert("max_tokens".into(), Value::from(m));
    }
    let session = sessions_cfg
        .requests_per_minute
        .map(|rpm| (input.session_id.as_str(), rpm));
    let admission = match admit(&state, &rt, tenant, &model, &req_body, bytes.len(), session).await
    {
        Ok(a) => a,
        Err(e) => return error_response(e, format, &model.name, start, &mut acct),
    };
    acct.reservation = admission.reservation;
    let req = ClientRequest {
        format,
        body: req_body,
        stream: false,
        wants_usage: false,
        request_id: rid.0,
        anthropic_beta: None,
    };
    match proxy::route(&state, tenant, &chain, &req).await {
        Err((e, wait)) => {
            let status = e.status().as_u16();
            let mut resp = e.into_response_for(format);
            set_common(
                &mut resp,
                &model.name,
                "none",
                start.elapsed().saturating_sub(wait),
            );
            acct.finish(status, Usage::default());
            resp
        }
        Ok((Served::Stream(_), _)) => error_response(
            ApiError::new(ErrorKind::Internal, "unexpected stream"),
            format,
            &model.name,
            start,
            &mut acct,
        ),
        Ok((Served::Full { body, usage }, by)) => {
            let backend = &by.model.backends[by.backend];
            acct.model = Arc::clone(&by.model.name);
            acct.backend = Arc::clone(&backend.name);
            acct.price = Some(by.model.price);
            let completion: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let message = completion["choices"][0]["message"].clone();
            let reply = match &message["content"] {
                Value::String(s) => s.clone(),
                _ => String::new(),
            };
            let mut stored = input.messages;
            let mut assistant = Map::new();
            assistant.insert("role".into(), json!("assistant"));
            assistant.insert("content".into(), Value::String(reply.clone()));
            if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
                assistant.insert("tool_calls".into(), calls.clone());
            }
            stored.push(Value::Object(assistant));
            let max = sessions_cfg.max_messages as usize;
            match &rt.redis {
                Some(redis) => {
                    redis
                        .session_append(&tenant.id, &input.session_id, &stored, max, ttl)
                        .await;
                }
                None => {
                    state
                        .sessions
                        .append(&tenant.id, &input.session_id, stored, max, ttl)
                        .await;
                }
            }
            let out = json!({
                "session_id": input.session_id,
                "reply": reply,
                "model": by.model.name.as_str(),
                "usage": {"prompt_tokens": usage.input, "completion_tokens": usage.output,
                          "total_tokens": usage.input.saturating_add(usage.output)},
            });
            let overhead = start.elapsed().saturating_sub(by.upstream_wait);
            state.metrics.overhead.observe(overhead.as_secs_f64());
            let mut resp = json_response(Bytes::from(out.to_string()));
            set_common(&mut resp, &by.model.name, &backend.name, overhead);
            acct.finish(200, usage);
            resp
        }
    }
}

struct ChatInput {
    session_id: String,
    messages: Vec<Value>,
    model: String,
    max_tokens: Option<u64>,
}

fn parse_chat(mut body: Map<String, Value>, default_model: &str) -> Result<ChatInput, ApiError> {
    for key in body.keys() {
        if !matches!(
            key.as_str(),
            "session_id" | "messages" | "model" | "max_tokens"
        ) {
            return Err(ApiError::invalid(format!(
                "unknown field `{key}`; /chat takes session_id, messages, model and max_tokens"
            )));
        }
    }
    let session_id = match body.remove("session_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s,
        _ => {
            return Err(ApiError::invalid(
                "`session_id` is required: a non-empty string of at most 256 characters",
            ));
        }
    };
    let messages = match body.remove("messages") {
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        Some(Value::Array(m)) if !m.is_empty() && m.len() <= MAX_MESSAGES => m,
        _ => {
            return Err(ApiError::invalid(
                "`messages` is required: an array with the new turn(s) of the conversation",
            ));
        }
    };
    for (i, m) in messages.iter().enumerate() {
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant" | "tool") => {}
            _ => {
                return Err(ApiError::invalid(format!(
                    "`messages[{i}].role` must be user, assistant or tool (the system prompt is set by the gateway)"
                )));
            }
        }
    }
    let model = match body.remove("model") {
        None | Some(Value::Null) => default_model.to_string(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(ApiError::invalid("`model` must be a string")),
    };
    let max_tokens = match body.remove("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::invalid("`max_tokens` must be a positive integer"))?,
        ),
    };
    Ok(ChatInput {
        session_id,
        messages,
        model,
        max_tokens,
    })
}

/// Unknown paths.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no such endpoint {}; use /v1/chat/completions, /v1/messages, /v1/models or /chat",
            uri.path()
        ),
    )
    .into_response_for(ApiFormat::OpenAi)
}

/// Wrong method on a known path.
pub async fn method_not_allowed() -> Response {
    let mut r = ApiError::invalid("method not allowed on this endpoint")
        .into_response_for(ApiFormat::OpenAi);
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

/// Readiness for the admin listener: a valid config is loaded and no drain started.
pub fn ready(state: &AppState) -> bool {
    state.loaded.load(Ordering::Acquire) && !state.draining.load(Ordering::Relaxed)
}

fn not_loaded(state: &AppState) -> Option<ApiError> {
    (!state.loaded.load(Ordering::Acquire)).then(|| {
        ApiError::new(
            ErrorKind::Unavailable,
            "the gateway has no valid configuration yet; retry later",
        )
    })
}
