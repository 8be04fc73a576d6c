//! Endpoints served through real plugin components, built from source by `tests/run`
//! (`plugins/build`), by feature: the standard plugins, hostile fixtures, live changes
//! (hot swaps under load, configuration edits, the admin API), feedback and experiments,
//! the fallback variant, signed plugins and the compiled-plugin cache; with the setup they
//! share.

mod fallback;
mod feedback;
mod hostile;
mod live_changes;
mod provenance;
mod standard;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::harness::{Server, repository, root};

/// A built component: `plugins/NAME.wasm`, or a fixture of flavour `a` or `b`.
pub(crate) fn component(name: &str, flavor: Option<&str>) -> PathBuf {
    let path = match flavor {
        None => root().join("plugins").join(format!("{name}.wasm")),
        Some(f) => root()
            .join("target/fixtures")
            .join(f)
            .join(format!("{name}.wasm")),
    };
    assert!(
        path.is_file(),
        "{} is missing: run the suite with tests/run, which builds the plugins",
        path.display()
    );
    path
}

/// Drops a file into the plugin directory the way an operator's tooling should: whole.
pub(crate) fn drop_in(from: &Path, dir: &Path, name: &str) {
    let temp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(from, &temp).unwrap();
    std::fs::rename(&temp, dir.join(name)).unwrap();
}

pub(crate) struct Setup {
    pub models: tempfile::TempDir,
    pub plugins: tempfile::TempDir,
    pub cache: tempfile::TempDir,
}

impl Setup {
    pub fn new(files: &[(impl AsRef<str>, PathBuf)]) -> Setup {
        let setup = Setup {
            models: repository(&[]),
            plugins: tempfile::tempdir().unwrap(),
            cache: tempfile::tempdir().unwrap(),
        };
        for (name, from) in files {
            drop_in(from, setup.plugins.path(), name.as_ref());
        }
        setup
    }

    /// Standard plugins from `plugins/`, under their own names.
    pub fn plugins(names: &[&str]) -> Setup {
        let files: Vec<(String, PathBuf)> = names
            .iter()
            .map(|n| (format!("{n}.wasm"), component(n, None)))
            .collect();
        Setup::new(&files)
    }

    /// The standard `weighted` and `iris-features` plugins, as `IRIS_AB` uses them.
    fn standard() -> Setup {
        Setup::plugins(&["weighted", "iris-features"])
    }

    pub fn config(&self, endpoints: &str) -> String {
        format!(
            "[plugins]\ndir = {:?}\ncache_dir = {:?}\n{endpoints}",
            self.plugins.path(),
            self.cache.path()
        )
    }

    pub fn start(&self, endpoints: &str) -> Server {
        Server::start(self.models.path(), &self.config(endpoints))
    }
}

/// A 50/50 split between the two iris versions, no processors.
pub(crate) const AB: &str = r#"
[endpoints.ab]
variants = { a = "iris@1", b = "iris@2" }
router = { plugin = "weighted", config = { weights = { a = 1, b = 1 } } }
"#;

pub(super) const IRIS_AB: &str = r#"
[endpoints.iris-ab]
variants = { stable = "iris@2", candidate = "iris@1" }
default_variant = "stable"
targeting_key_header = "x-user-id"
router = { plugin = "weighted", config = { weights = { stable = 1, candidate = 1 } } }
[[endpoints.iris-ab.processors]]
plugin = "iris-features"
"#;

pub(super) fn flowers() -> Value {
    let setosa =
        r#"{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}"#;
    let virginica =
        r#"{"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}"#;
    json!({"inputs": [{"name": "features", "datatype": "BYTES", "shape": [2], "data": [setosa, virginica]}]})
}
