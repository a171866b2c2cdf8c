//! Admission: who is calling (from the headers alone, by the SHA-256 digest of the key),
//! and whether the limits and the budget let the request through, decided through the
//! state seam (`store::Store`) in one step.

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorKind};
use crate::limits::{LimitRequest, Refusal, RefusalKind};
use crate::metrics::RefusalLabels;
use crate::runtime::{Model, Runtime, Tenant, cost_at};
use crate::state::AppState;
use crate::store::{Held, Store};

/// The key a request carries: `Authorization: Bearer <key>` or `x-api-key: <key>`.
fn api_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let b = v.as_bytes();
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(b[7..].trim_ascii());
        }
    }
    headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii())
}

/// The tenant (its index in `rt.tenants`) whose key the headers carry. Decided from the
/// headers alone, before any byte of the body is read.
pub fn authenticate(rt: &Runtime, headers: &HeaderMap) -> Result<usize, ApiError> {
    let Some(key) = api_key(headers).filter(|k| !k.is_empty()) else {
        return Err(ApiError::new(
            ErrorKind::Authentication,
            "missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`",
        ));
    };
    let digest: [u8; 32] = Sha256::digest(key).into();
    rt.keys.get(&digest).copied().ok_or_else(|| {
        ApiError::new(
            ErrorKind::Authentication,
            "invalid API key: check the key you were given",
        )
    })
}

/// Input-token estimate (about 4 bytes a token) of `bytes` of prompt.
pub fn estimate_prompt_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// `max_completion_tokens` or `max_tokens`.
pub fn requested_max_tokens(body: &Map<String, Value>) -> Option<u64> {
    body.get("max_completion_tokens")
        .and_then(Value::as_u64)
        .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
}

/// Admission through the state seam: reserves `prompt_bytes / 4` input tokens plus
/// `max_out` (or the model's `maxOutputTokens`), at the highest price on the fallback
/// chain. A refusal becomes 429 (with `Retry-After` and `x-ratelimit-*`), 402 or 503.
pub async fn admit(
    state: &AppState,
    rt: &Runtime,
    tenant: &Tenant,
    model: &Model,
    prompt_bytes: usize,
    max_out: Option<u64>,
    session: Option<(&str, u64)>,
) -> Result<Held, ApiError> {
    let prompt = estimate_prompt_tokens(prompt_bytes);
    let max_out = max_out.unwrap_or(u64::from(model.config.max_output_tokens));
    let req = LimitRequest {
        tenant: &tenant.id,
        rate_limit: tenant.rate_limit.as_ref(),
        quota: tenant.quotas.get(model.name.as_str()),
        model: &model.name,
        session,
        tokens: prompt.saturating_add(max_out),
        budget_micros: tenant.budget_micros,
        cost_micros: cost_at(model.chain_price, prompt, max_out),
    };
    Store::of(state, rt)
        .admit(&req)
        .await
        .map_err(|refusal| refused(state, tenant, refusal))
}

fn refused(state: &AppState, tenant: &Tenant, refusal: Refusal) -> ApiError {
    let (kind, limit) = match refusal.kind {
        RefusalKind::Rate => (ErrorKind::RateLimited, "rate"),
        RefusalKind::Budget => (ErrorKind::Budget, "budget"),
        RefusalKind::Unavailable => (ErrorKind::Unavailable, "unavailable"),
    };
    state
        .metrics
        .refusals
        .get_or_create(&RefusalLabels {
            tenant: Arc::clone(&tenant.id),
            limit,
        })
        .inc();
    let mut e = ApiError::new(kind, refusal.message);
    match refusal.kind {
        RefusalKind::Unavailable => e.retry_after = Some(refusal.retry_after),
        RefusalKind::Rate => {
            let unit = if refusal.unit == "tokens" {
                "tokens"
            } else {
                "requests"
            };
            e.retry_after = Some(refusal.retry_after);
            e.rate_headers = vec![
                (
                    if unit == "tokens" {
                        "x-ratelimit-limit-tokens"
                    } else {
                        "x-ratelimit-limit-requests"
                    },
                    refusal.limit.to_string(),
                ),
                (
                    if unit == "tokens" {
                        "x-ratelimit-remaining-tokens"
                    } else {
                        "x-ratelimit-remaining-requests"
                    },
                    "0".into(),
                ),
                (
                    if unit == "tokens" {
                        "x-ratelimit-reset-tokens"
                    } else {
                        "x-ratelimit-reset-requests"
                    },
                    format!("{}s", refusal.retry_after),
                ),
            ];
        }
        RefusalKind::Budget => {}
    }
    e
}
