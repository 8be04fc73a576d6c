//! Starting and stopping: SIGTERM and SIGINT stop accepting, finish what is in flight and
//! exit 0.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::{Server, iris_request, repository};

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_zero() {
    let models = repository(&[]);
    let mut server = Server::start(models.path(), "");
    let body = iris_request(&[[5.1, 3.5, 1.4, 0.2]]).to_string();
    let (head, tail) = body.split_at(body.len() / 2);

    // A request whose body is only half sent when the signal arrives.
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    write!(
        stream,
        "POST /v2/models/iris/infer HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    server.signal("TERM");

    server.wait_until("new connections are refused", || {
        TcpStream::connect(&server.addr).is_err()
    });
    stream.write_all(tail.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"model_version\":\"2\""), "{reply}");

    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "logs:\n{}", server.logs());
    server.wait_until("the shutdown is logged", || {
        server.logs().contains("shutting down")
    });
}

#[test]
fn sigint_exits_zero() {
    let models = repository(&[]);
    let mut server = Server::start(models.path(), "");
    server.signal("INT");
    assert_eq!(
        server.wait_exit().code(),
        Some(0),
        "logs:\n{}",
        server.logs()
    );
}

#[test]
fn a_missing_model_directory_is_a_clear_startup_error() {
    // With no configuration file, the server keeps its database in the working directory.
    let cwd = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(crate::harness::BIN)
        .current_dir(cwd.path())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--models",
            "/nonexistent/modelyard-models",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/modelyard-models") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn help_explains_the_commands() {
    let output = std::process::Command::new(crate::harness::BIN)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for needle in ["serve", "--log-format"] {
        assert!(help.contains(needle), "{help}");
    }
    let output = std::process::Command::new(crate::harness::BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in ["--config", "--listen", "--models", "SIGTERM"] {
        assert!(help.contains(needle), "{help}");
    }
}
