//! The plugin runtime: one wasmtime engine, components compiled once (and cached on disk),
//! each identified by the world it implements, configured, and run in sandboxed instances
//! under a CPU deadline and a memory limit.
//!
//! Owns: compiling, checking, instantiating and calling plugins, and the sandbox. Must not
//! touch: which plugin serves which endpoint (pipeline), the plugin directory (its watcher
//! lives beside the registry's), HTTP.

mod bindings;
mod cache;
mod library;
mod pool;
mod sandbox;
mod scaffold;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use bindings::{
    Datatype, Decision, Evaluation, FlagInfo, RequestContext, Tensor, VariantStats,
};
pub use cache::component_hash;
pub use library::{Library, PluginFile};
pub use pool::{Direction, FlagsWorld, Pool, ProcessorWorld, RouterWorld, World};
use sandbox::Sandbox;
pub use scaffold::{ScaffoldError, new_plugin};

/// The WIT package (in `wit/`) whose worlds plugins implement.
pub const WIT_PACKAGE: &str = "modelyard:plugin@0.3.0";

/// Instance slots the pooling allocator reserves, when it is on.
const POOLED_INSTANCES: u32 = 256;

/// How often the engine's epoch advances: how often a running call's budget is checked.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Bounds on what one plugin call may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// CPU time one call may take on its thread before it is interrupted.
    pub call_deadline: Duration,
    /// Wall-clock time one call may take, and the CPU and wall-clock time making and
    /// configuring a fresh instance may take.
    pub wall_limit: Duration,
    /// Linear memory one instance may grow to.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_deadline: Duration::from_millis(10),
            wall_limit: Duration::from_secs(1),
            memory_bytes: 64 * 1024 * 1024,
        }
    }
}

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

/// Which world a component implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorldKind {
    Router,
    Processor,
    Flags,
}

impl WorldKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorldKind::Router => "router",
            WorldKind::Processor => "processor",
            WorldKind::Flags => "flags",
        }
    }
}

/// A loaded, configured plugin, ready to call.
pub enum Plugin {
    Router(Pool<RouterWorld>),
    Processor(Pool<ProcessorWorld>),
    Flags(Pool<FlagsWorld>),
}

/// A compiled component that implements a known world, not yet configured.
pub struct Prepared {
    name: Arc<str>,
    pub world: WorldKind,
    pre: wasmtime::component::InstancePre<Sandbox>,
    component: Component,
}

/// What `modelyard plugin check` reports about a component.
#[derive(Debug)]
pub struct Inspection {
    pub world: WorldKind,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
}

/// The one engine all plugins share, with its linker and epoch ticker.
pub struct PluginEngine {
    engine: Engine,
    linker: Linker<Sandbox>,
    limits: Limits,
    cache: cache::ArtifactCache,
    ticking: Arc<AtomicBool>,
}

impl PluginEngine {
    /// `cache_dir` keeps compiled components between runs and swaps; `None` compiles every
    /// time.
    ///
    /// `pooling` preallocates instance slots (the pooling allocator): fresh instances get
    /// cheaper, at the price of reserving address space for `POOLED_INSTANCES` up front,
    /// which some hosts refuse.
    pub fn new(
        limits: Limits,
        cache_dir: Option<PathBuf>,
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
        let cache = cache::ArtifactCache::new(cache_dir, &engine);
        Ok(PluginEngine {
            engine,
            linker,
            limits,
            cache,
            ticking,
        })
    }

    fn compile(&self, name: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        self.cache
            .get_or_compile(&self.engine, bytes)
            .map_err(|e| PluginError::Refused {
                plugin: name.to_string(),
                reason: format!("not a WebAssembly component wasmtime can compile: {e:#}"),
            })
    }

    fn world_of(&self, name: &str, component: &Component) -> Result<WorldKind, PluginError> {
        let exports: BTreeSet<String> = component
            .component_type()
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let world = if exports.contains("route") {
            WorldKind::Router
        } else if exports.contains("preprocess") || exports.contains("postprocess") {
            WorldKind::Processor
        } else if exports.contains("evaluate") {
            WorldKind::Flags
        } else {
            return Err(PluginError::Refused {
                plugin: name.to_string(),
                reason: format!(
                    "implements none of the router, processor or flags worlds of {WIT_PACKAGE} (it exports: {})",
                    exports.into_iter().collect::<Vec<_>>().join(", ")
                ),
            });
        };
        Ok(world)
    }

    fn instance_pre(
        &self,
        name: &str,
        component: &Component,
    ) -> Result<wasmtime::component::InstancePre<Sandbox>, PluginError> {
        self.linker
            .instantiate_pre(component)
            .map_err(|e| PluginError::Refused {
                plugin: name.to_string(),
                reason: format!("imports something the sandbox does not offer: {e:#}"),
            })
    }

    /// Compiles (or fetches from the cache), identifies and type-checks a component, ready
    /// to be bound to configurations.
    pub fn prepare(&self, name: &str, bytes: &[u8]) -> Result<Prepared, PluginError> {
        let component = self.compile(name, bytes)?;
        let world = self.world_of(name, &component)?;
        let pre = self.instance_pre(name, &component)?;
        let check = match world {
            WorldKind::Router => RouterWorld::pre_check(pre.clone()),
            WorldKind::Processor => ProcessorWorld::pre_check(pre.clone()),
            WorldKind::Flags => FlagsWorld::pre_check(pre.clone()),
        };
        check.map_err(|e| PluginError::Refused {
            plugin: name.to_string(),
            reason: format!(
                "does not implement the {} world as declared: {e:#}",
                world.as_str()
            ),
        })?;
        Ok(Prepared {
            name: Arc::from(name),
            world,
            pre,
            component,
        })
    }

    /// Instances of a prepared component configured with `config` (JSON); the first is made
    /// and configured now, so a refused configuration is known before anything is served.
    pub fn bind(&self, prepared: &Prepared, config: String) -> Result<Plugin, PluginError> {
        let (name, pre) = (prepared.name.clone(), prepared.pre.clone());
        Ok(match prepared.world {
            WorldKind::Router => {
                Plugin::Router(Pool::new(name, &self.engine, pre, config, self.limits)?)
            }
            WorldKind::Processor => {
                Plugin::Processor(Pool::new(name, &self.engine, pre, config, self.limits)?)
            }
            WorldKind::Flags => {
                Plugin::Flags(Pool::new(name, &self.engine, pre, config, self.limits)?)
            }
        })
    }

    /// Says what a component is, or exactly why it would be refused (short of configuring
    /// it, which needs an endpoint's configuration).
    pub fn inspect(&self, name: &str, bytes: &[u8]) -> Result<Inspection, PluginError> {
        let prepared = self.prepare(name, bytes)?;
        let ty = prepared.component.component_type();
        Ok(Inspection {
            world: prepared.world,
            exports: ty
                .exports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect(),
            imports: ty
                .imports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect(),
        })
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}
