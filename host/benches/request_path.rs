//! Where a request's time goes inside the server, on the `iris` model with one row:
//! the bare tract call, the same call through the wasi-nn backend traits, JSON decode and
//! encode, the pipeline (lookup, checks, hand-off to the inference pool, run), and what
//! the plugin chain adds.
//! `cargo bench -p modelyard --bench request_path`; figures in BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use modelyard::backend::TractBackend;
use modelyard::config::Config;
use modelyard::endpoint::{Build, EndpointSet};
use modelyard::http::{OutputEncoding, decode_request, encode_response};
use modelyard::pipeline::{InferRequest, Options, Pipeline};
use modelyard::plugins::{
    Datatype, Direction, Library, Limits, Plugin, PluginEngine, Provenance, RequestContext, Tensor,
    VariantStats,
};
use modelyard::registry::ModelRepository;
use modelyard::telemetry::Telemetry;
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
        parameters: template.parameters.clone(),
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
    c.bench_function("backend: tract graph, host tensors", |b| {
        b.iter(|| {
            loaded
                .model
                .run(black_box(again(&template).inputs))
                .unwrap()
        })
    });

    let metrics = modelyard::telemetry::Metrics::default();
    let labels = modelyard::telemetry::RequestLabels {
        endpoint: "iris-ab".into(),
        variant: "stable".into(),
        model: "iris".into(),
        version: "2".into(),
        status: "200".into(),
    };
    c.bench_function("metrics: count one answer", |b| {
        b.iter(|| {
            let _in_flight = metrics.in_flight();
            metrics.answered(
                black_box(labels.clone()),
                std::time::Duration::from_micros(70),
            )
        })
    });

    // The rest of what monitoring adds to one request at the default settings, each part
    // alone (the global subscriber is not installed in benchmarks, so it is set here).
    let inference = metrics.inference_seconds("iris", 2);
    let queue = metrics.queue_seconds("iris");
    c.bench_function("monitoring: queue and inference histograms", |b| {
        b.iter(|| {
            queue.observe(black_box(std::time::Duration::from_micros(20)));
            inference.observe(black_box(std::time::Duration::from_micros(3)));
        })
    });
    let meter = metrics.plugin_meter("canary", "router");
    c.bench_function("monitoring: one plugin call counted", |b| {
        b.iter(|| meter.call(black_box(std::time::Duration::from_micros(2)), None))
    });
    // What a run's cost adds: the thread's CPU clock read twice, the session's workers'
    // (none on tract), the version's and the variant's counters and cost gauges.
    let spendings = modelyard::telemetry::Spendings::new(Some(0.04));
    let (version, variant) = (spendings.version("iris", 2), spendings.variant("ab", "a"));
    c.bench_function("cost: CPU clocks read and one run charged", |b| {
        b.iter(|| {
            let before = modelyard::backend::cpu::thread_now();
            let spent = modelyard::backend::cpu::thread_now().saturating_sub(before)
                + modelyard::backend::cpu::take_workers();
            version.charge(black_box(spent), 1);
            variant.charge(spent, 1);
        })
    });
    let reference =
        serde_json::from_slice(&std::fs::read(models().join("iris/2/reference.json")).unwrap())
            .unwrap();
    let drift = modelyard::telemetry::drift::DriftMonitor::new(
        reference,
        Default::default(),
        &loaded.inputs,
    )
    .unwrap();
    c.bench_function("monitoring: drift window, one row", |b| {
        b.iter(|| drift.observe(black_box(&template.inputs)))
    });
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_env_filter("info")
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        // As `http::trace` and the pipeline do it: made with the trace id, the id recorded
        // once the body is read, entered on the reactor and on the blocking thread.
        c.bench_function("monitoring: request span (info level)", |b| {
            b.iter(|| {
                let trace = modelyard::telemetry::Trace::from_header(None);
                let span = tracing::info_span!("request", trace_id = %trace.trace_id, id = tracing::field::Empty);
                span.record("id", "my-42");
                for _ in 0..3 {
                    let _entered = span.enter();
                }
                black_box(trace.child())
            })
        });
    });

    c.bench_function("http: decode JSON request", |b| {
        b.iter(|| decode_request(black_box(BODY.as_bytes()), None).unwrap())
    });

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let telemetry = Telemetry::off();
    let repository = Arc::new(ModelRepository::new(
        models().to_path_buf(),
        telemetry.clone(),
    ));
    let pipeline = Pipeline::new(
        repository.clone(),
        Options {
            parallelism: 2,
            feedback_memory: 1024,
            performance_bucket: std::time::Duration::from_secs(60),
            shadow_queue: 1024,
            seed: Some(7),
            request_timeout: None,
            replica: None,
        },
        telemetry,
    );
    runtime.block_on(async {
        let _watch = repository.watch().unwrap();
        while !repository.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let response = pipeline
            .infer("iris", None, again(&template), &|_| None)
            .await
            .unwrap();
        c.bench_function("http: encode JSON response", |b| {
            b.iter(|| encode_response(black_box(&response), &OutputEncoding::default()).unwrap())
        });
    });
    c.bench_function("pipeline: lookup, checks, inference pool, run", |b| {
        b.to_async(&runtime).iter(|| async {
            pipeline
                .infer("iris", None, again(&template), &|_| None)
                .await
                .unwrap()
        })
    });
    plugin_chain(c, &runtime, &pipeline, &template);
    strategies(c, &runtime, &pipeline, &template);
}

