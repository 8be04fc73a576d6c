//! What one inference request may hold of the server, and for how long: a place among
//! `server.max_in_flight` (none free: 503 with `Retry-After` at once, never a queue
//! without end), its body for `server.body_read_timeout_ms` and `server.max_body_bytes`
//! (408 and 413 past them), and its client's attention until its deadline (504 after it;
//! a run already going cannot be stopped, so it finishes on its inference slot and is
//! counted against what served it).
//!
//! Owns: those limits and the counts of requests they turn away. Must not touch: what
//! the deadline is (the pipeline settles it from the request and the configuration).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use crate::telemetry::{Telemetry, Throttle};

pub struct Admission {
    places: Arc<Semaphore>,
    limit: usize,
    /// Request bodies above this many bytes are refused with 413.
    body_bytes: usize,
    body_timeout: Duration,
    /// Under overload every request is turned away: one warning a second says so.
    warnings: Throttle,
}

impl Admission {
    pub fn new(max_in_flight: usize, body_bytes: usize, body_timeout: Duration) -> Admission {
        Admission {
            places: Arc::new(Semaphore::new(max_in_flight)),
            limit: max_in_flight,
            body_bytes,
            body_timeout,
            warnings: Throttle::default(),
        }
    }

    /// A place for a request to `called`, held until the request's work is done.
    pub(super) fn admit(
        &self,
        called: &str,
        telemetry: &Telemetry,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        self.places.clone().try_acquire_owned().map_err(|_| {
            if let Some(unlogged) = self.warnings.pass() {
                tracing::warn!(called, limit = self.limit, unlogged, "request turned away: the server holds its limit of requests in flight");
            }
            turned_away(telemetry, "in_flight_limit");
            ApiError::retry_later(format!(
                "the server holds its limit of {} requests in flight (server.max_in_flight); retry shortly",
                self.limit
            ))
        })
    }

    /// The whole body, if it is within the size limit and arrives in time.
    pub(super) async fn body(
        &self,
        body: Body,
        headers: &HeaderMap,
        telemetry: &Telemetry,
    ) -> Result<Bytes, ApiError> {
        let limit = self.body_bytes;
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than the server's limit of {limit} bytes (server.max_body_bytes)"
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let collected = tokio::time::timeout(self.body_timeout, Limited::new(body, limit).collect())
            .await
            .map_err(|_| {
                turned_away(telemetry, "body_timeout");
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive whole within {} ms (server.body_read_timeout_ms)",
                        self.body_timeout.as_millis()
                    ),
                )
            })?;
        match collected {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
            Err(error) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {error}"),
            )),
        }
    }

    /// Waits for `work` (a request to `called`) until `deadline`; past it, 504. The work
    /// is dropped, not stopped: a model run or plugin call already going finishes on its
    /// inference slot and is counted and charged where it runs, in the pipeline.
    pub(super) async fn by_deadline<T>(
        &self,
        called: &str,
        deadline: Option<Instant>,
        telemetry: &Telemetry,
        work: impl Future<Output = T>,
    ) -> Result<T, ApiError> {
        let Some(deadline) = deadline else {
            return Ok(work.await);
        };
        let since = Instant::now();
        tokio::time::timeout_at(deadline.into(), work)
            .await
            .map_err(|_| {
                let waited = since.elapsed().as_millis();
                if let Some(unlogged) = self.warnings.pass() {
                    tracing::warn!(called, waited_ms = waited, unlogged, "no answer by the request's deadline; answered 504, the run goes on");
                }
                turned_away(telemetry, "deadline");
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "'{called}' gave no answer within {waited} ms, the request's deadline (its `timeout` parameter, or server.request_timeout_ms)"
                    ),
                )
            })
    }
}

fn turned_away(telemetry: &Telemetry, reason: &'static str) {
    if let Some(metrics) = telemetry.metrics() {
        metrics.turned_away(reason);
    }
}
