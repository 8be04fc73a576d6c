//! Keeps the snapshot in step with the model directory. Events only say "look again": each
//! burst of them (debounced) triggers a rescan of the whole directory, so a missed, merged
//! or reordered event cannot leave the repository out of date.

use std::path::PathBuf;
use std::sync::Arc;

use notify::RecursiveMode;

use super::ModelRepository;
use crate::watch::Watch;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "the model directory {0} does not exist or is not a directory; create it or point --models at one"
    )]
    Missing(PathBuf),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
}

impl ModelRepository {
    /// Starts watching the directory, then loads it; the returned task keeps both going for
    /// as long as the server runs. The watch starts first so that nothing written during
    /// the initial scan is missed.
    pub fn watch(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>, WatchError> {
        if !self.dir.is_dir() {
            return Err(WatchError::Missing(self.dir.clone()));
        }
        let watch = Watch::new(&[(&self.dir, RecursiveMode::Recursive)], |_| true)?;
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
