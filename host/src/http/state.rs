//! What every handler shares: the pipeline, the telemetry, the body limit, the tokens,
//! the cluster.

use std::sync::Arc;

use super::auth::Tokens;
use super::overload::Admission;
use crate::cluster::Cluster;
use crate::dashboard::History;
use crate::pipeline::Pipeline;
use crate::telemetry::Telemetry;

pub struct HttpState {
    pub pipeline: Arc<Pipeline>,
    /// The last hour of every endpoint, which the dashboard draws.
    pub history: Arc<History>,
    /// Metrics, the audit trail, the request log and the errors `/admin/status` shows.
    pub telemetry: Arc<Telemetry>,
    /// What an inference request may hold: a place, its body, its client's time.
    pub admission: Admission,
    /// Whether `/admin/` asks for a client certificate (`server.tls.client_ca`).
    pub client_certificates: bool,
    /// Who may read and change things under `/admin/`.
    pub tokens: Tokens,
    /// Whether `/metrics` is on this port (it is not when `monitoring.metrics_listen`
    /// gives it one of its own).
    pub metrics_here: bool,
    /// The other replicas, when this one shares strategy state with them.
    pub cluster: Option<Arc<Cluster>>,
}
