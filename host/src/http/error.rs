//! Errors as the protocol wants them: `{"error": "..."}` with the status Triton would use.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::codec::DecodeError;
use crate::pipeline::InferError;
use crate::registry::LookupError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// The endpoint variant that failed, named in the response like a successful one.
    variant: Option<String>,
    /// Sent as `Retry-After` (seconds): the server is overloaded, not the request wrong.
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            variant: None,
            retry_after: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The endpoint variant that failed, if one did.
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A failure of the server's own (not "not ready yet", which readiness probes ask
        // about all day) is logged as an error and kept for `/admin/status`.
        if self.status.is_server_error() && self.status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(status = self.status.as_u16(), variant = self.variant.as_deref(), error = %self.message, "request failed");
            crate::telemetry::note_error("request", self.message.clone());
        } else {
            tracing::debug!(status = self.status.as_u16(), error = %self.message, "request refused");
        }
        let mut response = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(variant) = self.variant.and_then(|v| HeaderValue::from_str(&v).ok()) {
            response
                .headers_mut()
                .insert(super::VARIANT_HEADER, variant);
        }
        response
    }
}

impl From<LookupError> for ApiError {
    fn from(error: LookupError) -> Self {
        match error {
            LookupError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            LookupError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
        }
    }
}

impl From<InferError> for ApiError {
    fn from(error: InferError) -> Self {
        match error {
            InferError::Lookup(e) => e.into(),
            InferError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            e @ InferError::Overloaded { .. } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            },
            e @ (InferError::Backend { .. }
            | InferError::Crashed { .. }
            | InferError::Plugin { .. }) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            InferError::Variant { variant, error } => ApiError {
                variant: Some(variant),
                ..ApiError::from(*error)
            },
        }
    }
}

impl From<DecodeError> for ApiError {
    fn from(error: DecodeError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, error.to_string())
    }
}
