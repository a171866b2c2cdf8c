//! Against a real Redis: 127.0.0.1:6379 (`scripts/services.sh` starts it) or
//! `PARLEY_TEST_REDIS_URL`. Every test uses its own key prefix.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::sessions::trim;
use parley_crds::gateway_config::{ModelQuotaConfig, RateLimitConfig};
use serde_json::json;
use std::time::Instant;

fn url() -> String {
    std::env::var("PARLEY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis_at(url: &str) -> Redis {
    let prefix = format!("parley:test:{:016x}:", fastrand::u64(..));
    Redis::connect(url, &prefix, "ns/cb", Arc::new(Metrics::new())).unwrap()
}

async fn redis() -> Redis {
    let r = redis_at(&url());
    let mut conn = r.conn.clone();
    let pong: Result<String, _> = tokio::time::timeout(
        Duration::from_secs(2),
        redis::cmd("PING").query_async(&mut conn),
    )
    .await
    .expect("Redis did not answer within 2 s");
    assert_eq!(
        pong.expect("no Redis: run scripts/services.sh or set PARLEY_TEST_REDIS_URL"),
        "PONG"
    );
    r
}

fn req<'a>(rl: &'a RateLimitConfig, tokens: u64) -> LimitRequest<'a> {
    LimitRequest {
        tenant: "ns/t",
        rate_limit: Some(rl),
        quota: None,
        model: "m",
        session: None,
        tokens,
        budget_micros: None,
        cost_micros: 0,
    }
}

#[tokio::test]
async fn sliding_window_admits_exactly_n_in_any_window() {
    // A "minute" of 600 ms: the script takes the window length as a parameter.
    let r = redis().await.with_minute_ms(600);
    let rl = RateLimitConfig {
        requests_per_minute: Some(5),
        ..Default::default()
    };
    let mut admitted = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        if let Ok(Some(res)) = r.admit(&req(&rl, 0), FailureMode::Closed).await {
            admitted.push(res.admitted_at_ms());
        }
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    // Redis's own timestamps: any N + 1 consecutive admissions span at least a window.
    assert!(admitted.len() >= 10, "{admitted:?}");
    for w in admitted.windows(6) {
        assert!(w[5] - w[0] >= 600, "6 admitted within one window: {w:?}");
    }
    // And it is a sliding window, not a refilling bucket: the first five pass at once,
    // then nothing until the first leaves the window.
    assert!(admitted[4] - admitted[0] < 100, "{admitted:?}");
    assert!(admitted[5] - admitted[0] >= 600, "{admitted:?}");
}

#[tokio::test]
async fn retry_after_is_whole_seconds_until_it_could_pass() {
    let r = redis().await;
    let rl = RateLimitConfig {
        requests_per_minute: Some(2),
        ..Default::default()
    };
    r.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
    r.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
    let e = r
        .admit(&req(&rl, 0), FailureMode::Closed)
        .await
        .unwrap_err();
    assert_eq!(e.kind, RefusalKind::Rate);
    assert!((59..=60).contains(&e.retry_after), "{e:?}");
    assert!(e.message.contains("requestsPerMinute (2)"), "{}", e.message);
    assert_eq!((e.limit, e.unit), (2, "requests"));
    // Hour limits: sixty sub-windows of a minute.
    let rl = RateLimitConfig {
        requests_per_hour: Some(1),
        ..Default::default()
    };
    let mut q = req(&rl, 0);
    q.tenant = "ns/hourly";
    r.admit(&q, FailureMode::Closed).await.unwrap();
    let e = r.admit(&q, FailureMode::Closed).await.unwrap_err();
    assert!((3540..=3600).contains(&e.retry_after), "{e:?}");
}

