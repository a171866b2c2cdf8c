//! `POST /v1/responses`: the OpenAI Responses API, for gateway backends with
//! `responsesApi`. The reply rules are the chat endpoint's (tool call when asked, "Tool
//! result: ..." after `function_call_output` items, cut at `max_output_tokens`); streams
//! are paced and fault-injected like the others, the error event being Responses'
//! `error`. The mock keeps nothing: `previous_response_id` is refused (the gateway must
//! send the whole conversation).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::common::{self, Api, Reply, StreamEvents};
use super::config::Profile;
use super::stats::Recorder;
use super::text;

fn bad(message: &str) -> Response {
    common::bad_request(Api::OpenAi, message)
}

/// Text of an input item's content (string or parts).
fn item_text(content: &Value, out: &mut String) {
    text::openai_content_text(content, out);
}

/// Validates the request and produces the reply (JSON or a stream).
pub fn respond(profile: &Profile, stats: &Arc<Recorder>, seq: u64, req: &Value) -> Response {
    let Some(obj) = req.as_object() else {
        return bad("The request body must be a JSON object.");
    };
    let Some(model) = obj.get("model").and_then(Value::as_str) else {
        return bad("you must provide a model parameter");
    };
    if obj
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return common::error(
            Api::OpenAi,
            404,
            "parley-mock-llm stores no responses: previous_response_id is not supported",
        );
    }
    let items: Vec<Value> = match obj.get("input") {
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        Some(Value::Array(a)) if !a.is_empty() => a.clone(),
        _ => return bad("Missing required parameter: 'input'."),
    };
    let mut prompt = String::new();
    if let Some(i) = obj.get("instructions").and_then(Value::as_str) {
        prompt.push_str(i);
    }
    for it in &items {
        if let Some(c) = it.get("content") {
            prompt.push(' ');
            item_text(c, &mut prompt);
        }
        if let Some(o) = it.get("output") {
            prompt.push(' ');
            item_text(o, &mut prompt);
        }
    }
    let prompt_tokens = text::count_words(&prompt);
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max_tokens = match obj.get("max_output_tokens").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n),
            _ => return bad("Invalid 'max_output_tokens': expected an integer >= 1."),
        },
    };
    let reply = choose_reply(obj, &items, profile, max_tokens);
    let id = format!("resp_mock{seq}");
    let completion = reply.completion_tokens();
    let usage = json!({"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion});
    let (output, incomplete) = match &reply {
        Reply::Text { cut, .. } => (
            json!({"type": "message", "id": format!("msg_mock{seq}"), "status": "completed",
                "role": "assistant", "content": [{"type": "output_text", "text": reply.joined(),
                "annotations": []}]}),
            *cut,
        ),
        Reply::ToolCall { name } => (
            json!({"type": "function_call", "id": format!("fc_mock{seq}"),
                "call_id": format!("call_mock{seq}"), "name": name,
                "arguments": text::TOOL_ARGUMENTS, "status": "completed"}),
            false,
        ),
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": common::now_secs(),
            "status": status, "model": model, "output": output, "usage": usage,
            "error": null,
            "incomplete_details": if incomplete && status != "in_progress" {
                json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": obj.get("instructions").cloned().unwrap_or(Value::Null),
            "store": obj.get("store").cloned().unwrap_or(json!(true))})
    };
    let final_status = if incomplete {
        "incomplete"
    } else {
        "completed"
    };
    if !stream {
        stats.usage(prompt_tokens, completion);
        return common::json_value(
            StatusCode::OK,
            &response(final_status, json!([output]), usage),
        );
    }
    let ev = |kind: &str, seq_no: usize, mut data: Map<String, Value>| -> String {
        data.insert("type".into(), json!(kind));
        data.insert("sequence_number".into(), json!(seq_no));
        format!("event: {kind}\ndata: {}\n\n", Value::Object(data))
    };
    let map = |v: Value| match v {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let started = response("in_progress", json!([]), Value::Null);
    let mut preamble = ev("response.created", 0, map(json!({"response": started})));
    let mut tokens = Vec::new();
    let mut n = 1;
    let item_id = output["id"].clone();
    match &reply {
        Reply::Text {
            tokens: t,
            n: count,
            ..
        } => {
            let mut added = output.clone();
            added["status"] = json!("in_progress");
            added["content"] = json!([]);
            preamble.push_str(&ev(
                "response.output_item.added",
                1,
                map(json!({"output_index": 0, "item": added})),
            ));
            preamble.push_str(&ev(
                "response.content_part.added",
                2,
                map(json!({"output_index": 0,
                "item_id": item_id, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}})),
            ));
            n = 3;
            for tok in &t[..*count] {
                tokens.push(ev(
                    "response.output_text.delta",
                    n,
                    map(json!({"output_index": 0,
                    "item_id": item_id, "content_index": 0, "delta": tok})),
                ));
                n += 1;
            }
        }
        Reply::ToolCall { .. } => {
            let mut added = output.clone();
            added["status"] = json!("in_progress");
            added["arguments"] = json!("");
            tokens.push(ev(
                "response.output_item.added",
                n,
                map(json!({"output_index": 0, "item": added})),
            ));
            n += 1;
            for frag in text::TOOL_ARGUMENT_FRAGMENTS {
                tokens.push(ev(
                    "response.function_call_arguments.delta",
                    n,
                    map(json!({"output_index": 0,
                    "item_id": item_id, "delta": frag})),
                ));
                n += 1;
            }
        }
    }
    let mut closing = ev(
        "response.output_item.done",
        n,
        map(json!({"output_index": 0, "item": output})),
    );
    closing.push_str(&ev(
        &format!("response.{final_status}"),
        n + 1,
        map(json!({"response": response(final_status, json!([output]), usage)})),
    ));
    let error_event = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"The server had an error while processing your request (injected by parley-mock-llm).\",\"param\":null,\"sequence_number\":0}\n\n".to_owned();
    let events = StreamEvents {
        preamble,
        tokens,
        closing,
        error_event,
    };
    common::stream_response(events, &profile.cfg, stats, prompt_tokens)
}

fn choose_reply(
    obj: &Map<String, Value>,
    items: &[Value],
    profile: &Profile,
    max_tokens: Option<u64>,
) -> Reply {
    let kind = |it: &Value| {
        it.get("type")
            .and_then(Value::as_str)
            .unwrap_or("message")
            .to_owned()
    };
    // Trailing function call outputs -> a text reply quoting them.
    let results: Vec<String> = items
        .iter()
        .rev()
        .take_while(|it| kind(it) == "function_call_output")
        .map(|it| {
            let mut s = String::new();
            if let Some(o) = it.get("output") {
                item_text(o, &mut s);
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
        .and_then(|t| t.get("name"))
        .and_then(Value::as_str);
    if let Some(first_tool) = first_tool {
        let choice = obj.get("tool_choice");
        let forced_name = choice.and_then(|c| c.get("name")).and_then(Value::as_str);
        let none = choice.and_then(Value::as_str) == Some("none");
        let required = choice.and_then(Value::as_str) == Some("required") || forced_name.is_some();
        let asks = items.last().is_some_and(|it| {
            it.get("role").and_then(Value::as_str) == Some("user") && {
                let mut s = String::new();
                if let Some(c) = it.get("content") {
                    item_text(c, &mut s);
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
