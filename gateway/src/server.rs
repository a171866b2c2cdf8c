//! Listeners, the middleware stack, graceful shutdown.
//!
//! [`chat_router`] holds the one `ServiceBuilder` of the chat API: read top to bottom, it
//! says what happens to every request before a handler (`api/`) sees it. hyper, below
//! it, enforces the header limits (431 beyond 128 headers, an 8 KiB HTTP/1.1 request head or a 64 KiB HTTP/2 header list).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::api::{self, chat, completions, embeddings, models, responses};
use crate::error::{ApiError, ApiFormat, ErrorKind};
use crate::state::AppState;

/// Requests served at once before new ones are shed with 503 (override with the
/// environment variable `PARLEY_MAX_CONCURRENT_REQUESTS`). Each may hold a body of up to
/// `limits.maxBodyBytes`, so this bounds the memory requests can take.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;

/// The concurrency limit in force.
pub fn max_concurrent_requests() -> usize {
    std::env::var("PARLEY_MAX_CONCURRENT_REQUESTS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS)
}

/// The chat API: routes, then the middleware stack around all of them.
pub fn chat_router(
    state: Arc<AppState>,
) -> impl tower::Service<
    http::Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ Sync
+ 'static {
    let routes = Router::new()
        .route(
            "/v1/chat/completions",
            post(completions::chat_completions).fallback(api::method_not_allowed),
        )
        .route(
            "/v1/messages",
            post(completions::messages)
                .fallback(api::method_not_allowed)
                // A panic here is answered in Anthropic's error shape.
                .layer(CatchPanicLayer::custom(|p| {
                    panic_response(p, ApiFormat::Anthropic)
                })),
        )
        .route(
            "/v1/embeddings",
            post(embeddings::embeddings).fallback(api::method_not_allowed),
        )
        .route(
            "/v1/models",
            get(models::models).fallback(api::method_not_allowed),
        )
        .route(
            "/v1/responses",
            post(responses::create).fallback(api::method_not_allowed),
        )
        .route(
            "/v1/responses/{id}",
            get(responses::get)
                .delete(responses::delete)
                .fallback(api::method_not_allowed),
        )
        .route("/chat", post(chat::chat).fallback(api::method_not_allowed));
    let routes = test_hooks(routes)
        .fallback(api::not_found)
        .with_state(Arc::clone(&state));
    ServiceBuilder::new()
        // hyper's request body becomes axum's (the one allocation a Router makes too).
        .map_request(|req: http::Request<hyper::body::Incoming>| req.map(Body::new))
        // 0. Parley's overhead, measured at the outermost edge: `x-parley-overhead-ms`
        //    and `parley_overhead_seconds` (see `overhead`).
        .layer(crate::overhead::MeasureLayer::new(Arc::clone(&state)))
        // (The layers below wrap the body; one box makes it axum's again.)
        .map_response(IntoResponse::into_response)
        // 1. A client's `x-request-id` is kept only if it is sane (1-128 visible ASCII
        //    characters); otherwise it is replaced by a new one.
        .map_request(drop_insane_request_id)
        // 2. Every request has an id (the client's, or 32 random hex digits): in the
        //    request (the handlers forward it upstream) and on every response.
        .layer(SetRequestIdLayer::x_request_id(NewRequestId))
        .layer(PropagateRequestIdLayer::x_request_id())
        // 3. Keys never reach a trace or a debug print of the headers.
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
        ]))
        // 4. One span per request (method, path, request id; never a header), at DEBUG:
        //    with `RUST_LOG=debug` every log line of a request carries its id; at the
        //    default level the span costs nothing. No per-request log events here: the
        //    metrics count requests.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(())
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
        // 5. CORS from the live config (`cors.allowedOrigins`, read on each request, so a
        //    reload applies at once); preflights are answered here. Only requests that
        //    carry an `Origin` (every browser's cross-origin request does) while CORS is
        //    configured pass through it: API clients pay nothing for it.
        .layer(LiveCorsLayer {
            cors: cors(Arc::clone(&state)),
            state: Arc::clone(&state),
        })
        // 6. A panic anywhere below is a 500 in the API's error shape, never a dropped
        //    connection; the process keeps serving.
        .layer(CatchPanicLayer::custom(|p| {
            panic_response(p, ApiFormat::OpenAi)
        }))
        // 7. Concurrency limit with load shedding: beyond `max_concurrent_requests()` in
        //    the handlers at once, a request is answered 503 with `Retry-After` at once
        //    (counted in `parley_load_shed_total`) instead of queueing without bound.
        //    One atomic counter: no semaphore, no queue.
        .layer(ShedLayer {
            in_flight: Arc::new(AtomicUsize::new(0)),
            max: max_concurrent_requests(),
            state,
        })
        .service(routes)
}

