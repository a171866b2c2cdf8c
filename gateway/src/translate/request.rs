//! Request bodies: OpenAI Chat Completions <-> Anthropic Messages.
//!
//! Both directions work on `serde_json` maps so fields the gateway does not know are
//! refused by name instead of being dropped silently.

use serde_json::{Map, Value, json};

use crate::error::ApiError;

type Obj = Map<String, Value>;

fn unsupported(param: &str, provider: &str) -> ApiError {
    ApiError::invalid(format!(
        "parameter `{param}` is not supported by this model's provider ({provider}); remove it or use a model served by a provider that supports it"
    ))
}

fn invalid_at(path: &str, what: &str) -> ApiError {
    ApiError::invalid(format!("`{path}` {what}"))
}

/// A same-format request as sent upstream, serialised straight from the client's map
/// without copying it: `model` replaced, OpenAI streams always asking for usage, and
/// `max_tokens` filled in for Anthropic when missing.
pub struct Patched<'a> {
    /// The client's request.
    pub base: &'a Obj,
    /// The upstream model name.
    pub model: &'a str,
    /// Force `stream_options.include_usage: true` (OpenAI streams).
    pub stream_usage: bool,
    /// `max_tokens` to add when the request has none (Anthropic).
    pub max_tokens: Option<u32>,
}

impl serde::Serialize for Patched<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        let mut saw_model = false;
        let mut saw_options = false;
        let mut saw_max = false;
        for (k, v) in self.base {
            match k.as_str() {
                "model" => {
                    m.serialize_entry(k, self.model)?;
                    saw_model = true;
                }
                "stream_options" if self.stream_usage => {
                    let mut opts = v.as_object().cloned().unwrap_or_default();
                    opts.insert("include_usage".into(), Value::Bool(true));
                    m.serialize_entry(k, &opts)?;
                    saw_options = true;
                }
                "max_tokens" if self.max_tokens.is_some() && !v.is_u64() => {}
                "max_tokens" => {
                    m.serialize_entry(k, v)?;
                    saw_max = true;
                }
                _ => m.serialize_entry(k, v)?,
            }
        }
        if !saw_model {
            m.serialize_entry("model", self.model)?;
        }
        if self.stream_usage && !saw_options {
            m.serialize_entry("stream_options", &json!({"include_usage": true}))?;
        }
        if let Some(max) = self.max_tokens
            && !saw_max
        {
            m.serialize_entry("max_tokens", &max)?;
        }
        m.end()
    }
}

/// The text of an OpenAI `content` (string or parts) when it is text only.
fn openai_text(content: &Value, path: &str) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if !text.is_empty() {
                            text.push('\n');
                        }
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    _ => {
                        return Err(invalid_at(
                            &format!("{path}[{i}]"),
                            "must be a text part here",
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(invalid_at(path, "must be a string or an array of parts")),
    }
}

fn image_url_to_anthropic(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((meta, data)) = rest.split_once(',')
    {
        let media_type = meta.strip_suffix(";base64").unwrap_or(meta);
        return json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}});
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

/// OpenAI user content -> Anthropic content blocks.
fn openai_user_blocks(content: &Value, path: &str) -> Result<Vec<Value>, ApiError> {
    match content {
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => {
            let mut blocks = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => blocks.push(json!({"type": "text",
                        "text": part.get("text").and_then(Value::as_str).unwrap_or("")})),
                    Some("image_url") => {
                        let url = part
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                invalid_at(&format!("{path}[{i}].image_url.url"), "is required")
                            })?;
                        blocks.push(image_url_to_anthropic(url));
                    }
                    Some(other) => {
                        return Err(ApiError::invalid(format!(
                            "`{path}[{i}]`: content part type `{other}` is not supported by this model's provider (anthropic)"
                        )));
                    }
                    None => return Err(invalid_at(&format!("{path}[{i}].type"), "is required")),
                }
            }
            Ok(blocks)
        }
        _ => Err(invalid_at(path, "must be a string or an array of parts")),
    }
}

