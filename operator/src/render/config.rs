//! The GatewayConfig of a Chatbot: the selected ModelRoutes and Tenants, flattened, with
//! every default written out and every secret as a file under the projected volume.

use std::path::PathBuf;

use kube::ResourceExt;
use parley_crds::common::SecretKeyRef;
use parley_crds::gateway_config::{
    API_VERSION, BackendConfig, BudgetConfig, CacheConfig, CircuitBreakerConfig, CorsConfig,
    GatewayConfig, LimitsConfig, ModelConfig, ModelQuotaConfig, PricingConfig, RateLimitConfig,
    RedisConfig, RetryConfig, SecretSource, SessionsConfig, TenantConfig, TimeoutsConfig,
    UpstreamKeyConfig, UsageConfig, default_max_output_tokens, default_weight,
};
use parley_crds::{ModelRoute, Tenant};
use sha2::{Digest, Sha256};

use super::{ADMIN_PORT, HTTP_PORT, RenderInput, SECRETS_DIR};

/// The file, relative to `secretsDir`, where a Secret key is mounted.
pub(super) fn secret_file(secret: &SecretKeyRef) -> SecretSource {
    SecretSource::File(PathBuf::from(format!("{}/{}", secret.name, secret.key)))
}

/// SHA-256 of the config text, hex.
pub(super) fn hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

pub(super) fn gateway_config(
    input: &RenderInput<'_>,
    routes: &[&ModelRoute],
    tenants: &[&Tenant],
) -> GatewayConfig {
    let spec = &input.chatbot.spec;
    let mut models: Vec<ModelConfig> = Vec::with_capacity(routes.len());
    for route in routes {
        // Duplicates are reported by the checks; keep the first so the rest stays consistent.
        if !models.iter().any(|m| m.name == route.model_name()) {
            models.push(model(route));
        }
    }
    let served: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    let tenants = tenants.iter().filter_map(|t| tenant(t, &served)).collect();
    let sessions = spec.sessions.clone().unwrap_or_default();
    let default_sessions = SessionsConfig::default();
    GatewayConfig {
        api_version: API_VERSION.to_string(),
        chatbot: super::namespaced_name(input.chatbot),
        listen: format!("0.0.0.0:{HTTP_PORT}"),
        admin_listen: format!("0.0.0.0:{ADMIN_PORT}"),
        secrets_dir: Some(PathBuf::from(SECRETS_DIR)),
        default_model: spec.default_model.clone(),
        system_prompt: spec.system_prompt.clone(),
        models,
        tenants,
        redis: spec.redis.as_ref().map(|r| RedisConfig {
            url: secret_file(&r.url_secret_ref),
        }),
        rate_limit_failure_mode: spec.rate_limit_failure_mode.unwrap_or_default(),
        sessions: SessionsConfig {
            ttl_seconds: sessions.ttl_seconds.unwrap_or(default_sessions.ttl_seconds),
            max_messages: sessions
                .max_messages
                .unwrap_or(default_sessions.max_messages),
            requests_per_minute: sessions.requests_per_minute,
        },
        usage: spec.usage.as_ref().map(|u| UsageConfig {
            postgres_url: secret_file(&u.postgres_url_secret_ref),
        }),
        cors: spec.cors.as_ref().map(|c| CorsConfig {
            allowed_origins: c.allowed_origins.clone(),
        }),
        limits: LimitsConfig::default(),
    }
}

