//! The ONNX backend node tests, served: every case the onnx package generates, asked of both
//! backends by `tests/compat/onnx_node_tests.py check`. Proves that no backend answers a case
//! wrongly (what a backend gets wrong, ONNX Runtime included, must be refused), and that the
//! onnxruntime backend answers right at least 95% of the cases ONNX Runtime itself passes whose
//! tensors the protocol can carry. The preparation stays in target/onnx-node-tests between
//! runs; `cargo test -- --nocapture` shows the table.

use std::process::Command;

use serde_json::Value;

use crate::harness::{BIN, root, test_python};

const MIN_SHARE: f64 = 0.95;

#[test]
fn onnx_node_tests_are_answered_right_or_refused() {
    let out = root().join("target/onnx-node-tests");
    let summary_path = out.join("summary.json");
    // Never judge an earlier run's summary.
    let _ = std::fs::remove_file(&summary_path);
    let output = Command::new(test_python())
        .arg(root().join("tests/compat/onnx_node_tests.py"))
        .arg("check")
        .arg(&out)
        .arg(BIN)
        .args(["--min-share", &MIN_SHARE.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the ONNX node test check failed\nstdout (tail):\n{}\nstderr:\n{}",
        tail(&stdout, 8000),
        String::from_utf8_lossy(&output.stderr)
    );

    // The gate again, from the numbers: the test fails if the script's gate were wrong.
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    for backend in ["tract", "onnxruntime"] {
        let report = &summary["backends"][backend];
        let wrong: Vec<&Value> = report["wrong_cases"]
            .as_array()
            .map(|cases| cases.iter().map(|case| &case["case"]).collect())
            .unwrap_or_default();
        assert_eq!(report["wrong"], 0, "{backend} answers WRONG: {wrong:?}");
    }
    let ort = &summary["backends"]["onnxruntime"];
    let right = ort["pass_of_ort_passing_carriable"]["count"]
        .as_f64()
        .unwrap();
    let of = ort["ort_passing_carriable"].as_f64().unwrap();
    assert!(
        of > 0.0 && right / of >= MIN_SHARE,
        "onnxruntime answers {right}/{of} of the carriable cases ONNX Runtime passes right, under {MIN_SHARE}"
    );
}

/// The last `chars` characters of `text`.
fn tail(text: &str, chars: usize) -> &str {
    let start = text
        .char_indices()
        .rev()
        .take(chars)
        .last()
        .map_or(text.len(), |(i, _)| i);
    &text[start..]
}
