//! The Open Inference Protocol's request and response bodies: JSON, with or without the
//! binary tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes,
//! then the raw tensors back to back, each input announcing its `binary_data_size`).

use std::collections::{BTreeMap, HashMap};

use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::pipeline::{InferRequest, InferResponse};
use crate::tensor::{DataType, Tensor, TensorData};

/// The header that marks a binary-extension body and gives its JSON part's length.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Names the endpoint variant that answered (or failed), beside `parameters.variant` in a
/// successful body.
pub const VARIANT_HEADER: &str = "x-modelyard-variant";

#[derive(Deserialize)]
struct RequestJson<'a> {
    id: Option<String>,
    #[serde(default)]
    parameters: RequestParameters,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Default, Deserialize)]
struct RequestParameters {
    binary_data_output: Option<bool>,
    /// Everything else: scalars reach plugins as attributes.
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<u64>,
    datatype: String,
    #[serde(default)]
    parameters: InputParameters,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Default, Deserialize)]
struct InputParameters {
    binary_data_size: Option<u64>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: OutputParameters,
}

#[derive(Default, Deserialize)]
struct OutputParameters {
    binary_data: Option<bool>,
}

/// How each output goes back: as JSON numbers or as raw bytes after the JSON.
#[derive(Debug, Default)]
pub struct OutputEncoding {
    binary_by_default: bool,
    binary: HashMap<String, bool>,
}

impl OutputEncoding {
    fn is_binary(&self, name: &str) -> bool {
        self.binary
            .get(name)
            .copied()
            .unwrap_or(self.binary_by_default)
    }
}

/// A request the client got wrong; the message says what and where.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

fn invalid(message: impl Into<String>) -> DecodeError {
    DecodeError(message.into())
}

/// Decodes a request body; `json_length` is the `Inference-Header-Content-Length`, if sent.
pub fn decode_request(
    body: &[u8],
    json_length: Option<usize>,
) -> Result<(InferRequest, OutputEncoding), DecodeError> {
    let (json, mut binary) = match json_length {
        Some(n) => body.split_at_checked(n).ok_or_else(|| {
            invalid(format!(
                "Inference-Header-Content-Length is {n}, but the body has only {} bytes",
                body.len()
            ))
        })?,
        None => (body, &[][..]),
    };
    let request: RequestJson<'_> = serde_json::from_slice(json)
        .map_err(|e| invalid(format!("malformed inference request JSON: {e}")))?;

    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let at = |what: String| invalid(format!("input '{}': {what}", input.name));
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            at(format!(
                "unknown datatype '{}' (expected one of {})",
                input.datatype,
                DataType::ALL.map(DataType::as_str).join(", ")
            ))
        })?;
        let shape = input
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| at("a dimension is too large".to_string()))?;
        let count = Tensor::element_count(&shape)
            .ok_or_else(|| at("the shape describes too many elements".to_string()))?;
        let data = match (input.parameters.binary_data_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(at(
                    "has both JSON data and binary_data_size; send one".to_string()
                ));
            }
            (None, None) => {
                return Err(at(
                    "has no data (give 'data', or 'binary_data_size' with the binary extension)"
                        .to_string(),
                ));
            }
            (Some(size), None) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if json_length.is_none() {
                    return Err(at("has binary_data_size, but the request has no Inference-Header-Content-Length header".to_string()));
                }
                let (data, rest) = binary.split_at_checked(size).ok_or_else(|| {
                    at(format!(
                        "binary_data_size is {size}, but only {} bytes of binary data are left",
                        binary.len()
                    ))
                })?;
                binary = rest;
                check_binary(datatype, data, count).map_err(at)?;
                data.to_vec()
            }
            (None, Some(raw)) => decode_json_data(raw, datatype, count).map_err(at)?,
        };
        inputs.push(Tensor {
            name: input.name,
            datatype,
            shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes of binary data follow the inputs that no input's binary_data_size accounts for",
            binary.len()
        )));
    }

    let mut encoding = OutputEncoding {
        binary_by_default: request.parameters.binary_data_output.unwrap_or(false),
        binary: HashMap::new(),
    };
    let outputs = request.outputs.map(|outputs| {
        outputs
            .into_iter()
            .map(|o| {
                if let Some(binary) = o.parameters.binary_data {
                    encoding.binary.insert(o.name.clone(), binary);
                }
                o.name
            })
            .collect()
    });
    let parameters = request
        .parameters
        .other
        .into_iter()
        .filter_map(|(name, value)| match value {
            serde_json::Value::String(s) => Some((name, s)),
            serde_json::Value::Number(n) => Some((name, n.to_string())),
            serde_json::Value::Bool(b) => Some((name, b.to_string())),
            _ => None,
        })
        .collect();
    Ok((
        InferRequest {
            id: request.id,
            inputs,
            outputs,
            parameters,
            trace_id: None,
            deadline: None,
        },
        encoding,
    ))
}

