//! The Tenant controller: a Tenant without `apiKeys` gets Secret `<tenant>-api-key` (key
//! `api-key`), created once with POST and never updated or replaced; Tenant status; and the
//! removal of the Tenant's Kong consumer and credential copies once no Chatbot of the
//! namespace with `kong.keyAuth` selects it (e.g. that Chatbot was deleted).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use parley_crds::tenant::GENERATED_KEY;
use parley_crds::{Chatbot, Tenant, TenantStatus};

use super::conditions::{self, Desired};
use super::{
    Context, Error, drain, kube_err, measured, missing_secret_keys, naming, object_key,
    patch_status, retry_later, same_namespace, scoped_api, tenant_secrets,
};
use crate::render::{MANAGER, SecretKeys};

const KIND: &str = "Tenant";
const RESYNC: Duration = Duration::from_secs(600);

/// Runs the Tenant controller until `shutdown`.
pub async fn controller(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = ctx.settings.namespace.as_deref();
    // A new Tenant, a new generation (a spec change) or other labels or annotations
    // trigger a reconcile, not the status this controller writes (see the Chatbot
    // controller).
    let (reader, tenants) = super::spec_changes::<Tenant>(&client, ns, Arc::clone(&ctx));
    let controller = Controller::for_stream(tenants, reader.clone());
    let store = reader.clone();
    let chatbot_store = store.clone();
    let secrets_ctx = Arc::clone(&ctx);
    let key_auth_chatbots = std::sync::Mutex::new(std::collections::HashSet::<String>::new());
    let stream = controller
        // Metadata only: a deleted key Secret is recreated, and no value is cached. A
        // Secret change re-checks the Tenants that name it (MissingSecret).
        .watches(
            scoped_api::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |secret| {
                secrets_ctx.secret_keys.on_event(secret.meta());
                let mut tenants = naming(&store, &secret, tenant_secrets);
                tenants.extend(credential_owner(&secret));
                tenants
            },
        )
        // A change (its deletion included) of a Chatbot with `kong.keyAuth`, or of one that
        // had it, re-checks the Tenants of its namespace: Kong consumers and credential
        // copies no Chatbot wants any more are deleted. Other Chatbots concern no Tenant.
        .watches(
            scoped_api::<Chatbot>(&client, ns),
            watcher::Config::default(),
            move |chatbot| {
                let key_auth = chatbot.spec.kong.as_ref().and_then(|k| k.key_auth) == Some(true);
                let had = match key_auth_chatbots.lock() {
                    Ok(mut seen) if key_auth => {
                        seen.insert(object_key(&chatbot));
                        true
                    }
                    Ok(mut seen) => seen.remove(&object_key(&chatbot)),
                    // Poisoned: cannot tell, so re-check.
                    Err(_) => true,
                };
                if key_auth || had {
                    same_namespace(&chatbot_store, &chatbot)
                } else {
                    Vec::new()
                }
            },
        )
        .with_config(super::controller_config())
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx);
    drain(KIND, stream, reader, shutdown).await;
}

/// The Tenant a Kong credential copy belongs to. A Chatbot reconcile that was already
/// running when its Chatbot went away can write a copy (and its consumer, written just
/// before it) after the Tenant pruned them: the copy's event makes the Tenant check again.
fn credential_owner(secret: &PartialObjectMeta<Secret>) -> Option<ObjectRef<Tenant>> {
    let meta = secret.meta();
    let is_copy = meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(crate::render::kong::CREDENTIAL_LABEL));
    if !is_copy || meta.deletion_timestamp.is_some() {
        return None;
    }
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Tenant" && o.api_version == Tenant::api_version(&()))?;
    Some(ObjectRef::new(&owner.name).within(meta.namespace.as_deref()?))
}

async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let tenant = with_known_status(tenant, &ctx);
    measured(tenant.as_ref(), &ctx, reconcile_inner(&tenant, &ctx)).await
}

/// The Tenant with the status this process last wrote, while the cache still holds the
/// version it was written over (so the same status is not written twice).
fn with_known_status(tenant: Arc<Tenant>, ctx: &Context) -> Arc<Tenant> {
    let known = ctx
        .tenant_status
        .lock()
        .ok()
        .and_then(|m| m.get(&object_key(tenant.as_ref())).cloned());
    match known {
        Some((over, status)) if over.is_some() && over == tenant.meta().resource_version => {
            let mut newer = tenant.as_ref().clone();
            newer.status = Some(status);
            Arc::new(newer)
        }
        _ => tenant,
    }
}

fn error_policy(tenant: Arc<Tenant>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_later(tenant.as_ref(), error, &ctx)
}

