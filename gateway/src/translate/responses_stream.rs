//! Responses API streams: chat completion chunks translated into Responses events
//! ([`ChatToResponses`]), and a Responses upstream's own events watched on their way
//! through ([`ResponsesWatch`]) for usage and the final response.
//!
//! Either way the client sees `response.created` first and `response.completed` (or
//! `response.incomplete`) last; a failure ends the stream with `response.failed` then an
//! `error` event whose data carries an `error` object (the OpenAI SDK raises it).

use bytes::{BufMut, BytesMut};
use serde_json::{Map, Value, json};

use super::Usage;
use super::responses::{
    base_response, call_item, message_item, new_id, set_finish, usage_json, usage_of,
};
use super::sse::SseEvent;
use crate::error::{ApiError, ApiFormat};

fn put(out: &mut BytesMut, kind: &str, mut data: Map<String, Value>, seq: &mut u64) {
    data.insert("type".into(), Value::String(kind.to_string()));
    data.insert("sequence_number".into(), Value::from(*seq));
    *seq += 1;
    out.put_slice(b"event: ");
    out.put_slice(kind.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(Value::Object(data).to_string().as_bytes());
    out.put_slice(b"\n\n");
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Writes the end of a failed stream: `response.failed` (when the response started)
/// and `error`.
fn put_failure(
    out: &mut BytesMut,
    response: Option<Map<String, Value>>,
    error: &ApiError,
    seq: &mut u64,
) {
    let body = error.body(ApiFormat::OpenAi);
    let inner = body.get("error").cloned().unwrap_or(Value::Null);
    if let Some(mut r) = response {
        r.insert("status".into(), json!("failed"));
        r.insert(
            "error".into(),
            json!({"code": inner["code"], "message": error.message}),
        );
        put(out, "response.failed", obj(json!({"response": r})), seq);
    }
    put(
        out,
        "error",
        obj(
            json!({"code": inner["code"], "message": error.message, "param": null, "error": inner}),
        ),
        seq,
    );
}

enum Item {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// Chat completion chunks (as the gateway's chat streams produce them) -> Responses events.
pub struct ChatToResponses {
    base: Map<String, Value>,
    seq: u64,
    items: Vec<Item>,
    /// Output index of the open text message.
    text: Option<usize>,
    /// `(chat tool call index, output index)`.
    calls: Vec<(u64, usize)>,
    finish: Option<String>,
    /// Usage from the chunks.
    pub usage: Usage,
    /// Text and argument deltas seen (an output estimate if the stream breaks).
    pub deltas: u64,
    /// `response.completed` (or `.incomplete`) was written.
    pub finished: bool,
    /// The stream ended with an error (its message).
    pub failed: Option<String>,
}

impl ChatToResponses {
    /// A stream of the response `id` for the Responses request `req`.
    pub fn new(id: &str, model: &str, req: &Map<String, Value>) -> Self {
        Self {
            base: base_response(id, model, req, "in_progress"),
            seq: 0,
            items: Vec::new(),
            text: None,
            calls: Vec::new(),
            finish: None,
            usage: Usage::default(),
            deltas: 0,
            finished: false,
            failed: None,
        }
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self, out: &mut BytesMut) {
        let r = Value::Object(self.base.clone());
        put(
            out,
            "response.created",
            obj(json!({"response": r})),
            &mut self.seq,
        );
        put(
            out,
            "response.in_progress",
            obj(json!({"response": r})),
            &mut self.seq,
        );
    }

    /// Translates one chat stream event.
    pub fn on_chat_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if self.finished || self.failed.is_some() {
            return;
        }
        let data = ev.data.trim();
        if data == "[DONE]" {
            self.finish(out);
            return;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(err) = chunk.get("error").filter(|e| !e.is_null()) {
            let message = err["message"]
                .as_str()
                .unwrap_or("the upstream stream failed")
                .to_string();
            let e = ApiError::new(crate::error::ErrorKind::Upstream, message);
            self.fail(&e, out);
            return;
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage.input = u["prompt_tokens"].as_u64().unwrap_or(self.usage.input);
            self.usage.output = u["completion_tokens"].as_u64().unwrap_or(self.usage.output);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            self.text_delta(text, out);
        }
        if let Some(Value::Array(calls)) = delta.get("tool_calls") {
            for c in calls {
                self.call_delta(c, out);
            }
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            self.finish = Some(f.to_string());
        }
    }

    fn text_delta(&mut self, text: &str, out: &mut BytesMut) {
        let index = match self.text {
            Some(i) => i,
            None => {
                let id = new_id("msg");
                let index = self.items.len();
                put(
                    out,
                    "response.output_item.added",
                    obj(
                        json!({"output_index": index, "item": {"type": "message", "id": id,
                        "status": "in_progress", "role": "assistant", "content": []}}),
                    ),
                    &mut self.seq,
                );
                put(
                    out,
                    "response.content_part.added",
                    obj(
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
                    ),
                    &mut self.seq,
                );
                self.items.push(Item::Message {
                    id,
                    text: String::new(),
                });
                self.text = Some(index);
                index
            }
        };
        self.deltas += 1;
        if let Some(Item::Message { id, text: all }) = self.items.get_mut(index) {
            all.push_str(text);
            let data = obj(
                json!({"item_id": id, "output_index": index, "content_index": 0,
                "delta": text, "logprobs": []}),
            );
            put(out, "response.output_text.delta", data, &mut self.seq);
        }
    }

    fn call_delta(&mut self, c: &Value, out: &mut BytesMut) {
        let chat_index = c["index"].as_u64().unwrap_or(0);
        let index = match self.calls.iter().find(|(ci, _)| *ci == chat_index) {
            Some((_, i)) => *i,
            None => {
                let id = new_id("fc");
                let call_id = c["id"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| new_id("call"));
                let name = c["function"]["name"].as_str().unwrap_or("").to_string();
                let index = self.items.len();
                put(
                    out,
                    "response.output_item.added",
                    obj(
                        json!({"output_index": index, "item": {"type": "function_call", "id": id,
                        "call_id": call_id, "name": name, "arguments": "", "status": "in_progress"}}),
                    ),
                    &mut self.seq,
                );
                self.items.push(Item::Call {
                    id,
                    call_id,
                    name,
                    arguments: String::new(),
                });
                self.calls.push((chat_index, index));
                index
            }
        };
        let Some(args) = c["function"]["arguments"]
            .as_str()
            .filter(|a| !a.is_empty())
        else {
            return;
        };
        self.deltas += 1;
        if let Some(Item::Call { id, arguments, .. }) = self.items.get_mut(index) {
            arguments.push_str(args);
            let data = obj(json!({"item_id": id, "output_index": index, "delta": args}));
            put(
                out,
                "response.function_call_arguments.delta",
                data,
                &mut self.seq,
            );
        }
    }

    fn output(&self) -> Vec<Value> {
        self.items
            .iter()
            .map(|i| match i {
                Item::Message { id, text } => message_item(id, text, None),
                Item::Call {
                    id,
                    call_id,
                    name,
                    arguments,
                } => call_item(id, call_id, name, arguments),
            })
            .collect()
    }

    /// The response as it stands (complete once [`Self::finished`]).
    pub fn response(&self) -> Value {
        let mut r = self.base.clone();
        if self.finished {
            set_finish(&mut r, self.finish.as_deref());
            r.insert("usage".into(), usage_json(self.usage));
        }
        r.insert("output".into(), Value::Array(self.output()));
        Value::Object(r)
    }

    fn finish(&mut self, out: &mut BytesMut) {
        let output = self.output();
        for (index, (item, done)) in self.items.iter().zip(&output).enumerate() {
            match item {
                Item::Message { id, text } => {
                    put(
                        out,
                        "response.output_text.done",
                        obj(
                            json!({"item_id": id, "output_index": index, "content_index": 0,
                            "text": text, "logprobs": []}),
                        ),
                        &mut self.seq,
                    );
                    put(
                        out,
                        "response.content_part.done",
                        obj(
                            json!({"item_id": id, "output_index": index, "content_index": 0,
                            "part": done["content"][0]}),
                        ),
                        &mut self.seq,
                    );
                }
                Item::Call { id, arguments, .. } => put(
                    out,
                    "response.function_call_arguments.done",
                    obj(json!({"item_id": id, "output_index": index, "arguments": arguments})),
                    &mut self.seq,
                ),
            }
            put(
                out,
                "response.output_item.done",
                obj(json!({"output_index": index, "item": done})),
                &mut self.seq,
            );
        }
        self.finished = true;
        let r = self.response();
        let kind = if r["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        put(out, kind, obj(json!({"response": r})), &mut self.seq);
    }

    /// Ends the stream with `error` (after `response.failed`).
    pub fn fail(&mut self, error: &ApiError, out: &mut BytesMut) {
        if self.finished || self.failed.is_some() {
            return;
        }
        self.failed = Some(error.message.clone());
        let mut r = self.base.clone();
        r.insert("output".into(), Value::Array(self.output()));
        put_failure(out, Some(r), error, &mut self.seq);
    }
}

/// Watches a Responses upstream's events as they pass through unchanged.
#[derive(Default)]
pub struct ResponsesWatch {
    /// Usage from the final event.
    pub usage: Usage,
    /// Text and argument deltas seen.
    pub deltas: u64,
    /// The final response arrived.
    pub finished: bool,
    /// The stream failed (its message).
    pub failed: Option<String>,
    /// The final response object.
    pub response: Option<Value>,
    /// The response object of `response.created` (for a failure of our own).
    started: Option<Map<String, Value>>,
    /// Highest sequence number seen.
    seq: u64,
}

impl ResponsesWatch {
    /// Passes one upstream event on (its bytes unchanged) and learns from it.
    pub fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if self.finished || self.failed.is_some() {
            return;
        }
        if ev.event.as_deref() == Some("error") {
            // Rewritten with an `error` object, which the OpenAI SDK raises (it would
            // pass the bare event on as one more event).
            let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
            let message = v["message"]
                .as_str()
                .or_else(|| v["error"]["message"].as_str())
                .unwrap_or("the upstream stream failed");
            let e = ApiError::new(
                crate::error::ErrorKind::Upstream,
                format!(
                    "upstream stream failed: {}",
                    crate::proxy::sanitize_upstream_message(message)
                ),
            );
            self.failed = Some(e.message.clone());
            put_failure(out, None, &e, &mut self.seq);
            return;
        }
        out.put_slice(&ev.raw);
        let kind = match ev.event.as_deref() {
            Some(k) => k,
            None => {
                // No `event:` line: the type is in the data.
                return self.on_data(None, &ev.data);
            }
        };
        self.on_data(Some(kind), &ev.data);
    }

    fn on_data(&mut self, kind: Option<&str>, data: &str) {
        if matches!(
            kind,
            Some("response.output_text.delta" | "response.function_call_arguments.delta")
        ) {
            self.deltas += 1;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(s) = v["sequence_number"].as_u64() {
            self.seq = self.seq.max(s + 1);
        }
        let kind = kind.or_else(|| v["type"].as_str()).unwrap_or("");
        match kind {
            "response.created" => {
                if let Value::Object(r) = &v["response"] {
                    self.started = Some(r.clone());
                }
            }
            "response.completed" | "response.incomplete" => {
                self.finished = true;
                if let Some(u) = usage_of(&v["response"]) {
                    self.usage = u;
                }
                self.response = Some(v["response"].clone());
            }
            "response.failed" | "error" => {
                let message = v["response"]["error"]["message"]
                    .as_str()
                    .or_else(|| v["message"].as_str())
                    .or_else(|| v["error"]["message"].as_str())
                    .unwrap_or("the upstream stream failed");
                self.failed = Some(message.to_string());
                if let Some(u) = usage_of(&v["response"]) {
                    self.usage = u;
                }
            }
            "response.output_text.delta" | "response.function_call_arguments.delta" => {
                self.deltas += 1;
            }
            _ => {}
        }
    }

    /// Ends the stream with an error of the gateway's own (the upstream broke off).
    pub fn fail(&mut self, error: &ApiError, out: &mut BytesMut) {
        if self.finished || self.failed.is_some() {
            return;
        }
        self.failed = Some(error.message.clone());
        put_failure(out, self.started.take(), error, &mut self.seq);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::translate::sse::SseParser;

    fn events(bytes: &[u8]) -> Vec<(String, Value)> {
        let mut p = SseParser::default();
        p.push(bytes);
        let mut out = Vec::new();
        while let Some(ev) = p.next_event() {
            out.push((ev.event.unwrap(), serde_json::from_str(&ev.data).unwrap()));
        }
        out
    }

    fn chat(data: &str) -> SseEvent {
        let mut p = SseParser::default();
        p.push(format!("data: {data}\n\n").as_bytes());
        p.next_event().unwrap()
    }

    #[test]
    fn chat_chunks_become_responses_events() {
        let req = json!({"metadata": {"a": "b"}})
            .as_object()
            .cloned()
            .unwrap();
        let mut t = ChatToResponses::new("resp_1", "m", &req);
        let mut out = BytesMut::new();
        t.start(&mut out);
        t.on_chat_event(
            &chat(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#),
            &mut out,
        );
        t.on_chat_event(
            &chat(r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#),
            &mut out,
        );
        t.on_chat_event(
            &chat(r#"{"choices":[{"index":0,"delta":{"content":"lo"}}]}"#),
            &mut out,
        );
        t.on_chat_event(&chat(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"w","arguments":""}}]}}]}"#), &mut out);
        t.on_chat_event(&chat(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#), &mut out);
        t.on_chat_event(
            &chat(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#),
            &mut out,
        );
        t.on_chat_event(
            &chat(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}"#),
            &mut out,
        );
        t.on_chat_event(&chat("[DONE]"), &mut out);
        let ev = events(&out);
        let kinds: Vec<&str> = ev.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds[0], "response.created");
        assert!(kinds.contains(&"response.output_text.delta"));
        assert!(kinds.contains(&"response.function_call_arguments.delta"));
        assert_eq!(*kinds.last().unwrap(), "response.completed");
        for (i, (k, v)) in ev.iter().enumerate() {
            assert_eq!(v["type"], k.as_str());
            assert_eq!(v["sequence_number"], i);
        }
        let done = &ev.last().unwrap().1["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["output"][1]["call_id"], "call_1");
        assert_eq!(done["output"][1]["arguments"], "{}");
        assert_eq!(done["usage"]["input_tokens"], 5);
        assert_eq!(done["metadata"]["a"], "b");
        assert!(t.finished);
        assert_eq!(
            t.usage,
            Usage {
                input: 5,
                output: 3
            }
        );
    }

    #[test]
    fn a_chat_error_ends_with_failed_and_error() {
        let mut t = ChatToResponses::new("resp_1", "m", &Map::new());
        let mut out = BytesMut::new();
        t.start(&mut out);
        t.on_chat_event(
            &chat(r#"{"error":{"message":"boom","type":"api_error"}}"#),
            &mut out,
        );
        let ev = events(&out);
        assert_eq!(ev[2].0, "response.failed");
        assert_eq!(ev[3].0, "error");
        assert_eq!(ev[3].1["error"]["message"], "boom");
        assert!(t.failed.is_some());
    }

    #[test]
    fn the_watch_reads_usage_and_the_final_response() {
        let mut w = ResponsesWatch::default();
        let mut p = SseParser::default();
        p.push(b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"r\"}}\n\nevent: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"usage\":{\"input_tokens\":2,\"output_tokens\":1}}}\n\n");
        let mut out = BytesMut::new();
        while let Some(ev) = p.next_event() {
            w.on_event(&ev, &mut out);
        }
        assert!(w.finished);
        assert_eq!(
            w.usage,
            Usage {
                input: 2,
                output: 1
            }
        );
        assert_eq!(w.deltas, 1);
        assert_eq!(events(&out).len(), 3);
    }
}
