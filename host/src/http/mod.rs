//! The Open Inference Protocol (KServe v2) over HTTP/1.1: routes, body limits, the JSON and
//! binary encodings, and errors as `{"error": "..."}`.
//!
//! Owns: everything about the wire. Must not touch: model files, backends, or what happens
//! to a request between decoding and encoding (that is the pipeline's).

mod admin;
mod auth;
mod codec;
mod error;
mod monitor;
mod routes;
mod trace;

use std::future::Future;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::pipeline::Pipeline;

pub use auth::{TokenError, Tokens};
pub use codec::{DecodeError, OutputEncoding, decode_request, encode_response};
pub use error::ApiError;

/// Names the endpoint variant that answered (or failed), beside `parameters.variant` in a
/// successful body.
const VARIANT_HEADER: &str = "x-modelyard-variant";

/// What every handler shares.
pub struct HttpState {
    pub pipeline: Arc<Pipeline>,
    /// Request bodies above this many bytes are refused with 413.
    pub max_body_bytes: usize,
    /// Who may read and change things under `/admin/`.
    pub tokens: Tokens,
    /// Whether `/metrics` is on this port (it is not when `monitoring.metrics_listen`
    /// gives it one of its own).
    pub metrics_here: bool,
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Responses are written whole; Nagle would only hold the last segment back.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves `/metrics` alone on its own listener, until the task is aborted.
pub async fn serve_metrics(listener: TcpListener) -> std::io::Result<()> {
    let router = axum::Router::new().route("/metrics", axum::routing::get(routes::metrics));
    axum::serve(listener, router).await
}
