//! `models/<name>/model.toml`: what a model's directory may say about the model.

use std::collections::BTreeMap;

use std::num::NonZeroUsize;
use std::path::Path;

use crate::backend::{BackendChoice, Device, LoadOptions, TensorOverride};
use crate::config::{ConfigError, read_toml};

/// Bounds on counts the file's syntax allows but no model runs with, each started or
/// allocated at load: a typo's extra digits must be refused, not exhaust the machine.
const MAX_THREADS: usize = 1024;
const MAX_INSTANCES: usize = 256;
/// tokio's bounded queue panics above `usize::MAX >> 3`; a billion waiting requests is no
/// bound either.
const MAX_QUEUE_SIZE: usize = 1 << 30;

/// The parsed `model.toml`; every field is optional, and a model without the file gets the
/// defaults (all versions, the signature the ONNX file declares, no card).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// Inputs whose type or shape the ONNX file leaves open.
    #[serde(default)]
    pub inputs: Vec<TensorOverride>,
    #[serde(default)]
    pub outputs: Vec<TensorOverride>,
    pub card: Option<ModelCard>,
    /// How drift against the versions' `reference.json` is judged.
    #[serde(default)]
    pub drift: crate::telemetry::drift::DriftConfig,
    /// `tract`, `onnxruntime`, or `auto` (ONNX Runtime when its library is there).
    #[serde(default)]
    pub backend: BackendChoice,
    #[serde(default)]
    pub device: Device,
    /// Refuse the model rather than run it on the CPU when `device` cannot be had.
    #[serde(default)]
    pub require_device: bool,
    /// Threads one run may use (ONNX Runtime's intra-op threads).
    pub threads: Option<NonZeroUsize>,
    /// Runs of the model that may go at once (ONNX Runtime keeps a session each; default 1).
    pub instances: Option<NonZeroUsize>,
    /// Run each version once at load, before it serves (default: on).
    pub warmup: Option<bool>,
    /// Dynamic batching of requests' rows into shared runs.
    pub batching: Option<crate::runner::BatchingConfig>,
    /// The response cache: `cache = { max_bytes = ... }`.
    pub cache: Option<crate::runner::CacheConfig>,
    /// Requests each version holds at once, waiting or running; beyond it, 503 with
    /// `Retry-After` at once (default: only the server's `max_in_flight` bounds them).
    pub max_in_flight: Option<NonZeroUsize>,
}

impl ModelConfig {
    /// Reads a `model.toml`, refusing values out of bounds with the key that holds them.
    pub fn read(path: &Path) -> Result<ModelConfig, ConfigError> {
        let config: ModelConfig = read_toml(path)?;
        config.check().map_err(|problem| ConfigError::Invalid {
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        let counts = [
            ("threads", self.threads.map(NonZeroUsize::get), MAX_THREADS),
            (
                "instances",
                self.instances.map(NonZeroUsize::get),
                MAX_INSTANCES,
            ),
            (
                "batching.max_queue_size",
                self.batching.as_ref().map(|b| b.max_queue_size),
                MAX_QUEUE_SIZE,
            ),
        ];
        for (key, value, max) in counts {
            if let Some(value) = value.filter(|&v| v > max) {
                return Err(format!("{key} is {value}; at most {max}"));
            }
        }
        for o in self.inputs.iter().chain(&self.outputs) {
            if let Some(d) = o.shape.iter().flatten().find(|&&d| d < -1) {
                return Err(format!(
                    "the shape of '{}' has the dimension {d}; a dimension is a size, or -1 where it varies",
                    o.name
                ));
            }
        }
        Ok(())
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            backend: self.backend,
            device: self.device,
            require_device: self.require_device,
            threads: self.threads,
            instances: self.instances.unwrap_or(NonZeroUsize::MIN),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
        }
    }
}

/// Which version directories are served: `"all"`, `{ latest = N }` or `{ specific = [..] }`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionPolicy {
    #[default]
    All,
    Latest(usize),
    Specific(Vec<u64>),
}

impl VersionPolicy {
    /// The versions to serve out of those present, in ascending order.
    pub fn select(&self, mut present: Vec<u64>) -> Vec<u64> {
        present.sort_unstable();
        match self {
            VersionPolicy::All => present,
            VersionPolicy::Latest(n) => present.split_off(present.len().saturating_sub(*n)),
            VersionPolicy::Specific(wanted) => {
                present.retain(|v| wanted.contains(v));
                present
            }
        }
    }
}

