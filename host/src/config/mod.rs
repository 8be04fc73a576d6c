//! `modelyard.toml`: the operator's settings, with a default for every one so that the
//! server runs with no file at all. Relative paths are taken from the file's directory.
//!
//! Owns: reading and checking the file. Must not touch: anything the settings configure.

mod keys;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use keys::PublicKey;

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub models: ModelsConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    #[serde(default)]
    pub monitoring: MonitoringConfig,
    /// Names clients call, each served by variants chosen by plugins.
    #[serde(default)]
    pub endpoints: BTreeMap<String, EndpointConfig>,
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// `[cluster]`: replicas that share their strategies' state through Redis, so that many
/// behave as one endpoint. Without `redis_url` every replica keeps its own, in memory.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub redis_url: Option<String>,
    /// The prefix of every key: deployments that share a Redis keep apart by it.
    pub namespace: String,
    /// This replica's name, unique among the replicas; by default the host name (the pod's
    /// name on Kubernetes) and a random suffix, new at every start.
    pub replica: Option<String>,
    /// How often a replica sends what it counted and changed, and reads what the others
    /// did: the staleness of the shared view, and how soon an action reaches every replica.
    pub sync_interval_ms: u64,
    /// How long the counts of a replica that stopped reporting stay in the sums.
    pub replica_retention_seconds: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: None,
            namespace: "modelyard".to_string(),
            replica: None,
            sync_interval_ms: 250,
            replica_retention_seconds: 86_400,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Where operators drop `*.wasm` components; watched while the server runs.
    pub dir: PathBuf,
    /// Compiled components, kept between runs; outside `dir`, writable by the server alone.
    /// Default: `$XDG_CACHE_HOME/modelyard`, else `$HOME/.cache/modelyard`.
    pub cache_dir: Option<PathBuf>,
    /// Refuse every component without a `<file>.wasm.sig` made by one of `trusted_keys`.
    pub require_signatures: bool,
    /// The ed25519 public keys (base64) whose signatures are trusted.
    pub trusted_keys: Vec<PublicKey>,
    /// `[plugins.pinned]`: plugin name → the hex SHA-256 its file must have.
    pub pinned: BTreeMap<String, String>,
    /// CPU time one plugin call may take (the guest's own thread's CPU time: a call that
    /// is merely descheduled on a busy machine is not cut).
    pub call_deadline_ms: u64,
    /// Wall-clock time one call, or making and configuring a fresh instance, may take:
    /// the backstop for running code that gets no CPU for that long (a plugin may not wait
    /// in a host call at all).
    pub call_wall_limit_ms: u64,
    /// Memory one plugin instance may use.
    pub memory_limit_mib: usize,
    /// Preallocate instance slots: cheaper fresh instances, where the host allows the
    /// address-space reservation (see BENCHMARKS.md).
    pub pooling_allocator: bool,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("plugins"),
            cache_dir: None,
            require_signatures: false,
            trusted_keys: Vec::new(),
            pinned: BTreeMap::new(),
            call_deadline_ms: 10,
            call_wall_limit_ms: 1_000,
            memory_limit_mib: 64,
            pooling_allocator: false,
        }
    }
}

/// One endpoint: `[endpoints.<name>]`.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Variant name → `model@version`, or `model` for its default version.
    pub variants: BTreeMap<String, String>,
    /// The variant that answers without a router, or when the router fails.
    pub default_variant: Option<String>,
    /// The variant (a simpler model, say) that answers when the routed one fails or takes
    /// longer than `latency_budget_ms`; such answers say `"fallback": true`.
    pub fallback_variant: Option<String>,
    /// How long the routed variant may take before the fallback answers instead.
    pub latency_budget_ms: Option<u64>,
    pub router: Option<PluginRef>,
    #[serde(default)]
    pub processors: Vec<PluginRef>,
    #[serde(default)]
    pub flags: Vec<PluginRef>,
    #[serde(default)]
    pub on_processor_error: ProcessorFailure,
    /// The header whose value is the request's targeting key (e.g. `x-user-id`).
    pub targeting_key_header: Option<String>,
    /// Headers passed to plugins as attributes, under their lowercase names.
    #[serde(default)]
    pub attribute_headers: Vec<String>,
    /// A flag whose value picks the variant, overriding the router.
    pub flag_routing: Option<FlagRouting>,
    /// The request attribute (a parameter, or one of `attribute_headers`) whose values
    /// split accuracy and reward into segments: `region`, `x-device`…
    pub segment_by: Option<String>,
}

