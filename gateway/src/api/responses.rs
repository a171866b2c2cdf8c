//! `POST /v1/responses` (the OpenAI Responses API), `GET` and `DELETE
//! /v1/responses/{id}` (stored responses).
//!
//! A request is read as Responses input items; with `previous_response_id` the stored
//! conversation of that response (this tenant's only) goes first. It is then served like
//! a chat completion (same admission, routing, retries, fallbacks, breakers, cache and
//! accounting): backends with `responsesApi` get the Responses request itself (`store`
//! off, the whole conversation as `input`), all others its chat completions
//! translation, whose answer or stream is translated back. The Chatbot's system prompt
//! goes before the client's `instructions`.
//!
//! With `store` (the default) the response is kept in the session store for the session
//! TTL as `{"response": ..., "items": [...]}`, `items` being the whole conversation (its
//! input and its output), so a continuation needs one read.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};

use super::completions::apply_system_prompt;
use super::{
    Ctx, admit, authenticate, fresh_answer, json_response, observe_ttft, outlive_client,
    parse_object, resolve_model, set_common,
};
use crate::accounting::Accounting;
use crate::cache;
use crate::error::{ApiError, ApiFormat, ErrorKind};
use crate::metrics::ResultLabel;
use crate::overhead::UpstreamWait;
use crate::proxy::{ClientRequest, Served, StreamStart};
use crate::runtime::{Model, Runtime};
use crate::state::AppState;
use crate::store::Store;
use crate::translate::Usage;
use crate::translate::responses::{self as rt_resp, new_id};
use crate::translate::responses_stream::{ChatToResponses, ResponsesWatch};
use crate::translate::sse::{MAX_EVENT_BYTES, SseParser};

/// `POST /v1/responses`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut ctx = Ctx::new(&state, ApiFormat::OpenAi, "responses");
    let outcome = AssertUnwindSafe(serve(&mut ctx, headers, body))
        .catch_unwind()
        .await;
    ctx.respond_or_resume(outcome)
}

/// What a stored response and the request continuing it need.
struct Plan {
    /// Response id (ours; a passthrough backend's stream keeps its own).
    id: String,
    /// The client's request, for echoing into the response object.
    echo: Map<String, Value>,
    /// The whole conversation's input items (history first).
    items: Vec<Value>,
    /// Store the response.
    store: bool,
    ttl: Duration,
}

fn not_stored(id: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no stored response {id:?} for this API key: it expired, was deleted, was created with store: false, or belongs to another key"
        ),
    )
}

