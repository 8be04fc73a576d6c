//! Which variant answered which request, for the rewards clients send back later through
//! `POST /v2/models/{endpoint}/feedback`. Memory is bounded: the oldest ids are forgotten
//! first. Ids the host made up carry a sequence number, so a forgotten one is told apart
//! from one that never existed (and, in a cluster, the replica's name, so that they are
//! unique among replicas).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::performance::Score;
use super::stats::VariantCounters;

const HOST_ID_PREFIX: &str = "my-";

/// A request id the feedback can be matched to.
struct Remembered {
    endpoint: String,
    variant: String,
    counters: Arc<VariantCounters>,
    memo: Memo,
}

/// What is kept of an answer to judge it by later feedback.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memo {
    /// The value of the endpoint's `segment_by` attribute.
    pub segment: Option<String>,
    /// What it predicted, row by row.
    pub predictions: Vec<String>,
    pub at_ms: u64,
}

#[derive(Default)]
struct Memory {
    by_id: HashMap<String, Remembered>,
    order: VecDeque<String>,
}

pub struct FeedbackBook {
    /// What the ids the host makes up start with.
    prefix: String,
    capacity: usize,
    /// The width of a performance time bucket.
    bucket_ms: u64,
    next_host_id: AtomicU64,
    /// Host ids below this were forgotten (or never handed out).
    oldest_host_id: AtomicU64,
    memory: Mutex<Memory>,
}

/// What became of a reward.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Feedback {
    /// Counted for this variant; with the rows labelled and those predicted right.
    Recorded {
        variant: String,
        labels: Option<(u64, u64)>,
    },
    /// Labels came, but the answer predicted no label or class to compare them with.
    NoPrediction,
    /// Labels came for another number of rows than the answer had.
    Rows { expected: usize, got: usize },
    /// The id was never seen, already rewarded, or from another endpoint.
    Unknown,
    /// The id was the host's and has been forgotten to bound memory.
    Expired,
}

impl FeedbackBook {
    /// A book of `capacity` answers; `replica` names this replica in a cluster.
    pub fn new(capacity: usize, bucket_ms: u64, replica: Option<&str>) -> FeedbackBook {
        FeedbackBook {
            prefix: match replica {
                Some(replica) => format!("{HOST_ID_PREFIX}{replica}-"),
                None => HOST_ID_PREFIX.to_string(),
            },
            capacity: capacity.max(1),
            bucket_ms: bucket_ms.max(1),
            next_host_id: AtomicU64::new(0),
            oldest_host_id: AtomicU64::new(0),
            memory: Mutex::new(Memory::default()),
        }
    }

