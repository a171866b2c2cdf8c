//! `POST /v1/messages`.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::common::{self, Api, Reply, StreamEvents};
use super::config::Profile;
use super::stats::Recorder;
use super::text;

fn bad(message: &str) -> Response {
    common::bad_request(Api::Anthropic, message)
}

/// Validates the request and produces the reply (JSON or a stream).
pub fn respond(profile: &Profile, stats: &Arc<Recorder>, seq: u64, req: &Value) -> Response {
    let Some(obj) = req.as_object() else {
        return bad("The request body must be a JSON object.");
    };
    let Some(model) = obj.get("model").and_then(Value::as_str) else {
        return bad("model: Field required");
    };
    let max_tokens = match obj.get("max_tokens") {
        None | Some(Value::Null) => return bad("max_tokens: Field required"),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n,
            _ => return bad("max_tokens: Input should be an integer >= 1"),
        },
    };
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return bad("messages: Field required");
    };
    if messages.is_empty() {
        return bad("messages: at least one message is required");
    }
    let mut prompt = String::new();
    if let Some(system) = obj.get("system") {
        text::anthropic_content_text(system, &mut prompt);
    }
    for (i, m) in messages.iter().enumerate() {
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            _ => {
                return bad(&format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                ));
            }
        }
        match m.get("content") {
            Some(c @ (Value::String(_) | Value::Array(_))) => {
                text::anthropic_content_text(c, &mut prompt)
            }
            _ => return bad(&format!("messages.{i}.content: Field required")),
        }
    }
    let prompt_tokens = text::count_words(&prompt);
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return bad("stream: Input should be a valid boolean"),
    };
    let reply = choose_reply(obj, messages, profile, max_tokens);
    let id = format!("msg_mock{seq}");
    let stop_reason = match &reply {
        Reply::Text { cut: true, .. } => "max_tokens",
        Reply::Text { .. } => "end_turn",
        Reply::ToolCall { .. } => "tool_use",
    };
    if stream {
        let events = stream_events(&id, model, &reply, seq, prompt_tokens, stop_reason);
        return common::stream_response(events, &profile.cfg, stats, prompt_tokens);
    }
    let completion = reply.completion_tokens();
    stats.usage(prompt_tokens, completion);
    let content = match &reply {
        Reply::Text { .. } => json!([{"type": "text", "text": reply.joined()}]),
        Reply::ToolCall { name } => json!([{
            "type": "tool_use",
            "id": format!("toolu_mock{seq}"),
            "name": name,
            "input": {"location": "Paris"},
        }]),
    };
    let body = MessageOut {
        id: &id,
        r#type: "message",
        role: "assistant",
        model,
        content,
        stop_reason,
        stop_sequence: None,
        usage: Usage {
            input_tokens: prompt_tokens,
            output_tokens: completion,
        },
    };
    common::json_bytes(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

fn user_text(m: &Value) -> String {
    let mut s = String::new();
    match m.get("content") {
        Some(Value::String(c)) => s.push_str(c),
        Some(Value::Array(blocks)) => {
            for b in blocks {
                if b.get("type").and_then(Value::as_str) == Some("text")
                    && let Some(t) = b.get("text").and_then(Value::as_str)
                {
                    s.push_str(t);
                    s.push(' ');
                }
            }
        }
        _ => {}
    }
    s
}

fn choose_reply(
    obj: &Map<String, Value>,
    messages: &[Value],
    profile: &Profile,
    max_tokens: u64,
) -> Reply {
    let last = messages.last();
    let is_user = last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("user");
    // Tool results in the last user message -> a text reply quoting them.
    if is_user && let Some(Value::Array(blocks)) = last.and_then(|m| m.get("content")) {
        let results: Vec<String> = blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .map(|b| {
                let mut s = String::new();
                if let Some(c) = b.get("content") {
                    text::anthropic_content_text(c, &mut s);
                }
                s
            })
            .collect();
        if !results.is_empty() {
            return Reply::text(text::tool_result_reply(&results).into(), Some(max_tokens));
        }
    }
    let first_tool = obj
        .get("tools")
        .and_then(Value::as_array)
        .and_then(|t| t.first())
        .and_then(|t| t.get("name"))
        .and_then(Value::as_str);
    if let Some(first_tool) = first_tool {
        let choice = obj.get("tool_choice");
        let kind = choice.and_then(|c| c.get("type")).and_then(Value::as_str);
        let forced_name = if kind == Some("tool") {
            choice.and_then(|c| c.get("name")).and_then(Value::as_str)
        } else {
            None
        };
        let required = kind == Some("any") || forced_name.is_some();
        let asks = is_user && last.is_some_and(|m| text::wants_tool(&user_text(m)));
        if kind != Some("none") && (required || asks) {
            return Reply::ToolCall {
                name: forced_name.unwrap_or(first_tool).to_owned(),
            };
        }
    }
    Reply::text(Arc::clone(&profile.reply), Some(max_tokens))
}

fn event(name: &str, data: &str) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn stream_events(
    id: &str,
    model: &str,
    reply: &Reply,
    seq: u64,
    prompt_tokens: u64,
    stop_reason: &str,
) -> StreamEvents {
    let completion = reply.completion_tokens();
    let mut preamble = event(
        "message_start",
        &format!(
            "{{\"type\":\"message_start\",\"message\":{{\"id\":\"{id}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{},\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":{prompt_tokens},\"output_tokens\":{}}}}}}}",
            common::json_str(model),
            completion.min(1)
        ),
    );
    let delta = |d: &str| {
        event(
            "content_block_delta",
            &format!("{{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{d}}}"),
        )
    };
    let ping = event("ping", "{\"type\": \"ping\"}");
    let tokens = match reply {
        Reply::Text { tokens, n, .. } => {
            preamble.push_str(&event(
                "content_block_start",
                "{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}",
            ));
            preamble.push_str(&ping);
            tokens[..*n]
                .iter()
                .map(|t| {
                    delta(&format!(
                        "{{\"type\":\"text_delta\",\"text\":{}}}",
                        common::json_str(t)
                    ))
                })
                .collect()
        }
        Reply::ToolCall { name } => {
            preamble.push_str(&ping);
            let mut v = vec![event(
                "content_block_start",
                &format!(
                    "{{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"tool_use\",\"id\":\"toolu_mock{seq}\",\"name\":{},\"input\":{{}}}}}}",
                    common::json_str(name)
                ),
            )];
            for frag in text::TOOL_ARGUMENT_FRAGMENTS {
                v.push(delta(&format!(
                    "{{\"type\":\"input_json_delta\",\"partial_json\":{}}}",
                    common::json_str(frag)
                )));
            }
            v
        }
    };
    let mut closing = event(
        "content_block_stop",
        "{\"type\":\"content_block_stop\",\"index\":0}",
    );
    closing.push_str(&event(
        "message_delta",
        &format!(
            "{{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"{stop_reason}\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{completion}}}}}"
        ),
    ));
    closing.push_str(&event("message_stop", "{\"type\":\"message_stop\"}"));
    let error_event = event(
        "error",
        "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded (injected by parley-mock-llm)\"}}",
    );
    StreamEvents {
        preamble,
        tokens,
        closing,
        error_event,
    }
}

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Serialize)]
struct MessageOut<'a> {
    id: &'a str,
    r#type: &'static str,
    role: &'static str,
    model: &'a str,
    content: Value,
    stop_reason: &'static str,
    stop_sequence: Option<()>,
    usage: Usage,
}