#[tokio::test]
async fn tokens_are_reserved_then_settled_to_real_usage() {
    let r = redis().await;
    let rl = RateLimitConfig {
        tokens_per_minute: Some(100),
        requests_per_minute: Some(100),
        ..Default::default()
    };
    let res = r
        .admit(&req(&rl, 90), FailureMode::Closed)
        .await
        .unwrap()
        .unwrap();
    let e = r
        .admit(&req(&rl, 20), FailureMode::Closed)
        .await
        .unwrap_err();
    assert_eq!(e.unit, "tokens");
    assert!(e.message.contains("tokensPerMinute"), "{}", e.message);
    assert!((1..=61).contains(&e.retry_after), "{e:?}");
    // More than the whole limit can never pass: wait a full window.
    let e = r
        .admit(&req(&rl, 500), FailureMode::Closed)
        .await
        .unwrap_err();
    assert_eq!(e.retry_after, 61);
    r.settle(res, 10, 0).await;
    r.admit(&req(&rl, 20), FailureMode::Closed).await.unwrap();
    // A model quota is its own scope.
    let q = ModelQuotaConfig {
        model: "m".into(),
        requests_per_minute: Some(1),
        tokens_per_minute: Some(50),
    };
    let mut m = req(&rl, 40);
    m.quota = Some(&q);
    m.tenant = "ns/q";
    r.admit(&m, FailureMode::Closed).await.unwrap();
    let e = r.admit(&m, FailureMode::Closed).await.unwrap_err();
    assert!(e.message.contains("model quota"), "{}", e.message);
    // Sessions: per tenant and session id; a refused request counts nowhere.
    let mut s = req(&rl, 0);
    s.tenant = "ns/s";
    s.session = Some(("s1", 1));
    r.admit(&s, FailureMode::Closed).await.unwrap();
    let e = r.admit(&s, FailureMode::Closed).await.unwrap_err();
    assert!(e.message.contains("session"), "{}", e.message);
    s.session = Some(("s2", 1));
    r.admit(&s, FailureMode::Closed).await.unwrap();
    s.tenant = "ns/s-other";
    s.session = Some(("s1", 1));
    r.admit(&s, FailureMode::Closed).await.unwrap();
    let mut conn = r.conn.clone();
    let count: u64 = redis::cmd("ZCARD")
        .arg(r.tenant_key("ns/s", "rpm"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 2, "the refused session request was not counted");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(r.tenant_key("ns/s", "rpm"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 61_000, "keys expire: {ttl}");
}

#[tokio::test]
async fn token_slots_free_as_they_leave_the_window() {
    // A "minute" of 600 ms: 1-slot = 10 ms, 61 slots.
    let r = redis().await.with_minute_ms(600);
    let rl = RateLimitConfig {
        tokens_per_minute: Some(100),
        ..Default::default()
    };
    let t0 = Instant::now();
    let first = r
        .admit(&req(&rl, 60), FailureMode::Closed)
        .await
        .unwrap()
        .unwrap();
    assert!(r.admit(&req(&rl, 50), FailureMode::Closed).await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.admit(&req(&rl, 40), FailureMode::Closed).await.unwrap();
    assert!(r.admit(&req(&rl, 1), FailureMode::Closed).await.is_err());
    // Once the first request's slot has left the window, its 60 tokens are free.
    let left = Duration::from_millis(620).saturating_sub(t0.elapsed());
    tokio::time::sleep(left).await;
    r.admit(&req(&rl, 50), FailureMode::Closed).await.unwrap();
    // Settling a reservation whose slot has left changes nothing.
    r.settle(first, 0, 0).await;
    assert!(r.admit(&req(&rl, 11), FailureMode::Closed).await.is_err());
    // After a long idle time everything is free again.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    r.admit(&req(&rl, 100), FailureMode::Closed).await.unwrap();
    // The running sum matches the sub-windows.
    let mut conn = r.conn.clone();
    let h: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(r.tenant_key("ns/t", "tpm"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let slots: i64 = h
        .iter()
        .filter(|(k, _)| k.parse::<u64>().is_ok())
        .map(|(_, v)| v)
        .sum();
    assert_eq!(h["s"], slots, "{h:?}");
    assert_eq!(slots, 100, "{h:?}");
}

#[tokio::test]
async fn a_limit_moved_across_the_exact_log_bound_keeps_working() {
    let r = redis().await;
    for n in [5, 20_000, 5] {
        let rl = RateLimitConfig {
            requests_per_minute: Some(n),
            ..Default::default()
        };
        r.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
    }
    assert_eq!(
        r.metrics
            .redis_errors
            .get_or_create(&OpLabel { op: "admit" })
            .get(),
        0
    );
}

#[tokio::test]
async fn budget_is_reserved_per_month_and_settled() {
    let r = redis().await;
    let none = RateLimitConfig::default();
    let mut q = req(&none, 0);
    q.rate_limit = None;
    q.budget_micros = Some(1_000);
    q.cost_micros = 600;
    let res = r.admit(&q, FailureMode::Closed).await.unwrap().unwrap();
    let e = r.admit(&q, FailureMode::Closed).await.unwrap_err();
    assert_eq!(e.kind, RefusalKind::Budget);
    assert!(e.message.contains("0.001"), "{}", e.message);
    assert!(e.retry_after <= 31 * 86_400 && e.retry_after >= 1);
    let month = res.month;
    assert_eq!(i64::from(crate::limits::current_month()), month);
    r.settle(res, 0, 100).await;
    assert_eq!(r.spent("ns/t", month).await, Some(100));
    r.admit(&q, FailureMode::Closed).await.unwrap();
    assert_eq!(r.spent("ns/t", month).await, Some(700));
}

#[tokio::test]
async fn replicas_share_one_limit_under_concurrency() {
    let a = Arc::new(redis().await);
    // A second client (another replica) on the same keys.
    let b = Arc::new(Redis {
        prefix: a.prefix.clone(),
        ..redis_at(&url())
    });
    let rl = RateLimitConfig {
        requests_per_minute: Some(7),
        ..Default::default()
    };
    let mut tasks = Vec::new();
    for i in 0..40 {
        let r = if i % 2 == 0 {
            Arc::clone(&a)
        } else {
            Arc::clone(&b)
        };
        tasks.push(tokio::spawn(async move {
            r.admit(&req(&rl, 0), FailureMode::Closed).await.is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    assert_eq!(ok, 7);
}

#[tokio::test]
async fn two_chatbots_share_no_keys() {
    let a = redis().await;
    let b = Redis {
        prefix: a.prefix.clone(),
        ..Redis::connect(&url(), "x", "ns/other-cb", Arc::new(Metrics::new())).unwrap()
    };
    let k = a.tenant_key("ns/t", "rpm");
    assert!(
        k.starts_with(&format!("{}{{ns/cb:ns/t}}:", a.prefix)),
        "{k}"
    );
    let rl = RateLimitConfig {
        requests_per_minute: Some(1),
        ..Default::default()
    };
    a.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
    assert!(a.admit(&req(&rl, 0), FailureMode::Closed).await.is_err());
    b.admit(&req(&rl, 0), FailureMode::Closed).await.unwrap();
    let ttl = Duration::from_secs(60);
    assert!(
        a.session_append(
            "ns/t",
            "s",
            &[json!({"role": "user", "content": "x"})],
            10,
            ttl
        )
        .await
    );
    assert!(b.session_load("ns/t", "s", ttl).await.unwrap().is_empty());
    let e = CachedEntry {
        model: "m".into(),
        backend: "b".into(),
        usage: Usage::default(),
        body: Bytes::from_static(b"{}"),
    };
    a.cache_put("ns/t", &[1; 32], &e, ttl).await;
    assert_eq!(b.cache_get("ns/t", &[1; 32]).await, None);
    assert_eq!(a.cache_get("ns/t", &[1; 32]).await, Some(e));
}

#[tokio::test]
async fn unreachable_redis_follows_the_failure_mode_quickly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = redis_at(&format!("redis://127.0.0.1:{port}"));
    let rl = RateLimitConfig {
        requests_per_minute: Some(1),
        ..Default::default()
    };
    let t = Instant::now();
    assert!(
        r.admit(&req(&rl, 0), FailureMode::Open)
            .await
            .unwrap()
            .is_none()
    );
    let e = r
        .admit(&req(&rl, 0), FailureMode::Closed)
        .await
        .unwrap_err();
    assert_eq!(e.kind, RefusalKind::Unavailable);
    assert!(e.message.contains("Redis"), "{}", e.message);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(
        r.metrics
            .encode()
            .contains("parley_redis_errors_total{op=\"admit\"} 2")
    );
}

#[tokio::test]
async fn sessions_trim_like_the_local_store_and_stay_per_tenant() {
    let r = redis().await;
    let ttl = Duration::from_secs(60);
    let msgs = [
        json!({"role": "user", "content": "a"}),
        json!({"role": "assistant", "tool_calls": [{"id": "1"}]}),
        json!({"role": "tool", "tool_call_id": "1", "content": "r"}),
        json!({"role": "tool", "tool_call_id": "2", "content": "r"}),
        json!({"role": "assistant", "content": "done"}),
        json!({"role": "user", "content": "b"}),
    ];
    for max in 1..=7 {
        let session = format!("s{max}");
        for chunk in msgs.chunks(2) {
            assert!(r.session_append("ns/a", &session, chunk, max, ttl).await);
        }
        let mut expected = Vec::new();
        for chunk in msgs.chunks(2) {
            expected.extend(chunk.iter().cloned());
            trim(&mut expected, max);
        }
        let got = r.session_load("ns/a", &session, ttl).await.unwrap();
        assert_eq!(got, expected, "max {max}");
    }
    assert!(r.session_load("ns/b", "s7", ttl).await.unwrap().is_empty());
}

#[tokio::test]
async fn cache_entries_round_trip_and_expire() {
    let r = redis().await;
    let e = CachedEntry {
        model: "m".into(),
        backend: "b".into(),
        usage: Usage {
            input: 3,
            output: 4,
        },
        body: Bytes::from_static(b"{\"x\":\n1}"),
    };
    let k = [7u8; 32];
    r.cache_put("ns/a", &k, &e, Duration::from_millis(300))
        .await;
    assert_eq!(r.cache_get("ns/a", &k).await, Some(e));
    assert_eq!(r.cache_get("ns/b", &k).await, None);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(r.cache_get("ns/a", &k).await, None);
}

#[test]
fn cluster_urls_name_seed_nodes_and_never_echo_the_password() {
    let Ok(Target::Cluster(nodes)) = parse_url("redis+cluster://:pw-s3cret@a:7000, b:7001/0")
    else {
        panic!("a cluster URL");
    };
    assert_eq!(
        nodes,
        ["redis://:pw-s3cret@a:7000", "redis://:pw-s3cret@b:7001"]
    );
    let Ok(Target::Cluster(nodes)) = parse_url("rediss+cluster://u:p@a:7000") else {
        panic!("a TLS cluster URL");
    };
    assert_eq!(nodes, ["rediss://u:p@a:7000"]);
    assert!(matches!(
        parse_url("redis://a:6379/2"),
        Ok(Target::Single(_))
    ));
    for bad in [
        "http://:pw-s3cret@a:1",
        "redis+cluster://:pw-s3cret@a:1/3",
        "redis+cluster://:pw-s3cret@a:1,,b:2",
        "redis+cluster://:pw-s3cret@",
    ] {
        let e = parse_url(bad).err().unwrap();
        assert!(e.starts_with("redis.url"), "{e}");
        assert!(!e.contains("pw-s3cret"), "{e}");
    }
}

#[tokio::test]
async fn one_batch_decides_its_admissions_in_order() {
    // Many admissions at once on one client: they share script calls, and exactly the
    // limit is admitted, for tokens as for requests.
    let r = Arc::new(redis().await);
    let rl = RateLimitConfig {
        requests_per_minute: Some(30),
        tokens_per_minute: Some(1_000),
        ..Default::default()
    };
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let r = Arc::clone(&r);
            tokio::spawn(async move {
                // Half of them reserve 40 tokens: 1 000 tokens are 25 of those.
                let tokens = if i % 2 == 0 { 40 } else { 1 };
                r.admit(&req(&rl, tokens), FailureMode::Closed)
                    .await
                    .is_ok()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 30);
}

/// The tenant's token sub-windows: (their running sum `s`, the sum of the sub-windows).
async fn token_sums(r: &Redis, tenant: &str) -> (i64, i64) {
    let mut conn = r.conn.clone();
    let h: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(r.tenant_key(tenant, "tpm"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let slots = h
        .iter()
        .filter(|(k, _)| k.parse::<u64>().is_ok())
        .map(|(_, v)| v)
        .sum();
    (h.get("s").copied().unwrap_or(0), slots)
}

fn pending_len(r: &Redis) -> usize {
    r.pending.inner.lock().unwrap().len
}

#[tokio::test]
async fn settles_ride_along_with_the_next_admission_of_their_tenant() {
    // A "minute" of 600 ms: token sub-windows of 10 ms.
    let r = Arc::new(redis().await.with_minute_ms(600));
    let rl = RateLimitConfig {
        tokens_per_minute: Some(100),
        ..Default::default()
    };
    let mut q = req(&rl, 90);
    q.budget_micros = Some(1_000);
    q.cost_micros = 600;
    let res = r.admit(&q, FailureMode::Closed).await.unwrap().unwrap();
    // Settled to 10 tokens and 100 micro-USD: pending until the next admission, which
    // applies it before deciding (70 + 20 fit only after it).
    r.settle_later(res, 10, 100);
    assert_eq!(pending_len(&r), 1);
    q.tokens = 20;
    q.cost_micros = 300;
    let second = r.admit(&q, FailureMode::Closed).await.unwrap().unwrap();
    assert_eq!(pending_len(&r), 0, "the settle went with the admission");
    assert_eq!(token_sums(&r, "ns/t").await, (30, 30));
    assert_eq!(r.spent("ns/t", second.month).await, Some(400));
    // A settle into an older sub-window of the window, and one whose sub-window has left
    // (it changes nothing). Never below zero.
    tokio::time::sleep(Duration::from_millis(30)).await;
    r.settle_later(second, 0, 0);
    q.tokens = 5;
    q.cost_micros = 0;
    let third = r.admit(&q, FailureMode::Closed).await.unwrap().unwrap();
    assert_eq!(token_sums(&r, "ns/t").await, (15, 15));
    assert_eq!(r.spent("ns/t", third.month).await, Some(100));
    let month = third.month;
    tokio::time::sleep(Duration::from_millis(700)).await;
    r.settle_later(third, 0, 0);
    r.admit(&q, FailureMode::Closed).await.unwrap().unwrap();
    assert_eq!(token_sums(&r, "ns/t").await, (5, 5));
    // Keys still expire.
    let mut conn = r.conn.clone();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(r.tenant_key("ns/t", "tpm"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 10 * 62 + 1000, "{ttl}");
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}:{month}", r.tenant_key("ns/t", "budget")))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 40 * 86_400 && ttl <= 72 * 86_400, "{ttl}");
}

#[tokio::test]
async fn settles_without_an_admission_are_sent_soon_and_when_the_client_goes() {
    let r = Arc::new(redis().await);
    let rl = RateLimitConfig {
        tokens_per_minute: Some(1_000),
        ..Default::default()
    };
    let mut q = req(&rl, 100);
    q.budget_micros = Some(10_000);
    q.cost_micros = 600;
    let a = r.admit(&q, FailureMode::Closed).await.unwrap().unwrap();
    let b = r.admit(&q, FailureMode::Closed).await.unwrap().unwrap();
    let month = a.month;
    r.settle_later(a, 40, 100);
    tokio::time::sleep(SETTLE_DELAY * 10).await;
    assert_eq!(pending_len(&r), 0);
    assert_eq!(r.spent("ns/t", month).await, Some(700));
    assert_eq!(token_sums(&r, "ns/t").await, (140, 140));
    // A reload drops the client: what is pending is still sent.
    let other = Redis {
        prefix: r.prefix.clone(),
        ..redis_at(&url())
    };
    r.settle_later(b, 60, 200);
    drop(r);
    tokio::time::sleep(SETTLE_DELAY * 10).await;
    assert_eq!(other.spent("ns/t", month).await, Some(300));
    assert_eq!(token_sums(&other, "ns/t").await, (100, 100));
}

#[tokio::test]
async fn a_batch_that_just_fits_is_admitted_whole_and_the_next_request_is_not() {
    let r = Arc::new(redis().await);
    let rl = RateLimitConfig {
        requests_per_minute: Some(20_000),
        tokens_per_minute: Some(100),
        ..Default::default()
    };
    for (budget, cost, tokens, fits) in [(None, 0, 10, 10), (Some(1_000), 200, 0, 5)] {
        let tenant = if budget.is_some() { "ns/b" } else { "ns/t" };
        let tasks: Vec<_> = (0..fits + 3)
            .map(|_| {
                let r = Arc::clone(&r);
                tokio::spawn(async move {
                    let mut q = req(&rl, tokens);
                    q.tenant = tenant;
                    q.budget_micros = budget;
                    q.cost_micros = cost;
                    r.admit(&q, FailureMode::Closed).await.is_ok()
                })
            })
            .collect();
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.unwrap());
        }
        assert_eq!(admitted, fits, "{tenant}");
    }
    assert_eq!(token_sums(&r, "ns/t").await, (100, 100));
    assert_eq!(
        r.spent("ns/b", i64::from(crate::limits::current_month()))
            .await,
        Some(1_000)
    );
}
