//! A real Kubernetes API server for tests.
//!
//! [`ControlPlane`] runs `parley-controlplane` (`e2e/controlplane`: kube-apiserver with an
//! embedded etcd and the garbage-collector, namespace, deployment and replicaset
//! controllers, built from the Go module proxy) and hands out [`kube::Client`]s.
//! [`TestCluster`] is what a test uses: a client and a fresh namespace, on the one control
//! plane shared by the whole test binary, or on the cluster `KUBECONFIG` points at when
//! `PARLEY_TEST_EXTERNAL_CLUSTER=1`.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use parley_e2e::controlplane::TestCluster;
//! let Some(cluster) = TestCluster::start_or_skip().await? else { return Ok(()) };
//! // ... use cluster.client and cluster.namespace ...
//! cluster.cleanup().await?;
//! # Ok(()) }
//! ```
//!
//! Auditing: a control plane started by [`ControlPlane::start`] (the shared one included)
//! writes an audit log (`DATA_DIR/audit.log`, see [`AUDIT_POLICY`], [`read_audit_log`])
//! of every request made by a ServiceAccount, so a test can check what a component that
//! runs as one (the operator, with a client from [`TestCluster::service_account_client`])
//! asked the API server for.
//!
//! Environment:
//! - `PARLEY_E2E_ALLOW_SKIP=1`: a test that cannot get a control plane (no Go, no binary)
//!   is skipped, saying why on stderr. Without it, that is a failure.
//! - `PARLEY_TEST_EXTERNAL_CLUSTER=1` with `KUBECONFIG`: use that cluster (its current context).
//! - `PARLEY_CONTROLPLANE_BIN`: use this binary instead of building
//!   `target/controlplane/parley-controlplane`.
//! - `PARLEY_CONTROLPLANE_KEEP=1`: keep the data directory (kubeconfig, `apiserver.log`)
//!   of a control plane after it stops.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};

/// How long a control plane may take to print `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a CustomResourceDefinition may take to become Established.
pub const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);
/// The field manager of everything these helpers apply.
pub const FIELD_MANAGER: &str = "parley-e2e";
/// Label on every test namespace, to find leftovers: `kubectl delete ns -l parley.dev/e2e`.
pub const TEST_NAMESPACE_LABEL: &str = "parley.dev/e2e";

/// The control plane cannot be had on this machine: Go is not installed and no binary was
/// built before. Tests skip on this error, and only on this one, and only when
/// [`skipping_allowed`].
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no control plane: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Whether a test may skip for want of a control plane: only when asked for with
/// `PARLEY_E2E_ALLOW_SKIP=1` (a silent pass would hide that nothing was tested).
pub fn skipping_allowed() -> bool {
    std::env::var("PARLEY_E2E_ALLOW_SKIP").is_ok_and(|v| v == "1")
}

/// What a test does when the control plane is [`Unavailable`]: `Ok(())` (after saying on
/// stderr that it skips, and why) when [`skipping_allowed`], otherwise an error that says
/// how to get one or how to skip.
pub fn skip_or_fail(why: &Unavailable) -> anyhow::Result<()> {
    if skipping_allowed() {
        eprintln!("SKIPPED (PARLEY_E2E_ALLOW_SKIP=1): {why}");
        return Ok(());
    }
    bail!(
        "{why}. This test needs a Kubernetes API server; set PARLEY_E2E_ALLOW_SKIP=1 to \
         skip it instead"
    )
}

/// The repository root (the parent of the `parley-e2e` crate).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where `make controlplane` puts the binary.
pub fn default_binary() -> PathBuf {
    repo_root().join("target/controlplane/parley-controlplane")
}

