//! Parley's API: the `Chatbot`, `Tenant` and `ModelRoute` custom resources and the
//! `GatewayConfig` document the operator renders and the gateway serves from.
//!
//! This crate does no I/O. The operator writes these types, the gateway reads them, so
//! there is exactly one definition of each field.

// kube's `printcolumn(...)` attributes repeat `type_ = ...`, which clippy mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod chatbot;
pub mod common;
pub mod docs;
pub mod gateway_config;
pub mod model_route;
pub mod money;
pub mod names;
pub mod tenant;

pub use chatbot::{Chatbot, ChatbotSpec, ChatbotStatus};
pub use gateway_config::GatewayConfig;
pub use model_route::{ModelRoute, ModelRouteSpec, ModelRouteStatus};
pub use tenant::{Tenant, TenantSpec, TenantStatus};

/// The API group of every Parley custom resource.
pub const GROUP: &str = "parley.dev";
/// The served and stored version of every Parley custom resource.
pub const VERSION: &str = "v1alpha1";

/// Every CRD, in a stable order: what `parley-operator crds` prints.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![Chatbot::crd(), ModelRoute::crd(), Tenant::crd()]
}
