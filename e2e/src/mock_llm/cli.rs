//! Command-line flags of the `parley-mock-llm` binary.

use std::collections::BTreeMap;

use clap::Parser;
use serde_json::{Map, Value};

use super::config::{ConfigError, MockConfig};

/// OpenAI- and Anthropic-compatible fake LLM upstream for tests, demos and load tests.
///
/// Every knob can also be changed at run time with `POST /_mock/config` (same names in
/// snake_case); counters are at `GET /_mock/stats`.
#[derive(Debug, Parser)]
#[command(name = "parley-mock-llm", version)]
pub struct Args {
    /// Address to listen on (port 0 = any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// Name put in the reply text and the `x-mock-name` header.
    #[arg(long, default_value = "parley-mock-llm")]
    pub name: String,
    /// Delay before the response headers.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Streaming: delay between the headers and the first token.
    #[arg(long, default_value_t = 0)]
    pub ttft_ms: u64,
    /// Streaming pace after the first token (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub tokens_per_second: f64,
    /// Words in the default reply, before the max_tokens cut.
    #[arg(long, default_value_t = 20)]
    pub reply_tokens: u32,
    /// Status of injected failures. Alone (without --fail-rate / --fail-first) every
    /// request fails with it.
    #[arg(long)]
    pub fail_status: Option<u16>,
    /// Probability (0..1) that a request fails with --fail-status [default 500].
    #[arg(long)]
    pub fail_rate: Option<f64>,
    /// Fail exactly the next N requests with --fail-status [default 500], then succeed.
    #[arg(long)]
    pub fail_first: Option<u64>,
    /// Retry-After seconds sent with injected failures.
    #[arg(long)]
    pub retry_after: Option<u64>,
    /// Accept requests and never answer.
    #[arg(long)]
    pub hang: bool,
    /// Streaming: close the connection abruptly after N tokens (before the end events).
    #[arg(long)]
    pub drop_after_tokens: Option<u64>,
    /// Streaming: send a provider error event after N tokens, then end the stream.
    #[arg(long)]
    pub error_event_after_tokens: Option<u64>,
    /// Accept only this API key (repeatable); default: any non-empty key.
    #[arg(long = "api-key")]
    pub api_keys: Vec<String>,
    /// Do not require an API key.
    #[arg(long)]
    pub no_auth: bool,
    /// Per-model overrides as JSON, e.g. '{"gpt-4o": {"fail_status": 429}}'.
    #[arg(long)]
    pub models: Option<String>,
    /// HTTP/2: at most this many concurrent streams per connection (default: no limit).
    #[arg(long)]
    pub h2_max_streams: Option<u32>,
}

impl Args {
    /// The configuration these flags describe.
    pub fn to_config(&self) -> Result<MockConfig, ConfigError> {
        let mut update = Map::new();
        let mut put = |k: &str, v: Value| {
            update.insert(k.to_owned(), v);
        };
        put("name", Value::from(self.name.clone()));
        put("latency_ms", Value::from(self.latency_ms));
        put("ttft_ms", Value::from(self.ttft_ms));
        put("tokens_per_second", Value::from(self.tokens_per_second));
        put("reply_tokens", Value::from(self.reply_tokens));
        if let Some(v) = self.fail_status {
            put("fail_status", Value::from(v));
        }
        if let Some(v) = self.fail_rate {
            put("fail_rate", Value::from(v));
        }
        if let Some(v) = self.fail_first {
            put("fail_first", Value::from(v));
        }
        put("retry_after", Value::from(self.retry_after));
        put("hang", Value::from(self.hang));
        put("drop_after_tokens", Value::from(self.drop_after_tokens));
        put(
            "error_event_after_tokens",
            Value::from(self.error_event_after_tokens),
        );
        put("api_keys", Value::from(self.api_keys.clone()));
        put("require_api_key", Value::from(!self.no_auth));
        if let Some(m) = &self.models {
            let models: BTreeMap<String, Map<String, Value>> =
                serde_json::from_str(m).map_err(|e| ConfigError(format!("--models: {e}")))?;
            put(
                "models",
                serde_json::to_value(models).map_err(|e| ConfigError(e.to_string()))?,
            );
        }
        let base = MockConfig::default();
        base.patched(&base, &Value::Object(update))
    }
}
