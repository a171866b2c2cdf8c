//! A lean HTTP/1.1 client for plain `http://` upstreams: self-hosted model servers (vLLM,
//! TGI, Ollama, llama.cpp) speak HTTP/1.1 only, so every open stream to them is a
//! connection of its own.
//!
//! hyper's client keeps, for each connection and for as long as it lives, an 8 KiB read
//! buffer, an 8 KiB write buffer, a dispatch task and the first block of its request
//! channel (~9 KiB): ~27 KiB per open stream, most of the gateway's memory with
//! thousands of streams. Here the request is written from one buffer that is freed once
//! sent, the response head is parsed with `httparse`, and the body is read by whoever
//! polls it, into a buffer that exists only while it holds unread bytes: an open stream
//! between two chunks is its socket and a couple of hundred bytes. No task, no channel:
//! the response is read on the task that asked for it.
//!
//! Connections are kept alive and pooled per host (newest first, up to
//! [`MAX_IDLE_PER_HOST`], closed after [`IDLE_TIMEOUT`] idle). A pooled connection the
//! server has closed is noticed when it is taken out (its socket is readable) and
//! dropped; a request on it is never sent.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::overhead::{ConnTiming, TimedTcp};

/// Idle connections kept per host.
pub const MAX_IDLE_PER_HOST: usize = 256;
/// An idle connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields in a response head (hyper's default too).
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 8 * 1024;
/// The longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE_BYTES: usize = 4 * 1024;
/// Trailer bytes accepted (then discarded: nothing here reads trailers).
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// TCP keepalive probes on upstream connections start after this much silence.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why an exchange failed. Nothing here holds request or response bytes (they may carry
/// keys or user data): only what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("resolving {authority}: {source}")]
    Resolve {
        authority: String,
        source: io::Error,
    },
    #[error("connecting to {authority}: {source}")]
    Connect {
        authority: String,
        source: io::Error,
    },
    #[error("connecting to {authority}: no answer within {timeout:?}")]
    ConnectTimeout {
        authority: String,
        timeout: Duration,
    },
    #[error("the upstream URL has no host")]
    NoHost,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before its response head")]
    ClosedBeforeHead,
    #[error("the upstream closed the connection before the end of its response body")]
    ClosedInBody,
    #[error("the upstream's response head is over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the upstream's response is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
}

impl Http1Error {
    /// No connection was made (so the request was not sent).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            Self::Resolve { .. } | Self::Connect { .. } | Self::ConnectTimeout { .. }
        )
    }
}

/// Pooled HTTP/1.1 connections to plain `http://` hosts. Cheap to clone.
#[derive(Clone)]
pub struct Http1Client {
    pool: Arc<Pool>,
}

struct Pool {
    connect_timeout: Duration,
    idle: Mutex<HashMap<Authority, VecDeque<Idle>>>,
    reaper_started: AtomicBool,
}

struct Idle {
    io: TimedTcp,
    since: Instant,
}

