//! What one model version's run needs, shared by the runner and its batching worker: the
//! graph, its meters, the run-time estimate that decides where a call runs, and a run
//! itself — timed, counted, and with a backend's panic caught as this call's failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::backend::{RunError, Runnable, cpu};
use crate::telemetry::{SchedulingMeters, Spending};
use crate::tensor::Tensor;

/// Calls expected to take less than this run on the async thread that received them.
pub const INLINE_BELOW: Duration = Duration::from_micros(50);

/// Why a call did not answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RunFailure {
    /// The inputs hold values the model cannot take: the client's to fix.
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Failed(String),
    /// The backend panicked; caught, and this call alone failed.
    #[error("{0}")]
    Crashed(String),
    /// The batching queue holds `max_queue_size` requests already.
    #[error("the batching queue is full ({0} requests wait)")]
    QueueFull(usize),
    /// The version holds its `max_in_flight` calls already.
    #[error("it holds its limit of {0} requests in flight (max_in_flight in model.toml)")]
    Busy(usize),
    /// The request's own `timeout` passed while it waited.
    #[error("the request's timeout passed after {0:?} in the queue")]
    TimedOut(Duration),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// A model version's series of queue time (called by name), run time and crashes.
#[derive(Clone)]
pub struct ModelMeters {
    pub queue: crate::telemetry::Seconds,
    pub inference: crate::telemetry::Seconds,
    pub crashes: prometheus_client::metrics::counter::Counter,
}

/// What a run needs, shared with the batching worker.
pub(super) struct Core {
    pub(super) graph: Arc<dyn Runnable>,
    pub(super) meters: Option<ModelMeters>,
    pub(super) scheduling: Option<SchedulingMeters>,
    /// Nanoseconds one row takes, a moving average; 0 until known.
    pub(super) row_nanos: AtomicU64,
    /// The CPU time and predictions of this version's runs.
    pub(super) spending: Spending,
}

/// Who else pays for a call besides its model version: the endpoint variant it ran for.
pub type Bill<'a> = Option<&'a Spending>;

impl Core {
    /// Runs one call here and now, charged to the version and to `bill`.
    pub(super) fn run_billed(
        &self,
        inputs: Vec<Tensor>,
        bill: Bill<'_>,
    ) -> Result<Vec<Tensor>, RunFailure> {
        let rows = rows(&inputs);
        let (result, cpu) = self.run_now(inputs);
        self.charge(cpu, &[(rows, bill)], result.is_ok());
        result
    }

    /// Charges a run's CPU time to the version and to each call's bill in proportion to
    /// its rows; the rows are predictions only when the run answered them. An answer from
    /// the cache is charged no CPU time, and its rows are predictions all the same.
    pub(super) fn charge(&self, cpu: Duration, calls: &[(usize, Bill<'_>)], answered: bool) {
        let total: usize = calls.iter().map(|(rows, _)| rows).sum();
        let predictions = |rows: usize| if answered { rows as u64 } else { 0 };
        self.spending.charge(cpu, predictions(total));
        for (rows, bill) in calls {
            if let Some(bill) = bill {
                let share = *rows as f64 / total.max(1) as f64;
                bill.charge(cpu.mul_f64(share), predictions(*rows));
            }
        }
    }

    /// Runs the model here and now: timed, its crash caught; and the CPU time it took, for
    /// the caller to [`charge`](Core::charge) once it knows who answered.
    pub(super) fn run_now(
        &self,
        inputs: Vec<Tensor>,
    ) -> (Result<Vec<Tensor>, RunFailure>, Duration) {
        let rows = rows(&inputs);
        let started = Instant::now();
        let cpu_before = cpu::thread_now();
        // Worker time another graph's run on this thread reported and nobody took (the
        // warm-up's, a wasi-nn guest's) is not this run's.
        cpu::take_workers();
        // A backend that panics (tract on an input it does not expect) fails this run only.
        // Unwinding drops the run's own state; the optimised plan is shared read-only and
        // no lock of ours is held across the call, so the version is as fit for the next
        // request as before.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.graph.run(inputs)));
        let took = started.elapsed();
        let spent = cpu::thread_now().saturating_sub(cpu_before) + cpu::take_workers();
        if let Some(meters) = &self.meters {
            meters.inference.observe(took);
        }
        let result = match result {
            Ok(Ok(outputs)) => {
                self.learn(took, rows);
                Ok(outputs)
            }
            Ok(Err(RunError::Rejected(reason))) => Err(RunFailure::Rejected(reason)),
            Ok(Err(RunError::Failed(reason))) => Err(RunFailure::Failed(reason)),
            Err(panic) => {
                if let Some(meters) = &self.meters {
                    meters.crashes.inc();
                }
                // Logged once already, with where it happened, by the panic hook.
                Err(RunFailure::Crashed(
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".to_string()),
                ))
            }
        };
        (result, spent)
    }

    pub(super) fn learn(&self, took: Duration, rows: usize) {
        let sample = u64::try_from(took.as_nanos() / rows.max(1) as u128).unwrap_or(u64::MAX);
        let old = self.row_nanos.load(Ordering::Relaxed);
        // An average over the last ~8 runs: one slow run does not send the model to the
        // pool for good, nor a fast one bring a slow model inline.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.row_nanos.store(new.max(1), Ordering::Relaxed);
    }

    pub(super) fn runs_inline(&self, rows: usize) -> bool {
        let per_row = self.row_nanos.load(Ordering::Relaxed);
        per_row != 0 && u128::from(per_row) * rows.max(1) as u128 <= INLINE_BELOW.as_nanos()
    }
}

/// The rows of a call: its predictions.
pub fn rows(inputs: &[Tensor]) -> usize {
    inputs
        .first()
        .and_then(|t| t.shape.first())
        .copied()
        .unwrap_or(1)
}
