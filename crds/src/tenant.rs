//! `Tenant`: a customer or team with its own keys, limits and spend.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, SecretKeyRef};

/// A customer or team calling the gateway with its own API keys, limits and budget.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "parley.dev",
    version = "v1alpha1",
    kind = "Tenant",
    namespaced,
    status = "TenantStatus",
    shortname = "tn",
    category = "parley",
    doc = "A customer or team with its own API keys, allowed models, rate limits, quotas and monthly budget.",
    printcolumn(
        name = "Display Name",
        type_ = "string",
        json_path = ".spec.displayName"
    ),
    printcolumn(name = "Key Secret", type_ = "string", json_path = ".status.keySecret"),
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
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// Human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub display_name: Option<String>,
    /// The tenant's API keys. Empty: the operator generates Secret `<tenant>-api-key` (key
    /// `api-key`) once and never replaces it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub api_keys: Vec<ApiKeyRef>,
    /// Models the tenant may use (empty = all); others are refused with 403 and skipped as
    /// fallbacks. A Chatbot ignores entries for models it does not serve (another Chatbot
    /// may serve them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub allowed_models: Vec<String>,
    /// Request and token limits over sliding windows (absent = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Per-model limits, in addition to the tenant-wide ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["model".into()]))]
    pub model_quotas: Vec<ModelQuota>,
    /// Monthly spend cap; requests are refused with 402 once it is spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Tenant-owned provider keys, used instead of the route's key for that backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["model".into(), "backend".into()]))]
    pub upstream_keys: Vec<UpstreamKey>,
    /// Largest request body this tenant may send, in bytes (absent = the gateway's
    /// `limits.maxBodyBytes`); a larger one is answered 413 without reaching a provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 67108864))]
    pub max_body_bytes: Option<u64>,
}

/// A reference to one API key of the tenant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyRef {
    /// The Secret key holding the API key.
    pub secret_ref: SecretKeyRef,
}

/// Request and token limits. A per-minute limit of N admits at most N requests in any
/// 60-second window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Requests in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    /// Requests in any hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_hour: Option<u64>,
    /// Requests in any day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_day: Option<u64>,
    /// Input plus output tokens in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
}

/// Limits of one tenant on one model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.requestsPerMinute) || has(self.tokensPerMinute)").message("a model quota needs requestsPerMinute or tokensPerMinute"))]
#[serde(rename_all = "camelCase")]
pub struct ModelQuota {
    /// The model the quota applies to.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// Requests in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    /// Tokens in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
}

/// A monthly spend cap.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// USD per calendar month (UTC), e.g. "500.00".
    #[schemars(regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"))]
    pub monthly_usd: String,
}

/// A tenant-owned provider key for one backend of one model.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamKey {
    /// The model whose backend uses this key.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// The backend name within that model's route.
    #[schemars(length(min = 1, max = 63))]
    pub backend: String,
    /// The Secret key holding the provider key.
    pub secret_ref: SecretKeyRef,
}

/// Observed state of a Tenant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// The Secret holding the generated key, when the operator generated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<String>,
}

/// The Secret key of a Tenant's generated API key.
pub const GENERATED_KEY: &str = "api-key";

impl Tenant {
    /// Name of the Secret the operator generates for a Tenant without keys.
    pub fn generated_key_secret_name(&self) -> String {
        crate::names::child_name(self.metadata.name.as_deref().unwrap_or_default(), "api-key")
    }

    /// The Secret keys holding this tenant's API keys: its own, or the generated one.
    pub fn api_key_refs(&self) -> Vec<SecretKeyRef> {
        if self.spec.api_keys.is_empty() {
            vec![SecretKeyRef {
                name: self.generated_key_secret_name(),
                key: GENERATED_KEY.to_string(),
            }]
        } else {
            self.spec
                .api_keys
                .iter()
                .map(|k| k.secret_ref.clone())
                .collect()
        }
    }
}
