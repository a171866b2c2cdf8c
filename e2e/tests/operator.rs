//! The operator's controllers against a real kube-apiserver (`e2e/controlplane`): each
//! test runs the controllers in-process, *as the operator's ServiceAccount* bound to the
//! ClusterRole of `config/rbac/role.yaml` (impersonation), so a verb missing from the
//! role fails the tests. Skips only when the control plane cannot be built (no Go).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::collections::BTreeMap;
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
use kube::config::{KubeConfigOptions, Kubeconfig};
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
/// client impersonating the operator's ServiceAccount. Bounded by [`TEST_TIMEOUT`].
async fn with_cluster<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: FnOnce(TestCluster, Client) -> Fut,
    Fut: Future<Output = anyhow::Result<TestCluster>>,
{
    let Some(cluster) = TestCluster::start_or_skip().await? else {
        return Ok(());
    };
    apply_crds(&cluster.client, &read("config/crd/parley-crds.yaml")).await?;
    let binding = install_rbac(&cluster).await?;
    let operator_client = impersonating_client(&cluster).await?;
    wait_for_rbac(&operator_client, &cluster.namespace).await?;
    let admin = cluster.client.clone();
    let result = tokio::time::timeout(TEST_TIMEOUT, body(cluster, operator_client)).await;
    let _ = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(admin)
        .delete(&binding, &DeleteParams::default())
        .await;
    match result {
        Err(_) => bail!("test did not finish within {TEST_TIMEOUT:?}"),
        Ok(Err(e)) => Err(e),
        Ok(Ok(cluster)) => cluster.cleanup().await,
    }
}

/// The ClusterRole from config/rbac, the ServiceAccount in the test namespace, and a
/// ClusterRoleBinding of the two; returns the binding's name.
async fn install_rbac(cluster: &TestCluster) -> anyhow::Result<String> {
    let ns = &cluster.namespace;
    apply_yaml(&cluster.client, ns, &read("config/rbac/role.yaml")).await?;
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "parley-operator", "namespace": ns}
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
    Ok(name)
}

async fn impersonating_client(cluster: &TestCluster) -> anyhow::Result<Client> {
    let mut config = match cluster.kubeconfig() {
        Some(path) => {
            kube::Config::from_custom_kubeconfig(
                Kubeconfig::read_from(path)?,
                &KubeConfigOptions::default(),
            )
            .await?
        }
        None => kube::Config::infer().await?,
    };
    let ns = &cluster.namespace;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:parley-operator"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ]);
    Ok(Client::try_from(config)?)
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
    let secrets = op::secret_keys(client, ns).await?;
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
        apply_yaml(
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
        apply_yaml(
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
        apply_yaml(
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

        apply_yaml(&admin, &ns, SCALER_FIXED).await?;
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
        apply_yaml(&admin, &ns, SCALER_AUTO).await?;
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
        apply_yaml(&admin, &ns, SCALER_ONE).await?;
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
        apply_yaml(
            &admin,
            &ns,
            &samples(&["00-secrets.yaml", "10-modelroutes.yaml", "20-tenants.yaml"]),
        )
        .await?;
        apply_yaml(
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
        apply_yaml(
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
        apply_yaml(
            &admin,
            &ns,
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: blocked-gateway}\nspec:\n  selector: {matchLabels: {app: other}}\n  template:\n    metadata: {labels: {app: other}}\n    spec: {containers: [{name: c, image: busybox}]}\n",
        )
        .await?;
        let operator = Operator::start(operator_client, &ns);
        apply_yaml(
            &admin,
            &ns,
            &samples(&["00-secrets.yaml", "10-modelroutes.yaml", "20-tenants.yaml"]),
        )
        .await?;
        apply_yaml(
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

#[test]
fn rbac_yaml_names_every_kind_the_operator_touches() {
    let docs = yaml_documents(&read("config/rbac/role.yaml")).unwrap();
    let rules = docs[0]["rules"].as_array().unwrap();
    let mut granted: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
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
    let need = |group: &str, resource: &str, verbs: &[&str]| {
        let have = granted
            .get(&(group.to_string(), resource.to_string()))
            .unwrap_or_else(|| panic!("no rule for {group}/{resource}"));
        for v in verbs {
            assert!(have.iter().any(|h| h == v), "{group}/{resource} lacks {v}");
        }
    };
    for (g, r) in [
        ("apps", "deployments"),
        ("", "services"),
        ("", "configmaps"),
        ("", "serviceaccounts"),
        ("autoscaling", "horizontalpodautoscalers"),
        ("policy", "poddisruptionbudgets"),
    ] {
        need(g, r, &["get", "list", "watch", "create", "patch", "delete"]);
    }
    need(
        "",
        "secrets",
        &["get", "list", "watch", "create", "patch", "delete"],
    );
    let secrets = &granted[&(String::new(), "secrets".to_string())];
    assert!(
        !secrets.iter().any(|v| v == "update"),
        "Secrets are only created, or applied (Kong credentials): never updated"
    );
    need(
        "networking.k8s.io",
        "ingresses",
        &["get", "list", "watch", "create", "patch", "delete"],
    );
    for r in ["kongplugins", "kongconsumers"] {
        need("configuration.konghq.com", r, &["list", "patch", "delete"]);
    }
    for r in ["chatbots", "tenants", "modelroutes"] {
        need("parley.dev", r, &["get", "list", "watch"]);
        need("parley.dev", &format!("{r}/status"), &["patch"]);
    }
    need("events.k8s.io", "events", &["create", "patch"]);
    need("coordination.k8s.io", "leases", &["get", "create", "patch"]);
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

    with_cluster(|cluster, operator_client| async move {
        let ns = cluster.namespace.clone();
        let admin = cluster.client.clone();
        let crds = Api::<CustomResourceDefinition>::all(admin.clone());
        let kong_installed = crds
            .get_opt("kongplugins.configuration.konghq.com")
            .await?
            .is_some();
        let operator = Operator::start(operator_client, &ns);
        apply_yaml(
            &admin,
            &ns,
            &samples(&["00-secrets.yaml", "10-modelroutes.yaml", "20-tenants.yaml"]),
        )
        .await?;
        let chatbots = Api::<Chatbot>::namespaced(admin.clone(), &ns);
        let ingresses = Api::<Ingress>::namespaced(admin.clone(), &ns);
        let secrets = Api::<Secret>::namespaced(admin.clone(), &ns);
        apply_yaml(&admin, &ns, &kong_chatbot(KONG_FULL, "1")).await?;

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
            apply_yaml(&admin, &ns, &kong_chatbot(KONG_FULL, "2")).await?;
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
        apply_yaml(
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
        apply_yaml(&admin, &ns, &named_kong_chatbot("edge2", shared, "1")).await?;
        eventually("edge2 KongReady=True", || async {
            let cb = chatbots.get("edge2").await?;
            Ok(kong_condition(&cb)
                .is_some_and(|(s, _)| s == "True")
                .then_some(()))
        })
        .await?;
        apply_yaml(&admin, &ns, &kong_chatbot(KONG_NO_AUTH, "3")).await?;
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
        apply_yaml(&admin, &ns, &named_kong_chatbot("edge2", "", "2")).await?;
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
        apply_yaml(&admin, &ns, &kong_chatbot("", "4")).await?;
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
        apply_yaml(&admin, &ns, &named_kong_chatbot("edge2", shared, "3")).await?;
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
    .await
}
