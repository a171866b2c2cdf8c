//! Upstream connections: plain `http://` upstreams over [`http1`], a lean HTTP/1.1
//! client; `https://` and h2c upstreams over hyper's pooled client in lanes, so that the
//! streams to one host spread over several HTTP/2 connections.
//!
//! hyper-util's client keeps one HTTP/2 connection per host, and the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` caps the streams on it (RFC 9113 asks for at least
//! 100; providers advertise 100-256): beyond that, a new request waits until a stream on
//! the connection ends, which for a chat stream is tens of seconds. A lane is one client
//! (one pool, so one HTTP/2 connection per host); a request goes to the first lane with
//! fewer than [`STREAMS_PER_LANE`] requests in flight, so no connection is asked for more
//! streams than any compliant server allows, and a lane is only built once the lanes
//! before it are full. With HTTP/1.1 over TLS (a connection per request in flight anyway)
//! lanes change nothing but which pool a connection idles in.

pub mod http1;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use self::http1::{Http1Body, Http1Client, Http1Error};
use crate::runtime::HttpClient;

/// Requests in flight on a lane before the next lane takes new ones: the least
/// `SETTINGS_MAX_CONCURRENT_STREAMS` RFC 9113 recommends servers allow.
pub const STREAMS_PER_LANE: usize = 100;
/// Lanes per upstream client: 6,400 streams before lanes take more than
/// [`STREAMS_PER_LANE`] each (then the least loaded takes the request).
pub const MAX_LANES: usize = 64;

/// Pooled connections for the backends that share a client configuration.
#[derive(Clone)]
pub struct Upstream {
    lanes: Arc<Lanes>,
    /// For `http://` URLs, unless the backend asks for h2c.
    http1: Option<Http1Client>,
}

struct Lanes {
    /// Builds a lane's client (no I/O; it connects on first use).
    build: Box<dyn Fn() -> HttpClient + Send + Sync>,
    lanes: Box<[Lane]>,
}

#[derive(Default)]
struct Lane {
    client: OnceLock<HttpClient>,
    in_flight: AtomicUsize,
}

impl Upstream {
    /// Lanes whose clients `build` makes when first needed; `http1`: the client for
    /// `http://` URLs (`None`: hyper's, in lanes, as for h2c).
    pub fn new(
        build: impl Fn() -> HttpClient + Send + Sync + 'static,
        http1: Option<Http1Client>,
    ) -> Self {
        Self {
            lanes: Arc::new(Lanes {
                build: Box::new(build),
                lanes: (0..MAX_LANES).map(|_| Lane::default()).collect(),
            }),
            http1,
        }
    }

    /// Sends `request`: over [`http1`] for an `http://` URL when this upstream has it,
    /// else on the first lane with room, which counts it until the response's body is
    /// finished or dropped (or the request fails).
    pub async fn request(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<UpstreamBody>, UpstreamError> {
        if let Some(http1) = &self.http1
            && request.uri().scheme() == Some(&http::uri::Scheme::HTTP)
        {
            let response = http1.request(request).await?;
            return Ok(response.map(|body| UpstreamBody(Inner::Http1(body))));
        }
        let taken = self.take_lane();
        let lane = &self.lanes.lanes[taken.index];
        let client = lane.client.get_or_init(|| (self.lanes.build)());
        let response = client.request(request.map(Full::new)).await?;
        Ok(response.map(|body| UpstreamBody(Inner::Pooled { body, _lane: taken })))
    }

    /// The first lane with fewer than [`STREAMS_PER_LANE`] in flight (counted in), else
    /// the least loaded.
    fn take_lane(&self) -> LaneTaken {
        let lanes = &self.lanes.lanes;
        let index = lanes
            .iter()
            .position(|lane| {
                let had = lane.in_flight.fetch_add(1, Ordering::Relaxed);
                if had < STREAMS_PER_LANE {
                    return true;
                }
                lane.in_flight.fetch_sub(1, Ordering::Relaxed);
                false
            })
            .unwrap_or_else(|| {
                let least = lanes
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, lane)| lane.in_flight.load(Ordering::Relaxed))
                    .map_or(0, |(i, _)| i);
                if let Some(lane) = lanes.get(least) {
                    lane.in_flight.fetch_add(1, Ordering::Relaxed);
                }
                least
            });
        LaneTaken {
            lanes: Arc::clone(&self.lanes),
            index,
        }
    }

    /// Requests in flight per lane, up to the last lane in use (tests).
    #[cfg(test)]
    fn in_flight(&self) -> Vec<usize> {
        let mut counts: Vec<usize> = self
            .lanes
            .lanes
            .iter()
            .map(|l| l.in_flight.load(Ordering::Relaxed))
            .collect();
        while counts.last() == Some(&0) {
            counts.pop();
        }
        counts
    }
}

/// One request counted in a lane, until dropped.
struct LaneTaken {
    lanes: Arc<Lanes>,
    index: usize,
}

impl Drop for LaneTaken {
    fn drop(&mut self) {
        if let Some(lane) = self.lanes.lanes.get(self.index) {
            lane.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    Http1(#[from] Http1Error),
    #[error(transparent)]
    Body(#[from] hyper::Error),
}

impl UpstreamError {
    /// No connection was made (so the request was not sent).
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Pooled(e) => e.is_connect(),
            Self::Http1(e) => e.is_connect(),
            Self::Body(_) => false,
        }
    }
}

/// An upstream response body; a pooled request leaves its lane when this is dropped.
pub struct UpstreamBody(Inner);

enum Inner {
    Pooled { body: Incoming, _lane: LaneTaken },
    Http1(Http1Body),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        match &mut self.0 {
            Inner::Pooled { body, .. } => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(UpstreamError::Body))),
            Inner::Http1(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(UpstreamError::Http1))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Pooled { body, .. } => body.is_end_stream(),
            Inner::Http1(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Pooled { body, .. } => body.size_hint(),
            Inner::Http1(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Result<Upstream, String> {
        let tls = crate::runtime::tls_config()?;
        Ok(Upstream::new(
            move || crate::runtime::build_client(1000, &tls, false),
            None,
        ))
    }

    #[test]
    fn lanes_fill_in_order_then_the_least_loaded_takes_more() -> Result<(), String> {
        let up = upstream()?;
        let mut held: Vec<LaneTaken> = (0..STREAMS_PER_LANE + 3).map(|_| up.take_lane()).collect();
        assert_eq!(up.in_flight(), vec![STREAMS_PER_LANE, 3]);
        // A request that ends frees room in the first lane, which takes the next one.
        held.swap_remove(0);
        let next = up.take_lane();
        assert_eq!(next.index, 0);
        held.push(next);
        assert_eq!(up.in_flight(), vec![STREAMS_PER_LANE, 3]);
        // Every lane full: the least loaded takes more.
        let room = STREAMS_PER_LANE * MAX_LANES - held.len();
        held.extend((0..room).map(|_| up.take_lane()));
        assert_eq!(up.in_flight(), vec![STREAMS_PER_LANE; MAX_LANES]);
        let over = up.take_lane();
        let counts = up.in_flight();
        assert_eq!(counts[over.index], STREAMS_PER_LANE + 1);
        assert_eq!(
            counts.iter().sum::<usize>(),
            STREAMS_PER_LANE * MAX_LANES + 1
        );
        drop(over);
        drop(held);
        assert_eq!(up.in_flight(), Vec::<usize>::new());
        Ok(())
    }
}
