//! The operator's controllers against a real kube-apiserver (`e2e/controlplane`): each
//! test runs the controllers in-process, *as the operator's ServiceAccount* (a bearer
//! token from the TokenRequest API) bound to the ClusterRole of `config/rbac/role.yaml`,
//! so a verb missing from the role fails the tests. Skips only when the control plane
//! cannot be built (no Go) and `PARLEY_E2E_ALLOW_SKIP=1`.
//!
//! Least privilege with Secrets, checked after every test (see [`check_secret_use`]):
//! - from the API server's audit log (what the server saw, by the ServiceAccount): no
//!   request was refused (403); every list of Secrets answered a
//!   `PartialObjectMetadataList` (no data); every Secret it got is one that a Chatbot,
//!   Tenant or ModelRoute of the test names; the value of a Secret nothing names never
//!   appears in a response;
//! - from the operator's own HTTP requests (recorded by a layer of its client): every
//!   list *and watch* of Secrets asked for metadata only (`Accept: ...;as=
//!   PartialObjectMetadata[List]...`). Watches are streamed, so the audit log records no
//!   response body for them; their Accept header is what decides what the server sends.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use parley_crds::{Chatbot, ModelRoute, Tenant};
use parley_e2e::controlplane::{self, TestCluster, apply_crds, apply_yaml, yaml_documents};
use parley_operator::controller::chatbot::{HANDOVER_MANAGER, applies_replicas};
use parley_operator::controller::metrics::Metrics;
use parley_operator::controller::{self as op, Settings, leader};
use parley_operator::render::{self, MANAGER, RenderInput};

/// Upper bound of one test's body.
const TEST_TIMEOUT: Duration = Duration::from_secs(50);
/// How long one expected state may take to appear.
const WAIT: Duration = Duration::from_secs(20);
const IMAGE: &str = "example.com/parley-gateway:e2e";

fn root() -> PathBuf {
    controlplane::repo_root()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn samples(files: &[&str]) -> String {
    files
        .iter()
        .map(|f| format!("---\n{}\n", read(&format!("config/samples/{f}"))))
        .collect()
}

/// Every `stringData` value of the sample Secrets.
fn sample_secret_values() -> Vec<String> {
    let docs = yaml_documents(&read("config/samples/00-secrets.yaml")).unwrap();
    let values: Vec<String> = docs
        .iter()
        .filter_map(|d| d.get("stringData").and_then(|s| s.as_object()))
        .flat_map(|m| m.values().filter_map(|v| v.as_str().map(str::to_string)))
        .collect();
    assert!(values.len() >= 5, "{values:?}");
    values
}

/// Runs `body` with a fresh namespace, the CRDs and the operator's RBAC installed, and a
/// client that authenticates as the operator's ServiceAccount. Bounded by
/// [`TEST_TIMEOUT`]. Afterwards checks what the operator did with Secrets
/// ([`check_secret_use`]).
async fn with_cluster<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: FnOnce(TestCluster, Client) -> Fut,
    Fut: Future<Output = anyhow::Result<TestCluster>>,
{
    with_cluster_checked(body).await.map(|_| ())
}

/// [`with_cluster`], returning what the operator did with Secrets (`None` when skipped).
async fn with_cluster_checked<F, Fut>(body: F) -> anyhow::Result<Option<SecretUse>>
where
    F: FnOnce(TestCluster, Client) -> Fut,
    Fut: Future<Output = anyhow::Result<TestCluster>>,
{
    let Some(cluster) = TestCluster::start_or_skip().await? else {
        return Ok(None);
    };
    apply_crds(&cluster.client, &read("config/crd/parley-crds.yaml")).await?;
    let binding = install_rbac(&cluster).await?;
    let ns = cluster.namespace.clone();
    // A Secret that nothing names: the operator must never read it.
    apply(&cluster.client, &ns, &unnamed_secret()).await?;
    let requests = Requests::default();
    let operator_client = requests
        .client(cluster.service_account_config(&ns, SERVICE_ACCOUNT).await?)
        .context("building the operator's client")?;
    wait_for_rbac(&operator_client, &ns).await?;
    if binding.policy.is_some() {
        wait_for_policy(&cluster).await?;
    }
    let admin = cluster.client.clone();
    let result = tokio::time::timeout(TEST_TIMEOUT, body(cluster, operator_client)).await;
    binding.remove(&admin).await;
    let cluster = match result {
        Err(_) => bail!("test did not finish within {TEST_TIMEOUT:?}"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(cluster)) => cluster,
    };
    let used = check_secret_use(&cluster, &requests).await?;
    cluster.cleanup().await?;
    Ok(Some(used))
}

/// The operator's ServiceAccount (in the test namespace).
const SERVICE_ACCOUNT: &str = "parley-operator";
/// The Secret no object names, and its value.
const UNNAMED_SECRET: &str = "nobody-names-this";
const UNNAMED_VALUE: &str = "unnamed-secret-value-3f9c1a";

fn unnamed_secret() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {UNNAMED_SECRET}}}\nstringData: {{key: {UNNAMED_VALUE}, api-key: {UNNAMED_VALUE}}}\n"
    )
}

/// Every object each test namespace was given through [`apply`].
static APPLIED: std::sync::Mutex<BTreeMap<String, Vec<serde_json::Value>>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Applies `yaml` to `ns` (as `apply_yaml`) and remembers its objects, from which
/// [`named_secrets`] learns which Secrets the test's objects name.
async fn apply(
    client: &Client,
    ns: &str,
    yaml: &str,
) -> anyhow::Result<Vec<kube::api::DynamicObject>> {
    let docs = yaml_documents(yaml)?;
    if let Ok(mut applied) = APPLIED.lock() {
        applied.entry(ns.to_string()).or_default().extend(docs);
    }
    apply_yaml(client, ns, yaml).await
}

/// The Secrets that the Chatbots, Tenants and ModelRoutes applied to `ns` name, read
/// from their YAML (independently of the operator's code): Chatbot `spec.redis.
/// urlSecretRef`, `spec.usage.postgresUrlSecretRef`; Tenant `spec.apiKeys[].secretRef`
/// (none: the generated `<tenant>-api-key`), `spec.upstreamKeys[].secretRef`;
/// ModelRoute `spec.backends[].apiKeySecretRef`.
fn named_secrets(ns: &str) -> BTreeSet<String> {
    let docs = APPLIED
        .lock()
        .map(|a| a.get(ns).cloned().unwrap_or_default())
        .unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut add = |v: &serde_json::Value| {
        if let Some(name) = v.as_str() {
            names.insert(name.to_string());
        }
    };
    for doc in &docs {
        let spec = &doc["spec"];
        match doc["kind"].as_str().unwrap_or_default() {
            "Chatbot" => {
                add(&spec["redis"]["urlSecretRef"]["name"]);
                add(&spec["usage"]["postgresUrlSecretRef"]["name"]);
            }
            "Tenant" => {
                let keys = spec["apiKeys"].as_array().cloned().unwrap_or_default();
                if keys.is_empty() {
                    let tenant = doc["metadata"]["name"].as_str().unwrap_or_default();
                    add(&format!("{tenant}-api-key").into());
                }
                for key in keys {
                    add(&key["secretRef"]["name"]);
                }
                for key in spec["upstreamKeys"].as_array().into_iter().flatten() {
                    add(&key["secretRef"]["name"]);
                }
            }
            "ModelRoute" => {
                for backend in spec["backends"].as_array().into_iter().flatten() {
                    add(&backend["apiKeySecretRef"]["name"]);
                }
            }
            _ => {}
        }
    }
    names
}

/// One HTTP request of the operator's client.
#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    uri: String,
    accept: String,
}

/// Records every request of a client (a tower layer in front of kube's stack).
#[derive(Clone, Default)]
struct Requests(Arc<std::sync::Mutex<Vec<Recorded>>>);

impl Requests {
    fn client(&self, config: kube::Config) -> anyhow::Result<Client> {
        let log = Arc::clone(&self.0);
        let layer =
            tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
                let recorded = Recorded {
                    method: request.method().to_string(),
                    uri: request.uri().to_string(),
                    accept: request
                        .headers()
                        .get(http::header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string(),
                };
                if let Ok(mut log) = log.lock() {
                    log.push(recorded);
                }
                request
            });
        Ok(kube::client::ClientBuilder::try_from(config)?
            .with_layer(&layer)
            .build())
    }

    fn all(&self) -> Vec<Recorded> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// What the operator did with Secrets in one test.
