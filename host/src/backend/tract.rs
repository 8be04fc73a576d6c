//! tract (CPU) as a wasi-nn backend. Each model is parsed, typed and optimised once at load
//! with its variable dimensions left symbolic, so one plan serves any batch size.

use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, TDim, TValue,
    Tensor as TractTensor, TypedFact, TypedRunnableModel,
};
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding};
use wasmtime_wasi_nn::{ExecutionContext, Graph, Tensor as NnTensor};

use super::{LoadedGraph, tensor_type};
use crate::tensor::{DataType, TensorSpec};

/// What `model.toml` may say about an input or output the ONNX file leaves open: its
/// datatype, its shape (with `-1` for a dimension that varies per request), or both.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorOverride {
    pub name: String,
    pub datatype: Option<DataType>,
    pub shape: Option<Vec<i64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TractError {
    #[error("not an ONNX model tract can read: {0:#}")]
    Parse(tract_onnx::prelude::TractError),
    #[error(
        "model.toml describes {kind} '{name}', which the model does not have (it has: {available})"
    )]
    UnknownOverride {
        kind: &'static str,
        name: String,
        available: String,
    },
    #[error(
        "model.toml gives {kind} '{name}' the shape {shape:?}; dimensions are -1 or at least 0"
    )]
    BadOverrideShape {
        kind: &'static str,
        name: String,
        shape: Vec<i64>,
    },
    #[error(
        "cannot prepare the model for inference: {0:#} (if an input's type or shape is open in \
         the file, declare it in model.toml)"
    )]
    Optimise(tract_onnx::prelude::TractError),
    #[error(
        "{kind} '{name}' has element type {datatype:?}, which the Open Inference Protocol has no datatype for"
    )]
    NoProtocolType {
        kind: &'static str,
        name: String,
        datatype: DatumType,
    },
    #[error(
        "{kind} '{name}' is {datatype}, which wasi-nn tensors cannot carry (they carry FP16, \
         FP32, FP64, UINT8, INT32 and INT64)"
    )]
    NotWasiNnType {
        kind: &'static str,
        name: String,
        datatype: DataType,
    },
    #[error("tract runs models on the CPU; {0:?} was asked for")]
    Target(ExecutionTarget),
    #[error("the model has no {kind} {id}")]
    UnknownTensor { kind: &'static str, id: String },
    #[error("input '{0}' was not set before compute")]
    MissingInput(String),
    #[error(
        "input '{name}' holds {got} bytes, but its shape {shape:?} of {datatype:?} needs {want}"
    )]
    DataSize {
        name: String,
        datatype: DatumType,
        shape: Vec<usize>,
        got: usize,
        want: usize,
    },
    #[error("tensor '{0}' has more dimensions or a larger dimension than wasi-nn can describe")]
    TooLarge(String),
    #[error("no output was computed yet")]
    NotComputed,
    #[error("inference failed: {0:#}")]
    Run(tract_onnx::prelude::TractError),
}

impl From<TractError> for BackendError {
    fn from(error: TractError) -> Self {
        BackendError::BackendAccess(wasmtime::Error::new(error))
    }
}

/// Loads ONNX models with tract; registered with wasi-nn under `GraphEncoding::Onnx`.
#[derive(Default)]
pub struct TractBackend;

impl TractBackend {
    /// Parses, types and optimises an ONNX model, applying `model.toml`'s overrides first.
    pub fn load_onnx(
        bytes: &[u8],
        inputs: &[TensorOverride],
        outputs: &[TensorOverride],
    ) -> Result<LoadedGraph, TractError> {
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(TractError::Parse)?;

        let input_names = model
            .input_outlets()
            .map_err(TractError::Parse)?
            .iter()
            .map(|outlet| model.node(outlet.node).name.clone())
            .collect::<Vec<_>>();
        let output_names = model
            .output_outlets()
            .map_err(TractError::Parse)?
            .iter()
            .map(|&outlet| {
                model
                    .outlet_label(outlet)
                    .unwrap_or(&model.node(outlet.node).name)
                    .to_string()
            })
            .collect::<Vec<_>>();

        for (kind, overrides, names) in [
            ("input", inputs, &input_names),
            ("output", outputs, &output_names),
        ] {
            for o in overrides {
                let ix = names.iter().position(|n| *n == o.name).ok_or_else(|| {
                    TractError::UnknownOverride {
                        kind,
                        name: o.name.clone(),
                        available: names.join(", "),
                    }
                })?;
                let current = if kind == "input" {
                    model.input_fact(ix)
                } else {
                    model.output_fact(ix)
                }
                .map_err(TractError::Parse)?
                .clone();
                let fact = override_fact(&model.symbols, current, kind, o)?;
                if kind == "input" {
                    model.set_input_fact(ix, fact)
                } else {
                    model.set_output_fact(ix, fact)
                }
                .map_err(TractError::Parse)?;
            }
        }

        let typed = model.into_typed().map_err(TractError::Optimise)?;
        let specs = |kind: &'static str, names: &[String], fact: &dyn Fn(usize) -> _| {
            names
                .iter()
                .enumerate()
                .map(|(ix, name)| spec(kind, name, fact(ix)))
                .collect::<Result<Vec<_>, _>>()
        };
        let input_specs = specs("input", &input_names, &|ix| typed.input_fact(ix))?;
        let output_specs = specs("output", &output_names, &|ix| typed.output_fact(ix))?;

        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(TractError::Optimise)?;
        let graph: Box<dyn BackendGraph> = Box::new(TractGraph {
            plan,
            names: Arc::new((input_names, output_names)),
        });
        Ok(LoadedGraph {
            graph: Graph::from(graph),
            inputs: input_specs,
            outputs: output_specs,
        })
    }
}

