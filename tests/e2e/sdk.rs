//! The SDK as plugin authors get it and the contract's versions: `cargo package` makes the
//! SDK crate, which is unpacked outside the workspace; the real binary's `plugin new`
//! writes crates against it, which build into components the binary checks and serves;
//! components built for other versions of the contract load or are refused by the rule.
//!
//! The crates build into `target/scaffold`, kept between runs so wit-bindgen builds once,
//! and `--offline`: every crate they need is one the workspace's own build fetched.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::json;

use crate::harness::{BIN, iris_request, root};
use crate::plugins::{Setup, component};

fn modelyard(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn target() -> PathBuf {
    root().join("target/scaffold")
}

/// The contract version this checkout's host speaks, from the WIT's package line.
fn host_version() -> [u64; 3] {
    let wit = std::fs::read_to_string(root().join("guest-sdk/wit/plugin.wit")).unwrap();
    let version = wit
        .lines()
        .find_map(|l| l.strip_prefix("package modelyard:plugin@"))
        .unwrap()
        .trim_end_matches(';');
    let parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap()).collect();
    [parts[0], parts[1], parts[2]]
}

fn dotted([major, minor, patch]: [u64; 3]) -> String {
    format!("{major}.{minor}.{patch}")
}

/// `cargo package -p modelyard-sdk`, once per run: the .crate file.
fn sdk_crate() -> &'static Path {
    static CRATE: OnceLock<PathBuf> = OnceLock::new();
    CRATE.get_or_init(|| {
        let out = Command::new("cargo")
            .args([
                "package",
                "-p",
                "modelyard-sdk",
                "--no-verify",
                "--allow-dirty",
            ])
            .arg("--target-dir")
            .arg(target())
            .current_dir(root())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let dir = target().join("package");
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("modelyard-sdk-") && n.ends_with(".crate"))
            })
            .unwrap_or_else(|| panic!("no modelyard-sdk .crate in {}", dir.display()))
    })
}

/// The SDK crate unpacked into `target/scaffold/sdk/<label>/` (afresh, at a path that stays
/// the same between runs), its contract stamped with `version` when one is given, as if
/// the SDK had been released for that version. Returns the crate's directory.
fn unpacked_sdk(label: &str, version: Option<[u64; 3]>) -> PathBuf {
    let dir = target().join("sdk").join(label);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new("tar")
        .arg("xzf")
        .arg(sdk_crate())
        .arg("-C")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sdk = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    if let Some(version) = version {
        let wit = sdk.join("wit/plugin.wit");
        let host = format!("package modelyard:plugin@{};", dotted(host_version()));
        let stamped = std::fs::read_to_string(&wit).unwrap().replace(
            &host,
            &format!("package modelyard:plugin@{};", dotted(version)),
        );
        assert!(stamped.contains(&dotted(version)));
        std::fs::write(&wit, stamped).unwrap();
    }
    sdk
}

/// `modelyard plugin new NAME --kind KIND --dir DIR --sdk SDK`.
fn scaffold(dir: &Path, name: &str, kind: &str, sdk: &Path) -> Output {
    modelyard(&[
        "plugin",
        "new",
        name,
        "--kind",
        kind,
        "--dir",
        dir.to_str().unwrap(),
        "--sdk",
        sdk.to_str().unwrap(),
    ])
}

/// Builds a scaffolded crate as its author would, returning the component.
fn build_component(crate_dir: &Path, lib_name: &str) -> PathBuf {
    let build = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--offline"])
        .args(["--target", "wasm32-wasip2"])
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", target())
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", text(&build.stderr));
    target().join(format!("wasm32-wasip2/release/{lib_name}.wasm"))
}

/// A new router crate `name` in `dir` against `sdk`, built.
fn new_router(dir: &Path, name: &str, sdk: &Path) -> PathBuf {
    let out = scaffold(dir, name, "router", sdk);
    assert!(out.status.success(), "{}", text(&out.stderr));
    build_component(&dir.join(name), &name.replace('-', "_"))
}