#[derive(Debug, Default)]
struct SecretUse {
    /// Verbs of its Secret requests, from the audit log (empty on an external cluster).
    verbs: BTreeSet<String>,
    /// The Secrets it got.
    got: BTreeSet<String>,
    /// Lists and watches of Secrets it sent (from its client).
    lists: usize,
    watches: usize,
}

/// Whether `path` (no query) is a collection of Secrets (a list or watch, not one Secret).
fn is_secret_collection(path: &str) -> bool {
    path == "/api/v1/secrets"
        || path
            .strip_prefix("/api/v1/namespaces/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(_, tail)| tail == "secrets")
}

/// Checks what the operator (the test's ServiceAccount) did with Secrets; see the module
/// documentation. The audit log half runs only on the local control plane.
async fn check_secret_use(cluster: &TestCluster, requests: &Requests) -> anyhow::Result<SecretUse> {
    let ns = &cluster.namespace;
    let mut used = SecretUse::default();
    let mut problems = Vec::new();
    for r in requests.all() {
        let (path, query) = r.uri.split_once('?').unwrap_or((r.uri.as_str(), ""));
        if r.method != "GET" || !is_secret_collection(path) {
            continue;
        }
        let watch = query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1");
        let want = if watch {
            used.watches += 1;
            "as=PartialObjectMetadata;"
        } else {
            used.lists += 1;
            "as=PartialObjectMetadataList;"
        };
        if !r.accept.contains(want) {
            problems.push(format!(
                "{} of Secrets with data: GET {} (Accept: {:?})",
                if watch { "a watch" } else { "a list" },
                r.uri,
                r.accept
            ));
        }
    }
    if let Some(log) = cluster.audit_log() {
        // The last requests' events are written as their answers go out.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let user = format!("system:serviceaccount:{ns}:{SERVICE_ACCOUNT}");
        let events: Vec<_> = controlplane::read_audit_log(log)?
            .into_iter()
            .filter(|e| e.acting_user() == user)
            .collect();
        ensure!(
            !events.is_empty(),
            "the audit log {} has no request of {user}",
            log.display()
        );
        let named = named_secrets(ns);
        // Secret data travels base64-encoded.
        let unnamed_value_base64 =
            serde_json::to_value(k8s_openapi::ByteString(UNNAMED_VALUE.as_bytes().to_vec()))?
                .as_str()
                .unwrap_or(UNNAMED_VALUE)
                .to_string();
        for e in &events {
            let probe = e
                .object_ref
                .as_ref()
                .is_some_and(|o| o.name.as_deref() == Some(POLICY_PROBE));
            if probe {
                continue; // wait_for_policy's, not the operator's
            }
            if e.code() == Some(403) {
                problems.push(format!("refused (403): {} {}", e.verb, e.request_uri));
            }
            if e.resource() != "secrets" {
                continue;
            }
            let object = e.object_ref.clone().unwrap_or_default();
            used.verbs.insert(e.verb.clone());
            if object.namespace.as_deref() != Some(ns.as_str()) {
                problems.push(format!(
                    "a Secret request outside the operator's namespace: {} {}",
                    e.verb, e.request_uri
                ));
            }
            if let Some(body) = &e.response_object
                && (body.to_string().contains(UNNAMED_VALUE)
                    || body.to_string().contains(&unnamed_value_base64))
            {
                problems.push(format!(
                    "the value of {UNNAMED_SECRET} was sent to the operator: {} {}",
                    e.verb, e.request_uri
                ));
            }
            match e.verb.as_str() {
                "list" if e.stage == "ResponseComplete" && e.code() == Some(200) => {
                    let kind = e
                        .response_object
                        .as_ref()
                        .and_then(|b| b["kind"].as_str())
                        .unwrap_or("(no response recorded)");
                    if kind != "PartialObjectMetadataList" {
                        problems.push(format!(
                            "a list of Secrets answered {kind}, not PartialObjectMetadataList: {}",
                            e.request_uri
                        ));
                    }
                }
                "get" => {
                    let name = object.name.clone().unwrap_or_default();
                    if !named.contains(&name) {
                        problems.push(format!(
                            "got Secret {name:?}, which no Chatbot, Tenant or ModelRoute names (named: {named:?})"
                        ));
                    }
                    used.got.insert(name);
                }
                _ => {}
            }
        }
    }
    ensure!(
        problems.is_empty(),
        "the operator's Secret requests:\n{}",
        problems.join("\n")
    );
    Ok(used)
}

/// What [`install_rbac`] made outside the test namespace (removed by [`Rbac::remove`]).
struct Rbac {
    /// The ClusterRoleBinding.
    binding: String,
    /// The ValidatingAdmissionPolicy and its binding (same name), on the local control
    /// plane.
    policy: Option<String>,
}

impl Rbac {
    async fn remove(self, admin: &Client) {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        let _ = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(admin.clone())
            .delete(&self.binding, &DeleteParams::default())
            .await;
        if let Some(name) = &self.policy {
            let _ = Api::<ValidatingAdmissionPolicyBinding>::all(admin.clone())
                .delete(name, &DeleteParams::default())
                .await;
            let _ = Api::<ValidatingAdmissionPolicy>::all(admin.clone())
                .delete(name, &DeleteParams::default())
                .await;
        }
    }
}

/// The ClusterRole from config/rbac, the ServiceAccount in the test namespace, and a
/// ClusterRoleBinding of the two; on the local control plane also the Secret write
/// policy of config/rbac/secret_write_policy.yaml, aimed at that ServiceAccount.
async fn install_rbac(cluster: &TestCluster) -> anyhow::Result<Rbac> {
    let ns = &cluster.namespace;
    apply_yaml(&cluster.client, ns, &read("config/rbac/role.yaml")).await?;
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "metadata": {"name": SERVICE_ACCOUNT, "namespace": ns}
    }))?;
    Api::<ServiceAccount>::namespaced(cluster.client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await?;
    // The committed binding, aimed at the test namespace's ServiceAccount.
    let mut binding = yaml_documents(&read("config/rbac/role_binding.yaml"))?
        .pop()
        .ok_or_else(|| anyhow!("empty role_binding.yaml"))?;
    let name = format!("parley-operator-{ns}");
    binding["metadata"]["name"] = name.clone().into();
    binding["subjects"][0]["namespace"] = ns.clone().into();
    apply_yaml(&cluster.client, ns, &serde_yaml::to_string(&binding)?).await?;
    let mut rbac = Rbac {
        binding: name,
        policy: None,
    };
    if !cluster.is_external() {
        let policy = format!("parley-operator-secret-writes-{ns}");
        let yaml = read("config/rbac/secret_write_policy.yaml")
            .replace(
                "system:serviceaccount:parley-system:parley-operator",
                &format!("system:serviceaccount:{ns}:{SERVICE_ACCOUNT}"),
            )
            .replace("parley-operator-secret-writes", &policy);
        rbac.policy = Some(policy);
        if let Err(e) = apply_yaml(&cluster.client, ns, &yaml).await {
            rbac.remove(&cluster.client).await;
            return Err(e.context("installing config/rbac/secret_write_policy.yaml"));
        }
    }
    Ok(rbac)
}

/// The Secret that [`wait_for_policy`] tries to write.
const POLICY_PROBE: &str = "policy-probe";

/// Waits until the Secret write policy is in force for the operator's ServiceAccount (it
/// takes the API server a moment), so that the test runs under it.
async fn wait_for_policy(cluster: &TestCluster) -> anyhow::Result<()> {
    let client = cluster
        .service_account_client(&cluster.namespace, SERVICE_ACCOUNT)
        .await?;
    let secrets = Api::<Secret>::namespaced(client, &cluster.namespace);
    let probe = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": POLICY_PROBE},
    });
    eventually("the Secret write policy to be in force", || async {
        match secrets
            .patch(
                POLICY_PROBE,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&probe),
            )
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("managed-by") => {
                Ok(Some(()))
            }
            Err(e) => Err(e.into()),
            Ok(_) => {
                // Made before the policy was in force: remove it and try again.
                let _ = secrets.delete(POLICY_PROBE, &DeleteParams::default()).await;
                Ok(None)
            }
        }
    })
    .await
}

/// RBAC takes a moment to see a new binding.
async fn wait_for_rbac(client: &Client, ns: &str) -> anyhow::Result<()> {
    eventually("the operator's RBAC to take effect", || async {
        Api::<Chatbot>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await?;
        Ok(Some(()))
    })
    .await
}

