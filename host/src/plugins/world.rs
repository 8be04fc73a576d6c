//! The three worlds as types, for code that is the same for all of them (instances,
//! configuration, the pool): what differs is the generated bindings and where each
//! world's functions are found.
//!
//! Owns: the `World` trait and its three implementations, each able to type-check a
//! component against its world. Must not touch: which versions load (`contract`), the
//! order in which the worlds are tried (`engine`) or how calls are run (`pool`).

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::bindings::{flags, processor, router};
use super::contract::WorldKind;
use super::sandbox::Sandbox;

/// What differs between the worlds when type-checking, instantiating and configuring.
pub trait World: Sized + 'static {
    const NAME: &'static str;
    /// A component checked against this world's exports, ready to instantiate.
    type Pre: Clone + Send + Sync;
    type Bindings: Send;
    /// Type-checks the component's exports against this world.
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>)
    -> wasmtime::Result<Self::Bindings>;
    fn configure(
        bindings: &Self::Bindings,
        store: &mut Store<Sandbox>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>>;
}

macro_rules! world {
    ($marker:ident, $kind:ident, $module:ident, $bindings:ident, $pre:ident) => {
        pub struct $marker;
        impl World for $marker {
            const NAME: &'static str = WorldKind::$kind.as_str();
            type Pre = $module::$pre<Sandbox>;
            type Bindings = $module::$bindings;
            fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre> {
                $module::$pre::new(pre)
            }
            fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<Sandbox>,
            ) -> wasmtime::Result<Self::Bindings> {
                pre.instantiate(store)
            }
            fn configure(
                bindings: &Self::Bindings,
                store: &mut Store<Sandbox>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                bindings.call_configure(store, config)
            }
        }
    };
}

world!(RouterWorld, Router, router, Router, RouterPre);
world!(
    ProcessorWorld,
    Processor,
    processor,
    Processor,
    ProcessorPre
);
world!(FlagsWorld, Flags, flags, Flags, FlagsPre);
