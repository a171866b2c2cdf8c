//! Applying and pruning the Kong objects of a Chatbot, and the credential Secrets of its
//! KongConsumers: the one place the operator copies a secret value (a Tenant key into a
//! `konghq.com/credential: key-auth` Secret, kept in step on every reconcile — a Tenant key
//! Secret change triggers one through the metadata-only Secret watch).
//!
//! KongPlugin and KongConsumer are applied as `DynamicObject`s. When their CRDs are not
//! installed (404 on `configuration.konghq.com`), the Chatbot gets condition
//! `KongReady=False, reason KongUnavailable` and a Warning Event; everything else is still
//! applied and `Ready` is unaffected.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use parley_crds::{Chatbot, Tenant};
use serde::Serialize;

use super::delete_ignoring_missing;
use super::{Context, Error, kube_err};
use crate::render::kong::CREDENTIAL_KEY;
use crate::render::{KongConsumer, KongPlugin, MANAGER, Rendered, selects_tenant};

/// Condition type of the Kong layer (present only while `spec.kong` is set).
pub const KONG_READY: &str = "KongReady";
/// Reason: the Kong CRDs are not installed.
pub const KONG_UNAVAILABLE: &str = "KongUnavailable";
/// Reason: the Kong objects were applied.
pub const KONG_APPLIED: &str = "Applied";

/// What happened to the Kong objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KongOutcome {
    /// `spec.kong` is absent.
    NotRequested,
    /// Applied: plugins, consumers, credentials.
    Applied,
    /// The Kong CRDs are missing; why.
    Unavailable(String),
}

fn is_missing_kind(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn apply_dynamic<T: Serialize + std::fmt::Debug>(
    client: &kube::Client,
    ns: &str,
    resource: &ApiResource,
    name: &str,
    object: &T,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map(|_| ())
}

/// Applies the KongPlugins, KongConsumers and credential Secrets of `rendered`.
pub(super) async fn apply(
    ctx: &Context,
    ns: &str,
    chatbot: &Chatbot,
    rendered: &Rendered,
) -> Result<KongOutcome, Error> {
    if chatbot.spec.kong.is_none() {
        return Ok(KongOutcome::NotRequested);
    }
    let outcome = apply_requested(&ctx.client, ns, rendered).await?;
    ctx.kong_seen(!matches!(outcome, KongOutcome::Unavailable(_)));
    Ok(outcome)
}

async fn apply_requested(
    client: &kube::Client,
    ns: &str,
    rendered: &Rendered,
) -> Result<KongOutcome, Error> {
    let plugins = KongPlugin::api_resource();
    for plugin in &rendered.kong_plugins {
        let name = plugin.metadata.name.clone().unwrap_or_default();
        match apply_dynamic(client, ns, &plugins, &name, plugin).await {
            Ok(()) => {}
            Err(e) if is_missing_kind(&e) => {
                return Ok(KongOutcome::Unavailable(format!(
                    "the Kong CRDs are not installed (KongPlugin {ns}/{name}: {e}); install Kong's ingress controller. Everything else is applied"
                )));
            }
            Err(e) => return Err(kube_err(format!("applying KongPlugin {ns}/{name}"))(e)),
        }
    }
    copy_credentials(client, ns, rendered).await?;
    let consumers = KongConsumer::api_resource();
    for consumer in &rendered.kong_consumers {
        let name = consumer.metadata.name.clone().unwrap_or_default();
        match apply_dynamic(client, ns, &consumers, &name, consumer).await {
            Ok(()) => {}
            Err(e) if is_missing_kind(&e) => {
                return Ok(KongOutcome::Unavailable(format!(
                    "the Kong CRDs are not installed (KongConsumer {ns}/{name}: {e}); install Kong's ingress controller. Everything else is applied"
                )));
            }
            Err(e) => return Err(kube_err(format!("applying KongConsumer {ns}/{name}"))(e)),
        }
    }
    Ok(KongOutcome::Applied)
}

/// Writes each credential Secret as a copy of its Tenant key. A key Secret that does not
/// exist yet (a generated key not created yet) is skipped: its creation triggers a new
/// reconcile. The value is never logged.
async fn copy_credentials(
    client: &kube::Client,
    ns: &str,
    rendered: &Rendered,
) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for credential in &rendered.kong_credentials {
        let source = &credential.source;
        let Some(secret) = api
            .get_opt(&source.name)
            .await
            .map_err(kube_err(format!("reading Secret {ns}/{}", source.name)))?
        else {
            continue;
        };
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&source.key))
            .cloned()
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(&source.key))
                    .map(|v| ByteString(v.clone().into_bytes()))
            });
        let Some(value) = value else {
            continue;
        };
        let copy = Secret {
            metadata: ObjectMeta {
                name: Some(credential.name.clone()),
                namespace: Some(ns.to_string()),
                labels: Some(credential.labels.clone()),
                owner_references: credential.owner.clone().map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([(CREDENTIAL_KEY.to_string(), value)])),
            ..Secret::default()
        };
        api.patch(
            &credential.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&copy),
        )
        .await
        .map_err(kube_err(format!(
            "applying Secret {ns}/{}",
            credential.name
        )))?;
    }
    Ok(())
}

