//! Shadow traffic: variants that get a copy of a request whose answer came from another
//! variant. Copies wait in one bounded queue and run on one thread of their own, after
//! the primary has answered: a full queue drops the copy (and counts it) rather than make
//! anyone wait, and a shadow that fails or crawls only shows in its own counters. Each
//! shadow answer is compared with the primary's: top-class agreement for classifier
//! outputs and labels, mean absolute difference for other numbers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::endpoints::Endpoint;
use super::stats::{StatsSnapshot, VariantCounters};
use super::{InferRequest, serve_variant};
use crate::plugins::RequestContext;
use crate::registry::ModelRepository;
use crate::telemetry::{self, Comparison};
use crate::tensor::{DataType, Tensor};

/// What one variant did in the shadow of an endpoint.
#[derive(Default)]
pub struct ShadowCounters {
    /// Runs, errors and latency of the shadow's own answers.
    runs: VariantCounters,
    dropped: AtomicU64,
    agreement: Mutex<Agreement>,
}

/// How a shadow's answers compared with the primary's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Agreement {
    /// Rows of class scores (argmax) and label elements compared, and how many matched.
    pub compared: u64,
    pub agreed: u64,
    /// Other numbers compared, and the sum of their absolute differences.
    pub values: u64,
    pub abs_diff_sum: f64,
    /// Outputs the shadow lacked or gave in another shape or datatype.
    pub mismatched: u64,
}

impl Agreement {
    fn add(&mut self, other: Agreement) {
        self.compared += other.compared;
        self.agreed += other.agreed;
        self.values += other.values;
        self.abs_diff_sum += other.abs_diff_sum;
        self.mismatched += other.mismatched;
    }
}

/// A copy of the counters for the admin API.
#[derive(Debug, serde::Serialize)]
pub struct ShadowReport {
    pub runs: u64,
    pub errors: u64,
    pub dropped: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    /// Share of compared rows whose top class (or label) matched the primary's.
    pub agreement: Option<f64>,
    pub compared: u64,
    pub mean_abs_diff: Option<f64>,
    pub mismatched_outputs: u64,
}

impl ShadowCounters {
    pub fn report(&self) -> ShadowReport {
        let StatsSnapshot {
            requests,
            errors,
            latency_p50_us,
            latency_p99_us,
            ..
        } = self.runs.snapshot();
        let a = *self
            .agreement
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ShadowReport {
            runs: requests,
            errors,
            dropped: self.dropped.load(Ordering::Relaxed),
            latency_p50_us,
            latency_p99_us,
            agreement: (a.compared > 0).then(|| a.agreed as f64 / a.compared as f64),
            compared: a.compared,
            mean_abs_diff: (a.values > 0).then(|| a.abs_diff_sum / a.values as f64),
            mismatched_outputs: a.mismatched,
        }
    }
}

/// One request to replay on a shadow variant.
pub struct ShadowJob {
    pub endpoint: Arc<Endpoint>,
    pub variant: usize,
    pub ctx: RequestContext,
    pub inputs: Arc<Vec<Tensor>>,
    /// What the primary answered, to compare with.
    pub primary: Arc<Vec<Tensor>>,
    /// The request's span, so the shadow's log lines carry its id.
    pub span: tracing::Span,
}

/// The queue in front of the shadow thread.
pub struct ShadowQueue {
    jobs: SyncSender<ShadowJob>,
}

impl ShadowQueue {
    /// Starts the shadow thread; it ends when the queue is dropped.
    pub fn start(capacity: usize, repository: Arc<ModelRepository>) -> ShadowQueue {
        let (jobs, queue) = std::sync::mpsc::sync_channel(capacity);
        let spawned = std::thread::Builder::new()
            .name("modelyard-shadow".to_string())
            .spawn(move || work(&queue, &repository));
        if let Err(error) = spawned {
            // The receiver is gone with the closure, so every submit counts as dropped.
            tracing::error!(%error, "cannot start the shadow thread; shadow requests will be dropped");
        }
        ShadowQueue { jobs }
    }

    /// Queues `job` unless the queue is full, in which case it is dropped and counted.
    pub fn submit(&self, job: ShadowJob) {
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) =
            self.jobs.try_send(job)
        {
            let variant = &job.endpoint.variants[job.variant];
            variant.shadow.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(metrics) = telemetry::metrics() {
                metrics.shadow_dropped(&job.endpoint.name, &variant.name);
            }
        }
    }
}

