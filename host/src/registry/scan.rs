//! One pass over the model directory, producing the next snapshot from the previous one:
//! unchanged files keep their loaded graphs, changed and new ones are loaded, and anything
//! that fails to load is refused while whatever served before keeps serving.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use super::model_config::ModelConfig;
use super::snapshot::{FileStamp, LoadedVersion, Model, Snapshot, VersionEntry};
use crate::backend;
use crate::runner::{Meters, ModelMeters, Runner};
use crate::telemetry::Telemetry;
use crate::telemetry::drift::{DriftMonitor, Reference};
use crate::tensor::TensorSpec;
use crate::watch::{KUBERNETES_DATA, is_ignored};

const MODEL_FILE: &str = "model.onnx";
const CONFIG_FILE: &str = "model.toml";
/// Beside a version's model file: its training inputs' distribution, for drift detection.
const REFERENCE_FILE: &str = "reference.json";

fn subdirectories(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::error!(dir = %dir.display(), %error, "cannot list the model directory");
            return Vec::new();
        }
    };
    entries
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e)))
        .filter(|(name, _)| !is_ignored(name))
        .filter(|(name, e)| match e.file_type() {
            Ok(t) if t.is_dir() => true,
            // Followed: Kubernetes volumes, git-sync and hand-made layouts link directories.
            Ok(t) if t.is_symlink() => {
                let followed = e.path().is_dir();
                if !followed {
                    tracing::warn!(dir = %dir.display(), entry = %name, "skipping a symbolic link that leads to no directory");
                }
                followed
            }
            _ => false,
        })
        .map(|(name, e)| (name, e.path()))
        .collect()
}

/// Whether a change to `path`, under the model directory `dir`, can change what a scan
/// finds: a model's directory, its `model.toml`, a version's directory or the files in it
/// a scan reads. A path outside `dir` (as the watch reports it) counts, to be safe.
pub(super) fn is_followed(dir: &Path, path: &Path) -> bool {
    let Ok(inside) = path.strip_prefix(dir) else {
        return true;
    };
    let parts: Vec<&str> = inside.iter().filter_map(|p| p.to_str()).collect();
    let version = |v: &str| v.parse::<u64>().is_ok();
    match parts[..] {
        [] => true,
        // Swapping the link every model links through changes them all.
        [KUBERNETES_DATA] => true,
        // A file beside the models is none; a directory, or one just removed, may be.
        [model] => !is_ignored(model) && !path.is_file(),
        [model, file] => !is_ignored(model) && (file == CONFIG_FILE || version(file)),
        [model, v, file] => {
            !is_ignored(model) && version(v) && (file == MODEL_FILE || file == REFERENCE_FILE)
        }
        _ => false,
    }
}

pub(super) fn scan(dir: &Path, previous: &Snapshot, telemetry: &Telemetry) -> Snapshot {
    let models = subdirectories(dir)
        .into_iter()
        .map(|(name, path)| {
            let before = previous.models.get(&name).map(Arc::as_ref);
            let model = scan_model(&path, &name, before, telemetry);
            (name, Arc::new(model))
        })
        .collect();
    Snapshot { models }
}

fn scan_model(dir: &Path, name: &str, previous: Option<&Model>, telemetry: &Telemetry) -> Model {
    let config_path = dir.join(CONFIG_FILE);
    let config_stamp = FileStamp::of(&config_path);
    let unchanged = previous.filter(|p| p.config_stamp == config_stamp);
    let (config, refused_config, config_changed) = match unchanged {
        Some(p) => (p.config.clone(), p.refused_config.clone(), false),
        None if config_stamp.is_none() => (ModelConfig::default(), None, true),
        None => match ModelConfig::read(&config_path) {
            Ok(config) => (config, None, true),
            Err(error) => {
                tracing::error!(model = name, %error, "model.toml refused; the model keeps its previous settings");
                let kept = previous.map(|p| p.config.clone()).unwrap_or_default();
                (kept, Some(Arc::from(error.to_string())), false)
            }
        },
    };

    let present = subdirectories(dir)
        .into_iter()
        .filter_map(|(v, _)| v.parse::<u64>().ok())
        .collect();
    let versions = config
        .version_policy
        .select(present)
        .into_iter()
        .map(|version| {
            let before = previous.and_then(|p| p.versions.get(&version));
            let entry = scan_version(
                dir,
                name,
                version,
                &config,
                before,
                config_changed,
                telemetry,
            );
            (version, entry)
        })
        .collect::<BTreeMap<_, _>>();

    Model {
        name: name.to_string(),
        config,
        refused_config,
        versions,
        config_stamp,
    }
}

