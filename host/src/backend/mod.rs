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
//!
//! The files go one way: `cpu` (what a run costs), `graph` (what every backend shares) ← `limits` ← `tract`,
//! `onnxruntime` ← this file (`load`, `warm_up`) ← `wasi_nn` (the wasi-nn face of it all).

pub mod cpu;
mod graph;
mod limits;
pub mod onnxruntime;
mod tract;
pub mod wasi_nn;

use std::time::{Duration, Instant};

use crate::tensor::{Tensor, TensorSpec};

pub use graph::{
    BackendChoice, Device, Engine, LoadOptions, LoadedGraph, RunError, Runnable, TensorOverride,
    UnknownOverride,
};
pub use tract::{TractBackend, TractError};

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

/// The largest warm-up input made: a declared shape beyond it (a typo in `model.toml`, a
/// model that claims a huge fixed input) would take the machine's memory, or abort it,
/// before any request came.
const WARM_UP_BYTES: usize = 256 << 20;

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
    // Empty strings for BYTES: a zero length prefix each.
    let size = spec.datatype.element_size().unwrap_or(4);
    let bytes = Tensor::element_count(&shape)
        .and_then(|count| count.checked_mul(size))
        .filter(|&bytes| bytes <= WARM_UP_BYTES)
        .ok_or_else(|| {
            RunError::Failed(format!(
                "input '{}' of shape {shape:?} takes over {WARM_UP_BYTES} bytes, too many to warm up with (warmup = false skips it)",
                spec.name
            ))
        })?;
    let data = vec![0; bytes];
    Ok(Tensor {
        name: spec.name.clone(),
        datatype: spec.datatype,
        shape,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DataType;

    #[test]
    fn warm_up_inputs_of_a_huge_declared_shape_are_refused_not_allocated() {
        let spec = |shape: Vec<i64>| TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape,
        };
        for shape in [vec![-1, 1 << 40], vec![1 << 61], vec![1 << 32, 1 << 32]] {
            let (made, largest) =
                crate::fuzzing::largest_allocation(|| zeros(&spec(shape.clone()), 1));
            let err = made.unwrap_err().to_string();
            assert!(err.contains("too many to warm up with"), "{shape:?}: {err}");
            assert!(largest < 1 << 20, "{shape:?}: {largest} bytes");
        }
        let made = zeros(&spec(vec![-1, 4]), 3).unwrap();
        assert_eq!((made.shape, made.data.len()), (vec![3, 4], 48));
    }
}
