//! The ModelRoute controller: status only (backends, and whether every referenced Secret
//! key exists).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use parley_crds::{ModelRoute, ModelRouteStatus};

use super::conditions::{self, Desired};
use super::{
    Context, Error, drain, measured, object_key, patch_status, retry_later, route_secrets,
    scoped_api,
};
use super::{missing_secret_keys, naming};
use crate::render::SecretKeys;

const KIND: &str = "ModelRoute";
const RESYNC: Duration = Duration::from_secs(600);

/// Runs the ModelRoute controller until `shutdown`.
pub async fn controller(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = ctx.settings.namespace.as_deref();
    let controller = Controller::new(
        scoped_api::<ModelRoute>(&client, ns),
        watcher::Config::default(),
    );
    let reader = controller.store();
    let store = controller.store();
    let secrets_ctx = Arc::clone(&ctx);
    let stream = controller
        // Metadata only: a Secret change re-checks the ModelRoutes that name it.
        .watches(
            scoped_api::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |secret| {
                secrets_ctx.secret_keys.on_event(secret.meta());
                naming(&store, &secret, route_secrets)
            },
        )
        .with_config(super::controller_config())
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx);
    drain(KIND, stream, reader, shutdown).await;
}

async fn reconcile(route: Arc<ModelRoute>, ctx: Arc<Context>) -> Result<Action, Error> {
    measured(route.as_ref(), &ctx, reconcile_inner(&route, &ctx)).await
}

fn error_policy(route: Arc<ModelRoute>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_later(route.as_ref(), error, &ctx)
}

async fn reconcile_inner(route: &ModelRoute, ctx: &Context) -> Result<Action, Error> {
    if route.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(ns) = route.namespace() else {
        return Err(Error::Unnamed(object_key(route)));
    };
    let secrets = ctx.secret_keys(&ns, route_secrets(route)).await?;
    let current = route.status.clone().unwrap_or_default();
    let status = ModelRouteStatus {
        common: parley_crds::common::CommonStatus {
            observed_generation: route.meta().generation,
            conditions: conditions::compute(
                &current.common.conditions,
                &[readiness(route, &secrets)],
                route.meta().generation,
                Timestamp::now(),
            ),
        },
        backends: u32::try_from(route.spec.backends.len()).ok(),
    };
    if route.status.as_ref() != Some(&status) {
        patch_status(&ctx.client, route, &status).await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// `Ready=False, MissingSecret` naming each backend whose key Secret or key is missing.
pub fn readiness(route: &ModelRoute, secrets: &SecretKeys) -> Desired {
    let references = route.spec.backends.iter().enumerate().filter_map(|(i, b)| {
        let secret = b.api_key_secret_ref.as_ref()?;
        Some((format!("spec.backends[{i}].apiKeySecretRef"), secret))
    });
    let missing = missing_secret_keys(references, secrets);
    if missing.is_empty() {
        Desired::ready(
            true,
            "Valid",
            format!("{} backend(s)", route.spec.backends.len()),
        )
    } else {
        Desired::ready(false, "MissingSecret", missing.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_without_its_key_is_not_ready() {
        let route: ModelRoute = serde_json::from_value(serde_json::json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "ModelRoute",
            "metadata": {"name": "gpt-4o", "namespace": "ns"},
            "spec": {"backends": [
                {"name": "a", "provider": "openai", "baseUrl": "http://x/v1", "apiKeySecretRef": {"name": "llm", "key": "a"}},
                {"name": "b", "provider": "openai", "baseUrl": "http://x/v1", "apiKeySecretRef": {"name": "llm", "key": "b"}}
            ]}
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let mut secrets = SecretKeys::new();
        secrets.insert("llm".into(), ["a".to_string()].into());
        let ready = readiness(&route, &secrets);
        assert!(!ready.status);
        assert_eq!(
            ready.message,
            "spec.backends[1].apiKeySecretRef: Secret llm has no key b"
        );
        secrets.insert("llm".into(), ["a".to_string(), "b".to_string()].into());
        assert!(readiness(&route, &secrets).status);
    }
}
