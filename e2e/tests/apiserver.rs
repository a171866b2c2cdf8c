//! Parley's CRDs, samples and CEL rules against a real kube-apiserver (`e2e/controlplane`),
//! or against the cluster `KUBECONFIG` points at with `PARLEY_TEST_EXTERNAL_CLUSTER=1`.
//!
//! The tests skip (print a line and pass) only when the control plane cannot be built
//! because Go is not installed; any other failure to start it fails them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use parley_e2e::controlplane::{
    self, CelRule, ControlPlane, TestCluster, Unavailable, apply_crds, apply_object, apply_yaml,
    cel_rules, error_code, error_message, yaml_documents,
};
use serde::Deserialize;

/// Upper bound of one test's body (the control plane's start is bounded on its own).
const TEST_TIMEOUT: Duration = Duration::from_secs(240);

fn root() -> PathBuf {
    controlplane::repo_root()
}

fn fixtures() -> PathBuf {
    root().join("e2e/tests/fixtures")
}

/// The `*.yaml` / `*.yml` files of a directory, sorted, with their text.
fn yaml_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

/// Parley's generated CRDs (config/crd), which must exist.
fn parley_crd_files() -> Vec<(PathBuf, String)> {
    let files = yaml_files(&root().join("config/crd"));
    assert!(
        !files.is_empty(),
        "config/crd has no *.yaml: generate it with `parley-operator crds > config/crd/parley-crds.yaml`"
    );
    files
}

/// Every CRD the tests install: Parley's and the tests' own fixtures.
fn all_crd_files() -> Vec<(PathBuf, String)> {
    let mut files = parley_crd_files();
    files.extend(yaml_files(&fixtures().join("crds")));
    files
}

fn sample_files() -> Vec<(PathBuf, String)> {
    let files = yaml_files(&root().join("config/samples"));
    assert!(!files.is_empty(), "config/samples has no *.yaml");
    let mut files = files;
    files.extend(yaml_files(&fixtures().join("samples")));
    files
}

async fn install_crds(cluster: &TestCluster) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    let mut crds = Vec::new();
    for (path, yaml) in all_crd_files() {
        crds.extend(
            apply_crds(&cluster.client, &yaml)
                .await
                .with_context(|| format!("installing {}", path.display()))?,
        );
    }
    Ok(crds)
}

async fn install_samples(cluster: &TestCluster) -> anyhow::Result<Vec<kube::api::DynamicObject>> {
    let mut applied = Vec::new();
    for (path, yaml) in sample_files() {
        applied.extend(
            apply_yaml(&cluster.client, &cluster.namespace, &yaml)
                .await
                .with_context(|| format!("applying {}", path.display()))?,
        );
    }
    Ok(applied)
}

/// Runs a test body on a fresh [`TestCluster`] under [`TEST_TIMEOUT`], then deletes the
/// test namespace. Returns without running it when the control plane is unavailable.
macro_rules! cluster_test {
    (|$cluster:ident| $body:block) => {{
        let Some($cluster) = TestCluster::start_or_skip().await? else {
            return Ok(());
        };
        let result: anyhow::Result<()> = tokio::time::timeout(TEST_TIMEOUT, async { $body })
            .await
            .unwrap_or_else(|_| Err(anyhow!("timed out after {TEST_TIMEOUT:?}")));
        $cluster.cleanup().await?;
        result
    }};
}

#[tokio::test]
async fn crds_are_established() -> anyhow::Result<()> {
    cluster_test!(|cluster| {
        let crds = install_crds(&cluster).await?;
        let mut parley_kinds = BTreeSet::new();
        for crd in &crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let status = crd.status.as_ref().context("no status")?;
            let conditions = status.conditions.clone().unwrap_or_default();
            for wanted in ["Established", "NamesAccepted"] {
                ensure!(
                    conditions
                        .iter()
                        .any(|c| c.type_ == wanted && c.status == "True"),
                    "{name}: condition {wanted} is not True: {conditions:?}"
                );
            }
            let accepted = status.accepted_names.as_ref().context("no acceptedNames")?;
            ensure!(
                accepted.kind == crd.spec.names.kind,
                "{name}: accepted kind {} != {}",
                accepted.kind,
                crd.spec.names.kind
            );
            if crd.spec.group == "parley.dev" {
                parley_kinds.insert(crd.spec.names.kind.clone());
            }
        }
        ensure!(
            !parley_kinds.is_empty(),
            "config/crd holds no CRD of group parley.dev"
        );
        eprintln!("established: {parley_kinds:?}");
        Ok(())
    })
}