fn go_available() -> bool {
    Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Finds the control plane binary, building it with `make controlplane` when Go is
/// installed (make only rebuilds when the Go sources changed). Fails with
/// [`Unavailable`] when it neither exists nor can be built for want of Go.
pub fn ensure_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("PARLEY_CONTROLPLANE_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("PARLEY_CONTROLPLANE_BIN={} does not exist", bin.display());
        }
        return Ok(bin);
    }
    let bin = default_binary();
    if !go_available() {
        if bin.is_file() {
            return Ok(bin);
        }
        return Err(Unavailable(format!(
            "Go is not installed, so {} cannot be built (install Go 1.24+, or run the suite \
             against a cluster with KUBECONFIG and PARLEY_TEST_EXTERNAL_CLUSTER=1)",
            bin.display()
        ))
        .into());
    }
    let root = repo_root();
    let out = Command::new("make")
        .arg("-C")
        .arg(&root)
        .args(["-f", "e2e/controlplane/controlplane.mk", "controlplane"])
        .stdin(Stdio::null())
        .output()
        .context("running make -f e2e/controlplane/controlplane.mk controlplane")?;
    if !out.status.success() {
        bail!(
            "building the control plane failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !bin.is_file() {
        bail!(
            "make controlplane succeeded but {} is missing",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running `parley-controlplane` process. Dropping it stops the process (SIGTERM, then
/// SIGKILL after 15 s) and removes its data directory.
pub struct ControlPlane {
    child: Mutex<Option<Child>>,
    // Held open: the process exits when it reads end of file, so a test binary that dies
    // (or a shared control plane in a `static`, never dropped) leaves nothing behind.
    stdin: Mutex<Option<ChildStdin>>,
    data_dir: PathBuf,
    kubeconfig: PathBuf,
    stderr: Arc<Mutex<String>>,
    audit_log: Option<PathBuf>,
}

fn keep_data() -> bool {
    std::env::var("PARLEY_CONTROLPLANE_KEEP").is_ok_and(|v| v == "1")
}

impl ControlPlane {
    /// Builds (if needed) and starts a control plane of its own, in a new temporary
    /// directory, and waits until it is ready. Blocking; takes a few seconds.
    /// Its API server writes the audit log of [`AUDIT_POLICY`] ([`ControlPlane::audit_log`]).
    pub fn start() -> anyhow::Result<ControlPlane> {
        let bin = ensure_binary()?;
        Self::start_audited(&bin, &[])
    }

    /// Starts `bin` with extra flags (e.g. `--controllers=false`, or `--` followed by
    /// kube-apiserver flags). No audit log.
    pub fn start_with(bin: &Path, extra_args: &[&str]) -> anyhow::Result<ControlPlane> {
        Self::spawn(bin, extra_args, false)
    }

    /// Like [`ControlPlane::start_with`], and the API server writes an audit log of
    /// [`AUDIT_POLICY`] to `DATA_DIR/audit.log` (kube-apiserver's `--audit-policy-file`
    /// and `--audit-log-path`, passed after `--`).
    pub fn start_audited(bin: &Path, extra_args: &[&str]) -> anyhow::Result<ControlPlane> {
        Self::spawn(bin, extra_args, true)
    }

    fn spawn(bin: &Path, extra_args: &[&str], audit: bool) -> anyhow::Result<ControlPlane> {
        let data_dir = tempfile::Builder::new()
            .prefix("parley-controlplane-")
            .tempdir()
            .context("creating the control plane's data directory")?
            .keep();
        let mut cmd = Command::new(bin);
        cmd.arg("--data-dir")
            .arg(&data_dir)
            .args(["--exit-on-stdin-close", "--exit-with-parent"]);
        if !keep_data() {
            cmd.arg("--remove-data-dir");
        }
        cmd.args(extra_args);
        let audit_log = if audit {
            let policy = data_dir.join("audit-policy.yaml");
            std::fs::write(&policy, AUDIT_POLICY)
                .with_context(|| format!("writing {}", policy.display()))?;
            let log = data_dir.join("audit.log");
            if !extra_args.contains(&"--") {
                cmd.arg("--");
            }
            cmd.arg(format!("--audit-policy-file={}", policy.display()))
                .arg(format!("--audit-log-path={}", log.display()));
            Some(log)
        } else {
            None
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;

        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let (tx, rx) = mpsc::channel::<bool>();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut ready_sent = false;
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if !ready_sent && line.trim() == "ready" {
                        ready_sent = true;
                        let _ = tx.send(true);
                    }
                }
                if !ready_sent {
                    let _ = tx.send(false);
                }
            });
        }
        let stdin = child.stdin.take();
        let cp = ControlPlane {
            child: Mutex::new(Some(child)),
            stdin: Mutex::new(stdin),
            kubeconfig: data_dir.join("kubeconfig"),
            data_dir,
            stderr,
            audit_log,
        };
        let started = Instant::now();
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(true) => {
                if keep_data() {
                    eprintln!("control plane data directory: {}", cp.data_dir.display());
                }
                tracing::info!(
                    "control plane ready in {:?} ({})",
                    started.elapsed(),
                    cp.kubeconfig.display()
                );
                Ok(cp)
            }
            Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Exited: give its stderr reader a moment to finish.
                std::thread::sleep(Duration::from_millis(200));
                Err(anyhow!(
                    "the control plane exited before it was ready\n{}",
                    cp.diagnostics()
                ))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(anyhow!(
                "the control plane was not ready after {READY_TIMEOUT:?}\n{}",
                cp.diagnostics()
            )),
        }
    }

    /// The one control plane of this test binary, started on first use. It lives until
    /// the test binary exits (it notices its standard input closing).
    pub fn shared() -> anyhow::Result<&'static ControlPlane> {
        static SHARED: OnceLock<Result<ControlPlane, SharedError>> = OnceLock::new();
        match SHARED.get_or_init(|| {
            ControlPlane::start().map_err(|e| match e.downcast_ref::<Unavailable>() {
                Some(u) => SharedError::Unavailable(u.clone()),
                None => SharedError::Failed(format!("{e:#}")),
            })
        }) {
            Ok(cp) => Ok(cp),
            Err(SharedError::Unavailable(u)) => Err(u.clone().into()),
            Err(SharedError::Failed(msg)) => Err(anyhow!("{msg}")),
        }
    }

    /// The admin kubeconfig (user in group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The data directory: `kubeconfig`, `apiserver.log`, `pki/`, `etcd/`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The audit log (JSON lines), when started with one.
    pub fn audit_log(&self) -> Option<&Path> {
        self.audit_log.as_deref()
    }

    /// A new client for the admin user. Make one per tokio runtime (per test): a client
    /// is tied to the runtime it was first used on.
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_for_kubeconfig(&self.kubeconfig).await
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(Child::id))
    }

    fn diagnostics(&self) -> String {
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let log = std::fs::read_to_string(self.data_dir.join("apiserver.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- stderr ---\n{stderr}--- last lines of {}/apiserver.log ---\n{}",
            self.data_dir.display(),
            tail.join("\n")
        )
    }

    /// Stops the process: SIGTERM, then SIGKILL after 15 s. Idempotent.
    pub fn stop(&self) {
        if let Ok(mut stdin) = self.stdin.lock() {
            stdin.take();
        }
        let Ok(mut guard) = self.child.lock() else {
            return;
        };
        let Some(mut child) = guard.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        if !keep_data() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

enum SharedError {
    Unavailable(Unavailable),
    Failed(String),
}

/// A client from a kubeconfig file (its current context).
pub async fn client_for_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    Ok(Client::try_from(config)?)
}

/// Whether the tests should use the cluster `KUBECONFIG` points at.
pub fn external_cluster_requested() -> bool {
    std::env::var("PARLEY_TEST_EXTERNAL_CLUSTER").is_ok_and(|v| v == "1")
        && std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty())
}

