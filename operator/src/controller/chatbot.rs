//! The Chatbot controller: fetch inputs, [`render`], server-side apply, prune what the
//! spec no longer renders, write status, publish Events.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use parley_crds::names::bounded_name;
use parley_crds::{Chatbot, ChatbotStatus, ModelRoute, Tenant};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::conditions::{self, Desired, MAX_MESSAGE_BYTES};
use super::delete_ignoring_missing;
use super::kong::{self, KongOutcome};
use super::{
    Context, Error, drain, kube_err, label_selector_matches, measured, object_key,
    referenced_secrets, retry_later, scoped_api,
};
use crate::render::{self, MANAGER, RenderError, RenderInput, Rendered, Severity};

/// The field manager that briefly co-owns `spec.replicas` while it passes from the
/// operator to the HorizontalPodAutoscaler (Kubernetes' documented hand-over procedure).
pub const HANDOVER_MANAGER: &str = "parley-operator-handover-to-hpa";

const KIND: &str = "Chatbot";
/// Re-check now and then even without a watch event (a missed event heals itself).
const RESYNC: Duration = Duration::from_secs(600);
/// How soon to look again while the Kong CRDs are missing.
const KONG_RETRY: Duration = Duration::from_secs(60);

/// Ready reasons.
pub mod reason {
    /// Rendered and applied.
    pub const RENDERED: &str = "Rendered";
    /// The spec (or a ModelRoute / Tenant it selects) has an error only the operator sees.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The GatewayConfig would not fit in a ConfigMap.
    pub const CONFIG_TOO_LARGE: &str = "ConfigTooLarge";
    /// An API call while applying failed (retried with backoff).
    pub const APPLY_FAILED: &str = "ApplyFailed";
}

/// Labels that select every child of Chatbot `name`.
pub fn children_selector(chatbot_name: &str) -> String {
    format!(
        "app.kubernetes.io/managed-by={MANAGER},app.kubernetes.io/instance={}",
        bounded_name(chatbot_name)
    )
}

/// What the controller last read and applied for one Chatbot.
#[derive(Clone, Debug, Default)]
pub(crate) struct Memo {
    /// The Chatbot's namespace and name.
    namespace: String,
    name: String,
    /// Names of the ModelRoutes and Tenants it selected, and of the Secrets it named.
    routes: BTreeSet<String>,
    tenants: BTreeSet<String>,
    secrets: BTreeSet<String>,
    /// The last successful apply: `None` until one, and again once a child changed.
    applied: Option<Applied>,
    /// The Chatbot's uid and the `Kind/name`s rendered when its children were last
    /// pruned: while a render gives the same ones, nothing can have become superfluous.
    pruned: Option<(Option<String>, BTreeSet<String>)>,
}

/// One successful apply of a Chatbot's objects.
#[derive(Clone, Debug)]
struct Applied {
    /// The Chatbot's uid (a Chatbot recreated under the same name starts afresh).
    uid: Option<String>,
    /// Hash of every applied object.
    hash: u64,
    /// `Kind/name` of each applied child -> the resourceVersion the apply answered.
    versions: HashMap<String, String>,
}

fn memo_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// Hash of the objects `rendered` applies.
fn rendered_hash(rendered: &Rendered) -> Result<u64, Error> {
    use std::hash::{Hash, Hasher};
    let objects = rendered.objects().map_err(|source| Error::Serialize {
        what: "the rendered objects".into(),
        source,
    })?;
    let bytes = serde_json::to_vec(&objects).map_err(|source| Error::Serialize {
        what: "the rendered objects".into(),
        source,
    })?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Ok(hasher.finish())
}

/// The Chatbots of `store` in the namespace of `other` for which `wanted` holds (given
/// the Chatbot and its memo).
fn selecting<O: Resource>(
    store: &kube::runtime::reflector::Store<Chatbot>,
    ctx: &Context,
    other: &O,
    wanted: impl Fn(&Chatbot, Option<&Memo>) -> bool,
) -> Vec<ObjectRef<Chatbot>> {
    let namespace = other.meta().namespace.clone();
    let memos = ctx.chatbots.lock().ok();
    store
        .state()
        .iter()
        .filter(|cb| cb.meta().namespace == namespace)
        .filter(|cb| {
            let memo = memos.as_ref().and_then(|m| {
                m.get(&memo_key(
                    cb.meta().namespace.as_deref().unwrap_or_default(),
                    cb.meta().name.as_deref().unwrap_or_default(),
                ))
            });
            wanted(cb, memo)
        })
        .map(|cb| ObjectRef::from_obj(cb.as_ref()))
        .collect()
}

