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
    /// Admission limits (in process; Redis comes later behind the same trait).
    pub limiter: Arc<MemoryLimiter>,
    /// `/chat` sessions.
    pub sessions: Arc<MemorySessions>,
    /// Response cache.
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
