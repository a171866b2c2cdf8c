//! `make bench-scale` (through scripts/bench_scale.sh; not in CI): the operator with many
//! Chatbots in the test control plane (`e2e/controlplane`, a real kube-apiserver).
//!
//! Starts the control plane with its audit log (every request of a ServiceAccount), runs
//! `parley-operator run` (the release binary, leader election off) as ServiceAccount
//! `parley-system/parley-operator` bound to the ClusterRole of config/rbac, then creates
//! `--routes` ModelRoutes, `--tenants` Tenants and `--chatbots` Chatbots in one namespace
//! and measures: the time from the first create until every Chatbot is Ready (for its
//! current generation), the operator's peak RSS (VmHWM), the requests it made (audit
//! log), and then, over `--rest-seconds` with nothing changing, its writes, requests and
//! reconciles. Last, a change to one ModelRoute: how many Chatbots were re-applied.
//! Writes the same objects as YAML to `--write-dir` for the offline `render` measurement.
//!
//! Each Chatbot selects a few objects: ModelRoute `model-<i>` carries `mshard:
//! m<i mod 50>`, Tenant `tenant-<j>` `tshard: t<j mod 100>`, and Chatbot `bot-<k>` selects
//! `mshard: m<k mod 50>` (2 models of 100) and `tshard: t<k mod 100>` (10 tenants of
//! 1,000). Half the Tenants name a key Secret, half get a generated one.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use parley_crds::Chatbot;
use parley_e2e::controlplane::{self, ControlPlane, apply_crds, apply_yaml};

#[derive(Parser)]
struct Args {
    /// The operator binary (release build).
    #[arg(long, default_value = "target/release/parley-operator")]
    operator: PathBuf,
    #[arg(long, default_value_t = 1000)]
    chatbots: usize,
    #[arg(long, default_value_t = 1000)]
    tenants: usize,
    #[arg(long, default_value_t = 100)]
    routes: usize,
    /// The quiet window after everything is Ready.
    #[arg(long, default_value_t = 60)]
    rest_seconds: u64,
    /// Give up waiting for Ready after this long.
    #[arg(long, default_value_t = 300)]
    timeout_seconds: u64,
    /// Where to write the objects as YAML (for `parley-operator render -f`).
    #[arg(long)]
    write_dir: Option<PathBuf>,
    /// Where the operator serves its metrics.
    #[arg(long, default_value = "127.0.0.1:18481")]
    metrics_addr: String,
}

const NS: &str = "bench";
const OPERATOR_NS: &str = "parley-system";
const SA: &str = "parley-operator";

fn route(i: usize) -> String {
    format!(
        "apiVersion: parley.dev/v1alpha1
kind: ModelRoute
metadata: {{name: model-{i}, labels: {{mshard: m{}}}}}
spec:
  backends:
  - {{name: a, provider: openai, baseUrl: 'https://example.com/v1', apiKeySecretRef: {{name: keys, key: llm}}}}
  pricing: {{inputPerMillionTokens: '1.00', outputPerMillionTokens: '2.00'}}
",
        i % 50
    )
}

fn tenant(j: usize) -> String {
    let keys = if j.is_multiple_of(2) {
        "apiKeys: [{secretRef: {name: keys, key: tenant}}]"
    } else {
        ""
    };
    format!(
        "apiVersion: parley.dev/v1alpha1
kind: Tenant
metadata: {{name: tenant-{j}, labels: {{tshard: t{}}}}}
spec:
  rateLimit: {{requestsPerMinute: 600}}
  {keys}
",
        j % 100
    )
}

fn chatbot(k: usize) -> String {
    format!(
        "apiVersion: parley.dev/v1alpha1
kind: Chatbot
metadata: {{name: bot-{k}}}
spec:
  defaultModel: model-{m}
  modelSelector: {{matchLabels: {{mshard: m{m}}}}}
  tenantSelector: {{matchLabels: {{tshard: t{t}}}}}
  systemPrompt: You are bot {k}.
  gateway: {{replicas: 1}}
",
        m = k % 50,
        t = k % 100
    )
}

const KEYS: &str = "apiVersion: v1
kind: Secret
metadata: {name: keys}
stringData: {llm: llm-value, tenant: tenant-value}
";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// Kills the operator when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[derive(Default, Debug)]
struct Counts {
    total: usize,
    writes: usize,
    by_verb: BTreeMap<String, usize>,
}

