//! Per-variant counters the host keeps for routers: requests, errors and latency (a
//! whole-life histogram, and the latencies of the most recent successful answers for
//! judges of distributions over a window); and what each variant did as a shadow (its own
//! runs, copies dropped, agreement with the primary). They live outside the endpoint set, keyed by
//! endpoint and variant, so a plugin swap or a configuration edit loses none of them; an
//! endpoint or variant that leaves the configuration takes its counters with it.
//!
//! In a cluster a variant's counters also hold what the other replicas counted, as last
//! read: routers and operators see the sums, while each replica sends only its own.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hdrhistogram::Histogram;

use super::performance::Performance;

// How many of the latest successful answers' latencies routers see: the SDK's promise.
use modelyard_sdk::RECENT_LATENCIES;

/// Latency over the variant's life, and of its latest successful answers.
struct Latency {
    histogram: Option<Histogram<u64>>,
    /// Microseconds, oldest first, at most [`RECENT_LATENCIES`].
    recent: VecDeque<u32>,
}

/// Counters of one variant.
pub struct VariantCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency_us: Mutex<Latency>,
    /// Runs a latency budget gave up on that are still running.
    past_budget: AtomicUsize,
    /// Count, sum and sum of squares of the rewards clients sent for this variant's answers.
    rewards: Mutex<(u64, f64, f64)>,
    /// Accuracy and reward by segment and over time.
    pub performance: Performance,
    /// What the other replicas counted, in a cluster.
    elsewhere: ArcSwapOption<Elsewhere>,
}

/// One replica's own counts of a variant, as it sends them to the others.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub requests: u64,
    pub errors: u64,
    pub reward_count: u64,
    pub reward_sum: f64,
    pub reward_sum_squares: f64,
    /// The latency histogram's recorded buckets: (µs, count).
    pub latency: Vec<(u64, u64)>,
    /// The latest successful answers' latencies (µs), oldest first.
    pub recent: Vec<u32>,
}

/// What the other replicas counted for a variant, as last read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Elsewhere {
    pub requests: u64,
    pub errors: u64,
    pub reward_count: u64,
    pub reward_sum: f64,
    pub reward_sum_squares: f64,
    /// Over every replica's latencies, this one's included as they were when merged: a
    /// percentile cannot be summed, and merging histograms on every request costs too much.
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    /// Their latest successful latencies, newest first, one replica's after another's in
    /// turn.
    pub recent_newest_first: Vec<u32>,
}

impl Elsewhere {
    /// The sums of `others`' tallies, with percentiles over theirs and `own` together.
    pub fn merge(own: &Tally, others: &[&Tally]) -> Elsewhere {
        let mut merged = Elsewhere::default();
        let mut histogram = new_histogram();
        for tally in others {
            merged.requests += tally.requests;
            merged.errors += tally.errors;
            merged.reward_count += tally.reward_count;
            merged.reward_sum += tally.reward_sum;
            merged.reward_sum_squares += tally.reward_sum_squares;
        }
        if let Some(h) = histogram.as_mut() {
            for (value, count) in std::iter::once(own)
                .chain(others.iter().copied())
                .flat_map(|t| &t.latency)
            {
                h.saturating_record_n((*value).max(1), *count);
            }
            merged.latency_p50_us = h.value_at_quantile(0.5);
            merged.latency_p99_us = h.value_at_quantile(0.99);
        }
        merged.recent_newest_first = in_turn(others.iter().map(|t| t.recent.iter().rev().copied()));
        merged
    }
}

/// The first of each of `windows` in turn, then the second of each…, up to
/// [`RECENT_LATENCIES`]: the newest latencies of several windows, none crowding the rest out.
fn in_turn<I: Iterator<Item = u32>>(windows: impl IntoIterator<Item = I>) -> Vec<u32> {
    let mut windows: Vec<I> = windows.into_iter().collect();
    let mut merged = Vec::with_capacity(RECENT_LATENCIES);
    while merged.len() < RECENT_LATENCIES {
        let before = merged.len();
        merged.extend(windows.iter_mut().filter_map(Iterator::next));
        if merged.len() == before {
            break;
        }
    }
    merged.truncate(RECENT_LATENCIES);
    merged
}

/// `value` with all but its two leading digits zeroed.
fn two_digits(value: u64) -> u64 {
    let mut scale = 1;
    while value / scale >= 100 {
        scale *= 10;
    }
    value / scale * scale
}

