//! `parley-gateway`: Parley's data plane, an OpenAI- and Anthropic-compatible LLM gateway
//! with tenant keys, limits, routing with retries, fallbacks and circuit breaking, and
//! translation between the two API formats.

pub mod accounting;
pub mod admission;
pub mod api;
pub mod breaker;
pub mod cache;
pub mod error;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod overhead;
pub mod proxy;
pub mod redis_state;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod sessions;
pub mod state;
pub mod store;
pub mod translate;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

pub use state::AppState;

/// Every problem found in a config, one per entry.
pub type Problems = Vec<String>;

/// How the config is loaded, beyond the file itself.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `--secrets-dir`: replaces the config's `secretsDir` (made absolute by the caller).
    pub secrets_dir: Option<PathBuf>,
}

/// Builds the process state from a config file (refusing an invalid one).
pub fn init(config_path: PathBuf) -> Result<Arc<AppState>, Problems> {
    init_with(config_path, &LoadOptions::default())
}

/// [`init`] with options.
pub fn init_with(config_path: PathBuf, options: &LoadOptions) -> Result<Arc<AppState>, Problems> {
    match init_waiting_with(config_path, options)? {
        (state, None) => Ok(state),
        (_, Some(problems)) => Err(problems),
    }
}

/// What `parley-gateway check` found.
pub struct CheckReport {
    /// The state built from the config, when it is valid.
    pub runtime: Option<runtime::Runtime>,
    /// Every problem that makes the config invalid.
    pub problems: Problems,
    /// What does not make it invalid but will not work (unusable keys, settings not
    /// implemented yet).
    pub warnings: Vec<String>,
    /// Secret files the config names that do not exist, and the directory relative paths
    /// resolve against.
    pub missing_secret_files: Vec<PathBuf>,
    /// Where relative secret files are looked for.
    pub secrets_base: PathBuf,
}

/// Validates a config file without serving: every problem and every warning at once.
pub fn check(
    config_path: &std::path::Path,
    options: &LoadOptions,
) -> Result<CheckReport, Problems> {
    let metrics = Arc::new(metrics::Metrics::new());
    let mut shared = runtime::Shared::new(metrics).map_err(|e| vec![e])?;
    shared.secrets_dir = options.secrets_dir.clone();
    shared.check_only = true;
    let result = reload::check(config_path, &shared);
    // Where the secrets are, from the file as parsed (even when it is inconsistent).
    let parsed = std::fs::read_to_string(config_path)
        .ok()
        .and_then(|t| parley_crds::GatewayConfig::from_yaml_unchecked(&t).ok());
    let (missing_secret_files, secrets_base) = match parsed {
        Some(mut config) => {
            if let Some(dir) = &options.secrets_dir {
                config.secrets_dir = Some(dir.clone());
            }
            let base = runtime::secrets_base(&config, config_path);
            let mut missing: Vec<PathBuf> = runtime::secret_files(&config, &base)
                .into_iter()
                .filter(|p| !p.exists())
                .collect();
            missing.sort();
            missing.dedup();
            (missing, base)
        }
        None => (Vec::new(), PathBuf::new()),
    };
    let (runtime, problems) = match result {
        Ok(rt) => (Some(rt), Vec::new()),
        Err(problems) => (None, problems),
    };
    Ok(CheckReport {
        runtime,
        problems,
        warnings: shared.warnings(),
        missing_secret_files,
        secrets_base,
    })
}

/// Builds the process state; with an invalid (or missing) config file the state has no
/// models or tenants, is not ready, and answers 503 until a valid config is loaded. The
/// problems are returned alongside. `Err` only if the process cannot work at all.
pub fn init_waiting(config_path: PathBuf) -> Result<(Arc<AppState>, Option<Problems>), Problems> {
    init_waiting_with(config_path, &LoadOptions::default())
}

/// [`init_waiting`] with options.
pub fn init_waiting_with(
    config_path: PathBuf,
    options: &LoadOptions,
) -> Result<(Arc<AppState>, Option<Problems>), Problems> {
    let metrics = Arc::new(metrics::Metrics::new());
    let mut shared = runtime::Shared::new(Arc::clone(&metrics)).map_err(|e| vec![e])?;
    shared.secrets_dir = options.secrets_dir.clone();
    let (rt, problems) = match reload::load(&config_path, &shared) {
        Ok(rt) => (rt, None),
        Err(problems) => {
            metrics
                .reloads
                .get_or_create(&metrics::ResultLabel { result: "failure" })
                .inc();
            let empty = runtime::placeholder(&config_path, &shared)
                .map_err(|p| [problems.clone(), p].concat())?;
            (empty, Some(problems))
        }
    };
    let loaded = problems.is_none();
    let limiter = Arc::clone(&shared.limiter);
    let state = Arc::new(AppState {
        runtime: ArcSwap::from_pointee(rt),
        shared,
        metrics,
        limiter,
        sessions: Arc::new(sessions::MemorySessions::default()),
        cache: cache::ResponseCache::default(),
        draining: AtomicBool::new(false),
        loaded: AtomicBool::new(loaded),
        last_failure: parking_lot::Mutex::new(problems.as_deref().map(reload::failure_digest)),
        config_path,
    });
    if loaded {
        let rt = state.runtime.load_full();
        reload::record_loaded(&state, &rt);
    }
    Ok((state, problems))
}

/// Options of a running gateway.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// How long in-flight requests may take after SIGTERM.
    pub drain: Duration,
    /// Config poll interval (backs up the file watcher).
    pub poll: Duration,
}

/// Runs both listeners until `shutdown` is cancelled, then drains.
pub async fn run(
    state: Arc<AppState>,
    chat: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    shutdown: CancellationToken,
    opts: ServeOptions,
) {
    let watch_stop = CancellationToken::new();
    let watcher = tokio::spawn(reload::watch(
        Arc::clone(&state),
        watch_stop.clone(),
        opts.poll,
    ));
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(server::serve(
        admin,
        server::admin_router(Arc::clone(&state)),
        admin_stop.clone(),
        Duration::from_secs(1),
    ));
    let st = Arc::clone(&state);
    let sd = shutdown.clone();
    let draining_since = tokio::spawn(async move {
        sd.cancelled().await;
        server::start_draining(&st);
        std::time::Instant::now()
    });
    server::serve(
        chat,
        server::chat_router(Arc::clone(&state)),
        shutdown,
        opts.drain,
    )
    .await;
    // Exchanges whose clients left are not connections: the drain above did not wait for
    // them. They get what is left of the drain, then their rows are flushed below.
    let since = draining_since
        .await
        .unwrap_or_else(|_| std::time::Instant::now());
    let outliving = &api::OUTLIVING;
    outliving.close();
    if !outliving.is_empty()
        && tokio::time::timeout(opts.drain.saturating_sub(since.elapsed()), outliving.wait())
            .await
            .is_err()
    {
        tracing::warn!(
            exchanges = outliving.len(),
            "drain deadline passed; exchanges whose clients went away are cut short unsettled"
        );
    }
    // Rows of the last requests reach the ledger before the process ends (bounded).
    if let Some(ledger) = state.runtime.load().ledger.clone() {
        ledger.flush(Duration::from_secs(5)).await;
    }
    watch_stop.cancel();
    admin_stop.cancel();
    let _ = watcher.await;
    let _ = admin_task.await;
}