impl Http1Client {
    /// A client whose connects give up after `connect_timeout` (split among the
    /// addresses a host name resolves to).
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            pool: Arc::new(Pool {
                connect_timeout,
                idle: Mutex::new(HashMap::new()),
                reaper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (an absolute `http://` URI) on a pooled or new connection and
    /// reads the response head. The body is read as it is polled; once it has been read
    /// to its end, the connection goes back to the pool.
    pub async fn request(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Http1Body>, Http1Error> {
        let (parts, body) = request.into_parts();
        let authority = parts.uri.authority().cloned().ok_or(Http1Error::NoHost)?;
        let mut head = Vec::with_capacity(256 + body.len());
        encode_request(&parts, &authority, &body, &mut head);
        drop(body);

        let mut io = match self.checkout(&authority) {
            Some(io) => io,
            None => self.pool.connect(&authority).await?,
        };
        io.write_all(&head).await?;
        drop(head);

        let mut buf = BytesMut::new();
        let head = read_head(&mut io, &mut buf).await?;
        let decoder = Decoder::for_response(&parts.method, &head)?;
        let reusable = decoder.reusable() && keeps_alive(&head);
        let clock = io.clock();
        let body = Http1Body {
            io: Some(io),
            buf,
            decoder,
            reusable,
            home: Some((Arc::clone(&self.pool), authority)),
        };
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        // Read by `parley_overhead_seconds`: the time bytes took is the upstream's.
        response.extensions_mut().insert(clock);
        Ok(response)
    }

    /// The newest idle connection to `authority` the server has not closed.
    fn checkout(&self, authority: &Authority) -> Option<TimedTcp> {
        loop {
            let idle = {
                let mut hosts = self.pool.idle.lock();
                let conns = hosts.get_mut(authority)?;
                conns.pop_back()?
            };
            if idle.since.elapsed() < IDLE_TIMEOUT && still_open(idle.io.tcp()) {
                return Some(idle.io);
            }
        }
    }

    /// Idle connections per host (tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.pool.idle.lock().values().map(VecDeque::len).sum()
    }
}

/// Whether an idle connection can take a request: the peer has neither closed it nor
/// sent anything (an idle HTTP/1.1 connection has nothing to say). No syscall unless the
/// socket was last seen readable.
fn still_open(tcp: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match tcp.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        // Readiness may be left over from the last response: ask the socket.
        Poll::Ready(Ok(())) => {
            matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

impl Pool {
    async fn connect(&self, authority: &Authority) -> Result<TimedTcp, Http1Error> {
        // Connecting is the network's time: the clock starts before it.
        let clock = ConnTiming::new();
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = authority.port_u16().unwrap_or(80);
        let timed_out = || Http1Error::ConnectTimeout {
            authority: authority.to_string(),
            timeout: self.connect_timeout,
        };
        let deadline = Instant::now() + self.connect_timeout;
        let addrs: Vec<SocketAddr> =
            match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(source)) => {
                    return Err(Http1Error::Resolve {
                        authority: authority.to_string(),
                        source,
                    });
                }
                Ok(Ok(addrs)) => addrs.collect(),
            };
        let mut last = None;
        for (i, addr) in addrs.iter().enumerate() {
            // Like hyper: what is left of the timeout, split among the addresses left.
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
            match tokio::time::timeout(attempt, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    tcp.set_nodelay(true)?;
                    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                    socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
                    return Ok(TimedTcp::with_clock(tcp, clock));
                }
                Ok(Err(source)) => last = Some(source),
                Err(_) => last = None,
            }
        }
        Err(match last {
            Some(source) => Http1Error::Connect {
                authority: authority.to_string(),
                source,
            },
            None if addrs.is_empty() => Http1Error::Resolve {
                authority: authority.to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            },
            None => timed_out(),
        })
    }

    /// Keeps a connection whose last response was read to its end.
    fn checkin(self: &Arc<Self>, authority: Authority, io: TimedTcp) {
        let now = Instant::now();
        let mut closing = Vec::new();
        {
            let mut hosts = self.idle.lock();
            let conns = hosts.entry(authority).or_default();
            while conns
                .front()
                .is_some_and(|c| now.duration_since(c.since) >= IDLE_TIMEOUT)
                || conns.len() >= MAX_IDLE_PER_HOST
            {
                closing.extend(conns.pop_front());
            }
            conns.push_back(Idle { io, since: now });
        }
        // Closed outside the lock (a syscall each).
        drop(closing);
        if !self.reaper_started.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }
}

/// Closes connections idle for [`IDLE_TIMEOUT`] on hosts no request goes to any more,
/// until the pool is gone.
async fn reap(pool: Weak<Pool>) {
    let mut every = tokio::time::interval(IDLE_TIMEOUT / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.close_expired(Instant::now());
    }
}

impl Pool {
    /// Closes every connection idle for [`IDLE_TIMEOUT`] at `now`.
    fn close_expired(&self, now: Instant) {
        let mut closing = Vec::new();
        {
            let mut hosts = self.idle.lock();
            for conns in hosts.values_mut() {
                while conns
                    .front()
                    .is_some_and(|c| now.duration_since(c.since) >= IDLE_TIMEOUT)
                {
                    closing.extend(conns.pop_front());
                }
            }
            hosts.retain(|_, conns| !conns.is_empty());
        }
        // Closed outside the lock (a syscall each).
        drop(closing);
    }
}

/// Writes the request line, the headers (with `host` and `content-length` when the
/// request has none) and the body.
fn encode_request(
    parts: &http::request::Parts,
    authority: &Authority,
    body: &Bytes,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(CONTENT_LENGTH)
        && (!body.is_empty() || !matches!(parts.method, Method::GET | Method::HEAD))
    {
        // Writing to a Vec cannot fail.
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Reads until a final (non-1xx) response head is complete; the bytes after it stay in
/// `buf`.
async fn read_head(io: &mut TimedTcp, buf: &mut BytesMut) -> Result<Head, Http1Error> {
    loop {
        if !buf.is_empty()
            && let Some(head) = parse_head(buf)?
        {
            // 100 Continue, 103 Early Hints: the final answer follows.
            if head.status.is_informational() {
                continue;
            }
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(Http1Error::HeadTooLarge);
        }
        buf.reserve(READ_SIZE);
        if io.read_buf(buf).await? == 0 {
            return Err(Http1Error::ClosedBeforeHead);
        }
    }
}

/// One response head off the front of `buf`, if it is all there.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Http1Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut fields);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Http1Error::Invalid("over 100 header fields"));
        }
        Err(_) => return Err(Http1Error::Invalid("a malformed response head")),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Http1Error::Invalid("a malformed status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Http1Error::Invalid("an unasked-for protocol switch"));
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Http1Error::Invalid("a malformed header name"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| Http1Error::Invalid("a malformed header value"))?;
        headers.append(name, value);
    }
    buf.advance(len);
    Ok(Some(Head {
        status,
        version,
        headers,
    }))
}

/// Whether the server keeps the connection open after this response.
fn keeps_alive(head: &Head) -> bool {
    let has = |token: &str| {
        head.headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    match head.version {
        Version::HTTP_11 => !has("close"),
        _ => has("keep-alive"),
    }
}

/// How the body of a response ends (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    /// `content-length`: this many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Neither: the body ends when the server closes the connection.
    UntilClose,
    Done,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section: this many trailer bytes so far.
    Trailers(usize),
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Decoder {
    fn for_response(method: &Method, head: &Head) -> Result<Self, Http1Error> {
        let status = head.status;
        if method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Self::Done);
        }
        if head.headers.contains_key(TRANSFER_ENCODING) {
            // Only a final `chunked` frames the body; any other coding runs to the close.
            let last = head
                .headers
                .get_all(TRANSFER_ENCODING)
                .iter()
                .next_back()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .map(str::trim);
            return Ok(match last {
                Some(coding) if coding.eq_ignore_ascii_case("chunked") => {
                    Self::Chunked(Chunk::Size)
                }
                _ => Self::UntilClose,
            });
        }
        let mut length = None;
        for value in head.headers.get_all(CONTENT_LENGTH) {
            for item in value.as_bytes().split(|&b| b == b',') {
                let n = parse_decimal(item.trim_ascii())
                    .ok_or(Http1Error::Invalid("a malformed content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Http1Error::Invalid("conflicting content-lengths"));
                }
                length = Some(n);
            }
        }
        Ok(match length {
            Some(0) => Self::Done,
            Some(n) => Self::Length(n),
            None => Self::UntilClose,
        })
    }

    /// Whether the connection can carry another request once this body has ended.
    fn reusable(&self) -> bool {
        !matches!(self, Self::UntilClose)
    }

    /// Takes what it can of the body off the front of `buf`.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Http1Error> {
        loop {
            match *self {
                Self::Done => return Ok(Decoded::Done),
                Self::Length(0) => *self = Self::Done,
                Self::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    *self = Self::Length(left - take as u64);
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Self::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Self::Chunked(Chunk::Size) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    // `1a;name=value`: the size in hex; extensions are ignored.
                    let end = line
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    let (digits, rest) = line.split_at(end);
                    let rest = rest.trim_ascii_start();
                    if !(rest.is_empty() || rest.starts_with(b";")) {
                        return Err(Http1Error::Invalid("a malformed chunk size"));
                    }
                    let size =
                        parse_hex(digits).ok_or(Http1Error::Invalid("a malformed chunk size"))?;
                    *self = Self::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                Self::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - take as u64;
                    *self = Self::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                Self::Chunked(Chunk::DataEnd) => match buf.first() {
                    None => return Ok(Decoded::NeedMore),
                    Some(b'\n') => {
                        buf.advance(1);
                        *self = Self::Chunked(Chunk::Size);
                    }
                    Some(b'\r') => match buf.get(1) {
                        None => return Ok(Decoded::NeedMore),
                        Some(b'\n') => {
                            buf.advance(2);
                            *self = Self::Chunked(Chunk::Size);
                        }
                        Some(_) => return Err(Http1Error::Invalid("a chunk without its CRLF")),
                    },
                    Some(_) => return Err(Http1Error::Invalid("a chunk without its CRLF")),
                },
                Self::Chunked(Chunk::Trailers(seen)) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line.is_empty() {
                        *self = Self::Done;
                    } else {
                        let seen = seen + line.len();
                        if seen > MAX_TRAILER_BYTES {
                            return Err(Http1Error::Invalid("oversized trailers"));
                        }
                        *self = Self::Chunked(Chunk::Trailers(seen));
                    }
                }
            }
        }
    }
}

