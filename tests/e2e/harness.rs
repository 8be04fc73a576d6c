//! Starts the real `modelyard` binary on an ephemeral port, over a model repository of its
//! own in a temporary directory, and talks to it over real HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_modelyard");

/// The repository root, where `models/` and `tests/fixtures/` are.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The Python that `tests/run` sets up with the reference clients and parsers the
/// compatibility and monitoring tests drive (tritonclient, prometheus_client, cloudevents).
pub fn test_python() -> String {
    std::env::var("MODELYARD_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("MODELYARD_TEST_PYTHON is not set: run the suite with tests/run, which installs the Python test clients into a virtualenv")
    })
}

/// Adds a model `broken` whose only version's file is not ONNX, so it is refused.
pub fn broken_model(models: &Path) {
    let version = models.join("broken/1");
    std::fs::create_dir_all(&version).unwrap();
    std::fs::write(version.join("model.onnx"), [0xffu8; 64]).unwrap();
}

/// A model repository holding `iris` and the named fixtures.
pub fn repository(fixtures: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("models/iris"), &dir.path().join("iris"));
    for name in fixtures {
        add_fixture(dir.path(), name);
    }
    dir
}

/// Adds the fixture `name` to the repository `models`: its model as
/// `tests/fixtures/make_fixtures.py` generated it (tests/run does), with the files committed
/// beside it in `tests/fixtures/<name>/` (a `model.toml`).
pub fn add_fixture(models: &Path, name: &str) {
    let generated = root().join("target/fixtures/models").join(name);
    assert!(
        generated.exists(),
        "{} is missing: run the suite with tests/run, which generates the fixture models",
        generated.display()
    );
    copy_dir(&generated, &models.join(name));
    let committed = root().join("tests/fixtures").join(name);
    if committed.exists() {
        copy_dir(&committed, &models.join(name));
    }
}

/// Serves the fixture `name` of `models` on `backend` (`tract` or `onnxruntime`).
pub fn on_backend(models: &Path, name: &str, backend: &str) {
    std::fs::write(
        models.join(name).join("model.toml"),
        format!("backend = \"{backend}\"\n"),
    )
    .unwrap();
}

pub struct Server {
    child: Child,
    pub addr: String,
    logs: Arc<Mutex<Vec<String>>>,
    agent: ureq::Agent,
    config_path: PathBuf,
    _config_dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: u16,
    pub headers: ureq::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The JSON body of a 200, failing with the body otherwise.
    pub fn ok(&self) -> Value {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.body));
        self.json()
    }

    /// The endpoint variant that answered (`x-modelyard-variant`, failed answers too); empty
    /// for a bare model.
    pub fn variant(&self) -> String {
        self.headers
            .get("x-modelyard-variant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    /// The `error` of a protocol error body, checking the status on the way.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()["error"].as_str().unwrap().to_string()
    }
}

impl Server {
    /// Starts a server over `models` with `config` as its `modelyard.toml` and waits until
    /// it is ready.
    pub fn start(models: &Path, config: &str) -> Server {
        let server = Server::launch(models, config);
        // Ready, or done loading and (deliberately, in some tests) without a model.
        server.wait_until("the server has loaded its models", || {
            let ready = server.get("/v2/health/ready");
            ready.status == 200 || String::from_utf8_lossy(&ready.body).contains("no model")
        });
        server
    }

    /// Starts a server and returns once it listens, without asking it anything (it may
    /// speak only HTTPS).
    pub fn launch(models: &Path, config: &str) -> Server {
        let config_dir = tempfile::tempdir().unwrap();
        let config_path = config_dir.path().join("modelyard.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(BIN)
            // Tests read every routing decision from the log.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "info,modelyard::requests=debug".into()),
            )
            .args([
                "--log-format",
                "json",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&config_path)
            .arg("--models")
            .arg(models)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["fields"]["message"] == "listening"
                {
                    let _ = addr_tx.send(event["fields"]["addr"].as_str().unwrap().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("server did not start: {:?}", logs.lock().unwrap()));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Server {
            child,
            addr,
            logs,
            agent,
            config_path,
            _config_dir: config_dir,
        }
    }

    /// Replaces the server's `modelyard.toml` to change endpoints live, the way operators'
    /// tooling should: whole (a hidden file renamed over it), so the watcher never reads
    /// half a file.
    pub fn write_config(&self, text: &str) {
        let temp = self.config_path.with_file_name(".modelyard.toml.tmp");
        std::fs::write(&temp, text).unwrap();
        std::fs::rename(&temp, &self.config_path).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn reply(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut response = response.unwrap();
        Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response
                .body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_to_vec()
                .unwrap(),
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.get_with(path, &[])
    }

    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.agent.get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::reply(request.call())
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut request = self.agent.post(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::reply(request.send(body))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(
            path,
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// The value of one series of `/metrics`, picked by some of its labels (0 when the
    /// series does not exist yet).
    pub fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let text = String::from_utf8(self.get("/metrics").body).unwrap();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let matching: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} "))
            })
            .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(matching.len() <= 1, "{metric} {labels:?}: {matching:?}");
        matching.first().copied().unwrap_or(0.0)
    }

    /// Every log line so far, one JSON object each.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Every log line so far, parsed (the server logs JSON).
    pub fn log_events(&self) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls `condition` for up to 20 s.
    pub fn wait_until(&self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated world for bandits, the same every run: `coin(p)` is true with probability
/// `p` (xorshift).
pub fn coin() -> impl FnMut(f64) -> bool {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    move |p| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// An iris request body for `rows` of four features.
pub fn iris_request(rows: &[[f32; 4]]) -> Value {
    serde_json::json!({
        "inputs": [{
            "name": "input",
            "datatype": "FP32",
            "shape": [rows.len(), 4],
            "data": rows,
        }]
    })
}

/// The iris data set as the model script wrote it: features and labels.
pub fn iris_data() -> (Vec<[f32; 4]>, Vec<usize>) {
    let text = std::fs::read_to_string(root().join("models/iris/iris.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|line| {
            let v: Vec<f32> = line.split(',').map(|x| x.parse().unwrap()).collect();
            ([v[0], v[1], v[2], v[3]], v[4] as usize)
        })
        .unzip()
}

/// Row-wise argmax of a `[n, 3]` probability output given as JSON.
pub fn predicted_classes(output: &Value) -> Vec<usize> {
    let probs: Vec<f64> = output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    probs
        .chunks(3)
        .map(|row| (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap())
        .collect()
}

/// Now, in Unix milliseconds, as the audit trail's filters take it.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
