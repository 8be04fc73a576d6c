//! Where a backend is known to answer wrongly, found by running the ONNX node tests through
//! the server (`tests/compat/onnx_node_tests.py`): such models are refused at load with the
//! reason, since a wrong answer with 200 is worse than a refusal (tract's are mostly served
//! by ONNX Runtime under `backend = "auto"`). And the inputs tract would panic on rather
//! than refuse: indices past a table that the model gathers from, refused per request as the
//! client's mistake.

use std::collections::HashMap;

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, type_proto};

use super::graph::RunError;
use crate::tensor::{DataType, Tensor};

/// ONNX's element type numbers (`TensorProto.DataType`) that the checks below tell apart.
const INT8: i32 = 3;
const INT16: i32 = 5;
const INT32: i32 = 6;
const INT64: i32 = 7;
const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;
const DOUBLE: i32 = 11;
const BFLOAT16: i32 = 16;

/// Which backend's known faults to look for.
#[derive(Clone, Copy)]
pub(super) enum Backend {
    Tract,
    OnnxRuntime,
}

/// Why the backend would compute `graph` wrongly, if it is known to.
pub(super) fn known_wrong(graph: &GraphProto, backend: Backend) -> Option<String> {
    let types = element_types(graph);
    let type_of = |name: &str| types.get(name).copied();
    let given = |name: &str| is_model_input(graph, name);
    for node in &graph.node {
        let reason = match backend {
            Backend::Tract => node_known_wrong(node, &type_of, &given),
            Backend::OnnxRuntime => onnxruntime_known_wrong(node, graph),
        }
        .or_else(|| random(node));
        if let Some(reason) = reason {
            let name = if node.name.is_empty() {
                &node.op_type
            } else {
                &node.name
            };
            let (engine, other) = match backend {
                Backend::Tract => ("tract", "backend = \"onnxruntime\""),
                Backend::OnnxRuntime => ("ONNX Runtime", "a model without it"),
            };
            return Some(format!(
                "{engine} computes {} '{name}' wrongly: {reason}; use {other}",
                node.op_type
            ));
        }
        for attribute in &node.attribute {
            let subgraphs = attribute.g.iter().chain(&attribute.graphs);
            if let Some(reason) = subgraphs.filter_map(|g| known_wrong(g, backend)).next() {
                return Some(reason);
            }
        }
    }
    None
}

fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// Dropout told to train draws at random: no answer is right to serve.
fn random(node: &NodeProto) -> Option<&'static str> {
    (node.op_type == "Dropout" && node.input.get(2).is_some_and(|n| !n.is_empty()))
        .then_some("a training_mode input makes it draw at random, which serving must not")
}

fn onnxruntime_known_wrong(node: &NodeProto, graph: &GraphProto) -> Option<&'static str> {
    let int = |name: &str| attribute(node, name).map(|a| a.i);
    let text = |name: &str| attribute(node, name).map(|a| a.s.as_slice());
    match node.op_type.as_str() {
        "Attention"
            if int("is_causal") == Some(1)
                && int("qk_matmul_output_mode").is_some_and(|m| m != 0) =>
        {
            Some("its QK output marks causally masked places with the lowest float, not -inf")
        }
        "MaxUnpool" if node.input.get(2).is_some_and(|n| !n.is_empty()) => {
            Some("an output_shape input puts values in the wrong places")
        }
        "Resize"
            if text("coordinate_transformation_mode") == Some(b"align_corners")
                && matches!(text("mode"), Some(b"linear" | b"cubic"))
                && node.input.get(2).is_some_and(|scales| {
                    // Scales known to be at least 1 (upsampling) are computed right; scales
                    // given at run time may downsample.
                    !scales.is_empty()
                        && !constant_floats(graph, scales)
                            .is_some_and(|s| s.iter().all(|&s| s >= 1.0))
                }) =>
        {
            Some(
                "downsampling with align_corners interpolates wrongly (scales below 1, or not known at load)",
            )
        }
        _ => None,
    }
}

/// The values of a float initializer, where the file holds it as one.
fn constant_floats(graph: &GraphProto, name: &str) -> Option<Vec<f32>> {
    let init = graph.initializer.iter().find(|t| t.name == name)?;
    if init.data_type != FLOAT {
        return None;
    }
    if !init.float_data.is_empty() {
        return Some(init.float_data.clone());
    }
    Some(
        init.raw_data
            .as_chunks::<4>()
            .0
            .iter()
            .map(|c| f32::from_le_bytes(*c))
            .collect(),
    )
}