/// One line off the front of `buf`, without its CRLF (or bare LF).
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, Http1Error> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1);
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE_BYTES => Err(Http1Error::Invalid("an overlong chunk line")),
        None => Ok(None),
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(v))
    })
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(v))
    })
}

/// A response body read straight off its connection.
pub struct Http1Body {
    /// `None` once the body has ended or failed.
    io: Option<TimedTcp>,
    /// Bytes read and not yet handed out; unallocated between reads.
    buf: BytesMut,
    decoder: Decoder,
    reusable: bool,
    /// Where the connection goes back to once the body has been read.
    home: Option<(Arc<Pool>, Authority)>,
}

impl std::fmt::Debug for Http1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Body")
            .field("decoder", &self.decoder)
            .field("reusable", &self.reusable)
            .finish_non_exhaustive()
    }
}

impl Http1Body {
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        let io = self.io.take();
        if let (Some(io), Some((pool, authority))) = (io, self.home.take())
            && self.reusable
            && self.buf.is_empty()
        {
            pool.checkin(authority, io);
        }
        self.buf = BytesMut::new();
    }

    fn fail(&mut self, e: Http1Error) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        self.decoder = Decoder::Done;
        self.io = None;
        self.home = None;
        self.buf = BytesMut::new();
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for Http1Body {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        let this = self.get_mut();
        loop {
            match this.decoder.decode(&mut this.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.buf.is_empty() {
                        // Frees the read buffer once `data` is dropped: between chunks
                        // an open stream holds no buffer.
                        this.buf = BytesMut::new();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Done) => {
                    if this.io.is_some() {
                        this.finish();
                    }
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => return this.fail(e),
            }
            let Some(io) = this.io.as_mut() else {
                return Poll::Ready(None);
            };
            if this.buf.is_empty() {
                // Nothing buffered: no buffer is held until the socket has bytes, so a
                // stream waiting for its next chunk holds none.
                this.buf = BytesMut::new();
                match io.tcp().poll_read_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return this.fail(e.into()),
                    Poll::Ready(Ok(())) => {}
                }
            }
            if this.buf.capacity() == this.buf.len() {
                this.buf.reserve(READ_SIZE);
            }
            match tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut this.buf) {
                Poll::Pending => {
                    if this.buf.is_empty() {
                        // The readiness was stale.
                        this.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return this.fail(e.into()),
                Poll::Ready(Ok(0)) if this.decoder == Decoder::UntilClose => {
                    this.reusable = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return this.fail(Http1Error::ClosedInBody),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use tokio::net::TcpListener;

    /// Feeds `wire` to a decoder in the pieces `cuts` makes; returns the body and what
    /// was left in the buffer after the end.
    fn decode_in_pieces(
        mut decoder: Decoder,
        wire: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<u8>, Vec<u8>), Http1Error> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        for cut in cuts {
            buf.extend_from_slice(&wire[fed..cut.max(fed)]);
            fed = cut.max(fed);
            loop {
                match decoder.decode(&mut buf)? {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((body, [&buf[..], &wire[fed..]].concat())),
                }
            }
        }
        Err(Http1Error::ClosedInBody)
    }

    fn chunked(body: &[u8], sizes: &[usize], extension: bool, trailers: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut rest = body;
        let mut sizes = sizes.iter().cycle();
        while !rest.is_empty() {
            let n = (sizes.next().copied().unwrap_or(1) % rest.len()).max(1);
            let ext = if extension { ";name=\"v\"" } else { "" };
            wire.extend_from_slice(format!("{n:X}{ext}\r\n").as_bytes());
            wire.extend_from_slice(&rest[..n]);
            wire.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        wire.extend_from_slice(b"0\r\n");
        if trailers {
            wire.extend_from_slice(b"x-checksum: abc\r\n");
        }
        wire.extend_from_slice(b"\r\n");
        wire
    }

    proptest! {
        #[test]
        fn a_chunked_body_decodes_the_same_however_it_arrives(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            sizes in proptest::collection::vec(1usize..300, 1..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            extension in any::<bool>(),
            trailers in any::<bool>(),
        ) {
            let mut wire = chunked(&body, &sizes, extension, trailers);
            wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let (got, left) = decode_in_pieces(Decoder::Chunked(Chunk::Size), &wire, &cuts).unwrap();
            prop_assert_eq!(got, body);
            // The next response's bytes are not the body's.
            prop_assert_eq!(left, b"HTTP/1.1 200 OK\r\n".to_vec());
        }

        #[test]
        fn a_length_body_stops_at_its_length(
            body in proptest::collection::vec(any::<u8>(), 1..600),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let wire = [&body[..], b"NEXT"].concat();
            let (got, left) = decode_in_pieces(Decoder::Length(body.len() as u64), &wire, &cuts).unwrap();
            prop_assert_eq!(got, body);
            prop_assert_eq!(left, b"NEXT".to_vec());
        }
    }

    #[test]
    fn malformed_chunks_are_errors_not_guesses() {
        for wire in [
            &b"zz\r\nabc\r\n0\r\n\r\n"[..],
            b"3\r\nabcX0\r\n\r\n",
            b"3 junk\r\nabc\r\n0\r\n\r\n",
            b"FFFFFFFFFFFFFFFFF\r\n",
            &[b'1'; MAX_LINE_BYTES + 2][..],
        ] {
            let got = decode_in_pieces(Decoder::Chunked(Chunk::Size), wire, &[]);
            assert!(
                matches!(got, Err(Http1Error::Invalid(_))),
                "{:?}: {got:?}",
                String::from_utf8_lossy(&wire[..wire.len().min(20)])
            );
        }
    }

    /// What the test server does with the next request.
    #[derive(Clone, Copy)]
    enum Answer {
        Reply(&'static [u8]),
        ReplyAndClose(&'static [u8]),
        /// Closes the connection without a word.
        Close,
    }
    use Answer::{Close, Reply, ReplyAndClose};

    /// A server on loopback that answers each request, on whichever connection, with the
    /// next of `answers` (then closes); returns its address, the number of connections
    /// accepted and the requests as received.
    async fn server(
        answers: Vec<Answer>,
    ) -> (
        String,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<Mutex<Vec<Vec<u8>>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let (acc, reqs) = (Arc::clone(&accepted), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let (answers, reqs) = (Arc::clone(&answers), Arc::clone(&reqs));
                tokio::spawn(async move {
                    loop {
                        let mut req = Vec::new();
                        let mut byte = [0u8; 1];
                        while !req.ends_with(b"\r\n\r\n") {
                            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            req.push(byte[0]);
                        }
                        let text = String::from_utf8_lossy(&req).to_lowercase();
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |n| n.trim().parse().unwrap());
                        let mut body = vec![0u8; len];
                        s.read_exact(&mut body).await.unwrap();
                        req.extend_from_slice(&body);
                        reqs.lock().push(req);
                        let answer = answers.lock().pop_front().unwrap_or(Close);
                        match answer {
                            Reply(a) => s.write_all(a).await.unwrap(),
                            ReplyAndClose(a) => return s.write_all(a).await.unwrap(),
                            Close => return,
                        }
                    }
                });
            }
        });
        (addr, accepted, requests)
    }

    fn post(addr: &str, body: &'static str) -> Request<Bytes> {
        Request::post(format!("http://{addr}/v1/chat/completions?x=1"))
            .header("authorization", "Bearer k")
            .body(Bytes::from_static(body.as_bytes()))
            .unwrap()
    }

    async fn text(response: Response<Http1Body>) -> Result<String, Http1Error> {
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn requests_go_out_as_http11_and_share_one_kept_alive_connection() {
        let (addr, accepted, requests) = server(vec![
            Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello"),
            Reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"),
        ])
        .await;
        let client = Http1Client::new(Duration::from_secs(1));
        let first = client.request(post(&addr, "{\"a\":1}")).await.unwrap();
        assert_eq!(first.status(), 200);
        assert_eq!(first.headers()["x-a"], "1");
        assert!(first.extensions().get::<ConnTiming>().is_some());
        assert_eq!(text(first).await.unwrap(), "hello");
        assert_eq!(client.idle_count(), 1);
        let second = client.request(post(&addr, "{}")).await.unwrap();
        assert_eq!(second.status(), 201);
        assert_eq!(text(second).await.unwrap(), "abcde");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(client.idle_count(), 1);
        let sent = String::from_utf8(requests.lock()[0].clone()).unwrap();
        assert_eq!(
            sent,
            format!(
                "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer k\r\ncontent-length: 7\r\n\r\n{{\"a\":1}}"
            )
        );
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_not_used() {
        let (addr, accepted, requests) = server(vec![
            ReplyAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
            Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
        ])
        .await;
        let client = Http1Client::new(Duration::from_secs(1));
        let a = client.request(post(&addr, "")).await.unwrap();
        assert_eq!(text(a).await.unwrap(), "a");
        assert_eq!(client.idle_count(), 1);
        // The server's FIN arrives while the connection idles.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = client.request(post(&addr, "")).await.unwrap();
        assert_eq!(text(b).await.unwrap(), "b");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(requests.lock().len(), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_instead_of_answered_is_an_error() {
        let (addr, ..) = server(vec![
            Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
            Close,
        ])
        .await;
        let client = Http1Client::new(Duration::from_secs(1));
        let a = client.request(post(&addr, "")).await.unwrap();
        assert_eq!(text(a).await.unwrap(), "a");
        let closed = client.request(post(&addr, "")).await;
        assert!(
            matches!(closed, Err(Http1Error::ClosedBeforeHead)),
            "{closed:?}"
        );
        assert!(!closed.unwrap_err().is_connect());
    }

    #[tokio::test]
    async fn bodies_that_end_with_the_connection_or_ask_to_close_it_are_not_pooled() {
        let client = Http1Client::new(Duration::from_secs(1));
        let (addr, ..) = server(vec![Reply(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        )])
        .await;
        let r = client.request(post(&addr, "")).await.unwrap();
        assert_eq!(text(r).await.unwrap(), "ok");
        assert_eq!(client.idle_count(), 0);

        let (addr, ..) = server(vec![ReplyAndClose(b"HTTP/1.0 200 OK\r\n\r\nuntil close")]).await;
        let r = client.request(post(&addr, "")).await.unwrap();
        assert_eq!(r.version(), Version::HTTP_10);
        assert_eq!(text(r).await.unwrap(), "until close");
        assert_eq!(client.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted, _) = server(vec![
            Reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"),
            Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nz"),
        ])
        .await;
        let client = Http1Client::new(Duration::from_secs(1));
        let mut body = client.request(post(&addr, "")).await.unwrap().into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        // Waiting for the next chunk, the stream holds no read buffer.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        assert_eq!(body.buf.capacity(), 0);
        drop(body);
        assert_eq!(client.idle_count(), 0);
        let r = client.request(post(&addr, "")).await.unwrap();
        assert_eq!(text(r).await.unwrap(), "z");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn broken_answers_are_named_errors() {
        let client = Http1Client::new(Duration::from_secs(1));
        let big: &'static [u8] = Box::leak(
            [
                &b"HTTP/1.1 200 OK\r\n"[..],
                &b"x-big: "[..],
                &vec![b'a'; MAX_HEAD_BYTES],
                b"\r\n\r\n",
            ]
            .concat()
            .into_boxed_slice(),
        );
        type Is = fn(&Http1Error) -> bool;
        let cases: Vec<(&'static [u8], Is)> = vec![
            (big, |e| matches!(e, Http1Error::HeadTooLarge)),
            (b"NOT HTTP\r\n\r\n", |e| matches!(e, Http1Error::Invalid(_))),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n", |e| {
                matches!(e, Http1Error::Invalid(_))
            }),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", |e| {
                matches!(e, Http1Error::Invalid(_))
            }),
        ];
        for (answer, is) in cases {
            let (addr, ..) = server(vec![ReplyAndClose(answer)]).await;
            let got = client.request(post(&addr, "")).await;
            assert!(got.as_ref().is_err_and(is), "{got:?}");
        }
        // The body is cut short.
        let (addr, ..) = server(vec![ReplyAndClose(
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
        )])
        .await;
        let r = client.request(post(&addr, "")).await.unwrap();
        let got = text(r).await;
        assert!(matches!(got, Err(Http1Error::ClosedInBody)), "{got:?}");
        // Nothing listens.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let got = client.request(post(&format!("127.0.0.1:{port}"), "")).await;
        assert!(got.as_ref().is_err_and(Http1Error::is_connect), "{got:?}");
        assert!(
            got.unwrap_err()
                .to_string()
                .contains(&format!("127.0.0.1:{port}"))
        );
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_its_limit_and_closes_what_idled_too_long() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let authority: Authority = addr.to_string().parse().unwrap();
        let client = Http1Client::new(Duration::from_secs(1));
        let mut peers = Vec::new();
        for _ in 0..MAX_IDLE_PER_HOST + 2 {
            let io = TimedTcp::new(TcpStream::connect(addr).await.unwrap());
            peers.push(listener.accept().await.unwrap().0);
            client.pool.checkin(authority.clone(), io);
        }
        assert_eq!(client.idle_count(), MAX_IDLE_PER_HOST);
        // Not yet expired: nothing closes.
        client.pool.close_expired(Instant::now());
        assert_eq!(client.idle_count(), MAX_IDLE_PER_HOST);
        // Idle for IDLE_TIMEOUT: the reaper closes them all and forgets the host...
        client.pool.close_expired(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(client.idle_count(), 0);
        assert!(client.pool.idle.lock().is_empty());
        // ...and the peers see them closed: the two over the limit first, then the rest.
        for mut peer in peers {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(1), peer.read(&mut byte)).await;
            assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        }
        // A connection too old to take out is closed on checkout instead.
        let io = TimedTcp::new(TcpStream::connect(addr).await.unwrap());
        let (mut peer, _) = listener.accept().await.unwrap();
        let old = Instant::now()
            .checked_sub(IDLE_TIMEOUT)
            .unwrap_or_else(Instant::now);
        client
            .pool
            .idle
            .lock()
            .entry(authority.clone())
            .or_default()
            .push_back(Idle { io, since: old });
        assert!(client.checkout(&authority).is_none());
        assert!(matches!(peer.read(&mut [0u8; 1]).await, Ok(0)));
    }

    #[test]
    fn empty_bodies_are_known_from_the_head() {
        let head = |status: u16, headers: &[(&'static str, &'static str)]| Head {
            status: StatusCode::from_u16(status).unwrap(),
            version: Version::HTTP_11,
            headers: headers
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .collect(),
        };
        let d = |m: Method, h: &Head| Decoder::for_response(&m, h).unwrap();
        assert_eq!(
            d(Method::HEAD, &head(200, &[("content-length", "9")])),
            Decoder::Done
        );
        assert_eq!(d(Method::POST, &head(204, &[])), Decoder::Done);
        assert_eq!(
            d(Method::POST, &head(200, &[("content-length", "0")])),
            Decoder::Done
        );
        assert_eq!(
            d(
                Method::POST,
                &head(
                    200,
                    &[
                        ("transfer-encoding", "gzip, chunked"),
                        ("content-length", "3")
                    ]
                )
            ),
            Decoder::Chunked(Chunk::Size)
        );
        assert_eq!(
            d(Method::POST, &head(200, &[("transfer-encoding", "gzip")])),
            Decoder::UntilClose
        );
        assert_eq!(d(Method::POST, &head(200, &[])), Decoder::UntilClose);
        assert!(!keeps_alive(&head(
            200,
            &[("connection", "Keep-Alive, close")]
        )));
        assert!(keeps_alive(&head(200, &[("connection", "keep-alive")])));
    }
}
