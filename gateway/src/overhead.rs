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

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{HeaderValue, Uri};
use axum::response::Response;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::state::AppState;

/// Time this request spent waiting on upstreams (a response extension).
#[derive(Clone, Copy, Debug, Default)]
pub struct UpstreamWait(pub Duration);

/// The outermost layer of the chat API: overhead = time in Parley - upstream wait.
#[derive(Clone)]
pub struct MeasureLayer {
    state: Arc<AppState>,
}

impl MeasureLayer {
    /// Observes into `state`'s metrics.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

impl<S> tower::Layer<S> for MeasureLayer {
    type Service = Measure<S>;
    fn layer(&self, inner: S) -> Measure<S> {
        Measure {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

/// See [`MeasureLayer`].
#[derive(Clone)]
pub struct Measure<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S> tower::Service<Request> for Measure<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = MeasureFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let arrival = arrival(&req);
        MeasureFuture {
            inner: self.inner.call(req),
            arrival,
            state: Arc::clone(&self.state),
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`MeasureLayer`].
    pub struct MeasureFuture<F> {
        #[pin]
        inner: F,
        arrival: Instant,
        state: Arc<AppState>,
    }
}

impl<F, E> Future for MeasureFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.inner.poll(cx))?;
        if resp.headers().contains_key("x-parley-overhead-ms") {
            let wait = resp
                .extensions()
                .get::<UpstreamWait>()
                .copied()
                .unwrap_or_default();
            let overhead = this.arrival.elapsed().saturating_sub(wait.0);
            this.state.metrics.overhead.observe(overhead.as_secs_f64());
            resp.headers_mut()
                .insert("x-parley-overhead-ms", millis_header(overhead));
        }
        Poll::Ready(Ok(resp))
    }
}

/// When `req` began to arrive: when its connection read its first bytes (hyper has
/// parsed it since); not further back than a second (a slow client's upload or a
/// multiplexed HTTP/2 connection is not Parley's time).
fn arrival(req: &Request) -> Instant {
    let now = now_ns();
    let arrival = Instant::now();
    match req
        .extensions()
        .get::<ConnTiming>()
        .and_then(ConnTiming::request_began)
    {
        Some(began) if began <= now && now - began < 1_000_000_000 => arrival
            .checked_sub(Duration::from_nanos(now - began))
            .unwrap_or(arrival),
        _ => arrival,
    }
}

/// `d` in milliseconds with three decimals, formatted without a heap allocation.
fn millis_header(d: Duration) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 32];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let micros = d.as_micros();
    let _ = write!(cursor, "{}.{:03}", micros / 1000, micros % 1000);
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("0.000"))
}

// --- the edges of the network exchanges --------------------------------------------------

