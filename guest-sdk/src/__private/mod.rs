//! The WebAssembly glue behind `register!`: not for plugin authors to use directly.
//!
//! The configured plugin lives in a thread-local of the instance; the host calls
//! `configure` once per instance before any request, so every call finds it there.

use std::any::Any;
use std::cell::RefCell;

use crate::{Error, Level};

#[cfg(all(target_arch = "wasm32", feature = "flags"))]
pub mod flags;
#[cfg(all(target_arch = "wasm32", feature = "processor"))]
pub mod processor;
#[cfg(all(target_arch = "wasm32", feature = "router"))]
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

/// The fields of the request context, the same in every world's bindings.
#[allow(unused_macros, reason = "used by whichever world is enabled")]
macro_rules! context {
    ($ctx:expr) => {{
        let ctx = $ctx;
        $crate::RequestContext {
            id: ctx.id,
            endpoint: ctx.endpoint,
            targeting_key: ctx.targeting_key,
            attributes: ctx.attributes,
            seed: ctx.seed,
            now_ms: ctx.now_ms,
        }
    }};
}
#[allow(unused_imports, reason = "used by whichever world is enabled")]
pub(crate) use context;

#[allow(unused_macros, reason = "used by whichever world is enabled")]
macro_rules! wit_level {
    ($level:expr, $l:ident) => {
        match $level {
            Level::Trace => $l::Trace,
            Level::Debug => $l::Debug,
            Level::Info => $l::Info,
            Level::Warn => $l::Warn,
            Level::Error => $l::Error,
        }
    };
}
#[allow(unused_imports, reason = "used by whichever world is enabled")]
use wit_level;

#[cfg(all(target_arch = "wasm32", feature = "router"))]
pub fn log(level: Level, message: &str) {
    use router::bindings::modelyard::plugin::host::{Level as L, log};
    log(wit_level!(level, L), message);
}

#[cfg(all(target_arch = "wasm32", not(feature = "router"), feature = "processor"))]
pub fn log(level: Level, message: &str) {
    use processor::bindings::modelyard::plugin::host::{Level as L, log};
    log(wit_level!(level, L), message);
}

#[cfg(all(
    target_arch = "wasm32",
    not(feature = "router"),
    not(feature = "processor"),
    feature = "flags"
))]
pub fn log(level: Level, message: &str) {
    use flags::bindings::modelyard::plugin::host::{Level as L, log};
    log(wit_level!(level, L), message);
}

/// Natively (unit tests) there is no host: logs go to stderr.
#[cfg(not(all(
    target_arch = "wasm32",
    any(feature = "router", feature = "processor", feature = "flags")
)))]
pub fn log(level: Level, message: &str) {
    eprintln!("[{level:?}] {message}");
}
