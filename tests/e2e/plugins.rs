//! Endpoints served through real plugin components, built from source by `tests/run`
//! (`plugins/build`): the standard plugins, hostile fixtures, hot swaps under load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::{Value, json};

use crate::harness::{Server, iris_request, repository, root};

/// A built component: `plugins/NAME.wasm`, or a fixture of flavour `a` or `b`.
pub(crate) fn component(name: &str, flavor: Option<&str>) -> PathBuf {
    let path = match flavor {
        None => root().join("plugins").join(format!("{name}.wasm")),
        Some(f) => root()
            .join("target/fixtures")
            .join(f)
            .join(format!("{name}.wasm")),
    };
    assert!(
        path.is_file(),
        "{} is missing: run the suite with tests/run, which builds the plugins",
        path.display()
    );
    path
}

/// Drops a file into the plugin directory the way an operator's tooling should: whole.
pub(crate) fn drop_in(from: &Path, dir: &Path, name: &str) {
    let temp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(from, &temp).unwrap();
    std::fs::rename(&temp, dir.join(name)).unwrap();
}

pub(crate) struct Setup {
    pub models: tempfile::TempDir,
    pub plugins: tempfile::TempDir,
    pub cache: tempfile::TempDir,
}

impl Setup {
    pub fn new(files: &[(impl AsRef<str>, PathBuf)]) -> Setup {
        let setup = Setup {
            models: repository(&[]),
            plugins: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
        };
        for (name, from) in files {
            drop_in(from, setup.plugins.path(), name.as_ref());
        }
        setup
    }

    /// Standard plugins from `plugins/`, under their own names.
    pub fn plugins(names: &[&str]) -> Setup {
        let files: Vec<(String, PathBuf)> = names
            .iter()
            .map(|n| (format!("{n}.wasm"), component(n, None)))
            .collect();
        Setup::new(&files)
    }

    /// The standard `weighted` and `iris-features` plugins, as `IRIS_AB` uses them.
    fn standard() -> Setup {
        Setup::plugins(&["weighted", "iris-features"])
    }

    pub fn config(&self, endpoints: &str) -> String {
        format!(
            "[plugins]\ndir = {:?}\ncache_dir = {:?}\n{endpoints}",
            self.plugins.path(),
            self.cache.path()
        )
    }

    pub fn start(&self, endpoints: &str) -> Server {
        Server::start(self.models.path(), &self.config(endpoints))
    }
}

/// A 50/50 split between the two iris versions, no processors.
pub(crate) const AB: &str = r#"
[endpoints.ab]
variants = { a = "iris@1", b = "iris@2" }
router = { plugin = "weighted", config = { weights = { a = 1, b = 1 } } }
"#;

const IRIS_AB: &str = r#"
[endpoints.iris-ab]
variants = { stable = "iris@2", candidate = "iris@1" }
default_variant = "stable"
targeting_key_header = "x-user-id"
router = { plugin = "weighted", config = { weights = { stable = 1, candidate = 1 } } }
[[endpoints.iris-ab.processors]]
plugin = "iris-features"
"#;

fn flowers() -> Value {
    let setosa =
        r#"{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}"#;
    let virginica =
        r#"{"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}"#;
    json!({"inputs": [{"name": "features", "datatype": "BYTES", "shape": [2], "data": [setosa, virginica]}]})
}

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

