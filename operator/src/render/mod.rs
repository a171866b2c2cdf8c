//! `render`: specs in, objects out, no I/O.
//!
//! Given a Chatbot, the ModelRoutes and Tenants of its namespace, and which Secret keys
//! exist, [`render`] returns every object the Chatbot owns, or every problem that stops it.
//! Output is deterministic: the same input gives byte-identical YAML, in a stable order.

mod config;
pub mod kong;
mod problems;
mod workload;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use parley_crds::{Chatbot, ModelRoute, Tenant};
use serde::Serialize;

pub use kong::{KongConsumer, KongCredential, KongPlugin};
pub use problems::{Problem, Severity};

/// Where the gateway pods find the ConfigMap.
pub const CONFIG_DIR: &str = "/etc/parley";
/// The ConfigMap key holding the GatewayConfig.
pub const CONFIG_KEY: &str = "config.yaml";
/// Where every referenced Secret key is mounted: `<dir>/<secret>/<key>`.
pub const SECRETS_DIR: &str = "/var/run/parley/secrets";
/// The chat API port inside the pod.
pub const HTTP_PORT: i32 = 8080;
/// The admin port (`/healthz`, `/readyz`, `/metrics`) inside the pod.
pub const ADMIN_PORT: i32 = 9090;
/// The largest GatewayConfig a ConfigMap may carry (ConfigMaps stop at 1 MiB).
pub const MAX_CONFIG_BYTES: usize = 900 * 1024;
/// Field manager and `app.kubernetes.io/managed-by` value.
pub const MANAGER: &str = "parley-operator";

/// Which keys exist in which Secrets of the namespace: Secret name -> key names. Values
/// never reach `render`.
pub type SecretKeys = BTreeMap<String, BTreeSet<String>>;

/// Everything `render` reads.
#[derive(Clone, Copy, Debug)]
pub struct RenderInput<'a> {
    /// The Chatbot to render.
    pub chatbot: &'a Chatbot,
    /// ModelRoutes of the Chatbot's namespace (render applies the selector).
    pub model_routes: &'a [ModelRoute],
    /// Tenants of the Chatbot's namespace (render applies the selector).
    pub tenants: &'a [Tenant],
    /// Secret keys that exist in the namespace.
    pub secrets: &'a SecretKeys,
    /// Image used when the Chatbot names none (the operator's `--gateway-image`).
    pub default_image: &'a str,
}

/// The objects of one Chatbot.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// ServiceAccount `<cb>-gateway`.
    pub service_account: ServiceAccount,
    /// ConfigMap `<cb>-gateway` with the GatewayConfig.
    pub config_map: ConfigMap,
    /// Deployment `<cb>-gateway`.
    pub deployment: Deployment,
    /// Service `<cb>-gateway`.
    pub service: Service,
    /// HorizontalPodAutoscaler, when autoscaling is set.
    pub autoscaler: Option<HorizontalPodAutoscaler>,
    /// PodDisruptionBudget, when two or more replicas can run.
    pub disruption_budget: Option<PodDisruptionBudget>,
    /// Ingress `<cb>-gateway` for Kong, when `spec.kong` is set.
    pub ingress: Option<Ingress>,
    /// KongPlugins `<cb>-rate-limiting` and `<cb>-key-auth`, those that `spec.kong` asks for.
    pub kong_plugins: Vec<KongPlugin>,
    /// One KongConsumer `<namespace>-<tenant>` per selected Tenant (`keyAuth` only),
    /// owned by the Tenant.
    pub kong_consumers: Vec<KongConsumer>,
    /// The credential Secrets of the KongConsumers. They carry a copy of a Tenant key, so
    /// render only names them; the controller writes them. Not in [`Rendered::objects`].
    pub kong_credentials: Vec<KongCredential>,
    /// SHA-256 (hex) of the GatewayConfig text.
    pub config_hash: String,
    /// Names of the selected models, sorted.
    pub models: Vec<String>,
    /// Ids (`namespace/name`) of the selected tenants, sorted.
    pub tenants: Vec<String>,
    /// Problems that did not stop rendering.
    pub warnings: Vec<Problem>,
}

