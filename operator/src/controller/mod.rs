//! The controllers behind `parley-operator run`.
//!
//! Each controller only fetches inputs, calls [`crate::render::render`] (Chatbots), applies
//! the result with server-side apply (field manager [`MANAGER`]) and writes status. Three
//! controllers run side by side:
//!
//! - [`chatbot`]: the gateway fleet of each Chatbot (apply, prune, status, events);
//! - [`tenant`]: the generated key Secret of each Tenant without keys (created once, never
//!   updated), and Tenant status;
//! - [`model_route`]: ModelRoute status (backends, missing Secrets).
//!
//! Secret *values* are never read into a cache, logged or written anywhere. Secrets are
//! watched metadata-only (list and watch as `PartialObjectMetadata`); to learn which keys
//! a Secret has, a reconcile gets only the Secrets its objects name, by name, and keeps
//! only the key names (see [`secret_keys`] and [`referenced_secrets`]). The one value the
//! operator copies is a Tenant key into a Kong credential Secret (see [`kong`]).

pub mod chatbot;
pub mod conditions;
pub mod connect;
pub mod kong;
pub mod leader;
pub mod metrics;
pub mod model_route;
pub mod tenant;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use parley_crds::{Chatbot, ModelRoute, Tenant};

use crate::render::{MANAGER, SecretKeys, selects_tenant};
use metrics::Metrics;

/// What the controllers need to know from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image of Chatbots that name none (`--gateway-image`).
    pub gateway_image: String,
    /// Watch only this namespace (`--namespace`); `None` = all namespaces.
    pub namespace: Option<String>,
    /// `reportingInstance` of Events (the pod name, or the host name).
    pub instance: Option<String>,
}

/// Why a reconcile failed. The category (see [`Error::category`]) is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done, e.g. `applying Deployment prod/support-gateway`.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A rendered object could not be serialised (a bug).
    #[error("serialising {what}: {source}")]
    Serialize {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The operating system gave no randomness for a key.
    #[error("no randomness for a generated key: {0}")]
    Random(String),
    /// An object without a namespace or name (cannot happen for namespaced kinds).
    #[error("{0} has no namespace or name")]
    Unnamed(String),
    /// The controller is stopping: its caches of ModelRoutes and Tenants are gone.
    #[error("the controller is stopping")]
    Stopping,
}

impl Error {
    /// A low-cardinality label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(s) if s.code == 409 => "conflict",
                kube::Error::Api(s) if s.code == 403 => "forbidden",
                kube::Error::Api(s) if s.code == 422 => "invalid",
                kube::Error::Api(_) => "api",
                _ => "transport",
            },
            Error::Serialize { .. } => "serialize",
            Error::Random(_) => "random",
            Error::Unnamed(_) => "unnamed",
            Error::Stopping => "stopping",
        }
    }
}

/// A `kube::Error` with what was being done.
pub(crate) fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// Deletes an object in the background; one that is already gone counts as deleted.
pub(crate) async fn delete_ignoring_missing<K>(
    api: &kube::Api<K>,
    name: &str,
    what: String,
) -> Result<(), Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api
        .delete(name, &kube::api::DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(kube_err(format!("deleting {what}"))(e)),
    }
}

