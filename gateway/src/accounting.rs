//! What is recorded about every request once it ends: the request, latency, token and
//! cost metrics, and settling the admission's reservation to real usage.
//!
//! An [`Accounting`] is made when a request arrives and finished exactly once: with the
//! answer's status and usage, or, if it is dropped unfinished, as 499 (the client went
//! away) with no usage. The upstream exchange of an admitted request owns its
//! `Accounting` and outlives its client (`api::outlive_client`: if the client goes away,
//! the rest of the exchange is spawned), so what the upstream generated is settled.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::ledger::{UsageRecord, epoch_micros_ago};
use crate::metrics::{
    FallbackLabels, Label, LatencyLabels, RequestLabels, TenantModel, TokenLabels,
};
use crate::runtime::cost_at;
use crate::state::AppState;
use crate::store::Held;
use crate::translate::Usage;

fn unknown() -> Label {
    static UNKNOWN: std::sync::LazyLock<Label> =
        std::sync::LazyLock::new(|| Arc::new("unknown".to_string()));
    Arc::clone(&UNKNOWN)
}

fn none() -> Label {
    static NONE: std::sync::LazyLock<Label> =
        std::sync::LazyLock::new(|| Arc::new("none".to_string()));
    Arc::clone(&NONE)
}

/// Everything recorded about a request once it ends (also when the client goes away).
pub struct Accounting {
    state: Arc<AppState>,
    api: &'static str,
    /// Tenant label (`unknown` before authentication).
    pub tenant: Label,
    /// Model label (`unknown` until the model is known).
    pub model: Label,
    /// Backend label (`none` until one served).
    pub backend: Label,
    start: Instant,
    /// What admission reserved.
    pub held: Held,
    /// `(input, output)` micro-USD per million tokens of the model that served.
    pub price: Option<(i64, i64)>,
    /// Set when the client went away (its handler was dropped unanswered).
    client_gone: Arc<AtomicBool>,
    done: bool,
    /// `x-request-id` (the usage ledger's key; a random one until set).
    pub request_id: Option<String>,
    /// The model the client asked for (`unknown` until known).
    pub requested_model: Label,
    /// Answered from the response cache.
    pub cache_hit: bool,
    /// A streamed answer was asked for.
    pub stream: bool,
}

impl Accounting {
    /// Starts accounting for a request that arrived at `start` on `api`.
    pub fn new(state: &Arc<AppState>, api: &'static str, start: Instant) -> Self {
        state.metrics.in_flight.inc();
        Self {
            state: Arc::clone(state),
            api,
            tenant: unknown(),
            model: unknown(),
            backend: none(),
            start,
            held: Held::Nothing,
            price: None,
            client_gone: Arc::new(AtomicBool::new(false)),
            done: false,
            request_id: None,
            requested_model: unknown(),
            cache_hit: false,
            stream: false,
        }
    }

    /// A flag to set when the client goes away: the request is then recorded as 499
    /// (with whatever usage it had), however the upstream exchange ends.
    pub fn client_gone(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.client_gone)
    }

    /// When the request arrived.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Records the outcome (once; later calls do nothing).
    pub fn finish(&mut self, status: u16, usage: Usage) {
        if self.done {
            return;
        }
        self.done = true;
        let status = if self.client_gone.load(Ordering::Relaxed) {
            499
        } else {
            status
        };
        let m = &self.state.metrics;
        m.in_flight.dec();
        m.requests
            .get_or_create(&RequestLabels {
                tenant: Arc::clone(&self.tenant),
                model: Arc::clone(&self.model),
                backend: Arc::clone(&self.backend),
                status,
                api: self.api,
            })
            .inc();
        let tm = TenantModel {
            tenant: Arc::clone(&self.tenant),
            model: Arc::clone(&self.model),
        };
        m.latency
            .get_or_create(&LatencyLabels {
                tenant: Arc::clone(&self.tenant),
                model: Arc::clone(&self.model),
                stream: if self.stream { "true" } else { "false" },
            })
            .observe(self.start.elapsed().as_secs_f64());
        if status < 400 && *self.backend != "none" && self.requested_model != self.model {
            m.fallbacks
                .get_or_create(&FallbackLabels {
                    requested_model: Arc::clone(&self.requested_model),
                    model: Arc::clone(&self.model),
                })
                .inc();
        }
        let cost = self
            .price
            .map(|p| cost_at(p, usage.input, usage.output))
            .unwrap_or(0);
        if usage.input > 0 || usage.output > 0 {
            for (kind, n) in [("input", usage.input), ("output", usage.output)] {
                m.tokens
                    .get_or_create(&TokenLabels {
                        tenant: Arc::clone(&self.tenant),
                        model: Arc::clone(&self.model),
                        kind,
                    })
                    .inc_by(n);
            }
        }
        if cost > 0 {
            m.cost.get_or_create(&tm).inc_by(cost as u64);
        }
        let tokens = usage.input.saturating_add(usage.output);
        std::mem::take(&mut self.held).settle(&self.state, tokens, cost);
        // The ledger row: queued only, written by the ledger's own task.
        if let Some(ledger) = self.state.runtime.load().ledger.as_ref() {
            let elapsed = self.start.elapsed();
            ledger.record(UsageRecord {
                request_id: self.request_id.take().unwrap_or_else(|| {
                    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
                }),
                created_at_micros: epoch_micros_ago(elapsed),
                tenant: Arc::clone(&self.tenant),
                api: self.api,
                requested_model: Arc::clone(&self.requested_model),
                model: Arc::clone(&self.model),
                backend: Arc::clone(&self.backend),
                input_tokens: i64::try_from(usage.input).unwrap_or(i64::MAX),
                output_tokens: i64::try_from(usage.output).unwrap_or(i64::MAX),
                cost_micros: cost,
                latency_ms: i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX),
                status: i16::try_from(status).unwrap_or(i16::MAX),
                cache_hit: self.cache_hit,
                stream: self.stream,
            });
        }
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        // Dropped unfinished: the client went away before an answer was complete.
        self.finish(499, Usage::default());
    }
}