/// Polls `check` until it returns `Some`, for at most [`WAIT`]; the last error or "not
/// yet" is reported on timeout.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() > deadline {
            bail!("waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The controllers on a task of their own, stopped by [`Operator::stop`].
struct Operator {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
}

impl Operator {
    fn start(client: Client, ns: &str) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics = Arc::new(Metrics::new());
        let settings = Settings {
            gateway_image: IMAGE.into(),
            namespace: Some(ns.to_string()),
            instance: Some("e2e".into()),
        };
        let task = tokio::spawn(op::run_controllers(
            client,
            settings,
            Arc::clone(&metrics),
            async move {
                let _ = stopped.await;
            },
        ));
        Operator {
            stop,
            task,
            metrics,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("the controllers did not stop within 10 s")??;
        // Whatever happened, no reconcile was refused for want of a permission.
        ensure!(
            self.metrics.reconciles("Chatbot", "forbidden") == 0
                && self.metrics.reconciles("Tenant", "forbidden") == 0
                && self.metrics.reconciles("ModelRoute", "forbidden") == 0,
            "a reconcile was forbidden: config/rbac/role.yaml misses a verb\n{}",
            self.metrics.encode().unwrap_or_default()
        );
        Ok(())
    }
}

fn ready_condition(cb: &Chatbot) -> Option<(String, String, String)> {
    let status = cb.status.as_ref()?;
    status
        .common
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the Chatbot's status describes its current generation with Ready=`want`.
async fn chatbot_ready(api: &Api<Chatbot>, name: &str, want: &str) -> anyhow::Result<Chatbot> {
    eventually(&format!("Chatbot {name} Ready={want}"), || async {
        let cb = api.get(name).await?;
        let current = cb
            .status
            .as_ref()
            .and_then(|s| s.common.observed_generation)
            == cb.metadata.generation;
        Ok((current && ready_condition(&cb).is_some_and(|(s, _, _)| s == want)).then_some(cb))
    })
    .await
}

/// What `render` makes of the namespace's objects right now (the live Chatbot, so owner
/// references are included).
async fn render_live(client: &Client, ns: &str, name: &str) -> anyhow::Result<render::Rendered> {
    let chatbot = Api::<Chatbot>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let routes = Api::<ModelRoute>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let tenants = Api::<Tenant>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let secrets = op::secret_keys(
        client,
        ns,
        op::referenced_secrets(&chatbot, &routes, &tenants),
    )
    .await?;
    let input = RenderInput {
        chatbot: &chatbot,
        model_routes: &routes,
        tenants: &tenants,
        secrets: &secrets,
        default_image: IMAGE,
    };
    Ok(render::render(&input)?)
}

fn owned_by<K: Resource>(object: &K, uid: &str) -> bool {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

async fn secret_data(client: &Client, ns: &str, name: &str) -> anyhow::Result<Option<Secret>> {
    Ok(Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?)
}

#[tokio::test]
async fn samples_are_reconciled_owned_keyed_and_collected() -> anyhow::Result<()> {
    with_cluster(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let admin = cluster.client.clone();
        let operator = Operator::start(operator_client, &ns);
        apply(
            &admin,
            &ns,
            &samples(&[
                "00-secrets.yaml",
                "10-modelroutes.yaml",
                "20-tenants.yaml",
                "30-chatbot.yaml",
            ]),
        )
        .await?;
        let chatbots = Api::<Chatbot>::namespaced(admin.clone(), &ns);
        let cb = chatbot_ready(&chatbots, "support", "True").await?;
        let uid = cb.uid().ok_or_else(|| anyhow!("no uid"))?;
        let status = cb.status.clone().unwrap_or_default();
        assert_eq!(status.models, Some(3), "{status:?}");
        assert_eq!(status.tenants, Some(2), "{status:?}");
        assert_eq!(status.common.observed_generation, cb.metadata.generation);
        let (_, reason, _) = ready_condition(&cb).unwrap();
        assert_eq!(reason, "Rendered");

        // The six children, owned by the Chatbot.
        let name = "support-gateway";
        let d = Api::<Deployment>::namespaced(admin.clone(), &ns).get(name).await?;
        let s = Api::<Service>::namespaced(admin.clone(), &ns).get(name).await?;
        let c = Api::<ConfigMap>::namespaced(admin.clone(), &ns).get(name).await?;
        let a = Api::<ServiceAccount>::namespaced(admin.clone(), &ns).get(name).await?;
        let h = Api::<HorizontalPodAutoscaler>::namespaced(admin.clone(), &ns).get(name).await?;
        let p = Api::<PodDisruptionBudget>::namespaced(admin.clone(), &ns).get(name).await?;
        assert!(owned_by(&d, &uid) && owned_by(&s, &uid) && owned_by(&c, &uid));
        assert!(owned_by(&a, &uid) && owned_by(&h, &uid) && owned_by(&p, &uid));
        // Under the HPA the manifest sets no replicas: the default (or, on a cluster with an
        // HPA controller, the HPA's choice).
        assert!(d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) >= 1);
        assert!(!applies_replicas(&d, MANAGER));

        // The ConfigMap is exactly what render produces from the live objects.
        let expected = eventually("the ConfigMap to equal render's", || async {
            let rendered = render_live(&admin, &ns, "support").await?;
            let live = Api::<ConfigMap>::namespaced(admin.clone(), &ns).get(name).await?;
            Ok((live.data == rendered.config_map.data).then_some(rendered))
        })
        .await?;
        assert_eq!(
            chatbots.get("support").await?.status.unwrap().config_hash,
            Some(expected.config_hash.clone())
        );

        // Globex has no keys: its Secret is generated, owned by the Tenant.
        let tenants = Api::<Tenant>::namespaced(admin.clone(), &ns);
        let globex = tenants.get("globex").await?;
        let key_secret = eventually("Secret globex-api-key", || async {
            secret_data(&admin, &ns, "globex-api-key").await
        })
        .await?;
        assert!(owned_by(&key_secret, &globex.uid().unwrap()));
        let key = key_secret
            .data
            .as_ref()
            .and_then(|d| d.get("api-key"))
            .map(|b| String::from_utf8_lossy(&b.0).to_string())
            .ok_or_else(|| anyhow!("no api-key in globex-api-key"))?;
        assert!(key.starts_with("pk-") && key.len() >= 40, "{key}");
        let globex = eventually("Tenant globex status", || async {
            let t = tenants.get("globex").await?;
            Ok(t.status
                .as_ref()
                .is_some_and(|s| s.key_secret.as_deref() == Some("globex-api-key"))
                .then_some(t))
        })
        .await?;
        // Another reconcile (a spec change) never touches the key.
        tenants
            .patch(
                "globex",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"displayName": "Globex Inc"}})),
            )
            .await?;
        let generation = globex.metadata.generation.unwrap_or(0) + 1;
        eventually("Tenant globex to observe its new generation", || async {
            let t = tenants.get("globex").await?;
            Ok((t.status.and_then(|s| s.common.observed_generation) == Some(generation))
                .then_some(()))
        })
        .await?;
        let again = secret_data(&admin, &ns, "globex-api-key").await?.unwrap();
        assert_eq!(again.data, key_secret.data, "the generated key changed");
        assert_eq!(again.metadata.resource_version, key_secret.metadata.resource_version);

        // ModelRoutes get status too.
        let routes = Api::<ModelRoute>::namespaced(admin.clone(), &ns);
        let route = eventually("ModelRoute gpt-4o status", || async {
            let r = routes.get("gpt-4o").await?;
            Ok(r.status.clone().filter(|s| s.backends.is_some()).map(|_| r))
        })
        .await?;
        assert_eq!(route.status.unwrap().backends, Some(2));

        // No secret value anywhere the operator writes.
        let cm_text = serde_json::to_string(&Api::<ConfigMap>::namespaced(admin.clone(), &ns).get(name).await?)?;
        let cb_text = serde_json::to_string(&chatbots.get("support").await?)?;
        let mut values = sample_secret_values();
        values.push(key.clone());
        for value in &values {
            assert!(!cm_text.contains(value.as_str()), "the ConfigMap holds a secret value");
            assert!(!cb_text.contains(value.as_str()), "the Chatbot holds a secret value");
        }

        // A new ModelRoute is picked up; deleting it updates the ConfigMap again.
        apply(
            &admin,
            &ns,
            "apiVersion: parley.dev/v1alpha1\nkind: ModelRoute\nmetadata:\n  name: extra\n  labels: {parley.dev/chatbot: support}\nspec:\n  backends:\n  - {name: a, provider: openai, baseUrl: 'https://example.com/v1'}\n",
        )
        .await?;
        let models_of = |want: u32| {
            let chatbots = chatbots.clone();
            let cms = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
            async move {
                eventually(&format!("models={want}"), || async {
                    let cb = chatbots.get("support").await?;
                    let cm = cms.get(name).await?;
                    let config = cm.data.unwrap_or_default().remove("config.yaml").unwrap_or_default();
                    let has_extra = config.contains("name: extra");
                    let ok = cb.status.and_then(|s| s.models) == Some(want)
                        && has_extra == (want == 4);
                    Ok(ok.then_some(()))
                })
                .await
            }
        };
        models_of(4).await?;
        routes.delete("extra", &DeleteParams::default()).await?;
        models_of(3).await?;

        // Deleting the Chatbot: the garbage collector removes the children.
        chatbots.delete("support", &DeleteParams::background()).await?;
        eventually("the children to be garbage-collected", || async {
            let d = Api::<Deployment>::namespaced(admin.clone(), &ns).get_opt(name).await?;
            let c = Api::<ConfigMap>::namespaced(admin.clone(), &ns).get_opt(name).await?;
            let h = Api::<HorizontalPodAutoscaler>::namespaced(admin.clone(), &ns).get_opt(name).await?;
            let a = Api::<ServiceAccount>::namespaced(admin.clone(), &ns).get_opt(name).await?;
            Ok((d.is_none() && c.is_none() && h.is_none() && a.is_none()).then_some(()))
        })
        .await?;
        operator.stop().await?;
        Ok(cluster)
    })
    .await
}

