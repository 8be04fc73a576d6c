//! Accuracy and reward per variant, segment and time bucket, from clients' feedback.

use serde_json::json;

use crate::harness::iris_request;
use crate::plugins::Setup;

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
