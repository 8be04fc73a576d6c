//! Deployment strategies end to end: canary steps and rollback, shadows, blue-green
//! switches under load, flagd flags, sticky A/B assignment, and the admin API that drives
//! them. Servers run with a fixed `server.seed`, so every split here is the same run after
//! run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Server, iris_data, iris_request};
use crate::plugins::{AB, Setup};

const ADMIN: (&str, &str) = ("authorization", "Bearer let-me-in");
const SERVER: &str =
    "[server]\nseed = 42\n[server.tokens.ops]\ntoken = \"let-me-in\"\nrole = \"admin\"\n";

fn flower() -> Value {
    iris_request(&[[5.1, 3.5, 1.4, 0.2]])
}

/// Calls `endpoint` once; the status and the variant that answered.
fn call(server: &Server, endpoint: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let reply = server.post(
        &format!("/v2/models/{endpoint}/infer"),
        &all,
        flower().to_string().as_bytes(),
    );
    (reply.status, reply.variant())
}

/// How many of `n` calls the variant `name` answered; every call must succeed.
fn count(server: &Server, endpoint: &str, n: usize, name: &str) -> usize {
    (0..n)
        .filter(|_| {
            let (status, variant) = call(server, endpoint, &[]);
            assert_eq!(status, 200, "{endpoint}");
            variant == name
        })
        .count()
}

fn admin(server: &Server, endpoint: &str, action: &str, body: &Value) -> Value {
    server
        .post(
            &format!("/admin/endpoints/{endpoint}/{action}"),
            &[ADMIN],
            body.to_string().as_bytes(),
        )
        .ok()
}

fn strategy(server: &Server, endpoint: &str) -> Value {
    server
        .get_with(&format!("/admin/endpoints/{endpoint}"), &[ADMIN])
        .ok()["strategy"]
        .clone()
}

