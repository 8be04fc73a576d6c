//! Monitoring: the Prometheus metrics, read back with the reference parser
//! (`prometheus_client`, which `tests/run` installs beside tritonclient).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::harness::{Server, iris_request, root};
use crate::plugins::{AB, Setup};

/// Every sample `/metrics` serves, parsed by `prometheus_client`'s OpenMetrics parser.
fn samples(server: &Server) -> Vec<Value> {
    let python = std::env::var("MODELYARD_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("MODELYARD_TEST_PYTHON is not set: run the suite with tests/run, which installs prometheus_client into a virtualenv")
    });
    let reply = server.get("/metrics");
    assert_eq!(reply.status, 200);
    let content_type = reply.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let mut parser = Command::new(python)
        .arg(root().join("tests/compat/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    parser.stdin.take().unwrap().write_all(&reply.body).unwrap();
    let output = parser.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the parser refused the metrics: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&reply.body)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The value of the sample `name` whose labels include `labels`; 0 when there is none.
fn value(samples: &[Value], name: &str, labels: &Value) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| {
            labels
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| s["labels"][k] == *v)
        })
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

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
