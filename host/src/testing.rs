//! What the unit tests of the request path share: the sample models in `models/`, loaded
//! by a real repository, a pipeline over them, and endpoints bound from TOML, as the
//! server sets them up (plugins aside: those need components built for wasm32, which the
//! end-to-end tests have).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::endpoint::{Build, EndpointSet};
use crate::pipeline::{InferRequest, Options, Pipeline};
use crate::plugins::{Library, Limits, PluginEngine};
use crate::registry::ModelRepository;
use crate::telemetry::Telemetry;
use crate::tensor::{DataType, Tensor};

pub fn sample_models() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models"))
}

/// The ONNX file of a version of the sample iris model.
pub fn iris_model(version: u64) -> Vec<u8> {
    std::fs::read(sample_models().join(format!("iris/{version}/model.onnx"))).unwrap()
}

/// The sample models, loaded: the repository's watch runs until the test's runtime ends.
pub async fn loaded_repository(telemetry: Arc<Telemetry>) -> Arc<ModelRepository> {
    let repository = Arc::new(ModelRepository::new(sample_models(), telemetry));
    repository.watch().unwrap();
    for _ in 0..600 {
        if repository.is_ready() {
            return repository;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the sample models did not load within 30 s");
}

pub fn pipeline(repository: Arc<ModelRepository>, telemetry: Arc<Telemetry>) -> Arc<Pipeline> {
    Arc::new(Pipeline::new(
        repository,
        Options {
            parallelism: 2,
            feedback_memory: 16,
            performance_bucket: Duration::from_secs(60),
            shadow_queue: 16,
            seed: Some(1),
            request_timeout: None,
            replica: None,
        },
        telemetry,
    ))
}

/// The endpoints of `toml` (a `modelyard.toml`), bound with no plugins, swapped into
/// `pipeline`.
pub fn bind(pipeline: &Pipeline, telemetry: &Arc<Telemetry>, toml: &str) -> Arc<EndpointSet> {
    let config: Config = toml::from_str(toml).unwrap();
    let engine = PluginEngine::new(Limits::default(), None, false).unwrap();
    let library = Library::default();
    let endpoints = Build {
        configs: &config.endpoints,
        library: &library,
        engine: &engine,
        previous: &EndpointSet::default(),
        stats: pipeline.stats(),
        telemetry,
        resume: false,
    }
    .run();
    pipeline.set_plugins(library, endpoints);
    pipeline.endpoints()
}

/// Rows of iris measurements as the sample model's `input`.
pub fn iris(rows: &[[f32; 4]]) -> InferRequest {
    InferRequest {
        inputs: vec![Tensor {
            name: "input".to_string(),
            datatype: DataType::Fp32,
            shape: vec![rows.len(), 4],
            data: rows
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        }],
        ..InferRequest::default()
    }
}