const SCALER_FIXED: &str = "apiVersion: parley.dev/v1alpha1
kind: Chatbot
metadata: {name: scaler}
spec:
  defaultModel: gpt-4o
  gateway:
    replicas: 3
    podDisruptionBudget: {minAvailable: 1}
  redis: {urlSecretRef: {name: redis, key: url}}
";

const SCALER_AUTO: &str = "apiVersion: parley.dev/v1alpha1
kind: Chatbot
metadata: {name: scaler}
spec:
  defaultModel: gpt-4o
  gateway:
    autoscaling: {minReplicas: 3, maxReplicas: 6}
    podDisruptionBudget: {minAvailable: 1}
  redis: {urlSecretRef: {name: redis, key: url}}
";

const SCALER_ONE: &str = "apiVersion: parley.dev/v1alpha1
kind: Chatbot
metadata: {name: scaler}
spec:
  defaultModel: gpt-4o
  gateway:
    replicas: 1
  redis: {urlSecretRef: {name: redis, key: url}}
";

#[tokio::test]
async fn autoscaling_on_keeps_replicas_and_off_prunes_hpa_and_pdb() -> anyhow::Result<()> {
    with_cluster(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let admin = cluster.client.clone();
        let operator = Operator::start(operator_client, &ns);
        apply(
            &admin,
            &ns,
            &samples(&["00-secrets.yaml", "10-modelroutes.yaml", "20-tenants.yaml"]),
        )
        .await?;
        let chatbots = Api::<Chatbot>::namespaced(admin.clone(), &ns);
        let deployments = Api::<Deployment>::namespaced(admin.clone(), &ns);
        let hpas = Api::<HorizontalPodAutoscaler>::namespaced(admin.clone(), &ns);
        let pdbs = Api::<PodDisruptionBudget>::namespaced(admin.clone(), &ns);
        let name = "scaler-gateway";

        apply(&admin, &ns, SCALER_FIXED).await?;
        chatbot_ready(&chatbots, "scaler", "True").await?;
        let d = deployments.get(name).await?;
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));
        assert!(applies_replicas(&d, MANAGER));
        assert!(pdbs.get_opt(name).await?.is_some(), "PDB with 3 replicas");
        assert!(
            hpas.get_opt(name).await?.is_none(),
            "no HPA without autoscaling"
        );

        // Autoscaling on: the HPA appears and replicas stay at 3 (no reset to 1), owned
        // no longer by the operator's manifest but by the hand-over manager.
        apply(&admin, &ns, SCALER_AUTO).await?;
        eventually("the HPA", || async { Ok(hpas.get_opt(name).await?) }).await?;
        chatbot_ready(&chatbots, "scaler", "True").await?;
        let d = deployments.get(name).await?;
        assert_eq!(
            d.spec.as_ref().and_then(|s| s.replicas),
            Some(3),
            "replicas reset"
        );
        assert!(
            !applies_replicas(&d, MANAGER),
            "the operator still sets replicas"
        );
        if !cluster.is_external() {
            // No HPA controller runs here to take the field over from the hand-over manager.
            assert!(applies_replicas(&d, HANDOVER_MANAGER));
        }
        // A later reconcile (any change) keeps it so.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let d = deployments.get(name).await?;
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));

        // Back to one fixed replica: HPA and PDB are pruned.
        apply(&admin, &ns, SCALER_ONE).await?;
        eventually("HPA and PDB to be deleted", || async {
            Ok(
                (hpas.get_opt(name).await?.is_none() && pdbs.get_opt(name).await?.is_none())
                    .then_some(()),
            )
        })
        .await?;
        let d = deployments.get(name).await?;
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(1));
        operator.stop().await?;
        Ok(cluster)
    })
    .await
}

#[tokio::test]
async fn operator_only_errors_give_invalid_spec_and_an_event() -> anyhow::Result<()> {
    with_cluster(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let admin = cluster.client.clone();
        let operator = Operator::start(operator_client, &ns);
        apply(
            &admin,
            &ns,
            &samples(&["00-secrets.yaml", "10-modelroutes.yaml", "20-tenants.yaml"]),
        )
        .await?;
        apply(
            &admin,
            &ns,
            "apiVersion: parley.dev/v1alpha1\nkind: Chatbot\nmetadata: {name: broken}\nspec:\n  defaultModel: no-such-model\n",
        )
        .await?;
        let chatbots = Api::<Chatbot>::namespaced(admin.clone(), &ns);
        let cb = chatbot_ready(&chatbots, "broken", "False").await?;
        let (_, reason, message) = ready_condition(&cb).unwrap();
        assert_eq!(reason, "InvalidSpec");
        assert!(message.contains("spec.defaultModel"), "{message}");
        assert!(message.len() <= 1024);
        let events = Api::<Event>::namespaced(admin.clone(), &ns);
        let event = eventually("an InvalidSpec Event", || async {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("InvalidSpec")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
                }))
        })
        .await?;
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert!(event.note.unwrap_or_default().contains("spec.defaultModel"));
        assert!(
            Api::<Deployment>::namespaced(admin.clone(), &ns)
                .get_opt("broken-gateway")
                .await?
                .is_none(),
            "nothing is applied for a refused spec"
        );

        // Fixing the spec makes it Ready.
        apply(
            &admin,
            &ns,
            "apiVersion: parley.dev/v1alpha1\nkind: Chatbot\nmetadata: {name: broken}\nspec:\n  defaultModel: gpt-4o\n",
        )
        .await?;
        chatbot_ready(&chatbots, "broken", "True").await?;
        operator.stop().await?;
        Ok(cluster)
    })
    .await
}

#[tokio::test]
async fn failed_apply_gives_apply_failed_and_is_retried() -> anyhow::Result<()> {
    with_cluster(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let admin = cluster.client.clone();
        // A Deployment in the way whose selector (immutable) differs from the rendered one.
        apply(
            &admin,
            &ns,
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: blocked-gateway}\nspec:\n  selector: {matchLabels: {app: other}}\n  template:\n    metadata: {labels: {app: other}}\n    spec: {containers: [{name: c, image: busybox}]}\n",
        )
        .await?;
        let operator = Operator::start(operator_client, &ns);
        apply(
            &admin,
            &ns,
            &samples(&["00-secrets.yaml", "10-modelroutes.yaml", "20-tenants.yaml"]),
        )
        .await?;
        apply(
            &admin,
            &ns,
            "apiVersion: parley.dev/v1alpha1\nkind: Chatbot\nmetadata: {name: blocked}\nspec:\n  defaultModel: gpt-4o\n",
        )
        .await?;
        let chatbots = Api::<Chatbot>::namespaced(admin.clone(), &ns);
        let cb = chatbot_ready(&chatbots, "blocked", "False").await?;
        let (_, reason, message) = ready_condition(&cb).unwrap();
        assert_eq!(reason, "ApplyFailed");
        assert!(message.contains("Deployment"), "{message}");
        // Retried with backoff: the attempts are counted under a category, not a name.
        eventually("a second failed attempt", || async {
            Ok((operator.metrics.reconciles("Chatbot", "invalid") >= 2).then_some(()))
        })
        .await?;
        // Once the obstacle is gone, the retry succeeds.
        Api::<Deployment>::namespaced(admin.clone(), &ns)
            .delete("blocked-gateway", &DeleteParams::foreground())
            .await?;
        chatbot_ready(&chatbots, "blocked", "True").await?;
        operator.stop().await?;
        Ok(cluster)
    })
    .await
}

