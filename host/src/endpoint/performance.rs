//! How well each variant does by the feedback clients send: accuracy (when feedback
//! carries the true label) and mean reward, overall, per segment of a configured request
//! attribute (region, device…) and per time bucket, with the gap between a variant's best
//! and worst segment — the fairness check a team reviews before promoting a model.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use crate::telemetry::rfc3339;
use crate::tensor::{DataType, Tensor};

/// Distinct segments kept per variant; values past these (clients choose them) are
/// counted together as [`OTHER`].
const SEGMENTS_KEPT: usize = 100;
pub const OTHER: &str = "(other)";

/// Time buckets kept per variant: the most recent.
const BUCKETS_KEPT: u64 = 60;

/// Rows of one answer whose predictions are kept for labels to come: up to `feedback_memory`
/// answers are remembered, and a client must not be able to make that memory huge by
/// sending big batches. Larger answers can still be rewarded, not labelled.
pub const LABELLED_ROWS: usize = 64;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Tally {
    count: u64,
    sum: f64,
}

impl Tally {
    fn summary(self) -> Summary {
        Summary {
            count: self.count,
            mean: (self.count > 0).then(|| self.sum / self.count as f64),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Scores {
    /// Rows whose label came back, and how many the variant got right.
    accuracy: Tally,
    reward: Tally,
}

impl Scores {
    fn add(&mut self, score: &Score) {
        if let Some(reward) = score.reward {
            self.reward.count += 1;
            self.reward.sum += reward;
        }
        if let Some((rows, correct)) = score.labels {
            self.accuracy.count += rows;
            self.accuracy.sum += correct as f64;
        }
    }

    fn report(self) -> ScoresReport {
        ScoresReport {
            accuracy: self.accuracy.summary(),
            reward: self.reward.summary(),
        }
    }
}

/// One piece of feedback on one answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub reward: Option<f64>,
    /// Rows labelled, rows the answer got right.
    pub labels: Option<(u64, u64)>,
}

#[derive(Default)]
struct Tallies {
    overall: Scores,
    segments: BTreeMap<String, Scores>,
    /// Bucket start in Unix ms → scores. Feedback comes late and in any order, so a score
    /// goes to the bucket of the answer's time, not the last bucket.
    buckets: BTreeMap<u64, Scores>,
}

/// One variant's scores.
#[derive(Default)]
pub struct Performance {
    tallies: Mutex<Tallies>,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    pub count: u64,
    pub mean: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ScoresReport {
    pub accuracy: Summary,
    pub reward: Summary,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Bucket {
    pub start: String,
    #[serde(flatten)]
    pub scores: ScoresReport,
}

/// The best and the worst segment by one measure, and how far apart they are.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Gap {
    pub best: String,
    pub best_mean: f64,
    pub worst: String,
    pub worst_mean: f64,
    pub gap: f64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PerformanceReport {
    #[serde(flatten)]
    pub overall: ScoresReport,
    pub segments: BTreeMap<String, ScoresReport>,
    pub accuracy_gap: Option<Gap>,
    pub reward_gap: Option<Gap>,
    pub over_time: Vec<Bucket>,
}

fn gap(
    segments: &BTreeMap<String, ScoresReport>,
    measure: fn(&ScoresReport) -> Summary,
) -> Option<Gap> {
    let means: Vec<(&String, f64)> = segments
        .iter()
        .filter_map(|(name, s)| Some((name, measure(s).mean?)))
        .collect();
    // Ties go to the first segment by name, as everywhere the host picks a top value.
    let best = means[modelyard_sdk::argmax(means.iter().map(|m| m.1))?];
    let worst = means[modelyard_sdk::argmax(means.iter().map(|m| -m.1))?];
    Some(Gap {
        best: best.0.clone(),
        best_mean: best.1,
        worst: worst.0.clone(),
        worst_mean: worst.1,
        gap: best.1 - worst.1,
    })
}

impl Performance {
    /// Counts `score` overall, for `segment` and in the bucket of `at_ms`.
    pub fn record(&self, score: &Score, segment: Option<&str>, at_ms: u64, bucket_ms: u64) {
        let mut t = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        t.overall.add(score);
        if let Some(segment) = segment {
            let key = if t.segments.len() < SEGMENTS_KEPT || t.segments.contains_key(segment) {
                segment
            } else {
                OTHER
            };
            t.segments.entry(key.to_string()).or_default().add(score);
        }
        let width = bucket_ms.max(1);
        let start = at_ms - at_ms % width;
        let newest = t
            .buckets
            .last_key_value()
            .map_or(start, |(s, _)| start.max(*s));
        let oldest_kept = newest.saturating_sub(width.saturating_mul(BUCKETS_KEPT - 1));
        if start >= oldest_kept {
            t.buckets.entry(start).or_default().add(score);
        }
        t.buckets.retain(|s, _| *s >= oldest_kept);
    }

    pub fn report(&self) -> PerformanceReport {
        let t = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        let segments: BTreeMap<String, ScoresReport> = t
            .segments
            .iter()
            .map(|(name, s)| (name.clone(), s.report()))
            .collect();
        PerformanceReport {
            overall: t.overall.report(),
            accuracy_gap: gap(&segments, |s| s.accuracy),
            reward_gap: gap(&segments, |s| s.reward),
            segments,
            over_time: t
                .buckets
                .iter()
                .map(|(start, s)| Bucket {
                    start: rfc3339(*start as i64),
                    scores: s.report(),
                })
                .collect(),
        }
    }
}

/// What an answer predicted, row by row, for comparing with labels sent back later: the
/// elements of an output named `label`, else the top class of each row of the first
/// `[rows, classes]` floating-point output; nothing past [`LABELLED_ROWS`] rows.
pub fn predictions(outputs: &[Tensor]) -> Vec<String> {
    let rows = outputs
        .first()
        .and_then(|t| t.shape.first())
        .copied()
        .unwrap_or(0);
    if rows > LABELLED_ROWS {
        return Vec::new();
    }
    if let Some(label) = outputs.iter().find(|t| t.name == "label") {
        return match label.datatype {
            DataType::Bytes => Tensor::byte_elements(&label.data)
                .unwrap_or_default()
                .into_iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
            _ => serde_json::to_value(crate::tensor::TensorData(label))
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect(),
        };
    }
    let Some((scores, classes)) = outputs.iter().find_map(|t| match t.shape.as_slice() {
        [_, classes] if *classes > 1 => Some((t.floats()?, *classes)),
        _ => None,
    }) else {
        return Vec::new();
    };
    scores
        .chunks(classes)
        .map(|row| {
            modelyard_sdk::argmax(row.iter().copied())
                .map_or_else(String::new, |top| top.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(rows: u64, correct: u64) -> Score {
        Score {
            reward: None,
            labels: Some((rows, correct)),
        }
    }

    #[test]
    fn segments_buckets_and_the_gap() {
        let p = Performance::default();
        p.record(&labelled(4, 4), Some("eu"), 1_000, 60_000);
        p.record(&labelled(4, 2), Some("us"), 61_000, 60_000);
        p.record(
            &Score {
                reward: Some(1.0),
                labels: None,
            },
            None,
            62_000,
            60_000,
        );
        let r = p.report();
        assert_eq!(
            r.overall.accuracy,
            Summary {
                count: 8,
                mean: Some(0.75)
            }
        );
        assert_eq!(
            r.overall.reward,
            Summary {
                count: 1,
                mean: Some(1.0)
            }
        );
        let gap = r.accuracy_gap.unwrap();
        assert_eq!(
            (gap.best.as_str(), gap.worst.as_str(), gap.gap),
            ("eu", "us", 0.5)
        );
        assert_eq!(r.reward_gap, None);
        assert_eq!(r.over_time.len(), 2);
        assert_eq!(r.over_time[1].start, "1970-01-01T00:01:00Z");
        assert_eq!(r.over_time[1].scores.reward.count, 1);
        // Late feedback on an early answer lands in its own bucket.
        p.record(&labelled(1, 1), None, 2_000, 60_000);
        let r = p.report();
        assert_eq!(r.over_time.len(), 2);
        assert_eq!(r.over_time[0].scores.accuracy.count, 5);
        // Buckets older than the last 60 are dropped.
        p.record(&labelled(1, 1), None, 60 * 60_000, 60_000);
        let r = p.report();
        let starts: Vec<&str> = r.over_time.iter().map(|b| b.start.as_str()).collect();
        assert_eq!(starts, ["1970-01-01T00:01:00Z", "1970-01-01T01:00:00Z"]);
    }

    #[test]
    fn segments_past_the_limit_share_one_entry() {
        let p = Performance::default();
        for i in 0..SEGMENTS_KEPT + 5 {
            p.record(&labelled(1, 1), Some(&format!("s{i}")), 0, 1);
        }
        let r = p.report();
        assert_eq!(r.segments.len(), SEGMENTS_KEPT + 1);
        assert_eq!(r.segments[OTHER].accuracy.count, 5);
    }

    #[test]
    fn predictions_come_from_labels_or_the_top_class() {
        let probs = Tensor {
            name: "probabilities".into(),
            datatype: DataType::Fp32,
            shape: vec![2, 3],
            data: [0.1f32, 0.7, 0.2, 0.6, 0.3, 0.1]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        assert_eq!(predictions(std::slice::from_ref(&probs)), ["1", "0"]);
        let mut data = Vec::new();
        for name in ["setosa", "virginica"] {
            data.extend((name.len() as u32).to_le_bytes());
            data.extend(name.as_bytes());
        }
        let label = Tensor {
            name: "label".into(),
            datatype: DataType::Bytes,
            shape: vec![2],
            data,
        };
        assert_eq!(predictions(&[probs, label]), ["setosa", "virginica"]);
    }
}