fn work(queue: &Receiver<ShadowJob>, repository: &ModelRepository) {
    while let Ok(job) = queue.recv() {
        let _span = job.span.enter();
        let started = Instant::now();
        let variant = &job.endpoint.variants[job.variant];
        let request = InferRequest {
            inputs: job.inputs.as_ref().clone(),
            ..InferRequest::default()
        };
        // A crash in a shadow must not end the thread that serves every other shadow.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_variant(repository, &job.endpoint, variant, &job.ctx, request)
        }));
        let counters = &variant.shadow;
        counters
            .runs
            .record(started.elapsed(), !matches!(result, Ok(Ok(_))));
        let outcome = match &result {
            Ok(Ok(answer)) => {
                let agreement = compare(&job.primary, &answer.outputs);
                counters
                    .agreement
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .add(agreement);
                if agreement.agreed < agreement.compared || agreement.mismatched > 0 {
                    Comparison::Disagreed
                } else {
                    Comparison::Agreed
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(endpoint = %job.endpoint.name, shadow = %variant.name, %error, "shadow failed");
                Comparison::Failed
            }
            Err(_) => {
                tracing::warn!(endpoint = %job.endpoint.name, shadow = %variant.name, "shadow crashed");
                Comparison::Failed
            }
        };
        if let Some(metrics) = telemetry::metrics() {
            metrics.shadow_compared(&job.endpoint.name, &variant.name, outcome);
        }
    }
}

/// Compares every primary output with the shadow's output of the same name.
pub fn compare(primary: &[Tensor], shadow: &[Tensor]) -> Agreement {
    let mut result = Agreement::default();
    for p in primary {
        let Some(s) = shadow
            .iter()
            .find(|s| s.name == p.name && s.shape == p.shape && s.datatype == p.datatype)
        else {
            result.mismatched += 1;
            continue;
        };
        match (p.floats(), s.floats()) {
            (Some(a), Some(b)) => match p.shape.last() {
                // Rows of class scores: does the top class agree?
                Some(&classes) if p.shape.len() >= 2 && classes > 1 => {
                    for (ra, rb) in a.chunks(classes).zip(b.chunks(classes)) {
                        result.compared += 1;
                        let top = |row: &[f64]| modelyard_sdk::argmax(row.iter().copied());
                        result.agreed += u64::from(top(ra) == top(rb));
                    }
                }
                _ => {
                    result.values += a.len() as u64;
                    result.abs_diff_sum +=
                        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f64>();
                }
            },
            // Labels (integers, booleans, strings): element by element.
            _ => {
                let (ea, eb) = match p.datatype {
                    DataType::Bytes => (
                        Tensor::byte_elements(&p.data).unwrap_or_default(),
                        Tensor::byte_elements(&s.data).unwrap_or_default(),
                    ),
                    other => {
                        let size = other.element_size().unwrap_or(1).max(1);
                        (p.data.chunks(size).collect(), s.data.chunks(size).collect())
                    }
                };
                result.compared += ea.len() as u64;
                result.agreed += ea.iter().zip(&eb).filter(|(x, y)| x == y).count() as u64;
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32(name: &str, shape: &[usize], values: &[f32]) -> Tensor {
        Tensor {
            name: name.to_string(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn labels(values: &[i64]) -> Tensor {
        Tensor {
            name: "label".to_string(),
            datatype: DataType::Int64,
            shape: vec![values.len()],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn class_scores_and_labels_are_compared_by_agreement() {
        let primary = [
            fp32("probs", &[2, 3], &[0.1, 0.8, 0.1, 0.6, 0.3, 0.1]),
            labels(&[1, 0]),
        ];
        let shadow = [
            fp32("probs", &[2, 3], &[0.2, 0.7, 0.1, 0.2, 0.3, 0.5]),
            labels(&[1, 2]),
        ];
        let a = compare(&primary, &shadow);
        assert_eq!((a.compared, a.agreed, a.values, a.mismatched), (4, 2, 0, 0));
    }

    #[test]
    fn other_numbers_by_mean_absolute_difference_and_missing_outputs_count() {
        let a = compare(
            &[fp32("y", &[3], &[1.0, 2.0, 3.0]), labels(&[1])],
            &[fp32("y", &[3], &[1.5, 2.0, 2.0])],
        );
        assert_eq!((a.values, a.mismatched), (3, 1));
        assert!((a.abs_diff_sum - 1.5).abs() < 1e-9);
    }
}