#[tokio::test]
async fn leader_election_takes_and_releases_the_lease() -> anyhow::Result<()> {
    with_cluster(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let metrics = Arc::new(Metrics::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (led_tx, led_rx) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let ns = ns.clone();
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                leader::run_as_leader(
                    operator_client,
                    &ns,
                    "e2e-replica",
                    metrics,
                    async move {
                        let _ = stop_rx.await;
                    },
                    move |stop| async move {
                        let _ = led_tx.send(());
                        stop.await;
                    },
                )
                .await
            })
        };
        tokio::time::timeout(Duration::from_secs(15), led_rx)
            .await
            .context("never became leader")??;
        let lease = Api::<Lease>::namespaced(cluster.client.clone(), &ns)
            .get(leader::LEASE_NAME)
            .await?;
        assert_eq!(
            lease.spec.and_then(|s| s.holder_identity).as_deref(),
            Some("e2e-replica")
        );
        assert!(metrics.encode()?.contains("parley_operator_leader 1"));
        let _ = stop_tx.send(());
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .context("did not stop")???;
        Ok(cluster)
    })
    .await
}

/// The checks of [`check_secret_use`] can fail: a client of the ServiceAccount that lists
/// and watches Secrets with their data and gets one that nothing names is caught, by its
/// own requests and by the audit log.
#[tokio::test]
async fn secret_checks_catch_full_lists_and_watches_and_unnamed_gets() -> anyhow::Result<()> {
    use kube::api::WatchParams;
    let Some(cluster) = TestCluster::start_or_skip().await? else {
        return Ok(());
    };
    let ns = cluster.namespace.clone();
    apply_crds(&cluster.client, &read("config/crd/parley-crds.yaml")).await?;
    let binding = install_rbac(&cluster).await?;
    apply(&cluster.client, &ns, &unnamed_secret()).await?;
    let requests = Requests::default();
    let client = requests.client(cluster.service_account_config(&ns, SERVICE_ACCOUNT).await?)?;
    wait_for_rbac(&client, &ns).await?;
    // What the operator never does.
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let listed = secrets.list(&ListParams::default()).await?;
    assert!(listed.items.iter().any(|s| s.name_any() == UNNAMED_SECRET));
    secrets.get(UNNAMED_SECRET).await?;
    // The server has answered (headers) when `watch` returns; the stream is not read.
    let watch = secrets
        .watch(&WatchParams::default().timeout(1), "0")
        .await?;
    drop(watch);
    let outcome = check_secret_use(&cluster, &requests).await;
    binding.remove(&cluster.client).await;
    let text = match outcome {
        Ok(used) => {
            bail!("the checks let a full list, a full watch and an unnamed get pass: {used:?}")
        }
        Err(e) => format!("{e:#}"),
    };
    for want in [
        "a list of Secrets with data",
        "a watch of Secrets with data",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    if cluster.audit_log().is_some() {
        for want in [
            "a list of Secrets answered SecretList".to_string(),
            format!("got Secret {UNNAMED_SECRET:?}"),
            format!("the value of {UNNAMED_SECRET} was sent"),
        ] {
            assert!(text.contains(&want), "{want:?} not in {text}");
        }
    }
    cluster.cleanup().await
}

/// config/rbac/secret_write_policy.yaml: the operator's ServiceAccount may create,
/// change and delete only Secrets labelled `app.kubernetes.io/managed-by:
/// parley-operator` (what RBAC cannot say); the operator tests above run under it, so it
/// does not get in the operator's way.
#[tokio::test]
async fn secret_write_policy_keeps_the_operator_to_its_own_secrets() -> anyhow::Result<()> {
    let Some(cluster) = TestCluster::start_or_skip().await? else {
        return Ok(());
    };
    if cluster.is_external() {
        eprintln!("SKIPPED: installs an admission policy; not into an external cluster");
        return cluster.cleanup().await;
    }
    let ns = cluster.namespace.clone();
    apply_crds(&cluster.client, &read("config/crd/parley-crds.yaml")).await?;
    let rbac = install_rbac(&cluster).await?;
    let result = async {
        apply(&cluster.client, &ns, &unnamed_secret()).await?;
        let client = cluster.service_account_client(&ns, SERVICE_ACCOUNT).await?;
        wait_for_rbac(&client, &ns).await?;
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
        let apply_params = PatchParams::apply(MANAGER).force();
        let secret = |name: &str, managed: bool| {
            let labels = if managed {
                serde_json::json!({"app.kubernetes.io/managed-by": MANAGER})
            } else {
                serde_json::json!({})
            };
            serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "labels": labels},
                "stringData": {"key": "v"},
            })
        };
        let refused = |r: Result<Secret, kube::Error>| match r {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("managed-by") => {
                Ok(Some(()))
            }
            Err(e) => Err(anyhow!("refused, but not by the policy: {e}")),
            Ok(_) => Ok(None),
        };
        wait_for_policy(&cluster).await?;
        // Not its own: no change, no label added, no delete.
        refused(
            secrets
                .patch(
                    UNNAMED_SECRET,
                    &apply_params,
                    &Patch::Apply(secret(UNNAMED_SECRET, false)),
                )
                .await,
        )?
        .context("a change of a Secret that is not the operator's was let through")?;
        refused(
            secrets
                .patch(
                    UNNAMED_SECRET,
                    &apply_params,
                    &Patch::Apply(secret(UNNAMED_SECRET, true)),
                )
                .await,
        )?
        .context("labelling a Secret that is not the operator's was let through")?;
        match secrets
            .delete(UNNAMED_SECRET, &DeleteParams::default())
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            other => bail!("deleting a Secret that is not the operator's: {other:?}"),
        }
        // Its own: created, changed, deleted; but it cannot give one away.
        secrets
            .patch("own", &apply_params, &Patch::Apply(secret("own", true)))
            .await
            .context("creating a labelled Secret")?;
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(secret("own-post", true))?,
            )
            .await
            .context("creating a labelled Secret with POST")?;
        refused(
            secrets
                .patch(
                    "own",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({
                        "metadata": {"labels": {"app.kubernetes.io/managed-by": "someone-else"}}
                    })),
                )
                .await,
        )?
        .context("taking the label off its own Secret was let through")?;
        secrets
            .delete("own", &DeleteParams::default())
            .await
            .context("deleting its own Secret")?;
        let admin_view = Api::<Secret>::namespaced(cluster.client.clone(), &ns);
        ensure!(admin_view.get_opt(UNNAMED_SECRET).await?.is_some());
        anyhow::Ok(())
    }
    .await;
    rbac.remove(&cluster.client).await;
    result?;
    cluster.cleanup().await
}

/// Every `(apiGroup, resource) -> verbs` a ClusterRole of `path` grants.
fn granted(path: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    let docs = yaml_documents(&read(path)).unwrap();
    let rules = docs[0]["rules"].as_array().unwrap();
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in rules {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                let verbs = rule["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string());
                granted
                    .entry((
                        group.as_str().unwrap().into(),
                        resource.as_str().unwrap().into(),
                    ))
                    .or_default()
                    .extend(verbs);
            }
        }
    }
    granted
}

