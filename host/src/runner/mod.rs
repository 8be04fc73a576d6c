//! How one model version's calls are run: answered from its response cache, batched with
//! other requests' rows, or run on their own — inline on the async thread when the model
//! answers in microseconds, else on the inference pool.
//!
//! The hand-off to a pool thread costs two cross-thread wake-ups (tens of microseconds),
//! more than a small model's whole run; a model that takes milliseconds must not hold an
//! async thread that long. So each version keeps the time a row of it takes (from its
//! warm-up, then every run, as a moving average) and runs a call inline when the call's
//! rows are expected to take under [`INLINE_BELOW`].
//!
//! Owns: the cache, the batching queue and worker, where a run happens, the run's timing
//! and crash capture. Must not touch: routing, plugins, HTTP, request validation.

mod batch;
mod cache;
mod core;

use std::num::NonZeroUsize;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::backend::Runnable;
use crate::telemetry::{SchedulingMeters, Spending, Throttle};
use crate::tensor::Tensor;

pub use batch::BatchingConfig;
pub use cache::{CacheConfig, ResponseCache};
use core::Core;
pub use core::rows;
pub use core::{INLINE_BELOW, ModelMeters, Ran, RunFailure};

/// A model version's calls: its cache, its batching queue, its run-time estimate.
pub struct Runner {
    core: Arc<Core>,
    cache: Option<ResponseCache>,
    /// With the runtime its queue's worker runs on: the one loading the version. Calls
    /// come from async tasks, pool threads and the shadow thread alike.
    batching: Option<(BatchingConfig, tokio::runtime::Handle)>,
    /// The batching queue, started by the first call.
    queue: OnceLock<mpsc::Sender<batch::Job>>,
    /// The calls it may hold at once (`max_in_flight` in model.toml), and its limit.
    admission: Option<(Arc<Semaphore>, usize)>,
    /// Under overload every call is turned away: one warning a second says so.
    warnings: Throttle,
}

/// What a version's calls are counted in: metrics series (when metrics are on) and its
/// spending (always).
pub struct Meters {
    pub model: Option<ModelMeters>,
    pub scheduling: Option<SchedulingMeters>,
    pub spending: Spending,
}

impl Runner {
    pub fn new(
        graph: Arc<dyn Runnable>,
        warm_run: Option<Duration>,
        batching: Option<BatchingConfig>,
        cache: Option<CacheConfig>,
        max_in_flight: Option<NonZeroUsize>,
        meters: Meters,
    ) -> Runner {
        let scheduling = meters.scheduling;
        let core = Core {
            graph,
            meters: meters.model,
            scheduling: scheduling.clone(),
            row_nanos: AtomicU64::new(0),
            spending: meters.spending,
        };
        if let Some(took) = warm_run {
            core.learn(took, 1);
        }
        // Outside a runtime (a unit test loading a model), calls run unbatched.
        let runtime = tokio::runtime::Handle::try_current().ok();
        Runner {
            core: Arc::new(core),
            cache: cache.map(|c| ResponseCache::new(c, scheduling)),
            batching: batching.zip(runtime),
            queue: OnceLock::new(),
            admission: max_in_flight.map(|n| (Arc::new(Semaphore::new(n.get())), n.get())),
            warnings: Throttle::default(),
        }
    }

    /// When a call turned away may be logged (see [`Throttle::pass`]).
    pub fn may_warn(&self) -> Option<u64> {
        self.warnings.pass()
    }

    /// A place among the calls the version may hold at once, or `Busy` at once: a
    /// request beyond the limit is turned away, not queued.
    fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, RunFailure> {
        let Some((places, limit)) = &self.admission else {
            return Ok(None);
        };
        places.clone().try_acquire_owned().map(Some).map_err(|_| {
            if let Some(meters) = &self.core.scheduling {
                meters.busy.inc();
            }
            RunFailure::Busy(*limit)
        })
    }

    /// Runs a call from the async request path: from the cache, through the batching
    /// queue, inline, or on the pool (holding one of `slots`).
    pub async fn run(
        &self,
        inputs: Vec<Tensor>,
        slots: &Arc<Semaphore>,
        deadline: Option<Instant>,
    ) -> Result<Ran, RunFailure> {
        let kept = match self.recall(&inputs) {
            Ok(hit) => return Ok(hit),
            Err(kept) => kept,
        };
        let _admitted = self.admit()?;
        let ran = match &self.batching {
            Some((config, runtime)) => self.queued(config, runtime, inputs, deadline)?.await?,
            None => self.pooled(inputs, slots, deadline).await?,
        };
        self.remember(kept, &ran.outputs);
        Ok(ran)
    }