#[test]
fn canary_steps_up_rolls_back_on_failure_and_obeys_operators() {
    let setup = Setup::plugins(&["canary"]);
    crate::harness::broken_model(setup.models.path());
    let server = setup.start(&format!(
        r#"{SERVER}
[endpoints.healthy]
variants = {{ stable = "iris@2", canary = "iris@1" }}
default_variant = "stable"
router = {{ plugin = "canary", config = {{ stable = "stable", canary = "canary", steps = [10, 50, 100], step_requests = 100 }} }}
[endpoints.failing]
variants = {{ stable = "iris@2", canary = "broken" }}
default_variant = "stable"
router = {{ plugin = "canary", config = {{ stable = "stable", canary = "canary", steps = [50], step_requests = 100000, min_requests = 10, analysis_interval = 5, failure_limit = 2 }} }}
"#
    ));
    // A step ends on the request after its 100: 10 %, then 50 %, then 100 %. Two healthy
    // models a few microseconds apart pass every analysis on a busy test machine too.
    let first = count(&server, "healthy", 100, "canary");
    assert!((3..=20).contains(&first), "{first} of 100 at 10 %");
    let second = count(&server, "healthy", 100, "canary");
    assert!((35..=65).contains(&second), "{second} of 100 at 50 %");
    let third = count(&server, "healthy", 101, "canary");
    assert_eq!(third, 101, "{}", strategy(&server, "healthy"));
    let state = strategy(&server, "healthy");
    assert_eq!(state["status"], "promoted", "{state}");
    eprintln!("canary: {first}/100 at 10 %, {second}/100 at 50 %, then promoted");

    // By hand: back to 0 %, then straight to 100 %.
    let rolled = admin(&server, "healthy", "rollback", &json!({}));
    assert_eq!(rolled["strategy"]["share_percent"], 0.0);
    assert_eq!(count(&server, "healthy", 30, "canary"), 0);
    admin(&server, "healthy", "promote", &json!({}));
    assert_eq!(count(&server, "healthy", 30, "canary"), 30);
    let refused = server.post(
        "/admin/endpoints/healthy/weights",
        &[ADMIN],
        br#"{"weights": {"canary": 1}}"#,
    );
    assert!(refused.error(400).contains("steps"));

    // A canary whose every answer fails is rolled back on its own: analyses every 5 canary
    // answers once both variants have 10, two failing in a row. (With this seed stable
    // has its 10th answer after the canary's 15th: the rollback comes at the 25th.)
    let mut failures = 0;
    let mut last = Vec::new();
    for _ in 0..120 {
        let (status, variant) = call(&server, "failing", &[]);
        failures += usize::from(status != 200);
        // A failed answer names the variant that failed, like a good one.
        assert!(
            status == 200 || variant == "canary",
            "{status} from '{variant}'"
        );
        last.push((status, variant));
    }
    assert!(
        (15..=30).contains(&failures),
        "{failures} failed before the rollback: {}",
        strategy(&server, "failing")
    );
    assert!(
        last[60..].iter().all(|(s, v)| *s == 200 && v == "stable"),
        "after the rollback only stable answers: {last:?}"
    );
    eprintln!("canary: {failures} failed answers before the automatic rollback");
    let state = strategy(&server, "failing");
    assert_eq!(state["status"], "rolled-back", "{state}");
    assert!(
        state["reason"].as_str().unwrap().contains("error rate"),
        "{state}"
    );
    server.wait_until("the rollback is audited", || {
        server.logs().contains(r#""kind":"endpoint.state""#)
            && server.logs().contains("rolled back automatically")
    });
}

#[test]
fn shadows_are_compared_and_never_delay_the_answer() {
    let setup = Setup::plugins(&["weighted"]);
    crate::harness::add_fixture(setup.models.path(), "slow");
    let server = setup.start(
        r#"
[server]
shadow_queue = 32
[endpoints.plain]
variants = { main = "iris@2" }
[endpoints.shadowed]
variants = { main = "iris@2", heavy = "slow" }
router = { plugin = "weighted", config = { weights = { main = 1 }, shadows = ["heavy"] } }
[endpoints.compared]
variants = { main = "iris@2", other = "iris@1" }
router = { plugin = "weighted", config = { weights = { main = 1 }, shadows = ["other"] } }
"#,
    );
    // iris v1 in the shadow of v2: the report says how often they pick the same class.
    let (rows, _) = iris_data();
    let shadow = |endpoint: &str, variant: &str| {
        server
            .get_with(&format!("/admin/experiments/{endpoint}"), &[ADMIN])
            .ok()["shadows"][variant]
            .clone()
    };
    // In batches well inside the queue, so that every row gets its shadow run even when
    // other tests keep the shadow thread off the cores for a while.
    for (batch, chunk) in rows.chunks(16).enumerate() {
        for row in chunk {
            let reply = server.post_json("/v2/models/compared/infer", &iris_request(&[*row]));
            assert_eq!(reply.headers["x-modelyard-variant"], "main");
        }
        let sent = (batch * 16 + chunk.len()) as u64;
        server.wait_until("the batch's shadow requests ran", || {
            shadow("compared", "other")["runs"] == sent
        });
    }
    let other = shadow("compared", "other");
    let agreement = other["agreement"].as_f64().unwrap();
    assert!((0.8..1.0).contains(&agreement), "{other}");
    assert_eq!(other["errors"], 0);
    eprintln!(
        "shadow: iris@1 agrees with iris@2 on {agreement:.4} of {} rows",
        rows.len()
    );

    // The slow shadow costs the client nothing: interleave calls with and without it.
    let latency = |endpoint: &str| {
        let started = Instant::now();
        assert_eq!(call(&server, endpoint, &[]).0, 200);
        started.elapsed()
    };
    let (mut plain, mut shadowed) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        plain.push(latency("plain"));
        shadowed.push(latency("shadowed"));
    }
    plain.sort();
    shadowed.sort();
    server.wait_until("the slow shadow is done or dropped", || {
        let heavy = shadow("shadowed", "heavy");
        heavy["runs"].as_u64().unwrap() + heavy["dropped"].as_u64().unwrap() == 100
    });
    let heavy = shadow("shadowed", "heavy");
    let shadow_p50 = Duration::from_micros(heavy["latency_p50_us"].as_u64().unwrap());
    assert!(shadow_p50 >= Duration::from_millis(5), "{heavy}");
    assert!(
        heavy["dropped"].as_u64().unwrap() > 0,
        "a full queue drops: {heavy}"
    );
    let (p50_plain, p50_shadowed) = (plain[50], shadowed[50]);
    eprintln!(
        "shadow: client p50 {p50_plain:?} without, {p50_shadowed:?} with a shadow of p50 {shadow_p50:?}; {} of 100 dropped",
        heavy["dropped"]
    );
    assert!(
        p50_shadowed < p50_plain + shadow_p50 / 4,
        "median with a {shadow_p50:?} shadow {p50_shadowed:?} vs {p50_plain:?} without"
    );
}