async fn serve(ctx: &mut Ctx, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    // Who is calling, from the headers alone: an unknown client's body is never read.
    let (rt, ti, bytes) = super::caller_and_body(ctx, &headers, body).await?;
    let tenant = &rt.tenants[ti];
    let mut req = parse_object(&bytes)?;
    let model_name = match req.get("model") {
        None | Some(Value::Null) => rt.config.default_model.clone(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::invalid("`model` must be a string")),
    };
    let flag = |key: &str, default: bool| match req.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(format!("`{key}` must be true or false"))),
    };
    let stream = flag("stream", false)?;
    let store = flag("store", true)?;
    if let Some(acct) = ctx.acct.as_mut() {
        acct.stream = stream;
    }
    let previous = match req.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "`previous_response_id` must be the id of a stored response",
            ));
        }
    };
    let new_items = rt_resp::input_items(req.get("input").unwrap_or(&Value::Null))?;
    let (model, chain) = resolve_model(&rt, tenant, &model_name, ctx)?;
    super::require_kind(
        &model,
        parley_crds::gateway_config::ModelKind::Chat,
        "/v1/responses",
    )?;
    let ttl = Duration::from_secs(rt.config.sessions.ttl_seconds);
    let mut history_bytes = 0;
    let mut items = match &previous {
        None => Vec::with_capacity(new_items.len()),
        Some(id) => {
            let record = Store::of(&ctx.state, &rt)
                .response_get(&tenant.id, id)
                .await?
                .ok_or_else(|| not_stored(id))?;
            history_bytes = record.len();
            match serde_json::from_slice::<Value>(&record) {
                Ok(Value::Object(mut r)) => match r.remove("items") {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                },
                _ => return Err(not_stored(id)),
            }
        }
    };
    if items.len().saturating_add(new_items.len()) > super::MAX_MESSAGES {
        return Err(ApiError::invalid(format!(
            "the conversation has more than {} items; start a new one without previous_response_id",
            super::MAX_MESSAGES
        )));
    }
    items.extend(new_items);

    // The chat completions translation (every backend may need it: a fallback can be
    // one that does not speak Responses).
    let echo = req.clone();
    req.insert("input".into(), Value::Array(items.clone()));
    let mut chat_body = rt_resp::to_chat(&req)?;
    let system_prompt = rt.config.system_prompt.as_deref();
    if let Some(sp) = system_prompt {
        apply_system_prompt(&mut chat_body, ApiFormat::OpenAi, sp);
    }
    // The Responses request for backends that speak it: no server-side state upstream.
    let passthrough_body = chain
        .iter()
        .any(|m| m.backends.iter().any(|b| b.responses_url.is_some()))
        .then(|| {
            let mut r = req.clone();
            r.remove("previous_response_id");
            r.insert("store".into(), Value::Bool(false));
            if let Some(sp) = system_prompt {
                let joined = match r.get("instructions").and_then(Value::as_str) {
                    Some(own) if !own.is_empty() => format!("{sp}\n\n{own}"),
                    _ => sp.to_string(),
                };
                r.insert("instructions".into(), Value::String(joined));
            }
            r
        });
    let prompt_bytes = bytes.len() + history_bytes + system_prompt.map_or(0, str::len);
    let max_out = chat_body
        .get("max_completion_tokens")
        .and_then(Value::as_u64);
    let held = admit(&ctx.state, &rt, tenant, &model, prompt_bytes, max_out, None).await?;
    // Cache: explicit temperature 0, not streamed, on a route with a cache; keyed on the
    // translated request (conversation and system prompt included) in a space of its own.
    let zero_temperature = req.get("temperature").and_then(Value::as_f64) == Some(0.0);
    let cache_key = (model.config.cache.is_some() && !stream && zero_temperature).then(|| {
        let mut keyed = chat_body.clone();
        keyed.insert("parley_api".into(), json!("responses"));
        keyed.insert(
            "metadata".into(),
            req.get("metadata").cloned().unwrap_or(Value::Null),
        );
        cache::key(&tenant.id, ApiFormat::OpenAi, &model.name, &keyed)
    });
    let request_id = headers
        .get("x-request-id")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("none"));
    let client_req = ClientRequest {
        format: ApiFormat::OpenAi,
        body: chat_body,
        stream,
        // The translated stream's usage chunk is read here.
        wants_usage: true,
        request_id,
        anthropic_beta: None,
    };
    let Some(mut acct) = ctx.acct.take() else {
        return Err(ApiError::invalid("request accounted twice"));
    };
    acct.held = held;
    let plan = Plan {
        id: new_id("resp"),
        echo,
        items,
        store,
        ttl,
    };
    if let Some(key) = &cache_key
        && let Some(hit) = Store::of(&ctx.state, &rt)
            .cache_get(&rt, &tenant.id, key)
            .await
    {
        return Ok(cache_hit(&ctx.state, &rt, &tenant.id, acct, hit, plan).await);
    }
    if cache_key.is_some() {
        cache_lookup(&ctx.state, "miss");
    }
    let state = Arc::clone(&ctx.state);
    let work = exchange(
        state,
        rt,
        ti,
        model,
        chain,
        client_req,
        passthrough_body,
        cache_key,
        plan,
        acct,
    );
    Ok(outlive_client(work).await)
}

fn cache_lookup(state: &AppState, result: &'static str) {
    state
        .metrics
        .cache
        .get_or_create(&ResultLabel { result })
        .inc();
}

/// A cached response, under a new id (and stored as a new response).
async fn cache_hit(
    state: &AppState,
    rt: &Runtime,
    tenant: &str,
    mut acct: Accounting,
    hit: cache::Entry,
    plan: Plan,
) -> Response {
    cache_lookup(state, "hit");
    acct.cache_hit = true;
    acct.model = Arc::clone(&hit.model);
    acct.backend = Arc::clone(&hit.backend);
    // Not charged again.
    acct.price = None;
    let mut response: Value = serde_json::from_slice(&hit.body).unwrap_or(Value::Null);
    if let Some(r) = response.as_object_mut() {
        r.insert("id".into(), Value::String(plan.id.clone()));
        r.insert("created_at".into(), json!(crate::translate::unix_now()));
        echo_into(r, &plan.echo);
    }
    let stored = save(&Store::of(state, rt), tenant, &plan, &response).await;
    let mut resp = match stored {
        Ok(()) => json_response(Bytes::from(response.to_string())),
        Err(e) => e.into_response_for(ApiFormat::OpenAi),
    };
    set_common(&mut resp, &hit.model, &hit.backend, acct.start().elapsed());
    resp.headers_mut()
        .insert("x-parley-cache", HeaderValue::from_static("hit"));
    acct.finish(resp.status().as_u16(), Usage::default());
    resp
}

