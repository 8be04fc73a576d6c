//! Instances of one loaded plugin, reused across requests. A call takes an idle instance
//! (or makes one: instantiate, then `configure`), runs under the CPU deadline, and gives
//! the instance back only if the call succeeded: a trap, a deadline, an out-of-memory or
//! an `err` drops it, so nothing a failed call left behind reaches a later request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::bindings::{
    Decision, Evaluation, FlagInfo, RequestContext, Tensor, VariantStats, flags, processor, router,
};
use super::sandbox::Sandbox;
use super::{Limits, PluginError};
use crate::telemetry::{PluginFailure, PluginMeter};

/// What differs between the worlds when instantiating and configuring.
pub trait World: Sized + 'static {
    const NAME: &'static str;
    type Pre: Send + Sync;
    type Bindings: Send;
    fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre>;
    /// Whether the component's exports have this world's types.
    fn pre_check(pre: InstancePre<Sandbox>) -> wasmtime::Result<()> {
        Self::pre(pre).map(|_| ())
    }
    fn instantiate(pre: &Self::Pre, store: &mut Store<Sandbox>)
    -> wasmtime::Result<Self::Bindings>;
    fn configure(
        bindings: &Self::Bindings,
        store: &mut Store<Sandbox>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>>;
}

macro_rules! world {
    ($marker:ident, $name:literal, $module:ident, $bindings:ident, $pre:ident) => {
        pub struct $marker;
        impl World for $marker {
            const NAME: &'static str = $name;
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

world!(RouterWorld, "router", router, Router, RouterPre);
world!(
    ProcessorWorld,
    "processor",
    processor,
    Processor,
    ProcessorPre
);
world!(FlagsWorld, "flags", flags, Flags, FlagsPre);

struct Live<W: World> {
    store: Store<Sandbox>,
    bindings: W::Bindings,
}

pub struct Pool<W: World> {
    name: Arc<str>,
    pre: W::Pre,
    config: String,
    limits: Limits,
    engine: wasmtime::Engine,
    idle: Mutex<Vec<Live<W>>>,
    failures: AtomicU64,
    meter: Option<PluginMeter>,
}

impl<W: World> Pool<W> {
    /// Type-checks the component against the world and configures a first instance, so a
    /// plugin that refuses its configuration is refused before it serves anything.
    pub(super) fn new(
        name: Arc<str>,
        engine: &wasmtime::Engine,
        pre: InstancePre<Sandbox>,
        config: String,
        limits: Limits,
    ) -> Result<Self, PluginError> {
        let pre = W::pre(pre).map_err(|e| PluginError::Refused {
            plugin: name.to_string(),
            reason: format!(
                "does not implement the {} world as declared: {e:#}",
                W::NAME
            ),
        })?;
        let pool = Pool {
            name: name.clone(),
            pre,
            config,
            limits,
            engine: engine.clone(),
            idle: Mutex::new(Vec::new()),
            failures: AtomicU64::new(0),
            meter: crate::telemetry::metrics().map(|m| m.plugin_meter(&name, W::NAME)),
        };
        let first = pool.fresh()?;
        pool.give_back(first);
        Ok(pool)
    }

    fn fresh(&self) -> Result<Live<W>, PluginError> {
        let mut store = Store::new(
            &self.engine,
            Sandbox::new(self.name.clone(), self.limits.memory_bytes),
        );
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.limits.deadline_ticks());
        let failed = |reason: String| PluginError::Refused {
            plugin: self.name.to_string(),
            reason,
        };
        let bindings = W::instantiate(&self.pre, &mut store)
            .map_err(|e| failed(format!("cannot be instantiated: {e:#}")))?;
        W::configure(&bindings, &mut store, &self.config)
            .map_err(|e| failed(format!("trapped in configure: {e:#}")))?
            .map_err(|e| failed(format!("refused its configuration: {e}")))?;
        Ok(Live { store, bindings })
    }

    fn give_back(&self, live: Live<W>) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(live);
    }

    /// Calls that failed since this binding was made: traps, deadlines, out-of-memory and
    /// `err` results.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Runs `call` on an instance under the CPU deadline.
    pub fn call<R>(
        &self,
        call: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PluginError> {
        let started = Instant::now();
        let result = self.call_once(call);
        if let Some(meter) = &self.meter {
            meter.call(started.elapsed(), result.as_ref().err().map(|(f, _)| *f));
        }
        result.map_err(|(_, error)| error)
    }

    fn call_once<R>(
        &self,
        call: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, (PluginFailure, PluginError)> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut live = match idle {
            Some(live) => live,
            None => self.fresh().map_err(|error| {
                self.failures.fetch_add(1, Ordering::Relaxed);
                (PluginFailure::Trap, error)
            })?,
        };
        live.store.set_epoch_deadline(self.limits.deadline_ticks());
        let result = call(&live.bindings, &mut live.store);
        if !matches!(result, Ok(Ok(_))) {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(value)) => {
                self.give_back(live);
                Ok(value)
            }
            Ok(Err(message)) => Err((
                PluginFailure::Error,
                PluginError::Failed {
                    plugin: self.name.to_string(),
                    message,
                },
            )),
            Err(trap) => {
                let (failure, reason) = trap_reason(&trap);
                Err((
                    failure,
                    PluginError::Trapped {
                        plugin: self.name.to_string(),
                        reason,
                    },
                ))
            }
        }
    }

    /// A new instance for every call, never reused: what the reuse saves, for benchmarks.
    #[doc(hidden)]
    pub fn call_fresh<R>(
        &self,
        call: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PluginError> {
        let mut live = self.fresh()?;
        call(&live.bindings, &mut live.store)
            .map_err(|trap| PluginError::Trapped {
                plugin: self.name.to_string(),
                reason: trap_reason(&trap).1,
            })?
            .map_err(|message| PluginError::Failed {
                plugin: self.name.to_string(),
                message,
            })
    }
}

fn trap_reason(error: &wasmtime::Error) -> (PluginFailure, String) {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => (
            PluginFailure::Timeout,
            "ran past its CPU deadline".to_string(),
        ),
        Some(trap) => (PluginFailure::Trap, format!("trapped: {trap}")),
        // The store limiter's refusal to grow memory (trap_on_grow_failure).
        None if format!("{error:#}").contains("forcing trap when growing memory") => (
            PluginFailure::Memory,
            "ran out of its memory limit".to_string(),
        ),
        None => (PluginFailure::Trap, format!("failed: {error:#}")),
    }
}

impl Pool<RouterWorld> {
    pub fn route(
        &self,
        ctx: &RequestContext,
        variants: &[VariantStats],
        state: &str,
    ) -> Result<Decision, PluginError> {
        self.call(|b, store| b.call_route(store, ctx, variants, state))
    }

    /// An operator's `action` with JSON `args` applied to `state`; the new state.
    pub fn act(
        &self,
        action: &str,
        args: &str,
        state: &str,
        variants: &[VariantStats],
        now_ms: u64,
    ) -> Result<String, PluginError> {
        self.call(|b, store| b.call_act(store, action, args, state, variants, now_ms))
    }

    /// The strategy's state as the router explains it (JSON).
    pub fn describe(&self, state: &str, variants: &[VariantStats]) -> Result<String, PluginError> {
        self.call(|b, store| b.call_describe(store, state, variants).map(Ok))
    }
}

impl Pool<ProcessorWorld> {
    pub fn preprocess(
        &self,
        ctx: &RequestContext,
        inputs: &[Tensor],
    ) -> Result<Vec<Tensor>, PluginError> {
        self.call(|b, store| b.call_preprocess(store, ctx, inputs))
    }

    pub fn postprocess(
        &self,
        ctx: &RequestContext,
        outputs: &[Tensor],
    ) -> Result<Vec<Tensor>, PluginError> {
        self.call(|b, store| b.call_postprocess(store, ctx, outputs))
    }
}

impl Pool<FlagsWorld> {
    pub fn evaluate(&self, ctx: &RequestContext) -> Result<Vec<Evaluation>, PluginError> {
        self.call(|b, store| b.call_evaluate(store, ctx).map(Ok))
    }

    pub fn describe(&self, now_ms: u64) -> Result<Vec<FlagInfo>, PluginError> {
        self.call(|b, store| b.call_describe(store, now_ms).map(Ok))
    }
}
