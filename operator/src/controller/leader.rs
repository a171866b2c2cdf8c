//! Leader election on a `coordination.k8s.io` Lease (kube-lease-manager): only the
//! holder runs the controllers and writes. Losing the Lease stops the controllers and
//! returns [`LeaderError::Lost`], so the process exits and restarts as a standby — the
//! simple, safe choice (no two writers, ever).

use std::sync::Arc;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

use super::metrics::Metrics;

/// The Lease's name.
pub const LEASE_NAME: &str = "parley-operator";
/// Seconds a Lease stays valid without renewal.
pub const LEASE_SECONDS: u64 = 15;
/// Seconds before expiry at which the holder renews.
pub const GRACE_SECONDS: u64 = 5;

/// Resolves when the controllers must stop.
pub type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>;

/// Leader election failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The Lease could not be read or created.
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// Another replica took the Lease (or it could not be renewed).
    #[error("lost the leader Lease {namespace}/{LEASE_NAME}")]
    Lost {
        /// The Lease's namespace.
        namespace: String,
    },
    /// The lease manager's task ended unexpectedly.
    #[error("the lease manager stopped")]
    Stopped,
}

/// Waits for the Lease in `namespace`, then runs `work` with a future that resolves when
/// the Lease is lost or `shutdown` resolves. Returns `Ok` after a requested shutdown
/// (releasing the Lease), `Err(Lost)` when the Lease was lost.
pub async fn run_as_leader<W, F>(
    client: Client,
    namespace: &str,
    identity: &str,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    work: W,
) -> Result<(), LeaderError>
where
    W: FnOnce(Stop) -> F,
    F: std::future::Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .with_field_manager(format!("parley-operator-lease-{identity}"))
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    let mut shutdown = Box::pin(shutdown);
    tracing::info!(lease = %format!("{namespace}/{LEASE_NAME}"), identity, "waiting for the leader Lease");
    loop {
        if *leading.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    return Err(LeaderError::Stopped);
                }
            }
            () = &mut shutdown => {
                drop(leading);
                let _ = task.await;
                return Ok(());
            }
        }
    }
    tracing::info!(
        identity,
        "acquired the leader Lease; starting the controllers"
    );
    metrics.set_leader(true);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<bool>();
    let mut watch = leading.clone();
    let watcher = tokio::spawn(async move {
        let lost = tokio::select! {
            () = &mut shutdown => false,
            _ = async {
                loop {
                    if watch.changed().await.is_err() || !*watch.borrow_and_update() {
                        break;
                    }
                }
            } => true,
        };
        let _ = stop_tx.send(lost);
    });
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<bool>();
    let stop: Stop = Box::pin(async move {
        let lost = stop_rx.await.unwrap_or(true);
        let _ = lost_tx.send(lost);
    });
    work(stop).await;
    metrics.set_leader(false);
    watcher.abort();
    let lost = lost_rx.await.unwrap_or(false);
    drop(leading);
    // Releases the Lease (after a requested shutdown the next replica takes over at once).
    let _ = task.await;
    if lost {
        Err(LeaderError::Lost {
            namespace: namespace.to_string(),
        })
    } else {
        Ok(())
    }
}
