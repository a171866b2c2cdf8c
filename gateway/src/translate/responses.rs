//! The OpenAI Responses API <-> Chat Completions: requests both ways and a chat
//! completion as a response object. With the Chat <-> Anthropic translators this lets
//! `/v1/responses` be served by any backend; `responses_stream` does the same for
//! streams.
//!
//! A conversation is a list of Responses input items (`message`, `function_call`,
//! `function_call_output`); chat messages map onto them one to one, except that an
//! assistant message with tool calls becomes a message item (if it has content) followed
//! by one `function_call` item per call.

use serde_json::{Map, Value, json};

use super::{Usage, unix_now};
use crate::error::ApiError;

type Obj = Map<String, Value>;

/// A fresh id such as `resp_1f0c...` (128 random bits: ids are looked up per tenant, so
/// they only need to be unique, not secret).
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

fn invalid_at(path: &str, what: &str) -> ApiError {
    ApiError::invalid(format!("`{path}` {what}"))
}

/// The input items of a request: a string `input` is one user message; a list is
/// checked item by item (each a message, a function call or a function call's output).
pub fn input_items(input: &Value) -> Result<Vec<Value>, ApiError> {
    match input {
        Value::String(s) => Ok(vec![
            json!({"type": "message", "role": "user", "content": s}),
        ]),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_item(item, &format!("input[{i}]"))?;
            }
            Ok(items.clone())
        }
        _ => Err(invalid_at(
            "input",
            "is required: a string or an array of input items",
        )),
    }
}

fn check_item(item: &Value, path: &str) -> Result<(), ApiError> {
    let Some(obj) = item.as_object() else {
        return Err(invalid_at(path, "must be an object"));
    };
    let kind = match obj.get("type") {
        None | Some(Value::Null) => "message",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(invalid_at(&format!("{path}.type"), "must be a string")),
    };
    let string = |key: &str| -> Result<(), ApiError> {
        match obj.get(key) {
            Some(Value::String(_)) => Ok(()),
            _ => Err(invalid_at(
                &format!("{path}.{key}"),
                "is required and must be a string",
            )),
        }
    };
    match kind {
        "message" => {
            match obj.get("role").and_then(Value::as_str) {
                Some("user" | "assistant" | "system" | "developer") => {}
                _ => {
                    return Err(invalid_at(
                        &format!("{path}.role"),
                        "must be user, assistant, system or developer",
                    ));
                }
            }
            match obj.get("content") {
                Some(Value::String(_) | Value::Array(_)) => Ok(()),
                _ => Err(invalid_at(
                    &format!("{path}.content"),
                    "is required: a string or an array of content parts",
                )),
            }
        }
        "function_call" => {
            string("call_id")?;
            string("name")?;
            string("arguments")
        }
        "function_call_output" => {
            string("call_id")?;
            match obj.get("output") {
                Some(Value::String(_) | Value::Array(_)) => Ok(()),
                _ => Err(invalid_at(
                    &format!("{path}.output"),
                    "is required: a string or an array of content parts",
                )),
            }
        }
        // Reasoning from an earlier answer: kept for backends that speak Responses,
        // dropped when translating.
        "reasoning" => Ok(()),
        other => Err(invalid_at(
            &format!("{path}.type"),
            &format!(
                "`{other}` is not supported; use message, function_call or function_call_output items"
            ),
        )),
    }
}

/// Text of Responses content parts (`input_text`, `output_text`, `refusal`).
fn parts_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                if let Some(t) = p
                    .get("text")
                    .or_else(|| p.get("refusal"))
                    .and_then(Value::as_str)
                {
                    s.push_str(t);
                }
            }
            s
        }
        _ => String::new(),
    }
}

/// Responses user/system content -> chat content (a string stays a string).
fn content_to_chat(content: &Value, path: &str) -> Result<Value, ApiError> {
    let Value::Array(parts) = content else {
        return Ok(content.clone());
    };
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let ppath = format!("{path}[{i}]");
        match p.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => {
                let text = p
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid_at(&format!("{ppath}.text"), "must be a string"))?;
                out.push(json!({"type": "text", "text": text}));
            }
            Some("input_image") => {
                let url = p.get("image_url").and_then(Value::as_str).ok_or_else(|| {
                    invalid_at(
                        &format!("{ppath}.image_url"),
                        "must be a URL or a data URL (file_id images are not supported)",
                    )
                })?;
                let mut image = Map::new();
                image.insert("url".into(), Value::String(url.to_string()));
                if let Some(d) = p.get("detail").filter(|d| d.is_string()) {
                    image.insert("detail".into(), d.clone());
                }
                out.push(json!({"type": "image_url", "image_url": image}));
            }
            _ => {
                return Err(invalid_at(
                    &format!("{ppath}.type"),
                    "must be input_text, output_text or input_image",
                ));
            }
        }
    }
    Ok(Value::Array(out))
}

