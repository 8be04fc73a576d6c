//! The serving engine: both backends, every datatype in both encodings, what each backend
//! cannot do refused with the reason, the ONNX Runtime library missing, CUDA without a GPU.

use serde_json::{Value, json};

use crate::harness::{Server, iris_request, on_backend, repository};

const BACKENDS: [&str; 2] = ["tract", "onnxruntime"];

/// One value per datatype of the `datatypes` fixture, two rows of two, with each type's
/// extremes: (input name, datatype, JSON data, little-endian bytes).
fn every_datatype() -> Vec<(&'static str, &'static str, Value, Vec<u8>)> {
    fn le<T: Copy, const N: usize>(values: &[T], bytes: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| bytes(v)).collect()
    }
    let strings = ["héllo", "", "a b", "ünïcode ✓"];
    let mut bytes = Vec::new();
    for s in strings {
        bytes.extend((s.len() as u32).to_le_bytes());
        bytes.extend(s.as_bytes());
    }
    vec![
        (
            "bool",
            "BOOL",
            json!([[true, false], [false, true]]),
            vec![1, 0, 0, 1],
        ),
        ("uint8", "UINT8", json!([0, 255, 1, 2]), vec![0, 255, 1, 2]),
        (
            "uint16",
            "UINT16",
            json!([0, 65535, 1, 2]),
            le(&[0u16, 65535, 1, 2], u16::to_le_bytes),
        ),
        (
            "uint32",
            "UINT32",
            json!([0, 4294967295u32, 1, 2]),
            le(&[0u32, u32::MAX, 1, 2], u32::to_le_bytes),
        ),
        (
            "uint64",
            "UINT64",
            json!([0, u64::MAX, 1, 2]),
            le(&[0u64, u64::MAX, 1, 2], u64::to_le_bytes),
        ),
        (
            "int8",
            "INT8",
            json!([-128, 127, 0, -1]),
            le(&[-128i8, 127, 0, -1], i8::to_le_bytes),
        ),
        (
            "int16",
            "INT16",
            json!([-32768, 32767, 0, -1]),
            le(&[i16::MIN, i16::MAX, 0, -1], i16::to_le_bytes),
        ),
        (
            "int32",
            "INT32",
            json!([i32::MIN, i32::MAX, 0, -1]),
            le(&[i32::MIN, i32::MAX, 0, -1], i32::to_le_bytes),
        ),
        (
            "int64",
            "INT64",
            json!([i64::MIN, i64::MAX, 0, -1]),
            le(&[i64::MIN, i64::MAX, 0, -1], i64::to_le_bytes),
        ),
        (
            "fp16",
            "FP16",
            json!([1.5, -2.0, 65504.0, 0.0]),
            le(&[0x3e00u16, 0xc000, 0x7bff, 0], u16::to_le_bytes),
        ),
        (
            "fp32",
            "FP32",
            json!([0.25, -1e30, 3.5, 0.0]),
            le(&[0.25f32, -1e30, 3.5, 0.0], f32::to_le_bytes),
        ),
        (
            "fp64",
            "FP64",
            json!([1e-300, -1e300, 0.1, 0.0]),
            le(&[1e-300f64, -1e300, 0.1, 0.0], f64::to_le_bytes),
        ),
        ("bytes", "BYTES", json!(strings), bytes),
    ]
}

/// A request in the binary extension: the JSON header, then each input's bytes; every
/// output asked for in binary.
fn binary_request(inputs: &[(&str, &str, Vec<u8>)], shape: &[usize]) -> (String, Vec<u8>) {
    let header = json!({
        "inputs": inputs.iter().map(|(name, datatype, data)| json!({
            "name": name, "datatype": datatype, "shape": shape,
            "parameters": {"binary_data_size": data.len()},
        })).collect::<Vec<_>>(),
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    for (_, _, data) in inputs {
        body.extend(data);
    }
    (header.len().to_string(), body)
}

/// A binary reply's outputs: name → (datatype, shape, bytes).
fn binary_outputs(reply: &crate::harness::Reply) -> Vec<(String, String, Value, Vec<u8>)> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let length: usize = reply.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let header: Value = serde_json::from_slice(&reply.body[..length]).unwrap();
    let mut at = length;
    header["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
            let data = reply.body[at..at + size].to_vec();
            at += size;
            (
                o["name"].as_str().unwrap().to_string(),
                o["datatype"].as_str().unwrap().to_string(),
                o["shape"].clone(),
                data,
            )
        })
        .collect()
}

