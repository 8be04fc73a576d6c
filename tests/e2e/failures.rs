//! Strategies when something genuinely fails: a model that crashes the backend, a
//! processor that answers garbage, a router that traps, a busy machine, a primary that
//! misses its latency budget under full load. Each failure must be charged to the variant
//! or plugin that failed — in its statistics, the metrics, the request log and the admin
//! API — and answered as documented.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::Value;

use crate::harness::{Server, add_fixture, iris_request};
use crate::plugins::{Setup, component};

const ADMIN: (&str, &str) = ("authorization", "Bearer let-me-in");
const TOKENS: &str = "[server.tokens.ops]\ntoken = \"let-me-in\"\nrole = \"admin\"\n";

/// A flower `crashy` crashes on (its first feature is past the model's table).
const CRASHING: [f32; 4] = [7.0, 3.2, 4.7, 1.4];
/// A flower every model answers.
const HEALTHY: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

fn with_fixtures(setup: &Setup, names: &[&str]) {
    for name in names {
        add_fixture(setup.models.path(), name);
    }
}

/// Calls `endpoint` with `row`: status, the answering variant, and the body.
fn call(server: &Server, endpoint: &str, row: [f32; 4]) -> (u16, String, Value) {
    let reply = server.post_json(
        &format!("/v2/models/{endpoint}/infer"),
        &iris_request(&[row]),
    );
    (reply.status, reply.variant(), reply.json())
}

fn admin_get(server: &Server, path: &str) -> Value {
    server.get_with(path, &[ADMIN]).ok()
}

/// The object of the `list` whose `key` is `value`.
fn item(list: &Value, key: &str, value: &str) -> Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v[key] == value)
        .unwrap_or_else(|| panic!("no {key} {value} in {list}"))
        .clone()
}

/// A variant's counters as `/admin/endpoints/{e}` shows them.
fn variant(server: &Server, endpoint: &str, name: &str) -> Value {
    let endpoint = admin_get(server, &format!("/admin/endpoints/{endpoint}"));
    item(&endpoint["variants"], "name", name)
}

