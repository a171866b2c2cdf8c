//! What only the operator can see: problems that span objects (fallback cycles, missing
//! Secrets, a default model nobody serves). Each names the object and the field to fix.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use kube::ResourceExt;
use parley_crds::chatbot::{KongLimitBy, KongPolicy};
use parley_crds::common::SecretKeyRef;
use parley_crds::gateway_config::fallback_cycle;
use parley_crds::model_route::{ModelKind, Provider};
use parley_crds::money::parse_usd_micros;
use parley_crds::{ModelRoute, Tenant};

use super::{RenderInput, chatbot_ref, object_ref};

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Stops rendering.
    Error,
    /// Reported; rendering goes on.
    Warning,
}

/// One problem, naming the object and the field to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// `Kind/namespace/name`.
    pub object: String,
    /// JSON path of the field, e.g. `spec.fallbacks[1]`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Problem {
    /// An error.
    pub fn error(object: String, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            object,
            field: field.into(),
            message: message.into(),
        }
    }

    /// A warning.
    pub fn warning(object: String, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            object,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{level}: {}: {}: {}",
            self.object, self.field, self.message
        )
    }
}

/// Adds every cross-object problem of the selected routes and tenants to `problems`.
pub(super) fn check(
    input: &RenderInput<'_>,
    routes: &[&ModelRoute],
    tenants: &[&Tenant],
    problems: &mut Vec<Problem>,
) {
    let chatbot = input.chatbot;
    let spec = &chatbot.spec;
    let cb = chatbot_ref(chatbot);

    // Two routes serving the same model: the first in name order wins, the rest are errors.
    let mut by_model: BTreeMap<&str, &ModelRoute> = BTreeMap::new();
    for route in routes {
        if let Some(first) = by_model.get(route.model_name()) {
            problems.push(Problem::error(
                object_ref(*route),
                if route.spec.model.is_some() { "spec.model" } else { "metadata.name" },
                format!(
                    "model {:?} is already served by ModelRoute {}; give one of them another model name or exclude it with spec.modelSelector of {cb}",
                    route.model_name(),
                    first.name_any()
                ),
            ));
        } else {
            by_model.insert(route.model_name(), route);
        }
    }

    if !routes.is_empty() && !by_model.contains_key(spec.default_model.as_str()) {
        problems.push(Problem::error(
            cb.clone(),
            "spec.defaultModel",
            format!(
                "{:?} is not a selected model; selected models: {}",
                spec.default_model,
                by_model.keys().copied().collect::<Vec<_>>().join(", ")
            ),
        ));
    }

    if let Some(route) = by_model.get(spec.default_model.as_str())
        && route.spec.kind == Some(ModelKind::Embeddings)
    {
        problems.push(Problem::error(
            cb.clone(),
            "spec.defaultModel",
            format!(
                "{:?} is an embeddings model (ModelRoute {}); the default serves chat requests that name no model, so pick a chat model",
                spec.default_model,
                route.name_any()
            ),
        ));
    }

    for route in by_model.values() {
        check_route(route, &by_model, input, problems);
    }
    let graph: BTreeMap<&str, &[String]> = by_model
        .iter()
        .map(|(model, route)| (*model, route.spec.fallbacks.as_slice()))
        .collect();
    if let Some(cycle) = fallback_cycle(&graph)
        && let Some(first) = cycle.first().and_then(|m| by_model.get(m.as_str()))
    {
        problems.push(Problem::error(
            object_ref(*first),
            "spec.fallbacks",
            format!(
                "fallbacks form a cycle: {}; remove one link",
                cycle.join(" -> ")
            ),
        ));
    }

    if spec.max_replicas() > 1 && spec.redis.is_none() {
        problems.push(Problem::error(
            cb.clone(),
            "spec.redis",
            format!(
                "up to {} replicas can run but no Redis is set: per-pod state would multiply limits and split sessions; set spec.redis.urlSecretRef or run one replica",
                spec.max_replicas()
            ),
        ));
    }
    if let Some(a) = spec.gateway.as_ref().and_then(|g| g.autoscaling.as_ref())
        && a.min_replicas > a.max_replicas
    {
        problems.push(Problem::error(
            cb.clone(),
            "spec.gateway.autoscaling",
            format!(
                "minReplicas {} exceeds maxReplicas {}",
                a.min_replicas, a.max_replicas
            ),
        ));
    }
    if let Some(redis) = &spec.redis {
        check_secret(
            input,
            &cb,
            "spec.redis.urlSecretRef",
            &redis.url_secret_ref,
            problems,
        );
    }
    if let Some(usage) = &spec.usage {
        check_secret(
            input,
            &cb,
            "spec.usage.postgresUrlSecretRef",
            &usage.postgres_url_secret_ref,
            problems,
        );
    }

    if let Some(kong) = &spec.kong {
        let key_auth = kong.key_auth.unwrap_or(false);
        if let Some(limit) = &kong.rate_limit {
            if limit.limit_by == Some(KongLimitBy::Consumer) && !key_auth {
                problems.push(Problem::warning(
                    cb.clone(),
                    "spec.kong.rateLimit.limitBy",
                    "consumer needs spec.kong.keyAuth: true; without an authenticated consumer Kong counts by client IP",
                ));
            }
            if limit.policy == Some(KongPolicy::Redis) && limit.redis.is_none() {
                problems.push(Problem::error(
                    cb.clone(),
                    "spec.kong.rateLimit.redis",
                    "policy redis needs spec.kong.rateLimit.redis.host",
                ));
            }
            if [limit.second, limit.minute, limit.hour, limit.day]
                .iter()
                .all(Option::is_none)
            {
                problems.push(Problem::error(
                    cb.clone(),
                    "spec.kong.rateLimit",
                    "sets no limit; set at least one of second, minute, hour, day",
                ));
            }
        }
        if key_auth && tenants.is_empty() {
            problems.push(Problem::warning(
                cb.clone(),
                "spec.kong.keyAuth",
                "no Tenant is selected, so no KongConsumer is rendered: Kong will refuse every request with 401",
            ));
        }
    }

    for tenant in tenants {
        check_tenant(tenant, &by_model, input, problems);
    }
}

