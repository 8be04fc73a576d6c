//! The live repository: the current snapshot, swapped whole after each rescan, and the
//! watch on the model directory that triggers rescans (for the files a scan reads only: a
//! log file written into the directory must not rescan it). Events only say "look again": each
//! burst of them (debounced) triggers a rescan of the whole directory, so a missed, merged
//! or reordered event cannot leave the repository out of date.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use notify::RecursiveMode;

use super::snapshot::{LookupError, Snapshot};
use super::{changes, scan};
use crate::telemetry::Telemetry;
use crate::watch::Watch;

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error(
        "the model directory {0} does not exist or is not a directory; create it or point --models at one"
    )]
    Missing(PathBuf),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
}

/// The live repository: the current snapshot and the directory it comes from.
pub struct ModelRepository {
    dir: PathBuf,
    current: ArcSwap<Snapshot>,
    ready: AtomicBool,
    telemetry: Arc<Telemetry>,
}

impl ModelRepository {
    pub fn new(dir: PathBuf, telemetry: Arc<Telemetry>) -> ModelRepository {
        ModelRepository {
            dir,
            telemetry,
            current: ArcSwap::from_pointee(Snapshot::default()),
            ready: AtomicBool::new(false),
        }
    }

    /// The snapshot a request should use from start to end; 503 until the first scan ends.
    pub fn snapshot(&self) -> Result<Arc<Snapshot>, LookupError> {
        if self.is_ready() {
            Ok(self.current.load_full())
        } else {
            Err(LookupError::Unavailable(
                "the server is still loading its models; retry shortly".to_string(),
            ))
        }
    }

    /// Whether the first scan of the model directory has finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Rescans the directory (off the async reactor: loading is CPU work) and swaps the
    /// result in. Only the watcher calls this, one scan at a time.
    async fn rescan(self: &Arc<Self>) {
        let this = self.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            let previous = this.current.load_full();
            scan::scan(&this.dir, &previous, &this.telemetry)
        })
        .await;
        match scanned {
            Ok(next) => {
                changes::report(&self.current.load(), &next, &self.telemetry);
                if let Some(metrics) = self.telemetry.metrics() {
                    for (name, model) in &next.models {
                        let serving = model.versions.iter().filter(|(_, e)| e.loaded.is_some());
                        metrics.know_model(name, serving.map(|(v, _)| *v));
                    }
                }
                self.current.store(Arc::new(next));
                self.ready.store(true, Ordering::Release);
            }
            Err(error) => {
                tracing::error!(%error, "model scan stopped unexpectedly; keeping the models served before")
            }
        }
    }
    /// Starts watching the directory, then loads it; the returned task keeps both going for
    /// as long as the server runs. The watch starts first so that nothing written during
    /// the initial scan is missed.
    pub fn watch(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>, RepositoryError> {
        if !self.dir.is_dir() {
            return Err(RepositoryError::Missing(self.dir.clone()));
        }
        let dir = self.dir.clone();
        let watch = Watch::new(&[(&self.dir, RecursiveMode::Recursive)], move |path| {
            scan::is_followed(&dir, path)
        })?;
        let repository = self.clone();
        Ok(tokio::spawn(async move {
            repository.rescan().await;
            tracing::info!(
                dir = %repository.dir.display(),
                models = repository.current.load().models.len(),
                "model repository ready"
            );
            loop {
                watch.changed().await;
                repository.rescan().await;
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_served_before_the_first_scan() {
        let repository = ModelRepository::new(PathBuf::from("models"), Telemetry::off());
        assert!(!repository.is_ready());
        assert!(matches!(
            repository.snapshot(),
            Err(LookupError::Unavailable(m)) if m.contains("still loading")
        ));
    }
}
