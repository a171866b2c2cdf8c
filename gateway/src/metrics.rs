//! Prometheus metrics (`parley_` prefix). Labels are low-cardinality: tenant ids, model
//! and backend names from the config (never client-supplied strings), status codes.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Shared label value.
pub type Label = Arc<String>;

/// `{tenant, model, backend, status, api}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Tenant id (`unknown` before authentication).
    pub tenant: Label,
    /// Model that served (or was asked for, if known).
    pub model: Label,
    /// Backend that served (`none` if none did).
    pub backend: Label,
    /// HTTP status.
    pub status: u16,
    /// `openai`, `anthropic` or `chat`.
    pub api: &'static str,
}

/// `{tenant, model}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModel {
    /// Tenant id.
    pub tenant: Label,
    /// Model.
    pub model: Label,
}

/// `{tenant, model, stream}` of the request latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// Tenant id.
    pub tenant: Label,
    /// Model.
    pub model: Label,
    /// `true` for streamed answers (their latency is the whole stream; their time to
    /// first token is `parley_time_to_first_token_seconds`), else `false`.
    pub stream: &'static str,
}

/// `{requested_model, model}` of a request a fallback served.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// The model asked for.
    pub requested_model: Label,
    /// The fallback that served.
    pub model: Label,
}

/// `{tenant, model, kind}` for tokens.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Tenant id.
    pub tenant: Label,
    /// Model.
    pub model: Label,
    /// `input` or `output`.
    pub kind: &'static str,
}

/// `{model}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    /// Model.
    pub model: Label,
}

/// `{model, backend}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Model.
    pub model: Label,
    /// Backend.
    pub backend: Label,
}

/// `{model, backend, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// Model.
    pub model: Label,
    /// Backend.
    pub backend: Label,
    /// `success`, `rate_limited`, `server_error`, `timeout`, `connection`, `client_error`.
    pub outcome: &'static str,
}

/// `{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Outcome.
    pub result: &'static str,
}

/// `{hash}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HashLabel {
    /// SHA-256 (hex, 16 digits) of the loaded config and its secrets' paths.
    pub hash: String,
}

/// `{tenant, limit}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Tenant id.
    pub tenant: Label,
    /// `rate` or `budget`.
    pub limit: &'static str,
}

/// `{op}` of a Redis command.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `admit`, `settle`, `session_load`, `session_append`, `cache_get`, `cache_put`.
    pub op: &'static str,
}

/// `{backend, result}` of an admission decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `redis` or `local`.
    pub backend: &'static str,
    /// `admitted`, `refused`, `redis_down_open`, `redis_down_closed`.
    pub result: &'static str,
}

/// `{chatbot}` (namespace/name) of the ledger's and Redis's health metrics: present only
/// when the config has a ledger (or a Redis).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChatbotLabel {
    /// The Chatbot, `namespace/name`.
    pub chatbot: Label,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ])
}

fn overhead_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    ])
}

