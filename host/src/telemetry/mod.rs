//! What the host tells operators about itself: logs through `tracing` (readable lines, or
//! one JSON object per line for log collectors; filtered by `RUST_LOG`, default `info`, ONNX Runtime's own at `warn`),
//! Prometheus metrics, the audit trail of every change, a sample of requests (kept in an
//! embedded SQLite database, optionally sent as CloudEvents), W3C trace ids, and input
//! drift against each model's reference.
//!
//! Owns: the subscriber, the metrics registry, the store, the sink and the drift
//! statistics. Must not touch: what the rest of the host decides to log, count or audit.
//!
//! The parts are installed once per process by the server, like `tracing`'s global
//! dispatcher: until then (in benchmarks, say) counting and recording cost nothing and
//! keep nothing, and changes are only logged.

pub mod drift;
mod metrics;
mod sink;
mod store;
mod trace;

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

pub use metrics::{
    InFlight, Load, Metrics, PluginFailure, PluginMeter, RequestLabels, SchedulingMeters, Seconds,
    ShadowOutcome, VariantFailure,
};
pub use store::{
    Change, Page, Query, RequestRecord, RouterState, StoreError, StoredChange, rfc3339,
};
pub use trace::{TRACEPARENT, Trace};

use sink::Sink;
use store::Store;
use tracing_subscriber::EnvFilter;

/// ONNX Runtime reports every session's set-up at its info level: only its warnings by default.
const DEFAULT_FILTER: &str = "info,ort=warn";

use crate::config::MonitoringConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct Hub {
    metrics: Option<Metrics>,
    store: Option<Store>,
    sink: Option<Sink>,
    sample: f64,
    payloads: bool,
}

static HUB: OnceLock<Hub> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the CloudEvents sender for {url}: {source}")]
    Sink { url: String, source: std::io::Error },
    #[error("monitoring.request_sample must be between 0 and 1, not {0}")]
    Sample(f64),
}

/// Starts metrics (when `metrics`), the store and the sink as `config` says. Only the
/// first call of a process takes effect.
pub fn install(config: &MonitoringConfig, metrics: bool) -> Result<(), TelemetryError> {
    if !(0.0..=1.0).contains(&config.request_sample) {
        return Err(TelemetryError::Sample(config.request_sample));
    }
    let store = if config.database.as_os_str().is_empty() {
        None
    } else {
        Some(Store::open(&config.database, config.request_retention)?)
    };
    let sink = config
        .cloudevents_sink
        .clone()
        .map(|url| Sink::start(url.clone()).map_err(|source| TelemetryError::Sink { url, source }))
        .transpose()?;
    let hub = Hub {
        metrics: metrics.then(Metrics::default),
        store,
        sink,
        sample: config.request_sample,
        payloads: config.request_payloads,
    };
    if HUB.set(hub).is_err() {
        tracing::warn!("monitoring was already started in this process; keeping the first");
    }
    Ok(())
}

/// The metrics, when they are on.
pub fn metrics() -> Option<&'static Metrics> {
    HUB.get()?.metrics.as_ref()
}

/// Records a change: logged (target `modelyard::audit`) and stored.
pub fn audit(change: Change) {
    tracing::info!(
        target: "modelyard::audit",
        kind = change.kind, actor = %change.actor, subject = %change.subject,
        endpoint = change.endpoint.as_deref(), from = change.from.as_deref(),
        to = change.to.as_deref(), detail = change.detail.as_deref(),
        "change"
    );
    if change.kind.ends_with("refused") {
        note_error(
            change.kind,
            format!(
                "{}: {}",
                change.subject,
                change.detail.as_deref().unwrap_or("refused")
            ),
        );
    }
    if let Some(store) = HUB.get().and_then(|h| h.store.as_ref()) {
        store.change(now_ms(), change);
    }
}

/// Keeps an endpoint's new router state, so a restart continues where it stopped.
pub fn keep_router_state(state: RouterState) {
    if let Some(store) = HUB.get().and_then(|h| h.store.as_ref()) {
        store.router_state(state);
    }
}

/// The router state kept for `endpoint` by the same `router`, if any (and the store is on).
pub fn kept_router_state(endpoint: &str, router: &str) -> Option<String> {
    let store = HUB.get()?.store.as_ref()?;
    store
        .kept_router_state(endpoint, router)
        .map_err(|error| tracing::warn!(endpoint, %error, "cannot read the kept router state; the strategy starts afresh"))
        .ok()
        .flatten()
}

/// Writes out what the store still holds in memory; the server calls it on the way out.
pub fn shutdown() {
    if let Some(store) = HUB.get().and_then(|h| h.store.as_ref()) {
        store.flush();
    }
}

/// Whether this request is one of the sampled; and whether its tensors are wanted.
pub fn sample() -> Option<bool> {
    let hub = HUB.get()?;
    (hub.sample > 0.0 && (hub.sample >= 1.0 || fastrand::f64() < hub.sample))
        .then_some(hub.payloads)
}

/// Keeps a sampled request in the store and sends it to the sink.
pub fn record_request(record: RequestRecord) {
    let Some(hub) = HUB.get() else { return };
    let mut dropped = false;
    if let Some(sink) = &hub.sink {
        dropped |= !sink.send(record.clone());
    }
    if let Some(store) = &hub.store {
        dropped |= !store.request(record);
    }
    if dropped && let Some(metrics) = &hub.metrics {
        metrics.request_log_dropped();
    }
}

/// Why the audit trail or the request log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the monitoring database is off (monitoring.database = \"\"); nothing is kept to read")]
    Off,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn store() -> Result<&'static Store, ReadError> {
    HUB.get()
        .and_then(|h| h.store.as_ref())
        .ok_or(ReadError::Off)
}

/// Stored changes, newest first. Blocks on the database: call off the async reactor.
pub fn changes(query: &Query) -> Result<Page<StoredChange>, ReadError> {
    Ok(store()?.changes(query)?)
}

/// Stored request samples, newest first. Blocks on the database.
pub fn requests(query: &Query) -> Result<Page<(i64, RequestRecord)>, ReadError> {
    Ok(store()?.requests(query)?)
}

/// A recent error, for `/admin/status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NotedError {
    pub at: String,
    pub source: String,
    pub message: String,
}

/// The last errors kept for `/admin/status`.
const ERRORS_KEPT: usize = 20;

static ERRORS: Mutex<VecDeque<NotedError>> = Mutex::new(VecDeque::new());

/// Remembers an error an operator should see in `/admin/status`.
pub fn note_error(source: &str, message: String) {
    let mut errors = ERRORS.lock().unwrap_or_else(PoisonError::into_inner);
    if errors.len() == ERRORS_KEPT {
        errors.pop_front();
    }
    errors.push_back(NotedError {
        at: rfc3339(now_ms() as i64),
        source: source.to_string(),
        message,
    });
}

/// The last errors, newest first.
pub fn recent_errors() -> Vec<NotedError> {
    let errors = ERRORS.lock().unwrap_or_else(PoisonError::into_inner);
    errors.iter().rev().cloned().collect()
}
