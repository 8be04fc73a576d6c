//! "Something changed on disk": one debounced signal per burst of file-system events, for
//! the directories and files the server follows (models, plugins, its configuration).
//! Consumers rescan what they own on each signal rather than trust single events, so a
//! missed, merged or reordered event cannot leave them out of date.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_mini::notify::{self, RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use tokio::sync::Notify;

/// Long enough for a file copy or a `mv` to settle into one burst.
const DEBOUNCE: Duration = Duration::from_millis(150);

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    pub path: PathBuf,
    pub source: notify::Error,
}

/// A running watch; dropping it stops the events.
pub struct Watch {
    _debouncer: Debouncer<RecommendedWatcher>,
    changed: Arc<Notify>,
}

impl Watch {
    /// Watches each path (directories recursively when asked).
    pub fn new(paths: &[(&Path, RecursiveMode)]) -> Result<Watch, WatchError> {
        let changed = Arc::new(Notify::new());
        let signal = changed.clone();
        let mut debouncer = new_debouncer(DEBOUNCE, move |result: DebounceEventResult| {
            if let Err(error) = result {
                tracing::warn!(%error, "file watch reported an error; rescanning");
            }
            signal.notify_one();
        })
        .map_err(|source| WatchError {
            path: PathBuf::new(),
            source,
        })?;
        for (path, mode) in paths {
            debouncer
                .watcher()
                .watch(path, *mode)
                .map_err(|source| WatchError {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        Ok(Watch {
            _debouncer: debouncer,
            changed,
        })
    }

    /// Resolves at the next burst of changes (at once if one came since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Editors and copy tools leave these behind; they are never models, plugins or settings.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
}