/// What each deployment strategy adds to a request: the same request through an endpoint
/// with no router (the baseline) and through one per standard strategy, whole path.
fn strategies(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    pipeline: &Pipeline,
    template: &InferRequest,
) {
    let plugins = plugin_dir(&[
        ("plugins/weighted.wasm", "weighted.wasm"),
        ("plugins/canary.wasm", "canary.wasm"),
        ("plugins/blue-green.wasm", "blue-green.wasm"),
        ("plugins/bandit.wasm", "bandit.wasm"),
        ("plugins/flagd.wasm", "flagd.wasm"),
    ]);
    let config: Config = toml::from_str(
        r#"
        [endpoints.baseline]
        variants = { a = "iris@2", b = "iris@1" }
        [endpoints.ab]
        variants = { a = "iris@2", b = "iris@1" }
        router = { plugin = "weighted", config = { weights = { a = 1, b = 1 } } }
        [endpoints.canary]
        variants = { a = "iris@2", b = "iris@1" }
        router = { plugin = "canary", config = { stable = "a", canary = "b", steps = [10, 50], step_requests = 1000000000000 } }
        [endpoints.blue-green]
        variants = { a = "iris@2", b = "iris@1" }
        router = { plugin = "blue-green", config = { active = "a" } }
        [endpoints.bandit]
        variants = { a = "iris@2", b = "iris@1" }
        router = { plugin = "bandit", config = { algorithm = "thompson" } }
        [endpoints.shadow]
        variants = { a = "iris@2", b = "iris@1" }
        router = { plugin = "weighted", config = { weights = { a = 1 }, shadows = ["b"] } }
        [endpoints.flags]
        variants = { a = "iris@2", b = "iris@1" }
        flag_routing = { flag = "rollout", variants = { on = "b", off = "a" } }
        [[endpoints.flags.flags]]
        plugin = "flagd"
        [endpoints.flags.flags.config.flags.rollout]
        state = "ENABLED"
        variants = { on = true, off = false }
        defaultVariant = "off"
        targeting = { if = [{ in = [{ var = "country" }, ["NL", "DE"]] }, "on", { fractional = [["on", 10], ["off", 90]] }] }
        "#,
    )
    .unwrap();
    let (library, endpoints) = bind(pipeline, plugins.path(), &config);
    // The decision alone: each router's call on a reused instance, with the state the
    // host keeps for it, and the flags plugin's evaluation.
    let ctx = RequestContext {
        id: "bench".into(),
        endpoint: "bench".into(),
        targeting_key: Some("user-1".into()),
        attributes: vec![("country".into(), "US".into())],
        seed: 7,
        now_ms: 1_800_000_000_000,
    };
    let variants = vec![stats("a"), stats("b")];
    let mut group = c.benchmark_group("strategy decision");
    for name in ["ab", "canary", "blue-green", "bandit", "shadow"] {
        let endpoint = &endpoints.endpoints[name];
        let router = &endpoint.router.as_ref().unwrap().pool;
        // The state a running endpoint would hold after its first request.
        if let Some(state) = router.route(&ctx, &variants, "").unwrap().state {
            endpoint.strategy.replace(&endpoint.strategy.load(), state);
        }
        let state = endpoint.strategy.load();
        group.bench_function(name, |b| {
            b.iter(|| router.route(&ctx, &variants, &state).unwrap())
        });
    }
    let flags = endpoints.endpoints["flags"].flags[0].pool.clone();
    group.bench_function("flags (flagd, one rule with fractional)", |b| {
        b.iter(|| flags.evaluate(&ctx).unwrap())
    });
    group.finish();
    pipeline.set_plugins(library, endpoints);
    let mut request = again(template);
    request.parameters = vec![
        ("targeting_key".into(), "user-1".into()),
        ("country".into(), "US".into()),
    ];
    let mut group = c.benchmark_group("strategy cost");
    group.measurement_time(std::time::Duration::from_secs(3));
    for endpoint in [
        "baseline",
        "ab",
        "canary",
        "blue-green",
        "bandit",
        "shadow",
        "flags",
    ] {
        group.bench_function(endpoint, |b| {
            b.to_async(runtime).iter(|| async {
                pipeline
                    .infer(endpoint, None, again(&request), &|_| None)
                    .await
                    .unwrap()
            })
        });
    }
    group.finish();
}

