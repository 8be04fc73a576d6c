//! What the dashboard reads besides the rest of the operator API: the cost of predictions
//! (`/admin/cost` and `/metrics` alike), an endpoint's history, who a token is, plugin call
//! times, drift distributions; and the page itself, from the binary. The page in a browser
//! is `tests/dashboard/browser.py`'s.

use serde_json::json;

use super::*;
use crate::harness::iris_request;
use crate::plugins::Setup;

const READER: (&str, &str) = ("authorization", "Bearer read-secret");

#[test]
fn cost_history_and_who_is_asking() {
    let setup = Setup::plugins(&["weighted"]);
    // Two intra-op threads a session: ONNX Runtime runs one worker beside the caller.
    let iris = setup.models.path().join("iris/model.toml");
    let toml = std::fs::read_to_string(&iris).unwrap();
    std::fs::write(&iris, format!("threads = 2\n{toml}")).unwrap();
    let server = setup.start(&format!(
        r#"{TOKENS}
[server.tokens.reader]
token = "read-secret"
role = "read"

[monitoring]
core_hour_price = 0.09
history_step_seconds = 1

[endpoints.ab]
variants = {{ a = "iris@1", b = "iris@2" }}
router = {{ plugin = "weighted", config = {{ weights = {{ a = 100, b = 0 }} }} }}
"#
    ));
    let five = iris_request(&[[5.1, 3.5, 1.4, 0.2]; 5]);
    let two = iris_request(&[[6.7, 3.0, 5.2, 2.3]; 2]);
    let started = std::time::Instant::now();
    for _ in 0..40 {
        server.post_json("/v2/models/iris/infer", &five).ok();
    }
    for _ in 0..30 {
        assert_eq!(server.post_json("/v2/models/ab/infer", &two).variant(), "a");
    }
    let wall = started.elapsed().as_secs_f64();
    // Those workers are the server's own threads, whose CPU clocks a run reads: one per
    // session of the two versions (the sample models run on ONNX Runtime in this suite).
    let workers = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim() == "onnxruntime-wor")
        .count();
    assert_eq!(workers, 2, "intra-op threads started by the server");

    // Per model version: a prediction is a row; the CPU time is measured, and no more
    // than the threads could have spent in the time the requests took.
    let cost = server.get_with("/admin/cost", &[READER]).ok();
    assert_eq!(cost["core_hour_price"], 0.09);
    let version = |v: u64| {
        cost["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == "iris" && m["version"] == v)
            .cloned()
            .unwrap_or_else(|| panic!("no iris@{v} in {cost}"))
    };
    let (one, two_) = (version(1), version(2));
    assert_eq!(two_["predictions"], 200, "{two_}");
    assert_eq!(one["predictions"], 60, "{one}");
    for row in [&one, &two_] {
        let cpu = row["cpu_seconds"].as_f64().unwrap();
        assert!(cpu > 0.0 && cpu < wall * 4.0, "{row} in {wall} s");
        let predictions = row["predictions"].as_f64().unwrap();
        let per_million = 0.09 * cpu / 3600.0 / predictions * 1e6;
        let shown = row["cost_per_million"].as_f64().unwrap();
        assert!((shown - per_million).abs() <= per_million * 1e-9, "{row}");
        let rate = row["predictions_per_cpu_second"].as_f64().unwrap();
        assert!((rate - predictions / cpu).abs() <= rate * 1e-9, "{row}");
    }
    // Per variant: b was never routed to.
    let variant = |name: &str| {
        cost["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["endpoint"] == "ab" && v["variant"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(variant("a")["predictions"], 60);
    assert!(variant("a")["cpu_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(variant("b")["predictions"], 0);
    assert_eq!(variant("b")["cost_per_million"], Value::Null);

    // The same figures at /metrics.
    let samples = samples(&server);
    let iris2 = json!({"model": "iris", "version": "2"});
    assert_eq!(
        value(&samples, "modelyard_predictions_total", &iris2),
        200.0
    );
    let cpu = value(&samples, "modelyard_inference_cpu_seconds_total", &iris2);
    assert!((cpu - two_["cpu_seconds"].as_f64().unwrap()).abs() < 1e-9);
    let cost_metric = value(&samples, "modelyard_cost_per_million_predictions", &iris2);
    assert!((cost_metric - two_["cost_per_million"].as_f64().unwrap()).abs() < 1e-12);
    let a = json!({"endpoint": "ab", "variant": "a"});
    assert_eq!(
        value(&samples, "modelyard_variant_predictions_total", &a),
        60.0
    );
    assert_eq!(
        value(&samples, "modelyard_core_hour_price", &json!({})),
        0.09
    );

    // The history: a point a second, the 30 requests to `ab` in its steps.
    server.wait_until("the history holds the 30 requests", || {
        let history = server.get_with("/admin/history/ab", &[READER]).ok();
        let a = &history["variants"][0];
        a["name"] == "a"
            && a["requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .sum::<u64>()
                == 30
    });
    let history = server.get_with("/admin/history/ab", &[READER]).ok();
    assert_eq!(history["endpoint"], "ab");
    assert_eq!(history["step_seconds"], 1);
    let steps = history["times"].as_array().unwrap().len();
    assert_eq!(
        history["variants"][1]["p50_ms"].as_array().unwrap().len(),
        steps
    );
    assert!(
        history["variants"][0]["p99_ms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|ms| ms.as_f64().is_some_and(|ms| ms > 0.0)),
        "{history}"
    );
    assert!(
        server
            .get_with("/admin/history/nope", &[READER])
            .error(404)
            .contains("nope")
    );

    // The page asks for the audit trail only where it is kept.
    let status = server.get_with("/admin/status", &[READER]).ok();
    assert_eq!(status["records_kept"], true);

    // Who is asking: the dashboard offers actions to admin tokens only.
    let me = server.get_with("/admin/whoami", &[OPS]).ok();
    assert_eq!(
        me,
        json!({"token": "ops", "role": "admin", "can_act": true})
    );
    let me = server.get_with("/admin/whoami", &[READER]).ok();
    assert_eq!(
        me,
        json!({"token": "reader", "role": "read", "can_act": false})
    );
    server.get("/admin/whoami").error(401);

    // Plugin calls and their mean time; drift as distributions over the index's bins.
    let plugins = server.get_with("/admin/plugins", &[READER]).ok();
    let weighted = &plugins["plugins"][0];
    assert_eq!(weighted["name"], "weighted");
    assert!(weighted["calls"].as_u64().unwrap() >= 30, "{weighted}");
    assert!(
        weighted["call_mean_us"].as_f64().unwrap() > 0.0,
        "{weighted}"
    );
    let drift = server.get_with("/admin/drift/iris", &[READER]).ok();
    let feature = &drift["versions"][0]["features"][0];
    let bins = feature["bins"].as_array().unwrap();
    assert!(bins.len() > 1 && bins.len() <= 10, "{feature}");
    let reference: f64 = bins.iter().map(|b| b["reference"].as_f64().unwrap()).sum();
    assert!((reference - 1.0).abs() < 1e-9, "{feature}");

    // The page and its scripts come from the binary, locked to this origin.
    let page = server.get("/dashboard");
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let policy = page.headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"));
    let html = String::from_utf8_lossy(&page.body);
    assert!(
        html.contains("app.js") && html.contains("uPlot.iife.min.js"),
        "{html}"
    );
    let script = server.get("/dashboard/uPlot.iife.min.js");
    assert_eq!(script.status, 200);
    assert!(
        script.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(
        server
            .get("/dashboard/nope.js")
            .error(404)
            .contains("nope.js")
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page loads something from elsewhere: {html}"
    );
}
