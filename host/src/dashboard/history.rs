//! The last hour of every endpoint, in memory, for the dashboard's charts: every
//! `monitoring.history_step_seconds` a point per variant with the requests and errors of
//! that step and the p50 and p99 latency of its answers. The counters are cumulative (in a
//! cluster, every replica's), so a point is the difference from the previous sample.
//!
//! Bounded: an hour of points per endpoint, each 32 bytes and 24 a variant — at the default
//! step of 10 s, 360 points: 50 endpoints of 3 variants take 1.9 MB. An endpoint
//! whose variants change starts a new history; one that is gone is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::endpoint::EndpointSet;

/// How far back the history goes.
pub const SPAN: Duration = Duration::from_secs(3600);

pub struct History {
    step: Duration,
    capacity: usize,
    endpoints: Mutex<HashMap<String, Kept>>,
}

/// One endpoint's points, oldest first.
struct Kept {
    variants: Vec<String>,
    /// The cumulative requests and errors of each variant at the last sample.
    last: Vec<(u64, u64)>,
    points: VecDeque<Point>,
}

struct Point {
    /// Unix seconds.
    at: u64,
    variants: Vec<Step>,
}

#[derive(Clone, Copy)]
struct Step {
    requests: u32,
    errors: u32,
    p50_us: Option<u32>,
    p99_us: Option<u32>,
}

/// One endpoint's history as the dashboard draws it: a column per series, as uPlot takes
/// them.
#[derive(Debug, serde::Serialize)]
pub struct Columns {
    pub step_seconds: u64,
    pub span_seconds: u64,
    pub times: Vec<u64>,
    pub variants: Vec<VariantColumns>,
}

#[derive(Debug, serde::Serialize)]
pub struct VariantColumns {
    pub name: String,
    pub requests: Vec<u32>,
    pub errors: Vec<u32>,
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
}

impl History {
    pub fn new(step: Duration) -> History {
        let step = step.max(Duration::from_secs(1));
        History {
            step,
            capacity: (SPAN.as_secs() / step.as_secs()).max(1) as usize,
            endpoints: Mutex::default(),
        }
    }

    pub fn step(&self) -> Duration {
        self.step
    }

    /// Takes one point of every endpoint of `set`, at `now`.
    pub fn sample(&self, set: &EndpointSet, now: SystemTime) {
        let at = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        endpoints.retain(|name, _| set.endpoints.contains_key(name));
        for (name, endpoint) in &set.endpoints {
            let names: Vec<String> = endpoint.variants.iter().map(|v| v.name.clone()).collect();
            let read: Vec<_> = endpoint
                .variants
                .iter()
                .map(|v| v.stats.snapshot_with_recent())
                .collect();
            let kept = endpoints.entry(name.clone()).or_insert_with(|| Kept {
                variants: Vec::new(),
                last: Vec::new(),
                points: VecDeque::new(),
            });
            if kept.variants != names {
                // Another set of variants: the old columns would not line up.
                *kept = Kept {
                    variants: names,
                    last: read.iter().map(|(s, _)| (s.requests, s.errors)).collect(),
                    points: VecDeque::with_capacity(self.capacity),
                };
                continue;
            }
            let variants = read
                .iter()
                .zip(&mut kept.last)
                .map(|((snapshot, recent), last)| {
                    // A counter that went back (a replica's counts left the cluster's sums)
                    // counts as a fresh start, not as a negative step.
                    let requests = snapshot.requests.saturating_sub(last.0);
                    let errors = snapshot.errors.saturating_sub(last.1);
                    *last = (snapshot.requests, snapshot.errors);
                    let answered = requests.saturating_sub(errors) as usize;
                    let newest = &recent[recent.len().saturating_sub(answered)..];
                    Step {
                        requests: u32::try_from(requests).unwrap_or(u32::MAX),
                        errors: u32::try_from(errors).unwrap_or(u32::MAX),
                        p50_us: percentile(newest, 0.5),
                        p99_us: percentile(newest, 0.99),
                    }
                })
                .collect();
            if kept.points.len() == self.capacity {
                kept.points.pop_front();
            }
            kept.points.push_back(Point { at, variants });
        }
    }

