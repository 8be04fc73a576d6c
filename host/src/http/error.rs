//! Errors as the protocol wants them: `{"error": "..."}` with the status Triton would use.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::codec::{DecodeError, VARIANT_HEADER};
use crate::pipeline::InferError;
use crate::registry::LookupError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// The endpoint variant that failed, named in the response like a successful one.
    variant: Option<String>,
    /// The model that failed (the variant's, or the one called by name).
    model: Option<String>,
    /// Sent as `Retry-After` (seconds): the server is overloaded, not the request wrong.
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            variant: None,
            model: None,
            retry_after: None,
        }
    }

    /// 503 with `Retry-After`: the server is overloaded, not the request wrong.
    pub fn retry_later(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// Who answered an inference request, or failed it, as far as the host knows: carried on
/// the response for the request metrics (the model or endpoint called is in the path).
#[derive(Clone, Debug, Default)]
pub(super) struct Served {
    pub variant: Option<String>,
    pub model: Option<String>,
    pub version: Option<u64>,
}

/// A failure of the server's own, carried on the response for `/admin/status`.
#[derive(Clone, Debug)]
pub(super) struct ServerFault(pub String);

/// Work that may block (a plugin's WASI calls, the database) runs on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|join| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} crashed ({join})"),
        )
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A failure of the server's own (not "not ready yet", which readiness probes ask
        // about all day, nor a deadline, which load explains) is logged as an error and
        // kept for `/admin/status`.
        let fault = self.status.is_server_error()
            && self.status != StatusCode::SERVICE_UNAVAILABLE
            && self.status != StatusCode::GATEWAY_TIMEOUT;
        if fault {
            tracing::error!(status = self.status.as_u16(), variant = self.variant.as_deref(), error = %self.message, "request failed");
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
        if fault {
            response.extensions_mut().insert(ServerFault(self.message));
        }
        if let Some(variant) = self
            .variant
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            response.headers_mut().insert(VARIANT_HEADER, variant);
        }
        response.extensions_mut().insert(Served {
            variant: self.variant,
            model: self.model,
            version: None,
        });
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
            e @ (InferError::Overloaded { .. } | InferError::Busy { .. }) => {
                ApiError::retry_later(e.to_string())
            }
            e @ (InferError::Backend { .. }
            | InferError::Crashed { .. }
            | InferError::Plugin { .. }) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            InferError::Charged {
                variant,
                model,
                error,
            } => ApiError {
                variant,
                model: Some(model),
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