/// Chat content -> Responses content parts for `role` (a string stays a string).
fn content_from_chat(content: &Value, role: &str) -> Value {
    let Value::Array(parts) = content else {
        return content.clone();
    };
    let text_type = if role == "assistant" {
        "output_text"
    } else {
        "input_text"
    };
    Value::Array(
        parts
            .iter()
            .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => Some(json!({"type": text_type, "text": p.get("text")?})),
                Some("image_url") => {
                    let image = p.get("image_url")?;
                    let mut out = Map::new();
                    out.insert("type".into(), json!("input_image"));
                    out.insert(
                        "image_url".into(),
                        image.get("url").or(Some(image))?.clone(),
                    );
                    if let Some(d) = image.get("detail") {
                        out.insert("detail".into(), d.clone());
                    }
                    Some(Value::Object(out))
                }
                _ => None,
            })
            .collect(),
    )
}

/// The chat messages of a conversation's items (with `instructions` first, as a system
/// message).
pub fn items_to_messages(
    items: &[Value],
    instructions: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let mut messages: Vec<Value> = Vec::with_capacity(items.len() + 1);
    if let Some(i) = instructions {
        messages.push(json!({"role": "system", "content": i}));
    }
    // Whether the last message is an assistant message that calls may still join.
    let mut open_assistant = false;
    for (i, item) in items.iter().enumerate() {
        let path = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                let content = item.get("content").unwrap_or(&Value::Null);
                let content = if role == "assistant" {
                    // Chat assistant content is text; the parts' texts joined.
                    Value::String(parts_text(content))
                } else {
                    content_to_chat(content, &format!("{path}.content"))?
                };
                messages.push(json!({"role": role, "content": content}));
                open_assistant = role == "assistant";
            }
            "function_call" => {
                let call = json!({
                    "id": item.get("call_id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {
                        "name": item.get("name").cloned().unwrap_or(Value::Null),
                        "arguments": item.get("arguments").cloned().unwrap_or(Value::Null),
                    },
                });
                let joined = open_assistant
                    && messages
                        .last_mut()
                        .and_then(Value::as_object_mut)
                        .is_some_and(|last| {
                            match last
                                .entry("tool_calls")
                                .or_insert_with(|| Value::Array(Vec::new()))
                            {
                                Value::Array(calls) => {
                                    calls.push(call.clone());
                                    true
                                }
                                _ => false,
                            }
                        });
                if !joined {
                    messages
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
                }
                open_assistant = true;
            }
            "function_call_output" => {
                let output = item.get("output").unwrap_or(&Value::Null);
                messages.push(json!({
                    "role": "tool",
                    "tool_call_id": item.get("call_id").cloned().unwrap_or(Value::Null),
                    "content": parts_text(output),
                }));
                open_assistant = false;
            }
            // Reasoning items have no chat equivalent.
            _ => {}
        }
    }
    Ok(messages)
}

/// Fields of a Responses request the gateway keeps to itself (never sent upstream when
/// translating): it stores responses and echoes metadata itself.
const KEPT: &[&str] = &[
    "input",
    "instructions",
    "store",
    "previous_response_id",
    "metadata",
    "include",
    "truncation",
    "stream_options",
    "max_tool_calls",
    "background",
    "service_tier",
    "safety_identifier",
];