#[derive(Clone)]
enum Target {
    Local {
        kubeconfig: PathBuf,
        audit_log: Option<PathBuf>,
    },
    External,
}

impl Target {
    async fn client(&self) -> anyhow::Result<Client> {
        match self {
            Target::Local { kubeconfig, .. } => client_for_kubeconfig(kubeconfig).await,
            Target::External => {
                let config = Config::from_kubeconfig(&KubeConfigOptions::default())
                    .await
                    .context("loading the kubeconfig KUBECONFIG names")?;
                Ok(Client::try_from(config)?)
            }
        }
    }
}

/// A cluster for one test: a client and a fresh namespace of its own, deleted by
/// [`TestCluster::cleanup`] (or, failing that, on drop).
pub struct TestCluster {
    /// Admin client.
    pub client: Client,
    /// The test's own namespace (`parley-e2e-...`).
    pub namespace: String,
    target: Target,
    cleaned: bool,
}

impl TestCluster {
    /// The shared local control plane (started on first use), or the external cluster
    /// when [`external_cluster_requested`]; and a new namespace.
    pub async fn start() -> anyhow::Result<TestCluster> {
        let target = if external_cluster_requested() {
            Target::External
        } else {
            let cp = tokio::task::spawn_blocking(ControlPlane::shared).await??;
            Target::Local {
                kubeconfig: cp.kubeconfig().to_path_buf(),
                audit_log: cp.audit_log().map(Path::to_path_buf),
            }
        };
        let client = target.client().await?;
        let namespace = unique_namespace_name();
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {TEST_NAMESPACE_LABEL: "true"}},
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {namespace}"))?;
        Ok(TestCluster {
            client,
            namespace,
            target,
            cleaned: false,
        })
    }

    /// Like [`TestCluster::start`], but when there is no control plane because Go is
    /// missing: `Ok(None)` if skipping was asked for (`PARLEY_E2E_ALLOW_SKIP=1`; the test
    /// should then return), an error otherwise. See [`skip_or_fail`].
    pub async fn start_or_skip() -> anyhow::Result<Option<TestCluster>> {
        match Self::start().await {
            Ok(c) => Ok(Some(c)),
            Err(e) => match e.downcast_ref::<Unavailable>() {
                Some(u) => skip_or_fail(u).map(|()| None),
                None => Err(e),
            },
        }
    }

    /// Whether this runs against an external cluster.
    pub fn is_external(&self) -> bool {
        matches!(self.target, Target::External)
    }

    /// The kubeconfig of the local control plane; `None` on an external cluster (use
    /// `KUBECONFIG`).
    pub fn kubeconfig(&self) -> Option<&Path> {
        match &self.target {
            Target::Local { kubeconfig, .. } => Some(kubeconfig),
            Target::External => None,
        }
    }

    /// A `kubectl` command aimed at this cluster (`$KUBECTL` or `kubectl` on the PATH).
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into()));
        if let Target::Local { kubeconfig, .. } = &self.target {
            cmd.arg("--kubeconfig").arg(kubeconfig);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// A new client for this cluster (for another runtime, or with other settings).
    pub async fn new_client(&self) -> anyhow::Result<Client> {
        self.target.client().await
    }

    /// The audit log of the local control plane (see [`AUDIT_POLICY`]); `None` on an
    /// external cluster.
    pub fn audit_log(&self) -> Option<&Path> {
        match &self.target {
            Target::Local { audit_log, .. } => audit_log.as_deref(),
            Target::External => None,
        }
    }

    /// The configuration of a client that authenticates as ServiceAccount
    /// `namespace/name` with a bearer token from the TokenRequest API (valid for an
    /// hour), as a pod running under that ServiceAccount would: the API server sees
    /// (and audits) the ServiceAccount itself, not an impersonating admin.
    pub async fn service_account_config(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Config> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let token = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?
            .status
            .map(|s| s.token)
            .ok_or_else(|| {
                anyhow!("the TokenRequest for {namespace}/{name} came back without a token")
            })?;
        let mut config = match &self.target {
            Target::Local { kubeconfig, .. } => {
                let file = Kubeconfig::read_from(kubeconfig)
                    .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
                Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
            }
            Target::External => Config::from_kubeconfig(&KubeConfigOptions::default()).await?,
        };
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.into()),
            ..kube::config::AuthInfo::default()
        };
        Ok(config)
    }

    /// A client that authenticates as ServiceAccount `namespace/name`; see
    /// [`TestCluster::service_account_config`].
    pub async fn service_account_client(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Client> {
        Ok(Client::try_from(
            self.service_account_config(namespace, name).await?,
        )?)
    }

    /// Deletes the test namespace (without waiting for it to be gone).
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        self.cleaned = true;
        delete_namespace(&self.client, &self.namespace).await
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        // A test that failed: delete its namespace from a runtime of our own, since a
        // client cannot outlive the runtime of the test that is unwinding.
        let target = self.target.clone();
        let namespace = self.namespace.clone();
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(20), async {
                    if let Ok(client) = target.client().await {
                        let _ = delete_namespace(&client, &namespace).await;
                    }
                })
                .await;
            });
        });
        let _ = handle.join();
    }
}

