//! What operators read: readiness and `/admin/status`, model cards as JSON and HTML.

use super::*;
use crate::plugins::Setup;

#[test]
fn readiness_and_status_follow_what_can_serve() {
    let setup = Setup::plugins(&["weighted"]);
    std::fs::write(setup.plugins.path().join("bad.wasm"), b"not wasm").unwrap();
    let iris = setup.models.path().join("iris");
    let parked = tempfile::tempdir().unwrap();
    std::fs::rename(&iris, parked.path().join("iris")).unwrap();
    crate::harness::broken_model(setup.models.path());
    let server = setup.start(&format!(
        "{TOKENS}\n[endpoints.ab]\nvariants = {{ a = \"iris@1\" }}\nrouter = {{ plugin = \"missing\" }}\n"
    ));
    // Live, done loading, and not ready: no model can answer.
    assert_eq!(server.get("/v2/health/live").status, 200);
    assert!(
        server
            .get("/v2/health/ready")
            .error(503)
            .contains("no model can serve")
    );
    assert!(
        server
            .get("/v2/models/broken/ready")
            .error(503)
            .contains("refused")
    );
    let status = server.get_with("/admin/status", &[OPS]).ok();
    assert_eq!(status["ready"], false);
    assert_eq!(status["models"][0]["name"], "broken");
    assert_eq!(status["models"][0]["serving"], false);
    assert!(
        status["models"][0]["versions"][0]["refused"]
            .as_str()
            .unwrap()
            .contains("refused")
    );
    let bad = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bad")
        .unwrap();
    assert_eq!(bad["serving"], false);
    assert_eq!(status["endpoints"][0]["serving"], false);
    assert!(
        status["endpoints"][0]["error"]
            .as_str()
            .unwrap()
            .contains("missing")
    );
    let errors: Vec<String> = status["recent_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        errors.iter().any(|e| e.starts_with("broken:")),
        "{errors:?}"
    );
    assert!(errors.iter().any(|e| e.starts_with("bad:")), "{errors:?}");

    // A model arrives: ready; it leaves again: not ready.
    std::fs::rename(parked.path().join("iris"), &iris).unwrap();
    server.wait_until("ready", || server.get("/v2/health/ready").status == 200);
    assert_eq!(server.get("/v2/models/iris/ready").ok()["ready"], true);
    assert_eq!(server.get_with("/admin/status", &[OPS]).ok()["ready"], true);
    std::fs::rename(&iris, parked.path().join("iris")).unwrap();
    server.wait_until("not ready", || server.get("/v2/health/ready").status == 503);
}

#[test]
fn model_cards_come_as_json_and_as_escaped_html() {
    let setup = Setup::plugins(&[]);
    let toml = setup.models.path().join("iris/model.toml");
    let text = std::fs::read_to_string(&toml).unwrap().replace(
        "limitations = \"",
        "limitations = \"<script>alert(1)</script> ",
    );
    std::fs::write(&toml, text).unwrap();
    let server = setup.start(TOKENS);
    let card = server.get_with("/admin/models/iris/card", &[OPS]).ok();
    assert_eq!(card["name"], "iris");
    assert_eq!(card["owner"], "Modelyard maintainers");
    assert!(
        card["intended_use"]
            .as_str()
            .unwrap()
            .contains("Sample model")
    );
    assert!(
        card["training_data"]
            .as_str()
            .unwrap()
            .contains("150 samples")
    );
    assert_eq!(card["evaluation"]["2"]["accuracy"], 0.9733);
    assert_eq!(card["versions"].as_array().unwrap().len(), 2);
    let history: Vec<(&str, &str)> = card["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["kind"].as_str().unwrap(), c["to"].as_str().unwrap()))
        .collect();
    assert!(
        history.contains(&("model.loaded", "version 1")),
        "{history:?}"
    );
    assert!(
        history.contains(&("model.loaded", "version 2")),
        "{history:?}"
    );

    let html = server.get_with(
        "/admin/models/iris/card",
        &[OPS, ("accept", "text/html,application/xhtml+xml")],
    );
    assert_eq!(html.status, 200);
    assert!(
        html.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = String::from_utf8(html.body).unwrap();
    assert!(page.contains("<h1>Model card: iris</h1>"), "{page}");
    assert!(page.contains("Modelyard maintainers"));
    assert!(page.contains("0.9733"));
    assert!(page.contains("&lt;script&gt;"), "escaped: {page}");
    assert!(!page.contains("<script>"));
    let by_query = server.get_with("/admin/models/iris/card?format=html", &[OPS]);
    assert!(
        String::from_utf8(by_query.body)
            .unwrap()
            .starts_with("<!DOCTYPE html>")
    );
    assert!(
        server
            .get_with("/admin/models/nope/card", &[OPS])
            .error(404)
            .contains("unknown model")
    );
}
