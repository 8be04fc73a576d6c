//! The Open Inference Protocol: every endpoint, both encodings, every error class.

use serde_json::{Value, json};

use crate::harness::{Server, iris_data, iris_request, on_backend, predicted_classes, repository};

#[test]
fn server_endpoints_answer() {
    let models = repository(&[]);
    let server = Server::start(models.path(), "");
    let meta = server.get("/v2").json();
    assert_eq!(meta["name"], "modelyard");
    assert!(
        meta["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );
    assert_eq!(server.get("/v2/health/live").status, 200);
    assert_eq!(server.get("/v2/health/ready").json()["ready"], true);
    assert!(server.get("/v3/whatever").error(404).contains("/v2"));
    assert_eq!(server.post("/v2/health/live", &[], b"").status, 405);
}

#[test]
fn model_and_version_metadata_and_readiness() {
    let models = repository(&[]);
    let server = Server::start(models.path(), "");

    let meta = server.get("/v2/models/iris").json();
    assert_eq!(meta["name"], "iris");
    assert_eq!(meta["platform"], "onnx");
    assert_eq!(meta["versions"], json!(["1", "2"]));
    assert_eq!(
        meta["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 4]}])
    );
    assert_eq!(
        meta["outputs"],
        json!([{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}])
    );
    let card = &meta["card"];
    for field in [
        "description",
        "intended_use",
        "limitations",
        "owner",
        "training_data",
    ] {
        assert!(
            card[field].as_str().is_some_and(|s| !s.is_empty()),
            "card lacks {field}: {card}"
        );
    }
    assert!(card["metrics"]["2"]["accuracy"].as_f64().unwrap() > 0.9);

    assert_eq!(
        server.get("/v2/models/iris/versions/1").json()["versions"],
        json!(["1"])
    );
    assert_eq!(server.get("/v2/models/iris/ready").json()["ready"], true);
    assert_eq!(server.get("/v2/models/iris/versions/1/ready").status, 200);

    for path in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/iris/versions/7",
        "/v2/models/iris/versions/7/ready",
        "/v2/models/iris/versions/one",
    ] {
        let error = server.get(path).error(404);
        assert!(
            error.contains("nope") || error.contains("version"),
            "{path}: {error}"
        );
    }
    let error = server
        .post_json("/v2/models/nope/infer", &iris_request(&[[1.0; 4]]))
        .error(404);
    assert!(
        error.contains("unknown model 'nope'") && error.contains("iris"),
        "{error}"
    );
    let error = server
        .post_json(
            "/v2/models/iris/versions/9/infer",
            &iris_request(&[[1.0; 4]]),
        )
        .error(404);
    assert!(
        error.contains("no version '9'") && error.contains("1, 2"),
        "{error}"
    );
}

fn accuracy(server: &Server, path: &str) -> (f64, String) {
    let (rows, labels) = iris_data();
    let reply = server.post_json(path, &iris_request(&rows));
    let body = reply.ok();
    assert_eq!(body["outputs"][0]["shape"], json!([150, 3]));
    let predicted = predicted_classes(&body["outputs"][0]);
    let correct = predicted
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count();
    (
        correct as f64 / labels.len() as f64,
        body["model_version"].as_str().unwrap().to_string(),
    )
}

#[test]
fn served_predictions_match_the_labels_per_version() {
    let models = repository(&[]);
    let server = Server::start(models.path(), "");
    let card = server.get("/v2/models/iris").json()["card"]["metrics"].clone();

    let (v1, version) = accuracy(&server, "/v2/models/iris/versions/1/infer");
    assert_eq!(version, "1");
    let (v2, version) = accuracy(&server, "/v2/models/iris/versions/2/infer");
    assert_eq!(version, "2");
    let (default, version) = accuracy(&server, "/v2/models/iris/infer");
    assert_eq!(
        (default, version.as_str()),
        (v2, "2"),
        "the highest version is the default"
    );

    assert!(v1 >= 0.85, "linear model accuracy {v1}");
    assert!(v2 >= 0.95, "MLP accuracy {v2}");
    assert!(v2 > v1, "version 2 should beat version 1: {v2} vs {v1}");
    // The served models score what the training script measured and wrote in the card.
    for (version, served) in [("1", v1), ("2", v2)] {
        let trained = card[version]["accuracy"].as_f64().unwrap();
        assert!(
            (served - trained).abs() < 0.01,
            "v{version}: served {served}, trained {trained}"
        );
    }
}

#[test]
fn json_requests_echo_ids_accept_nesting_and_select_outputs() {
    let models = repository(&["typed"]);
    let server = Server::start(models.path(), "");

    let flat = json!({"id": "req-42", "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3]}]});
    let flat = server.post_json("/v2/models/iris/infer", &flat).json();
    assert_eq!(flat["id"], "req-42");
    assert_eq!(flat["model_name"], "iris");
    assert_eq!(flat["model_version"], "2");
    assert_eq!(predicted_classes(&flat["outputs"][0]), vec![0, 2]);
    let reply = server.post_json(
        "/v2/models/iris/infer",
        &iris_request(&[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]),
    );
    let nested = reply.json();
    assert_eq!(nested["outputs"], flat["outputs"]);
    // Without an id of its own, a request gets one of the server's, in body and header.
    assert_eq!(
        nested["id"],
        reply.headers["x-request-id"].to_str().unwrap()
    );

    // Every datatype the model takes, each through the model (plus one) and back.
    let inputs = json!([
        {"name": "fp16", "datatype": "FP16", "shape": [2], "data": [1.5, -3]},
        {"name": "fp32", "datatype": "FP32", "shape": [2], "data": [[0.25], [2]]},
        {"name": "fp64", "datatype": "FP64", "shape": [2], "data": [1e-3, 1e100]},
        {"name": "uint8", "datatype": "UINT8", "shape": [2], "data": [0, 254]},
        {"name": "int32", "datatype": "INT32", "shape": [2], "data": [-5, 2147483646]},
        {"name": "int64", "datatype": "INT64", "shape": [2], "data": [-1, 9007199254740000i64]},
    ]);
    let body = server
        .post_json("/v2/models/typed/infer", &json!({"inputs": inputs}))
        .json();
    let outputs: Vec<(String, Value)> = body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                format!(
                    "{}:{}",
                    o["name"].as_str().unwrap(),
                    o["datatype"].as_str().unwrap()
                ),
                o["data"].clone(),
            )
        })
        .collect();
    assert_eq!(
        outputs,
        vec![
            ("fp16_plus_one:FP16".into(), json!([2.5, -2.0])),
            ("fp32_plus_one:FP32".into(), json!([1.25, 3.0])),
            ("fp64_plus_one:FP64".into(), json!([1.001, 1e100])),
            ("uint8_plus_one:UINT8".into(), json!([1, 255])),
            ("int32_plus_one:INT32".into(), json!([-4, 2147483647])),
            (
                "int64_plus_one:INT64".into(),
                json!([0, 9007199254740001i64])
            ),
        ]
    );

    let subset = json!({"inputs": inputs, "outputs": [{"name": "int64_plus_one"}, {"name": "uint8_plus_one"}]});
    let body = server.post_json("/v2/models/typed/infer", &subset).json();
    let names: Vec<&str> = body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["int64_plus_one", "uint8_plus_one"]);
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn binary_tensor_extension_both_ways() {
    let models = repository(&[]);
    let server = Server::start(models.path(), "");
    let rows: [[f32; 4]; 2] = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]];
    let expected = server
        .post_json("/v2/models/iris/infer", &iris_request(&rows))
        .json()["outputs"][0]["data"]
        .clone();
    let expected: Vec<f32> = expected
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();

    let header = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(rows.iter().flatten().flat_map(|v| v.to_le_bytes()));
    let length = header.len().to_string();
    let reply = server.post(
        "/v2/models/iris/infer",
        &[("inference-header-content-length", &length)],
        &body,
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.headers["content-type"], "application/octet-stream");
    let json_length: usize = reply.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let meta: Value = serde_json::from_slice(&reply.body[..json_length]).unwrap();
    assert_eq!(meta["outputs"][0]["parameters"]["binary_data_size"], 24);
    assert!(meta["outputs"][0].get("data").is_none());
    assert_eq!(f32s(&reply.body[json_length..]), expected);

    // Binary in, JSON out; and JSON in, binary out via the request-wide parameter.
    let header_only = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": 32}}]}).to_string();
    let mut body = header_only.clone().into_bytes();
    body.extend(rows.iter().flatten().flat_map(|v| v.to_le_bytes()));
    let reply = server.post(
        "/v2/models/iris/infer",
        &[(
            "inference-header-content-length",
            &header_only.len().to_string(),
        )],
        &body,
    );
    assert_eq!(reply.headers["content-type"], "application/json");
    assert!(reply.json()["outputs"][0]["data"].is_array());

    let mut request = iris_request(&rows);
    request["parameters"] = json!({"binary_data_output": true});
    let reply = server.post_json("/v2/models/iris/infer", &request);
    let json_length: usize = reply.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(f32s(&reply.body[json_length..]), expected);
}