async fn delete_namespace(client: &Client, namespace: &str) -> anyhow::Result<()> {
    match Api::<Namespace>::all(client.clone())
        .delete(namespace, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting namespace {namespace}")),
    }
}

fn unique_namespace_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("parley-e2e-{:x}-{n}-{nanos:08x}", std::process::id())
}

/// The documents of a multi-document YAML stream, empty ones left out.
pub fn yaml_documents(yaml: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc).context("parsing YAML")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Server-side applies every CustomResourceDefinition of `yaml` (multi-document; any
/// other kind is an error) and waits until each is Established.
pub async fn apply_crds(
    client: &Client,
    yaml: &str,
) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for doc in yaml_documents(yaml)? {
        let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        if kind != "CustomResourceDefinition" {
            bail!("apply_crds: a {kind:?} is not a CustomResourceDefinition");
        }
        let crd: CustomResourceDefinition = serde_json::from_value(doc)?;
        let name = crd
            .metadata
            .name
            .clone()
            .ok_or_else(|| anyhow!("a CustomResourceDefinition without a name"))?;
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying CustomResourceDefinition {name}"))?;
        names.push(name);
    }
    let mut established = Vec::new();
    for name in names {
        let crd = tokio::time::timeout(
            ESTABLISH_TIMEOUT,
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| {
            anyhow!("CustomResourceDefinition {name} not Established after {ESTABLISH_TIMEOUT:?}")
        })?
        .with_context(|| format!("waiting for CustomResourceDefinition {name}"))?
        .ok_or_else(|| anyhow!("CustomResourceDefinition {name} disappeared"))?;
        established.push(crd);
    }
    Ok(established)
}

