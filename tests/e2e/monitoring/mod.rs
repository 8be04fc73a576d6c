//! Monitoring, by feature: the Prometheus metrics (read back with the reference parser,
//! `prometheus_client`, which `tests/run` installs beside tritonclient), the request log,
//! the audit trail, drift, the operator views and accuracy and reward; with what they share.

mod audit;
mod dashboard;
mod drift;
mod metrics;
mod operator_views;
mod performance;
mod request_log;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::{Server, root};

/// Every sample `/metrics` serves, parsed by `prometheus_client`'s OpenMetrics parser.
pub(super) fn samples(server: &Server) -> Vec<Value> {
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
pub(super) fn value(samples: &[Value], name: &str, labels: &Value) -> f64 {
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
pub(super) const FLAGGED: &str = r#"
[endpoints.flagged]
variants = { stable = "iris@2", candidate = "iris@1" }
default_variant = "stable"
flags = [{ plugin = "flagd", config = { flags = { new-model = { state = "ENABLED", variants = { on = true, off = false }, defaultVariant = "on" } } } }]
flag_routing = { flag = "new-model", variants = { on = "candidate", off = "stable" } }
"#;

/// The log lines whose message is `message`.
pub(super) fn log_lines(server: &Server, message: &str) -> Vec<Value> {
    server
        .log_events()
        .into_iter()
        .filter(|e| e["fields"]["message"] == message)
        .collect()
}

pub(super) const TOKENS: &str = r#"
[server.tokens.ops]
token = "ops-secret"
role = "admin"
"#;

pub(super) const OPS: (&str, &str) = ("authorization", "Bearer ops-secret");

pub(super) fn audit(server: &Server, query: &str) -> Value {
    server
        .get_with(&format!("/admin/audit{query}"), &[OPS])
        .ok()
}

pub(super) fn kinds(page: &Value) -> Vec<String> {
    page["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap().to_string())
        .collect()
}
