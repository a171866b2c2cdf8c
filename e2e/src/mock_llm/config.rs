//! The mock's knobs ([`MockConfig`]) and the live, mutable state built from them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::http::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::text;

/// Everything that shapes the mock's behaviour. The same field names are used by the
/// CLI flags (`--latency-ms` = `latency_ms`), by `POST /_mock/config` and by Rust tests.
///
/// Fault injection: a request fails with `fail_status` when `fail_first > 0` (the counter
/// is then decremented: "fail exactly the next N requests") or, after that, with
/// probability `fail_rate`. Through the CLI and `POST /_mock/config` (and in per-model
/// overrides), an update without `fail_rate` gets one implied: 0 when it sets
/// `fail_first` ("fail the next N requests, then succeed"), else 1 when it sets
/// `fail_status` ("fail every request with this status").
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {
    /// Put in the reply text and in the `x-mock-name` header.
    pub name: String,
    /// Delay before the response headers of `/v1/chat/completions` and `/v1/messages`.
    pub latency_ms: u64,
    /// Streaming: delay between the response headers and the first body byte (which
    /// carries the first token).
    pub ttft_ms: u64,
    /// Streaming pace after the first token; 0 = as fast as possible.
    pub tokens_per_second: f64,
    /// Words in the default reply (before the `max_tokens` cut).
    pub reply_tokens: u32,
    /// Status of injected failures.
    pub fail_status: u16,
    /// Probability (0..=1) that a request fails with `fail_status`.
    pub fail_rate: f64,
    /// The next `fail_first` requests fail with `fail_status` (counts down).
    pub fail_first: u64,
    /// `Retry-After` seconds sent with injected failures.
    pub retry_after: Option<u64>,
    /// Accept requests and never answer.
    pub hang: bool,
    /// Streaming: close the connection abruptly after this many tokens.
    pub drop_after_tokens: Option<u64>,
    /// Streaming: send a provider error event after this many tokens, then end.
    pub error_event_after_tokens: Option<u64>,
    /// Refuse requests without `Authorization` / `x-api-key` (401).
    pub require_api_key: bool,
    /// If not empty, only these keys are accepted (others get 401).
    pub api_keys: Vec<String>,
    /// Per-model overrides: model name -> any of the fields above (not `models`).
    /// An override with its own `fail_first` has its own counter.
    pub models: BTreeMap<String, Map<String, Value>>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            name: "parley-mock-llm".to_owned(),
            latency_ms: 0,
            ttft_ms: 0,
            tokens_per_second: 0.0,
            reply_tokens: 20,
            fail_status: 500,
            fail_rate: 0.0,
            fail_first: 0,
            retry_after: None,
            hang: false,
            drop_after_tokens: None,
            error_event_after_tokens: None,
            require_api_key: true,
            api_keys: Vec::new(),
            models: BTreeMap::new(),
        }
    }
}