/// Nanoseconds since a process-wide origin (0 = never).
fn now_ns() -> u64 {
    static ORIGIN: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    u64::try_from(ORIGIN.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// When a connection last read and wrote bytes (kept in the connection, shared with the
/// requests and responses that use it through their extensions).
#[derive(Debug, Default)]
pub struct IoClock {
    created: u64,
    last_read: AtomicU64,
    last_write: AtomicU64,
    /// First read after a write (or ever): when the peer's next message began to arrive.
    first_read: AtomicU64,
    /// First write after a read (or ever): when our next message began to leave.
    first_write: AtomicU64,
}

/// A connection's [`IoClock`] (an extension of its requests and responses).
#[derive(Clone, Debug)]
pub struct ConnTiming(pub Arc<IoClock>);

impl ConnTiming {
    pub(crate) fn new() -> Self {
        Self(Arc::new(IoClock {
            created: now_ns(),
            ..IoClock::default()
        }))
    }

    /// Time waited on the peer in the exchange that began at `since` (nanoseconds of
    /// [`mark`]): from the start of the connection (a new one: connect and TLS handshake
    /// are the network's) or from the first byte of our request, to the last byte read.
    /// `None` when the clock does not describe that exchange.
    pub fn waited_since(&self, since: u64) -> Option<Duration> {
        let c = &self.0;
        let last_read = c.last_read.load(Ordering::Acquire);
        let from = if c.created >= since {
            c.created
        } else {
            c.first_write.load(Ordering::Acquire)
        };
        (from >= since && last_read > from).then(|| Duration::from_nanos(last_read - from))
    }

    /// When the request now being read began to arrive (its first bytes, read after the
    /// previous answer was written).
    fn request_began(&self) -> Option<u64> {
        let c = &self.0;
        let r = c.first_read.load(Ordering::Acquire);
        (r > 0 && r >= c.last_write.load(Ordering::Acquire)).then_some(r)
    }

    fn on_read(&self) {
        let c = &self.0;
        let now = now_ns();
        if c.last_write.load(Ordering::Relaxed) >= c.last_read.load(Ordering::Relaxed) {
            c.first_read.store(now, Ordering::Release);
        }
        c.last_read.store(now, Ordering::Release);
    }

    fn on_write(&self) {
        let c = &self.0;
        let now = now_ns();
        if c.last_read.load(Ordering::Relaxed) >= c.last_write.load(Ordering::Relaxed) {
            c.first_write.store(now, Ordering::Release);
        }
        c.last_write.store(now, Ordering::Release);
    }
}

/// Now, on the clock of [`ConnTiming::waited_since`].
pub fn mark() -> u64 {
    now_ns()
}

/// A TCP stream that records when bytes move (see [`IoClock`]).
#[derive(Debug)]
pub struct TimedTcp {
    inner: TcpStream,
    clock: ConnTiming,
}

impl TimedTcp {
    /// Wraps `inner` with a new clock.
    pub fn new(inner: TcpStream) -> Self {
        Self::with_clock(inner, ConnTiming::new())
    }

    /// Wraps `inner` with `clock` (started before the connect).
    pub(crate) fn with_clock(inner: TcpStream, clock: ConnTiming) -> Self {
        Self { inner, clock }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.inner
    }

    /// The clock.
    pub fn clock(&self) -> ConnTiming {
        self.clock.clone()
    }
}

impl AsyncRead for TimedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_read();
        }
        polled
    }
}

impl AsyncWrite for TimedTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.on_write();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.on_write();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connection for TimedTcp {
    fn connected(&self) -> Connected {
        // Every response on this connection carries its clock.
        self.inner.connected().extra(self.clock.clone())
    }
}

/// A connector whose connections record when bytes move (upstream calls).
#[derive(Clone, Debug)]
pub struct TimedConnector(pub HttpConnector);

impl tower::Service<Uri> for TimedConnector {
    type Response = TokioIo<TimedTcp>;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // The clock starts before the connect: connecting is the network's time.
        let clock = ConnTiming::new();
        let fut = self.0.call(uri);
        Box::pin(async move {
            let tcp = fut.await?.into_inner();
            Ok(TokioIo::new(TimedTcp::with_clock(tcp, clock)))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_clock_sees_the_peers_time_and_not_ours() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = TimedTcp::new(s);
            let clock = s.clock();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            let began = clock.request_began().expect("a request began");
            tokio::time::sleep(Duration::from_millis(80)).await;
            s.write_all(b"pong").await.unwrap();
            // Answered: the next request has not begun.
            assert!(clock.request_began().is_none());
            began
        });
        let mut c = TimedTcp::new(TcpStream::connect(addr).await.unwrap());
        let clock = c.clock();
        // Time before the request is not the peer's (a reused connection).
        tokio::time::sleep(Duration::from_millis(30)).await;
        let since = mark();
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        peer.await.unwrap();
        // The connection is older than `since`: from the request's first byte to the
        // answer's last (80 ms of the peer), not the 30 ms before or after.
        let waited = clock.waited_since(since).unwrap();
        assert!(waited >= Duration::from_millis(79), "{waited:?}");
        assert!(waited < Duration::from_millis(105), "{waited:?}");
        // A clock started after `since` covers the whole connection.
        let fresh = ConnTiming::new();
        assert!(fresh.waited_since(since).is_none(), "nothing read yet");
    }
}
