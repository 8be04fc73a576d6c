//! What one scan of the model directory found: every model, its configuration, and each
//! version loaded (or why not), as an immutable snapshot; and the answer to "which loaded
//! version serves model M (version V)?".

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::model_config::ModelConfig;
use crate::backend::Engine;
use crate::runner::Runner;
use crate::tensor::TensorSpec;

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
    pub(super) stamp: Option<FileStamp>,
    /// The drift reference the last load read, so that a new one is picked up.
    pub(super) reference_stamp: Option<FileStamp>,
}

/// A model directory as the last scan found it.
#[derive(Clone)]
pub struct Model {
    pub name: String,
    pub config: ModelConfig,
    /// Why the `model.toml` now on disk was refused; the previous config stays in effect.
    pub refused_config: Option<Arc<str>>,
    pub versions: BTreeMap<u64, VersionEntry>,
    pub(super) config_stamp: Option<FileStamp>,
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

/// Enough of a file's metadata to tell that it changed since it was last read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    /// Which file: a swapped link (a ConfigMap's, git-sync's) leads to another file that
    /// may have the same length and time.
    inode: (u64, u64),
}

impl FileStamp {
    pub(super) fn of(path: &Path) -> Option<FileStamp> {
        let meta = fs::metadata(path).ok().filter(|m| m.is_file())?;
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: (meta.dev(), meta.ino()),
        })
    }
}
