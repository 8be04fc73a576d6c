//! The Open Inference Protocol (KServe v2) over HTTP/1.1, plain or TLS: connections and
//! their timeouts, admission and deadlines, routes, body limits, the JSON and binary
//! encodings, and errors as `{"error": "..."}`.
//!
//! Owns: everything about the wire, and the request metrics (one layer around the infer
//! routes). Must not touch: model files, backends, or what happens to a request between
//! decoding and encoding (that is the pipeline's).
//!
//! The files go one way: `codec`, `trace`, `tls` ← `error` ← `auth`, `overload` ← `state`
//! ← `observe` ← `monitor` ← `admin` ← `dashboard` ← `routes` ← `listen` ← this file (the listeners).

mod admin;
mod auth;
mod codec;
mod dashboard;
mod error;
mod listen;
mod monitor;
mod observe;
mod overload;
mod routes;
mod state;
mod tls;
mod trace;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::telemetry::Telemetry;

pub use auth::{TokenError, Tokens};
pub use codec::{DecodeError, OutputEncoding, decode_request, encode_response};
pub use error::ApiError;
pub use listen::Listening;
pub use overload::Admission;
pub use state::HttpState;
pub use tls::{Tls, TlsError};

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    listening: Listening,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listen::serve(listener, routes::router(state), listening, shutdown).await
}

/// Serves `/metrics` alone on its own listener, until the task is aborted.
pub async fn serve_metrics(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    listening: Listening,
) -> std::io::Result<()> {
    let metrics = move || async move { observe::metrics(&telemetry) };
    let router = axum::Router::new().route("/metrics", axum::routing::get(metrics));
    listen::serve(listener, router, listening, std::future::pending()).await
}
