//! Typed views and constructors for the contract's tensors, and the datatypes' protocol
//! names.

use crate::{DataType, Error, Tensor};

/// The protocol's names (`FP32`, `BYTES` …), for messages.
impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
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
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        })
    }
}

/// So that `Tensor` (and whatever holds one) has a `Default`, as the other records do:
/// FP32, the datatype models take most often.
impl Default for DataType {
    fn default() -> Self {
        DataType::Fp32
    }
}

impl Tensor {
    /// An FP32 tensor; fails if `values` does not fill `shape` exactly.
    pub fn from_f32(
        name: impl Into<String>,
        shape: &[u64],
        values: &[f32],
    ) -> Result<Tensor, Error> {
        let tensor = Tensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        tensor.check_len(values.len())?;
        Ok(tensor)
    }

    /// A BYTES tensor of strings; fails if `values` does not fill `shape` exactly.
    pub fn from_strings<S: AsRef<str>>(
        name: impl Into<String>,
        shape: &[u64],
        values: &[S],
    ) -> Result<Tensor, Error> {
        let mut data = Vec::new();
        for v in values {
            let v = v.as_ref().as_bytes();
            let len = u32::try_from(v.len()).map_err(|_| Error::new("a string is over 4 GiB"))?;
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(v);
        }
        let tensor = Tensor {
            name: name.into(),
            datatype: DataType::Bytes,
            shape: shape.to_vec(),
            data,
        };
        tensor.check_len(values.len())?;
        Ok(tensor)
    }

    /// The number of elements the shape describes.
    pub fn element_count(&self) -> u64 {
        self.shape.iter().product()
    }

    fn check_len(&self, len: usize) -> Result<(), Error> {
        if self.element_count() != len as u64 {
            return Err(Error::new(format!(
                "tensor '{}': {len} values do not fill the shape {:?}",
                self.name, self.shape
            )));
        }
        Ok(())
    }

    fn expect(&self, datatype: DataType) -> Result<(), Error> {
        if self.datatype != datatype {
            return Err(Error::new(format!(
                "tensor '{}' is {}, expected {datatype}",
                self.name, self.datatype
            )));
        }
        Ok(())
    }

    /// Fails unless the shape is `expected`, where `None` matches any size.
    pub fn expect_shape(&self, expected: &[Option<u64>]) -> Result<(), Error> {
        let fits = self.shape.len() == expected.len()
            && self
                .shape
                .iter()
                .zip(expected)
                .all(|(d, e)| e.is_none_or(|e| e == *d));
        if !fits {
            let want: Vec<String> = expected
                .iter()
                .map(|e| e.map_or("any".to_string(), |e| e.to_string()))
                .collect();
            return Err(Error::new(format!(
                "tensor '{}' has shape {:?}, expected [{}]",
                self.name,
                self.shape,
                want.join(", ")
            )));
        }
        Ok(())
    }

    /// The elements of an FP32 tensor.
    pub fn as_f32(&self) -> Result<Vec<f32>, Error> {
        self.expect(DataType::Fp32)?;
        Ok(self
            .data
            .as_chunks::<4>()
            .0
            .iter()
            .map(|c| f32::from_le_bytes(*c))
            .collect())
    }

    /// The elements of a BYTES tensor, as UTF-8 strings.
    pub fn as_strings(&self) -> Result<Vec<String>, Error> {
        self.expect(DataType::Bytes)?;
        let mut out = Vec::new();
        let mut rest = self.data.as_slice();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            let (value, tail) = tail.split_at_checked(len).ok_or_else(|| {
                Error::new(format!("tensor '{}': truncated BYTES element", self.name))
            })?;
            out.push(String::from_utf8(value.to_vec()).map_err(|_| {
                Error::new(format!("tensor '{}': an element is not UTF-8", self.name))
            })?);
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(Error::new(format!(
                "tensor '{}': truncated BYTES element",
                self.name
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_round_trips() {
        let t = Tensor::from_f32("x", &[2, 2], &[1.0, 2.0, 3.0, 4.5]).unwrap();
        assert_eq!(t.as_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.5]);
        assert!(t.as_strings().is_err());
        let s = Tensor::from_strings("s", &[2], &["a", "bc"]).unwrap();
        assert_eq!(s.as_strings().unwrap(), vec!["a", "bc"]);
    }

    #[test]
    fn datatypes_go_by_their_protocol_names() {
        let err = Tensor::from_f32("x", &[1], &[1.0])
            .unwrap()
            .as_strings()
            .unwrap_err();
        assert_eq!(err.0, "tensor 'x' is FP32, expected BYTES");
    }

    #[test]
    fn shapes_are_checked() {
        assert!(Tensor::from_f32("x", &[3], &[1.0]).is_err());
        let t = Tensor::from_f32("x", &[2, 4], &[0.0; 8]).unwrap();
        assert!(t.expect_shape(&[None, Some(4)]).is_ok());
        let err = t.expect_shape(&[None, Some(3)]).unwrap_err();
        assert!(err.0.contains("expected [any, 3]"), "{err}");
    }
}
