//! Where plugin code comes from: with `plugins.require_signatures`, only components signed
//! (with the real `modelyard plugin keygen` and `sign`) by a trusted key load, and pinned
//! ones only with their pinned SHA-256; the rest are refused with the reason in the admin
//! API and the audit trail. `plugin verify` says the same by its exit status. And a compiled-plugin cache other users could write stops the
//! server from starting.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;
use crate::harness::{BIN, iris_request};

fn modelyard(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Makes a key pair with `modelyard plugin keygen`: the private key file and the public key.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = modelyard(&[
        "plugin".as_ref(),
        "keygen".as_ref(),
        "--out".as_ref(),
        key.as_ref(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    (
        key,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

fn sign(key: &Path, file: &Path) {
    let out = modelyard(&[
        "plugin".as_ref(),
        "sign".as_ref(),
        "--key".as_ref(),
        key.as_ref(),
        file.as_ref(),
    ]);
    assert!(out.status.success(), "{out:?}");
}

/// `modelyard plugin verify --key <public> <file>`: exit status and what it said.
fn verify(public: &str, file: &Path) -> (i32, String) {
    let out = modelyard(&[
        "plugin".as_ref(),
        "verify".as_ref(),
        "--key".as_ref(),
        public.as_ref(),
        file.as_ref(),
    ]);
    let said = [out.stdout, out.stderr].concat();
    (out.status.code().unwrap(), String::from_utf8(said).unwrap())
}

fn plugin_states(server: &crate::harness::Server) -> Vec<(String, String, String)> {
    server.get("/admin/plugins").json()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["state"].as_str().unwrap().to_string(),
                p["refused"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn only_plugins_signed_by_a_trusted_key_and_as_pinned_load() {
    let keys = tempfile::tempdir().unwrap();
    let (trusted, public) = keygen(keys.path(), "trusted.pem");
    let (stranger, _) = keygen(keys.path(), "stranger.pem");
    let setup = Setup::new(&[
        ("weighted.wasm", component("weighted", None)),
        ("iris-features.wasm", component("iris-features", None)),
        ("untrusted.wasm", component("weighted", None)),
        ("tampered.wasm", component("iris-features", None)),
        ("pinned.wasm", component("weighted", None)),
    ]);
    let dir = setup.plugins.path();
    sign(&trusted, &dir.join("weighted.wasm"));
    sign(&stranger, &dir.join("untrusted.wasm"));
    // Signed as one component, then swapped for another under the same signature.
    sign(&trusted, &dir.join("tampered.wasm"));
    drop_in(&component("weighted", None), dir, "tampered.wasm");
    // Well signed, but pinned to another component's hash.
    sign(&trusted, &dir.join("pinned.wasm"));
    let sha256 = |name: &str| {
        let bytes = std::fs::read(component(name, None)).unwrap();
        modelyard::plugins::component_hash(&bytes)
    };
    let (weighted, features) = (sha256("weighted"), sha256("iris-features"));

    let config = format!(
        "require_signatures = true\ntrusted_keys = [{public:?}]\n\
         [plugins.pinned]\nweighted = {weighted:?}\npinned = {features:?}\n{AB}\
         [endpoints.features]\nvariants = {{ only = \"iris\" }}\n\
         [[endpoints.features.processors]]\nplugin = \"iris-features\"\n"
    );
    let server = setup.start(&config);
    let request = iris_request(&[[5.1, 3.5, 1.4, 0.2]]);

    // The signed router serves; the `.sig` files are not plugins.
    assert_eq!(
        server.post_json("/v2/models/ab/infer", &request).status,
        200
    );
    let states = plugin_states(&server);
    let names: Vec<&str> = states.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "iris-features",
            "pinned",
            "tampered",
            "untrusted",
            "weighted"
        ]
    );
    for (name, state, refused) in &states {
        let reason = match name.as_str() {
            "weighted" => {
                assert_eq!(state, "serving");
                continue;
            }
            "iris-features" => "not signed: there is no iris-features.wasm.sig beside it",
            "untrusted" => "which is not a trusted key",
            "pinned" => "not the one plugins.pinned gives for 'pinned'",
            _ => "does not match its bytes",
        };
        assert_eq!(state, "refused", "{name}");
        assert!(refused.contains(reason), "{name}: {refused}");
    }
    let error = server
        .post_json("/v2/models/features/infer", &flowers())
        .error(503);
    assert!(error.contains("not signed"), "{error}");

    // Each refusal is in the audit trail with its reason; the load says who signed it.
    let audit = |kind: &str| -> Vec<Value> {
        server.get(&format!("/admin/audit?kind={kind}")).json()["changes"]
            .as_array()
            .unwrap()
            .clone()
    };
    server.wait_until("the three refusals are audited with their reasons", || {
        let refused = audit("plugin.refused");
        [
            ("iris-features", "not signed"),
            ("untrusted", "not a trusted key"),
            ("tampered", "does not match its bytes"),
            ("pinned", "plugins.pinned"),
        ]
        .iter()
        .all(|(name, reason)| {
            refused
                .iter()
                .any(|c| c["subject"] == *name && c["detail"].as_str().unwrap().contains(reason))
        })
    });
    let loaded = audit("plugin.loaded");
    assert!(
        loaded.iter().any(|c| c["subject"] == "weighted"
            && c["to"]
                .as_str()
                .unwrap()
                .contains(&format!("pinned, signed by {public}"))),
        "{loaded:?}"
    );

    // Signing the unsigned component in place is picked up by the live rescan.
    sign(&trusted, &dir.join("iris-features.wasm"));
    server.wait_until("the newly signed plugin loads", || {
        server
            .post_json("/v2/models/features/infer", &flowers())
            .status
            == 200
    });
    // A signature replaced by a stranger's is a change too: the file is refused again
    // (and the version that loaded keeps serving).
    sign(&stranger, &dir.join("iris-features.wasm"));
    server.wait_until("the re-signed plugin is refused", || {
        plugin_states(&server).iter().any(|(n, s, r)| {
            n == "iris-features"
                && s.starts_with("serving previous")
                && r.contains("not a trusted key")
        })
    });

    // `plugin verify` agrees, by exit status.
    let (status, said) = verify(&public, &dir.join("weighted.wasm"));
    assert_eq!(
        (status, said.trim()),
        (
            0,
            format!(
                "{}: signed by {public}",
                dir.join("weighted.wasm").display()
            )
            .as_str()
        )
    );
    for (name, reason) in [
        ("tampered.wasm", "does not match its bytes"),
        ("untrusted.wasm", "not a trusted key"),
        ("iris-features.wasm", "not a trusted key"),
    ] {
        let (status, said) = verify(&public, &dir.join(name));
        assert_eq!(status, 1, "{name}: {said}");
        assert!(said.contains(reason), "{name}: {said}");
    }
    std::fs::remove_file(dir.join("untrusted.wasm.sig")).unwrap();
    let (status, said) = verify(&public, &dir.join("untrusted.wasm"));
    assert_eq!(status, 1);
    assert!(said.contains("not signed"), "{said}");
}

#[test]
fn a_cache_directory_others_can_write_stops_the_server() {
    let setup = Setup::plugins(&["weighted"]);
    std::fs::set_permissions(setup.cache.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("modelyard.toml");
    std::fs::write(&config, setup.config(AB)).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--models")
        .arg(setup.models.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the server started over a cache directory open to everyone");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let chmod = format!("chmod 700 {}", setup.cache.path().display());
    assert!(stderr.contains(&chmod), "{stderr}");
    assert!(stderr.contains("plugins.cache_dir"), "{stderr}");
}
