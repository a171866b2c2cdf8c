//! The Chatbot controller: fetch inputs, [`render`], server-side apply, prune what the
//! spec no longer renders, write status, publish Events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
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
    /// The ready replicas of its Deployment as last seen (an apply's answer, or a watch
    /// event of the Deployment's status).
    ready_replicas: Option<i32>,
    /// The last status this process wrote, and the Chatbot's resourceVersion it was
    /// written over: while the controller's cache still holds that version, the cached
    /// status is older than the one written (see [`with_known_status`]).
    status: Option<(Option<String>, ChatbotStatus)>,
}

/// One successful apply of a Chatbot's objects.
#[derive(Clone, Debug)]
struct Applied {
    /// The Chatbot's uid (a Chatbot recreated under the same name starts afresh).
    uid: Option<String>,
    /// Hash of every applied object.
    hash: u64,
    /// `Kind/name` of each applied child -> what the apply answered.
    children: HashMap<String, Child>,
}

/// A child as the operator's apply left it.
#[derive(Clone, Debug)]
struct Child {
    /// The resourceVersion of the apply's answer (its own watch event carries the same).
    resource_version: Option<String>,
    /// [`fingerprint`] of the apply's answer.
    fingerprint: Option<u64>,
    /// The annotations the operator renders on it (others' annotations are not drift).
    annotations: Vec<String>,
}

impl Child {
    fn of<K: Resource<DynamicType = ()> + Serialize>(rendered: &K, live: &K) -> Self {
        let annotations: Vec<String> = rendered.annotations().keys().cloned().collect();
        Self {
            resource_version: live.meta().resource_version.clone(),
            fingerprint: fingerprint(live, &annotations),
            annotations,
        }
    }

    /// Whether `live` is as the apply left it in every field the operator owns.
    fn unchanged<K: Resource<DynamicType = ()> + Serialize>(&self, live: &K) -> bool {
        (self.resource_version.is_some() && self.resource_version == live.meta().resource_version)
            || (self.fingerprint.is_some()
                && self.fingerprint == fingerprint(live, &self.annotations))
    }
}

/// A hash of what another writer could change in a child that the operator would put
/// back: the object without `status` and with only the metadata the operator sets or
/// depends on (labels, its own annotations, owner references, finalizers, uid and
/// deletion). What the API server and other controllers keep there (resourceVersion,
/// managedFields, generation, the Deployment controller's revision annotation) is left
/// out, so that the Deployment controller writing a Deployment's status is not a change.
fn fingerprint<K: Serialize>(child: &K, annotations: &[String]) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut value = serde_json::to_value(child).ok()?;
    let object = value.as_object_mut()?;
    object.remove("status");
    if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.retain(|k, _| {
            matches!(
                k.as_str(),
                "name"
                    | "namespace"
                    | "uid"
                    | "labels"
                    | "annotations"
                    | "ownerReferences"
                    | "finalizers"
                    | "deletionTimestamp"
            )
        });
        if let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            a.retain(|k, _| annotations.iter().any(|o| o == k));
            // None left is the same as none at all (the apply's answer has no map).
            if a.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    let bytes = serde_json::to_vec(&value).ok()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

fn memo_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// The labelled children that the child watches have seen, by namespace and
/// `app.kubernetes.io/instance` label: `Kind/name` -> the uid of the Chatbot that
/// controls it. Pruning reads this instead of listing every kind for every Chatbot. A
/// child the watches have not reported yet (just after the start) is pruned when its
/// event comes: an unknown child forgets the last apply, so its Chatbot applies and
/// prunes again.
#[derive(Default)]
pub(crate) struct ChildIndex {
    children: std::sync::Mutex<HashMap<(String, String), ChildOwners>>,
}

/// `Kind/name` -> the uid of the Chatbot that controls the child, if any.
type ChildOwners = BTreeMap<String, Option<String>>;