/// Deletes the Kong children of `chatbot` that `rendered` no longer contains: plugins
/// owned by the Chatbot; and consumers and credential Secrets (owned by a Tenant) that
/// neither this nor another Chatbot of the namespace renders.
pub(super) async fn prune(
    ctx: &Context,
    ns: &str,
    chatbot: &Chatbot,
    rendered: &Rendered,
    selector: &str,
    outcome: &KongOutcome,
) -> Result<(), Error> {
    let client = &ctx.client;
    let uid = chatbot.uid();
    let by_chatbot = |o: &ObjectMeta| {
        o.owner_references
            .iter()
            .flatten()
            .any(|r| Some(&r.uid) == uid.as_ref())
    };
    // Consumers and credentials are per Tenant, so another Chatbot of the namespace with
    // keyAuth that selects the same Tenant renders the same objects: those are kept. They
    // are looked up by the manager label only (not the instance label, which names the
    // last Chatbot that applied them), so any Chatbot's reconcile removes the consumers
    // and credential copies that no Chatbot of the namespace wants any more.
    let managed = format!("app.kubernetes.io/managed-by={MANAGER}");
    // One label-filtered metadata list of the credential copies serves both to tell
    // whether any Tenant's Kong object exists and to prune them.
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let credentials = api
        .list_metadata(
            &ListParams::default().labels(&format!("{managed},konghq.com/credential=key-auth")),
        )
        .await
        .map_err(kube_err(format!("listing credential Secrets in {ns}")))?
        .items;
    // Which Tenants other Chatbots share needs every Chatbot of the namespace: read them
    // only when a Tenant's Kong object exists that the answer could keep or delete.
    let shared = if !credentials.is_empty() || consumers_exist(ctx, ns, &managed).await? {
        tenants_shared_with_others(client, ns, chatbot).await?
    } else {
        BTreeSet::new()
    };
    let by_tenant = |o: &ObjectMeta| {
        o.owner_references.iter().flatten().any(|r| {
            r.kind == "Tenant"
                && r.api_version.starts_with("parley.dev/")
                && !shared.contains(&r.name)
        })
    };
    // Without the Kong CRDs (known from a recent 404) no plugin or consumer can exist.
    if !matches!(outcome, KongOutcome::Unavailable(_)) && !ctx.kong_known_absent() {
        let keep: BTreeSet<String> = rendered
            .kong_plugins
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        prune_dynamic(
            ctx,
            ns,
            &KongPlugin::api_resource(),
            selector,
            &keep,
            by_chatbot,
        )
        .await?;
        let keep: BTreeSet<String> = rendered
            .kong_consumers
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        prune_dynamic(
            ctx,
            ns,
            &KongConsumer::api_resource(),
            &managed,
            &keep,
            by_tenant,
        )
        .await?;
    }
    let keep: BTreeSet<String> = rendered
        .kong_credentials
        .iter()
        .map(|c| c.name.clone())
        .collect();
    for secret in credentials {
        let name = secret.name_any();
        if keep.contains(&name) || !by_tenant(&secret.metadata) {
            continue;
        }
        tracing::info!(object = %format!("Secret {ns}/{name}"), "deleting a Kong credential the spec no longer renders");
        delete_ignoring_missing(&api, &name, format!("Secret {ns}/{name}")).await?;
    }
    Ok(())
}

/// Whether any KongConsumer made by the operator exists in `ns` (a label-filtered
/// metadata list; no Kong CRDs = no consumers, and no request while that is known).
async fn consumers_exist(ctx: &Context, ns: &str, managed: &str) -> Result<bool, Error> {
    if ctx.kong_known_absent() {
        return Ok(false);
    }
    let params = ListParams::default().labels(managed).limit(1);
    let consumers: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &KongConsumer::api_resource());
    match consumers.list_metadata(&params).await {
        Ok(found) => {
            ctx.kong_seen(true);
            Ok(!found.items.is_empty())
        }
        Err(e) if is_missing_kind(&e) => {
            ctx.kong_seen(false);
            Ok(false)
        }
        Err(e) => Err(kube_err(format!("listing KongConsumers in {ns}"))(e)),
    }
}

/// Names of the Tenants that another live Chatbot of `ns` with `kong.keyAuth` selects.
async fn tenants_shared_with_others(
    client: &kube::Client,
    ns: &str,
    chatbot: &Chatbot,
) -> Result<BTreeSet<String>, Error> {
    let others: Vec<Chatbot> = Api::<Chatbot>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(kube_err(format!("listing Chatbots in {ns}")))?
        .items
        .into_iter()
        .filter(|c| {
            c.uid() != chatbot.uid()
                && c.metadata.deletion_timestamp.is_none()
                && c.spec.kong.as_ref().and_then(|k| k.key_auth) == Some(true)
        })
        .collect();
    if others.is_empty() {
        return Ok(BTreeSet::new());
    }
    let tenants = Api::<Tenant>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(kube_err(format!("listing Tenants in {ns}")))?
        .items;
    Ok(tenants
        .iter()
        .filter(|t| others.iter().any(|c| selects_tenant(c, t)))
        .map(ResourceExt::name_any)
        .collect())
}

