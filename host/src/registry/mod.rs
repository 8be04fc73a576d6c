//! The model repository: `models/<name>/<version>/model.onnx` plus an optional
//! `models/<name>/model.toml`, scanned into an immutable [`Snapshot`] that is swapped in
//! whole whenever the directory changes.
//!
//! A request takes one snapshot and holds `Arc`s to the versions it uses, so a version that
//! disappears from disk is unloaded only once its last in-flight request has finished, and
//! a new one becomes the default only once it has loaded.
//!
//! Owns: which models and versions exist, loading them through the backend, and answering
//! "which graph serves model M (version V)?". Must not touch: HTTP, request validation.

mod changes;
mod model_config;
mod scan;
mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::backend::Engine;
use crate::runner::Runner;
use crate::tensor::TensorSpec;

pub use model_config::{ModelCard, ModelConfig, VersionPolicy};
pub use watch::WatchError;

/// One loaded version of a model, ready to run.
pub struct LoadedVersion {
    pub model: String,
    pub version: u64,
    /// Runs its model: cache, batching, where.
    pub runner: Arc<Runner>,
    /// What runs it: the backend, its version and the device.
    pub engine: Engine,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Follows the inputs against the training data's distribution, when the version
    /// directory has a `reference.json`.
    pub drift: Option<Arc<crate::telemetry::drift::DriftMonitor>>,
}

/// A version directory as the last scan found it.
#[derive(Clone)]
pub struct VersionEntry {
    /// What serves requests for this version, possibly an older file than the one on disk.
    pub loaded: Option<Arc<LoadedVersion>>,
    /// Why the file now on disk was refused, if it was.
    pub refused: Option<Arc<str>>,
    /// The file the last load attempt read, so unchanged files are not loaded again.
    stamp: Option<scan::FileStamp>,
    /// The drift reference the last load read, so that a new one is picked up.
    reference_stamp: Option<scan::FileStamp>,
}

/// A model directory as the last scan found it.
#[derive(Clone)]
pub struct Model {
    pub name: String,
    pub config: ModelConfig,
    /// Why the `model.toml` now on disk was refused; the previous config stays in effect.
    pub refused_config: Option<Arc<str>>,
    pub versions: BTreeMap<u64, VersionEntry>,
    config_stamp: Option<scan::FileStamp>,
}

impl Model {
    /// The highest loaded version: the one that answers when no version is named.
    pub fn default_version(&self) -> Option<&Arc<LoadedVersion>> {
        self.versions.values().rev().find_map(|v| v.loaded.as_ref())
    }

    /// Every reason something on disk is not being served, for an operator to read.
    fn problems(&self) -> String {
        let mut problems: Vec<String> = self
            .versions
            .iter()
            .filter_map(|(v, e)| e.refused.as_ref().map(|r| format!("version {v}: {r}")))
            .collect();
        problems.extend(self.refused_config.iter().map(|r| r.to_string()));
        if problems.is_empty() {
            "no version directory holds a model.onnx".to_string()
        } else {
            problems.join("; ")
        }
    }
}

/// Every model, as of one scan.
#[derive(Clone, Default)]
pub struct Snapshot {
    pub models: BTreeMap<String, Arc<Model>>,
}

/// Why a model or version cannot answer.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LookupError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Snapshot {
    /// Whether any model has a version that can answer.
    pub fn serving(&self) -> bool {
        self.models.values().any(|m| m.default_version().is_some())
    }

    pub fn model(&self, name: &str) -> Result<&Arc<Model>, LookupError> {
        self.models.get(name).ok_or_else(|| {
            LookupError::NotFound(format!(
                "unknown model '{name}' (served models: {})",
                list_or_none(self.models.keys())
            ))
        })
    }

    /// The version that serves `name` (its default unless `version` is given).
    pub fn resolve(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<LoadedVersion>, LookupError> {
        let model = self.model(name)?;
        let Some(version) = version else {
            return model.default_version().cloned().ok_or_else(|| {
                LookupError::Unavailable(format!(
                    "model '{name}' has no loaded version: {}",
                    model.problems()
                ))
            });
        };
        let entry = version
            .parse::<u64>()
            .ok()
            .and_then(|v| model.versions.get(&v))
            .ok_or_else(|| {
                LookupError::NotFound(format!(
                    "model '{name}' has no version '{version}' (served versions: {})",
                    list_or_none(model.versions.keys())
                ))
            })?;
        entry.loaded.clone().ok_or_else(|| {
            LookupError::Unavailable(format!(
                "model '{name}' version {version} is not loaded: {}",
                entry.refused.as_deref().unwrap_or("loading")
            ))
        })
    }
}

fn list_or_none(items: impl Iterator<Item = impl std::fmt::Display>) -> String {
    let items: Vec<String> = items.map(|i| i.to_string()).collect();
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

/// The live repository: the current snapshot and the directory it comes from.
pub struct ModelRepository {
    dir: PathBuf,
    current: ArcSwap<Snapshot>,
    ready: AtomicBool,
}

impl ModelRepository {
    pub fn new(dir: PathBuf) -> ModelRepository {
        ModelRepository {
            dir,
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
            scan::scan(&this.dir, &previous)
        })
        .await;
        match scanned {
            Ok(next) => {
                changes::report(&self.current.load(), &next);
                self.current.store(Arc::new(next));
                self.ready.store(true, Ordering::Release);
            }
            Err(error) => {
                tracing::error!(%error, "model scan stopped unexpectedly; keeping the models served before")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_served_before_the_first_scan() {
        let repository = ModelRepository::new(PathBuf::from("models"));
        assert!(!repository.is_ready());
        assert!(matches!(
            repository.snapshot(),
            Err(LookupError::Unavailable(m)) if m.contains("still loading")
        ));
    }
}
