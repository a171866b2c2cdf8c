//! The usage ledger: one row per request in PostgreSQL (`usage.postgresUrl`), written in
//! batches by a background task, never on the request path.
//!
//! `accounting` hands each finished request to [`Ledger::record`], which only puts the
//! row in a bounded queue (`PARLEY_LEDGER_QUEUE_ROWS`, default 100,000). The writer task
//! takes up to [`BATCH_ROWS`] rows at a time and inserts them in one statement with
//! `ON CONFLICT (request_id) DO NOTHING`, so a batch retried after a lost answer never
//! counts a request twice. While PostgreSQL is down or slow, rows wait in the queue and
//! the batch is retried with backoff (100 ms doubling to 5 s); only a full queue drops
//! rows, counted in `parley_ledger_rows_dropped_total` and logged once per outage.
//!
//! At start the writer applies the embedded migrations (`gateway/migrations/`) under a
//! PostgreSQL advisory lock, so replicas that start together take turns. Without Redis it
//! then reads each tenant's spend for the current UTC month (for this Chatbot, rows
//! written before this process started) into the in-process limiter: a restart or a
//! rollout does not reset a budget. `/readyz` waits for that (at most
//! [`STARTUP_GRACE`]: PostgreSQL being down never keeps the gateway from serving).

pub mod query;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::limits::{MemoryLimiter, current_month};
use crate::metrics::{ChatbotLabel, Label, Metrics};

/// Rows written per statement at most.
pub const BATCH_ROWS: usize = 1000;
/// Default queue capacity (rows waiting to be written).
pub const DEFAULT_QUEUE_ROWS: usize = 100_000;
/// How long `/readyz` waits for the migrations and the month's spend at start.
pub const STARTUP_GRACE: Duration = Duration::from_secs(5);
/// One statement (connect, insert, query) may take this long before it is abandoned and
/// retried.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// `pg_advisory_lock` key held while migrating ("parley" in ASCII).
const MIGRATION_LOCK: i64 = 0x7061_726c_6579;

/// The embedded migrations, in order: `(version, name, SQL)`.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "parley_usage",
    include_str!("../../migrations/0001_parley_usage.sql"),
)];

