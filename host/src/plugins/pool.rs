//! Instances of one loaded plugin, reused across requests. A call takes an idle instance
//! (or makes one: instantiate, then `configure`, under a budget of their own), runs under
//! the call's CPU deadline, and gives the instance back only if the call succeeded: a
//! trap, a deadline, an out-of-memory, an `err` or an answer the host cannot use drops
//! it, so nothing a failed call left behind reaches a later request. Every failure is
//! counted (here and in the metrics) and the last one kept for the admin API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::bindings::{
    Decision, Evaluation, FlagInfo, RequestContext, Tensor, VariantStats, flags, processor, router,
};
use super::sandbox::{Budget, OverBudget, Sandbox, on_epoch};
use super::{Limits, PluginError};
use crate::telemetry::{Metrics, PluginFailure, PluginMeter};

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
    last_failure: Mutex<Option<(SystemTime, String)>>,
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
            last_failure: Mutex::new(None),
            meter: None,
        };
        let first = pool.fresh()?;
        pool.give_back(first);
        Ok(pool)
    }

    /// Counts its calls, their time and failures in `metrics`.
    pub fn metered(mut self, metrics: Option<&Metrics>) -> Self {
        self.meter = metrics.map(|m| m.plugin_meter(&self.name, W::NAME));
        self
    }

    fn fresh(&self) -> Result<Live<W>, PluginError> {
        // Making an instance is not a request's work: it gets the backstop, not the call's
        // deadline, so a swap under load does not cut a healthy plugin's first call.
        let setup = Budget::new(self.limits.wall_limit, self.limits.wall_limit);
        let mut store = Store::new(
            &self.engine,
            Sandbox::new(self.name.clone(), self.limits.memory_bytes, setup),
        );
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(on_epoch);
        store.set_epoch_deadline(1);
        let failed = |reason: String| PluginError::Refused {
            plugin: self.name.to_string(),
            reason,
        };
        let bindings = W::instantiate(&self.pre, &mut store)
            .map_err(|e| failed(format!("cannot be instantiated: {}", trap_reason(&e).1)))?;
        W::configure(&bindings, &mut store, &self.config)
            .map_err(|e| failed(format!("failed in configure: {}", trap_reason(&e).1)))?
            .map_err(|e| failed(format!("refused its configuration: {e}")))?;
        Ok(Live { store, bindings })
    }

    fn give_back(&self, live: Live<W>) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(live);
    }

    /// Calls that failed since this binding was made: traps, deadlines, out-of-memory,
    /// `err` results and answers the host could not use.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// When the last call failed, and why.
    pub fn last_failure(&self) -> Option<(SystemTime, String)> {
        self.last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `call` on an instance under the call's budget.
    pub fn call<R>(
        &self,
        call: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PluginError> {
        self.call_checked(call, Ok)
    }

    /// Runs `call`, then `check` on what it returned: a refusal by `check` is the
    /// plugin's failure like any other (an answer the host cannot use).
    pub fn call_checked<R, S>(
        &self,
        call: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<Result<R, String>>,
        check: impl FnOnce(R) -> Result<S, String>,
    ) -> Result<S, PluginError> {
        let started = Instant::now();
        let result = self.call_once(call, check);
        if let Some(meter) = &self.meter {
            meter.call(started.elapsed(), result.as_ref().err().map(|(f, _)| *f));
        }
        result.map_err(|(_, error)| {
            self.failures.fetch_add(1, Ordering::Relaxed);
            *self
                .last_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some((SystemTime::now(), error.to_string()));
            error
        })
    }

    fn call_once<R, S>(
        &self,
        call: impl FnOnce(&W::Bindings, &mut Store<Sandbox>) -> wasmtime::Result<Result<R, String>>,
        check: impl FnOnce(R) -> Result<S, String>,
    ) -> Result<S, (PluginFailure, PluginError)> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut live = match idle {
            Some(live) => live,
            None => self.fresh().map_err(|error| (PluginFailure::Trap, error))?,
        };
        live.store.data_mut().budget =
            Budget::new(self.limits.call_deadline, self.limits.wall_limit);
        live.store.set_epoch_deadline(1);
        let plugin = || self.name.to_string();
        match call(&live.bindings, &mut live.store) {
            Ok(Ok(value)) => match check(value) {
                Ok(value) => {
                    self.give_back(live);
                    Ok(value)
                }
                Err(reason) => Err((
                    PluginFailure::Invalid,
                    PluginError::Invalid {
                        plugin: plugin(),
                        reason,
                    },
                )),
            },
            Ok(Err(message)) => Err((
                PluginFailure::Error,
                PluginError::Failed {
                    plugin: plugin(),
                    message,
                },
            )),
            Err(trap) => {
                let (failure, reason) = trap_reason(&trap);
                Err((
                    failure,
                    PluginError::Trapped {
                        plugin: plugin(),
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
    if let Some(over) = error.downcast_ref::<OverBudget>() {
        return (PluginFailure::Timeout, over.to_string());
    }
    match error.downcast_ref::<wasmtime::Trap>() {
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

/// The direction a processor is called in.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Pre,
    Post,
}

impl Pool<ProcessorWorld> {
    /// Runs the processor on `tensors`; `check` turns what it returns into what the host
    /// uses, or says why it cannot (counted as the plugin's failure).
    pub fn process<S>(
        &self,
        direction: Direction,
        ctx: &RequestContext,
        tensors: &[Tensor],
        check: impl FnOnce(Vec<Tensor>) -> Result<S, String>,
    ) -> Result<S, PluginError> {
        self.call_checked(
            |b, store| match direction {
                Direction::Pre => b.call_preprocess(store, ctx, tensors),
                Direction::Post => b.call_postprocess(store, ctx, tensors),
            },
            check,
        )
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
