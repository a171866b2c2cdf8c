//! The `GatewayConfig` document (`apiVersion: parley.dev/gateway/v1`): what the operator
//! renders into the gateway's ConfigMap and what `parley-gateway --config` reads.
//!
//! Every struct refuses unknown fields, so a typo is an error that names the field rather
//! than a setting silently ignored. Defaults match the CRD defaults; the operator writes
//! every value explicitly so a rendered config reads on its own.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::chatbot::FailureMode;
pub use crate::model_route::{ModelKind, Provider};
use crate::money::{InvalidUsd, parse_usd_micros};

/// The only `apiVersion` this build reads and writes.
pub const API_VERSION: &str = "parley.dev/gateway/v1";

/// The whole gateway configuration: one YAML document. What the operator renders into the
/// `config.yaml` key of ConfigMap `<chatbot>-gateway`, and what
/// `parley-gateway --config FILE` reads and watches.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// Always `parley.dev/gateway/v1`; a document with another version is refused.
    pub api_version: String,
    /// The Chatbot this gateway serves, `<namespace>/<name>` [`default/parley`]: part of
    /// every Redis key (so two Chatbots sharing a Redis and a Tenant share no limits,
    /// sessions or cache entries), and of ledger rows and logs. The operator renders it.
    #[serde(default = "default_chatbot")]
    pub chatbot: String,
    /// `HOST:PORT` of the chat API (`/v1/chat/completions`, `/v1/messages`, `/v1/models`,
    /// `/chat`). Checked at load: the port is 0-65535. A change takes effect at the next
    /// start, not on reload.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `HOST:PORT` of the admin listener: `/healthz`, `/readyz`, `/metrics` and `/admin/usage`. Must
    /// differ from `listen`. A change takes effect at the next start, not on reload.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Directory that relative `{file: ...}` secret paths resolve against [the config
    /// file's directory]; a relative `secretsDir` resolves against the config file's
    /// directory. Rendered configs say `/var/run/parley/secrets`, where a gateway pod
    /// mounts every Secret key it needs as the file `<secret>/<key>`.
    /// `parley-gateway --secrets-dir DIR` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_dir: Option<PathBuf>,
    /// Model used when a request names none; must be one of `models`.
    pub default_model: String,
    /// System prompt put before the stored history of every `/chat` session request.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// The models clients can ask for (one per ModelRoute), each with its backends.
    pub models: Vec<ModelConfig>,
    /// Who may call: each tenant's API keys, allowed models, limits and budget. A request
    /// whose key belongs to no tenant is refused with 401.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Shared state for limits, `/chat` sessions and the response cache, so that replicas
    /// share them; `null` keeps them in the process (right for one replica only).
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// What limits do while Redis is unreachable: `open` admits requests without limits,
    /// `closed` refuses them with 503.
    #[serde(default)]
    pub rate_limit_failure_mode: FailureMode,
    /// The `/chat` session API.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Usage ledger in PostgreSQL: one row per request (refused and failed ones included)
    /// in table `parley_usage`, written in batches off the request path; `null` = usage is
    /// in the Prometheus metrics only. Also feeds `GET /admin/usage` on the admin listener
    /// and, without Redis, the month's budget spend after a restart.
    #[serde(default)]
    pub usage: Option<UsageConfig>,
    /// Browser access; `null` sends no CORS headers.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// Request size limits.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Where a secret (an API key, a URL with a password) comes from: a map with exactly one of
/// `file`, `env` or `value`. A file that does not exist (yet) makes that one key unusable
/// (logged once, the rest of the config serves, the file is watched): a missing
/// `redis.url` works like an unreachable Redis, a missing `usage.postgresUrl` writes no
/// ledger rows until it appears.
#[derive(Serialize, Deserialize, JsonSchema, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(try_from = "SecretSourceFields", into = "SecretSourceFields")]
pub enum SecretSource {
    /// A file; a relative path resolves against `secretsDir`. Re-read when it changes.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A literal, for local use only.
    Value(String),
}

/// Where a secret (an API key, a URL with a password) comes from: exactly one of `file`,
/// `env` or `value`. Surrounding whitespace is trimmed from what is read.
#[derive(Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
struct SecretSourceFields {
    /// A file holding the secret; a relative path resolves against `secretsDir`. Rendered
    /// configs name `<secret>/<key>`, the file a pod's projected volume holds for key `key`
    /// of Secret `secret`. Watched: a rotated file is read again without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
    /// The name of an environment variable holding the secret (read at each load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env: Option<String>,
    /// The secret itself, for local use only (it is never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

impl TryFrom<SecretSourceFields> for SecretSource {
    type Error = &'static str;

