//! `modelyard.toml`: the operator's settings, with a default for every one so that the
//! server runs with no file at all. Relative paths are taken from the file's directory.
//!
//! Owns: reading and checking the file. Must not touch: anything the settings configure.

use std::path::{Path, PathBuf};

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub models: ModelsConfig,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".to_string(),
            max_body_bytes: 64 * 1024 * 1024,
            inference_threads: 0,
            shutdown_grace_seconds: 30,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// The model repository: `<dir>/<name>/<version>/model.onnx`.
    pub dir: PathBuf,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: PathBuf::from("models"),
        }
    }
}

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
        if let Some(base) = path.parent() {
            config.models.dir = base.join(&config.models.dir);
        }
        Ok(config)
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
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<Config>("[server]\nlisten_on = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
    }
}