fn node_known_wrong(
    node: &NodeProto,
    type_of: &dyn Fn(&str) -> Option<i32>,
    given: &dyn Fn(&str) -> bool,
) -> Option<&'static str> {
    let int = |name: &str| attribute(node, name).map(|a| a.i);
    let text = |name: &str| attribute(node, name).map(|a| a.s.as_slice());
    let float = |name: &str| attribute(node, name).map(|a| a.f);
    let has_input = |ix: usize| node.input.get(ix).is_some_and(|n| !n.is_empty());
    // An input whose type cannot be told from the file counts as the case tract gets wrong.
    let input_type_in = |ix: usize, wanted: &[i32]| {
        node.input
            .get(ix)
            .and_then(|n| type_of(n))
            .is_none_or(|t| wanted.contains(&t))
    };
    match node.op_type.as_str() {
        "GRU" | "LSTM" | "RNN" if text("direction") == Some(b"reverse") => {
            Some("direction = \"reverse\" runs forward")
        }
        "SpaceToDepth" if text("mode") == Some(b"CRD") => Some("mode = \"CRD\" is ignored"),
        "Celu" if input_type_in(0, &[FLOAT16]) => Some("alpha is ignored on FLOAT16"),
        "Swish" if float("alpha").is_some_and(|a| a != 1.0) => Some("alpha is ignored"),
        "BitShift" if input_type_in(0, &[INT8, INT16, INT32, INT64]) => {
            Some("shifts of signed integers by their width or more differ")
        }
        "ReduceMax" if input_type_in(0, &[FLOAT, FLOAT16, DOUBLE, BFLOAT16]) => {
            Some("a slice of -inf gives the lowest finite number, not -inf")
        }
        "Attention"
            if int("left_window_size").is_some_and(|w| w != -1)
                || int("right_window_size").is_some_and(|w| w != -1) =>
        {
            Some("local windows are ignored")
        }
        "Attention" if int("is_causal") == Some(1) && has_input(4) => {
            Some("a causal mask with past keys is misplaced")
        }
        // Starts and ends computed at run time with default axes: tract fails every run.
        "Slice" if node.input.len() > 1 && !has_input(3) && given(&node.input[1]) => {
            Some("starts and ends given at run time without axes cannot be run")
        }
        _ => None,
    }
}

/// Whether `name` is given by the client: a graph input with no initializer behind it.
fn is_model_input(graph: &GraphProto, name: &str) -> bool {
    graph.input.iter().any(|i| i.name == name) && !graph.initializer.iter().any(|t| t.name == name)
}

/// The element type of every value the file states one for: inputs, outputs, annotated
/// intermediates and initializers.
fn element_types(graph: &GraphProto) -> HashMap<&str, i32> {
    let mut types = HashMap::new();
    for info in graph
        .input
        .iter()
        .chain(&graph.output)
        .chain(&graph.value_info)
    {
        if let Some(type_proto::Value::TensorType(t)) =
            info.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            types.insert(info.name.as_str(), t.elem_type);
        }
    }
    for init in &graph.initializer {
        types.insert(init.name.as_str(), init.data_type);
    }
    types
}

/// A model input used directly as the indices of a Gather from a constant table: each of its
/// values must lie in `-len..len` of the table's gathered axis.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct IndexBound {
    input: String,
    len: i64,
}

/// The bounds of every model input that indexes a constant table.
pub(super) fn index_bounds(graph: &GraphProto) -> Vec<IndexBound> {
    let tables: HashMap<&str, &[i64]> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    let mut bounds: Vec<IndexBound> = Vec::new();
    for node in graph.node.iter().filter(|n| n.op_type == "Gather") {
        let [data, indices, ..] = node.input.as_slice() else {
            continue;
        };
        let Some(dims) = tables.get(data.as_str()) else {
            continue;
        };
        let axis = attribute(node, "axis").map_or(0, |a| a.i);
        let axis = if axis < 0 {
            axis + dims.len() as i64
        } else {
            axis
        };
        let Some(&len) = usize::try_from(axis).ok().and_then(|a| dims.get(a)) else {
            continue;
        };
        if is_model_input(graph, indices) {
            match bounds.iter_mut().find(|b| b.input == *indices) {
                Some(bound) => bound.len = bound.len.min(len),
                None => bounds.push(IndexBound {
                    input: indices.clone(),
                    len,
                }),
            }
        }
    }
    bounds
}

/// Refuses inputs holding an index outside the table it indexes.
pub(super) fn check_indices(bounds: &[IndexBound], inputs: &[Tensor]) -> Result<(), RunError> {
    for bound in bounds {
        let Some(tensor) = inputs.iter().find(|t| t.name == bound.input) else {
            continue;
        };
        let values: Box<dyn Iterator<Item = i64>> = match tensor.datatype {
            DataType::Int64 => Box::new(
                tensor
                    .data
                    .as_chunks::<8>()
                    .0
                    .iter()
                    .map(|c| i64::from_le_bytes(*c)),
            ),
            DataType::Int32 => Box::new(
                tensor
                    .data
                    .as_chunks::<4>()
                    .0
                    .iter()
                    .map(|c| i64::from(i32::from_le_bytes(*c))),
            ),
            _ => continue,
        };
        if let Some(bad) = values
            .into_iter()
            .find(|v| !(-bound.len..bound.len).contains(v))
        {
            return Err(RunError::Rejected(format!(
                "input '{}' holds the index {bad}, outside the {} entries of the table it selects from",
                bound.input, bound.len
            )));
        }
    }
    Ok(())
}