fn scan_version(
    dir: &Path,
    name: &str,
    version: u64,
    config: &ModelConfig,
    before: Option<&VersionEntry>,
    config_changed: bool,
    telemetry: &Telemetry,
) -> VersionEntry {
    let path = dir.join(version.to_string()).join(MODEL_FILE);
    let stamp = FileStamp::of(&path);
    let reference = dir.join(version.to_string()).join(REFERENCE_FILE);
    let reference_stamp = FileStamp::of(&reference);
    if let Some(before) = before.filter(|b| b.stamp == stamp && !config_changed) {
        if before.reference_stamp == reference_stamp {
            return before.clone();
        }
        // Only the drift reference changed: the model that serves stays, with a new monitor.
        if let Some(old) = &before.loaded {
            let drift = reference_stamp.as_ref().and_then(|_| {
                drift_monitor(&reference, name, version, config, &old.inputs, telemetry)
            });
            return VersionEntry {
                loaded: Some(Arc::new(LoadedVersion {
                    model: old.model.clone(),
                    version,
                    runner: old.runner.clone(),
                    engine: old.engine.clone(),
                    inputs: old.inputs.clone(),
                    outputs: old.outputs.clone(),
                    drift,
                })),
                reference_stamp,
                ..before.clone()
            };
        }
    }
    let kept = before.and_then(|b| b.loaded.clone());
    let Some(_) = stamp else {
        return VersionEntry {
            loaded: kept,
            refused: Some(Arc::from(format!("{} does not exist yet", path.display()))),
            stamp,
            reference_stamp,
        };
    };
    let loaded = fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| backend::load(&bytes, &config.load_options()).map_err(|e| e.to_string()));
    match loaded {
        Ok(graph) => {
            if let Some(fallback) = &graph.engine.fallback {
                tracing::warn!(model = name, version, reason = %fallback, "model version runs on the CPU");
            }
            // One run at a batch of one, and one at the largest batch when batching.
            let mut batches = vec![1];
            batches.extend(config.batching.as_ref().map(|b| b.max_batch_size));
            let warm_run = if config.warmup != Some(false) {
                match backend::warm_up(&graph, &batches) {
                    Ok(took) => Some(took),
                    Err(error) => {
                        tracing::warn!(model = name, version, %error, "warm-up run failed; the version serves anyway (turn it off with warmup = false)");
                        None
                    }
                }
            } else {
                None
            };
            tracing::info!(
                model = name,
                version,
                file = %path.display(),
                backend = graph.engine.backend,
                device = ?graph.engine.device,
                "model version loaded"
            );
            let drift = reference_stamp.as_ref().and_then(|_| {
                drift_monitor(&reference, name, version, config, &graph.inputs, telemetry)
            });
            let metrics = telemetry.metrics();
            VersionEntry {
                loaded: Some(Arc::new(LoadedVersion {
                    model: name.to_string(),
                    version,
                    runner: Arc::new(Runner::new(
                        graph.model,
                        warm_run,
                        config.batching.clone(),
                        config.cache,
                        config.max_in_flight,
                        Meters {
                            model: metrics.map(|m| ModelMeters {
                                queue: m.queue_seconds(name),
                                inference: m.inference_seconds(name, version),
                                crashes: m.model_crashes(name, version),
                            }),
                            scheduling: metrics.map(|m| m.scheduling_meters(name, version)),
                            spending: telemetry.spendings().version(name, version),
                        },
                    )),
                    engine: graph.engine,
                    inputs: graph.inputs,
                    outputs: graph.outputs,
                    drift,
                })),
                refused: None,
                stamp,
                reference_stamp,
            }
        }
        Err(reason) => {
            tracing::error!(
                model = name,
                version,
                file = %path.display(),
                %reason,
                serving = kept.as_ref().map(|_| "the previously loaded file").unwrap_or("nothing"),
                "model file refused"
            );
            VersionEntry {
                loaded: kept,
                refused: Some(Arc::from(format!("{} refused: {reason}", path.display()))),
                stamp,
                reference_stamp,
            }
        }
    }
}

