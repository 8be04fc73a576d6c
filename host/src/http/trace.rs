//! Every request's trace and id: a span that every log line about the request carries
//! (`trace_id`, and `id` once the body is read), and the `traceparent` and
//! `x-request-id` headers on the response.

use std::sync::{Arc, OnceLock};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::telemetry::{TRACEPARENT, Trace};

/// Names the request's id on every answer, errors included.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The trace a request belongs to, and its id once known; handlers find it among the
/// request's extensions.
#[derive(Clone)]
pub(super) struct Traced {
    pub trace: Trace,
    id: Arc<OnceLock<String>>,
    span: tracing::Span,
}

impl Traced {
    pub fn set_id(&self, id: &str) {
        if self.id.set(id.to_string()).is_ok() {
            self.span.record("id", id);
        }
    }
}

pub(super) async fn traced(mut request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    let trace = Trace::from_header(header);
    let span =
        tracing::info_span!("request", trace_id = %trace.trace_id, id = tracing::field::Empty);
    let traced = Traced {
        trace,
        id: Arc::default(),
        span: span.clone(),
    };
    request.extensions_mut().insert(traced.clone());
    let mut response = next.run(request).instrument(span).await;
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&traced.trace.child()) {
        headers.insert(TRACEPARENT, value);
    }
    if let Some(value) = traced
        .id
        .get()
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        headers.insert(REQUEST_ID_HEADER, value);
    }
    response
}