/// Maps an event of a child to its Chatbot, unless the child is exactly as the last apply
/// left it (the echo of the operator's own write). Any other change (edited by someone,
/// deleted, its status moved) forgets the last apply, so the reconcile applies again.
fn owned_by_chatbot<K: Resource<DynamicType = ()>>(
    ctx: Arc<Context>,
) -> impl Fn(K) -> Option<ObjectRef<Chatbot>> + Send + Sync + 'static {
    move |child| {
        let meta = child.meta();
        let ns = meta.namespace.clone()?;
        let owner = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true) && o.kind == KIND)?;
        let child_key = format!(
            "{}/{}",
            K::kind(&()),
            meta.name.as_deref().unwrap_or_default()
        );
        if let Ok(mut memos) = ctx.chatbots.lock()
            && let Some(memo) = memos.get_mut(&memo_key(&ns, &owner.name))
        {
            let unchanged = memo.applied.as_ref().is_some_and(|a| {
                a.uid.as_deref() == Some(owner.uid.as_str())
                    && a.versions.get(&child_key) == meta.resource_version.as_ref()
            });
            if unchanged {
                return None;
            }
            memo.applied = None;
        }
        Some(ObjectRef::new(&owner.name).within(&ns))
    }
}

/// Runs the Chatbot controller until `shutdown`.
pub async fn controller(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = ctx.settings.namespace.as_deref();
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let controller = Controller::new(
        scoped_api::<Chatbot>(&client, ns),
        watcher::Config::default(),
    );
    let reader = controller.store();
    let store = controller.store();
    let (routes_store, tenants_store) = (store.clone(), store);
    let (routes_ctx, tenants_ctx, secrets_ctx) =
        (Arc::clone(&ctx), Arc::clone(&ctx), Arc::clone(&ctx));
    let stream = controller
        .watches(
            scoped_api::<Deployment>(&client, ns),
            owned.clone(),
            owned_by_chatbot(Arc::clone(&ctx)),
        )
        .watches(
            scoped_api::<Service>(&client, ns),
            owned.clone(),
            owned_by_chatbot(Arc::clone(&ctx)),
        )
        .watches(
            scoped_api::<ConfigMap>(&client, ns),
            owned.clone(),
            owned_by_chatbot(Arc::clone(&ctx)),
        )
        .watches(
            scoped_api::<ServiceAccount>(&client, ns),
            owned.clone(),
            owned_by_chatbot(Arc::clone(&ctx)),
        )
        .watches(
            scoped_api::<HorizontalPodAutoscaler>(&client, ns),
            owned.clone(),
            owned_by_chatbot(Arc::clone(&ctx)),
        )
        .watches(
            scoped_api::<PodDisruptionBudget>(&client, ns),
            owned.clone(),
            owned_by_chatbot(Arc::clone(&ctx)),
        )
        .watches(
            scoped_api::<Ingress>(&client, ns),
            owned,
            owned_by_chatbot(Arc::clone(&ctx)),
        )
        // A ModelRoute or Tenant re-renders only the Chatbots that select it now or
        // selected it when they were last rendered (it may have stopped matching).
        .watches(
            scoped_api::<ModelRoute>(&client, ns),
            watcher::Config::default(),
            move |route| {
                let name = route.name_any();
                selecting(&routes_store, &routes_ctx, &route, |cb, memo| {
                    label_selector_matches(cb.spec.model_selector.as_ref(), route.labels())
                        || memo.is_some_and(|m| m.routes.contains(&name))
                })
            },
        )
        .watches(
            scoped_api::<Tenant>(&client, ns),
            watcher::Config::default(),
            move |tenant| {
                let name = tenant.name_any();
                selecting(&tenants_store, &tenants_ctx, &tenant, |cb, memo| {
                    render::selects_tenant(cb, &tenant)
                        || memo.is_some_and(|m| m.tenants.contains(&name))
                })
            },
        )
        // Metadata only (list and watch as PartialObjectMetadata): Secret values never
        // enter a cache. A Secret that appears, changes or goes re-renders the Chatbots
        // that named it when they were last read (a key that appears makes one Ready; a
        // rotated Tenant key is copied again into its Kong credential). A Chatbot records
        // the Secrets it names before it reads them, so none is missed.
        .watches(
            scoped_api::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |secret| {
                let Some(ns) = secret.namespace() else {
                    return Vec::new();
                };
                secrets_ctx.secret_keys.on_event(secret.meta());
                let name = secret.name_any();
                let Ok(memos) = secrets_ctx.chatbots.lock() else {
                    return Vec::new();
                };
                memos
                    .iter()
                    .filter(|(_, m)| m.namespace == ns && m.secrets.contains(&name))
                    .map(|(_, m)| ObjectRef::new(&m.name).within(&m.namespace))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(super::controller_config())
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx);
    drain(KIND, stream, reader, shutdown).await;
}

async fn reconcile(chatbot: Arc<Chatbot>, ctx: Arc<Context>) -> Result<Action, Error> {
    measured(chatbot.as_ref(), &ctx, reconcile_inner(&chatbot, &ctx)).await
}

fn error_policy(chatbot: Arc<Chatbot>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_later(chatbot.as_ref(), error, &ctx)
}

async fn reconcile_inner(chatbot: &Chatbot, ctx: &Context) -> Result<Action, Error> {
    if chatbot.meta().deletion_timestamp.is_some() {
        // The garbage collector removes the children (owner references).
        if let (Some(ns), Some(name), Ok(mut memos)) = (
            chatbot.namespace(),
            chatbot.meta().name.as_ref(),
            ctx.chatbots.lock(),
        ) {
            memos.remove(&memo_key(&ns, name));
        }
        return Ok(Action::await_change());
    }
    let (Some(ns), Some(_)) = (chatbot.namespace(), chatbot.meta().name.as_ref()) else {
        return Err(Error::Unnamed(object_key(chatbot)));
    };
    let client = &ctx.client;
    let name = chatbot.name_any();
    let key = memo_key(&ns, &name);
    // Only the ModelRoutes and Tenants its selectors match (the API server filters);
    // render selects again, so an unfiltered list (an invalid selector) is also right.
    let model_routes = Api::<ModelRoute>::namespaced(client.clone(), &ns)
        .list(&selected(chatbot.spec.model_selector.as_ref()))
        .await
        .map_err(kube_err(format!("listing ModelRoutes in {ns}")))?
        .items;
    let tenants = Api::<Tenant>::namespaced(client.clone(), &ns)
        .list(&selected(chatbot.spec.tenant_selector.as_ref()))
        .await
        .map_err(kube_err(format!("listing Tenants in {ns}")))?
        .items;
    // Only the Secrets that the Chatbot and the ModelRoutes and Tenants it selects name,
    // each read by name and reduced to its key names. They are recorded first, so that a
    // Secret event from now on re-renders this Chatbot.
    let names = referenced_secrets(chatbot, &model_routes, &tenants);
    let selected_routes: BTreeSet<String> = model_routes
        .iter()
        .filter(|r| label_selector_matches(chatbot.spec.model_selector.as_ref(), r.labels()))
        .map(ResourceExt::name_any)
        .collect();
    let selected_tenants: BTreeSet<String> = tenants
        .iter()
        .filter(|t| render::selects_tenant(chatbot, t))
        .map(ResourceExt::name_any)
        .collect();
    let (previous, previous_pruned) = match ctx.chatbots.lock() {
        Ok(mut memos) => {
            let memo = memos.entry(key.clone()).or_default();
            memo.namespace.clone_from(&ns);
            memo.name.clone_from(&name);
            memo.routes = selected_routes;
            memo.tenants = selected_tenants;
            memo.secrets.clone_from(&names);
            (memo.applied.clone(), memo.pruned.clone())
        }
        Err(_) => (None, None),
    };
    let secrets = ctx.secret_keys(&ns, names).await?;
    let input = RenderInput {
        chatbot,
        model_routes: &model_routes,
        tenants: &tenants,
        secrets: &secrets,
        default_image: &ctx.settings.gateway_image,
    };
    match render::render(&input) {
        Err(e) => {
            refused(chatbot, ctx, &e).await?;
            // Any change to the inputs triggers a new reconcile; nothing to retry.
            Ok(Action::requeue(RESYNC))
        }
        Ok(rendered) => {
            let hash = rendered_hash(&rendered)?;
            // Nothing to write when the same objects were applied last time and no child
            // changed since (a changed child forgets the apply, see [`owned_by_chatbot`]).
            // Kong credentials copy Secret values the hash does not see: always applied.
            let unchanged = chatbot.spec.kong.is_none()
                && previous
                    .as_ref()
                    .is_some_and(|a| a.hash == hash && a.uid == chatbot.uid());
            if unchanged {
                applied(chatbot, ctx, &rendered, None, &KongOutcome::NotRequested).await?;
                return Ok(Action::requeue(RESYNC));
            }
            let mut versions = HashMap::new();
            let (ready_replicas, kong_outcome) = match apply_all(
                chatbot,
                ctx,
                &ns,
                &rendered,
                &mut versions,
            )
            .await
            {
                Ok(done) => done,
                Err(e) => {
                    let desired = Desired::ready(
                        false,
                        reason::APPLY_FAILED,
                        format!("applying the rendered objects failed (retrying): {e}"),
                    );
                    let status = status_with(chatbot, &[desired], None, None);
                    // Best effort: the error itself is what matters.
                    if let Err(status_error) = write_status(ctx, chatbot, &status).await {
                        tracing::warn!(error = %status_error, "writing ApplyFailed status failed");
                    }
                    return Err(e);
                }
            };
            // The labelled children are listed (7 lists, and the Kong kinds) only when this
            // process has not pruned this Chatbot yet or the rendered set changed since:
            // names are derived from the Chatbot's, so the same set leaves nothing to
            // delete. Kong's consumers are shared between Chatbots: always pruned.
            let rendered_names = rendered_names(&rendered);
            let pruned_same = chatbot.spec.kong.is_none()
                && previous_pruned
                    .as_ref()
                    .is_some_and(|(uid, names)| *uid == chatbot.uid() && *names == rendered_names);
            if !pruned_same {
                prune(chatbot, ctx, &ns, &rendered, &kong_outcome).await?;
            }
            if let Ok(mut memos) = ctx.chatbots.lock()
                && let Some(memo) = memos.get_mut(&key)
            {
                memo.pruned = Some((chatbot.uid(), rendered_names));
                memo.applied = Some(Applied {
                    uid: chatbot.uid(),
                    hash,
                    versions,
                });
            }
            applied(chatbot, ctx, &rendered, ready_replicas, &kong_outcome).await?;
            if matches!(kong_outcome, KongOutcome::Unavailable(_)) {
                // Nothing watched announces that Kong's CRDs were installed: look again soon.
                return Ok(Action::requeue(KONG_RETRY));
            }
            Ok(Action::requeue(RESYNC))
        }
    }
}

/// The status to write: `desired` conditions over the current ones, plus counts (those
/// of `rendered`, or the current ones when nothing new was applied).
fn status_with(
    chatbot: &Chatbot,
    desired: &[Desired],
    rendered: Option<&Rendered>,
    ready_replicas: Option<i32>,
) -> ChatbotStatus {
    let current = chatbot.status.clone().unwrap_or_default();
    let mut status = ChatbotStatus::default();
    status.common.observed_generation = chatbot.meta().generation;
    status.common.conditions = conditions::compute(
        &current.common.conditions,
        desired,
        chatbot.meta().generation,
        Timestamp::now(),
    );
    if chatbot.spec.kong.is_none() {
        status
            .common
            .conditions
            .retain(|c| c.type_ != kong::KONG_READY);
    }
    match rendered {
        Some(rendered) => {
            status.models = u32::try_from(rendered.models.len()).ok();
            status.tenants = u32::try_from(rendered.tenants.len()).ok();
            status.config_hash = Some(rendered.config_hash.clone());
        }
        // Refused or not applied: what runs is still the last good config, so its
        // numbers stay (Ready=False says the spec is not in effect).
        None => {
            status.models = current.models;
            status.tenants = current.tenants;
            status.config_hash = current.config_hash.clone();
        }
    }
    status.ready_replicas = ready_replicas.or(current.ready_replicas);
    status
}

/// Ready=False (InvalidSpec or ConfigTooLarge) with every error, and a Warning Event. The
/// objects already running are left alone: the last good config keeps serving.
async fn refused(chatbot: &Chatbot, ctx: &Context, error: &RenderError) -> Result<(), Error> {
    let errors: Vec<_> = error
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .collect();
    let why = if errors
        .iter()
        .any(|p| p.message.starts_with(reason::CONFIG_TOO_LARGE))
    {
        reason::CONFIG_TOO_LARGE
    } else {
        reason::INVALID_SPEC
    };
    let listed: Vec<String> = errors
        .iter()
        .map(|p| format!("{}: {}: {}", p.object, p.field, p.message))
        .collect();
    let message = conditions::bounded(
        &format!(
            "{} problem(s), nothing applied: {}",
            errors.len(),
            listed.join("; ")
        ),
        MAX_MESSAGE_BYTES,
    );
    let desired = Desired::ready(false, why, message.clone());
    let status = status_with(chatbot, &[desired], None, None);
    let changed = chatbot.status.as_ref() != Some(&status);
    write_status(ctx, chatbot, &status).await?;
    if changed {
        tracing::info!(chatbot = %object_key(chatbot), reason = why, "Chatbot refused");
        publish(ctx, chatbot, EventType::Warning, why, "Render", message).await;
    }
    Ok(())
}

/// Ready=True after a successful apply; warnings become Warning Events once per
/// generation.
async fn applied(
    chatbot: &Chatbot,
    ctx: &Context,
    rendered: &Rendered,
    ready_replicas: Option<i32>,
    kong_outcome: &KongOutcome,
) -> Result<(), Error> {
    let message = format!(
        "{} model(s), {} tenant(s), config {}",
        rendered.models.len(),
        rendered.tenants.len(),
        rendered.config_hash.get(..12).unwrap_or_default()
    );
    let mut desired = vec![Desired::ready(true, reason::RENDERED, message.clone())];
    let kong_condition = kong::condition(kong_outcome);
    desired.extend(kong_condition.clone());
    let status = status_with(chatbot, &desired, Some(rendered), ready_replicas);
    let previous = chatbot.status.clone().unwrap_or_default();
    let kong_was_unavailable = previous
        .common
        .conditions
        .iter()
        .any(|c| c.type_ == kong::KONG_READY && c.reason == kong::KONG_UNAVAILABLE);
    let was_ready = conditions::ready(&previous.common.conditions)
        .is_some_and(|c| c.status == "True" && c.reason == reason::RENDERED);
    let new_generation = previous.common.observed_generation != chatbot.meta().generation;
    if chatbot.status.as_ref() != Some(&status) {
        write_status(ctx, chatbot, &status).await?;
    }
    if new_generation {
        for warning in &rendered.warnings {
            let note = format!("{}: {}: {}", warning.object, warning.field, warning.message);
            publish(
                ctx,
                chatbot,
                EventType::Warning,
                "RenderWarning",
                "Render",
                note,
            )
            .await;
        }
    }
    if let Some(condition) = kong_condition
        && condition.reason == kong::KONG_UNAVAILABLE
        && (!kong_was_unavailable || new_generation)
    {
        publish(
            ctx,
            chatbot,
            EventType::Warning,
            kong::KONG_UNAVAILABLE,
            "Apply",
            condition.message,
        )
        .await;
    }
    if !was_ready {
        publish(
            ctx,
            chatbot,
            EventType::Normal,
            reason::RENDERED,
            "Apply",
            message,
        )
        .await;
    }
    Ok(())
}

/// Publishes an Event; a failure is logged, never fatal (Events are best effort).
pub(crate) async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(conditions::bounded(&note, MAX_MESSAGE_BYTES)),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing an Event failed");
    }
}