/// `flag_routing = { flag = "new-model", variants = { on = "candidate", off = "stable" } }`:
/// when the endpoint's flags give `new-model` a listed value, that variant answers.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagRouting {
    pub flag: String,
    /// Flag variant → endpoint variant.
    pub variants: BTreeMap<String, String>,
}

/// What a failing processor does to the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessorFailure {
    /// The request fails with 500 and the plugin's error.
    #[default]
    Fail,
    /// The tensors go on as they were, as if the processor were not there.
    PassThrough,
}

/// A plugin and its configuration, as endpoints name them.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    /// The component's file name in the plugin directory, without `.wasm`.
    pub plugin: String,
    /// Handed to the plugin's `configure` as JSON.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// A JSON file handed to `configure` instead of `config` (a flagd flag file, say);
    /// reread whenever it changes.
    pub config_file: Option<PathBuf>,
}

/// The configuration of a plugin whose table gives none.
pub fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, `host:port`.
    pub listen: String,
    /// Request bodies above this are refused with 413.
    pub max_body_bytes: usize,
    /// Model runs at once; 0 means one per available core.
    pub inference_threads: usize,
    /// After SIGINT/SIGTERM, how long in-flight requests may take before the server exits.
    pub shutdown_grace_seconds: u64,
    /// Who may use the operator API under /admin/, by name: `[server.tokens.<name>]`.
    pub tokens: BTreeMap<String, TokenConfig>,
    /// How many recent endpoint answers are remembered for the feedback API.
    pub feedback_memory: usize,
    /// Shadow requests waiting to run; more are dropped (and counted) rather than queued.
    pub shadow_queue: usize,
    /// Seeds the per-request randomness routers draw from, so that the same requests in
    /// the same order get the same decisions; unset, every run draws afresh.
    pub seed: Option<u64>,
    /// Count requests for Prometheus and serve them at `/metrics`.
    pub metrics: bool,
    /// The width of the time buckets accuracy and reward are reported in.
    pub performance_bucket_seconds: u64,
    /// Inference requests the server holds at once, reading, waiting or running; beyond
    /// it, 503 with `Retry-After` at once rather than a queue without end.
    pub max_in_flight: usize,
    /// How long a client waits for an answer unless its `timeout` parameter says less;
    /// past it, the waits stop (503) or, for a run already going, the client gets 504.
    /// 0: no server deadline.
    pub request_timeout_ms: u64,
    /// A connection that has not sent a whole request head in this time is closed (also
    /// an idle keep-alive connection, and the TLS handshake).
    pub header_read_timeout_ms: u64,
    /// A request body not received whole in this time is answered 408.
    pub body_read_timeout_ms: u64,
    /// Serve HTTPS: `[server.tls]` with `cert` and `key` (PEM files, reloaded when they
    /// change) and optionally `client_ca`.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: the listeners' certificate, and who may use `/admin/`.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM): when set, `/admin/` answers only clients that present a
    /// certificate one of them signed; other routes still take any client.
    pub client_ca: Option<PathBuf>,
}

/// A bearer token for the admin API and what it may do.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The token itself; or name an environment variable that holds it with `token_env`.
    pub token: Option<String>,
    pub token_env: Option<String>,
    pub role: Role,
}

/// `read` may look at `/admin/`; `admin` may also change endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Admin,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".to_string(),
            max_body_bytes: 64 * 1024 * 1024,
            inference_threads: 0,
            shutdown_grace_seconds: 30,
            tokens: BTreeMap::new(),
            feedback_memory: 100_000,
            shadow_queue: 1024,
            seed: None,
            metrics: true,
            performance_bucket_seconds: 60,
            max_in_flight: 256,
            request_timeout_ms: 60_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            tls: None,
        }
    }
}

/// `[monitoring]`: where metrics are served, what is kept of requests and changes.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    /// Serve `/metrics` on this address alone (`host:port`) instead of the main port, so
    /// that scrapes stay off the network clients reach.
    pub metrics_listen: Option<String>,
    /// The SQLite file that keeps the audit trail and the sampled requests across
    /// restarts; `""` keeps nothing (changes are still logged).
    pub database: PathBuf,
    /// The share of inference requests recorded in the store, 0 to 1.
    pub request_sample: f64,
    /// Record the sampled requests' input and output tensors too.
    pub request_payloads: bool,
    /// Sampled requests kept in the store; the oldest go first.
    pub request_retention: u64,
    /// Also send each sampled request as a CloudEvent (binary mode) to this HTTP URL.
    pub cloudevents_sink: Option<String>,
    /// How often drift is recomputed, and threshold flips logged.
    pub drift_interval_ms: u64,
    /// What one CPU core costs an hour, in the operator's currency: with it, the cost of a
    /// million predictions per model version and variant (dashboard, `/admin/cost`,
    /// `/metrics`); without it, CPU time alone.
    pub core_hour_price: Option<f64>,
    /// Seconds between two points of the per-endpoint history the dashboard draws (an
    /// hour of it is kept), 1 to 60.
    pub history_step_seconds: u64,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            metrics_listen: None,
            database: PathBuf::from("modelyard.db"),
            request_sample: 0.01,
            request_payloads: false,
            request_retention: 100_000,
            cloudevents_sink: None,
            drift_interval_ms: 1000,
            core_hour_price: None,
            history_step_seconds: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// The model repository: `<dir>/<name>/<version>/model.onnx`.
    pub dir: PathBuf,
    /// The ONNX Runtime shared library (`ORT_DYLIB_PATH` wins over it); by default the one
    /// the set-up installs (`../onnxruntime/` from the binary), else the system's.
    pub onnxruntime_library: Option<PathBuf>,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: PathBuf::from("models"),
            onnxruntime_library: None,
        }
    }
}