#[test]
fn plugin_check_names_the_world_and_versions_or_the_reason() {
    let host = dotted(host_version());
    for (name, world, exports) in [
        ("weighted", "router", "configure, route, act, describe"),
        (
            "iris-features",
            "processor",
            "configure, preprocess, postprocess",
        ),
    ] {
        let out = modelyard(&["plugin", "check", component(name, None).to_str().unwrap()]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
        assert!(
            stdout.contains(&format!(
                "a {world} plugin built for modelyard:plugin@{host} (this host speaks modelyard:plugin@{host})"
            )),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("exports: {exports}\n")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("modelyard:plugin/types@{host}")),
            "{stdout}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let text_file = dir.path().join("notes.wasm");
    std::fs::write(&text_file, "hello").unwrap();
    // A core module, not a component: valid wasm, wrong kind.
    let module = dir.path().join("module.wasm");
    std::fs::write(&module, [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]).unwrap();
    for file in [&text_file, &module] {
        let out = modelyard(&["plugin", "check", file.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("not a WebAssembly component"), "{stderr}");
        assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    }
}

#[test]
fn the_packaged_sdk_builds_new_plugins_outside_the_workspace() {
    let sdk = unpacked_sdk("as-packaged", None);
    let dir = tempfile::tempdir().unwrap();
    let out = scaffold(dir.path(), "my-router", "router", &sdk);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cargo build --release --target wasm32-wasip2"));
    // The dependency a crate outside this checkout can use: a version, and the local copy
    // as a patch of the registry's.
    let manifest = std::fs::read_to_string(dir.path().join("my-router/Cargo.toml")).unwrap();
    let version = sdk.file_name().unwrap().to_str().unwrap();
    let version = version.strip_prefix("modelyard-sdk-").unwrap();
    assert!(
        manifest.contains(&format!("modelyard-sdk = \"{version}\"")),
        "{manifest}"
    );
    assert!(
        manifest.contains(&format!(
            "[patch.crates-io]\nmodelyard-sdk = {{ path = {:?} }}",
            sdk.canonicalize().unwrap().display().to_string()
        )),
        "{manifest}"
    );
    let wasm = build_component(&dir.path().join("my-router"), "my_router");
    let out = modelyard(&["plugin", "check", wasm.to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains("a router plugin"),
        "{}",
        text(&out.stderr)
    );

    // A flags plugin from the template: its flag reaches the other plugins as an attribute,
    // beside the targeting key, the request's parameters and the endpoint's headers.
    let out = scaffold(dir.path(), "by-country", "flags", &sdk);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let flags = build_component(&dir.path().join("by-country"), "by_country");
    let setup = Setup::new(&[
        ("by-country.wasm", flags),
        ("echo.wasm", component("fixture-processor", Some("a"))),
    ]);
    let server = setup.start(
        r#"
[endpoints.flagged]
variants = { only = "iris" }
targeting_key_header = "x-user-id"
attribute_headers = ["X-Country"]
[[endpoints.flagged.flags]]
plugin = "by-country"
config = { flag = "new-ui", attribute = "x-country", countries = ["NL"] }
[[endpoints.flagged.processors]]
plugin = "echo"
config = { mode = "echo" }
"#,
    );
    let mut request = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);
    request["parameters"] = json!({"segment": "beta", "tries": 3});
    let reply = server.post(
        "/v2/models/flagged/infer",
        &[("x-user-id", "u-7"), ("x-country", "NL")],
        request.to_string().as_bytes(),
    );
    let body = reply.ok();
    let told = body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "context")
        .unwrap()["data"]
        .clone();
    assert_eq!(
        told,
        json!([
            "endpoint=flagged",
            "targeting_key=u-7",
            "segment=beta",
            "tries=3",
            "x-country=NL",
            "flag.new-ui=on"
        ])
    );

    let again = scaffold(dir.path(), "my-router", "router", &sdk);
    assert!(text(&again.stderr).contains("already exists"));
    let bad = scaffold(dir.path(), "My Router", "flags", &sdk);
    assert!(text(&bad.stderr).contains("is not a crate name"));
}

#[test]
fn a_plugin_built_for_the_previous_minor_version_keeps_loading() {
    let host = dotted(host_version());
    let previous = component("fixture-previous", Some("a"));
    let out = modelyard(&["plugin", "check", previous.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "a router plugin built for modelyard:plugin@0.3.0 (this host speaks modelyard:plugin@{host})"
        )),
        "{stdout}"
    );
    let setup = Setup::new(&[("previous.wasm", previous)]);
    let server = setup.start(
        r#"
[endpoints.pinned]
variants = { a = "iris@1", b = "iris@2" }
router = { plugin = "previous" }
"#,
    );
    for _ in 0..3 {
        let reply = server.post_json(
            "/v2/models/pinned/infer",
            &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
        );
        assert_eq!(reply.ok()["parameters"]["variant"], "b");
    }
    let endpoint = server.get("/admin/endpoints/pinned").json();
    let decisions = endpoint["recent_decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 3, "{endpoint}");
    assert!(
        decisions
            .iter()
            .all(|d| d["reason"] == "built for modelyard:plugin@0.3.0"),
        "{endpoint}"
    );
}

/// Another version on the host's line: the previous release there when there is one, the
/// next until then (wasmtime finds either through the line), and the first version of the
/// next line.
fn neighbours([major, minor, patch]: [u64; 3]) -> ([u64; 3], [u64; 3]) {
    if major == 0 {
        let on = [0, minor, patch.checked_sub(1).unwrap_or(patch + 1)];
        (on, [0, minor + 1, 0])
    } else {
        let on = [major, minor.checked_sub(1).unwrap_or(minor + 1), 0];
        (on, [major + 1, 0, 0])
    }
}

#[test]
fn plugins_built_for_the_hosts_line_load_and_others_are_refused_with_both_versions() {
    let (on_version, off_version) = neighbours(host_version());
    let (host, on, off) = (
        dotted(host_version()),
        dotted(on_version),
        dotted(off_version),
    );
    let dir = tempfile::tempdir().unwrap();
    let on_line = new_router(
        dir.path(),
        "on-line",
        &unpacked_sdk("on-line", Some(on_version)),
    );
    let off_line = new_router(
        dir.path(),
        "off-line",
        &unpacked_sdk("off-line", Some(off_version)),
    );

    let out = modelyard(&["plugin", "check", on_line.to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains(&format!(
            "a router plugin built for modelyard:plugin@{on} (this host speaks modelyard:plugin@{host})"
        )),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = modelyard(&["plugin", "check", off_line.to_str().unwrap()]);
    let refusal = text(&out.stderr);
    assert!(!out.status.success());
    for says in [
        off_line.to_str().unwrap(),
        &format!("built for modelyard:plugin@{off}"),
        &format!("this host speaks modelyard:plugin@{host}"),
    ] {
        assert!(refusal.contains(says), "{says}: {refusal}");
    }

    // Served: the one on the line routes, the other is refused with the same reason.
    let setup = Setup::new(&[("on-line.wasm", on_line), ("off-line.wasm", off_line)]);
    let server = setup.start(
        r#"
[endpoints.pinned]
variants = { a = "iris@1", b = "iris@2" }
router = { plugin = "on-line", config = { variant = "b" } }
"#,
    );
    let reply = server.post_json(
        "/v2/models/pinned/infer",
        &iris_request(&[[5.1, 3.5, 1.4, 0.2]]),
    );
    assert_eq!(reply.ok()["parameters"]["variant"], "b");
    let plugins = server.get("/admin/plugins").json();
    let refused = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "off-line")
        .unwrap();
    assert_eq!(refused["state"], "refused");
    let error = refused["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("plugin 'off-line' is refused: it was built for")
            && error.contains(&format!("modelyard:plugin@{off}"))
            && error.contains(&format!("speaks modelyard:plugin@{host}")),
        "{error}"
    );
}