    fn try_from(fields: SecretSourceFields) -> Result<Self, Self::Error> {
        match fields {
            SecretSourceFields {
                file: Some(path),
                env: None,
                value: None,
            } => Ok(Self::File(path)),
            SecretSourceFields {
                file: None,
                env: Some(name),
                value: None,
            } => Ok(Self::Env(name)),
            SecretSourceFields {
                file: None,
                env: None,
                value: Some(v),
            } => Ok(Self::Value(v)),
            _ => Err("a secret source takes exactly one of `file`, `env` or `value`"),
        }
    }
}

impl From<SecretSource> for SecretSourceFields {
    fn from(source: SecretSource) -> Self {
        match source {
            SecretSource::File(path) => Self {
                file: Some(path),
                ..Self::default()
            },
            SecretSource::Env(name) => Self {
                env: Some(name),
                ..Self::default()
            },
            SecretSource::Value(v) => Self {
                value: Some(v),
                ..Self::default()
            },
        }
    }
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Env(name) => f.debug_tuple("Env").field(name).finish(),
            Self::Value(_) => f.write_str("Value(<redacted>)"),
        }
    }
}

/// One model clients can ask for: a ModelRoute, flattened, with every default written out.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`; unique in the config.
    #[schemars(length(min = 1))]
    pub name: String,
    /// `chat` (served on `/v1/chat/completions`, `/v1/messages`, `/v1/responses`, `/chat`)
    /// or `embeddings` (served on `/v1/embeddings`; openai backends only; priced per input
    /// token). An endpoint refuses a model of the other kind with 400; fallbacks must be
    /// of the same kind, and `defaultModel` must be a chat model.
    #[serde(default)]
    pub kind: ModelKind,
    /// Upstream backends, chosen by weight among those whose circuit breaker is closed.
    #[schemars(length(min = 1))]
    pub backends: Vec<BackendConfig>,
    /// Other models tried, in order, when this one cannot serve (followed transitively,
    /// skipping models the tenant may not use); each must be a model of this config, and
    /// they must not form a cycle.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Attempts on this model before its fallbacks are tried.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The circuit breaker of each backend of this model.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Output tokens assumed when a request sets no `max_tokens`: sent upstream where the
    /// provider needs it (Anthropic), and reserved by token limits and budgets.
    #[serde(default = "default_max_output_tokens")]
    #[schemars(range(min = 1))]
    pub max_output_tokens: u32,
    /// Prices, for cost accounting and budgets; `null` = free.
    #[serde(default)]
    pub pricing: Option<PricingConfig>,
    /// Exact-match response cache for requests with `temperature: 0`; `null` = off.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
}

/// One upstream endpoint of a model.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// Name, unique within the model (the `backend` label of metrics, and the
    /// `x-parley-backend` response header).
    pub name: String,
    /// The API it speaks: `openai` (any OpenAI-compatible chat completions API) or
    /// `anthropic` (the Messages API).
    pub provider: Provider,
    /// Base URL including the version segment, e.g. `https://api.openai.com/v1`; the gateway
    /// appends `/chat/completions` (openai) or `/messages` (anthropic), or
    /// `/embeddings` for a model of kind embeddings. Must start with
    /// `http://` or `https://`.
    pub base_url: String,
    /// Model name sent upstream [the model's `name`].
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Provider API key, sent as `Authorization: Bearer` (openai) or `x-api-key`
    /// (anthropic); `null` sends none. A tenant's `upstreamKeys` entry replaces it.
    #[serde(default)]
    pub api_key: Option<SecretSource>,
    /// Share of traffic among the model's backends; 0 = only used when the others are
    /// unavailable.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Timeouts of a call to this backend.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// The backend also serves the OpenAI Responses API at `<baseUrl>/responses`
    /// (openai provider only): `/v1/responses` requests are passed to it as Responses
    /// requests. Otherwise (the default) they are translated to chat completions, or to
    /// Messages for anthropic backends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub responses_api: bool,
    /// The backend at an `http://` `baseUrl` speaks HTTP/2 without TLS (h2c, prior
    /// knowledge): its requests and streams share connections instead of taking one each
    /// (about 6 KiB of gateway memory per open stream instead of about 35). Only for servers
    /// that accept h2c; `https://` backends negotiate HTTP/2 by ALPN anyway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub h2c: bool,
}

/// Timeouts of one upstream call, in milliseconds; each at least 1.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP and TLS connect.
    #[serde(default = "default_connect_ms")]
    #[schemars(range(min = 1))]
    pub connect_ms: u64,
    /// Until the response headers (non-stream) or the first token (stream).
    #[serde(default = "default_first_token_ms")]
    #[schemars(range(min = 1))]
    pub first_token_ms: u64,
    /// The whole call, streams included.
    #[serde(default = "default_total_ms")]
    #[schemars(range(min = 1))]
    pub total_ms: u64,
}

/// Retries on one model, with exponential backoff and jitter. `Retry-After` from the
/// upstream is honoured; when it is longer than `maxBackoffMs` the gateway moves on to the
/// fallbacks at once. 429, 5xx, timeouts and connection errors are retried, 400-class
/// answers are not.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// All attempts on this model, the first included; at least 1.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1))]
    pub max_attempts: u32,
    /// Backoff before the second attempt; must not exceed `maxBackoffMs`.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest backoff between attempts.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