/// Server-side applies every rendered object; returns the Deployment's ready replicas
/// and what happened to the Kong objects.
async fn apply_all(
    chatbot: &Chatbot,
    ctx: &Context,
    ns: &str,
    rendered: &Rendered,
    versions: &mut HashMap<String, String>,
) -> Result<(Option<i32>, KongOutcome), Error> {
    fn note<K: Resource<DynamicType = ()>>(versions: &mut HashMap<String, String>, live: &K) {
        if let Some(rv) = &live.meta().resource_version {
            versions.insert(
                format!(
                    "{}/{}",
                    K::kind(&()),
                    live.meta().name.as_deref().unwrap_or_default()
                ),
                rv.clone(),
            );
        }
    }
    let client = &ctx.client;
    note(
        versions,
        &apply(client, ns, &rendered.service_account).await?,
    );
    note(versions, &apply(client, ns, &rendered.config_map).await?);
    hand_replicas_to_hpa(ctx, ns, &rendered.deployment).await?;
    let deployment = apply(client, ns, &rendered.deployment).await?;
    note(versions, &deployment);
    note(versions, &apply(client, ns, &rendered.service).await?);
    if let Some(hpa) = &rendered.autoscaler {
        note(versions, &apply(client, ns, hpa).await?);
    }
    if let Some(pdb) = &rendered.disruption_budget {
        note(versions, &apply(client, ns, pdb).await?);
    }
    if let Some(ingress) = &rendered.ingress {
        note(versions, &apply(client, ns, ingress).await?);
    }
    let kong_outcome = kong::apply(ctx, ns, chatbot, rendered).await?;
    tracing::debug!(chatbot = %object_key(chatbot), "applied");
    let ready = deployment
        .status
        .as_ref()
        .map(|s| s.ready_replicas.unwrap_or(0));
    Ok((ready, kong_outcome))
}