impl ChildIndex {
    /// Records a watch event of `child` (a deletion is marked, see [`child_events`]).
    fn seen<K: Resource<DynamicType = ()>>(&self, child: &K) {
        let meta = child.meta();
        let (Some(ns), Some(name), Some(instance)) = (
            meta.namespace.as_ref(),
            meta.name.as_ref(),
            meta.labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/instance")),
        ) else {
            return;
        };
        let Ok(mut index) = self.children.lock() else {
            return;
        };
        let key = (ns.clone(), instance.clone());
        let child_key = format!("{}/{name}", K::kind(&()));
        if meta.deletion_timestamp.is_some() {
            if let Some(children) = index.get_mut(&key) {
                children.remove(&child_key);
                if children.is_empty() {
                    index.remove(&key);
                }
            }
            return;
        }
        let owner = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true) && o.kind == KIND)
            .map(|o| o.uid.clone());
        index.entry(key).or_default().insert(child_key, owner);
    }

    /// The `Kind/name`s of the children labelled `instance` in `ns` that the Chatbot
    /// `uid` controls.
    fn owned(&self, ns: &str, instance: &str, uid: Option<&str>) -> Vec<String> {
        let Ok(index) = self.children.lock() else {
            return Vec::new();
        };
        index
            .get(&(ns.to_string(), instance.to_string()))
            .into_iter()
            .flatten()
            .filter(|(_, owner)| owner.is_some() && owner.as_deref() == uid)
            .map(|(child, _)| child.clone())
            .collect()
    }

    /// Forgets a child that was deleted (or found gone).
    fn forget(&self, ns: &str, instance: &str, child_key: &str) {
        if let Ok(mut index) = self.children.lock()
            && let Some(children) = index.get_mut(&(ns.to_string(), instance.to_string()))
        {
            children.remove(child_key);
        }
    }
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

/// Maps an event of a child to its Chatbot, unless the child is as the last apply left it
/// in everything the operator owns (the echo of the operator's own write, or a change of
/// its status or of others' metadata: see [`fingerprint`]). Any other change (edited by
/// someone, deleted) forgets the last apply, so the reconcile applies again. A change of
/// the Deployment's ready replicas (`ready`) re-checks the Chatbot's status only.
fn owned_by_chatbot<K: Resource<DynamicType = ()> + Serialize + 'static>(
    ctx: Arc<Context>,
    ready: fn(&K) -> Option<i32>,
) -> impl Fn(K) -> Option<ObjectRef<Chatbot>> + Send + Sync + 'static {
    move |child| {
        let target = child_trigger(&ctx, &child, ready);
        if target.is_some() {
            ctx.metrics.triggered(KIND, &K::kind(&()), 1);
        }
        target
    }
}

/// The Chatbot an event of `child` should reconcile (see [`owned_by_chatbot`]).
fn child_trigger<K: Resource<DynamicType = ()> + Serialize>(
    ctx: &Context,
    child: &K,
    ready: fn(&K) -> Option<i32>,
) -> Option<ObjectRef<Chatbot>> {
    ctx.children.seen(child);
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
    let trigger = Some(ObjectRef::new(&owner.name).within(&ns));
    let Ok(mut memos) = ctx.chatbots.lock() else {
        return trigger;
    };
    let Some(memo) = memos.get_mut(&memo_key(&ns, &owner.name)) else {
        return trigger;
    };
    let unchanged = meta.deletion_timestamp.is_none()
        && memo.applied.as_ref().is_some_and(|a| {
            a.uid.as_deref() == Some(owner.uid.as_str())
                && a.children
                    .get(&child_key)
                    .is_some_and(|c| c.unchanged(child))
        });
    if !unchanged {
        memo.applied = None;
        return trigger;
    }
    match ready(child) {
        Some(n) if memo.ready_replicas != Some(n) => {
            memo.ready_replicas = Some(n);
            trigger
        }
        _ => None,
    }
}

