//! Where a request's time goes inside the server, on the `iris` model with one row:
//! the bare tract call, the same call through the wasi-nn backend traits, JSON decode and
//! encode, and the pipeline (lookup, checks, hand-off to the inference pool, run).
//! `cargo bench -p modelyard --bench request_path`; figures in BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use modelyard::backend::{self, TractBackend};
use modelyard::http::{OutputEncoding, decode_request, encode_response};
use modelyard::pipeline::{InferRequest, Pipeline};
use modelyard::registry::ModelRepository;
use tract_onnx::prelude::*;

const ROW: [f32; 4] = [5.1, 3.5, 1.4, 0.2];
const BODY: &str =
    r#"{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[[5.1,3.5,1.4,0.2]]}]}"#;

fn models() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../models"))
}

fn request() -> InferRequest {
    decode_request(BODY.as_bytes(), None).unwrap().0
}

/// A decoded request, rebuilt cheaply so decoding stays out of the other measurements.
fn again(template: &InferRequest) -> InferRequest {
    InferRequest {
        inputs: template.inputs.clone(),
        ..InferRequest::default()
    }
}

fn benches(c: &mut Criterion) {
    let bytes = std::fs::read(models().join("iris/2/model.onnx")).unwrap();

    // What tract alone costs: the plan run on a ready tensor, as a bare embedding would do it.
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let input: TValue = tract_ndarray::arr2(&[ROW]).into_tensor().into();
    c.bench_function("tract: plan.run (bare)", |b| {
        b.iter(|| plan.run(tvec![input.clone()]).unwrap())
    });

    let template = request();
    let loaded = TractBackend::load_onnx(&bytes, &[], &[]).unwrap();
    c.bench_function("backend: run through wasi-nn traits", |b| {
        b.iter(|| backend::run(&loaded.graph, black_box(again(&template).inputs)).unwrap())
    });

    c.bench_function("http: decode JSON request", |b| {
        b.iter(|| decode_request(black_box(BODY.as_bytes()), None).unwrap())
    });

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let repository = Arc::new(ModelRepository::new(models().to_path_buf()));
    let pipeline = Pipeline::new(repository.clone(), 2);
    runtime.block_on(async {
        let _watch = repository.watch().unwrap();
        while !repository.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let response = pipeline
            .infer("iris", None, again(&template))
            .await
            .unwrap();
        c.bench_function("http: encode JSON response", |b| {
            b.iter(|| encode_response(black_box(&response), &OutputEncoding::default()).unwrap())
        });
    });
    c.bench_function("pipeline: lookup, checks, inference pool, run", |b| {
        b.to_async(&runtime).iter(|| async {
            pipeline
                .infer("iris", None, again(&template))
                .await
                .unwrap()
        })
    });
}

criterion_group!(request_path, benches);
criterion_main!(request_path);