/// The group, version and kind of an object (`apiVersion` and `kind`).
pub fn gvk_of(obj: &serde_json::Value) -> anyhow::Result<GroupVersionKind> {
    let api_version = obj
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("object without apiVersion"))?;
    let kind = obj
        .get("kind")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("object without kind"))?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Ok(GroupVersionKind::gvk(group, version, kind))
}

/// The `Api` for an object's kind, resolved by discovery; namespaced kinds use
/// `namespace`. Retries for a few seconds while the kind is not (yet) served, as happens
/// right after its CRD became Established.
pub async fn dynamic_api(
    client: &Client,
    gvk: &GroupVersionKind,
    namespace: &str,
) -> anyhow::Result<(Api<DynamicObject>, bool)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let (resource, caps) = loop {
        match discovery::pinned_kind(client, gvk).await {
            Ok(found) => break found,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("discovery of {gvk:?}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("discovering {gvk:?}")),
        }
    };
    Ok(match caps.scope {
        Scope::Namespaced => (
            Api::namespaced_with(client.clone(), namespace, &resource),
            true,
        ),
        Scope::Cluster => (Api::all_with(client.clone(), &resource), false),
    })
}

/// Server-side applies one object (as field manager [`FIELD_MANAGER`]); a namespaced
/// object goes to `namespace`, whatever its own says. The error of a refused object is a
/// [`kube::Error`] (`err.downcast_ref::<kube::Error>()`).
pub async fn apply_object(
    client: &Client,
    namespace: &str,
    obj: &serde_json::Value,
) -> anyhow::Result<DynamicObject> {
    let gvk = gvk_of(obj)?;
    let (api, namespaced) = dynamic_api(client, &gvk, namespace).await?;
    let mut obj: DynamicObject = serde_json::from_value(obj.clone()).context("not an object")?;
    obj.metadata.namespace = namespaced.then(|| namespace.to_string());
    let name = obj
        .metadata
        .name
        .clone()
        .ok_or_else(|| anyhow!("a {} without metadata.name", gvk.kind))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match api.patch(&name, &params, &Patch::Apply(&obj)).await {
            // 404 on a just-created kind: its REST handler may lag the discovery document.
            Err(kube::Error::Api(s)) if s.code == 404 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e)),
            Ok(applied) => return Ok(applied),
        }
    }
}

