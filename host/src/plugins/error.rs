//! How a plugin fails, as every caller of the runtime sees it.
//!
//! Owns: `PluginError`. Must not touch: anything else in this folder (every other file may
//! use this one, so it uses none of them).

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin '{plugin}' is refused: {reason}")]
    Refused { plugin: String, reason: String },
    #[error("plugin '{plugin}' {reason}")]
    Trapped { plugin: String, reason: String },
    #[error("plugin '{plugin}' returned an error: {message}")]
    Failed { plugin: String, message: String },
    #[error("plugin '{plugin}' answered with something the host cannot use: {reason}")]
    Invalid { plugin: String, reason: String },
    #[error("cannot start the plugin engine: {0:#}")]
    Engine(wasmtime::Error),
}
