//! Host bindings of the three worlds in `wit/`. The router's bindings own the shared
//! interfaces (`types`, `host`); the others reuse them, so a tensor or a context is one
//! Rust type whichever world it crosses.

pub mod router {
    wasmtime::component::bindgen!({ path: "../wit", world: "router" });
}

pub mod processor {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "processor",
        with: {
            "modelyard:plugin/types": super::router::modelyard::plugin::types,
            "modelyard:plugin/host": super::router::modelyard::plugin::host,
        },
    });
}

pub mod flags {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "%flags",
        with: {
            "modelyard:plugin/types": super::router::modelyard::plugin::types,
            "modelyard:plugin/host": super::router::modelyard::plugin::host,
        },
    });
}

pub use router::modelyard::plugin::host::{Host, Level};
pub use router::modelyard::plugin::types::{
    Datatype, Decision, Evaluation, FlagInfo, RequestContext, Tensor, VariantStats,
};
