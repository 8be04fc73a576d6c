//! The fallback variant answers when the routed one fails or is too slow.

use super::*;
use crate::harness::iris_request;

#[test]
fn fallback_answers_when_the_routed_variant_fails_or_is_too_slow() {
    let setup = Setup::new(&[("slow.wasm", component("fixture-processor", Some("a")))]);
    let broken = setup.models.path().join("broken/1");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model.onnx"), b"not a model").unwrap();
    let server = setup.start(
        r#"
[endpoints.on-error]
variants = { primary = "broken", simple = "iris@1" }
default_variant = "primary"
fallback_variant = "simple"
[endpoints.on-timeout]
variants = { primary = "iris@2", simple = "iris@1" }
default_variant = "primary"
fallback_variant = "simple"
latency_budget_ms = 1
[[endpoints.on-timeout.processors]]
plugin = "slow"
config = { mode = "slow" }
[endpoints.no-fallback]
variants = { primary = "broken" }
[endpoints.budget-alone]
variants = { primary = "iris@2" }
latency_budget_ms = 5
"#,
    );
    let request = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
    for endpoint in ["on-error", "on-timeout"] {
        let body = server
            .post_json(&format!("/v2/models/{endpoint}/infer"), &request)
            .json();
        assert_eq!(
            body["parameters"]["variant"], "simple",
            "{endpoint}: {body}"
        );
        assert_eq!(body["parameters"]["fallback"], true, "{endpoint}");
        assert_eq!(body["model_version"], "1");
    }
    server.wait_until("the budget miss is logged", || {
        server.logs().contains("no answer within the 1 ms budget")
    });
    let error = server
        .post_json("/v2/models/no-fallback/infer", &request)
        .error(503);
    assert!(error.contains("broken"), "{error}");
    let error = server
        .post_json("/v2/models/budget-alone/infer", &request)
        .error(503);
    assert!(
        error.contains("latency_budget_ms needs a fallback_variant"),
        "{error}"
    );
}
