//! The live configuration and everything derived from it (tenant key index, routing
//! tables, upstream clients, breakers), built in one go and swapped atomically.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use parley_crds::GatewayConfig;
use parley_crds::gateway_config::{
    ModelConfig, ModelKind, ModelQuotaConfig, Provider, RateLimitConfig, SecretSource,
    TimeoutsConfig,
};
use parley_crds::money::parse_usd_micros;
use sha2::{Digest, Sha256};

use crate::breaker::Breaker;
use crate::ledger::Ledger;
use crate::metrics::{BackendLabels, Label, Metrics};
use crate::redis_state::{self, Redis};
use crate::upstream::Upstream;
use crate::upstream::http1::Http1Client;

/// The HTTP client used for upstream calls (HTTP/1.1 and HTTP/2, TLS via rustls).
pub type HttpClient =
    Client<hyper_rustls::HttpsConnector<crate::overhead::TimedConnector>, Full<Bytes>>;

/// An upstream auth header, ready to send.
#[derive(Clone, Debug)]
pub struct Auth {
    /// `authorization` or `x-api-key`.
    pub name: HeaderName,
    /// The value (marked sensitive).
    pub value: HeaderValue,
}

impl Auth {
    fn new(provider: Provider, key: &str) -> Option<Self> {
        let (name, text) = match provider {
            Provider::Openai => (http::header::AUTHORIZATION, format!("Bearer {key}")),
            Provider::Anthropic => (HeaderName::from_static("x-api-key"), key.to_string()),
        };
        let mut value = HeaderValue::from_str(&text).ok()?;
        value.set_sensitive(true);
        Some(Self { name, value })
    }
}

/// One backend of a model.
pub struct Backend {
    /// Name (unique in the model).
    pub name: Label,
    /// API it speaks.
    pub provider: Provider,
    /// Full endpoint URL.
    pub url: Uri,
    /// `<baseUrl>/responses` when the backend speaks the Responses API (`responsesApi`).
    pub responses_url: Option<Uri>,
    /// Model name sent upstream.
    pub upstream_model: String,
    /// Route key, if any.
    pub auth: Option<Auth>,
    /// Traffic share; 0 = standby.
    pub weight: u32,
    /// Timeouts.
    pub timeouts: TimeoutsConfig,
    /// Pooled connections to this backend.
    pub client: Upstream,
    /// Its breaker (kept across reloads).
    pub breaker: Arc<Breaker>,
    /// Pre-built metric labels.
    pub labels: BackendLabels,
}

/// One model.
pub struct Model {
    /// Name clients use.
    pub name: Label,
    /// The config.
    pub config: ModelConfig,
    /// Backends.
    pub backends: Vec<Backend>,
    /// `(input, output)` micro-USD per million tokens.
    pub price: (i64, i64),
    /// Highest `(input, output)` price along the fallback chain (for reservations).
    pub chain_price: (i64, i64),
}

impl Model {
    /// Cost in micro-USD of `usage` at this model's price (rounded up).
    pub fn cost(&self, input: u64, output: u64) -> i64 {
        cost_at(self.price, input, output)
    }
}

/// Micro-USD for tokens at `(input, output)` micro-USD per million, rounded up.
pub fn cost_at(price: (i64, i64), input: u64, output: u64) -> i64 {
    let total = i128::from(price.0) * i128::from(input) + i128::from(price.1) * i128::from(output);
    i64::try_from((total + 999_999) / 1_000_000).unwrap_or(i64::MAX)
}

/// One tenant.
pub struct Tenant {
    /// Id (`namespace/name`), the metrics label.
    pub id: Label,
    /// Models it may use; `None` = all.
    pub allowed: Option<HashSet<String>>,
    /// Tenant-wide limits.
    pub rate_limit: Option<RateLimitConfig>,
    /// Per-model quotas.
    pub quotas: HashMap<String, ModelQuotaConfig>,
    /// Monthly budget in micro-USD.
    pub budget_micros: Option<i64>,
    /// `(model, backend)` -> tenant-owned key.
    pub upstream_keys: HashMap<(String, String), Auth>,
    /// Largest request body it may send (its own limit, or `limits.maxBodyBytes`).
    pub max_body_bytes: u64,
}

