//! The backends as wasi-nn sees them, for guests that import `wasi:nn`: [`WasiNnBackend`]
//! (`BackendInner`) loads through [`super::load`], the one loader the model repository
//! uses, and a loaded graph's view is the same model object behind `BackendGraph` and
//! `BackendExecutionContext`. Tensors cross as wasi-nn
//! tensors, so a model whose inputs or outputs fall outside wasi-nn's types is run here only
//! for the tensors wasi-nn can carry; the refusal names the tensor.

use std::sync::Arc;

use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{ExecutionContext, Graph, Tensor as NnTensor};

use super::graph::{BackendChoice, Device, LoadOptions, LoadedGraph, RunError, Runnable};
use crate::tensor::{DataType, Tensor};

impl From<RunError> for BackendError {
    fn from(error: RunError) -> Self {
        BackendError::BackendAccess(wasmtime::Error::new(error))
    }
}

/// One of the host's backends as a wasi-nn backend, registered under `GraphEncoding::Onnx`;
/// `ExecutionTarget::Gpu` asks for CUDA, and refuses where it cannot have it.
pub struct WasiNnBackend(BackendChoice);

impl WasiNnBackend {
    pub fn tract() -> WasiNnBackend {
        WasiNnBackend(BackendChoice::Tract)
    }

    pub fn onnxruntime() -> WasiNnBackend {
        WasiNnBackend(BackendChoice::OnnxRuntime)
    }
}

impl BackendInner for WasiNnBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }

    fn load(&mut self, builders: &[&[u8]], target: ExecutionTarget) -> Result<Graph, BackendError> {
        let [bytes] = builders else {
            return Err(BackendError::InvalidNumberOfBuilders(1, builders.len()));
        };
        let device = match target {
            ExecutionTarget::Gpu => Device::Cuda,
            _ => Device::Cpu,
        };
        let options = LoadOptions {
            backend: self.0,
            device,
            require_device: true,
            ..LoadOptions::default()
        };
        let loaded = super::load(bytes, &options)
            .map_err(|e| BackendError::BackendAccess(wasmtime::Error::new(e)))?;
        Ok(loaded.wasi_nn())
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        // Graphs reach guests through the host's model registry, never by directory.
        None
    }
}

impl LoadedGraph {
    /// This graph as wasi-nn's `Graph`: the same model, not a copy.
    pub fn wasi_nn(&self) -> Graph {
        let names = |specs: &[crate::tensor::TensorSpec]| -> Vec<String> {
            specs.iter().map(|s| s.name.clone()).collect()
        };
        let graph: Box<dyn BackendGraph> = Box::new(NnGraph {
            model: self.model.clone(),
            names: Arc::new((names(&self.inputs), names(&self.outputs))),
        });
        Graph::from(graph)
    }
}

/// The wasi-nn tensor type that carries `datatype`, if any does.
pub fn tensor_type(datatype: DataType) -> Option<TensorType> {
    Some(match datatype {
        DataType::Fp16 => TensorType::Fp16,
        DataType::Fp32 => TensorType::Fp32,
        DataType::Fp64 => TensorType::Fp64,
        DataType::Bf16 => TensorType::Bf16,
        DataType::Uint8 => TensorType::U8,
        DataType::Int32 => TensorType::I32,
        DataType::Int64 => TensorType::I64,
        _ => return None,
    })
}

fn datatype(ty: TensorType) -> DataType {
    match ty {
        TensorType::Fp16 => DataType::Fp16,
        TensorType::Fp32 => DataType::Fp32,
        TensorType::Fp64 => DataType::Fp64,
        TensorType::Bf16 => DataType::Bf16,
        TensorType::U8 => DataType::Uint8,
        TensorType::I32 => DataType::Int32,
        TensorType::I64 => DataType::Int64,
    }
}

/// Input names then output names, in the model's order.
type Names = (Vec<String>, Vec<String>);

struct NnGraph {
    model: Arc<dyn Runnable>,
    names: Arc<Names>,
}

impl BackendGraph for NnGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let context: Box<dyn BackendExecutionContext> = Box::new(NnContext {
            model: self.model.clone(),
            inputs: vec![None; self.names.0.len()],
            outputs: Vec::new(),
            names: self.names.clone(),
        });
        Ok(context.into())
    }
}

