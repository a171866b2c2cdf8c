//! `POST /v1/embeddings` (OpenAI): vectors from a model of kind `embeddings`, with the
//! same keys, limits, budgets, routing and accounting as the chat endpoints. Only input
//! tokens exist: admission reserves the input estimate (no output), the upstream's
//! `usage.prompt_tokens` settles it, and the ledger row has 0 output tokens.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use futures_util::FutureExt as _;
use parley_crds::gateway_config::ModelKind;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};

use super::{
    Ctx, admit, json_response, outlive_client, parse_object, require_kind, resolve_model,
    set_common,
};
use crate::accounting::Accounting;
use crate::error::{ApiError, ApiFormat};
use crate::overhead::UpstreamWait;
use crate::proxy::{ClientRequest, Served};
use crate::runtime::{Model, Runtime};
use crate::state::AppState;
use crate::translate::Usage;

/// Most inputs in one request (OpenAI's own limit).
pub const MAX_INPUTS: usize = 2048;
/// Bytes of prompt a token of a token array counts as at admission (the estimate is
/// about 4 bytes a token).
const BYTES_PER_TOKEN: usize = 4;

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut ctx = Ctx::new(&state, ApiFormat::OpenAi, "embeddings");
    let outcome = AssertUnwindSafe(serve(&mut ctx, headers, body))
        .catch_unwind()
        .await;
    ctx.respond_or_resume(outcome)
}

async fn serve(ctx: &mut Ctx, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (rt, ti, bytes) = super::caller_and_body(ctx, &headers, body).await?;
    let tenant = &rt.tenants[ti];
    let body = parse_object(&bytes)?;
    // No default model here: `defaultModel` is a chat model.
    let model_name = match body.get("model") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "`model` is required: name a model of kind embeddings (see GET /v1/models)",
            ));
        }
        Some(_) => return Err(ApiError::invalid("`model` must be a string")),
    };
    let prompt_bytes = check_request(&body)?;
    let (model, chain) = resolve_model(&rt, tenant, &model_name, ctx)?;
    require_kind(&model, ModelKind::Embeddings, "/v1/embeddings")?;
    let held = admit(&ctx.state, &rt, tenant, &model, prompt_bytes, Some(0), None).await?;
    let request_id = headers
        .get("x-request-id")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("none"));
    let req = ClientRequest {
        format: ApiFormat::OpenAi,
        body,
        stream: false,
        wants_usage: false,
        request_id,
        anthropic_beta: None,
    };
    let Some(mut acct) = ctx.acct.take() else {
        return Err(ApiError::invalid("request accounted twice"));
    };
    acct.held = held;
    let state = Arc::clone(&ctx.state);
    Ok(outlive_client(exchange(state, rt, ti, chain, req, acct)).await)
}

/// Checks `input`, `encoding_format` and `dimensions`; returns the prompt size in bytes
/// for the admission estimate (a token of a token array counts as
/// [`BYTES_PER_TOKEN`]). Other fields go upstream as they are.
fn check_request(body: &Map<String, Value>) -> Result<usize, ApiError> {
    let bytes = match body.get("input") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "`input` is required: a string, an array of strings, an array of token ids, or an array of such arrays",
            ));
        }
        Some(Value::String(s)) => check_text(s, "input")?,
        Some(Value::Array(items)) => check_items(items)?,
        Some(_) => {
            return Err(ApiError::invalid(
                "`input` must be a string, an array of strings, an array of token ids, or an array of such arrays",
            ));
        }
    };
    match body.get("encoding_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "float" || s == "base64" => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "`encoding_format` must be \"float\" or \"base64\", not {other}"
            )));
        }
    }
    match body.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64().is_some_and(|n| n >= 1) => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "`dimensions` must be an integer of at least 1, not {other}"
            )));
        }
    }
    Ok(bytes)
}

fn check_text(s: &str, field: &str) -> Result<usize, ApiError> {
    if s.is_empty() {
        return Err(ApiError::invalid(format!(
            "`{field}` must not be an empty string"
        )));
    }
    Ok(s.len())
}

fn check_tokens(tokens: &[Value], field: &str) -> Result<usize, ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::invalid(format!(
            "`{field}` must not be an empty token array"
        )));
    }
    if let Some(i) = tokens.iter().position(|t| t.as_u64().is_none()) {
        return Err(ApiError::invalid(format!(
            "`{field}[{i}]` must be a token id (an integer of at least 0)"
        )));
    }
    Ok(tokens.len() * BYTES_PER_TOKEN)
}

