//! `Chatbot`: one deployed fleet of gateway pods and the models and tenants it serves.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, SecretKeyRef};

/// One deployed gateway fleet: the ModelRoutes and Tenants it serves, how it scales, and
/// the shared state it uses.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "parley.dev",
    version = "v1alpha1",
    kind = "Chatbot",
    namespaced,
    status = "ChatbotStatus",
    shortname = "cb",
    category = "parley",
    doc = "A fleet of Parley gateway pods serving the selected ModelRoutes to the selected Tenants.",
    printcolumn(
        name = "Default Model",
        type_ = "string",
        json_path = ".spec.defaultModel"
    ),
    printcolumn(name = "Models", type_ = "integer", json_path = ".status.models"),
    printcolumn(name = "Tenants", type_ = "integer", json_path = ".status.tenants"),
    printcolumn(
        name = "Ready Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
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
#[x_kube(validation = Rule::new("has(self.redis) || !has(self.gateway) || (!has(self.gateway.autoscaling) && (!has(self.gateway.replicas) || self.gateway.replicas <= 1))").message("spec.redis is required when more than one replica can run (gateway.replicas > 1 or gateway.autoscaling): per-pod state would multiply limits and split sessions").field_path(".redis"))]
#[serde(rename_all = "camelCase")]
pub struct ChatbotSpec {
    /// Which ModelRoutes of the namespace this Chatbot serves (absent or empty = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_selector: Option<LabelSelector>,
    /// Which Tenants of the namespace may call this Chatbot (absent or empty = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_selector: Option<LabelSelector>,
    /// The model used when a request names none; must be a selected model.
    #[schemars(length(min = 1, max = 253))]
    pub default_model: String,
    /// System prompt put before the history of every conversation of the `/chat` session
    /// API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65_536))]
    pub system_prompt: Option<String>,
    /// The gateway pods: image, replicas or autoscaling, resources, disruption budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,
    /// Shared state for limits, sessions and cache. Required when more than one replica can
    /// run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    /// What limits do while Redis is unreachable: `open` admits, `closed` refuses (503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_failure_mode: Option<FailureMode>,
    /// The `/chat` session API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<SessionsSpec>,
    /// Usage ledger in PostgreSQL: every gateway pod writes one row per request (tenant,
    /// model, tokens, cost, latency, status) to table `parley_usage` [absent = usage is in
    /// the metrics only].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSpec>,
    /// Browser access (absent = no CORS headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSpec>,
    /// Optional Kong edge layer in front of the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kong: Option<KongSpec>,
}

/// The gateway Deployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Container image [the operator's --gateway-image].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// Fixed replica count [1]; ignored when autoscaling is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// HorizontalPodAutoscaler settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Container resources [requests 250m/256Mi, limits 500m/512Mi].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// PodDisruptionBudget, rendered only when two or more replicas can run [minAvailable: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_disruption_budget: Option<PodDisruptionBudgetSpec>,
}

/// HorizontalPodAutoscaler settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// Fewest replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation the autoscaler aims at [70].
    #[serde(rename = "targetCPUUtilizationPercentage")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: Option<i32>,
}

/// PodDisruptionBudget settings: set one of the two.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(has(self.minAvailable) && has(self.maxUnavailable))").message("set podDisruptionBudget.minAvailable or podDisruptionBudget.maxUnavailable, not both"))]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Pods that must stay up during voluntary disruptions (number or percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
    /// Pods that may be down during voluntary disruptions (number or percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

/// Redis connection.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Secret key holding the Redis URL (`redis://` or `rediss://`, or `redis+cluster://` /
    /// `rediss+cluster://` with comma-separated seed nodes for Redis Cluster; credentials
    /// included).
    pub url_secret_ref: SecretKeyRef,
}

/// What limits do while Redis is unreachable: `open` admits requests without limits,
/// `closed` refuses them with 503 [open].
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Admit requests (limits are not enforced while Redis is down).
    #[default]
    Open,
    /// Refuse requests with 503.
    Closed,
}