/// Shared by every reconcile of one controller process.
pub struct Context {
    /// API client (of the operator's ServiceAccount).
    pub client: Client,
    /// Event recorder (events.k8s.io).
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Command-line settings.
    pub settings: Settings,
    /// Consecutive failures per object, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// What the Chatbot controller last read and applied, per Chatbot (`namespace/name`):
    /// maps watch events to only the Chatbots they concern and skips applies that would
    /// change nothing.
    pub(crate) chatbots: Mutex<HashMap<String, chatbot::Memo>>,
    /// The Chatbots' labelled children as the Chatbot controller's watches report them.
    pub(crate) children: chatbot::ChildIndex,
    /// The status the Tenant controller last wrote per Tenant (`Kind/namespace/name`), and
    /// the Tenant's resourceVersion it was written over.
    pub(crate) tenant_status: Mutex<HashMap<String, (Option<String>, parley_crds::TenantStatus)>>,
    /// Key names of the Secrets reconciles have read, shared by the three controllers.
    pub(crate) secret_keys: SecretKeyCache,
    /// Until when the Kong CRDs are known to be absent (a 404 on a Kong kind): pruning
    /// does not ask again for kinds that cannot have objects.
    kong_absent_until: Mutex<Option<std::time::Instant>>,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_string(),
            instance: settings.instance.clone(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            failures: Mutex::new(HashMap::new()),
            chatbots: Mutex::new(HashMap::new()),
            children: chatbot::ChildIndex::default(),
            tenant_status: Mutex::new(HashMap::new()),
            secret_keys: SecretKeyCache::default(),
            kong_absent_until: Mutex::new(None),
        }
    }

    /// Which keys exist in the Secrets `names` of `namespace`, from the shared cache
    /// where it knows, else by a GET by name (see [`secret_keys`]).
    pub(crate) async fn secret_keys(
        &self,
        namespace: &str,
        names: impl IntoIterator<Item = String>,
    ) -> Result<SecretKeys, Error> {
        let mut known = SecretKeys::new();
        let mut missing = Vec::new();
        for name in names {
            match self.secret_keys.lookup(namespace, &name) {
                Lookup::Found(Some(keys)) => {
                    known.insert(name, keys);
                }
                Lookup::Found(None) => {}
                Lookup::Miss(epoch) => missing.push((name, epoch)),
            }
        }
        if missing.is_empty() {
            return Ok(known);
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let read: Vec<_> = futures::stream::iter(missing)
            .map(|(name, epoch)| {
                let api = api.clone();
                async move {
                    let secret = api
                        .get_opt(&name)
                        .await
                        .map_err(kube_err(format!("reading Secret {namespace}/{name}")))?;
                    Ok::<_, Error>((
                        name,
                        epoch,
                        secret.map(|s| {
                            let rv = s.metadata.resource_version.clone();
                            (rv, key_names(s))
                        }),
                    ))
                }
            })
            .buffer_unordered(SECRET_GETS_IN_FLIGHT)
            .try_collect()
            .await?;
        for (name, epoch, found) in read {
            let (rv, keys) = match found {
                Some((rv, keys)) => (rv, Some(keys)),
                None => (None, None),
            };
            self.secret_keys
                .store(namespace, &name, epoch, rv, keys.clone());
            if let Some(keys) = keys {
                known.insert(name, keys);
            }
        }
        Ok(known)
    }

    /// Whether the Kong CRDs were found absent less than [`KONG_ABSENT_FOR`] ago.
    pub(crate) fn kong_known_absent(&self) -> bool {
        self.kong_absent_until
            .lock()
            .ok()
            .and_then(|until| *until)
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Records what a request on a Kong kind found: absent (a 404) or present.
    pub(crate) fn kong_seen(&self, present: bool) {
        if let Ok(mut until) = self.kong_absent_until.lock() {
            *until = (!present).then(|| std::time::Instant::now() + KONG_ABSENT_FOR);
        }
    }

    /// The delay before retrying `key` after a failure: 1 s doubling to 5 minutes, with
    /// up to 20 % jitter so a fleet of failing objects does not retry in lockstep.
    pub(crate) fn failure_backoff(&self, key: &str) -> Duration {
        let attempt = match self.failures.lock() {
            Ok(mut map) => {
                let n = map.entry(key.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        backoff_delay(attempt, jitter_fraction())
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub(crate) fn succeeded(&self, key: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(key);
        }
    }

    /// Forgets what was kept about Chatbots or Tenants (kind `K`) that are gone: one that
    /// was deleted, or, after a relist, every one not in the store.
    pub(crate) fn forget<K>(&self, gone: Gone<'_, K>)
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let kind = K::kind(&());
        let is_chatbot = kind == Chatbot::kind(&());
        let is_tenant = kind == Tenant::kind(&());
        match gone {
            Gone::Deleted(obj) => {
                // `Kind/namespace/name`; the Chatbot memos drop the kind.
                let key = object_key(obj);
                if let Ok(mut map) = self.failures.lock() {
                    map.remove(&key);
                }
                let short = key.split_once('/').map_or("", |(_, rest)| rest);
                if is_chatbot && let Ok(mut memos) = self.chatbots.lock() {
                    memos.remove(short);
                }
                if is_tenant && let Ok(mut known) = self.tenant_status.lock() {
                    known.remove(&key);
                }
            }
            Gone::AllBut(store) => {
                let exists = |short: &str| {
                    short.split_once('/').is_none_or(|(ns, name)| {
                        store.get(&ObjectRef::new(name).within(ns)).is_some()
                    })
                };
                let prefix = format!("{kind}/");
                let kept = |key: &str| key.strip_prefix(prefix.as_str()).is_none_or(exists);
                if let Ok(mut map) = self.failures.lock() {
                    map.retain(|k, _| kept(k));
                }
                if is_chatbot && let Ok(mut memos) = self.chatbots.lock() {
                    memos.retain(|k, _| exists(k));
                }
                if is_tenant && let Ok(mut known) = self.tenant_status.lock() {
                    known.retain(|k, _| kept(k));
                }
            }
        }
    }
}

/// Objects that are gone, for [`Context::forget`].
pub(crate) enum Gone<'a, K: Clone + Resource<DynamicType = ()> + 'static> {
    /// This one was deleted.
    Deleted(&'a K),
    /// A relist: every object not in this store is gone (deletions while the watch was
    /// down are not reported one by one).
    AllBut(&'a kube::runtime::reflector::Store<K>),
}

/// `1 s * 2^(attempt-1)`, capped at 300 s, stretched by `jitter` (0.0..0.2).
pub fn backoff_delay(attempt: u32, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(16);
    let base = (1u64 << exp).min(300);
    Duration::from_secs(base).mul_f64(1.0 + jitter.clamp(0.0, 0.2))
}

fn jitter_fraction() -> f64 {
    let mut b = [0u8; 1];
    match getrandom::fill(&mut b) {
        Ok(()) => f64::from(b[0]) / 255.0 * 0.2,
        Err(_) => 0.1,
    }
}

/// The key used for backoff bookkeeping: `Kind/namespace/name`.
/// Runs one reconcile, recording its duration and result category in the metrics and
/// resetting the object's failure backoff when it succeeds.
pub(crate) async fn measured<K: Resource<DynamicType = ()>>(
    object: &K,
    ctx: &Context,
    work: impl std::future::Future<Output = Result<kube::runtime::controller::Action, Error>>,
) -> Result<kube::runtime::controller::Action, Error> {
    let started = std::time::Instant::now();
    let result = work.await;
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.category(),
    };
    ctx.metrics
        .observe(K::kind(&()).as_ref(), label, started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&object_key(object));
    }
    result
}

/// The shared error policy: log, then requeue with the object's growing backoff.
pub(crate) fn retry_later<K: Resource<DynamicType = ()>>(
    object: &K,
    error: &Error,
    ctx: &Context,
) -> kube::runtime::controller::Action {
    let key = object_key(object);
    let delay = ctx.failure_backoff(&key);
    tracing::warn!(
        object = %key,
        error = %error,
        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        "reconcile failed"
    );
    kube::runtime::controller::Action::requeue(delay)
}

/// `"<field>: Secret <name> has no key <key>"` for each reference whose Secret or key is
/// missing from `secrets`.
pub(crate) fn missing_secret_keys<'a>(
    references: impl IntoIterator<Item = (String, &'a parley_crds::common::SecretKeyRef)>,
    secrets: &crate::render::SecretKeys,
) -> Vec<String> {
    references
        .into_iter()
        .filter(|(_, r)| {
            !secrets
                .get(&r.name)
                .is_some_and(|keys| keys.contains(&r.key))
        })
        .map(|(field, r)| format!("{field}: Secret {} has no key {}", r.name, r.key))
        .collect()
}

pub(crate) fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// How many reconciles of one kind run at the same time. Unbounded (kube-runtime's
/// default), a thousand Chatbots created together start a thousand reconciles whose
/// requests queue behind each other: memory grows with them and every one finishes late.
pub const RECONCILES_IN_FLIGHT: u16 = 16;

/// The configuration of the three controllers: [`RECONCILES_IN_FLIGHT`].
pub(crate) fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(RECONCILES_IN_FLIGHT)
}

/// How long a 404 on a Kong kind is believed: pruning skips the Kong kinds for this long.
/// Applying a Chatbot with `spec.kong` always asks (and a success ends the belief).
const KONG_ABSENT_FOR: Duration = Duration::from_secs(60);

/// The key names of Secrets that reconciles read (by name), shared by every reconcile,
/// so that the Secrets many Chatbots name (a Tenant's key, a provider key) are read once,
/// not once per reconcile. Values are never held. An entry is dropped when the
/// metadata-only Secret watch reports a change of that Secret (another resourceVersion,
/// or its deletion); a read that started before such a change is not kept.
#[derive(Default)]
pub(crate) struct SecretKeyCache {
    slots: Mutex<HashMap<(String, String), Slot>>,
}

#[derive(Default)]
struct Slot {
    /// Bumped by each invalidation: a read keeps its answer only when it is unchanged.
    epoch: u64,
    /// The resourceVersion read, and the key names (`None`: no such Secret); `None`
    /// until read, and again after an invalidation.
    known: Option<(Option<String>, Option<BTreeSet<String>>)>,
}

/// What the cache knows of one Secret.
pub(crate) enum Lookup {
    /// Its key names (`None`: it does not exist).
    Found(Option<BTreeSet<String>>),
    /// Unknown: read it, then [`SecretKeyCache::store`] with this epoch.
    Miss(u64),
}

impl SecretKeyCache {
    fn lookup(&self, ns: &str, name: &str) -> Lookup {
        let Ok(mut slots) = self.slots.lock() else {
            return Lookup::Miss(u64::MAX);
        };
        let slot = slots.entry((ns.to_string(), name.to_string())).or_default();
        match &slot.known {
            Some((_, keys)) => Lookup::Found(keys.clone()),
            None => Lookup::Miss(slot.epoch),
        }
    }

    fn store(
        &self,
        ns: &str,
        name: &str,
        epoch: u64,
        rv: Option<String>,
        keys: Option<BTreeSet<String>>,
    ) {
        if let Ok(mut slots) = self.slots.lock()
            && let Some(slot) = slots.get_mut(&(ns.to_string(), name.to_string()))
            && slot.epoch == epoch
        {
            slot.known = Some((rv, keys));
        }
    }

    /// A watch event of Secret `ns/name` at `rv`: forget what was read unless it is
    /// that very version (a deleted Secret's last event carries a newer version).
    pub(crate) fn changed(&self, ns: &str, name: &str, rv: Option<&str>) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        let Some(slot) = slots.get_mut(&(ns.to_string(), name.to_string())) else {
            return;
        };
        let same = matches!(&slot.known, Some((Some(read), Some(_))) if Some(read.as_str()) == rv);
        if !same {
            slot.epoch = slot.epoch.wrapping_add(1);
            slot.known = None;
        }
    }

    /// Forgets `ns/name` when `meta` is a Secret event (for the controllers' mappers).
    pub(crate) fn on_event(
        &self,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) {
        if let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) {
            self.changed(ns, name, meta.resource_version.as_deref());
        }
    }
}

/// How many Secrets one reconcile gets at the same time.
const SECRET_GETS_IN_FLIGHT: usize = 8;

/// Which keys exist in the Secrets `names` of `namespace`. Each Secret is read with a GET
/// by name (the metadata API does not carry key names) and reduced to its key names at
/// once: values never leave this function. A Secret that does not exist is left out.
pub async fn secret_keys(
    client: &Client,
    namespace: &str,
    names: impl IntoIterator<Item = String>,
) -> Result<SecretKeys, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let names: BTreeSet<String> = names.into_iter().collect();
    let found: Vec<_> = futures::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            async move {
                let secret = api
                    .get_opt(&name)
                    .await
                    .map_err(kube_err(format!("reading Secret {namespace}/{name}")))?;
                Ok::<_, Error>(secret.map(|s| (name, key_names(s))))
            }
        })
        .buffer_unordered(SECRET_GETS_IN_FLIGHT)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}