/// Microseconds up to an hour, to three significant digits.
fn new_histogram() -> Option<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).ok()
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
            past_budget: AtomicUsize::new(0),
            latency_us: Mutex::new(Latency {
                histogram: new_histogram(),
                recent: VecDeque::with_capacity(RECENT_LATENCIES),
            }),
            rewards: Mutex::new((0, 0.0, 0.0)),
            performance: Performance::default(),
            elsewhere: ArcSwapOption::empty(),
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
        let mut kept = self
            .latency_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = kept.histogram.as_mut() {
            h.saturating_record(micros.max(1));
        }
        // A failure's latency says how fast it failed, not how fast the variant answers:
        // the window holds answers only (errors are judged on their own).
        if !failed {
            if kept.recent.len() == RECENT_LATENCIES {
                kept.recent.pop_front();
            }
            kept.recent
                .push_back(u32::try_from(micros).unwrap_or(u32::MAX));
        }
    }

    /// Runs a latency budget gave up on that are still running.
    pub fn past_budget(&self) -> usize {
        self.past_budget.load(Ordering::Relaxed)
    }

    pub fn enter_past_budget(&self) {
        self.past_budget.fetch_add(1, Ordering::Relaxed);
    }

    pub fn leave_past_budget(&self) {
        self.past_budget.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn reward(&self, reward: f64) {
        let mut rewards = self.rewards.lock().unwrap_or_else(PoisonError::into_inner);
        rewards.0 += 1;
        rewards.1 += reward;
        rewards.2 += reward * reward;
    }

    /// The counts routers and operators see: this replica's, and in a cluster the other
    /// replicas' added.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.read(|_| ()).0
    }

    /// A snapshot, and the latencies of the latest successful answers (µs, oldest first),
    /// as routers see them: taken under one lock. In a cluster the window holds this
    /// replica's latest and the others' in turn, newest first.
    pub fn snapshot_with_recent(&self) -> (StatsSnapshot, Vec<u32>) {
        let elsewhere = self.elsewhere.load();
        let (snapshot, recent) =
            self.read(|latency| latency.recent.iter().copied().collect::<Vec<_>>());
        let Some(others) = elsewhere
            .as_ref()
            .filter(|e| !e.recent_newest_first.is_empty())
        else {
            return (snapshot, recent);
        };
        let mut own = recent;
        own.reverse();
        let mut merged = in_turn([
            own.iter().copied(),
            others.recent_newest_first.iter().copied(),
        ]);
        merged.reverse();
        (snapshot, merged)
    }

    /// This replica's own counts, to send to the others.
    pub fn tally(&self) -> Tally {
        let (reward_count, reward_sum, reward_sum_squares) =
            *self.rewards.lock().unwrap_or_else(PoisonError::into_inner);
        let latency = self
            .latency_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Tally {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            reward_count,
            reward_sum,
            reward_sum_squares,
            latency: latency.histogram.as_ref().map_or_else(Vec::new, |h| {
                // To two significant digits: a percentile 1 % off judges a canary as well,
                // and the report sent every exchange is a tenth of the size.
                let mut buckets: Vec<(u64, u64)> = Vec::new();
                for v in h.iter_recorded() {
                    let value = two_digits(v.value_iterated_to());
                    match buckets.last_mut() {
                        Some((last, count)) if *last == value => *count += v.count_at_value(),
                        _ => buckets.push((value, v.count_at_value())),
                    }
                }
                buckets
            }),
            recent: latency.recent.iter().copied().collect(),
        }
    }

    /// Replaces what the other replicas counted with what was read last.
    pub fn set_elsewhere(&self, elsewhere: Elsewhere) {
        self.elsewhere.store(Some(Arc::new(elsewhere)));
    }

    fn read<T>(&self, also: impl FnOnce(&Latency) -> T) -> (StatsSnapshot, T) {
        let (mut reward_count, mut reward_sum, mut reward_sum_squares) =
            *self.rewards.lock().unwrap_or_else(PoisonError::into_inner);
        let latency = self
            .latency_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (mut p50, mut p99) = latency.histogram.as_ref().map_or((0, 0), |h| {
            (h.value_at_quantile(0.5), h.value_at_quantile(0.99))
        });
        let mut requests = self.requests.load(Ordering::Relaxed);
        let mut errors = self.errors.load(Ordering::Relaxed);
        if let Some(others) = self.elsewhere.load().as_ref() {
            requests += others.requests;
            errors += others.errors;
            reward_count += others.reward_count;
            reward_sum += others.reward_sum;
            reward_sum_squares += others.reward_sum_squares;
            if others.requests > 0 {
                (p50, p99) = (others.latency_p50_us, others.latency_p99_us);
            }
        }
        let snapshot = StatsSnapshot {
            requests,
            errors,
            latency_p50_us: p50,
            latency_p99_us: p99,
            reward_count,
            reward_sum,
            reward_sum_squares,
        };
        (snapshot, also(&latency))
    }
}

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
    /// A copy that found the shadow queue full.
    pub fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A shadow run that took `took`: how its answer compared, or `None` if it failed.
    pub fn record(&self, took: Duration, compared: Option<Agreement>) {
        self.runs.record(took, compared.is_none());
        if let Some(agreement) = compared {
            self.agreement
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .add(agreement);
        }
    }

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