#[test]
fn hostile_plugins_never_take_the_server_down() {
    let setup = Setup::new(&[
        ("hostile.wasm", component("fixture-router", Some("a"))),
        (
            "hostile-processor.wasm",
            component("fixture-processor", Some("a")),
        ),
        ("iris-features.wasm", component("iris-features", None)),
    ]);
    std::fs::write(
        setup.plugins.path().join("not-wasm.wasm"),
        b"#!/bin/sh\necho hello\n",
    )
    .unwrap();
    let mut endpoints = String::new();
    for mode in ["loop", "sleep", "oom", "panic", "err"] {
        endpoints.push_str(&format!(
            "[endpoints.{mode}]\nvariants = {{ stable = \"iris@2\", candidate = \"iris@1\" }}\ndefault_variant = \"candidate\"\nrouter = {{ plugin = \"hostile\", config = {{ mode = \"{mode}\" }} }}\n"
        ));
    }
    endpoints.push_str(concat!(
        "[endpoints.huge]\nvariants = { only = \"iris\" }\n[[endpoints.huge.processors]]\nplugin = \"hostile-processor\"\nconfig = { mode = \"huge\" }\n",
        "[endpoints.lenient]\nvariants = { only = \"iris\" }\non_processor_error = \"pass-through\"\n[[endpoints.lenient.processors]]\nplugin = \"hostile-processor\"\nconfig = { mode = \"err\" }\n",
        "[endpoints.wrong-world]\nvariants = { only = \"iris\" }\nrouter = { plugin = \"iris-features\" }\n",
        "[endpoints.refused]\nvariants = { only = \"iris\" }\nrouter = { plugin = \"hostile\", config = { mode = \"refuse\" } }\n",
        "[endpoints.not-wasm]\nvariants = { only = \"iris\" }\nrouter = { plugin = \"not-wasm\" }\n",
    ));
    let server = setup.start(&endpoints);
    let request = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);

    // A router that loops, sleeps, exhausts memory, panics or errs: the default variant
    // answers (the sleeper at once: a plugin may not wait).
    for round in 0..3 {
        for mode in ["loop", "sleep", "oom", "panic", "err"] {
            let reply = server.post_json(&format!("/v2/models/{mode}/infer"), &request);
            assert_eq!(
                reply.status,
                200,
                "{mode}, round {round}: {}",
                String::from_utf8_lossy(&reply.body)
            );
            assert_eq!(reply.json()["parameters"]["variant"], "candidate", "{mode}");
        }
    }
    for (mode, reason) in [
        ("loop", "ran past its CPU deadline"),
        ("sleep", "plugins may not wait"),
        ("oom", "ran out of its memory limit"),
        ("panic", "trapped"),
        ("err", "fixture router fails on purpose"),
    ] {
        server.wait_until(&format!("{mode} is logged with {reason:?}"), || {
            server.logs().lines().any(|l| {
                l.contains("router failed")
                    && l.contains(&format!("\"endpoint\":\"{mode}\""))
                    && l.contains("hostile")
                    && l.contains(reason)
            })
        });
    }
    // A processor whose output outgrows its memory: 500 naming it; pass-through lets it go.
    let error = server
        .post_json("/v2/models/huge/infer", &request)
        .error(500);
    assert!(error.contains("hostile-processor"), "{error}");
    let lenient = server.post_json("/v2/models/lenient/infer", &request);
    assert_eq!(lenient.status, 200);
    // Wrong world, refused configuration, not a component: refused with the reason.
    for (endpoint, reason) in [
        (
            "wrong-world",
            "is a processor plugin, but it is used here as a router",
        ),
        (
            "refused",
            "refused its configuration: this configuration is refused on purpose",
        ),
        ("not-wasm", "not a WebAssembly component"),
    ] {
        let error = server
            .post_json(&format!("/v2/models/{endpoint}/infer"), &request)
            .error(503);
        assert!(error.contains(reason), "{endpoint}: {error}");
    }
    // Every failure is counted against the plugin that failed.
    let endpoints = server.get("/admin/endpoints").json();
    for mode in ["loop", "oom", "panic", "err"] {
        let endpoint = endpoints["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == mode)
            .unwrap();
        assert_eq!(endpoint["router"]["plugin"], "hostile");
        assert_eq!(endpoint["router"]["failures"], 3, "{mode}: {endpoint}");
    }
    let plugins = server.get("/admin/plugins").json();
    let not_wasm = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "not-wasm")
        .unwrap();
    assert_eq!(not_wasm["state"], "refused");
    // Nothing is poisoned: the bare model and a good endpoint still answer.
    assert_eq!(
        server.post_json("/v2/models/iris/infer", &request).status,
        200
    );
    assert_eq!(
        server.post_json("/v2/models/err/infer", &request).status,
        200
    );
}

