//! parley-mock-llm over real HTTP on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use clap::Parser;
use parley_e2e::mock_llm::{MockConfig, MockHandle, Stats, cli::Args, key_fingerprint, spawn};
use serde_json::{Value, json};

const KEY: &str = "sk-test-key";

async fn mock() -> MockHandle {
    spawn(MockConfig::default()).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn openai(m: &MockHandle, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", m.openai_base_url()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn anthropic(m: &MockHandle, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/messages", m.openai_base_url()))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Reads the whole body; `Err` carries what was read before the body failed.
async fn read_body(mut resp: reqwest::Response) -> Result<String, String> {
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            Ok(None) => return Ok(String::from_utf8(buf).unwrap()),
            Err(_) => return Err(String::from_utf8(buf).unwrap()),
        }
    }
}

/// SSE events as (event name, data).
fn sse(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (event, data)
        })
        .collect()
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

async fn wait_stats(m: &MockHandle, what: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let s = m.stats();
        if what(&s) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn openai_non_stream_shape_and_usage() {
    let m = mock().await;
    let resp = openai(
        &m,
        json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello to"}, {"type": "text", "text": "everyone"}]},
        ]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mock-name"], "parley-mock-llm");
    assert!(resp.headers().contains_key("x-request-id"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("Hello from parley-mock-llm:"),
        "{content}"
    );
    assert_eq!(words(content), 20);
    // "You are terse." + "Say hello to" + "everyone" = 3 + 3 + 1 words.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 20, "total_tokens": 27})
    );
    let s = m.stats();
    assert_eq!(s.prompt_tokens_total, 7);
    assert_eq!(s.completion_tokens_total, 20);
    assert_eq!(s.by_status["200"], 1);
}

#[tokio::test]
async fn openai_max_tokens_cut_and_reply_tokens() {
    let m = spawn(MockConfig {
        reply_tokens: 8,
        name: "alpha".into(),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let v: Value = openai(
        &m,
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from alpha: lorem ipsum"
    );
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // max_completion_tokens wins over max_tokens; a large limit does not cut.
    let v: Value = openai(
        &m,
        json!({"model": "m", "max_completion_tokens": 100, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn openai_stream_shape_and_usage() {
    let m = mock().await;
    for include_usage in [true, false] {
        let resp = openai(
            &m,
            json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 6,
                   "stream_options": {"include_usage": include_usage},
                   "messages": [{"role": "user", "content": "one two three"}]}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let body = read_body(resp).await.unwrap();
        let events = sse(&body);
        assert_eq!(events.last().unwrap().1, "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|(e, d)| {
                assert!(e.is_none());
                serde_json::from_str(d).unwrap()
            })
            .collect();
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["model"], "gpt-4o-mini");
            assert_eq!(c["id"], chunks[0]["id"]);
            assert_eq!(c.get("usage").is_some(), include_usage);
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let (usage_chunks, choice_chunks): (Vec<&Value>, Vec<&Value>) = chunks
            .iter()
            .partition(|c| c["choices"].as_array().unwrap().is_empty());
        let content: Vec<&str> = choice_chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .filter(|s| !s.is_empty())
            .collect();
        assert_eq!(content.len(), 6, "one token per delta");
        assert!(content.iter().all(|t| words(t) == 1));
        assert_eq!(
            content.concat(),
            "Hello from parley-mock-llm: lorem ipsum dolor"
        );
        let last = choice_chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        if include_usage {
            assert_eq!(usage_chunks.len(), 1);
            assert_eq!(
                usage_chunks[0]["usage"],
                json!({"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9})
            );
            // The usage chunk comes right before [DONE].
            assert!(
                chunks.last().unwrap()["choices"]
                    .as_array()
                    .unwrap()
                    .is_empty()
            );
        } else {
            assert!(usage_chunks.is_empty());
        }
    }
    let s = wait_stats(&m, |s| s.streams_completed == 2).await;
    assert_eq!(s.streams_started, 2);
    assert_eq!(s.streams_completed, 2);
    assert_eq!(s.completion_tokens_total, 12);
    assert_eq!(s.prompt_tokens_total, 6);
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}])
}

#[tokio::test]
async fn openai_tool_calls() {
    let m = mock().await;
    let ask = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let v: Value = openai(
        &m,
        json!({"model": "m", "tools": weather_tools(), "messages": ask}),
    )
    .await
    .json()
    .await
    .unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"location\":\"Paris\"}");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // Without tools, or with tool_choice none: plain text.
    let v: Value = openai(&m, json!({"model": "m", "messages": ask}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let v: Value = openai(
        &m,
        json!({"model": "m", "tools": weather_tools(), "tool_choice": "none", "messages": ask}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Streamed tool call.
    let body = read_body(
        openai(
            &m,
            json!({"model": "m", "stream": true, "tools": weather_tools(), "messages": ask}),
        )
        .await,
    )
    .await
    .unwrap();
    let events = sse(&body);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert_eq!(first["tool_calls"][0]["index"], 0);
    assert_eq!(first["tool_calls"][0]["function"]["name"], "get_weather");
    let args: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"location\":\"Paris\"}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );

    // The tool result comes back: the reply quotes it.
    let v: Value = openai(
        &m,
        json!({"model": "m", "tools": weather_tools(), "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 22 C"},
        ]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Tool result: Sunny, 22 C"
    );
    // 7 + 3 words of text; the assistant tool call counts nothing.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14})
    );
}

#[tokio::test]
async fn anthropic_non_stream_and_validation() {
    let m = mock().await;
    let resp = anthropic(
        &m,
        json!({"model": "claude-x", "max_tokens": 100, "system": "Be brief please",
               "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("request-id"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-x");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(words(v["content"][0]["text"].as_str().unwrap()), 20);
    assert_eq!(v["usage"], json!({"input_tokens": 5, "output_tokens": 20}));

    let v: Value = anthropic(
        &m,
        json!({"model": "c", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 4);
    assert_eq!(v["content"][0]["text"], "Hello from parley-mock-llm: lorem");

    // max_tokens is required, like the real API.
    let resp = anthropic(
        &m,
        json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );

    // A key is required, in x-api-key or Authorization.
    let resp = client()
        .post(format!("{}/v1/messages", m.url()))
        .json(&json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let resp = client()
        .post(format!("{}/v1/messages", m.url()))
        .bearer_auth("other-key")
        .json(&json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let s = m.stats();
    assert_eq!(
        s.api_keys_seen,
        vec![key_fingerprint(KEY), key_fingerprint("other-key")]
    );
    assert_eq!(s.by_status["400"], 1);
    assert_eq!(s.by_status["401"], 1);
}

#[tokio::test]
async fn anthropic_stream_event_sequence() {
    let m = mock().await;
    let body = read_body(
        anthropic(
            &m,
            json!({"model": "claude-x", "max_tokens": 3, "stream": true,
                   "messages": [{"role": "user", "content": "a b c d"}]}),
        )
        .await,
    )
    .await
    .unwrap();
    let events = sse(&body);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for (name, d) in names.iter().zip(&data) {
        assert_eq!(d["type"], *name);
    }
    assert_eq!(data[0]["message"]["usage"]["input_tokens"], 4);
    assert_eq!(data[0]["message"]["model"], "claude-x");
    assert_eq!(data[0]["message"]["content"], json!([]));
    assert_eq!(
        data[1]["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = data[3..6]
        .iter()
        .map(|d| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, "Hello from parley-mock-llm:");
    assert_eq!(data[7]["delta"]["stop_reason"], "max_tokens");
    assert_eq!(data[7]["usage"]["output_tokens"], 3);

    // Tool use, streamed; then the tool result.
    let tools =
        json!([{"name": "get_weather", "description": "w", "input_schema": {"type": "object"}}]);
    let body = read_body(
        anthropic(
            &m,
            json!({"model": "c", "max_tokens": 50, "stream": true, "tools": tools,
                   "messages": [{"role": "user", "content": "weather in Paris?"}]}),
        )
        .await,
    )
    .await
    .unwrap();
    let data: Vec<Value> = sse(&body)
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let start = data
        .iter()
        .find(|d| d["type"] == "content_block_start")
        .unwrap();
    assert_eq!(start["content_block"]["type"], "tool_use");
    assert_eq!(start["content_block"]["name"], "get_weather");
    let json_text: String = data
        .iter()
        .filter_map(|d| d["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json_text).unwrap(),
        json!({"location": "Paris"})
    );
    let delta = data.iter().find(|d| d["type"] == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 3);

    let v: Value = anthropic(
        &m,
        json!({"model": "c", "max_tokens": 50, "tools": tools, "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Rainy, 12 C"}]}]},
        ]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["content"][0]["text"], "Tool result: Rainy, 12 C");
    assert_eq!(v["usage"], json!({"input_tokens": 6, "output_tokens": 5}));
}

#[tokio::test]
async fn fail_first_and_retry_after_via_control_endpoint() {
    let m = mock().await;
    let c = client();
    let cfg: Value = c
        .post(format!("{}/_mock/config", m.url()))
        .json(&json!({"fail_first": 2, "fail_status": 503, "retry_after": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cfg["fail_first"], 2);
    assert_eq!(cfg["fail_rate"], 0.0);
    let req = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let resp = openai(&m, req.clone()).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "3");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "server_error");
    }
    assert_eq!(openai(&m, req.clone()).await.status(), 200);
    let cfg: Value = c
        .get(format!("{}/_mock/config", m.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cfg["fail_first"], 0);

    // fail_status alone: every request fails, in the provider's shape.
    m.patch(&json!({"fail_status": 429})).unwrap();
    let resp = anthropic(
        &m,
        json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-mock-fault"], "injected");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(openai(&m, req.clone()).await.status(), 429);
    // fail_first is scoped: "fail the next request, then succeed", whatever came before.
    m.patch(&json!({"fail_first": 1, "fail_status": 500}))
        .unwrap();
    assert_eq!(openai(&m, req.clone()).await.status(), 500);
    assert_eq!(openai(&m, req.clone()).await.status(), 200);

    // Reset to the start-up configuration.
    let resp = c
        .post(format!("{}/_mock/config", m.url()))
        .json(&json!({"reset": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(openai(&m, req.clone()).await.status(), 200);
    // Bad updates are refused.
    let resp = c
        .post(format!("{}/_mock/config", m.url()))
        .json(&json!({"fail_rate": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = c
        .post(format!("{}/_mock/config", m.url()))
        .json(&json!({"no_such_knob": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let s = m.stats();
    assert_eq!(s.faults_injected, 5);
    assert_eq!(s.by_status["503"], 2);
    assert_eq!(s.by_status["429"], 2);
    assert_eq!(s.by_status["500"], 1);
    assert_eq!(s.by_status["200"], 3);
}

#[tokio::test]
async fn per_model_override() {
    let m = mock().await;
    m.patch(&json!({"models": {"gpt-4o": {"fail_status": 500}, "slow": {"fail_first": 1, "fail_status": 502}}}))
        .unwrap();
    let req =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(openai(&m, req("gpt-4o")).await.status(), 500);
    assert_eq!(openai(&m, req("gpt-4o")).await.status(), 500);
    assert_eq!(openai(&m, req("other")).await.status(), 200);
    assert_eq!(openai(&m, req("slow")).await.status(), 502);
    assert_eq!(openai(&m, req("slow")).await.status(), 200);
    let s = m.stats();
    assert_eq!(s.by_model["gpt-4o"], 2);
    assert_eq!(s.by_model["slow"], 2);
}

#[tokio::test]
async fn drop_mid_stream() {
    let m = spawn(MockConfig {
        drop_after_tokens: Some(2),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let resp = openai(
        &m,
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let partial = read_body(resp).await.expect_err("the body must fail");
    let events = sse(&partial);
    // role chunk + 2 tokens, no [DONE].
    assert_eq!(events.len(), 3, "{partial}");
    assert!(!partial.contains("[DONE]"));

    let resp = anthropic(&m, json!({"model": "c", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "hi"}]})).await;
    let partial = read_body(resp).await.expect_err("the body must fail");
    assert_eq!(partial.matches("content_block_delta").count(), 4); // 2 x (event + type)
    assert!(!partial.contains("message_stop"));
    let s = wait_stats(&m, |s| s.streams_dropped == 2).await;
    assert_eq!(s.streams_dropped, 2);
    assert_eq!(s.streams_cancelled, 0);
    assert_eq!(s.completion_tokens_total, 4);
}

#[tokio::test]
async fn error_event_mid_stream() {
    let m = spawn(MockConfig {
        error_event_after_tokens: Some(3),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let body = read_body(
        openai(
            &m,
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await,
    )
    .await
    .unwrap();
    let events = sse(&body);
    assert_eq!(events.len(), 5);
    let last: Value = serde_json::from_str(&events[4].1).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    assert!(!body.contains("[DONE]"));

    let body = read_body(
        anthropic(&m, json!({"model": "c", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "hi"}]})).await,
    )
    .await
    .unwrap();
    let events = sse(&body);
    let (name, data) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    let data: Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "overloaded_error");
    assert_eq!(
        events
            .iter()
            .filter(|(n, _)| n.as_deref() == Some("content_block_delta"))
            .count(),
        3
    );
    let s = wait_stats(&m, |s| s.streams_error_events == 2).await;
    assert_eq!(s.streams_error_events, 2);
}

#[tokio::test]
async fn client_disconnect_is_counted() {
    let m = spawn(MockConfig {
        tokens_per_second: 100.0,
        reply_tokens: 1000,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let mut resp = openai(
        &m,
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(resp);
    let s = wait_stats(&m, |s| s.streams_cancelled == 1).await;
    assert_eq!(s.streams_cancelled, 1);
    assert_eq!(s.streams_completed, 0);
    assert!(s.completion_tokens_total < 1000);
    // Still serving.
    m.update(|c| c.tokens_per_second = 0.0).unwrap();
    assert_eq!(
        openai(
            &m,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        )
        .await
        .status(),
        200
    );
}

#[tokio::test]
async fn latency_ttft_and_pace() {
    let m = spawn(MockConfig {
        latency_ms: 150,
        ttft_ms: 200,
        tokens_per_second: 50.0,
        reply_tokens: 6,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let t0 = Instant::now();
    let resp = openai(
        &m,
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let headers_at = t0.elapsed();
    let body = read_body(resp).await.unwrap();
    let done_at = t0.elapsed();
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert!(headers_at >= Duration::from_millis(150), "{headers_at:?}");
    assert!(headers_at < Duration::from_millis(340), "{headers_at:?}");
    // 150 + 200 + 5 x 20 ms.
    assert!(done_at >= Duration::from_millis(450), "{done_at:?}");
    assert!(done_at < Duration::from_millis(1500), "{done_at:?}");
}

#[tokio::test]
async fn hang_never_answers() {
    let m = spawn(MockConfig {
        hang: true,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", m.url()))
        .bearer_auth(KEY)
        .timeout(Duration::from_millis(300))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await;
    assert!(r.unwrap_err().is_timeout());
    assert_eq!(m.stats().requests_total, 1);
    m.update(|c| c.hang = false).unwrap();
    assert_eq!(
        openai(
            &m,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        )
        .await
        .status(),
        200
    );
}

#[tokio::test]
async fn stats_endpoint_redacts_and_resets() {
    let m = mock().await;
    openai(
        &m,
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    anthropic(&m, json!({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})).await;
    let c = client();
    assert_eq!(
        c.get(format!("{}/models", m.openai_base_url()))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["object"],
        "list"
    );
    let text = c
        .get(format!("{}/_mock/stats", m.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains(KEY), "keys must be redacted");
    let s: Stats = serde_json::from_str(&text).unwrap();
    assert_eq!(s.requests_total, 3);
    assert_eq!(s.by_path["/v1/chat/completions"], 1);
    assert_eq!(s.by_path["/v1/messages"], 1);
    assert_eq!(s.by_path["/v1/models"], 1);
    assert_eq!(s.api_keys_seen, vec![key_fingerprint(KEY)]);
    assert_eq!(s.by_api_key[&key_fingerprint(KEY)], 2);
    assert_eq!(s.recent_requests.len(), 3);
    let msg = &s.recent_requests[1];
    assert_eq!(msg.path, "/v1/messages");
    assert_eq!(
        msg.headers["x-api-key"],
        format!("sha256:{}", key_fingerprint(KEY))
    );
    assert_eq!(msg.body["model"], "claude");
    let chat = &s.recent_requests[0];
    assert_eq!(
        chat.headers["authorization"],
        format!("Bearer sha256:{}", key_fingerprint(KEY))
    );
    assert_eq!(s.last_request.unwrap().path, "/v1/models");
    let resp = c
        .post(format!("{}/_mock/reset-stats", m.url()))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(m.stats(), Stats::default());
    // Unknown paths are 404 in OpenAI shape and counted.
    let resp = c.post(format!("{}/v2/nope", m.url())).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(m.stats().by_status["404"], 1);
}

#[tokio::test]
async fn accepted_keys_and_library_api() {
    let m = spawn(MockConfig {
        api_keys: vec![KEY.to_owned()],
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let req = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(openai(&m, req.clone()).await.status(), 200);
    let resp = client()
        .post(format!("{}/v1/chat/completions", m.url()))
        .bearer_auth("wrong")
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");

    m.set(MockConfig::default().fail_first(1, 500)).unwrap();
    assert_eq!(m.config().fail_first, 1);
    assert_eq!(openai(&m, req.clone()).await.status(), 500);
    assert_eq!(m.config().fail_first, 0);
    assert!(m.update(|c| c.fail_rate = -1.0).is_err());
    m.set(MockConfig::default().failing(502)).unwrap();
    assert_eq!(openai(&m, req.clone()).await.status(), 502);
    m.reset_config().unwrap();
    assert_eq!(openai(&m, req.clone()).await.status(), 200);

    // Dropping the handle stops the server.
    let url = m.url();
    drop(m);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        reqwest::Client::new()
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_err()
    );
}

#[test]
fn cli_flags_map_to_config() {
    let args = Args::parse_from([
        "parley-mock-llm",
        "--listen",
        "127.0.0.1:0",
        "--fail-status",
        "503",
        "--retry-after",
        "2",
        "--reply-tokens",
        "5",
        "--drop-after-tokens",
        "1",
        "--no-auth",
        "--models",
        r#"{"gpt-4o": {"latency_ms": 5}}"#,
    ]);
    let c = args.to_config().unwrap();
    assert_eq!(c.fail_status, 503);
    assert_eq!(c.fail_rate, 1.0);
    assert_eq!(c.retry_after, Some(2));
    assert_eq!(c.reply_tokens, 5);
    assert_eq!(c.drop_after_tokens, Some(1));
    assert!(!c.require_api_key);
    assert_eq!(c.models["gpt-4o"]["latency_ms"], 5);
    let c = Args::parse_from(["x", "--fail-first", "2", "--fail-status", "500"])
        .to_config()
        .unwrap();
    assert_eq!((c.fail_first, c.fail_status, c.fail_rate), (2, 500, 0.0));
    assert!(
        Args::parse_from(["x", "--fail-rate", "7"])
            .to_config()
            .is_err()
    );
}

#[tokio::test]
async fn binary_serves_and_prints_its_address() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley-mock-llm"))
        .args(["--listen", "127.0.0.1:0", "--name", "bin-mock"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .unwrap()
    .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let resp = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-mock-name"], "bin-mock");
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("bin-mock")
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn disconnect_before_first_token_is_noticed() {
    let m = spawn(MockConfig {
        ttft_ms: 3000,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let resp = openai(
        &m,
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    drop(resp);
    let t0 = Instant::now();
    let s = wait_stats(&m, |s| s.streams_cancelled == 1).await;
    assert_eq!(s.streams_cancelled, 1);
    assert!(t0.elapsed() < Duration::from_secs(2));
}
