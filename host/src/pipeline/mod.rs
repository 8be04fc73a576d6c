//! One request's way through the host, after HTTP has decoded it and before HTTP encodes
//! the answer. For an endpoint: flags → flag routing or router → preprocessors → model →
//! postprocessors, with the variant's counters updated at the end, shadows queued and the
//! decision logged; for a bare model: the model alone.
//!
//! Plugins and model run together on the blocking pool, off the async reactor, at most one
//! request per inference slot (a bare model's runner may run a tiny model inline); each
//! plugin call is bounded by its own CPU deadline. A failure anywhere — a plugin, the
//! model, a crash of the backend, a missed latency budget — is charged to the variant that
//! was serving, before any fallback answers.
//!
//! The files go one way, each using only those below it: `request` (what a request is and
//! can end in) ← `validate`, `context`, `sampling`, `variant` (one variant's steps) ←
//! `shadow` ← `route` ← `answer` (one answer, on a slot) ← `attempt` / `fallback` ← this
//! file (the entry: endpoint or bare model).
//!
//! Owns: the order of those steps, the failure policies (fallback and latency budget), the
//! concurrency limit on model runs. Must not touch: what an endpoint keeps between
//! requests (endpoint), wire formats (http), how models are found on disk (registry), how
//! models or plugins run (backend, runner, plugins).

mod answer;
mod attempt;
mod context;
mod fallback;
mod request;
mod route;
mod sampling;
mod shadow;
mod validate;
mod variant;

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::endpoint::{DecisionRecord, Endpoint, EndpointSet, Feedback, FeedbackBook, StatsBook};
use crate::plugins::Library;
use crate::registry::{LookupError, ModelRepository};
use crate::telemetry::Telemetry;
use answer::Answering;
use request::{queue_deadline, select};
use sampling::{Outcome, Sampled};

pub use request::{Headers, InferError, InferRequest, InferResponse};

pub struct Pipeline {
    answering: Answering,
    endpoints: ArcSwap<EndpointSet>,
    plugins: ArcSwap<Library>,
    stats: StatsBook,
    /// Where each request's seed comes from: seeded from the configuration when a test or
    /// an investigation needs the same decisions again.
    seeds: std::sync::Mutex<fastrand::Rng>,
    telemetry: Arc<Telemetry>,
}

/// How a pipeline is sized.
pub struct Options {
    /// Model runs at once at most; more wait their turn rather than crowd the cores.
    pub parallelism: usize,
    /// Endpoint answers remembered for the feedback API.
    pub feedback_memory: usize,
    /// The width of the time buckets accuracy and reward are reported in.
    pub performance_bucket: std::time::Duration,
    /// Shadow requests waiting at most.
    pub shadow_queue: usize,
    /// Seeds every request's randomness; `None` draws a fresh sequence per run.
    pub seed: Option<u64>,
}

impl Pipeline {
    pub fn new(
        repository: Arc<ModelRepository>,
        options: Options,
        telemetry: Arc<Telemetry>,
    ) -> Pipeline {
        let feedback = FeedbackBook::new(
            options.feedback_memory,
            u64::try_from(options.performance_bucket.as_millis()).unwrap_or(u64::MAX),
        );
        Pipeline {
            answering: Answering::new(
                repository,
                feedback,
                options.parallelism,
                options.shadow_queue,
            ),
            seeds: std::sync::Mutex::new(match options.seed {
                Some(seed) => fastrand::Rng::with_seed(seed),
                None => fastrand::Rng::new(),
            }),
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            plugins: ArcSwap::from_pointee(Library::default()),
            stats: StatsBook::default(),
            telemetry,
        }
    }

    pub fn repository(&self) -> &Arc<ModelRepository> {
        &self.answering.repository
    }

    pub fn stats(&self) -> &StatsBook {
        &self.stats
    }

    /// Credits a client's reward, and judges the true labels it sends, to the variant that
    /// answered request `id` of `endpoint`.
    pub fn feedback(
        &self,
        endpoint: &str,
        id: &str,
        reward: Option<f64>,
        labels: Option<&[String]>,
    ) -> Feedback {
        self.answering.feedback.score(endpoint, id, reward, labels)
    }

