//! `POST /chat`: the session API. The request carries only the new turn(s); the gateway
//! puts the Chatbot's system prompt and the stored history before them, stores the new
//! turns with the reply, and answers `{session_id, reply, model, usage}`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt as _;
use parley_crds::gateway_config::ModelKind;
use serde_json::{Map, Value, json};

use super::{
    Ctx, MAX_MESSAGES, admit, json_response, outlive_client, parse_object, resolve_model,
    set_common,
};
use crate::accounting::Accounting;
use crate::error::{ApiError, ApiFormat, ErrorKind};
use crate::overhead::UpstreamWait;
use crate::proxy::{self, ClientRequest, Served};
use crate::runtime::{Model, Runtime};
use crate::state::AppState;
use crate::store::Store;
use crate::translate::Usage;

/// `POST /chat`.
pub async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let mut ctx = Ctx::new(&state, ApiFormat::OpenAi, "chat");
    let outcome = AssertUnwindSafe(serve(&mut ctx, headers, body))
        .catch_unwind()
        .await;
    ctx.respond_or_resume(outcome)
}

/// Bytes `v` takes as JSON (counted, not written).
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

async fn serve(ctx: &mut Ctx, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    // Who is calling, from the headers alone: an unknown client's body is never read.
    let (rt, ti, bytes) = super::caller_and_body(ctx, &headers, body).await?;
    let tenant = &rt.tenants[ti];
    let input = parse_chat(parse_object(&bytes)?, &rt.config.default_model)?;
    let (model, chain) = resolve_model(&rt, tenant, &input.model, ctx)?;
    super::require_kind(&model, ModelKind::Chat, "/chat")?;
    let ttl = Duration::from_secs(rt.config.sessions.ttl_seconds);
    let history = Store::of(&ctx.state, &rt)
        .session_load(&tenant.id, &input.session_id, ttl)
        .await?;
    // What is really sent: system prompt + history + the new turns.
    let mut messages = Vec::with_capacity(history.len() + input.messages.len() + 1);
    if let Some(sp) = &rt.config.system_prompt {
        messages.push(json!({"role": "system", "content": sp}));
    }
    messages.extend(history);
    messages.extend(input.messages.iter().cloned());
    let prompt_bytes: usize = messages.iter().map(json_len).sum();
    let mut req_body = Map::new();
    req_body.insert("model".into(), Value::String(input.model.clone()));
    req_body.insert("messages".into(), Value::Array(messages));
    if let Some(m) = input.max_tokens {
        req_body.insert("max_tokens".into(), Value::from(m));
    }
    let session = rt
        .config
        .sessions
        .requests_per_minute
        .map(|rpm| (input.session_id.as_str(), rpm));
    let held = admit(
        &ctx.state,
        &rt,
        tenant,
        &model,
        prompt_bytes,
        input.max_tokens,
        session,
    )
    .await?;
    let req = ClientRequest {
        format: ApiFormat::OpenAi,
        body: req_body,
        stream: false,
        wants_usage: false,
        request_id: headers
            .get("x-request-id")
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("none")),
        anthropic_beta: None,
    };
    let Some(mut acct) = ctx.acct.take() else {
        return Err(ApiError::invalid("request accounted twice"));
    };
    acct.held = held;
    let state = Arc::clone(&ctx.state);
    Ok(outlive_client(exchange(state, rt, ti, model, chain, req, input, acct)).await)
}

