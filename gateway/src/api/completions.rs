//! `POST /v1/chat/completions` (OpenAI) and `POST /v1/messages` (Anthropic).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use futures_util::FutureExt as _;
use parley_crds::gateway_config::ModelKind;
use serde_json::{Map, Value, json};

use super::{
    Ctx, MAX_MESSAGES, admit, fresh_answer, json_response, observe_ttft, outlive_client,
    parse_object, requested_max_tokens, resolve_model, set_common,
};
use crate::accounting::Accounting;
use crate::cache;
use crate::error::{ApiError, ApiFormat};
use crate::metrics::ResultLabel;
use crate::overhead::UpstreamWait;
use crate::proxy::{ClientRequest, Served};
use crate::runtime::{Model, Runtime};
use crate::state::AppState;
use crate::store::Store;
use crate::translate::Usage;

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut ctx = Ctx::new(&state, ApiFormat::OpenAi, "openai");
    let outcome = AssertUnwindSafe(serve(&mut ctx, headers, body))
        .catch_unwind()
        .await;
    ctx.respond_or_resume(outcome)
}

/// `POST /v1/messages`.
pub async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut ctx = Ctx::new(&state, ApiFormat::Anthropic, "anthropic");
    let outcome = AssertUnwindSafe(serve(&mut ctx, headers, body))
        .catch_unwind()
        .await;
    ctx.respond_or_resume(outcome)
}

async fn serve(ctx: &mut Ctx, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let format = ctx.format;
    // Who is calling, from the headers alone: an unknown client's body is never read.
    let (rt, ti, bytes) = super::caller_and_body(ctx, &headers, body).await?;
    let tenant = &rt.tenants[ti];
    let mut body = parse_object(&bytes)?;
    check_messages(&body)?;
    let model_name = match body.get("model") {
        None | Some(Value::Null) => rt.config.default_model.clone(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::invalid("`model` must be a string")),
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("`stream` must be true or false")),
    };
    if let Some(acct) = ctx.acct.as_mut() {
        acct.stream = stream;
    }
    let (model, chain) = resolve_model(&rt, tenant, &model_name, ctx)?;
    let endpoint = match format {
        ApiFormat::OpenAi => "/v1/chat/completions",
        ApiFormat::Anthropic => "/v1/messages",
    };
    super::require_kind(&model, ModelKind::Chat, endpoint)?;
    // The Chatbot's persona goes first, before the client's own system message.
    let prompt_bytes = match rt.config.system_prompt.as_deref() {
        Some(sp) => {
            apply_system_prompt(&mut body, format, sp);
            bytes.len() + sp.len()
        }
        None => bytes.len(),
    };
    let max_out = requested_max_tokens(&body);
    let held = admit(&ctx.state, &rt, tenant, &model, prompt_bytes, max_out, None).await?;
    let wants_usage = format == ApiFormat::OpenAi
        && body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    // Cache: explicit temperature 0 on a route with a cache, non-streaming. The key
    // covers the effective system prompt (it is in `body` now).
    let zero_temperature = body.get("temperature").and_then(Value::as_f64) == Some(0.0);
    let cache_key = (model.config.cache.is_some() && !stream && zero_temperature)
        .then(|| cache::key(&tenant.id, format, &model.name, &body));
    let request_id = headers
        .get("x-request-id")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("none"));
    let req = ClientRequest {
        format,
        body,
        stream,
        wants_usage,
        request_id,
        anthropic_beta: headers.get("anthropic-beta").cloned(),
    };
    let Some(mut acct) = ctx.acct.take() else {
        return Err(ApiError::invalid("request accounted twice"));
    };
    acct.held = held;
    if let Some(key) = &cache_key
        && let Some(hit) = Store::of(&ctx.state, &rt)
            .cache_get(&rt, &tenant.id, key)
            .await
    {
        return Ok(cache_hit(&ctx.state, acct, hit));
    }
    if cache_key.is_some() {
        cache_lookup(&ctx.state, "miss");
    }
    let state = Arc::clone(&ctx.state);
    Ok(outlive_client(exchange(state, rt, ti, model, chain, req, cache_key, acct)).await)
}

fn cache_lookup(state: &AppState, result: &'static str) {
    state
        .metrics
        .cache
        .get_or_create(&ResultLabel { result })
        .inc();
}

fn cache_hit(state: &AppState, mut acct: Accounting, hit: cache::Entry) -> Response {
    cache_lookup(state, "hit");
    acct.cache_hit = true;
    acct.model = Arc::clone(&hit.model);
    acct.backend = Arc::clone(&hit.backend);
    // Not charged again.
    acct.price = None;
    let mut resp = json_response(hit.body);
    set_common(&mut resp, &hit.model, &hit.backend, acct.start().elapsed());
    resp.headers_mut()
        .insert("x-parley-cache", HeaderValue::from_static("hit"));
    acct.finish(200, Usage::default());
    resp
}