    /// The request's id, given one of the server's if it came without: every answer has
    /// an id, so that feedback can name it. Idempotent; the HTTP layer calls it first so
    /// that the id is in every log line of the request.
    pub fn identify<'r>(&self, request: &'r mut InferRequest) -> &'r str {
        request
            .id
            .get_or_insert_with(|| self.answering.feedback.host_id())
    }

    pub fn endpoints(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// The plugin files the endpoints were built from.
    pub fn plugins(&self) -> Arc<Library> {
        self.plugins.load_full()
    }

    /// Swaps rebuilt plugins and endpoints in; requests in flight finish on what they took.
    pub fn set_plugins(&self, plugins: Library, endpoints: EndpointSet) {
        self.plugins.store(Arc::new(plugins));
        self.endpoints.store(Arc::new(endpoints));
    }

    /// Serves `name`: an endpoint if one is configured under that name (and no version is
    /// asked for), otherwise the model of that name.
    pub async fn infer(
        &self,
        name: &str,
        version: Option<&str>,
        mut request: InferRequest,
        headers: Headers<'_>,
    ) -> Result<InferResponse, InferError> {
        let id = self.identify(&mut request).to_string();
        if version.is_none() {
            let endpoints = self.endpoints.load();
            if let Some(endpoint) = endpoints.endpoints.get(name) {
                let endpoint = endpoint.clone();
                drop(endpoints);
                return self.infer_endpoint(endpoint, id, request, headers).await;
            }
            if let Some(error) = endpoints.errors.get(name) {
                return Err(LookupError::Unavailable(format!(
                    "endpoint '{name}' is not serving: {error}"
                ))
                .into());
            }
        }
        let sampled = Sampled::start(&self.telemetry, &request.inputs);
        let trace_id = request.trace_id.clone();
        let result = self.infer_model(name, version, request).await;
        if let Some(sampled) = sampled {
            sampled.finish(Outcome {
                id,
                trace_id,
                endpoint: name,
                variant: None,
                reason: None,
                flags: &[],
                result: &result,
            });
        }
        result
    }

    async fn infer_model(
        &self,
        name: &str,
        version: Option<&str>,
        request: InferRequest,
    ) -> Result<InferResponse, InferError> {
        let target = self
            .answering
            .repository
            .snapshot()?
            .resolve(name, version)
            .map_err(|error| match error {
                // A model that exists but cannot answer is charged with it.
                LookupError::Unavailable(_) => InferError::charged(None, name, error.into()),
                not_found => not_found.into(),
            })?;
        let charged = |error| InferError::charged(None, &target.model, error);
        validate::inputs(&target, &request.inputs).map_err(charged)?;
        let wanted = request
            .outputs
            .map(|requested| {
                let names: Vec<&str> = target.outputs.iter().map(|s| s.name.as_str()).collect();
                let owner = format!("model '{}' version {}", target.model, target.version);
                validate::output_names(&owner, &names, requested)
            })
            .transpose()
            .map_err(charged)?;
        let deadline = queue_deadline(&request.parameters).map_err(charged)?;
        let outputs = self
            .answering
            .run(&target, request.inputs, deadline)
            .await
            .map_err(charged)?;
        Ok(InferResponse {
            model: target.model.clone(),
            source_model: target.model.clone(),
            version: target.version,
            id: request.id,
            outputs: select(outputs, wanted),
            variant: None,
            fallback: false,
        })
    }

    async fn infer_endpoint(
        &self,
        endpoint: Arc<Endpoint>,
        id: String,
        request: InferRequest,
        headers: Headers<'_>,
    ) -> Result<InferResponse, InferError> {
        let started = Instant::now();
        let sampled = Sampled::start(&self.telemetry, &request.inputs);
        let trace_id = request.trace_id.clone();
        let seed = self
            .seeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .u64(..);
        let ctx = context::build(&endpoint, id.clone(), seed, &request, headers);
        let at_ms = ctx.now_ms;
        let (answered, fallback) =
            fallback::answer_or_fall_back(&self.answering, &endpoint, ctx, request).await;
        let result = answered.result;
        let variant = &endpoint.variants[answered.variant].name;
        let shadows: Vec<String> = answered
            .shadows
            .iter()
            .map(|&s| endpoint.variants[s].name.clone())
            .collect();
        let status = match &result {
            Ok(_) => "ok",
            Err(_) => "error",
        };
        // Every decision at debug level (`RUST_LOG=modelyard::requests=debug`); the request
        // log proper is the sampled record, which costs nothing for the requests it skips.
        tracing::debug!(
            target: "modelyard::requests",
            endpoint = %endpoint.name, %id, %variant, reason = %answered.reason,
            fallback, ?shadows, status, latency_us = started.elapsed().as_micros() as u64,
            "routed"
        );
        if let Some(sampled) = sampled {
            sampled.finish(Outcome {
                id: id.clone(),
                trace_id,
                endpoint: &endpoint.name,
                variant: Some(variant),
                reason: Some(&answered.reason),
                flags: &answered.flags,
                result: &result,
            });
        }
        endpoint.recent.push(DecisionRecord {
            id,
            at_ms,
            variant: variant.clone(),
            reason: answered.reason,
            shadows,
            fallback,
            ok: result.is_ok(),
        });
        let model = &endpoint.variants[answered.variant].model;
        result.map_err(|error| InferError::charged(Some(variant), model, error))
    }
}
