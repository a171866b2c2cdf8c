//! Errors a client can see, rendered in the shape of the API it called.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The API format a client speaks (and so the shape of its errors and streams).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiFormat {
    /// `/v1/chat/completions` and `/chat`.
    OpenAi,
    /// `/v1/messages`.
    Anthropic,
}

impl ApiFormat {
    /// Label value for metrics and cache keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }
}

/// What went wrong, as a category the client can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: malformed or unsupported request.
    InvalidRequest,
    /// 401: missing or unknown key.
    Authentication,
    /// 402: monthly budget spent.
    Budget,
    /// 403: model not allowed.
    Permission,
    /// 404: unknown model or path.
    NotFound,
    /// 413: body too large.
    TooLarge,
    /// 429: a limit refused the request.
    RateLimited,
    /// 500: a bug in the gateway (never on purpose).
    Internal,
    /// 502: upstream failed or rejected our key.
    Upstream,
    /// 503: no backend available.
    Unavailable,
    /// 504: upstream timed out.
    Timeout,
}

impl ErrorKind {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::Authentication => StatusCode::UNAUTHORIZED,
            Self::Budget => StatusCode::PAYMENT_REQUIRED,
            Self::Permission => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Upstream => StatusCode::BAD_GATEWAY,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn openai_type(self) -> &'static str {
        match self {
            Self::InvalidRequest | Self::NotFound | Self::TooLarge => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Budget => "insufficient_quota",
            Self::Permission => "permission_error",
            Self::RateLimited => "rate_limit_error",
            Self::Internal | Self::Upstream => "api_error",
            Self::Unavailable => "service_unavailable",
            Self::Timeout => "timeout",
        }
    }

    fn openai_code(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::Authentication => "invalid_api_key",
            Self::Budget => "budget_exceeded",
            Self::Permission => "model_not_allowed",
            Self::NotFound => "model_not_found",
            Self::TooLarge => "request_too_large",
            Self::RateLimited => "rate_limit_exceeded",
            Self::Internal => "internal_error",
            Self::Upstream => "upstream_error",
            Self::Unavailable => "no_backend_available",
            Self::Timeout => "upstream_timeout",
        }
    }

    fn anthropic_type(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request_error",
            Self::Authentication => "authentication_error",
            Self::Budget => "billing_error",
            Self::Permission => "permission_error",
            Self::NotFound => "not_found_error",
            Self::TooLarge => "request_too_large",
            Self::RateLimited => "rate_limit_error",
            Self::Internal | Self::Upstream => "api_error",
            Self::Unavailable => "overloaded_error",
            Self::Timeout => "timeout_error",
        }
    }
}

/// An error answered to a client.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// The category (and so the status).
    pub kind: ErrorKind,
    /// What happened and what to fix.
    pub message: String,
    /// Whole seconds until a refused request could pass (429).
    pub retry_after: Option<u64>,
    /// `x-ratelimit-*` headers (429).
    pub rate_headers: Vec<(&'static str, String)>,
    /// Status to use instead of the kind's (an upstream 4xx passed through).
    pub status_override: Option<StatusCode>,
}

impl ApiError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
            rate_headers: Vec::new(),
            status_override: None,
        }
    }

    /// 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    /// The status sent.
    pub fn status(&self) -> StatusCode {
        self.status_override.unwrap_or(self.kind.status())
    }

    /// The JSON body in the shape of `format`.
    pub fn body(&self, format: ApiFormat) -> serde_json::Value {
        match format {
            ApiFormat::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "code": self.kind.openai_code(),
                "param": null,
            }}),
            ApiFormat::Anthropic => json!({"type": "error", "error": {
                "type": self.kind.anthropic_type(),
                "message": self.message,
            }}),
        }
    }

    /// One SSE event that ends a stream in the SDK's own error format.
    pub fn stream_event(&self, format: ApiFormat) -> String {
        let body = self.body(format);
        match format {
            ApiFormat::OpenAi => format!("data: {body}\n\n"),
            ApiFormat::Anthropic => format!("event: error\ndata: {body}\n\n"),
        }
    }

    /// The HTTP response in the shape of `format`.
    pub fn into_response_for(self, format: ApiFormat) -> Response {
        let body = self.body(format).to_string();
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        for (name, value) in &self.rate_headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(*name, v);
            }
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status().as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shapes_follow_the_api() {
        let e = ApiError::new(ErrorKind::NotFound, "model \"x\" does not exist");
        let o = e.body(ApiFormat::OpenAi);
        assert_eq!(o["error"]["type"], "invalid_request_error");
        assert_eq!(o["error"]["code"], "model_not_found");
        let a = e.body(ApiFormat::Anthropic);
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "not_found_error");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert!(
            e.stream_event(ApiFormat::Anthropic)
                .starts_with("event: error\n")
        );
    }
}