/// The `/chat` session API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SessionsSpec {
    /// Seconds a session lives after its last use [3600].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2_592_000))]
    pub ttl_seconds: Option<u64>,
    /// Messages kept per session [50].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 10_000))]
    pub max_messages: Option<u32>,
    /// Requests per minute per session [absent = none].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
}

/// Usage ledger.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsageSpec {
    /// Secret key holding the PostgreSQL URL.
    pub postgres_url_secret_ref: SecretKeyRef,
}

/// CORS settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CorsSpec {
    /// Origins allowed to call the API from a browser, e.g. `https://app.example.com`.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 2048)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub allowed_origins: Vec<String>,
}

/// Kong in front of the gateway.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KongSpec {
    /// IngressClass of the Kong ingress controller [kong].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub ingress_class_name: Option<String>,
    /// Host name the Ingress serves.
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
        )
    )]
    pub host: String,
    /// TLS Secret for the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tls_secret_name: Option<String>,
    /// Edge rate limiting (Kong's rate-limiting plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<KongRateLimit>,
    /// Also authenticate at the edge with KongConsumers [false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_auth: Option<bool>,
}

/// Kong rate-limiting plugin settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.second) || has(self.minute) || has(self.hour) || has(self.day)").message("kong.rateLimit needs at least one of second, minute, hour, day"))]
#[x_kube(validation = Rule::new("!has(self.policy) || self.policy != 'redis' || has(self.redis)").message("kong.rateLimit.redis is required when policy is redis"))]
#[serde(rename_all = "camelCase")]
pub struct KongRateLimit {
    /// Requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub second: Option<u64>,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub minute: Option<u64>,
    /// Requests per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub hour: Option<u64>,
    /// Requests per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub day: Option<u64>,
    /// What one bucket counts [header: the API key sent in Authorization].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_by: Option<KongLimitBy>,
    /// Where Kong keeps counters [local].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<KongPolicy>,
    /// Redis for `policy: redis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<KongRedis>,
}

/// What one Kong rate-limit bucket counts: `header` (the API key sent in `Authorization`),
/// `ip` (the client address) or `consumer` (the KongConsumer; needs keyAuth) [header].
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum KongLimitBy {
    /// The `Authorization` header: one API key = one bucket.
    #[default]
    Header,
    /// The client IP.
    Ip,
    /// The authenticated KongConsumer (needs keyAuth).
    Consumer,
}

/// Where Kong keeps rate-limit counters: `local` (each Kong node's memory), `cluster`
/// (Kong's database) or `redis` (shared by all nodes; set `redis`) [local].
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum KongPolicy {
    /// In each Kong node's memory.
    #[default]
    Local,
    /// In Kong's database.
    Cluster,
    /// In Redis, shared by all nodes.
    Redis,
}

/// Redis used by Kong's rate-limiting plugin.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KongRedis {
    /// Redis host.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Redis port [6379].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Timeout in milliseconds [2000].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60_000))]
    pub timeout: Option<u64>,
}

/// Observed state of a Chatbot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatbotStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Number of ModelRoutes served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<u32>,
    /// Number of Tenants served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<u32>,
    /// Gateway pods ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// SHA-256 of the rendered GatewayConfig.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
}

impl ChatbotSpec {
    /// The most replicas the spec lets run at once.
    pub fn max_replicas(&self) -> i32 {
        match &self.gateway {
            Some(GatewaySpec {
                autoscaling: Some(a),
                ..
            }) => a.max_replicas,
            Some(GatewaySpec {
                replicas: Some(r), ..
            }) => *r,
            _ => 1,
        }
    }

    /// The fewest replicas the spec lets run.
    pub fn min_replicas(&self) -> i32 {
        match &self.gateway {
            Some(GatewaySpec {
                autoscaling: Some(a),
                ..
            }) => a.min_replicas,
            Some(GatewaySpec {
                replicas: Some(r), ..
            }) => *r,
            _ => 1,
        }
    }
}
