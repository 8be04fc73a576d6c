//! Shadow traffic: variants that get a copy of a request whose answer came from another
//! variant. Copies wait in one bounded queue and run on one thread of their own, after
//! the primary has answered: a full queue drops the copy (and counts it) rather than make
//! anyone wait, and a shadow that fails or crawls only shows in its own counters. Each
//! shadow answer is compared with the primary's: top-class agreement for classifier
//! outputs and labels, mean absolute difference for other numbers.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Instant;

use super::request::InferRequest;
use super::variant::serve_variant;
use crate::endpoint::{Agreement, Endpoint};
use crate::plugins::RequestContext;
use crate::registry::ModelRepository;
use crate::telemetry::ShadowOutcome;
use crate::tensor::{DataType, Tensor};

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
            variant.shadow.dropped();
            if let Some(metrics) = job.endpoint.telemetry.metrics() {
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
        let compared = match &result {
            Ok(Ok(answer)) => Some(compare(&job.primary, &answer.outputs)),
            Ok(Err(error)) => {
                tracing::debug!(endpoint = %job.endpoint.name, shadow = %variant.name, %error, "shadow failed");
                None
            }
            Err(_) => {
                tracing::warn!(endpoint = %job.endpoint.name, shadow = %variant.name, "shadow crashed");
                None
            }
        };
        variant.shadow.record(started.elapsed(), compared);
        let outcome = match compared {
            Some(a) if a.agreed < a.compared || a.mismatched > 0 => ShadowOutcome::Disagreed,
            Some(_) => ShadowOutcome::Agreed,
            None => ShadowOutcome::Failed,
        };
        if let Some(metrics) = job.endpoint.telemetry.metrics() {
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