/// A Responses request (its `input` already the whole conversation's items) as a Chat
/// Completions request. Errors name the Responses field to fix.
pub fn to_chat(req: &Obj) -> Result<Obj, ApiError> {
    let mut out = Map::new();
    for (key, value) in req {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            k if KEPT.contains(&k) => {}
            "model"
            | "temperature"
            | "top_p"
            | "parallel_tool_calls"
            | "stream"
            | "user"
            | "prompt_cache_key" => {
                out.insert(key.clone(), value.clone());
            }
            "max_output_tokens" => {
                let n = value
                    .as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| invalid_at(key, "must be a positive integer"))?;
                out.insert("max_completion_tokens".into(), Value::from(n));
            }
            "tools" => {
                out.insert("tools".into(), tools_to_chat(value)?);
            }
            "tool_choice" => {
                out.insert("tool_choice".into(), tool_choice_to_chat(value)?);
            }
            "text" => {
                if let Some(f) = text_format_to_chat(value)? {
                    out.insert("response_format".into(), f);
                }
            }
            "reasoning" => {
                if let Some(e) = value.get("effort").filter(|e| e.is_string()) {
                    out.insert("reasoning_effort".into(), e.clone());
                }
            }
            "top_logprobs" => {
                out.insert("logprobs".into(), Value::Bool(true));
                out.insert("top_logprobs".into(), value.clone());
            }
            other => {
                return Err(invalid_at(
                    other,
                    "is not supported by this gateway's Responses API; remove it",
                ));
            }
        }
    }
    if req.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(invalid_at(
            "background",
            "is not supported: responses are answered in the request",
        ));
    }
    let items = match req.get("input") {
        Some(Value::Array(items)) => items.as_slice(),
        _ => return Err(invalid_at("input", "must be an array of items")),
    };
    let instructions = match req.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(invalid_at("instructions", "must be a string")),
    };
    let messages = items_to_messages(items, instructions)?;
    if messages.is_empty() {
        return Err(invalid_at("input", "must contain at least one item"));
    }
    out.insert("messages".into(), Value::Array(messages));
    Ok(out)
}

fn tools_to_chat(tools: &Value) -> Result<Value, ApiError> {
    let Value::Array(tools) = tools else {
        return Err(invalid_at("tools", "must be an array"));
    };
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid_at(
                &format!("tools[{i}].type"),
                "must be function: only function tools can be served through the gateway",
            ));
        }
        let name = t
            .get("name")
            .filter(|n| n.is_string())
            .ok_or_else(|| invalid_at(&format!("tools[{i}].name"), "is required"))?;
        let mut f = Map::new();
        f.insert("name".into(), name.clone());
        for k in ["description", "parameters", "strict"] {
            if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                f.insert(k.into(), v.clone());
            }
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

fn tool_choice_to_chat(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("name")
                .filter(|n| n.is_string())
                .ok_or_else(|| invalid_at("tool_choice.name", "is required"))?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(invalid_at(
            "tool_choice",
            "must be auto, none, required or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

fn text_format_to_chat(text: &Value) -> Result<Option<Value>, ApiError> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for k in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(k).filter(|v| !v.is_null()) {
                    schema.insert(k.into(), v.clone());
                }
            }
            if !schema.contains_key("name") || !schema.contains_key("schema") {
                return Err(invalid_at(
                    "text.format",
                    "of type json_schema needs `name` and `schema`",
                ));
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(invalid_at(
            "text.format.type",
            "must be text, json_object or json_schema",
        )),
    }
}

/// A Chat Completions request as a Responses request (every message an input item;
/// system messages stay items, so their order is kept). Chat parameters Responses has
/// no equivalent for are an error naming them.
pub fn from_chat(req: &Obj) -> Result<Obj, ApiError> {
    let mut out = Map::new();
    for (key, value) in req {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "model"
            | "temperature"
            | "top_p"
            | "parallel_tool_calls"
            | "stream"
            | "user"
            | "prompt_cache_key"
            | "metadata"
            | "store"
            | "top_logprobs" => {
                out.insert(key.clone(), value.clone());
            }
            "messages" | "stream_options" | "logprobs" => {}
            "max_tokens" | "max_completion_tokens" => {
                out.insert("max_output_tokens".into(), value.clone());
            }
            "tools" => {
                let Value::Array(tools) = value else {
                    return Err(invalid_at("tools", "must be an array"));
                };
                let mut flat = Vec::with_capacity(tools.len());
                for t in tools {
                    let mut f = Map::new();
                    f.insert("type".into(), json!("function"));
                    if let Some(Value::Object(func)) = t.get("function") {
                        for (k, v) in func {
                            f.insert(k.clone(), v.clone());
                        }
                    }
                    flat.push(Value::Object(f));
                }
                out.insert("tools".into(), Value::Array(flat));
            }
            "tool_choice" => {
                let v = match value.get("function").and_then(|f| f.get("name")) {
                    Some(name) => json!({"type": "function", "name": name}),
                    None => value.clone(),
                };
                out.insert("tool_choice".into(), v);
            }
            "response_format" => {
                let format = match value.get("type").and_then(Value::as_str) {
                    Some("json_schema") => {
                        let mut f = Map::new();
                        f.insert("type".into(), json!("json_schema"));
                        if let Some(Value::Object(s)) = value.get("json_schema") {
                            for (k, v) in s {
                                f.insert(k.clone(), v.clone());
                            }
                        }
                        Value::Object(f)
                    }
                    _ => value.clone(),
                };
                out.insert("text".into(), json!({"format": format}));
            }
            "reasoning_effort" => {
                out.insert("reasoning".into(), json!({"effort": value}));
            }
            other => {
                return Err(invalid_at(other, "has no equivalent in the Responses API"));
            }
        }
    }
    let Some(Value::Array(messages)) = req.get("messages") else {
        return Err(invalid_at("messages", "is required and must be an array"));
    };
    let mut items = Vec::with_capacity(messages.len());
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "tool" => items.push(json!({
                "type": "function_call_output",
                "call_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                "output": match content {
                    Value::String(_) => content.clone(),
                    _ => Value::String(parts_text(content)),
                },
            })),
            "assistant" => {
                if !content.is_null() {
                    items.push(json!({"type": "message", "role": "assistant",
                        "content": content_from_chat(content, role)}));
                }
                if let Some(Value::Array(calls)) = m.get("tool_calls") {
                    for c in calls {
                        items.push(json!({
                            "type": "function_call",
                            "call_id": c.get("id").cloned().unwrap_or(Value::Null),
                            "name": c["function"]["name"],
                            "arguments": c["function"]["arguments"],
                        }));
                    }
                }
            }
            _ => items.push(json!({"type": "message", "role": role,
                "content": content_from_chat(content, role)})),
        }
    }
    out.insert("input".into(), Value::Array(items));
    Ok(out)
}

