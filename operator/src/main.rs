//! `parley-operator`: prints the CRDs and renders Chatbots offline.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
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
            writeln!(
                out,
                "# Objects carrying secret values are not printed: none for this Chatbot."
            )?;
            write!(out, "{}", rendered.to_yaml()?)?;
        }
    }
    if errors > 0 {
        eprintln!("{errors} error(s); nothing printed for the Chatbots that have errors");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
