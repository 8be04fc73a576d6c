//! Host bindings of the three plugin worlds of the WIT package in `guest-sdk/wit/`, the
//! one description of the plugin contract. The router's bindings own the shared interfaces
//! (`types`, `host`); the others reuse them, so a tensor or a context is one Rust type
//! whichever world it crosses.
//!
//! Owns: the generated types and calls. Must not touch: how components are identified,
//! checked or run (`contract`, `engine`, `pool`), which wrap these.

/// The file the bindings below are generated from, whose `package` line `contract` reads
/// the version from.
pub const WIT: &str = include_str!("../../../guest-sdk/wit/plugin.wit");

pub mod router {
    wasmtime::component::bindgen!({ path: "../guest-sdk/wit", world: "router" });
}

pub mod processor {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "processor",
        with: {
            "modelyard:plugin/types": crate::plugins::bindings::router::modelyard::plugin::types,
            "modelyard:plugin/host": crate::plugins::bindings::router::modelyard::plugin::host,
        },
    });
}

pub mod flags {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "%flags",
        with: {
            "modelyard:plugin/types": crate::plugins::bindings::router::modelyard::plugin::types,
            "modelyard:plugin/host": crate::plugins::bindings::router::modelyard::plugin::host,
        },
    });
}

pub use router::modelyard::plugin::host::{Host, Level};
pub use router::modelyard::plugin::types::{
    Datatype, Decision, Evaluation, FlagInfo, RequestContext, Tensor, VariantStats,
};
