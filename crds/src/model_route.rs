//! `ModelRoute`: a model name clients can ask for, and how to serve it.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, SecretKeyRef};

/// A model name clients can ask for, the backends that serve it, and what to do when they
/// cannot.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "parley.dev",
    version = "v1alpha1",
    kind = "ModelRoute",
    namespaced,
    status = "ModelRouteStatus",
    shortname = "mr",
    category = "parley",
    doc = "A model name clients can ask for, and the backends, retries, fallbacks and prices that serve it.",
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model"),
    printcolumn(name = "Backends", type_ = "integer", json_path = ".status.backends"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.model) || !has(self.fallbacks) || !(self.model in self.fallbacks)").message("spec.fallbacks must not name the route's own model").field_path(".fallbacks"))]
#[x_kube(validation = Rule::new("!has(self.kind) || self.kind != 'embeddings' || self.backends.all(b, b.provider != 'anthropic')").message("spec.kind embeddings needs openai backends: Anthropic has no embeddings API").field_path(".kind"))]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteSpec {
    /// The model name clients send (`model` in a request) [`metadata.name`]. Two
    /// ModelRoutes a Chatbot selects must not serve the same model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub model: Option<String>,
    /// What the model does: `chat` (served on `/v1/chat/completions`, `/v1/messages`,
    /// `/v1/responses` and `/chat`) or `embeddings` (served on `/v1/embeddings`, priced per
    /// input token, openai backends only) [`chat`]. Each endpoint refuses a model of the
    /// other kind with 400, and a route's fallbacks must be of its kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ModelKind>,
    /// Upstream backends serving this model; traffic is split among them by weight.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub backends: Vec<Backend>,
    /// Other models tried, in order, when this one cannot serve (followed transitively,
    /// skipping models the tenant may not use). Each must be served by the Chatbot, and
    /// they must not form a cycle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    pub fallbacks: Vec<String>,
    /// Attempts on this model before falling back [2 attempts, backoff 100 ms to 2 s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Per-backend circuit breaker [5 failures open it for 30 s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Output tokens assumed when a request sets no `max_tokens`: sent upstream where the
    /// provider needs it (Anthropic), and reserved by token limits and budgets [4096].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_output_tokens: Option<u32>,
    /// Prices in USD per million tokens, for cost accounting and budgets [absent = free].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// Exact-match response cache, per tenant, for requests with `temperature: 0`
    /// [absent = off].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
}

/// An upstream LLM API endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.responsesApi) || !self.responsesApi || self.provider == 'openai'").message("responsesApi needs provider openai: only OpenAI-compatible backends serve the Responses API").field_path(".responsesApi"))]
#[x_kube(validation = Rule::new("!has(self.h2c) || !self.h2c || self.baseUrl.startsWith('http://')").message("h2c is HTTP/2 without TLS and needs an http:// baseUrl; https:// backends negotiate HTTP/2 by themselves").field_path(".h2c"))]
pub struct Backend {
    /// Unique name of the backend within the route (the `backend` label of metrics and the
    /// `x-parley-backend` response header).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The API the backend speaks.
    pub provider: Provider,
    /// Base URL including the version segment, e.g. `https://api.openai.com/v1`; the gateway
    /// appends `/chat/completions` (openai) or `/messages` (anthropic), or
    /// `/embeddings` for a model of kind embeddings.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub base_url: String,
    /// Model name sent upstream [the route's model].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub upstream_model: Option<String>,
    /// The Secret key holding the provider API key, sent as `Authorization: Bearer`
    /// (openai) or `x-api-key` (anthropic) [absent = no key sent]. A Tenant's
    /// `upstreamKeys` entry replaces it for that tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// Share of traffic among the route's backends; 0 means: only used when the others are
    /// unavailable [1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub weight: Option<u32>,
    /// Timeouts of a call to this backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// The backend also serves the OpenAI Responses API at `<baseUrl>/responses`
    /// (openai provider only): `/v1/responses` requests are passed to it as they are
    /// [false: translated to chat completions, or to Messages for anthropic].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses_api: Option<bool>,
    /// The backend at an `http://` `baseUrl` speaks HTTP/2 without TLS (h2c, prior
    /// knowledge), so its streams share connections instead of taking one each [false:
    /// HTTP/1.1; `https://` backends negotiate HTTP/2 by ALPN either way].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2c: Option<bool>,
}

/// The API the backend speaks: `openai` (any OpenAI-compatible chat completions API) or
/// `anthropic` (the Anthropic Messages API).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Any OpenAI-compatible chat completions API.
    Openai,
    /// The Anthropic Messages API.
    Anthropic,
}

/// What the model does: `chat` (served on `/v1/chat/completions`, `/v1/messages`,
/// `/v1/responses` and `/chat`) or `embeddings` (served on `/v1/embeddings`, priced per
/// input token, openai backends only) [`chat`]. Each endpoint refuses a model of the
/// other kind with 400, and a route's fallbacks must be of its kind.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A chat model: `/v1/chat/completions`, `/v1/messages`, `/v1/responses`, `/chat`.
    #[default]
    Chat,
    /// An embeddings model: `/v1/embeddings` (openai backends only).
    Embeddings,
}

impl ModelKind {
    /// The name used in configs and in `/v1/models`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Embeddings => "embeddings",
        }
    }

    /// "a chat" or "an embeddings", for messages ("... is an embeddings model").
    pub const fn with_article(self) -> &'static str {
        match self {
            Self::Chat => "a chat",
            Self::Embeddings => "an embeddings",
        }
    }
}

/// Timeouts in milliseconds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// TCP and TLS connect timeout [2000].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600_000))]
    pub connect_ms: Option<u64>,
    /// Time allowed until the response headers (non-stream) or first token (stream) [30000].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3_600_000))]
    pub first_token_ms: Option<u64>,
    /// Time allowed for the whole call [300000].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3_600_000))]
    pub total_ms: Option<u64>,
}

/// Retries on one model, with exponential backoff and jitter.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.initialBackoffMs) || !has(self.maxBackoffMs) || self.initialBackoffMs <= self.maxBackoffMs").message("retry.initialBackoffMs must not exceed retry.maxBackoffMs"))]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// All attempts on this model, the first included [2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: Option<u32>,
    /// Backoff before the second attempt [100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 600_000))]
    pub initial_backoff_ms: Option<u64>,
    /// Longest backoff between attempts [2000].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 600_000))]
    pub max_backoff_ms: Option<u64>,
}

/// A per-backend circuit breaker counting 5xx answers, timeouts and connection errors.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Consecutive failures that open the breaker [5].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub failure_threshold: Option<u32>,
    /// Seconds the breaker stays open before one probe request [30].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400))]
    pub open_seconds: Option<u64>,
}

/// Prices in USD per million tokens.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// USD per million input tokens, e.g. "2.50".
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    pub input_per_million_tokens: String,
    /// USD per million output tokens, e.g. "10.00".
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    pub output_per_million_tokens: String,
}

/// Exact-match response cache.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Cache {
    /// Seconds a cached response is served [300].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604_800))]
    pub ttl_seconds: Option<u64>,
}

/// Observed state of a ModelRoute.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Number of backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backends: Option<u32>,
}

impl ModelRoute {
    /// The model name clients send: `spec.model`, or `metadata.name`.
    pub fn model_name(&self) -> &str {
        match &self.spec.model {
            Some(model) => model,
            None => self.metadata.name.as_deref().unwrap_or_default(),
        }
    }
}
