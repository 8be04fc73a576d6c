//! `modelyard.toml` under fuzzing: arbitrary text and mutations of a document that sets
//! every key. Whatever the file holds, loading it never panics, and a refusal is a
//! [`ConfigError`] that names the file and, for a bad value or an unknown key, the key.

use proptest::prelude::*;

use super::{Config, ConfigError};
use crate::fuzzing::{Mutated, config, mutated, toml_like_text};

/// Every section and key, each value on its key's line.
const EVERY_KEY: &str = r#"[server]
listen = "127.0.0.1:8080"
max_body_bytes = 1048576
inference_threads = 2
shutdown_grace_seconds = 5
feedback_memory = 1000
shadow_queue = 16
seed = 7
metrics = true
performance_bucket_seconds = 60
max_in_flight = 64
request_timeout_ms = 5000
header_read_timeout_ms = 1000
body_read_timeout_ms = 1000
[server.tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
client_ca = "tls/ca.pem"
[server.tokens.ops]
token = "secret"
role = "admin"
[server.tokens.viewer]
token_env = "VIEWER_TOKEN"
role = "read"
[models]
dir = "models"
onnxruntime_library = "lib/libonnxruntime.so"
[plugins]
dir = "plugins"
cache_dir = "cache"
call_deadline_ms = 10
call_wall_limit_ms = 1000
memory_limit_mib = 64
pooling_allocator = false
[monitoring]
metrics_listen = "127.0.0.1:9090"
database = "modelyard.db"
request_sample = 0.5
request_payloads = true
request_retention = 100
cloudevents_sink = "http://127.0.0.1:9/events"
drift_interval_ms = 1000
[endpoints.iris]
variants = { stable = "iris@2", candidate = "iris@1" }
default_variant = "stable"
fallback_variant = "stable"
latency_budget_ms = 50
router = { plugin = "weighted", config = { weights = { stable = 9, candidate = 1 } } }
on_processor_error = "pass-through"
targeting_key_header = "x-user-id"
attribute_headers = ["x-device"]
flag_routing = { flag = "new-model", variants = { on = "candidate", off = "stable" } }
segment_by = "x-device"
[[endpoints.iris.processors]]
plugin = "iris-features"
config = { order = ["a", "b"], scale = 1.5 }
[[endpoints.iris.flags]]
plugin = "flagd"
config_file = "flags.json"
"#;

/// Loads `text` as a `modelyard.toml`, checking that a refusal names the file.
fn load(dir: &std::path::Path, text: &str) -> Result<Result<Config, String>, TestCaseError> {
    let path = dir.join("modelyard.toml");
    std::fs::write(&path, text).map_err(|e| TestCaseError::fail(e.to_string()))?;
    match Config::load(&path) {
        Ok(config) => Ok(Ok(config)),
        Err(error) => {
            let named = match &error {
                ConfigError::Parse { path: p, .. } | ConfigError::Invalid { path: p, .. } => {
                    *p == path
                }
                ConfigError::Read { .. } => false,
            };
            let message = error.to_string();
            prop_assert!(named && message.contains("modelyard.toml"), "{message}");
            Ok(Err(message))
        }
    }
}

#[test]
fn the_document_sets_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = load(dir.path(), EVERY_KEY).unwrap().unwrap();
    assert_eq!(config.endpoints["iris"].flags[0].plugin, "flagd");
    assert_eq!(config.server.tokens.len(), 2);
}

#[test]
fn a_shadow_queue_allocated_up_front_is_bounded() {
    // The queue's slots are allocated when the server starts: 2^64 - 1 of them aborted it.
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path(), "[server]\nshadow_queue = 18446744073709551615")
        .unwrap()
        .unwrap_err();
    assert!(
        err.contains("server.shadow_queue is 18446744073709551615; at most 65536"),
        "{err}"
    );
    assert!(
        load(dir.path(), "[server]\nshadow_queue = 65536")
            .unwrap()
            .is_ok()
    );
}

#[test]
fn deep_nesting_is_refused_or_read_without_overflowing() {
    let dir = tempfile::tempdir().unwrap();
    let processor = "[[endpoints.e.processors]]\nplugin = \"p\"\n";
    let depth = 100_000;
    for text in [
        format!(
            "{processor}config = {}{}",
            "[".repeat(depth),
            "]".repeat(depth)
        ),
        format!(
            "{processor}config = {}1{}",
            "{ a = ".repeat(depth),
            " }".repeat(depth)
        ),
        format!("{processor}config.{} = 1", ["a"; 20_000].join(".")),
        format!("[{}]", ["a"; 20_000].join(".")),
    ] {
        let _ = load(dir.path(), &text).unwrap();
    }
}

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn fuzz_modelyard_toml_arbitrary_text(text in toml_like_text()) {
        let dir = tempfile::tempdir().unwrap();
        let _ = load(dir.path(), &text)?;
    }

    #[test]
    fn fuzz_modelyard_toml_mutated(Mutated { text, key } in mutated(EVERY_KEY)) {
        let dir = tempfile::tempdir().unwrap();
        if let (Err(message), Some(key)) = (load(dir.path(), &text)?, key) {
            prop_assert!(message.contains(&key), "{key} not named: {message}");
        }
    }
}