#[test]
fn client_mistakes_are_400_and_say_where() {
    let models = repository(&[]);
    let server = Server::start(models.path(), "");
    let infer = "/v2/models/iris/infer";
    let input = |name: &str, datatype: &str, shape: Value, data: Value| json!({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]});
    let cases: Vec<(Vec<u8>, &[&str])> = vec![
        (b"{\"inputs\": [".to_vec(), &["malformed inference request JSON"]),
        (b"not json".to_vec(), &["malformed inference request JSON"]),
        (input("pixels", "FP32", json!([1, 4]), json!([1, 2, 3, 4])).to_string().into_bytes(), &["unknown input 'pixels'", "input"]),
        (input("input", "FP64", json!([1, 4]), json!([1, 2, 3, 4])).to_string().into_bytes(), &["input 'input'", "FP64", "expects FP32"]),
        (input("input", "FP32", json!([1, 5]), json!([1, 2, 3, 4, 5])).to_string().into_bytes(), &["input 'input'", "[1, 5]", "[-1, 4]"]),
        (input("input", "FP32", json!([2, 4]), json!([1, 2, 3, 4])).to_string().into_bytes(), &["input 'input'", "4 elements", "needs 8"]),
        (input("input", "FP32", json!([1, 4]), json!([1, 2, "x", 4])).to_string().into_bytes(), &["input 'input'", "element 2", "\"x\""]),
        (input("input", "FP33", json!([1, 4]), json!([1, 2, 3, 4])).to_string().into_bytes(), &["unknown datatype 'FP33'"]),
        (json!({"inputs": []}).to_string().into_bytes(), &["input 'input' is missing"]),
        (
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}], "outputs": [{"name": "logits"}]}).to_string().into_bytes(),
            &["unknown output 'logits'", "probabilities"],
        ),
        (
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}], "outputs": [{"name": "probabilities"}, {"name": "probabilities"}]}).to_string().into_bytes(),
            &["output 'probabilities' is requested more than once"],
        ),
        (
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}, {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).to_string().into_bytes(),
            &["input 'input' is given more than once"],
        ),
    ];
    for (body, needles) in cases {
        let error = server.post(infer, &[], &body).error(400);
        for needle in needles {
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
        }
    }
    // Binary extension mistakes.
    let header = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]}).to_string();
    let mut body = header.clone().into_bytes();
    body.extend([0u8; 12]);
    let error = server
        .post(
            infer,
            &[("inference-header-content-length", &header.len().to_string())],
            &body,
        )
        .error(400);
    assert!(
        error.contains("binary_data_size is 16") && error.contains("12 bytes"),
        "{error}"
    );
    let error = server
        .post(
            infer,
            &[("inference-header-content-length", "100000")],
            header.as_bytes(),
        )
        .error(400);
    assert!(
        error.contains("Inference-Header-Content-Length is 100000"),
        "{error}"
    );
    let error = server.post(infer, &[], header.as_bytes()).error(400);
    assert!(
        error.contains("no Inference-Header-Content-Length"),
        "{error}"
    );
}