#[tokio::test]
async fn samples_are_accepted() -> anyhow::Result<()> {
    cluster_test!(|cluster| {
        install_crds(&cluster).await?;
        let applied = install_samples(&cluster).await?;
        let mut kinds = BTreeMap::<String, usize>::new();
        for obj in &applied {
            let kind = obj
                .types
                .as_ref()
                .map(|t| t.kind.clone())
                .unwrap_or_default();
            ensure!(
                obj.metadata.uid.is_some(),
                "{kind} {:?} came back without a uid",
                obj.metadata.name
            );
            *kinds.entry(kind).or_default() += 1;
        }
        for kind in ["Chatbot", "Tenant", "ModelRoute"] {
            ensure!(
                kinds.contains_key(kind),
                "config/samples has no {kind}; applied: {kinds:?}"
            );
        }
        eprintln!("applied: {kinds:?}");
        Ok(())
    })
}

#[tokio::test]
async fn non_structural_crd_is_refused() -> anyhow::Result<()> {
    cluster_test!(|cluster| {
        let yaml = std::fs::read_to_string(fixtures().join("non-structural-crd.yaml"))?;
        let err = match apply_crds(&cluster.client, &yaml).await {
            Ok(_) => bail!("the API server accepted a CRD whose schema is not structural"),
            Err(e) => e,
        };
        let message = error_message(&err);
        ensure!(
            error_code(&err) == Some(422),
            "expected 422 Invalid, got {err:#}"
        );
        ensure!(
            message.contains("properties[spec].properties[anything].type: Required value"),
            "the refusal does not name the untyped field: {message}"
        );
        let crds = Api::<CustomResourceDefinition>::all(cluster.client.clone());
        ensure!(
            crds.get_opt("gadgets.e2e.parley.dev").await?.is_none(),
            "the refused CRD exists anyway"
        );
        Ok(())
    })
}

/// One entry of fixtures/cel-violations.yaml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CelCase {
    kind: String,
    rule: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    before: Option<serde_json::Value>,
    object: serde_json::Value,
}

#[tokio::test]
async fn cel_rules_are_enforced() -> anyhow::Result<()> {
    cluster_test!(|cluster| {
        let crds = install_crds(&cluster).await?;
        let mut rules: Vec<CelRule> = Vec::new();
        for crd in &crds {
            rules.extend(cel_rules(crd)?);
        }
        let fixture = fixtures().join("cel-violations.yaml");
        let cases: Vec<CelCase> = serde_yaml::from_str(&std::fs::read_to_string(&fixture)?)
            .with_context(|| format!("parsing {}", fixture.display()))?;

        let mut problems = Vec::new();
        for rule in &rules {
            if !cases
                .iter()
                .any(|c| c.kind == rule.kind && c.rule == rule.rule)
            {
                problems.push(format!(
                    "no case in {} breaks {} rule at {} ({}): {:?}",
                    fixture.display(),
                    rule.kind,
                    rule.path,
                    rule.version,
                    rule.rule
                ));
            }
        }
        let mut checked = 0;
        for (i, case) in cases.iter().enumerate() {
            let Some(rule) = rules
                .iter()
                .find(|r| r.kind == case.kind && r.rule == case.rule)
            else {
                problems.push(format!(
                    "case {i} ({}): no CRD of kind {} has the rule {:?}",
                    fixture.display(),
                    case.kind,
                    case.rule
                ));
                continue;
            };
            let Some(expected) = case.message.clone().or_else(|| rule.message.clone()) else {
                problems.push(format!(
                    "case {i}: the rule {:?} has no fixed message; give the case a `message`",
                    case.rule
                ));
                continue;
            };
            let name = case
                .object
                .pointer("/metadata/name")
                .and_then(|n| n.as_str())
                .unwrap_or("?");
            let what = format!("case {i} ({} {name}, rule {:?})", case.kind, case.rule);
            if let Some(before) = &case.before
                && let Err(e) = apply_object(&cluster.client, &cluster.namespace, before).await
            {
                problems.push(format!("{what}: its `before` object was refused: {e:#}"));
                continue;
            }
            match apply_object(&cluster.client, &cluster.namespace, &case.object).await {
                Ok(_) => problems.push(format!("{what}: accepted, expected a refusal")),
                Err(e) => {
                    let message = error_message(&e);
                    if error_code(&e) != Some(422) {
                        problems.push(format!("{what}: expected 422 Invalid, got {e:#}"));
                    } else if !message.contains(&expected) {
                        problems.push(format!(
                            "{what}: refused, but the message does not contain {expected:?}: {message}"
                        ));
                    } else {
                        checked += 1;
                    }
                }
            }
        }
        if !problems.is_empty() {
            bail!(
                "{} problem(s) with CEL rules:\n  {}",
                problems.len(),
                problems.join("\n  ")
            );
        }
        ensure!(checked > 0, "no CEL rule was checked");
        eprintln!("{} rules, {checked} violations refused", rules.len());
        Ok(())
    })
}