    /// A fresh request id, for requests that came without one.
    pub fn host_id(&self) -> String {
        format!(
            "{}{}",
            self.prefix,
            self.next_host_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Remembers that `variant` of `endpoint` answered request `id`.
    pub fn remember(
        &self,
        id: &str,
        endpoint: &str,
        variant: &str,
        counters: Arc<VariantCounters>,
        memo: Memo,
    ) {
        let mut memory = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        let answered = Remembered {
            endpoint: endpoint.to_string(),
            variant: variant.to_string(),
            counters,
            memo,
        };
        if memory.by_id.insert(id.to_string(), answered).is_none() {
            memory.order.push_back(id.to_string());
        }
        while memory.order.len() > self.capacity {
            let Some(oldest) = memory.order.pop_front() else {
                break;
            };
            memory.by_id.remove(&oldest);
            if let Some(seq) = self.host_seq(&oldest) {
                self.oldest_host_id.fetch_max(seq + 1, Ordering::Relaxed);
            }
        }
    }

    /// Credits `reward` and judges `labels` (one per row) against the answer of the
    /// variant that answered `id` on `endpoint`, once.
    pub fn score(
        &self,
        endpoint: &str,
        id: &str,
        reward: Option<f64>,
        labels: Option<&[String]>,
    ) -> Feedback {
        let mut memory = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(answered) = memory.by_id.get(id).filter(|a| a.endpoint == endpoint) else {
            let forgotten = self
                .host_seq(id)
                .is_some_and(|seq| seq < self.oldest_host_id.load(Ordering::Relaxed));
            return if forgotten {
                Feedback::Expired
            } else {
                Feedback::Unknown
            };
        };
        let labels = match judge(&answered.memo, labels) {
            Ok(labels) => labels,
            Err(refused) => return refused,
        };
        let Some(answered) = memory.by_id.remove(id) else {
            return Feedback::Unknown;
        };
        memory.order.retain(|o| o != id);
        drop(memory);
        self.credit(&answered.counters, &answered.memo, reward, labels);
        Feedback::Recorded {
            variant: answered.variant,
            labels,
        }
    }

    /// Credits `reward` and the judged `labels` to the counters of the variant that gave
    /// the answer `memo` keeps.
    fn credit(
        &self,
        counters: &VariantCounters,
        memo: &Memo,
        reward: Option<f64>,
        labels: Option<(u64, u64)>,
    ) {
        if let Some(reward) = reward {
            counters.reward(reward);
        }
        counters.performance.record(
            &Score { reward, labels },
            memo.segment.as_deref(),
            memo.at_ms,
            self.bucket_ms,
        );
    }

    fn host_seq(&self, id: &str) -> Option<u64> {
        id.strip_prefix(&self.prefix)?.parse().ok()
    }
}

/// The rows labelled and those predicted right, when `labels` (one per row) can be judged
/// against the answer `memo` keeps; else what to answer.
fn judge(memo: &Memo, labels: Option<&[String]>) -> Result<Option<(u64, u64)>, Feedback> {
    match labels {
        None => Ok(None),
        Some(_) if memo.predictions.is_empty() => Err(Feedback::NoPrediction),
        Some(labels) if labels.len() != memo.predictions.len() => Err(Feedback::Rows {
            expected: memo.predictions.len(),
            got: labels.len(),
        }),
        Some(labels) => {
            let correct = labels
                .iter()
                .zip(&memo.predictions)
                .filter(|(l, p)| l == p)
                .count();
            Ok(Some((labels.len() as u64, correct as u64)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::StatsBook;

    fn recorded(variant: &str, labels: Option<(u64, u64)>) -> Feedback {
        Feedback::Recorded {
            variant: variant.into(),
            labels,
        }
    }

    #[test]
    fn rewards_reach_the_variant_once_and_old_ids_expire() {
        let stats = StatsBook::default();
        let book = FeedbackBook::new(2, 60_000, None);
        let ids: Vec<String> = (0..3).map(|_| book.host_id()).collect();
        for id in &ids {
            book.remember(id, "e", "a", stats.variant("e", "a"), Memo::default());
        }
        let reward = |endpoint: &str, id: &str, r: f64| book.score(endpoint, id, Some(r), None);
        assert_eq!(reward("e", &ids[0], 1.0), Feedback::Expired);
        assert_eq!(reward("other", &ids[1], 1.0), Feedback::Unknown);
        assert_eq!(reward("e", &ids[1], 1.0), recorded("a", None));
        assert_eq!(reward("e", &ids[1], 1.0), Feedback::Unknown);
        assert_eq!(reward("e", "client-id", 1.0), Feedback::Unknown);
        book.remember(
            "client-id",
            "e",
            "a",
            stats.variant("e", "a"),
            Memo::default(),
        );
        assert_eq!(reward("e", "client-id", 0.5), recorded("a", None));
        let snapshot = stats.variant("e", "a").snapshot();
        assert_eq!((snapshot.reward_count, snapshot.reward_sum), (2, 1.5));
    }

    #[test]
    fn labels_are_judged_against_the_prediction_by_segment() {
        let stats = StatsBook::default();
        let book = FeedbackBook::new(10, 60_000, None);
        let memo = Memo {
            segment: Some("eu".into()),
            predictions: vec!["0".into(), "2".into()],
            at_ms: 0,
        };
        book.remember("r", "e", "a", stats.variant("e", "a"), memo);
        let labels = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            book.score("e", "r", None, Some(&labels(&["0"]))),
            Feedback::Rows {
                expected: 2,
                got: 1
            }
        );
        assert_eq!(
            book.score("e", "r", None, Some(&labels(&["0", "1"]))),
            recorded("a", Some((2, 1)))
        );
        let report = stats.variant("e", "a").performance.report();
        assert_eq!(report.segments["eu"].accuracy.mean, Some(0.5));
        book.remember("s", "e", "a", stats.variant("e", "a"), Memo::default());
        assert_eq!(
            book.score("e", "s", None, Some(&labels(&["0"]))),
            Feedback::NoPrediction
        );
    }
}