impl Rendered {
    /// Every object as a JSON value, in apply order.
    pub fn objects(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        fn push<T: Serialize>(
            out: &mut Vec<serde_json::Value>,
            object: &T,
        ) -> Result<(), serde_json::Error> {
            out.push(serde_json::to_value(object)?);
            Ok(())
        }
        let mut out = Vec::with_capacity(6);
        push(&mut out, &self.service_account)?;
        push(&mut out, &self.config_map)?;
        push(&mut out, &self.deployment)?;
        push(&mut out, &self.service)?;
        if let Some(hpa) = &self.autoscaler {
            push(&mut out, hpa)?;
        }
        if let Some(pdb) = &self.disruption_budget {
            push(&mut out, pdb)?;
        }
        if let Some(ingress) = &self.ingress {
            push(&mut out, ingress)?;
        }
        for plugin in &self.kong_plugins {
            push(&mut out, plugin)?;
        }
        for consumer in &self.kong_consumers {
            push(&mut out, consumer)?;
        }
        Ok(out)
    }
}

impl Rendered {
    /// Every object as one multi-document YAML stream (`---` before each document).
    pub fn to_yaml(&self) -> Result<String, RenderOutputError> {
        let mut out = String::new();
        for object in self.objects()? {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&object)?);
        }
        Ok(out)
    }
}