/// The queue capacity in force (`PARLEY_LEDGER_QUEUE_ROWS`, else the default).
pub fn queue_rows() -> usize {
    std::env::var("PARLEY_LEDGER_QUEUE_ROWS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_QUEUE_ROWS)
}

/// One request, as written to `parley_usage`.
#[derive(Clone, Debug)]
pub struct UsageRecord {
    /// `x-request-id` (unique).
    pub request_id: String,
    /// When the request arrived, in microseconds since the Unix epoch.
    pub created_at_micros: i64,
    /// Tenant id (`unknown` if it was not authenticated).
    pub tenant: Label,
    /// `openai`, `anthropic` or `chat`.
    pub api: &'static str,
    /// The model the client asked for (`unknown` if it named none this config has).
    pub requested_model: Label,
    /// The model that served (after fallbacks).
    pub model: Label,
    /// The backend that served (`none` if none did).
    pub backend: Label,
    /// Input tokens.
    pub input_tokens: i64,
    /// Output tokens (what was generated, also for a client that went away).
    pub output_tokens: i64,
    /// What was charged, in micro-USD.
    pub cost_micros: i64,
    /// Whole request latency.
    pub latency_ms: i64,
    /// The HTTP status answered (499: the client went away).
    pub status: i16,
    /// Answered from the response cache.
    pub cache_hit: bool,
    /// A streamed answer.
    pub stream: bool,
}

/// Microseconds since the Unix epoch of `at`, a moment `ago` before now.
pub fn epoch_micros_ago(ago: Duration) -> i64 {
    SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Errors of the ledger (never carrying the URL: it holds the password).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// PostgreSQL refused or failed a statement, or the connection broke.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A statement took longer than its timeout.
    #[error("postgres: no answer within {} s", STATEMENT_TIMEOUT.as_secs())]
    Timeout,
}

/// Checks a `usage.postgresUrl` without connecting. The message never repeats the URL.
pub fn check_url(url: &str) -> Result<tokio_postgres::Config, String> {
    tokio_postgres::Config::from_str(url).map_err(|_| {
        "usage.postgresUrl is not a valid PostgreSQL connection string; use postgres://USER:PASSWORD@HOST:PORT/DATABASE".to_string()
    })
}

/// The ledger of one Chatbot: the queue's sending side and what the writer needs.
pub struct Ledger {
    tx: mpsc::Sender<UsageRecord>,
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// The Chatbot's namespace.
    pub namespace: String,
    /// The Chatbot's name.
    pub chatbot: String,
    metrics: Arc<Metrics>,
    label: ChatbotLabel,
    /// Rows queued or being written.
    pending: AtomicU64,
    /// A drop was logged in the current outage.
    drop_logged: AtomicBool,
    /// The migrations ran and (without Redis) the month's spend was read.
    started: AtomicBool,
    created: Instant,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("namespace", &self.namespace)
            .field("chatbot", &self.chatbot)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Starts the writer for `url` (must be called inside a Tokio runtime). With
    /// `budgets`, the writer first adds each tenant's spend this month to it.
    pub fn start(
        url: &str,
        chatbot: &str,
        tls: rustls::ClientConfig,
        metrics: Arc<Metrics>,
        budgets: Option<Arc<MemoryLimiter>>,
    ) -> Result<Arc<Self>, String> {
        let mut pg = check_url(url)?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("parley-gateway");
        }
        let (namespace, name) = chatbot.split_once('/').unwrap_or(("default", chatbot));
        let (tx, rx) = mpsc::channel(queue_rows());
        let ledger = Arc::new(Self {
            tx,
            pg,
            tls: MakeRustlsConnect::new(tls),
            namespace: namespace.to_string(),
            chatbot: name.to_string(),
            label: ChatbotLabel {
                chatbot: Arc::new(chatbot.to_string()),
            },
            metrics,
            pending: AtomicU64::new(0),
            drop_logged: AtomicBool::new(false),
            started: AtomicBool::new(false),
            created: Instant::now(),
        });
        ledger.set_up(false);
        // Every series exists from the start (a dashboard shows 0, not "no data").
        let m = &ledger.metrics;
        m.ledger_queue.get_or_create(&ledger.label).set(0);
        for c in [
            &m.ledger_written,
            &m.ledger_duplicates,
            &m.ledger_dropped,
            &m.ledger_errors,
        ] {
            c.get_or_create(&ledger.label).inc_by(0);
        }
        let started_at = epoch_micros_ago(Duration::ZERO);
        tokio::spawn(writer(Arc::clone(&ledger), rx, budgets, started_at));
        Ok(ledger)
    }

    /// Queues one row (never waits). A full queue drops it: counted, and logged once
    /// per outage.
    pub fn record(&self, row: UsageRecord) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(row) {
            Ok(()) => {
                self.metrics
                    .ledger_queue
                    .get_or_create(&self.label)
                    .set(self.pending.load(Ordering::Acquire) as i64);
            }
            Err(_) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                self.metrics.ledger_dropped.get_or_create(&self.label).inc();
                if !self.drop_logged.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        queue_rows = self.tx.max_capacity(),
                        "usage ledger queue is full (PostgreSQL unreachable or too slow): rows are being dropped until it drains; see parley_ledger_rows_dropped_total"
                    );
                }
            }
        }
    }

    /// Ready to serve as far as the ledger is concerned: the migrations ran and the
    /// month's spend is known, or [`STARTUP_GRACE`] has passed.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire) || self.created.elapsed() >= STARTUP_GRACE
    }

    /// Rows queued or being written.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    /// Waits (up to `deadline`) until every queued row is written.
    pub async fn flush(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while self.pending() > 0 {
            if Instant::now() >= until {
                tracing::warn!(
                    rows = self.pending(),
                    "usage ledger: rows still unwritten at shutdown"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn set_up(&self, up: bool) {
        self.metrics
            .ledger_up
            .get_or_create(&self.label)
            .set(i64::from(up));
    }

    /// A new connection (its driver runs in a task of its own).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, LedgerError> {
        let (client, conn) =
            tokio::time::timeout(STATEMENT_TIMEOUT, self.pg.connect(self.tls.clone()))
                .await
                .map_err(|_| LedgerError::Timeout)??;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "usage ledger connection ended");
            }
        });
        Ok(client)
    }
}