async fn reconcile_inner(tenant: &Tenant, ctx: &Context) -> Result<Action, Error> {
    if tenant.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(ns) = tenant.namespace() else {
        return Err(Error::Unnamed(object_key(tenant)));
    };
    let key_secret = if tenant.spec.api_keys.is_empty() {
        let name = tenant.generated_key_secret_name();
        ensure_key_secret(ctx, tenant, &ns, &name).await?;
        Some(name)
    } else {
        None
    };
    super::kong::prune_unwanted_for_tenant(ctx, &ns, tenant).await?;
    // The generated key Secret was just made sure of; otherwise read the Secrets the
    // Tenant names, by name, for their key names.
    let secrets = if key_secret.is_some() {
        SecretKeys::new()
    } else {
        ctx.secret_keys(&ns, tenant_secrets(tenant)).await?
    };
    let desired = readiness(tenant, &secrets, key_secret.is_some());
    let current = tenant.status.clone().unwrap_or_default();
    let status = TenantStatus {
        common: parley_crds::common::CommonStatus {
            observed_generation: tenant.meta().generation,
            conditions: conditions::compute(
                &current.common.conditions,
                &[desired],
                tenant.meta().generation,
                Timestamp::now(),
            ),
        },
        key_secret,
    };
    if tenant.status.as_ref() != Some(&status) {
        patch_status(&ctx.client, tenant, &status).await?;
        if let Ok(mut known) = ctx.tenant_status.lock() {
            known.insert(
                object_key(tenant),
                (tenant.meta().resource_version.clone(), status),
            );
        }
    }
    Ok(Action::requeue(RESYNC))
}

/// `Ready`: every key Secret the Tenant names exists with its key. The generated Secret
/// was just created (or already existed), so it counts as present.
fn readiness(tenant: &Tenant, secrets: &SecretKeys, generated: bool) -> Desired {
    if generated {
        return Desired::ready(
            true,
            "KeyGenerated",
            format!(
                "API key in Secret {} (key {GENERATED_KEY})",
                tenant.generated_key_secret_name()
            ),
        );
    }
    let api_keys = tenant.spec.api_keys.iter().enumerate();
    let upstream_keys = tenant.spec.upstream_keys.iter().enumerate();
    let missing = missing_secret_keys(
        api_keys
            .map(|(i, k)| (format!("spec.apiKeys[{i}].secretRef"), &k.secret_ref))
            .chain(
                upstream_keys
                    .map(|(i, k)| (format!("spec.upstreamKeys[{i}].secretRef"), &k.secret_ref)),
            ),
        secrets,
    );
    if missing.is_empty() {
        Desired::ready(
            true,
            "KeysConfigured",
            format!("{} API key(s)", tenant.spec.api_keys.len()),
        )
    } else {
        Desired::ready(false, "MissingSecret", missing.join("; "))
    }
}

/// A new API key: `pk-` and 32 bytes of OS randomness in hex.
pub fn generate_key() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    Ok(format!("pk-{}", hex::encode(bytes)))
}

/// Creates the generated key Secret if it does not exist. POST only: an existing Secret
/// (409) is left exactly as it is, so a key is never replaced.
async fn ensure_key_secret(
    ctx: &Context,
    tenant: &Tenant,
    ns: &str,
    name: &str,
) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    // A metadata read first: the usual case (it exists) costs no key generation and
    // transfers no value.
    if api
        .get_metadata_opt(name)
        .await
        .map_err(kube_err(format!("reading Secret {ns}/{name} metadata")))?
        .is_some()
    {
        return Ok(());
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGER.to_string(),
                ),
                (
                    "app.kubernetes.io/part-of".to_string(),
                    "parley".to_string(),
                ),
                ("parley.dev/tenant".to_string(), tenant.name_any()),
            ])),
            owner_references: tenant.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            GENERATED_KEY.to_string(),
            ByteString(generate_key()?.into_bytes()),
        )])),
        ..Secret::default()
    };
    let params = PostParams {
        field_manager: Some(MANAGER.to_string()),
        ..PostParams::default()
    };
    match api.create(&params, &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{ns}/{name}"), tenant = %tenant.name_any(), "generated an API key Secret");
            super::chatbot::publish(
                ctx,
                tenant,
                kube::runtime::events::EventType::Normal,
                "KeyGenerated",
                "Create",
                format!("generated API key Secret {name} (key {GENERATED_KEY})"),
            )
            .await;
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(kube_err(format!("creating Secret {ns}/{name}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_long_random_and_distinct() {
        let a = generate_key().unwrap_or_default();
        let b = generate_key().unwrap_or_default();
        assert!(a.starts_with("pk-"));
        assert_eq!(a.len(), 3 + 64);
        assert_ne!(a, b);
    }

    #[test]
    fn missing_keys_are_named_by_field() {
        let tenant: Tenant = serde_json::from_value(serde_json::json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme", "namespace": "ns"},
            "spec": {
                "apiKeys": [{"secretRef": {"name": "acme-key", "key": "api-key"}}],
                "upstreamKeys": [{"model": "m", "backend": "b", "secretRef": {"name": "acme-openai", "key": "key"}}]
            }
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let mut secrets = SecretKeys::new();
        secrets.insert("acme-key".into(), ["api-key".to_string()].into());
        let ready = readiness(&tenant, &secrets, false);
        assert!(!ready.status);
        assert_eq!(ready.reason, "MissingSecret");
        assert_eq!(
            ready.message,
            "spec.upstreamKeys[0].secretRef: Secret acme-openai has no key key"
        );
        secrets.insert("acme-openai".into(), ["key".to_string()].into());
        let ready = readiness(&tenant, &secrets, false);
        assert!(ready.status, "{}", ready.message);
    }
}
