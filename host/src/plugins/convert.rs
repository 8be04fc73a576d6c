//! Tensors in the plugins' form and back. Tensor data moves across without re-encoding:
//! both sides keep elements as little-endian bytes.
//!
//! Owns: the mapping between the host's datatypes and the contract's. Must not touch: what
//! a plugin is asked to do with them (`pool`), or requests (the pipeline).

use super::bindings::{Datatype, Tensor as PluginTensor};
use crate::tensor::{DataType, Tensor};

const DATATYPES: [(DataType, Datatype); 13] = [
    (DataType::Bool, Datatype::Bool),
    (DataType::Uint8, Datatype::Uint8),
    (DataType::Uint16, Datatype::Uint16),
    (DataType::Uint32, Datatype::Uint32),
    (DataType::Uint64, Datatype::Uint64),
    (DataType::Int8, Datatype::Int8),
    (DataType::Int16, Datatype::Int16),
    (DataType::Int32, Datatype::Int32),
    (DataType::Int64, Datatype::Int64),
    (DataType::Fp16, Datatype::Fp16),
    (DataType::Fp32, Datatype::Fp32),
    (DataType::Fp64, Datatype::Fp64),
    (DataType::Bytes, Datatype::Bytes),
];

/// Host tensors as plugins see them. The plugin contract has no BF16: such tensors reach
/// plugins widened to FP32, which loses nothing.
pub fn to_plugin(tensors: Vec<Tensor>) -> Vec<PluginTensor> {
    tensors
        .into_iter()
        .map(widen_bf16)
        .map(|t| PluginTensor {
            datatype: DATATYPES
                .iter()
                .find(|(d, _)| *d == t.datatype)
                .map_or(Datatype::Bytes, |(_, w)| *w),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            name: t.name,
            data: t.data,
        })
        .collect()
}

fn widen_bf16(t: Tensor) -> Tensor {
    if t.datatype != DataType::Bf16 {
        return t;
    }
    let data = t
        .data
        .as_chunks::<2>()
        .0
        .iter()
        .flat_map(|c| half::bf16::from_le_bytes(*c).to_f32().to_le_bytes())
        .collect();
    Tensor {
        datatype: DataType::Fp32,
        data,
        ..t
    }
}

/// Plugin output back into host tensors, refusing any whose data does not fit its shape:
/// a plugin's mistake must not reach the model or the client as a malformed tensor.
pub fn from_plugin(tensors: Vec<PluginTensor>) -> Result<Vec<Tensor>, String> {
    tensors
        .into_iter()
        .map(|t| {
            let datatype = DATATYPES
                .iter()
                .find(|(_, w)| *w == t.datatype)
                .map(|(d, _)| *d)
                .unwrap_or(DataType::Bytes);
            let shape = t
                .shape
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| format!("plugin tensor '{}' has a dimension too large", t.name))?;
            let count = Tensor::element_count(&shape);
            let fits = match (datatype.element_size(), count) {
                (Some(size), Some(count)) => count.checked_mul(size) == Some(t.data.len()),
                (None, Some(count)) => Tensor::byte_elements(&t.data).is_some_and(|e| e.len() == count),
                (_, None) => false,
            };
            if !fits {
                return Err(format!(
                    "plugin returned tensor '{}' whose {} bytes of {datatype} data do not fill its shape {shape:?}",
                    t.name,
                    t.data.len()
                ));
            }
            Ok(Tensor {
                name: t.name,
                datatype,
                shape,
                data: t.data,
            })
        })
        .collect()
}