    /// Runs a call from a thread of the inference pool (an endpoint's plugins run there):
    /// from the cache, through the batching queue, or right here.
    pub fn run_blocking(
        &self,
        inputs: Vec<Tensor>,
        deadline: Option<Instant>,
    ) -> Result<Ran, RunFailure> {
        let kept = match self.recall(&inputs) {
            Ok(hit) => return Ok(hit),
            Err(kept) => kept,
        };
        let _admitted = self.admit()?;
        let ran = match &self.batching {
            Some((config, runtime)) => {
                let answer = self.queued(config, runtime, inputs, deadline)?;
                runtime.block_on(answer)?
            }
            None => {
                if let Some(meters) = &self.core.meters {
                    meters.queue.observe(Duration::ZERO);
                }
                self.core.run_now(inputs)?
            }
        };
        self.remember(kept, &ran.outputs);
        Ok(ran)
    }

    /// The cached answer to `inputs` (it costs no run); on a miss, the copy of them to
    /// `remember` the answer by (none without a cache).
    fn recall(&self, inputs: &[Tensor]) -> Result<Ran, Option<Vec<Tensor>>> {
        let Some(cache) = &self.cache else {
            return Err(None);
        };
        match cache.get(inputs) {
            Some(outputs) => Ok(Ran {
                outputs,
                cpu: Duration::ZERO,
            }),
            None => Err(Some(inputs.to_vec())),
        }
    }

    fn remember(&self, kept: Option<Vec<Tensor>>, outputs: &[Tensor]) {
        if let (Some(cache), Some(inputs)) = (&self.cache, kept) {
            cache.put(inputs, outputs);
        }
    }

    async fn pooled(
        &self,
        inputs: Vec<Tensor>,
        slots: &Arc<Semaphore>,
        deadline: Option<Instant>,
    ) -> Result<Ran, RunFailure> {
        let queued = Instant::now();
        let acquire = slots.clone().acquire_owned();
        let slot = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), acquire)
                .await
                .map_err(|_| self.timed_out(queued))?,
            None => acquire.await,
        }
        .map_err(|_| RunFailure::ShuttingDown)?;
        if let Some(meters) = &self.core.meters {
            meters.queue.observe(queued.elapsed());
        }
        if self.core.runs_inline(rows(&inputs)) {
            let _slot = slot;
            return self.core.run_now(inputs);
        }
        let core = self.core.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let _span = span.enter();
            core.run_now(inputs)
        })
        .await
        .unwrap_or_else(|join| Err(RunFailure::Crashed(join.to_string())))
    }

    fn timed_out(&self, queued: Instant) -> RunFailure {
        if let Some(meters) = &self.core.scheduling {
            meters.timed_out.inc();
        }
        RunFailure::TimedOut(queued.elapsed())
    }

    /// Queues the call for a batch; the answer comes when its batch has run.
    fn queued(
        &self,
        config: &BatchingConfig,
        runtime: &tokio::runtime::Handle,
        inputs: Vec<Tensor>,
        deadline: Option<Instant>,
    ) -> Result<impl Future<Output = Result<Ran, RunFailure>> + use<>, RunFailure> {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(config.max_queue_size.max(1));
            runtime.spawn(batch::worker(self.core.clone(), config.clone(), receiver));
            sender
        });
        let (reply, answer) = oneshot::channel();
        let enqueued = Instant::now();
        let job = batch::Job {
            inputs,
            enqueued,
            deadline,
            reply,
        };
        queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                if let Some(meters) = &self.core.scheduling {
                    meters.queue_full.inc();
                }
                RunFailure::QueueFull(config.max_queue_size)
            }
            mpsc::error::TrySendError::Closed(_) => RunFailure::ShuttingDown,
        })?;
        let scheduling = self.core.scheduling.clone();
        Ok(async move {
            let answer = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline.into(), answer).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        // Dropping the receiver tells the worker to skip the job.
                        if let Some(meters) = &scheduling {
                            meters.timed_out.inc();
                        }
                        return Err(RunFailure::TimedOut(enqueued.elapsed()));
                    }
                },
                None => answer.await,
            };
            answer.unwrap_or(Err(RunFailure::ShuttingDown))
        })
    }
}
