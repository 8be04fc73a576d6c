//! The standard plugins: sticky weighted routing, tensors shaped by name in and out.

use std::collections::BTreeSet;

use serde_json::json;

use super::*;
use crate::harness::iris_request;

#[test]
fn standard_plugins_route_sticky_and_shape_tensors() {
    let setup = Setup::standard();
    let server = setup.start(IRIS_AB);

    let mut seen = BTreeSet::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let reply = server.post(
            "/v2/models/iris-ab/infer",
            &[("x-user-id", &user)],
            flowers().to_string().as_bytes(),
        );
        let body = reply.ok();
        let variant = reply.headers["x-modelyard-variant"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(body["parameters"]["variant"], variant.as_str());
        assert_eq!(body["model_name"], "iris-ab");
        assert_eq!(
            body["model_version"],
            if variant == "stable" { "2" } else { "1" }
        );
        let label = body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "label")
            .unwrap();
        assert_eq!(label["data"], json!(["setosa", "virginica"]));
        for _ in 0..3 {
            let again = server.post(
                "/v2/models/iris-ab/infer",
                &[("x-user-id", &user)],
                flowers().to_string().as_bytes(),
            );
            assert_eq!(
                again.headers["x-modelyard-variant"],
                variant.as_str(),
                "{user} moved"
            );
        }
        seen.insert(variant);
    }
    assert_eq!(
        seen,
        ["candidate", "stable"].map(String::from).into(),
        "equal weights should use both"
    );

    // The processor refuses a flower out of range, with its reason: a 500 by default.
    let bad = json!({"inputs": [{"name": "features", "datatype": "BYTES", "shape": [1], "data": [r#"{"sepal_length": 51, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}"#]}]});
    let error = server
        .post_json("/v2/models/iris-ab/infer", &bad)
        .error(500);
    assert!(
        error.contains("iris-features") && error.contains("sepal_length = 51 is outside"),
        "{error}"
    );
    // The bare model stays callable under its own name.
    assert_eq!(
        server
            .post_json(
                "/v2/models/iris/infer",
                &iris_request(&[[5.1, 3.5, 1.4, 0.2]])
            )
            .status,
        200
    );

    let plugins = server.get("/admin/plugins").json();
    let worlds: Vec<(String, String)> = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().into(),
                p["world"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        worlds,
        vec![
            ("iris-features".into(), "processor".into()),
            ("weighted".into(), "router".into())
        ]
    );
    assert!(
        plugins["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "serving" && p["hash"].as_str().unwrap().len() == 64)
    );
    let endpoints = server.get("/admin/endpoints").json();
    let iris_ab = &endpoints["endpoints"][0];
    assert_eq!(iris_ab["router"]["plugin"], "weighted");
    let requests: u64 = iris_ab["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 121);
}
