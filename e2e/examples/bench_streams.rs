//! `make bench-scale` (through scripts/bench_streams.py; not in CI): the load driver of the
//! "Many streams" and "Big configs" measurements.
//!
//! `--mode stream` opens `--streams` streaming chat completions at `--open-per-second`
//! and holds them all open at once (the upstream paces its tokens), over HTTP/1.1 (one
//! connection per stream, `--conns 0`) or HTTP/2 (`--conns` connections, streams spread
//! over them). Per stream it records the time to the first body byte (TTFT, from sending
//! the request) and how late each later chunk is against the upstream's schedule
//! (`--period-ms` between tokens): `(t_j - t_0) - j * period`. It prints `ALL_OPEN` once
//! every stream has its first chunk and none has ended (the caller samples memory then),
//! and a JSON summary last.
//!
//! `--mode request` sends non-streaming requests from `--conns` keep-alive HTTP/1.1
//! connections for `--seconds`, cycling through the keys of `--keys-file` (key `k` always
//! with model `k mod n` of `--models`), and prints throughput and latency percentiles.
//!
//! Errors are counted, never retried: a status other than 200, a broken connection, a
//! stream without its `[DONE]`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Stream,
    Request,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "stream")]
    mode: Mode,
    /// `host:port` of the target (the gateway or the upstream directly).
    #[arg(long)]
    addr: String,
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// The API key (one for every request) ...
    #[arg(long, default_value = "pk-bench")]
    key: String,
    /// ... or one key per line, used in turn.
    #[arg(long)]
    keys_file: Option<std::path::PathBuf>,
    /// Model names, comma-separated, used in turn.
    #[arg(long, default_value = "slow")]
    models: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Streams: how many, all open at once.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Streams: 0 = HTTP/1.1, a connection per stream; N = HTTP/2 over N connections.
    /// Requests: keep-alive HTTP/1.1 connections.
    #[arg(long, default_value_t = 0)]
    conns: usize,
    /// Streams: new streams per second.
    #[arg(long, default_value_t = 1000.0)]
    open_per_second: f64,
    /// Streams: at most this many streams waiting for their first chunk at once (0 = no
    /// bound). With a bound the driver measures latency, not queueing.
    #[arg(long, default_value_t = 0)]
    max_pending: usize,
    /// Streams: the upstream's time between tokens, for the chunk lag.
    #[arg(long, default_value_t = 1000.0)]
    period_ms: f64,
    /// Requests: how long.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Give up on a stream (an error) after this long.
    #[arg(long, default_value_t = 300.0)]
    timeout_seconds: f64,
}

#[derive(Default)]
struct Samples {
    ttft_ms: Vec<f64>,
    lag_ms: Vec<f64>,
    errors: Vec<String>,
    completed: usize,
}

fn body_of(model: &str, stream: bool, max_tokens: u32) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": model,
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Tell me something, slowly"}],
        })
        .to_string(),
    )
}

fn request(args: &Args, key: &str, body: Bytes) -> anyhow::Result<http::Request<Full<Bytes>>> {
    Ok(http::Request::builder()
        .method("POST")
        .uri(&args.path)
        .header("host", &args.addr)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(body))?)
}

async fn connect(addr: &str) -> anyhow::Result<TokioIo<TcpStream>> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(TokioIo::new(s))
}