/// The plugin chain (router + preprocess + postprocess) against the same request to the
/// bare model, in one run; and one router call on a reused instance against a fresh one
/// from the `InstancePre`. Needs the components `tests/run` builds.
fn plugin_chain(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    pipeline: &Pipeline,
    template: &InferRequest,
) {
    let plugins = plugin_dir(&[
        ("plugins/weighted.wasm", "weighted.wasm"),
        (
            "target/fixtures/a/fixture-processor.wasm",
            "passthrough.wasm",
        ),
    ]);
    let config: Config = toml::from_str(
        r#"
        [endpoints.chain]
        variants = { stable = "iris@2", candidate = "iris@1" }
        router = { plugin = "weighted", config = { weights = { stable = 1, candidate = 1 } } }
        [[endpoints.chain.processors]]
        plugin = "passthrough"
        config = { mode = "tag" }
        "#,
    )
    .unwrap();
    let (library, endpoints) = bind(pipeline, plugins.path(), &config);
    let router = endpoints.endpoints["chain"]
        .router
        .as_ref()
        .unwrap()
        .pool
        .clone();
    let processor = endpoints.endpoints["chain"].processors[0].pool.clone();
    pipeline.set_plugins(library, endpoints);

    let mut group = c.benchmark_group("plugin chain");
    group.bench_function("bare model", |b| {
        b.to_async(runtime).iter(|| async {
            pipeline
                .infer("iris", None, again(template), &|_| None)
                .await
                .unwrap()
        })
    });
    group.bench_function("endpoint: router + preprocess + postprocess", |b| {
        b.to_async(runtime).iter(|| async {
            pipeline
                .infer("chain", None, again(template), &|_| None)
                .await
                .unwrap()
        })
    });
    group.finish();

    let ctx = RequestContext {
        id: "bench".into(),
        endpoint: "chain".into(),
        targeting_key: Some("user-1".into()),
        attributes: vec![],
        seed: 7,
        now_ms: 1_800_000_000_000,
    };
    let variants = vec![stats("stable"), stats("candidate")];
    let mut group = c.benchmark_group("plugin calls");
    group.bench_function("router, reused instance", |b| {
        b.iter(|| router.route(&ctx, &variants, "").unwrap())
    });
    let inputs = vec![Tensor {
        name: "input".into(),
        datatype: Datatype::Fp32,
        shape: vec![1, 4],
        data: ROW.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }];
    let outputs = vec![Tensor {
        name: "probabilities".into(),
        datatype: Datatype::Fp32,
        shape: vec![1, 3],
        data: [0.9f32, 0.05, 0.05]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    }];
    group.bench_function("whole chain: route + preprocess + postprocess", |b| {
        b.iter(|| {
            router.route(&ctx, &variants, "").unwrap();
            processor
                .process(Direction::Pre, &ctx, &inputs, Ok)
                .unwrap();
            processor
                .process(Direction::Post, &ctx, &outputs, Ok)
                .unwrap()
        })
    });
    // A fresh instance per call: binding makes and configures one, the call then takes it.
    let fresh = |engine: &PluginEngine, b: &mut criterion::Bencher| {
        let library = Library::scan(
            engine,
            plugins.path(),
            &Library::default(),
            &Provenance::default(),
            &Telemetry::off(),
        );
        let prepared = library.files["weighted"].prepared.clone().unwrap();
        let config = r#"{"weights":{"stable":1,"candidate":1}}"#;
        b.iter(|| {
            let Ok(Plugin::Router(router)) = engine.bind(&prepared, config.to_string()) else {
                panic!("weighted is a router")
            };
            router.route(&ctx, &variants, "").unwrap()
        })
    };
    let unpooled = PluginEngine::new(Limits::default(), None, false).unwrap();
    group.bench_function("router, fresh instance from InstancePre", |b| {
        fresh(&unpooled, b)
    });
    // The same, with the pooling allocator, where this host allows its reservation.
    match PluginEngine::new(Limits::default(), None, true) {
        Ok(pooled) => {
            group.bench_function(
                "router, fresh instance from InstancePre, pooling allocator",
                |b| fresh(&pooled, b),
            );
        }
        Err(error) => eprintln!("pooling allocator not available here: {error}"),
    }
    group.finish();
}