    /// The columns of an endpoint not sampled yet.
    pub fn nothing_yet(&self) -> Columns {
        Columns {
            step_seconds: self.step.as_secs(),
            span_seconds: SPAN.as_secs(),
            times: Vec::new(),
            variants: Vec::new(),
        }
    }

    /// One endpoint's points, or `None` for an endpoint not sampled yet.
    pub fn columns(&self, endpoint: &str) -> Option<Columns> {
        let endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let kept = endpoints.get(endpoint)?;
        // Every point has a step per variant (a new set of variants starts a new history);
        // a missing one would read as nothing, not as a panic.
        let count = |i: usize, pick: fn(&Step) -> u32| -> Vec<u32> {
            kept.points
                .iter()
                .map(|p| p.variants.get(i).map_or(0, pick))
                .collect()
        };
        let column = |i: usize, pick: fn(&Step) -> Option<f64>| -> Vec<Option<f64>> {
            kept.points
                .iter()
                .map(|p| p.variants.get(i).and_then(pick))
                .collect()
        };
        Some(Columns {
            times: kept.points.iter().map(|p| p.at).collect(),
            variants: kept
                .variants
                .iter()
                .enumerate()
                .map(|(i, name)| VariantColumns {
                    name: name.clone(),
                    requests: count(i, |s| s.requests),
                    errors: count(i, |s| s.errors),
                    p50_ms: column(i, |s| s.p50_us.map(ms)),
                    p99_ms: column(i, |s| s.p99_us.map(ms)),
                })
                .collect(),
            ..self.nothing_yet()
        })
    }
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

/// The nearest-rank `q` quantile of `values`; `None` for none.
fn percentile(values: &[u32], q: f64) -> Option<u32> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Samples `endpoints` every step until the task is aborted.
pub async fn keep(
    history: std::sync::Arc<History>,
    endpoints: impl Fn() -> std::sync::Arc<EndpointSet> + Send + 'static,
) {
    let mut ticks = tokio::time::interval(history.step());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        history.sample(&endpoints(), SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Telemetry;
    use crate::testing::{bind, loaded_repository, pipeline};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_point_is_what_happened_since_the_last() {
        let telemetry = Telemetry::off();
        let repository = loaded_repository(telemetry.clone()).await;
        let pipeline = pipeline(repository, telemetry.clone());
        let set = bind(
            &pipeline,
            &telemetry,
            "[endpoints.ab]\nvariants = { a = \"iris@1\", b = \"iris@2\" }",
        );
        // Half an hour a step: two points are kept.
        let history = History::new(Duration::from_secs(1800));
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let a = &set.endpoints["ab"].variants[0];
        a.stats.record(Duration::from_millis(900), false);
        // The first sample is where counting starts: what came before is no step of its.
        history.sample(&set, start);
        assert!(history.columns("ab").unwrap().times.is_empty());
        for ms in [1, 2, 3, 40] {
            a.stats.record(Duration::from_millis(ms), false);
        }
        a.stats.record(Duration::from_millis(5), true);
        history.sample(&set, start + Duration::from_secs(1800));
        let columns = history.columns("ab").unwrap();
        assert_eq!(columns.times, [1_001_800]);
        assert_eq!((columns.step_seconds, columns.span_seconds), (1800, 3600));
        let (a, b) = (&columns.variants[0], &columns.variants[1]);
        assert_eq!((a.name.as_str(), b.name.as_str()), ("a", "b"));
        assert_eq!((a.requests[0], a.errors[0]), (5, 1));
        // The four answers of the step, not the 900 ms one before it.
        assert_eq!((a.p50_ms[0], a.p99_ms[0]), (Some(2.0), Some(40.0)));
        assert_eq!((b.requests[0], b.p50_ms[0]), (0, None));
        for step in 2..=3 {
            history.sample(&set, start + Duration::from_secs(1800 * step));
        }
        assert_eq!(history.columns("ab").unwrap().times, [1_003_600, 1_005_400]);
        assert!(history.columns("nope").is_none());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7], 0.99), Some(7));
        let hundred: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(percentile(&hundred, 0.5), Some(50));
        assert_eq!(percentile(&hundred, 0.99), Some(99));
    }
}
