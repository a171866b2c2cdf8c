//! Loading the config file and watching it (and the secret files it names) for changes.
//!
//! Kubernetes updates a mounted ConfigMap or Secret by swapping a `..data` symlink in the
//! mounted directory, so directories are watched, not files. A poll every few seconds
//! backs the watcher up. A changed config is built completely (secrets read, indexes
//! made) before it replaces the old one in a single atomic swap; requests in flight keep
//! the snapshot they started with. An invalid config is refused and the old one serves on.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use parley_crds::GatewayConfig;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::metrics::{HashLabel, ResultLabel};
use crate::runtime::{self, Runtime, Shared};
use crate::state::AppState;

/// Reads, parses, validates and builds; every problem on failure.
pub fn load(path: &Path, shared: &Shared) -> Result<Runtime, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("cannot read config file {}: {e}", path.display())])?;
    let config = GatewayConfig::from_yaml(&text).map_err(|e| match e {
        parley_crds::gateway_config::ConfigError::Invalid(problems) => problems,
        other => vec![other.to_string()],
    })?;
    runtime::build(config, &text, path, shared)
}

/// Like [`load`], but builds even an inconsistent config, so that every problem is found
/// at once: the consistency checks and what only building finds (unreadable secrets,
/// two tenants with one key, a bad Redis URL). For `check`, never for serving.
pub fn check(path: &Path, shared: &Shared) -> Result<Runtime, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("cannot read config file {}: {e}", path.display())])?;
    let config = GatewayConfig::from_yaml_unchecked(&text).map_err(|e| match e {
        parley_crds::gateway_config::ConfigError::Invalid(problems) => problems,
        other => vec![other.to_string()],
    })?;
    let mut problems = config.problems();
    match runtime::build(config, &text, path, shared) {
        Ok(rt) if problems.is_empty() => Ok(rt),
        Ok(_) => Err(problems),
        Err(more) => {
            for p in more {
                if !problems.contains(&p) {
                    problems.push(p);
                }
            }
            Err(problems)
        }
    }
}

/// Records a loaded config in the metrics.
pub fn record_loaded(state: &AppState, rt: &Runtime) {
    state.metrics.config_info.clear();
    state
        .metrics
        .config_info
        .get_or_create(&HashLabel {
            hash: rt.hash.clone(),
        })
        .set(1);
    state
        .metrics
        .reloads
        .get_or_create(&ResultLabel { result: "success" })
        .inc();
}

fn dirs_to_watch(state: &AppState) -> HashSet<PathBuf> {
    let rt = state.runtime.load();
    let mut dirs = HashSet::new();
    let config_dir = state
        .config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = runtime::secrets_base(&rt.config, &state.config_path);
    dirs.insert(config_dir);
    dirs.insert(base.clone());
    for f in runtime::secret_files(&rt.config, &base) {
        if let Some(p) = f.parent() {
            dirs.insert(p.to_path_buf());
            // A projected volume's root holds the `..data` symlink.
            if let Some(pp) = p.parent() {
                dirs.insert(pp.to_path_buf());
            }
        }
    }
    dirs
}

/// Identifies a set of problems (so the same refusal is reported once).
pub fn failure_digest(problems: &[String]) -> String {
    hex::encode(Sha256::digest(problems.join("; ").as_bytes()))
}

/// Reloads now: returns whether a new config was swapped in.
pub fn reload_once(state: &AppState, last_failure: &mut Option<String>) -> bool {
    swap_in(state, last_failure).is_some()
}

/// Reloads now: the replaced runtime if a new config was swapped in.
fn swap_in(state: &AppState, last_failure: &mut Option<String>) -> Option<Arc<Runtime>> {
    let started = std::time::Instant::now();
    match load(&state.config_path, &state.shared) {
        Ok(rt) => {
            *last_failure = None;
            let current = state.runtime.load();
            if rt.hash == current.hash {
                return None;
            }
            if rt.config.listen != current.config.listen
                || rt.config.admin_listen != current.config.admin_listen
            {
                tracing::warn!(
                    "listen/adminListen changed; the new addresses take effect after a restart"
                );
            }
            tracing::info!(
                hash = %rt.hash,
                models = rt.models.len(),
                tenants = rt.tenants.len(),
                build_ms = started.elapsed().as_secs_f64() * 1e3,
                "config reloaded"
            );
            record_loaded(state, &rt);
            drop(current);
            let old = state.runtime.swap(Arc::new(rt));
            state
                .loaded
                .store(true, std::sync::atomic::Ordering::Release);
            Some(old)
        }
        Err(problems) => {
            let joined = problems.join("; ");
            let digest = failure_digest(&problems);
            if last_failure.as_deref() != Some(digest.as_str()) {
                tracing::error!(problems = %joined, "new config refused; the previous config keeps serving");
                state
                    .metrics
                    .reloads
                    .get_or_create(&ResultLabel { result: "failure" })
                    .inc();
                *last_failure = Some(digest);
            }
            None
        }
    }
}