impl Tenant {
    /// Whether it may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(model))
    }
}

/// The live state.
pub struct Runtime {
    /// The config it was built from.
    pub config: GatewayConfig,
    /// Hash of the config text and the secrets it read.
    pub hash: String,
    /// Tenants.
    pub tenants: Vec<Tenant>,
    /// SHA-256 of each key -> index into `tenants`.
    pub keys: HashMap<[u8; 32], usize>,
    /// Models by name.
    pub models: HashMap<String, Arc<Model>>,
    /// Allowed CORS origins (`None` = no CORS).
    pub cors: Option<HashSet<String>>,
    /// Shared state (limits, sessions, cache) when `redis` is configured and this is a
    /// serving process (`check` only validates the URL).
    pub redis: Option<Arc<Redis>>,
    /// The usage ledger when `usage.postgresUrl` is configured and this is a serving
    /// process.
    pub ledger: Option<Arc<Ledger>>,
}

impl Runtime {
    /// The tenant a key belongs to.
    pub fn tenant_for_key(&self, key: &[u8]) -> Option<&Tenant> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        self.keys.get(&digest).map(|i| &self.tenants[*i])
    }

    /// `model` followed by its fallbacks, transitively, each once.
    pub fn chain(&self, model: &str) -> Vec<Arc<Model>> {
        let mut out: Vec<Arc<Model>> = Vec::new();
        let mut queue = vec![model.to_string()];
        let mut i = 0;
        while i < queue.len() {
            let name = queue[i].clone();
            i += 1;
            if out.iter().any(|m| *m.name == name) {
                continue;
            }
            if let Some(m) = self.models.get(&name) {
                out.push(Arc::clone(m));
                for f in &m.config.fallbacks {
                    queue.push(f.clone());
                }
            }
        }
        out
    }
}

/// What lives across reloads: pooled clients, breakers and the missing-secret log.
pub struct Shared {
    /// By (connect timeout, HTTP/2 with prior knowledge).
    clients: Mutex<HashMap<(u64, bool), Upstream>>,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
    warned: Mutex<HashSet<String>>,
    warnings: Mutex<Vec<String>>,
    redis: Mutex<Option<([u8; 32], Arc<Redis>)>>,
    ledger: Mutex<Option<([u8; 32], Arc<Ledger>)>>,
    tls: rustls::ClientConfig,
    /// The in-process limiter (also `AppState::limiter`): the ledger adds this month's
    /// spend to its budgets at start when there is no Redis.
    pub limiter: Arc<crate::limits::MemoryLimiter>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// `--secrets-dir`: replaces the config's `secretsDir` (absolute).
    pub secrets_dir: Option<PathBuf>,
    /// `check`: only validate. Warnings are collected (see [`Shared::warnings`]) instead of
    /// logged, and a `redis.url` that cannot be read yet is a warning, not a problem.
    pub check_only: bool,
}