/// The request's own `store`, `previous_response_id` and `metadata` in a response object
/// (a passthrough backend saw `store: false` and no previous id).
fn echo_into(r: &mut Map<String, Value>, echo: &Map<String, Value>) {
    for k in ["store", "previous_response_id", "metadata"] {
        if let Some(v) = echo.get(k) {
            r.insert(k.into(), v.clone());
        }
    }
    if !echo.contains_key("store") {
        r.insert("store".into(), Value::Bool(true));
    }
}

/// Stores `response` (when the request asked to) with the conversation it ends.
async fn save(
    store: &Store<'_>,
    tenant: &str,
    plan: &Plan,
    response: &Value,
) -> Result<(), ApiError> {
    if !plan.store {
        return Ok(());
    }
    let Some(id) = response.get("id").and_then(Value::as_str) else {
        return Ok(());
    };
    let mut items = plan.items.clone();
    if let Some(Value::Array(output)) = response.get("output") {
        items.extend(output.iter().cloned());
    }
    let record = json!({"response": response, "items": items});
    store
        .response_put(tenant, id, Bytes::from(record.to_string()), plan.ttl)
        .await
        .map_err(|e| {
            ApiError::new(
                e.kind,
                format!(
                    "the response could not be stored, so it cannot be continued: {}",
                    e.message
                ),
            )
        })
}

/// The upstream call and everything after it, in a task of its own.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    state: Arc<AppState>,
    rt: Arc<Runtime>,
    ti: usize,
    model: Arc<Model>,
    chain: Vec<Arc<Model>>,
    req: ClientRequest,
    passthrough_body: Option<Map<String, Value>>,
    cache_key: Option<[u8; 32]>,
    plan: Plan,
    mut acct: Accounting,
) -> Response {
    let start = acct.start();
    let tenant = &rt.tenants[ti];
    let routed = super::call_upstream(
        &state,
        tenant,
        &chain,
        &req,
        passthrough_body.as_ref(),
        &mut acct,
    )
    .await;
    let (served, by) = match routed {
        Ok(x) => x,
        Err(resp) => return resp,
    };
    let backend = &by.model.backends[by.backend];
    let passthrough = passthrough_body.is_some() && backend.responses_url.is_some();
    let mut resp = match served {
        Served::Full { body, usage } => {
            let mut response = if passthrough {
                serde_json::from_slice(&body).unwrap_or(Value::Null)
            } else {
                let completion: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                rt_resp::response_from_chat(
                    &completion,
                    &plan.id,
                    &plan_model(&plan, &model),
                    &plan.echo,
                )
                .0
            };
            if let Some(r) = response.as_object_mut() {
                echo_into(r, &plan.echo);
            }
            let store = Store::of(&state, &rt);
            if let Err(e) = save(&store, &tenant.id, &plan, &response).await {
                // The upstream's usage is still charged.
                let status = e.status().as_u16();
                let mut resp = e.into_response_for(ApiFormat::OpenAi);
                let overhead = start.elapsed().saturating_sub(by.upstream_wait);
                set_common(&mut resp, &by.model.name, &backend.name, overhead);
                resp.extensions_mut().insert(UpstreamWait(by.upstream_wait));
                acct.finish(status, usage);
                return resp;
            }
            fresh_answer(
                &store,
                tenant,
                &model,
                cache_key,
                (&by.model.name, &backend.name),
                Bytes::from(response.to_string()),
                usage,
                &mut acct,
            )
        }
        Served::Stream(s) => {
            observe_ttft(&state, &by.model.name, start);
            let mode = if passthrough {
                Mode::Passthrough(ResponsesWatch::default())
            } else {
                Mode::Translated {
                    t: ChatToResponses::new(&plan.id, &plan_model(&plan, &model), &plan.echo),
                    parser: SseParser::default(),
                    buf: BytesMut::new(),
                }
            };
            let saver = Saver {
                state: Arc::clone(&state),
                rt: Arc::clone(&rt),
                ti,
                plan,
            };
            stream_response(*s, mode, saver, acct)
        }
    };
    let overhead = start.elapsed().saturating_sub(by.upstream_wait);
    set_common(&mut resp, &by.model.name, &backend.name, overhead);
    resp.extensions_mut().insert(UpstreamWait(by.upstream_wait));
    resp
}

