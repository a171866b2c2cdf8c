//! `parley-gateway --config FILE` serves; `parley-gateway check --config FILE` validates.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

// Many small short-lived allocations per request: mimalloc is markedly faster than
// glibc malloc here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "parley-gateway", version, about = "Parley's LLM gateway")]
struct Cli {
    /// The GatewayConfig file.
    #[arg(long, global = true, env = "PARLEY_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the secret files: replaces the config's `secretsDir`. Relative
    /// `{file: ...}` secrets are read from here; a rendered config expects one file per
    /// Secret key, `DIR/<secret>/<key>`.
    #[arg(long, global = true, env = "PARLEY_SECRETS_DIR", value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// Log format [json when stderr is not a terminal].
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Seconds in-flight requests and streams may take after SIGTERM.
    #[arg(long, default_value_t = 30)]
    drain_seconds: u64,
    /// Seconds between config polls (the file watcher reacts at once; this backs it up).
    #[arg(long, default_value_t = 5)]
    poll_seconds: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the config and exit: 0 and a summary, or 1 and every problem.
    Check,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn init_logging(format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(config) = cli.config.clone() else {
        eprintln!("error: --config FILE is required");
        return ExitCode::from(2);
    };
    let options = match load_options(&cli) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Check) => {
            // Warnings the check collects are printed by it; anything else logged at warn
            // level (e.g. no CA certificates) still shows.
            let filter = tracing_subscriber::EnvFilter::new("warn");
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .without_time()
                .with_target(false)
                .init();
            check(&config, &options)
        }
        None => {
            init_logging(cli.log_format);
            match serve(config, &cli, &options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `--secrets-dir`, made absolute (a relative one means: from the working directory).
fn load_options(cli: &Cli) -> anyhow::Result<parley_gateway::LoadOptions> {
    let secrets_dir = match &cli.secrets_dir {
        Some(dir) if dir.is_absolute() => Some(dir.clone()),
        Some(dir) => Some(
            std::env::current_dir()
                .context("--secrets-dir: reading the working directory")?
                .join(dir),
        ),
        None => None,
    };
    if let Some(dir) = &secrets_dir
        && !dir.is_dir()
    {
        anyhow::bail!(
            "--secrets-dir {}: not a directory (it should hold one file per secret key, <secret>/<key>)",
            dir.display()
        );
    }
    Ok(parley_gateway::LoadOptions { secrets_dir })
}

fn check(path: &std::path::Path, options: &parley_gateway::LoadOptions) -> ExitCode {
    let report = match parley_gateway::check(path, options) {
        Ok(report) => report,
        Err(problems) => {
            eprintln!("{}: cannot check:", path.display());
            for p in problems {
                eprintln!("  - {p}");
            }
            return ExitCode::FAILURE;
        }
    };
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if !report.missing_secret_files.is_empty() {
        eprintln!(
            "note: {n} secret file{s} named by this config do{es} not exist under {base}. A \
             gateway pod has every Secret key the operator rendered mounted there as \
             <secret>/<key>; on this machine, write each key to DIR/<secret>/<key> and pass \
             --secrets-dir DIR (or set secretsDir in the config). A key whose file is missing \
             is unusable and the rest of the config works (without redis.url as with \
             Redis unreachable; without usage.postgresUrl no ledger rows).",
            n = report.missing_secret_files.len(),
            s = if report.missing_secret_files.len() == 1 {
                ""
            } else {
                "s"
            },
            es = if report.missing_secret_files.len() == 1 {
                "es"
            } else {
                ""
            },
            base = report.secrets_base.display(),
        );
    }
    match report.runtime {
        Some(rt) if report.problems.is_empty() => {
            let backends: usize = rt.models.values().map(|m| m.backends.len()).sum();
            let mut out = format!(
                "{}: valid: {} models, {} backends, {} tenants, {} API keys usable, default model {:?}, config hash {}",
                path.display(),
                rt.models.len(),
                backends,
                rt.tenants.len(),
                rt.keys.len(),
                rt.config.default_model,
                rt.hash
            );
            out.push('\n');
            let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "{}: invalid config ({} problem{}):",
                path.display(),
                report.problems.len(),
                if report.problems.len() == 1 { "" } else { "s" }
            );
            for p in &report.problems {
                eprintln!("  - {p}");
            }
            ExitCode::FAILURE
        }
    }
}

fn serve(config: PathBuf, cli: &Cli, options: &parley_gateway::LoadOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The process-wide TLS provider (used by the Redis client for rediss:// URLs).
    let _ = rustls::crypto::ring::default_provider().install_default();
    runtime.block_on(async move {
        let (state, problems) = parley_gateway::init_waiting_with(config.clone(), options)
            .map_err(|p| anyhow::anyhow!("cannot start: {}", p.join("; ")))?;
        if let Some(problems) = problems {
            tracing::error!(
                config = %config.display(),
                problems = %problems.join("; "),
                "config invalid: not ready, answering 503 until a valid config is loaded"
            );
        }
        let (listen, admin_listen) = {
            let rt = state.runtime.load();
            (rt.config.listen.clone(), rt.config.admin_listen.clone())
        };
        let chat = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("binding the chat API on {listen}"))?;
        let admin = tokio::net::TcpListener::bind(&admin_listen)
            .await
            .with_context(|| format!("binding the admin API on {admin_listen}"))?;
        tracing::info!(
            listen = %chat.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "parley-gateway serving"
        );
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down: no new connections; draining in-flight requests");
            sd.cancel();
        });
        parley_gateway::run(
            state,
            chat,
            admin,
            shutdown,
            parley_gateway::ServeOptions {
                drain: Duration::from_secs(cli.drain_seconds),
                poll: Duration::from_secs(cli.poll_seconds.max(1)),
            },
        )
        .await;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