impl Shared {
    /// Empty state.
    pub fn new(metrics: Arc<Metrics>) -> Result<Self, String> {
        Ok(Self {
            clients: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashSet::new()),
            warnings: Mutex::new(Vec::new()),
            redis: Mutex::new(None),
            ledger: Mutex::new(None),
            tls: tls_config()?,
            limiter: Arc::new(crate::limits::MemoryLimiter::default()),
            metrics,
            secrets_dir: None,
            check_only: false,
        })
    }

    /// Every distinct warning so far (unusable keys, settings not implemented), in order.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().clone()
    }

    /// The client for a backend (`h2c`: HTTP/2 with prior knowledge, for `http://`).
    fn client(&self, connect_ms: u64, h2c: bool) -> Upstream {
        let mut clients = self.clients.lock();
        clients
            .entry((connect_ms, h2c))
            .or_insert_with(|| {
                let tls = self.tls.clone();
                let http1 = (!h2c).then(|| Http1Client::new(Duration::from_millis(connect_ms)));
                Upstream::new(move || build_client(connect_ms, &tls, h2c), http1)
            })
            .clone()
    }

    fn breaker(&self, key: String, model: &ModelConfig) -> Arc<Breaker> {
        let cb = model.circuit_breaker;
        let open = Duration::from_secs(cb.open_seconds);
        let mut breakers = self.breakers.lock();
        let b = breakers
            .entry(key)
            .or_insert_with(|| Arc::new(Breaker::new(cb.failure_threshold, open)));
        b.configure(cb.failure_threshold, open);
        Arc::clone(b)
    }

    /// The Redis client for `url`, kept across reloads while the URL and the Chatbot stay
    /// the same. Outside an async runtime (`check`) the URL is only validated.
    fn redis(&self, url: &str, chatbot: &str) -> Result<Option<Arc<Redis>>, String> {
        if tokio::runtime::Handle::try_current().is_err() {
            return redis_state::check_url(url).map(|()| None);
        }
        let mut h = Sha256::new();
        h.update(url.as_bytes());
        h.update([0]);
        h.update(chatbot.as_bytes());
        let digest: [u8; 32] = h.finalize().into();
        let mut slot = self.redis.lock();
        if let Some((d, r)) = slot.as_ref()
            && *d == digest
        {
            return Ok(Some(Arc::clone(r)));
        }
        let r = Arc::new(Redis::connect(
            url,
            redis_state::PREFIX,
            chatbot,
            Arc::clone(&self.metrics),
        )?);
        *slot = Some((digest, Arc::clone(&r)));
        // Never the URL: it holds the password.
        tracing::info!(
            prefix = redis_state::PREFIX,
            chatbot,
            "limits, /chat sessions and the response cache are shared through Redis"
        );
        Ok(Some(r))
    }

    /// The usage ledger for `url`, kept across reloads while the URL, the Chatbot and
    /// whether budgets are kept in process stay the same. Outside an async runtime
    /// (`check`) the URL is only validated.
    fn ledger(&self, url: &str, chatbot: &str, seed: bool) -> Result<Option<Arc<Ledger>>, String> {
        if tokio::runtime::Handle::try_current().is_err() {
            return crate::ledger::check_url(url).map(|_| None);
        }
        let mut h = Sha256::new();
        h.update(url.as_bytes());
        h.update([0]);
        h.update(chatbot.as_bytes());
        h.update([u8::from(seed)]);
        let digest: [u8; 32] = h.finalize().into();
        let mut slot = self.ledger.lock();
        if let Some((d, l)) = slot.as_ref()
            && *d == digest
        {
            return Ok(Some(Arc::clone(l)));
        }
        let l = Ledger::start(
            url,
            chatbot,
            self.tls.clone(),
            Arc::clone(&self.metrics),
            seed.then(|| Arc::clone(&self.limiter)),
        )?;
        *slot = Some((digest, Arc::clone(&l)));
        // Never the URL: it holds the password.
        tracing::info!(chatbot, "usage is written to the ledger in PostgreSQL");
        Ok(Some(l))
    }

    fn warn_once(&self, what: &str, message: &str) {
        if self.warned.lock().insert(what.to_string()) {
            self.warnings.lock().push(message.to_string());
            if !self.check_only {
                tracing::warn!(about = what, "{message}");
            }
        }
    }
}