enum Sender {
    H1,
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One stream: `(ttft, chunk lags)`.
async fn one_stream(
    args: &Args,
    sender: &Sender,
    req: http::Request<Full<Bytes>>,
    open: &AtomicUsize,
    first: &tokio::sync::Semaphore,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let permit = first.acquire().await?;
    let start = Instant::now();
    let resp = match sender {
        Sender::H1 => {
            let io = connect(&args.addr).await?;
            let (mut tx, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            tx.ready().await?;
            tx.send_request(req).await?
        }
        Sender::H2(tx) => {
            let mut tx = tx.clone();
            tx.ready().await?;
            tx.send_request(req).await?
        }
    };
    if resp.status() != http::StatusCode::OK {
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        bail!("status {status}: {}", String::from_utf8_lossy(&body));
    }
    let mut body = resp.into_body();
    let mut t0 = None;
    let mut lags = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    let mut j = 0.0;
    let mut counted = false;
    let result = loop {
        let Some(frame) = body.frame().await else {
            break Ok(());
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => break Err(anyhow::anyhow!("body: {e}")),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let now = Instant::now();
        match t0 {
            None => {
                t0 = Some(now);
                open.fetch_add(1, Ordering::SeqCst);
                counted = true;
            }
            Some(t) => {
                j += 1.0;
                lags.push((now - t).as_secs_f64() * 1e3 - j * args.period_ms);
            }
        }
        tail.extend_from_slice(&data);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
    };
    drop(permit);
    if counted {
        open.fetch_sub(1, Ordering::SeqCst);
    }
    result?;
    let Some(t0) = t0 else {
        bail!("empty stream");
    };
    if !tail.windows(6).any(|w| w == b"[DONE]") {
        bail!("stream ended without [DONE]");
    }
    // The first chunk is not a lag sample: its time is the TTFT.
    Ok(((t0 - start).as_secs_f64() * 1e3, lags))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn summary(v: &mut [f64]) -> serde_json::Value {
    let mean = if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    serde_json::json!({
        "n": v.len(),
        "mean": mean,
        "p50": pct(v, 0.50),
        "p90": pct(v, 0.90),
        "p99": pct(v, 0.99),
        "max": pct(v, 1.0),
    })
}

async fn streams(args: Arc<Args>) -> anyhow::Result<serde_json::Value> {
    let models: Vec<Bytes> = args
        .models
        .split(',')
        .map(|m| body_of(m, true, args.max_tokens))
        .collect();
    let mut senders = Vec::new();
    if args.conns == 0 {
        senders.push(Arc::new(Sender::H1));
    } else {
        for _ in 0..args.conns {
            let io = connect(&args.addr).await?;
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(256 * 1024)
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            senders.push(Arc::new(Sender::H2(tx)));
        }
    }
    let open = Arc::new(AtomicUsize::new(0));
    let all_open = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let pending = if args.max_pending == 0 {
        tokio::sync::Semaphore::MAX_PERMITS
    } else {
        args.max_pending
    };
    let first = Arc::new(tokio::sync::Semaphore::new(pending));
    // Reports ALL_OPEN the moment every stream is open at once.
    let watcher = {
        let open = Arc::clone(&open);
        let all_open = Arc::clone(&all_open);
        let n = args.streams;
        tokio::spawn(async move {
            let mut peak = 0;
            loop {
                let now = open.load(Ordering::SeqCst);
                peak = peak.max(now);
                if now >= n && !all_open.swap(true, Ordering::SeqCst) {
                    println!("ALL_OPEN {now}");
                    let _ = std::io::stdout().flush();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                if all_open.load(Ordering::SeqCst) && now == 0 {
                    return peak;
                }
            }
        })
    };
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / args.open_per_second.max(0.001));
    let mut tasks = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(gap);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..args.streams {
        ticker.tick().await;
        let args = Arc::clone(&args);
        let sender = Arc::clone(&senders[i % senders.len()]);
        let body = models[i % models.len()].clone();
        let open = Arc::clone(&open);
        let first = Arc::clone(&first);
        let samples = Arc::clone(&samples);
        tasks.spawn(async move {
            let r = match request(&args, &args.key, body) {
                Ok(req) => {
                    let limit = Duration::from_secs_f64(args.timeout_seconds);
                    match tokio::time::timeout(
                        limit,
                        one_stream(&args, &sender, req, &open, &first),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(anyhow::anyhow!("timed out")),
                    }
                }
                Err(e) => Err(e),
            };
            let mut s = samples.lock().await;
            match r {
                Ok((ttft, lags)) => {
                    s.ttft_ms.push(ttft);
                    s.lag_ms.extend(lags);
                    s.completed += 1;
                }
                Err(e) => s.errors.push(format!("{e:#}")),
            }
        });
    }
    let opened_in = started.elapsed().as_secs_f64();
    while tasks.join_next().await.is_some() {}
    all_open.store(true, Ordering::SeqCst);
    let peak = watcher.await.unwrap_or(0);
    let mut s = samples.lock().await;
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for e in &s.errors {
        let k: String = e.chars().take(120).collect();
        *kinds.entry(k).or_default() += 1;
    }
    let (ttft, lag) = {
        let s = &mut *s;
        (summary(&mut s.ttft_ms), summary(&mut s.lag_ms))
    };
    Ok(serde_json::json!({
        "streams": args.streams,
        "completed": s.completed,
        "errors": s.errors.len(),
        "error_kinds": kinds,
        "peak_open": peak,
        "opened_in_s": opened_in,
        "total_s": started.elapsed().as_secs_f64(),
        "ttft_ms": ttft,
        "chunk_lag_ms": lag,
    }))
}

async fn requests(args: Arc<Args>) -> anyhow::Result<serde_json::Value> {
    let keys: Vec<String> = match &args.keys_file {
        Some(p) => std::fs::read_to_string(p)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => vec![args.key.clone()],
    };
    let bodies: Vec<Bytes> = args
        .models
        .split(',')
        .map(|m| body_of(m, false, args.max_tokens))
        .collect();
    let keys = Arc::new(keys);
    let bodies = Arc::new(bodies);
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..args.conns.max(1) {
        let args = Arc::clone(&args);
        let keys = Arc::clone(&keys);
        let bodies = Arc::clone(&bodies);
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let io = connect(&args.addr).await?;
            let (mut tx, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            // Connections start at different places of the key and model lists.
            let mut i = c * 7919;
            while Instant::now() < deadline {
                // Each key sticks to one model (as a tenant's app would): the metrics get
                // one series per key, not one per key and model.
                let k = i % keys.len();
                let key = &keys[k];
                let body = bodies[k % bodies.len()].clone();
                i += 1;
                let req = request(&args, key, body)?;
                let t = Instant::now();
                tx.ready().await?;
                let resp = tx.send_request(req).await?;
                let ok = resp.status() == http::StatusCode::OK;
                resp.into_body().collect().await?;
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((lat, errors))
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r??;
        lat.extend(l);
        errors += e;
    }
    let n = lat.len();
    Ok(serde_json::json!({
        "ok": n,
        "errors": errors,
        "rps": n as f64 / args.seconds,
        "latency_ms": summary(&mut lat),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match args.mode {
            Mode::Stream => streams(Arc::clone(&args)).await,
            Mode::Request => requests(Arc::clone(&args)).await,
        }
    })?;
    println!("{out}");
    Ok(())
}
