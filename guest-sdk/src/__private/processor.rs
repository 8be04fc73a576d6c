pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "processor",
        pub_export_macro: true,
        export_macro_name: "__export_processor",
        default_bindings_module: "modelyard_sdk::__private::processor::bindings",
    });
}

pub use bindings::Guest;
use bindings::modelyard::plugin::types::Datatype as D;
pub use bindings::modelyard::plugin::types::{RequestContext, Tensor};

use crate::DataType;

const DATATYPES: [(D, DataType); 13] = [
    (D::Bool, DataType::Bool),
    (D::Uint8, DataType::Uint8),
    (D::Uint16, DataType::Uint16),
    (D::Uint32, DataType::Uint32),
    (D::Uint64, DataType::Uint64),
    (D::Int8, DataType::Int8),
    (D::Int16, DataType::Int16),
    (D::Int32, DataType::Int32),
    (D::Int64, DataType::Int64),
    (D::Fp16, DataType::Fp16),
    (D::Fp32, DataType::Fp32),
    (D::Fp64, DataType::Fp64),
    (D::Bytes, DataType::Bytes),
];

fn from_wit(t: Tensor) -> crate::Tensor {
    let datatype = DATATYPES
        .iter()
        .find(|(w, _)| *w == t.datatype)
        .map_or(DataType::Bytes, |(_, d)| *d);
    crate::Tensor {
        name: t.name,
        datatype,
        shape: t.shape,
        data: t.data,
    }
}

fn to_wit(t: crate::Tensor) -> Tensor {
    let datatype = DATATYPES
        .iter()
        .find(|(_, d)| *d == t.datatype)
        .map_or(D::Bytes, |(w, _)| *w);
    Tensor {
        name: t.name,
        datatype,
        shape: t.shape,
        data: t.data,
    }
}

type Step<T> =
    fn(&T, &crate::RequestContext, Vec<crate::Tensor>) -> Result<Vec<crate::Tensor>, crate::Error>;

fn run<T: crate::Processor>(
    step: Step<T>,
    ctx: RequestContext,
    tensors: Vec<Tensor>,
) -> Result<Vec<Tensor>, String> {
    let ctx = super::context!(ctx);
    let tensors = tensors.into_iter().map(from_wit).collect();
    let out = super::with_plugin::<T, _>(|p| step(p, &ctx, tensors))?.map_err(|e| e.0)?;
    Ok(out.into_iter().map(to_wit).collect())
}

pub fn preprocess<T: crate::Processor>(
    ctx: RequestContext,
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, String> {
    run::<T>(T::preprocess, ctx, inputs)
}

pub fn postprocess<T: crate::Processor>(
    ctx: RequestContext,
    outputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, String> {
    run::<T>(T::postprocess, ctx, outputs)
}
