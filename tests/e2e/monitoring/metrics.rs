//! The Prometheus metrics: bounded labels, every stage and plugin, a port of their own.

use serde_json::json;

use super::*;
use crate::harness::{Server, iris_request};
use crate::plugins::{AB, Setup, component, drop_in};

#[test]
fn metrics_count_requests_with_bounded_labels() {
    let setup = Setup::plugins(&["weighted"]);
    let server = setup.start(AB);
    let request = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
    for _ in 0..5 {
        server.post_json("/v2/models/iris/infer", &request).ok();
    }
    for _ in 0..4 {
        server.post_json("/v2/models/ab/infer", &request).ok();
    }
    server
        .post_json("/v2/models/iris/infer", &json!({"inputs": []}))
        .error(400);
    for name in ["nope", "also-nope", "and-another"] {
        server
            .post_json(&format!("/v2/models/{name}/infer"), &request)
            .error(404);
    }

    let samples = samples(&server);
    let total = "modelyard_requests_total";
    let ok = json!({"endpoint": "iris", "variant": "", "model": "iris", "version": "2", "status": "200"});
    assert_eq!(value(&samples, total, &ok), 5.0);
    assert_eq!(
        value(
            &samples,
            total,
            &json!({"endpoint": "iris", "status": "400"})
        ),
        1.0
    );
    // Every variant of the endpoint, with the model and version that answered.
    let ab = value(
        &samples,
        total,
        &json!({"endpoint": "ab", "model": "iris", "status": "200"}),
    );
    assert_eq!(ab, 4.0);
    let by_variant: f64 = ["a", "b"]
        .iter()
        .map(|v| value(&samples, total, &json!({"endpoint": "ab", "variant": v})))
        .sum();
    assert_eq!(by_variant, 4.0);
    // Names that are neither endpoint nor model share one label value.
    assert_eq!(
        value(
            &samples,
            total,
            &json!({"endpoint": "unknown", "status": "404"})
        ),
        3.0
    );
    assert!(!samples.iter().any(|s| s["labels"]["endpoint"] == "nope"));
    let histogram = "modelyard_request_duration_seconds_count";
    assert_eq!(
        value(&samples, histogram, &json!({"endpoint": "iris"})),
        6.0
    );
    let seconds = value(
        &samples,
        "modelyard_request_duration_seconds_sum",
        &json!({"endpoint": "iris"}),
    );
    assert!(seconds > 0.0 && seconds < 5.0, "{seconds}");
    assert_eq!(
        value(&samples, "modelyard_requests_in_flight", &json!({})),
        0.0
    );

    let quiet = Server::start(setup.models.path(), "[server]\nmetrics = false\n");
    assert!(quiet.get("/metrics").error(404).contains("server.metrics"));
}

#[test]
fn metrics_cover_plugins_models_shadows_flags_and_stages() {
    let setup = Setup::plugins(&["weighted", "flagd"]);
    drop_in(
        &component("fixture-router", Some("a")),
        setup.plugins.path(),
        "fixture-router.wasm",
    );
    // A plugin file that is not a component, and a model version that is not ONNX.
    std::fs::write(setup.plugins.path().join("broken.wasm"), b"not wasm").unwrap();
    crate::harness::broken_model(setup.models.path());
    let server = setup.start(
        &[
            r#"
[server]
shadow_queue = 2
[endpoints.shadowed]
variants = { main = "iris@2", copy = "iris@1" }
default_variant = "main"
router = { plugin = "weighted", config = { weights = { main = 1 }, shadows = ["copy"] } }
[endpoints.stuck]
variants = { a = "iris@2" }
router = { plugin = "fixture-router", config = { mode = "loop" } }
"#,
            FLAGGED,
        ]
        .concat(),
    );
    // Two setosas: both versions classify them alike.
    let request = iris_request(&[[5.1, 3.5, 1.4, 0.2], [4.9, 3.0, 1.4, 0.2]]);
    for _ in 0..20 {
        server.post_json("/v2/models/shadowed/infer", &request).ok();
    }
    for _ in 0..7 {
        server.post_json("/v2/models/flagged/infer", &request).ok();
    }
    // The router runs past its deadline; the default variant answers.
    for _ in 0..3 {
        server.post_json("/v2/models/stuck/infer", &request).ok();
    }
    server.post_json("/v2/models/iris/infer", &request).ok();

    let shadow = json!({"endpoint": "shadowed", "variant": "copy"});
    server.wait_until("every shadow copy is compared or dropped", || {
        let samples = samples(&server);
        value(&samples, "modelyard_shadow_comparisons_total", &shadow)
            + value(&samples, "modelyard_shadow_dropped_total", &shadow)
            == 20.0
    });
    let samples = samples(&server);
    let compared = value(&samples, "modelyard_shadow_comparisons_total", &shadow);
    eprintln!("shadows: {compared} of 20 compared, the rest dropped by a queue of 2");
    assert!(compared >= 1.0);
    // iris@1 and iris@2 agree on both rows.
    assert_eq!(
        value(
            &samples,
            "modelyard_shadow_comparisons_total",
            &json!({"endpoint": "shadowed", "result": "agreed"})
        ),
        compared
    );
    let router = json!({"plugin": "weighted", "world": "router"});
    assert_eq!(
        value(&samples, "modelyard_plugin_calls_total", &router),
        20.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_plugin_call_duration_seconds_count",
            &router
        ),
        20.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_flag_evaluations_total",
            &json!({"endpoint": "flagged", "flag": "new-model", "variant": "on"})
        ),
        7.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_requests_total",
            &json!({"endpoint": "flagged", "variant": "candidate", "version": "1"})
        ),
        7.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_plugin_failures_total",
            &json!({"plugin": "fixture-router", "world": "router", "reason": "timeout"})
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_plugin_loads_total",
            &json!({"name": "broken", "outcome": "refused"})
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_plugin_loads_total",
            &json!({"name": "weighted", "outcome": "loaded"})
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_model_loads_total",
            &json!({"name": "iris", "outcome": "loaded"})
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_model_loads_total",
            &json!({"name": "broken", "outcome": "refused"})
        ),
        1.0
    );
    // Every answer waited for a slot once and ran its model once (shadows run theirs too).
    assert_eq!(
        value(
            &samples,
            "modelyard_queue_duration_seconds_count",
            &json!({"endpoint": "flagged"})
        ),
        7.0
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_inference_duration_seconds_count",
            &json!({"model": "iris", "version": "1"})
        ),
        7.0 + compared
    );
    assert_eq!(
        value(
            &samples,
            "modelyard_inference_duration_seconds_count",
            &json!({"model": "iris", "version": "2"})
        ),
        20.0 + 3.0 + 1.0
    );
}

#[test]
fn metrics_can_have_a_port_of_their_own() {
    let setup = Setup::plugins(&[]);
    let server = setup.start("[monitoring]\nmetrics_listen = \"127.0.0.1:0\"\n");
    server
        .post_json(
            "/v2/models/iris/infer",
            &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
        )
        .ok();
    let addr = log_lines(&server, "serving /metrics")
        .first()
        .and_then(|e| e["fields"]["addr"].as_str().map(str::to_string))
        .expect("the metrics listener's address is logged");
    assert_ne!(addr, server.addr);
    let text = ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        text.contains(r#"modelyard_requests_total{endpoint="iris""#),
        "{text}"
    );
    // Not on the port clients reach.
    assert_eq!(server.get("/metrics").status, 404);
}