#[test]
fn blue_green_switches_atomically_under_load() {
    let setup = Setup::plugins(&["blue-green"]);
    let endpoints = |active: &str| {
        format!(
            r#"{SERVER}
[endpoints.bg]
variants = {{ blue = "iris@1", green = "iris@2" }}
router = {{ plugin = "blue-green", config = {{ active = "{active}" }} }}
"#
        )
    };
    let server = Arc::new(setup.start(&endpoints("blue")));
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (server, stop, served, failed) =
                (server.clone(), stop.clone(), served.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = call(&server, "bg", &[]);
                    let counter = if status == 200 { &served } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(50));
        let switched = admin(&server, "bg", "promote", &json!({}));
        assert_eq!(switched["strategy"]["active"], "green");
        // Instant: the very next request lands on the new colour.
        assert_eq!(call(&server, "bg", &[]).1, "green");
        std::thread::sleep(Duration::from_millis(50));
        admin(&server, "bg", "rollback", &json!({}));
        assert_eq!(call(&server, "bg", &[]).1, "blue");
    }
    // A configuration edit switches too.
    server.write_config(&setup.config(&endpoints("green")));
    server.wait_until("the edit switches to green", || {
        call(&server, "bg", &[]).1 == "green"
    });
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let served = served.load(Ordering::Relaxed);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the switches"
    );
    assert!(served > 500, "only {served} requests under load");
    eprintln!("blue-green: 21 switches under load, {served} requests, 0 failed");
}

#[test]
fn flagd_flags_route_bucket_expire_and_kill() {
    let setup = Setup::plugins(&["flagd", "weighted"]);
    let flags_dir = tempfile::tempdir().unwrap();
    let flags_file = flags_dir.path().join("flags.json");
    let flags = |state: &str| {
        json!({"flags": {
            "new-model": {
                "state": state, "variants": {"on": true, "off": false}, "defaultVariant": "off",
                "targeting": {"if": [{"in": [{"var": "x-country"}, ["NL", "DE"]]}, "on", null]},
                "metadata": {"owner": "ml-platform", "purpose": "try the linear model", "expiry": "2099-12-31"}
            },
            "rollout": {
                "state": "ENABLED", "variants": {"v1": 1, "v2": 2}, "defaultVariant": "v2",
                "targeting": {"fractional": [["v1", 50], ["v2", 50]]},
                "metadata": {"owner": "ml-platform", "expiry": "2020-01-01"}
            }
        }})
        .to_string()
    };
    std::fs::write(&flags_file, flags("ENABLED")).unwrap();
    let server = setup.start(&format!(
        r#"{SERVER}
[endpoints.flagged]
variants = {{ stable = "iris@2", candidate = "iris@1" }}
default_variant = "stable"
attribute_headers = ["x-country"]
router = {{ plugin = "weighted", config = {{ weights = {{ stable = 1 }} }} }}
flags = [{{ plugin = "flagd", config_file = {flags_file:?} }}]
flag_routing = {{ flag = "new-model", variants = {{ on = "candidate" }} }}
[endpoints.rollout]
variants = {{ v1 = "iris@1", v2 = "iris@2" }}
targeting_key_header = "x-user-id"
flags = [{{ plugin = "flagd", config_file = {flags_file:?} }}]
flag_routing = {{ flag = "rollout", variants = {{ v1 = "v1", v2 = "v2" }} }}
"#
    ));
    let country = |c: &str| call(&server, "flagged", &[("x-country", c)]).1;
    assert_eq!(country("NL"), "candidate");
    assert_eq!(country("DE"), "candidate");
    assert_eq!(country("US"), "stable");
    assert_eq!(call(&server, "flagged", &[]).1, "stable");
    // Clients cannot set a flag themselves: `flag.*` parameters are not passed on.
    let mut spoofed = flower();
    spoofed["parameters"] = json!({"flag.new-model": "on"});
    let reply = server.post_json("/v2/models/flagged/infer", &spoofed);
    assert_eq!(reply.headers["x-modelyard-variant"], "stable");
    let view = server.get_with("/admin/endpoints/flagged", &[ADMIN]).ok();
    let reasons: Vec<&str> = view["recent_decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    // The flag overrides the router; values it does not map (`off`) leave the choice to
    // the router, which sends everything to stable.
    assert_eq!(reasons[0], "flag new-model = on", "{view}");
    assert!(reasons[2].starts_with("weight 1 of 1"), "{view}");

    // fractional: half the users each way, each user always the same way.
    let user = |n: usize| call(&server, "rollout", &[("x-user-id", &format!("user-{n}"))]).1;
    let first: Vec<String> = (0..200).map(user).collect();
    let v1 = first.iter().filter(|v| *v == "v1").count();
    assert!((80..=120).contains(&v1), "{v1} of 200 users on v1");
    eprintln!("flags: fractional 50/50 put {v1} of 200 users on v1");
    assert!(
        (0..200).step_by(7).all(|n| user(n) == first[n]),
        "users moved"
    );

    // Expired flags show in the admin API and the log.
    let view = server.get_with("/admin/endpoints/rollout", &[ADMIN]).ok();
    let defined = &view["flag_definitions"][0]["flags"];
    let rollout = defined
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "rollout")
        .unwrap();
    assert_eq!(rollout["expired"], true, "{view}");
    assert_eq!(rollout["metadata"]["owner"], "ml-platform");
    assert!(server.logs().contains("past its expiry date"));

    // The kill switch: DISABLED in the file, and the flag stops overriding at once.
    let temp = flags_dir.path().join(".flags.json.tmp");
    std::fs::write(&temp, flags("DISABLED")).unwrap();
    std::fs::rename(&temp, &flags_file).unwrap();
    server.wait_until("the disabled flag stops routing", || {
        country("NL") == "stable"
    });
}