/// What a poll compares: device, inode, size and modification time of the config file
/// and of every secret file the running config reads (following symlinks: Kubernetes
/// swapping a volume's `..data` link changes them all).
type Fingerprint = Vec<Option<(u64, u64, u64, i64, i64)>>;

fn fingerprint(state: &AppState) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let rt = state.runtime.load();
    let base = runtime::secrets_base(&rt.config, &state.config_path);
    std::iter::once(state.config_path.clone())
        .chain(runtime::secret_files(&rt.config, &base))
        .map(|path| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
        })
        .collect()
}

/// Watches until `shutdown`.
pub async fn watch(state: Arc<AppState>, shutdown: CancellationToken, poll: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reading the files is an event too (inotify's open and close-without-write):
        // reacting to it would make every reload trigger the next, forever.
        if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; polling only");
            None
        }
    };
    let mut watched: HashSet<PathBuf> = HashSet::new();
    let mut rewatch = |watcher: &mut Option<notify::RecommendedWatcher>, state: &AppState| {
        if let Some(w) = watcher.as_mut() {
            for dir in dirs_to_watch(state) {
                if watched.contains(&dir) || !dir.is_dir() {
                    continue;
                }
                match w.watch(&dir, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        watched.insert(dir);
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory")
                    }
                }
            }
        }
    };
    rewatch(&mut watcher, &state);
    let mut last_failure = state.last_failure.lock().take();
    // Replaced runtimes that requests still held at the swap. Freeing a big one (tens of
    // thousands of keys) takes milliseconds: done here, on a blocking thread, once no
    // request holds it, rather than by whichever request lets go of it last.
    let mut retired: Vec<Arc<Runtime>> = Vec::new();
    // The config was just loaded: the first poll comes one period later.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<Fingerprint> = None;
    loop {
        let polled = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => true,
            Some(()) = rx.recv() => {
                // Let a burst of events (a symlink swap is several) settle.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                false
            }
        };
        let st = Arc::clone(&state);
        let lf = last_failure.take();
        let mut old = std::mem::take(&mut retired);
        let last_seen = seen.take();
        let result = tokio::task::spawn_blocking(move || {
            let mut lf = lf;
            // Taken before reading, so that a change during the load is seen next time.
            let now = fingerprint(&st);
            // A poll that finds every file as it was has nothing to load (parsing a big
            // config every few seconds would burn CPU for nothing). While the last
            // config was refused, each poll retries: what it waits for may be a secret
            // file the running config does not name.
            if polled && lf.is_none() && last_seen.as_ref() == Some(&now) {
                return (false, lf, old, Some(now));
            }
            let replaced = swap_in(&st, &mut lf);
            let changed = replaced.is_some();
            old.extend(replaced);
            old.retain(|rt| Arc::strong_count(rt) > 1);
            (changed, lf, old, Some(now))
        })
        .await;
        if let Ok((changed, lf, old, now)) = result {
            last_failure = lf;
            retired = old;
            seen = now;
            if changed {
                rewatch(&mut watcher, &state);
                // The new config may read other secret files.
                seen = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const BASE: &str = "apiVersion: parley.dev/gateway/v1\ndefaultModel: a\nmodels:\n- name: a\n  backends: [{name: p, provider: openai, baseUrl: 'http://127.0.0.1:1/v1'}]\ntenants:\n- {id: t/a, apiKeys: [{file: key}]}\n";

    #[test]
    fn swaps_valid_configs_and_refuses_broken_ones() {
        let dir = std::env::temp_dir().join(format!(
            "parley-reload-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yaml");
        std::fs::write(&path, BASE).unwrap();
        std::fs::write(dir.join("key"), "k1\n").unwrap();
        let state = crate::init(path.clone()).unwrap();
        let old = state.runtime.load_full();
        assert!(old.tenant_for_key(b"k1").is_some());
        let mut failure = None;
        assert!(!reload_once(&state, &mut failure), "nothing changed");

        // A new model appears; the old snapshot stays intact for requests holding it.
        std::fs::write(
            &path,
            format!("{BASE}- {{id: t/b, apiKeys: [{{value: k2}}]}}\n"),
        )
        .unwrap();
        assert!(reload_once(&state, &mut failure));
        let new = state.runtime.load_full();
        assert!(new.tenant_for_key(b"k2").is_some());
        assert!(old.tenant_for_key(b"k2").is_none());
        assert_ne!(old.hash, new.hash);

        // A rotated secret file is a change too.
        std::fs::write(dir.join("key"), "k3\n").unwrap();
        assert!(reload_once(&state, &mut failure));
        assert!(state.runtime.load().tenant_for_key(b"k3").is_some());
        assert!(state.runtime.load().tenant_for_key(b"k1").is_none());

        // Broken: refused once (logged and counted once), old config serves on.
        std::fs::write(&path, "apiVersion: parley.dev/gateway/v1\nmodels: [").unwrap();
        assert!(!reload_once(&state, &mut failure));
        assert!(!reload_once(&state, &mut failure));
        assert!(state.runtime.load().tenant_for_key(b"k2").is_some());
        let text = state.metrics.encode();
        assert!(
            text.contains("parley_config_reloads_total{result=\"failure\"} 1"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