/// Server-side apply with field manager `parley-operator`, forcing ownership.
pub(crate) async fn apply<K>(client: &kube::Client, ns: &str, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(kube_err(format!("applying {} {ns}/{name}", K::kind(&()))))
}

/// List parameters selecting what `selector` matches (absent: everything; one that is
/// not a valid selector: everything, and render reports it).
fn selected(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> ListParams {
    match selector.map(|s| kube::core::Selector::try_from(s.clone())) {
        Some(Ok(selector)) => ListParams::default().labels_from(&selector),
        _ => ListParams::default(),
    }
}

/// Whether field manager `manager` owns `spec.replicas` of `deployment` through apply.
pub fn applies_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|entry| {
            entry.manager.as_deref() == Some(manager)
                && entry.operation.as_deref() == Some("Apply")
                && entry.subresource.as_deref().unwrap_or_default().is_empty()
                && entry
                    .fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
}

/// Kubernetes' procedure for handing `spec.replicas` to an HPA under server-side apply
/// ("Transferring ownership" in the server-side apply documentation): before the
/// operator's manifest stops setting `replicas`, a second field manager applies just the
/// live `replicas` value, so the field keeps an owner and is not reset to the default
/// (one replica). When the HPA controller next writes `replicas` it becomes the sole owner and the
/// temporary manager vanishes. A conflict means the HPA already owns it: nothing to do.
async fn hand_replicas_to_hpa(ctx: &Context, ns: &str, desired: &Deployment) -> Result<(), Error> {
    let under_hpa = desired.spec.as_ref().is_some_and(|s| s.replicas.is_none());
    if !under_hpa {
        return Ok(());
    }
    let name = desired.metadata.name.clone().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let Some(live) = api
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("reading Deployment {ns}/{name}")))?
    else {
        return Ok(());
    };
    if !applies_replicas(&live, MANAGER) {
        return Ok(());
    }
    let replicas = live.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    match api
        .patch(
            &name,
            &PatchParams::apply(HANDOVER_MANAGER),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(deployment = %format!("{ns}/{name}"), replicas, "handing spec.replicas over to the HorizontalPodAutoscaler");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(kube_err(format!(
            "handing over replicas of Deployment {ns}/{name}"
        ))(e)),
    }
}

