//! The WebAssembly glue behind `register!`: not for plugin authors to use directly.
//!
//! The configured plugin lives in a thread-local of the instance; the host calls
//! `configure` once per instance before any request, so every call finds it there.

use std::any::Any;
use std::cell::RefCell;

use crate::{Error, Level};

pub mod bindings;
pub mod flags;
pub mod processor;
pub mod router;

thread_local! {
    static PLUGIN: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Parses the JSON configuration into the plugin's `Config` and builds the plugin.
pub fn configure<T: 'static, C: serde::de::DeserializeOwned>(
    config: &str,
    new: fn(C) -> Result<T, Error>,
) -> Result<(), String> {
    let config: C =
        serde_json::from_str(config).map_err(|e| format!("invalid configuration: {e}"))?;
    let plugin = new(config).map_err(|e| e.0)?;
    PLUGIN.with(|p| *p.borrow_mut() = Some(Box::new(plugin)));
    Ok(())
}

/// Runs `f` on the configured plugin.
pub fn with_plugin<T: 'static, R>(f: impl FnOnce(&T) -> R) -> Result<R, String> {
    PLUGIN.with(|p| {
        p.borrow()
            .as_ref()
            .and_then(|b| b.downcast_ref::<T>())
            .map(f)
            .ok_or_else(|| "the plugin was called before configure".to_string())
    })
}

#[cfg(target_arch = "wasm32")]
pub fn log(level: Level, message: &str) {
    bindings::host::log(level, message);
}

/// Natively (unit tests) there is no host: logs go to stderr.
#[cfg(not(target_arch = "wasm32"))]
pub fn log(level: Level, message: &str) {
    eprintln!("[{level:?}] {message}");
}
