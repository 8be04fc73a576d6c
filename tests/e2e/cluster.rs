//! Many replicas, one endpoint: three real servers sharing strategy state through a real
//! `redis-server` (tests/run installs it). Feedback to any replica, a bandit learning from
//! the rewards all three took, a canary rolled back on all three, an operator's promote
//! seen by all three within a second, and Redis killed and restarted empty under load
//! with no failed inference request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Server, broken_model, coin, iris_request};
use crate::plugins::Setup;

const ADMIN: (&str, &str) = ("authorization", "Bearer let-me-in");
const TOKENS: &str = "[server.tokens.ops]\ntoken = \"let-me-in\"\nrole = \"admin\"\n";

/// A `redis-server` of the test's own, without persistence: a restart empties it.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::on(port)
    }

    fn on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}): tests/run installs it"));
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis.answers() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Killed outright, as a crashed or partitioned Redis would be.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` replicas of one configuration, sharing through `redis`.
fn replicas(setup: &Setup, redis: &Redis, n: usize, sync_ms: u64, endpoints: &str) -> Vec<Server> {
    let config = format!(
        "[cluster]\nredis_url = \"{}\"\nsync_interval_ms = {sync_ms}\n{}",
        redis.url(),
        setup.config(endpoints)
    );
    (0..n)
        .map(|_| Server::start(setup.models.path(), &config))
        .collect()
}

fn infer(server: &Server, endpoint: &str) -> (u16, String, Value) {
    let reply = server.post_json(
        &format!("/v2/models/{endpoint}/infer"),
        &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
    );
    let body = if reply.status == 200 {
        reply.json()
    } else {
        Value::Null
    };
    (reply.status, reply.variant(), body["id"].clone())
}

fn strategy(server: &Server, endpoint: &str) -> Value {
    server
        .get_with(&format!("/admin/endpoints/{endpoint}"), &[ADMIN])
        .ok()["strategy"]
        .clone()
}

/// The endpoint's requests and rewards summed over its variants, as `server` sees them.
fn sums(server: &Server, endpoint: &str) -> (u64, u64) {
    let described = server
        .get_with(&format!("/admin/endpoints/{endpoint}"), &[ADMIN])
        .ok();
    let variants = described["variants"].as_array().unwrap().clone();
    let sum = |key: &str| variants.iter().map(|v| v[key].as_u64().unwrap()).sum();
    (sum("requests"), sum("reward_count"))
}

#[test]
fn feedback_reaches_any_replica_and_a_bandit_learns_from_all_three() {
    let redis = Redis::start();
    let setup = Setup::plugins(&["bandit"]);
    let servers = replicas(
        &setup,
        &redis,
        3,
        100,
        &format!(
            "{TOKENS}[endpoints.bandit]\nvariants = {{ worse = \"iris@1\", better = \"iris@2\" }}\nrouter = {{ plugin = \"bandit\", config = {{ algorithm = \"thompson\" }} }}\n"
        ),
    );
    let mut coin = coin();
    let mut better_late = 0;
    for round in 0..300 {
        // Round robin, and every reward to another replica than the one that answered.
        let answering = &servers[round % 3];
        let (status, variant, id) = infer(answering, "bandit");
        assert_eq!(status, 200);
        assert!(id.as_str().unwrap().starts_with("my-"), "{id}");
        let paid = coin(if variant == "better" { 0.8 } else { 0.2 });
        let taking = &servers[(round + 1) % 3];
        let taken = taking
            .post_json(
                "/v2/models/bandit/feedback",
                &json!({"id": id, "reward": u8::from(paid)}),
            )
            .ok();
        assert_eq!(taken["variant"], variant.as_str(), "{taken}");
        if round >= 200 && variant == "better" {
            better_late += 1;
        }
    }
    println!("three replicas: {better_late} of the last 100 requests went to the better variant");
    assert!(
        better_late >= 70,
        "only {better_late} of the last 100 to the better variant"
    );

    // Every replica sees the sums of all three.
    for server in &servers {
        server.wait_until("the replica sees every request and reward", || {
            sums(server, "bandit") == (300, 300)
        });
    }
    let passed: f64 = servers
        .iter()
        .map(|s| s.metric("modelyard_cluster_feedback_total", &[("outcome", "sent")]))
        .sum();
    assert_eq!(passed, 300.0);
    // An answer no replica gave, and one already rewarded on another replica.
    assert!(
        servers[0]
            .post_json(
                "/v2/models/bandit/feedback",
                &json!({"id": "nobody", "reward": 1})
            )
            .error(404)
            .contains("nobody")
    );
    let (_, _, id) = infer(&servers[1], "bandit");
    let reward = json!({"id": id, "reward": 1});
    assert_eq!(
        servers[2]
            .post_json("/v2/models/bandit/feedback", &reward)
            .status,
        200
    );
    servers[0]
        .post_json("/v2/models/bandit/feedback", &reward)
        .error(404);
    let status = servers[0].get_with("/admin/status", &[ADMIN]).ok();
    assert_eq!(status["cluster"]["replicas"], 3, "{status}");
    assert_eq!(status["cluster"]["redis_reachable"], true, "{status}");
}

#[test]
fn a_canary_is_judged_on_all_traffic_and_a_promote_reaches_every_replica_within_a_second() {
    let redis = Redis::start();
    let setup = Setup::plugins(&["canary"]);
    broken_model(setup.models.path());
    // The default sync interval (250 ms): what operators get.
    let servers = replicas(
        &setup,
        &redis,
        3,
        250,
        &format!(
            r#"{TOKENS}
[endpoints.healthy]
variants = {{ stable = "iris@2", canary = "iris@1" }}
default_variant = "stable"
router = {{ plugin = "canary", config = {{ stable = "stable", canary = "canary", steps = [10, 50], step_requests = 100000 }} }}
[endpoints.failing]
variants = {{ stable = "iris@2", canary = "broken" }}
default_variant = "stable"
router = {{ plugin = "canary", config = {{ stable = "stable", canary = "canary", steps = [50], step_requests = 100000, min_requests = 10, analysis_interval = 5, failure_limit = 2 }} }}
"#
        ),
    );
    // The canary fails every answer; no replica alone sees enough of it to judge quickly,
    // all three together do. Once one rolls it back, every one does.
    let mut failures = 0;
    for round in 0..300 {
        let (status, variant, _) = infer(&servers[round % 3], "failing");
        assert!(
            status == 200 || variant == "canary",
            "{status} from '{variant}'"
        );
        failures += usize::from(status != 200);
        if round % 30 == 29
            && servers
                .iter()
                .all(|s| strategy(s, "failing")["status"] == "rolled-back")
        {
            break;
        }
    }
    for server in &servers {
        server.wait_until("the rollback reaches the replica", || {
            strategy(server, "failing")["status"] == "rolled-back"
        });
        for _ in 0..20 {
            let (status, variant, _) = infer(server, "failing");
            assert_eq!((status, variant.as_str()), (200, "stable"));
        }
    }
    println!("three replicas: {failures} failed answers before the canary was rolled back on all");
    assert!(
        failures <= 60,
        "{failures} failed answers before the rollback"
    );
    let rolled_back_by: Vec<String> = servers
        .iter()
        .flat_map(|s| s.log_events())
        .filter(|e| e["fields"]["message"] == "router state taken from the cluster")
        .map(|e| {
            e["fields"]["endpoint"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        rolled_back_by.iter().any(|e| e == "failing"),
        "{rolled_back_by:?}"
    );

    // An operator promotes on one replica: the others take it within a second.
    let promoted = servers[0]
        .post("/admin/endpoints/healthy/promote", &[ADMIN], b"{}")
        .ok();
    let sent = Instant::now();
    assert_eq!(promoted["shared"], true, "{promoted}");
    for server in &servers[1..] {
        server.wait_until("the promote reaches the replica", || {
            strategy(server, "healthy")["status"] == "promoted"
        });
    }
    let took = sent.elapsed();
    println!(
        "promote seen by all three replicas after {} ms",
        took.as_millis()
    );
    assert!(
        took < Duration::from_secs(1),
        "the promote took {took:?} to reach every replica"
    );
    for server in &servers {
        for _ in 0..10 {
            assert_eq!(infer(server, "healthy").1, "canary");
        }
    }
    // Each replica's audit trail says where the change came from.
    let audit = servers[2]
        .get_with("/admin/audit?endpoint=healthy", &[ADMIN])
        .ok();
    assert!(audit.to_string().contains("replica:"), "{audit}");
}

#[test]
fn redis_killed_and_restarted_empty_mid_run_fails_no_inference_request() {
    let mut redis = Redis::start();
    let setup = Setup::plugins(&["weighted"]);
    let servers: Vec<Arc<Server>> = replicas(
        &setup,
        &redis,
        3,
        100,
        &format!("{TOKENS}[endpoints.ab]\nvariants = {{ a = \"iris@1\", b = \"iris@2\" }}\nrouter = {{ plugin = \"weighted\", config = {{ weights = {{ a = 1, b = 1 }} }} }}\n"),
    )
    .into_iter()
    .map(Arc::new)
    .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed, rewarded) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let (answering, taking) = (servers[i].clone(), servers[(i + 1) % 3].clone());
            let (stop, answered, failed, rewarded) = (
                stop.clone(),
                answered.clone(),
                failed.clone(),
                rewarded.clone(),
            );
            std::thread::spawn(move || {
                let mut again = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (status, _, id) = infer(&answering, "ab");
                    if status != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                    // Feedback for another replica's answer needs Redis to find it: while
                    // it is away, the client is told to send it again (503), which it does
                    // once Redis is back.
                    let reward = json!({"id": id, "reward": 1});
                    match taking.post_json("/v2/models/ab/feedback", &reward).status {
                        200 => {
                            rewarded.fetch_add(1, Ordering::Relaxed);
                        }
                        503 => again.push(reward),
                        other => panic!("feedback answered {other}"),
                    }
                }
                (taking, again)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    redis.kill();
    for server in servers.iter() {
        server.wait_until("the replica notices Redis is gone", || {
            server.metric("modelyard_cluster_redis_up", &[]) == 0.0
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let during = answered.load(Ordering::Relaxed);
    let redis = Redis::on(redis.port);
    for server in servers.iter() {
        server.wait_until("the replica is back in the cluster", || {
            server.metric("modelyard_cluster_redis_up", &[]) == 1.0
        });
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let mut resent = 0;
    for client in clients {
        let (taking, again) = client.join().unwrap();
        for reward in again {
            // Not taken (200 now), or taken before the reply was lost (404 now: the
            // answer exists, so only as taken can it be unknown).
            let status = taking.post_json("/v2/models/ab/feedback", &reward).status;
            assert!(status == 200 || status == 404, "sent again: {status}");
            rewarded.fetch_add(1, Ordering::Relaxed);
            resent += 1;
        }
    }
    let (answered, rewarded) = (
        answered.load(Ordering::Relaxed),
        rewarded.load(Ordering::Relaxed),
    );
    println!(
        "Redis killed and restarted: {answered} answers ({during} before the restart), {} failed, {rewarded} rewards taken ({resent} sent again after a 503)",
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "inference requests failed"
    );
    assert!(answered > during && during > 0);
    assert_eq!(rewarded, answered);
    // Every answer was rewarded exactly once, and everything counted anywhere, through the
    // outage too, is in every replica's sums: the emptied Redis was filled again by the
    // replicas.
    for server in servers.iter() {
        server.wait_until("the sums are whole again", || {
            sums(server, "ab") == (answered, rewarded)
        });
        assert!(server.metric("modelyard_cluster_syncs_total", &[("outcome", "failed")]) > 0.0);
        assert!(
            server
                .logs()
                .contains("cannot exchange with the cluster's Redis")
        );
        assert!(server.logs().contains("the cluster's Redis is back"));
    }
    drop(redis);
}