pub(crate) fn tls_config() -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!("no system CA certificates found; https upstreams will fail");
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// An upstream client; `h2c`: HTTP/2 only (for `http://` upstreams, prior knowledge).
pub(crate) fn build_client(connect_ms: u64, tls: &rustls::ClientConfig, h2c: bool) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_millis(connect_ms)));
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        // Records when bytes move, for `parley_overhead_seconds`.
        .wrap_connector(crate::overhead::TimedConnector(http));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .http1_writev(false)
        .http2_only(h2c)
        .build(connector)
}

/// Where relative secret files live.
pub fn secrets_base(config: &GatewayConfig, config_path: &Path) -> PathBuf {
    let config_dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    match &config.secrets_dir {
        Some(d) if d.is_absolute() => d.clone(),
        Some(d) => config_dir.join(d),
        None => config_dir,
    }
}

/// The file behind a secret source, if it is one.
pub fn secret_path(source: &SecretSource, base: &Path) -> Option<PathBuf> {
    match source {
        SecretSource::File(p) if p.is_absolute() => Some(p.clone()),
        SecretSource::File(p) => Some(base.join(p)),
        _ => None,
    }
}

/// Every secret file a config names.
pub fn secret_files(config: &GatewayConfig, base: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = config
        .redis
        .as_ref()
        .and_then(|r| secret_path(&r.url, base))
    {
        out.push(p);
    }
    if let Some(p) = config
        .usage
        .as_ref()
        .and_then(|u| secret_path(&u.postgres_url, base))
    {
        out.push(p);
    }
    for m in &config.models {
        for b in &m.backends {
            if let Some(p) = b.api_key.as_ref().and_then(|s| secret_path(s, base)) {
                out.push(p);
            }
        }
    }
    for t in &config.tenants {
        for k in &t.api_keys {
            if let Some(p) = secret_path(k, base) {
                out.push(p);
            }
        }
        for k in &t.upstream_keys {
            if let Some(p) = secret_path(&k.api_key, base) {
                out.push(p);
            }
        }
    }
    out
}

/// Why a secret could not be read.
#[derive(Debug)]
enum SecretError {
    /// The file does not exist (yet).
    Missing(PathBuf, Option<(String, String)>),
    /// Anything else, said in full.
    Other(String),
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(path, Some((secret, key))) => write!(
                f,
                "secret file {} does not exist (in a pod: key {key:?} of Secret {secret:?}; --secrets-dir DIR reads DIR/{secret}/{key} instead)",
                path.display()
            ),
            Self::Missing(path, None) => {
                write!(f, "secret file {} does not exist", path.display())
            }
            Self::Other(text) => f.write_str(text),
        }
    }
}

/// `(secret, key)` when a relative secret file follows the rendered layout `<secret>/<key>`.
fn secret_and_key(source: &SecretSource) -> Option<(String, String)> {
    let SecretSource::File(p) = source else {
        return None;
    };
    if p.is_absolute() {
        return None;
    }
    let parts: Vec<&str> = p
        .components()
        .map(|c| c.as_os_str().to_str())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [secret, key] => Some((secret.to_string(), key.to_string())),
        _ => None,
    }
}

fn resolve(source: &SecretSource, base: &Path) -> Result<String, SecretError> {
    match source {
        SecretSource::Value(v) => Ok(v.clone()),
        SecretSource::Env(name) => std::env::var(name)
            .map(|v| v.trim().to_string())
            .map_err(|_| SecretError::Other(format!("environment variable {name} is not set"))),
        SecretSource::File(_) => {
            let path = secret_path(source, base).unwrap_or_default();
            match std::fs::read_to_string(&path) {
                Ok(v) => Ok(v.trim().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(SecretError::Missing(path, secret_and_key(source)))
                }
                Err(e) => Err(SecretError::Other(format!(
                    "secret file {} cannot be read: {e}",
                    path.display()
                ))),
            }
        }
    }
}

fn source_name(source: &SecretSource, base: &Path) -> String {
    match source {
        SecretSource::Value(_) => "<value>".into(),
        SecretSource::Env(n) => format!("env:{n}"),
        SecretSource::File(_) => secret_path(source, base)
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    }
}