/// Test-only routes: `POST /_test/panic` panics in its handler (as the `openai` API, once
/// its accounting started). Present only in debug builds and only when
/// `PARLEY_TEST_HOOKS=1`; never in a release build.
fn test_hooks(routes: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    #[cfg(debug_assertions)]
    {
        if std::env::var("PARLEY_TEST_HOOKS").is_ok_and(|v| v == "1") {
            use futures_util::FutureExt as _;
            #[allow(clippy::panic)]
            async fn injected(_ctx: &mut api::Ctx) -> Result<Response, ApiError> {
                panic!("injected panic (PARLEY_TEST_HOOKS)")
            }
            // As an API handler that panics mid-request, once its accounting started.
            async fn panic_now(State(state): State<Arc<AppState>>) -> Response {
                let mut ctx = api::Ctx::new(&state, ApiFormat::OpenAi, "openai");
                let outcome = std::panic::AssertUnwindSafe(injected(&mut ctx))
                    .catch_unwind()
                    .await;
                ctx.respond_or_resume(outcome)
            }
            return routes.route("/_test/panic", post(panic_now).get(panic_now));
        }
    }
    routes
}

fn drop_insane_request_id(mut req: Request) -> Request {
    let insane = req.headers().get("x-request-id").is_some_and(|v| {
        let b = v.as_bytes();
        b.is_empty() || b.len() > 128 || !b.iter().all(|c| c.is_ascii_graphic())
    });
    if insane {
        req.headers_mut().remove("x-request-id");
    }
    req
}

/// New request ids: 32 random hex digits.
#[derive(Clone, Copy, Debug, Default)]
pub struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        let mut hex = [0u8; 32];
        let random = u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(..));
        hex::encode_to_slice(random.to_be_bytes(), &mut hex).ok()?;
        HeaderValue::from_bytes(&hex).ok().map(RequestId::new)
    }
}

fn request_span<B>(req: &http::Request<B>) -> tracing::Span {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::debug_span!("request", method = %req.method(), path = req.uri().path(), request_id = id)
}

fn cors(state: Arc<AppState>) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _parts| {
            let rt = state.runtime.load();
            let Some(allowed) = rt.cors.as_ref() else {
                return false;
            };
            origin
                .to_str()
                .is_ok_and(|o| allowed.contains(o) || allowed.contains("*"))
        }))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-parley-model"),
            HeaderName::from_static("x-parley-backend"),
            HeaderName::from_static("x-parley-overhead-ms"),
            HeaderName::from_static("x-parley-cache"),
            header::RETRY_AFTER,
        ])
        .max_age(Duration::from_secs(600))
}

/// CORS for the requests that need it (layer 5 of [`chat_router`]).
#[derive(Clone)]
struct LiveCorsLayer {
    cors: CorsLayer,
    state: Arc<AppState>,
}

impl<S: Clone> tower::Layer<S> for LiveCorsLayer {
    type Service = LiveCors<S>;
    fn layer(&self, inner: S) -> LiveCors<S> {
        LiveCors {
            cors: self.cors.layer(inner.clone()),
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

/// See [`LiveCorsLayer`].
#[derive(Clone)]
struct LiveCors<S> {
    cors: tower_http::cors::Cors<S>,
    inner: S,
    state: Arc<AppState>,
}

impl<S, B> tower::Service<Request> for LiveCors<S>
where
    S: tower::Service<Request, Response = http::Response<B>> + Clone,
    B: Default,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future =
        futures_util::future::Either<tower_http::cors::ResponseFuture<S::Future>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::ready!(self.inner.poll_ready(cx))?;
        self.cors.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if req.headers().contains_key(header::ORIGIN) && self.state.runtime.load().cors.is_some() {
            futures_util::future::Either::Left(self.cors.call(req))
        } else {
            futures_util::future::Either::Right(self.inner.call(req))
        }
    }
}

fn panic_response(panic: Box<dyn std::any::Any + Send>, format: ApiFormat) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %what, "a request handler panicked; answered 500");
    let mut resp = ApiError::new(
        ErrorKind::Internal,
        "the gateway failed on this request (an internal error, logged); retry it, and report it if it persists",
    )
    .into_response_for(format);
    // The request's body may be unread: the connection is closed after this answer, and
    // the client is told so (it must not send its next request on it).
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn overloaded(state: &AppState, uri: &Uri) -> Response {
    let format = if uri.path() == "/v1/messages" {
        ApiFormat::Anthropic
    } else {
        ApiFormat::OpenAi
    };
    state.metrics.load_shed.inc();
    let mut e = ApiError::new(
        ErrorKind::Unavailable,
        "the gateway is at its concurrency limit; retry after the time in Retry-After",
    );
    e.retry_after = Some(1);
    e.into_response_for(format)
}

