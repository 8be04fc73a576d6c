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
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::endpoint::{DecisionRecord, Endpoint, EndpointSet, FeedbackBook, StatsBook};
use crate::plugins::Library;
use crate::registry::{LookupError, ModelRepository};
use crate::telemetry::Telemetry;
use answer::Answering;
use request::select;
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
    request_timeout: Option<Duration>,
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
    /// How long a client waits unless its request asks for less; `None`: as long as it
    /// takes.
    pub request_timeout: Option<Duration>,
    /// This replica's name in a cluster, in the ids the server makes up.
    pub replica: Option<String>,
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
            options.replica.as_deref(),
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
            request_timeout: options.request_timeout,
        }
    }

    pub fn repository(&self) -> &Arc<ModelRepository> {
        &self.answering.repository
    }

    pub fn stats(&self) -> &StatsBook {
        &self.stats
    }

    /// The endpoints' answers remembered for the rewards and labels clients send later.
    pub fn feedback(&self) -> &FeedbackBook {
        &self.answering.feedback
    }

    /// The request's id, given one of the server's if it came without: every answer has
    /// an id, so that feedback can name it. Idempotent; the HTTP layer calls it first so
    /// that the id is in every log line of the request.
    pub fn identify<'r>(&self, request: &'r mut InferRequest) -> &'r str {
        request
            .id
            .get_or_insert_with(|| self.answering.feedback.host_id())
    }

    /// When the request's client stops waiting (see `InferRequest::deadline`), settled
    /// the first time it is asked; the HTTP layer asks first, to stop waiting itself.
    pub fn deadline(&self, request: &mut InferRequest) -> Result<Option<Instant>, InferError> {
        if request.deadline.is_none() {
            request.deadline = request::deadline(&request.parameters, self.request_timeout)?;
        }
        Ok(request.deadline)
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
        self.deadline(&mut request)?;
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
        let outputs = self
            .answering
            .run(&target, request.inputs, request.deadline)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{bind, iris, loaded_repository, pipeline};

    const SETOSA: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

    fn no_headers(_: &str) -> Option<String> {
        None
    }

    async fn served() -> (Arc<Pipeline>, Arc<Telemetry>) {
        let telemetry = Telemetry::off();
        let repository = loaded_repository(telemetry.clone()).await;
        (pipeline(repository, telemetry.clone()), telemetry)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bare_model_answers_with_an_id_and_its_newest_version() {
        let (pipeline, _) = served().await;
        let answer = pipeline
            .infer("iris", None, iris(&[SETOSA, SETOSA]), &no_headers)
            .await
            .unwrap();
        assert_eq!((answer.model.as_str(), answer.version), ("iris", 2));
        assert_eq!(answer.variant, None);
        let id = answer.id.unwrap();
        assert!(!id.is_empty());
        let probabilities = &answer.outputs[0];
        assert_eq!(probabilities.shape, vec![2, 3]);
        // An explicit version, and only the outputs asked for.
        let request = InferRequest {
            id: Some("client-7".to_string()),
            outputs: Some(vec![probabilities.name.clone()]),
            ..iris(&[SETOSA])
        };
        let answer = pipeline
            .infer("iris", Some("1"), request, &no_headers)
            .await
            .unwrap();
        assert_eq!(answer.version, 1);
        assert_eq!(answer.id.as_deref(), Some("client-7"));
        assert_eq!(answer.outputs.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_are_charged_to_the_model_that_was_called() {
        let (pipeline, _) = served().await;
        let unknown = pipeline
            .infer("nope", None, iris(&[SETOSA]), &no_headers)
            .await
            .unwrap_err();
        assert!(
            matches!(unknown, InferError::Lookup(LookupError::NotFound(_))),
            "{unknown:?}"
        );
        let mut wrong = iris(&[SETOSA]);
        wrong.inputs[0].shape = vec![4, 1];
        let error = pipeline
            .infer("iris", None, wrong, &no_headers)
            .await
            .unwrap_err();
        match error {
            InferError::Charged {
                variant: None,
                model,
                error,
            } => {
                assert_eq!(model, "iris");
                assert!(matches!(*error, InferError::Invalid(_)), "{error:?}");
            }
            other => panic!("not charged to iris: {other:?}"),
        }
        let timeout = InferRequest {
            parameters: vec![("timeout".to_string(), "soon".to_string())],
            ..iris(&[SETOSA])
        };
        let error = pipeline
            .infer("iris", None, timeout, &no_headers)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("whole number of microseconds"),
            "{error}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_endpoint_answers_from_its_default_variant_and_charges_it() {
        let (pipeline, telemetry) = served().await;
        let set = bind(
            &pipeline,
            &telemetry,
            r#"
            [endpoints.ab]
            variants = { old = "iris@1", new = "iris@2" }
            default_variant = "new"
            [endpoints.broken]
            variants = { a = "iris" }
            default_variant = "b"
            "#,
        );
        assert!(set.errors["broken"].contains("'b' is not one of the variants"));
        let answer = pipeline
            .infer("ab", None, iris(&[SETOSA]), &no_headers)
            .await
            .unwrap();
        assert_eq!(answer.variant.as_deref(), Some("new"));
        assert_eq!((answer.source_model.as_str(), answer.version), ("iris", 2));
        // The answer is remembered for feedback under its id.
        let id = answer.id.unwrap();
        assert!(matches!(
            pipeline.feedback().score("ab", &id, Some(1.0), None),
            crate::endpoint::Feedback::Recorded { .. }
        ));
        let mut wrong = iris(&[SETOSA]);
        wrong.inputs[0].datatype = crate::tensor::DataType::Int64;
        let error = pipeline
            .infer("ab", None, wrong, &no_headers)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, InferError::Charged { variant: Some(v), model, .. } if v == "new" && model == "iris"),
            "{error:?}"
        );
        let new = set.endpoints["ab"]
            .variants
            .iter()
            .find(|v| v.name == "new")
            .unwrap();
        let stats = new.stats.snapshot();
        assert_eq!((stats.requests, stats.errors), (2, 1));
        // An endpoint that cannot serve says why; a version asked for means the model.
        let error = pipeline
            .infer("broken", None, iris(&[SETOSA]), &no_headers)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("endpoint 'broken' is not serving"),
            "{error}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_id_is_the_clients_or_minted_once() {
        let (pipeline, _) = served().await;
        let mut request = iris(&[SETOSA]);
        let minted = pipeline.identify(&mut request).to_string();
        assert_eq!(pipeline.identify(&mut request), minted);
        let mut other = iris(&[SETOSA]);
        assert_ne!(pipeline.identify(&mut other), minted);
        let mut client = InferRequest {
            id: Some("theirs".to_string()),
            ..iris(&[SETOSA])
        };
        assert_eq!(pipeline.identify(&mut client), "theirs");
    }
}