/// The key names of `secret`; the values are dropped here.
fn key_names(secret: Secret) -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = secret
        .data
        .map(|d| d.into_keys().collect())
        .unwrap_or_default();
    keys.extend(secret.string_data.unwrap_or_default().into_keys());
    keys
}

/// The names of the Secrets that rendering `chatbot` reads: its Redis and usage ledger
/// URLs, the keys of the backends of the ModelRoutes it selects, and the API keys
/// (given, or the generated `<tenant>-api-key`) and upstream keys of the Tenants it
/// selects. Only these are read for a Chatbot. A selector that is not valid selects
/// nothing here (render reports it).
pub fn referenced_secrets(
    chatbot: &Chatbot,
    routes: &[ModelRoute],
    tenants: &[Tenant],
) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    if let Some(redis) = &chatbot.spec.redis {
        names.insert(redis.url_secret_ref.name.clone());
    }
    if let Some(usage) = &chatbot.spec.usage {
        names.insert(usage.postgres_url_secret_ref.name.clone());
    }
    let namespace = chatbot.meta().namespace.as_ref();
    let selector = chatbot.spec.model_selector.as_ref();
    for route in routes.iter().filter(|r| {
        r.meta().namespace.as_ref() == namespace && label_selector_matches(selector, r.labels())
    }) {
        names.extend(route_secrets(route));
    }
    for tenant in tenants.iter().filter(|t| selects_tenant(chatbot, t)) {
        names.extend(tenant_secrets(tenant));
    }
    names
}