/// Deletes the labelled children of `chatbot` that `rendered` no longer contains.
async fn prune(
    chatbot: &Chatbot,
    ctx: &Context,
    ns: &str,
    rendered: &Rendered,
    kong_outcome: &KongOutcome,
) -> Result<(), Error> {
    let selector = children_selector(&chatbot.name_any());
    let uid = chatbot.uid();
    let client = &ctx.client;
    prune_kind::<ServiceAccount>(
        client,
        ns,
        &selector,
        &uid,
        names([&rendered.service_account]),
    )
    .await?;
    prune_kind::<ConfigMap>(client, ns, &selector, &uid, names([&rendered.config_map])).await?;
    prune_kind::<Deployment>(client, ns, &selector, &uid, names([&rendered.deployment])).await?;
    prune_kind::<Service>(client, ns, &selector, &uid, names([&rendered.service])).await?;
    prune_kind::<HorizontalPodAutoscaler>(
        client,
        ns,
        &selector,
        &uid,
        names(rendered.autoscaler.as_ref()),
    )
    .await?;
    prune_kind::<PodDisruptionBudget>(
        client,
        ns,
        &selector,
        &uid,
        names(rendered.disruption_budget.as_ref()),
    )
    .await?;
    prune_kind::<Ingress>(
        client,
        ns,
        &selector,
        &uid,
        names(rendered.ingress.as_ref()),
    )
    .await?;
    kong::prune(ctx, ns, chatbot, rendered, &selector, kong_outcome).await?;
    Ok(())
}