/// Applies every document of a multi-document YAML stream, in order.
pub async fn apply_yaml(
    client: &Client,
    namespace: &str,
    yaml: &str,
) -> anyhow::Result<Vec<DynamicObject>> {
    let mut applied = Vec::new();
    for doc in yaml_documents(yaml)? {
        let what = format!(
            "{} {}",
            doc.get("kind").and_then(|k| k.as_str()).unwrap_or("?"),
            doc.pointer("/metadata/name")
                .and_then(|k| k.as_str())
                .unwrap_or("?")
        );
        applied.push(
            apply_object(client, namespace, &doc)
                .await
                .with_context(|| format!("applying {what}"))?,
        );
    }
    Ok(applied)
}

/// One `x-kubernetes-validations` entry of a CRD's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct CelRule {
    /// The CRD's `spec.names.kind`.
    pub kind: String,
    /// The version whose schema has it.
    pub version: String,
    /// Where in the schema, e.g. `.spec.gateway.autoscaling`.
    pub path: String,
    /// The CEL expression.
    pub rule: String,
    /// The message the API server reports, if a fixed one is set.
    pub message: Option<String>,
}

/// Every CEL rule (`x-kubernetes-validations`) in the schemas of a CRD's versions.
pub fn cel_rules(crd: &CustomResourceDefinition) -> anyhow::Result<Vec<CelRule>> {
    let mut rules = Vec::new();
    for version in &crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
        else {
            continue;
        };
        let schema = serde_json::to_value(schema)?;
        walk_schema(&schema, "", &mut |path, entry| {
            if let Some(rule) = entry.get("rule").and_then(|r| r.as_str()) {
                rules.push(CelRule {
                    kind: crd.spec.names.kind.clone(),
                    version: version.name.clone(),
                    path: if path.is_empty() {
                        ".".into()
                    } else {
                        path.into()
                    },
                    rule: rule.to_string(),
                    message: entry
                        .get("message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string),
                });
            }
        });
    }
    Ok(rules)
}

fn walk_schema(
    schema: &serde_json::Value,
    path: &str,
    found: &mut dyn FnMut(&str, &serde_json::Value),
) {
    if let Some(entries) = schema
        .get("x-kubernetes-validations")
        .and_then(|v| v.as_array())
    {
        for entry in entries {
            found(path, entry);
        }
    }
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        let props: BTreeMap<_, _> = props.iter().collect();
        for (name, sub) in props {
            walk_schema(sub, &format!("{path}.{name}"), found);
        }
    }
    if let Some(items) = schema.get("items") {
        walk_schema(items, &format!("{path}[*]"), found);
    }
    if let Some(additional) = schema.get("additionalProperties")
        && additional.is_object()
    {
        walk_schema(additional, &format!("{path}[*]"), found);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(list) = schema.get(key).and_then(|l| l.as_array()) {
            for sub in list {
                walk_schema(sub, path, found);
            }
        }
    }
    if let Some(not) = schema.get("not") {
        walk_schema(not, path, found);
    }
}

/// The message of an API error, or the error's text.
pub fn error_message(err: &anyhow::Error) -> String {
    match err.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(status)) => status.message.clone(),
        _ => format!("{err:#}"),
    }
}

