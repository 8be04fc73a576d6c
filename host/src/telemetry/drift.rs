//! Input drift: does what a model version is being sent still look like what it was
//! trained on? The training script stores a reference distribution per input feature
//! beside the model (`<version>/reference.json`: the feature's quantiles); the host keeps a
//! sliding window of the latest inputs per feature and compares the two with the
//! Kolmogorov–Smirnov statistic and the population stability index. A feature is drifted
//! while either is over the model's threshold; each flip is logged and audited.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use super::hub::Telemetry;
use super::store::Change;
use crate::tensor::{DataType, Tensor, TensorSpec};

/// What the training script wrote: the quantiles of each feature of one input tensor.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// The model input whose columns are the features (a `[batch, features]` tensor).
    pub input: String,
    pub features: Vec<ReferenceFeature>,
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceFeature {
    pub name: String,
    /// Evenly spaced quantiles from the minimum (0) to the maximum (1), ascending; 101
    /// (percentiles) is usual.
    pub quantiles: Vec<f64>,
}

/// `[drift]` in `model.toml`: how much recent input is judged, and how strictly.
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftConfig {
    /// Latest inputs per feature compared with the reference.
    pub window: usize,
    /// Inputs needed before a feature is judged at all: with fewer, chance alone puts PSI
    /// near its usual thresholds (its expected value without drift is about 9/n).
    pub min_samples: usize,
    pub ks_threshold: f64,
    pub psi_threshold: f64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            window: 500,
            min_samples: 200,
            ks_threshold: 0.2,
            psi_threshold: 0.25,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReferenceError {
    #[error("the reference has no features")]
    Empty,
    #[error("feature '{0}' needs at least two quantiles, ascending and finite as FP32")]
    Quantiles(String),
    #[error(
        "the reference is about input '{input}', but the model's inputs are: {inputs}; name one of them"
    )]
    NoSuchInput { input: String, inputs: String },
    #[error(
        "input '{input}' is {datatype} {shape:?}; drift is followed on a floating-point [batch, {features}] input"
    )]
    Shape {
        input: String,
        datatype: DataType,
        shape: Vec<i64>,
        features: usize,
    },
}

/// Clears a drifted feature only once both figures are below this share of their
/// thresholds, so that a window hovering at the threshold does not flip every second.
const CLEAR_BELOW: f64 = 0.8;

/// One feature's figures, as `/admin/drift/{model}` shows them.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FeatureDrift {
    pub feature: String,
    /// Inputs in the window.
    pub samples: usize,
    pub ks: Option<f64>,
    pub psi: Option<f64>,
    pub drifted: bool,
    /// The reference's and the window's distribution over the index's bins.
    pub bins: Vec<Bin>,
}

/// One flip of a feature over or under its threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Flip {
    pub feature: String,
    pub drifted: bool,
    pub ks: f64,
    pub psi: f64,
}

/// The window and the last figures (verdicts included) of one model version.
pub struct DriftMonitor {
    pub reference: Reference,
    pub config: DriftConfig,
    windows: Mutex<Vec<VecDeque<f64>>>,
    last: Mutex<Vec<FeatureDrift>>,
}