/// The watch events of the children of kind `K` as objects, a deletion marked by a
/// `deletionTimestamp` (the deleted object need not carry one), so that
/// [`owned_by_chatbot`] never mistakes a deletion for an unchanged child.
fn child_events<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, config).try_filter_map(|event| {
        futures::future::ready(Ok(match event {
            watcher::Event::Apply(child) | watcher::Event::InitApply(child) => Some(child),
            watcher::Event::Delete(mut child) => {
                child
                    .meta_mut()
                    .deletion_timestamp
                    .get_or_insert_with(|| Time(Timestamp::now()));
                Some(child)
            }
            watcher::Event::Init | watcher::Event::InitDone => None,
        }))
    })
}

/// The ModelRoutes and Tenants whose watch events can change a render: a new one, a
/// deleted one, a new generation (spec) or other labels (selection). Render reads no
/// status, so the status the other controllers write re-renders no Chatbot. What a
/// re-list finds is passed on once the list is complete, when the cache holds it too.
fn input_changes<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + 'static,
{
    use std::hash::{Hash, Hasher};
    type Seen = (Option<String>, Option<i64>, u64);
    let mut seen: HashMap<(Option<String>, String), Seen> = HashMap::new();
    let mut listed: Vec<K> = Vec::new();
    // Whether `o` changed since last seen; a deleted one is forgotten.
    let mut changed = move |o: &K, deleted: bool| {
        let meta = o.meta();
        let key = (
            meta.namespace.clone(),
            meta.name.clone().unwrap_or_default(),
        );
        if deleted {
            seen.remove(&key);
            return true;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        o.labels().hash(&mut hasher);
        let now = (meta.uid.clone(), meta.generation, hasher.finish());
        seen.insert(key, now.clone()) != Some(now)
    };
    events
        .map_ok(move |event| {
            let out = match event {
                watcher::Event::Apply(o) => changed(&o, false).then_some(o).into_iter().collect(),
                watcher::Event::InitApply(o) => {
                    if changed(&o, false) {
                        listed.push(o);
                    }
                    Vec::new()
                }
                watcher::Event::InitDone => std::mem::take(&mut listed),
                watcher::Event::Delete(o) => {
                    changed(&o, true);
                    vec![o]
                }
                watcher::Event::Init => Vec::new(),
            };
            futures::stream::iter(out.into_iter().map(Ok))
        })
        .try_flatten()
}

fn no_replicas<K>(_: &K) -> Option<i32> {
    None
}

fn deployment_ready(deployment: &Deployment) -> Option<i32> {
    deployment
        .status
        .as_ref()
        .map(|s| s.ready_replicas.unwrap_or(0))
}

/// The ModelRoutes and Tenants the Chatbot controller renders from: its own caches, filled
/// by the same watches that trigger the Chatbots that select them (so a Chatbot triggered
/// by a change renders with it), instead of a list per reconcile.
pub(crate) struct Inputs {
    ctx: Arc<Context>,
    routes: Store<ModelRoute>,
    tenants: Store<Tenant>,
    /// Resolves (true) once both caches were first filled. Shared, because a store's
    /// own `wait_until_ready` wakes only the last of several reconciles waiting on it.
    ready: futures::future::Shared<futures::future::BoxFuture<'static, bool>>,
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
    // A new Chatbot, a new generation (a spec change) or other labels or annotations (a
    // "touch") trigger a reconcile, not a status change: the status the operator writes
    // would otherwise trigger one more after every reconcile. The cache still takes
    // every change, so a reconcile sees the latest status.
    let (reader, chatbots) = super::spec_changes::<Chatbot>(&client, ns, Arc::clone(&ctx));
    let chatbots = chatbots.inspect_ok({
        let ctx = Arc::clone(&ctx);
        move |_| ctx.metrics.triggered(KIND, KIND, 1)
    });
    let controller = Controller::for_stream(chatbots, reader.clone());
    let store = reader.clone();
    let (routes_store, tenants_store) = (store.clone(), store);
    let (routes_ctx, tenants_ctx, secrets_ctx) =
        (Arc::clone(&ctx), Arc::clone(&ctx), Arc::clone(&ctx));
    let (routes, routes_writer) = reflector::store::<ModelRoute>();
    let (tenants, tenants_writer) = reflector::store::<Tenant>();
    let route_events = input_changes(
        watcher(
            scoped_api::<ModelRoute>(&client, ns),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(routes_writer),
    );
    let tenant_events = input_changes(
        watcher(
            scoped_api::<Tenant>(&client, ns),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(tenants_writer),
    );
    let stream = controller
        .watches_stream(
            child_events(scoped_api::<Deployment>(&client, ns), owned.clone()),
            owned_by_chatbot(Arc::clone(&ctx), deployment_ready),
        )
        .watches_stream(
            child_events(scoped_api::<Service>(&client, ns), owned.clone()),
            owned_by_chatbot(Arc::clone(&ctx), no_replicas::<Service>),
        )
        .watches_stream(
            child_events(scoped_api::<ConfigMap>(&client, ns), owned.clone()),
            owned_by_chatbot(Arc::clone(&ctx), no_replicas::<ConfigMap>),
        )
        .watches_stream(
            child_events(scoped_api::<ServiceAccount>(&client, ns), owned.clone()),
            owned_by_chatbot(Arc::clone(&ctx), no_replicas::<ServiceAccount>),
        )
        .watches_stream(
            child_events(
                scoped_api::<HorizontalPodAutoscaler>(&client, ns),
                owned.clone(),
            ),
            owned_by_chatbot(Arc::clone(&ctx), no_replicas::<HorizontalPodAutoscaler>),
        )
        .watches_stream(
            child_events(
                scoped_api::<PodDisruptionBudget>(&client, ns),
                owned.clone(),
            ),
            owned_by_chatbot(Arc::clone(&ctx), no_replicas::<PodDisruptionBudget>),
        )
        .watches_stream(
            child_events(scoped_api::<Ingress>(&client, ns), owned),
            owned_by_chatbot(Arc::clone(&ctx), no_replicas::<Ingress>),
        )
        // A ModelRoute or Tenant re-renders only the Chatbots that select it now or
        // selected it when they were last rendered (it may have stopped matching).
        .watches_stream(route_events, move |route| {
            let name = route.name_any();
            let targets = selecting(&routes_store, &routes_ctx, &route, |cb, memo| {
                label_selector_matches(cb.spec.model_selector.as_ref(), route.labels())
                    || memo.is_some_and(|m| m.routes.contains(&name))
            });
            routes_ctx
                .metrics
                .triggered(KIND, "ModelRoute", targets.len());
            targets
        })
        .watches_stream(tenant_events, move |tenant| {
            let name = tenant.name_any();
            let targets = selecting(&tenants_store, &tenants_ctx, &tenant, |cb, memo| {
                render::selects_tenant(cb, &tenant)
                    || memo.is_some_and(|m| m.tenants.contains(&name))
            });
            tenants_ctx.metrics.triggered(KIND, "Tenant", targets.len());
            targets
        })
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
                let targets = memos
                    .iter()
                    .filter(|(_, m)| m.namespace == ns && m.secrets.contains(&name))
                    .map(|(_, m)| ObjectRef::new(&m.name).within(&m.namespace))
                    .collect::<Vec<_>>();
                secrets_ctx.metrics.triggered(KIND, "Secret", targets.len());
                targets
            },
        )
        .with_config(super::controller_config())
        .graceful_shutdown_on(shutdown.clone())
        .run(
            reconcile,
            error_policy,
            Arc::new(Inputs {
                ctx,
                ready: {
                    let (routes, tenants) = (routes.clone(), tenants.clone());
                    futures::FutureExt::shared(Box::pin(async move {
                        routes.wait_until_ready().await.is_ok()
                            && tenants.wait_until_ready().await.is_ok()
                    })
                        as futures::future::BoxFuture<'static, bool>)
                },
                routes,
                tenants,
            }),
        );
    drain(KIND, stream, reader, shutdown).await;
}

async fn reconcile(chatbot: Arc<Chatbot>, inputs: Arc<Inputs>) -> Result<Action, Error> {
    let ctx = &inputs.ctx;
    let chatbot = with_known_status(chatbot, ctx);
    measured(
        chatbot.as_ref(),
        ctx,
        reconcile_inner(&chatbot, ctx, &inputs),
    )
    .await
}

fn error_policy(chatbot: Arc<Chatbot>, error: &Error, inputs: Arc<Inputs>) -> Action {
    retry_later(chatbot.as_ref(), error, &inputs.ctx)
}

/// The Chatbot with the status this process last wrote, while the cache has not yet seen
/// that write (it still holds the version the status was written over): a reconcile
/// right after another must not write the same status, or publish its Events, again.
fn with_known_status(chatbot: Arc<Chatbot>, ctx: &Context) -> Arc<Chatbot> {
    let (Some(ns), Some(name)) = (
        chatbot.meta().namespace.as_deref(),
        chatbot.meta().name.as_deref(),
    ) else {
        return chatbot;
    };
    let known = ctx.chatbots.lock().ok().and_then(|memos| {
        memos
            .get(&memo_key(ns, name))
            .and_then(|m| m.status.clone())
    });
    match known {
        Some((over, status)) if over.is_some() && over == chatbot.meta().resource_version => {
            let mut newer = chatbot.as_ref().clone();
            newer.status = Some(status);
            Arc::new(newer)
        }
        _ => chatbot,
    }
}

async fn reconcile_inner(
    chatbot: &Chatbot,
    ctx: &Context,
    inputs: &Inputs,
) -> Result<Action, Error> {
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
    let name = chatbot.name_any();
    let key = memo_key(&ns, &name);
    // The ModelRoutes and Tenants of its namespace that its selectors match, from the
    // caches (filled before the first reconcile renders from them).
    let (model_routes, tenants) = selected_inputs(chatbot, &ns, inputs).await?;
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
    let (previous, previous_pruned, seen_ready) = match ctx.chatbots.lock() {
        Ok(mut memos) => {
            let memo = memos.entry(key.clone()).or_default();
            memo.namespace.clone_from(&ns);
            memo.name.clone_from(&name);
            memo.routes = selected_routes;
            memo.tenants = selected_tenants;
            memo.secrets.clone_from(&names);
            (
                memo.applied.clone(),
                memo.pruned.clone(),
                memo.ready_replicas,
            )
        }
        Err(_) => (None, None, None),
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
                // The Deployment's ready replicas as its last watch event told.
                applied(
                    chatbot,
                    ctx,
                    &rendered,
                    seen_ready,
                    &KongOutcome::NotRequested,
                )
                .await?;
                return Ok(Action::requeue(RESYNC));
            }
            let mut children = HashMap::new();
            let (ready_replicas, kong_outcome) = match apply_all(
                chatbot,
                ctx,
                &ns,
                &rendered,
                &mut children,
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
            // The Chatbot's own children are pruned from what the child watches reported
            // (no request unless one goes). The Kong kinds are listed only when this
            // process has not pruned this Chatbot yet or the rendered set changed since:
            // names are derived from the Chatbot's, so the same set leaves nothing to
            // delete. Kong's consumers are shared between Chatbots: always pruned.
            let rendered_names = rendered_names(&rendered);
            prune(chatbot, ctx, &ns, &rendered_names).await?;
            let pruned_same = chatbot.spec.kong.is_none()
                && previous_pruned
                    .as_ref()
                    .is_some_and(|(uid, names)| *uid == chatbot.uid() && *names == rendered_names);
            if !pruned_same {
                let selector = children_selector(&chatbot.name_any());
                kong::prune(ctx, &ns, chatbot, &rendered, &selector, &kong_outcome).await?;
            }
            if let Ok(mut memos) = ctx.chatbots.lock()
                && let Some(memo) = memos.get_mut(&key)
            {
                memo.pruned = Some((chatbot.uid(), rendered_names));
                memo.applied = Some(Applied {
                    uid: chatbot.uid(),
                    hash,
                    children,
                });
                if ready_replicas.is_some() {
                    memo.ready_replicas = ready_replicas;
                }
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
    children: &mut HashMap<String, Child>,
) -> Result<(Option<i32>, KongOutcome), Error> {
    fn note<K: Resource<DynamicType = ()> + Serialize>(
        children: &mut HashMap<String, Child>,
        rendered: &K,
        live: &K,
    ) {
        children.insert(
            format!(
                "{}/{}",
                K::kind(&()),
                live.meta().name.as_deref().unwrap_or_default()
            ),
            Child::of(rendered, live),
        );
    }
    let client = &ctx.client;
    let service_account = &rendered.service_account;
    note(
        children,
        service_account,
        &apply(client, ns, service_account).await?,
    );
    let config_map = &rendered.config_map;
    note(children, config_map, &apply(client, ns, config_map).await?);
    hand_replicas_to_hpa(ctx, ns, &rendered.deployment).await?;
    let deployment = apply(client, ns, &rendered.deployment).await?;
    note(children, &rendered.deployment, &deployment);
    let service = &rendered.service;
    note(children, service, &apply(client, ns, service).await?);
    if let Some(hpa) = &rendered.autoscaler {
        note(children, hpa, &apply(client, ns, hpa).await?);
    }
    if let Some(pdb) = &rendered.disruption_budget {
        note(children, pdb, &apply(client, ns, pdb).await?);
    }
    if let Some(ingress) = &rendered.ingress {
        note(children, ingress, &apply(client, ns, ingress).await?);
    }
    let kong_outcome = kong::apply(ctx, ns, chatbot, rendered).await?;
    tracing::debug!(chatbot = %object_key(chatbot), "applied");
    Ok((deployment_ready(&deployment), kong_outcome))
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

/// The ModelRoutes and Tenants of namespace `ns` that `chatbot` selects, from the caches
/// of `inputs` (waiting for their first fill). An invalid selector selects nothing here
/// and everything of the namespace goes to render, which reports the selector.
async fn selected_inputs(
    chatbot: &Chatbot,
    ns: &str,
    inputs: &Inputs,
) -> Result<(Vec<ModelRoute>, Vec<Tenant>), Error> {
    // False only when the caches' writers are gone (the controller is stopping).
    if !inputs.ready.clone().await {
        return Err(Error::Stopping);
    }
    fn pick<K: Resource<DynamicType = ()> + Clone>(
        store: &Store<K>,
        ns: &str,
        selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    ) -> Vec<K> {
        use kube::core::{Selector, SelectorExt};
        // Parsed once; an invalid one passes everything on to render, which reports it.
        let selector = selector.and_then(|s| Selector::try_from(s.clone()).ok());
        store
            .state()
            .iter()
            .filter(|o| o.meta().namespace.as_deref() == Some(ns))
            .filter(|o| selector.as_ref().is_none_or(|s| s.matches(o.labels())))
            .map(|o| o.as_ref().clone())
            .collect()
    }
    Ok((
        pick(&inputs.routes, ns, chatbot.spec.model_selector.as_ref()),
        pick(&inputs.tenants, ns, chatbot.spec.tenant_selector.as_ref()),
    ))
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

/// Deletes the labelled children of `chatbot` (as the child watches reported them, see
/// [`ChildIndex`]) that `rendered` no longer contains.
async fn prune(
    chatbot: &Chatbot,
    ctx: &Context,
    ns: &str,
    rendered_names: &BTreeSet<String>,
) -> Result<(), Error> {
    let instance = bounded_name(&chatbot.name_any());
    let uid = chatbot.uid();
    let client = &ctx.client;
    for child in ctx.children.owned(ns, &instance, uid.as_deref()) {
        if rendered_names.contains(&child) {
            continue;
        }
        let Some((kind, name)) = child.split_once('/') else {
            continue;
        };
        tracing::info!(object = %format!("{kind} {ns}/{name}"), "deleting a child the spec no longer renders");
        let what = format!("{kind} {ns}/{name}");
        match kind {
            "ServiceAccount" => delete_child::<ServiceAccount>(client, ns, name, what).await?,
            "ConfigMap" => delete_child::<ConfigMap>(client, ns, name, what).await?,
            "Deployment" => delete_child::<Deployment>(client, ns, name, what).await?,
            "Service" => delete_child::<Service>(client, ns, name, what).await?,
            "HorizontalPodAutoscaler" => {
                delete_child::<HorizontalPodAutoscaler>(client, ns, name, what).await?;
            }
            "PodDisruptionBudget" => {
                delete_child::<PodDisruptionBudget>(client, ns, name, what).await?;
            }
            "Ingress" => delete_child::<Ingress>(client, ns, name, what).await?,
            _ => continue,
        }
        ctx.children.forget(ns, &instance, &child);
    }
    Ok(())
}

async fn delete_child<K>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: String,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    delete_ignoring_missing(&api, name, what).await
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

/// Server-side applies `status` to the status subresource, and remembers it over the
/// Chatbot's current version (see [`with_known_status`]).
async fn write_status(
    ctx: &Context,
    chatbot: &Chatbot,
    status: &ChatbotStatus,
) -> Result<(), Error> {
    super::patch_status(&ctx.client, chatbot, status).await?;
    if let (Some(ns), Some(name)) = (
        chatbot.meta().namespace.as_deref(),
        chatbot.meta().name.as_deref(),
    ) && let Ok(mut memos) = ctx.chatbots.lock()
        && let Some(memo) = memos.get_mut(&memo_key(ns, name))
    {
        memo.status = Some((chatbot.meta().resource_version.clone(), status.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(extra: serde_json::Value) -> Deployment {
        let mut value = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "bot-gateway", "namespace": "ns", "uid": "u1",
                "resourceVersion": "10", "generation": 1,
                "labels": {"app.kubernetes.io/instance": "bot"},
                "annotations": {"parley.dev/mine": "a"},
            },
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "x"}},
                "template": {"spec": {"containers": [{"name": "gateway", "image": "img"}]}}
            }
        });
        json_patch_merge(&mut value, extra);
        serde_json::from_value(value).unwrap_or_else(|e| unreachable!("{e}"))
    }

    fn json_patch_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(&k);
                    } else {
                        json_patch_merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p,
        }
    }

    /// What the Deployment controller writes (status, its revision annotation, a new
    /// resourceVersion and managedFields) leaves a child unchanged; a change of its spec,
    /// of the operator's annotation or labels, or its deletion does not.
    #[test]
    fn only_what_the_operator_owns_counts_as_a_change() {
        let applied = deployment(serde_json::json!({}));
        let rendered = deployment(serde_json::json!({}));
        let child = Child::of(&rendered, &applied);
        assert!(child.unchanged(&applied));
        let by_controller = deployment(serde_json::json!({
            "metadata": {
                "resourceVersion": "11",
                "annotations": {"deployment.kubernetes.io/revision": "1"},
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}],
            },
            "status": {"replicas": 1, "unavailableReplicas": 1, "observedGeneration": 1}
        }));
        assert!(child.unchanged(&by_controller));
        let without_annotations = deployment(serde_json::json!({
            "metadata": {"resourceVersion": "12", "annotations": null}
        }));
        let bare = Child::of(&without_annotations, &without_annotations);
        let revised = deployment(serde_json::json!({
            "metadata": {
                "resourceVersion": "13",
                "annotations": {"parley.dev/mine": null, "deployment.kubernetes.io/revision": "1"}
            }
        }));
        assert!(bare.unchanged(&revised), "an annotation of another writer");
        for changed in [
            serde_json::json!({"metadata": {"resourceVersion": "14"}, "spec": {"replicas": 3}}),
            serde_json::json!({"metadata": {"resourceVersion": "14", "annotations": {"parley.dev/mine": "b"}}}),
            serde_json::json!({"metadata": {"resourceVersion": "14", "labels": {"app.kubernetes.io/instance": "other"}}}),
            serde_json::json!({"metadata": {"resourceVersion": "14", "uid": "u2"}}),
        ] {
            assert!(!child.unchanged(&deployment(changed.clone())), "{changed}");
        }
    }
}
