//! The tensor vocabulary every concern shares: the Open Inference Protocol datatypes and a
//! tensor whose data is raw little-endian bytes, the form the binary extension, wasi-nn and
//! plugins all carry, so a tensor crosses from HTTP through plugins to the backend without
//! re-encoding; and a tensor's JSON form.

use std::fmt;

use serde::{Serialize, Serializer};

#[cfg(target_endian = "big")]
compile_error!("tensor data is kept as little-endian bytes and handed to backends as is");

/// An Open Inference Protocol datatype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    /// bfloat16: Triton's extension of the protocol's datatypes.
    Bf16,
    Fp32,
    Fp64,
    /// Length-prefixed byte strings: each element is a u32 little-endian length, then that
    /// many bytes (the binary extension's layout, kept the same in memory).
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The protocol's name for the datatype, as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|dt| dt.as_str() == name)
    }

    /// Bytes per element; `None` for BYTES, whose elements vary in length.
    pub fn element_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for DataType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for DataType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DataType::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown datatype '{name}' (expected one of {})",
                DataType::ALL.map(DataType::as_str).join(", ")
            ))
        })
    }
}

/// A named tensor with a concrete shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// Number of elements the shape describes, `None` if it overflows.
    pub fn element_count(shape: &[usize]) -> Option<usize> {
        shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }

    /// A shape as the protocol and the plugin contract carry it. Their dimensions are
    /// int64: `None` if one is above `i64::MAX`, which a backend would read as negative
    /// (even in a tensor of no elements).
    pub fn shape_from_wire(dims: &[u64]) -> Option<Vec<usize>> {
        dims.iter()
            .map(|&d| i64::try_from(d).ok().and_then(|d| usize::try_from(d).ok()))
            .collect()
    }

    /// Checks that `data` is exactly `count` valid elements of `datatype`: the check data
    /// from outside (a client's binary data, a plugin's output) passes before a backend
    /// reads it as the shape says.
    pub fn check_data(datatype: DataType, count: usize, data: &[u8]) -> Result<(), String> {
        match datatype.element_size() {
            Some(size) => {
                let want = count.saturating_mul(size);
                if data.len() != want {
                    return Err(format!(
                        "{} bytes, but the shape's {count} {datatype} elements take {want}",
                        data.len()
                    ));
                }
            }
            None => {
                let elements = Tensor::byte_elements(data).ok_or_else(|| {
                    "BYTES data is not a sequence of 4-byte little-endian lengths, each followed by that many bytes".to_string()
                })?;
                if elements.len() != count {
                    return Err(format!(
                        "{} BYTES elements, but the shape needs {count}",
                        elements.len()
                    ));
                }
            }
        }
        // Backends read BOOL bytes as C++ or Rust bools, for which any value but 0 and 1
        // is undefined.
        if datatype == DataType::Bool
            && let Some((at, byte)) = data.iter().enumerate().find(|(_, b)| **b > 1)
        {
            return Err(format!(
                "BOOL element {at} is the byte {byte}; a BOOL is one byte, 0 or 1"
            ));
        }
        Ok(())
    }

    /// Splits BYTES data into its elements; `None` if the length prefixes do not add up.
    pub fn byte_elements(data: &[u8]) -> Option<Vec<&[u8]>> {
        let mut elements = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
            if tail.len() < len {
                return None;
            }
            let (element, tail) = tail.split_at(len);
            elements.push(element);
            rest = tail;
        }
        Some(elements)
    }

    /// The elements as numbers, for FP16/BF16/FP32/FP64 tensors; `None` for other datatypes.
    pub fn floats(&self) -> Option<Vec<f64>> {
        let data = &self.data;
        Some(match self.datatype {
            DataType::Fp16 => data
                .as_chunks::<2>()
                .0
                .iter()
                .map(|c| f64::from(half::f16::from_le_bytes(*c)))
                .collect(),
            DataType::Bf16 => data
                .as_chunks::<2>()
                .0
                .iter()
                .map(|c| f64::from(half::bf16::from_le_bytes(*c)))
                .collect(),
            DataType::Fp32 => data
                .as_chunks::<4>()
                .0
                .iter()
                .map(|c| f64::from(f32::from_le_bytes(*c)))
                .collect(),
            DataType::Fp64 => data
                .as_chunks::<8>()
                .0
                .iter()
                .map(|c| f64::from_le_bytes(*c))
                .collect(),
            _ => return None,
        })
    }
}