impl BackendInner for TractBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Onnx
    }

    fn load(&mut self, builders: &[&[u8]], target: ExecutionTarget) -> Result<Graph, BackendError> {
        if target != ExecutionTarget::Cpu {
            return Err(TractError::Target(target).into());
        }
        let [bytes] = builders else {
            return Err(BackendError::InvalidNumberOfBuilders(1, builders.len()));
        };
        Ok(Self::load_onnx(bytes, &[], &[])?.graph)
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        // Graphs reach guests through the host's model registry, never by directory.
        None
    }
}

fn override_fact(
    symbols: &tract_onnx::prelude::SymbolScope,
    mut fact: InferenceFact,
    kind: &'static str,
    o: &TensorOverride,
) -> Result<InferenceFact, TractError> {
    if let Some(dt) = o.datatype {
        fact = fact.with_datum_type(datum_type(dt));
    }
    if let Some(shape) = &o.shape {
        let dims = shape
            .iter()
            .enumerate()
            .map(|(i, &d)| match d {
                // The first variable dimension is the batch by convention, shared by
                // every input that declares one, so tract can relate them.
                -1 if i == 0 => Ok(TDim::Sym(symbols.sym("batch"))),
                -1 => Ok(TDim::Sym(
                    symbols.new_with_prefix(&format!("{}_{i}", o.name)),
                )),
                d => usize::try_from(d)
                    .map(TDim::from)
                    .map_err(|_| TractError::BadOverrideShape {
                        kind,
                        name: o.name.clone(),
                        shape: shape.clone(),
                    }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        fact = fact.with_shape(dims);
    }
    Ok(fact)
}

fn spec(
    kind: &'static str,
    name: &str,
    fact: tract_onnx::prelude::TractResult<&TypedFact>,
) -> Result<TensorSpec, TractError> {
    let fact = fact.map_err(TractError::Optimise)?;
    let datatype =
        protocol_datatype(fact.datum_type).ok_or_else(|| TractError::NoProtocolType {
            kind,
            name: name.to_string(),
            datatype: fact.datum_type,
        })?;
    if tensor_type(datatype).is_none() {
        return Err(TractError::NotWasiNnType {
            kind,
            name: name.to_string(),
            datatype,
        });
    }
    let shape = fact
        .shape
        .iter()
        .map(|d| d.to_i64().unwrap_or(-1))
        .collect();
    Ok(TensorSpec {
        name: name.to_string(),
        datatype,
        shape,
    })
}

fn protocol_datatype(dt: DatumType) -> Option<DataType> {
    DataType::ALL.into_iter().find(|&d| datum_type(d) == dt)
}

fn datum_type(dt: DataType) -> DatumType {
    match dt {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
    }
}

/// Input names then output names, in the model's order.
type Names = (Vec<String>, Vec<String>);

struct TractGraph {
    plan: Arc<TypedRunnableModel>,
    names: Arc<Names>,
}

impl BackendGraph for TractGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let context: Box<dyn BackendExecutionContext> = Box::new(TractContext {
            plan: self.plan.clone(),
            inputs: vec![None; self.names.0.len()],
            outputs: Vec::new(),
            names: self.names.clone(),
        });
        Ok(context.into())
    }
}

struct TractContext {
    plan: Arc<TypedRunnableModel>,
    names: Arc<Names>,
    inputs: Vec<Option<TValue>>,
    outputs: Vec<TValue>,
}

impl TractContext {
    fn index(kind: &'static str, names: &[String], id: &Id) -> Result<usize, TractError> {
        match id {
            Id::Index(i) => usize::try_from(*i).ok().filter(|&i| i < names.len()),
            Id::Name(name) => names.iter().position(|n| n == name),
        }
        .ok_or_else(|| TractError::UnknownTensor {
            kind,
            id: format!("{id:?}"),
        })
    }

    fn run(&mut self) -> Result<(), TractError> {
        let inputs = self
            .inputs
            .iter_mut()
            .zip(&self.names.0)
            .map(|(slot, name)| {
                slot.take()
                    .ok_or_else(|| TractError::MissingInput(name.clone()))
            })
            .collect::<Result<_, _>>()?;
        self.outputs = self.plan.run(inputs).map_err(TractError::Run)?.into_vec();
        Ok(())
    }
}

impl BackendExecutionContext for TractContext {
    fn set_input(&mut self, id: Id, tensor: &NnTensor) -> Result<(), BackendError> {
        let ix = Self::index("input", &self.names.0, &id)?;
        self.inputs[ix] = Some(to_tract(&self.names.0[ix], tensor)?.into());
        Ok(())
    }

    fn get_output(&mut self, id: Id) -> Result<NnTensor, BackendError> {
        let ix = Self::index("output", &self.names.1, &id)?;
        let value = self.outputs.get(ix).ok_or(TractError::NotComputed)?;
        Ok(to_nn(&self.names.1[ix], value)?)
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
            let ix = Self::index("input", &self.names.0, &Id::Name(input.name))?;
            self.inputs[ix] = Some(to_tract(&self.names.0[ix], &input.tensor)?.into());
        }
        self.run()?;
        let outputs = self
            .names
            .1
            .iter()
            .zip(&self.outputs)
            .map(|(name, value)| {
                Ok(NamedTensor {
                    name: name.clone(),
                    tensor: to_nn(name, value)?,
                })
            })
            .collect::<Result<_, TractError>>()?;
        Ok(Some(outputs))
    }
}