fn check_route(
    route: &ModelRoute,
    models: &BTreeMap<&str, &ModelRoute>,
    input: &RenderInput<'_>,
    problems: &mut Vec<Problem>,
) {
    let object = object_ref(route);
    let kind = route.spec.kind.unwrap_or_default();
    for (i, fallback) in route.spec.fallbacks.iter().enumerate() {
        match models.get(fallback.as_str()) {
            None => problems.push(Problem::error(
                object.clone(),
                format!("spec.fallbacks[{i}]"),
                format!(
                    "{fallback:?} is not a model selected by Chatbot {}; create a ModelRoute for it or remove the fallback",
                    input.chatbot.name_any()
                ),
            )),
            Some(other) if other.spec.kind.unwrap_or_default() != kind => {
                problems.push(Problem::error(
                    object.clone(),
                    format!("spec.fallbacks[{i}]"),
                    format!(
                        "{fallback:?} is {} model and cannot stand in for this {} model; remove the fallback or change spec.kind",
                        other.spec.kind.unwrap_or_default().with_article(),
                        kind.as_str()
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    let mut names = HashMap::new();
    for (i, backend) in route.spec.backends.iter().enumerate() {
        if let Some(first) = names.insert(backend.name.as_str(), i) {
            problems.push(Problem::error(
                object.clone(),
                format!("spec.backends[{i}].name"),
                format!(
                    "backend name {:?} is already used by spec.backends[{first}]",
                    backend.name
                ),
            ));
        }
        if route.spec.kind == Some(ModelKind::Embeddings) && backend.provider == Provider::Anthropic
        {
            problems.push(Problem::error(
                object.clone(),
                format!("spec.backends[{i}].provider"),
                "spec.kind is embeddings, but Anthropic has no embeddings API; use an openai backend or kind chat",
            ));
        }
        if backend.h2c == Some(true) && !backend.base_url.starts_with("http://") {
            problems.push(Problem::error(
                object.clone(),
                format!("spec.backends[{i}].h2c"),
                "h2c is HTTP/2 without TLS and needs an http:// baseUrl; https:// backends negotiate HTTP/2 by themselves, remove it",
            ));
        }
        if backend.responses_api == Some(true) && backend.provider != Provider::Openai {
            problems.push(Problem::error(
                object.clone(),
                format!("spec.backends[{i}].responsesApi"),
                "responsesApi needs provider openai (only OpenAI-compatible backends serve the Responses API); remove it: /v1/responses is translated for this backend",
            ));
        }
        if let Some(secret) = &backend.api_key_secret_ref {
            check_secret(
                input,
                &object,
                &format!("spec.backends[{i}].apiKeySecretRef"),
                secret,
                problems,
            );
        }
    }
    if route.spec.backends.is_empty() {
        problems.push(Problem::error(
            object.clone(),
            "spec.backends",
            "lists no backend; add at least one",
        ));
    }
    if let Some(pricing) = &route.spec.pricing {
        for (field, value) in [
            (
                "spec.pricing.inputPerMillionTokens",
                &pricing.input_per_million_tokens,
            ),
            (
                "spec.pricing.outputPerMillionTokens",
                &pricing.output_per_million_tokens,
            ),
        ] {
            if let Err(e) = parse_usd_micros(value) {
                problems.push(Problem::error(object.clone(), field, e.to_string()));
            }
        }
    }
}

fn check_tenant(
    tenant: &Tenant,
    models: &BTreeMap<&str, &ModelRoute>,
    input: &RenderInput<'_>,
    problems: &mut Vec<Problem>,
) {
    let object = object_ref(tenant);
    for (i, key) in tenant.spec.api_keys.iter().enumerate() {
        check_secret(
            input,
            &object,
            &format!("spec.apiKeys[{i}].secretRef"),
            &key.secret_ref,
            problems,
        );
    }
    for (i, key) in tenant.spec.upstream_keys.iter().enumerate() {
        check_secret(
            input,
            &object,
            &format!("spec.upstreamKeys[{i}].secretRef"),
            &key.secret_ref,
            problems,
        );
        match models.get(key.model.as_str()) {
            None => problems.push(Problem::warning(
                object.clone(),
                format!("spec.upstreamKeys[{i}].model"),
                format!(
                    "{:?} is not served by Chatbot {}; the key is unused here",
                    key.model,
                    input.chatbot.name_any()
                ),
            )),
            Some(route) if !route.spec.backends.iter().any(|b| b.name == key.backend) => problems
                .push(Problem::error(
                    object.clone(),
                    format!("spec.upstreamKeys[{i}].backend"),
                    format!(
                        "ModelRoute {} has no backend named {:?}",
                        route.name_any(),
                        key.backend
                    ),
                )),
            Some(_) => {}
        }
    }
    // Entries for models this Chatbot does not serve are left out of its GatewayConfig
    // (another Chatbot selecting the same Tenant may serve them).
    let allowed = &tenant.spec.allowed_models;
    for (i, model) in allowed.iter().enumerate() {
        if !models.contains_key(model.as_str()) {
            problems.push(Problem::warning(
                object.clone(),
                format!("spec.allowedModels[{i}]"),
                format!(
                    "{model:?} is not served by Chatbot {}; ignored here",
                    input.chatbot.name_any()
                ),
            ));
        }
    }
    if !allowed.is_empty() && !allowed.iter().any(|m| models.contains_key(m.as_str())) {
        problems.push(Problem::warning(
            object.clone(),
            "spec.allowedModels",
            format!(
                "allows none of the models Chatbot {} serves; the tenant is left out of its config (its keys get 401 there)",
                input.chatbot.name_any()
            ),
        ));
    }
    if let Some(budget) = &tenant.spec.budget
        && let Err(e) = parse_usd_micros(&budget.monthly_usd)
    {
        problems.push(Problem::error(
            object.clone(),
            "spec.budget.monthlyUsd",
            e.to_string(),
        ));
    }
}

fn check_secret(
    input: &RenderInput<'_>,
    object: &str,
    field: &str,
    secret: &SecretKeyRef,
    problems: &mut Vec<Problem>,
) {
    match input.secrets.get(&secret.name) {
        None => problems.push(Problem::error(
            object.to_string(),
            field,
            format!(
                "Secret {:?} does not exist in the namespace; create it with key {:?}",
                secret.name, secret.key
            ),
        )),
        Some(keys) if !keys.contains(&secret.key) => problems.push(Problem::error(
            object.to_string(),
            field,
            format!(
                "Secret {:?} has no key {:?} (it has: {}); add the key or fix the reference",
                secret.name,
                secret.key,
                keys.iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        Some(_) => {}
    }
}
