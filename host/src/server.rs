//! Starts every part in order and stops them on a signal: bind the port (so liveness
//! answers at once), watch and load the model repository, serve until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::cluster::{self, Cluster, ClusterError};
use crate::config::Config;
use crate::control;
use crate::dashboard::{History, history};
use crate::http::{self, HttpState};
use crate::pipeline::{Options, Pipeline};
use crate::registry::{ModelRepository, RepositoryError};
use crate::telemetry::{self, Telemetry, drift};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another server on that port?)")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Tokens(#[from] http::TokenError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Tls(#[from] http::TlsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
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
    // Bad TLS files stop the start, before the port is taken.
    let tls = config
        .server
        .tls
        .as_ref()
        .map(http::Tls::load)
        .transpose()?;
    cluster::check(&config.cluster)?;
    let listener = bind(&config.server.listen).await?;
    let metrics_listener = match &config.monitoring.metrics_listen {
        Some(addr) if config.server.metrics => Some(bind(addr).await?),
        _ => None,
    };
    let telemetry = Telemetry::start(&config.monitoring, config.server.metrics)?;
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    if let Some(library) = &config.models.onnxruntime_library {
        crate::backend::onnxruntime::configure(library.clone());
    }
    let repository = Arc::new(ModelRepository::new(
        config.models.dir.clone(),
        telemetry.clone(),
    ));
    let watcher = repository.watch()?;
    let replica = Cluster::replica_name(&config.cluster);
    let pipeline = Arc::new(Pipeline::new(
        repository,
        Options {
            parallelism: config.inference_threads(),
            feedback_memory: config.server.feedback_memory,
            performance_bucket: Duration::from_secs(
                config.server.performance_bucket_seconds.max(1),
            ),
            shadow_queue: config.server.shadow_queue,
            seed: config.server.seed,
            request_timeout: config.request_timeout(),
            replica: replica.clone(),
        },
        telemetry.clone(),
    ));
    let control = control::start(config, config_file, pipeline.clone(), telemetry.clone()).await?;
    let cluster = Cluster::start(
        &config.cluster,
        replica,
        pipeline.clone(),
        telemetry.clone(),
    )?;
    let drift = tokio::spawn(judge_drift(
        pipeline.repository().clone(),
        telemetry.clone(),
        Duration::from_millis(config.monitoring.drift_interval_ms.max(10)),
    ));
    let history = Arc::new(History::new(Duration::from_secs(
        config.monitoring.history_step_seconds,
    )));
    let keeping = tokio::spawn(history::keep(history.clone(), {
        let pipeline = pipeline.clone();
        move || pipeline.endpoints()
    }));
    let state = Arc::new(HttpState {
        pipeline,
        history,
        telemetry: telemetry.clone(),
        admission: http::Admission::new(
            config.server.max_in_flight,
            config.server.max_body_bytes,
            Duration::from_millis(config.server.body_read_timeout_ms),
        ),
        client_certificates: tls.as_ref().is_some_and(|tls| tls.checks_clients()),
        tokens,
        metrics_here: metrics_listener.is_none(),
        cluster: cluster.as_ref().map(|running| running.cluster.clone()),
    });
    let certificates = tls.clone().map(http::Tls::follow).transpose()?;
    let listening = http::Listening {
        tls,
        header_read_timeout: Duration::from_millis(config.server.header_read_timeout_ms),
    };
    let scheme = if listening.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%addr, scheme, "listening");
    let metrics_server = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving /metrics");
        }
        tokio::spawn(http::serve_metrics(
            listener,
            telemetry.clone(),
            listening.clone(),
        ))
    });

    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; finishing requests in flight");
        let _ = stopping_tx.send(());
    };
    let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
    let server = http::serve(listener, state, listening, signal);
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
    if let Some(certificates) = certificates {
        certificates.abort();
    }
    drift.abort();
    keeping.abort();
    if let Some(cluster) = cluster {
        cluster.stop().await;
    }
    telemetry.shutdown();
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    tracing::info!("stopped");
    result
}

async fn bind(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Recomputes every model version's drift on a timer, so that metrics stay current and
/// flips are logged without anyone asking.
async fn judge_drift(repository: Arc<ModelRepository>, telemetry: Arc<Telemetry>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(snapshot) = repository.snapshot() else {
            continue;
        };
        for model in snapshot.models.values() {
            for (version, entry) in &model.versions {
                if let Some(monitor) = entry.loaded.as_ref().and_then(|l| l.drift.as_ref()) {
                    drift::judge(&telemetry, &model.name, *version, monitor);
                }
            }
        }
    }
}
