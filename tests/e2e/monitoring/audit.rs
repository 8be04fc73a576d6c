//! The audit trail: every change recorded, kept across a restart.

use serde_json::json;

use super::*;
use crate::plugins::Setup;

#[test]
fn the_audit_trail_records_every_change_and_survives_a_restart() {
    let setup = Setup::plugins(&["weighted", "flagd"]);
    let store = tempfile::tempdir().unwrap();
    let flags_file = store.path().join("flags.json");
    let flags = |state: &str| {
        json!({"flags": {"new-model": {
            "state": state, "variants": {"on": true, "off": false}, "defaultVariant": "on"
        }}})
        .to_string()
    };
    std::fs::write(&flags_file, flags("ENABLED")).unwrap();
    let endpoints = |weight_b: u32| {
        format!(
            r#"{TOKENS}
[monitoring]
database = {db:?}
[endpoints.ab]
variants = {{ a = "iris@1", b = "iris@2" }}
router = {{ plugin = "weighted", config = {{ weights = {{ a = 1, b = {weight_b} }} }} }}
[endpoints.flagged]
variants = {{ stable = "iris@2", candidate = "iris@1" }}
default_variant = "stable"
flags = [{{ plugin = "flagd", config_file = {flags_file:?} }}]
flag_routing = {{ flag = "new-model", variants = {{ on = "candidate" }} }}
"#,
            db = store.path().join("audit.db"),
        )
    };
    let started = crate::harness::unix_ms();
    let server = setup.start(&endpoints(1));
    let loaded = audit(&server, "?kind=plugin");
    assert_eq!(kinds(&loaded), ["plugin.loaded", "plugin.loaded"]);
    assert_eq!(loaded["changes"][0]["actor"], "file");

    // An operator's change, with who, from and to.
    server
        .post(
            "/admin/endpoints/ab/weights",
            &[OPS],
            br#"{"weights": {"a": 0, "b": 1}}"#,
        )
        .ok();
    let weights = audit(&server, "?endpoint=ab&kind=endpoint");
    let change = &weights["changes"][0];
    assert_eq!(change["kind"], "endpoint.weights");
    assert_eq!(change["actor"], "ops");
    assert_eq!(change["subject"], "ab");
    assert!(
        change["to"].as_str().unwrap().contains("\"b\":1"),
        "{change}"
    );

    // A plugin file refused, then a configuration refused and one applied.
    std::fs::write(setup.plugins.path().join("bad.wasm"), b"not wasm").unwrap();
    server.wait_until("the refused plugin is audited", || {
        kinds(&audit(&server, "?kind=plugin")).contains(&"plugin.refused".to_string())
    });
    server.write_config("[endpoints.ab\nbroken");
    server.wait_until("the refused configuration is audited", || {
        kinds(&audit(&server, "?kind=config")) == ["config.refused"]
    });
    server.write_config(&endpoints(3));
    server.wait_until("the applied configuration is audited", || {
        kinds(&audit(&server, "?kind=config")) == ["config.applied", "config.refused"]
    });
    let applied = &audit(&server, "?kind=config.applied")["changes"][0];
    assert!(
        applied["detail"].as_str().unwrap().contains("ab"),
        "{applied}"
    );

    // A flag flipped in its file.
    let temp = store.path().join(".flags.json.tmp");
    std::fs::write(&temp, flags("DISABLED")).unwrap();
    std::fs::rename(&temp, &flags_file).unwrap();
    server.wait_until("the flag flip is audited", || {
        !kinds(&audit(&server, "?kind=flag")).is_empty()
    });
    let flip = &audit(&server, "?kind=flag&endpoint=flagged")["changes"][0];
    assert_eq!(flip["subject"], "new-model");
    assert_eq!(flip["from"], "ENABLED, default on");
    assert_eq!(flip["to"], "DISABLED, default on");

    // A model version removed from disk.
    std::fs::remove_dir_all(setup.models.path().join("iris/1")).unwrap();
    server.wait_until("the unloaded version is audited", || {
        kinds(&audit(&server, "?kind=model&subject=iris")).contains(&"model.unloaded".to_string())
    });

    // Filters by time, and pages.
    let all = audit(&server, "?limit=1000");
    let total = all["changes"].as_array().unwrap().len();
    assert!(total >= 10, "{all}");
    assert_eq!(
        audit(&server, &format!("?since={started}&limit=1000"))["changes"]
            .as_array()
            .unwrap()
            .len(),
        total
    );
    assert!(
        audit(&server, "?until=2000-01-01T00:00:00Z")["changes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let mut seen = Vec::new();
    let mut query = "?limit=4".to_string();
    loop {
        let page = audit(&server, &query);
        seen.extend(
            page["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_i64().unwrap()),
        );
        match page["next"].as_i64() {
            Some(next) => query = format!("?limit=4&before={next}"),
            None => break,
        }
    }
    let expected: Vec<i64> = all["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert_eq!(seen, expected);
    assert!(
        server
            .get_with("/admin/audit?since=yesterday", &[OPS])
            .error(400)
            .contains("RFC 3339")
    );
    assert!(
        server
            .get_with("/admin/audit?colour=red", &[OPS])
            .error(400)
            .contains("filters")
    );

    // A new process on the same database still has all of it.
    drop(server);
    let again = setup.start(&endpoints(3));
    let after = audit(&again, "?limit=1000");
    let ids: Vec<i64> = after["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert!(expected.iter().all(|id| ids.contains(id)), "{after}");
    assert!(
        ids.len() > expected.len(),
        "the restart's own loads are recorded too"
    );
}