/// A plugin directory holding the components `tests/run` built: (path from the repository
/// root, file name) pairs.
fn plugin_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let plugins = tempfile::tempdir().unwrap();
    for (from, name) in files {
        std::fs::copy(root.join(from), plugins.path().join(name))
            .unwrap_or_else(|e| panic!("{from}: {e}; build the plugins with tests/run first"));
    }
    plugins
}

/// The endpoints of `config`, bound to the components in `plugins`, counting into the
/// pipeline's statistics.
fn bind(pipeline: &Pipeline, plugins: &Path, config: &Config) -> (Library, EndpointSet) {
    let engine = PluginEngine::new(Limits::default(), None, false).unwrap();
    let telemetry = Telemetry::off();
    let library = Library::scan(
        &engine,
        plugins,
        &Library::default(),
        &Provenance::default(),
        &telemetry,
    );
    let endpoints = Build {
        configs: &config.endpoints,
        library: &library,
        engine: &engine,
        previous: &EndpointSet::default(),
        stats: pipeline.stats(),
        telemetry: &telemetry,
        resume: false,
    }
    .run();
    assert!(endpoints.errors.is_empty(), "{:?}", endpoints.errors);
    (library, endpoints)
}

fn stats(name: &str) -> VariantStats {
    VariantStats {
        name: name.into(),
        model: "iris".into(),
        version: "2".into(),
        requests: 0,
        errors: 0,
        latency_p50_us: 0,
        latency_p99_us: 0,
        reward_count: 0,
        reward_sum: 0.0,
        // A full window, as a busy variant's: what every router call copies.
        recent_latency_us: vec![100; 256],
    }
}

criterion_group!(request_path, benches);
criterion_main!(request_path);