/// What people need to know before relying on a model; served with its metadata.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intended_use: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limitations: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_data: Option<String>,
    /// Evaluation results, free-form: typically one table per version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    #[test]
    fn policies_select_versions() {
        let present = vec![3, 1, 2];
        assert_eq!(VersionPolicy::All.select(present.clone()), vec![1, 2, 3]);
        assert_eq!(VersionPolicy::Latest(2).select(present.clone()), vec![2, 3]);
        assert_eq!(
            VersionPolicy::Latest(9).select(present.clone()),
            vec![1, 2, 3]
        );
        assert_eq!(VersionPolicy::Specific(vec![1, 7]).select(present), vec![1]);
    }

    #[test]
    fn parses_every_section() {
        let config: ModelConfig = toml::from_str(
            r#"
            version_policy = { latest = 1 }
            backend = "onnxruntime"
            device = "cuda"
            threads = 2
            cache = { max_bytes = 1000 }
            [batching]
            max_batch_size = 8
            max_queue_delay_us = 500
            [[inputs]]
            name = "x"
            datatype = "FP32"
            shape = [-1, 4]
            [card]
            owner = "ml-team"
            [card.metrics."1"]
            accuracy = 0.9
            "#,
        )
        .unwrap();
        assert_eq!(config.version_policy, VersionPolicy::Latest(1));
        let options = config.load_options();
        assert_eq!(options.backend, BackendChoice::OnnxRuntime);
        assert_eq!(options.device, Device::Cuda);
        assert_eq!(options.threads.map(NonZeroUsize::get), Some(2));
        assert_eq!(config.cache.map(|c| c.max_bytes), Some(1000));
        let batching = config.batching.clone().unwrap();
        assert_eq!(
            (batching.max_batch_size, batching.max_queue_size),
            (8, 1024)
        );
        assert_eq!(config.inputs[0].datatype, Some(DataType::Fp32));
        assert_eq!(config.card.unwrap().metrics["1"]["accuracy"], 0.9);
    }

    #[test]
    fn counts_the_load_would_start_or_allocate_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.toml");
        for (text, says) in [
            (
                "instances = 100000000",
                "instances is 100000000; at most 256",
            ),
            (
                "threads = 18446744073709551615",
                "threads is 18446744073709551615",
            ),
            (
                "[batching]\nmax_batch_size = 4\nmax_queue_size = 4611686018427387904",
                "batching.max_queue_size is 4611686018427387904",
            ),
            (
                "[[inputs]]\nname = \"x\"\nshape = [-5]",
                "'x' has the dimension -5",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = ModelConfig::read(&path).unwrap_err().to_string();
            assert!(err.contains("model.toml") && err.contains(says), "{err}");
        }
        std::fs::write(&path, "instances = 256\nthreads = 1024").unwrap();
        assert!(ModelConfig::read(&path).is_ok());
    }

    #[test]
    fn typos_are_refused() {
        let err = toml::from_str::<ModelConfig>("version_polcy = \"all\"").unwrap_err();
        assert!(err.to_string().contains("version_polcy"), "{err}");
        let err = toml::from_str::<ModelConfig>("[[inputs]]\nname = \"x\"\ndatatype = \"FLOAT\"")
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown datatype 'FLOAT'"),
            "{err}"
        );
    }
}

/// `model.toml` under fuzzing, read the way the registry reads it: arbitrary text and
/// mutations of a document that sets every key never panic, and a refusal is a
/// `ConfigError` that names the file and, for a bad value or an unknown key, the key.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzzing::{Mutated, config, mutated, toml_like_text};

    /// Every key, each value on its key's line.
    const EVERY_KEY: &str = r#"version_policy = { specific = [1, 2] }
backend = "onnxruntime"
device = "cuda"
require_device = false
threads = 2
instances = 2
max_in_flight = 8
warmup = true
cache = { max_bytes = 1000 }
[batching]
max_batch_size = 8
max_queue_delay_us = 500
preferred_batch_sizes = [4, 8]
max_queue_size = 64
[drift]
window = 100
min_samples = 50
ks_threshold = 0.2
psi_threshold = 0.25
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[outputs]]
name = "y"
shape = [-1]
[card]
description = "d"
intended_use = "u"
limitations = "l"
owner = "o"
training_data = "t"
[card.metrics."1"]
accuracy = 0.9
"#;

    fn load(
        dir: &std::path::Path,
        text: &str,
    ) -> Result<Result<ModelConfig, String>, TestCaseError> {
        let path = dir.join("model.toml");
        std::fs::write(&path, text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match ModelConfig::read(&path) {
            Ok(config) => Ok(Ok(config)),
            Err(error) => {
                let named = matches!(&error, ConfigError::Parse { path: p, .. } | ConfigError::Invalid { path: p, .. } if *p == path);
                let message = error.to_string();
                prop_assert!(named && message.contains("model.toml"), "{message}");
                Ok(Err(message))
            }
        }
    }

    #[test]
    fn the_document_sets_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = load(dir.path(), EVERY_KEY).unwrap().unwrap();
        assert_eq!(config.version_policy, VersionPolicy::Specific(vec![1, 2]));
        assert_eq!(config.drift.window, 100);
    }

    proptest! {
        #![proptest_config(config(2_000))]

        #[test]
        fn fuzz_model_toml_arbitrary_text(text in toml_like_text()) {
            let dir = tempfile::tempdir().unwrap();
            let _ = load(dir.path(), &text)?;
        }

        #[test]
        fn fuzz_model_toml_mutated(Mutated { text, key } in mutated(EVERY_KEY)) {
            let dir = tempfile::tempdir().unwrap();
            if let (Err(message), Some(key)) = (load(dir.path(), &text)?, key) {
                prop_assert!(message.contains(&key), "{key} not named: {message}");
            }
        }
    }
}
