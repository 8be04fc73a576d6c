//! The plugin runtime: one wasmtime engine, components compiled once (and cached on disk),
//! each identified by the world its exports type-check against and the contract version
//! its imports name, configured, and run in sandboxed instances under a CPU deadline and a memory limit.
//!
//! The contract itself is the WIT package in `guest-sdk/wit/`, which the guest SDK and
//! these bindings are both generated from.
//!
//! Owns: compiling, checking, instantiating and calling plugins, the sandbox, plugin
//! signatures, and new plugin crates. Must not touch: which plugin serves which endpoint
//! (endpoint), the plugin directory's watcher (it lives beside the registry's), HTTP.
//!
//! Files, each using only those listed before it: `error`, `signature`, `bindings`,
//! `contract` (the version rule), `cache`, `sandbox`, `world`, `convert`, `pool`, `engine`,
//! `library`, `scaffold`. This file only declares them and names what the rest of the host uses.

mod bindings;
mod cache;
mod contract;
mod convert;
mod engine;
mod error;
mod library;
mod pool;
mod sandbox;
mod scaffold;
mod signature;
mod world;

pub use bindings::{
    Datatype, Decision, Evaluation, FlagInfo, RequestContext, Tensor, VariantStats,
};
pub use cache::{CacheDir, CacheError, component_hash, default_dir as default_cache_dir};
pub use contract::{HOST_VERSION, PACKAGE, WorldKind};
pub use convert::{from_plugin, to_plugin};
pub use engine::{Inspection, Plugin, PluginEngine, Prepared};
pub use error::PluginError;
pub use library::{Library, PluginFile, Provenance};
pub use pool::{Direction, Pool};
pub use sandbox::Limits;
pub use scaffold::{ScaffoldError, new_plugin};
pub use signature::{
    Signature, SigningError, SigningKey, Unsigned, read_signature, signature_path, verify,
};
pub use world::{FlagsWorld, ProcessorWorld, RouterWorld, World};
