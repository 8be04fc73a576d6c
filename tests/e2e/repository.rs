//! The model repository while the server runs: versions come and go, broken files are
//! refused, and no request fails on the way.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::harness::{Server, iris_request, repository, root};

const SETOSA: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

fn served_version(server: &Server) -> String {
    let reply = server.post_json("/v2/models/iris/infer", &iris_request(&[SETOSA]));
    reply.ok()["model_version"].as_str().unwrap().to_string()
}

#[test]
fn versions_added_and_removed_under_load_fail_no_request() {
    let models = repository(&[]);
    let server = Arc::new(Server::start(models.path(), ""));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (server, stop) = (server.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failures, mut seen) = (0, Vec::new(), BTreeSet::new());
                while !stop.load(Ordering::Relaxed) {
                    let reply = server.post_json("/v2/models/iris/infer", &iris_request(&[SETOSA]));
                    if reply.status == 200 {
                        ok += 1;
                        seen.insert(reply.json()["model_version"].as_str().unwrap().to_string());
                    } else {
                        failures.push(String::from_utf8_lossy(&reply.body).to_string());
                    }
                }
                (ok, failures, seen)
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(200));
    let v3 = models.path().join("iris/3");
    std::fs::create_dir(&v3).unwrap();
    std::fs::copy(
        root().join("models/iris/2/model.onnx"),
        v3.join("model.onnx"),
    )
    .unwrap();
    server.wait_until("version 3 is the default", || {
        served_version(&server) == "3"
    });
    assert_eq!(
        server.get("/v2/models/iris").json()["versions"],
        serde_json::json!(["1", "2", "3"])
    );
    std::thread::sleep(Duration::from_millis(200));

    std::fs::remove_dir_all(&v3).unwrap();
    server.wait_until("version 3 is gone", || served_version(&server) == "2");
    assert_eq!(server.get("/v2/models/iris/versions/3/ready").status, 404);
    std::thread::sleep(Duration::from_millis(200));

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut versions = BTreeSet::new();
    for client in clients {
        let (ok, failures, seen) = client.join().unwrap();
        assert!(
            failures.is_empty(),
            "requests failed during the change: {failures:?}"
        );
        total += ok;
        versions.extend(seen);
    }
    assert!(total > 100, "only {total} requests went through");
    assert_eq!(versions, ["2", "3"].map(String::from).into());
}

#[test]
fn corrupt_models_are_refused_and_the_old_one_keeps_serving() {
    let models = repository(&[]);
    let server = Server::start(models.path(), "");
    let before = server
        .post_json("/v2/models/iris/infer", &iris_request(&[SETOSA]))
        .json();

    // A new version that is not a model: refused with the file and the reason.
    let v4 = models.path().join("iris/4");
    std::fs::create_dir(&v4).unwrap();
    std::fs::write(v4.join("model.onnx"), b"this is not protobuf").unwrap();
    // The refusal is logged while the scan runs, before its result is published: wait
    // for both.
    server.wait_until("version 4 is refused", || {
        server.logs().contains("iris/4/model.onnx")
            && server.get("/v2/models/iris/versions/4/ready").status == 503
    });
    let logged = server.logs();
    let line = logged
        .lines()
        .find(|l| l.contains("iris/4/model.onnx"))
        .unwrap();
    assert!(
        line.contains("model file refused") && line.contains("not an ONNX model"),
        "{line}"
    );
    let error = server.get("/v2/models/iris/versions/4/ready").error(503);
    assert!(
        error.contains("iris/4/model.onnx refused: ") && error.contains("not an ONNX model"),
        "{error}"
    );
    assert_eq!(served_version(&server), "2");

    // The serving version's file overwritten with garbage: the loaded graph stays.
    std::fs::write(
        models.path().join("iris/2/model.onnx"),
        b"garbage garbage garbage",
    )
    .unwrap();
    server.wait_until("the overwrite is refused", || {
        server.get("/v2/models/iris/versions/2").status == 200
            && server
                .logs()
                .lines()
                .any(|l| l.contains("iris/2/model.onnx") && l.contains("refused"))
    });
    let after = server
        .post_json("/v2/models/iris/infer", &iris_request(&[SETOSA]))
        .json();
    assert_eq!(after["outputs"], before["outputs"]);
    assert_eq!(after["model_version"], before["model_version"]);

    // Once a good file lands, version 4 loads and takes over.
    std::fs::copy(
        root().join("models/iris/1/model.onnx"),
        v4.join("model.onnx"),
    )
    .unwrap();
    server.wait_until("version 4 loads", || served_version(&server) == "4");
}

#[test]
fn a_model_with_no_loadable_version_is_503_and_the_others_serve() {
    let models = repository(&[]);
    crate::harness::broken_model(models.path());
    let server = Server::start(models.path(), "");
    let error = server.get("/v2/models/broken/ready").error(503);
    assert!(error.contains("broken/1/model.onnx refused"), "{error}");
    let error = server
        .post_json("/v2/models/broken/infer", &iris_request(&[SETOSA]))
        .error(503);
    assert!(
        error.contains("model 'broken' has no loaded version"),
        "{error}"
    );
    assert_eq!(server.get("/v2/health/ready").status, 200);
    assert_eq!(served_version(&server), "2");
}

#[test]
fn model_toml_edits_apply_live() {
    let models = repository(&[]);
    let server = Server::start(models.path(), "");
    let toml = models.path().join("iris/model.toml");
    let original = std::fs::read_to_string(&toml).unwrap();

    std::fs::write(
        &toml,
        original.replace(
            "version_policy = \"all\"",
            "version_policy = { latest = 1 }",
        ),
    )
    .unwrap();
    server.wait_until("only the latest version is served", || {
        server.get("/v2/models/iris/versions/1/ready").status == 404
    });
    assert_eq!(
        server.get("/v2/models/iris").json()["versions"],
        serde_json::json!(["2"])
    );

    // A broken edit is refused and the last good settings stay in force.
    std::fs::write(&toml, "version_policy = \"every\"\n").unwrap();
    server.wait_until("the bad model.toml is refused", || {
        server.logs().contains("model.toml refused")
    });
    assert_eq!(server.get("/v2/models/iris/versions/1/ready").status, 404);
    assert_eq!(served_version(&server), "2");

    std::fs::write(&toml, &original).unwrap();
    server.wait_until("both versions are back", || {
        server.get("/v2/models/iris/versions/1/ready").status == 200
    });
}
