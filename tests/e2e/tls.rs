//! HTTPS with real clients (curl and openssl, which do not share rustls with the server):
//! certificates made by openssl for the test, client certificates for `/admin/`, and a
//! renewed certificate picked up without a restart.

use std::path::Path;
use std::process::Command;

use crate::harness::{Server, repository};

/// A new P-256 key, unencrypted: for the CA and each certificate.
const NEW_EC_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl, to make the test's certificates");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key and a certificate `name`.pem / `name`.key with common name `cn`, signed by the
/// test CA, for `usage` (serverAuth or clientAuth).
fn issue(dir: &Path, name: &str, cn: &str, usage: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
    )
    .unwrap();
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let subject = format!("/CN={cn}");
    openssl(
        dir,
        &[
            &["req"][..],
            NEW_EC_KEY,
            &["-keyout", &key, "-out", &csr, "-subj", &subject],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ],
    );
}

fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            NEW_EC_KEY,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=modelyard-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    issue(dir, "server", "modelyard", "serverAuth");
    issue(dir, "client", "operator", "clientAuth");
}

/// Runs curl against the server; the status code (0 when no HTTP answer came) and body.
fn curl(server: &Server, dir: &Path, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("https://{}{path}", server.addr);
    let out = Command::new("curl")
        .current_dir(dir)
        .args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            "ca.pem",
            "-w",
            "\n%{http_code}",
        ])
        .args(extra)
        .arg(&url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The common name of the certificate the server presents now.
fn served_name(server: &Server) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {} </dev/null 2>/dev/null | openssl x509 -noout -subject",
            server.addr
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn https_serves_checks_admin_clients_and_takes_a_renewed_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    certificates(dir);
    let config = format!(
        "[server.tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\nclient_ca = \"{0}/ca.pem\"\n",
        dir.display()
    );
    let models = repository(&[]);
    let server = Server::launch(models.path(), &config);
    server.wait_until("the server is ready over HTTPS", || {
        curl(&server, dir, "/v2/health/ready", &[]).0 == 200
    });
    let row =
        r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;
    let post = ["-H", "content-type: application/json", "--data", row];
    let (status, body) = curl(&server, dir, "/v2/models/iris/infer", &post);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"outputs\""), "{body}");

    // Plain HTTP on the TLS port gets no answer.
    let plain = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(server.url("/v2/health/ready"))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");

    // `/admin/` wants a client certificate the CA signed; other routes do not.
    let (status, body) = curl(&server, dir, "/admin/status", &[]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    let client = ["--cert", "client.pem", "--key", "client.key"];
    let (status, body) = curl(&server, dir, "/admin/status", &client);
    assert_eq!(status, 200, "{body}");

    // A renewed certificate, moved over the old files, serves without a restart.
    assert!(served_name(&server).contains("CN = modelyard"));
    issue(dir, "renewed", "renewed", "serverAuth");
    std::fs::rename(dir.join("renewed.key"), dir.join("server.key")).unwrap();
    std::fs::rename(dir.join("renewed.pem"), dir.join("server.pem")).unwrap();
    server.wait_until("the renewed certificate serves", || {
        served_name(&server).contains("CN = renewed")
    });
    let (status, body) = curl(&server, dir, "/v2/models/iris/infer", &post);
    assert_eq!(status, 200, "{body}");

    // A broken file is refused; the current certificate keeps serving.
    std::fs::write(dir.join("server.pem"), "not a certificate").unwrap();
    server.wait_until("the broken file is refused", || {
        server
            .logs()
            .contains("do not load; the previous certificate keeps serving")
    });
    assert!(served_name(&server).contains("CN = renewed"));
}

#[test]
fn a_server_with_unreadable_tls_files_does_not_start() {
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("cert.pem"), "garbage").unwrap();
    std::fs::write(certs.path().join("key.pem"), "garbage").unwrap();
    let config = format!(
        "[server.tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n",
        certs.path().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("modelyard.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(crate::harness::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cert.pem") && stderr.contains("server.tls.cert"),
        "{stderr}"
    );
}
