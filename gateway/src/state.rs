//! Process-wide state: the swappable runtime plus what outlives reloads.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;

use crate::cache::ResponseCache;
use crate::limits::MemoryLimiter;
use crate::metrics::Metrics;
use crate::runtime::{Runtime, Shared};
use crate::sessions::MemorySessions;

/// Everything a handler needs.
pub struct AppState {
    /// Config and derived state, swapped atomically on reload.
    pub runtime: ArcSwap<Runtime>,
    /// Clients, breakers, metrics.
    pub shared: Shared,
    /// Metrics (also in `shared`).
    pub metrics: Arc<Metrics>,
    /// In-process admission limits (used when the config has no `redis`; handlers reach
    /// them only through `store::Store`).
    pub limiter: Arc<MemoryLimiter>,
    /// In-process `/chat` sessions (likewise).
    pub sessions: Arc<MemorySessions>,
    /// In-process response cache (likewise).
    pub cache: ResponseCache,
    /// Set on SIGTERM: `/readyz` fails.
    pub draining: AtomicBool,
    /// A valid config has been loaded (until then `/readyz` fails and the API says 503).
    pub loaded: AtomicBool,
    /// Digest of the last refused config's problems (each is reported once).
    pub last_failure: parking_lot::Mutex<Option<String>>,
    /// The config file.
    pub config_path: PathBuf,
}
