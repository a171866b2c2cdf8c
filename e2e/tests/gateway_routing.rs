//! The gateway library in process in front of in-process mocks: routing, retries,
//! fallbacks and breakers, checked with the mocks' counters. (The Python suite in
//! `e2e/python` drives the real binaries with the official SDKs.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use parley_e2e::mock_llm::{MockConfig, MockHandle, spawn};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const KEY: &str = "sk-routing-test";

struct Gateway {
    url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: std::path::PathBuf,
}

impl Gateway {
    async fn start(yaml_models: &str) -> Gateway {
        let dir = std::env::temp_dir().join(format!(
            "parley-gw-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yaml");
        let text = format!(
            "apiVersion: parley.dev/gateway/v1\nlisten: 127.0.0.1:0\nadminListen: 127.0.0.1:0\ndefaultModel: gpt-4o\nmodels:\n{yaml_models}tenants:\n- {{id: t/a, apiKeys: [{{value: {KEY}}}]}}\n"
        );
        std::fs::write(&path, text).unwrap();
        let state = parley_gateway::init(path).unwrap_or_else(|p| panic!("{p:?}"));
        let chat = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", chat.local_addr().unwrap());
        let stop = CancellationToken::new();
        let opts = parley_gateway::ServeOptions {
            drain: Duration::from_secs(2),
            poll: Duration::from_secs(60),
        };
        let task = tokio::spawn(parley_gateway::run(
            Arc::clone(&state),
            chat,
            admin,
            stop.clone(),
            opts,
        ));
        Gateway {
            url,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn chat(&self, model: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(KEY)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap())
    }

    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn backend(mock: &MockHandle, name: &str, provider: &str) -> String {
    format!(
        "  - {{name: {name}, provider: {provider}, baseUrl: \"{}\", apiKey: {{value: up}}}}\n",
        mock.openai_base_url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_then_falls_back_then_opens_the_breaker() {
    let primary = spawn(MockConfig::default()).await.unwrap();
    let backup = spawn(MockConfig::default()).await.unwrap();
    let models = format!(
        "- name: gpt-4o\n  fallbacks: [backup]\n  retry: {{maxAttempts: 2, initialBackoffMs: 5, maxBackoffMs: 10}}\n  circuitBreaker: {{failureThreshold: 4, openSeconds: 60}}\n  backends:\n{}- name: backup\n  backends:\n{}",
        backend(&primary, "p", "openai"),
        backend(&backup, "b", "anthropic"),
    );
    let gw = Gateway::start(&models).await;

    // One 500, then success: retried on the same model.
    primary
        .update(|c| *c = c.clone().fail_first(1, 500))
        .unwrap();
    let (status, headers, body) = gw.chat("gpt-4o").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-parley-model"], "gpt-4o");
    assert_eq!(primary.stats().requests_total, 2);

    // Always 500: two attempts, then the (Anthropic) fallback serves, translated.
    primary.update(|c| *c = c.clone().failing(500)).unwrap();
    let (status, headers, body) = gw.chat("gpt-4o").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-parley-model"], "backup");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(primary.stats().requests_total, 4);
    assert_eq!(backup.stats().requests_total, 1);

    // failureThreshold (4) consecutive failures since the last success: 2 so far; this
    // request adds two more and the breaker opens.
    let (_, headers, _) = gw.chat("gpt-4o").await;
    assert_eq!(headers["x-parley-model"], "backup");
    assert_eq!(primary.stats().requests_total, 6);
    // The breaker is open now: the primary gets nothing.
    for _ in 0..3 {
        let (status, headers, _) = gw.chat("gpt-4o").await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-parley-model"], "backup");
    }
    assert_eq!(primary.stats().requests_total, 6);

    // A 400 from upstream is passed through and never retried.
    backup.update(|c| *c = c.clone().failing(400)).unwrap();
    let (status, _, body) = gw.chat("backup").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(backup.stats().requests_total, 6);
    gw.shutdown().await;
}