/// A tensor's elements as the JSON array the Open Inference Protocol writes (BYTES as
/// strings).
pub struct TensorData<'a>(pub &'a Tensor);

impl Serialize for TensorData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let data = &self.0.data;
        macro_rules! seq {
            ($t:ty, $n:literal) => {
                s.collect_seq(
                    data.as_chunks::<$n>()
                        .0
                        .iter()
                        .map(|c| <$t>::from_le_bytes(*c)),
                )
            };
        }
        match self.0.datatype {
            DataType::Bool => s.collect_seq(data.iter().map(|&b| b != 0)),
            DataType::Uint8 => s.collect_seq(data.iter()),
            DataType::Int8 => seq!(i8, 1),
            DataType::Uint16 => seq!(u16, 2),
            DataType::Int16 => seq!(i16, 2),
            DataType::Uint32 => seq!(u32, 4),
            DataType::Int32 => seq!(i32, 4),
            DataType::Uint64 => seq!(u64, 8),
            DataType::Int64 => seq!(i64, 8),
            DataType::Fp16 => s.collect_seq(
                data.as_chunks::<2>()
                    .0
                    .iter()
                    .map(|c| half::f16::from_le_bytes(*c).to_f32()),
            ),
            DataType::Bf16 => s.collect_seq(
                data.as_chunks::<2>()
                    .0
                    .iter()
                    .map(|c| half::bf16::from_le_bytes(*c).to_f32()),
            ),
            DataType::Fp32 => seq!(f32, 4),
            DataType::Fp64 => seq!(f64, 8),
            DataType::Bytes => s.collect_seq(
                Tensor::byte_elements(data)
                    .unwrap_or_default()
                    .into_iter()
                    .map(String::from_utf8_lossy),
            ),
        }
    }
}

/// A whole tensor as an OIP JSON tensor object (name, datatype, shape, data), for records.
pub struct TensorJson<'a>(pub &'a Tensor);

impl Serialize for TensorJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut object = s.serialize_struct("Tensor", 4)?;
        object.serialize_field("name", &self.0.name)?;
        object.serialize_field("datatype", &self.0.datatype)?;
        object.serialize_field("shape", &self.0.shape)?;
        object.serialize_field("data", &TensorData(self.0))?;
        object.end()
    }
}

/// What a model declares for one of its inputs or outputs; `-1` marks a dimension that
/// varies per request (the batch, most often).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Whether a concrete shape fits this spec.
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        self.shape.len() == shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(&want, &got)| want < 0 || usize::try_from(want).ok() == Some(got))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for dt in DataType::ALL {
            assert_eq!(DataType::parse(dt.as_str()), Some(dt));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
    }

    #[test]
    fn byte_elements_follow_length_prefixes() {
        let data = [2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0];
        assert_eq!(
            Tensor::byte_elements(&data),
            Some(vec![&b"hi"[..], &b""[..]])
        );
        assert_eq!(Tensor::byte_elements(&[5, 0, 0, 0, b'x']), None);
        assert_eq!(Tensor::byte_elements(&[1, 0]), None);
    }

    #[test]
    fn spec_accepts_variable_dimensions() {
        let spec = TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 4],
        };
        assert!(spec.accepts_shape(&[7, 4]));
        assert!(!spec.accepts_shape(&[7, 3]));
        assert!(!spec.accepts_shape(&[4]));
    }
}
