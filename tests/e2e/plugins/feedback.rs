//! Feedback and experiments: rewards credited to the variant that answered, bandits
//! learning from them, A/B reports with significance.

use serde_json::{Value, json};

use super::*;
use crate::harness::{Server, iris_request};

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
    let mut coin = crate::harness::coin();
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