fn check_binary(datatype: DataType, data: &[u8], count: usize) -> Result<(), String> {
    match datatype.element_size() {
        Some(size) => {
            let want = count.saturating_mul(size);
            if data.len() != want {
                return Err(format!(
                    "binary_data_size is {} bytes, but the shape needs {count} {datatype} elements = {want} bytes",
                    data.len()
                ));
            }
        }
        None => {
            let elements = Tensor::byte_elements(data).ok_or_else(|| {
                "BYTES binary data is not a sequence of 4-byte little-endian lengths, each followed by that many bytes".to_string()
            })?;
            if elements.len() != count {
                return Err(format!(
                    "binary data holds {} BYTES elements, but the shape needs {count}",
                    elements.len()
                ));
            }
        }
    }
    Ok(())
}

fn decode_json_data(raw: &RawValue, datatype: DataType, count: usize) -> Result<Vec<u8>, String> {
    // Every element takes at least one byte of JSON, so the text bounds the allocation
    // however large a shape the client claims.
    let size = datatype.element_size().unwrap_or(4);
    let mut out = Vec::with_capacity(count.min(raw.get().len()).saturating_mul(size));
    let mut found = 0;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Flatten {
        datatype,
        out: &mut out,
        count: &mut found,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end())
    .map_err(|e| format!("bad data: {e}"))?;
    if found != count {
        return Err(format!(
            "data has {found} elements, but the shape needs {count}"
        ));
    }
    Ok(out)
}

/// Reads `data`, flat or nested to any depth, straight into little-endian bytes.
struct Flatten<'a> {
    datatype: DataType,
    out: &'a mut Vec<u8>,
    count: &'a mut usize,
}

impl Flatten<'_> {
    fn push<E>(self, bytes: &[u8]) -> Result<(), E> {
        self.out.extend_from_slice(bytes);
        *self.count += 1;
        Ok(())
    }

    fn mismatch<E: serde::de::Error>(&self, value: impl std::fmt::Display) -> E {
        E::custom(format!(
            "element {} is {value}, which is not a valid {}",
            *self.count, self.datatype
        ))
    }

    fn integer<E: serde::de::Error>(self, v: i128) -> Result<(), E> {
        macro_rules! int {
            ($t:ty) => {
                match <$t>::try_from(v) {
                    Ok(x) => self.push(&x.to_le_bytes()),
                    Err(_) => Err(self.mismatch(v)),
                }
            };
        }
        match self.datatype {
            DataType::Uint8 => int!(u8),
            DataType::Uint16 => int!(u16),
            DataType::Uint32 => int!(u32),
            DataType::Uint64 => int!(u64),
            DataType::Int8 => int!(i8),
            DataType::Int16 => int!(i16),
            DataType::Int32 => int!(i32),
            DataType::Int64 => int!(i64),
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => {
                self.float(v as f64)
            }
            DataType::Bool | DataType::Bytes => Err(self.mismatch(v)),
        }
    }

    fn float<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        match self.datatype {
            DataType::Fp16 => self.push(&half::f16::from_f64(v).to_le_bytes()),
            DataType::Bf16 => self.push(&half::bf16::from_f64(v).to_le_bytes()),
            DataType::Fp32 => self.push(&(v as f32).to_le_bytes()),
            DataType::Fp64 => self.push(&v.to_le_bytes()),
            _ => Err(self.mismatch(v)),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} values, in a flat or nested array", self.datatype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Flatten {
                datatype: self.datatype,
                out: &mut *self.out,
                count: &mut *self.count,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        match self.datatype {
            DataType::Bool => self.push(&[u8::from(v)]),
            _ => Err(self.mismatch(v)),
        }
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.integer(i128::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.integer(i128::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.float(v)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if self.datatype != DataType::Bytes {
            return Err(self.mismatch(format_args!("the string {v:?}")));
        }
        let len = u32::try_from(v.len()).map_err(|_| E::custom("a BYTES element is over 4 GiB"))?;
        self.out.extend_from_slice(&len.to_le_bytes());
        self.push(v.as_bytes())
    }
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<ResponseParameters<'a>>,
    outputs: Vec<OutputJson<'a>>,
}

