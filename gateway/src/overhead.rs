//! Parley's own overhead, as a user feels it: from the moment a request reaches the
//! outermost layer of the chat API to the moment its answer (for a stream: its first
//! event) leaves it, minus the time spent waiting on upstreams, measured at the edges of
//! each upstream exchange (from sending the request to its response headers and body,
//! or a stream's first event; plus retry backoff).
//!
//! Handlers mark an answer that went upstream with [`UpstreamWait`] (a response
//! extension); [`measure`] (the outermost layer, see `server::chat_router`) sets
//! `x-parley-overhead-ms` and observes `parley_overhead_seconds` for every answer that
//! carries that header.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use crate::state::AppState;

/// Time this request spent waiting on upstreams (a response extension).
#[derive(Clone, Copy, Debug, Default)]
pub struct UpstreamWait(pub Duration);

/// The outermost layer of the chat API: overhead = time in Parley - upstream wait.
pub async fn measure(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let arrival = Instant::now();
    let mut resp = next.run(req).await;
    if resp.headers().contains_key("x-parley-overhead-ms") {
        let wait = resp
            .extensions()
            .get::<UpstreamWait>()
            .copied()
            .unwrap_or_default();
        let overhead = arrival.elapsed().saturating_sub(wait.0);
        state.metrics.overhead.observe(overhead.as_secs_f64());
        if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", overhead.as_secs_f64() * 1000.0)) {
            resp.headers_mut().insert("x-parley-overhead-ms", v);
        }
    }
    resp
}