/// Runs kubectl; its stdout, or an error with its stderr.
fn kubectl(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<String> {
    let out = cluster
        .kubectl()
        .args(args)
        .output()
        .context("running kubectl (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn kubectl_shows_crds_and_printer_columns() -> anyhow::Result<()> {
    cluster_test!(|cluster| {
        let crds = install_crds(&cluster).await?;
        let applied = install_samples(&cluster).await?;
        let ns = cluster.namespace.clone();

        let listed = kubectl(&cluster, &["get", "crds"])?;
        for crd in &crds {
            let name = crd.metadata.name.as_deref().unwrap_or_default();
            ensure!(
                listed
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(name)),
                "`kubectl get crds` does not list {name}:\n{listed}"
            );
        }

        let sample_kinds: BTreeSet<String> = applied
            .iter()
            .filter_map(|o| o.types.as_ref().map(|t| t.kind.clone()))
            .collect();
        let mut checked = Vec::new();
        for crd in &crds {
            let names = &crd.spec.names;
            let Some(version) = crd.spec.versions.iter().find(|v| v.storage) else {
                continue;
            };
            let columns = version
                .additional_printer_columns
                .clone()
                .unwrap_or_default();
            if columns.is_empty() {
                continue;
            }
            if !sample_kinds.contains(&names.kind) {
                ensure!(
                    crd.spec.group != "parley.dev",
                    "no sample of {} in config/samples, so its printer columns go unchecked",
                    names.kind
                );
                continue;
            }
            for (wide, args) in [
                (false, vec!["get", names.plural.as_str(), "-n", ns.as_str()]),
                (
                    true,
                    vec![
                        "get",
                        names.plural.as_str(),
                        "-n",
                        ns.as_str(),
                        "-o",
                        "wide",
                    ],
                ),
            ] {
                let out = kubectl(&cluster, &args)?;
                let header = out.lines().next().unwrap_or_default();
                let titles = header_titles(header);
                ensure!(
                    titles.first().map(String::as_str) == Some("NAME"),
                    "kubectl {}: no header line:\n{out}",
                    args.join(" ")
                );
                for column in &columns {
                    let shown = wide || column.priority.unwrap_or(0) == 0;
                    let upper = column.name.to_uppercase();
                    ensure!(
                        titles.contains(&upper) == shown,
                        "kubectl {}: column {upper:?} {} in the header {header:?}",
                        args.join(" "),
                        if shown { "missing" } else { "unexpected" }
                    );
                }
            }
            for short in names.short_names.clone().unwrap_or_default() {
                kubectl(&cluster, &["get", &short, "-n", &ns])
                    .with_context(|| format!("short name {short} of {}", names.kind))?;
            }
            checked.push(names.kind.clone());
        }
        ensure!(
            checked.iter().any(|k| k == "Chatbot"),
            "the Chatbot printer columns were not checked (checked: {checked:?})"
        );
        eprintln!("printer columns checked for {checked:?}");
        Ok(())
    })
}

/// The column titles of a `kubectl get` header line: kubectl pads columns with at least
/// three spaces, while a title ("DEFAULT MODEL") has single spaces.
fn header_titles(header: &str) -> Vec<String> {
    header
        .split("  ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// The controllers that run with the API server: owner references are garbage
/// collected, and a Deployment gets its ReplicaSet.
#[tokio::test]
async fn garbage_collector_and_deployment_controller_run() -> anyhow::Result<()> {
    cluster_test!(|cluster| {
        let client = cluster.client.clone();
        let ns = cluster.namespace.as_str();
        install_crds(&cluster).await?;
        let owner = apply_object(
            &client,
            ns,
            &serde_json::json!({
                "apiVersion": "e2e.parley.dev/v1",
                "kind": "Widget",
                "metadata": {"name": "owner"},
                "spec": {"size": "large"},
            }),
        )
        .await?;
        let uid = owner.metadata.uid.clone().context("no uid")?;
        let configmaps = Api::<ConfigMap>::namespaced(client.clone(), ns);
        let child: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "owned",
                "ownerReferences": [{
                    "apiVersion": "e2e.parley.dev/v1", "kind": "Widget",
                    "name": "owner", "uid": uid, "controller": true,
                }],
            },
            "data": {"a": "b"},
        }))?;
        configmaps.create(&PostParams::default(), &child).await?;
        let (widgets, _) = controlplane::dynamic_api(
            &client,
            &kube::core::GroupVersionKind::gvk("e2e.parley.dev", "v1", "Widget"),
            ns,
        )
        .await?;
        widgets.delete("owner", &DeleteParams::background()).await?;
        wait_for(
            Duration::from_secs(60),
            "the owned ConfigMap to be collected",
            || {
                let configmaps = configmaps.clone();
                async move { Ok(configmaps.get_opt("owned").await?.is_none()) }
            },
        )
        .await?;

        let deployment: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "registry.invalid/web:1"}]},
                },
            },
        }))?;
        Api::<Deployment>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &deployment)
            .await?;
        let replicasets = Api::<ReplicaSet>::namespaced(client.clone(), ns);
        wait_for(
            Duration::from_secs(60),
            "the Deployment's ReplicaSet",
            || {
                let replicasets = replicasets.clone();
                async move {
                    Ok(!replicasets
                        .list(&ListParams::default())
                        .await?
                        .items
                        .is_empty())
                }
            },
        )
        .await?;
        Ok(())
    })
}

