//! Hostile plugins (loops, sleeps, memory, panics, errors) never take the server down.

use super::*;
use crate::harness::iris_request;

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
