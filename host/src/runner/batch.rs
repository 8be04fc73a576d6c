//! Dynamic batching, with Triton's semantics: requests queue per model version; a batch
//! starts with the oldest and takes the requests queued behind it (or arriving within
//! `max_queue_delay_us` of its arrival) until it holds `max_batch_size` rows or a preferred
//! size; it runs as one model call, and each request gets exactly its own rows back.
//!
//! Only requests whose inputs agree in names, datatypes and every dimension but the first
//! share a run; a request that cannot be batched (inputs of different row counts, a scalar,
//! more rows than `max_batch_size`) runs alone, in its turn. Each request selects its own
//! outputs afterwards, so the outputs asked for do not keep requests apart.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::core::{Core, RunFailure, rows};
use crate::telemetry::Spending;
use crate::tensor::{DataType, Tensor};

/// `[batching]` in `model.toml`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// The most rows one run takes.
    pub max_batch_size: usize,
    /// How long the oldest request may wait for others to join it.
    #[serde(default)]
    pub max_queue_delay_us: u64,
    /// Row counts at which a batch starts without waiting for more.
    #[serde(default)]
    pub preferred_batch_sizes: Vec<usize>,
    /// Requests that may wait; beyond it, 503 with `Retry-After`.
    #[serde(default = "default_queue")]
    pub max_queue_size: usize,
}

fn default_queue() -> usize {
    1024
}

/// One request waiting for its rows.
pub(super) struct Job {
    pub inputs: Vec<Tensor>,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    /// The variant the call runs for, charged its share of the batch.
    pub bill: Option<Spending>,
    pub reply: oneshot::Sender<Result<Vec<Tensor>, RunFailure>>,
}

/// What requests must share to run together: each input's name, datatype and dimensions
/// after the first, in name order.
type BatchKey<'a> = Vec<(&'a str, DataType, &'a [usize])>;

/// A request's batch key and the rows it brings; `None`: it runs alone.
fn shape_of(inputs: &[Tensor], max_rows: usize) -> Option<(BatchKey<'_>, usize)> {
    let rows = *inputs.first()?.shape.first()?;
    let mut key = Vec::with_capacity(inputs.len());
    for t in inputs {
        let (&first, rest) = t.shape.split_first()?;
        if first != rows {
            return None;
        }
        key.push((t.name.as_str(), t.datatype, rest));
    }
    key.sort_unstable_by(|a, b| a.0.cmp(b.0));
    (rows <= max_rows).then_some((key, rows))
}

pub(super) async fn worker(
    core: Arc<Core>,
    config: BatchingConfig,
    mut queue: mpsc::Receiver<Job>,
) {
    let delay = Duration::from_micros(config.max_queue_delay_us);
    let mut held: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match held.pop_front() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                // The version was unloaded and every request it queued is answered.
                None => return,
            },
        };
        let Some(first) = admit(&core, first) else {
            continue;
        };
        let mut joined = Vec::new();
        if let Some((key, mut rows)) = shape_of(&first.inputs, config.max_batch_size) {
            let until = first.enqueued + delay;
            while rows < config.max_batch_size {
                // Those already waiting join at once; then the newcomers, until the delay.
                let next = match held.pop_front() {
                    Some(job) => Some(job),
                    None => match queue.try_recv() {
                        Ok(job) => Some(job),
                        Err(_) if config.preferred_batch_sizes.contains(&rows) => None,
                        Err(_) => tokio::time::timeout_at(until.into(), queue.recv())
                            .await
                            .ok()
                            .flatten(),
                    },
                };
                let Some(job) = next else {
                    break;
                };
                let Some(job) = admit(&core, job) else {
                    continue;
                };
                let fits = shape_of(&job.inputs, config.max_batch_size)
                    .filter(|(k, r)| *k == key && rows + r <= config.max_batch_size)
                    .map(|(_, r)| r);
                match fits {
                    Some(r) => {
                        rows += r;
                        joined.push(job);
                    }
                    None => {
                        // Keeps its place at the head of the queue for the next batch.
                        held.push_front(job);
                        break;
                    }
                }
            }
        }
        let batch = std::iter::once(first).chain(joined).collect();
        run(&core, batch).await;
    }
}

/// The job, unless its client stopped waiting or its deadline passed in the queue.
fn admit(core: &Core, job: Job) -> Option<Job> {
    if job.reply.is_closed() {
        return None;
    }
    if let Some(deadline) = job.deadline
        && Instant::now() > deadline
    {
        if let Some(meters) = &core.scheduling {
            meters.timed_out.inc();
        }
        let waited = job.enqueued.elapsed();
        let _ = job.reply.send(Err(RunFailure::TimedOut(waited)));
        return None;
    }
    Some(job)
}