#[test]
fn bodies_over_the_limit_are_413() {
    let models = repository(&[]);
    let server = Server::start(models.path(), "[server]\nmax_body_bytes = 1024\n");
    let small = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
    assert_eq!(
        server.post_json("/v2/models/iris/infer", &small).status,
        200
    );
    let big = iris_request(&vec![[5.1, 3.5, 1.4, 0.2]; 100]);
    let error = server.post_json("/v2/models/iris/infer", &big).error(413);
    assert!(error.contains("1024 bytes"), "{error}");

    // A chunked body has no Content-Length to refuse up front; it is cut off as it streams.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    let chunk = "x".repeat(600);
    let request = format!(
        "POST /v2/models/iris/infer HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{len:x}\r\n{chunk}\r\n{len:x}\r\n{chunk}\r\n0\r\n\r\n",
        len = chunk.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("\"error\""), "{reply}");
}

#[test]
fn backend_failures_are_500_naming_the_model_and_the_server_survives() {
    let models = repository(&["typed"]);
    // tract holds every input to the one length `n` the file names; ONNX Runtime does not.
    on_backend(models.path(), "typed", "tract");
    let server = Server::start(models.path(), "");

    // Each input is [-1], so validation passes, but the model ties all lengths to one `n`.
    let mut inputs = Vec::new();
    for (name, dt) in [
        ("fp16", "FP16"),
        ("fp32", "FP32"),
        ("fp64", "FP64"),
        ("uint8", "UINT8"),
        ("int32", "INT32"),
        ("int64", "INT64"),
    ] {
        let n = if name == "fp16" { 2 } else { 1 };
        inputs.push(json!({"name": name, "datatype": dt, "shape": [n], "data": vec![1; n]}));
    }
    let error = server
        .post_json("/v2/models/typed/infer", &json!({"inputs": inputs}))
        .error(500);
    assert!(
        error.contains("model 'typed' version 1 failed to run"),
        "{error}"
    );
    assert_eq!(
        server
            .post_json("/v2/models/iris/infer", &iris_request(&[[1.0; 4]]))
            .status,
        200
    );
}

