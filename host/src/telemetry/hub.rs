//! The one handle through which the host reports on itself: the metrics (when on), the
//! store, the CloudEvents sink, the request sample rate and the last errors. The server
//! starts it from the configuration and passes it to every part that reports; benchmarks
//! and tests pass [`Telemetry::off`], which counts and keeps nothing and only logs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use super::clock::{now_ms, rfc3339};
use super::metrics::Metrics;
use super::sink::Sink;
use super::spending::Spendings;
use super::store::{
    Change, Page, Query, RequestRecord, RouterState, Store, StoreError, StoredChange,
};
use crate::config::MonitoringConfig;

/// The last errors kept for `/admin/status`.
const ERRORS_KEPT: usize = 20;

pub struct Telemetry {
    metrics: Option<Metrics>,
    spendings: Spendings,
    store: Option<Store>,
    sink: Option<Sink>,
    sample: f64,
    payloads: bool,
    errors: Mutex<VecDeque<NotedError>>,
    /// Told each time a router state is kept: a cluster shares it at once.
    router_state_kept: tokio::sync::Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the CloudEvents sender for {url}: {source}")]
    Sink { url: String, source: std::io::Error },
    #[error("monitoring.request_sample must be between 0 and 1, not {0}")]
    Sample(f64),
}

/// Why the audit trail or the request log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the monitoring database is off (monitoring.database = \"\"); nothing is kept to read")]
    Off,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A recent error, for `/admin/status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NotedError {
    pub at: String,
    pub source: String,
    pub message: String,
}

impl Telemetry {
    /// Metrics (when `metrics`), the store and the sink as `config` says.
    pub fn start(
        config: &MonitoringConfig,
        metrics: bool,
    ) -> Result<Arc<Telemetry>, TelemetryError> {
        if !(0.0..=1.0).contains(&config.request_sample) {
            return Err(TelemetryError::Sample(config.request_sample));
        }
        let spendings = Spendings::new(config.core_hour_price);
        let metrics = metrics.then(|| {
            let mut metrics = Metrics::default();
            metrics.export(&spendings);
            metrics
        });
        let store = if config.database.as_os_str().is_empty() {
            None
        } else {
            Some(Store::open(&config.database, config.request_retention)?)
        };
        let sink = config
            .cloudevents_sink
            .clone()
            .map(|url| {
                let dropped = metrics.as_ref().map(Metrics::request_log_dropped);
                Sink::start(url.clone(), dropped)
                    .map_err(|source| TelemetryError::Sink { url, source })
            })
            .transpose()?;
        Ok(Arc::new(Telemetry {
            metrics,
            spendings,
            store,
            sink,
            sample: config.request_sample,
            payloads: config.request_payloads,
            errors: Mutex::new(VecDeque::new()),
            router_state_kept: tokio::sync::Notify::new(),
        }))
    }

    /// Nothing counted, kept or sent: changes and errors are only logged.
    pub fn off() -> Arc<Telemetry> {
        Arc::new(Telemetry {
            metrics: None,
            spendings: Spendings::new(None),
            store: None,
            sink: None,
            sample: 0.0,
            payloads: false,
            errors: Mutex::new(VecDeque::new()),
            router_state_kept: tokio::sync::Notify::new(),
        })
    }

    /// The metrics, when they are on.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    /// The CPU time and predictions of model versions and variants.
    pub fn spendings(&self) -> &Spendings {
        &self.spendings
    }

    /// Records a change: logged (target `modelyard::audit`) and stored.
    pub fn audit(&self, change: Change) {
        tracing::info!(
            target: "modelyard::audit",
            kind = change.kind, actor = %change.actor, subject = %change.subject,
            endpoint = change.endpoint.as_deref(), from = change.from.as_deref(),
            to = change.to.as_deref(), detail = change.detail.as_deref(),
            "change"
        );
        if change.kind.ends_with("refused") {
            self.note_error(
                change.kind,
                format!(
                    "{}: {}",
                    change.subject,
                    change.detail.as_deref().unwrap_or("refused")
                ),
            );
        }
        if let Some(store) = &self.store {
            store.change(now_ms(), change);
        }
    }

    /// Keeps an endpoint's new router state, so a restart continues where it stopped.
    pub fn keep_router_state(&self, state: RouterState) {
        if let Some(store) = &self.store {
            store.router_state(state);
        }
        self.router_state_kept.notify_one();
    }

    /// Resolves after a router state was kept (at once when one was kept since the last
    /// wait).
    pub async fn router_state_kept(&self) {
        self.router_state_kept.notified().await;
    }

    /// The router state kept for `endpoint` by the same `router`, if any (and the store is on).
    pub fn kept_router_state(&self, endpoint: &str, router: &str) -> Option<String> {
        self.store
            .as_ref()?
            .kept_router_state(endpoint, router)
            .map_err(|error| tracing::warn!(endpoint, %error, "cannot read the kept router state; the strategy starts afresh"))
            .ok()
            .flatten()
    }

    /// Writes out what the store still holds in memory; the server calls it on the way out.
    pub fn shutdown(&self) {
        if let Some(store) = &self.store {
            store.flush();
        }
    }

    /// Whether this request is one of the sampled; and whether its tensors are wanted.
    pub fn sample(&self) -> Option<bool> {
        (self.sample > 0.0 && (self.sample >= 1.0 || fastrand::f64() < self.sample))
            .then_some(self.payloads)
    }

    /// Keeps a sampled request in the store and sends it to the sink.
    pub fn record_request(&self, record: RequestRecord) {
        let mut dropped = false;
        if let Some(sink) = &self.sink {
            dropped |= !sink.send(record.clone());
        }
        if let Some(store) = &self.store {
            dropped |= !store.request(record);
        }
        if dropped && let Some(metrics) = &self.metrics {
            metrics.request_log_dropped().inc();
        }
    }

    fn store(&self) -> Result<&Store, ReadError> {
        self.store.as_ref().ok_or(ReadError::Off)
    }

    /// Whether changes and request samples are kept (`monitoring.database` is set), so that
    /// a reader knows before asking.
    pub fn keeps_records(&self) -> bool {
        self.store.is_some()
    }

    /// Stored changes, newest first. Blocks on the database: call off the async reactor.
    pub fn changes(&self, query: &Query) -> Result<Page<StoredChange>, ReadError> {
        Ok(self.store()?.changes(query)?)
    }

    /// Stored request samples, newest first. Blocks on the database.
    pub fn requests(&self, query: &Query) -> Result<Page<(i64, RequestRecord)>, ReadError> {
        Ok(self.store()?.requests(query)?)
    }

    /// Remembers an error an operator should see in `/admin/status`.
    pub fn note_error(&self, source: &str, message: String) {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
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
    pub fn recent_errors(&self) -> Vec<NotedError> {
        let errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        errors.iter().rev().cloned().collect()
    }
}