async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("waited {limit:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A control plane of its own stops on drop and leaves no process and no directory.
#[tokio::test]
async fn control_plane_stops_cleanly() -> anyhow::Result<()> {
    if controlplane::external_cluster_requested() {
        eprintln!("SKIPPED: runs a local control plane; not with an external cluster");
        return Ok(());
    }
    let started = tokio::task::spawn_blocking(ControlPlane::start).await?;
    let cp = match started {
        Ok(cp) => cp,
        Err(e) => match e.downcast_ref::<Unavailable>() {
            Some(u) => return controlplane::skip_or_fail(u),
            None => return Err(e),
        },
    };
    let pid = cp.pid().context("no pid")?;
    let dir = cp.data_dir().to_path_buf();
    let client = cp.client().await?;
    let version =
        tokio::time::timeout(Duration::from_secs(30), client.apiserver_version()).await??;
    ensure!(
        version.major == "1" && version.minor.trim_end_matches('+').parse::<u32>()? >= 34,
        "unexpected server version {version:?}"
    );
    drop(client);
    let stopped = tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        drop(cp);
        t.elapsed()
    })
    .await?;
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still runs"
    );
    ensure!(!dir.exists(), "{} is left behind", dir.display());
    eprintln!("stopped in {stopped:?}");
    Ok(())
}

#[test]
fn fixtures_parse() {
    let cases: Vec<CelCase> = serde_yaml::from_str(
        &std::fs::read_to_string(fixtures().join("cel-violations.yaml")).unwrap(),
    )
    .unwrap();
    assert!(!cases.is_empty());
    for (path, yaml) in all_crd_files().into_iter().chain(sample_files()) {
        let docs = yaml_documents(&yaml).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert!(!docs.is_empty(), "{} is empty", path.display());
    }
}

#[test]
fn header_titles_keep_multi_word_titles() {
    assert_eq!(
        header_titles("NAME      DEFAULT MODEL   READY REPLICAS   AGE"),
        ["NAME", "DEFAULT MODEL", "READY REPLICAS", "AGE"]
    );
}
