//! The Kong edge layer of a Chatbot (`spec.kong`): an Ingress for Kong's ingress
//! controller, KongPlugins, and one KongConsumer per selected Tenant.
//!
//! KongPlugin and KongConsumer have no `spec` (their fields are top level), so they are
//! hand-written serde types rather than `#[derive(CustomResource)]`. The credential Secret
//! of a KongConsumer carries a copy of the Tenant's key: render only names it
//! ([`KongCredential`]); the Chatbot controller writes its value.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Resource, ResourceExt};
use parley_crds::chatbot::{KongLimitBy, KongPolicy, KongRateLimit, KongSpec};
use parley_crds::common::SecretKeyRef;
use parley_crds::names::{bounded_name, child_name};
use parley_crds::{Chatbot, Tenant};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// API version of KongPlugin and KongConsumer.
pub const KONG_API_VERSION: &str = "configuration.konghq.com/v1";
/// IngressClass used when `spec.kong.ingressClassName` is absent.
pub const DEFAULT_INGRESS_CLASS: &str = "kong";
/// Label Kong's ingress controller looks for on credential Secrets.
pub const CREDENTIAL_LABEL: &str = "konghq.com/credential";
/// Data key of a key-auth credential Secret.
pub const CREDENTIAL_KEY: &str = "key";
/// Header names Kong's key-auth reads (it cannot read `Authorization: Bearer`).
pub const KEY_NAMES: [&str; 2] = ["apikey", "x-api-key"];
/// Default Redis port and timeout (ms) of the rate-limiting plugin.
const REDIS_PORT: u16 = 6379;
const REDIS_TIMEOUT_MS: u64 = 2000;

/// A `configuration.konghq.com/v1` KongPlugin: `plugin` and `config` are top level.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KongPlugin {
    /// `configuration.konghq.com/v1`.
    pub api_version: String,
    /// `KongPlugin`.
    pub kind: String,
    /// Name, namespace, labels, owner.
    pub metadata: ObjectMeta,
    /// The Kong plugin name, e.g. `rate-limiting`.
    pub plugin: String,
    /// The plugin's configuration (Kong's field names).
    pub config: serde_json::Value,
}

/// A `configuration.konghq.com/v1` KongConsumer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KongConsumer {
    /// `configuration.konghq.com/v1`.
    pub api_version: String,
    /// `KongConsumer`.
    pub kind: String,
    /// Name, namespace, labels, annotations, owner (the Tenant).
    pub metadata: ObjectMeta,
    /// Kong username, `<namespace>-<tenant>` (usernames are global in Kong).
    pub username: String,
    /// Names of the credential Secrets.
    pub credentials: Vec<String>,
}

impl KongPlugin {
    /// For `Api<DynamicObject>`.
    pub fn api_resource() -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("configuration.konghq.com", "v1", "KongPlugin"),
            "kongplugins",
        )
    }
}

impl KongConsumer {
    /// For `Api<DynamicObject>`.
    pub fn api_resource() -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("configuration.konghq.com", "v1", "KongConsumer"),
            "kongconsumers",
        )
    }
}

/// A credential Secret to keep as a copy of a Tenant key. Carries no value: the
/// controller reads `source` and writes Secret `name` (data key `key`).
#[derive(Clone, Debug, PartialEq)]
pub struct KongCredential {
    /// Name of the credential Secret.
    pub name: String,
    /// Namespace.
    pub namespace: Option<String>,
    /// The Tenant's key Secret and key it copies.
    pub source: SecretKeyRef,
    /// Labels of the credential Secret (those of the children, plus
    /// `konghq.com/credential: key-auth`).
    pub labels: BTreeMap<String, String>,
    /// Owner: the Tenant (when its uid is known).
    pub owner: Option<OwnerReference>,
}

/// Everything rendered for `spec.kong`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct KongObjects {
    /// Ingress `<cb>-gateway`.
    pub ingress: Option<Ingress>,
    /// `<cb>-rate-limiting`, then `<cb>-key-auth`.
    pub plugins: Vec<KongPlugin>,
    /// One per selected Tenant (keyAuth only), in tenant name order.
    pub consumers: Vec<KongConsumer>,
    /// The credential Secrets of the consumers (names only).
    pub credentials: Vec<KongCredential>,
}

/// The KongConsumer name (and username) of a Tenant: `<namespace>-<tenant>`, bounded.
pub fn consumer_name(namespace: &str, tenant: &str) -> String {
    bounded_name(&format!("{namespace}-{tenant}"))
}

/// The credential Secret of the `index`-th key of `tenant`.
pub fn credential_name(tenant: &str, index: usize) -> String {
    if index == 0 {
        child_name(tenant, "kong-key")
    } else {
        child_name(tenant, &format!("kong-key-{index}"))
    }
}