#[test]
fn plugin_swaps_under_load_fail_no_request() {
    let setup = Setup::new(&[
        ("swap-router.wasm", component("fixture-router", Some("a"))),
        (
            "swap-processor.wasm",
            component("fixture-processor", Some("a")),
        ),
    ]);
    let endpoints = r#"
[endpoints.swap]
variants = { first = "iris@1", second = "iris@2" }
router = { plugin = "swap-router", config = { mode = "pin" } }
[[endpoints.swap.processors]]
plugin = "swap-processor"
config = { mode = "tag" }
"#;
    let server = Arc::new(setup.start(endpoints));
    let behaviour = |server: &Server| -> Option<(String, String)> {
        let reply = server.post_json(
            "/v2/models/swap/infer",
            &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
        );
        if reply.status != 200 {
            return None;
        }
        let body = reply.json();
        let flavor = body["outputs"]
            .as_array()?
            .iter()
            .find(|o| o["name"] == "flavor")?["data"][0]
            .as_str()?
            .to_string();
        Some((body["parameters"]["variant"].as_str()?.to_string(), flavor))
    };
    assert_eq!(behaviour(&server), Some(("first".into(), "a".into())));

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (server, stop) = (server.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failures) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let reply = server.post_json(
                        "/v2/models/swap/infer",
                        &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
                    );
                    if reply.status == 200 {
                        ok += 1;
                    } else {
                        failures.push(String::from_utf8_lossy(&reply.body).to_string());
                    }
                }
                (ok, failures)
            })
        })
        .collect();

    let mut seen_after = Vec::new();
    for swap in 0..20 {
        let flavor = if swap % 2 == 0 { "b" } else { "a" };
        let expected = (
            if flavor == "b" { "second" } else { "first" }.to_string(),
            flavor.to_string(),
        );
        let landed = Instant::now();
        drop_in(
            &component("fixture-router", Some(flavor)),
            setup.plugins.path(),
            "swap-router.wasm",
        );
        drop_in(
            &component("fixture-processor", Some(flavor)),
            setup.plugins.path(),
            "swap-processor.wasm",
        );
        server.wait_until(
            &format!("swap {swap} to flavour {flavor} is served"),
            || behaviour(&server) == Some(expected.clone()),
        );
        seen_after.push(landed.elapsed());
    }

    // A broken file is refused and the version before it keeps serving.
    std::fs::write(setup.plugins.path().join(".broken.tmp"), b"\0asm broken").unwrap();
    std::fs::rename(
        setup.plugins.path().join(".broken.tmp"),
        setup.plugins.path().join("swap-router.wasm"),
    )
    .unwrap();
    server.wait_until("the broken router is refused", || {
        server.get("/admin/plugins").json()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| {
                p["name"] == "swap-router"
                    && p["state"] == "serving previous version; new file refused"
            })
    });
    assert_eq!(behaviour(&server), Some(("first".into(), "a".into())));

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (ok, failures) = client.join().unwrap();
        assert!(
            failures.is_empty(),
            "requests failed during swaps: {failures:?}"
        );
        total += ok;
    }
    assert!(total > 100, "only {total} requests went through");
    seen_after.sort();
    // Timing is a measurement, not an assertion: BENCHMARKS.md records it.
    println!(
        "swap seen after: median {:?}, max {:?} over {} swaps, {total} requests, 0 failed",
        seen_after[seen_after.len() / 2],
        seen_after[seen_after.len() - 1],
        seen_after.len()
    );
}

