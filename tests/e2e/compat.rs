//! A real KServe v2 client, `tritonclient[http]`, against the real server: JSON and binary.
//! `tests/run` installs it into a virtualenv and names that Python in
//! MODELYARD_TEST_PYTHON.

use std::process::Command;

use crate::harness::{Server, repository, root};

#[test]
fn tritonclient_works_in_json_and_binary_mode() {
    let python = crate::harness::test_python();
    let models = repository(&[]);
    let server = Server::start(models.path(), "");
    let output = Command::new(python)
        .arg(root().join("tests/compat/tritonclient_check.py"))
        .arg(&server.addr)
        .arg(root().join("models/iris/iris.csv"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tritonclient check failed\nstdout:\n{stdout}\nstderr:\n{}\nserver logs:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.logs()
    );
    assert!(
        stdout.contains("tritonclient: all checks passed"),
        "{stdout}"
    );
}