fn keep_only<T>(map: &ByVariant<T>, serves: impl Fn(&str, &str) -> bool) {
    map.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|(endpoint, variant), _| serves(endpoint, variant));
}

impl StatsBook {
    pub fn variant(&self, endpoint: &str, variant: &str) -> Arc<VariantCounters> {
        entry(&self.variants, endpoint, variant)
    }

    /// What the variant did as a shadow of `endpoint`'s answers.
    pub fn shadow(&self, endpoint: &str, variant: &str) -> Arc<ShadowCounters> {
        entry(&self.shadows, endpoint, variant)
    }

    /// Every variant's counters, by endpoint and variant.
    pub fn all(&self) -> Vec<((String, String), Arc<VariantCounters>)> {
        let variants = self.variants.lock().unwrap_or_else(PoisonError::into_inner);
        variants
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Forgets every variant `serves` says no longer serves (a request still running on
    /// one keeps its counters until it ends; they are no one's any more).
    pub fn keep_only(&self, serves: impl Fn(&str, &str) -> bool) {
        keep_only(&self.variants, &serves);
        keep_only(&self.shadows, &serves);
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

    #[test]
    fn variants_no_longer_served_are_forgotten() {
        let book = StatsBook::default();
        for (endpoint, variant) in [("ab", "a"), ("ab", "b"), ("gone", "a")] {
            book.variant(endpoint, variant)
                .record(Duration::from_millis(1), false);
            book.shadow(endpoint, variant).dropped();
        }
        book.keep_only(|endpoint, variant| (endpoint, variant) == ("ab", "a"));
        assert_eq!(book.variants.lock().unwrap().len(), 1);
        assert_eq!(book.shadows.lock().unwrap().len(), 1);
        assert_eq!(book.variant("ab", "a").snapshot().requests, 1);
        // One that comes back starts afresh.
        assert_eq!(book.variant("gone", "a").snapshot().requests, 0);
    }

    #[test]
    fn other_replicas_counts_add_to_this_ones() {
        let here = VariantCounters::default();
        for us in [100, 100, 100] {
            here.record(Duration::from_micros(us), false);
        }
        here.reward(1.0);
        let other = |us: u64, n: u64, recent: Vec<u32>| {
            let counters = VariantCounters::default();
            for _ in 0..n {
                counters.record(Duration::from_micros(us), false);
            }
            counters.reward(0.5);
            Tally {
                recent,
                ..counters.tally()
            }
        };
        let (slow, fast) = (other(10_000, 5, vec![1, 2, 3]), other(200, 2, vec![7]));
        let own = here.tally();
        assert_eq!(
            (own.requests, own.reward_count, own.recent.len()),
            (3, 1, 3)
        );
        here.set_elsewhere(Elsewhere::merge(&own, &[&slow, &fast]));
        let (sums, recent) = here.snapshot_with_recent();
        assert_eq!((sums.requests, sums.errors, sums.reward_count), (10, 0, 3));
        assert_eq!(sums.reward_sum, 2.0);
        // Percentiles over all ten: five of them slow.
        assert!((9_990..=10_010).contains(&sums.latency_p99_us), "{sums:?}");
        assert!((190..=210).contains(&sums.latency_p50_us), "{sums:?}");
        // Newest first in turn (here, then the others in turn), returned oldest first.
        assert_eq!(recent, vec![1, 2, 100, 7, 100, 3, 100]);
        // What this replica sends stays its own.
        assert_eq!(here.tally(), own);
    }

    #[test]
    fn a_tally_keeps_two_significant_digits() {
        assert_eq!(
            [7, 99, 100, 123, 1_999, 987_654].map(two_digits),
            [7, 99, 100, 120, 1_900, 980_000]
        );
        let counters = VariantCounters::default();
        for us in [120, 121, 129, 130, 5_000] {
            counters.record(Duration::from_micros(us), false);
        }
        assert_eq!(
            counters.tally().latency,
            vec![(120, 3), (130, 1), (5_000, 1)]
        );
    }

    #[test]
    fn the_window_keeps_the_latest_successes_only() {
        let counters = VariantCounters::default();
        for us in 1..=(RECENT_LATENCIES as u64 + 10) {
            counters.record(Duration::from_micros(us), false);
            counters.record(Duration::from_secs(9), true);
        }
        let (_, recent) = counters.snapshot_with_recent();
        assert_eq!(recent.len(), RECENT_LATENCIES);
        assert_eq!(recent[0], 11);
        assert_eq!(*recent.last().unwrap(), RECENT_LATENCIES as u32 + 10);
    }
}
