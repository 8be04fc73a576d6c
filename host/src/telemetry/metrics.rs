//! The metrics Prometheus scrapes at `/metrics`, in the OpenMetrics text format. Every
//! label value comes from the configuration, the model repository, the plugin directory or
//! a small fixed set (status, outcome, reason), never from a request as sent, so the
//! number of series stays bounded whatever clients send: the values a request or a plugin
//! brings are checked here against the names the host declared (`know_*`). The series of
//! a model version, model, endpoint or variant that is gone are removed (`forget_*`), so
//! that swapping them for as long as the server runs does not grow the scrape.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One kind of answer: who was called, who answered, and how it went.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    model: String,
    version: String,
    /// `queue_full`, `timeout` or `in_flight_limit`.
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
    world: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginFailureLabels {
    plugin: String,
    world: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    /// A plugin file's name or a model's.
    name: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowLabels {
    endpoint: String,
    variant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OverloadLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComparisonLabels {
    endpoint: String,
    variant: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlagLabels {
    endpoint: String,
    flag: String,
    variant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    model: String,
    version: String,
    feature: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type Ratio = Gauge<f64, AtomicU64>;

fn seconds() -> Histogram {
    // 50 µs to ~1.6 s, doubling: the range between a tiny model and a slow one.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn batch_sizes() -> Histogram {
    // 1 to 1024 rows, doubling.
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

fn plugin_seconds() -> Histogram {
    // 1 µs to ~0.5 s: a plugin call is usually a few microseconds, a stuck one its deadline.
    Histogram::new(exponential_buckets(0.000_001, 2.0, 20))
}

/// Why a plugin call failed, as the `reason` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginFailure {
    /// The plugin returned an error.
    Error,
    /// It ran past its CPU deadline (or the wall-clock backstop).
    Timeout,
    /// It ran out of its memory limit.
    Memory,
    /// Any other trap, or an instance that could not be made.
    Trap,
    /// It answered with something the host cannot use (a tensor whose data does not
    /// fill its shape, say).
    Invalid,
}

impl PluginFailure {
    fn label(self) -> &'static str {
        match self {
            PluginFailure::Error => "error",
            PluginFailure::Timeout => "timeout",
            PluginFailure::Memory => "memory",
            PluginFailure::Trap => "trap",
            PluginFailure::Invalid => "invalid",
        }
    }
}

/// Why an endpoint variant was charged a failure, as the `reason` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VariantFailure {
    /// It answered with an error (a plugin's, the model's, the request's for its model).
    Error,
    /// Its model crashed the backend.
    Crash,
    /// It had no answer within the endpoint's latency budget.
    Timeout,
    /// It had as many runs past the budget still going as it may (half the slots).
    Refused,
}

impl VariantFailure {
    const ALL: [VariantFailure; 4] = [
        VariantFailure::Error,
        VariantFailure::Crash,
        VariantFailure::Timeout,
        VariantFailure::Refused,
    ];

    fn label(self) -> &'static str {
        match self {
            VariantFailure::Error => "error",
            VariantFailure::Crash => "crash",
            VariantFailure::Timeout => "timeout",
            VariantFailure::Refused => "refused",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VariantFailureLabels {
    endpoint: String,
    variant: String,
    reason: &'static str,
}

/// What became of a plugin file or a model version on a rescan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    Loaded,
    Refused,
    Unloaded,
}

impl Load {
    fn count(self, family: &Family<LoadLabels, Counter>, name: &str) {
        let outcome = match self {
            Load::Loaded => "loaded",
            Load::Refused => "refused",
            Load::Unloaded => "unloaded",
        };
        family
            .get_or_create(&LoadLabels {
                name: name.to_string(),
                outcome,
            })
            .inc();
    }
}

/// How a shadow's answer compared with the primary's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowOutcome {
    /// Every compared row or label matched (or only numbers were compared).
    Agreed,
    Disagreed,
    /// The shadow failed, so there was nothing to compare.
    Failed,
}

impl ShadowOutcome {
    const ALL: [ShadowOutcome; 3] = [
        ShadowOutcome::Agreed,
        ShadowOutcome::Disagreed,
        ShadowOutcome::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            ShadowOutcome::Agreed => "agreed",
            ShadowOutcome::Disagreed => "disagreed",
            ShadowOutcome::Failed => "failed",
        }
    }
}

/// Why a model version turned requests away, as the `reason` label says it.
const REJECTIONS: [&str; 3] = ["queue_full", "timeout", "in_flight_limit"];

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Histograms<EndpointLabel>,
    queue_seconds: Histograms<EndpointLabel>,
    inference_seconds: Histograms<ModelLabels>,
    model_crashes: Family<ModelLabels, Counter>,
    cache_hits: Family<ModelLabels, Counter>,
    cache_misses: Family<ModelLabels, Counter>,
    cache_evictions: Family<ModelLabels, Counter>,
    batch_sizes: Family<ModelLabels, Histogram, fn() -> Histogram>,
    queue_rejections: Family<RejectionLabels, Counter>,
    variant_failures: Family<VariantFailureLabels, Counter>,
    in_flight: Gauge<i64, AtomicI64>,
    plugin_calls: Family<PluginLabels, Counter>,
    /// Not exported (the histogram has it): read by [`Metrics::plugin_calls`].
    plugin_seconds_sum: Family<PluginLabels, Counter<f64, AtomicU64>>,
    plugin_failures: Family<PluginFailureLabels, Counter>,
    plugin_seconds: Histograms<PluginLabels>,
    plugin_loads: Family<LoadLabels, Counter>,
    model_loads: Family<LoadLabels, Counter>,
    shadow_comparisons: Family<ComparisonLabels, Counter>,
    shadow_dropped: Family<ShadowLabels, Counter>,
    flag_evaluations: Family<FlagLabels, Counter>,
    drift_ks: Family<FeatureLabels, Ratio>,
    drift_psi: Family<FeatureLabels, Ratio>,
    drifted: Family<FeatureLabels, Gauge>,
    request_log_dropped: Counter,
    turned_away: Family<OverloadLabels, Counter>,
    config_refreshes: Counter,
    cluster_syncs: Family<OutcomeLabels, Counter>,
    cluster_up: Gauge,
    cluster_replicas: Gauge,
    cluster_feedback: Family<OutcomeLabels, Counter>,
    known: RwLock<Known>,
    /// The label sets `requests` has: the one family whose labels cannot be derived from
    /// what the host knows (any HTTP status), kept so that a gone model's or endpoint's
    /// series can be found (the family cannot be listed).
    request_series: Mutex<HashSet<RequestLabels>>,
}