#[test]
fn bodies_that_lie_about_their_tensors_are_400_and_the_server_serves_on() {
    // What the decoder's fuzzing found, over the wire: bytes a backend would read as
    // invalid bools, a dimension a backend would read as negative, and shapes of 2^40
    // elements over a few bytes, which must cost nothing.
    let models = repository(&[]);
    let server = Server::start(models.path(), "");
    let infer = "/v2/models/iris/infer";
    let binary = |datatype: &str, shape: Value, bytes: &[u8]| {
        let header = json!({"inputs": [{"name": "input", "datatype": datatype, "shape": shape,
            "parameters": {"binary_data_size": bytes.len()}}]})
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend(bytes);
        (body, header.len())
    };
    let cases = [
        (
            binary("BOOL", json!([1, 4]), &[1, 0, 7, 1]),
            "BOOL element 2 is the byte 7",
        ),
        (
            binary("FP32", json!([1099511627776_u64]), &[0; 4]),
            "1099511627776 FP32 elements",
        ),
        (
            binary("BYTES", json!([1099511627776_u64]), &[0; 4]),
            "the shape needs 1099511627776",
        ),
        (
            binary("FP32", json!([0, 9223372036854775808_u64]), &[]),
            "above the protocol's limit",
        ),
    ];
    for ((body, json_length), says) in cases {
        let error = server
            .post(
                infer,
                &[("inference-header-content-length", &json_length.to_string())],
                &body,
            )
            .error(400);
        assert!(error.contains(says), "{says:?} not in {error:?}");
    }
    let huge = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1099511627776_u64, 4], "data": [1]}]});
    let error = server.post_json(infer, &huge).error(400);
    assert!(error.contains("needs 4398046511104"), "{error}");
    assert_eq!(
        server.post_json(infer, &iris_request(&[[1.0; 4]])).status,
        200
    );
}