/// A rejected configuration or update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl MockConfig {
    /// Every request fails with `status`.
    pub fn failing(mut self, status: u16) -> Self {
        self.fail_status = status;
        self.fail_rate = 1.0;
        self
    }

    /// The next `n` requests fail with `status`, then requests succeed.
    pub fn fail_first(mut self, n: u64, status: u16) -> Self {
        self.fail_first = n;
        self.fail_status = status;
        self.fail_rate = 0.0;
        self
    }

    /// Checks ranges and the per-model overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_own()?;
        for model in self.models.keys() {
            self.effective_for(model)?;
        }
        Ok(())
    }

    fn validate_own(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(ConfigError(format!(
                "fail_rate must be between 0 and 1, got {}",
                self.fail_rate
            )));
        }
        if !self.tokens_per_second.is_finite() || self.tokens_per_second < 0.0 {
            return Err(ConfigError(format!(
                "tokens_per_second must be >= 0, got {}",
                self.tokens_per_second
            )));
        }
        if !(100..=999).contains(&self.fail_status) {
            return Err(ConfigError(format!(
                "fail_status must be an HTTP status (100..=999), got {}",
                self.fail_status
            )));
        }
        Ok(())
    }

    /// The configuration a request for `model` sees.
    fn effective_for(&self, model: &str) -> Result<MockConfig, ConfigError> {
        let Some(ov) = self.models.get(model) else {
            return Ok(self.clone());
        };
        if ov.contains_key("models") {
            return Err(ConfigError(format!(
                "models.{model}: an override cannot contain `models`"
            )));
        }
        let mut base = self.clone();
        base.models.clear();
        let merged = merge(&base, ov).map_err(|e| ConfigError(format!("models.{model}: {e}")))?;
        merged
            .validate_own()
            .map_err(|e| ConfigError(format!("models.{model}: {e}")))?;
        Ok(merged)
    }

    /// Applies a partial update as sent to `POST /_mock/config`: every field present
    /// replaces the current value (`null` clears optional fields); `"reset": true` first
    /// restores `flags`.
    pub fn patched(&self, flags: &MockConfig, update: &Value) -> Result<MockConfig, ConfigError> {
        let Some(obj) = update.as_object() else {
            return Err(ConfigError("the update must be a JSON object".to_owned()));
        };
        let mut obj = obj.clone();
        let base = match obj.remove("reset") {
            None | Some(Value::Bool(false)) => self,
            Some(Value::Bool(true)) => flags,
            Some(other) => {
                return Err(ConfigError(format!(
                    "reset must be true or false, got {other}"
                )));
            }
        };
        let new = merge(base, &obj)?;
        new.validate()?;
        Ok(new)
    }
}

fn merge(base: &MockConfig, update: &Map<String, Value>) -> Result<MockConfig, ConfigError> {
    let mut cur = match serde_json::to_value(base) {
        Ok(Value::Object(m)) => m,
        _ => return Err(ConfigError("internal: config is not an object".to_owned())),
    };
    for (k, v) in update {
        cur.insert(k.clone(), v.clone());
    }
    if !update.contains_key("fail_rate") {
        if update.contains_key("fail_first") {
            // "fail the next N requests, then succeed".
            cur.insert("fail_rate".to_owned(), Value::from(0.0));
        } else if update.contains_key("fail_status") {
            // "fail_status: 503" on its own means: fail every request with 503.
            cur.insert("fail_rate".to_owned(), Value::from(1.0));
        }
    }
    serde_json::from_value(Value::Object(cur)).map_err(|e| ConfigError(e.to_string()))
}

/// A configuration with what is derived from it pre-computed.
#[derive(Debug)]
pub struct Profile {
    pub cfg: MockConfig,
    /// The default reply, one token per element.
    pub reply: Arc<[String]>,
    pub name_header: HeaderValue,
}

impl Profile {
    fn new(cfg: MockConfig) -> Arc<Profile> {
        let reply: Arc<[String]> = text::default_reply(&cfg.name, cfg.reply_tokens).into();
        let name_header = HeaderValue::from_str(&cfg.name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        Arc::new(Profile {
            cfg,
            reply,
            name_header,
        })
    }
}

/// What the mock decided for one request.
pub struct Admission {
    pub profile: Arc<Profile>,
    /// `Some(status)`: answer with an injected failure.
    pub fault: Option<u16>,
}

/// The live configuration: flags (the reset target), current values and counters.
pub struct Live {
    flags: MockConfig,
    current: MockConfig,
    global: Arc<Profile>,
    per_model: HashMap<String, Arc<Profile>>,
    rng: u64,
}

impl Live {
    pub fn new(flags: MockConfig) -> Result<Live, ConfigError> {
        flags.validate()?;
        let mut live = Live {
            flags: flags.clone(),
            current: MockConfig::default(),
            global: Profile::new(MockConfig::default()),
            per_model: HashMap::new(),
            rng: seed(),
        };
        live.install(flags)?;
        Ok(live)
    }

