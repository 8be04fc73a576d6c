//! `models/<name>/model.toml`: what a model's directory may say about the model.

use std::collections::BTreeMap;

use std::num::NonZeroUsize;

use crate::backend::{BackendChoice, Device, LoadOptions, TensorOverride};

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