/// Applies the embedded migrations not applied yet, under an advisory lock (replicas
/// starting together take turns; the second finds them applied).
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), LedgerError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply_migrations(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked?;
    Ok(())
}

async fn apply_migrations(client: &mut tokio_postgres::Client) -> Result<(), LedgerError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS parley_schema_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    for (version, name, sql) in MIGRATIONS {
        let done = client
            .query_opt(
                "SELECT 1 FROM parley_schema_migrations WHERE version = $1",
                &[version],
            )
            .await?;
        if done.is_some() {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO parley_schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "usage ledger: migration applied");
    }
    Ok(())
}

const INSERT: &str = "INSERT INTO parley_usage (request_id, created_at, namespace, chatbot, tenant, api, requested_model, model, backend, input_tokens, output_tokens, cost_usd, latency_ms, status, cache_hit, stream)
SELECT r, timestamptz 'epoch' + c * interval '1 microsecond', $3, $4, t, a, rm, m, b, i, o, (cost::numeric / 1000000)::numeric(20, 6), l, s, h, st
FROM unnest($1::text[], $2::int8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int2[], $15::bool[], $16::bool[])
  AS u(r, c, t, a, rm, m, b, i, o, cost, l, s, h, st)
ON CONFLICT (request_id) DO NOTHING";

/// Writes one batch (idempotent: rows already there are skipped).
async fn write_batch(
    client: &tokio_postgres::Client,
    ledger: &Ledger,
    batch: &[UsageRecord],
) -> Result<u64, LedgerError> {
    let ids: Vec<&str> = batch.iter().map(|r| r.request_id.as_str()).collect();
    let created: Vec<i64> = batch.iter().map(|r| r.created_at_micros).collect();
    let tenants: Vec<&str> = batch.iter().map(|r| r.tenant.as_str()).collect();
    let apis: Vec<&str> = batch.iter().map(|r| r.api).collect();
    let requested: Vec<&str> = batch.iter().map(|r| r.requested_model.as_str()).collect();
    let models: Vec<&str> = batch.iter().map(|r| r.model.as_str()).collect();
    let backends: Vec<&str> = batch.iter().map(|r| r.backend.as_str()).collect();
    let input: Vec<i64> = batch.iter().map(|r| r.input_tokens).collect();
    let output: Vec<i64> = batch.iter().map(|r| r.output_tokens).collect();
    let cost: Vec<i64> = batch.iter().map(|r| r.cost_micros).collect();
    let latency: Vec<i64> = batch.iter().map(|r| r.latency_ms).collect();
    let status: Vec<i16> = batch.iter().map(|r| r.status).collect();
    let hit: Vec<bool> = batch.iter().map(|r| r.cache_hit).collect();
    let stream: Vec<bool> = batch.iter().map(|r| r.stream).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 16] = [
        &ids,
        &created,
        &ledger.namespace,
        &ledger.chatbot,
        &tenants,
        &apis,
        &requested,
        &models,
        &backends,
        &input,
        &output,
        &cost,
        &latency,
        &status,
        &hit,
        &stream,
    ];
    let fut = client.execute(INSERT, &params);
    Ok(tokio::time::timeout(STATEMENT_TIMEOUT, fut)
        .await
        .map_err(|_| LedgerError::Timeout)??)
}

/// Each tenant's spend (micro-USD) this UTC month in rows written before `before`.
async fn month_spend(
    client: &tokio_postgres::Client,
    ledger: &Ledger,
    before_micros: i64,
) -> Result<Vec<(String, i64)>, LedgerError> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&ledger.namespace, &ledger.chatbot, &before_micros];
    let fut = client.query(
        "SELECT tenant, (sum(cost_usd) * 1000000)::int8
         FROM parley_usage
         WHERE namespace = $1 AND chatbot = $2
           AND created_at >= date_trunc('month', (timestamptz 'epoch' + $3::int8 * interval '1 microsecond') AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
           AND created_at < timestamptz 'epoch' + $3::int8 * interval '1 microsecond'
         GROUP BY tenant",
        &params,
    );
    let rows = tokio::time::timeout(STATEMENT_TIMEOUT, fut)
        .await
        .map_err(|_| LedgerError::Timeout)??;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect())
}