/// Rendered objects could not be serialised (a bug, not bad input).
#[derive(Debug, thiserror::Error)]
pub enum RenderOutputError {
    /// To JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// To YAML.
    #[error(transparent)]
    Yaml(#[from] serde_yaml::Error),
}

/// Why a Chatbot could not be rendered: every error found, and the warnings.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{} problem(s) in Chatbot {}", .problems.iter().filter(|p| p.severity == Severity::Error).count(), .chatbot)]
pub struct RenderError {
    /// `namespace/name` of the Chatbot.
    pub chatbot: String,
    /// Errors and warnings, errors first.
    pub problems: Vec<Problem>,
}

/// Renders the objects of `input.chatbot`.
pub fn render(input: &RenderInput<'_>) -> Result<Rendered, RenderError> {
    let chatbot = input.chatbot;
    let mut problems = Vec::new();
    let routes = select_routes(input, &mut problems);
    let tenants = select_tenants(input, &mut problems);
    problems::check(input, &routes, &tenants, &mut problems);

    let gateway_config = config::gateway_config(input, &routes, &tenants);
    let config_text = match gateway_config.to_yaml() {
        Ok(text) => text,
        Err(e) => {
            problems.push(Problem::error(
                chatbot_ref(chatbot),
                "spec",
                format!("cannot serialise the GatewayConfig: {e}"),
            ));
            String::new()
        }
    };
    if config_text.len() > MAX_CONFIG_BYTES {
        problems.push(Problem::error(
            chatbot_ref(chatbot),
            "spec",
            format!(
                "ConfigTooLarge: the GatewayConfig is {} bytes, over the {MAX_CONFIG_BYTES}-byte limit of a ConfigMap; select fewer ModelRoutes or Tenants",
                config_text.len()
            ),
        ));
    }
    if problems.iter().any(|p| p.severity == Severity::Error) {
        problems.sort_by_key(|p| p.severity);
        return Err(RenderError {
            chatbot: namespaced_name(chatbot),
            problems,
        });
    }

    let config_hash = config::hash(&config_text);
    let objects = workload::Workload::new(input, &routes, &tenants, &gateway_config);
    let kong = kong::render(chatbot, &tenants, objects.labels());
    Ok(Rendered {
        service_account: objects.service_account(),
        config_map: objects.config_map(config_text),
        deployment: objects.deployment(),
        service: objects.service(),
        autoscaler: objects.autoscaler(),
        disruption_budget: objects.disruption_budget(),
        ingress: kong.ingress,
        kong_plugins: kong.plugins,
        kong_consumers: kong.consumers,
        kong_credentials: kong.credentials,
        config_hash,
        models: gateway_config
            .models
            .iter()
            .map(|m| m.name.clone())
            .collect(),
        tenants: gateway_config
            .tenants
            .iter()
            .map(|t| t.id.clone())
            .collect(),
        warnings: problems,
    })
}

/// Whether `chatbot` selects `tenant` (same namespace, selector matches; an invalid
/// selector selects nothing).
pub fn selects_tenant(chatbot: &Chatbot, tenant: &Tenant) -> bool {
    same_namespace(tenant, chatbot)
        && selector_matches(chatbot.spec.tenant_selector.as_ref(), tenant.labels()).unwrap_or(false)
}

/// `Kind/namespace/name` of an object, as problems name it.
fn object_ref<K: kube::Resource<DynamicType = ()>>(object: &K) -> String {
    format!("{}/{}", K::kind(&()), namespaced_name(object))
}

fn chatbot_ref(chatbot: &Chatbot) -> String {
    object_ref(chatbot)
}

fn namespaced_name<K: kube::Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// Applies a selector; an absent selector matches everything.
fn selector_matches(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    match selector {
        None => Ok(true),
        Some(selector) => {
            let selector = Selector::try_from(selector.clone()).map_err(|e| e.to_string())?;
            Ok(selector.matches(labels))
        }
    }
}

/// A selector parsed once (absent: `None`, which matches everything).
fn parsed_selector(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Result<Option<Selector>, String> {
    selector
        .map(|s| Selector::try_from(s.clone()).map_err(|e| e.to_string()))
        .transpose()
}

fn same_namespace<K: kube::Resource>(a: &K, chatbot: &Chatbot) -> bool {
    a.meta().namespace == chatbot.metadata.namespace
}

fn select_routes<'a>(input: &RenderInput<'a>, problems: &mut Vec<Problem>) -> Vec<&'a ModelRoute> {
    let chatbot = input.chatbot;
    // The selector is parsed once per render, not once per ModelRoute or Tenant.
    let mut candidates = input
        .model_routes
        .iter()
        .filter(|r| same_namespace(*r, chatbot))
        .peekable();
    // An invalid selector is reported when there is something to select from.
    let selector = match parsed_selector(chatbot.spec.model_selector.as_ref()) {
        Ok(selector) => selector,
        Err(e) if candidates.peek().is_some() => {
            problems.push(Problem::error(
                chatbot_ref(chatbot),
                "spec.modelSelector",
                e,
            ));
            return Vec::new();
        }
        Err(_) => Some(Selector::default()),
    };
    let mut selected: Vec<&ModelRoute> = candidates
        .filter(|r| selector.as_ref().is_none_or(|s| s.matches(r.labels())))
        .collect();
    selected.sort_by(|a, b| {
        a.model_name()
            .cmp(b.model_name())
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    if selected.is_empty() {
        problems.push(Problem::error(
            chatbot_ref(chatbot),
            "spec.modelSelector",
            "selects no ModelRoute in the namespace: the gateway would have no model to serve",
        ));
    }
    selected
}

fn select_tenants<'a>(input: &RenderInput<'a>, problems: &mut Vec<Problem>) -> Vec<&'a Tenant> {
    let chatbot = input.chatbot;
    let mut candidates = input
        .tenants
        .iter()
        .filter(|t| same_namespace(*t, chatbot))
        .peekable();
    let selector = match parsed_selector(chatbot.spec.tenant_selector.as_ref()) {
        Ok(selector) => selector,
        Err(e) if candidates.peek().is_some() => {
            problems.push(Problem::error(
                chatbot_ref(chatbot),
                "spec.tenantSelector",
                e,
            ));
            return Vec::new();
        }
        Err(_) => Some(Selector::default()),
    };
    let mut selected: Vec<&Tenant> = candidates
        .filter(|t| selector.as_ref().is_none_or(|s| s.matches(t.labels())))
        .collect();
    selected.sort_by_key(|t| t.name_any());
    if selected.is_empty() && !problems.iter().any(|p| p.field == "spec.tenantSelector") {
        problems.push(Problem::warning(
            chatbot_ref(chatbot),
            "spec.tenantSelector",
            "selects no Tenant in the namespace: every request will be refused with 401",
        ));
    }
    selected
}

#[cfg(test)]
mod tests;
