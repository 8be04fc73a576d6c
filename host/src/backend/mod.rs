//! Model backends: tract (CPU, pure Rust) and ONNX Runtime (CPU, or CUDA where the library
//! and a GPU have it), each behind the backend traits of `wasmtime-wasi-nn` (`BackendInner`,
//! `BackendGraph`, `BackendExecutionContext`), so that the host's request path and, later,
//! guests importing `wasi:nn` run a model through the very same graph object.
//!
//! The request path calls a graph's [`Runnable::run`] on host tensors, which carry every Open
//! Inference Protocol datatype; the wasi-nn view of the same object ([`wasi_nn`]) carries
//! only wasi-nn's tensor types (FP16, FP32, FP64, BF16, U8, I32, I64), which is narrower
//! than what models use (BOOL, INT8, strings…), so the host does not go through it.
//!
//! Owns: loading a model file into a runnable graph (backend, device, threads, warm-up) and
//! describing its signature, and running a graph on host tensors. Must not touch: HTTP, the
//! model directory layout or request validation (the pipeline checks requests against the
//! signature first).

mod limits;
pub mod onnxruntime;
mod tract;
pub mod wasi_nn;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tensor::{Tensor, TensorSpec};

pub use tract::{TensorOverride, TractBackend, TractError};

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

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("tract: {0}")]
    Tract(#[from] TractError),
    #[error("onnxruntime: {0}")]
    OnnxRuntime(#[from] onnxruntime::OrtError),
}

/// Loads an ONNX model with the backend and on the device `options` ask for.
pub fn load(bytes: &[u8], options: &LoadOptions) -> Result<LoadedGraph, LoadError> {
    let use_ort = match options.backend {
        BackendChoice::Tract => false,
        BackendChoice::OnnxRuntime => true,
        BackendChoice::Auto => onnxruntime::available(),
    };
    if use_ort {
        return Ok(onnxruntime::load(bytes, options)?);
    }
    if options.device == Device::Cuda && options.require_device {
        return Err(TractError::Device.into());
    }
    let mut loaded = TractBackend::load_onnx(bytes, &options.inputs, &options.outputs)?;
    if options.device == Device::Cuda {
        loaded.engine.fallback = Some(match options.backend {
            BackendChoice::Auto => format!(
                "the ONNX Runtime library is not available ({}); tract runs on the CPU",
                onnxruntime::unavailable_reason().unwrap_or_default()
            ),
            _ => "tract runs models on the CPU only".to_string(),
        });
    }
    Ok(loaded)
}

/// Runs the model twice per batch size in `batches` on inputs of zeros (variable dimensions
/// other than the batch at 1), so that the first client does not pay for the backend's
/// lazy preparation; returns the time of the fastest run, the run time that the request
/// path plans with.
pub fn warm_up(graph: &LoadedGraph, batches: &[usize]) -> Result<Duration, RunError> {
    let mut fastest = Duration::MAX;
    for &batch in batches {
        let inputs = graph
            .inputs
            .iter()
            .map(|spec| zeros(spec, batch))
            .collect::<Result<Vec<_>, _>>()?;
        // Twice: the first run pays for the backend's lazy set-up, the second is the one
        // requests will see.
        for _ in 0..2 {
            let inputs = inputs.clone();
            let started = Instant::now();
            // A backend that panics on zeros fails its warm-up, not the server.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| graph.model.run(inputs)))
                .map_err(|_| RunError::Failed("the backend crashed on inputs of zeros".into()))??;
            fastest = fastest.min(started.elapsed());
        }
    }
    Ok(fastest)
}

/// A BYTES input's elements as the UTF-8 strings ONNX string tensors hold.
fn strings(tensor: &Tensor) -> Result<Vec<String>, RunError> {
    let rejected = |what: &str| RunError::Rejected(format!("input '{}': {what}", tensor.name));
    Tensor::byte_elements(&tensor.data)
        .ok_or_else(|| rejected("malformed BYTES data"))?
        .into_iter()
        .map(|b| String::from_utf8(b.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| rejected("ONNX string tensors hold UTF-8 text"))
}

/// An output's strings as BYTES data: each a little-endian u32 length, then its bytes.
fn bytes_data<'a>(
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

fn zeros(spec: &TensorSpec, batch: usize) -> Result<Tensor, RunError> {
    let shape: Vec<usize> = spec
        .shape
        .iter()
        .enumerate()
        .map(|(i, &d)| match usize::try_from(d) {
            Ok(d) => d,
            Err(_) if i == 0 => batch,
            Err(_) => 1,
        })
        .collect();
    let count = Tensor::element_count(&shape)
        .ok_or_else(|| RunError::Failed(format!("input '{}' is too large", spec.name)))?;
    let data = match spec.datatype.element_size() {
        Some(size) => vec![0; count * size],
        // Empty strings: a zero length prefix each.
        None => vec![0; count * 4],
    };
    Ok(Tensor {
        name: spec.name.clone(),
        datatype: spec.datatype,
        shape,
        data,
    })
}