fn model(route: &ModelRoute) -> ModelConfig {
    let spec = &route.spec;
    let retry_defaults = RetryConfig::default();
    let breaker_defaults = CircuitBreakerConfig::default();
    let retry = spec.retry.clone().unwrap_or_default();
    let breaker = spec.circuit_breaker.clone().unwrap_or_default();
    ModelConfig {
        name: route.model_name().to_string(),
        kind: spec.kind.unwrap_or_default(),
        backends: spec
            .backends
            .iter()
            .map(|b| {
                let timeouts = b.timeouts.clone().unwrap_or_default();
                let defaults = TimeoutsConfig::default();
                BackendConfig {
                    name: b.name.clone(),
                    provider: b.provider,
                    base_url: b.base_url.clone(),
                    upstream_model: Some(
                        b.upstream_model
                            .clone()
                            .unwrap_or_else(|| route.model_name().to_string()),
                    ),
                    api_key: b.api_key_secret_ref.as_ref().map(secret_file),
                    weight: b.weight.unwrap_or(default_weight()),
                    timeouts: TimeoutsConfig {
                        connect_ms: timeouts.connect_ms.unwrap_or(defaults.connect_ms),
                        first_token_ms: timeouts.first_token_ms.unwrap_or(defaults.first_token_ms),
                        total_ms: timeouts.total_ms.unwrap_or(defaults.total_ms),
                    },
                    responses_api: b.responses_api.unwrap_or(false),
                    h2c: b.h2c.unwrap_or(false),
                }
            })
            .collect(),
        fallbacks: spec.fallbacks.clone(),
        retry: RetryConfig {
            max_attempts: retry.max_attempts.unwrap_or(retry_defaults.max_attempts),
            initial_backoff_ms: retry
                .initial_backoff_ms
                .unwrap_or(retry_defaults.initial_backoff_ms),
            max_backoff_ms: retry
                .max_backoff_ms
                .unwrap_or(retry_defaults.max_backoff_ms),
        },
        circuit_breaker: CircuitBreakerConfig {
            failure_threshold: breaker
                .failure_threshold
                .unwrap_or(breaker_defaults.failure_threshold),
            open_seconds: breaker
                .open_seconds
                .unwrap_or(breaker_defaults.open_seconds),
        },
        max_output_tokens: spec
            .max_output_tokens
            .unwrap_or(default_max_output_tokens()),
        pricing: spec.pricing.as_ref().map(|p| PricingConfig {
            input_per_million_tokens: p.input_per_million_tokens.clone(),
            output_per_million_tokens: p.output_per_million_tokens.clone(),
        }),
        cache: spec.cache.as_ref().map(|c| CacheConfig {
            ttl_seconds: c.ttl_seconds.unwrap_or(CacheConfig::default().ttl_seconds),
        }),
    }
}

/// A Tenant's entry, keeping only what names a model this Chatbot serves (the gateway
/// refuses entries naming no model, and a Tenant may be shared with other Chatbots).
/// `None` when its `allowedModels` names none of them: it may use nothing here.
fn tenant(tenant: &Tenant, served: &[&str]) -> Option<TenantConfig> {
    let spec = &tenant.spec;
    let serves = |model: &str| served.contains(&model);
    if !spec.allowed_models.is_empty() && !spec.allowed_models.iter().any(|m| serves(m)) {
        return None;
    }
    Some(TenantConfig {
        id: format!(
            "{}/{}",
            tenant.namespace().unwrap_or_default(),
            tenant.name_any()
        ),
        display_name: spec.display_name.clone(),
        api_keys: tenant.api_key_refs().iter().map(secret_file).collect(),
        allowed_models: spec
            .allowed_models
            .iter()
            .filter(|m| serves(m))
            .cloned()
            .collect(),
        rate_limit: spec.rate_limit.as_ref().map(|r| RateLimitConfig {
            requests_per_minute: r.requests_per_minute,
            requests_per_hour: r.requests_per_hour,
            requests_per_day: r.requests_per_day,
            tokens_per_minute: r.tokens_per_minute,
        }),
        model_quotas: spec
            .model_quotas
            .iter()
            .filter(|q| serves(&q.model))
            .map(|q| ModelQuotaConfig {
                model: q.model.clone(),
                requests_per_minute: q.requests_per_minute,
                tokens_per_minute: q.tokens_per_minute,
            })
            .collect(),
        budget: spec.budget.as_ref().map(|b| BudgetConfig {
            monthly_usd: b.monthly_usd.clone(),
        }),
        upstream_keys: spec
            .upstream_keys
            .iter()
            .filter(|k| serves(&k.model))
            .map(|k| UpstreamKeyConfig {
                model: k.model.clone(),
                backend: k.backend.clone(),
                api_key: secret_file(&k.secret_ref),
            })
            .collect(),
        max_body_bytes: spec.max_body_bytes,
    })
}