#[test]
fn ab_assignment_is_sticky_across_restarts_and_weights_change_live() {
    let setup = Setup::plugins(&["weighted"]);
    let endpoints = format!(
        r#"{SERVER}
[endpoints.ab]
variants = {{ a = "iris@1", b = "iris@2" }}
targeting_key_header = "x-user-id"
router = {{ plugin = "weighted", config = {{ weights = {{ a = 1, b = 1 }} }} }}
"#
    );
    let assign = |server: &Server| -> Vec<String> {
        (0..60)
            .map(|n| call(server, "ab", &[("x-user-id", &format!("user-{n}"))]).1)
            .collect()
    };
    let before = assign(&setup.start(&endpoints));
    let on_a = before.iter().filter(|v| *v == "a").count();
    assert!((18..=42).contains(&on_a), "{on_a} of 60 users on a");
    eprintln!("a/b: {on_a} of 60 users on a at 50/50");
    let server = setup.start(&endpoints);
    assert_eq!(assign(&server), before, "a restart moved users");

    let view = server.get_with("/admin/endpoints/ab", &[ADMIN]).ok();
    assert_eq!(view["strategy"]["weights_from"], "configuration");
    let last = view["recent_decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("sticky by targeting key"),
        "{last}"
    );
    server.wait_until("decisions are in the request log", || {
        server
            .logs()
            .lines()
            .any(|l| l.contains("\"routed\"") && l.contains("sticky by targeting key"))
    });

    admin(
        &server,
        "ab",
        "weights",
        &json!({"weights": {"a": 0, "b": 1}}),
    );
    assert!(assign(&server).iter().all(|v| v == "b"));
    let refused = server.post("/admin/endpoints/ab/rollback", &[ADMIN], b"");
    assert!(refused.error(400).contains("weights"));
    assert_eq!(
        server
            .post("/admin/endpoints/ab/explode", &[ADMIN], b"")
            .status,
        404
    );
    assert_eq!(
        server
            .post("/admin/endpoints/nope/promote", &[ADMIN], b"")
            .status,
        404
    );
}

#[test]
fn changing_endpoints_needs_a_configured_admin_token() {
    let setup = Setup::plugins(&["weighted"]);
    let server = setup.start(AB);
    let error = server
        .post(
            "/admin/endpoints/ab/weights",
            &[],
            br#"{"weights": {"a": 1}}"#,
        )
        .error(403);
    assert!(error.contains("[server.tokens"), "{error}");
    // Reading stays open while no token is configured.
    assert_eq!(server.get("/admin/endpoints/ab").status, 200);
}

#[test]
fn the_sample_configuration_serves_every_endpoint() {
    let root = crate::harness::root();
    let absolute = |relative: &str| format!("{:?}", root.join(relative));
    let config = std::fs::read_to_string(root.join("modelyard.toml"))
        .unwrap()
        .replace("dir = \"models\"", &format!("dir = {}", absolute("models")))
        .replace(
            "dir = \"plugins\"",
            &format!("dir = {}", absolute("plugins")),
        )
        .replace("\"plugins/flags.json\"", &absolute("plugins/flags.json"));
    let server = Server::start(&root.join("models"), &config);
    let endpoints = server.get_with("/admin/endpoints", &[ADMIN]).ok();
    let names: Vec<&str> = endpoints["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["error"].is_null(), "{e}");
            e["name"].as_str().unwrap()
        })
        .collect();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        // iris-ab's processor takes flowers by feature name, or as the tensor `features`.
        let mut body = flower();
        if name == "iris-ab" {
            body["inputs"][0]["name"] = json!("features");
        }
        let reply = server.post(
            &format!("/v2/models/{name}/infer"),
            &[("content-type", "application/json"), ("x-user-id", "ann")],
            body.to_string().as_bytes(),
        );
        assert_eq!(
            reply.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&reply.body)
        );
    }
}
