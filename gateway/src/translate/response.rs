//! Non-streaming response bodies: OpenAI <-> Anthropic.

use serde_json::{Map, Value, json};

use super::{Usage, stop_reason_to_anthropic, stop_reason_to_openai, unix_now};

/// OpenAI chat completion -> Anthropic message. `model` is the name the client used.
pub fn openai_to_anthropic(resp: &Value, model: &str) -> (Value, Usage) {
    let choice = &resp["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    match &message["content"] {
        Value::String(s) if !s.is_empty() => content.push(json!({"type": "text", "text": s})),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    content.push(json!({"type": "text", "text": t}));
                }
            }
        }
        _ => {}
    }
    if let Some(Value::Array(calls)) = message.get("tool_calls") {
        for call in calls {
            let args = call["function"]["arguments"].as_str().unwrap_or("");
            let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
            content.push(json!({
                "type": "tool_use",
                "id": call["id"].as_str().unwrap_or(""),
                "name": call["function"]["name"].as_str().unwrap_or(""),
                "input": input,
            }));
        }
    }
    let usage = Usage {
        input: resp["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        output: resp["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    };
    let stop = choice["finish_reason"]
        .as_str()
        .map(stop_reason_to_anthropic)
        .unwrap_or("end_turn");
    let id = resp["id"].as_str().unwrap_or("msg_parley");
    (
        json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": {"input_tokens": usage.input, "output_tokens": usage.output},
        }),
        usage,
    )
}

/// Anthropic message -> OpenAI chat completion. `model` is the name the client used.
pub fn anthropic_to_openai(resp: &Value, model: &str) -> (Value, Usage) {
    let mut text = String::new();
    let mut calls = Vec::new();
    if let Some(Value::Array(blocks)) = resp.get("content") {
        for b in blocks {
            match b["type"].as_str() {
                Some("text") => text.push_str(b["text"].as_str().unwrap_or("")),
                Some("tool_use") => calls.push(json!({
                    "id": b["id"].as_str().unwrap_or(""),
                    "type": "function",
                    "function": {
                        "name": b["name"].as_str().unwrap_or(""),
                        "arguments": b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into()),
                    },
                })),
                _ => {}
            }
        }
    }
    let u = &resp["usage"];
    let usage = Usage {
        input: u["input_tokens"]
            .as_u64()
            .unwrap_or(0)
            .saturating_add(u["cache_creation_input_tokens"].as_u64().unwrap_or(0))
            .saturating_add(u["cache_read_input_tokens"].as_u64().unwrap_or(0)),
        output: u["output_tokens"].as_u64().unwrap_or(0),
    };
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        },
    );
    if !calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    let finish = resp["stop_reason"]
        .as_str()
        .map(stop_reason_to_openai)
        .unwrap_or("stop");
    (
        json!({
            "id": resp["id"].as_str().unwrap_or("chatcmpl-parley"),
            "object": "chat.completion",
            "created": unix_now(),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
            "usage": {
                "prompt_tokens": usage.input,
                "completion_tokens": usage.output,
                "total_tokens": usage.input.saturating_add(usage.output),
            },
        }),
        usage,
    )
}

/// The error message inside an upstream error body of either format.
pub fn upstream_error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("error")
        .and_then(|e| e.get("message").or(Some(e)))
        .and_then(|m| m.as_str().map(str::to_string))
        .or_else(|| v.get("message").and_then(Value::as_str).map(str::to_string))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_keeps_text_tools_stop_and_usage() {
        let openai = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "checking",
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}]}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        });
        let (anth, usage) = openai_to_anthropic(&openai, "m");
        assert_eq!(
            usage,
            Usage {
                input: 7,
                output: 3
            }
        );
        assert_eq!(anth["stop_reason"], "tool_use");
        assert_eq!(anth["content"][0]["text"], "checking");
        assert_eq!(anth["content"][1]["input"]["location"], "Paris");
        assert_eq!(anth["usage"]["output_tokens"], 3);
        let (back, usage2) = anthropic_to_openai(&anth, "m");
        assert_eq!(usage2, usage);
        assert_eq!(back["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            back["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"location\":\"Paris\"}"
        );
        assert_eq!(back["usage"]["total_tokens"], 10);
    }

    #[test]
    fn reads_error_messages() {
        assert_eq!(
            upstream_error_message(br#"{"error":{"message":"bad"}}"#).as_deref(),
            Some("bad")
        );
        assert_eq!(
            upstream_error_message(br#"{"type":"error","error":{"type":"x","message":"m"}}"#)
                .as_deref(),
            Some("m")
        );
        assert_eq!(upstream_error_message(b"nope"), None);
    }
}
