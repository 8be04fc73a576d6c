use super::bindings::processor as wit;
use crate::{Error, Processor, RequestContext, Tensor};

pub use wit::Guest;

type Step<T> = fn(&T, &RequestContext, Vec<Tensor>) -> Result<Vec<Tensor>, Error>;

fn run<T: Processor>(
    step: Step<T>,
    ctx: RequestContext,
    tensors: Vec<Tensor>,
) -> Result<Vec<Tensor>, String> {
    super::with_plugin::<T, _>(|p| step(p, &ctx, tensors))?.map_err(|e| e.0)
}

pub fn preprocess<T: Processor>(
    ctx: RequestContext,
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, String> {
    run::<T>(T::preprocess, ctx, inputs)
}

pub fn postprocess<T: Processor>(
    ctx: RequestContext,
    outputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, String> {
    run::<T>(T::postprocess, ctx, outputs)
}