/// The HTTP status code of an API error.
pub fn error_code(err: &anyhow::Error) -> Option<u16> {
    match err.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    }
}

/// The audit policy of [`ControlPlane::start`]: every request of a ServiceAccount (the
/// identity of a component under test, e.g. the operator) at level Metadata, which
/// records who, verb, resource, namespace, name and response code; and lists of Secrets
/// with their response (level RequestResponse), whose `kind` tells a metadata-only list
/// (`PartialObjectMetadataList`) from one that carries the Secrets' data. Nothing of the
/// admin user or of the control plane's own controllers is logged. Watches are streamed:
/// their events carry no response body.
///
/// The audit policy is evaluated for the authenticated user, before impersonation, so
/// requests that impersonate a ServiceAccount are not logged: authenticate as the
/// ServiceAccount ([`TestCluster::service_account_client`]).
pub const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
omitManagedFields: true
rules:
- level: None
  userGroups: [\"system:serviceaccounts:kube-system\"]
- level: RequestResponse
  userGroups: [\"system:serviceaccounts\"]
  verbs: [list]
  resources: [{group: \"\", resources: [secrets]}]
- level: Metadata
  userGroups: [\"system:serviceaccounts\"]
- level: None
";

/// One event of the audit log (the fields tests look at).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// `ResponseStarted` (watches) or `ResponseComplete`, `Panic`.
    #[serde(default)]
    pub stage: String,
    /// `get`, `list`, `watch`, `create`, `patch`, `update`, `delete`, ...
    #[serde(default)]
    pub verb: String,
    /// Path and query of the request.
    #[serde(default)]
    pub request_uri: String,
    /// Who authenticated.
    pub user: AuditUser,
    /// Whom they impersonated, if anyone.
    #[serde(default)]
    pub impersonated_user: Option<AuditUser>,
    /// What the request was about (absent for non-resource URLs such as `/version`).
    #[serde(default)]
    pub object_ref: Option<AuditObjectRef>,
    /// The answer's status.
    #[serde(default)]
    pub response_status: Option<AuditStatus>,
    /// The answer's body (level RequestResponse only).
    #[serde(default)]
    pub response_object: Option<serde_json::Value>,
}

/// A user of an [`AuditEvent`].
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct AuditUser {
    /// User name, e.g. `system:serviceaccount:ns:name`.
    #[serde(default)]
    pub username: String,
    /// Groups.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The object of an [`AuditEvent`].
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditObjectRef {
    /// Plural resource, e.g. `secrets`.
    #[serde(default)]
    pub resource: String,
    /// API group (empty for the core group).
    #[serde(default)]
    pub api_group: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name (absent for lists, watches and creates by POST).
    #[serde(default)]
    pub name: Option<String>,
    /// Subresource, e.g. `status`.
    #[serde(default)]
    pub subresource: Option<String>,
}

/// The response status of an [`AuditEvent`].
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct AuditStatus {
    /// HTTP status code.
    #[serde(default)]
    pub code: Option<u16>,
}

impl AuditEvent {
    /// The user the request acted as: the impersonated one, or who authenticated.
    pub fn acting_user(&self) -> &str {
        self.impersonated_user
            .as_ref()
            .map_or(self.user.username.as_str(), |u| u.username.as_str())
    }

    /// The HTTP status code of the answer, if it was recorded.
    pub fn code(&self) -> Option<u16> {
        self.response_status.as_ref().and_then(|s| s.code)
    }

    /// `resource` or `resource/subresource`.
    pub fn resource(&self) -> String {
        match &self.object_ref {
            None => String::new(),
            Some(o) => match o.subresource.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => format!("{}/{sub}", o.resource),
                None => o.resource.clone(),
            },
        }
    }
}

/// The events of an audit log. A last line still being written is left out.
pub fn read_audit_log(path: &Path) -> anyhow::Result<Vec<AuditEvent>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit log {}", path.display()))?;
    let mut events = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<AuditEvent>(line) {
            Ok(event) => events.push(event),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => bail!("{}: line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(events)
}
