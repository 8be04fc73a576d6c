//! CPU time and predictions per model version and per endpoint variant, and what a million
//! predictions cost at the operator's price for a core-hour (`monitoring.core_hour_price`):
//! kept whether or not metrics are on, since the dashboard and `/admin/cost` read them, and
//! exported at `/metrics` when they are. A prediction is one row of a request's batch.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VariantLabels {
    endpoint: String,
    variant: String,
}

/// The counters of one model version or one variant.
struct Families<L> {
    cpu: Family<L, Counter<f64, AtomicU64>>,
    predictions: Family<L, Counter>,
    cost: Family<L, Gauge<f64, AtomicU64>>,
}

impl<L: Clone + std::hash::Hash + Eq + Send + Sync + 'static> Families<L> {
    fn new() -> Families<L> {
        Families {
            cpu: Family::default(),
            predictions: Family::default(),
            cost: Family::default(),
        }
    }

    fn get(&self, labels: &L, price: Option<f64>) -> Spending {
        let series = self.cost.clone();
        let labels_kept = labels.clone();
        Spending {
            cpu: self.cpu.get_or_create(labels).clone(),
            predictions: self.predictions.get_or_create(labels).clone(),
            // Without a price there is no cost to show, not a cost of 0; nor before the
            // first prediction: the series appears with it.
            cost: price.map(|price| {
                Arc::new(Cost {
                    price,
                    gauge: OnceLock::new(),
                    make: Box::new(move || series.get_or_create(&labels_kept).clone()),
                })
            }),
        }
    }

    fn forget(&self, labels: &L) {
        self.cpu.remove(labels);
        self.predictions.remove(labels);
        self.cost.remove(labels);
    }
}

/// Every model version's and variant's spending.
pub struct Spendings {
    price: Option<f64>,
    versions: Families<VersionLabels>,
    variants: Families<VariantLabels>,
}

/// What one model version or variant spent; clones count together.
#[derive(Clone)]
pub struct Spending {
    cpu: Counter<f64, AtomicU64>,
    predictions: Counter,
    cost: Option<Arc<Cost>>,
}

/// The cost gauge of one version or variant, made with its first prediction.
struct Cost {
    price: f64,
    gauge: OnceLock<Gauge<f64, AtomicU64>>,
    make: Box<dyn Fn() -> Gauge<f64, AtomicU64> + Send + Sync>,
}

/// A [`Spending`] read at one moment, with the figures derived from it.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Spent {
    pub cpu_seconds: f64,
    pub predictions: u64,
    pub predictions_per_cpu_second: Option<f64>,
    pub cost_per_million: Option<f64>,
}

impl Spent {
    fn new(cpu_seconds: f64, predictions: u64, price: Option<f64>) -> Spent {
        let per_cpu_second = (cpu_seconds > 0.0).then(|| predictions as f64 / cpu_seconds);
        Spent {
            cpu_seconds,
            predictions,
            predictions_per_cpu_second: per_cpu_second,
            cost_per_million: price
                .filter(|_| predictions > 0)
                .map(|price| price * cpu_seconds / 3600.0 / predictions as f64 * 1e6),
        }
    }
}

impl Spending {
    /// Charges one run's CPU time and the predictions it made (rows; 0 for a failed run).
    /// The gauge is set from the counters as they are after this charge: when two charges
    /// race, the later run's figures may lose to the earlier's until the next charge.
    pub fn charge(&self, cpu: Duration, predictions: u64) {
        self.cpu.inc_by(cpu.as_secs_f64());
        self.predictions.inc_by(predictions);
        if let Some(cost) = &self.cost
            && let Some(per_million) = self.spent_at(Some(cost.price)).cost_per_million
        {
            cost.gauge.get_or_init(|| (cost.make)()).set(per_million);
        }
    }

    pub fn spent(&self) -> Spent {
        self.spent_at(self.cost.as_ref().map(|cost| cost.price))
    }

    fn spent_at(&self, price: Option<f64>) -> Spent {
        Spent::new(self.cpu.get(), self.predictions.get(), price)
    }
}

impl Spendings {
    pub fn new(price: Option<f64>) -> Spendings {
        Spendings {
            price,
            versions: Families::new(),
            variants: Families::new(),
        }
    }