/// The model name a translated response reports: the one the client asked for.
fn plan_model(plan: &Plan, model: &Model) -> String {
    plan.echo
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&model.name)
        .to_string()
}

/// How the upstream stream becomes the client's.
enum Mode {
    /// Chat completion chunks (the proxy's translation) -> Responses events.
    Translated {
        t: ChatToResponses,
        parser: SseParser,
        buf: BytesMut,
    },
    /// A Responses upstream's own events, watched.
    Passthrough(ResponsesWatch),
}

impl Mode {
    fn over(&self) -> bool {
        match self {
            Self::Translated { t, .. } => t.finished || t.failed.is_some(),
            Self::Passthrough(w) => w.finished || w.failed.is_some(),
        }
    }

    fn finished(&self) -> bool {
        match self {
            Self::Translated { t, .. } => t.finished,
            Self::Passthrough(w) => w.finished,
        }
    }

    /// Client bytes for proxy output `bytes` (chat chunks, or Responses events as they
    /// came).
    fn feed(&mut self, bytes: &[u8], out: &mut BytesMut) {
        match self {
            Self::Translated { t, parser, .. } => {
                parser.push(bytes);
                while let Some(ev) = parser.next_event() {
                    t.on_chat_event(&ev, out);
                }
            }
            Self::Passthrough(w) => {
                let mut parser = SseParser::default();
                parser.push(bytes);
                while let Some(ev) = parser.next_event() {
                    w.on_event(&ev, out);
                }
            }
        }
    }

    fn fail(&mut self, e: &ApiError, out: &mut BytesMut) {
        match self {
            Self::Translated { t, .. } => t.fail(e, out),
            Self::Passthrough(w) => w.fail(e, out),
        }
    }

    fn usage(&self, s: &StreamStart) -> Usage {
        let (mut usage, deltas) = match self {
            Self::Translated { t, .. } => {
                // The proxy's translator saw the usage too (and counts the Anthropic way).
                let mut u = t.usage;
                if u.input == 0 {
                    u.input = s.translator.usage.input;
                }
                if u.output == 0 {
                    u.output = s.translator.usage.output;
                }
                (u, t.deltas)
            }
            Self::Passthrough(w) => (w.usage, w.deltas),
        };
        if usage.output == 0 {
            usage.output = deltas;
        }
        usage
    }

    fn response(&self) -> Option<Value> {
        match self {
            Self::Translated { t, .. } => t.finished.then(|| t.response()),
            Self::Passthrough(w) => w.response.clone(),
        }
    }
}

/// Reads one more piece of the upstream stream into `out` (the client's bytes); `false`
/// once the stream is over.
async fn advance(s: &mut StreamStart, mode: &mut Mode, out: &mut BytesMut) -> bool {
    if mode.over() {
        return false;
    }
    let broke = |kind, msg: &str| ApiError::new(kind, msg);
    match tokio::time::timeout_at(s.deadline, s.body.frame()).await {
        Err(_) => mode.fail(
            &broke(
                ErrorKind::Timeout,
                "the upstream did not finish the stream within its total timeout",
            ),
            out,
        ),
        Ok(None) => mode.fail(
            &broke(
                ErrorKind::Upstream,
                "the upstream closed the stream before it was complete",
            ),
            out,
        ),
        Ok(Some(Err(_))) => mode.fail(
            &broke(
                ErrorKind::Upstream,
                "the upstream connection broke in the middle of the stream",
            ),
            out,
        ),
        Ok(Some(Ok(frame))) => {
            if let Ok(data) = frame.into_data() {
                s.parser.push(&data);
                while let Some(ev) = s.parser.next_event() {
                    match mode {
                        Mode::Translated { t, parser, buf } => {
                            s.translator.on_event(&ev, buf);
                            parser.push(buf);
                            buf.clear();
                            while let Some(chat) = parser.next_event() {
                                t.on_chat_event(&chat, out);
                            }
                        }
                        Mode::Passthrough(w) => w.on_event(&ev, out),
                    }
                }
                if s.parser.pending() > MAX_EVENT_BYTES {
                    let e = broke(
                        ErrorKind::Upstream,
                        "the upstream sent an oversized stream event",
                    );
                    mode.fail(&e, out);
                }
            }
        }
    }
    true
}

/// Stores a streamed response once it is complete.
struct Saver {
    state: Arc<AppState>,
    rt: Arc<Runtime>,
    ti: usize,
    plan: Plan,
}