#[test]
fn every_datatype_goes_through_both_backends_in_json_and_binary() {
    for backend in BACKENDS {
        let models = repository(&["datatypes"]);
        on_backend(models.path(), "datatypes", backend);
        let server = Server::start(models.path(), "");
        let meta = server.get("/v2/models/datatypes").json();
        assert_eq!(meta["engine"]["backend"], backend, "{meta}");
        let cases = every_datatype();

        let inputs: Vec<Value> = cases
            .iter()
            .map(|(name, dt, data, _)| json!({"name": name, "datatype": dt, "shape": [2, 2], "data": data}))
            .collect();
        let body = server
            .post_json("/v2/models/datatypes/infer", &json!({"inputs": inputs}))
            .ok();
        for (name, datatype, data, _) in &cases {
            let output = body["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["name"] == format!("{name}_out"))
                .unwrap_or_else(|| panic!("{backend}: no output for {name}: {body}"));
            assert_eq!(output["datatype"], *datatype, "{backend}: {output}");
            assert_eq!(output["shape"], json!([2, 2]), "{backend}: {output}");
            let flat: Vec<Value> = match data {
                Value::Array(rows) if rows.iter().all(Value::is_array) => rows
                    .iter()
                    .flat_map(|r| r.as_array().unwrap().clone())
                    .collect(),
                Value::Array(values) => values.clone(),
                _ => unreachable!(),
            };
            assert_eq!(output["data"], json!(flat), "{backend}: {name}");
        }

        let binary: Vec<(&str, &str, Vec<u8>)> = cases
            .iter()
            .map(|(name, dt, _, bytes)| (*name, *dt, bytes.clone()))
            .collect();
        let (length, request) = binary_request(&binary, &[2, 2]);
        let reply = server.post(
            "/v2/models/datatypes/infer",
            &[("inference-header-content-length", &length)],
            &request,
        );
        let outputs = binary_outputs(&reply);
        assert_eq!(outputs.len(), cases.len(), "{backend}");
        for (name, datatype, _, bytes) in &cases {
            let (_, got_type, shape, got) = outputs
                .iter()
                .find(|(n, ..)| *n == format!("{name}_out"))
                .unwrap();
            assert_eq!(got_type, datatype, "{backend}: {name}");
            assert_eq!(*shape, json!([2, 2]), "{backend}: {name}");
            assert_eq!(
                got, bytes,
                "{backend}: {name} is not bit for bit what was sent"
            );
        }
    }
}

#[test]
fn bf16_is_served_by_onnxruntime_and_refused_by_tract_with_the_reason() {
    let models = repository(&["bf16"]);
    let server = Server::start(models.path(), "");
    let request = json!({"inputs": [{"name": "bf16", "datatype": "BF16", "shape": [2, 2], "data": [1.5, -2.0, 0.0078125, 3e38]}]});
    let body = server.post_json("/v2/models/bf16/infer", &request).ok();
    assert_eq!(body["outputs"][0]["datatype"], "BF16");
    // 3e38 is not a bfloat16; the nearest one is what comes back.
    assert_eq!(
        body["outputs"][0]["data"],
        json!([1.5, -2.0, 0.0078125, 3.0040553e38])
    );

    on_backend(models.path(), "bf16", "tract");
    let server = Server::start(models.path(), "");
    let error = server.get("/v2/models/bf16").error(503);
    assert!(
        error.contains("refused: tract: ") && error.contains("Bfloat16"),
        "{error}"
    );
}

#[test]
fn an_index_past_a_table_is_the_clients_400_on_both_backends() {
    for backend in BACKENDS {
        let models = repository(&["gather"]);
        on_backend(models.path(), "gather", backend);
        let server = Server::start(models.path(), "");
        let request = json!({"inputs": [{"name": "indices", "datatype": "INT64", "shape": [2], "data": [1, 7]}]});
        let error = server
            .post_json("/v2/models/gather/infer", &request)
            .error(400);
        assert!(
            error.contains("model 'gather' version 1 cannot take this input"),
            "{backend}: {error}"
        );
        assert!(error.contains('7'), "{backend}: {error}");
        assert!(!server.logs().contains("caught a panic"), "{backend}");

        let request = json!({"inputs": [{"name": "indices", "datatype": "INT64", "shape": [3], "data": [2, 0, -1]}]});
        let body = server.post_json("/v2/models/gather/infer", &request).ok();
        assert_eq!(
            body["outputs"][0]["data"],
            json!([4.0, 5.0, 0.0, 1.0, 4.0, 5.0]),
            "{backend}"
        );
    }
}

#[test]
fn without_the_onnxruntime_library_its_models_are_refused_and_the_rest_serve() {
    let models = repository(&["gather"]);
    on_backend(models.path(), "gather", "onnxruntime");
    let server = Server::start(
        models.path(),
        "[models]\nonnxruntime_library = \"/nonexistent/libonnxruntime.so\"\n",
    );
    let error = server.get("/v2/models/gather").error(503);
    assert!(
        error.contains("the ONNX Runtime library is not available")
            && error.contains("/nonexistent/libonnxruntime.so"),
        "{error}"
    );
    // iris asks for nothing in particular: tract serves it.
    assert_eq!(
        server.get("/v2/models/iris").json()["engine"]["backend"],
        "tract"
    );
    server
        .post_json(
            "/v2/models/iris/infer",
            &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
        )
        .ok();
}

#[test]
fn cuda_without_a_gpu_runs_on_the_cpu_with_the_reason_or_is_refused_when_required() {
    let models = repository(&[]);
    std::fs::write(models.path().join("iris/model.toml"), "device = \"cuda\"\n").unwrap();
    let server = Server::start(models.path(), "");
    let engine = server.get("/v2/models/iris").json()["engine"].clone();
    assert_eq!(engine["backend"], "onnxruntime", "{engine}");
    if engine["device"] == "cuda" {
        // A machine with a GPU and the onnxruntime-gpu library: nothing to fall back from.
        return;
    }
    assert_eq!(engine["device"], "cpu", "{engine}");
    let reason = engine["fallback"].as_str().unwrap();
    assert!(reason.contains("CUDA"), "{reason}");
    assert!(server.logs().contains("model version runs on the CPU"));
    server
        .post_json(
            "/v2/models/iris/infer",
            &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
        )
        .ok();

    drop(server);
    std::fs::write(
        models.path().join("iris/model.toml"),
        "device = \"cuda\"\nrequire_device = true\n",
    )
    .unwrap();
    let server = Server::start(models.path(), "");
    let error = server.get("/v2/models/iris").error(503);
    assert!(
        error.contains("device = \"cuda\" is required by model.toml") && error.contains("CUDA"),
        "{error}"
    );
}

fn doubler_request(rows: &[Vec<f32>]) -> Value {
    json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows.len(), rows[0].len()], "data": rows}]})
}