    /// Replaces the current configuration (fail counters restart from its values).
    pub fn install(&mut self, cfg: MockConfig) -> Result<(), ConfigError> {
        cfg.validate()?;
        let mut per_model = HashMap::new();
        for model in cfg.models.keys() {
            per_model.insert(model.clone(), Profile::new(cfg.effective_for(model)?));
        }
        self.global = Profile::new(cfg.clone());
        self.per_model = per_model;
        self.current = cfg;
        Ok(())
    }

    pub fn current(&self) -> &MockConfig {
        &self.current
    }

    pub fn flags(&self) -> &MockConfig {
        &self.flags
    }

    /// Picks the profile for `model` and decides whether the request fails.
    pub fn admit(&mut self, model: Option<&str>) -> Admission {
        let per_model = model.and_then(|m| self.per_model.get(m).map(|p| (m, p)));
        let profile = match per_model {
            Some((_, p)) => Arc::clone(p),
            None => Arc::clone(&self.global),
        };
        let own_counter = per_model.and_then(|(m, _)| {
            self.current
                .models
                .get_mut(m)
                .and_then(|ov| ov.get_mut("fail_first"))
        });
        let fail_first_hit = match own_counter {
            Some(counter) => {
                let n = counter.as_u64().unwrap_or(0);
                if n > 0 {
                    *counter = Value::from(n - 1);
                }
                n > 0
            }
            None => {
                let n = self.current.fail_first;
                if n > 0 {
                    self.current.fail_first = n - 1;
                }
                n > 0
            }
        };
        let rate = profile.cfg.fail_rate;
        let fault = if fail_first_hit || (rate > 0.0 && (rate >= 1.0 || self.next_f64() < rate)) {
            Some(profile.cfg.fail_status)
        } else {
            None
        };
        Admission { profile, fault }
    }

    fn next_f64(&mut self) -> f64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x1234_5678)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn fail_status_alone_means_always() {
        let base = MockConfig::default();
        let c = base.patched(&base, &json!({"fail_status": 503})).unwrap();
        assert_eq!(c.fail_rate, 1.0);
        let c = base
            .patched(&base, &json!({"fail_status": 500, "fail_first": 2}))
            .unwrap();
        assert_eq!(c.fail_rate, 0.0);
        assert_eq!(c.fail_first, 2);
        let failing = base.patched(&base, &json!({"fail_status": 503})).unwrap();
        let c = failing
            .patched(&base, &json!({"fail_first": 1, "fail_status": 500}))
            .unwrap();
        assert_eq!((c.fail_first, c.fail_status, c.fail_rate), (1, 500, 0.0));
        assert!(base.patched(&base, &json!({"nope": 1})).is_err());
        assert!(base.patched(&base, &json!({"fail_rate": 2})).is_err());
    }

    #[test]
    fn fail_first_counts_down_per_scope() {
        let cfg = MockConfig::default()
            .patched(
                &MockConfig::default(),
                &json!({"fail_first": 1, "fail_status": 500,
                        "models": {"m": {"fail_first": 2, "fail_status": 429}}}),
            )
            .unwrap();
        let mut live = Live::new(cfg).unwrap();
        assert_eq!(live.admit(Some("m")).fault, Some(429));
        assert_eq!(live.admit(Some("x")).fault, Some(500));
        assert_eq!(live.admit(Some("x")).fault, None);
        assert_eq!(live.admit(Some("m")).fault, Some(429));
        assert_eq!(live.admit(Some("m")).fault, None);
        assert_eq!(live.admit(None).fault, None);
    }

    #[test]
    fn rate_is_roughly_respected() {
        let cfg = MockConfig {
            fail_rate: 0.5,
            ..MockConfig::default()
        };
        let mut live = Live::new(cfg).unwrap();
        let fails = (0..10_000)
            .filter(|_| live.admit(None).fault.is_some())
            .count();
        assert!((4000..6000).contains(&fails), "{fails}");
    }
}
