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
//!
//! The files go one way: `model_config` and `snapshot` (what a scan finds) ← `scan` (loads
//! what changed) and `changes` (reports what changed) ← `repository` (the live snapshot
//! and its watcher).

mod changes;
mod model_config;
mod repository;
mod scan;
mod snapshot;

pub use model_config::{ModelCard, ModelConfig, VersionPolicy};
pub use repository::{ModelRepository, RepositoryError};
pub use snapshot::{LoadedVersion, LookupError, Model, Snapshot, VersionEntry};