fn operator_events(cp: &ControlPlane) -> anyhow::Result<Vec<controlplane::AuditEvent>> {
    let log = cp.audit_log().context("no audit log")?;
    let user = format!("system:serviceaccount:{OPERATOR_NS}:{SA}");
    Ok(controlplane::read_audit_log(log)?
        .into_iter()
        // Watches are audited when they start and when they end: count each once.
        .filter(|e| {
            e.acting_user() == user
                && if e.verb == "watch" {
                    e.stage == "ResponseStarted"
                } else {
                    e.stage == "ResponseComplete"
                }
        })
        .collect())
}

fn count(events: &[controlplane::AuditEvent]) -> Counts {
    let mut c = Counts::default();
    for e in events {
        c.total += 1;
        if matches!(
            e.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        ) {
            c.writes += 1;
        }
        *c.by_verb
            .entry(format!("{} {}", e.verb, e.resource()))
            .or_default() += 1;
    }
    c
}

/// The operator's metrics text (empty when it cannot be read).
async fn metrics_text(metrics_addr: &str) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(metrics_addr).await else {
        return String::new();
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {metrics_addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body).await;
    body
}

/// The counters of `metric` (`name{labels} value` lines), by their label text.
fn counters(text: &str, metric: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{metric}{{");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once(' ')?;
            let labels = labels.trim_end_matches('}').replace('"', "");
            Some((labels, value.parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// Reconciles of every kind, and of Chatbots alone.
async fn reconciles(metrics_addr: &str) -> (u64, u64) {
    let text = metrics_text(metrics_addr).await;
    let all = counters(&text, "parley_operator_reconciles_total");
    let chatbots = all
        .iter()
        .filter(|(labels, _)| labels.contains("kind=Chatbot"))
        .map(|(_, n)| n)
        .sum();
    (all.values().sum(), chatbots)
}

/// A kubeconfig like the admin's whose user is a bearer token of `parley-system/
/// parley-operator` (so the audit log sees the operator's requests).
async fn operator_kubeconfig(cp: &ControlPlane, client: &Client) -> anyhow::Result<PathBuf> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), OPERATOR_NS)
        .create_token_request(SA, &PostParams::default(), &request)
        .await?
        .status
        .map(|s| s.token)
        .context("TokenRequest without a token")?;
    let admin = std::fs::read_to_string(cp.kubeconfig())?;
    let mut config: serde_yaml::Value = serde_yaml::from_str(&admin)?;
    let users = config
        .get_mut("users")
        .and_then(|u| u.as_sequence_mut())
        .context("kubeconfig without users")?;
    for user in users {
        let mut map = serde_yaml::Mapping::new();
        map.insert("token".into(), token.clone().into());
        user["user"] = serde_yaml::Value::Mapping(map);
    }
    let path = cp.data_dir().join("operator.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config)?)?;
    Ok(path)
}

async fn create_all(client: &Client, docs: Vec<String>) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    let mut docs = docs.into_iter();
    let mut in_flight = 0;
    loop {
        while in_flight < 16 {
            let Some(doc) = docs.next() else { break };
            let client = client.clone();
            set.spawn(async move { apply_yaml(&client, NS, &doc).await.map(|_| ()) });
            in_flight += 1;
        }
        match set.join_next().await {
            None => return Ok(()),
            Some(result) => {
                result??;
                in_flight -= 1;
            }
        }
    }
}

fn ready(cb: &Chatbot) -> bool {
    let Some(status) = &cb.status else {
        return false;
    };
    status.common.observed_generation == cb.metadata.generation
        && status
            .common
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn write_dir(
    dir: &Path,
    routes: &[String],
    tenants: &[String],
    bots: &[String],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let join = |docs: &[String]| docs.join("---\n");
    std::fs::write(dir.join("00-secrets.yaml"), KEYS)?;
    std::fs::write(dir.join("10-modelroutes.yaml"), join(routes))?;
    std::fs::write(dir.join("20-tenants.yaml"), join(tenants))?;
    std::fs::write(dir.join("30-chatbots.yaml"), join(bots))?;
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let routes: Vec<String> = (0..args.routes).map(route).collect();
    let tenants: Vec<String> = (0..args.tenants).map(tenant).collect();
    let bots: Vec<String> = (0..args.chatbots).map(chatbot).collect();
    if let Some(dir) = &args.write_dir {
        write_dir(dir, &routes, &tenants, &bots)?;
    }
    let root = controlplane::repo_root();
    let bin = controlplane::ensure_binary()?;
    // The default Service range (a /24) holds fewer Services than a thousand Chatbots.
    let cp = ControlPlane::start_audited(&bin, &["--service-cidr=10.0.0.0/20"])?;
    let client = cp.client().await?;
    apply_crds(
        &client,
        &std::fs::read_to_string(root.join("config/crd/parley-crds.yaml"))?,
    )
    .await?;
    for ns in [OPERATOR_NS, NS] {
        let namespace: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
    }
    let sa: ServiceAccount = serde_json::from_value(
        serde_json::json!({"metadata": {"name": SA, "namespace": OPERATOR_NS}}),
    )?;
    Api::<ServiceAccount>::namespaced(client.clone(), OPERATOR_NS)
        .create(&PostParams::default(), &sa)
        .await?;
    apply_yaml(
        &client,
        OPERATOR_NS,
        &std::fs::read_to_string(root.join("config/rbac/role.yaml"))?,
    )
    .await?;
    apply_yaml(
        &client,
        OPERATOR_NS,
        &std::fs::read_to_string(root.join("config/rbac/role_binding.yaml"))?,
    )
    .await?;
    apply_yaml(&client, NS, KEYS).await?;
    let kubeconfig = operator_kubeconfig(&cp, &client).await?;
    let log = std::fs::File::create(cp.data_dir().join("operator.log"))?;
    let operator = Operator(
        Command::new(&args.operator)
            .args([
                "run",
                "--leader-election=false",
                "--metrics-addr",
                &args.metrics_addr,
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", args.operator.display()))?,
    );
    let pid = operator.0.id();
    // Wait until the operator serves its metrics (its caches are being filled).
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&args.metrics_addr)
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the operator did not serve metrics within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let events_before = operator_events(&cp)?.len();

    println!(
        "creating {} ModelRoutes, {} Tenants, {} Chatbots in namespace {NS}",
        args.routes, args.tenants, args.chatbots
    );
    let started = Instant::now();
    let cpu_start = cpu_seconds(pid).unwrap_or(0.0);
    let mut docs = routes.clone();
    docs.extend(tenants.clone());
    docs.extend(bots.clone());
    create_all(&client, docs).await?;
    let applied_in = started.elapsed();
    println!("created in {:.1} s", applied_in.as_secs_f64());
    let chatbots = Api::<Chatbot>::namespaced(client.clone(), NS);
    let all_ready_in = loop {
        // From the API server's watch cache, twice a second: a driver that read all
        // Chatbots from etcd four times a second took a good part of the API server.
        let list = chatbots.list(&ListParams::default().match_any()).await?;
        let n = list.items.iter().filter(|c| ready(c)).count();
        if n == args.chatbots {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(args.timeout_seconds) {
            bail!(
                "only {n} of {} Chatbots Ready after {} s",
                args.chatbots,
                args.timeout_seconds
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let cpu_ready = cpu_seconds(pid).unwrap_or(0.0) - cpu_start;
    println!(
        "all Ready {:.1} s after the first create",
        all_ready_in.as_secs_f64()
    );
    // The tail of the start: let the echoes of the last writes pass.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let start_events = operator_events(&cp)?;
    let start_counts = count(&start_events[events_before.min(start_events.len())..]);
    let (reconciles_start, chatbot_reconciles) = reconciles(&args.metrics_addr).await;
    let start_metrics = metrics_text(&args.metrics_addr).await;
    let reconciles_by_kind = counters(&start_metrics, "parley_operator_reconciles_total");
    let triggers = counters(&start_metrics, "parley_operator_triggers_total");
    // The Events the operator published, by the kind they are about and their reason.
    let mut event_reasons: BTreeMap<String, (usize, i32)> = BTreeMap::new();
    for e in Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await?
        .items
    {
        let kind = e.regarding.and_then(|r| r.kind).unwrap_or_default();
        let entry = event_reasons
            .entry(format!("{kind} {}", e.reason.unwrap_or_default()))
            .or_default();
        entry.0 += 1;
        entry.1 += e.series.map_or(1, |s| s.count);
    }

    println!("at rest for {} s ...", args.rest_seconds);
    let rest_from = start_events.len();
    let cpu_rest_start = cpu_seconds(pid).unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(args.rest_seconds)).await;
    let rest_events = operator_events(&cp)?;
    let rest_counts = count(&rest_events[rest_from.min(rest_events.len())..]);
    let (reconciles_rest, _) = reconciles(&args.metrics_addr).await;
    let cpu_rest = cpu_seconds(pid).unwrap_or(0.0) - cpu_rest_start;
    let rss_rest = proc_status_kib(pid, "VmRSS:").unwrap_or(0);

    // One ModelRoute changes: only the Chatbots that select it are re-applied.
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let versions = |list: Vec<ConfigMap>| -> BTreeMap<String, Option<String>> {
        list.into_iter()
            .map(|c| (c.name_any(), c.metadata.resource_version))
            .collect()
    };
    let before = versions(config_maps.list(&ListParams::default()).await?.items);
    let change_from = rest_events.len();
    let changed_at = Instant::now();
    Api::<parley_crds::ModelRoute>::namespaced(client.clone(), NS)
        .patch(
            "model-7",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"maxOutputTokens": 1234}})),
        )
        .await?;
    let selecting = (0..args.chatbots).filter(|k| k % 50 == 7).count();
    let rerendered = loop {
        let after = versions(config_maps.list(&ListParams::default()).await?.items);
        let changed: Vec<String> = after
            .iter()
            .filter(|(name, rv)| before.get(*name) != Some(rv))
            .map(|(name, _)| name.clone())
            .collect();
        if changed.len() >= selecting || changed_at.elapsed() > Duration::from_secs(30) {
            break changed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let change_latency = changed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = versions(config_maps.list(&ListParams::default()).await?.items);
    let changed_total = after
        .iter()
        .filter(|(name, rv)| before.get(*name) != Some(rv))
        .count();
    let change_events = operator_events(&cp)?;
    let change_counts = count(&change_events[change_from.min(change_events.len())..]);
    let config_patches = change_events[change_from.min(change_events.len())..]
        .iter()
        .filter(|e| e.verb == "patch" && e.resource() == "configmaps")
        .count();
    let wrong: Vec<&String> = rerendered
        .iter()
        .filter(|n| {
            n.strip_prefix("bot-")
                .and_then(|s| s.strip_suffix("-gateway"))
                .and_then(|k| k.parse::<usize>().ok())
                .is_none_or(|k| k % 50 != 7)
        })
        .collect();

    let peak = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    drop(operator);

    println!();
    println!("RESULTS");
    println!(
        "objects: {} ModelRoutes, {} Tenants, {} Chatbots (each selects 2 models, 10 tenants)",
        args.routes, args.tenants, args.chatbots
    );
    println!("create (16 in flight): {:.1} s", applied_in.as_secs_f64());
    println!(
        "all Chatbots Ready: {:.1} s after the first create",
        all_ready_in.as_secs_f64()
    );
    println!("operator CPU until Ready: {cpu_ready:.1} s");
    println!(
        "operator RSS: idle {:.1} MiB, at rest {:.1} MiB, peak (VmHWM) {:.1} MiB",
        idle_rss as f64 / 1024.0,
        rss_rest as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!(
        "operator API requests until Ready (+5 s): {} ({} writes)",
        start_counts.total, start_counts.writes
    );
    for (verb, n) in &start_counts.by_verb {
        println!("  {n:>7} {verb}");
    }
    let config_map_applies = start_counts
        .by_verb
        .get("patch configmaps")
        .copied()
        .unwrap_or(0);
    println!(
        "applies per Chatbot (ConfigMap patches / Chatbots): {:.2}",
        config_map_applies as f64 / args.chatbots.max(1) as f64
    );
    println!(
        "reconciles until Ready (+5 s): {} Chatbot reconciles, {:.2} per Chatbot",
        chatbot_reconciles,
        chatbot_reconciles as f64 / args.chatbots.max(1) as f64
    );
    for (labels, n) in &reconciles_by_kind {
        println!("  {n:>7} {labels}");
    }
    println!("reconciles asked for by watch events (several while one is queued run once):");
    for (labels, n) in &triggers {
        println!("  {n:>7} {labels}");
    }
    println!("Events in the namespace (objects, occurrences) by kind and reason:");
    for (reason, (objects, occurrences)) in &event_reasons {
        println!("  {objects:>7} {occurrences:>7} {reason}");
    }
    println!(
        "at rest {} s: {} requests, {} writes, {} reconciles, {cpu_rest:.2} s CPU",
        args.rest_seconds,
        rest_counts.total,
        rest_counts.writes,
        reconciles_rest.saturating_sub(reconciles_start)
    );
    for (verb, n) in &rest_counts.by_verb {
        println!("  {n:>7} {verb}");
    }
    println!(
        "one ModelRoute changed (selected by {selecting} Chatbots): {} ConfigMaps re-applied in {:.1} s ({} in total after 5 s more), {} ConfigMap patches, {} requests, {} writes, wrong ones: {:?}",
        rerendered.len(),
        change_latency.as_secs_f64(),
        changed_total,
        config_patches,
        change_counts.total,
        change_counts.writes,
        wrong
    );
    if rest_counts.writes > 0 {
        bail!("{} writes at rest", rest_counts.writes);
    }
    Ok(())
}
