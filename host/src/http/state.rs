//! What every handler shares: the pipeline, the telemetry, the body limit, the tokens.

use std::sync::Arc;

use super::auth::Tokens;
use crate::pipeline::Pipeline;
use crate::telemetry::Telemetry;

pub struct HttpState {
    pub pipeline: Arc<Pipeline>,
    /// Metrics, the audit trail, the request log and the errors `/admin/status` shows.
    pub telemetry: Arc<Telemetry>,
    /// Request bodies above this many bytes are refused with 413.
    pub max_body_bytes: usize,
    /// Who may read and change things under `/admin/`.
    pub tokens: Tokens,
    /// Whether `/metrics` is on this port (it is not when `monitoring.metrics_listen`
    /// gives it one of its own).
    pub metrics_here: bool,
}
