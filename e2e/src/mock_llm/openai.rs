//! `POST /v1/chat/completions`.

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
    common::bad_request(Api::OpenAi, message)
}

/// Validates the request and produces the reply (JSON or a stream).
pub fn respond(profile: &Profile, stats: &Arc<Recorder>, seq: u64, req: &Value) -> Response {
    let Some(obj) = req.as_object() else {
        return bad("The request body must be a JSON object.");
    };
    let Some(model) = obj.get("model").and_then(Value::as_str) else {
        return bad("you must provide a model parameter");
    };
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return bad("Missing required parameter: 'messages'.");
    };
    if messages.is_empty() {
        return bad("Invalid 'messages': empty array. Expected an array with minimum length 1.");
    }
    let mut prompt = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return bad(&format!(
                "Missing required parameter: 'messages[{i}].role'."
            ));
        }
        if let Some(c) = m.get("content") {
            text::openai_content_text(c, &mut prompt);
        }
    }
    let prompt_tokens = text::count_words(&prompt);
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return bad("Invalid type for 'stream': expected a boolean."),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = match obj
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| obj.get("max_tokens").filter(|v| !v.is_null()))
    {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n),
            _ => return bad("Invalid 'max_tokens': expected an integer >= 1."),
        },
    };
    let reply = choose_reply(obj, messages, profile, max_tokens);
    let id = format!("chatcmpl-mock{seq}");
    let created = common::now_secs();
    if stream {
        let events = stream_events(
            &id,
            created,
            model,
            &reply,
            seq,
            prompt_tokens,
            include_usage,
        );
        common::stream_response(events, &profile.cfg, stats, prompt_tokens)
    } else {
        let completion = reply.completion_tokens();
        stats.usage(prompt_tokens, completion);
        let usage = Usage {
            prompt_tokens,
            completion_tokens: completion,
            total_tokens: prompt_tokens + completion,
        };
        let (message, finish) = match &reply {
            Reply::Text { cut, .. } => (
                OutMessage {
                    role: "assistant",
                    content: Some(reply.joined()),
                    refusal: None,
                    tool_calls: None,
                },
                if *cut { "length" } else { "stop" },
            ),
            Reply::ToolCall { name } => (
                OutMessage {
                    role: "assistant",
                    content: None,
                    refusal: None,
                    tool_calls: Some(vec![json!({
                        "id": format!("call_mock{seq}"),
                        "type": "function",
                        "function": {"name": name, "arguments": text::TOOL_ARGUMENTS},
                    })]),
                },
                "tool_calls",
            ),
        };
        let body = Completion {
            id: &id,
            object: "chat.completion",
            created,
            model,
            choices: [Choice {
                index: 0,
                message,
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
            system_fingerprint: None,
        };
        common::json_bytes(
            StatusCode::OK,
            serde_json::to_vec(&body).unwrap_or_default(),
        )
    }
}

fn choose_reply(
    obj: &Map<String, Value>,
    messages: &[Value],
    profile: &Profile,
    max_tokens: Option<u64>,
) -> Reply {
    // Trailing tool results -> a text reply quoting them.
    let results: Vec<String> = messages
        .iter()
        .rev()
        .take_while(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
        .map(|m| {
            let mut s = String::new();
            if let Some(c) = m.get("content") {
                text::openai_content_text(c, &mut s);
            }
            s
        })
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if !results.is_empty() {
        return Reply::text(text::tool_result_reply(&results).into(), max_tokens);
    }
    let first_tool = obj
        .get("tools")
        .and_then(Value::as_array)
        .and_then(|t| t.first())
        .and_then(|t| t.get("function"))
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str);
    if let Some(first_tool) = first_tool {
        let choice = obj.get("tool_choice");
        let forced_name = choice
            .and_then(|c| c.get("function"))
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str);
        let none = choice.and_then(Value::as_str) == Some("none");
        let required = choice.and_then(Value::as_str) == Some("required") || forced_name.is_some();
        let asks = messages.last().is_some_and(|m| {
            m.get("role").and_then(Value::as_str) == Some("user") && {
                let mut s = String::new();
                if let Some(c) = m.get("content") {
                    text::openai_content_text(c, &mut s);
                }
                text::wants_tool(&s)
            }
        });
        if !none && (required || asks) {
            return Reply::ToolCall {
                name: forced_name.unwrap_or(first_tool).to_owned(),
            };
        }
    }
    Reply::text(Arc::clone(&profile.reply), max_tokens)
}

fn stream_events(
    id: &str,
    created: u64,
    model: &str,
    reply: &Reply,
    seq: u64,
    prompt_tokens: u64,
    include_usage: bool,
) -> StreamEvents {
    let head = format!(
        "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},\"system_fingerprint\":null,\"choices\":[",
        common::json_str(model)
    );
    let tail = if include_usage {
        ",\"usage\":null}\n\n"
    } else {
        "}\n\n"
    };
    let chunk = |delta: &str, finish: &str| -> String {
        format!(
            "{head}{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{tail}"
        )
    };
    let (preamble, tokens, finish) = match reply {
        Reply::Text { tokens, n, cut } => (
            chunk(
                "{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}",
                "null",
            ),
            tokens[..*n]
                .iter()
                .map(|t| chunk(&format!("{{\"content\":{}}}", common::json_str(t)), "null"))
                .collect(),
            if *cut { "\"length\"" } else { "\"stop\"" },
        ),
        Reply::ToolCall { name } => {
            let first = format!(
                "{{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{{\"index\":0,\"id\":\"call_mock{seq}\",\"type\":\"function\",\"function\":{{\"name\":{},\"arguments\":\"\"}}}}],\"refusal\":null}}",
                common::json_str(name)
            );
            let mut tokens = vec![chunk(&first, "null")];
            for frag in text::TOOL_ARGUMENT_FRAGMENTS {
                tokens.push(chunk(
                    &format!(
                        "{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":{}}}}}]}}",
                        common::json_str(frag)
                    ),
                    "null",
                ));
            }
            (String::new(), tokens, "\"tool_calls\"")
        }
    };
    let mut closing = chunk("{}", finish);
    if include_usage {
        let completion = reply.completion_tokens();
        closing.push_str(&format!(
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},\"system_fingerprint\":null,\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{completion},\"total_tokens\":{}}}}}\n\n",
            common::json_str(model),
            prompt_tokens + completion
        ));
    }
    closing.push_str("data: [DONE]\n\n");
    let error_event = "data: {\"error\":{\"message\":\"The server had an error while processing your request (injected by parley-mock-llm).\",\"type\":\"server_error\",\"param\":null,\"code\":\"server_error\"}}\n\n".to_owned();
    StreamEvents {
        preamble,
        tokens,
        closing,
        error_event,
    }
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct OutMessage {
    role: &'static str,
    content: Option<String>,
    refusal: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Serialize)]
struct Choice {
    index: u32,
    message: OutMessage,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice; 1],
    usage: Usage,
    system_fingerprint: Option<()>,
}
