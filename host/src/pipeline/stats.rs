//! Per-variant counters the host keeps for routers: requests, errors and latency. They
//! live outside the endpoint set, keyed by endpoint and variant, so a plugin swap or a
//! configuration edit loses none of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::performance::Performance;
use super::shadow::ShadowCounters;

/// Counters of one variant.
pub struct VariantCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency_us: Mutex<Option<Histogram<u64>>>,
    /// Count, sum and sum of squares of the rewards clients sent for this variant's answers.
    rewards: Mutex<(u64, f64, f64)>,
    /// Accuracy and reward by segment and over time.
    pub performance: Performance,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub errors: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub reward_count: u64,
    pub reward_sum: f64,
    pub reward_sum_squares: f64,
}

impl Default for VariantCounters {
    fn default() -> VariantCounters {
        VariantCounters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            // Microseconds up to an hour, to three significant digits.
            latency_us: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).ok()),
            rewards: Mutex::new((0, 0.0, 0.0)),
            performance: Performance::default(),
        }
    }
}

impl VariantCounters {
    pub fn record(&self, latency: Duration, failed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Some(h) = self
            .latency_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            h.saturating_record(micros.max(1));
        }
    }

    pub fn reward(&self, reward: f64) {
        let mut rewards = self.rewards.lock().unwrap_or_else(PoisonError::into_inner);
        rewards.0 += 1;
        rewards.1 += reward;
        rewards.2 += reward * reward;
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let (reward_count, reward_sum, reward_sum_squares) =
            *self.rewards.lock().unwrap_or_else(PoisonError::into_inner);
        let latency = self
            .latency_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (p50, p99) = latency.as_ref().map_or((0, 0), |h| {
            (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
        });
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_p50_us: p50,
            latency_p99_us: p99,
            reward_count,
            reward_sum,
            reward_sum_squares,
        }
    }
}

type ByVariant<T> = Mutex<HashMap<(String, String), Arc<T>>>;

/// Every variant's counters, created on first use.
#[derive(Default)]
pub struct StatsBook {
    variants: ByVariant<VariantCounters>,
    shadows: ByVariant<ShadowCounters>,
}

fn entry<T: Default>(map: &ByVariant<T>, endpoint: &str, variant: &str) -> Arc<T> {
    map.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry((endpoint.to_string(), variant.to_string()))
        .or_default()
        .clone()
}

impl StatsBook {
    pub fn variant(&self, endpoint: &str, variant: &str) -> Arc<VariantCounters> {
        entry(&self.variants, endpoint, variant)
    }

    /// What the variant did as a shadow of `endpoint`'s answers.
    pub fn shadow(&self, endpoint: &str, variant: &str) -> Arc<ShadowCounters> {
        entry(&self.shadows, endpoint, variant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_survive_lookups_and_measure_latency() {
        let book = StatsBook::default();
        let a = book.variant("iris", "a");
        for ms in 1..=100 {
            a.record(Duration::from_millis(ms), ms > 95);
        }
        let again = book.variant("iris", "a").snapshot();
        assert_eq!((again.requests, again.errors), (100, 5));
        assert!(
            (49_000..=51_000).contains(&again.latency_p50_us),
            "{again:?}"
        );
        assert!(again.latency_p99_us >= 98_000, "{again:?}");
        assert_eq!(book.variant("iris", "b").snapshot().requests, 0);
    }
}
