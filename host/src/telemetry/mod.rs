//! What the host tells operators about itself: logs through `tracing` (readable lines, or
//! one JSON object per line for log collectors; filtered by `RUST_LOG`, default `info`, ONNX Runtime's own at `warn`),
//! Prometheus metrics, the audit trail of every change, a sample of requests (kept in an
//! embedded SQLite database, optionally sent as CloudEvents), W3C trace ids, and input
//! drift against each model's reference.
//!
//! Owns: the subscriber, the metrics registry and the label values it accepts, the store,
//! the sink and the drift statistics. Must not touch: what the rest of the host decides to log, count or audit.
//!
//! The parts are reached through one [`Telemetry`] handle, which the server starts and
//! passes to every part that reports (benchmarks and tests pass `Telemetry::off()`); only
//! the log subscriber is process-wide, as `tracing`'s dispatcher is.

mod clock;
pub mod drift;
mod hub;
mod metrics;
mod sink;
mod spending;
mod store;
mod throttle;
mod trace;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub use clock::{now_ms, rfc3339};
pub use hub::{NotedError, ReadError, Telemetry, TelemetryError};
pub use metrics::{
    InFlight, Load, Metrics, PluginFailure, PluginMeter, RequestLabels, SchedulingMeters, Seconds,
    ShadowOutcome, VariantFailure,
};
pub use spending::{Spending, Spendings, Spent};
pub use store::{Change, Page, Query, RequestRecord, RouterState, StoreError, StoredChange};
pub use throttle::Throttle;
pub use trace::{TRACEPARENT, Trace};

/// ONNX Runtime reports every session's set-up at its info level: only its warnings by default.
const DEFAULT_FILTER: &str = "info,ort=warn";

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