/// The value of the one sample of `metric` whose labels include every `(name, value)` of
/// `labels`, or 0 when there is none.
#[test]
fn a_crash_is_the_crashing_variants_error_everywhere_and_the_fallback_answers() {
    let setup = Setup::plugins(&["canary"]);
    with_fixtures(&setup, &["crashy"]);
    let store = tempfile::tempdir().unwrap();
    let config = format!(
        r#"{TOKENS}
[server]
seed = 42
[monitoring]
database = {db:?}
request_sample = 1.0
[endpoints.rollout]
variants = {{ stable = "iris@2", canary = "crashy" }}
default_variant = "stable"
router = {{ plugin = "canary", config = {{ stable = "stable", canary = "canary", steps = [50], step_requests = 100000, min_requests = 10, analysis_interval = 5, failure_limit = 2 }} }}
[endpoints.guarded]
variants = {{ primary = "crashy", backup = "iris@2" }}
default_variant = "primary"
fallback_variant = "backup"
"#,
        db = store.path().join("modelyard.db"),
    );
    let server = setup.start(&config);

    // Called by name, the model crashes for this flower only and keeps serving others.
    let (status, _, body) = call(&server, "crashy", CRASHING);
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("the backend crashed"),
        "{body}"
    );
    assert_eq!(call(&server, "crashy", HEALTHY).0, 200);

    // Through a canary: every crash is the canary's failure, until the canary analysis
    // rolls it back; after that, stable answers everything.
    let mut crashed = 0;
    let mut answers = Vec::new();
    for _ in 0..200 {
        let (status, variant, body) = call(&server, "rollout", CRASHING);
        if status != 200 {
            crashed += 1;
            assert_eq!(
                variant, "canary",
                "a crash names the variant that crashed: {body}"
            );
            assert!(
                body["error"].as_str().unwrap().contains("crashed"),
                "{body}"
            );
        }
        answers.push((status, variant));
    }
    let canary = variant(&server, "rollout", "canary");
    assert_eq!(canary["errors"], crashed, "{canary}");
    assert_eq!(canary["requests"], crashed, "{canary}");
    assert!(crashed >= 10, "{crashed} crashes before the rollback");
    assert!(
        answers[150..]
            .iter()
            .all(|(s, v)| *s == 200 && v == "stable"),
        "rolled back: {answers:?}"
    );
    let state = admin_get(&server, "/admin/endpoints/rollout")["strategy"].clone();
    assert_eq!(state["status"], "rolled-back", "{state}");
    let reason = state["reason"].as_str().unwrap();
    assert!(
        reason.contains("Fisher") && reason.contains("p = "),
        "the verdict names its test and p-value: {reason}"
    );
    eprintln!("crashing canary: {crashed} crashed answers before the rollback: {reason}");
    // The audit trail has the verdict too: each failing analysis and the rollback.
    let audit = admin_get(&server, "/admin/audit?endpoint=rollout&kind=endpoint.state");
    let verdicts: Vec<&Value> = audit["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["to"].as_str().is_some_and(|to| to.contains("Fisher")))
        .collect();
    assert_eq!(
        verdicts.len(),
        2,
        "one failing analysis, then the rollback: {audit}"
    );
    assert!(
        verdicts.iter().any(|c| c["detail"]
            .as_str()
            .is_some_and(|d| d.contains("rolled back") && d.contains("p = "))),
        "{audit}"
    );

    // The same count in the metrics, the experiment report and the request log.
    let crashes = server.metric(
        "modelyard_model_crashes_total",
        &[("model", "crashy"), ("version", "1")],
    );
    assert_eq!(
        crashes,
        (crashed + 1) as f64,
        "one more from the direct call"
    );
    let failed = server.metric(
        "modelyard_requests_total",
        &[
            ("endpoint", "rollout"),
            ("variant", "canary"),
            ("status", "500"),
        ],
    );
    assert_eq!(failed, crashed as f64);
    let experiment = admin_get(&server, "/admin/experiments/rollout");
    let arm = item(&experiment["arms"], "variant", "canary");
    assert_eq!(arm["errors"], crashed, "{experiment}");
    let logged = admin_get(&server, "/admin/requests?endpoint=rollout&limit=1000");
    let canary_errors = logged["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["variant"] == "canary" && r["status"] == "error")
        .count();
    assert_eq!(canary_errors, crashed, "{logged}");

    // With a fallback variant, the crash is answered by the fallback and charged to the
    // variant that crashed.
    for _ in 0..20 {
        let (status, variant, body) = call(&server, "guarded", CRASHING);
        assert_eq!((status, variant.as_str()), (200, "backup"), "{body}");
        assert_eq!(body["parameters"]["fallback"], true, "{body}");
    }
    let primary = variant(&server, "guarded", "primary");
    assert_eq!(
        (primary["requests"].as_u64(), primary["errors"].as_u64()),
        (Some(20), Some(20))
    );
    let charged = |endpoint: &str, variant: &str, reason: &str| {
        server.metric(
            "modelyard_variant_failures_total",
            &[
                ("endpoint", endpoint),
                ("variant", variant),
                ("reason", reason),
            ],
        )
    };
    assert_eq!(charged("guarded", "primary", "crash"), 20.0);
    assert_eq!(charged("rollout", "canary", "crash"), crashed as f64);
    let logged = admin_get(&server, "/admin/requests?endpoint=guarded&limit=1000");
    let fallbacks = logged["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["variant"] == "backup"
                && r["reason"]
                    .as_str()
                    .is_some_and(|why| why.contains("'primary'") && why.contains("crashed"))
        })
        .count();
    assert_eq!(
        fallbacks, 20,
        "the request log names the variant that crashed: {logged}"
    );
    assert_eq!(call(&server, "guarded", HEALTHY).1, "primary");

    // Adding an endpoint is audited under that endpoint's name.
    server.write_config(&format!(
        "{}\n[endpoints.added]\nvariants = {{ only = \"iris@1\" }}\n",
        setup.config(&config)
    ));
    server.wait_until("the new endpoint serves", || {
        call(&server, "added", HEALTHY).0 == 200
    });
    let audit = admin_get(&server, "/admin/audit?endpoint=added");
    assert!(
        audit["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["kind"] == "config.applied" && c["endpoint"] == "added"),
        "{audit}"
    );

    // A restart on the same database continues where the canary stopped: rolled back.
    drop(server);
    let again = setup.start(&config);
    let state = admin_get(&again, "/admin/endpoints/rollout")["strategy"].clone();
    assert_eq!(state["status"], "rolled-back", "after a restart: {state}");
    for _ in 0..20 {
        assert_eq!(call(&again, "rollout", HEALTHY).1, "stable");
    }
}

#[test]
fn every_plugin_failure_is_named_counted_and_shown() {
    let setup = Setup::new(&[
        ("shorty.wasm", component("fixture-processor", Some("a"))),
        ("trapper.wasm", component("fixture-router", Some("a"))),
    ]);
    let server = setup.start(&format!(
        r#"{TOKENS}
[endpoints.garbled]
variants = {{ only = "iris@2" }}
processors = [{{ plugin = "shorty", config = {{ mode = "short" }} }}]
[endpoints.trapping]
variants = {{ a = "iris@1", b = "iris@2" }}
default_variant = "a"
router = {{ plugin = "trapper", config = {{ mode = "panic" }} }}
"#
    ));
    for _ in 0..3 {
        let (status, _, body) = call(&server, "garbled", HEALTHY);
        assert_eq!(status, 500, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("plugin 'shorty'") && error.contains("do not fill its shape"),
            "{error}"
        );
        assert_eq!(call(&server, "trapping", HEALTHY).0, 200);
    }
    let logged = server
        .log_events()
        .into_iter()
        .any(|e| e["fields"]["message"] == "processor failed" && e["fields"]["plugin"] == "shorty");
    assert!(logged, "the log line names the plugin: {}", server.logs());

    let endpoints = admin_get(&server, "/admin/endpoints");
    let find = |name: &str| item(&endpoints["endpoints"], "name", name);
    let processor = &find("garbled")["processors"][0];
    assert_eq!(processor["failures"], 3, "{processor}");
    assert!(
        processor["last_error"]
            .as_str()
            .unwrap()
            .contains("do not fill its shape"),
        "{processor}"
    );
    assert_eq!(find("trapping")["router"]["failures"], 3);

    let plugins = admin_get(&server, "/admin/plugins");
    for (name, why) in [("shorty", "do not fill its shape"), ("trapper", "trapped")] {
        let plugin = item(&plugins["plugins"], "name", name);
        assert_eq!(plugin["failures"], 3, "{plugin}");
        assert!(
            plugin["last_error"].as_str().unwrap().contains(why),
            "{plugin}"
        );
    }
    let counted = |plugin: &str, world: &str, reason: &str| {
        server.metric(
            "modelyard_plugin_failures_total",
            &[("plugin", plugin), ("world", world), ("reason", reason)],
        )
    };
    assert_eq!(counted("shorty", "processor", "invalid"), 3.0);
    assert_eq!(counted("trapper", "router", "trap"), 3.0);
}

/// Runs `work` on `threads` threads until each has done `per_thread` of it; meanwhile two
/// more threads keep both cores busy.
fn under_load(threads: usize, per_thread: usize, work: impl Fn() + Sync) {
    /// Stops the spinning threads however the clients end, a failed assertion included.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    let busy = AtomicBool::new(true);
    std::thread::scope(|scope| {
        let _stop = Stop(&busy);
        for _ in 0..2 {
            scope.spawn(|| {
                let mut x = 0u64;
                while busy.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            });
        }
        let clients: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    for _ in 0..per_thread {
                        work();
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
    });
}

#[test]
fn a_busy_machine_does_not_cut_a_healthy_plugin_and_a_loop_is_still_cut() {
    let setup = Setup::new(&[
        ("weighted.wasm", component("weighted", None)),
        ("looper.wasm", component("fixture-router", Some("a"))),
    ]);
    // A 1 ms CPU budget per call: a wall-clock deadline would cut many calls of a
    // descheduled thread on a machine this busy; CPU time cuts none of a 2 µs router.
    let server = setup.start(&format!(
        r#"call_deadline_ms = 1
{TOKENS}
[endpoints.pinned]
variants = {{ a = "iris@1", b = "iris@2" }}
default_variant = "a"
router = {{ plugin = "weighted", config = {{ weights = {{ a = 0, b = 1 }} }} }}
[endpoints.looping]
variants = {{ a = "iris@1", b = "iris@2" }}
default_variant = "a"
router = {{ plugin = "looper", config = {{ mode = "loop" }} }}
"#
    ));
    let misrouted = Mutex::new(Vec::new());
    let (threads, per_thread) = (8, 250);
    under_load(threads, per_thread, || {
        let (status, variant, body) = call(&server, "pinned", HEALTHY);
        if status != 200 || variant != "b" {
            misrouted.lock().unwrap().push(body);
        }
    });
    let misrouted = misrouted.into_inner().unwrap();
    eprintln!(
        "busy machine: {} of {} requests misrouted",
        misrouted.len(),
        threads * per_thread
    );
    assert!(misrouted.is_empty(), "{misrouted:?}");
    assert_eq!(
        server.metric("modelyard_plugin_failures_total", &[("plugin", "weighted")]),
        0.0
    );

    // A plugin that really loops is still stopped, by its CPU time.
    let (status, variant, body) = call(&server, "looping", HEALTHY);
    assert_eq!((status, variant.as_str()), (200, "a"), "{body}");
    let router = &admin_get(&server, "/admin/endpoints/looping")["router"];
    assert!(
        router["last_error"].as_str().unwrap().contains("CPU time"),
        "{router}"
    );
}

#[test]
fn the_fallback_answers_in_time_when_every_slot_is_taken_by_a_slow_primary() {
    let setup = Setup::plugins(&["flagd"]);
    with_fixtures(&setup, &["slow"]);
    let server = setup.start(&format!(
        r#"{TOKENS}
[endpoints.budgeted]
variants = {{ heavy = "slow", light = "iris@2" }}
default_variant = "heavy"
fallback_variant = "light"
latency_budget_ms = 5
flags = [{{ plugin = "flagd", config = {{ flags = {{ beta = {{ state = "ENABLED", variants = {{ on = true, off = false }}, defaultVariant = "on" }} }} }} }}]
"#
    ));
    let latencies = Mutex::new(Vec::new());
    let (threads, per_thread) = (6, 15);
    under_load(threads, per_thread, || {
        let started = Instant::now();
        let (status, variant, body) = call(&server, "budgeted", HEALTHY);
        let took = started.elapsed();
        assert_eq!((status, variant.as_str()), (200, "light"), "{body}");
        assert_eq!(body["parameters"]["fallback"], true, "{body}");
        latencies.lock().unwrap().push(took);
    });
    let mut latencies = latencies.into_inner().unwrap();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "fallback under full load ({} requests, {threads} clients, 5 ms budget, a {}-slot server): p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        at(0.5),
        at(0.99),
        at(1.0),
    );

    // The slow variant is charged one timed-out error per run the budget gave up on, and
    // nothing more when those runs end; the flags were evaluated once per request.
    let total = threads * per_thread;
    server.wait_until("the abandoned runs have ended", || {
        admin_get(&server, "/admin/endpoints/budgeted")["variants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["running_past_budget"] == 0)
    });
    let heavy = variant(&server, "budgeted", "heavy");
    assert_eq!(heavy["requests"], heavy["errors"], "{heavy}");
    assert!(heavy["requests"].as_u64().unwrap() >= 1, "{heavy}");
    let charged: f64 = ["timeout", "refused"]
        .into_iter()
        .map(|reason| {
            server.metric(
                "modelyard_variant_failures_total",
                &[
                    ("endpoint", "budgeted"),
                    ("variant", "heavy"),
                    ("reason", reason),
                ],
            )
        })
        .sum();
    assert_eq!(charged, heavy["errors"].as_f64().unwrap(), "{heavy}");
    let light = variant(&server, "budgeted", "light");
    assert_eq!(
        light["requests"].as_u64().unwrap() as usize,
        total,
        "{light}"
    );
    assert_eq!(
        server.metric(
            "modelyard_flag_evaluations_total",
            &[("endpoint", "budgeted"), ("flag", "beta")]
        ),
        total as f64
    );
}

#[test]
fn healthy_canaries_survive_scheduling_noise_in_fresh_runs() {
    // Two healthy models a few microseconds apart, every analysis parameter at its default,
    // both cores kept busy: scheduling stalls hit both variants, and none may be taken for
    // a regression.
    let setup = Setup::plugins(&["canary"]);
    let (runs, steps) = (8, "[25, 50, 100]");
    let mut outcomes = Vec::new();
    for _ in 0..runs {
        let server = setup.start(&format!(
            r#"[endpoints.rollout]
variants = {{ stable = "iris@2", canary = "iris@1" }}
default_variant = "stable"
router = {{ plugin = "canary", config = {{ stable = "stable", canary = "canary", steps = {steps}, step_requests = 400 }} }}
"#
        ));
        under_load(2, 601, || {
            assert_eq!(call(&server, "rollout", HEALTHY).0, 200);
        });
        let state = server.get("/admin/endpoints/rollout").ok()["strategy"].clone();
        outcomes.push(state);
    }
    let rolled_back: Vec<&Value> = outcomes
        .iter()
        .filter(|s| s["status"] != "promoted")
        .collect();
    eprintln!(
        "healthy canary: {} of {runs} fresh runs promoted",
        runs - rolled_back.len()
    );
    assert!(rolled_back.is_empty(), "{rolled_back:?}");
}
