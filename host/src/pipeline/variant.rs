//! One variant serving one request, on a thread of the inference pool: the endpoint's
//! preprocessors, the variant's model, its postprocessors, each processor failure under the
//! endpoint's policy. Shadow copies take the same steps.

use std::time::Instant;

use super::request::{InferError, InferRequest, InferResponse, model_failed, select};
use super::validate;
use crate::config::ProcessorFailure;
use crate::endpoint::{Bound, Endpoint, Variant};
use crate::plugins::{Direction, ProcessorWorld, RequestContext, from_plugin, to_plugin};
use crate::registry::{LoadedVersion, ModelRepository};
use crate::tensor::Tensor;

/// A version's inputs, as they go to its runner: they join its drift window first.
pub(super) fn observed(target: &LoadedVersion, inputs: Vec<Tensor>) -> Vec<Tensor> {
    if let Some(drift) = &target.drift {
        drift.observe(&inputs);
    }
    inputs
}

/// The model itself, from a thread of the inference pool: its runner answers (cache,
/// batch, or a run here), charging the variant.
fn run_model(
    target: &LoadedVersion,
    variant: &Variant,
    inputs: Vec<Tensor>,
    deadline: Option<Instant>,
) -> Result<Vec<Tensor>, InferError> {
    let inputs = observed(target, inputs);
    let outputs = target
        .runner
        .run_blocking(inputs, deadline, &variant.spending);
    outputs.map_err(|failure| model_failed(target, failure))
}

/// Flags, preprocessors, the variant's model and postprocessors, on a blocking thread.
pub(super) fn serve_variant(
    repository: &ModelRepository,
    endpoint: &Endpoint,
    variant: &Variant,
    ctx: &RequestContext,
    request: InferRequest,
) -> Result<InferResponse, InferError> {
    let mut inputs = request.inputs;
    for processor in &endpoint.processors {
        inputs = process(endpoint, processor, Direction::Pre, ctx, inputs)?;
    }
    let version = variant.version.map(|v| v.to_string());
    let target = repository
        .snapshot()?
        .resolve(&variant.model, version.as_deref())?;
    validate::inputs(&target, &inputs)?;
    let mut outputs = run_model(&target, variant, inputs, request.deadline)?;
    for processor in endpoint.processors.iter().rev() {
        outputs = process(endpoint, processor, Direction::Post, ctx, outputs)?;
    }
    let wanted = request
        .outputs
        .map(|requested| {
            let names: Vec<&str> = outputs.iter().map(|t| t.name.as_str()).collect();
            validate::output_names(&format!("endpoint '{}'", endpoint.name), &names, requested)
        })
        .transpose()?;
    Ok(InferResponse {
        model: endpoint.name.clone(),
        source_model: target.model.clone(),
        version: target.version,
        id: Some(ctx.id.clone()),
        outputs: select(outputs, wanted),
        variant: Some(variant.name.clone()),
        fallback: false,
    })
}

/// One processor step, with the endpoint's failure policy. A failure of any kind — an
/// `err`, a trap, a deadline, tensors that do not fill their shapes — is the plugin's: it
/// is counted against it and logged with its name whichever way the policy goes.
fn process(
    endpoint: &Endpoint,
    processor: &Bound<ProcessorWorld>,
    direction: Direction,
    ctx: &RequestContext,
    tensors: Vec<Tensor>,
) -> Result<Vec<Tensor>, InferError> {
    let keep =
        (endpoint.on_processor_error == ProcessorFailure::PassThrough).then(|| tensors.clone());
    let result = processor
        .pool
        .process(direction, ctx, &to_plugin(tensors), from_plugin);
    let error = match result {
        Ok(tensors) => return Ok(tensors),
        Err(error) => error.to_string(),
    };
    tracing::warn!(
        endpoint = %endpoint.name, plugin = %processor.plugin, ?direction, %error,
        passed_through = keep.is_some(), "processor failed"
    );
    keep.ok_or(InferError::Plugin {
        endpoint: endpoint.name.clone(),
        reason: error,
    })
}
