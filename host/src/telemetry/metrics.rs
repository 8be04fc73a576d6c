//! The metrics Prometheus scrapes at `/metrics`, in the OpenMetrics text format. Every
//! label value comes from the configuration or the model repository (endpoint, variant,
//! model, version) or a small fixed set (status), never from a request as sent, so the
//! number of series stays bounded whatever clients send.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One kind of answer: who was called, who answered, and how it went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The endpoint or model called; `unknown` for names that are neither.
    pub endpoint: String,
    /// The endpoint variant that answered; empty for a bare model.
    pub variant: String,
    pub model: String,
    pub version: String,
    /// The HTTP status code.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

type Seconds = Family<EndpointLabel, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 50 µs to ~1.6 s, doubling: the range between a tiny model and a slow one.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Seconds,
    in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
}

/// Counts a request as in flight until dropped.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("modelyard");
        let requests = Family::<RequestLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "requests",
            "Inference requests answered, by endpoint, variant, model, version and HTTP status",
            requests.clone(),
        );
        let request_seconds = Seconds::new_with_constructor(seconds);
        registry.register(
            "request_duration_seconds",
            "Time from a decoded inference request to its encoded answer, by endpoint",
            request_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Inference requests being served",
            in_flight.clone(),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            in_flight,
        }
    }
}

impl Metrics {
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(self)
    }

    pub fn answered(&self, labels: RequestLabels, took: Duration) {
        self.request_seconds
            .get_or_create(&EndpointLabel {
                endpoint: labels.endpoint.clone(),
            })
            .observe(took.as_secs_f64());
        self.requests.get_or_create(&labels).inc();
    }

    /// Every metric in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
