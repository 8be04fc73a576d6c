//! Monitoring: the Prometheus metrics, read back with the reference parser
//! (`prometheus_client`, which `tests/run` installs beside tritonclient).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::harness::{Server, iris_request, root};
use crate::plugins::{AB, Setup, component, drop_in};

/// Every sample `/metrics` serves, parsed by `prometheus_client`'s OpenMetrics parser.
fn samples(server: &Server) -> Vec<Value> {
    let python = crate::harness::test_python();
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

/// An endpoint whose flag (on for everyone) routes every request to iris@1.
const FLAGGED: &str = r#"
[endpoints.flagged]
variants = { stable = "iris@2", candidate = "iris@1" }
default_variant = "stable"
flags = [{ plugin = "flagd", config = { flags = { new-model = { state = "ENABLED", variants = { on = true, off = false }, defaultVariant = "on" } } } }]
flag_routing = { flag = "new-model", variants = { on = "candidate", off = "stable" } }
"#;

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

/// The log lines whose message is `message`.
fn log_lines(server: &Server, message: &str) -> Vec<Value> {
    server
        .log_events()
        .into_iter()
        .filter(|e| e["fields"]["message"] == message)
        .collect()
}

#[test]
fn request_ids_follow_the_trace_into_every_log_line_and_the_answer() {
    let setup = Setup::plugins(&["weighted", "iris-features"]);
    let server = setup.start(
        r#"
[endpoints.checked]
variants = { a = "iris@2" }
router = { plugin = "weighted", config = { weights = { a = 1 } } }
processors = [{ plugin = "iris-features" }]
"#,
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    // A request the processor refuses: it is logged twice (the failure, the decision).
    let bad = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]});
    let reply = server.post(
        "/v2/models/checked/infer",
        &[
            ("content-type", "application/json"),
            ("traceparent", &traceparent),
        ],
        bad.to_string().as_bytes(),
    );
    assert!(reply.status >= 400);
    // The server names the request; the trace stays the caller's.
    let id = reply.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(!id.is_empty() && id != trace);
    let echoed = reply.headers["traceparent"].to_str().unwrap();
    assert!(echoed.starts_with(&format!("00-{trace}-")), "{echoed}");
    assert!(
        !echoed.contains("00f067aa0ba902b7"),
        "the server's own span id: {echoed}"
    );
    server.wait_until("the request is logged", || {
        !log_lines(&server, "routed").is_empty()
    });
    let about: Vec<Value> = server
        .log_events()
        .into_iter()
        .filter(|e| e["span"]["trace_id"] == trace)
        .collect();
    assert!(about.len() >= 2, "{about:?}");
    assert!(
        about.iter().all(|e| e["span"]["id"] == id.as_str()),
        "{about:?}"
    );
    assert!(about.iter().any(|e| e["fields"]["message"] == "routed"));

    // A client's own id is kept; without one the server makes one up; both come back.
    let mut with_id = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
    with_id["id"] = json!("client-42");
    let reply = server.post_json("/v2/models/iris/infer", &with_id);
    assert_eq!(reply.headers["x-request-id"], "client-42");
    assert_eq!(reply.json()["id"], "client-42");
    let reply = server.post_json(
        "/v2/models/iris/infer",
        &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
    );
    let id = reply.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(!id.is_empty());
    assert_eq!(reply.json()["id"], id.as_str());
    let generated = reply.headers["traceparent"].to_str().unwrap();
    assert_ne!(&generated[3..35], trace);
}

/// Starts the CloudEvents sink script; returns it, its port and a reader of its lines.
fn cloudevents_sink() -> (std::process::Child, u16, std::sync::mpsc::Receiver<Value>) {
    use std::io::BufRead;
    let python = crate::harness::test_python();
    let mut child = Command::new(python)
        .arg(root().join("tests/compat/cloudevents_sink.py"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let port = first.strip_prefix("port ").unwrap().parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str(&line).unwrap());
        }
    });
    (child, port, rx)
}

