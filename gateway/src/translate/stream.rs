//! Streams: one upstream SSE event in, zero or more client SSE events out, with usage
//! tracked on the way. Same-format streams are passed through byte for byte (except the
//! usage chunk a client did not ask for).

use bytes::{BufMut, BytesMut};
use serde_json::{Value, json};

use super::sse::SseEvent;
use super::{Usage, stop_reason_to_anthropic, stop_reason_to_openai, unix_now};
use crate::error::{ApiError, ApiFormat, ErrorKind};

/// The provider format of the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// OpenAI-compatible chat completions stream.
    OpenAi,
    /// Anthropic messages stream.
    Anthropic,
}

/// Per-stream translation state.
#[derive(Debug)]
pub struct StreamTranslator {
    client: ApiFormat,
    upstream: Upstream,
    client_wants_usage: bool,
    model: String,
    /// Usage reported by the upstream so far.
    pub usage: Usage,
    /// Content deltas seen (an output-token estimate if the stream breaks).
    pub deltas: u64,
    /// The upstream sent its terminal event.
    pub finished: bool,
    /// The upstream sent an error event (its message).
    pub failed: Option<String>,
    // OpenAI -> Anthropic
    started: bool,
    block_open: Option<BlockKind>,
    next_block: u64,
    stop_reason: Option<&'static str>,
    // Anthropic -> OpenAI
    id: String,
    created: u64,
    tool_index_of_block: Vec<(u64, u64)>,
    tools_seen: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Text,
    Tool(u64),
}

fn put_data(out: &mut BytesMut, value: &Value) {
    out.put_slice(b"data: ");
    out.put_slice(value.to_string().as_bytes());
    out.put_slice(b"\n\n");
}

fn put_event(out: &mut BytesMut, name: &str, value: &Value) {
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(value.to_string().as_bytes());
    out.put_slice(b"\n\n");
}

/// Whether a JSON text has a non-null value for `"key"` (a cheap pre-check before parsing).
fn has_non_null(data: &str, key: &str) -> bool {
    let mut rest = data;
    while let Some(pos) = rest.find(key) {
        let after = rest[pos + key.len()..].trim_start();
        if let Some(after) = after.strip_prefix(':') {
            let after = after.trim_start();
            return !after.starts_with("null");
        }
        rest = &rest[pos + key.len()..];
    }
    false
}

impl StreamTranslator {
    /// A translator for a client of `client` format reading an `upstream` stream.
    pub fn new(
        client: ApiFormat,
        upstream: Upstream,
        client_wants_usage: bool,
        model: &str,
    ) -> Self {
        Self {
            client,
            upstream,
            client_wants_usage,
            model: model.to_string(),
            usage: Usage::default(),
            deltas: 0,
            finished: false,
            failed: None,
            started: false,
            block_open: None,
            next_block: 0,
            stop_reason: None,
            id: String::new(),
            created: unix_now(),
            tool_index_of_block: Vec::new(),
            tools_seen: 0,
        }
    }

    /// Whether `ev` is an upstream error event (used before the first byte is sent, to
    /// fall back instead of streaming an error).
    pub fn is_error_event(&self, ev: &SseEvent) -> bool {
        match self.upstream {
            Upstream::Anthropic => ev.event.as_deref() == Some("error"),
            Upstream::OpenAi => {
                ev.data.trim_start().starts_with("{\"error\"")
                    || has_non_null(&ev.data, "\"error\"")
            }
        }
    }

