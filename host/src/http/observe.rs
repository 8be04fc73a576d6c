//! What the HTTP layer reports about requests: the request metrics, counted by one layer
//! around the infer routes (in flight while a request runs, then by endpoint, variant,
//! model, version and status, with its duration), the server's own failures kept for
//! `/admin/status`, and `/metrics` itself. Handlers only say who answered, on the response.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use super::error::{ApiError, Served, ServerFault};
use super::state::HttpState;
use crate::telemetry::{RequestLabels, Telemetry};

/// Counts an infer request. The name called comes from the path; label values the
/// metrics do not know (a name that is neither endpoint nor model) they count as `unknown`.
pub(super) async fn count_requests(
    State(state): State<Arc<HttpState>>,
    Path(params): Path<Vec<(String, String)>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(metrics) = state.telemetry.metrics() else {
        return next.run(request).await;
    };
    let in_flight = metrics.in_flight();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    drop(in_flight);
    let served = response.extensions().get::<Served>();
    let labels = RequestLabels {
        endpoint: params
            .into_iter()
            .find_map(|(name, value)| (name == "model").then_some(value))
            .unwrap_or_default(),
        variant: served.and_then(|s| s.variant.clone()).unwrap_or_default(),
        model: served.and_then(|s| s.model.clone()).unwrap_or_default(),
        version: served
            .and_then(|s| s.version)
            .map(|v| v.to_string())
            .unwrap_or_default(),
        status: response.status().as_u16().to_string(),
    };
    metrics.answered(labels, started.elapsed());
    response
}

/// Keeps every failure of the server's own, on any route, for `/admin/status`.
pub(super) async fn note_faults(
    State(state): State<Arc<HttpState>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    if let Some(ServerFault(message)) = response.extensions().get::<ServerFault>() {
        state.telemetry.note_error("request", message.clone());
    }
    response
}

/// Every metric, in the OpenMetrics text format Prometheus scrapes.
pub(super) fn metrics(telemetry: &Telemetry) -> Result<Response, ApiError> {
    let metrics = telemetry.metrics().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics are off: set server.metrics = true",
        )
    })?;
    let text = metrics.encode().map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}"),
        )
    })?;
    let mut reply = Response::new(Body::from(text));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(reply)
}
