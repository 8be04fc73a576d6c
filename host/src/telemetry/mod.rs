//! Logs through `tracing`: readable lines by default, one JSON object per line for log
//! collectors. Filtered by `RUST_LOG` (default `info`). And metrics for Prometheus.
//!
//! Owns: the subscriber and the metrics registry. Must not touch: what the rest of the host
//! decides to log or count.

mod metrics;

use std::io::IsTerminal;

pub use metrics::{InFlight, Metrics, RequestLabels};

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