/// The drift monitor of a version whose directory holds a reference distribution; a
/// reference that cannot be used (unreadable, or not about one of the model's float
/// `[batch, features]` inputs) is logged and the version served without one.
fn drift_monitor(
    path: &Path,
    name: &str,
    version: u64,
    config: &ModelConfig,
    inputs: &[TensorSpec],
    telemetry: &Telemetry,
) -> Option<Arc<DriftMonitor>> {
    let monitor = fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice::<Reference>(&bytes).map_err(|e| e.to_string()))
        .and_then(|r| DriftMonitor::new(r, config.drift, inputs).map_err(|e| e.to_string()));
    match monitor {
        Ok(monitor) => Some(Arc::new(monitor)),
        Err(reason) => {
            tracing::error!(model = name, version, file = %path.display(), %reason, "drift reference refused; the version serves without drift detection");
            telemetry.note_error("drift.reference", format!("{}: {reason}", path.display()));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::iris_model;

    fn temp_repo(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("modelyard-scan-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("iris/1")).unwrap();
        fs::write(dir.join("iris/1/model.onnx"), iris_model(1)).unwrap();
        dir
    }

    #[test]
    fn unchanged_files_keep_their_graph_and_corrupt_ones_keep_the_old() {
        let dir = temp_repo("keep");
        let first = scan(&dir, &Snapshot::default(), &Telemetry::off());
        let loaded = first.resolve("iris", Some("1")).unwrap();
        let second = scan(&dir, &first, &Telemetry::off());
        assert!(Arc::ptr_eq(
            &loaded,
            &second.resolve("iris", Some("1")).unwrap()
        ));

        fs::write(
            dir.join("iris/1/model.onnx"),
            b"garbage, and longer than before",
        )
        .unwrap();
        let third = scan(&dir, &second, &Telemetry::off());
        assert!(Arc::ptr_eq(
            &loaded,
            &third.resolve("iris", Some("1")).unwrap()
        ));
        let refused = third.models["iris"].versions[&1].refused.clone().unwrap();
        assert!(
            refused.contains("iris/1/model.onnx refused: tract: not an ONNX model"),
            "{refused}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_what_a_scan_reads_wakes_a_rescan() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("iris/1")).unwrap();
        let log = dir.path().join("server.log");
        fs::write(&log, "a line\n").unwrap();
        let followed = |p: &str| is_followed(dir.path(), &dir.path().join(p));
        for path in [
            "iris",
            "gone",
            "iris/model.toml",
            "iris/1",
            "iris/1/model.onnx",
            "iris/1/reference.json",
        ] {
            assert!(followed(path), "{path}");
        }
        for path in [
            "server.log",
            ".hidden",
            "iris/notes.md",
            "iris/1/notes.md",
            "iris/latest/model.onnx",
            ".iris/1/model.onnx",
            "iris/1/deep/model.onnx",
        ] {
            assert!(!followed(path), "{path}");
        }
    }

    #[test]
    fn linked_directories_are_followed_and_their_swaps_noticed() {
        use std::os::unix::fs::symlink;
        // A mounted volume's layout: models link through `..data`, which is swapped by
        // renaming a new link over it.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (release, version) in [("..r1", 1), ("..r2", 2)] {
            let version_dir = root.join(format!("{release}/iris/{version}"));
            fs::create_dir_all(&version_dir).unwrap();
            fs::write(version_dir.join("model.onnx"), iris_model(version)).unwrap();
        }
        symlink("..r1", root.join("..data")).unwrap();
        symlink("..data/iris", root.join("iris")).unwrap();
        symlink("nowhere", root.join("dangling")).unwrap();
        let first = scan(root, &Snapshot::default(), &Telemetry::off());
        assert_eq!(first.models.keys().collect::<Vec<_>>(), vec!["iris"]);
        assert_eq!(
            first.models["iris"].versions.keys().collect::<Vec<_>>(),
            vec![&1]
        );

        symlink("..r2", root.join("..data_tmp")).unwrap();
        fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        assert!(is_followed(root, &root.join("..data")));
        let second = scan(root, &first, &Telemetry::off());
        assert_eq!(
            second.models["iris"].versions.keys().collect::<Vec<_>>(),
            vec![&2]
        );
        assert!(second.resolve("iris", Some("2")).is_ok());
    }

    #[test]
    fn ignores_hidden_and_non_numeric_directories() {
        let dir = temp_repo("ignore");
        fs::create_dir_all(dir.join(".cache/1")).unwrap();
        fs::create_dir_all(dir.join("iris/latest")).unwrap();
        let snapshot = scan(&dir, &Snapshot::default(), &Telemetry::off());
        assert_eq!(snapshot.models.keys().collect::<Vec<_>>(), vec!["iris"]);
        assert_eq!(
            snapshot.models["iris"].versions.keys().collect::<Vec<_>>(),
            vec![&1]
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_versions_and_models_are_not_found() {
        let dir = temp_repo("lookup");
        let snapshot = scan(&dir, &Snapshot::default(), &Telemetry::off());
        assert!(matches!(
            snapshot.resolve("nope", None),
            Err(crate::registry::LookupError::NotFound(_))
        ));
        assert!(matches!(
            snapshot.resolve("iris", Some("9")),
            Err(crate::registry::LookupError::NotFound(_))
        ));
        assert_eq!(snapshot.resolve("iris", None).unwrap().version, 1);
        fs::remove_dir_all(dir).unwrap();
    }
}