/// The state before any valid config: no models, no tenants; listen addresses read
/// leniently from the file when it has them (else the defaults).
pub fn placeholder(config_path: &Path, shared: &Shared) -> Result<Runtime, Vec<String>> {
    let value: Option<serde_yaml::Value> = std::fs::read_to_string(config_path)
        .ok()
        .and_then(|t| serde_yaml::from_str(&t).ok());
    let field = |name: &str, default: &str| {
        value
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(|v| v.as_str())
            .unwrap_or(default)
            .to_string()
    };
    let config = GatewayConfig {
        api_version: parley_crds::gateway_config::API_VERSION.to_string(),
        chatbot: parley_crds::gateway_config::default_chatbot(),
        listen: field("listen", "0.0.0.0:8080"),
        admin_listen: field("adminListen", "0.0.0.0:9090"),
        secrets_dir: None,
        default_model: String::new(),
        system_prompt: None,
        models: Vec::new(),
        tenants: Vec::new(),
        redis: None,
        rate_limit_failure_mode: Default::default(),
        sessions: Default::default(),
        usage: None,
        cors: None,
        limits: Default::default(),
    };
    let mut rt = build(config, "", config_path, shared)?;
    rt.hash = "none".into();
    Ok(rt)
}

/// Longest duration any setting may mean (absurd values would overflow clocks).
const MAX_SECONDS: u64 = 366 * 86_400;

/// Caps every duration of the config at [`MAX_SECONDS`].
fn clamp_durations(config: &mut GatewayConfig) {
    let ms = MAX_SECONDS * 1000;
    for m in &mut config.models {
        for b in &mut m.backends {
            b.timeouts.connect_ms = b.timeouts.connect_ms.min(ms);
            b.timeouts.first_token_ms = b.timeouts.first_token_ms.min(ms);
            b.timeouts.total_ms = b.timeouts.total_ms.min(ms);
        }
        m.retry.initial_backoff_ms = m.retry.initial_backoff_ms.min(ms);
        m.retry.max_backoff_ms = m.retry.max_backoff_ms.min(ms);
        m.circuit_breaker.open_seconds = m.circuit_breaker.open_seconds.min(MAX_SECONDS);
        if let Some(c) = &mut m.cache {
            c.ttl_seconds = c.ttl_seconds.min(MAX_SECONDS);
        }
    }
    config.sessions.ttl_seconds = config.sessions.ttl_seconds.min(MAX_SECONDS);
}