/// The most shadow requests that may wait (`server.shadow_queue`).
const MAX_SHADOW_QUEUE: usize = 1 << 16;

/// A settings file that cannot be used, with its path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// Reads a TOML settings file: `modelyard.toml` here, `model.toml` in the registry.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = read_toml(path)?;
        let plugins = &config.plugins;
        if plugins.call_deadline_ms == 0 || plugins.call_wall_limit_ms < plugins.call_deadline_ms {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problem: format!(
                    "plugins.call_deadline_ms is {} and plugins.call_wall_limit_ms {}; the CPU \
                     deadline must be above 0 and the wall-clock limit at least as long (a \
                     shorter one would cut calls by the clock again)",
                    plugins.call_deadline_ms, plugins.call_wall_limit_ms
                ),
            });
        }
        let server = &config.server;
        for (key, value) in [
            ("max_in_flight", server.max_in_flight as u64),
            ("header_read_timeout_ms", server.header_read_timeout_ms),
            ("body_read_timeout_ms", server.body_read_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    problem: format!(
                        "server.{key} is 0; it bounds what a client can hold, so it must be above 0"
                    ),
                });
            }
        }
        if plugins.require_signatures && plugins.trusted_keys.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problem: "plugins.require_signatures is true but plugins.trusted_keys is \
                          empty: no plugin could load; add the public key that \
                          `modelyard plugin keygen` printed"
                    .to_string(),
            });
        }
        for (name, hash) in &mut config.plugins.pinned {
            if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    problem: format!(
                        "plugins.pinned.{name} is '{hash}', not a SHA-256 (64 hex digits, as \
                         `sha256sum` or GET /admin/plugins show it)"
                    ),
                });
            }
            hash.make_ascii_lowercase();
        }
        let monitoring = &config.monitoring;
        if monitoring
            .core_hour_price
            .is_some_and(|p| !p.is_finite() || p < 0.0)
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problem: format!(
                    "monitoring.core_hour_price is {}; write what one CPU core costs an hour, \
                     a number of 0 or more (e.g. 0.04)",
                    monitoring.core_hour_price.unwrap_or_default()
                ),
            });
        }
        if !(1..=60).contains(&monitoring.history_step_seconds) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problem: format!(
                    "monitoring.history_step_seconds is {}; it must be 1 to 60 (an hour of \
                     points is kept per endpoint)",
                    monitoring.history_step_seconds
                ),
            });
        }
        let cluster = &config.cluster;
        for (key, value, max) in [
            ("sync_interval_ms", cluster.sync_interval_ms, 60_000),
            (
                "replica_retention_seconds",
                cluster.replica_retention_seconds,
                30 * 86_400,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    problem: format!("cluster.{key} is {value}; between 1 and {max}"),
                });
            }
        }
        if cluster.namespace.is_empty() || cluster.replica.as_ref().is_some_and(String::is_empty) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problem: "cluster.namespace and cluster.replica, when given, must not be empty"
                    .to_string(),
            });
        }
        // The shadow queue's slots are allocated when the server starts.
        if config.server.shadow_queue > MAX_SHADOW_QUEUE {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problem: format!(
                    "server.shadow_queue is {}; at most {MAX_SHADOW_QUEUE}",
                    config.server.shadow_queue
                ),
            });
        }
        if let Some(base) = path.parent() {
            config.models.dir = base.join(&config.models.dir);
            config.models.onnxruntime_library =
                config.models.onnxruntime_library.map(|l| base.join(l));
            config.plugins.dir = base.join(&config.plugins.dir);
            config.plugins.cache_dir = config.plugins.cache_dir.map(|d| base.join(d));
            if let Some(tls) = &mut config.server.tls {
                tls.cert = base.join(&tls.cert);
                tls.key = base.join(&tls.key);
                tls.client_ca = tls.client_ca.take().map(|ca| base.join(ca));
            }
            if !config.monitoring.database.as_os_str().is_empty() {
                config.monitoring.database = base.join(&config.monitoring.database);
            }
            for endpoint in config.endpoints.values_mut() {
                let refs = endpoint.router.iter_mut();
                for plugin in refs
                    .chain(endpoint.processors.iter_mut())
                    .chain(endpoint.flags.iter_mut())
                {
                    plugin.config_file = plugin.config_file.take().map(|f| base.join(f));
                }
            }
        }
        Ok(config)
    }

    /// The server's limit on how long a client waits; `None` when 0 turns it off.
    pub fn request_timeout(&self) -> Option<std::time::Duration> {
        let ms = self.server.request_timeout_ms;
        (ms > 0).then(|| std::time::Duration::from_millis(ms))
    }

    /// Model runs allowed at once, with 0 resolved to the cores available.
    pub fn inference_threads(&self) -> usize {
        match self.server.inference_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.server.max_body_bytes, 67_108_864);
    }

    #[test]
    fn model_dir_is_relative_to_the_file() {
        let dir = std::env::temp_dir().join(format!("modelyard-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("modelyard.toml");
        std::fs::write(
            &path,
            "[server]\nmax_body_bytes = 10\n[models]\ndir = \"zoo\"\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.models.dir, dir.join("zoo"));
        assert_eq!(config.server.max_body_bytes, 10);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn endpoints_parse_with_plugin_tables() {
        let config: Config = toml::from_str(
            r#"
            [endpoints.iris]
            variants = { stable = "iris@2", candidate = "iris@1" }
            default_variant = "stable"
            targeting_key_header = "x-user-id"
            on_processor_error = "pass-through"
            router = { plugin = "weighted", config = { weights = { stable = 9, candidate = 1 } } }
            [[endpoints.iris.processors]]
            plugin = "iris-features"
            "#,
        )
        .unwrap();
        let iris = &config.endpoints["iris"];
        assert_eq!(iris.variants["candidate"], "iris@1");
        assert_eq!(iris.router.as_ref().unwrap().config["weights"]["stable"], 9);
        assert_eq!(iris.processors[0].config, serde_json::json!({}));
        assert_eq!(iris.on_processor_error, ProcessorFailure::PassThrough);
    }

    #[test]
    fn plugin_time_limits_must_make_sense() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("modelyard.toml");
        for (limits, ok) in [
            ("call_deadline_ms = 5\ncall_wall_limit_ms = 5", true),
            ("call_deadline_ms = 20\ncall_wall_limit_ms = 10", false),
            ("call_deadline_ms = 0", false),
        ] {
            std::fs::write(&path, format!("[plugins]\n{limits}\n")).unwrap();
            let loaded = Config::load(&path);
            assert_eq!(loaded.is_ok(), ok, "{limits}: {loaded:?}");
        }
    }

    #[test]
    fn trusted_keys_are_checked_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("modelyard.toml");
        let good = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        for (plugins, refused) in [
            (
                format!("trusted_keys = [\"{good}\"]\nrequire_signatures = true"),
                None,
            ),
            (
                format!("trusted_keys = [\"{good}\", \"c2hvcnQ=\"]"),
                Some("'c2hvcnQ=' is not an ed25519 public key (5 bytes, not 32)"),
            ),
            (
                "require_signatures = true".to_string(),
                Some("plugins.trusted_keys is empty"),
            ),
        ] {
            std::fs::write(&path, format!("[plugins]\n{plugins}\n")).unwrap();
            match (Config::load(&path), refused) {
                (Ok(config), None) => assert_eq!(config.plugins.trusted_keys[0].0, [0; 32]),
                (Err(error), Some(says)) => {
                    let error = error.to_string();
                    assert!(error.contains(says), "{error}");
                    assert!(error.contains("trusted_keys"), "{error}");
                }
                (loaded, _) => panic!("{plugins}: {loaded:?}"),
            }
        }
    }

    #[test]
    fn pinned_hashes_are_sha256s() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("modelyard.toml");
        let hash = "AB".repeat(32);
        std::fs::write(&path, format!("[plugins.pinned]\nweighted = \"{hash}\"\n")).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.plugins.pinned["weighted"], "ab".repeat(32));
        std::fs::write(&path, "[plugins.pinned]\nweighted = \"abc\"\n").unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("plugins.pinned.weighted is 'abc'"),
            "{error}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<Config>("[server]\nlisten_on = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
    }
}

#[cfg(test)]
mod fuzz;