/// Usage of a Responses object (`usage.input_tokens`, `usage.output_tokens`).
pub fn usage_of(response: &Value) -> Option<Usage> {
    let u = response.get("usage")?;
    Some(Usage {
        input: u.get("input_tokens")?.as_u64()?,
        output: u.get("output_tokens").and_then(Value::as_u64).unwrap_or(0),
    })
}

/// The `usage` object of a response.
pub fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.input,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.input.saturating_add(u.output),
    })
}

/// A response object without its output: what the request asked for, echoed.
pub fn base_response(id: &str, model: &str, req: &Obj, status: &str) -> Obj {
    let mut r = Map::new();
    r.insert("id".into(), json!(id));
    r.insert("object".into(), json!("response"));
    r.insert("created_at".into(), json!(unix_now()));
    r.insert("status".into(), json!(status));
    r.insert("error".into(), Value::Null);
    r.insert("incomplete_details".into(), Value::Null);
    r.insert("model".into(), json!(model));
    r.insert("output".into(), json!([]));
    r.insert("parallel_tool_calls".into(), json!(true));
    r.insert("tool_choice".into(), json!("auto"));
    r.insert("tools".into(), json!([]));
    r.insert("text".into(), json!({"format": {"type": "text"}}));
    r.insert("metadata".into(), json!({}));
    r.insert("store".into(), json!(true));
    for k in [
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "previous_response_id",
    ] {
        r.insert(k.into(), Value::Null);
    }
    for k in [
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "previous_response_id",
        "parallel_tool_calls",
        "tool_choice",
        "tools",
        "text",
        "metadata",
        "store",
        "user",
    ] {
        if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
            r.insert(k.into(), v.clone());
        }
    }
    r.insert("usage".into(), Value::Null);
    r
}

/// An assistant message output item.
pub fn message_item(id: &str, text: &str, refusal: Option<&str>) -> Value {
    let mut content = Vec::with_capacity(1);
    if !text.is_empty() || refusal.is_none() {
        content
            .push(json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []}));
    }
    if let Some(r) = refusal {
        content.push(json!({"type": "refusal", "refusal": r}));
    }
    json!({"type": "message", "id": id, "status": "completed", "role": "assistant", "content": content})
}

/// A function call output item.
pub fn call_item(id: &str, call_id: &str, name: &str, arguments: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
           "arguments": arguments, "status": "completed"})
}

/// Sets status and `incomplete_details` from a chat `finish_reason`.
pub fn set_finish(r: &mut Obj, finish: Option<&str>) {
    if finish == Some("length") {
        r.insert("status".into(), json!("incomplete"));
        r.insert(
            "incomplete_details".into(),
            json!({"reason": "max_output_tokens"}),
        );
    } else if finish == Some("content_filter") {
        r.insert("status".into(), json!("incomplete"));
        r.insert(
            "incomplete_details".into(),
            json!({"reason": "content_filter"}),
        );
    } else {
        r.insert("status".into(), json!("completed"));
    }
}