/// The upstream call, storing the turn and answering, in a task of its own.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    state: Arc<AppState>,
    rt: Arc<Runtime>,
    ti: usize,
    model: Arc<Model>,
    chain: Vec<Arc<Model>>,
    req: ClientRequest,
    input: ChatInput,
    mut acct: Accounting,
) -> Response {
    let start = acct.start();
    let tenant = &rt.tenants[ti];
    let fail = |e: ApiError, model: &str, wait: Duration, acct: &mut Accounting, usage| {
        let status = e.status().as_u16();
        let mut resp = e.into_response_for(ApiFormat::OpenAi);
        set_common(
            &mut resp,
            model,
            "none",
            start.elapsed().saturating_sub(wait),
        );
        resp.extensions_mut().insert(UpstreamWait(wait));
        acct.finish(status, usage);
        resp
    };
    let (body, usage, by) = match proxy::route(&state, tenant, &chain, &req).await {
        Err((e, wait)) => {
            return fail(e, &model.name, wait, &mut acct, Usage::default());
        }
        Ok((Served::Stream(_), by)) => {
            let e = ApiError::new(ErrorKind::Internal, "unexpected stream");
            return fail(
                e,
                &by.model.name,
                by.upstream_wait,
                &mut acct,
                Usage::default(),
            );
        }
        Ok((Served::Full { body, usage }, by)) => (body, usage, by),
    };
    let backend = &by.model.backends[by.backend];
    acct.model = Arc::clone(&by.model.name);
    acct.backend = Arc::clone(&backend.name);
    acct.price = Some(by.model.price);
    let completion: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let message = &completion["choices"][0]["message"];
    let reply = match &message["content"] {
        Value::String(s) => s.clone(),
        _ => String::new(),
    };
    let mut stored = input.messages;
    let mut assistant = Map::new();
    assistant.insert("role".into(), json!("assistant"));
    assistant.insert("content".into(), Value::String(reply.clone()));
    if let Some(calls) = message.get("tool_calls").filter(|c| !c.is_null()) {
        assistant.insert("tool_calls".into(), calls.clone());
    }
    stored.push(Value::Object(assistant));
    let sessions = rt.config.sessions;
    // A turn that cannot be stored is an error: answering 200 would let the client
    // believe the conversation goes on with it. The upstream's usage is still charged.
    if let Err(e) = Store::of(&state, &rt)
        .session_append(
            &tenant.id,
            &input.session_id,
            stored,
            sessions.max_messages as usize,
            Duration::from_secs(sessions.ttl_seconds),
        )
        .await
    {
        return fail(e, &by.model.name, by.upstream_wait, &mut acct, usage);
    }
    let out = json!({
        "session_id": input.session_id,
        "reply": reply,
        "model": by.model.name.as_str(),
        "usage": {"prompt_tokens": usage.input, "completion_tokens": usage.output,
                  "total_tokens": usage.input.saturating_add(usage.output)},
    });
    let mut resp = json_response(Bytes::from(out.to_string()));
    set_common(
        &mut resp,
        &by.model.name,
        &backend.name,
        start.elapsed().saturating_sub(by.upstream_wait),
    );
    resp.extensions_mut().insert(UpstreamWait(by.upstream_wait));
    acct.finish(200, usage);
    resp
}

struct ChatInput {
    session_id: String,
    messages: Vec<Value>,
    model: String,
    max_tokens: Option<u64>,
}

fn parse_chat(mut body: Map<String, Value>, default_model: &str) -> Result<ChatInput, ApiError> {
    for key in body.keys() {
        if !matches!(
            key.as_str(),
            "session_id" | "messages" | "model" | "max_tokens"
        ) {
            return Err(ApiError::invalid(format!(
                "unknown field `{key}`; /chat takes session_id, messages, model and max_tokens"
            )));
        }
    }
    let session_id = match body.remove("session_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s,
        _ => {
            return Err(ApiError::invalid(
                "`session_id` is required: a non-empty string of at most 256 characters",
            ));
        }
    };
    let messages = match body.remove("messages") {
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        Some(Value::Array(m)) if !m.is_empty() && m.len() <= MAX_MESSAGES => m,
        _ => {
            return Err(ApiError::invalid(
                "`messages` is required: an array with the new turn(s) of the conversation",
            ));
        }
    };
    for (i, m) in messages.iter().enumerate() {
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant" | "tool") => {}
            _ => {
                return Err(ApiError::invalid(format!(
                    "`messages[{i}].role` must be user, assistant or tool (the system prompt is set by the gateway)"
                )));
            }
        }
    }
    let model = match body.remove("model") {
        None | Some(Value::Null) => default_model.to_string(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(ApiError::invalid("`model` must be a string")),
    };
    let max_tokens = match body.remove("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::invalid("`max_tokens` must be a positive integer"))?,
        ),
    };
    Ok(ChatInput {
        session_id,
        messages,
        model,
        max_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_counts_the_serialised_bytes() {
        let v = json!({"role": "user", "content": "héllo"});
        assert_eq!(json_len(&v), v.to_string().len());
    }
}
