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
        let shape = Tensor::shape_from_wire(&input.shape).ok_or_else(|| {
            at(format!(
                "a dimension of {:?} is above the protocol's limit of {}",
                input.shape,
                i64::MAX
            ))
        })?;
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
                Tensor::check_data(datatype, count, data)
                    .map_err(|e| at(format!("binary data: {e}")))?;
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

    /// One body for each way the decoder refuses a request: the body, whether it is sent
    /// with its JSON part's length as `Inference-Header-Content-Length` (and binary bytes
    /// after it), and what the error must say.
    fn refusals() -> Vec<(String, Option<Vec<u8>>, &'static str)> {
        let one = |datatype: &str, shape: &str, rest: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","datatype":"{datatype}","shape":{shape},{rest}}}]}}"#
            )
        };
        let sized = |datatype: &str, shape: &str, size: u64| {
            one(
                datatype,
                shape,
                &format!(r#""parameters":{{"binary_data_size":{size}}}"#),
            )
        };
        vec![
            (
                "{\"inputs\": [".into(),
                None,
                "malformed inference request JSON",
            ),
            (one("FP32", "[-1]", r#""data":[1]"#), None, "malformed"),
            (
                one(
                    "FP32",
                    "[2]",
                    r#""data":[1,2],"parameters":{"binary_data_size":"8"}"#,
                ),
                None,
                "malformed",
            ),
            (
                one("FLOAT", "[1]", r#""data":[1]"#),
                None,
                "unknown datatype 'FLOAT'",
            ),
            (
                one("FP32", "[9223372036854775808]", r#""data":[]"#),
                None,
                "above the protocol's limit of 9223372036854775807",
            ),
            (
                one("FP32", "[4294967296,4294967296]", r#""data":[]"#),
                None,
                "too many elements",
            ),
            (
                one("FP32", "[1099511627776]", r#""data":[1]"#),
                None,
                "data has 1 elements, but the shape needs 1099511627776",
            ),
            (
                one("UINT8", "[1]", r#""data":[256]"#),
                None,
                "not a valid UINT8",
            ),
            (
                one(
                    "FP32",
                    "[1]",
                    r#""data":[1],"parameters":{"binary_data_size":4}"#,
                ),
                None,
                "send one",
            ),
            (one("FP32", "[1]", r#""name2":1"#), None, "has no data"),
            (
                sized("FP32", "[1]", 4),
                None,
                "no Inference-Header-Content-Length",
            ),
            (
                sized("FP32", "[1099511627776]", 4),
                Some(vec![0; 4]),
                "the shape's 1099511627776 FP32 elements take",
            ),
            (
                sized("FP32", "[1]", 1 << 40),
                Some(vec![0; 4]),
                "only 4 bytes of binary data are left",
            ),
            (
                sized("BOOL", "[2]", 2),
                Some(vec![1, 7]),
                "BOOL element 1 is the byte 7",
            ),
            (
                sized("BYTES", "[1]", 4),
                Some(vec![9, 0, 0, 0]),
                "not a sequence of 4-byte",
            ),
            (
                sized("BYTES", "[1099511627776]", 4),
                Some(vec![0; 4]),
                "1 BYTES elements, but the shape needs 1099511627776",
            ),
            (
                sized("INT8", "[1]", 1),
                Some(vec![1, 2]),
                "1 bytes of binary data follow the inputs",
            ),
        ]
    }

    #[test]
    fn every_refusal_says_what_is_wrong() {
        for (json, binary, says) in refusals() {
            let mut body = json.clone().into_bytes();
            let header = binary.map(|binary| {
                body.extend(binary);
                json.len()
            });
            let err = decode_request(&body, header).unwrap_err().to_string();
            assert!(err.contains(says), "{json}: {err}");
        }
        let err = decode_request(b"{}", Some(3)).unwrap_err().to_string();
        assert!(
            err.contains("Inference-Header-Content-Length is 3"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_are_answered_400_over_http() {
        use crate::http::routes::tests::{app, send};
        let (app, _) = app(None, &[]).await;
        for (json, binary, says) in refusals() {
            let length = json.len().to_string();
            let mut body = json.clone();
            let mut headers = Vec::new();
            if let Some(binary) = binary {
                body.push_str(std::str::from_utf8(&binary).unwrap());
                headers.push((HEADER_LENGTH, length.as_str()));
            }
            let (status, _, answer) =
                send(&app, "POST", "/v2/models/iris/infer", &headers, &body).await;
            assert_eq!(
                status,
                axum::http::StatusCode::BAD_REQUEST,
                "{json}: {answer}"
            );
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(message.contains(says), "{json}: {answer}");
        }
    }

    #[test]
    fn a_claimed_shape_allocates_nothing_without_its_data() {
        // A 2^40-element shape over a few bytes: refused, having allocated about the body.
        for dt in DataType::ALL {
            for (json, binary) in [
                (input(dt.as_str(), "[1099511627776]", "[1]"), None),
                (
                    format!(
                        r#"{{"inputs":[{{"name":"x","datatype":"{dt}","shape":[1099511627776],"parameters":{{"binary_data_size":8}}}}]}}"#
                    ),
                    Some([0u8; 8]),
                ),
            ] {
                let mut body = json.clone().into_bytes();
                let header = binary.map(|b| {
                    body.extend(b);
                    json.len()
                });
                let (decoded, largest) =
                    crate::fuzzing::largest_allocation(|| decode_request(&body, header));
                assert!(decoded.is_err(), "{dt}");
                assert!(
                    largest <= crate::fuzzing::allocation_bound(body.len()),
                    "{dt}: {largest} bytes"
                );
            }
        }
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

/// The decoder under fuzzing: arbitrary bytes, and requests that are valid JSON but lie
/// about everything (datatypes, shapes up to 2^64, data that disagrees with the shape,
/// binary sizes that disagree with the buffer, parameters of the wrong type).
#[cfg(test)]
mod fuzz {
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use proptest::sample::select;
    use serde_json::{Value, json};

    use super::*;
    use crate::fuzzing::{allocation_bound, config, largest_allocation, valid_tensor, well_formed};
    use crate::http::ApiError;

    /// Decodes `body`, checking what must hold of any input: no allocation beyond a small
    /// multiple of the body, every accepted tensor well formed, every refusal a 4xx.
    fn decode_checked(
        body: &[u8],
        json_length: Option<usize>,
    ) -> Result<Option<InferRequest>, TestCaseError> {
        let (decoded, largest) = largest_allocation(|| decode_request(body, json_length));
        prop_assert!(
            largest <= allocation_bound(body.len()),
            "a {}-byte body made an allocation of {largest} bytes",
            body.len()
        );
        match decoded {
            Ok((request, _)) => {
                for t in &request.inputs {
                    prop_assert!(well_formed(t), "accepted a malformed tensor: {t:?}");
                }
                Ok(Some(request))
            }
            Err(error) => {
                let message = error.to_string();
                let status = ApiError::from(error).status();
                prop_assert!(status.is_client_error(), "{status} for: {message}");
                Ok(None)
            }
        }
    }

    fn hostile_dim() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => (0u64..4).prop_map(Value::from),
            1 => select(vec![1u64 << 32, 1 << 40, 1 << 62, i64::MAX as u64, 1 << 63, u64::MAX])
                .prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => (-3i64..0).prop_map(Value::from),
            1 => select(vec![json!("2"), json!(1.5), json!(null), json!([1])]),
        ]
    }

    fn hostile_shape() -> impl Strategy<Value = Value> {
        prop_oneof![
            8 => vec(hostile_dim(), 0..4).prop_map(Value::from),
            1 => vec(hostile_dim(), 0..4).prop_map(|mut dims| { dims.push(json!(0)); Value::from(dims) }),
            1 => select(vec![json!(null), json!(4), json!("[4]"), json!({"0": 4})]),
        ]
    }

    fn hostile_datatype() -> impl Strategy<Value = Value> {
        prop_oneof![
            8 => select(DataType::ALL.map(DataType::as_str).to_vec()).prop_map(Value::from),
            1 => "[A-Za-z0-9]{0,6}".prop_map(Value::from),
            1 => select(vec![json!(null), json!(32), json!(["FP32"])]),
        ]
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-300i64..300).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            any::<bool>().prop_map(Value::from),
            "\\PC{0,6}".prop_map(Value::from),
            Just(Value::Null),
        ]
    }

    fn hostile_data() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(4, 48, 8, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..8).prop_map(Value::from),
                btree_map("[a-z]{1,3}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn hostile_size() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => (0u64..40).prop_map(Value::from),
            1 => select(vec![1u64 << 40, 1 << 63, u64::MAX]).prop_map(Value::from),
            1 => select(vec![json!(-1), json!("8"), json!(2.5), json!(null)]),
        ]
    }

    /// An input that lies somewhere: in its datatype, its shape, its data or its
    /// parameters. Half of them carry as many elements (0 or 1, a value of every datatype
    /// but BYTES) as their shape needs, so that a lie in the shape alone gets through to
    /// the checks after it.
    fn hostile_input() -> impl Strategy<Value = Value> {
        (
            "[a-z]{1,3}",
            hostile_datatype(),
            hostile_shape(),
            prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                hostile_data().prop_map(Some),
            ],
            prop::option::of(hostile_size()),
            prop::option::of(scalar()),
            any::<u64>(),
        )
            .prop_map(|(name, datatype, shape, data, size, parameters, bits)| {
                let mut input = json!({"name": name, "datatype": datatype, "shape": shape});
                // `Null` stands for data that fills the shape, where the shape is small.
                let fill = || {
                    let count = shape
                        .as_array()?
                        .iter()
                        .try_fold(1u64, |n, d| n.checked_mul(d.as_u64()?))?;
                    (count <= 64).then(|| {
                        (0..count)
                            .map(|i| json!((bits >> (i % 64)) & 1))
                            .collect::<Value>()
                    })
                };
                match data {
                    Some(Value::Null) => input["data"] = fill().unwrap_or_default(),
                    Some(data) => input["data"] = data,
                    None => {}
                }
                match (size, parameters) {
                    (Some(size), _) => input["parameters"] = json!({"binary_data_size": size}),
                    (None, Some(wrong)) => input["parameters"] = wrong,
                    (None, None) => {}
                }
                input
            })
    }

    fn hostile_request() -> impl Strategy<Value = Value> {
        (
            vec(hostile_input(), 0..4),
            btree_map("[a-z_]{1,18}", hostile_data(), 0..3),
            prop::option::of(vec(("[a-z]{1,3}", scalar()), 0..3)),
            prop::option::of(scalar()),
        )
            .prop_map(|(inputs, parameters, outputs, id)| {
                let mut request = json!({
                    "inputs": inputs,
                    "parameters": Value::Object(parameters.into_iter().collect()),
                });
                if let Some(outputs) = outputs {
                    request["outputs"] = outputs
                        .into_iter()
                        .map(|(name, binary)| json!({"name": name, "parameters": {"binary_data": binary}}))
                        .collect();
                }
                if let Some(id) = id {
                    request["id"] = id;
                }
                request
            })
    }

    /// The header length given: none, the truth, past the end, or anything.
    fn header_length(json: usize) -> impl Strategy<Value = Option<usize>> {
        prop_oneof![
            Just(None),
            Just(Some(json)),
            (0..json + 80).prop_map(Some),
            any::<usize>().prop_map(Some),
        ]
    }

    /// A body for `inputs` (each a tensor and its data as JSON), each input sent as
    /// binary data when its flag says so; and the length of the body's JSON part.
    fn binary_body(inputs: &[(Tensor, Value)], binary: &[bool]) -> (Vec<u8>, usize) {
        let json_inputs: Vec<Value> = inputs
            .iter()
            .zip(binary)
            .map(|((t, values), &binary)| {
                let mut input =
                    json!({"name": t.name, "datatype": t.datatype.as_str(), "shape": t.shape});
                if binary {
                    input["parameters"] = json!({"binary_data_size": t.data.len()});
                } else {
                    input["data"] = values.clone();
                }
                input
            })
            .collect();
        let mut body = serde_json::to_vec(&json!({"inputs": json_inputs})).unwrap();
        let json_length = body.len();
        for ((t, _), _) in inputs.iter().zip(binary).filter(|(_, b)| **b) {
            body.extend(&t.data);
        }
        (body, json_length)
    }

    proptest! {
        #![proptest_config(config(10_000))]

        #[test]
        fn fuzz_decode_arbitrary_bytes(
            body in vec(any::<u8>(), 0..512),
            json_length in prop::option::of(any::<usize>()),
        ) {
            decode_checked(&body, json_length)?;
            decode_checked(&body, json_length.map(|n| n % (body.len() + 1)))?;
        }

        #[test]
        fn fuzz_decode_hostile_json(request in hostile_request()) {
            let body = serde_json::to_vec(&request).unwrap_or_default();
            decode_checked(&body, None)?;
        }

        #[test]
        fn fuzz_decode_hostile_binary(
            (request, tail, json_length) in (hostile_request(), vec(any::<u8>(), 0..64))
                .prop_flat_map(|(request, tail)| {
                    let json = serde_json::to_vec(&request).unwrap_or_default().len();
                    (Just(request), Just(tail), header_length(json))
                }),
        ) {
            let mut body = serde_json::to_vec(&request).unwrap_or_default();
            body.extend(tail);
            decode_checked(&body, json_length)?;
        }

        #[test]
        fn fuzz_decode_valid_requests_round_trip(
            (inputs, binary) in vec(valid_tensor(), 1..4)
                .prop_flat_map(|inputs| { let n = inputs.len(); (Just(inputs), vec(any::<bool>(), n)) }),
        ) {
            let (body, json_length) = binary_body(&inputs, &binary);
            let with_header = binary.contains(&true).then_some(json_length);
            let request = decode_checked(&body, with_header)?;
            let request = request.ok_or_else(|| TestCaseError::fail("a valid request was refused"))?;
            let sent: Vec<&Tensor> = inputs.iter().map(|(t, _)| t).collect();
            prop_assert_eq!(request.inputs.iter().collect::<Vec<_>>(), sent);
        }

        #[test]
        fn fuzz_decode_binary_bytes_flipped(
            (inputs, flips) in vec(valid_tensor(), 1..4)
                .prop_flat_map(|inputs| (Just(inputs), vec((any::<usize>(), any::<u8>()), 1..4))),
        ) {
            // Sizes that add up, over bytes that may not be values: BOOL bytes past 1,
            // BYTES length prefixes that overrun.
            let (mut body, json_length) = binary_body(&inputs, &vec![true; inputs.len()]);
            let binary = body.len() - json_length;
            for (at, mask) in flips.into_iter().filter(|_| binary > 0) {
                body[json_length + at % binary] ^= mask;
            }
            decode_checked(&body, Some(json_length))?;
        }

        #[test]
        fn fuzz_decode_binary_sizes_that_lie(
            (inputs, victim, delta, cut) in vec(valid_tensor(), 1..4)
                .prop_flat_map(|inputs| { let n = inputs.len(); (Just(inputs), 0..n, -9i64..9, 0usize..12) }),
        ) {
            let (body, json_length) = binary_body(&inputs, &vec![true; inputs.len()]);
            let mut request: Value = serde_json::from_slice(&body[..json_length]).unwrap();
            let size = &mut request["inputs"][victim]["parameters"]["binary_data_size"];
            let was = size.as_i64().unwrap();
            let told = was.saturating_add(delta).max(0);
            *size = json!(told);
            let mut lying = serde_json::to_vec(&request).unwrap();
            let header = lying.len();
            let cut = cut.min(body.len() - json_length);
            lying.extend(&body[json_length..body.len() - cut]);
            let decoded = decode_checked(&lying, Some(header))?;
            // The sizes no longer add up to the binary part: nothing may be accepted.
            let lies = told != was || cut != 0;
            prop_assert_eq!(decoded.is_none(), lies);
        }
    }
}
