//! The control plane: follows `modelyard.toml` and the plugin directory while the server
//! runs. On any change it rescans the plugins, rereads the configuration and rebuilds the
//! endpoint set off the request path, then swaps it in whole. A file that fails any step
//! is refused, logged, shown in the admin API, and what served before keeps serving.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;

use crate::config::{Config, EndpointConfig};
use crate::endpoint::{Build, EndpointSet};
use crate::pipeline::Pipeline;
use crate::plugins::{
    CacheDir, CacheError, Library, Limits, PluginEngine, PluginError, Provenance, default_cache_dir,
};
use crate::telemetry::{Change, Telemetry};
use crate::watch::{Watch, WatchError};

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
    }
}

/// The endpoints added, removed or edited between two configurations, and which.
fn changed_endpoints<'a>(
    before: &'a BTreeMap<String, EndpointConfig>,
    after: &'a BTreeMap<String, EndpointConfig>,
) -> Vec<(&'a str, &'static str)> {
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
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
    };
    let cache = cache_dir(config.plugins.cache_dir.as_deref())?;
    let engine = PluginEngine::new(limits, cache, config.plugins.pooling_allocator)?;
    let mut watched = vec![(plugin_dir.as_path(), RecursiveMode::NonRecursive)];
    let config_dir = config_file.as_ref().and_then(|f| f.parent()).map(|d| {
        if d.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            d.to_path_buf()
        }
    });
    if let Some(dir) = &config_dir {
        watched.push((dir.as_path(), RecursiveMode::NonRecursive));
    }
    // Plugin configuration files (flag files) are followed where they lie at start.
    let file_dirs: std::collections::BTreeSet<PathBuf> = config
        .endpoints
        .values()
        .flat_map(|e| e.router.iter().chain(&e.processors).chain(&e.flags))
        .filter_map(|p| Some(p.config_file.as_ref()?.parent()?.to_path_buf()))
        .filter(|d| d.is_dir() && *d != plugin_dir && Some(d) != config_dir.as_ref())
        .collect();
    watched.extend(
        file_dirs
            .iter()
            .map(|d| (d.as_path(), RecursiveMode::NonRecursive)),
    );
    // The server's own database (and its -wal, -shm, -journal files) may share a watched
    // directory; its writes are not edits.
    let database = config
        .monitoring
        .database
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty());
    let watch = Watch::new(&watched, move |path| {
        let name = path.file_name().map(|n| n.to_string_lossy());
        !matches!((&database, name), (Some(db), Some(name)) if name.starts_with(db.as_str()))
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
    });
    control = refresh(control).await;
    Ok(tokio::spawn(async move {
        loop {
            watch.changed().await;
            control = refresh(control).await;
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

async fn refresh(control: Option<Control>) -> Option<Control> {
    let mut control = control?;
    let done = tokio::task::spawn_blocking(move || {
        control.refresh();
        control
    })
    .await;
    match done {
        Ok(control) => Some(control),
        Err(error) => {
            tracing::error!(%error, "plugin reload crashed; plugins and endpoints stay as they are from now on");
            None
        }
    }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_follow_the_configuration_file_and_refusals_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("modelyard.toml");
        let broken =
            "[endpoints.broken]\nvariants = { a = \"iris\" }\nrouter = { plugin = \"nope\" }\n";
        write(&file, &format!("{AB}{broken}"));
        let config = Config::load(&file).unwrap();
        let monitoring = MonitoringConfig {
            database: dir.path().join("modelyard.db"),
            ..MonitoringConfig::default()
        };
        let telemetry = Telemetry::start(&monitoring, false).unwrap();
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
}