struct NnContext {
    model: Arc<dyn Runnable>,
    names: Arc<Names>,
    inputs: Vec<Option<Tensor>>,
    outputs: Vec<Tensor>,
}

impl NnContext {
    fn index(kind: &str, names: &[String], id: &Id) -> Result<usize, RunError> {
        match id {
            Id::Index(i) => usize::try_from(*i).ok().filter(|&i| i < names.len()),
            Id::Name(name) => names.iter().position(|n| n == name),
        }
        .ok_or_else(|| RunError::Rejected(format!("the model has no {kind} {id:?}")))
    }

    fn set(&mut self, id: Id, tensor: &NnTensor) -> Result<(), RunError> {
        let ix = Self::index("input", &self.names.0, &id)?;
        self.inputs[ix] = Some(Tensor {
            name: self.names.0[ix].clone(),
            datatype: datatype(tensor.ty),
            shape: tensor.dimensions.iter().map(|&d| d as usize).collect(),
            data: tensor.data.clone(),
        });
        Ok(())
    }

    fn run(&mut self) -> Result<(), RunError> {
        let inputs = self
            .inputs
            .iter_mut()
            .zip(&self.names.0)
            .map(|(slot, name)| {
                slot.take().ok_or_else(|| {
                    RunError::Rejected(format!("input '{name}' was not set before compute"))
                })
            })
            .collect::<Result<_, _>>()?;
        self.outputs = self.model.run(inputs)?;
        Ok(())
    }
}

fn to_nn(tensor: &Tensor) -> Result<NnTensor, RunError> {
    let ty = tensor_type(tensor.datatype).ok_or_else(|| {
        RunError::Failed(format!(
            "output '{}' is {}, which wasi-nn tensors cannot carry",
            tensor.name, tensor.datatype
        ))
    })?;
    let dimensions = tensor
        .shape
        .iter()
        .map(|&d| u32::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            RunError::Failed(format!(
                "output '{}' has a dimension larger than wasi-nn can describe",
                tensor.name
            ))
        })?;
    Ok(NnTensor::new(dimensions, ty, tensor.data.clone()))
}

impl BackendExecutionContext for NnContext {
    fn set_input(&mut self, id: Id, tensor: &NnTensor) -> Result<(), BackendError> {
        Ok(self.set(id, tensor)?)
    }

    fn get_output(&mut self, id: Id) -> Result<NnTensor, BackendError> {
        let ix = Self::index("output", &self.names.1, &id)?;
        let tensor = self
            .outputs
            .get(ix)
            .ok_or_else(|| RunError::Rejected("no output was computed yet".into()))?;
        Ok(to_nn(tensor)?)
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let Some(inputs) = inputs else {
            self.run()?;
            return Ok(None);
        };
        for input in inputs {
            self.set(Id::Name(input.name), &input.tensor)?;
        }
        self.run()?;
        let outputs = self
            .outputs
            .iter()
            .map(|t| {
                Ok(NamedTensor {
                    name: t.name.clone(),
                    tensor: to_nn(t)?,
                })
            })
            .collect::<Result<_, RunError>>()?;
        Ok(Some(outputs))
    }
}

#[cfg(test)]
mod tests {
    use wasmtime_wasi_nn::Tensor as NnTensor;

    use super::*;
    use crate::testing::iris_model;

    #[test]
    fn wasi_nn_trait_path_runs_any_batch_size() {
        let mut backend = WasiNnBackend::tract();
        let graph = backend
            .load(&[&iris_model(2)], ExecutionTarget::Cpu)
            .unwrap();
        for batch in [1u32, 3] {
            let mut ctx = graph.init_execution_context().unwrap();
            let data: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2]
                .repeat(batch as usize)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            ctx.set_input(
                Id::Index(0),
                &NnTensor::new(
                    vec![batch, 4],
                    wasmtime_wasi_nn::wit::TensorType::Fp32,
                    data,
                ),
            )
            .unwrap();
            ctx.compute().unwrap();
            let out = ctx.get_output(Id::Name("probabilities".into())).unwrap();
            assert_eq!(out.dimensions, vec![batch, 3]);
            let probs: Vec<f32> = out
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            // A textbook setosa: the first class wins clearly.
            assert!(probs[0] > 0.9, "{probs:?}");
            assert!((probs[..3].iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
}