/// Renders the Kong objects of `chatbot` (nothing when `spec.kong` is absent).
pub(super) fn render(
    chatbot: &Chatbot,
    tenants: &[&Tenant],
    labels: &BTreeMap<String, String>,
) -> KongObjects {
    let Some(kong) = &chatbot.spec.kong else {
        return KongObjects::default();
    };
    let cb = chatbot.name_any();
    let namespace = chatbot.namespace();
    let owner = chatbot.controller_owner_ref(&());
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: namespace.clone(),
        labels: Some(labels.clone()),
        owner_references: owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    let class = kong
        .ingress_class_name
        .clone()
        .unwrap_or_else(|| DEFAULT_INGRESS_CLASS.to_string());

    let mut plugins = Vec::new();
    if let Some(limit) = &kong.rate_limit {
        plugins.push(KongPlugin {
            api_version: KONG_API_VERSION.into(),
            kind: "KongPlugin".into(),
            metadata: meta(child_name(&cb, "rate-limiting")),
            plugin: "rate-limiting".into(),
            config: rate_limit_config(limit),
        });
    }
    let key_auth = kong.key_auth.unwrap_or(false);
    if key_auth {
        plugins.push(KongPlugin {
            api_version: KONG_API_VERSION.into(),
            kind: "KongPlugin".into(),
            metadata: meta(child_name(&cb, "key-auth")),
            plugin: "key-auth".into(),
            config: json!({"key_names": KEY_NAMES, "hide_credentials": false}),
        });
    }

    let mut consumers = Vec::new();
    let mut credentials = Vec::new();
    if key_auth {
        let ns = namespace.clone().unwrap_or_default();
        for tenant in tenants {
            let tenant_name = tenant.name_any();
            let tenant_owner = tenant.controller_owner_ref(&());
            let mut credential_labels = labels.clone();
            credential_labels.insert(CREDENTIAL_LABEL.into(), "key-auth".into());
            credential_labels.insert("parley.dev/tenant".into(), bounded_name(&tenant_name));
            let names: Vec<String> = tenant
                .api_key_refs()
                .into_iter()
                .enumerate()
                .map(|(i, source)| {
                    let name = credential_name(&tenant_name, i);
                    credentials.push(KongCredential {
                        name: name.clone(),
                        namespace: namespace.clone(),
                        source,
                        labels: credential_labels.clone(),
                        owner: tenant_owner.clone(),
                    });
                    name
                })
                .collect();
            let username = consumer_name(&ns, &tenant_name);
            let mut consumer_labels = labels.clone();
            consumer_labels.insert("parley.dev/tenant".into(), bounded_name(&tenant_name));
            consumers.push(KongConsumer {
                api_version: KONG_API_VERSION.into(),
                kind: "KongConsumer".into(),
                metadata: ObjectMeta {
                    name: Some(username.clone()),
                    namespace: namespace.clone(),
                    labels: Some(consumer_labels),
                    annotations: Some(BTreeMap::from([(
                        "kubernetes.io/ingress.class".to_string(),
                        class.clone(),
                    )])),
                    owner_references: tenant_owner.map(|o| vec![o]),
                    ..ObjectMeta::default()
                },
                username,
                credentials: names,
            });
        }
    }

    KongObjects {
        ingress: Some(ingress(
            kong,
            &class,
            meta(child_name(&cb, "gateway")),
            &plugins,
        )),
        plugins,
        consumers,
        credentials,
    }
}

fn ingress(
    kong: &KongSpec,
    class: &str,
    mut metadata: ObjectMeta,
    plugins: &[KongPlugin],
) -> Ingress {
    if !plugins.is_empty() {
        let list: Vec<String> = plugins
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        metadata.annotations = Some(BTreeMap::from([(
            "konghq.com/plugins".to_string(),
            list.join(","),
        )]));
    }
    let service = metadata.name.clone().unwrap_or_default();
    Ingress {
        metadata,
        spec: Some(IngressSpec {
            ingress_class_name: Some(class.to_string()),
            tls: kong.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: Some(vec![kong.host.clone()]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            rules: Some(vec![IngressRule {
                host: Some(kong.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".into()),
                        path_type: "Prefix".into(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: service,
                                port: Some(ServiceBackendPort {
                                    number: Some(80),
                                    name: None,
                                }),
                            }),
                            resource: None,
                        },
                    }],
                }),
            }]),
            default_backend: None,
        }),
        status: None,
    }
}

/// Kong 3.x `rate-limiting` config: nested `redis` (never the deprecated flat `redis_*`).
fn rate_limit_config(limit: &KongRateLimit) -> serde_json::Value {
    let mut config = serde_json::Map::new();
    for (field, value) in [
        ("second", limit.second),
        ("minute", limit.minute),
        ("hour", limit.hour),
        ("day", limit.day),
    ] {
        if let Some(v) = value {
            config.insert(field.into(), v.into());
        }
    }
    let limit_by = limit.limit_by.unwrap_or_default();
    config.insert(
        "limit_by".into(),
        match limit_by {
            KongLimitBy::Header => "header",
            KongLimitBy::Ip => "ip",
            KongLimitBy::Consumer => "consumer",
        }
        .into(),
    );
    if limit_by == KongLimitBy::Header {
        config.insert("header_name".into(), "Authorization".into());
    }
    let policy = limit.policy.unwrap_or_default();
    config.insert(
        "policy".into(),
        match policy {
            KongPolicy::Local => "local",
            KongPolicy::Cluster => "cluster",
            KongPolicy::Redis => "redis",
        }
        .into(),
    );
    if policy == KongPolicy::Redis
        && let Some(redis) = &limit.redis
    {
        config.insert(
            "redis".into(),
            json!({
                "host": redis.host,
                "port": redis.port.unwrap_or(REDIS_PORT),
                "timeout": redis.timeout.unwrap_or(REDIS_TIMEOUT_MS),
            }),
        );
    }
    // Keep proxying when the counter store is unreachable; show clients their limits;
    // count synchronously (-1: every request updates the store, no drift between nodes).
    config.insert("fault_tolerant".into(), true.into());
    config.insert("hide_client_headers".into(), false.into());
    config.insert("sync_rate".into(), (-1).into());
    serde_json::Value::Object(config)
}