/// The ClusterRole is exactly the minimum the operator's code calls for: each verb
/// below is one a code path uses (a verb more or less fails this test, and a verb less
/// than the code uses fails the tests above, which run as the ServiceAccount). Secrets:
/// the operator's use of each verb is checked against the audit log in every test, and
/// the Kong test shows each of them in use.
#[test]
fn rbac_grants_exactly_what_the_operator_uses() {
    let crud = ["list", "watch", "create", "patch", "delete"];
    let mut expected: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut grant = |group: &str, resource: &str, verbs: &[&str]| {
        expected
            .entry((group.into(), resource.into()))
            .or_default()
            .extend(verbs.iter().map(|v| v.to_string()));
    };
    for r in ["chatbots", "tenants", "modelroutes"] {
        // Watched by the controllers; listed in reconciles. Never read by name.
        grant("parley.dev", r, &["list", "watch"]);
        grant("parley.dev", &format!("{r}/status"), &["patch"]);
    }
    // Owner references with blockOwnerDeletion (OwnerReferencesPermissionEnforcement).
    grant("parley.dev", "chatbots/finalizers", &["update"]);
    grant("parley.dev", "tenants/finalizers", &["update"]);
    // Owned children: watched, applied (create when the apply makes them), pruned. A
    // Deployment is read before its replicas are handed to an HPA.
    grant("apps", "deployments", &crud);
    grant("apps", "deployments", &["get"]);
    for r in ["services", "configmaps", "serviceaccounts"] {
        grant("", r, &crud);
    }
    grant("autoscaling", "horizontalpodautoscalers", &crud);
    grant("policy", "poddisruptionbudgets", &crud);
    grant("networking.k8s.io", "ingresses", &crud);
    // Secrets: list/watch metadata only, get named ones, create the generated key and
    // Kong credentials, patch and delete Kong credentials. Never update.
    grant("", "secrets", &crud);
    grant("", "secrets", &["get"]);
    // Kong kinds are applied and pruned by label, never watched or read by name.
    for r in ["kongplugins", "kongconsumers"] {
        grant(
            "configuration.konghq.com",
            r,
            &["list", "create", "patch", "delete"],
        );
    }
    grant("events.k8s.io", "events", &["create", "patch"]);
    grant("coordination.k8s.io", "leases", &["get", "create", "patch"]);
    assert_eq!(granted("config/rbac/role.yaml"), expected);
}

/// Minimal stand-ins for Kong's CRDs (group configuration.konghq.com, schema-less), enough
/// for the API server to store what the operator applies.
const KONG_CRDS: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: kongplugins.configuration.konghq.com}
spec:
  group: configuration.konghq.com
  scope: Namespaced
  names: {kind: KongPlugin, plural: kongplugins, singular: kongplugin, listKind: KongPluginList}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: kongconsumers.configuration.konghq.com}
spec:
  group: configuration.konghq.com
  scope: Namespaced
  names: {kind: KongConsumer, plural: kongconsumers, singular: kongconsumer, listKind: KongConsumerList}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
";

fn kong_chatbot(kong: &str, annotation: &str) -> String {
    named_kong_chatbot("edge", kong, annotation)
}