/// The label values a request or a plugin may bring that the metrics accept: the names of
/// endpoints, variants, models and versions that serve, and the flags and flag variants
/// the flags plugins declared. Anything else is counted under one shared value, so clients
/// cannot grow the number of series, and nothing brings back the series of what is gone.
///
/// Series are made while this is read-locked, and `forget_*` write-lock it to take a name
/// out before removing its series: a request that was running on a version or variant as
/// it went cannot make its series again after the removal.
#[derive(Default)]
struct Known {
    /// Model → its serving versions, as label values.
    models: HashMap<String, HashSet<String>>,
    endpoints: HashMap<String, Declared>,
}

/// What an endpoint declared: its variants, and flag → the flag's declared variants
/// (nested, so that a lookup on the request path borrows the names it is given rather than
/// building a key).
#[derive(Default)]
struct Declared {
    variants: HashSet<String>,
    flags: Flags,
}

type Flags = HashMap<String, HashSet<String>>;

impl Known {
    fn variant(&self, endpoint: &str, variant: &str) -> bool {
        self.endpoints
            .get(endpoint)
            .is_some_and(|d| d.variants.contains(variant))
    }

    /// The labels a request counts under: a name that is neither an endpoint nor a model
    /// as `unknown` with nothing else, and a variant or version that no longer serves as
    /// empty.
    fn request_labels(&self, mut labels: RequestLabels) -> RequestLabels {
        let endpoint = self.endpoints.get(&labels.endpoint);
        if endpoint.is_none() && !self.models.contains_key(&labels.endpoint) {
            return RequestLabels {
                endpoint: "unknown".to_string(),
                status: labels.status,
                ..RequestLabels::default()
            };
        }
        if !endpoint.is_some_and(|d| d.variants.contains(&labels.variant)) {
            labels.variant.clear();
        }
        match self.models.get(&labels.model) {
            Some(versions) if versions.contains(&labels.version) => {}
            Some(_) => labels.version.clear(),
            None => {
                labels.model.clear();
                labels.version.clear();
            }
        }
        labels
    }
}

