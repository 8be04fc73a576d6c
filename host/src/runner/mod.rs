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
pub use core::{Bill, INLINE_BELOW, ModelMeters, RunFailure, rows};

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

    /// What this version's runs have cost so far.
    pub fn spending(&self) -> &Spending {
        &self.core.spending
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
    ) -> Result<Vec<Tensor>, RunFailure> {
        let kept = match self.recall(&inputs, None) {
            Ok(hit) => return Ok(hit),
            Err(kept) => kept,
        };
        let _admitted = self.admit()?;
        let outputs = match &self.batching {
            Some((config, runtime)) => {
                self.queued(config, runtime, inputs, deadline, None)?
                    .await?
            }
            None => self.pooled(inputs, slots, deadline).await?,
        };
        self.remember(kept, &outputs);
        Ok(outputs)
    }

    /// Runs a call from a thread of the inference pool (an endpoint's plugins run there):
    /// from the cache, through the batching queue, or right here; charged to the version
    /// and to the variant it runs for.
    pub fn run_blocking(
        &self,
        inputs: Vec<Tensor>,
        deadline: Option<Instant>,
        variant: &Spending,
    ) -> Result<Vec<Tensor>, RunFailure> {
        let kept = match self.recall(&inputs, Some(variant)) {
            Ok(hit) => return Ok(hit),
            Err(kept) => kept,
        };
        let _admitted = self.admit()?;
        let outputs = match &self.batching {
            Some((config, runtime)) => {
                let answer =
                    self.queued(config, runtime, inputs, deadline, Some(variant.clone()))?;
                runtime.block_on(answer)?
            }
            None => {
                if let Some(meters) = &self.core.meters {
                    meters.queue.observe(Duration::ZERO);
                }
                self.core.run_billed(inputs, Some(variant))?
            }
        };
        self.remember(kept, &outputs);
        Ok(outputs)
    }

    /// The cached answer to `inputs` (predictions that cost no run); on a miss, the copy
    /// of them to `remember` the answer by (none without a cache).
    fn recall(
        &self,
        inputs: &[Tensor],
        bill: Bill<'_>,
    ) -> Result<Vec<Tensor>, Option<Vec<Tensor>>> {
        let Some(cache) = &self.cache else {
            return Err(None);
        };
        match cache.get(inputs) {
            Some(outputs) => {
                self.core
                    .charge(Duration::ZERO, &[(rows(inputs), bill)], true);
                Ok(outputs)
            }
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
    ) -> Result<Vec<Tensor>, RunFailure> {
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
            return self.core.run_billed(inputs, None);
        }
        let core = self.core.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let _span = span.enter();
            core.run_billed(inputs, None)
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
        bill: Option<Spending>,
    ) -> Result<impl Future<Output = Result<Vec<Tensor>, RunFailure>> + use<>, RunFailure> {
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
            bill,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{RunError, cpu};
    use crate::telemetry::{Spendings, Spent};
    use crate::tensor::DataType;

    /// A model that burns 3 ms of CPU a run and echoes its input; an input of 666 fails.
    struct Burner;

    impl Runnable for Burner {
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
            let start = cpu::thread_now();
            while cpu::thread_now() - start < Duration::from_millis(3) {
                std::hint::black_box(());
            }
            if inputs[0].data[..4] == 666f32.to_le_bytes() {
                return Err(RunError::Failed("666".into()));
            }
            Ok(inputs)
        }
    }

    fn rows(values: &[f32]) -> Vec<Tensor> {
        vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![values.len(), 1],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }]
    }

    fn runner(spendings: &Spendings, cache: bool, batching: bool) -> Runner {
        Runner::new(
            Arc::new(Burner),
            // Slow enough never to run inline: on the pool, as a real model would.
            Some(Duration::from_millis(3)),
            batching.then(|| BatchingConfig {
                max_batch_size: 8,
                max_queue_delay_us: 50_000,
                preferred_batch_sizes: vec![],
                max_queue_size: 16,
            }),
            cache.then_some(CacheConfig { max_bytes: 1 << 20 }),
            None,
            Meters {
                model: None,
                scheduling: None,
                spending: spendings.version("m", 1),
            },
        )
    }

    fn cpu_ms(spent: Spent) -> f64 {
        spent.cpu_seconds * 1000.0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_version_and_the_variant_pay_the_same_runs() {
        let spendings = Spendings::new(None);
        let variant = spendings.variant("e", "a");
        let cached = runner(&spendings, true, false);
        // A run, then the same input from the cache: two predictions, one run's CPU time.
        tokio::task::block_in_place(|| {
            for _ in 0..2 {
                cached
                    .run_blocking(rows(&[1.0, 2.0]), None, &variant)
                    .unwrap();
            }
            // A failed run costs its time and predicts nothing.
            cached
                .run_blocking(rows(&[666.0]), None, &variant)
                .unwrap_err();
        });
        let (version, billed) = (spendings.version("m", 1).spent(), variant.spent());
        assert_eq!((version.predictions, billed.predictions), (4, 4));
        assert!((5.9..9.0).contains(&cpu_ms(version)), "{version:?}");
        assert!((cpu_ms(version) - cpu_ms(billed)).abs() < 1e-6);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_paid_by_its_requests_in_proportion_to_their_rows() {
        let spendings = Spendings::new(None);
        let batched = Arc::new(runner(&spendings, false, true));
        let (a, b) = (spendings.variant("e", "a"), spendings.variant("e", "b"));
        let calls = [(a.clone(), vec![1.0]), (b.clone(), vec![2.0, 3.0, 4.0])];
        let handles: Vec<_> = calls
            .into_iter()
            .map(|(bill, values)| {
                let batched = batched.clone();
                tokio::task::spawn_blocking(move || {
                    batched.run_blocking(rows(&values), None, &bill).unwrap()
                })
            })
            .collect();
        for handle in handles {
            handle.await.unwrap();
        }
        let version = spendings.version("m", 1).spent();
        let (a, b) = (a.spent(), b.spent());
        assert_eq!(
            (version.predictions, a.predictions, b.predictions),
            (4, 1, 3)
        );
        // One run of both (within the queue delay) or two runs: either way, by rows.
        assert!((cpu_ms(a) + cpu_ms(b) - cpu_ms(version)).abs() < 1e-4);
        if cpu_ms(version) < 6.0 {
            assert!((cpu_ms(b) / cpu_ms(a) - 3.0).abs() < 1e-4, "{a:?} {b:?}");
        }
    }
}