/// The Secrets a ModelRoute names (its backends' `apiKeySecretRef`s).
pub fn route_secrets(route: &ModelRoute) -> BTreeSet<String> {
    route
        .spec
        .backends
        .iter()
        .filter_map(|b| b.api_key_secret_ref.as_ref().map(|r| r.name.clone()))
        .collect()
}

/// The Secrets a Tenant names: its API keys (or the generated `<tenant>-api-key`) and
/// its upstream keys.
pub fn tenant_secrets(tenant: &Tenant) -> BTreeSet<String> {
    tenant
        .api_key_refs()
        .into_iter()
        .map(|r| r.name)
        .chain(
            tenant
                .spec
                .upstream_keys
                .iter()
                .map(|k| k.secret_ref.name.clone()),
        )
        .collect()
}

/// Whether `selector` (absent = everything) matches `labels`; an invalid selector
/// matches nothing.
pub(crate) fn label_selector_matches(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    use kube::core::{Selector, SelectorExt};
    match selector {
        None => true,
        Some(selector) => Selector::try_from(selector.clone())
            .map(|s| s.matches(labels))
            .unwrap_or(false),
    }
}

/// Maps any object to the `K`s of its namespace held in `store` (every Chatbot of the
/// namespace of a ModelRoute, Tenant or Secret).
pub(crate) fn same_namespace<K, O>(
    store: &kube::runtime::reflector::Store<K>,
    other: &O,
) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    O: Resource,
{
    let namespace = other.meta().namespace.clone();
    store
        .state()
        .iter()
        .filter(|k| k.meta().namespace == namespace)
        .map(|k| ObjectRef::from_obj(k.as_ref()))
        .collect()
}