/// For the Tenant controller: when no live Chatbot of the namespace with `kong.keyAuth`
/// selects `tenant` any more (its last one was deleted, or stopped selecting it), deletes
/// the tenant's KongConsumer and credential Secrets. A Chatbot's own reconcile prunes them
/// while it lives; this catches the Chatbot that is gone.
pub(super) async fn prune_unwanted_for_tenant(
    ctx: &Context,
    ns: &str,
    tenant: &Tenant,
) -> Result<(), Error> {
    let client = &ctx.client;
    let uid = tenant.uid();
    let owned = |o: &ObjectMeta| {
        o.owner_references
            .iter()
            .flatten()
            .any(|r| Some(&r.uid) == uid.as_ref())
    };
    let managed = format!("app.kubernetes.io/managed-by={MANAGER}");
    // What the Tenant owns first (two label-filtered metadata lists): the usual Tenant
    // owns nothing of Kong's, and then the Chatbots of the namespace need not be read.
    let consumers = KongConsumer::api_resource();
    let consumer_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &consumers);
    let owned_consumers: Vec<String> = if ctx.kong_known_absent() {
        Vec::new()
    } else {
        match consumer_api
            .list_metadata(&ListParams::default().labels(&managed))
            .await
        {
            Ok(found) => {
                ctx.kong_seen(true);
                found
                    .items
                    .into_iter()
                    .filter(|o| owned(&o.metadata))
                    .map(|o| o.name_any())
                    .collect()
            }
            // No Kong CRDs: nothing of that kind can exist.
            Err(e) if is_missing_kind(&e) => {
                ctx.kong_seen(false);
                Vec::new()
            }
            Err(e) => return Err(kube_err(format!("listing KongConsumers in {ns}"))(e)),
        }
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let owned_secrets: Vec<String> = api
        .list_metadata(
            &ListParams::default().labels(&format!("{managed},konghq.com/credential=key-auth")),
        )
        .await
        .map_err(kube_err(format!("listing credential Secrets in {ns}")))?
        .items
        .into_iter()
        .filter(|s| owned(&s.metadata))
        .map(|s| s.name_any())
        .collect();
    if owned_consumers.is_empty() && owned_secrets.is_empty() {
        return Ok(());
    }
    let wanted = Api::<Chatbot>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(kube_err(format!("listing Chatbots in {ns}")))?
        .items
        .iter()
        .any(|c| {
            c.metadata.deletion_timestamp.is_none()
                && c.spec.kong.as_ref().and_then(|k| k.key_auth) == Some(true)
                && selects_tenant(c, tenant)
        });
    if wanted {
        return Ok(());
    }
    for name in owned_consumers {
        tracing::info!(object = %format!("KongConsumer {ns}/{name}"), "deleting a KongConsumer no Chatbot wants");
        delete_ignoring_missing(&consumer_api, &name, format!("KongConsumer {ns}/{name}")).await?;
    }
    for name in owned_secrets {
        tracing::info!(object = %format!("Secret {ns}/{name}"), "deleting a Kong credential no Chatbot wants");
        delete_ignoring_missing(&api, &name, format!("Secret {ns}/{name}")).await?;
    }
    Ok(())
}

async fn prune_dynamic(
    ctx: &Context,
    ns: &str,
    resource: &ApiResource,
    selector: &str,
    keep: &BTreeSet<String>,
    ours: impl Fn(&ObjectMeta) -> bool,
) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, resource);
    let kind = &resource.kind;
    let found = match api
        .list_metadata(&ListParams::default().labels(selector))
        .await
    {
        Ok(found) => {
            ctx.kong_seen(true);
            found
        }
        // No Kong CRDs: nothing of that kind can exist.
        Err(e) if is_missing_kind(&e) => {
            ctx.kong_seen(false);
            return Ok(());
        }
        Err(e) => return Err(kube_err(format!("listing {kind}s in {ns}"))(e)),
    };
    for object in found.items {
        let name = object.name_any();
        if keep.contains(&name) || !ours(&object.metadata) {
            continue;
        }
        tracing::info!(object = %format!("{kind} {ns}/{name}"), "deleting a child the spec no longer renders");
        delete_ignoring_missing(&api, &name, format!("{kind} {ns}/{name}")).await?;
    }
    Ok(())
}

/// Chatbot conditions of the Kong layer: KongReady, or none without `spec.kong`.
pub(super) fn condition(outcome: &KongOutcome) -> Option<super::conditions::Desired> {
    let (status, reason, message) = match outcome {
        KongOutcome::NotRequested => return None,
        KongOutcome::Applied => (
            true,
            KONG_APPLIED,
            "Ingress, KongPlugins and KongConsumers applied".to_string(),
        ),
        KongOutcome::Unavailable(why) => (false, KONG_UNAVAILABLE, why.clone()),
    };
    Some(super::conditions::Desired {
        type_: KONG_READY,
        status,
        reason,
        message,
    })
}
