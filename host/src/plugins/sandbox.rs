//! What a plugin instance may touch: nothing but its own memory, within limits, and the
//! host's log. WASI is linked only because `wasm32-wasip2` code imports it; its context
//! has no preopened directories, no environment, no arguments, no sockets, and stdout and
//! stderr go nowhere.
//!
//! Owns: the limits, the store's data, the budget a running call spends, the linker (what
//! a plugin may import, under the names of the host's contract line and of the line
//! before). Must not touch: which world a component implements or how calls
//! are made and counted (`contract`, `pool`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{
    Engine, ResourceLimiter, StoreContextMut, StoreLimits, StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{Host, Level, router};
use super::contract::{HOST_VERSION, PACKAGE, previous_line};

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
    /// Idle instances one configured plugin keeps for the next calls, at most: as many as
    /// calls can run at once. A burst's extra instances are dropped as they come back.
    pub idle_instances: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_deadline: Duration::from_millis(10),
            wall_limit: Duration::from_secs(1),
            memory_bytes: 64 * 1024 * 1024,
            idle_instances: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// One instance's store data.
pub struct Sandbox {
    plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: Limiter,
    pub(super) budget: Budget,
}

/// What an instance may hold: its memory limit, refused with [`OverMemory`] (a typed
/// error, so a call that ran out is told from any other trap), and wasmtime's limits on
/// instances, tables and memories.
pub(super) struct Limiter {
    memory_bytes: usize,
    others: StoreLimits,
}

/// A plugin's memory grew past its limit.
#[derive(Debug, thiserror::Error)]
#[error("ran out of its memory limit ({0} bytes)")]
pub struct OverMemory(pub usize);

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            return Err(OverMemory(self.memory_bytes).into());
        }
        self.others.memory_growing(current, desired, maximum)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.others.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.others.instances()
    }

    fn tables(&self) -> usize {
        self.others.tables()
    }

    fn memories(&self) -> usize {
        self.others.memories()
    }
}

/// What the call now running may still spend. CPU time is read from the calling thread's
/// own clock, so a call that waits for a core on a busy machine is not taken for a
/// looping plugin; wall-clock time bounds running code that gets no CPU for that long.
/// Both are measured from the first epoch tick the call runs into, so a call shorter than
/// a tick (nearly all of them) reads no clock at all; the price is up to one tick more.
pub(super) struct Budget {
    cpu: Duration,
    wall: Duration,
    /// The thread's CPU time and the time at the call's first tick.
    from: Option<(Duration, Instant)>,
}

/// Which budget a call ran out of: the error an interrupted call fails with.
#[derive(Debug, thiserror::Error)]
pub enum OverBudget {
    #[error("ran past its CPU deadline ({0:?} of CPU time)")]
    Cpu(Duration),
    #[error("ran past its wall-clock limit ({0:?})")]
    Wall(Duration),
}

/// CPU time the current thread has used.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

impl Budget {
    /// A budget of `cpu` on this thread and `wall` on the clock.
    pub(super) fn new(cpu: Duration, wall: Duration) -> Budget {
        Budget {
            cpu,
            wall,
            from: None,
        }
    }

    fn check(&mut self) -> Result<(), OverBudget> {
        let Some((cpu_from, wall_from)) = self.from else {
            self.from = Some((thread_cpu(), Instant::now()));
            return Ok(());
        };
        if thread_cpu().saturating_sub(cpu_from) > self.cpu {
            return Err(OverBudget::Cpu(self.cpu));
        }
        if wall_from.elapsed() > self.wall {
            return Err(OverBudget::Wall(self.wall));
        }
        Ok(())
    }
}

/// Called by the engine at each epoch tick a call runs through: go on to the next tick
/// while the budget lasts, otherwise interrupt the call.
pub(super) fn on_epoch(
    mut store: StoreContextMut<'_, Sandbox>,
) -> wasmtime::Result<UpdateDeadline> {
    store.data_mut().budget.check()?;
    Ok(UpdateDeadline::Continue(1))
}

impl Sandbox {
    pub(super) fn new(plugin: Arc<str>, memory_bytes: usize, budget: Budget) -> Sandbox {
        let wasi = WasiCtxBuilder::new()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Sandbox {
            plugin,
            wasi,
            table: ResourceTable::new(),
            limits: Limiter {
                memory_bytes,
                others: StoreLimitsBuilder::new()
                    .instances(8)
                    .tables(8)
                    .memories(2)
                    .trap_on_grow_failure(true)
                    .build(),
            },
            budget,
        }
    }
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Host for Sandbox {
    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

/// The WASI interface a guest waits through (`std::thread::sleep` and every other wait
/// of `wasm32-wasip2` code end in one of its two calls), at the version wasmtime-wasi
/// links; should an upgrade move it, the hostile-plugin test's sleeper stops failing fast.
const WASI_POLL: &str = "wasi:io/poll@0.2.12";

/// The imports every plugin may use: WASI (empty, see above) and the host interface.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<Sandbox>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    // A guest blocked in a host call never reaches an epoch check, so no budget could stop
    // it: a plugin that waits fails at once instead. A router or a processor has nothing to
    // wait for — no files, no sockets — and a sleeping one only holds a request hostage.
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_POLL)?;
    for wait in ["poll", "[method]pollable.block"] {
        poll.func_new(wait, |_, _, _, _| {
            Err(wasmtime::Error::msg(
                "waited (a sleep or a poll): plugins may not wait",
            ))
        })?;
    }
    linker.allow_shadowing(false);
    router::modelyard::plugin::host::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;
    // Plugins built for the line before import the interfaces under that line's names; the
    // worlds are the same, so the same host answers them (`contract::loads`).
    if let Some(previous) = previous_line(&HOST_VERSION) {
        linker.instance(&format!("{PACKAGE}/types@{previous}"))?;
        let mut host = linker.instance(&format!("{PACKAGE}/host@{previous}"))?;
        host.func_wrap(
            "log",
            |mut store: StoreContextMut<'_, Sandbox>, (level, message): (Level, String)| {
                store.data_mut().log(level, message);
                Ok(())
            },
        )?;
    }
    Ok(linker)
}