/// Per-backend circuit breaker. It counts 5xx answers, timeouts and connection errors (not
/// 429s); while open the backend gets no traffic, then one probe request decides.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the breaker; at least 1.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1))]
    pub failure_threshold: u32,
    /// Seconds the breaker stays open before one probe request.
    #[serde(default = "default_open_seconds")]
    pub open_seconds: u64,
}

/// Prices in USD per million tokens, as decimal strings (up to 6 decimal places; money is
/// counted in integer micro-USD).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PricingConfig {
    /// USD per million input tokens, e.g. `"2.50"`.
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    pub input_per_million_tokens: String,
    /// USD per million output tokens, e.g. `"10.00"`.
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    pub output_per_million_tokens: String,
}

impl PricingConfig {
    /// `(input, output)` in micro-USD per million tokens.
    pub fn micros_per_million(&self) -> Result<(i64, i64), InvalidUsd> {
        Ok((
            parse_usd_micros(&self.input_per_million_tokens)?,
            parse_usd_micros(&self.output_per_million_tokens)?,
        ))
    }
}

/// Exact-match response cache, per tenant. Only requests with an explicit `temperature: 0`
/// are cached; the key covers the API format, model, system prompt, messages, tools,
/// `response_format`, `stop`, `max_tokens`, `seed` and `n`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheConfig {
    /// Seconds an entry is served.
    #[serde(default = "default_cache_ttl")]
    pub ttl_seconds: u64,
}

/// One tenant: a Tenant, flattened.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantConfig {
    /// `namespace/name`, unique in the config; the `tenant` label of metrics, and part of
    /// every Redis key of this tenant.
    pub id: String,
    /// Human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Keys that authenticate as this tenant (`Authorization: Bearer KEY` or
    /// `x-api-key: KEY`); at least one. Two tenants must not share a key.
    #[schemars(length(min = 1))]
    pub api_keys: Vec<SecretSource>,
    /// Models the tenant may use (empty = all); each must be a model of this config. Other
    /// models are refused with 403 and skipped as fallbacks.
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Tenant-wide limits; `null` = unlimited.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Per-model limits, in addition to the tenant-wide ones; each `model` must be a model
    /// of this config.
    #[serde(default)]
    pub model_quotas: Vec<ModelQuotaConfig>,
    /// Monthly spend cap; `null` = none.
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    /// Tenant-owned provider keys, used instead of the backend's `apiKey` for this
    /// tenant's requests; each must name a model of this config and one of its backends.
    #[serde(default)]
    pub upstream_keys: Vec<UpstreamKeyConfig>,
    /// Largest request body this tenant may send, in bytes (1 to 64 MiB); absent =
    /// `limits.maxBodyBytes`. A larger one is answered 413. Its key is checked first, so
    /// an unknown client's body is never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

/// Sliding-window limits of a tenant, all models together: a per-minute limit of N admits
/// at most N requests in any 60 seconds. An absent limit is unlimited.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Requests in any hour (counted in sixty sub-windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_hour: Option<u64>,
    /// Requests in any day (counted in sixty sub-windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u64>,
    /// Input plus output tokens in any 60 seconds: the prompt estimate plus `max_tokens`
    /// (or `maxOutputTokens`) is reserved at admission and settled to real usage after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

/// Limits of the tenant on one model, in addition to its tenant-wide limits.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelQuotaConfig {
    /// The model; must be a model of this config.
    pub model: String,
    /// Requests in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Tokens in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

/// Monthly spend cap: once spent, requests are refused with 402 until the next month.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetConfig {
    /// USD per calendar month (UTC), a decimal string, e.g. `"500.00"`.
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    pub monthly_usd: String,
}

/// A tenant-owned provider key for one backend of one model.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamKeyConfig {
    /// The model; must be a model of this config.
    pub model: String,
    /// The backend of that model whose key this replaces.
    pub backend: String,
    /// The tenant's provider key.
    pub api_key: SecretSource,
}

/// Redis connection.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL of one Redis, or `redis+cluster://host:port,host:port`
    /// (`rediss+cluster://` with TLS) naming seed nodes of a Redis Cluster; credentials
    /// included (never logged). While its file
    /// does not exist, the gateway behaves as with Redis unreachable
    /// (`rateLimitFailureMode`, `/chat` 503, no cache).
    pub url: SecretSource,
}

/// The `/chat` session API: the gateway keeps each session's history (per tenant and
/// session id) and sends it with every new turn.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionsConfig {
    /// Seconds a session lives after its last use.
    #[serde(default = "default_session_ttl")]
    pub ttl_seconds: u64,
    /// Messages kept per session (the oldest are dropped, never separating a tool call
    /// from its result); at least 2.
    #[serde(default = "default_session_max_messages")]
    #[schemars(range(min = 2))]
    pub max_messages: u32,
    /// Requests per minute per session; `null` = no session limit.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
}