/// Builds the live state. `text` is the config file's content (hashed).
pub fn build(
    mut config: GatewayConfig,
    text: &str,
    config_path: &Path,
    shared: &Shared,
) -> Result<Runtime, Vec<String>> {
    clamp_durations(&mut config);
    if let Some(dir) = &shared.secrets_dir {
        config.secrets_dir = Some(dir.clone());
    }
    let base = secrets_base(&config, config_path);
    let mut problems = Vec::new();
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    let secret = |source: &SecretSource, what: &str, hasher: &mut Sha256| -> Option<String> {
        match resolve(source, &base) {
            Ok(v) if !v.is_empty() => {
                hasher.update(Sha256::digest(v.as_bytes()));
                Some(v)
            }
            Ok(_) => {
                shared.warn_once(
                    &source_name(source, &base),
                    &format!("{what}: the secret is empty; this key is unusable"),
                );
                None
            }
            Err(e) => {
                shared.warn_once(
                    &source_name(source, &base),
                    &format!("{what}: {e}; this key is unusable until it appears"),
                );
                None
            }
        }
    };

    let mut models = HashMap::new();
    for m in &config.models {
        // An invalid price is one of GatewayConfig::problems().
        let price = m
            .pricing
            .as_ref()
            .and_then(|p| p.micros_per_million().ok())
            .unwrap_or((0, 0));
        let name: Label = Arc::new(m.name.clone());
        let mut backends = Vec::new();
        for b in &m.backends {
            let suffix = match (m.kind, b.provider) {
                (ModelKind::Embeddings, _) => "/embeddings",
                (ModelKind::Chat, Provider::Openai) => "/chat/completions",
                (ModelKind::Chat, Provider::Anthropic) => "/messages",
            };
            let url_text = format!("{}{}", b.base_url.trim_end_matches('/'), suffix);
            let url: Uri = match url_text.parse() {
                Ok(u) => u,
                Err(e) => {
                    problems.push(format!(
                        "models {} backend {}: baseUrl {:?} is not a URL: {e}",
                        m.name, b.name, b.base_url
                    ));
                    continue;
                }
            };
            let auth = b
                .api_key
                .as_ref()
                .and_then(|s| {
                    secret(
                        s,
                        &format!("model {} backend {} apiKey", m.name, b.name),
                        &mut hasher,
                    )
                })
                .and_then(|k| Auth::new(b.provider, &k));
            let bname: Label = Arc::new(b.name.clone());
            let breaker =
                shared.breaker(format!("{}\u{0}{}\u{0}{}", m.name, b.name, b.base_url), m);
            let labels = BackendLabels {
                model: Arc::clone(&name),
                backend: Arc::clone(&bname),
            };
            shared
                .metrics
                .breaker
                .get_or_create(&labels)
                .set(breaker.state().gauge());
            let responses_url = if b.responses_api {
                format!("{}/responses", b.base_url.trim_end_matches('/'))
                    .parse::<Uri>()
                    .ok()
            } else {
                None
            };
            backends.push(Backend {
                name: bname,
                provider: b.provider,
                url,
                responses_url,
                upstream_model: b.upstream_model.clone().unwrap_or_else(|| m.name.clone()),
                auth,
                weight: b.weight,
                timeouts: b.timeouts,
                client: shared.client(b.timeouts.connect_ms, b.h2c),
                breaker,
                labels,
            });
        }
        models.insert(
            m.name.clone(),
            Model {
                name,
                config: m.clone(),
                backends,
                price,
                chain_price: price,
            },
        );
    }
    // Highest price along each fallback chain.
    let prices: HashMap<String, (i64, i64)> =
        models.iter().map(|(k, m)| (k.clone(), m.price)).collect();
    let mut models: HashMap<String, Arc<Model>> = models
        .into_iter()
        .map(|(k, mut m)| {
            let mut seen = HashSet::new();
            let mut stack = vec![k.clone()];
            while let Some(n) = stack.pop() {
                if !seen.insert(n.clone()) {
                    continue;
                }
                if let Some(p) = prices.get(&n) {
                    m.chain_price = (m.chain_price.0.max(p.0), m.chain_price.1.max(p.1));
                }
                if let Some(c) = config.model(&n) {
                    stack.extend(c.fallbacks.iter().cloned());
                }
            }
            (k, Arc::new(m))
        })
        .collect();
    models.shrink_to_fit();

    let redis = match &config.redis {
        None => None,
        Some(r) => match resolve(&r.url, &base) {
            Ok(url) if !url.is_empty() => {
                hasher.update(Sha256::digest(url.as_bytes()));
                match shared.redis(&url, &config.chatbot) {
                    Ok(r) => r,
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                }
            }
            // Never the URL itself: it holds the password.
            Ok(_) => {
                problems.push(format!(
                    "redis.url ({}) is empty",
                    source_name(&r.url, &base)
                ));
                None
            }
            // A file that is not there (yet) degrades the shared state, not the whole
            // config: until it appears (the file is watched) limits follow
            // `rateLimitFailureMode`, `/chat` answers 503 and the cache is off, exactly
            // as while Redis is unreachable (`store::Store::RedisDown`).
            Err(e @ SecretError::Missing(..)) => {
                shared.warn_once(
                    &source_name(&r.url, &base),
                    &format!(
                        "redis.url: {e}; until it can be read, limits follow rateLimitFailureMode ({}), /chat answers 503 and the response cache is off",
                        match config.rate_limit_failure_mode {
                            parley_crds::gateway_config::FailureMode::Open => "open: admitted without limits",
                            parley_crds::gateway_config::FailureMode::Closed => "closed: refused with 503",
                        }
                    ),
                );
                None
            }
            Err(e) => {
                problems.push(format!("redis.url: {e}"));
                None
            }
        },
    };

    let ledger = match &config.usage {
        None => None,
        Some(u) => match resolve(&u.postgres_url, &base) {
            Ok(url) if !url.is_empty() => {
                hasher.update(Sha256::digest(url.as_bytes()));
                match shared.ledger(&url, &config.chatbot, config.redis.is_none()) {
                    Ok(l) => l,
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                }
            }
            Ok(_) => {
                problems.push(format!(
                    "usage.postgresUrl ({}) is empty",
                    source_name(&u.postgres_url, &base)
                ));
                None
            }
            // Like a missing redis.url: the ledger is off until the file appears.
            Err(e @ SecretError::Missing(..)) => {
                shared.warn_once(
                    &source_name(&u.postgres_url, &base),
                    &format!(
                        "usage.postgresUrl: {e}; until it can be read, no usage rows are written (usage is in the metrics only)"
                    ),
                );
                None
            }
            Err(e) => {
                problems.push(format!("usage.postgresUrl: {e}"));
                None
            }
        },
    };

    let mut tenants = Vec::new();
    let mut keys = HashMap::new();
    for (i, t) in config.tenants.iter().enumerate() {
        for k in &t.api_keys {
            if let Some(v) = secret(k, &format!("tenant {} apiKey", t.id), &mut hasher) {
                let digest: [u8; 32] = Sha256::digest(v.as_bytes()).into();
                if let Some(other) = keys.insert(digest, i)
                    && other != i
                {
                    problems.push(format!(
                        "tenants {} and {}: the same API key belongs to two tenants",
                        config.tenants[other].id, t.id
                    ));
                }
            }
        }
        let mut upstream_keys = HashMap::new();
        for uk in &t.upstream_keys {
            let provider = config
                .model(&uk.model)
                .and_then(|m| m.backends.iter().find(|b| b.name == uk.backend))
                .map(|b| b.provider);
            // A key naming no backend is one of GatewayConfig::problems().
            let Some(provider) = provider else {
                continue;
            };
            if let Some(v) = secret(
                &uk.api_key,
                &format!("tenant {} upstreamKey", t.id),
                &mut hasher,
            ) && let Some(auth) = Auth::new(provider, &v)
            {
                upstream_keys.insert((uk.model.clone(), uk.backend.clone()), auth);
            }
        }
        let budget_micros = match &t.budget {
            Some(b) => parse_usd_micros(&b.monthly_usd).ok(),
            None => None,
        };
        tenants.push(Tenant {
            id: Arc::new(t.id.clone()),
            allowed: if t.allowed_models.is_empty() {
                None
            } else {
                Some(t.allowed_models.iter().cloned().collect())
            },
            rate_limit: t.rate_limit,
            quotas: t
                .model_quotas
                .iter()
                .map(|q| (q.model.clone(), q.clone()))
                .collect(),
            budget_micros,
            upstream_keys,
            max_body_bytes: t.max_body_bytes.unwrap_or(config.limits.max_body_bytes),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let cors = config
        .cors
        .as_ref()
        .map(|c| c.allowed_origins.iter().cloned().collect());
    let hash = hex::encode(&hasher.finalize()[..8]);
    Ok(Runtime {
        config,
        hash,
        tenants,
        keys,
        models,
        cors,
        redis,
        ledger,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const CONFIG: &str = r#"
apiVersion: parley.dev/gateway/v1
defaultModel: a
models:
- name: a
  fallbacks: [b]
  pricing: {inputPerMillionTokens: "1.00", outputPerMillionTokens: "2.00"}
  backends: [{name: p, provider: openai, baseUrl: "http://127.0.0.1:1/v1", apiKey: {value: k1}}]
- name: b
  fallbacks: [c]
  pricing: {inputPerMillionTokens: "3.00", outputPerMillionTokens: "1.00"}
  backends: [{name: p, provider: anthropic, baseUrl: "http://127.0.0.1:1/v1/"}]
- name: c
  backends: [{name: p, provider: openai, baseUrl: "http://127.0.0.1:1/v1"}]
tenants:
- {id: ns/acme, apiKeys: [{value: key-a}], allowedModels: [a, c]}
- {id: ns/other, apiKeys: [{file: missing/key}]}
"#;

    #[test]
    fn embeddings_models_call_the_embeddings_endpoint() {
        let text = "apiVersion: parley.dev/gateway/v1\ndefaultModel: c\nmodels:\n- name: c\n  backends: [{name: p, provider: openai, baseUrl: 'http://127.0.0.1:1/v1'}]\n- name: e\n  kind: embeddings\n  backends: [{name: p, provider: openai, baseUrl: 'http://127.0.0.1:1/v1/'}]\n";
        let shared = Shared::new(Arc::new(Metrics::new())).unwrap();
        let cfg = GatewayConfig::from_yaml(text).unwrap();
        let rt = build(cfg, text, Path::new("/nonexistent/config.yaml"), &shared).unwrap();
        assert_eq!(
            rt.models["c"].backends[0].url,
            "http://127.0.0.1:1/v1/chat/completions"
        );
        assert_eq!(
            rt.models["e"].backends[0].url,
            "http://127.0.0.1:1/v1/embeddings"
        );
    }

    #[test]
    fn builds_indexes_chains_and_prices() {
        let shared = Shared::new(Arc::new(Metrics::new())).unwrap();
        let cfg = GatewayConfig::from_yaml(CONFIG).unwrap();
        let rt = build(cfg, CONFIG, Path::new("/nonexistent/config.yaml"), &shared).unwrap();
        let t = rt.tenant_for_key(b"key-a").unwrap();
        assert_eq!(*t.id, "ns/acme");
        assert!(t.may_use("a") && !t.may_use("b"));
        assert!(rt.tenant_for_key(b"key-b").is_none());
        let chain: Vec<String> = rt.chain("a").iter().map(|m| (*m.name).clone()).collect();
        assert_eq!(chain, ["a", "b", "c"]);
        let a = &rt.models["a"];
        assert_eq!(a.chain_price, (3_000_000, 2_000_000));
        assert_eq!(a.backends[0].url, "http://127.0.0.1:1/v1/chat/completions");
        assert_eq!(
            rt.models["b"].backends[0].url,
            "http://127.0.0.1:1/v1/messages"
        );
        assert_eq!(a.cost(1_000_000, 500_000), 2_000_000);
        assert_eq!(cost_at((1, 0), 1, 0), 1, "rounded up");
    }

    #[test]
    fn breakers_survive_rebuilds() {
        let shared = Shared::new(Arc::new(Metrics::new())).unwrap();
        let cfg = GatewayConfig::from_yaml(CONFIG).unwrap();
        let rt1 = build(cfg.clone(), CONFIG, Path::new("/x/c.yaml"), &shared).unwrap();
        let rt2 = build(cfg, CONFIG, Path::new("/x/c.yaml"), &shared).unwrap();
        assert!(Arc::ptr_eq(
            &rt1.models["a"].backends[0].breaker,
            &rt2.models["a"].backends[0].breaker
        ));
        assert_eq!(rt1.hash, rt2.hash);
    }
}