fn push_message(messages: &mut Vec<Value>, role: &str, mut blocks: Vec<Value>) {
    if let Some(last) = messages.last_mut()
        && last.get("role").and_then(Value::as_str) == Some(role)
        && let Some(Value::Array(content)) = last.get_mut("content")
    {
        content.append(&mut blocks);
        return;
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// OpenAI Chat Completions request -> Anthropic Messages request.
pub fn openai_to_anthropic(
    req: &Obj,
    upstream_model: &str,
    default_max_tokens: u32,
) -> Result<Value, ApiError> {
    const P: &str = "anthropic";
    let mut out = Map::new();
    out.insert("model".into(), Value::String(upstream_model.to_string()));
    for (key, value) in req {
        match key.as_str() {
            "model"
            | "messages"
            | "stream_options"
            | "tools"
            | "tool_choice"
            | "parallel_tool_calls"
            | "store"
            | "max_tokens"
            | "max_completion_tokens" => {}
            "stream" => {
                out.insert("stream".into(), value.clone());
            }
            "temperature" | "top_p" => {
                if !value.is_null() {
                    out.insert(key.clone(), value.clone());
                }
            }
            "stop" => match value {
                Value::Null => {}
                Value::String(s) => {
                    out.insert("stop_sequences".into(), json!([s]));
                }
                Value::Array(_) => {
                    out.insert("stop_sequences".into(), value.clone());
                }
                _ => {
                    return Err(invalid_at(
                        "stop",
                        "must be a string or an array of strings",
                    ));
                }
            },
            "user" => {
                if let Some(u) = value.as_str() {
                    out.insert("metadata".into(), json!({"user_id": u}));
                }
            }
            "n" => {
                if !(value.is_null() || value.as_u64() == Some(1)) {
                    return Err(unsupported("n", P));
                }
            }
            "logprobs" => {
                if !(value.is_null() || value == &Value::Bool(false)) {
                    return Err(unsupported("logprobs", P));
                }
            }
            "presence_penalty" | "frequency_penalty" => {
                if !(value.is_null() || value.as_f64() == Some(0.0)) {
                    return Err(unsupported(key, P));
                }
            }
            "response_format" => {
                if !(value.is_null() || value.get("type").and_then(Value::as_str) == Some("text")) {
                    return Err(unsupported("response_format", P));
                }
            }
            "metadata" => {}
            other => return Err(unsupported(other, P)),
        }
    }
    let max_tokens = match req.get("max_completion_tokens").or(req.get("max_tokens")) {
        None | Some(Value::Null) => u64::from(default_max_tokens),
        Some(v) => v
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid_at("max_tokens", "must be a positive integer"))?,
    };
    out.insert("max_tokens".into(), Value::from(max_tokens));

    let Some(Value::Array(messages)) = req.get("messages") else {
        return Err(invalid_at("messages", "is required and must be an array"));
    };
    let mut system = String::new();
    let mut out_messages: Vec<Value> = Vec::with_capacity(messages.len());
    for (i, msg) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let role = msg
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid_at(&format!("{path}.role"), "is required"))?;
        let content = msg.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                let text = openai_text(content, &format!("{path}.content"))?;
                if !system.is_empty() {
                    system.push_str("\n\n");
                }
                system.push_str(&text);
            }
            "user" => {
                let blocks = openai_user_blocks(content, &format!("{path}.content"))?;
                push_message(&mut out_messages, "user", blocks);
            }
            "assistant" => {
                let mut blocks = Vec::new();
                let text = openai_text(content, &format!("{path}.content"))?;
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                if let Some(Value::Array(calls)) = msg.get("tool_calls") {
                    for (j, call) in calls.iter().enumerate() {
                        let cpath = format!("{path}.tool_calls[{j}]");
                        let id = call.get("id").and_then(Value::as_str).unwrap_or_default();
                        let func = call.get("function");
                        let name = func
                            .and_then(|f| f.get("name"))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                invalid_at(&format!("{cpath}.function.name"), "is required")
                            })?;
                        let args = func
                            .and_then(|f| f.get("arguments"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        let input: Value = if args.trim().is_empty() {
                            json!({})
                        } else {
                            serde_json::from_str(args).map_err(|_| {
                                invalid_at(
                                    &format!("{cpath}.function.arguments"),
                                    "must be a JSON object encoded as a string",
                                )
                            })?
                        };
                        blocks.push(
                            json!({"type": "tool_use", "id": id, "name": name, "input": input}),
                        );
                    }
                }
                if blocks.is_empty() {
                    blocks.push(json!({"type": "text", "text": ""}));
                }
                push_message(&mut out_messages, "assistant", blocks);
            }
            "tool" => {
                let id = msg
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid_at(&format!("{path}.tool_call_id"), "is required"))?;
                let text = openai_text(content, &format!("{path}.content"))?;
                push_message(
                    &mut out_messages,
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": text})],
                );
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "`{path}.role`: role `{other}` is not supported; use system, developer, user, assistant or tool"
                )));
            }
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system));
    }
    out.insert("messages".into(), Value::Array(out_messages));

    if let Some(Value::Array(tools)) = req.get("tools") {
        let mut out_tools = Vec::with_capacity(tools.len());
        for (i, tool) in tools.iter().enumerate() {
            if tool.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::invalid(format!(
                    "`tools[{i}].type`: only `function` tools can be sent to this model's provider (anthropic)"
                )));
            }
            let f = tool.get("function").unwrap_or(&Value::Null);
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid_at(&format!("tools[{i}].function.name"), "is required"))?;
            let mut t = json!({
                "name": name,
                "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            });
            if let Some(d) = f.get("description") {
                t["description"] = d.clone();
            }
            out_tools.push(t);
        }
        out.insert("tools".into(), Value::Array(out_tools));
    }
    let mut choice = match req.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "none" => Some(json!({"type": "none"})),
            "required" => Some(json!({"type": "any"})),
            _ => {
                return Err(invalid_at(
                    "tool_choice",
                    "must be auto, none, required or a function",
                ));
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid_at("tool_choice.function.name", "is required"))?;
            Some(json!({"type": "tool", "name": name}))
        }
    };
    if req.get("parallel_tool_calls") == Some(&Value::Bool(false)) && req.contains_key("tools") {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c.get("type").and_then(Value::as_str) != Some("none") {
            c["disable_parallel_tool_use"] = Value::Bool(true);
        }
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(Value::Object(out))
}

