//! The one wasmtime engine all plugins share: compiling a component (through the cache),
//! reading the contract version it was built for from its imports, finding the one world
//! its exports type-check against (once), and binding it to configurations.
//!
//! Owns: the engine, its linker and epoch ticker, `Prepared` and `Plugin`. Must not touch:
//! the rule for which components are plugins of which version (`contract`), running calls
//! (`pool`), the plugin directory (`library`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use semver::Version;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::cache::{ArtifactCache, CacheDir};
use super::contract::{self, HOST_VERSION, WorldKind};
use super::error::PluginError;
use super::pool::Pool;
use super::sandbox::{self, Limits, Sandbox};
use super::world::{FlagsWorld, ProcessorWorld, RouterWorld, World};

/// Instance slots the pooling allocator reserves, when it is on.
const POOLED_INSTANCES: u32 = 256;

/// How often the engine's epoch advances: how often a running call's budget is checked.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// A loaded, configured plugin, ready to call.
pub enum Plugin {
    Router(Pool<RouterWorld>),
    Processor(Pool<ProcessorWorld>),
    Flags(Pool<FlagsWorld>),
}

/// A component checked against the world it exports, once: what every binding starts from.
enum Checked {
    Router(<RouterWorld as World>::Pre),
    Processor(<ProcessorWorld as World>::Pre),
    Flags(<FlagsWorld as World>::Pre),
}

/// A compiled component that implements a known world, not yet configured.
pub struct Prepared {
    name: Arc<str>,
    /// The world `checked` was checked against.
    pub world: WorldKind,
    /// The version of the contract it was built for (on the host's line).
    pub built_for: Version,
    checked: Checked,
    component: Component,
}

/// What `modelyard plugin check` reports about a component.
#[derive(Debug)]
pub struct Inspection {
    pub world: WorldKind,
    pub built_for: Version,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
}

/// The one engine all plugins share, with its linker and epoch ticker.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<Sandbox>,
    limits: Limits,
    cache: ArtifactCache,
    ticking: Arc<AtomicBool>,
}

impl PluginEngine {
    /// `cache` keeps compiled components between runs and swaps; `None` compiles every
    /// time.
    ///
    /// `pooling` preallocates instance slots (the pooling allocator): fresh instances get
    /// cheaper, at the price of reserving address space for `POOLED_INSTANCES` up front,
    /// which some hosts refuse.
    pub fn new(
        limits: Limits,
        cache: Option<CacheDir>,
        pooling: bool,
    ) -> Result<PluginEngine, PluginError> {
        let mut config = Config::new();
        // The epoch only wakes a running call now and then to check its budget (CPU time
        // on its thread, wall-clock time as a backstop): see `sandbox::Budget`.
        config.epoch_interruption(true);
        if pooling {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_component_instances(POOLED_INSTANCES)
                .total_core_instances(POOLED_INSTANCES * 4)
                .total_memories(POOLED_INSTANCES * 2)
                .total_tables(POOLED_INSTANCES * 4)
                .max_memory_size(limits.memory_bytes);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
            config.memory_reservation(limits.memory_bytes as u64);
        }
        let engine = Engine::new(&config).map_err(PluginError::Engine)?;
        let linker = sandbox::linker(&engine).map_err(PluginError::Engine)?;
        let ticking = Arc::new(AtomicBool::new(true));
        let (ticker, running) = (engine.weak(), ticking.clone());
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                while running.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match ticker.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| PluginError::Engine(e.into()))?;
        let cache = ArtifactCache::new(cache, &engine);
        Ok(PluginEngine {
            engine,
            linker,
            limits,
            cache,
            ticking,
        })
    }

    /// Compiles (or fetches from the cache), identifies and type-checks a component, ready
    /// to be bound to configurations.
    pub fn prepare(&self, name: &str, bytes: &[u8]) -> Result<Prepared, PluginError> {
        let refused = |reason: String| PluginError::Refused {
            plugin: name.to_string(),
            reason,
        };
        let component = self
            .cache
            .get_or_compile(&self.engine, bytes)
            .map_err(|e| {
                refused(format!(
                    "not a WebAssembly component wasmtime can compile: {e:#}"
                ))
            })?;
        let (_, imports) = self.names(&component);
        let built_for =
            contract::built_for(&imports, &HOST_VERSION).map_err(|e| refused(e.to_string()))?;
        // Within the line, a plugin built for a newer version may import what this host
        // lacks: say so beside wasmtime's reason.
        let versions = if built_for == HOST_VERSION {
            String::new()
        } else {
            format!(" (built for {built_for}; this host speaks {HOST_VERSION})")
        };
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            refused(format!(
                "imports something the sandbox does not offer{versions}: {e:#}"
            ))
        })?;
        // The world is the one the exports type-check against: their functions differ, so
        // at most one does.
        let mut mismatches = Vec::new();
        let mut found = None;
        for world in WorldKind::ALL {
            let checked = match world {
                WorldKind::Router => RouterWorld::pre(pre.clone()).map(Checked::Router),
                WorldKind::Processor => ProcessorWorld::pre(pre.clone()).map(Checked::Processor),
                WorldKind::Flags => FlagsWorld::pre(pre.clone()).map(Checked::Flags),
            };
            match checked {
                Ok(checked) => {
                    found = Some((world, checked));
                    break;
                }
                Err(e) => mismatches.push(format!("not a {} ({e:#})", world.as_str())),
            }
        }
        let (world, checked) = found.ok_or_else(|| {
            refused(format!(
                "its exports match none of the router, processor and flags worlds{versions}: {}",
                mismatches.join("; ")
            ))
        })?;
        Ok(Prepared {
            name: Arc::from(name),
            world,
            built_for,
            checked,
            component,
        })
    }

    /// Instances of a prepared component configured with `config` (JSON); the first is made
    /// and configured now, so a refused configuration is known before anything is served.
    pub fn bind(&self, prepared: &Prepared, config: String) -> Result<Plugin, PluginError> {
        let (name, engine, limits) = (prepared.name.clone(), &self.engine, self.limits);
        Ok(match &prepared.checked {
            Checked::Router(pre) => {
                Plugin::Router(Pool::new(name, engine, pre.clone(), config, limits)?)
            }
            Checked::Processor(pre) => {
                Plugin::Processor(Pool::new(name, engine, pre.clone(), config, limits)?)
            }
            Checked::Flags(pre) => {
                Plugin::Flags(Pool::new(name, engine, pre.clone(), config, limits)?)
            }
        })
    }

    /// Says what a component is, or exactly why it would be refused (short of configuring
    /// it, which needs an endpoint's configuration).
    pub fn inspect(&self, name: &str, bytes: &[u8]) -> Result<Inspection, PluginError> {
        let prepared = self.prepare(name, bytes)?;
        let (exports, imports) = self.names(&prepared.component);
        Ok(Inspection {
            world: prepared.world,
            built_for: prepared.built_for,
            exports,
            imports,
        })
    }

    /// The names of a component's exports and imports.
    fn names(&self, component: &Component) -> (Vec<String>, Vec<String>) {
        let ty = component.component_type();
        (
            ty.exports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect(),
            ty.imports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect(),
        )
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}