#[test]
fn configuration_edits_apply_live_and_bad_ones_are_refused() {
    let setup = Setup::standard();
    let server = setup.start(IRIS_AB);
    let variant = |server: &Server| {
        let reply = server.post_json("/v2/models/iris-ab/infer", &flowers());
        reply.ok();
        reply.headers["x-modelyard-variant"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let config = setup.config(IRIS_AB);

    let all_candidate = config.replace(
        "weights = { stable = 1, candidate = 1 }",
        "weights = { stable = 0, candidate = 1 }",
    );
    server.write_config(&all_candidate);
    server.wait_until("the new weights apply", || {
        (0..10).all(|_| variant(&server) == "candidate")
    });

    server.write_config(&all_candidate.replace("variants = {", "variants = {{"));
    server.wait_until("the bad edit is refused", || {
        server.logs().contains("configuration edit refused")
    });
    let line = server
        .logs()
        .lines()
        .find(|l| l.contains("configuration edit refused"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("line"),
        "the refusal should say where: {line}"
    );
    assert!((0..10).all(|_| variant(&server) == "candidate"));

    // A plugin configuration the plugin refuses: refused with its message, old one serves.
    server.write_config(&config.replace(
        "weights = { stable = 1, candidate = 1 }",
        "weights = { stable = -1 }",
    ));
    server.wait_until("the refused plugin config is reported", || {
        server.get("/admin/endpoints").json()["endpoints"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("weight of 'stable' is -1"))
    });
    assert!((0..10).all(|_| variant(&server) == "candidate"));
}

#[test]
fn the_admin_api_takes_a_bearer_token_and_compiled_plugins_are_cached() {
    let setup = Setup::standard();
    let server = Server::start(
        setup.models.path(),
        &format!(
            "[server.tokens.ops]\ntoken = \"s3cret\"\nrole = \"admin\"\n\
             [server.tokens.dashboard]\ntoken = \"peek\"\nrole = \"read\"\n{}",
            setup.config(IRIS_AB)
        ),
    );
    let error = server.get("/admin/plugins").error(401);
    assert!(error.contains("Bearer"), "{error}");
    let wrong = server.get_with("/admin/plugins", &[("authorization", "Bearer s3cret!")]);
    assert_eq!(wrong.status, 401);
    let reply = server.get_with("/admin/plugins", &[("authorization", "Bearer peek")]);
    assert_eq!(reply.status, 200);
    // A read token may look but not change; the admin token's name goes into the log.
    let weights = json!({"weights": {"stable": 1, "candidate": 3}});
    let change = |token: &str| {
        server.post(
            "/admin/endpoints/iris-ab/weights",
            &[("authorization", token)],
            weights.to_string().as_bytes(),
        )
    };
    assert!(change("Bearer peek").error(403).contains("only read"));
    let changed = change("Bearer s3cret").ok();
    assert_eq!(changed["strategy"]["weights"]["candidate"], 3.0);
    server.wait_until("the change is audited with the token's name", || {
        server
            .logs()
            .lines()
            .any(|l| l.contains("\"kind\":\"endpoint.weights\"") && l.contains("\"actor\":\"ops\""))
    });
    let hashes: BTreeSet<String> = reply.json()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["hash"].as_str().unwrap().to_string())
        .collect();
    // One artifact per component, named by its hash, outside the plugin directory.
    let cached: BTreeSet<String> = std::fs::read_dir(setup.cache.path())
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .split('-')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(cached, hashes);
}

#[test]
fn feedback_rewards_the_variant_that_answered() {
    let setup = Setup::standard();
    let server = Server::start(
        setup.models.path(),
        &format!("[server]\nfeedback_memory = 3\n{}", setup.config(IRIS_AB)),
    );
    let answer = |request: &Value| {
        let body = server.post_json("/v2/models/iris-ab/infer", request).json();
        (
            body["id"].as_str().unwrap().to_string(),
            body["parameters"]["variant"].as_str().unwrap().to_string(),
        )
    };
    let feedback = |id: &str, reward: f64| {
        server.post_json(
            "/v2/models/iris-ab/feedback",
            &json!({"id": id, "reward": reward}),
        )
    };

    // An answer without a client id gets one from the host, to name in feedback.
    let (first, variant) = answer(&flowers());
    let reply = feedback(&first, 1.0);
    assert_eq!(reply.ok()["variant"], variant.as_str());
    assert!(
        feedback(&first, 1.0)
            .error(404)
            .contains("already rewarded")
    );

    let mut request = flowers();
    request["id"] = json!("client-7");
    let (id, _) = answer(&request);
    assert_eq!(id, "client-7");
    assert_eq!(feedback("client-7", 0.5).status, 200);

    assert!(
        feedback("never-seen", 1.0)
            .error(404)
            .contains("never-seen")
    );
    assert!(
        server
            .post_json("/v2/models/iris-ab/feedback", &json!({"id": "x"}))
            .error(400)
            .contains("reward")
    );
    assert!(
        server
            .post_json("/v2/models/iris/feedback", &json!({"id": "x", "reward": 1}))
            .error(404)
            .contains("not an endpoint")
    );

    // Memory is bounded: after more answers than it holds, the oldest id is gone for good.
    let (oldest, _) = answer(&flowers());
    for _ in 0..3 {
        answer(&flowers());
    }
    assert!(feedback(&oldest, 1.0).error(410).contains("forgotten"));

    let endpoints = server.get("/admin/endpoints").json();
    let variants = endpoints["endpoints"][0]["variants"]
        .as_array()
        .unwrap()
        .clone();
    let count: u64 = variants
        .iter()
        .map(|v| v["reward_count"].as_u64().unwrap())
        .sum();
    let sum: f64 = variants
        .iter()
        .map(|v| v["reward_sum"].as_f64().unwrap())
        .sum();
    assert_eq!((count, sum), (2, 1.5));
}

#[test]
fn bandits_learn_the_better_variant_from_feedback() {
    let setup = Setup::plugins(&["bandit"]);
    // A fixed seed: the same rewards in the same order give the same decisions every run.
    let mut endpoints = String::from("[server]\nseed = 7\n");
    for (name, config) in [
        (
            "epsilon",
            r#"{ algorithm = "epsilon-greedy", epsilon = 0.1 }"#,
        ),
        ("ucb", r#"{ algorithm = "ucb1" }"#),
        ("thompson", r#"{ algorithm = "thompson" }"#),
    ] {
        endpoints.push_str(&format!(
            "[endpoints.{name}]\nvariants = {{ worse = \"iris@1\", better = \"iris@2\" }}\nrouter = {{ plugin = \"bandit\", config = {config} }}\n"
        ));
    }
    let server = setup.start(&endpoints);
    // The simulated world: the better variant earns a reward 80 % of the time, the worse 20 %.
    let mut world = 0x2545_f491_4f6c_dd1du64;
    let mut coin = move |p: f64| {
        world ^= world << 13;
        world ^= world >> 7;
        world ^= world << 17;
        ((world >> 11) as f64 / (1u64 << 53) as f64) < p
    };
    for endpoint in ["epsilon", "ucb", "thompson"] {
        let mut better_late = 0;
        for round in 0..300 {
            let body = server
                .post_json(
                    &format!("/v2/models/{endpoint}/infer"),
                    &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
                )
                .json();
            let variant = body["parameters"]["variant"].as_str().unwrap().to_string();
            let paid = coin(if variant == "better" { 0.8 } else { 0.2 });
            let reward = json!({"id": body["id"], "reward": if paid { 1 } else { 0 }});
            assert_eq!(
                server
                    .post_json(&format!("/v2/models/{endpoint}/feedback"), &reward)
                    .status,
                200
            );
            if round >= 200 && variant == "better" {
                better_late += 1;
            }
        }
        println!("{endpoint}: {better_late} of the last 100 requests went to the better variant");
        assert!(
            better_late >= 70,
            "{endpoint}: only {better_late} of the last 100 to the better variant"
        );
    }
}

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

#[test]
fn ab_experiments_report_arms_and_significance() {
    let setup = Setup::plugins(&["weighted"]);
    let server = setup.start(
        r#"
[server]
seed = 7
[endpoints.ab]
variants = { control = "iris@1", treatment = "iris@2" }
default_variant = "control"
router = { plugin = "weighted", config = { weights = { control = 1, treatment = 1 } } }
"#,
    );
    let request = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
    // Conversions: 20 % for control, 60 % for treatment, alternating deterministically.
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..400 {
        let body = server.post_json("/v2/models/ab/infer", &request).json();
        let variant = body["parameters"]["variant"].as_str().unwrap().to_string();
        let n = counts.entry(variant.clone()).or_default();
        *n += 1;
        let converted = if variant == "treatment" {
            *n % 5 < 3
        } else {
            n.is_multiple_of(5)
        };
        let reward = json!({"id": body["id"], "reward": if converted { 1 } else { 0 }});
        assert_eq!(
            server.post_json("/v2/models/ab/feedback", &reward).status,
            200
        );
    }
    let report = server.get("/admin/experiments/ab").json();
    let arms = report["arms"].as_array().unwrap();
    assert_eq!(arms.len(), 2);
    let share = arms[1]["requests"].as_u64().unwrap() as f64 / 400.0;
    assert!(
        (0.4..=0.6).contains(&share),
        "a 50/50 split gave {share} to the treatment"
    );
    let comparison = &report["comparisons"][0];
    assert_eq!(comparison["treatment"], "treatment");
    let result = &comparison["result"];
    assert_eq!(result["test"], "two-proportion z-test");
    assert!(result["p_value"].as_f64().unwrap() < 0.001, "{result}");
    let [low, high] = [
        result["ci95"][0].as_f64().unwrap(),
        result["ci95"][1].as_f64().unwrap(),
    ];
    assert!(low < 0.4 && 0.4 < high && low > 0.0, "{result}");
    assert_eq!(server.get("/admin/experiments/nope").status, 404);
}
