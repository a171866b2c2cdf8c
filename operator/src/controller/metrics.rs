//! Low-cardinality Prometheus metrics (labels: kind, result, error category — never
//! object names or error text) and the `/metrics`, `/healthz`, `/readyz` endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `parley_operator_reconciles_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `Chatbot`, `Tenant` or `ModelRoute`.
    pub kind: String,
    /// `ok` or an error category (`api`, `conflict`, `forbidden`, `transport`, ...).
    pub result: String,
}

/// Labels of `parley_operator_reconcile_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `Chatbot`, `Tenant` or `ModelRoute`.
    pub kind: String,
}

/// Labels of `parley_operator_triggers_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// The kind reconciled: `Chatbot`, `Tenant` or `ModelRoute`.
    pub kind: String,
    /// The kind whose watch event asked for the reconcile (`Chatbot` itself,
    /// `Deployment`, `Tenant`, `Secret`, ...).
    pub source: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    triggers: Family<TriggerLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parley_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by kind and result (ok or error category)",
            reconciles.clone(),
        );
        let triggers = Family::<TriggerLabels, Counter>::default();
        registry.register(
            "triggers",
            "Reconciles asked for by watch events, by the kind reconciled and the kind of the \
             changed object (several asked for while one is queued run once)",
            triggers.clone(),
        );
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and reconciles",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            triggers,
            duration,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    /// Records one reconcile.
    pub fn observe(&self, kind: &str, result: &str, took: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind: kind.to_string(),
                result: result.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records `n` reconciles of `kind` asked for by an event of a `source`.
    pub fn triggered(&self, kind: &str, source: &str, n: usize) {
        if n == 0 {
            return;
        }
        self.triggers
            .get_or_create(&TriggerLabels {
                kind: kind.to_string(),
                source: source.to_string(),
            })
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// How many reconciles of `kind` ended with `result`.
    pub fn reconciles(&self, kind: &str, result: &str) -> u64 {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind: kind.to_string(),
                result: result.to_string(),
            })
            .get()
    }

    /// Whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Whether the controllers are running (`/readyz`).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` succeeds.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "encoding metrics failed\n".to_string(),
        ),
    }
}

/// Ready once the controllers run — or while this replica waits as a standby for the
/// Lease, which is a healthy state too (it is ready to take over).
async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.is_ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_low_cardinality_labels() {
        let m = Metrics::new();
        m.observe("Chatbot", "ok", Duration::from_millis(3));
        m.observe("Chatbot", "conflict", Duration::from_millis(3));
        let text = m.encode().unwrap_or_default();
        assert!(
            text.contains(r#"parley_operator_reconciles_total{kind="Chatbot",result="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains("parley_operator_reconcile_duration_seconds_bucket"));
        assert_eq!(m.reconciles("Chatbot", "conflict"), 1);
    }
}
