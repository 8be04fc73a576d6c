//! The request log: request ids through traces and log lines, sampled requests stored and
//! sent as CloudEvents, the sample rate.

use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::*;
use crate::harness::{iris_request, root};
use crate::plugins::Setup;

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