#[test]
fn batched_clients_each_get_exactly_their_own_rows() {
    for backend in BACKENDS {
        let models = repository(&["doubler"]);
        let batching = "[batching]\nmax_batch_size = 16\nmax_queue_delay_us = 20000\n";
        std::fs::write(
            models.path().join("doubler/model.toml"),
            format!("backend = \"{backend}\"\n{batching}"),
        )
        .unwrap();
        std::fs::write(
            models.path().join("iris/model.toml"),
            format!("backend = \"{backend}\"\n"),
        )
        .unwrap();
        // The iris answers without batching, to compare the batched ones with bit for bit.
        let flowers: Vec<Vec<[f32; 4]>> = (0..24)
            .map(|i| {
                (0..1 + i % 3)
                    .map(|r| {
                        [
                            4.3 + (i * 3 + r) as f32 * 0.1,
                            3.0,
                            1.0 + r as f32,
                            0.2 * i as f32,
                        ]
                    })
                    .collect()
            })
            .collect();
        let unbatched: Vec<Value> = {
            let server = Server::start(models.path(), "");
            flowers
                .iter()
                .map(|rows| {
                    server
                        .post_json("/v2/models/iris/infer", &iris_request(rows))
                        .ok()["outputs"]
                        .clone()
                })
                .collect()
        };
        std::fs::write(
            models.path().join("iris/model.toml"),
            format!("backend = \"{backend}\"\n{batching}"),
        )
        .unwrap();
        let server = Server::start(models.path(), "");

        // 24 clients at once: one to three rows each, of width 3 or 5 (which never share a run).
        let together = std::sync::Barrier::new(flowers.len());
        std::thread::scope(|scope| {
            let (server, together) = (&server, &together);
            let mut clients = Vec::new();
            for (i, flowers) in flowers.iter().enumerate() {
                clients.push(scope.spawn(move || {
                    together.wait();
                    let width = if i % 2 == 0 { 3 } else { 5 };
                    let rows: Vec<Vec<f32>> = (0..1 + i % 3)
                        .map(|r| (0..width).map(|c| (i * 100 + r * 10 + c) as f32).collect())
                        .collect();
                    let body = server
                        .post_json("/v2/models/doubler/infer", &doubler_request(&rows))
                        .ok();
                    let doubled: Vec<f32> = rows.iter().flatten().map(|v| v * 2.0).collect();
                    let sums: Vec<f32> = rows.iter().map(|r| r.iter().sum()).collect();
                    assert_eq!(
                        body["outputs"][0]["shape"],
                        json!([rows.len(), width]),
                        "{backend} client {i}"
                    );
                    assert_eq!(
                        body["outputs"][0]["data"],
                        json!(doubled),
                        "{backend} client {i}"
                    );
                    assert_eq!(
                        body["outputs"][1]["data"],
                        json!(sums),
                        "{backend} client {i}"
                    );
                    together.wait();
                    server
                        .post_json("/v2/models/iris/infer", &iris_request(flowers))
                        .ok()["outputs"]
                        .clone()
                }));
            }
            for (i, client) in clients.into_iter().enumerate() {
                let batched = client.join().unwrap();
                if backend == "onnxruntime" {
                    assert_eq!(batched, unbatched[i], "{backend}: iris client {i}");
                } else {
                    // tract's matrix kernels tile the rows, so a row's sums may be added in
                    // another order in a larger batch: the same rows, to float rounding.
                    assert_eq!(batched[0]["shape"], unbatched[i][0]["shape"]);
                    let values = |v: &Value| -> Vec<f64> {
                        v[0]["data"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_f64().unwrap())
                            .collect()
                    };
                    for (a, b) in values(&batched).iter().zip(values(&unbatched[i])) {
                        assert!(
                            (a - b).abs() <= 1e-6,
                            "{backend}: iris client {i}: {a} vs {b}"
                        );
                    }
                }
            }
        });
        for model in ["doubler", "iris"] {
            let labels = [
                ("model", model),
                ("version", if model == "iris" { "2" } else { "1" }),
            ];
            let runs = server.metric("modelyard_batch_size_count", &labels);
            let rows = server.metric("modelyard_batch_size_sum", &labels);
            let expected_rows: usize = (0..24).map(|i| 1 + i % 3).sum();
            assert_eq!(rows as usize, expected_rows, "{backend}: {model}");
            assert!(
                runs < 24.0,
                "{backend}: {model}: {runs} runs for 24 requests: nothing was batched"
            );
        }
    }
}

