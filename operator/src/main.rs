//! `parley-operator`: runs the controllers, prints the CRDs and renders Chatbots offline.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kube::ResourceExt;
use parley_operator::manifests::Manifests;
use parley_operator::render::{self, RenderInput, Severity};

/// The default gateway image, matching this build.
const DEFAULT_GATEWAY_IMAGE: &str = concat!(
    "ghcr.io/parley-dev/parley-gateway:",
    env!("CARGO_PKG_VERSION")
);

#[derive(Parser)]
#[command(
    name = "parley-operator",
    version,
    about = "Parley's Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (Chatbot, Tenant, ModelRoute) against the cluster.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Render Chatbots offline from YAML files: prints the objects the operator would apply.
    Render {
        /// Files or directories of YAML (Chatbots, Tenants, ModelRoutes, Secrets).
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Image used when a Chatbot names none.
        #[arg(long, env = "PARLEY_GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
        gateway_image: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image used when a Chatbot names none.
    #[arg(long, env = "PARLEY_GATEWAY_IMAGE", default_value = DEFAULT_GATEWAY_IMAGE)]
    gateway_image: String,
    /// Where to serve Prometheus metrics, /healthz and /readyz.
    #[arg(long, env = "PARLEY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PARLEY_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Only the holder of a Lease reconciles (on by default; `--leader-election=false`
    /// for a single replica run by hand).
    #[arg(long, env = "PARLEY_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    leader_election: bool,
    /// Namespace of the leader Lease (default: the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Crds => print_crds(),
        Command::Render {
            files,
            gateway_image,
        } => render_files(&files, &gateway_image),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// How long `run` may take to exit after SIGTERM or SIGINT, whatever it is doing
/// (reconciles in flight, releasing the Lease, an API server that does not answer).
const STOP_DEADLINE: Duration = Duration::from_secs(4);

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(run_async(args));
    // Tasks still running (a watch, a request to an API server that does not answer)
    // must not hold the exit.
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn run_async(args: RunArgs) -> anyhow::Result<ExitCode> {
    use parley_operator::controller::connect::{self, Reached};
    use parley_operator::controller::{self, Settings, leader, metrics};

    // Signals first, so that a stop works in every state below: the first SIGTERM or
    // SIGINT stops gracefully (bounded by STOP_DEADLINE), a second one exits at once.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        shutdown_signal().await;
        tracing::warn!("second stop signal: exiting now");
        std::process::exit(130);
    });

    // Configuration errors first: they need no API server.
    let leader_namespace = if args.leader_election {
        Some(match args.leader_election_namespace {
            Some(ns) => ns,
            None => {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .map(|s| s.trim().to_string())
                    .context(
                        "--leader-election needs --leader-election-namespace or POD_NAMESPACE \
                 (or an in-cluster ServiceAccount namespace)",
                    )?
            }
        })
    } else {
        None
    };
    let config = kube::Config::infer()
        .await
        .context("loading the Kubernetes client configuration (in-cluster, or KUBECONFIG)")?;
    let api_server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .with_context(|| format!("creating a client for the Kubernetes API at {api_server}"))?;
    let identity = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| format!("parley-operator-{}", std::process::id()));
    let settings = Settings {
        gateway_image: args.gateway_image,
        namespace: args.namespace,
        instance: Some(identity.clone()),
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let listener = metrics::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding --metrics-addr {}", args.metrics_addr))?;
    tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz, /readyz");
    let server = tokio::spawn(metrics::serve(listener, Arc::clone(&metrics), stopped()));

    match connect::wait_for_api(&client, &api_server, stopped()).await {
        Reached::Stopped => {
            server.abort();
            return Ok(ExitCode::SUCCESS);
        }
        Reached::Connected(version) => {
            tracing::info!(server = %api_server, version, "connected to the Kubernetes API");
        }
    }

    let work = async {
        match leader_namespace {
            Some(namespace) => {
                // Standbys are ready (healthy, waiting); the leader once its controllers run.
                metrics.set_ready(true);
                let work_client = client.clone();
                let work_metrics = Arc::clone(&metrics);
                leader::run_as_leader(
                    client,
                    &namespace,
                    &identity,
                    Arc::clone(&metrics),
                    stopped(),
                    move |stop| {
                        controller::run_controllers(work_client, settings, work_metrics, stop)
                    },
                )
                .await
                .map_err(anyhow::Error::from)
            }
            None => {
                controller::run_controllers(client, settings, Arc::clone(&metrics), stopped())
                    .await;
                Ok(())
            }
        }
    };
    let outcome = connect::within_deadline_of_stop(work, stopped(), STOP_DEADLINE)
        .await
        .unwrap_or_else(|| {
            tracing::warn!(
                deadline_s = STOP_DEADLINE.as_secs(),
                "did not stop within the deadline after the stop signal; exiting anyway"
            );
            Ok(())
        });
    server.abort();
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "stopping");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn print_crds() -> anyhow::Result<ExitCode> {
    let yaml = parley_operator::crds_yaml().context("serialising the CRDs")?;
    std::io::stdout().lock().write_all(yaml.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn render_files(files: &[PathBuf], gateway_image: &str) -> anyhow::Result<ExitCode> {
    let manifests = Manifests::load(files)?;
    let mut errors = manifests.errors.len();
    for error in &manifests.errors {
        eprintln!("error: {error}");
    }
    for warning in &manifests.warnings {
        eprintln!("warning: {warning}");
    }
    if manifests.chatbots.is_empty() && errors == 0 {
        eprintln!("error: no Chatbot found in the given files; nothing to render");
        return Ok(ExitCode::FAILURE);
    }
    let mut chatbots: Vec<_> = manifests.chatbots.iter().collect();
    chatbots.sort_by_key(|c| (c.namespace(), c.name_any()));

    let no_secrets = Default::default();
    let mut out = std::io::stdout().lock();
    for chatbot in chatbots {
        let namespace = chatbot.namespace().unwrap_or_default();
        let input = RenderInput {
            chatbot,
            model_routes: &manifests.model_routes,
            tenants: &manifests.tenants,
            secrets: manifests.secrets.get(&namespace).unwrap_or(&no_secrets),
            default_image: gateway_image,
        };
        let (problems, rendered) = match render::render(&input) {
            Ok(rendered) => (rendered.warnings.clone(), Some(rendered)),
            Err(e) => (e.problems, None),
        };
        for problem in &problems {
            let file = manifests
                .origin(&problem.object)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            eprintln!("{file}: {problem}");
            if problem.severity == Severity::Error {
                errors += 1;
            }
        }
        if let Some(rendered) = rendered {
            writeln!(
                out,
                "# Chatbot {namespace}/{} (GatewayConfig sha256 {})",
                chatbot.name_any(),
                rendered.config_hash
            )?;
            let hidden: Vec<String> = rendered
                .kong_credentials
                .iter()
                .map(|c| format!("Secret/{namespace}/{}", c.name))
                .collect();
            if hidden.is_empty() {
                writeln!(
                    out,
                    "# Objects carrying secret values are not printed: none for this Chatbot."
                )?;
            } else {
                writeln!(
                    out,
                    "# Objects carrying secret values are not printed: {} (Kong credentials, copies of Tenant keys, written by the controller).",
                    hidden.join(", ")
                )?;
            }
            write!(out, "{}", rendered.to_yaml()?)?;
        }
    }
    if errors > 0 {
        eprintln!("{errors} error(s); nothing printed for the Chatbots that have errors");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
