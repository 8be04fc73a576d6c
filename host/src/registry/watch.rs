//! Keeps the snapshot in step with the model directory. Events only say "look again": each
//! burst of them (debounced) triggers a rescan of the whole directory, so a missed, merged
//! or reordered event cannot leave the repository out of date.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_mini::notify::{self, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, new_debouncer};
use tokio::sync::Notify;

use super::ModelRepository;

/// Long enough for a file copy or a `mv` of a version directory to settle into one burst.
const DEBOUNCE: Duration = Duration::from_millis(150);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "the model directory {0} does not exist or is not a directory; create it or point --models at one"
    )]
    Missing(PathBuf),
    #[error("cannot watch the model directory {dir}: {source}")]
    Watch { dir: PathBuf, source: notify::Error },
}

impl ModelRepository {
    /// Starts watching the directory, then loads it; the returned task keeps both going for
    /// as long as the server runs. The watch starts first so that nothing written during
    /// the initial scan is missed.
    pub fn watch(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>, WatchError> {
        if !self.dir.is_dir() {
            return Err(WatchError::Missing(self.dir.clone()));
        }
        let changed = Arc::new(Notify::new());
        let signal = changed.clone();
        let mut debouncer = new_debouncer(DEBOUNCE, move |result: DebounceEventResult| {
            if let Err(error) = result {
                tracing::warn!(%error, "model directory watch reported an error; rescanning");
            }
            signal.notify_one();
        })
        .map_err(|source| WatchError::Watch {
            dir: self.dir.clone(),
            source,
        })?;
        debouncer
            .watcher()
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(|source| WatchError::Watch {
                dir: self.dir.clone(),
                source,
            })?;

        let repository = self.clone();
        Ok(tokio::spawn(async move {
            // Owned by the task: dropping it would stop the watch.
            let _debouncer = debouncer;
            repository.rescan().await;
            tracing::info!(
                dir = %repository.dir.display(),
                models = repository.current.load().models.len(),
                "model repository ready"
            );
            loop {
                changed.notified().await;
                repository.rescan().await;
            }
        }))
    }
}
