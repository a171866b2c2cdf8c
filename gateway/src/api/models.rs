//! `GET /v1/models`: the models this tenant may use (Anthropic's list shape when the
//! client sends `anthropic-version`).

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
    let mut names: Vec<&str> = rt
        .models
        .keys()
        .map(String::as_str)
        .filter(|m| tenant.may_use(m))
        .collect();
    names.sort_unstable();
    let body = if anthropic {
        let data: Vec<Value> = names
            .iter()
            .map(|n| json!({"type": "model", "id": n, "display_name": n, "created_at": "1970-01-01T00:00:00Z"}))
            .collect();
        json!({"data": data, "has_more": false, "first_id": names.first(), "last_id": names.last()})
    } else {
        let data: Vec<Value> = names
            .iter()
            .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "parley"}))
            .collect();
        json!({"object": "list", "data": data})
    };
    Ok(json_response(Bytes::from(body.to_string())))
}