fn to_tract(name: &str, tensor: &NnTensor) -> Result<TractTensor, TractError> {
    let dt =
        super::datatype(tensor.ty)
            .map(datum_type)
            .ok_or_else(|| TractError::NotWasiNnType {
                kind: "input",
                name: name.to_string(),
                datatype: DataType::Bytes,
            })?;
    let shape: Vec<usize> = tensor.dimensions.iter().map(|&d| d as usize).collect();
    let mut out = TractTensor::zero_dt(dt, &shape).map_err(TractError::Run)?;
    let bytes = out.as_bytes_mut();
    if bytes.len() != tensor.data.len() {
        return Err(TractError::DataSize {
            name: name.to_string(),
            datatype: dt,
            shape,
            got: tensor.data.len(),
            want: bytes.len(),
        });
    }
    bytes.copy_from_slice(&tensor.data);
    Ok(out)
}

fn to_nn(name: &str, value: &TValue) -> Result<NnTensor, TractError> {
    let datatype =
        protocol_datatype(value.datum_type()).ok_or_else(|| TractError::NoProtocolType {
            kind: "output",
            name: name.to_string(),
            datatype: value.datum_type(),
        })?;
    let ty = tensor_type(datatype).ok_or_else(|| TractError::NotWasiNnType {
        kind: "output",
        name: name.to_string(),
        datatype,
    })?;
    let dimensions = value
        .shape()
        .iter()
        .map(|&d| u32::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TractError::TooLarge(name.to_string()))?;
    Ok(NnTensor::new(dimensions, ty, value.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iris(version: &str) -> Vec<u8> {
        let path = format!(
            "{}/../models/iris/{version}/model.onnx",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    #[test]
    fn iris_signature_keeps_the_batch_variable() {
        let loaded = TractBackend::load_onnx(&iris("2"), &[], &[]).unwrap();
        assert_eq!(
            loaded.inputs,
            vec![TensorSpec {
                name: "input".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 4]
            }]
        );
        assert_eq!(loaded.outputs[0].name, "probabilities");
        assert_eq!(loaded.outputs[0].shape, vec![-1, 3]);
    }

    #[test]
    fn wasi_nn_trait_path_runs_any_batch_size() {
        let mut backend = TractBackend;
        let graph = backend.load(&[&iris("2")], ExecutionTarget::Cpu).unwrap();
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

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = TractBackend::load_onnx(b"not a model", &[], &[])
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("not an ONNX model"), "{err}");
    }

    #[test]
    fn override_of_unknown_input_names_the_choices() {
        let o = TensorOverride {
            name: "pixels".into(),
            datatype: None,
            shape: Some(vec![-1, 4]),
        };
        let err = TractBackend::load_onnx(&iris("1"), &[o], &[])
            .err()
            .unwrap();
        assert!(err.to_string().contains("it has: input"), "{err}");
    }
}