/// Usage ledger in PostgreSQL. The gateway creates its table (embedded migrations) at
/// start; PostgreSQL being down never fails or slows a request (rows wait in a bounded
/// queue).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsageConfig {
    /// PostgreSQL URL (`postgres://user:password@host:port/db`, `?sslmode=require` for
    /// TLS), credentials included (never logged).
    pub postgres_url: SecretSource,
}

/// CORS: which browser origins may call the chat API (preflight requests are answered by
/// the gateway).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins, e.g. `https://app.example.com`.
    pub allowed_origins: Vec<String>,
}

/// Request size limits.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted request body in bytes; a larger one is answered 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
}

/// Default of `chatbot`.
pub fn default_chatbot() -> String {
    "default/parley".into()
}
/// Checks a `chatbot` value: `<namespace>/<name>`, each a Kubernetes name (lowercase
/// letters, digits, `-` and `.`; at most 253 characters).
pub fn check_chatbot(text: &str) -> Result<(), String> {
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.'])
    };
    match text.split_once('/') {
        Some((ns, name)) if name_ok(ns) && name_ok(name) => Ok(()),
        _ => Err(format!(
            "chatbot: {text:?} must be <namespace>/<name> of the Chatbot (lowercase letters, digits, '-' and '.'), e.g. prod/support"
        )),
    }
}
fn default_listen() -> String {
    "0.0.0.0:8080".into()
}
fn default_admin_listen() -> String {
    "0.0.0.0:9090".into()
}
/// Default of `maxOutputTokens`.
pub const fn default_max_output_tokens() -> u32 {
    4096
}
/// Default backend weight.
pub const fn default_weight() -> u32 {
    1
}
const fn default_connect_ms() -> u64 {
    2_000
}
const fn default_first_token_ms() -> u64 {
    30_000
}
const fn default_total_ms() -> u64 {
    300_000
}
const fn default_max_attempts() -> u32 {
    2
}
const fn default_initial_backoff_ms() -> u64 {
    100
}
const fn default_max_backoff_ms() -> u64 {
    2_000
}
const fn default_failure_threshold() -> u32 {
    5
}
const fn default_open_seconds() -> u64 {
    30
}
const fn default_cache_ttl() -> u64 {
    300
}
const fn default_session_ttl() -> u64 {
    3_600
}
const fn default_session_max_messages() -> u32 {
    50
}
/// The largest `tenants[].maxBodyBytes` (64 MiB).
pub const MAX_TENANT_BODY_BYTES: u64 = 64 * 1024 * 1024;

const fn default_max_body_bytes() -> u64 {
    1_048_576
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: default_connect_ms(),
            first_token_ms: default_first_token_ms(),
            total_ms: default_total_ms(),
        }
    }
}
impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}
impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            open_seconds: default_open_seconds(),
        }
    }
}
impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl_seconds: default_cache_ttl(),
        }
    }
}
impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            ttl_seconds: default_session_ttl(),
            max_messages: default_session_max_messages(),
            requests_per_minute: None,
        }
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
        }
    }
}

