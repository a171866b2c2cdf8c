//! `parley-mock-llm --listen ADDR`: see [`parley_e2e::mock_llm`].

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use parley_e2e::mock_llm::{self, cli::Args};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            let _ = writeln!(std::io::stderr(), "parley-mock-llm: {e}");
            return ExitCode::from(2);
        }
    };
    let handle = match mock_llm::bind_with(args.listen.as_str(), config, args.h2_max_streams).await
    {
        Ok(h) => h,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "parley-mock-llm: cannot listen on {}: {e}",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "parley-mock-llm listening on http://{}", handle.addr());
        let _ = out.flush();
    }
    wait_for_signal().await;
    drop(handle);
    ExitCode::SUCCESS
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