/// `Kind/name` of every object `rendered` applies.
fn rendered_names(rendered: &Rendered) -> BTreeSet<String> {
    fn one<K: Resource<DynamicType = ()>>(names: &mut BTreeSet<String>, object: Option<&K>) {
        if let Some(object) = object {
            names.insert(format!("{}/{}", K::kind(&()), object.name_any()));
        }
    }
    let mut names = BTreeSet::new();
    one(&mut names, Some(&rendered.service_account));
    one(&mut names, Some(&rendered.config_map));
    one(&mut names, Some(&rendered.deployment));
    one(&mut names, Some(&rendered.service));
    one(&mut names, rendered.autoscaler.as_ref());
    one(&mut names, rendered.disruption_budget.as_ref());
    one(&mut names, rendered.ingress.as_ref());
    let plugins = rendered.kong_plugins.iter().map(|o| &o.metadata.name);
    let consumers = rendered.kong_consumers.iter().map(|o| &o.metadata.name);
    names.extend(
        plugins
            .chain(consumers)
            .filter_map(|n| n.as_ref().map(|n| format!("Kong/{n}"))),
    );
    names.extend(
        rendered
            .kong_credentials
            .iter()
            .map(|c| format!("Secret/{}", c.name)),
    );
    names
}

fn names<'a, K: Resource + 'a>(objects: impl IntoIterator<Item = &'a K>) -> BTreeSet<String> {
    objects.into_iter().map(|o| o.name_any()).collect()
}

async fn prune_kind<K>(
    client: &kube::Client,
    ns: &str,
    selector: &str,
    owner_uid: &Option<String>,
    keep: BTreeSet<String>,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let kind = K::kind(&());
    let found = api
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .map_err(kube_err(format!("listing {kind}s in {ns}")))?;
    for object in found.items {
        let name = object.metadata.name.clone().unwrap_or_default();
        let ours = object
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| Some(&o.uid) == owner_uid.as_ref());
        if keep.contains(&name) || !ours {
            continue;
        }
        tracing::info!(object = %format!("{kind} {ns}/{name}"), "deleting a child the spec no longer renders");
        delete_ignoring_missing(&api, &name, format!("{kind} {ns}/{name}")).await?;
    }
    Ok(())
}

/// Server-side applies `status` to the status subresource.
async fn write_status(
    ctx: &Context,
    chatbot: &Chatbot,
    status: &ChatbotStatus,
) -> Result<(), Error> {
    super::patch_status(&ctx.client, chatbot, status).await
}
