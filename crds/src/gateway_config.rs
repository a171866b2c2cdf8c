//! The `GatewayConfig` document (`apiVersion: parley.dev/gateway/v1`): what the operator
//! renders into the gateway's ConfigMap and what `parley-gateway --config` reads.
//!
//! Every struct refuses unknown fields, so a typo is an error that names the field rather
//! than a setting silently ignored. Defaults match the CRD defaults; the operator writes
//! every value explicitly so a rendered config reads on its own.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::chatbot::FailureMode;
pub use crate::model_route::Provider;
use crate::money::{InvalidUsd, parse_usd_micros};

/// The only `apiVersion` this build reads and writes.
pub const API_VERSION: &str = "parley.dev/gateway/v1";

/// The whole gateway configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// Always `parley.dev/gateway/v1`.
    pub api_version: String,
    /// The Chatbot this gateway serves, `<namespace>/<name>` [`default/parley`]: part of
    /// every Redis key (so two Chatbots sharing a Redis and a Tenant share no limits,
    /// sessions or cache entries), and of ledger rows and logs. The operator renders it.
    #[serde(default = "default_chatbot")]
    pub chatbot: String,
    /// Address of the chat API.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Base for relative secret file paths [the config file's directory].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_dir: Option<PathBuf>,
    /// Model used when a request names none.
    pub default_model: String,
    /// Prepended to every `/chat` conversation.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// The models clients can ask for.
    pub models: Vec<ModelConfig>,
    /// Who may call, and their limits.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Shared state; `null` keeps limits, sessions and cache in the process.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// What limits do while Redis is unreachable.
    #[serde(default)]
    pub rate_limit_failure_mode: FailureMode,
    /// The `/chat` session API.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Usage ledger in PostgreSQL.
    #[serde(default)]
    pub usage: Option<UsageConfig>,
    /// Browser access; `null` sends no CORS headers.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// Request size limits.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Where a secret (a key, a URL) comes from: `{file: path}`, `{env: NAME}` or
/// `{value: literal}`.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(try_from = "SecretSourceFields", into = "SecretSourceFields")]
pub enum SecretSource {
    /// A file; a relative path resolves against `secretsDir`. Re-read when it changes.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A literal, for local use only.
    Value(String),
}

/// The YAML shape of a [`SecretSource`]: a map with exactly one of the three keys.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SecretSourceFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env: Option<String>,
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

/// One model clients can ask for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send.
    pub name: String,
    /// Backends, chosen by weight among the healthy ones.
    pub backends: Vec<BackendConfig>,
    /// Models tried in order when this one cannot serve.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Attempts on this model.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Per-backend breaker.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Output tokens assumed when a request sets no `max_tokens`.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u32,
    /// Prices; `null` = free.
    #[serde(default)]
    pub pricing: Option<PricingConfig>,
    /// Exact-match cache; `null` = off.
    #[serde(default)]
    pub cache: Option<CacheConfig>,
}

/// One upstream endpoint of a model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique within the model.
    pub name: String,
    /// The API it speaks.
    pub provider: Provider,
    /// Base URL including the version segment.
    pub base_url: String,
    /// Model name sent upstream [the model's name].
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Provider key; `null` sends none.
    #[serde(default)]
    pub api_key: Option<SecretSource>,
    /// Share of traffic; 0 = only when the others are unavailable.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Call timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
}

/// Timeouts in milliseconds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Connect (TCP + TLS).
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    /// Until response headers (non-stream) or the first token (stream).
    #[serde(default = "default_first_token_ms")]
    pub first_token_ms: u64,
    /// Whole call.
    #[serde(default = "default_total_ms")]
    pub total_ms: u64,
}

/// Retries on one model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// All attempts, the first included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Backoff before the second attempt.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest backoff.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

/// Per-backend circuit breaker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures (5xx, timeouts, connection errors) that open it.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Seconds open before one probe.
    #[serde(default = "default_open_seconds")]
    pub open_seconds: u64,
}