/// Maps a Secret to the `K`s of its namespace held in `store` that name it (`names`
/// lists the Secrets a `K` names).
pub(crate) fn naming<K, O>(
    store: &kube::runtime::reflector::Store<K>,
    secret: &O,
    names: impl Fn(&K) -> BTreeSet<String>,
) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    O: Resource,
{
    let namespace = secret.meta().namespace.clone();
    let name = secret.meta().name.clone().unwrap_or_default();
    store
        .state()
        .iter()
        .filter(|k| k.meta().namespace == namespace && names(k.as_ref()).contains(&name))
        .map(|k| ObjectRef::from_obj(k.as_ref()))
        .collect()
}

/// The objects of kind `K` (in `namespace`, or all) in a reflector store, and the stream of
/// those that are new or have a new generation (a spec change), other labels or other
/// annotations (a "touch"): the status a controller writes does not reconcile the object
/// again, while the store still takes every change, so a reconcile sees the latest status.
/// What `ctx` keeps about an object is forgotten when it is deleted.
pub(crate) fn spec_changes<K>(
    client: &Client,
    namespace: Option<&str>,
    ctx: Arc<Context>,
) -> (
    kube::runtime::reflector::Store<K>,
    impl futures::Stream<Item = Result<K, kube::runtime::watcher::Error>> + Send + 'static,
)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::{Predicate, WatchStreamExt, predicates, reflector, watcher};
    let (reader, writer) = reflector::store::<K>();
    let store = reader.clone();
    let changes = watcher(
        scoped_api::<K>(client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    // What is kept per object goes with it (the store already has the event).
    .inspect_ok(move |event| match event {
        watcher::Event::Delete(obj) => ctx.forget(Gone::Deleted(obj)),
        watcher::Event::InitDone => ctx.forget(Gone::AllBut(&store)),
        _ => {}
    })
    .applied_objects()
    .predicate_filter(
        predicates::generation
            .combine(predicates::labels)
            .combine(predicates::annotations),
        Default::default(),
    );
    (reader, changes)
}

/// An `Api` for a namespaced kind: one namespace, or all of them.
pub(crate) fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Server-side applies `status` to the status subresource of `object` (field manager
/// `parley-operator`; the patch carries apiVersion and kind, as apply requires).
pub(crate) async fn patch_status<K, S>(client: &Client, object: &K, status: &S) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: serde::Serialize,
{
    let (Some(ns), Some(name)) = (
        object.meta().namespace.as_deref(),
        object.meta().name.as_deref(),
    ) else {
        return Err(Error::Unnamed(object_key(object)));
    };
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err(format!(
        "writing the status of {} {ns}/{name}",
        K::kind(&())
    )))?;
    Ok(())
}

/// How long the controllers may take, once told to stop, to finish the reconciles they
/// are running. After that they are dropped (reconciles are idempotent; the next leader
/// or start redoes them). Without this bound a controller whose first list never
/// succeeded (API server unreachable) would wait for its cache forever.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs the three controllers until `shutdown` resolves; then they finish what they are
/// doing, for at most [`STOP_GRACE`], and return.
pub async fn run_controllers(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Context::new(client, settings, metrics));
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let chatbots = chatbot::controller(Arc::clone(&ctx), shutdown.clone());
    let tenants = tenant::controller(Arc::clone(&ctx), shutdown.clone());
    let routes = model_route::controller(Arc::clone(&ctx), shutdown.clone());
    ctx.metrics.set_ready(true);
    let all = async {
        futures::join!(chatbots, tenants, routes);
    };
    tokio::select! {
        () = all => {}
        () = async {
            shutdown.await;
            tokio::time::sleep(STOP_GRACE).await;
        } => {
            tracing::warn!(
                grace_ms = u64::try_from(STOP_GRACE.as_millis()).unwrap_or(u64::MAX),
                "the controllers did not finish within the grace period after the stop; dropping them"
            );
        }
    }
    ctx.metrics.set_ready(false);
}