/// The writer task: start-up (migrations, the month's spend), then batches until every
/// sender is gone and the queue is empty.
async fn writer(
    ledger: Arc<Ledger>,
    mut rx: mpsc::Receiver<UsageRecord>,
    budgets: Option<Arc<MemoryLimiter>>,
    started_at: i64,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut backoff = MIN_BACKOFF;
    let mut down_logged = false;
    let mut migrated = false;
    let mut batch: Vec<UsageRecord> = Vec::with_capacity(BATCH_ROWS);
    loop {
        // Start-up first (retried like writes): until it is done no batch is written, so
        // rows wait in the queue.
        if !migrated {
            match startup(&ledger, &mut client, budgets.as_deref(), started_at).await {
                Ok(()) => {
                    migrated = true;
                    ledger.started.store(true, Ordering::Release);
                    ledger.set_up(true);
                    backoff = MIN_BACKOFF;
                    if down_logged {
                        tracing::info!("usage ledger: PostgreSQL is reachable again");
                        down_logged = false;
                    }
                }
                Err(e) => {
                    failed(&ledger, &mut client, &mut down_logged, &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        if batch.is_empty() {
            match rx.recv().await {
                Some(r) => batch.push(r),
                None => return,
            }
        }
        while batch.len() < BATCH_ROWS {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let result = match client.as_ref() {
            Some(c) => write_batch(c, &ledger, &batch).await,
            None => match ledger.connect().await {
                Ok(c) => {
                    let r = write_batch(&c, &ledger, &batch).await;
                    client = Some(c);
                    r
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(inserted) => {
                let n = batch.len() as u64;
                let m = &ledger.metrics;
                m.ledger_written
                    .get_or_create(&ledger.label)
                    .inc_by(inserted);
                if inserted < n {
                    // Already there: a batch whose answer was lost earlier.
                    m.ledger_duplicates
                        .get_or_create(&ledger.label)
                        .inc_by(n - inserted);
                }
                batch.clear();
                ledger.pending.fetch_sub(n, Ordering::AcqRel);
                m.ledger_queue
                    .get_or_create(&ledger.label)
                    .set(ledger.pending() as i64);
                ledger.set_up(true);
                ledger.drop_logged.store(false, Ordering::Release);
                backoff = MIN_BACKOFF;
                if down_logged {
                    tracing::info!(
                        "usage ledger: PostgreSQL is reachable again; writing the rows that waited"
                    );
                    down_logged = false;
                }
            }
            Err(e) => {
                failed(&ledger, &mut client, &mut down_logged, &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn failed(
    ledger: &Ledger,
    client: &mut Option<tokio_postgres::Client>,
    down_logged: &mut bool,
    e: &LedgerError,
) {
    *client = None;
    ledger.set_up(false);
    ledger
        .metrics
        .ledger_errors
        .get_or_create(&ledger.label)
        .inc();
    if !*down_logged {
        *down_logged = true;
        tracing::warn!(error = %e, "usage ledger: PostgreSQL unreachable or failing; rows wait in the queue and are retried");
    }
}

async fn startup(
    ledger: &Ledger,
    client: &mut Option<tokio_postgres::Client>,
    budgets: Option<&MemoryLimiter>,
    started_at: i64,
) -> Result<(), LedgerError> {
    let mut c = ledger.connect().await?;
    tokio::time::timeout(STATEMENT_TIMEOUT * 3, migrate(&mut c))
        .await
        .map_err(|_| LedgerError::Timeout)??;
    if let Some(limiter) = budgets {
        let month = current_month();
        let spend = month_spend(&c, ledger, started_at).await?;
        for (tenant, micros) in &spend {
            limiter.add_spent(tenant, month, *micros);
        }
        tracing::info!(
            tenants = spend.len(),
            "usage ledger: this month's spend per tenant read into the budgets"
        );
    }
    *client = Some(c);
    Ok(())
}