    /// Translates one upstream event, appending client bytes to `out`.
    pub fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if self.finished || self.failed.is_some() {
            return;
        }
        match (self.upstream, self.client) {
            (Upstream::OpenAi, ApiFormat::OpenAi) => self.openai_passthrough(ev, out),
            (Upstream::Anthropic, ApiFormat::Anthropic) => self.anthropic_passthrough(ev, out),
            (Upstream::OpenAi, ApiFormat::Anthropic) => self.openai_to_anthropic(ev, out),
            (Upstream::Anthropic, ApiFormat::OpenAi) => self.anthropic_to_openai(ev, out),
        }
    }

    /// Ends the stream with an error event the client SDK understands.
    pub fn abort(&mut self, error: &ApiError, out: &mut BytesMut) {
        if self.finished || self.failed.is_some() {
            return;
        }
        self.failed = Some(error.message.clone());
        out.put_slice(error.stream_event(self.client).as_bytes());
    }

    fn upstream_failed(&mut self, message: String, out: &mut BytesMut) {
        let err = ApiError::new(
            ErrorKind::Upstream,
            format!("upstream stream failed: {message}"),
        );
        self.abort(&err, out);
    }

    fn openai_passthrough(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        let data = ev.data.as_str();
        if data == "[DONE]" {
            self.finished = true;
            out.put_slice(&ev.raw);
            return;
        }
        if self.is_error_event(ev) {
            self.failed = Some(error_message(data));
            out.put_slice(&ev.raw);
            return;
        }
        self.deltas += 1;
        if has_non_null(data, "\"usage\"")
            && let Ok(mut v) = serde_json::from_str::<Value>(data)
        {
            self.read_openai_usage(&v);
            if !self.client_wants_usage {
                let no_choices = v["choices"].as_array().is_none_or(Vec::is_empty);
                if no_choices {
                    return;
                }
                if let Some(o) = v.as_object_mut() {
                    o.remove("usage");
                }
                put_data(out, &v);
                return;
            }
        }
        out.put_slice(&ev.raw);
    }

    fn read_openai_usage(&mut self, v: &Value) {
        let u = &v["usage"];
        if let Some(p) = u["prompt_tokens"].as_u64() {
            self.usage.input = p;
        }
        if let Some(c) = u["completion_tokens"].as_u64() {
            self.usage.output = c;
        }
    }

    fn anthropic_passthrough(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        match ev.event.as_deref() {
            Some("message_start") => {
                if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                    self.read_anthropic_usage(&v["message"]["usage"]);
                }
            }
            Some("message_delta") => {
                if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                    self.read_anthropic_usage(&v["usage"]);
                }
            }
            Some("content_block_delta") => self.deltas += 1,
            Some("message_stop") => self.finished = true,
            Some("error") => self.failed = Some(error_message(&ev.data)),
            _ => {}
        }
        out.put_slice(&ev.raw);
    }

    fn read_anthropic_usage(&mut self, u: &Value) {
        if let Some(i) = u["input_tokens"].as_u64() {
            self.usage.input = i
                .saturating_add(u["cache_creation_input_tokens"].as_u64().unwrap_or(0))
                .saturating_add(u["cache_read_input_tokens"].as_u64().unwrap_or(0));
        }
        if let Some(o) = u["output_tokens"].as_u64() {
            self.usage.output = o;
        }
    }

    fn ensure_message_start(&mut self, id: &str, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let id = if id.is_empty() {
            "msg_parley".to_string()
        } else {
            id.to_string()
        };
        put_event(
            out,
            "message_start",
            &json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": self.usage.input, "output_tokens": 0}}}),
        );
    }

    fn close_block(&mut self, out: &mut BytesMut) {
        if self.block_open.take().is_some() {
            put_event(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": self.next_block - 1}),
            );
        }
    }

    fn open_block(&mut self, kind: BlockKind, block: Value, out: &mut BytesMut) {
        self.close_block(out);
        put_event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": self.next_block, "content_block": block}),
        );
        self.next_block += 1;
        self.block_open = Some(kind);
    }

    fn openai_to_anthropic(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        let data = ev.data.as_str();
        if data == "[DONE]" {
            self.ensure_message_start("", out);
            self.close_block(out);
            let stop = self.stop_reason.unwrap_or("end_turn");
            put_event(
                out,
                "message_delta",
                &json!({"type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": {"input_tokens": self.usage.input, "output_tokens": self.usage.output}}),
            );
            put_event(out, "message_stop", &json!({"type": "message_stop"}));
            self.finished = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            let msg = e["message"]
                .as_str()
                .unwrap_or("upstream error")
                .to_string();
            self.ensure_message_start("", out);
            self.upstream_failed(msg, out);
            return;
        }
        self.ensure_message_start(v["id"].as_str().unwrap_or(""), out);
        if v.get("usage").is_some_and(|u| !u.is_null()) {
            self.read_openai_usage(&v);
        }
        let Some(choice) = v["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str()
            && !text.is_empty()
        {
            if self.block_open != Some(BlockKind::Text) {
                self.open_block(BlockKind::Text, json!({"type": "text", "text": ""}), out);
            }
            self.deltas += 1;
            put_event(
                out,
                "content_block_delta",
                &json!({"type": "content_block_delta",
                "index": self.next_block - 1, "delta": {"type": "text_delta", "text": text}}),
            );
        }
        if let Some(Value::Array(calls)) = delta.get("tool_calls") {
            for call in calls {
                let idx = call["index"].as_u64().unwrap_or(0);
                if self.block_open != Some(BlockKind::Tool(idx)) {
                    self.open_block(
                        BlockKind::Tool(idx),
                        json!({"type": "tool_use", "id": call["id"].as_str().unwrap_or(""),
                            "name": call["function"]["name"].as_str().unwrap_or(""), "input": {}}),
                        out,
                    );
                }
                if let Some(args) = call["function"]["arguments"].as_str()
                    && !args.is_empty()
                {
                    self.deltas += 1;
                    put_event(
                        out,
                        "content_block_delta",
                        &json!({"type": "content_block_delta",
                        "index": self.next_block - 1, "delta": {"type": "input_json_delta", "partial_json": args}}),
                    );
                }
            }
        }
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.stop_reason = Some(stop_reason_to_anthropic(finish));
            self.close_block(out);
        }
    }

    fn openai_chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}]})
    }

    fn anthropic_to_openai(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        let name = ev.event.as_deref().unwrap_or("");
        if name == "ping" {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
            return;
        };
        let ty = v["type"].as_str().unwrap_or(name);
        match ty {
            "message_start" => {
                let m = &v["message"];
                self.id = m["id"].as_str().unwrap_or("chatcmpl-parley").to_string();
                self.read_anthropic_usage(&m["usage"]);
                let chunk = self.openai_chunk(json!({"role": "assistant", "content": ""}), None);
                put_data(out, &chunk);
            }
            "content_block_start" => {
                let block = &v["content_block"];
                if block["type"] == "tool_use" {
                    let tool = self.tools_seen;
                    self.tools_seen += 1;
                    self.tool_index_of_block
                        .push((v["index"].as_u64().unwrap_or(0), tool));
                    let chunk = self.openai_chunk(
                        json!({"tool_calls": [{"index": tool,
                        "id": block["id"], "type": "function",
                        "function": {"name": block["name"], "arguments": ""}}]}),
                        None,
                    );
                    put_data(out, &chunk);
                } else if let Some(text) = block["text"].as_str()
                    && !text.is_empty()
                {
                    let chunk = self.openai_chunk(json!({"content": text}), None);
                    put_data(out, &chunk);
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => {
                        self.deltas += 1;
                        let chunk = self.openai_chunk(json!({"content": d["text"]}), None);
                        put_data(out, &chunk);
                    }
                    Some("input_json_delta") => {
                        self.deltas += 1;
                        let block = v["index"].as_u64().unwrap_or(0);
                        let tool = self
                            .tool_index_of_block
                            .iter()
                            .find(|(b, _)| *b == block)
                            .map(|(_, t)| *t)
                            .unwrap_or(0);
                        let chunk = self.openai_chunk(
                            json!({"tool_calls": [{"index": tool,
                            "function": {"arguments": d["partial_json"]}}]}),
                            None,
                        );
                        put_data(out, &chunk);
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                self.read_anthropic_usage(&v["usage"]);
                if let Some(stop) = v["delta"]["stop_reason"].as_str() {
                    let chunk = self.openai_chunk(json!({}), Some(stop_reason_to_openai(stop)));
                    put_data(out, &chunk);
                }
            }
            "message_stop" => {
                if self.client_wants_usage {
                    let chunk = json!({"id": self.id, "object": "chat.completion.chunk",
                        "created": self.created, "model": self.model, "choices": [],
                        "usage": {"prompt_tokens": self.usage.input, "completion_tokens": self.usage.output,
                            "total_tokens": self.usage.input.saturating_add(self.usage.output)}});
                    put_data(out, &chunk);
                }
                out.put_slice(b"data: [DONE]\n\n");
                self.finished = true;
            }
            "error" => {
                let msg = v["error"]["message"]
                    .as_str()
                    .unwrap_or("upstream error")
                    .to_string();
                self.upstream_failed(msg, out);
            }
            _ => {}
        }
    }
}

fn error_message(data: &str) -> String {
    serde_json::from_str::<Value>(data)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| "upstream error".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::sse::SseParser;
    use super::*;

    fn run(t: &mut StreamTranslator, input: &str) -> String {
        let mut p = SseParser::default();
        p.push(input.as_bytes());
        let mut out = BytesMut::new();
        while let Some(ev) = p.next_event() {
            t.on_event(&ev, &mut out);
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn openai_passthrough_strips_unrequested_usage() {
        let mut t = StreamTranslator::new(ApiFormat::OpenAi, Upstream::OpenAi, false, "m");
        let out = run(&mut t, OPENAI_STREAM);
        assert!(!out.contains("prompt_tokens"));
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            t.usage,
            Usage {
                input: 5,
                output: 4
            }
        );
        assert!(t.finished);
        let mut t = StreamTranslator::new(ApiFormat::OpenAi, Upstream::OpenAi, true, "m");
        assert_eq!(run(&mut t, OPENAI_STREAM), OPENAI_STREAM);
    }

    #[test]
    fn openai_to_anthropic_events() {
        let mut t = StreamTranslator::new(ApiFormat::Anthropic, Upstream::OpenAi, false, "m");
        let out = run(&mut t, OPENAI_STREAM);
        let names: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(out.contains("\"stop_reason\":\"tool_use\""));
        assert!(out.contains("\"output_tokens\":4"));
        assert!(t.finished);
    }

    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"tu\",\"name\":\"f\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":6}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn anthropic_to_openai_chunks() {
        let mut t = StreamTranslator::new(ApiFormat::OpenAi, Upstream::Anthropic, true, "m");
        let out = run(&mut t, ANTHROPIC_STREAM);
        assert!(out.contains("\"content\":\"Hi\""));
        assert!(out.contains("\"finish_reason\":\"tool_calls\""));
        assert!(out.contains("\"name\":\"f\""));
        assert!(out.contains("\"completion_tokens\":6"));
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(
            t.usage,
            Usage {
                input: 5,
                output: 6
            }
        );
        let mut t = StreamTranslator::new(ApiFormat::Anthropic, Upstream::Anthropic, false, "m");
        assert_eq!(run(&mut t, ANTHROPIC_STREAM), ANTHROPIC_STREAM);
        assert!(t.finished);
    }

    #[test]
    fn error_events_become_client_errors() {
        let mut t = StreamTranslator::new(ApiFormat::OpenAi, Upstream::Anthropic, false, "m");
        let out = run(
            &mut t,
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n",
        );
        assert!(out.starts_with("data: {\"error\""), "{out}");
        assert!(t.failed.is_some());
        let mut t = StreamTranslator::new(ApiFormat::Anthropic, Upstream::OpenAi, false, "m");
        let out = run(&mut t, "data: {\"error\":{\"message\":\"boom\"}}\n\n");
        assert!(out.contains("event: error\n"), "{out}");
    }
}