/// Text of Anthropic content (string or blocks) for places that take text only.
fn anthropic_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => {
            let mut text = String::new();
            for b in blocks {
                if let Some(t) = b.get("text").and_then(Value::as_str) {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(t);
                }
            }
            text
        }
        _ => String::new(),
    }
}

fn anthropic_image_to_openai(block: &Value) -> Option<Value> {
    let source = block.get("source")?;
    let url = match source.get("type").and_then(Value::as_str)? {
        "base64" => format!(
            "data:{};base64,{}",
            source.get("media_type").and_then(Value::as_str)?,
            source.get("data").and_then(Value::as_str)?
        ),
        "url" => source.get("url").and_then(Value::as_str)?.to_string(),
        _ => return None,
    };
    Some(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// Anthropic Messages request -> OpenAI Chat Completions request.
pub fn anthropic_to_openai(
    req: &Obj,
    upstream_model: &str,
    stream: bool,
) -> Result<Value, ApiError> {
    const P: &str = "openai";
    let mut out = Map::new();
    out.insert("model".into(), Value::String(upstream_model.to_string()));
    for (key, value) in req {
        match key.as_str() {
            "model" | "messages" | "system" | "tools" | "tool_choice" | "stream" => {}
            "max_tokens" => {
                out.insert("max_tokens".into(), value.clone());
            }
            "temperature" | "top_p" => {
                if !value.is_null() {
                    out.insert(key.clone(), value.clone());
                }
            }
            "stop_sequences" => {
                if !value.is_null() {
                    out.insert("stop".into(), value.clone());
                }
            }
            "metadata" => {
                if let Some(u) = value.get("user_id").and_then(Value::as_str) {
                    out.insert("user".into(), Value::String(u.to_string()));
                }
            }
            other => return Err(unsupported(other, P)),
        }
    }
    if stream {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let mut messages = Vec::new();
    match req.get("system") {
        None | Some(Value::Null) => {}
        Some(s @ (Value::String(_) | Value::Array(_))) => {
            messages.push(json!({"role": "system", "content": anthropic_text(s)}));
        }
        Some(_) => {
            return Err(invalid_at(
                "system",
                "must be a string or an array of text blocks",
            ));
        }
    }
    let Some(Value::Array(in_messages)) = req.get("messages") else {
        return Err(invalid_at("messages", "is required and must be an array"));
    };
    for (i, msg) in in_messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let role = msg.get("role").and_then(Value::as_str).unwrap_or("");
        let content = msg.get("content").unwrap_or(&Value::Null);
        match (role, content) {
            ("user" | "assistant", Value::String(s)) => {
                messages.push(json!({"role": role, "content": s}));
            }
            ("user", Value::Array(blocks)) => {
                let mut parts = Vec::new();
                for (j, b) in blocks.iter().enumerate() {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => parts.push(json!({"type": "text",
                            "text": b.get("text").and_then(Value::as_str).unwrap_or("")})),
                        Some("image") => {
                            parts.push(anthropic_image_to_openai(b).ok_or_else(|| {
                                invalid_at(
                                    &format!("{path}.content[{j}].source"),
                                    "is not a valid image source",
                                )
                            })?)
                        }
                        Some("tool_result") => {
                            let id =
                                b.get("tool_use_id")
                                    .and_then(Value::as_str)
                                    .ok_or_else(|| {
                                        invalid_at(
                                            &format!("{path}.content[{j}].tool_use_id"),
                                            "is required",
                                        )
                                    })?;
                            let mut text = anthropic_text(b.get("content").unwrap_or(&Value::Null));
                            if b.get("is_error") == Some(&Value::Bool(true)) && text.is_empty() {
                                text = "error".into();
                            }
                            messages
                                .push(json!({"role": "tool", "tool_call_id": id, "content": text}));
                        }
                        other => {
                            return Err(ApiError::invalid(format!(
                                "`{path}.content[{j}]`: block type `{}` is not supported by this model's provider (openai)",
                                other.unwrap_or("?")
                            )));
                        }
                    }
                }
                if !parts.is_empty() {
                    let all_text = parts.iter().all(|p| p["type"] == "text");
                    let content = if all_text {
                        Value::String(
                            parts
                                .iter()
                                .filter_map(|p| p["text"].as_str())
                                .collect::<Vec<_>>()
                                .join("\n"),
                        )
                    } else {
                        Value::Array(parts)
                    };
                    messages.push(json!({"role": "user", "content": content}));
                }
            }
            ("assistant", Value::Array(blocks)) => {
                let mut text = String::new();
                let mut calls = Vec::new();
                for (j, b) in blocks.iter().enumerate() {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            text.push_str(b.get("text").and_then(Value::as_str).unwrap_or(""))
                        }
                        Some("tool_use") => {
                            let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                            calls.push(json!({
                                "id": b.get("id").and_then(Value::as_str).unwrap_or(""),
                                "type": "function",
                                "function": {
                                    "name": b.get("name").and_then(Value::as_str).unwrap_or(""),
                                    "arguments": input.to_string(),
                                },
                            }));
                        }
                        Some("thinking" | "redacted_thinking") => {}
                        other => {
                            return Err(ApiError::invalid(format!(
                                "`{path}.content[{j}]`: block type `{}` is not supported by this model's provider (openai)",
                                other.unwrap_or("?")
                            )));
                        }
                    }
                }
                let mut m = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) }});
                if !calls.is_empty() {
                    m["tool_calls"] = Value::Array(calls);
                }
                messages.push(m);
            }
            ("user" | "assistant", _) => {
                return Err(invalid_at(
                    &format!("{path}.content"),
                    "must be a string or an array of blocks",
                ));
            }
            _ => {
                return Err(invalid_at(
                    &format!("{path}.role"),
                    "must be user or assistant",
                ));
            }
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(Value::Array(tools)) = req.get("tools") {
        let mut out_tools = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            if let Some(ty) = t.get("type").and_then(Value::as_str)
                && ty != "custom"
            {
                return Err(ApiError::invalid(format!(
                    "`tools[{i}]`: server tool `{ty}` is not supported by this model's provider (openai)"
                )));
            }
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid_at(&format!("tools[{i}].name"), "is required"))?;
            let mut f = json!({"name": name,
                "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}))});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            out_tools.push(json!({"type": "function", "function": f}));
        }
        out.insert("tools".into(), Value::Array(out_tools));
    }
    if let Some(choice) = req.get("tool_choice").filter(|c| !c.is_null()) {
        let c = match choice.get("type").and_then(Value::as_str) {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => {
                json!({"type": "function", "function": {"name": choice.get("name").cloned().unwrap_or(Value::Null)}})
            }
            _ => {
                return Err(invalid_at(
                    "tool_choice.type",
                    "must be auto, any, tool or none",
                ));
            }
        };
        out.insert("tool_choice".into(), c);
        if choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            out.insert("parallel_tool_calls".into(), Value::Bool(false));
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obj(v: Value) -> Obj {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn openai_to_anthropic_moves_system_tools_and_results() {
        let req = obj(json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
            "stop": "END",
            "temperature": 0,
        }));
        let out = openai_to_anthropic(&req, "claude", 512).unwrap();
        assert_eq!(out["model"], "claude");
        assert_eq!(out["system"], "be brief");
        assert_eq!(out["max_tokens"], 512);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["messages"][1]["content"][0]["type"], "tool_use");
        assert_eq!(
            out["messages"][1]["content"][0]["input"]["location"],
            "Paris"
        );
        assert_eq!(out["messages"][2]["role"], "user");
        assert_eq!(out["messages"][2]["content"][0]["tool_use_id"], "call_1");
        assert_eq!(out["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(out["tool_choice"]["type"], "any");
    }

    #[test]
    fn unsupported_parameters_are_named() {
        for (param, value) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("seed", json!(1)),
        ] {
            let mut req =
                obj(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
            req.insert(param.into(), value);
            let err = openai_to_anthropic(&req, "m", 10).unwrap_err();
            assert!(
                err.message.contains(&format!("`{param}`")),
                "{}",
                err.message
            );
        }
        let req = obj(json!({"model": "m", "max_tokens": 5, "top_k": 3, "messages": []}));
        let err = anthropic_to_openai(&req, "m", false).unwrap_err();
        assert!(err.message.contains("`top_k`"));
    }

    #[test]
    fn anthropic_to_openai_splits_tool_results() {
        let req = obj(json!({
            "model": "claude", "max_tokens": 100, "system": [{"type": "text", "text": "sys"}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "let me see"},
                    {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"a": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "42"},
                    {"type": "text", "text": "thanks"}]},
            ],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
        }));
        let out = anthropic_to_openai(&req, "gpt", true).unwrap();
        let m = out["messages"].as_array().unwrap();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[2]["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(m[3]["role"], "tool");
        assert_eq!(m[3]["content"], "42");
        assert_eq!(m[4]["content"], "thanks");
        assert_eq!(out["tool_choice"], "required");
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["tools"][0]["function"]["name"], "f");
    }

    #[test]
    fn passthrough_patches_model_and_usage() {
        let req =
            obj(json!({"model": "a", "messages": [], "stream": true, "stream_options": {"x": 1}}));
        let p = Patched {
            base: &req,
            model: "b",
            stream_usage: true,
            max_tokens: None,
        };
        let out: Value = serde_json::to_value(&p).unwrap();
        assert_eq!(out["model"], "b");
        assert_eq!(
            out["stream_options"],
            json!({"x": 1, "include_usage": true})
        );
        let req = obj(json!({"messages": []}));
        let p = Patched {
            base: &req,
            model: "c",
            stream_usage: false,
            max_tokens: Some(77),
        };
        let out: Value = serde_json::to_value(&p).unwrap();
        assert_eq!(out, json!({"messages": [], "model": "c", "max_tokens": 77}));
        let req = obj(json!({"max_tokens": 5, "messages": []}));
        let p = Patched {
            base: &req,
            model: "c",
            stream_usage: false,
            max_tokens: Some(77),
        };
        assert_eq!(serde_json::to_value(&p).unwrap()["max_tokens"], 5);
    }
}
