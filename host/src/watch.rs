//! "Something changed on disk": one debounced signal per burst of file-system events, for
//! the directories and files the server follows (models, plugins, its configuration).
//! Consumers rescan what they own on each signal rather than trust single events, so a
//! missed, merged or reordered event cannot leave them out of date.
//!
//! Only changes count: opening or reading a file is an event too (inotify reports it), and
//! a rescan reads every file it follows, so counting reads would rescan forever. Closing a
//! file written to does count: it is how a write says it is finished.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

/// The link Kubernetes renames over to swap a mounted ConfigMap's or volume's files all at
/// once: a change to it is a change to every file that links through it.
pub const KUBERNETES_DATA: &str = "..data";

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
    _watcher: RecommendedWatcher,
    signal: Arc<Notify>,
    dirty: Arc<AtomicBool>,
}

impl Watch {
    /// Watches each path (directories recursively when asked); an event counts only when
    /// one of its paths is `relevant` (a directory may hold files the server writes
    /// itself, such as its database, which must not look like an edit).
    pub fn new(
        paths: &[(&Path, RecursiveMode)],
        relevant: impl Fn(&Path) -> bool + Send + 'static,
    ) -> Result<Watch, WatchError> {
        let signal = Arc::new(Notify::new());
        let dirty = Arc::new(AtomicBool::new(false));
        let (notify, mark) = (signal.clone(), dirty.clone());
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let counts = match &event {
                    Ok(event) => {
                        let written = AccessKind::Close(AccessMode::Write);
                        let read = matches!(event.kind, EventKind::Access(a) if a != written);
                        !read && event.paths.iter().any(|p| relevant(p))
                    }
                    Err(error) => {
                        tracing::warn!(%error, "file watch reported an error; rescanning");
                        true
                    }
                };
                if counts {
                    mark.store(true, Ordering::Release);
                    notify.notify_one();
                }
            })
            .map_err(|source| WatchError {
                path: PathBuf::new(),
                source,
            })?;
        for (path, mode) in paths {
            watcher.watch(path, *mode).map_err(|source| WatchError {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(Watch {
            _watcher: watcher,
            signal,
            dirty,
        })
    }

    /// Resolves once a burst of changes has settled (at once, after the settling time, if
    /// one came since the last call).
    pub async fn changed(&self) {
        loop {
            self.signal.notified().await;
            tokio::time::sleep(DEBOUNCE).await;
            if self.dirty.swap(false, Ordering::AcqRel) {
                return;
            }
        }
    }
}

/// Editors and copy tools leave these behind; they are never models, plugins or settings.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
}