async fn run(core: &Arc<Core>, batch: Vec<Job>) {
    for job in &batch {
        if let Some(meters) = &core.meters {
            meters.queue.observe(job.enqueued.elapsed());
        }
    }
    let rows: Vec<usize> = batch.iter().map(|j| rows(&j.inputs)).collect();
    let (mut inputs, mut replies, mut bills) = (Vec::new(), Vec::new(), Vec::new());
    for job in batch {
        inputs.push(job.inputs);
        replies.push(job.reply);
        bills.push(job.bill);
    }
    let alone = inputs.len() == 1;
    let merged = match alone {
        true => inputs.into_iter().next().unwrap_or_default(),
        false => concat(inputs),
    };
    if let Some(meters) = &core.scheduling {
        meters.batch_size.observe(rows.iter().sum::<usize>() as f64);
    }
    // A batch of a microsecond model runs right here, like a lone call to it would.
    let (outcome, cpu) = if core.runs_inline(rows.iter().sum()) {
        core.run_now(merged)
    } else {
        let running = core.clone();
        tokio::task::spawn_blocking(move || running.run_now(merged))
            .await
            .unwrap_or_else(|join| (Err(RunFailure::Crashed(join.to_string())), Duration::ZERO))
    };
    let answers: Vec<Result<Vec<Tensor>, RunFailure>> = match (outcome, alone) {
        (Ok(outputs), true) => vec![Ok(outputs)],
        (Ok(outputs), false) => match split(outputs, &rows) {
            Ok(parts) => parts.into_iter().map(Ok).collect(),
            Err(reason) => rows
                .iter()
                .map(|_| Err(RunFailure::Failed(reason.clone())))
                .collect(),
        },
        (Err(failure), _) => rows.iter().map(|_| Err(failure.clone())).collect(),
    };
    // Each request's variant pays the batch's CPU time in proportion to its rows.
    let calls: Vec<(usize, Option<&Spending>)> = rows
        .iter()
        .copied()
        .zip(bills.iter().map(Option::as_ref))
        .collect();
    core.charge(cpu, &calls, answers.iter().all(Result::is_ok));
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}

/// The requests' inputs as one: each input's data one after the other, rows adding up.
/// BYTES data is a run of length-prefixed elements, so it concatenates the same way.
fn concat(requests: Vec<Vec<Tensor>>) -> Vec<Tensor> {
    let mut requests = requests.into_iter();
    let Some(mut merged) = requests.next() else {
        return Vec::new();
    };
    for request in requests {
        for input in request {
            if let Some(into) = merged.iter_mut().find(|t| t.name == input.name) {
                into.data.extend_from_slice(&input.data);
                if let (Some(total), Some(rows)) = (into.shape.first_mut(), input.shape.first()) {
                    *total += rows;
                }
            }
        }
    }
    merged
}

/// The batch's outputs cut back into each request's rows, in order.
fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, String> {
    let total: usize = rows.iter().sum();
    let mut parts: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in outputs {
        if output.shape.first() != Some(&total) {
            return Err(format!(
                "output '{}' has shape {:?}, not {total} rows for the {total} rows batched: the model \
                 does not keep the batch in dimension 0; turn batching off for it",
                output.name, output.shape
            ));
        }
        let per_row = Tensor::element_count(&output.shape[1..]).unwrap_or(0);
        let mut data = output.data.as_slice();
        for (part, &n) in parts.iter_mut().zip(rows) {
            let len = match output.datatype.element_size() {
                Some(size) => n * per_row * size,
                None => bytes_len(data, n * per_row)
                    .ok_or_else(|| format!("output '{}': malformed BYTES data", output.name))?,
            };
            let (mine, rest) = data.split_at_checked(len).ok_or_else(|| {
                format!(
                    "output '{}' holds fewer bytes than its shape needs",
                    output.name
                )
            })?;
            data = rest;
            let mut shape = output.shape.clone();
            shape[0] = n;
            part.push(Tensor {
                name: output.name.clone(),
                datatype: output.datatype,
                shape,
                data: mine.to_vec(),
            });
        }
    }
    Ok(parts)
}

/// The length in bytes of the first `elements` length-prefixed elements of `data`.
fn bytes_len(data: &[u8], elements: usize) -> Option<usize> {
    let mut at = 0;
    for _ in 0..elements {
        let prefix: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        at += 4 + usize::try_from(u32::from_le_bytes(prefix)).ok()?;
    }
    (at <= data.len()).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(name: &str, values: &[f32], width: usize) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![values.len() / width, width],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn strings(name: &str, values: &[&str]) -> Tensor {
        let mut data = Vec::new();
        for v in values {
            data.extend((v.len() as u32).to_le_bytes());
            data.extend(v.as_bytes());
        }
        Tensor {
            name: name.into(),
            datatype: DataType::Bytes,
            shape: vec![values.len()],
            data,
        }
    }

    #[test]
    fn each_request_gets_exactly_its_rows_back() {
        let a = vec![rows("x", &[1.0, 2.0], 2), strings("s", &["a"])];
        let b = vec![
            strings("s", &["bb", "", "ccc"]),
            rows("x", &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 2),
        ];
        let merged = concat(vec![a.clone(), b.clone()]);
        assert_eq!(merged[0].shape, vec![4, 2]);
        assert_eq!(merged[1].shape, vec![4]);
        let parts = split(merged, &[1, 3]).unwrap();
        assert_eq!(parts[0], a);
        let mut b_sorted = b.clone();
        b_sorted.reverse();
        assert_eq!(parts[1], b_sorted);
    }

    #[test]
    fn an_output_without_the_batch_in_front_cannot_be_split() {
        let err = split(vec![rows("y", &[1.0, 2.0], 2)], &[1, 1]).unwrap_err();
        assert!(err.contains("turn batching off"), "{err}");
    }

    #[test]
    fn only_like_shapes_batch() {
        let a = [rows("x", &[1.0, 2.0], 2)];
        let (key, n) = shape_of(&a, 8).unwrap();
        assert_eq!((key.len(), n), (1, 1));
        assert!(
            shape_of(&[rows("x", &[1.0; 18], 2)], 8).is_none(),
            "9 rows > 8"
        );
        let uneven = [rows("x", &[1.0, 2.0], 2), rows("z", &[1.0; 4], 2)];
        assert!(shape_of(&uneven, 8).is_none());
    }
}
