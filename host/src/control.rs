//! The control plane: follows `modelyard.toml` and the plugin directory while the server
//! runs. On any change it rescans the plugins, rereads the configuration and rebuilds the
//! endpoint set off the request path, then swaps it in whole. A file that fails any step
//! is refused, logged, shown in the admin API, and what served before keeps serving.
//!
//! Only the files the server reads wake it: the configuration file, the `config_file`s it
//! names, and the plugin directory's components (and their `.sig` files). Anything else
//! written beside them — a log file, the server's own database — is not an edit: a refresh
//! that logs would otherwise wake the next one, for ever.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::RecursiveMode;

use crate::config::{Config, EndpointConfig};
use crate::endpoint::{Build, EndpointSet};
use crate::pipeline::Pipeline;
use crate::plugins::{
    CacheDir, CacheError, Library, Limits, PluginEngine, PluginError, Provenance, default_cache_dir,
};
use crate::telemetry::{Change, Telemetry};
use crate::watch::{KUBERNETES_DATA, Watch, WatchError};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the plugin directory {dir}: {source}")]
    PluginDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Plugins(#[from] PluginError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

struct Control {
    engine: PluginEngine,
    plugin_dir: PathBuf,
    provenance: Provenance,
    config_file: Option<PathBuf>,
    endpoints: BTreeMap<String, EndpointConfig>,
    library: Library,
    pipeline: Arc<Pipeline>,
    telemetry: Arc<Telemetry>,
    /// Each flag's state and default variant, `(endpoint, flag)` → summary, as of the last
    /// refresh: what a flag flip is told by. `None` before the first refresh, whose flags
    /// are the starting point, not flips.
    flags: Option<BTreeMap<(String, String), String>>,
    /// The files whose changes wake a refresh besides the plugin components (see
    /// [`Followed`]); the configuration may name new ones, so each refresh updates them.
    followed: Arc<Mutex<Followed>>,
}

impl Control {
    /// Everything a change may affect, in order; runs on a blocking thread.
    fn refresh(&mut self) {
        if let Some(file) = &self.config_file {
            match Config::load(file) {
                Ok(config) if config.endpoints != self.endpoints => {
                    // One entry per endpoint, so the trail filtered by endpoint finds it.
                    for (endpoint, how) in changed_endpoints(&self.endpoints, &config.endpoints) {
                        self.telemetry.audit(Change {
                            endpoint: Some(endpoint.to_string()),
                            detail: Some(format!("endpoint '{endpoint}' {how}")),
                            ..Change::new("config.applied", "file", file.display().to_string())
                        });
                    }
                    self.endpoints = config.endpoints;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(%error, "configuration edit refused; the previous configuration stays in force");
                    self.telemetry.audit(Change {
                        detail: Some(error.to_string()),
                        ..Change::new("config.refused", "file", file.display().to_string())
                    });
                }
            }
        }
        self.library = Library::scan(
            &self.engine,
            &self.plugin_dir,
            &self.library,
            &self.provenance,
            &self.telemetry,
        );
        let previous = self.pipeline.endpoints();
        let endpoints = Build {
            configs: &self.endpoints,
            library: &self.library,
            engine: &self.engine,
            previous: &previous,
            stats: self.pipeline.stats(),
            telemetry: &self.telemetry,
            // `flags` is set at the end of the first refresh: this is the one at start.
            resume: self.flags.is_none(),
        }
        .run();
        for (name, error) in &endpoints.errors {
            if previous.errors.get(name) != Some(error) {
                self.telemetry.audit(Change {
                    endpoint: Some(name.clone()),
                    detail: Some(error.clone()),
                    ..Change::new("endpoint.refused", "file", name.clone())
                });
            }
        }
        let flags = flag_states(&endpoints);
        if let Some(previous) = &self.flags {
            for ((endpoint, flag), now) in &flags {
                let before = previous.get(&(endpoint.clone(), flag.clone()));
                if before != Some(now) {
                    self.telemetry.audit(Change {
                        endpoint: Some(endpoint.clone()),
                        from: before.cloned(),
                        to: Some(now.clone()),
                        ..Change::new("flag.changed", "file", flag.clone())
                    });
                }
            }
        }
        self.flags = Some(flags);
        self.pipeline.set_plugins(self.library.clone(), endpoints);
        self.followed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .files = followed_files(self.config_file.as_deref(), &self.endpoints);
    }
}

/// What the watch reacts to: the plugin directory's components and signatures, and these
/// files (as the watch reports them: in canonical directories).
struct Followed {
    plugin_dir: PathBuf,
    files: BTreeSet<PathBuf>,
}

impl Followed {
    fn wakes(&self, path: &Path) -> bool {
        let in_plugin_dir = path.parent() == Some(self.plugin_dir.as_path());
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // Plugins mounted from a ConfigMap link through `..data`, swapped by rename.
        let plugin = in_plugin_dir
            && (name.ends_with(".wasm") || name.ends_with(".wasm.sig") || name == KUBERNETES_DATA);
        plugin || self.files.contains(path)
    }
}

/// `path` with its directory made canonical, the way the watch (which watches canonical
/// directories) reports it; as given when the directory cannot be resolved.
fn canonical(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match (dir.canonicalize(), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// The paths whose changes change `file`: the file, and, when it is a symbolic link into
/// its own directory, the first entry its link goes through — Kubernetes swaps a mounted
/// ConfigMap by renaming its `..data` link, never touching the file's own name.
fn followed_paths(file: &Path) -> Vec<PathBuf> {
    let file = canonical(file);
    let mut paths = vec![file.clone()];
    if let (Ok(target), Some(dir)) = (std::fs::read_link(&file), file.parent())
        && target.is_relative()
        && let Some(std::path::Component::Normal(first)) = target.components().next()
    {
        paths.push(dir.join(first));
    }
    paths
}

/// The configuration file and every `config_file` the endpoints name, as followed.
fn followed_files(
    config_file: Option<&Path>,
    endpoints: &BTreeMap<String, EndpointConfig>,
) -> BTreeSet<PathBuf> {
    config_file
        .map(Path::to_path_buf)
        .into_iter()
        .chain(config_files(endpoints))
        .flat_map(|f| followed_paths(&f))
        .collect()
}

/// Every `config_file` the endpoints name.
fn config_files(endpoints: &BTreeMap<String, EndpointConfig>) -> Vec<PathBuf> {
    endpoints
        .values()
        .flat_map(|e| e.router.iter().chain(&e.processors).chain(&e.flags))
        .filter_map(|p| p.config_file.clone())
        .collect()
}

/// The endpoints added, removed or edited between two configurations, and which.
fn changed_endpoints<'a>(
    before: &'a BTreeMap<String, EndpointConfig>,
    after: &'a BTreeMap<String, EndpointConfig>,
) -> Vec<(&'a str, &'static str)> {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter_map(|n| match (before.get(n), after.get(n)) {
            (None, Some(_)) => Some((n.as_str(), "added")),
            (Some(_), None) => Some((n.as_str(), "removed")),
            (Some(b), Some(a)) if a != b => Some((n.as_str(), "edited")),
            _ => None,
        })
        .collect()
}

/// Every flag of every endpoint as `state, default <variant>`: what a flip changes.
fn flag_states(set: &EndpointSet) -> BTreeMap<(String, String), String> {
    set.endpoints
        .values()
        .flat_map(|endpoint| {
            endpoint.flag_definitions.values().map(|info| {
                let summary = format!(
                    "{}, default {}{}",
                    info.state,
                    info.default_variant,
                    if info.expired { ", expired" } else { "" }
                );
                ((endpoint.name.clone(), info.key.clone()), summary)
            })
        })
        .collect()
}

/// Loads the plugins and endpoints once, then follows changes until the returned task is
/// aborted. `config_file` is watched when the configuration came from one.
pub async fn start(
    config: &Config,
    config_file: Option<PathBuf>,
    pipeline: Arc<Pipeline>,
    telemetry: Arc<Telemetry>,
) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    let plugin_dir = config.plugins.dir.clone();
    std::fs::create_dir_all(&plugin_dir).map_err(|source| ControlError::PluginDir {
        dir: plugin_dir.clone(),
        source,
    })?;
    let limits = Limits {
        call_deadline: Duration::from_millis(config.plugins.call_deadline_ms),
        wall_limit: Duration::from_millis(config.plugins.call_wall_limit_ms),
        memory_bytes: config.plugins.memory_limit_mib.saturating_mul(1024 * 1024),
        // Plugins run on an inference slot: no more calls than slots run at once.
        idle_instances: config.inference_threads(),
    };
    let cache = cache_dir(config.plugins.cache_dir.as_deref())?;
    let engine = PluginEngine::new(limits, cache, config.plugins.pooling_allocator)?;
    // Directories as the watch reports its events' paths: canonical, so that they compare
    // equal to the followed files'.
    let plugin_dir = plugin_dir.canonicalize().unwrap_or(plugin_dir);
    // The configuration's directory, the plugin directory, and those of the `config_file`s
    // named at start: a `config_file` named later is followed in these only.
    let dirs: BTreeSet<PathBuf> = config_file
        .iter()
        .cloned()
        .chain(config_files(&config.endpoints))
        .filter_map(|f| canonical(&f).parent().map(Path::to_path_buf))
        .filter(|d| d.is_dir())
        .chain([plugin_dir.clone()])
        .collect();
    let watched: Vec<_> = dirs
        .iter()
        .map(|d| (d.as_path(), RecursiveMode::NonRecursive))
        .collect();
    let followed = Arc::new(Mutex::new(Followed {
        plugin_dir: plugin_dir.clone(),
        files: followed_files(config_file.as_deref(), &config.endpoints),
    }));
    let wakes = followed.clone();
    let watch = Watch::new(&watched, move |path| {
        wakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .wakes(path)
    })?;
    let mut control = Some(Control {
        engine,
        plugin_dir,
        provenance: Provenance {
            trusted_keys: config
                .plugins
                .require_signatures
                .then(|| config.plugins.trusted_keys.clone()),
            pinned: config.plugins.pinned.clone(),
        },
        config_file,
        endpoints: config.endpoints.clone(),
        library: Library::default(),
        pipeline,
        telemetry,
        flags: None,
        followed,
    });
    control = refresh(control, Control::refresh).await;
    Ok(tokio::spawn(async move {
        loop {
            watch.changed().await;
            control = refresh(control, Control::refresh).await;
        }
    }))
}

/// The compiled-plugin cache: the configured directory, which must be usable and safe (else
/// the server does not start), or the user's cache directory, without which plugins are
/// compiled at every start. An unsafe directory is refused either way.
fn cache_dir(configured: Option<&std::path::Path>) -> Result<Option<CacheDir>, CacheError> {
    if let Some(dir) = configured {
        return CacheDir::open(dir).map(Some);
    }
    let advice = "set plugins.cache_dir to a directory only the server's user can write to keep compiled plugins between runs";
    let Some(dir) = default_cache_dir() else {
        tracing::warn!(
            "neither XDG_CACHE_HOME nor HOME names a directory: plugins are compiled at every start; {advice}"
        );
        return Ok(None);
    };
    match CacheDir::open(&dir) {
        Ok(cache) => Ok(Some(cache)),
        Err(CacheError::Unusable { path, problem }) => {
            tracing::warn!(dir = %path.display(), %problem, "cannot use the default compiled-plugin cache: plugins are compiled at every start; {advice}");
            Ok(None)
        }
        Err(refused) => Err(refused),
    }
}

/// One refresh (`step`: [`Control::refresh`]), off the reactor. A refresh that panics
/// leaves the control as it was (whatever it had applied stays, what serves keeps
/// serving) and the next change refreshes again: one bad file must not end hot reloading.
async fn refresh(control: Option<Control>, step: fn(&mut Control)) -> Option<Control> {
    let mut control = control?;
    if let Some(metrics) = control.telemetry.metrics() {
        metrics.config_refreshed();
    }
    let done = tokio::task::spawn_blocking(move || {
        let telemetry = control.telemetry.clone();
        let subject = match &control.config_file {
            Some(file) => file.display().to_string(),
            None => control.plugin_dir.display().to_string(),
        };
        guarded(&telemetry, &subject, || step(&mut control));
        control
    })
    .await;
    match done {
        Ok(control) => Some(control),
        // Only if the blocking pool itself failed to run it (the runtime shutting down).
        Err(error) => {
            tracing::error!(%error, "the configuration reload could not run; plugins and endpoints stay as they are from now on");
            None
        }
    }
}

/// Runs `step`; a panic in it is logged and audited (`reload.crashed`, with its message)
/// instead of unwinding further.
fn guarded(telemetry: &Telemetry, subject: &str, step: impl FnOnce()) {
    let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(step)) else {
        return;
    };
    let message = panic
        .downcast_ref::<&str>()
        .map(|m| m.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    tracing::error!(panic = %message, "the configuration reload crashed; what served before keeps serving, and the next change reloads again");
    telemetry.audit(Change {
        detail: Some(message),
        ..Change::new("reload.crashed", "host", subject)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MonitoringConfig;
    use crate::registry::ModelRepository;
    use crate::telemetry::Query;
    use crate::testing::{pipeline, sample_models};

    /// Writes `text` as the configuration the way an editor that renames would.
    fn write(file: &std::path::Path, text: &str) {
        let temporary = file.with_extension("tmp");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, file).unwrap();
    }

    const AB: &str =
        "[plugins]\ndir = \"plugins\"\n[endpoints.ab]\nvariants = { a = \"iris@1\" }\n";

    /// The control-plane refreshes counted so far.
    fn refreshes(telemetry: &Telemetry) -> u64 {
        let text = telemetry.metrics().unwrap().encode().unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("modelyard_config_refreshes_total "))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Waits for `done` for up to 20 s.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..400 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what} did not happen within 20 s");
    }

    /// The control plane started over `config_text` (written to `modelyard.toml` in
    /// `dir`) and the sample models: the configuration file, the telemetry, the pipeline
    /// and the running task.
    async fn started(
        dir: &std::path::Path,
        config_text: &str,
    ) -> (
        PathBuf,
        Arc<Telemetry>,
        Arc<Pipeline>,
        tokio::task::JoinHandle<()>,
    ) {
        let file = dir.join("modelyard.toml");
        write(&file, config_text);
        let config = Config::load(&file).unwrap();
        let monitoring = MonitoringConfig {
            database: dir.join("modelyard.db"),
            ..MonitoringConfig::default()
        };
        let telemetry = Telemetry::start(&monitoring, true).unwrap();
        let repository = Arc::new(ModelRepository::new(sample_models(), telemetry.clone()));
        let pipeline = pipeline(repository, telemetry.clone());
        let control = start(
            &config,
            Some(file.clone()),
            pipeline.clone(),
            telemetry.clone(),
        )
        .await
        .unwrap();
        (file, telemetry, pipeline, control)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_follow_the_configuration_file_and_refusals_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let broken =
            "[endpoints.broken]\nvariants = { a = \"iris\" }\nrouter = { plugin = \"nope\" }\n";
        let (file, telemetry, pipeline, control) =
            started(dir.path(), &format!("{AB}{broken}")).await;
        // The first refresh is done when `start` returns.
        let set = pipeline.endpoints();
        assert!(set.endpoints.contains_key("ab"));
        assert!(
            set.errors["broken"].contains("no plugin 'nope'"),
            "{:?}",
            set.errors
        );
        assert!(dir.path().join("plugins").is_dir());

        write(
            &file,
            &format!("{AB}[endpoints.cd]\nvariants = {{ c = \"iris@2\" }}\n"),
        );
        until("the new endpoint", || {
            pipeline.endpoints().endpoints.contains_key("cd")
        })
        .await;
        assert!(!pipeline.endpoints().errors.contains_key("broken"));

        // A file that does not parse changes nothing, and says so in the audit trail.
        write(&file, "[endpoints.ab\n");
        let refused = || {
            telemetry.shutdown();
            let query = Query {
                kind: Some("config.refused".to_string()),
                limit: 10,
                ..Query::default()
            };
            !telemetry.changes(&query).unwrap().items.is_empty()
        };
        until("the refusal in the audit trail", refused).await;
        let set = pipeline.endpoints();
        assert!(set.endpoints.contains_key("ab") && set.endpoints.contains_key("cd"));
        let query = Query {
            kind: Some("endpoint".to_string()),
            limit: 10,
            ..Query::default()
        };
        let kinds: Vec<String> = telemetry
            .changes(&query)
            .unwrap()
            .items
            .iter()
            .map(|c| c.change.kind.clone())
            .collect();
        assert!(kinds.contains(&"endpoint.refused".to_string()), "{kinds:?}");
        control.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_the_server_does_not_read_wake_no_refresh() {
        let dir = tempfile::tempdir().unwrap();
        // A refused endpoint: every refresh logs its error, which must not wake another.
        let broken =
            "[endpoints.broken]\nvariants = { a = \"iris\" }\nrouter = { plugin = \"nope\" }\n";
        let (file, telemetry, pipeline, control) =
            started(dir.path(), &format!("{AB}{broken}")).await;
        assert_eq!(refreshes(&telemetry), 1);

        // A log beside the configuration and a note among the plugins, written to for 2 s.
        let log = dir.path().join("server.log");
        let note = dir.path().join("plugins/README.txt");
        for line in 0..100 {
            for path in [&log, &note] {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                writeln!(f, "line {line}").unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Longer than the watch's settling time.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(refreshes(&telemetry), 1);

        write(
            &file,
            &format!("{AB}{broken}[endpoints.cd]\nvariants = {{ c = \"iris@2\" }}\n"),
        );
        until("the edit applied", || {
            pipeline.endpoints().endpoints.contains_key("cd")
        })
        .await;
        assert!(refreshes(&telemetry) >= 2);
        control.abort();
    }

    #[test]
    fn a_configmap_swap_is_followed_through_its_link() {
        // Kubernetes' layout: the file links through `..data`, which is swapped by rename.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("..2026_12_01")).unwrap();
        std::fs::write(dir.path().join("..2026_12_01/modelyard.toml"), AB).unwrap();
        std::os::unix::fs::symlink("..2026_12_01", dir.path().join("..data")).unwrap();
        let file = dir.path().join("modelyard.toml");
        std::os::unix::fs::symlink("..data/modelyard.toml", &file).unwrap();
        let followed = Followed {
            plugin_dir: dir.path().join("plugins"),
            files: followed_files(Some(&file), &BTreeMap::new()),
        };
        let canonical_dir = dir.path().canonicalize().unwrap();
        assert!(followed.wakes(&canonical_dir.join("modelyard.toml")));
        assert!(followed.wakes(&canonical_dir.join("..data")));
        assert!(!followed.wakes(&canonical_dir.join("..data_tmp")));
        assert!(!followed.wakes(&canonical_dir.join("server.log")));
        assert!(followed.wakes(&dir.path().join("plugins/weighted.wasm")));
        assert!(followed.wakes(&dir.path().join("plugins/weighted.wasm.sig")));
        assert!(followed.wakes(&dir.path().join("plugins/..data")));
        assert!(!followed.wakes(&dir.path().join("plugins/.weighted.wasm.tmp")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_that_panics_does_not_end_reloading() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("modelyard.toml");
        write(&file, AB);
        let monitoring = MonitoringConfig {
            database: dir.path().join("modelyard.db"),
            ..MonitoringConfig::default()
        };
        let telemetry = Telemetry::start(&monitoring, true).unwrap();
        let repository = Arc::new(ModelRepository::new(sample_models(), telemetry.clone()));
        let pipeline = pipeline(repository, telemetry.clone());
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugin_dir).unwrap();
        let control = Some(Control {
            engine: PluginEngine::new(Limits::default(), None, false).unwrap(),
            plugin_dir: plugin_dir.clone(),
            provenance: Provenance {
                trusted_keys: None,
                pinned: BTreeMap::new(),
            },
            config_file: Some(file.clone()),
            endpoints: BTreeMap::new(),
            library: Library::default(),
            pipeline: pipeline.clone(),
            telemetry: telemetry.clone(),
            flags: None,
            followed: Arc::new(Mutex::new(Followed {
                plugin_dir,
                files: BTreeSet::new(),
            })),
        });
        let control = refresh(control, Control::refresh).await;
        assert!(pipeline.endpoints().endpoints.contains_key("ab"));

        write(
            &file,
            &format!("{AB}[endpoints.cd]\nvariants = {{ c = \"iris@2\" }}\n"),
        );
        let control = refresh(control, |_| panic!("a bug in the reload")).await;
        assert!(control.is_some(), "the control is kept");
        // What served keeps serving; the crash is audited with its message.
        assert!(!pipeline.endpoints().endpoints.contains_key("cd"));
        assert!(pipeline.endpoints().endpoints.contains_key("ab"));
        let query = Query {
            kind: Some("reload.crashed".to_string()),
            limit: 10,
            ..Query::default()
        };
        let crashed = telemetry.changes(&query).unwrap().items;
        assert_eq!(crashed.len(), 1);
        assert_eq!(
            crashed[0].change.detail.as_deref(),
            Some("a bug in the reload")
        );

        // The next change reloads again.
        let control = refresh(control, Control::refresh).await;
        assert!(control.is_some());
        assert!(pipeline.endpoints().endpoints.contains_key("cd"));
        assert_eq!(refreshes(&telemetry), 3);
    }
}