/// The concurrency limit with load shedding (layer 7 of [`chat_router`]).
#[derive(Clone)]
struct ShedLayer {
    in_flight: Arc<AtomicUsize>,
    max: usize,
    state: Arc<AppState>,
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ShedLayer`].
#[derive(Clone)]
struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

/// One request inside the limit; leaving it (answered, or dropped) frees its place.
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A request inside the limit, or the answer that sheds it.
    #[project = ShedProj]
    enum ShedFuture<F> {
        Admitted { #[pin] inner: F, permit: Permit },
        Shed { answer: Option<Response> },
    }
}

impl<F, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            // The permit is freed when the answer is ready or the request dropped.
            ShedProj::Admitted { inner, .. } => inner.poll(cx),
            ShedProj::Shed { answer } => std::task::Poll::Ready(Ok(answer
                .take()
                .unwrap_or_else(|| StatusCode::SERVICE_UNAVAILABLE.into_response()))),
        }
    }
}

impl<S> tower::Service<Request> for Shed<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ShedFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let l = &self.layer;
        if l.in_flight.fetch_add(1, Ordering::AcqRel) >= l.max {
            l.in_flight.fetch_sub(1, Ordering::AcqRel);
            return ShedFuture::Shed {
                answer: Some(overloaded(&l.state, req.uri())),
            };
        }
        ShedFuture::Admitted {
            permit: Permit(Arc::clone(&l.in_flight)),
            inner: self.inner.call(req),
        }
    }
}

/// The admin router: `/healthz`, `/readyz`, `/metrics`, `/admin/usage`.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<AppState>>| async move {
                if api::ready(&s) {
                    (StatusCode::OK, "ready\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<AppState>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    s.metrics.encode(),
                )
            }),
        )
        // Usage from the ledger (`ledger::query`).
        .route("/admin/usage", get(crate::ledger::query::usage))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting (the listener
/// is closed, so new connections are refused) and waits up to `drain` for in-flight
/// requests and streams.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    shutdown: CancellationToken,
    drain: Duration,
) where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + Send
        + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // hyper's smallest: the read buffer of an HTTP/1.1 connection stays 8 KiB instead
        // of growing to 16 KiB while a response streams (8 KiB a stream), and a request
        // head may be up to 8 KiB (else 431).
        .max_buf_size(8192)
        .max_headers(128)
        // Small JSON answers: one flattened write beats a vectored one.
        .writev(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().max_header_list_size(64 * 1024);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The connection records when bytes move; its requests carry the clock
                // (`overhead`: when a request began to arrive).
                let io = crate::overhead::TimedTcp::new(stream);
                let clock = io.clock();
                let service = TowerToHyperService::new(tower::ServiceExt::map_request(
                    service.clone(),
                    move |mut req: http::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(clock.clone());
                        req
                    },
                ));
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                let conn = graceful.watch(conn.into_owned());
                // Not an `async move` block: that would hold the connection twice (the
                // captured one and the one awaited), 2 KiB more for every open connection.
                tokio::spawn(futures_util::FutureExt::map(conn, |ended| {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }));
            }
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_seconds = drain.as_secs(),
            "drain deadline passed; closing remaining connections"
        );
    }
}

/// Marks the gateway as draining (readiness fails).
pub fn start_draining(state: &AppState) {
    state.draining.store(true, Ordering::Relaxed);
}