impl Saver {
    async fn save(&self, mode: &Mode) {
        let Some(mut response) = mode.response() else {
            return;
        };
        if let Some(r) = response.as_object_mut() {
            echo_into(r, &self.plan.echo);
        }
        let store = Store::of(&self.state, &self.rt);
        let tenant = &self.rt.tenants[self.ti].id;
        if let Err(e) = save(&store, tenant, &self.plan, &response).await {
            tracing::warn!("a streamed response was not stored: {}", e.message);
        }
    }
}

/// Owns the stream's state, so that dropping the body (the client went away) still
/// settles and stores, after reading what the upstream still sends.
struct Guard {
    inner: Option<(StreamStart, Mode, Saver, Accounting)>,
}

fn settle(s: &StreamStart, mode: &Mode, acct: &mut Accounting, status: u16) {
    acct.finish(status, mode.usage(s));
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some((mut s, mut mode, saver, mut acct)) = self.inner.take() else {
            return;
        };
        if mode.over() {
            let status = if mode.finished() { 200 } else { 502 };
            settle(&s, &mode, &mut acct, status);
            return;
        }
        // The client went away: read the rest (up to the deadline) for the real usage,
        // and store the response so the conversation can still be continued.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                super::OUTLIVING.spawn_on(
                    async move {
                        let mut sink = BytesMut::new();
                        while advance(&mut s, &mut mode, &mut sink).await {
                            sink.clear();
                        }
                        saver.save(&mode).await;
                        settle(&s, &mode, &mut acct, 499);
                    },
                    &handle,
                );
            }
            Err(_) => settle(&s, &mode, &mut acct, 499),
        }
    }
}

fn stream_response(s: StreamStart, mode: Mode, saver: Saver, acct: Accounting) -> Response {
    let mut guard = Guard {
        inner: Some((s, mode, saver, acct)),
    };
    let stream = async_stream::stream! {
        let mut out = BytesMut::new();
        if let Some((s, mode, _, _)) = guard.inner.as_mut() {
            if let Mode::Translated { t, .. } = mode {
                t.start(&mut out);
            }
            let first = std::mem::take(&mut s.first);
            mode.feed(&first, &mut out);
        }
        while let Some((s, mode, saver, _)) = guard.inner.as_mut() {
            if !mode.over() {
                advance(s, mode, &mut out).await;
            }
            if mode.finished() && !out.is_empty() {
                // Stored before the client sees the end, so it can continue at once.
                saver.save(mode).await;
            }
            if !out.is_empty() {
                yield Ok::<Bytes, std::convert::Infallible>(out.split().freeze());
            }
            if mode.over() {
                break;
            }
        }
        // Over: record it now rather than when the body is dropped.
        drop(guard);
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

/// `GET /v1/responses/{id}`: a stored response of this tenant.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    // Not a model call: answered without accounting.
    lookup(&state, &headers, &id, false)
        .await
        .unwrap_or_else(|e| e.into_response_for(ApiFormat::OpenAi))
}

/// `DELETE /v1/responses/{id}`: deletes a stored response of this tenant.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    lookup(&state, &headers, &id, true)
        .await
        .unwrap_or_else(|e| e.into_response_for(ApiFormat::OpenAi))
}

async fn lookup(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    id: &str,
    delete: bool,
) -> Result<Response, ApiError> {
    let rt = Ctx::runtime_of(state)?;
    let tenant = &rt.tenants[authenticate(&rt, headers)?];
    let store = Store::of(state, &rt);
    if delete {
        if !store.response_delete(&tenant.id, id).await? {
            return Err(not_stored(id));
        }
        let body = json!({"id": id, "object": "response", "deleted": true});
        return Ok(json_response(Bytes::from(body.to_string())));
    }
    let record = store
        .response_get(&tenant.id, id)
        .await?
        .ok_or_else(|| not_stored(id))?;
    let response = match serde_json::from_slice::<Value>(&record) {
        Ok(Value::Object(mut r)) => r.remove("response").unwrap_or(Value::Null),
        _ => return Err(not_stored(id)),
    };
    Ok(json_response(Bytes::from(response.to_string())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn echo_keeps_the_clients_store_and_metadata() {
        let mut r = Map::new();
        r.insert("store".into(), json!(false));
        let echo = json!({"metadata": {"a": "1"}})
            .as_object()
            .cloned()
            .unwrap();
        echo_into(&mut r, &echo);
        assert_eq!(r["store"], true);
        assert_eq!(r["metadata"]["a"], "1");
    }
}