/// USD per million tokens, as decimal strings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PricingConfig {
    /// Input tokens, e.g. "2.50".
    pub input_per_million_tokens: String,
    /// Output tokens, e.g. "10.00".
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

/// Exact-match response cache.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheConfig {
    /// Seconds an entry is served.
    #[serde(default = "default_cache_ttl")]
    pub ttl_seconds: u64,
}

/// One tenant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantConfig {
    /// `namespace/name`; the `tenant` label of metrics.
    pub id: String,
    /// Human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Keys that authenticate as this tenant.
    pub api_keys: Vec<SecretSource>,
    /// Models it may use (empty = all).
    #[serde(default)]
    pub allowed_models: Vec<String>,
    /// Tenant-wide limits; `null` = unlimited.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Per-model limits.
    #[serde(default)]
    pub model_quotas: Vec<ModelQuotaConfig>,
    /// Monthly spend cap; `null` = none.
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    /// Tenant-owned provider keys.
    #[serde(default)]
    pub upstream_keys: Vec<UpstreamKeyConfig>,
}

/// Sliding-window limits; absent = unlimited.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Requests in any hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_hour: Option<u64>,
    /// Requests in any day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u64>,
    /// Tokens in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

/// Limits of the tenant on one model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelQuotaConfig {
    /// The model.
    pub model: String,
    /// Requests in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Tokens in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

/// Monthly spend cap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetConfig {
    /// USD per calendar month (UTC).
    pub monthly_usd: String,
}

/// A tenant-owned provider key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamKeyConfig {
    /// The model.
    pub model: String,
    /// The backend of that model.
    pub backend: String,
    /// The key.
    pub api_key: SecretSource,
}

/// Redis connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL.
    pub url: SecretSource,
}

/// The `/chat` session API.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionsConfig {
    /// Seconds a session lives after its last use.
    #[serde(default = "default_session_ttl")]
    pub ttl_seconds: u64,
    /// Messages kept.
    #[serde(default = "default_session_max_messages")]
    pub max_messages: u32,
    /// Requests per minute per session; `null` = none.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
}

/// Usage ledger.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsageConfig {
    /// PostgreSQL URL.
    pub postgres_url: SecretSource,
}

/// CORS.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins.
    pub allowed_origins: Vec<String>,
}

/// Request size limits.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted request body.
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
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        match value.get("apiVersion").and_then(|v| v.as_str()) {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(ConfigError::ApiVersion {
                    found: other.to_string(),
                });
            }
            None => {
                return Err(ConfigError::ApiVersion {
                    found: String::new(),
                });
            }
        }
        let config: Self =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
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
                if !names.contains(fallback.as_str()) {
                    problems.push(format!(
                        "models[{i}].fallbacks[{j}]: {fallback:?} is not a model of this config"
                    ));
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
        }
        if self.sessions.max_messages < 2 {
            problems.push("sessions.maxMessages must be at least 2".into());
        }
        problems
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
        assert_eq!(GatewayConfig::from_yaml(&ok).unwrap().chatbot, "prod/support-bot");
        for bad in ["support", "prod/", "/x", "a/b/c", "Prod/x", "p/{x}", "p/x y"] {
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
    fn unknown_version_is_refused() {
        let text = MINIMAL.replace("gateway/v1", "gateway/v9");
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        assert!(err.contains("gateway/v9"), "{err}");
    }

    #[test]
    fn literal_secrets_are_not_debug_printed() {
        let config = GatewayConfig::from_yaml(MINIMAL).unwrap();
        assert!(!format!("{config:?}").contains("sk-test"));
    }

    #[test]
    fn inconsistencies_are_all_reported() {
        let text = format!(
            "{MINIMAL}  fallbacks: [gpt-4o-mini]\n  retry: {{maxAttempts: 0}}\ntenants:\n- {{id: a/b, apiKeys: [], budget: {{monthlyUsd: \"1,5\"}}}}\n"
        );
        let err = GatewayConfig::from_yaml(&text).unwrap_err().to_string();
        for needle in ["fallbacks[0]", "maxAttempts", "apiKeys", "monthlyUsd"] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
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
