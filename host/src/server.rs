//! Starts every part in order and stops them on a signal: bind the port (so liveness
//! answers at once), watch and load the model repository, serve until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::control;
use crate::http::{self, HttpState};
use crate::pipeline::{Options, Pipeline};
use crate::registry::{ModelRepository, WatchError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another server on that port?)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Tokens(#[from] http::TokenError),
    #[error("the HTTP server stopped: {0}")]
    Http(std::io::Error),
}

/// Serves until `shutdown` resolves, then drains in-flight requests for at most the
/// configured grace period.
pub async fn run(
    config: &Config,
    config_file: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tokens = http::Tokens::new(&config.server.tokens)?;
    let listener = TcpListener::bind(&config.server.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.server.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    let repository = Arc::new(ModelRepository::new(config.models.dir.clone()));
    let watcher = repository.watch()?;
    let pipeline = Arc::new(Pipeline::new(
        repository,
        Options {
            parallelism: config.inference_threads(),
            feedback_memory: config.server.feedback_memory,
            shadow_queue: config.server.shadow_queue,
            seed: config.server.seed,
        },
    ));
    let control = control::start(config, config_file, pipeline.clone()).await?;
    let state = Arc::new(HttpState {
        pipeline,
        max_body_bytes: config.server.max_body_bytes,
        tokens,
        metrics: config
            .server
            .metrics
            .then(crate::telemetry::Metrics::default),
    });
    tracing::info!(%addr, "listening");

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; finishing requests in flight");
        let _ = stopping_tx.send(());
    };
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let server = http::serve(listener, state, signal);
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result.map_err(ServeError::Http),
        () = async {
            let _ = stopping_rx.await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(seconds = grace.as_secs(), "requests still in flight after the grace period; exiting anyway");
            Ok(())
        }
    };
    watcher.abort();
    control.abort();
    tracing::info!("stopped");
    result
}