/// Drains a controller's result stream, logging failures at the right level, until the
/// stream ends (after `shutdown`, once the running reconciles are done). A stop that
/// comes before the controller's cache of `store` was first filled (the API server is
/// unreachable, or the stop came at once) returns at once: no reconcile can have started,
/// and kube-runtime would otherwise wait for that cache forever.
pub(crate) async fn drain<S, T, E, K>(
    kind: &'static str,
    stream: S,
    store: kube::runtime::reflector::Store<K>,
    shutdown: impl std::future::Future<Output = ()>,
) where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let results = stream.for_each(|result| async move {
        if let Err(e) = result {
            tracing::warn!(kind, error = %e, "reconcile failed");
        }
    });
    let stopped_unsynced = async {
        shutdown.await;
        let synced = matches!(
            futures::FutureExt::now_or_never(store.wait_until_ready()),
            Some(Ok(()))
        );
        if synced {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = results => {}
        () = stopped_unsynced => {
            tracing::debug!(kind, "stopped before the first list completed; nothing was reconciling");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_is_kept_about_an_object_goes_when_it_is_deleted_or_relisted_away()
    -> Result<(), Box<dyn std::error::Error>> {
        // No request is made: building a client does no I/O.
        let client = Client::try_from(kube::Config::new("http://127.0.0.1:9".parse()?))?;
        let settings = Settings {
            gateway_image: "gw".into(),
            namespace: None,
            instance: None,
        };
        let ctx = Context::new(client, settings, Arc::new(Metrics::new()));
        let chatbot = |ns: &str, name: &str| {
            serde_json::from_value::<Chatbot>(serde_json::json!({
                "apiVersion": "parley.dev/v1alpha1", "kind": "Chatbot",
                "metadata": {"namespace": ns, "name": name},
                "spec": {"defaultModel": "m"},
            }))
        };
        let (a, b, c) = (chatbot("x", "a")?, chatbot("x", "b")?, chatbot("y", "c")?);
        for bot in [&a, &b, &c] {
            ctx.failure_backoff(&object_key(bot));
            if let Ok(mut memos) = ctx.chatbots.lock() {
                memos.insert(
                    format!("{}/{}", bot.namespace().unwrap_or_default(), bot.name_any()),
                    Default::default(),
                );
            }
        }
        ctx.failure_backoff("Tenant/x/a");
        let kept = |ctx: &Context| {
            let mut failures: Vec<String> = ctx
                .failures
                .lock()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let mut memos: Vec<String> = ctx
                .chatbots
                .lock()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            failures.sort();
            memos.sort();
            (failures, memos)
        };
        ctx.forget(Gone::Deleted(&a));
        assert_eq!(
            kept(&ctx),
            (
                vec![
                    "Chatbot/x/b".to_string(),
                    "Chatbot/y/c".into(),
                    "Tenant/x/a".into()
                ],
                vec!["x/b".to_string(), "y/c".into()]
            )
        );
        // A relist that no longer has b: c stays, and so does the Tenant of the same name.
        let (reader, mut writer) = kube::runtime::reflector::store::<Chatbot>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(c.clone()));
        ctx.forget(Gone::AllBut(&reader));
        assert_eq!(
            kept(&ctx),
            (
                vec!["Chatbot/y/c".to_string(), "Tenant/x/a".into()],
                vec!["y/c".to_string()]
            )
        );
        // Tenants: their last status, by deletion and by relist.
        let tenant = |name: &str| {
            serde_json::from_value::<Tenant>(serde_json::json!({
                "apiVersion": "parley.dev/v1alpha1", "kind": "Tenant",
                "metadata": {"namespace": "x", "name": name},
                "spec": {},
            }))
        };
        let (t1, t2, t3) = (tenant("t1")?, tenant("t2")?, tenant("t3")?);
        for t in [&t1, &t2, &t3] {
            if let Ok(mut known) = ctx.tenant_status.lock() {
                known.insert(object_key(t), (None, Default::default()));
            }
        }
        let statuses = |ctx: &Context| {
            let mut keys: Vec<String> = ctx
                .tenant_status
                .lock()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            keys.sort();
            keys
        };
        ctx.forget(Gone::Deleted(&t1));
        assert_eq!(statuses(&ctx), vec!["Tenant/x/t2", "Tenant/x/t3"]);
        let (reader, mut writer) = kube::runtime::reflector::store::<Tenant>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(t3.clone()));
        ctx.forget(Gone::AllBut(&reader));
        assert_eq!(statuses(&ctx), vec!["Tenant/x/t3"]);
        // The Tenant's failure count went with the relist (it named x/a, now absent).
        assert_eq!(kept(&ctx).0, vec!["Chatbot/y/c".to_string()]);
        Ok(())
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_delay(1, 0.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(2, 0.0), Duration::from_secs(2));
        assert_eq!(backoff_delay(5, 0.0), Duration::from_secs(16));
        assert_eq!(backoff_delay(40, 0.0), Duration::from_secs(300));
        assert!(backoff_delay(3, 0.2) <= Duration::from_secs_f64(4.8 + 1e-9));
    }

    /// Objects of the samples' namespace that the sample Chatbot does not select, each
    /// naming a Secret of its own.
    const UNSELECTED: &str = "
apiVersion: v1
kind: Secret
metadata: {name: other-key}
stringData: {api-key: other-value, key: other-value}
---
apiVersion: parley.dev/v1alpha1
kind: Tenant
metadata: {name: other, labels: {parley.dev/chatbot: other}}
spec:
  apiKeys: [{secretRef: {name: other-key, key: api-key}}]
---
apiVersion: parley.dev/v1alpha1
kind: Tenant
metadata: {name: other-generated, labels: {parley.dev/chatbot: other}}
spec: {}
---
apiVersion: parley.dev/v1alpha1
kind: ModelRoute
metadata: {name: other, labels: {parley.dev/chatbot: other}}
spec:
  backends:
  - {name: a, provider: openai, baseUrl: 'https://example.com/v1', apiKeySecretRef: {name: other-key, key: key}}
";

    /// For every Chatbot of the committed samples and examples, the Secrets that
    /// [`referenced_secrets`] names are all that render needs: rendering with only those
    /// gives exactly what rendering with every Secret of the namespace gives, and every
    /// Secret the Deployment mounts is among them. Secrets of objects it does not select
    /// are not read.
    #[test]
    fn a_chatbot_reads_only_the_secrets_it_names_and_they_are_all_render_needs()
    -> Result<(), String> {
        use crate::manifests::Manifests;
        use crate::render::{RenderInput, render};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or_else(|| std::path::Path::new(".."))
            .to_path_buf();
        let mut checked = 0;
        // The samples' Chatbot selects by label; the example's selects everything in its
        // namespace, so there the others live in another namespace.
        for (dir, unselected_namespace) in [
            ("config/samples", None),
            ("config/examples", Some("elsewhere")),
        ] {
            let mut m = Manifests::load(&[root.join(dir)]).map_err(|e| format!("{dir}: {e}"))?;
            let unselected = match unselected_namespace {
                Some(ns) => {
                    UNSELECTED.replace("metadata: {", &format!("metadata: {{namespace: {ns}, "))
                }
                None => UNSELECTED.to_string(),
            };
            m.add_text(std::path::Path::new("unselected.yaml"), &unselected);
            assert!(m.errors.is_empty(), "{dir}: {:?}", m.errors);
            for chatbot in &m.chatbots {
                let ns = chatbot.namespace().unwrap_or_default();
                let all = m.secrets.get(&ns).cloned().unwrap_or_default();
                let names = referenced_secrets(chatbot, &m.model_routes, &m.tenants);
                let only: SecretKeys = all
                    .iter()
                    .filter(|(name, _)| names.contains(*name))
                    .map(|(n, k)| (n.clone(), k.clone()))
                    .collect();
                let input = |secrets| RenderInput {
                    chatbot,
                    model_routes: &m.model_routes,
                    tenants: &m.tenants,
                    secrets,
                    default_image: "img",
                };
                let with_all = render(&input(&all))
                    .map_err(|e| format!("{dir}: {}: {e:?}", chatbot.name_any()))?;
                let with_only = render(&input(&only))
                    .map_err(|e| format!("{dir}: {}: {e:?}", chatbot.name_any()))?;
                assert_eq!(with_all, with_only, "{dir}: {}", chatbot.name_any());
                let pod = with_all
                    .deployment
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .map(|s| serde_json::to_value(s).unwrap_or_default())
                    .unwrap_or_default();
                let mounted: Vec<&str> = pod["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|v| v["projected"]["sources"].as_array().into_iter().flatten())
                    .filter_map(|s| s["secret"]["name"].as_str())
                    .collect();
                assert!(!mounted.is_empty(), "{dir}: no Secret mounted");
                for secret in mounted {
                    assert!(names.contains(secret), "{dir}: {secret} not in {names:?}");
                }
                for not_selected in ["other-key", "other-generated-api-key"] {
                    assert!(!names.contains(not_selected), "{dir}: {names:?}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 2, "{checked} Chatbots checked");
        Ok(())
    }

    #[test]
    fn routes_and_tenants_name_their_own_secrets() {
        let tenant: Tenant = serde_json::from_value(serde_json::json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme", "namespace": "ns"},
            "spec": {"upstreamKeys": [{"model": "m", "backend": "b", "secretRef": {"name": "up", "key": "k"}}]}
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(
            tenant_secrets(&tenant),
            BTreeSet::from(["acme-api-key".to_string(), "up".to_string()])
        );
        let route: ModelRoute = serde_json::from_value(serde_json::json!({
            "apiVersion": "parley.dev/v1alpha1", "kind": "ModelRoute",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"backends": [
                {"name": "a", "provider": "openai", "baseUrl": "http://x/v1", "apiKeySecretRef": {"name": "llm", "key": "a"}},
                {"name": "b", "provider": "openai", "baseUrl": "http://x/v1"}
            ]}
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(route_secrets(&route), BTreeSet::from(["llm".to_string()]));
    }
}
