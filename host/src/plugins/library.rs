//! The plugin directory as the last scan found it: one entry per `*.wasm` file, compiled
//! and identified off the request path. A file that fails is refused, and the version that
//! was prepared from the previous file keeps serving. A file that does not prove where it
//! comes from (a good `<file>.wasm.sig` by a trusted key, when signatures are required; the
//! pinned SHA-256, when its name has one) is refused before it is compiled.
//!
//! Owns: the scan's outcome per file, and reporting loads, swaps and refusals (log, audit,
//! metrics). Must not touch: when to scan (the watcher), which endpoints use a file (the
//! endpoint set), what makes a component acceptable (`engine`, `contract`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::cache::component_hash;
use super::engine::{PluginEngine, Prepared};
use super::error::PluginError;
use super::signature::{Signature, read_signature, verify};
use crate::config::PublicKey;
use crate::telemetry::{Change, Load, Telemetry};
use crate::watch::is_ignored;

/// One `*.wasm` file of the plugin directory.
#[derive(Clone)]
pub struct PluginFile {
    /// The file name without `.wasm`: what endpoints call it.
    pub name: String,
    /// The hash of what serves: the last file that prepared successfully.
    pub hash: Option<String>,
    pub loaded_at: Option<SystemTime>,
    pub prepared: Option<Arc<Prepared>>,
    /// Why the file now on disk is refused, if it is.
    pub error: Option<String>,
    /// The hash of the file now on disk, so it is prepared once, refused or not.
    seen: String,
    /// Its signature file as it was then, when signatures are required.
    seen_signature: Option<Signature>,
}

/// What a component must prove before it is compiled; fixed at start.
#[derive(Clone, Debug, Default)]
pub struct Provenance {
    /// When signatures are required: the keys one of which must have signed it.
    pub trusted_keys: Option<Vec<PublicKey>>,
    /// Plugin name → the hex SHA-256 its file must have.
    pub pinned: BTreeMap<String, String>,
}

impl Provenance {
    /// What the component proved (for the log and the audit trail), or why it is refused.
    fn check(
        &self,
        name: &str,
        hash: &str,
        bytes: &[u8],
        signature: Option<&Signature>,
    ) -> Result<String, String> {
        let mut proved = String::new();
        if let Some(pin) = self.pinned.get(name) {
            if pin != hash {
                return Err(format!(
                    "its SHA-256 is {hash}, not the one plugins.pinned gives for '{name}' ({pin})"
                ));
            }
            proved.push_str(", pinned");
        }
        if let (Some(keys), Some(signature)) = (&self.trusted_keys, signature) {
            let key = verify(bytes, signature, keys).map_err(|e| e.to_string())?;
            proved.push_str(&format!(", signed by {key}"));
        }
        Ok(proved)
    }
}

/// Every plugin file, as of one scan.
#[derive(Clone, Default)]
pub struct Library {
    pub files: BTreeMap<String, PluginFile>,
}

impl Library {
    /// Rescans `dir`: unchanged files keep their prepared component, changed and new ones
    /// are prepared, removed ones are dropped. Only components that prove their
    /// `provenance` are prepared; when signatures are required, a new or changed signature
    /// file counts as a change to its component.
    pub fn scan(
        engine: &PluginEngine,
        dir: &Path,
        previous: &Library,
        provenance: &Provenance,
        telemetry: &Telemetry,
    ) -> Library {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::error!(dir = %dir.display(), %error, "cannot list the plugin directory");
                return previous.clone();
            }
        };
        let mut files = BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(name) = file_name.strip_suffix(".wasm") else {
                continue;
            };
            if is_ignored(file_name) || !path.is_file() {
                continue;
            }
            let before = previous.files.get(name);
            let file = match std::fs::read(&path) {
                Ok(bytes) => {
                    Self::prepare(engine, name, &path, &bytes, provenance, before, telemetry)
                }
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "cannot read plugin file");
                    continue;
                }
            };
            files.insert(name.to_string(), file);
        }
        for gone in previous.files.keys().filter(|n| !files.contains_key(*n)) {
            tracing::info!(plugin = %gone, "plugin file removed");
            report(
                telemetry,
                Load::Unloaded,
                Change::new("plugin.removed", "file", gone.as_str()),
            );
        }
        Library { files }
    }

    fn prepare(
        engine: &PluginEngine,
        name: &str,
        path: &Path,
        bytes: &[u8],
        provenance: &Provenance,
        before: Option<&PluginFile>,
        telemetry: &Telemetry,
    ) -> PluginFile {
        let seen = component_hash(bytes);
        let seen_signature = provenance
            .trusted_keys
            .as_ref()
            .map(|_| read_signature(path));
        if let Some(before) =
            before.filter(|b| b.seen == seen && b.seen_signature == seen_signature)
        {
            return before.clone();
        }
        let proved = provenance
            .check(name, &seen, bytes, seen_signature.as_ref())
            .map_err(|reason| PluginError::Refused {
                plugin: name.to_string(),
                reason,
            });
        match proved.and_then(|proved| Ok((engine.prepare(name, bytes)?, proved))) {
            Ok((prepared, proved)) => {
                tracing::info!(plugin = name, world = prepared.world.as_str(), hash = %seen, "plugin loaded{proved}");
                let from = before.and_then(|b| b.hash.clone());
                let kind = if from.is_some() {
                    "plugin.swapped"
                } else {
                    "plugin.loaded"
                };
                let to = format!("{} world, sha256 {seen}{proved}", prepared.world.as_str());
                report(
                    telemetry,
                    Load::Loaded,
                    Change {
                        from,
                        to: Some(to),
                        ..Change::new(kind, "file", name)
                    },
                );
                PluginFile {
                    name: name.to_string(),
                    hash: Some(seen.clone()),
                    loaded_at: Some(SystemTime::now()),
                    prepared: Some(Arc::new(prepared)),
                    error: None,
                    seen,
                    seen_signature,
                }
            }
            Err(error) => {
                tracing::error!(plugin = name, file = %path.display(), %error, "plugin file refused; the previous version keeps serving");
                report(
                    telemetry,
                    Load::Refused,
                    Change {
                        from: before.and_then(|b| b.hash.clone()),
                        to: Some(format!("sha256 {seen}")),
                        detail: Some(error.to_string()),
                        ..Change::new("plugin.refused", "file", name)
                    },
                );
                PluginFile {
                    name: name.to_string(),
                    hash: before.and_then(|b| b.hash.clone()),
                    loaded_at: before.and_then(|b| b.loaded_at),
                    prepared: before.and_then(|b| b.prepared.clone()),
                    error: Some(error.to_string()),
                    seen,
                    seen_signature,
                }
            }
        }
    }
}

/// Counts a plugin file's load outcome and records the change in the audit trail.
fn report(telemetry: &Telemetry, outcome: Load, change: Change) {
    if let Some(metrics) = telemetry.metrics() {
        metrics.plugin_load(&change.subject, outcome);
    }
    telemetry.audit(change);
}