impl DriftMonitor {
    /// A monitor for `reference`, checked against the model's `inputs`.
    pub fn new(
        mut reference: Reference,
        config: DriftConfig,
        inputs: &[TensorSpec],
    ) -> Result<DriftMonitor, ReferenceError> {
        if reference.features.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let Some(input) = inputs.iter().find(|i| i.name == reference.input) else {
            return Err(ReferenceError::NoSuchInput {
                input: reference.input,
                inputs: inputs
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let features = reference.features.len();
        let float = matches!(
            input.datatype,
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64
        );
        let columns = match input.shape.as_slice() {
            [_, columns] => *columns == -1 || usize::try_from(*columns) == Ok(features),
            _ => false,
        };
        if !float || !columns {
            return Err(ReferenceError::Shape {
                input: input.name.clone(),
                datatype: input.datatype,
                shape: input.shape.clone(),
                features,
            });
        }
        // Inputs arrive as FP32 mostly, the reference as decimal text: a training value
        // of 2.8 arrives as 2.7999999523, below the quantile 2.8 it should equal. Both sides
        // are compared at f32 precision so that ties stay ties.
        for feature in &mut reference.features {
            for q in &mut feature.quantiles {
                *q = f64::from(*q as f32);
            }
            let q = &feature.quantiles;
            if q.len() < 2 || q.iter().any(|v| !v.is_finite()) || q.windows(2).any(|w| w[0] > w[1])
            {
                return Err(ReferenceError::Quantiles(feature.name.clone()));
            }
        }
        let unjudged = reference
            .features
            .iter()
            .map(|f| FeatureDrift {
                feature: f.name.clone(),
                samples: 0,
                ks: None,
                psi: None,
                drifted: false,
                bins: bins(&f.quantiles, None),
            })
            .collect();
        Ok(DriftMonitor {
            reference,
            config,
            windows: Mutex::new(vec![VecDeque::new(); features]),
            last: Mutex::new(unjudged),
        })
    }

    /// Adds the rows of the reference's input tensor among `inputs` to the window.
    pub fn observe(&self, inputs: &[Tensor]) {
        let Some(tensor) = inputs.iter().find(|t| t.name == self.reference.input) else {
            return;
        };
        let features = self.reference.features.len();
        if tensor.shape.len() != 2 || tensor.shape[1] != features {
            return;
        }
        let Some(values) = tensor.floats() else {
            return;
        };
        let window = self.config.window.max(1);
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        for row in values.chunks_exact(features) {
            // A NaN or an infinity is no evidence about the distribution (and would not
            // sort); it is left out.
            for (recent, &value) in windows.iter_mut().zip(row).filter(|(_, v)| v.is_finite()) {
                if recent.len() == window {
                    recent.pop_front();
                }
                recent.push_back(f64::from(value as f32));
            }
        }
    }

    /// Every feature's figures now, and the features whose verdict flipped since the last
    /// evaluation.
    pub fn evaluate(&self) -> (Vec<FeatureDrift>, Vec<Flip>) {
        let samples: Vec<Vec<f64>> = self
            .windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|w| w.iter().copied().collect())
            .collect();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let mut flips = Vec::new();
        for ((feature, mut sample), previous) in self
            .reference
            .features
            .iter()
            .zip(samples)
            .zip(last.iter_mut())
        {
            let verdict = previous.drifted;
            let judged = sample.len() >= self.config.min_samples.max(1);
            let (ks, psi, bins) = if judged {
                sample.sort_by(f64::total_cmp);
                let bins = bins(&feature.quantiles, Some(&sample));
                (
                    Some(ks(&feature.quantiles, &sample)),
                    Some(psi(&bins)),
                    bins,
                )
            } else {
                (None, None, bins(&feature.quantiles, None))
            };
            let (ks_limit, psi_limit) = (self.config.ks_threshold, self.config.psi_threshold);
            let drifted = match (ks, psi) {
                (Some(k), Some(p)) if verdict => {
                    k > ks_limit * CLEAR_BELOW || p > psi_limit * CLEAR_BELOW
                }
                (Some(k), Some(p)) => k > ks_limit || p > psi_limit,
                // Too few inputs: the previous verdict stands.
                _ => verdict,
            };
            if drifted != verdict
                && let (Some(ks), Some(psi)) = (ks, psi)
            {
                flips.push(Flip {
                    feature: feature.name.clone(),
                    drifted,
                    ks,
                    psi,
                });
            }
            *previous = FeatureDrift {
                feature: feature.name.clone(),
                samples: sample.len(),
                ks,
                psi,
                drifted,
                bins,
            };
        }
        (last.clone(), flips)
    }

    /// The figures of the last evaluation, without computing anything.
    pub fn last(&self) -> Vec<FeatureDrift> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The reference CDF at `x`, linear between the quantiles, 0 below the first and 1 above
/// the last; `left` gives its limit from below, which differs where a run of equal
/// quantiles (a discrete feature) makes it jump.
fn cdf(quantiles: &[f64], x: f64, left: bool) -> f64 {
    let n = quantiles.len() - 1;
    // The quantiles below x (`left`), or at or below it.
    let i = if left {
        quantiles.partition_point(|q| *q < x)
    } else {
        quantiles.partition_point(|q| *q <= x)
    };
    if i == 0 {
        return 0.0;
    }
    if i > n {
        return 1.0;
    }
    let (lo, hi) = (quantiles[i - 1], quantiles[i]);
    let within = if hi > lo { (x - lo) / (hi - lo) } else { 0.0 };
    ((i - 1) as f64 + within) / n as f64
}

/// The one-sample Kolmogorov–Smirnov statistic of `sorted` against the reference CDF:
/// at every sample value, both CDFs just below it and at it, so that ties in the data
/// and jumps in the reference are compared like with like.
fn ks(quantiles: &[f64], sorted: &[f64]) -> f64 {
    let n = sorted.len() as f64;
    sorted
        .iter()
        .map(|&x| {
            let below = sorted.partition_point(|v| *v < x) as f64 / n;
            let at = sorted.partition_point(|v| *v <= x) as f64 / n;
            (cdf(quantiles, x, true) - below)
                .abs()
                .max((cdf(quantiles, x, false) - at).abs())
        })
        .fold(0.0, f64::max)
}

/// Bins of the population stability index: the reference's deciles.
const PSI_BINS: usize = 10;

/// Shares below this are raised to it, so an empty bin does not make the index infinite.
const PSI_FLOOR: f64 = 1e-4;

/// One bin of the population stability index: the reference's share of it and the
/// current window's, side by side (what the dashboard draws).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Bin {
    /// Its upper edge; the last bin has none.
    pub upper: Option<f64>,
    pub reference: f64,
    /// `None` until the window holds `min_samples` inputs.
    pub current: Option<f64>,
}

/// The reference's decile bins, with `sorted`'s share of each when there is a sample.
fn bins(quantiles: &[f64], sorted: Option<&[f64]>) -> Vec<Bin> {
    let n = quantiles.len() - 1;
    // Inner decile edges; equal edges (a discrete feature) merge their bins.
    let mut edges: Vec<f64> = (1..PSI_BINS)
        .map(|b| {
            let at = b as f64 / PSI_BINS as f64 * n as f64;
            let (i, within) = (at.floor() as usize, at.fract());
            let next = quantiles[(i + 1).min(n)];
            quantiles[i] + (next - quantiles[i]) * within
        })
        .collect();
    edges.dedup();
    let mut lower: Option<f64> = None;
    edges
        .iter()
        .map(|&e| Some(e))
        .chain([None])
        .map(|upper| {
            let reference = upper.map_or(1.0, |u| cdf(quantiles, u, false))
                - lower.map_or(0.0, |l| cdf(quantiles, l, false));
            let current = sorted.map(|sorted| {
                let count = sorted
                    .iter()
                    .filter(|&&v| lower.is_none_or(|l| v > l) && upper.is_none_or(|u| v <= u))
                    .count();
                count as f64 / sorted.len().max(1) as f64
            });
            lower = upper;
            Bin {
                upper,
                reference,
                current,
            }
        })
        .collect()
}

/// The population stability index over `bins` (with a current share each).
fn psi(bins: &[Bin]) -> f64 {
    bins.iter()
        .map(|b| {
            let e = b.reference.max(PSI_FLOOR);
            let a = b.current.unwrap_or(0.0).max(PSI_FLOOR);
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// Evaluates one version's monitor, updates its metrics, and logs and audits the flips:
/// the drift timer's work alone (readers see [`DriftMonitor::last`]).
pub fn judge(telemetry: &Telemetry, model: &str, version: u64, monitor: &DriftMonitor) {
    let (figures, flips) = monitor.evaluate();
    if let Some(metrics) = telemetry.metrics() {
        for f in figures.iter().filter(|f| f.ks.is_some()) {
            metrics.drift(
                model,
                version,
                &f.feature,
                f.ks.unwrap_or_default(),
                f.psi.unwrap_or_default(),
                f.drifted,
            );
        }
    }
    for flip in flips {
        let (kind, verdict) = if flip.drifted {
            ("drift.detected", "drifted")
        } else {
            ("drift.cleared", "within reference")
        };
        let detail = format!(
            "version {version}, feature {}: KS {:.3} (threshold {}), PSI {:.3} (threshold {})",
            flip.feature,
            flip.ks,
            monitor.config.ks_threshold,
            flip.psi,
            monitor.config.psi_threshold
        );
        if flip.drifted {
            tracing::warn!(model, version, feature = %flip.feature, ks = flip.ks, psi = flip.psi, "input drift detected");
        }
        telemetry.audit(Change {
            to: Some(format!("{}: {verdict}", flip.feature)),
            detail: Some(detail),
            ..Change::new(kind, "host", model)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_reference() -> Vec<f64> {
        (0..=100).map(|i| f64::from(i) / 100.0).collect()
    }

    #[test]
    fn the_reference_cdf_interpolates_between_quantiles() {
        let q = uniform_reference();
        assert_eq!(cdf(&q, -1.0, false), 0.0);
        assert!((cdf(&q, 0.25, false) - 0.25).abs() < 1e-9);
        assert_eq!(cdf(&q, 2.0, false), 1.0);
    }

    /// Percentiles of `values`, the way the training script writes them (linear).
    fn percentiles(values: &[f64]) -> Vec<f64> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let last = (sorted.len() - 1) as f64;
        (0..=100)
            .map(|p| {
                let at = f64::from(p) / 100.0 * last;
                let (i, f) = (at.floor() as usize, at.fract());
                sorted[i] + (sorted[(i + 1).min(sorted.len() - 1)] - sorted[i]) * f
            })
            .collect()
    }

    #[test]
    fn a_discrete_feature_against_its_own_percentiles_scores_low() {
        // Heavy ties, like iris petal widths: five values, one of them a third of the data.
        let data: Vec<f64> = (0..150)
            .map(|i| {
                [
                    0.2, 0.2, 0.2, 0.2, 0.2, 1.3, 1.5, 1.8, 2.3, 0.4, 1.0, 1.3, 0.2, 1.8, 2.1,
                ][i % 15]
            })
            .collect();
        let q = percentiles(&data);
        let mut sorted = data.clone();
        sorted.sort_by(f64::total_cmp);
        assert!(ks(&q, &sorted) < 0.05, "{}", ks(&q, &sorted));
        assert!(
            psi(&bins(&q, Some(&sorted))) < 0.05,
            "{}",
            psi(&bins(&q, Some(&sorted)))
        );
    }

    #[test]
    fn samples_like_the_reference_score_low_and_shifted_ones_high() {
        let q = uniform_reference();
        let alike: Vec<f64> = (0..500).map(|i| (f64::from(i) + 0.5) / 500.0).collect();
        assert!(ks(&q, &alike) < 0.01, "{}", ks(&q, &alike));
        assert!(
            psi(&bins(&q, Some(&alike))) < 0.01,
            "{}",
            psi(&bins(&q, Some(&alike)))
        );
        let shifted: Vec<f64> = alike.iter().map(|v| v + 0.5).collect();
        assert!(
            (ks(&q, &shifted) - 0.5).abs() < 0.01,
            "{}",
            ks(&q, &shifted)
        );
        assert!(
            psi(&bins(&q, Some(&shifted))) > 1.0,
            "{}",
            psi(&bins(&q, Some(&shifted)))
        );
        // What the dashboard draws: the reference's tenths, and the shifted half above 0.9.
        let drawn = bins(&q, Some(&shifted));
        assert_eq!(drawn.len(), 10);
        assert!(
            drawn.iter().all(|b| (b.reference - 0.1).abs() < 1e-9),
            "{drawn:?}"
        );
        assert_eq!(drawn[0].current, Some(0.0));
        assert!((drawn[9].current.unwrap() - 0.6).abs() < 0.01, "{drawn:?}");
        assert_eq!(drawn[9].upper, None);
        assert!(bins(&q, None).iter().all(|b| b.current.is_none()));
    }

    #[test]
    fn flips_are_reported_once() {
        let reference = Reference {
            input: "x".to_string(),
            features: vec![ReferenceFeature {
                name: "f".to_string(),
                quantiles: uniform_reference(),
            }],
        };
        let config = DriftConfig {
            window: 100,
            min_samples: 10,
            ..DriftConfig::default()
        };
        let input = TensorSpec {
            name: "x".to_string(),
            datatype: DataType::Fp32,
            shape: vec![-1, 1],
        };
        let monitor =
            DriftMonitor::new(reference.clone(), config, std::slice::from_ref(&input)).unwrap();
        let wrong = TensorSpec {
            shape: vec![-1, 3],
            ..input
        };
        assert!(matches!(
            DriftMonitor::new(reference.clone(), config, &[wrong]),
            Err(ReferenceError::Shape { .. })
        ));
        assert!(matches!(
            DriftMonitor::new(reference, config, &[]),
            Err(ReferenceError::NoSuchInput { .. })
        ));
        let rows = |offset: f64| Tensor {
            name: "x".to_string(),
            datatype: crate::tensor::DataType::Fp32,
            shape: vec![100, 1],
            data: (0..100)
                .flat_map(|i| ((i as f32 + 0.5) / 100.0 + offset as f32).to_le_bytes())
                .collect(),
        };
        monitor.observe(&[rows(0.0)]);
        let (figures, flips) = monitor.evaluate();
        assert!(!figures[0].drifted && flips.is_empty());
        monitor.observe(&[rows(3.0)]);
        let (figures, flips) = monitor.evaluate();
        assert!(figures[0].drifted);
        assert_eq!(flips.len(), 1);
        assert!(monitor.evaluate().1.is_empty());
        monitor.observe(&[rows(0.0)]);
        let (_, flips) = monitor.evaluate();
        assert!(!flips[0].drifted);
    }
}