/// A chat completion as the response object `id` of the Responses request `req`.
pub fn response_from_chat(completion: &Value, id: &str, model: &str, req: &Obj) -> (Value, Usage) {
    let choice = &completion["choices"][0];
    let message = &choice["message"];
    let mut output = Vec::new();
    let text = parts_text(&message["content"]);
    let refusal = message["refusal"].as_str();
    if !text.is_empty() || refusal.is_some() {
        output.push(message_item(&new_id("msg"), &text, refusal));
    }
    if let Some(Value::Array(calls)) = message.get("tool_calls") {
        for c in calls {
            output.push(call_item(
                &new_id("fc"),
                c["id"].as_str().unwrap_or(""),
                c["function"]["name"].as_str().unwrap_or(""),
                c["function"]["arguments"].as_str().unwrap_or(""),
            ));
        }
    }
    if output.is_empty() {
        output.push(message_item(&new_id("msg"), "", None));
    }
    let usage = Usage {
        input: completion["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        output: completion["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(0),
    };
    let mut r = base_response(id, model, req, "completed");
    set_finish(&mut r, choice["finish_reason"].as_str());
    r.insert("output".into(), Value::Array(output));
    r.insert("usage".into(), usage_json(usage));
    (Value::Object(r), usage)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obj(v: Value) -> Obj {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn a_string_input_is_one_user_message() {
        let items = input_items(&json!("hi")).unwrap();
        let mut req =
            obj(json!({"model": "m", "instructions": "be brief", "max_output_tokens": 9}));
        req.insert("input".into(), Value::Array(items));
        let chat = to_chat(&req).unwrap();
        assert_eq!(
            chat["messages"],
            json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
        );
        assert_eq!(chat["max_completion_tokens"], 9);
        assert!(!chat.contains_key("instructions"));
    }

    #[test]
    fn calls_join_their_assistant_message_and_outputs_become_tool_messages() {
        let req = obj(json!({"model": "m", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "let me see"}]},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"a\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ], "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}],
           "tool_choice": {"type": "function", "name": "w"},
           "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}));
        let chat = to_chat(&req).unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[1]["content"], "let me see");
        assert_eq!(m[1]["tool_calls"][1]["id"], "c2");
        assert_eq!(
            m[2],
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"})
        );
        assert_eq!(chat["tools"][0]["function"]["name"], "w");
        assert_eq!(chat["tool_choice"]["function"]["name"], "w");
        assert_eq!(chat["response_format"]["json_schema"]["name"], "x");
    }

    #[test]
    fn bad_input_names_the_field() {
        let e = input_items(&json!([{"type": "web_search_call"}])).unwrap_err();
        assert!(e.message.contains("input[0].type"), "{}", e.message);
        let e = input_items(&json!([{"type": "function_call", "name": "x"}])).unwrap_err();
        assert!(e.message.contains("input[0].call_id"), "{}", e.message);
        let req = obj(json!({"input": [], "tools": [{"type": "web_search"}]}));
        assert!(to_chat(&req).unwrap_err().message.contains("tools[0].type"));
        let req = obj(json!({"input": [{"role": "user", "content": "x"}], "seed": 1}));
        assert!(to_chat(&req).unwrap_err().message.contains("`seed`"));
    }

    #[test]
    fn a_completion_becomes_a_response_object() {
        let completion = json!({"choices": [{"message": {"role": "assistant", "content": "hi",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            "finish_reason": "length"}], "usage": {"prompt_tokens": 3, "completion_tokens": 4}});
        let req = obj(json!({"metadata": {"k": "v"}, "temperature": 0.5}));
        let (r, u) = response_from_chat(&completion, "resp_1", "m", &req);
        assert_eq!(
            u,
            Usage {
                input: 3,
                output: 4
            }
        );
        assert_eq!(r["status"], "incomplete");
        assert_eq!(r["output"][0]["content"][0]["text"], "hi");
        assert_eq!(r["output"][1]["call_id"], "call_1");
        assert_eq!(r["metadata"]["k"], "v");
        assert_eq!(r["temperature"], 0.5);
        assert_eq!(r["usage"]["total_tokens"], 7);
        assert_eq!(usage_of(&r), Some(u));
    }
}
