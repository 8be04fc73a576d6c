//! Input drift against each model's reference.

use serde_json::{Value, json};

use super::*;
use crate::harness::iris_request;
use crate::plugins::Setup;

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
    // Judged by the timer, not by the read: wait for a judgement of all 300 inputs.
    let judged = |drift: &Value, version: usize, done: &dyn Fn(&Value) -> bool| {
        drift["versions"][version]["features"]
            .as_array()
            .is_some_and(|f| f.iter().all(done))
    };
    let mut drift = Value::Null;
    server.wait_until("a judgement of 300 inputs", || {
        drift = server.get_with("/admin/drift/iris", &[OPS]).ok();
        judged(&drift, 1, &|f| f["samples"] == 300 && f["ks"].is_f64())
    });
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

    send_shifted(&server, &rows);
    server.wait_until("a judgement of the shifted inputs", || {
        drift = server.get_with("/admin/drift/iris", &[OPS]).ok();
        judged(&drift, 1, &|f| {
            f["feature"] != "petal_length" || f["drifted"] == true
        })
    });
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
fn reading_drift_judges_nothing() {
    let setup = Setup::plugins(&[]);
    // The timer judges once at start, before any input, then not for an hour.
    let server = setup.start(&format!(
        "{TOKENS}\n[monitoring]\ndrift_interval_ms = 3600000\n"
    ));
    let (rows, _) = crate::harness::iris_data();
    send_shifted(&server, &rows);
    for _ in 0..3 {
        let drift = server.get_with("/admin/drift/iris", &[OPS]).ok();
        for feature in drift["versions"][1]["features"].as_array().unwrap() {
            assert_eq!(feature["ks"], Value::Null, "{feature}");
            assert_eq!(feature["drifted"], false, "{feature}");
        }
    }
    let detected = audit(&server, "?kind=drift");
    assert!(
        detected["changes"].as_array().unwrap().is_empty(),
        "{detected}"
    );
    assert!(!server.logs().contains("input drift detected"));
    let drift_series = samples(&server)
        .iter()
        .filter(|s| s["name"].as_str().unwrap().starts_with("modelyard_drift"))
        .count();
    assert_eq!(drift_series, 0);
}

/// Every flower four times over, with petals 2 cm longer than any in the training data.
fn send_shifted(server: &crate::harness::Server, rows: &[[f32; 4]]) {
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
}