/// Every metric of the gateway.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Requests answered.
    pub requests: Family<RequestLabels, Counter>,
    /// Whole request latency.
    pub latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    /// Requests served by a fallback model.
    pub fallbacks: Family<FallbackLabels, Counter>,
    /// Time to first token of streams.
    pub ttft: Family<ModelLabel, Histogram, fn() -> Histogram>,
    /// Gateway overhead (time not spent waiting on upstreams).
    pub overhead: Histogram,
    /// Tokens used.
    pub tokens: Family<TokenLabels, Counter>,
    /// Cost in micro-USD.
    pub cost: Family<TenantModel, Counter>,
    /// Upstream attempts by outcome.
    pub attempts: Family<AttemptLabels, Counter>,
    /// Breaker state: 0 closed, 1 open, 2 half-open.
    pub breaker: Family<BackendLabels, Gauge>,
    /// Loaded config hash (value 1).
    pub config_info: Family<HashLabel, Gauge>,
    /// Config loads by result.
    pub reloads: Family<ResultLabel, Counter>,
    /// Cache lookups by result.
    pub cache: Family<ResultLabel, Counter>,
    /// Requests refused by limits.
    pub refusals: Family<RefusalLabels, Counter>,
    /// Requests in flight.
    pub in_flight: Gauge,
    /// Redis commands that failed or timed out.
    pub redis_errors: Family<OpLabel, Counter>,
    /// Admission decisions by backend and result.
    pub limit_decisions: Family<DecisionLabels, Counter>,
    /// Requests answered 503 at once because the concurrency limit was reached.
    pub load_shed: Counter,
    /// 1 while Redis answers commands, 0 after one failed (only with a Redis).
    pub redis_up: Family<ChatbotLabel, Gauge>,
    /// 1 while the usage ledger's last statement succeeded (only with a ledger).
    pub ledger_up: Family<ChatbotLabel, Gauge>,
    /// Ledger rows waiting to be written.
    pub ledger_queue: Family<ChatbotLabel, Gauge>,
    /// Ledger rows written.
    pub ledger_written: Family<ChatbotLabel, Counter>,
    /// Ledger rows a retried batch found already written (not counted twice).
    pub ledger_duplicates: Family<ChatbotLabel, Counter>,
    /// Ledger rows dropped because the queue was full.
    pub ledger_dropped: Family<ChatbotLabel, Counter>,
    /// Ledger statements (connect, migrate, insert) that failed.
    pub ledger_errors: Family<ChatbotLabel, Counter>,
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parley");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests answered", requests.clone());
        let latency: Family<LatencyLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Request latency",
            latency.clone(),
        );
        let ttft: Family<ModelLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Time to the first streamed byte",
            ttft.clone(),
        );
        let overhead = overhead_histogram();
        registry.register(
            "overhead_seconds",
            "Time spent in the gateway, not waiting on an upstream",
            overhead.clone(),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Requests served by a fallback model instead of the one asked for",
            fallbacks.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("tokens", "Tokens used", tokens.clone());
        let cost = Family::<TenantModel, Counter>::default();
        registry.register("cost_micro_usd", "Cost in micro-USD", cost.clone());
        let attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "upstream_attempts",
            "Upstream attempts by outcome",
            attempts.clone(),
        );
        let breaker = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "circuit_breaker_state",
            "Circuit breaker state (0 closed, 1 open, 2 half-open)",
            breaker.clone(),
        );
        let config_info = Family::<HashLabel, Gauge>::default();
        registry.register(
            "config_info",
            "Hash of the loaded config",
            config_info.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register("config_reloads", "Config loads by result", reloads.clone());
        let cache = Family::<ResultLabel, Counter>::default();
        registry.register("cache_lookups", "Response cache lookups", cache.clone());
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Requests refused by limits",
            refusals.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests in flight",
            in_flight.clone(),
        );
        let redis_errors = Family::<OpLabel, Counter>::default();
        registry.register(
            "redis_errors",
            "Redis commands that failed or timed out",
            redis_errors.clone(),
        );
        let limit_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "limit_decisions",
            "Admission decisions by backend and result",
            limit_decisions.clone(),
        );
        let load_shed = Counter::default();
        registry.register(
            "load_shed",
            "Requests refused with 503 because the gateway was at its concurrency limit",
            load_shed.clone(),
        );
        let redis_up = Family::<ChatbotLabel, Gauge>::default();
        registry.register(
            "redis_up",
            "1 while Redis answers commands, 0 since one failed or timed out",
            redis_up.clone(),
        );
        let ledger_up = Family::<ChatbotLabel, Gauge>::default();
        registry.register(
            "ledger_up",
            "1 while the usage ledger (PostgreSQL) accepts writes, 0 while it is unreachable or failing",
            ledger_up.clone(),
        );
        let ledger_queue = Family::<ChatbotLabel, Gauge>::default();
        registry.register(
            "ledger_queue_rows",
            "Usage ledger rows waiting to be written",
            ledger_queue.clone(),
        );
        let ledger_written = Family::<ChatbotLabel, Counter>::default();
        registry.register(
            "ledger_rows_written",
            "Usage ledger rows written to PostgreSQL",
            ledger_written.clone(),
        );
        let ledger_duplicates = Family::<ChatbotLabel, Counter>::default();
        registry.register(
            "ledger_rows_duplicate",
            "Usage ledger rows of a retried batch that were already written (skipped)",
            ledger_duplicates.clone(),
        );
        let ledger_dropped = Family::<ChatbotLabel, Counter>::default();
        registry.register(
            "ledger_rows_dropped",
            "Usage ledger rows dropped because the queue was full",
            ledger_dropped.clone(),
        );
        let ledger_errors = Family::<ChatbotLabel, Counter>::default();
        registry.register(
            "ledger_errors",
            "Usage ledger statements (connect, migrate, insert) that failed",
            ledger_errors.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            fallbacks,
            ttft,
            overhead,
            tokens,
            cost,
            attempts,
            breaker,
            config_info,
            reloads,
            cache,
            refusals,
            in_flight,
            redis_errors,
            limit_decisions,
            load_shed,
            redis_up,
            ledger_up,
            ledger_queue,
            ledger_written,
            ledger_duplicates,
            ledger_dropped,
            ledger_errors,
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
