//! The Open Inference Protocol (KServe v2) over HTTP/1.1: routes, body limits, the JSON and
//! binary encodings, and errors as `{"error": "..."}`.
//!
//! Owns: everything about the wire, and the request metrics (one layer around the infer
//! routes). Must not touch: model files, backends, or what happens to a request between
//! decoding and encoding (that is the pipeline's).
//!
//! The files go one way: `codec`, `trace` ← `error` ← `auth` ← `state` ← `observe` ←
//! `monitor` ← `admin` ← `routes` ← this file (the listeners).

mod admin;
mod auth;
mod codec;
mod error;
mod monitor;
mod observe;
mod routes;
mod state;
mod trace;

use std::future::Future;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::telemetry::Telemetry;

pub use auth::{TokenError, Tokens};
pub use codec::{DecodeError, OutputEncoding, decode_request, encode_response};
pub use error::ApiError;
pub use state::HttpState;

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
pub async fn serve_metrics(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
) -> std::io::Result<()> {
    let metrics = move || async move { observe::metrics(&telemetry) };
    let router = axum::Router::new().route("/metrics", axum::routing::get(metrics));
    axum::serve(listener, router).await
}
