//! Which variant answered which request, for the rewards clients send back later through
//! `POST /v2/models/{endpoint}/feedback`. Memory is bounded: the oldest ids are forgotten
//! first. Ids the host made up carry a sequence number, so a forgotten one is told apart
//! from one that never existed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::stats::VariantCounters;

const HOST_ID_PREFIX: &str = "my-";

/// A request id the feedback can be matched to.
struct Answered {
    endpoint: String,
    variant: String,
    counters: Arc<VariantCounters>,
}

#[derive(Default)]
struct Memory {
    by_id: HashMap<String, Answered>,
    order: VecDeque<String>,
}

pub struct FeedbackBook {
    capacity: usize,
    next_host_id: AtomicU64,
    /// Host ids below this were forgotten (or never handed out).
    oldest_host_id: AtomicU64,
    memory: Mutex<Memory>,
}

/// What became of a reward.
#[derive(Debug, PartialEq)]
pub enum Feedback {
    /// Counted for this variant.
    Recorded { variant: String },
    /// The id was never seen, already rewarded, or from another endpoint.
    Unknown,
    /// The id was the host's and has been forgotten to bound memory.
    Expired,
}

impl FeedbackBook {
    pub fn new(capacity: usize) -> FeedbackBook {
        FeedbackBook {
            capacity: capacity.max(1),
            next_host_id: AtomicU64::new(0),
            oldest_host_id: AtomicU64::new(0),
            memory: Mutex::new(Memory::default()),
        }
    }

    /// A fresh request id, for requests that came without one.
    pub fn host_id(&self) -> String {
        format!(
            "{HOST_ID_PREFIX}{}",
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
    ) {
        let mut memory = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        let answered = Answered {
            endpoint: endpoint.to_string(),
            variant: variant.to_string(),
            counters,
        };
        if memory.by_id.insert(id.to_string(), answered).is_none() {
            memory.order.push_back(id.to_string());
        }
        while memory.order.len() > self.capacity {
            let Some(oldest) = memory.order.pop_front() else {
                break;
            };
            memory.by_id.remove(&oldest);
            if let Some(seq) = host_seq(&oldest) {
                self.oldest_host_id.fetch_max(seq + 1, Ordering::Relaxed);
            }
        }
    }

    /// Credits `reward` to the variant that answered `id` on `endpoint`, once.
    pub fn reward(&self, endpoint: &str, id: &str, reward: f64) -> Feedback {
        let mut memory = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        let known = memory.by_id.get(id).is_some_and(|a| a.endpoint == endpoint);
        if !known {
            let forgotten =
                host_seq(id).is_some_and(|seq| seq < self.oldest_host_id.load(Ordering::Relaxed));
            return if forgotten {
                Feedback::Expired
            } else {
                Feedback::Unknown
            };
        }
        let Some(answered) = memory.by_id.remove(id) else {
            return Feedback::Unknown;
        };
        memory.order.retain(|o| o != id);
        drop(memory);
        answered.counters.reward(reward);
        Feedback::Recorded {
            variant: answered.variant,
        }
    }
}

fn host_seq(id: &str) -> Option<u64> {
    id.strip_prefix(HOST_ID_PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::stats::StatsBook;

    #[test]
    fn rewards_reach_the_variant_once_and_old_ids_expire() {
        let stats = StatsBook::default();
        let book = FeedbackBook::new(2);
        let ids: Vec<String> = (0..3).map(|_| book.host_id()).collect();
        for id in &ids {
            book.remember(id, "e", "a", stats.variant("e", "a"));
        }
        assert_eq!(book.reward("e", &ids[0], 1.0), Feedback::Expired);
        assert_eq!(book.reward("other", &ids[1], 1.0), Feedback::Unknown);
        assert_eq!(
            book.reward("e", &ids[1], 1.0),
            Feedback::Recorded {
                variant: "a".into()
            }
        );
        assert_eq!(book.reward("e", &ids[1], 1.0), Feedback::Unknown);
        assert_eq!(book.reward("e", "client-id", 1.0), Feedback::Unknown);
        book.remember("client-id", "e", "a", stats.variant("e", "a"));
        assert_eq!(
            book.reward("e", "client-id", 0.5),
            Feedback::Recorded {
                variant: "a".into()
            }
        );
        let snapshot = stats.variant("e", "a").snapshot();
        assert_eq!((snapshot.reward_count, snapshot.reward_sum), (2, 1.5));
    }
}