#[test]
fn a_full_queue_is_503_with_retry_after_and_a_timeout_is_honoured() {
    let models = repository(&["slow"]);
    std::fs::write(
        models.path().join("slow/model.toml"),
        "threads = 1\n[batching]\nmax_batch_size = 1\nmax_queue_size = 2\n",
    )
    .unwrap();
    let server = Server::start(models.path(), "");
    let row = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
    let replies: Vec<crate::harness::Reply> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..12)
            .map(|_| scope.spawn(|| server.post_json("/v2/models/slow/infer", &row)))
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let full: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(
        !full.is_empty(),
        "12 clients at once never filled a queue of 2"
    );
    assert_eq!(
        full.len() + replies.iter().filter(|r| r.status == 200).count(),
        12
    );
    for reply in &full {
        assert_eq!(reply.headers["retry-after"], "1");
        let error = reply.error(503);
        assert!(
            error.contains("model 'slow' version 1 is overloaded: the batching queue is full"),
            "{error}"
        );
    }
    let labels = [("model", "slow"), ("reason", "queue_full")];
    assert_eq!(
        server.metric("modelyard_queue_rejections_total", &labels),
        full.len() as f64
    );

    // A request whose timeout (µs) passes while it waits is answered 503 and never run.
    let mut timed = row.clone();
    timed["parameters"] = json!({"timeout": 1});
    let error = server.post_json("/v2/models/slow/infer", &timed).error(503);
    assert!(error.contains("timeout passed"), "{error}");
    let labels = [("model", "slow"), ("reason", "timeout")];
    assert_eq!(
        server.metric("modelyard_queue_rejections_total", &labels),
        1.0
    );
    let mut bad = row.clone();
    bad["parameters"] = json!({"timeout": "soon"});
    let error = server.post_json("/v2/models/slow/infer", &bad).error(400);
    assert!(error.contains("microseconds"), "{error}");
}

