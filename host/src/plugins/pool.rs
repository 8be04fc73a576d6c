//! Instances of one loaded plugin, reused across requests. A call takes an idle instance
//! (or makes one: instantiate, then `configure`, under a budget of their own), runs under
//! the call's CPU deadline, and gives the instance back only if the call succeeded: a
//! trap, a deadline, an out-of-memory, an `err` or an answer the host cannot use drops
//! it, so nothing a failed call left behind reaches a later request. Every failure is
//! counted (here and in the metrics) and the last one kept for the admin API.
//!
//! Owns: instances of configured plugins and the calls into them. Must not touch: whether
//! a component is a plugin at all (`contract`, `engine`), or what endpoints do with an
//! answer or a failure (the pipeline's policies).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use wasmtime::Store;

use super::bindings::{Decision, Evaluation, FlagInfo, RequestContext, Tensor, VariantStats};
use super::error::PluginError;
use super::sandbox::{Budget, Limits, OverBudget, OverMemory, Sandbox, on_epoch};
use super::world::{FlagsWorld, ProcessorWorld, RouterWorld, World};
use crate::telemetry::{Metrics, PluginFailure, PluginMeter};

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
    /// Configures a first instance of a component already checked against the world, so a
    /// plugin that refuses its configuration is refused before it serves anything.
    pub(super) fn new(
        name: Arc<str>,
        engine: &wasmtime::Engine,
        pre: W::Pre,
        config: String,
        limits: Limits,
    ) -> Result<Self, PluginError> {
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

    /// Keeps `live` for a later call, unless as many instances as may ever be needed at
    /// once are idle already: then it is dropped (after the lock), so a burst's instances
    /// do not hold their memory for good.
    fn give_back(&self, live: Live<W>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.limits.idle_instances.max(1) {
            idle.push(live);
        }
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
}

fn trap_reason(error: &wasmtime::Error) -> (PluginFailure, String) {
    if let Some(over) = error.downcast_ref::<OverBudget>() {
        return (PluginFailure::Timeout, over.to_string());
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => (PluginFailure::Trap, format!("trapped: {trap}")),
        None if let Some(over) = error.downcast_ref::<OverMemory>() => {
            (PluginFailure::Memory, over.to_string())
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wasmtime::component::{Component, InstancePre};

    use super::*;
    use crate::plugins::sandbox::linker;

    mod probe {
        wasmtime::component::bindgen!({
            inline: "
                package test:probe;
                world probe {
                    export configure: func(mode: u32) -> result<_, string>;
                    export run: func(mode: u32) -> result<u32, string>;
                }
            ",
        });
    }

    /// A world of two calls, enough to drive the pool through everything a plugin can do
    /// to it: `configure` refuses unless its configuration is `0`; `run(0)` answers how
    /// many calls its instance has answered, `run(1)` traps, `run(2)` loops, `run(3)`
    /// returns an `err`, `run(4)` grows its memory past any limit.
    struct Probe;

    impl World for Probe {
        const NAME: &'static str = "probe";
        type Pre = probe::ProbePre<Sandbox>;
        type Bindings = probe::Probe;
        fn pre(pre: InstancePre<Sandbox>) -> wasmtime::Result<Self::Pre> {
            probe::ProbePre::new(pre)
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
            bindings.call_configure(store, config.parse()?)
        }
    }

    // Results go through memory at 64: the case's tag, then at 68 the `u32` or the string's
    // address and length.
    const PROBE: &str = r#"
        (component
          (core module $m
            (memory (export "memory") 1)
            (global $answered (mut i32) (i32.const 0))
            (data (i32.const 16) "fails on purpose")
            (func $ok (param $value i32) (result i32)
              (i32.store8 (i32.const 64) (i32.const 0))
              (i32.store (i32.const 68) (local.get $value))
              (i32.const 64))
            (func $err (result i32)
              (i32.store8 (i32.const 64) (i32.const 1))
              (i32.store (i32.const 68) (i32.const 16))
              (i32.store (i32.const 72) (i32.const 16))
              (i32.const 64))
            (func (export "configure") (param $mode i32) (result i32)
              (if (result i32) (local.get $mode)
                (then (call $err))
                (else (call $ok (i32.const 0)))))
            (func (export "run") (param $mode i32) (result i32)
              (block $grow (block $err (block $loop (block $trap (block $answer
                (br_table $answer $trap $loop $err $grow (local.get $mode)))
                (global.set $answered (i32.add (global.get $answered) (i32.const 1)))
                (return (call $ok (global.get $answered))))
                unreachable)
                (loop $forever (br $forever))
                unreachable)
                (return (call $err)))
              (drop (memory.grow (i32.const 65535)))
              unreachable))
          (core instance $i (instantiate $m))
          (func (export "configure") (param "mode" u32) (result (result (error string)))
            (canon lift (core func $i "configure") (memory $i "memory")))
          (func (export "run") (param "mode" u32) (result (result u32 (error string)))
            (canon lift (core func $i "run") (memory $i "memory"))))
    "#;

    fn probe(config: &str) -> Result<Pool<Probe>, PluginError> {
        let mut settings = wasmtime::Config::new();
        settings.epoch_interruption(true);
        let engine = wasmtime::Engine::new(&settings).unwrap();
        let ticker = engine.weak();
        std::thread::spawn(move || {
            while let Some(engine) = ticker.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let component = Component::new(&engine, wat::parse_str(PROBE).unwrap()).unwrap();
        let pre = linker(&engine)
            .unwrap()
            .instantiate_pre(&component)
            .unwrap();
        let limits = Limits {
            call_deadline: Duration::from_millis(20),
            wall_limit: Duration::from_secs(5),
            memory_bytes: 1 << 20,
            idle_instances: 2,
        };
        Pool::new(
            "probe".into(),
            &engine,
            Probe::pre(pre).unwrap(),
            config.into(),
            limits,
        )
    }

    fn run(pool: &Pool<Probe>, mode: u32) -> Result<u32, PluginError> {
        pool.call(|b, store| b.call_run(store, mode))
    }

    #[test]
    fn a_plugin_that_refuses_its_configuration_is_refused_at_once() {
        match probe("1") {
            Err(PluginError::Refused { plugin, reason }) => {
                assert_eq!(plugin, "probe");
                assert_eq!(reason, "refused its configuration: fails on purpose");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("configured"),
        }
    }

    #[test]
    fn an_instance_that_answers_serves_the_next_call() {
        let pool = probe("0").unwrap();
        assert_eq!(run(&pool, 0).unwrap(), 1);
        assert_eq!(run(&pool, 0).unwrap(), 2);
        assert_eq!(run(&pool, 0).unwrap(), 3);
        assert_eq!(pool.failures(), 0);
        assert!(pool.last_failure().is_none());
    }

    #[test]
    fn a_burst_leaves_no_more_idle_instances_than_the_limit() {
        let pool = probe("0").unwrap();
        // Five calls at once: five instances, all answering, coming back.
        let burst: Vec<_> = (0..5).map(|_| pool.fresh().unwrap()).collect();
        for live in burst {
            pool.give_back(live);
        }
        assert_eq!(pool.idle.lock().unwrap().len(), 2);
        assert_eq!(run(&pool, 0).unwrap(), 1);
        assert_eq!(pool.idle.lock().unwrap().len(), 2);
    }

    #[test]
    fn every_failure_is_counted_and_drops_its_instance() {
        let pool = probe("0").unwrap();
        let failures = [
            (1, "trapped"),
            (2, "ran past its CPU deadline (20ms of CPU time)"),
            (3, "returned an error: fails on purpose"),
            (4, "ran out of its memory limit"),
        ];
        for (count, (mode, says)) in (1..).zip(failures) {
            // A fresh instance each time: the failed one's count is gone with it.
            assert_eq!(run(&pool, 0).unwrap(), 1, "after mode {mode}");
            let error = run(&pool, mode).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("plugin 'probe' {says}")),
                "{error}"
            );
            assert_eq!(pool.failures(), count);
            assert_eq!(pool.last_failure().unwrap().1, error);
        }
        assert_eq!(run(&pool, 0).unwrap(), 1);
    }

    #[test]
    fn an_answer_the_host_cannot_use_is_the_plugins_failure() {
        let pool = probe("0").unwrap();
        let refuse = |n: u32| Err::<u32, _>(format!("{n} is not an answer"));
        let error = pool
            .call_checked(|b, store| b.call_run(store, 0), refuse)
            .unwrap_err();
        assert!(
            matches!(&error, PluginError::Invalid { reason, .. } if reason == "1 is not an answer"),
            "{error}"
        );
        assert_eq!(pool.failures(), 1);
        assert_eq!(run(&pool, 0).unwrap(), 1);
    }
}
