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
            let unfit = |why: String| {
                format!(
                    "plugin returned tensor '{}' whose {} bytes of {datatype} data do not fill its shape {:?}: {why}",
                    t.name,
                    t.data.len(),
                    t.shape
                )
            };
            let shape = Tensor::shape_from_wire(&t.shape)
                .ok_or_else(|| unfit(format!("a dimension is above {}", i64::MAX)))?;
            let count = Tensor::element_count(&shape)
                .ok_or_else(|| unfit("the shape describes too many elements".to_string()))?;
            Tensor::check_data(datatype, count, &t.data).map_err(unfit)?;
            Ok(Tensor {
                name: t.name,
                datatype,
                shape,
                data: t.data,
            })
        })
        .collect()
}

/// Plugins are untrusted: whatever shapes and bytes one returns, the conversion neither
/// panics nor allocates beyond what it was handed, and refuses every tensor that is not
/// what it says, by name.
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;
    use crate::fuzzing::{allocation_bound, config, largest_allocation, valid_tensor, well_formed};

    fn hostile_dim() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0u64..5,
            1 => select(vec![1u64 << 32, 1 << 40, 1 << 62, i64::MAX as u64, 1 << 63, u64::MAX]),
            1 => any::<u64>(),
        ]
    }

    /// A tensor whose data is any bytes: as many as its shape needs (when that is few),
    /// or any number.
    fn hostile_tensor() -> impl Strategy<Value = PluginTensor> {
        (
            "[a-z]{1,4}",
            select(DATATYPES.to_vec()),
            vec(hostile_dim(), 0..4),
            any::<bool>(),
        )
            .prop_flat_map(|(name, (host, datatype), shape, fill)| {
                let size = host.element_size().unwrap_or(1) as u64;
                let needed = match shape.contains(&0) {
                    true => Some(0),
                    false => shape.iter().try_fold(size, |n, &d| n.checked_mul(d)),
                }
                .filter(|&n| fill && n <= 96);
                let len = needed.map_or(0..96, |n| n as usize..n as usize + 1);
                vec(any::<u8>(), len).prop_map(move |data| PluginTensor {
                    name: name.clone(),
                    datatype,
                    shape: shape.clone(),
                    data,
                })
            })
    }

    #[test]
    fn refusals_name_the_tensor_and_why() {
        let tensor = |datatype, shape: &[u64], data: &[u8]| PluginTensor {
            name: "t".into(),
            datatype,
            shape: shape.to_vec(),
            data: data.to_vec(),
        };
        for (bad, why) in [
            (
                tensor(Datatype::Fp32, &[1 << 40], &[0; 4]),
                "1099511627776 FP32 elements",
            ),
            (
                tensor(Datatype::Fp32, &[0, 1 << 63], &[]),
                "a dimension is above",
            ),
            (
                tensor(Datatype::Int8, &[1 << 32, 1 << 32], &[]),
                "too many elements",
            ),
            (
                tensor(Datatype::Bool, &[2], &[0, 2]),
                "BOOL element 1 is the byte 2",
            ),
            (
                tensor(Datatype::Bytes, &[1], &[3, 0, 0, 0, b'a']),
                "not a sequence",
            ),
        ] {
            let err = from_plugin(vec![bad]).unwrap_err();
            assert!(err.contains("tensor 't'") && err.contains(why), "{err}");
        }
    }

    proptest! {
        #![proptest_config(config(10_000))]

        #[test]
        fn fuzz_from_plugin_hostile_tensors(tensors in vec(hostile_tensor(), 0..4)) {
            let names: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
            let held: usize = tensors.iter().map(|t| t.data.len() + 8 * t.shape.len()).sum();
            let (converted, largest) = largest_allocation(|| from_plugin(tensors));
            prop_assert!(largest <= allocation_bound(held), "{largest} bytes for {held} handed over");
            match converted {
                Ok(converted) => {
                    for t in &converted {
                        prop_assert!(well_formed(t), "accepted a malformed tensor: {t:?}");
                    }
                }
                Err(error) => prop_assert!(
                    names.iter().any(|n| error.contains(&format!("tensor '{n}'"))),
                    "{error}"
                ),
            }
        }

        #[test]
        fn fuzz_tensors_cross_to_plugins_and_back(tensors in vec(valid_tensor(), 0..4)) {
            let tensors: Vec<Tensor> = tensors.into_iter().map(|(t, _)| t).collect();
            let back = from_plugin(to_plugin(tensors.clone()));
            let back = back.map_err(TestCaseError::fail)?;
            prop_assert_eq!(back.len(), tensors.len());
            for (sent, got) in tensors.iter().zip(&back) {
                if sent.datatype == DataType::Bf16 {
                    // Widened to FP32 for the plugin, which loses nothing.
                    prop_assert_eq!(got.datatype, DataType::Fp32);
                    prop_assert_eq!(&got.shape, &sent.shape);
                    prop_assert_eq!(got.floats(), sent.floats());
                } else {
                    prop_assert_eq!(got, sent);
                }
            }
        }
    }
}
