//! `GET /v1/models`: the models this tenant may use (Anthropic's list shape when the
//! client sends `anthropic-version`), each with its `kind` (`chat` or `embeddings`: the
//! endpoints that serve it).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use super::{Ctx, authenticate, json_response};
use crate::error::{ApiError, ApiFormat};
use crate::state::AppState;

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let anthropic = headers.contains_key("anthropic-version");
    let format = if anthropic {
        ApiFormat::Anthropic
    } else {
        ApiFormat::OpenAi
    };
    // Not a chat request: answered without accounting.
    list(&state, &headers, anthropic).unwrap_or_else(|e| e.into_response_for(format))
}

fn list(state: &Arc<AppState>, headers: &HeaderMap, anthropic: bool) -> Result<Response, ApiError> {
    let rt = Ctx::runtime_of(state)?;
    let tenant = &rt.tenants[authenticate(&rt, headers)?];
    let mut models: Vec<(&str, &str)> = rt
        .models
        .iter()
        .filter(|(name, _)| tenant.may_use(name))
        .map(|(name, m)| (name.as_str(), m.config.kind.as_str()))
        .collect();
    models.sort_unstable();
    let body = if anthropic {
        let data: Vec<Value> = models
            .iter()
            .map(|(n, kind)| json!({"type": "model", "id": n, "display_name": n, "created_at": "1970-01-01T00:00:00Z", "kind": kind}))
            .collect();
        json!({"data": data, "has_more": false, "first_id": models.first().map(|m| m.0), "last_id": models.last().map(|m| m.0)})
    } else {
        let data: Vec<Value> = models
            .iter()
            .map(|(n, kind)| json!({"id": n, "object": "model", "created": 0, "owned_by": "parley", "kind": kind}))
            .collect();
        json!({"object": "list", "data": data})
    };
    Ok(json_response(Bytes::from(body.to_string())))
}