#[test]
fn sampled_requests_are_stored_and_sent_as_cloudevents() {
    let (mut sink, port, events) = cloudevents_sink();
    let setup = Setup::plugins(&["weighted", "flagd"]);
    let server = setup.start(&format!(
        "[monitoring]\nrequest_sample = 1.0\nrequest_payloads = true\n\
         cloudevents_sink = \"http://127.0.0.1:{port}/events\"\n{FLAGGED}"
    ));
    for i in 0..5 {
        let mut request = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
        request["id"] = json!(format!("r{i}"));
        server.post_json("/v2/models/flagged/infer", &request).ok();
    }
    let received: Vec<Value> = (0..5)
        .map(|_| {
            events
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap()
        })
        .collect();
    let _ = sink.kill();
    for event in &received {
        assert!(event.get("invalid").is_none(), "{event}");
        let attributes = &event["attributes"];
        assert_eq!(attributes["specversion"], "1.0");
        assert_eq!(attributes["type"], "dev.modelyard.inference.request");
        assert_eq!(attributes["source"], "/modelyard/flagged");
        assert_eq!(attributes["subject"], "candidate");
        let data = &event["data"];
        assert_eq!(data["id"], attributes["id"]);
        assert_eq!(data["variant"], "candidate");
        assert_eq!(data["reason"], "flag new-model = on");
        assert_eq!(data["flags"]["new-model"], "on");
        assert_eq!(data["status"], "ok");
        assert_eq!(data["inputs"][0]["data"], json!([5.1, 3.5, 1.4, 0.2]));
        assert_eq!(data["outputs"][0]["name"], "probabilities");
    }
    let ids: std::collections::BTreeSet<&str> = received
        .iter()
        .map(|e| e["attributes"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);

    // The same records are in the database, newest first, paged.
    let page = server.get("/admin/requests?endpoint=flagged&limit=3").ok();
    let first: Vec<&str> = page["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(first, ["r4", "r3", "r2"]);
    let next = page["next"].as_i64().unwrap();
    let rest = server
        .get(&format!(
            "/admin/requests?endpoint=flagged&limit=3&before={next}"
        ))
        .ok();
    assert_eq!(rest["requests"].as_array().unwrap().len(), 2);
    assert_eq!(rest["next"], Value::Null);
    assert_eq!(
        rest["requests"][0]["latency_us"].as_u64().map(|l| l > 0),
        Some(true)
    );
}

#[test]
fn only_the_configured_share_of_requests_is_sampled() {
    let setup = Setup::plugins(&[]);
    let server = setup.start("[monitoring]\nrequest_sample = 0.25\n");
    let request = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
    for _ in 0..400 {
        server.post_json("/v2/models/iris/infer", &request).ok();
    }
    let kept = server.get("/admin/requests?limit=1000").ok()["requests"]
        .as_array()
        .unwrap()
        .len();
    eprintln!("sampling 0.25: {kept} of 400 requests kept");
    // Binomial(400, 0.25): mean 100, sd 8.7; 50..150 is more than 5 sd either way.
    assert!((50..=150).contains(&kept), "{kept}");
    assert!(server.get("/admin/requests?limit=1000").ok()["requests"][0]["inputs"].is_null());
}

const TOKENS: &str = r#"
[server.tokens.ops]
token = "ops-secret"
role = "admin"
"#;

const OPS: (&str, &str) = ("authorization", "Bearer ops-secret");

fn audit(server: &Server, query: &str) -> Value {
    server
        .get_with(&format!("/admin/audit{query}"), &[OPS])
        .ok()
}

fn kinds(page: &Value) -> Vec<String> {
    page["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_audit_trail_records_every_change_and_survives_a_restart() {
    let setup = Setup::plugins(&["weighted", "flagd"]);
    let store = tempfile::tempdir().unwrap();
    let flags_file = store.path().join("flags.json");
    let flags = |state: &str| {
        json!({"flags": {"new-model": {
            "state": state, "variants": {"on": true, "off": false}, "defaultVariant": "on"
        }}})
        .to_string()
    };
    std::fs::write(&flags_file, flags("ENABLED")).unwrap();
    let endpoints = |weight_b: u32| {
        format!(
            r#"{TOKENS}
[monitoring]
database = {db:?}
[endpoints.ab]
variants = {{ a = "iris@1", b = "iris@2" }}
router = {{ plugin = "weighted", config = {{ weights = {{ a = 1, b = {weight_b} }} }} }}
[endpoints.flagged]
variants = {{ stable = "iris@2", candidate = "iris@1" }}
default_variant = "stable"
flags = [{{ plugin = "flagd", config_file = {flags_file:?} }}]
flag_routing = {{ flag = "new-model", variants = {{ on = "candidate" }} }}
"#,
            db = store.path().join("audit.db"),
        )
    };
    let started = crate::harness::unix_ms();
    let server = setup.start(&endpoints(1));
    let loaded = audit(&server, "?kind=plugin");
    assert_eq!(kinds(&loaded), ["plugin.loaded", "plugin.loaded"]);
    assert_eq!(loaded["changes"][0]["actor"], "file");

    // An operator's change, with who, from and to.
    server
        .post(
            "/admin/endpoints/ab/weights",
            &[OPS],
            br#"{"weights": {"a": 0, "b": 1}}"#,
        )
        .ok();
    let weights = audit(&server, "?endpoint=ab&kind=endpoint");
    let change = &weights["changes"][0];
    assert_eq!(change["kind"], "endpoint.weights");
    assert_eq!(change["actor"], "ops");
    assert_eq!(change["subject"], "ab");
    assert!(
        change["to"].as_str().unwrap().contains("\"b\":1"),
        "{change}"
    );

    // A plugin file refused, then a configuration refused and one applied.
    std::fs::write(setup.plugins.path().join("bad.wasm"), b"not wasm").unwrap();
    server.wait_until("the refused plugin is audited", || {
        kinds(&audit(&server, "?kind=plugin")).contains(&"plugin.refused".to_string())
    });
    server.write_config("[endpoints.ab\nbroken");
    server.wait_until("the refused configuration is audited", || {
        kinds(&audit(&server, "?kind=config")) == ["config.refused"]
    });
    server.write_config(&endpoints(3));
    server.wait_until("the applied configuration is audited", || {
        kinds(&audit(&server, "?kind=config")) == ["config.applied", "config.refused"]
    });
    let applied = &audit(&server, "?kind=config.applied")["changes"][0];
    assert!(
        applied["detail"].as_str().unwrap().contains("ab"),
        "{applied}"
    );

    // A flag flipped in its file.
    let temp = store.path().join(".flags.json.tmp");
    std::fs::write(&temp, flags("DISABLED")).unwrap();
    std::fs::rename(&temp, &flags_file).unwrap();
    server.wait_until("the flag flip is audited", || {
        !kinds(&audit(&server, "?kind=flag")).is_empty()
    });
    let flip = &audit(&server, "?kind=flag&endpoint=flagged")["changes"][0];
    assert_eq!(flip["subject"], "new-model");
    assert_eq!(flip["from"], "ENABLED, default on");
    assert_eq!(flip["to"], "DISABLED, default on");

    // A model version removed from disk.
    std::fs::remove_dir_all(setup.models.path().join("iris/1")).unwrap();
    server.wait_until("the unloaded version is audited", || {
        kinds(&audit(&server, "?kind=model&subject=iris")).contains(&"model.unloaded".to_string())
    });

    // Filters by time, and pages.
    let all = audit(&server, "?limit=1000");
    let total = all["changes"].as_array().unwrap().len();
    assert!(total >= 10, "{all}");
    assert_eq!(
        audit(&server, &format!("?since={started}&limit=1000"))["changes"]
            .as_array()
            .unwrap()
            .len(),
        total
    );
    assert!(
        audit(&server, "?until=2000-01-01T00:00:00Z")["changes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let mut seen = Vec::new();
    let mut query = "?limit=4".to_string();
    loop {
        let page = audit(&server, &query);
        seen.extend(
            page["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_i64().unwrap()),
        );
        match page["next"].as_i64() {
            Some(next) => query = format!("?limit=4&before={next}"),
            None => break,
        }
    }
    let expected: Vec<i64> = all["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert_eq!(seen, expected);
    assert!(
        server
            .get_with("/admin/audit?since=yesterday", &[OPS])
            .error(400)
            .contains("RFC 3339")
    );
    assert!(
        server
            .get_with("/admin/audit?colour=red", &[OPS])
            .error(400)
            .contains("filters")
    );

    // A new process on the same database still has all of it.
    drop(server);
    let again = setup.start(&endpoints(3));
    let after = audit(&again, "?limit=1000");
    let ids: Vec<i64> = after["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert!(expected.iter().all(|id| ids.contains(id)), "{after}");
    assert!(
        ids.len() > expected.len(),
        "the restart's own loads are recorded too"
    );
}

#[test]
fn drift_stays_low_for_iris_and_flags_shifted_inputs() {
    let setup = Setup::plugins(&[]);
    let server = setup.start(&format!(
        "{TOKENS}\n[monitoring]\ndrift_interval_ms = 100\n"
    ));
    let (rows, _) = crate::harness::iris_data();
    // Twice over: a feature is judged from 200 inputs on.
    for chunk in rows.chunks(10).chain(rows.chunks(10)) {
        server
            .post_json("/v2/models/iris/infer", &iris_request(chunk))
            .ok();
    }
    let drift = server.get_with("/admin/drift/iris", &[OPS]).ok();
    let version2 = drift["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 2)
        .unwrap()
        .clone();
    for feature in version2["features"].as_array().unwrap() {
        eprintln!(
            "iris as sent: {} KS {:.3} PSI {:.3}",
            feature["feature"],
            feature["ks"].as_f64().unwrap(),
            feature["psi"].as_f64().unwrap()
        );
        assert_eq!(feature["samples"], 300);
        assert_eq!(feature["drifted"], false, "{feature}");
        assert!(feature["ks"].as_f64().unwrap() < 0.2);
    }
    // Nothing was sent to version 1: too few inputs to judge.
    let version1 = &drift["versions"].as_array().unwrap()[0];
    assert_eq!(version1["features"][0]["ks"], Value::Null);

    // Flowers with petals 2 cm longer than any in the training data.
    let shifted: Vec<[f32; 4]> = rows
        .iter()
        .map(|r| [r[0], r[1], r[2] + 2.0, r[3]])
        .collect();
    for _ in 0..4 {
        for chunk in shifted.chunks(50) {
            server
                .post_json("/v2/models/iris/infer", &iris_request(chunk))
                .ok();
        }
    }
    let drift = server.get_with("/admin/drift/iris", &[OPS]).ok();
    let features = drift["versions"][1]["features"].as_array().unwrap().clone();
    for feature in &features {
        eprintln!(
            "shifted petal length: {} KS {:.3} PSI {:.3}",
            feature["feature"],
            feature["ks"].as_f64().unwrap(),
            feature["psi"].as_f64().unwrap()
        );
    }
    let petal = features
        .iter()
        .find(|f| f["feature"] == "petal_length")
        .unwrap();
    assert_eq!(petal["drifted"], true, "{petal}");
    assert!(petal["ks"].as_f64().unwrap() > 0.2);
    let sepal = features
        .iter()
        .find(|f| f["feature"] == "sepal_width")
        .unwrap();
    assert_eq!(sepal["drifted"], false, "{sepal}");

    // The flip is audited once, logged, and in the metrics.
    server.wait_until("the drift is audited", || {
        !audit(&server, "?kind=drift.detected")["changes"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    let detected = audit(&server, "?kind=drift.detected");
    assert_eq!(
        detected["changes"].as_array().unwrap().len(),
        1,
        "{detected}"
    );
    assert_eq!(detected["changes"][0]["to"], "petal_length: drifted");
    assert_eq!(detected["changes"][0]["actor"], "host");
    assert!(server.logs().contains("input drift detected"));
    let samples = samples(&server);
    let labels = json!({"model": "iris", "version": "2", "feature": "petal_length"});
    assert_eq!(value(&samples, "modelyard_drift_drifted", &labels), 1.0);
    assert!(value(&samples, "modelyard_drift_ks", &labels) > 0.2);
    let status = server.get_with("/admin/status", &[OPS]).ok();
    assert_eq!(status["models"][0]["drifted"][0]["feature"], "petal_length");
    assert!(
        server
            .get_with("/admin/drift/nope", &[OPS])
            .error(404)
            .contains("unknown model")
    );

    // A new reference is read when it changes; one about an input the model lacks is
    // refused with the reason, and the version serves on without drift detection.
    let reference = setup.models.path().join("iris/1/reference.json");
    let text = std::fs::read_to_string(&reference)
        .unwrap()
        .replace("\"input\": \"input\"", "\"input\": \"pixels\"");
    let temp = setup.models.path().join("iris/1/.reference.json.tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, &reference).unwrap();
    server.wait_until("the reference is refused", || {
        let status = server.get_with("/admin/status", &[OPS]).ok();
        status["recent_errors"]
            .to_string()
            .contains("input 'pixels'")
    });
    let version1 = &server.get_with("/admin/drift/iris", &[OPS]).ok()["versions"][0];
    assert_eq!(version1["reference"], Value::Null, "{version1}");
    assert_eq!(
        server.get("/v2/models/iris/versions/1/ready").ok()["ready"],
        true
    );
}

#[test]
fn readiness_and_status_follow_what_can_serve() {
    let setup = Setup::plugins(&["weighted"]);
    std::fs::write(setup.plugins.path().join("bad.wasm"), b"not wasm").unwrap();
    let iris = setup.models.path().join("iris");
    let parked = tempfile::tempdir().unwrap();
    std::fs::rename(&iris, parked.path().join("iris")).unwrap();
    crate::harness::broken_model(setup.models.path());
    let server = setup.start(&format!(
        "{TOKENS}\n[endpoints.ab]\nvariants = {{ a = \"iris@1\" }}\nrouter = {{ plugin = \"missing\" }}\n"
    ));
    // Live, done loading, and not ready: no model can answer.
    assert_eq!(server.get("/v2/health/live").status, 200);
    assert!(
        server
            .get("/v2/health/ready")
            .error(503)
            .contains("no model can serve")
    );
    assert!(
        server
            .get("/v2/models/broken/ready")
            .error(503)
            .contains("refused")
    );
    let status = server.get_with("/admin/status", &[OPS]).ok();
    assert_eq!(status["ready"], false);
    assert_eq!(status["models"][0]["name"], "broken");
    assert_eq!(status["models"][0]["serving"], false);
    assert!(
        status["models"][0]["versions"][0]["refused"]
            .as_str()
            .unwrap()
            .contains("refused")
    );
    let bad = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bad")
        .unwrap();
    assert_eq!(bad["serving"], false);
    assert_eq!(status["endpoints"][0]["serving"], false);
    assert!(
        status["endpoints"][0]["error"]
            .as_str()
            .unwrap()
            .contains("missing")
    );
    let errors: Vec<String> = status["recent_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        errors.iter().any(|e| e.starts_with("broken:")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.starts_with("bad:")), "{errors:?}");

    // A model arrives: ready; it leaves again: not ready.
    std::fs::rename(parked.path().join("iris"), &iris).unwrap();
    server.wait_until("ready", || server.get("/v2/health/ready").status == 200);
    assert_eq!(server.get("/v2/models/iris/ready").ok()["ready"], true);
    assert_eq!(server.get_with("/admin/status", &[OPS]).ok()["ready"], true);
    std::fs::rename(&iris, parked.path().join("iris")).unwrap();
    server.wait_until("not ready", || server.get("/v2/health/ready").status == 503);
}

#[test]
fn model_cards_come_as_json_and_as_escaped_html() {
    let setup = Setup::plugins(&[]);
    let toml = setup.models.path().join("iris/model.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        "limitations = \"",
        "limitations = \"<script>alert(1)</script> ",
    );
    std::fs::write(&toml, text).unwrap();
    let server = setup.start(TOKENS);
    let card = server.get_with("/admin/models/iris/card", &[OPS]).ok();
    assert_eq!(card["name"], "iris");
    assert_eq!(card["owner"], "Modelyard maintainers");
    assert!(
        card["intended_use"]
            .as_str()
            .unwrap()
            .contains("Sample model")
    );
    assert!(
        card["training_data"]
            .as_str()
            .unwrap()
            .contains("150 samples")
    );
    assert_eq!(card["evaluation"]["2"]["accuracy"], 0.9733);
    assert_eq!(card["versions"].as_array().unwrap().len(), 2);
    let history: Vec<(&str, &str)> = card["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c["to"].as_str().unwrap()))
        .collect();
    assert!(
        history.contains(&("model.loaded", "version 1")),
        "{history:?}"
    );
    assert!(
        history.contains(&("model.loaded", "version 2")),
        "{history:?}"
    );

    let html = server.get_with(
        "/admin/models/iris/card",
        &[OPS, ("accept", "text/html,application/xhtml+xml")],
    );
    assert_eq!(html.status, 200);
    assert!(
        html.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = String::from_utf8(html.body).unwrap();
    assert!(page.contains("<h1>Model card: iris</h1>"), "{page}");
    assert!(page.contains("Modelyard maintainers"));
    assert!(page.contains("0.9733"));
    assert!(page.contains("&lt;script&gt;"), "escaped: {page}");
    assert!(!page.contains("<script>"));
    let by_query = server.get_with("/admin/models/iris/card?format=html", &[OPS]);
    assert!(
        String::from_utf8(by_query.body)
            .unwrap()
            .starts_with("<!DOCTYPE html>")
    );
    assert!(
        server
            .get_with("/admin/models/nope/card", &[OPS])
            .error(404)
            .contains("unknown model")
    );
}

#[test]
fn accuracy_and_reward_are_reported_per_variant_segment_and_time() {
    let setup = Setup::plugins(&["weighted"]);
    let server = setup.start(
        r#"
[server]
seed = 7
performance_bucket_seconds = 1
[endpoints.ab]
variants = { a = "iris@1", b = "iris@2" }
router = { plugin = "weighted", config = { weights = { a = 1, b = 1 } } }
attribute_headers = ["x-region"]
segment_by = "x-region"
"#,
    );
    let (rows, labels) = crate::harness::iris_data();
    // (variant, region) → (rows, right); setosas come from "eu", the rest from "us".
    let mut expected: std::collections::BTreeMap<(String, String), (u64, u64)> = Default::default();
    for (row, label) in rows.iter().zip(&labels) {
        let region = if *label == 0 { "eu" } else { "us" };
        let reply = server.post(
            "/v2/models/ab/infer",
            &[("content-type", "application/json"), ("x-region", region)],
            iris_request(&[*row]).to_string().as_bytes(),
        );
        let answer = reply.json();
        let variant = answer["parameters"]["variant"]
            .as_str()
            .unwrap()
            .to_string();
        let right = crate::harness::predicted_classes(&answer["outputs"][0])[0] == *label;
        let entry = expected.entry((variant, region.to_string())).or_default();
        entry.0 += 1;
        entry.1 += u64::from(right);
        let reward = if region == "eu" { 1.0 } else { 0.5 };
        let scored = server
            .post_json(
                "/v2/models/ab/feedback",
                &json!({"id": answer["id"], "label": label, "reward": reward}),
            )
            .ok();
        assert_eq!(scored["correct"], u64::from(right));
    }
    let report = server.get("/admin/experiments/ab").ok();
    assert_eq!(report["segment_by"], "x-region");
    for variant in ["a", "b"] {
        let p = &report["performance"][variant];
        let (mut all_rows, mut all_right) = (0, 0);
        for region in ["eu", "us"] {
            let (rows, right) = expected[&(variant.to_string(), region.to_string())];
            all_rows += rows;
            all_right += right;
            let segment = &p["segments"][region]["accuracy"];
            assert_eq!(segment["count"], rows, "{variant} {region}: {p}");
            let mean = segment["mean"].as_f64().unwrap();
            assert!((mean - right as f64 / rows as f64).abs() < 1e-9, "{p}");
        }
        assert_eq!(p["accuracy"]["count"], all_rows);
        let gap = &p["reward_gap"];
        assert_eq!(
            (gap["best"].as_str(), gap["worst"].as_str()),
            (Some("eu"), Some("us"))
        );
        assert!((gap["gap"].as_f64().unwrap() - 0.5).abs() < 1e-9, "{gap}");
        let accuracy_gap = &p["accuracy_gap"];
        eprintln!(
            "variant {variant}: accuracy {:.4} over {all_rows} rows; best segment {} {:.4}, worst {} {:.4}, gap {:.4}",
            all_right as f64 / all_rows as f64,
            accuracy_gap["best"],
            accuracy_gap["best_mean"].as_f64().unwrap(),
            accuracy_gap["worst"],
            accuracy_gap["worst_mean"].as_f64().unwrap(),
            accuracy_gap["gap"].as_f64().unwrap()
        );
        let buckets = p["over_time"].as_array().unwrap();
        let bucketed: u64 = buckets
            .iter()
            .map(|b| b["accuracy"]["count"].as_u64().unwrap())
            .sum();
        assert_eq!(bucketed, all_rows);
    }
    // The logistic regression misses versicolors and virginicas, never a setosa.
    assert_eq!(report["performance"]["a"]["accuracy_gap"]["best"], "eu");

    // Feedback the server cannot judge is refused and can be sent again.
    let reply = server
        .post_json("/v2/models/ab/infer", &iris_request(&[rows[0], rows[1]]))
        .json();
    let id = &reply["id"];
    let error = server
        .post_json("/v2/models/ab/feedback", &json!({"id": id, "label": 0}))
        .error(400);
    assert!(error.contains("one label per row"), "{error}");
    let error = server
        .post_json("/v2/models/ab/feedback", &json!({"id": id}))
        .error(400);
    assert!(error.contains("a \"reward\", a \"label\""), "{error}");
    server
        .post_json(
            "/v2/models/ab/feedback",
            &json!({"id": id, "label": [0, 0]}),
        )
        .ok();
}
