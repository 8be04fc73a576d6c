//! tract (CPU, pure Rust) as a backend. Each model is parsed, typed and optimised once at
//! load with its variable dimensions left symbolic, so one plan serves any batch size.

use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, TDim, TValue,
    Tensor as TractTensor, TypedFact, TypedRunnableModel, tract_ndarray,
};

use super::graph::{
    Device, Engine, LoadedGraph, RunError, Runnable, TensorOverride, UnknownOverride, bytes_data,
    strings,
};
use super::limits;
use crate::tensor::{DataType, Tensor, TensorSpec};

#[derive(Debug, thiserror::Error)]
pub enum TractError {
    #[error("not an ONNX model tract can read: {0:#}")]
    Parse(tract_onnx::prelude::TractError),
    #[error(transparent)]
    UnknownOverride(#[from] UnknownOverride),
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
    #[error("model.toml declares {kind} '{name}' as {datatype}, which tract cannot compute with")]
    Unsupported {
        kind: &'static str,
        name: String,
        datatype: DataType,
    },
    #[error("{0}")]
    KnownWrong(String),
    #[error("tract runs models on the CPU only, and model.toml requires device = \"cuda\"")]
    Device,
}

/// Loads ONNX models with tract.
#[derive(Default)]
pub struct TractBackend;

impl TractBackend {
    /// Parses, types and optimises an ONNX model, applying `model.toml`'s overrides first.
    pub fn load_onnx(
        bytes: &[u8],
        inputs: &[TensorOverride],
        outputs: &[TensorOverride],
    ) -> Result<LoadedGraph, TractError> {
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(TractError::Parse)?;
        let graph = proto.graph.as_ref();
        if let Some(reason) = graph.and_then(|g| limits::known_wrong(g, limits::Backend::Tract)) {
            return Err(TractError::KnownWrong(reason));
        }
        let bounds = graph.map(limits::index_bounds).unwrap_or_default();
        let mut model = onnx
            .model_for_proto_model(&proto)
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
                    TractError::UnknownOverride(UnknownOverride {
                        kind,
                        name: o.name.clone(),
                        available: names.join(", "),
                    })
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
        Ok(LoadedGraph {
            model: Arc::new(TractGraph {
                plan,
                inputs: input_names,
                outputs: output_names,
                bounds,
            }),
            inputs: input_specs,
            outputs: output_specs,
            engine: Engine {
                backend: "tract",
                version: None,
                device: Device::Cpu,
                threads: Some(1),
                // tract's plan runs any number of times at once.
                instances: None,
                fallback: None,
            },
        })
    }
}

fn override_fact(
    symbols: &tract_onnx::prelude::SymbolScope,
    mut fact: InferenceFact,
    kind: &'static str,
    o: &TensorOverride,
) -> Result<InferenceFact, TractError> {
    if let Some(dt) = o.datatype {
        let dt = datum_type(dt).ok_or_else(|| TractError::Unsupported {
            kind,
            name: o.name.clone(),
            datatype: dt,
        })?;
        fact = fact.with_datum_type(dt);
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
    // Shape and Size compute dimensions (tract's TDim); the protocol calls them INT64.
    if dt == DatumType::TDim {
        return Some(DataType::Int64);
    }
    DataType::ALL
        .into_iter()
        .find(|&d| datum_type(d) == Some(dt))
}

fn datum_type(dt: DataType) -> Option<DatumType> {
    Some(match dt {
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
        DataType::Bf16 => return None,
    })
}

struct TractGraph {
    plan: Arc<TypedRunnableModel>,
    /// The input and output names, in the plan's order.
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Inputs that index constant tables: checked before a run, since tract would panic.
    bounds: Vec<limits::IndexBound>,
}

impl Runnable for TractGraph {
    fn run(&self, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        limits::check_indices(&self.bounds, &inputs)?;
        let values = self
            .inputs
            .iter()
            .map(|name| {
                let ix = inputs
                    .iter()
                    .position(|t| t.name == *name)
                    .ok_or_else(|| RunError::Rejected(format!("input '{name}' is missing")))?;
                Ok(TValue::from(to_tract(inputs.swap_remove(ix))?))
            })
            .collect::<Result<_, RunError>>()?;
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| RunError::Failed(format!("inference failed: {e:#}")))?;
        self.outputs
            .iter()
            .zip(outputs.into_vec())
            .map(|(name, value)| from_tract(name.clone(), &value))
            .collect()
    }
}

fn to_tract(tensor: Tensor) -> Result<TractTensor, RunError> {
    let dt = datum_type(tensor.datatype).ok_or_else(|| {
        RunError::Rejected(format!(
            "input '{}' is {}, which tract cannot compute with",
            tensor.name, tensor.datatype
        ))
    })?;
    if tensor.datatype == DataType::Bytes {
        let strings = strings(&tensor)?;
        return tract_ndarray::ArrayD::from_shape_vec(tensor.shape.as_slice(), strings)
            .map(TractTensor::from)
            .map_err(|e| RunError::Rejected(format!("input '{}': {e}", tensor.name)));
    }
    let mut out = TractTensor::zero_dt(dt, &tensor.shape)
        .map_err(|e| RunError::Failed(format!("input '{}': {e}", tensor.name)))?;
    let bytes = out.as_bytes_mut();
    if bytes.len() != tensor.data.len() {
        return Err(RunError::Rejected(format!(
            "input '{}' holds {} bytes, but its shape {:?} of {} needs {}",
            tensor.name,
            tensor.data.len(),
            tensor.shape,
            tensor.datatype,
            bytes.len()
        )));
    }
    bytes.copy_from_slice(&tensor.data);
    Ok(out)
}

fn from_tract(name: String, value: &TValue) -> Result<Tensor, RunError> {
    if value.datum_type() == DatumType::TDim {
        let value = value
            .cast_to::<i64>()
            .map_err(|e| RunError::Failed(format!("output '{name}': {e}")))?;
        return from_tract(name, &value.into_owned().into());
    }
    let datatype = protocol_datatype(value.datum_type()).ok_or_else(|| {
        RunError::Failed(format!(
            "output '{name}' came back as {:?}, which has no Open Inference Protocol datatype",
            value.datum_type()
        ))
    })?;
    let data = if datatype == DataType::Bytes {
        let strings = value
            .to_plain_array_view::<String>()
            .map_err(|e| RunError::Failed(format!("output '{name}': {e}")))?;
        bytes_data(&name, strings.iter())?
    } else {
        value.as_bytes().to_vec()
    };
    Ok(Tensor {
        name,
        datatype,
        shape: value.shape().to_vec(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::iris_model;

    #[test]
    fn iris_signature_keeps_the_batch_variable() {
        let loaded = TractBackend::load_onnx(&iris_model(2), &[], &[]).unwrap();
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
        let err = TractBackend::load_onnx(&iris_model(1), &[o], &[])
            .err()
            .unwrap();
        assert!(err.to_string().contains("it has: input"), "{err}");
    }
}
