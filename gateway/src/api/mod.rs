//! The chat API: one file per endpoint (`completions` for `/v1/chat/completions` and
//! `/v1/messages`, `chat` for `/chat`, `embeddings` for `/v1/embeddings`, `models` for
//! `/v1/models`), each read top to bottom:
//! authenticate from the headers, read and check the body, admit, then run the upstream
//! exchange through [`outlive_client`] (so a client that goes away cannot cancel the call
//! or its accounting) and shape the answer.
//!
//! Handlers return `Result<Response, ApiError>`; [`Ctx::respond`] renders an error in
//! the API's own shape and records it.

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod models;
pub mod responses;
pub mod stream;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use parley_crds::gateway_config::ModelKind;
use serde_json::{Map, Value};

use crate::accounting::Accounting;
pub use crate::admission::{admit, authenticate, requested_max_tokens};
use crate::error::{ApiError, ApiFormat, ErrorKind};
use crate::runtime::{Model, Runtime, Tenant};
use crate::state::AppState;
use crate::store::Store;
use crate::translate::Usage;

/// Most messages accepted in one request.
pub const MAX_MESSAGES: usize = 10_000;
/// Bytes read past the body limit before answering 413 (so an authenticated client gets
/// the answer instead of a reset).
const DRAIN_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes of an unauthenticated request's body read before answering 401: enough that a
/// normal client's connection stays usable, never more.
const ANONYMOUS_DRAIN_BYTES: u64 = 64 * 1024;

/// One request being served: its state, format and accounting.
pub struct Ctx {
    /// Process state.
    pub state: Arc<AppState>,
    /// Shape of answers and errors.
    pub format: ApiFormat,
    /// Accounting, until the upstream exchange takes it over.
    pub acct: Option<Accounting>,
    /// The model named in error responses' `x-parley-model`.
    pub model: Option<Arc<String>>,
    /// Set if this handler is dropped before it answered (the client went away).
    client_gone: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The request body was not read to its end: the connection cannot be reused, so
    /// the answer says `connection: close` (a client must not send its next request on
    /// a connection the gateway is about to close).
    pub body_unread: bool,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if let Some(gone) = &self.client_gone {
            gone.store(true, Ordering::Relaxed);
        }
    }
}

impl Ctx {
    /// A request arriving now on `api`.
    pub fn new(state: &Arc<AppState>, format: ApiFormat, api: &'static str) -> Self {
        let acct = Accounting::new(state, api, Instant::now());
        Self {
            state: Arc::clone(state),
            format,
            client_gone: Some(acct.client_gone()),
            acct: Some(acct),
            model: None,
            body_unread: false,
        }
    }

    /// The config snapshot this request is served with (503 until one is loaded).
    pub fn runtime(&self) -> Result<Arc<Runtime>, ApiError> {
        Self::runtime_of(&self.state)
    }

    /// The config snapshot to serve with (503 until one is loaded).
    pub fn runtime_of(state: &AppState) -> Result<Arc<Runtime>, ApiError> {
        if !state.loaded.load(Ordering::Acquire) {
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                "the gateway has no valid configuration yet; retry later",
            ));
        }
        Ok(state.runtime.load_full())
    }

    fn start(&self) -> Instant {
        self.acct
            .as_ref()
            .map(Accounting::start)
            .unwrap_or_else(Instant::now)
    }

    /// As [`Ctx::respond`], for the outcome of `serve` run under
    /// [`futures_util::FutureExt::catch_unwind`]: a panic is recorded as the 500 the
    /// client gets (from the catch-panic layer, which the panic is passed on to), not as a
    /// client that went away.
    pub fn respond_or_resume(
        mut self,
        outcome: std::thread::Result<Result<Response, ApiError>>,
    ) -> Response {
        match outcome {
            Ok(result) => self.respond(result),
            Err(panic) => {
                self.client_gone = None;
                if let Some(acct) = self.acct.as_mut() {
                    acct.finish(500, crate::translate::Usage::default());
                }
                drop(self);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// The response for a handler's result: an error in the API's shape (recorded with
    /// its status), or the answer as it is.
    pub fn respond(mut self, result: Result<Response, ApiError>) -> Response {
        // Answered: the client is still there.
        self.client_gone = None;
        match result {
            Ok(resp) => resp,
            Err(e) => {
                let status = e.status().as_u16();
                let mut resp = e.into_response_for(self.format);
                if self.body_unread {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                let model = self.model.as_deref().map(String::as_str).unwrap_or("none");
                set_common(&mut resp, model, "none", self.start().elapsed());
                if let Some(acct) = self.acct.as_mut() {
                    acct.finish(status, crate::translate::Usage::default());
                }
                resp
            }
        }
    }
}

/// Drops a request's body that will not be used (the client is unknown, or the gateway
/// cannot serve) after reading at most [`ANONYMOUS_DRAIN_BYTES`] of it: a small body is
/// consumed, so the connection stays usable; a large one is never read. `true` if the
/// body was read to its end.
pub async fn discard_body(body: Body) -> bool {
    let mut body = body;
    let mut seen: u64 = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    while seen <= ANONYMOUS_DRAIN_BYTES {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    seen += d.len() as u64;
                }
            }
            Ok(None) => return true,
            _ => return false,
        }
    }
    false
}