/// An array `input`: strings, or token ids, or arrays of token ids (not mixed).
fn check_items(items: &[Value]) -> Result<usize, ApiError> {
    match items.first() {
        None => Err(ApiError::invalid("`input` must not be an empty array")),
        Some(_) if items.len() > MAX_INPUTS => Err(ApiError::invalid(format!(
            "`input` has {} items; at most {MAX_INPUTS} are accepted: split the request",
            items.len()
        ))),
        Some(Value::Number(_)) => check_tokens(items, "input"),
        Some(_) => {
            let mut total = 0usize;
            for (i, item) in items.iter().enumerate() {
                let field = format!("input[{i}]");
                total += match item {
                    Value::String(s) => check_text(s, &field)?,
                    Value::Array(tokens) => check_tokens(tokens, &field)?,
                    _ => {
                        return Err(ApiError::invalid(format!(
                            "`{field}` must be a string or an array of token ids"
                        )));
                    }
                };
            }
            Ok(total)
        }
    }
}

/// What the gateway reads of an upstream embeddings answer: it must be a list with
/// `data`, and its usage is `usage.prompt_tokens` (output tokens are always 0).
#[derive(Deserialize)]
struct EmbeddingsOnly {
    #[allow(dead_code)]
    data: IgnoredAny,
    usage: EmbeddingsUsage,
}

#[derive(Deserialize)]
struct EmbeddingsUsage {
    prompt_tokens: u64,
}

/// The usage of an upstream embeddings body; `None` if it is not an embeddings list.
pub fn upstream_usage(body: &[u8]) -> Option<Usage> {
    let parsed: EmbeddingsOnly = serde_json::from_slice(body).ok()?;
    Some(Usage {
        input: parsed.usage.prompt_tokens,
        output: 0,
    })
}

/// The upstream call and everything after it (see [`outlive_client`]).
async fn exchange(
    state: Arc<AppState>,
    rt: Arc<Runtime>,
    ti: usize,
    chain: Vec<Arc<Model>>,
    req: ClientRequest,
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
            let mut resp = json_response(body);
            set_common(&mut resp, &by.model.name, &backend.name, overhead);
            acct.finish(200, usage);
            resp
        }
        // Never asked for: an embeddings request does not stream.
        Served::Stream(_) => {
            let e = ApiError::new(
                crate::error::ErrorKind::Upstream,
                "the upstream answered an embeddings request with a stream",
            );
            let status = e.status().as_u16();
            let mut resp = e.into_response_for(req.format);
            set_common(&mut resp, &by.model.name, &backend.name, overhead);
            acct.finish(status, Usage::default());
            resp
        }
    };
    resp.extensions_mut().insert(UpstreamWait(by.upstream_wait));
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn check(v: Value) -> Result<usize, String> {
        check_request(v.as_object().unwrap()).map_err(|e| e.message)
    }

    #[test]
    fn every_input_shape_is_accepted_and_sized() {
        assert_eq!(check(json!({"input": "hello"})), Ok(5));
        assert_eq!(check(json!({"input": ["ab", "cde"]})), Ok(5));
        assert_eq!(check(json!({"input": [1, 2, 3]})), Ok(12));
        assert_eq!(check(json!({"input": [[1, 2], [3]]})), Ok(12));
        assert_eq!(
            check(json!({"input": "x", "encoding_format": "base64", "dimensions": 8})),
            Ok(1)
        );
    }

    #[test]
    fn bad_requests_name_the_field() {
        for (body, needle) in [
            (json!({}), "`input` is required"),
            (json!({"input": ""}), "`input` must not be an empty string"),
            (json!({"input": []}), "`input` must not be an empty array"),
            (json!({"input": 3}), "`input` must be"),
            (json!({"input": ["a", 3]}), "`input[1]` must be"),
            (json!({"input": [1, "a"]}), "`input[1]` must be a token id"),
            (
                json!({"input": [[]]}),
                "`input[0]` must not be an empty token array",
            ),
            (json!({"input": [1, -2]}), "`input[1]` must be a token id"),
            (
                json!({"input": "a", "encoding_format": "int8"}),
                "`encoding_format`",
            ),
            (json!({"input": "a", "dimensions": 0}), "`dimensions`"),
        ] {
            let err = check(body.clone()).unwrap_err();
            assert!(err.contains(needle), "{body}: {err}");
        }
        let many = vec![json!("a"); MAX_INPUTS + 1];
        assert!(
            check(json!({"input": many}))
                .unwrap_err()
                .contains("at most 2048")
        );
    }

    #[test]
    fn upstream_usage_is_prompt_tokens_only() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}"#;
        let u = upstream_usage(body).unwrap();
        assert_eq!((u.input, u.output), (7, 0));
        assert!(upstream_usage(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#).is_none());
        assert!(upstream_usage(br#"{"data":[]}"#).is_none());
    }
}