fn named_kong_chatbot(name: &str, kong: &str, annotation: &str) -> String {
    format!(
        "apiVersion: parley.dev/v1alpha1
kind: Chatbot
metadata: {{name: {name}, annotations: {{e2e/touch: \"{annotation}\"}}}}
spec:
  tenantSelector: {{matchLabels: {{parley.dev/chatbot: support}}}}
  defaultModel: gpt-4o
{kong}"
    )
}

const KONG_FULL: &str = "  kong:
    host: chat.example.com
    tlsSecretName: chat-tls
    rateLimit: {minute: 60, limitBy: header}
    keyAuth: true
";
const KONG_NO_AUTH: &str = "  kong:
    host: chat.example.com
    rateLimit: {minute: 60}
";

fn kong_condition(cb: &Chatbot) -> Option<(String, String)> {
    cb.status
        .as_ref()?
        .common
        .conditions
        .iter()
        .find(|c| c.type_ == "KongReady")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn kong_ready(api: &Api<Chatbot>, want: (&str, &str)) -> anyhow::Result<Chatbot> {
    eventually(&format!("Chatbot edge KongReady={want:?}"), || async {
        let cb = api.get("edge").await?;
        let current = cb
            .status
            .as_ref()
            .and_then(|s| s.common.observed_generation)
            == cb.metadata.generation;
        let kong = kong_condition(&cb);
        if current
            && ready_condition(&cb).is_some_and(|(s, _, _)| s == "True")
            && kong
                .as_ref()
                .is_some_and(|(s, r)| s == want.0 && r == want.1)
        {
            return Ok(Some(cb));
        }
        // Reported on timeout.
        Err(anyhow!(
            "not yet: {:?}",
            cb.status.as_ref().map(|s| &s.common.conditions)
        ))
    })
    .await
}

fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.clone())
}

#[tokio::test]
async fn kong_objects_are_applied_with_credentials_or_reported_unavailable() -> anyhow::Result<()> {
    use k8s_openapi::api::networking::v1::Ingress;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::DynamicObject;
    use parley_operator::render::{KongConsumer, KongPlugin};

    let used = with_cluster_checked(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let admin = cluster.client.clone();
        let crds = Api::<CustomResourceDefinition>::all(admin.clone());
        let kong_installed = crds
            .get_opt("kongplugins.configuration.konghq.com")
            .await?
            .is_some();
        let operator = Operator::start(operator_client, &ns);
        apply(
            &admin,
            &ns,
            &samples(&["00-secrets.yaml", "10-modelroutes.yaml", "20-tenants.yaml"]),
        )
        .await?;
        let chatbots = Api::<Chatbot>::namespaced(admin.clone(), &ns);
        let ingresses = Api::<Ingress>::namespaced(admin.clone(), &ns);
        let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
        apply(&admin, &ns, &kong_chatbot(KONG_FULL, "1")).await?;

        if !kong_installed {
            // No Kong CRDs: KongReady=False/KongUnavailable, a Warning Event, and
            // everything else applied, the Ingress included. Ready stays True.
            kong_ready(&chatbots, ("False", "KongUnavailable")).await?;
            assert!(ingresses.get_opt("edge-gateway").await?.is_some());
            for present in [
                Api::<Deployment>::namespaced(admin.clone(), &ns)
                    .get_opt("edge-gateway")
                    .await?
                    .is_some(),
                Api::<Service>::namespaced(admin.clone(), &ns)
                    .get_opt("edge-gateway")
                    .await?
                    .is_some(),
                Api::<ConfigMap>::namespaced(admin.clone(), &ns)
                    .get_opt("edge-gateway")
                    .await?
                    .is_some(),
            ] {
                assert!(present, "the workload is applied without Kong");
            }
            let events = Api::<Event>::namespaced(admin.clone(), &ns);
            eventually("a KongUnavailable Event", || async {
                Ok(events.list(&ListParams::default()).await?.items.into_iter().find(|e| {
                    e.reason.as_deref() == Some("KongUnavailable")
                        && e.type_.as_deref() == Some("Warning")
                }))
            })
            .await?;
            if cluster.is_external() {
                // Never install stand-in CRDs into someone's real cluster.
                operator.stop().await?;
                return Ok(cluster);
            }
            apply_crds(&admin, KONG_CRDS).await?;
            // Any change reconciles again (the retry also comes on its own, later).
            apply(&admin, &ns, &kong_chatbot(KONG_FULL, "2")).await?;
        }

        let cb = kong_ready(&chatbots, ("True", "Applied")).await?;
        let cb_uid = cb.uid().unwrap();
        let plugins: Api<DynamicObject> =
            Api::namespaced_with(admin.clone(), &ns, &KongPlugin::api_resource());
        let consumers: Api<DynamicObject> =
            Api::namespaced_with(admin.clone(), &ns, &KongConsumer::api_resource());
        let rate = plugins.get("edge-rate-limiting").await?;
        assert!(owned_by(&rate, &cb_uid));
        assert_eq!(rate.data["plugin"], "rate-limiting");
        assert_eq!(rate.data["config"]["minute"], 60);
        assert_eq!(rate.data["config"]["header_name"], "Authorization");
        assert!(rate.data.get("spec").is_none());
        assert!(plugins.get_opt("edge-key-auth").await?.is_some());
        let ingress = ingresses.get("edge-gateway").await?;
        assert_eq!(
            ingress.metadata.annotations.as_ref().unwrap()["konghq.com/plugins"],
            "edge-rate-limiting,edge-key-auth"
        );

        // One consumer per Tenant, owned by it; credentials copy the Tenant keys.
        let tenants = Api::<Tenant>::namespaced(admin.clone(), &ns);
        for (tenant, source, key) in [("acme", "acme-key", "api-key"), ("globex", "globex-api-key", "api-key")] {
            let uid = tenants.get(tenant).await?.uid().unwrap();
            let consumer = eventually(&format!("KongConsumer {ns}-{tenant}"), || async {
                Ok(consumers.get_opt(&format!("{ns}-{tenant}")).await?)
            })
            .await?;
            assert!(owned_by(&consumer, &uid), "{tenant}'s consumer is owned by the Tenant");
            assert_eq!(consumer.data["username"], format!("{ns}-{tenant}"));
            let credential = format!("{tenant}-kong-key");
            assert_eq!(consumer.data["credentials"], serde_json::json!([credential]));
            let copy = eventually(&format!("Secret {credential}"), || async {
                let Some(source) = secrets.get_opt(source).await? else {
                    return Ok(None);
                };
                let Some(copy) = secrets.get_opt(&credential).await? else {
                    return Ok(None);
                };
                Ok((secret_value(&copy, "key") == secret_value(&source, key)
                    && secret_value(&copy, "key").is_some())
                .then_some(copy))
            })
            .await?;
            assert!(owned_by(&copy, &uid));
            assert_eq!(copy.labels()["konghq.com/credential"], "key-auth");
        }

        // A rotated Tenant key is copied again.
        apply(
            &admin,
            &ns,
            "apiVersion: v1\nkind: Secret\nmetadata: {name: acme-key}\nstringData: {api-key: rotated-acme-key-value}\n",
        )
        .await?;
        eventually("the rotated key in acme-kong-key", || async {
            let copy = secrets.get("acme-kong-key").await?;
            Ok((secret_value(&copy, "key").as_deref() == Some(&b"rotated-acme-key-value"[..]))
                .then_some(()))
        })
        .await?;

        // A second Chatbot with keyAuth selecting the same Tenants shares the consumers:
        // when the first turns keyAuth off, they stay.
        let shared = "  kong:\n    host: other.example.com\n    keyAuth: true\n";
        apply(&admin, &ns, &named_kong_chatbot("edge2", shared, "1")).await?;
        eventually("edge2 KongReady=True", || async {
            let cb = chatbots.get("edge2").await?;
            Ok(kong_condition(&cb)
                .is_some_and(|(s, _)| s == "True")
                .then_some(()))
        })
        .await?;
        apply(&admin, &ns, &kong_chatbot(KONG_NO_AUTH, "3")).await?;
        eventually("edge's key-auth plugin to be pruned", || async {
            Ok(plugins.get_opt("edge-key-auth").await?.is_none().then_some(()))
        })
        .await?;
        kong_ready(&chatbots, ("True", "Applied")).await?;
        for tenant in ["acme", "globex"] {
            assert!(
                consumers.get_opt(&format!("{ns}-{tenant}")).await?.is_some(),
                "{tenant}'s consumer is still wanted by edge2"
            );
            assert!(secrets.get_opt(&format!("{tenant}-kong-key")).await?.is_some());
        }

        // The last Chatbot with keyAuth turns it off: consumers and credentials are pruned.
        apply(&admin, &ns, &named_kong_chatbot("edge2", "", "2")).await?;
        eventually("key-auth objects to be pruned", || async {
            let gone = plugins.get_opt("edge2-key-auth").await?.is_none()
                && consumers.get_opt(&format!("{ns}-acme")).await?.is_none()
                && consumers.get_opt(&format!("{ns}-globex")).await?.is_none()
                && secrets.get_opt("acme-kong-key").await?.is_none()
                && secrets.get_opt("globex-kong-key").await?.is_none();
            Ok(gone.then_some(()))
        })
        .await?;
        assert!(plugins.get_opt("edge-rate-limiting").await?.is_some());
        assert!(secrets.get_opt("acme-key").await?.is_some(), "the Tenant's own key stays");
        assert!(secrets.get_opt("globex-api-key").await?.is_some());

        // kong removed: Ingress and plugins pruned, KongReady gone.
        apply(&admin, &ns, &kong_chatbot("", "4")).await?;
        eventually("the Kong objects to be pruned", || async {
            let cb = chatbots.get("edge").await?;
            let gone = ingresses.get_opt("edge-gateway").await?.is_none()
                && plugins.get_opt("edge-rate-limiting").await?.is_none()
                && kong_condition(&cb).is_none();
            Ok(gone.then_some(()))
        })
        .await?;

        // Deleting the last Chatbot with keyAuth deletes the consumers and credential
        // copies too (they belong to the Tenants, so the garbage collector would not).
        apply(&admin, &ns, &named_kong_chatbot("edge2", shared, "3")).await?;
        eventually("edge2's credential copies", || async {
            Ok(secrets.get_opt("globex-kong-key").await?.and(
                consumers.get_opt(&format!("{ns}-acme")).await?,
            ))
        })
        .await?;
        chatbots.delete("edge2", &DeleteParams::default()).await?;
        eventually("consumers and credentials of a deleted Chatbot to go", || async {
            let gone = consumers.get_opt(&format!("{ns}-acme")).await?.is_none()
                && consumers.get_opt(&format!("{ns}-globex")).await?.is_none()
                && secrets.get_opt("acme-kong-key").await?.is_none()
                && secrets.get_opt("globex-kong-key").await?.is_none();
            Ok(gone.then_some(()))
        })
        .await?;
        assert!(secrets.get_opt("acme-key").await?.is_some());
        operator.stop().await?;
        Ok(cluster)
    })
    .await?;
    // This test takes every path that touches Secrets: the operator used each verb the
    // ClusterRole grants on them (none is superfluous) and no other.
    let Some(used) = used.filter(|u| !u.verbs.is_empty()) else {
        return Ok(()); // skipped, or no audit log (external cluster)
    };
    let granted = granted("config/rbac/role.yaml")
        .remove(&(String::new(), "secrets".to_string()))
        .unwrap_or_default();
    assert_eq!(used.verbs, granted, "Secret verbs used vs granted");
    assert!(used.lists >= 1 && used.watches >= 1, "{used:?}");
    assert!(
        used.got.contains("acme-key") && used.got.contains("globex-api-key"),
        "{used:?}"
    );
    Ok(())
}

/// A small team of one Chatbot: a ModelRoute `<team>-model`, a Tenant with a given key and
/// one with a generated key, all labelled `team: <team>`, and Chatbot `<team>` selecting
/// them (one replica, no Redis). The key Secret `keys` is shared by every team.
fn team(team: &str) -> String {
    format!(
        "apiVersion: parley.dev/v1alpha1
kind: ModelRoute
metadata: {{name: {team}-model, labels: {{team: {team}}}}}
spec:
  backends:
  - {{name: a, provider: openai, baseUrl: 'https://example.com/v1', apiKeySecretRef: {{name: keys, key: llm}}}}
---
apiVersion: parley.dev/v1alpha1
kind: Tenant
metadata: {{name: {team}-given, labels: {{team: {team}}}}}
spec:
  apiKeys: [{{secretRef: {{name: keys, key: tenant}}}}]
---
apiVersion: parley.dev/v1alpha1
kind: Tenant
metadata: {{name: {team}-generated, labels: {{team: {team}}}}}
spec: {{}}
---
apiVersion: parley.dev/v1alpha1
kind: Chatbot
metadata: {{name: {team}}}
spec:
  defaultModel: {team}-model
  modelSelector: {{matchLabels: {{team: {team}}}}}
  tenantSelector: {{matchLabels: {{team: {team}}}}}
  gateway: {{replicas: 1}}
"
    )
}

const TEAM_KEYS: &str = "apiVersion: v1
kind: Secret
metadata: {name: keys}
stringData: {llm: llm-value, tenant: tenant-value}
";

/// The operator's requests from the audit log, in order (empty on an external cluster).
fn operator_events(cluster: &TestCluster) -> anyhow::Result<Vec<controlplane::AuditEvent>> {
    let Some(log) = cluster.audit_log() else {
        return Ok(Vec::new());
    };
    let user = format!(
        "system:serviceaccount:{}:{SERVICE_ACCOUNT}",
        cluster.namespace
    );
    Ok(controlplane::read_audit_log(log)?
        .into_iter()
        .filter(|e| e.acting_user() == user && e.stage == "ResponseComplete")
        .collect())
}

fn is_write(e: &controlplane::AuditEvent) -> bool {
    matches!(
        e.verb.as_str(),
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

fn describe(e: &controlplane::AuditEvent) -> String {
    format!("{} {} ({:?})", e.verb, e.request_uri, e.code())
}

/// Every reconcile so far, of any kind and result.
fn reconciles(metrics: &Metrics) -> u64 {
    let results = ["ok", "api", "conflict", "forbidden", "invalid", "transport"];
    ["Chatbot", "Tenant", "ModelRoute"]
        .iter()
        .flat_map(|kind| results.iter().map(move |r| metrics.reconciles(kind, r)))
        .sum()
}

/// Waits until no reconcile has started for `quiet` (the echoes of the last writes are
/// over); at most [`WAIT`].
async fn settled(metrics: &Metrics, quiet: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = reconciles(metrics);
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = reconciles(metrics);
        if now != last {
            last = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the operator kept reconciling for {WAIT:?} after everything was Ready"
        );
    }
}

/// Two Chatbots ("red" and "blue") with disjoint Tenants and ModelRoutes, the operator
/// started on them, both Ready and the operator idle.
async fn two_teams_at_rest(
    cluster: &TestCluster,
    operator_client: Client,
) -> anyhow::Result<Operator> {
    let ns = &cluster.namespace;
    apply(&cluster.client, ns, TEAM_KEYS).await?;
    apply(
        &cluster.client,
        ns,
        &format!("{}---\n{}", team("red"), team("blue")),
    )
    .await?;
    let operator = Operator::start(operator_client, ns);
    let chatbots = Api::<Chatbot>::namespaced(cluster.client.clone(), ns);
    for name in ["red", "blue"] {
        chatbot_ready(&chatbots, name, "True").await?;
    }
    settled(&operator.metrics, Duration::from_secs(2)).await?;
    Ok(operator)
}

/// Nothing changes: the operator makes no write at all and runs no reconcile (nothing
/// it watches changes, and its periodic re-check is far longer than the window), over a
/// window longer than any of its retries and Kong re-checks.
#[tokio::test]
async fn at_rest_the_operator_writes_nothing_and_reconciles_nothing() -> anyhow::Result<()> {
    /// Longer than the error backoff's first steps and than an echo of a write.
    const AT_REST: Duration = Duration::from_secs(20);
    with_cluster(|cluster, operator_client| async move {
        let operator = two_teams_at_rest(&cluster, operator_client).await?;
        let before = operator_events(&cluster)?.len();
        let reconciles_before = reconciles(&operator.metrics);
        tokio::time::sleep(AT_REST).await;
        // Give the last audit lines a moment to be written.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let events = operator_events(&cluster)?;
        let reconciles_after = reconciles(&operator.metrics);
        operator.stop().await?;
        if !cluster.is_external() {
            ensure!(before > 0, "the audit log has no request of the operator");
        }
        let writes: Vec<String> = events
            .iter()
            .skip(before)
            .filter(|e| is_write(e))
            .map(describe)
            .collect();
        ensure!(
            writes.is_empty(),
            "the operator wrote {} time(s) in {AT_REST:?} at rest:\n{}",
            writes.len(),
            writes.join("\n")
        );
        ensure!(
            reconciles_after == reconciles_before,
            "{} reconcile(s) at rest with nothing changed",
            reconciles_after - reconciles_before
        );
        Ok(cluster)
    })
    .await
}

/// Changing the ModelRoute of one Chatbot re-renders that Chatbot only: the other gets
/// no write at all (no apply, no status, no Event) and its ConfigMap keeps its
/// resourceVersion.
#[tokio::test]
async fn a_model_route_change_rerenders_only_the_chatbots_that_select_it() -> anyhow::Result<()> {
    with_cluster(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let operator = two_teams_at_rest(&cluster, operator_client).await?;
        let config_maps = Api::<ConfigMap>::namespaced(cluster.client.clone(), &ns);
        let blue_before = config_maps.get("blue-gateway").await?;
        let red_before = config_maps.get("red-gateway").await?;
        let before = operator_events(&cluster)?.len();
        let routes = Api::<ModelRoute>::namespaced(cluster.client.clone(), &ns);
        routes
            .patch(
                "red-model",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"maxOutputTokens": 1234}})),
            )
            .await?;
        eventually("red's config to carry the new maxOutputTokens", || async {
            let cm = config_maps.get("red-gateway").await?;
            let text = cm
                .data
                .as_ref()
                .and_then(|d| d.get("config.yaml"))
                .cloned()
                .unwrap_or_default();
            Ok(text.contains("1234").then_some(()))
        })
        .await?;
        settled(&operator.metrics, Duration::from_secs(2)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let events = operator_events(&cluster)?;
        operator.stop().await?;
        let blue_after = config_maps.get("blue-gateway").await?;
        ensure!(
            blue_after.metadata.resource_version == blue_before.metadata.resource_version,
            "blue's ConfigMap changed: {:?} -> {:?}",
            blue_before.metadata.resource_version,
            blue_after.metadata.resource_version
        );
        let red_after = config_maps.get("red-gateway").await?;
        ensure!(red_after.metadata.resource_version != red_before.metadata.resource_version);
        if cluster.is_external() {
            return Ok(cluster);
        }
        let about_blue = |e: &controlplane::AuditEvent| {
            e.object_ref
                .as_ref()
                .and_then(|o| o.name.as_deref())
                .is_some_and(|n| n == "blue" || n.starts_with("blue-") || n.starts_with("blue."))
                || e.request_uri.contains("/blue")
        };
        let writes: Vec<&controlplane::AuditEvent> =
            events.iter().skip(before).filter(|e| is_write(e)).collect();
        let to_blue: Vec<String> = writes
            .iter()
            .filter(|e| about_blue(e))
            .map(|e| describe(e))
            .collect();
        ensure!(
            to_blue.is_empty(),
            "the change to red's ModelRoute wrote to blue:\n{}",
            to_blue.join("\n")
        );
        // And the check can see a write: red's ConfigMap was applied.
        ensure!(
            writes.iter().any(|e| e.verb == "patch"
                && e.object_ref.as_ref().and_then(|o| o.name.as_deref()) == Some("red-gateway")
                && e.resource() == "configmaps"),
            "no apply of red's ConfigMap in the audit log: {:?}",
            writes.iter().map(|e| describe(e)).collect::<Vec<_>>()
        );
        // Blue was not even reconciled: no read of its inputs by name either.
        let blue_reads: Vec<String> = events
            .iter()
            .skip(before)
            .filter(|e| e.verb == "get" && about_blue(e))
            .map(describe)
            .collect();
        ensure!(blue_reads.is_empty(), "blue was re-read: {blue_reads:?}");
        Ok(cluster)
    })
    .await
}

