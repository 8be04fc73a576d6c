//! Model backends, behind the backend traits of `wasmtime-wasi-nn` (`BackendInner`,
//! `BackendGraph`, `BackendExecutionContext`), so that the host's request path and, later,
//! guests importing `wasi:nn` run a model through the very same graph object.
//!
//! We use those traits rather than our own bindings of the `wasi:nn` WIT: their one
//! narrowness is the tensor type set (FP16, FP32, FP64, BF16, U8, I32, I64), and a model
//! whose inputs or outputs fall outside it is refused at load with that reason. Tensor data
//! moves into and out of the traits' `Vec<u8>` without copying; the backend copies once
//! into its own aligned buffers, which it would need to do for any byte source.
//!
//! Owns: loading a model file into a runnable graph and describing its signature, and
//! running a graph on host tensors. Must not touch: HTTP, the model directory layout or
//! request validation (the pipeline checks requests against the signature first).

mod tract;

use std::error::Error as _;

use wasmtime_wasi_nn::backend::{BackendError, NamedTensor};
use wasmtime_wasi_nn::wit::TensorType;
use wasmtime_wasi_nn::{Graph, Tensor as NnTensor};

use crate::tensor::{DataType, Tensor, TensorSpec};

pub use tract::{TensorOverride, TractBackend, TractError};

/// A model ready to run: its wasi-nn graph and what it takes and gives.
pub struct LoadedGraph {
    pub graph: Graph,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Why running a graph failed, with the backend's own words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunError(String);

/// Runs `graph` on `inputs` (already checked against its signature) and returns every output.
pub fn run(graph: &Graph, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
    let named = inputs
        .into_iter()
        .map(to_named_tensor)
        .collect::<Result<Vec<_>, _>>()?;
    let mut context = graph.init_execution_context().map_err(describe)?;
    let outputs = context.compute_with_io(named).map_err(describe)?;
    outputs.into_iter().map(from_named_tensor).collect()
}

/// The wasi-nn tensor type that carries `datatype`, if any does.
pub fn tensor_type(datatype: DataType) -> Option<TensorType> {
    Some(match datatype {
        DataType::Fp16 => TensorType::Fp16,
        DataType::Fp32 => TensorType::Fp32,
        DataType::Fp64 => TensorType::Fp64,
        DataType::Uint8 => TensorType::U8,
        DataType::Int32 => TensorType::I32,
        DataType::Int64 => TensorType::I64,
        _ => return None,
    })
}

fn datatype(ty: TensorType) -> Option<DataType> {
    DataType::ALL
        .into_iter()
        .find(|&dt| tensor_type(dt) == Some(ty))
}

fn to_named_tensor(tensor: Tensor) -> Result<NamedTensor, RunError> {
    let ty = tensor_type(tensor.datatype).ok_or_else(|| {
        RunError(format!(
            "input '{}' is {}, which wasi-nn tensors cannot carry",
            tensor.name, tensor.datatype
        ))
    })?;
    let dimensions = tensor
        .shape
        .iter()
        .map(|&d| u32::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            RunError(format!(
                "input '{}' has a dimension above {}, the most wasi-nn can describe",
                tensor.name,
                u32::MAX
            ))
        })?;
    Ok(NamedTensor {
        name: tensor.name,
        tensor: NnTensor::new(dimensions, ty, tensor.data),
    })
}

fn from_named_tensor(named: NamedTensor) -> Result<Tensor, RunError> {
    let datatype = datatype(named.tensor.ty).ok_or_else(|| {
        RunError(format!(
            "output '{}' came back as {:?}, which has no Open Inference Protocol datatype",
            named.name, named.tensor.ty
        ))
    })?;
    Ok(Tensor {
        name: named.name,
        datatype,
        shape: named
            .tensor
            .dimensions
            .iter()
            .map(|&d| d as usize)
            .collect(),
        data: named.tensor.data,
    })
}

/// `BackendError`'s own message is generic ("Failed while accessing backend"); the reason
/// sits in its sources.
fn describe(error: BackendError) -> RunError {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    RunError(message)
}
