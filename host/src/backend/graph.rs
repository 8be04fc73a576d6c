//! What every backend shares: the trait the host runs a model through, its errors, the
//! load options `model.toml` gives, the engine a version reports, and the BYTES
//! conversions both backends need for ONNX string tensors.

use std::num::NonZeroUsize;
use std::sync::Arc;

use crate::tensor::{DataType, Tensor, TensorSpec};

/// A loaded model, as the host runs it.
pub trait Runnable: Send + Sync {
    /// Runs the model on `inputs` (already checked against its signature) and returns every
    /// output, in the signature's order.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError>;
}

/// Why running a graph failed, with the backend's own words.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The inputs fit the signature but hold values the model cannot take (a token id past
    /// the vocabulary, say): the client's to fix.
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Failed(String),
}

/// Which backend `model.toml` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Tract,
    #[serde(rename = "onnxruntime")]
    OnnxRuntime,
    /// ONNX Runtime when its library can be loaded, else tract.
    #[default]
    Auto,
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

/// How `model.toml` wants its model loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    pub backend: BackendChoice,
    pub device: Device,
    /// Refuse the model rather than run it on the CPU when `device` cannot be had.
    pub require_device: bool,
    /// Threads one run may use (ONNX Runtime's intra-op threads); the backend's own default
    /// (ONNX Runtime: one per core) when unset.
    pub threads: Option<NonZeroUsize>,
    /// Runs of the model that may go at once (ONNX Runtime keeps a session for each).
    pub instances: NonZeroUsize,
    pub inputs: Vec<TensorOverride>,
    pub outputs: Vec<TensorOverride>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            backend: BackendChoice::default(),
            device: Device::default(),
            require_device: false,
            threads: None,
            instances: NonZeroUsize::MIN,
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }
}

/// What a version runs on, for metadata, the admin API and logs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Engine {
    /// `tract` or `onnxruntime`.
    pub backend: &'static str,
    /// The library's version, for ONNX Runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub device: Device,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Runs that may go at once; no limit of its own when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
    /// Why the model runs somewhere other than where `model.toml` asked (no GPU, say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// A model ready to run: the graph, what it takes and gives, and what runs it.
pub struct LoadedGraph {
    pub model: Arc<dyn Runnable>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub engine: Engine,
}

/// `model.toml` names an input or output the model does not have.
#[derive(Debug, thiserror::Error)]
#[error(
    "model.toml describes {kind} '{name}', which the model does not have (it has: {available})"
)]
pub struct UnknownOverride {
    pub kind: &'static str,
    pub name: String,
    pub available: String,
}

/// What `model.toml` may say about an input or output the ONNX file leaves open: its
/// datatype, its shape (with `-1` for a dimension that varies per request), or both.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorOverride {
    pub name: String,
    pub datatype: Option<DataType>,
    pub shape: Option<Vec<i64>>,
}

/// A BYTES input's elements as the UTF-8 strings ONNX string tensors hold.
pub(super) fn strings(tensor: &Tensor) -> Result<Vec<String>, RunError> {
    let rejected = |what: &str| RunError::Rejected(format!("input '{}': {what}", tensor.name));
    Tensor::byte_elements(&tensor.data)
        .ok_or_else(|| rejected("malformed BYTES data"))?
        .into_iter()
        .map(|b| String::from_utf8(b.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| rejected("ONNX string tensors hold UTF-8 text"))
}

/// An output's strings as BYTES data: each a little-endian u32 length, then its bytes.
pub(super) fn bytes_data<'a>(
    name: &str,
    strings: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<u8>, RunError> {
    let mut data = Vec::new();
    for s in strings {
        let len = u32::try_from(s.len())
            .map_err(|_| RunError::Failed(format!("output '{name}': a string over 4 GiB")))?;
        data.extend_from_slice(&len.to_le_bytes());
        data.extend_from_slice(s.as_bytes());
    }
    Ok(data)
}
