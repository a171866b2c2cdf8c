//! Streaming answers: upstream SSE events translated for the client as they arrive.
//!
//! If the client goes away mid-stream, the rest of the upstream stream is still read
//! (up to the call's deadline) in a task of its own, so the request is charged what the
//! upstream generated, not what the client happened to read.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::accounting::Accounting;
use crate::error::{ApiError, ErrorKind};
use crate::proxy::StreamStart;
use crate::translate::Usage;
use crate::translate::sse::MAX_EVENT_BYTES;

/// Reads one more piece of the upstream stream into `out` (translated); `false` once the
/// stream is over (finished, failed or timed out: the translator knows which).
async fn advance(s: &mut StreamStart, out: &mut BytesMut) -> bool {
    if s.translator.finished || s.translator.failed.is_some() {
        return false;
    }
    match tokio::time::timeout_at(s.deadline, s.body.frame()).await {
        Err(_) => {
            let e = ApiError::new(
                ErrorKind::Timeout,
                "the upstream did not finish the stream within its total timeout",
            );
            s.translator.abort(&e, out);
        }
        Ok(None) => {
            let e = ApiError::new(
                ErrorKind::Upstream,
                "the upstream closed the stream before it was complete",
            );
            s.translator.abort(&e, out);
        }
        Ok(Some(Err(_))) => {
            let e = ApiError::new(
                ErrorKind::Upstream,
                "the upstream connection broke in the middle of the stream",
            );
            s.translator.abort(&e, out);
        }
        Ok(Some(Ok(frame))) => {
            if let Ok(data) = frame.into_data() {
                s.parser.push(&data);
                while let Some(ev) = s.parser.next_event() {
                    s.translator.on_event(&ev, out);
                }
                if s.parser.pending() > MAX_EVENT_BYTES {
                    let e = ApiError::new(
                        ErrorKind::Upstream,
                        "the upstream sent an oversized stream event",
                    );
                    s.translator.abort(&e, out);
                }
            }
        }
    }
    true
}

fn usage_of(s: &StreamStart) -> Usage {
    let t = &s.translator;
    let mut usage = t.usage;
    if usage.output == 0 {
        usage.output = t.deltas;
    }
    usage
}

/// Owns the stream's state, so that dropping the body (the client went away) still
/// settles, after reading what the upstream still sends.
struct StreamGuard {
    inner: Option<(StreamStart, Accounting)>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let Some((mut s, mut acct)) = self.inner.take() else {
            return;
        };
        let t = &s.translator;
        if t.finished || t.failed.is_some() {
            let status = if t.finished { 200 } else { 502 };
            let usage = usage_of(&s);
            acct.finish(status, usage);
            return;
        }
        // The client went away: read the rest (up to the deadline) for the real usage.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                super::OUTLIVING.spawn_on(
                    async move {
                        let mut sink = BytesMut::new();
                        while advance(&mut s, &mut sink).await {
                            sink.clear();
                        }
                        let usage = usage_of(&s);
                        acct.finish(499, usage);
                    },
                    &handle,
                );
            }
            Err(_) => {
                let usage = usage_of(&s);
                acct.finish(499, usage);
            }
        }
    }
}

/// The streaming response for a stream that passed its first byte.
pub fn response(s: StreamStart, acct: Accounting) -> Response {
    let mut guard = StreamGuard {
        inner: Some((s, acct)),
    };
    let stream = async_stream::stream! {
        let first = match guard.inner.as_mut() {
            Some((s, _)) => std::mem::take(&mut s.first),
            None => Bytes::new(),
        };
        if !first.is_empty() {
            yield Ok::<Bytes, std::convert::Infallible>(first);
        }
        let mut out = BytesMut::new();
        while let Some((s, _)) = guard.inner.as_mut() {
            if !advance(s, &mut out).await {
                break;
            }
            if !out.is_empty() {
                yield Ok(out.split().freeze());
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