#[test]
fn the_cache_answers_repeats_misses_on_one_byte_evicts_and_empties_on_reload() {
    let models = repository(&[]);
    std::fs::write(
        models.path().join("iris/model.toml"),
        "cache = { max_bytes = 2000 }\n",
    )
    .unwrap();
    let server = Server::start(models.path(), "");
    let count = |what: &str| {
        server.metric(
            &format!("modelyard_response_cache_{what}_total"),
            &[("model", "iris"), ("version", "2")],
        )
    };
    let flower = [5.1, 3.5, 1.4, 0.2];
    let first = server
        .post_json("/v2/models/iris/infer", &iris_request(&[flower]))
        .ok();
    let again = server
        .post_json("/v2/models/iris/infer", &iris_request(&[flower]))
        .ok();
    assert_eq!(first["outputs"], again["outputs"]);
    assert_eq!((count("hits"), count("misses")), (1.0, 1.0));

    // The smallest change to one float: its lowest bit.
    let nudged = f32::from_bits(flower[0].to_bits() + 1);
    server
        .post_json(
            "/v2/models/iris/infer",
            &iris_request(&[[nudged, 3.5, 1.4, 0.2]]),
        )
        .ok();
    assert_eq!((count("hits"), count("misses")), (1.0, 2.0));

    // Each entry holds a few hundred bytes: twenty distinct requests cannot all stay.
    for i in 0..20 {
        server
            .post_json(
                "/v2/models/iris/infer",
                &iris_request(&[[4.0 + i as f32 * 0.1, 3.0, 1.5, 0.3]]),
            )
            .ok();
    }
    assert!(count("evictions") > 0.0);
    assert_eq!(count("misses"), 22.0);

    // A new file for the version empties its cache: the same request misses again.
    let path = models.path().join("iris/2/model.onnx");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(models.path().join("iris/2/.model.onnx.tmp"), &bytes).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::rename(models.path().join("iris/2/.model.onnx.tmp"), &path).unwrap();
    server.wait_until("version 2 is loaded again", || {
        server.logs().matches("model version loaded").count() >= 3
    });
    let hits = count("hits");
    let misses = count("misses");
    let reloaded = server
        .post_json("/v2/models/iris/infer", &iris_request(&[flower]))
        .ok();
    assert_eq!(reloaded["outputs"], first["outputs"]);
    assert_eq!((count("hits"), count("misses")), (hits, misses + 1.0));
}

#[test]
fn an_endpoints_model_calls_and_its_shadows_batch_too_each_request_keeping_its_rows() {
    let setup = crate::plugins::Setup::plugins(&["weighted", "iris-features"]);
    std::fs::write(
        setup.models.path().join("iris/model.toml"),
        "[batching]\nmax_batch_size = 16\nmax_queue_delay_us = 20000\n",
    )
    .unwrap();
    let server = setup.start(
        r#"
[server]
inference_threads = 8
[endpoints.flowers]
variants = { stable = "iris@2", shadow = "iris@1" }
router = { plugin = "weighted", config = { weights = { stable = 1 }, shadows = ["shadow"] } }
[[endpoints.flowers.processors]]
plugin = "iris-features"
"#,
    );
    // Two kinds of flower, told apart by the model: each client must get its own class.
    let kinds = [
        ([5.1, 3.5, 1.4, 0.2], "setosa"),
        ([6.7, 3.0, 5.2, 2.3], "virginica"),
    ];
    let together = std::sync::Barrier::new(12);
    std::thread::scope(|scope| {
        for i in 0..12 {
            let (server, together, kinds) = (&server, &together, &kinds);
            scope.spawn(move || {
                let (features, label) = kinds[i % 2];
                let body = json!({"inputs": [{"name": "features", "datatype": "BYTES", "shape": [1],
                    "data": [json!({"sepal_length": features[0], "sepal_width": features[1],
                                    "petal_length": features[2], "petal_width": features[3]}).to_string()]}]});
                together.wait();
                let reply = server.post_json("/v2/models/flowers/infer", &body).ok();
                let labels = reply["outputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|o| o["name"] == "label")
                    .unwrap()["data"]
                    .clone();
                assert_eq!(labels, json!([label]), "client {i}: {reply}");
            });
        }
    });
    let labels = [("model", "iris"), ("version", "2")];
    assert_eq!(server.metric("modelyard_batch_size_sum", &labels), 12.0);
    assert!(server.metric("modelyard_batch_size_count", &labels) < 12.0);
    // The shadow's calls (iris@1, batched too) come from the shadow thread.
    let compared = |result: &str| {
        let labels = [
            ("endpoint", "flowers"),
            ("variant", "shadow"),
            ("result", result),
        ];
        server.metric("modelyard_shadow_comparisons_total", &labels)
    };
    server.wait_until("every shadow answer is compared", || {
        compared("agreed") + compared("disagreed") == 12.0
    });
    assert_eq!(compared("failed"), 0.0);
    let labels = [("model", "iris"), ("version", "1")];
    assert_eq!(server.metric("modelyard_batch_size_sum", &labels), 12.0);
}