    /// A model version's spending, the same counters each time it is asked for.
    pub fn version(&self, model: &str, version: u64) -> Spending {
        self.versions
            .get(&version_labels(model, version), self.price)
    }

    pub fn variant(&self, endpoint: &str, variant: &str) -> Spending {
        self.variants
            .get(&variant_labels(endpoint, variant), self.price)
    }

    pub fn forget_version(&self, model: &str, version: u64) {
        self.versions.forget(&version_labels(model, version));
    }

    pub fn forget_variant(&self, endpoint: &str, variant: &str) {
        self.variants.forget(&variant_labels(endpoint, variant));
    }

    pub fn core_hour_price(&self) -> Option<f64> {
        self.price
    }

    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "inference_cpu_seconds",
            "CPU time spent running each model version, on the calling thread and the backend's worker threads",
            self.versions.cpu.clone(),
        );
        registry.register(
            "predictions",
            "Predictions (rows) each model version answered",
            self.versions.predictions.clone(),
        );
        registry.register(
            "variant_cpu_seconds",
            "CPU time spent running the model of each endpoint variant",
            self.variants.cpu.clone(),
        );
        registry.register(
            "variant_predictions",
            "Predictions (rows) each endpoint variant's model answered",
            self.variants.predictions.clone(),
        );
        if let Some(price) = self.price {
            registry.register(
                "cost_per_million_predictions",
                "Estimated cost of a million predictions of each model version, at monitoring.core_hour_price",
                self.versions.cost.clone(),
            );
            registry.register(
                "variant_cost_per_million_predictions",
                "Estimated cost of a million predictions of each endpoint variant, at monitoring.core_hour_price",
                self.variants.cost.clone(),
            );
            let gauge = Gauge::<f64, AtomicU64>::default();
            gauge.set(price);
            registry.register(
                "core_hour_price",
                "What one CPU core costs an hour (monitoring.core_hour_price)",
                gauge,
            );
        }
    }
}

fn version_labels(model: &str, version: u64) -> VersionLabels {
    VersionLabels {
        model: model.to_string(),
        version: version.to_string(),
    }
}

fn variant_labels(endpoint: &str, variant: &str) -> VariantLabels {
    VariantLabels {
        endpoint: endpoint.to_string(),
        variant: variant.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_predictions_cost_their_cpu_hours_at_the_price() {
        let spendings = Spendings::new(Some(0.36));
        let iris = spendings.version("iris", 2);
        assert_eq!(iris.spent().cost_per_million, None, "no prediction yet");
        iris.charge(Duration::from_millis(1500), 1000);
        // The same counters when asked again.
        spendings
            .version("iris", 2)
            .charge(Duration::from_millis(500), 1000);
        let spent = iris.spent();
        assert_eq!(spent.predictions, 2000);
        assert!((spent.cpu_seconds - 2.0).abs() < 1e-9);
        assert_eq!(spent.predictions_per_cpu_second, Some(1000.0));
        // 2 CPU-seconds for 2000 predictions: 1000 s a million, 0.36 / 3600 a second.
        let cost = spent.cost_per_million.unwrap();
        assert!((cost - 0.1).abs() < 1e-9, "{cost}");

        let free = Spendings::new(None).variant("ab", "a");
        free.charge(Duration::from_secs(1), 10);
        assert_eq!(free.spent().cost_per_million, None);
        assert_eq!(free.spent().predictions_per_cpu_second, Some(10.0));

        spendings.forget_version("iris", 2);
        assert_eq!(spendings.version("iris", 2).spent().predictions, 0);
    }

    #[test]
    fn a_cost_is_exported_from_the_first_prediction_on() {
        let spendings = Spendings::new(Some(0.36));
        let mut registry = Registry::default();
        spendings.register(&mut registry);
        let (idle, busy) = (spendings.variant("ab", "a"), spendings.variant("ab", "b"));
        idle.charge(Duration::from_millis(2), 0);
        busy.charge(Duration::from_secs(2), 2000);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"variant_cost_per_million_predictions{endpoint="ab",variant="b"} 0.0999"#
            ) || text
                .contains(r#"variant_cost_per_million_predictions{endpoint="ab",variant="b"} 0.1"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"variant_cost_per_million_predictions{endpoint="ab",variant="a"}"#),
            "{text}"
        );
    }
}