/// Why a GatewayConfig was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, a wrong type, or an unknown field.
    #[error("invalid GatewayConfig: {0}")]
    Parse(String),
    /// `apiVersion` missing or not one this build reads.
    #[error("unsupported apiVersion {found:?}: this gateway reads {API_VERSION:?}")]
    ApiVersion {
        /// What the document said.
        found: String,
    },
    /// Well-formed but inconsistent; every problem found, one per line.
    #[error("invalid GatewayConfig:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl GatewayConfig {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config = Self::from_yaml_unchecked(text)?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Parses a YAML document (version, shape, types, unknown fields) without the
    /// consistency checks of [`GatewayConfig::problems`].
    pub fn from_yaml_unchecked(text: &str) -> Result<Self, ConfigError> {
        // The typed parse alone on the way that matters (a config with tens of thousands
        // of tenants is read on every reload); the generic tree only to explain a refusal.
        let error = match serde_yaml::from_str::<Self>(text) {
            Ok(config) if config.api_version == API_VERSION => return Ok(config),
            Ok(config) => {
                return Err(ConfigError::ApiVersion {
                    found: config.api_version,
                });
            }
            Err(e) => e.to_string(),
        };
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        match value.get("apiVersion").and_then(|v| v.as_str()) {
            Some(API_VERSION) => {}
            found => {
                return Err(ConfigError::ApiVersion {
                    found: found.unwrap_or_default().to_string(),
                });
            }
        }
        // serde stops at the first unknown field: name them all, then whatever else serde
        // found.
        let mut problems = unknown_fields(&value);
        if problems.is_empty() {
            return Err(ConfigError::Parse(error));
        }
        if !error.contains("unknown field") {
            problems.push(error);
        }
        Err(ConfigError::Invalid(problems))
    }

    /// Serialises to YAML: the exact text the operator puts in the ConfigMap.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    /// The model of this name.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Every inconsistency, each naming the field to fix.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = check_chatbot(&self.chatbot) {
            problems.push(e);
        }
        for (field, value) in [
            ("listen", &self.listen),
            ("adminListen", &self.admin_listen),
        ] {
            if let Err(e) = check_listen_address(value) {
                problems.push(format!("{field}: {value:?} {e}"));
            }
        }
        if self.listen == self.admin_listen && !self.listen.ends_with(":0") {
            problems.push(format!(
                "adminListen: {:?} is also the address of listen; give the admin listener its own port",
                self.admin_listen
            ));
        }
        let mut names = HashSet::new();
        for (i, model) in self.models.iter().enumerate() {
            if model.name.is_empty() {
                problems.push(format!("models[{i}].name must not be empty"));
            }
            if !names.insert(model.name.as_str()) {
                problems.push(format!(
                    "models[{i}].name: model {:?} is defined twice",
                    model.name
                ));
            }
            if model.backends.is_empty() {
                problems.push(format!(
                    "models[{i}] ({}): backends must list at least one backend",
                    model.name
                ));
            }
            let mut backend_names = HashSet::new();
            for (j, backend) in model.backends.iter().enumerate() {
                if !backend_names.insert(backend.name.as_str()) {
                    problems.push(format!(
                        "models[{i}].backends[{j}].name: backend {:?} is defined twice in model {:?}",
                        backend.name, model.name
                    ));
                }
                if !(backend.base_url.starts_with("http://")
                    || backend.base_url.starts_with("https://"))
                {
                    problems.push(format!(
                        "models[{i}].backends[{j}].baseUrl: {:?} must start with http:// or https://",
                        backend.base_url
                    ));
                }
                if model.kind == ModelKind::Embeddings && backend.provider == Provider::Anthropic {
                    problems.push(format!(
                        "models[{i}].backends[{j}].provider: model {:?} has kind embeddings, but Anthropic has no embeddings API; use an openai backend or kind chat",
                        model.name
                    ));
                }
                if backend.h2c && !backend.base_url.starts_with("http://") {
                    problems.push(format!(
                        "models[{i}].backends[{j}].h2c: h2c is HTTP/2 without TLS and needs an http:// baseUrl; https:// backends negotiate HTTP/2 by themselves, remove it"
                    ));
                }
                if backend.responses_api && backend.provider != Provider::Openai {
                    problems.push(format!(
                        "models[{i}].backends[{j}].responsesApi: only openai backends can speak the Responses API; remove it"
                    ));
                }
                let t = backend.timeouts;
                if t.connect_ms == 0 || t.first_token_ms == 0 || t.total_ms == 0 {
                    problems.push(format!(
                        "models[{i}].backends[{j}].timeouts: every timeout must be at least 1 ms"
                    ));
                }
            }
            if model.retry.max_attempts == 0 {
                problems.push(format!("models[{i}].retry.maxAttempts must be at least 1"));
            }
            if model.retry.initial_backoff_ms > model.retry.max_backoff_ms {
                problems.push(format!(
                    "models[{i}].retry.initialBackoffMs must not exceed maxBackoffMs"
                ));
            }
            if model.circuit_breaker.failure_threshold == 0 {
                problems.push(format!(
                    "models[{i}].circuitBreaker.failureThreshold must be at least 1"
                ));
            }
            if let Some(pricing) = &model.pricing
                && let Err(e) = pricing.micros_per_million()
            {
                problems.push(format!("models[{i}].pricing: {e}"));
            }
        }
        for (i, model) in self.models.iter().enumerate() {
            for (j, fallback) in model.fallbacks.iter().enumerate() {
                match self.model(fallback) {
                    None => problems.push(format!(
                        "models[{i}].fallbacks[{j}]: {fallback:?} is not a model of this config"
                    )),
                    Some(f) if f.kind != model.kind => problems.push(format!(
                        "models[{i}].fallbacks[{j}]: {fallback:?} is {} model and cannot stand in for {:?}, {} model",
                        f.kind.with_article(),
                        model.name,
                        model.kind.with_article()
                    )),
                    Some(_) => {}
                }
            }
        }
        let graph: BTreeMap<&str, &[String]> = self
            .models
            .iter()
            .map(|m| (m.name.as_str(), m.fallbacks.as_slice()))
            .collect();
        if let Some(cycle) = fallback_cycle(&graph) {
            problems.push(format!(
                "models: fallbacks form a cycle: {}",
                cycle.join(" -> ")
            ));
        }
        if !names.contains(self.default_model.as_str()) {
            problems.push(format!(
                "defaultModel: {:?} is not a model of this config",
                self.default_model
            ));
        } else if self
            .model(&self.default_model)
            .is_some_and(|m| m.kind != ModelKind::Chat)
        {
            problems.push(format!(
                "defaultModel: {:?} is an embeddings model; the default serves chat requests that name no model, so pick a chat model",
                self.default_model
            ));
        }
        let mut ids = HashSet::new();
        for (i, tenant) in self.tenants.iter().enumerate() {
            if !ids.insert(tenant.id.as_str()) {
                problems.push(format!(
                    "tenants[{i}].id: tenant {:?} is defined twice",
                    tenant.id
                ));
            }
            if tenant.api_keys.is_empty() {
                problems.push(format!(
                    "tenants[{i}].apiKeys: tenant {:?} has no key",
                    tenant.id
                ));
            }
            if let Some(budget) = &tenant.budget
                && let Err(e) = parse_usd_micros(&budget.monthly_usd)
            {
                problems.push(format!("tenants[{i}].budget.monthlyUsd: {e}"));
            }
            if let Some(n) = tenant.max_body_bytes
                && !(1..=MAX_TENANT_BODY_BYTES).contains(&n)
            {
                problems.push(format!(
                    "tenants[{i}].maxBodyBytes: {n} is out of range; give 1 to {MAX_TENANT_BODY_BYTES} bytes (64 MiB)"
                ));
            }
            let unknown = |model: &str| !names.contains(model);
            for (j, model) in tenant.allowed_models.iter().enumerate() {
                if unknown(model) {
                    problems.push(format!(
                        "tenants[{i}].allowedModels[{j}]: tenant {:?} allows {model:?}, which is not a model of this config",
                        tenant.id
                    ));
                }
            }
            for (j, quota) in tenant.model_quotas.iter().enumerate() {
                if unknown(&quota.model) {
                    problems.push(format!(
                        "tenants[{i}].modelQuotas[{j}].model: tenant {:?} has a quota for {:?}, which is not a model of this config",
                        tenant.id, quota.model
                    ));
                }
            }
            for (j, key) in tenant.upstream_keys.iter().enumerate() {
                match self.model(&key.model) {
                    None => problems.push(format!(
                        "tenants[{i}].upstreamKeys[{j}].model: tenant {:?} has a key for {:?}, which is not a model of this config",
                        tenant.id, key.model
                    )),
                    Some(model) if !model.backends.iter().any(|b| b.name == key.backend) => {
                        problems.push(format!(
                            "tenants[{i}].upstreamKeys[{j}].backend: tenant {:?} has a key for backend {:?} of model {:?}, which has no such backend",
                            tenant.id, key.backend, key.model
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        if self.sessions.max_messages < 2 {
            problems.push("sessions.maxMessages must be at least 2".into());
        }
        problems
    }
}

/// Every key of a GatewayConfig document that its schema does not have, each with its path
/// and the keys allowed there.
fn unknown_fields(value: &serde_yaml::Value) -> Vec<String> {
    fn resolve<'a>(
        root: &'a serde_json::Value,
        node: &'a serde_json::Value,
    ) -> &'a serde_json::Value {
        let mut node = node;
        for _ in 0..8 {
            if let Some(name) = node["$ref"].as_str().and_then(|r| r.rsplit('/').next()) {
                node = &root["$defs"][name];
            } else if let Some(branch) = node["anyOf"]
                .as_array()
                .and_then(|a| a.iter().find(|b| b["type"] != "null"))
            {
                node = branch;
            } else {
                break;
            }
        }
        node
    }
    fn walk(
        root: &serde_json::Value,
        node: &serde_json::Value,
        value: &serde_yaml::Value,
        path: &str,
        out: &mut Vec<String>,
    ) {
        let node = resolve(root, node);
        match value {
            serde_yaml::Value::Mapping(map) => {
                let Some(props) = node["properties"].as_object() else {
                    return;
                };
                for (key, child) in map {
                    let Some(key) = key.as_str() else { continue };
                    let here = if path.is_empty() {
                        key.to_string()
                    } else {
                        format!("{path}.{key}")
                    };
                    match props.get(key) {
                        Some(schema) => walk(root, schema, child, &here, out),
                        None => out.push(format!(
                            "{here}: unknown field `{key}`; expected one of: {}",
                            props.keys().cloned().collect::<Vec<_>>().join(", ")
                        )),
                    }
                }
            }
            serde_yaml::Value::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(root, &node["items"], item, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let Ok(schema) = serde_json::to_value(schemars::schema_for!(GatewayConfig)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(&schema, &schema, value, "", &mut out);
    out
}

/// Checks a `HOST:PORT` listen address without resolving it: an IP address (IPv6 in
/// brackets) or a host name, and a port from 0 to 65535.
pub fn check_listen_address(text: &str) -> Result<(), String> {
    if text.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("is not HOST:PORT (e.g. 0.0.0.0:8080)".into());
    };
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "has no valid port: {port:?} is not a number from 0 to 65535"
        ));
    }
    let hostname = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if hostname {
        Ok(())
    } else {
        Err(format!(
            "has no valid host: {host:?} is neither an IP address (IPv6 in brackets) nor a host name"
        ))
    }
}

/// Finds a cycle in the fallback graph (model -> its fallbacks), returned as the path that
/// closes it, e.g. `["a", "b", "a"]`. Unknown names are ignored. Deterministic: models are
/// visited in name order.
pub fn fallback_cycle<S: AsRef<str>>(graph: &BTreeMap<&str, &[S]>) -> Option<Vec<String>> {
    fn visit<'a, S: AsRef<str>>(
        node: &'a str,
        graph: &BTreeMap<&'a str, &'a [S]>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = path[pos..].iter().map(|s| s.to_string()).collect();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        if let Some(next) = graph.get(node) {
            for fallback in next.iter() {
                if let Some((key, _)) = graph.get_key_value(fallback.as_ref())
                    && let Some(cycle) = visit(key, graph, path, done)
                {
                    return Some(cycle);
                }
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = visit(node, graph, &mut path, &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MINIMAL: &str = r#"
apiVersion: parley.dev/gateway/v1
defaultModel: gpt-4o
models:
- name: gpt-4o
  backends:
  - {name: primary, provider: openai, baseUrl: "http://127.0.0.1:1/v1", apiKey: {value: sk-test}}
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = GatewayConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(config.listen, "0.0.0.0:8080");
        assert_eq!(config.admin_listen, "0.0.0.0:9090");
        let model = &config.models[0];
        assert_eq!(model.retry.max_attempts, 2);
        assert_eq!(model.max_output_tokens, 4096);
        assert_eq!(model.backends[0].weight, 1);
        assert_eq!(model.backends[0].timeouts.total_ms, 300_000);
        assert_eq!(config.limits.max_body_bytes, 1_048_576);
        assert_eq!(config.sessions.max_messages, 50);
    }

    #[test]
    fn chatbot_defaults_and_is_checked() {
        let config = GatewayConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(config.chatbot, "default/parley");
        let ok = format!("{MINIMAL}chatbot: prod/support-bot\n");
        assert_eq!(
            GatewayConfig::from_yaml(&ok).unwrap().chatbot,
            "prod/support-bot"
        );
        for bad in [
            "support", "prod/", "/x", "a/b/c", "Prod/x", "p/{x}", "p/x y",
        ] {
            let text = format!("{MINIMAL}chatbot: {bad:?}\n");
            let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
            assert!(err.contains("chatbot:"), "{bad}: {err}");
        }
    }

    #[test]
    fn round_trips() {
        let config = GatewayConfig::from_yaml(MINIMAL).unwrap();
        let again = GatewayConfig::from_yaml(&config.to_yaml().unwrap()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn unknown_fields_are_named() {
        let text = MINIMAL.replace("defaultModel", "defaultModle");
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("defaultModle"), "{err}");
        let text = MINIMAL
            .replace("weight", "wieght")
            .replace("apiKey:", "wieght: 1, apiKey:");
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("wieght"), "{err}");
    }

    #[test]
    fn every_unknown_field_is_named_with_its_path() {
        let text = MINIMAL
            .replace("defaultModel", "defaultModle")
            .replace("apiKey:", "wieght: 1, apiKey:")
            .replace("sk-test}", "sk-test, fiel: x}");
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        for needle in [
            "defaultModle: unknown field `defaultModle`; expected one of:",
            "models[0].backends[0].wieght: unknown field",
            "models[0].backends[0].apiKey.fiel: unknown field `fiel`; expected one of: env, file, value",
        ] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
    }

    #[test]
    fn unknown_version_is_refused() {
        let text = MINIMAL.replace("gateway/v1", "gateway/v9");
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("gateway/v9"), "{err}");
        // A version from elsewhere is named before the shape it does not share with ours.
        let err = GatewayConfig::from_yaml("apiVersion: v2\nroutes: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported apiVersion \"v2\""), "{err}");
        let err =
            GatewayConfig::from_yaml(&MINIMAL.replace("apiVersion: parley.dev/gateway/v1", ""))
                .unwrap_err()
                .to_string();
        assert!(err.contains("unsupported apiVersion \"\""), "{err}");
        let err = GatewayConfig::from_yaml("models: [")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid GatewayConfig:"), "{err}");
    }

    #[test]
    fn literal_secrets_are_not_debug_printed() {
        let config = GatewayConfig::from_yaml(MINIMAL).unwrap();
        assert!(!format!("{config:?}").contains("sk-test"));
    }

    #[test]
    fn inconsistencies_are_all_reported() {
        let text = format!(
            "{MINIMAL}  fallbacks: [gpt-4o-mini]\n  retry: {{maxAttempts: 0}}\ntenants:\n- {{id: a/b, apiKeys: [], budget: {{monthlyUsd: \"1,5\"}}}}\n- {{id: a/c, apiKeys: [{{value: k}}], maxBodyBytes: 0}}\n"
        );
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        for needle in [
            "fallbacks[0]",
            "maxAttempts",
            "apiKeys",
            "monthlyUsd",
            "tenants[1].maxBodyBytes: 0 is out of range",
        ] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
    }

    #[test]
    fn listen_addresses_are_checked_at_load() {
        let text = format!("{MINIMAL}listen: 127.0.0.1:80800\nadminListen: ':9090'\n");
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("listen: \"127.0.0.1:80800\""), "{err}");
        assert!(err.contains("0 to 65535"), "{err}");
        assert!(err.contains("adminListen: \":9090\""), "{err}");
        for ok in [
            "0.0.0.0:8080",
            "[::1]:0",
            "localhost:9090",
            "gateway.local:80",
        ] {
            assert_eq!(check_listen_address(ok), Ok(()), "{ok}");
        }
        for bad in [
            "8080",
            "127.0.0.1",
            "127.0.0.1:-1",
            "a b:80",
            "[::1:80",
            "host:65536",
        ] {
            assert!(check_listen_address(bad).is_err(), "{bad}");
        }
        let text = format!("{MINIMAL}listen: 127.0.0.1:8080\nadminListen: 127.0.0.1:8080\n");
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("adminListen"), "{err}");
    }

    #[test]
    fn tenant_entries_naming_no_model_are_refused() {
        let text = format!(
            "{MINIMAL}tenants:\n- id: ns/acme\n  apiKeys: [{{value: k}}]\n  allowedModels: [gpt-4o, gpt-5]\n  modelQuotas: [{{model: gtp-4o, requestsPerMinute: 1}}]\n  upstreamKeys:\n  - {{model: gpt-4o, backend: secondary, apiKey: {{value: x}}}}\n  - {{model: o3, backend: primary, apiKey: {{value: x}}}}\n"
        );
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        for needle in [
            "tenants[0].allowedModels[1]: tenant \"ns/acme\" allows \"gpt-5\"",
            "tenants[0].modelQuotas[0].model: tenant \"ns/acme\" has a quota for \"gtp-4o\"",
            "tenants[0].upstreamKeys[0].backend: tenant \"ns/acme\" has a key for backend \"secondary\"",
            "tenants[0].upstreamKeys[1].model: tenant \"ns/acme\" has a key for \"o3\"",
        ] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
        assert!(!err.contains("allowedModels[0]"), "{err}");
    }

    #[test]
    fn the_schema_documents_every_field() {
        let schema = serde_json::to_value(schemars::schema_for!(GatewayConfig)).unwrap();
        let props = &schema["properties"];
        for field in ["apiVersion", "listen", "secretsDir", "models", "limits"] {
            assert!(props[field]["description"].is_string(), "{field}: {schema}");
        }
        assert_eq!(props["listen"]["default"], "0.0.0.0:8080");
        // A secret source is a map with one of three keys, not the Rust enum.
        let secret = &schema["$defs"]["SecretSource"]["properties"];
        assert!(
            secret["file"].is_object() && secret["env"].is_object(),
            "{schema}"
        );
    }

    #[test]
    fn model_kind_defaults_to_chat_and_is_checked() {
        let config = GatewayConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(config.models[0].kind, ModelKind::Chat);
        let text = format!(
            "{MINIMAL}  fallbacks: [embed]\n- name: embed\n  kind: embeddings\n  fallbacks: [gpt-4o]\n  backends:\n  - {{name: a, provider: anthropic, baseUrl: 'http://127.0.0.1:1/v1'}}\n  - {{name: o, provider: openai, baseUrl: 'http://127.0.0.1:1/v1'}}\n"
        );
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        for needle in [
            "models[1].backends[0].provider: model \"embed\" has kind embeddings, but Anthropic has no embeddings API",
            "models[0].fallbacks[0]: \"embed\" is an embeddings model and cannot stand in for \"gpt-4o\", a chat model",
            "models[1].fallbacks[0]: \"gpt-4o\" is a chat model",
        ] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
        assert!(!err.contains("backends[1]"), "{err}");
        let text = format!(
            "{MINIMAL}- name: embed\n  kind: embeddings\n  backends:\n  - {{name: o, provider: openai, baseUrl: 'http://127.0.0.1:1/v1'}}\n"
        );
        let config = GatewayConfig::from_yaml(&text).unwrap();
        assert_eq!(config.model("embed").unwrap().kind, ModelKind::Embeddings);
        let again = GatewayConfig::from_yaml(&config.to_yaml().unwrap()).unwrap();
        assert_eq!(config, again);
        let err =
            GatewayConfig::from_yaml(&text.replace("defaultModel: gpt-4o", "defaultModel: embed"))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("defaultModel: \"embed\" is an embeddings model"),
            "{err}"
        );
        let err = GatewayConfig::from_yaml(&text.replace("kind: embeddings", "kind: vectors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vectors"), "{err}");
    }

    #[test]
    fn finds_fallback_cycles() {
        let a = vec!["b".to_string()];
        let b = vec!["c".to_string()];
        let c = vec!["a".to_string()];
        let graph: BTreeMap<&str, &[String]> = [
            ("a", a.as_slice()),
            ("b", b.as_slice()),
            ("c", c.as_slice()),
        ]
        .into();
        assert_eq!(fallback_cycle(&graph).unwrap(), vec!["a", "b", "c", "a"]);
        let c = vec![];
        let graph: BTreeMap<&str, &[String]> = [
            ("a", a.as_slice()),
            ("b", b.as_slice()),
            ("c", c.as_slice()),
        ]
        .into();
        assert_eq!(fallback_cycle(&graph), None);
    }
}