/// The upstream call and everything after it, in a task of its own.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    state: Arc<AppState>,
    rt: Arc<Runtime>,
    ti: usize,
    model: Arc<Model>,
    chain: Vec<Arc<Model>>,
    req: ClientRequest,
    cache_key: Option<[u8; 32]>,
    mut acct: Accounting,
) -> Response {
    let start = acct.start();
    let tenant = &rt.tenants[ti];
    let (served, by) =
        match super::call_upstream(&state, tenant, &chain, &req, None, &mut acct).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
    let backend = &by.model.backends[by.backend];
    let overhead = start.elapsed().saturating_sub(by.upstream_wait);
    let mut resp = match served {
        Served::Full { body, usage } => {
            let mut resp = fresh_answer(
                &Store::of(&state, &rt),
                tenant,
                &model,
                cache_key,
                (&by.model.name, &backend.name),
                body,
                usage,
                &mut acct,
            );
            set_common(&mut resp, &by.model.name, &backend.name, overhead);
            resp
        }
        Served::Stream(start_state) => {
            observe_ttft(&state, &by.model.name, start);
            let mut resp = super::stream::response(*start_state, acct);
            set_common(&mut resp, &by.model.name, &backend.name, overhead);
            resp
        }
    };
    resp.extensions_mut().insert(UpstreamWait(by.upstream_wait));
    resp
}

fn check_messages(body: &Map<String, Value>) -> Result<usize, ApiError> {
    match body.get("messages") {
        Some(Value::Array(m)) if m.is_empty() => Err(ApiError::invalid(
            "`messages` must contain at least one message",
        )),
        Some(Value::Array(m)) if m.len() > MAX_MESSAGES => Err(ApiError::invalid(format!(
            "`messages` has {} messages; at most {MAX_MESSAGES} are accepted: shorten the conversation",
            m.len()
        ))),
        Some(Value::Array(m)) => {
            for (i, msg) in m.iter().enumerate() {
                if !msg.get("role").is_some_and(Value::is_string) {
                    return Err(ApiError::invalid(format!(
                        "`messages[{i}].role` is required and must be a string"
                    )));
                }
            }
            Ok(m.len())
        }
        Some(_) => Err(ApiError::invalid("`messages` must be an array")),
        None => Err(ApiError::invalid("`messages` is required")),
    }
}

/// Puts the Chatbot's system prompt before the client's own system message, as Kong's
/// prompt decorator does: OpenAI gets a first `system` message; Anthropic's `system`
/// becomes the prompt followed by the client's (as text blocks, so the client's
/// `cache_control` marks survive).
pub fn apply_system_prompt(body: &mut Map<String, Value>, format: ApiFormat, prompt: &str) {
    match format {
        ApiFormat::OpenAi => {
            if let Some(Value::Array(messages)) = body.get_mut("messages") {
                messages.insert(0, json!({"role": "system", "content": prompt}));
            }
        }
        ApiFormat::Anthropic => {
            let ours = json!({"type": "text", "text": prompt});
            let system = match body.remove("system") {
                None | Some(Value::Null) => Value::String(prompt.to_string()),
                Some(Value::String(s)) if s.is_empty() => Value::String(prompt.to_string()),
                Some(Value::String(s)) => json!([ours, {"type": "text", "text": s}]),
                Some(Value::Array(mut blocks)) => {
                    blocks.insert(0, ours);
                    Value::Array(blocks)
                }
                // Not a valid `system`: left for the upstream (or translation) to refuse.
                Some(other) => other,
            };
            body.insert("system".into(), system);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn system_prompt_goes_first_in_either_format() {
        let mut o = json!({"messages": [{"role": "system", "content": "client"}, {"role": "user", "content": "hi"}]})
            .as_object()
            .cloned()
            .unwrap();
        apply_system_prompt(&mut o, ApiFormat::OpenAi, "persona");
        assert_eq!(
            o["messages"][0],
            json!({"role": "system", "content": "persona"})
        );
        assert_eq!(o["messages"][1]["content"], "client");
        let mut a = json!({"system": "client", "messages": []})
            .as_object()
            .cloned()
            .unwrap();
        apply_system_prompt(&mut a, ApiFormat::Anthropic, "persona");
        assert_eq!(a["system"][0]["text"], "persona");
        assert_eq!(a["system"][1]["text"], "client");
        let mut b = json!({"messages": []}).as_object().cloned().unwrap();
        apply_system_prompt(&mut b, ApiFormat::Anthropic, "persona");
        assert_eq!(b["system"], "persona");
        let mut c = json!({"system": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}], "messages": []})
            .as_object()
            .cloned()
            .unwrap();
        apply_system_prompt(&mut c, ApiFormat::Anthropic, "persona");
        assert_eq!(c["system"][0]["text"], "persona");
        assert_eq!(c["system"][1]["cache_control"]["type"], "ephemeral");
    }

    #[test]
    fn the_cache_key_covers_the_system_prompt() {
        let base = json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
            .as_object()
            .cloned()
            .unwrap();
        let mut a = base.clone();
        apply_system_prompt(&mut a, ApiFormat::OpenAi, "one");
        let mut b = base.clone();
        apply_system_prompt(&mut b, ApiFormat::OpenAi, "two");
        let key = |m: &Map<String, Value>| cache::key("t", ApiFormat::OpenAi, "m", m);
        assert_ne!(key(&a), key(&b));
        assert_ne!(key(&a), key(&base));
    }
}