/// A child that someone else edits or deletes is put back; a change the operator does not
/// own (a child's status written by another controller, another writer's annotation)
/// applies nothing.
#[tokio::test]
async fn children_changed_by_others_are_put_back_and_foreign_changes_apply_nothing()
-> anyhow::Result<()> {
    with_cluster(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let admin = cluster.client.clone();
        let operator = two_teams_at_rest(&cluster, operator_client).await?;
        let config_maps = Api::<ConfigMap>::namespaced(admin.clone(), &ns);
        let services = Api::<Service>::namespaced(admin.clone(), &ns);
        let rendered = config_maps.get("red-gateway").await?.data;
        ensure!(rendered.is_some(), "red's ConfigMap has no data");

        // Not the operator's: the Service's status (as another controller would write
        // it) and an annotation of another writer.
        let before = operator_events(&cluster)?.len();
        services
            .patch_status(
                "red-gateway",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "status": {"conditions": [{
                        "type": "example.com/Checked", "status": "True", "reason": "Checked",
                        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"
                    }]}
                })),
            )
            .await?;
        config_maps
            .patch(
                "red-gateway",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "metadata": {"annotations": {"example.com/note": "not the operator's"}}
                })),
            )
            .await?;
        let service = services.get("red-gateway").await?;
        ensure!(
            service
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| !c.is_empty()),
            "the Service status was not written"
        );
        // Long enough for both watch events to reach the operator and any apply to land.
        tokio::time::sleep(Duration::from_secs(3)).await;
        settled(&operator.metrics, Duration::from_secs(1)).await?;
        if !cluster.is_external() {
            let writes: Vec<String> = operator_events(&cluster)?
                .iter()
                .skip(before)
                .filter(|e| is_write(e))
                .map(describe)
                .collect();
            ensure!(
                writes.is_empty(),
                "changes the operator does not own made it write:\n{}",
                writes.join("\n")
            );
        }
        let annotated = config_maps.get("red-gateway").await?;
        ensure!(
            annotated.annotations().contains_key("example.com/note"),
            "the other writer's annotation is gone"
        );

        // The operator's: the ConfigMap's data edited, then the ConfigMap deleted.
        config_maps
            .patch(
                "red-gateway",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"data": {"config.yaml": "tampered: true\n"}})),
            )
            .await?;
        eventually("the edited ConfigMap to be put back", || async {
            let cm = config_maps.get("red-gateway").await?;
            Ok((cm.data == rendered).then_some(()))
        })
        .await?;
        config_maps
            .delete("red-gateway", &DeleteParams::default())
            .await?;
        eventually("the deleted ConfigMap to be applied again", || async {
            let cm = config_maps.get_opt("red-gateway").await?;
            Ok(cm
                .filter(|cm| {
                    cm.data == rendered && !cm.annotations().contains_key("example.com/note")
                })
                .map(|_| ()))
        })
        .await?;
        operator.stop().await?;
        Ok(cluster)
    })
    .await
}