/// The config snapshot and the tenant (its index) of a request, decided before any of
/// its body is read; on refusal the body is discarded (see [`discard_body`]).
pub async fn admit_caller(
    ctx: &mut Ctx,
    headers: &HeaderMap,
    body: &mut Option<Body>,
) -> Result<(Arc<Runtime>, usize), ApiError> {
    if let Some(acct) = ctx.acct.as_mut() {
        acct.request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    let refused = match ctx.runtime() {
        Ok(rt) => match authenticate(&rt, headers) {
            Ok(ti) => {
                if let Some(acct) = ctx.acct.as_mut() {
                    acct.tenant = Arc::clone(&rt.tenants[ti].id);
                }
                return Ok((rt, ti));
            }
            Err(e) => e,
        },
        Err(e) => e,
    };
    if let Some(b) = body.take() {
        ctx.body_unread = !discard_body(b).await;
    }
    Err(refused)
}

/// Who is calling, from the headers alone (an unknown client's body is never read), then
/// its request's body, read up to that tenant's `maxBodyBytes` (see [`read_body`]).
pub async fn caller_and_body(
    ctx: &mut Ctx,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Arc<Runtime>, usize, Bytes), ApiError> {
    let mut body = Some(body);
    let (rt, ti) = admit_caller(ctx, headers, &mut body).await?;
    let limit = rt.tenants[ti].max_body_bytes;
    let bytes = read_body(ctx, headers, body.unwrap_or_default(), limit).await?;
    Ok((rt, ti, bytes))
}

/// Reads the body up to `limit` bytes; a larger body is drained (up to a bound) and
/// answered with 413, so the client reads the answer rather than a reset. Called only
/// once the client is authenticated.
pub async fn read_body(
    ctx: &mut Ctx,
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<Bytes, ApiError> {
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
                ctx.body_unread = true;
                return Err(ApiError::invalid(
                    "request body was not received within 30 s",
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                ctx.body_unread = true;
                return Err(ApiError::invalid("request body could not be read"));
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > limit {
                over = true;
            }
            if over {
                if total > DRAIN_BYTES {
                    ctx.body_unread = true;
                    break;
                }
            } else {
                buf.extend_from_slice(&data);
            }
        }
    }
    if over {
        return Err(ApiError::new(
            ErrorKind::TooLarge,
            format!(
                "request body is larger than the limit of {limit} bytes; send a shorter conversation"
            ),
        ));
    }
    Ok(buf.freeze())
}

/// The body as a JSON object.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid("the request body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The upstream exchange of a request through its model chain (`proxy::route_with`).
/// Served: what the backend answered, with `acct` now naming that backend and its price.
/// Not served: the error answer (in `format`), already settled in `acct`.
pub async fn call_upstream(
    state: &AppState,
    tenant: &Tenant,
    chain: &[Arc<Model>],
    req: &crate::proxy::ClientRequest,
    responses: Option<&Map<String, Value>>,
    acct: &mut Accounting,
) -> Result<(crate::proxy::Served, crate::proxy::ServedBy), Response> {
    match crate::proxy::route_with(state, tenant, chain, req, responses).await {
        Ok((served, by)) => {
            let backend = &by.model.backends[by.backend];
            acct.model = Arc::clone(&by.model.name);
            acct.backend = Arc::clone(&backend.name);
            acct.price = Some(by.model.price);
            Ok((served, by))
        }
        Err((e, wait)) => {
            let status = e.status().as_u16();
            let mut resp = e.into_response_for(req.format);
            let model = chain.first().map_or("", |m| m.name.as_str());
            set_common(
                &mut resp,
                model,
                "none",
                acct.start().elapsed().saturating_sub(wait),
            );
            resp.extensions_mut()
                .insert(crate::overhead::UpstreamWait(wait));
            acct.finish(status, crate::translate::Usage::default());
            Err(resp)
        }
    }
}

/// `x-parley-model`, `x-parley-backend` and `x-parley-overhead-ms`.
pub fn set_common(resp: &mut Response, model: &str, backend: &str, overhead: Duration) {
    let h = resp.headers_mut();
    h.insert("x-parley-model", header_value(model));
    h.insert("x-parley-backend", header_value(backend));
    h.insert(
        "x-parley-overhead-ms",
        header_value(&format!("{:.3}", overhead.as_secs_f64() * 1000.0)),
    );
}

/// A JSON answer.
pub fn json_response(body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The model a request names and its fallback chain as this tenant may use it. Once the
/// model is known it is recorded in `ctx`, so refusals are counted under it.
pub fn resolve_model(
    rt: &Runtime,
    tenant: &Tenant,
    name: &str,
    ctx: &mut Ctx,
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
    if let Some(acct) = ctx.acct.as_mut() {
        acct.model = Arc::clone(&model.name);
        acct.requested_model = Arc::clone(&model.name);
        acct.price = Some(model.price);
    }
    if !tenant.may_use(name) {
        return Err(ApiError::new(
            ErrorKind::Permission,
            format!(
                "model {name:?} is not allowed for your API key; ask for it to be added to your allowedModels"
            ),
        ));
    }
    ctx.model = Some(Arc::clone(&model.name));
    let chain = rt
        .chain(name)
        .into_iter()
        .filter(|m| tenant.may_use(&m.name))
        .collect();
    Ok((Arc::clone(model), chain))
}

/// Refuses a model whose kind is not the one `endpoint` serves: 400 naming the model, its
/// kind and the endpoint that serves it. Every endpoint calls it right after
/// [`resolve_model`] (fallbacks share their model's kind, the config checks that).
pub fn require_kind(model: &Model, kind: ModelKind, endpoint: &str) -> Result<(), ApiError> {
    if model.config.kind == kind {
        return Ok(());
    }
    let fix = match model.config.kind {
        ModelKind::Embeddings => "send it to POST /v1/embeddings, or name a chat model here",
        ModelKind::Chat => "name a model of kind embeddings (see GET /v1/models)",
    };
    Err(ApiError::invalid(format!(
        "model {:?} is {} model, and {endpoint} serves {} models only: {fix}",
        model.name.as_str(),
        model.config.kind.with_article(),
        kind.as_str(),
    )))
}

/// A full answer fresh from the upstream: put in the response cache when the request is
/// cacheable (`cache_key`: the model caches and the request is deterministic) and then
/// marked `x-parley-cache: miss`; its accounting is finished.
#[allow(clippy::too_many_arguments)]
pub fn fresh_answer(
    store: &Store,
    tenant: &Tenant,
    model: &Model,
    cache_key: Option<[u8; 32]>,
    served_by: (&Arc<String>, &Arc<String>),
    body: Bytes,
    usage: Usage,
    acct: &mut Accounting,
) -> Response {
    if let (Some(key), Some(c)) = (cache_key, &model.config.cache) {
        let entry = crate::cache::Entry {
            body: body.clone(),
            model: Arc::clone(served_by.0),
            backend: Arc::clone(served_by.1),
            usage,
        };
        store.cache_put(&tenant.id, key, entry, Duration::from_secs(c.ttl_seconds));
    }
    let mut resp = json_response(body);
    if cache_key.is_some() {
        resp.headers_mut()
            .insert("x-parley-cache", HeaderValue::from_static("miss"));
    }
    acct.finish(200, usage);
    resp
}

/// Time to the first byte of a stream from the request's arrival, per served model.
pub fn observe_ttft(state: &AppState, model: &Arc<String>, since: Instant) {
    state
        .metrics
        .ttft
        .get_or_create(&crate::metrics::ModelLabel {
            model: Arc::clone(model),
        })
        .observe(since.elapsed().as_secs_f64());
}

/// Exchanges (and streams) still running after their client went away, for what the
/// upstream generates to be settled and recorded: shutdown waits for them (within the
/// drain) before it flushes the ledger, so their usage is not lost with the process.
pub static OUTLIVING: std::sync::LazyLock<tokio_util::task::TaskTracker> =
    std::sync::LazyLock::new(tokio_util::task::TaskTracker::new);

/// Runs the upstream exchange `work` so that it (and the accounting it owns) completes
/// even if the client goes away: it is polled right here while the client waits (no
/// extra task, no hand-off between threads on the common path), and if this handler is
/// dropped before it finished, what is left of it is spawned as a task of its own.
pub async fn outlive_client<F>(work: F) -> Response
where
    F: Future<Output = Response> + Send + 'static,
{
    struct Outlive<F: Future<Output = Response> + Send + 'static>(Option<Pin<Box<F>>>);
    impl<F: Future<Output = Response> + Send + 'static> Drop for Outlive<F> {
        fn drop(&mut self) {
            // Never resume a future that panicked (the panic is being answered).
            if std::thread::panicking() {
                return;
            }
            if let Some(rest) = self.0.take()
                && let Ok(handle) = tokio::runtime::Handle::try_current()
            {
                OUTLIVING.spawn_on(
                    async move {
                        // The client is gone: the answer is dropped, the accounting is done.
                        drop(rest.await);
                    },
                    &handle,
                );
            }
        }
    }
    let mut guard = Outlive(Some(Box::pin(work)));
    let resp = std::future::poll_fn(|cx| match guard.0.as_mut() {
        Some(f) => f.as_mut().poll(cx),
        None => Poll::Pending,
    })
    .await;
    guard.0 = None;
    resp
}

/// Unknown paths.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        ErrorKind::NotFound,
        format!(
            "no such endpoint {}; use /v1/chat/completions, /v1/messages, /v1/embeddings, /v1/models or /chat",
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
/// With a usage ledger, also its start (migrations, and without Redis this month's
/// spend read into the budgets), for at most `ledger::STARTUP_GRACE`.
pub fn ready(state: &AppState) -> bool {
    state.loaded.load(Ordering::Acquire)
        && !state.draining.load(Ordering::Relaxed)
        && state
            .runtime
            .load()
            .ledger
            .as_ref()
            .is_none_or(|l| l.started())
}