/// The `(flag, variant)` label pairs an endpoint's flags count under: each declared
/// variant and `other` per flag, and `other` for undeclared flags.
fn flag_series(flags: &Flags) -> impl Iterator<Item = (&str, &str)> {
    flags
        .iter()
        .flat_map(|(flag, variants)| {
            let variants = variants.iter().map(String::as_str).chain(["other"]);
            variants.map(move |variant| (flag.as_str(), variant))
        })
        .chain([("other", "other")])
}

/// A model version's response cache, batching and queue series, looked up once at load.
#[derive(Clone, Debug)]
pub struct SchedulingMeters {
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_evictions: Counter,
    pub batch_size: Histogram,
    pub queue_full: Counter,
    pub timed_out: Counter,
    /// Turned away at its `max_in_flight`.
    pub busy: Counter,
}

/// Counts a request as in flight until dropped.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// One series of a duration histogram, looked up once (when a model loads or an endpoint
/// is built) so that observing it costs no label hashing or allocation.
#[derive(Clone, Debug)]
pub struct Seconds(Histogram);

impl Seconds {
    pub fn observe(&self, took: Duration) {
        self.0.observe(took.as_secs_f64());
    }
}

/// One plugin's call counters, looked up once when its instances are prepared so that a
/// call costs two atomic adds and no label hashing.
#[derive(Clone)]
pub struct PluginMeter {
    labels: PluginLabels,
    calls: Counter,
    seconds: Histogram,
    /// The histogram's sum, which it does not let us read: for the mean call time.
    seconds_sum: Counter<f64, AtomicU64>,
    failures: Family<PluginFailureLabels, Counter>,
}

impl PluginMeter {
    pub fn call(&self, took: Duration, failure: Option<PluginFailure>) {
        self.calls.inc();
        self.seconds.observe(took.as_secs_f64());
        self.seconds_sum.inc_by(took.as_secs_f64());
        if let Some(failure) = failure {
            self.failures
                .get_or_create(&PluginFailureLabels {
                    plugin: self.labels.plugin.clone(),
                    world: self.labels.world.clone(),
                    reason: failure.label(),
                })
                .inc();
        }
    }
}

fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut r = Registry::with_prefix("modelyard");
        let requests = register(
            &mut r,
            "requests",
            "Inference requests answered, by endpoint, variant, model, version and HTTP status",
            Family::default(),
        );
        let request_seconds = register(
            &mut r,
            "request_duration_seconds",
            "Time from a decoded inference request to its encoded answer, by endpoint",
            Histograms::new_with_constructor(seconds),
        );
        let queue_seconds = register(
            &mut r,
            "queue_duration_seconds",
            "Time a request waited for an inference slot and a thread, by endpoint or model",
            Histograms::new_with_constructor(seconds),
        );
        let inference_seconds = register(
            &mut r,
            "inference_duration_seconds",
            "Time the backend took to run a model, by model and version",
            Histograms::new_with_constructor(seconds),
        );
        let model_crashes = register(
            &mut r,
            "model_crashes",
            "Model runs that crashed inside the backend (a panic caught on the inference thread), by model and version",
            Family::default(),
        );
        let cache_hits = register(
            &mut r,
            "response_cache_hits",
            "Model calls answered from the response cache, by model and version",
            Family::default(),
        );
        let cache_misses = register(
            &mut r,
            "response_cache_misses",
            "Model calls the response cache did not hold, by model and version",
            Family::default(),
        );
        let cache_evictions = register(
            &mut r,
            "response_cache_evictions",
            "Answers dropped from the response cache to make room, by model and version",
            Family::default(),
        );
        let batch_sizes = register(
            &mut r,
            "batch_size",
            "Rows per model run of a model with dynamic batching, by model and version",
            Family::new_with_constructor(batch_sizes as fn() -> Histogram),
        );
        let queue_rejections = register(
            &mut r,
            "queue_rejections",
            "Requests a model version turned away (503), by model, version and reason (queue_full and timeout: its batching queue; in_flight_limit: its max_in_flight)",
            Family::default(),
        );
        let variant_failures = register(
            &mut r,
            "variant_failures",
            "Failures charged to an endpoint variant, by endpoint, variant and reason, whether a fallback answered for them or not",
            Family::default(),
        );
        let in_flight = register(
            &mut r,
            "requests_in_flight",
            "Inference requests being served",
            Gauge::default(),
        );
        let plugin_calls = register(
            &mut r,
            "plugin_calls",
            "Plugin calls, by plugin file and world",
            Family::default(),
        );
        let plugin_failures = register(
            &mut r,
            "plugin_failures",
            "Failed plugin calls, by plugin, world and reason (error, timeout, memory, trap)",
            Family::default(),
        );
        let plugin_seconds = register(
            &mut r,
            "plugin_call_duration_seconds",
            "Time one plugin call took, by plugin and world",
            Histograms::new_with_constructor(plugin_seconds),
        );
        let plugin_loads = register(
            &mut r,
            "plugin_loads",
            "Plugin files loaded, refused or unloaded, by file name and outcome",
            Family::default(),
        );
        let model_loads = register(
            &mut r,
            "model_loads",
            "Model versions loaded, refused or unloaded, by model and outcome",
            Family::default(),
        );
        let shadow_comparisons = register(
            &mut r,
            "shadow_comparisons",
            "Shadow answers compared with the primary's, by endpoint, shadow variant and result (agreed, disagreed, failed)",
            Family::default(),
        );
        let shadow_dropped = register(
            &mut r,
            "shadow_dropped",
            "Shadow copies dropped because the shadow queue was full, by endpoint and shadow variant",
            Family::default(),
        );
        let flag_evaluations = register(
            &mut r,
            "flag_evaluations",
            "Feature flag evaluations, by endpoint, flag and the variant it evaluated to",
            Family::default(),
        );
        let drift_ks = register(
            &mut r,
            "drift_ks",
            "Kolmogorov-Smirnov statistic of a feature's recent inputs against its reference",
            Family::default(),
        );
        let drift_psi = register(
            &mut r,
            "drift_psi",
            "Population stability index of a feature's recent inputs against its reference",
            Family::default(),
        );
        let drifted = register(
            &mut r,
            "drift_drifted",
            "1 while a feature's drift is over its model's threshold, else 0",
            Family::default(),
        );
        let request_log_dropped = register(
            &mut r,
            "request_log_dropped",
            "Sampled request records dropped because the store or the CloudEvents sink fell behind",
            Counter::default(),
        );
        let turned_away = register(
            &mut r,
            "server_rejections",
            "Inference requests the server's own limits turned away, by reason: in_flight_limit (503, server.max_in_flight), deadline (504), body_timeout (408)",
            Family::default(),
        );
        let config_refreshes = register(
            &mut r,
            "config_refreshes",
            "Times the control plane reread the configuration and the plugin directory, after a change to a file it follows",
            Counter::default(),
        );
        let cluster_syncs = register(
            &mut r,
            "cluster_syncs",
            "Exchanges with the cluster's Redis (counts, router states), by outcome: ok, failed",
            Family::default(),
        );
        let cluster_up = register(
            &mut r,
            "cluster_redis_up",
            "1 while the last exchange with the cluster's Redis succeeded, else 0",
            Gauge::default(),
        );
        let cluster_replicas = register(
            &mut r,
            "cluster_replicas",
            "Replicas whose counts are in the sums, this one included",
            Gauge::default(),
        );
        let cluster_feedback = register(
            &mut r,
            "cluster_feedback",
            "Feedback for another replica's answer, by outcome: sent (another replica took it), taken (this one took another's), unanswered (no replica knows the id: 404), failed (Redis unreachable, or not every replica listening: 503, send it again)",
            Family::default(),
        );
        Metrics {
            registry: r,
            requests,
            request_seconds,
            queue_seconds,
            inference_seconds,
            model_crashes,
            cache_hits,
            cache_misses,
            cache_evictions,
            batch_sizes,
            queue_rejections,
            variant_failures,
            in_flight,
            plugin_calls,
            plugin_seconds_sum: Family::default(),
            plugin_failures,
            plugin_seconds,
            plugin_loads,
            model_loads,
            shadow_comparisons,
            shadow_dropped,
            flag_evaluations,
            drift_ks,
            drift_psi,
            drifted,
            request_log_dropped,
            turned_away,
            config_refreshes,
            cluster_syncs,
            cluster_up,
            cluster_replicas,
            cluster_feedback,
            known: RwLock::default(),
            request_series: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(self)
    }

    /// `name` is a model of the repository serving `versions`: requests may name it.
    pub fn know_model(&self, name: &str, versions: impl IntoIterator<Item = u64>) {
        let versions = versions.into_iter().map(|v| v.to_string()).collect();
        self.known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .models
            .insert(name.to_string(), versions);
    }

    /// `name` is a configured endpoint of these `variants`, whose flags plugins declared
    /// these flags and their variants: requests may name it, and its flag evaluations
    /// count under them. The series of flags and flag variants it no longer declares go.
    pub fn know_endpoint<'a>(
        &self,
        name: &str,
        variants: impl IntoIterator<Item = &'a str>,
        flags: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) {
        let declared = Declared {
            variants: variants.into_iter().map(str::to_string).collect(),
            flags: flags
                .into_iter()
                .map(|(flag, variants)| (flag.to_string(), variants.iter().cloned().collect()))
                .collect(),
        };
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        let before = known.endpoints.get(name).map(|d| &d.flags);
        for (flag, variant) in before.into_iter().flat_map(flag_series) {
            let kept = (flag, variant) == ("other", "other")
                || declared
                    .flags
                    .get(flag)
                    .is_some_and(|v| variant == "other" || v.contains(variant));
            if !kept {
                self.flag_evaluations.remove(&FlagLabels {
                    endpoint: name.to_string(),
                    flag: flag.to_string(),
                    variant: variant.to_string(),
                });
            }
        }
        known.endpoints.insert(name.to_string(), declared);
    }

    /// A model version stopped serving: its series go.
    pub fn forget_version(&self, model: &str, version: u64) {
        let labels = ModelLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        if let Some(versions) = self
            .known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .models
            .get_mut(model)
        {
            versions.remove(&labels.version);
        }
        self.inference_seconds.remove(&labels);
        self.batch_sizes.remove(&labels);
        for family in [
            &self.model_crashes,
            &self.cache_hits,
            &self.cache_misses,
            &self.cache_evictions,
        ] {
            family.remove(&labels);
        }
        for reason in REJECTIONS {
            self.queue_rejections.remove(&RejectionLabels {
                model: model.to_string(),
                version: version.to_string(),
                reason,
            });
        }
        self.forget_requests(|l| l.model == model && l.version == labels.version);
    }

    /// A model left the repository: requests no longer name it, and its series go (its
    /// versions' with [`Metrics::forget_version`]).
    pub fn forget_model(&self, model: &str) {
        let endpoint = {
            let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
            known.models.remove(model);
            known.endpoints.contains_key(model)
        };
        if !endpoint {
            self.forget_called(model);
        }
        self.forget_requests(|l| l.model == model);
    }

    /// An endpoint left the configuration: requests no longer name it, and its series and
    /// those of its `variants` go.
    pub fn forget_endpoint<'a>(&self, endpoint: &str, variants: impl Iterator<Item = &'a str>) {
        let (flags, model) = {
            let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
            let declared = known.endpoints.remove(endpoint).unwrap_or_default();
            (declared.flags, known.models.contains_key(endpoint))
        };
        for (flag, variant) in flag_series(&flags) {
            self.flag_evaluations.remove(&FlagLabels {
                endpoint: endpoint.to_string(),
                flag: flag.to_string(),
                variant: variant.to_string(),
            });
        }
        for variant in variants {
            self.forget_variant(endpoint, variant);
        }
        if !model {
            self.forget_called(endpoint);
        }
    }

    /// A variant left its endpoint (or the endpoint left): its series go.
    pub fn forget_variant(&self, endpoint: &str, variant: &str) {
        if let Some(declared) = self
            .known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .endpoints
            .get_mut(endpoint)
        {
            declared.variants.remove(variant);
        }
        for reason in VariantFailure::ALL {
            self.variant_failures.remove(&VariantFailureLabels {
                endpoint: endpoint.to_string(),
                variant: variant.to_string(),
                reason: reason.label(),
            });
        }
        for result in ShadowOutcome::ALL {
            self.shadow_comparisons.remove(&ComparisonLabels {
                endpoint: endpoint.to_string(),
                variant: variant.to_string(),
                result: result.label(),
            });
        }
        self.shadow_dropped.remove(&ShadowLabels {
            endpoint: endpoint.to_string(),
            variant: variant.to_string(),
        });
        self.forget_requests(|l| l.endpoint == endpoint && l.variant == variant);
    }

    /// The series of a name no client may call any more, endpoint or model.
    fn forget_called(&self, name: &str) {
        let label = EndpointLabel {
            endpoint: name.to_string(),
        };
        self.request_seconds.remove(&label);
        self.queue_seconds.remove(&label);
        self.forget_requests(|l| l.endpoint == name);
    }

    fn forget_requests(&self, gone: impl Fn(&RequestLabels) -> bool) {
        self.request_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|labels| {
                let gone = gone(labels);
                if gone {
                    self.requests.remove(labels);
                }
                !gone
            });
    }

    /// Counts one answered inference request. A name that is neither an endpoint nor a
    /// model is counted as `unknown`, with no variant, model or version; a variant or
    /// version that no longer serves, as empty.
    pub fn answered(&self, labels: RequestLabels, took: Duration) {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        let labels = known.request_labels(labels);
        self.request_seconds
            .get_or_create(&EndpointLabel {
                endpoint: labels.endpoint.clone(),
            })
            .observe(took.as_secs_f64());
        if let Some(count) = self.requests.get(&labels) {
            count.inc();
            return;
        }
        // A new series: made, then noted (never both locks held: `forget_requests` takes
        // them the other way round).
        self.requests.get_or_create(&labels).inc();
        self.request_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(labels);
        drop(known);
    }

    /// The queue-time series of an endpoint (or of a model called by name).
    pub fn queue_seconds(&self, endpoint: &str) -> Seconds {
        Seconds(
            self.queue_seconds
                .get_or_create(&EndpointLabel {
                    endpoint: endpoint.to_string(),
                })
                .clone(),
        )
    }

    /// The run-time series of a model version.
    pub fn inference_seconds(&self, model: &str, version: u64) -> Seconds {
        Seconds(
            self.inference_seconds
                .get_or_create(&ModelLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                })
                .clone(),
        )
    }

    /// Counts a failure charged to a variant that serves (one gone since is no one's).
    pub fn variant_failed(&self, endpoint: &str, variant: &str, reason: VariantFailure) {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        if !known.variant(endpoint, variant) {
            return;
        }
        self.variant_failures
            .get_or_create(&VariantFailureLabels {
                endpoint: endpoint.to_string(),
                variant: variant.to_string(),
                reason: reason.label(),
            })
            .inc();
    }

    /// The crash counter of a model version.
    pub fn model_crashes(&self, model: &str, version: u64) -> Counter {
        self.model_crashes
            .get_or_create(&ModelLabels {
                model: model.to_string(),
                version: version.to_string(),
            })
            .clone()
    }

    /// A model version's series of its response cache, batching and queue.
    pub fn scheduling_meters(&self, model: &str, version: u64) -> SchedulingMeters {
        let labels = ModelLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        let rejected = |reason: &'static str| {
            self.queue_rejections
                .get_or_create(&RejectionLabels {
                    model: model.to_string(),
                    version: version.to_string(),
                    reason,
                })
                .clone()
        };
        SchedulingMeters {
            cache_hits: self.cache_hits.get_or_create(&labels).clone(),
            cache_misses: self.cache_misses.get_or_create(&labels).clone(),
            cache_evictions: self.cache_evictions.get_or_create(&labels).clone(),
            batch_size: self.batch_sizes.get_or_create(&labels).clone(),
            queue_full: rejected(REJECTIONS[0]),
            timed_out: rejected(REJECTIONS[1]),
            busy: rejected(REJECTIONS[2]),
        }
    }

    pub fn plugin_meter(&self, plugin: &str, world: &str) -> PluginMeter {
        let labels = PluginLabels {
            plugin: plugin.to_string(),
            world: world.to_string(),
        };
        PluginMeter {
            calls: self.plugin_calls.get_or_create(&labels).clone(),
            seconds: self.plugin_seconds.get_or_create(&labels).clone(),
            seconds_sum: self.plugin_seconds_sum.get_or_create(&labels).clone(),
            failures: self.plugin_failures.clone(),
            labels,
        }
    }

    /// A plugin's calls so far and their mean time, for the operator API; `None` before
    /// its first instance was prepared.
    pub fn plugin_calls(&self, plugin: &str, world: &str) -> Option<(u64, Duration)> {
        let labels = PluginLabels {
            plugin: plugin.to_string(),
            world: world.to_string(),
        };
        let calls = self.plugin_calls.get(&labels)?.get();
        let seconds = self.plugin_seconds_sum.get(&labels)?.get();
        let mean = if calls > 0 {
            seconds / calls as f64
        } else {
            0.0
        };
        Some((calls, Duration::from_secs_f64(mean)))
    }

    pub fn plugin_load(&self, plugin: &str, outcome: Load) {
        outcome.count(&self.plugin_loads, plugin);
    }

    pub fn model_load(&self, model: &str, outcome: Load) {
        outcome.count(&self.model_loads, model);
    }

    pub fn shadow_compared(&self, endpoint: &str, variant: &str, result: ShadowOutcome) {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        if !known.variant(endpoint, variant) {
            return;
        }
        self.shadow_comparisons
            .get_or_create(&ComparisonLabels {
                endpoint: endpoint.to_string(),
                variant: variant.to_string(),
                result: result.label(),
            })
            .inc();
    }

    pub fn shadow_dropped(&self, endpoint: &str, variant: &str) {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        if !known.variant(endpoint, variant) {
            return;
        }
        self.shadow_dropped
            .get_or_create(&ShadowLabels {
                endpoint: endpoint.to_string(),
                variant: variant.to_string(),
            })
            .inc();
    }

    /// Counts a flag evaluation under the flag and variant its plugin declared; an
    /// undeclared variant counts as `other`, and so does an undeclared flag. An endpoint
    /// gone since counts nothing.
    pub fn flag_evaluated(&self, endpoint: &str, flag: &str, variant: &str) {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        let Some(declared) = known.endpoints.get(endpoint) else {
            return;
        };
        let (flag, variant) = match declared.flags.get(flag) {
            Some(variants) if variants.contains(variant) => (flag, variant),
            Some(_) => (flag, "other"),
            None => ("other", "other"),
        };
        self.flag_evaluations
            .get_or_create(&FlagLabels {
                endpoint: endpoint.to_string(),
                flag: flag.to_string(),
                variant: variant.to_string(),
            })
            .inc();
    }

    /// A feature's latest drift figures.
    pub fn drift(&self, model: &str, version: u64, feature: &str, ks: f64, psi: f64, over: bool) {
        let labels = FeatureLabels {
            model: model.to_string(),
            version: version.to_string(),
            feature: feature.to_string(),
        };
        self.drift_ks.get_or_create(&labels).set(ks);
        self.drift_psi.get_or_create(&labels).set(psi);
        self.drifted.get_or_create(&labels).set(i64::from(over));
    }

    /// Drops a version's drift series when it stops serving (or is replaced), so that a
    /// drifted gauge does not stay up for a model that is gone.
    pub fn forget_drift<'a>(
        &self,
        model: &str,
        version: u64,
        features: impl Iterator<Item = &'a str>,
    ) {
        for feature in features {
            let labels = FeatureLabels {
                model: model.to_string(),
                version: version.to_string(),
                feature: feature.to_string(),
            };
            self.drift_ks.remove(&labels);
            self.drift_psi.remove(&labels);
            self.drifted.remove(&labels);
        }
    }

    /// One control-plane refresh began.
    pub fn config_refreshed(&self) {
        self.config_refreshes.inc();
    }

    /// Sampled requests the store or the sink had to drop.
    pub fn request_log_dropped(&self) -> Counter {
        self.request_log_dropped.clone()
    }

    /// An inference request the server's limits turned away (`in_flight_limit`,
    /// `deadline` or `body_timeout`).
    /// One exchange with the cluster's Redis; `replicas` whose counts are summed.
    pub fn cluster_synced(&self, ok: bool, replicas: Option<usize>) {
        let outcome = if ok { "ok" } else { "failed" };
        self.cluster_syncs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.cluster_up.set(i64::from(ok));
        if let Some(replicas) = replicas {
            self.cluster_replicas
                .set(i64::try_from(replicas).unwrap_or(i64::MAX));
        }
    }

    /// Feedback that went between replicas.
    pub fn cluster_feedback(&self, outcome: &'static str) {
        self.cluster_feedback
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn turned_away(&self, reason: &'static str) {
        self.turned_away
            .get_or_create(&OverloadLabels { reason })
            .inc();
    }

    /// Exports the spending of model versions and variants (kept by the telemetry hub
    /// whether or not metrics are on).
    pub(super) fn export(&mut self, spendings: &super::Spendings) {
        spendings.register(&mut self.registry);
    }

    /// Every metric in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of the scrape (what Prometheus stores as series), as text.
    fn series(metrics: &Metrics) -> Vec<String> {
        let text = metrics.encode().unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    fn request(endpoint: &str, variant: &str, version: &str) -> RequestLabels {
        RequestLabels {
            endpoint: endpoint.to_string(),
            variant: variant.to_string(),
            model: "iris".to_string(),
            version: version.to_string(),
            status: "200".to_string(),
        }
    }

    #[test]
    fn the_series_of_what_is_gone_go_with_it() {
        let metrics = Metrics::default();
        let baseline = series(&metrics).len();
        metrics.know_model("iris", [2, 3]);
        let on = ["on".to_string()];
        metrics.know_endpoint("ab", ["a", "b"], [("f", &on[..])]);
        let took = Duration::from_millis(1);
        for version in [2, 3] {
            metrics.scheduling_meters("iris", version);
            metrics.inference_seconds("iris", version).observe(took);
            metrics.model_crashes("iris", version).inc();
            metrics.answered(request("iris", "", &version.to_string()), took);
        }
        metrics.answered(request("ab", "a", "2"), took);
        metrics.answered(request("ab", "b", "2"), took);
        metrics.queue_seconds("ab").observe(took);
        metrics.variant_failed("ab", "b", VariantFailure::Timeout);
        metrics.shadow_compared("ab", "b", ShadowOutcome::Agreed);
        metrics.shadow_dropped("ab", "b");
        metrics.flag_evaluated("ab", "f", "on");
        metrics.flag_evaluated("ab", "g", "x");
        let has = |needle: &str| series(&metrics).iter().any(|s| s.contains(needle));

        metrics.forget_version("iris", 3);
        assert!(!has("version=\"3\""));
        assert!(has("version=\"2\""));
        // A request that was running on it as it went does not bring its series back.
        metrics.answered(request("iris", "", "3"), took);
        assert!(!has("version=\"3\""));

        // A flag the endpoint no longer declares.
        metrics.know_endpoint("ab", ["a", "b"], []);
        assert!(!has("flag=\"f\""));
        assert!(has("flag=\"other\""));

        metrics.forget_variant("ab", "b");
        assert!(!has("variant=\"b\""));
        assert!(has("variant=\"a\""));
        metrics.answered(request("ab", "b", "2"), took);
        metrics.variant_failed("ab", "b", VariantFailure::Error);
        assert!(!has("variant=\"b\""));

        metrics.forget_endpoint("ab", ["a"].into_iter());
        assert!(!has("endpoint=\"ab\""));
        metrics.forget_version("iris", 2);
        metrics.forget_model("iris");
        assert_eq!(series(&metrics).len(), baseline, "{:#?}", series(&metrics));

        // Requests no longer name what is gone: they count as unknown.
        metrics.answered(request("iris", "", "2"), took);
        assert!(has("endpoint=\"unknown\""));
        assert!(!has("endpoint=\"iris\""));
    }
}