#[derive(Serialize)]
struct ResponseParameters<'a> {
    /// The endpoint variant that answered.
    variant: &'a str,
    /// Present, and true, when the endpoint's fallback variant answered.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    fallback: bool,
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: DataType,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<TensorData<'a>>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// Encodes a response: the body, and the JSON part's length when binary data follows it.
pub fn encode_response(
    response: &InferResponse,
    encoding: &OutputEncoding,
) -> Result<(Vec<u8>, Option<usize>), serde_json::Error> {
    let binary: Vec<bool> = response
        .outputs
        .iter()
        .map(|t| encoding.is_binary(&t.name))
        .collect();
    let json = ResponseJson {
        model_name: &response.model,
        model_version: response.version.to_string(),
        id: response.id.as_deref(),
        parameters: response
            .variant
            .as_deref()
            .map(|variant| ResponseParameters {
                variant,
                fallback: response.fallback,
            }),
        outputs: response
            .outputs
            .iter()
            .zip(&binary)
            .map(|(t, &binary)| OutputJson {
                name: &t.name,
                datatype: t.datatype,
                shape: &t.shape,
                parameters: binary.then_some(BinarySize {
                    binary_data_size: t.data.len(),
                }),
                data: (!binary).then_some(TensorData(t)),
            })
            .collect(),
    };
    let mut body = serde_json::to_vec(&json)?;
    if !binary.contains(&true) {
        return Ok((body, None));
    }
    let json_length = body.len();
    for (tensor, _) in response.outputs.iter().zip(&binary).filter(|(_, b)| **b) {
        body.extend_from_slice(&tensor.data);
    }
    Ok((body, Some(json_length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<InferRequest, String> {
        decode_request(json.as_bytes(), None)
            .map(|(r, _)| r)
            .map_err(|e| e.to_string())
    }

    fn input(datatype: &str, shape: &str, data: &str) -> String {
        format!(
            r#"{{"inputs":[{{"name":"x","datatype":"{datatype}","shape":{shape},"data":{data}}}]}}"#
        )
    }

    #[test]
    fn nested_and_flat_data_decode_alike() {
        let flat = decode(&input("FP32", "[2,2]", "[1,2,3.5,4]")).unwrap();
        let nested = decode(&input("FP32", "[2,2]", "[[1,2],[3.5,4]]")).unwrap();
        assert_eq!(flat.inputs, nested.inputs);
        let expected: Vec<u8> = [1f32, 2., 3.5, 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(flat.inputs[0].data, expected);
    }

    #[test]
    fn every_datatype_decodes_from_json() {
        let cases = [
            ("BOOL", "[true,false]", vec![1u8, 0]),
            ("UINT8", "[1,255]", vec![1, 255]),
            ("INT8", "[-1,2]", vec![255, 2]),
            ("UINT16", "[1,2]", vec![1, 0, 2, 0]),
            ("INT16", "[-2,2]", vec![254, 255, 2, 0]),
            (
                "UINT32",
                "[1,2]",
                [1u32, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "INT32",
                "[-1,2]",
                [-1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "UINT64",
                "[1,2]",
                [1u64, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "INT64",
                "[-1,2]",
                [-1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "FP16",
                "[1.5,-2]",
                [1.5f32, -2.]
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            (
                "FP64",
                "[1.5,2]",
                [1.5f64, 2.].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "BYTES",
                r#"["ab",""]"#,
                vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0],
            ),
        ];
        for (dt, data, bytes) in cases {
            let request = decode(&input(dt, "[2]", data)).unwrap_or_else(|e| panic!("{dt}: {e}"));
            assert_eq!(request.inputs[0].data, bytes, "{dt}");
        }
    }

    #[test]
    fn wrong_values_and_counts_are_named() {
        let err = decode(&input("UINT8", "[2]", "[1,256]")).unwrap_err();
        assert!(
            err.contains("input 'x'") && err.contains("256") && err.contains("UINT8"),
            "{err}"
        );
        let err = decode(&input("INT32", "[1]", "[1.5]")).unwrap_err();
        assert!(err.contains("1.5"), "{err}");
        let err = decode(&input("FP32", "[2,2]", "[1,2,3]")).unwrap_err();
        assert!(
            err.contains("3 elements") && err.contains("needs 4"),
            "{err}"
        );
        let err = decode(&input("FLOAT", "[1]", "[1]")).unwrap_err();
        assert!(err.contains("unknown datatype 'FLOAT'"), "{err}");
        let err = decode("{\"inputs\": [").unwrap_err();
        assert!(err.starts_with("malformed inference request JSON"), "{err}");
    }

    #[test]
    fn binary_inputs_are_cut_from_the_tail() {
        let json = r#"{"inputs":[{"name":"a","datatype":"INT32","shape":[2],"parameters":{"binary_data_size":8}},
                                {"name":"b","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":6}}],
                       "parameters":{"binary_data_output":true}}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend([1, 0, 0, 0, 2, 0, 0, 0]);
        body.extend([2, 0, 0, 0, b'h', b'i']);
        let (request, encoding) = decode_request(&body, Some(json.len())).unwrap();
        assert_eq!(request.inputs[0].data, vec![1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(request.inputs[1].data, vec![2, 0, 0, 0, b'h', b'i']);
        assert!(encoding.is_binary("anything"));

        let err = decode_request(&body[..body.len() - 1], Some(json.len())).unwrap_err();
        assert!(err.to_string().contains("input 'b'"), "{err}");
        let mut extra = body.clone();
        extra.push(0);
        let err = decode_request(&extra, Some(json.len())).unwrap_err();
        assert!(err.to_string().contains("1 bytes of binary data"), "{err}");
    }

    #[test]
    fn responses_mix_json_and_binary_outputs() {
        let response = InferResponse {
            model: "m".into(),
            source_model: "m".into(),
            version: 3,
            id: Some("req-1".into()),
            variant: None,
            fallback: false,
            outputs: vec![
                Tensor {
                    name: "a".into(),
                    datatype: DataType::Fp32,
                    shape: vec![2],
                    data: [0.5f32, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
                Tensor {
                    name: "b".into(),
                    datatype: DataType::Int64,
                    shape: vec![1],
                    data: 7i64.to_le_bytes().to_vec(),
                },
            ],
        };
        let mut encoding = OutputEncoding::default();
        encoding.binary.insert("b".into(), true);
        let (body, json_length) = encode_response(&response, &encoding).unwrap();
        let json_length = json_length.unwrap();
        let header: serde_json::Value = serde_json::from_slice(&body[..json_length]).unwrap();
        assert_eq!(header["model_version"], "3");
        assert_eq!(header["id"], "req-1");
        assert_eq!(header["outputs"][0]["data"], serde_json::json!([0.5, 1.0]));
        assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert_eq!(&body[json_length..], &7i64.to_le_bytes());

        let (body, json_length) = encode_response(&response, &OutputEncoding::default()).unwrap();
        assert!(json_length.is_none());
        let all_json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(all_json["outputs"][1]["data"], serde_json::json!([7]));
    }
}
