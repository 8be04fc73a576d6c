//! Checks a request against the signature of the version that will answer it, so that
//! every mistake a client can make is a 400 that says what and where, and the backend
//! only ever sees inputs it declared.

use super::request::InferError;
use crate::registry::LoadedVersion;
use crate::tensor::{Tensor, TensorSpec};

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn shape_text(shape: &[impl std::fmt::Display]) -> String {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("[{}]", dims.join(", "))
}

pub(super) fn inputs(target: &LoadedVersion, inputs: &[Tensor]) -> Result<(), InferError> {
    let at = |what: String| {
        InferError::Invalid(format!(
            "{what} (model '{}' version {})",
            target.model, target.version
        ))
    };
    for (i, input) in inputs.iter().enumerate() {
        if inputs[..i].iter().any(|other| other.name == input.name) {
            return Err(at(format!(
                "input '{}' is given more than once",
                input.name
            )));
        }
        let Some(spec) = target.inputs.iter().find(|s| s.name == input.name) else {
            return Err(at(format!(
                "unknown input '{}'; the inputs are: {}",
                input.name,
                names(&target.inputs)
            )));
        };
        if spec.datatype != input.datatype {
            return Err(at(format!(
                "input '{}' has datatype {}, but the model expects {}",
                input.name, input.datatype, spec.datatype
            )));
        }
        if !spec.accepts_shape(&input.shape) {
            return Err(at(format!(
                "input '{}' has shape {}, but the model expects {} (-1: any size)",
                input.name,
                shape_text(&input.shape),
                shape_text(&spec.shape)
            )));
        }
    }
    if let Some(missing) = target
        .inputs
        .iter()
        .find(|spec| !inputs.iter().any(|i| i.name == spec.name))
    {
        return Err(at(format!(
            "input '{}' is missing; the model needs: {}",
            missing.name,
            names(&target.inputs)
        )));
    }
    Ok(())
}

/// The requested output names, in order: every one must be among `available`
/// (the outputs of `owner`, a model version or an endpoint), and none asked twice.
pub(super) fn output_names(
    owner: &str,
    available: &[&str],
    requested: Vec<String>,
) -> Result<Vec<String>, InferError> {
    for (i, name) in requested.iter().enumerate() {
        if !available.contains(&name.as_str()) {
            return Err(InferError::Invalid(format!(
                "unknown output '{name}'; the outputs of {owner} are: {}",
                available.join(", ")
            )));
        }
        if requested[..i].contains(name) {
            return Err(InferError::Invalid(format!(
                "output '{name}' is requested more than once"
            )));
        }
    }
    Ok(requested)
}
