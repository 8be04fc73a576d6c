//! One request's way through the host, after HTTP has decoded it and before HTTP encodes
//! the answer. For an endpoint: flags → flag routing or router → preprocessors → model →
//! postprocessors, with the variant's counters updated at the end, shadows queued and the
//! decision logged; for a bare model: the model alone.
//! The model runs off the async reactor, at most one run per inference slot; plugin calls
//! run inline, each bounded by its CPU deadline.
//!
//! Owns: the order of those steps, failure policies, per-variant statistics, routing state
//! and the concurrency limit on model runs. Must not touch: wire formats (http), how models are
//! found on disk (registry), how models or plugins run (backend, plugins).

mod context;
mod endpoints;
mod experiment;
mod feedback;
mod performance;
mod sampling;
mod shadow;
mod stats;
mod strategy;
mod validate;

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::backend;
use crate::config::ProcessorFailure;
use crate::plugins::Library;
use crate::registry::{LoadedVersion, LookupError, ModelRepository};
use crate::telemetry::{self, Change};
use crate::tensor::Tensor;
use sampling::{Outcome, Sampled};

pub use endpoints::{Build, Endpoint, EndpointSet, Variant};
pub use experiment::{Comparison, compare};
pub use feedback::Feedback;
use feedback::{FeedbackBook, Memo};
pub use performance::LABELLED_ROWS;
use shadow::{ShadowJob, ShadowQueue};
pub use stats::{StatsBook, StatsSnapshot};
pub use strategy::{ActError, DecisionRecord};

/// A decoded inference request.
#[derive(Clone, Debug, Default)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    /// The outputs wanted, in the order wanted; `None` for all of them.
    pub outputs: Option<Vec<String>>,
    /// The request's OIP `parameters` with scalar values, as text: plugins see them as
    /// attributes (`targeting_key` becomes the targeting key).
    pub parameters: Vec<(String, String)>,
    /// The W3C trace the request belongs to, for the request log.
    pub trace_id: Option<String>,
}

/// What the model answered, ready to encode.
#[derive(Debug)]
pub struct InferResponse {
    /// The name the client called: the model's, or the endpoint's.
    pub model: String,
    /// The model that ran: for an endpoint, the answering variant's.
    pub source_model: String,
    pub version: u64,
    pub id: Option<String>,
    pub outputs: Vec<Tensor>,
    /// The endpoint variant that answered, if an endpoint was called.
    pub variant: Option<String>,
    /// Whether the endpoint's fallback variant answered because the routed one failed or
    /// was too slow.
    pub fallback: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// The request does not fit the model; the message says where.
    #[error("{0}")]
    Invalid(String),
    #[error("model '{model}' version {version} failed to run: {reason}")]
    Backend {
        model: String,
        version: u64,
        reason: String,
    },
    /// A processor failed and the endpoint's policy is to fail the request.
    #[error("endpoint '{endpoint}': {reason}")]
    Plugin { endpoint: String, reason: String },
    /// Any of the above, from the endpoint variant that was serving the request.
    #[error("{error}")]
    Variant {
        variant: String,
        error: Box<InferError>,
    },
}

/// Looks a request header up by lowercase name.
pub type Headers<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

pub struct Pipeline {
    repository: Arc<ModelRepository>,
    endpoints: ArcSwap<EndpointSet>,
    plugins: ArcSwap<Library>,
    stats: StatsBook,
    feedback: Arc<FeedbackBook>,
    slots: Arc<Semaphore>,
    shadows: Arc<ShadowQueue>,
    /// Where each request's seed comes from: seeded from the configuration when a test or
    /// an investigation needs the same decisions again.
    seeds: std::sync::Mutex<fastrand::Rng>,
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

/// Milliseconds since the Unix epoch: the time plugins are told.
pub use crate::telemetry::now_ms;

/// Which variant answers a request, and why.
struct Routing {
    index: usize,
    shadows: Vec<usize>,
    reason: String,
}

/// What `answer` did: the variant that served, why it was chosen, and the outcome.
struct Answered {
    variant: usize,
    reason: String,
    shadows: Vec<usize>,
    /// The flags evaluated for the request: (flag, variant).
    flags: Vec<(String, String)>,
    result: Result<InferResponse, InferError>,
}

impl Pipeline {
    pub fn new(repository: Arc<ModelRepository>, options: Options) -> Pipeline {
        Pipeline {
            shadows: Arc::new(ShadowQueue::start(options.shadow_queue, repository.clone())),
            seeds: std::sync::Mutex::new(match options.seed {
                Some(seed) => fastrand::Rng::with_seed(seed),
                None => fastrand::Rng::new(),
            }),
            repository,
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            plugins: ArcSwap::from_pointee(Library::default()),
            stats: StatsBook::default(),
            feedback: Arc::new(FeedbackBook::new(
                options.feedback_memory,
                u64::try_from(options.performance_bucket.as_millis()).unwrap_or(u64::MAX),
            )),
            slots: Arc::new(Semaphore::new(options.parallelism.max(1))),
        }
    }

    pub fn repository(&self) -> &Arc<ModelRepository> {
        &self.repository
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
        self.feedback.score(endpoint, id, reward, labels)
    }

    /// A fresh request id, for requests that came without one.
    pub fn new_id(&self) -> String {
        self.feedback.host_id()
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
        request: InferRequest,
        headers: Headers<'_>,
    ) -> Result<InferResponse, InferError> {
        if version.is_none() {
            let endpoints = self.endpoints.load();
            if let Some(endpoint) = endpoints.endpoints.get(name) {
                let endpoint = endpoint.clone();
                drop(endpoints);
                return self.infer_endpoint(endpoint, request, headers).await;
            }
            if let Some(error) = endpoints.errors.get(name) {
                return Err(LookupError::Unavailable(format!(
                    "endpoint '{name}' is not serving: {error}"
                ))
                .into());
            }
        }
        let sampled = Sampled::start(&request.inputs);
        let (id, trace_id) = (request.id.clone(), request.trace_id.clone());
        let result = self.infer_model(name, version, request).await;
        if let Some(sampled) = sampled {
            sampled.finish(Outcome {
                id: id.unwrap_or_default(),
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
        let target = self.repository.snapshot()?.resolve(name, version)?;
        validate::inputs(&target, &request.inputs)?;
        let wanted = request
            .outputs
            .map(|requested| {
                let names: Vec<&str> = target.outputs.iter().map(|s| s.name.as_str()).collect();
                let owner = format!("model '{}' version {}", target.model, target.version);
                validate::output_names(&owner, &names, requested)
            })
            .transpose()?;
        let outputs = self.run(&target, request.inputs).await?;
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
        request: InferRequest,
        headers: Headers<'_>,
    ) -> Result<InferResponse, InferError> {
        let started = Instant::now();
        let sampled = Sampled::start(&request.inputs);
        let trace_id = request.trace_id.clone();
        // Every answer of an endpoint has an id, so that feedback can name it.
        let id = request
            .id
            .clone()
            .unwrap_or_else(|| self.feedback.host_id());
        let seed = self
            .seeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .u64(..);
        let ctx = context::build(&endpoint, id.clone(), seed, &request, headers);
        let at_ms = ctx.now_ms;
        let (answered, fallback) = self.answer_or_fall_back(&endpoint, ctx, request).await;
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
        result.map_err(|error| InferError::Variant {
            variant: variant.clone(),
            error: Box::new(error),
        })
    }

    /// The routed variant's answer, or the fallback's when that one fails or is over
    /// budget; and whether the fallback answered.
    async fn answer_or_fall_back(
        &self,
        endpoint: &Arc<Endpoint>,
        ctx: crate::plugins::RequestContext,
        request: InferRequest,
    ) -> (Answered, bool) {
        let Some(fallback) = endpoint.fallback else {
            return (self.answer(endpoint, None, ctx, request).await, false);
        };
        // The fallback may need the request again.
        let spare = (request.clone(), ctx.clone());
        let primary = self.answer(endpoint, None, ctx, request);
        // `Err(budget)` when the primary had no answer within it.
        let outcome = match endpoint.latency_budget {
            Some(budget) => tokio::time::timeout(budget, primary)
                .await
                .map_err(|_| budget),
            None => Ok(primary.await),
        };
        let (failed, why) = match outcome {
            Ok(answered) if answered.result.is_ok() => return (answered, false),
            Ok(answered) => {
                // What was routed and why stays in the record beside the fallback.
                let why = format!(
                    "'{}' ({}) failed: {}",
                    endpoint.variants[answered.variant].name,
                    answered.reason,
                    answered
                        .result
                        .as_ref()
                        .err()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                );
                (Some(answered), why)
            }
            Err(budget) => (
                None,
                format!("no answer within the {} ms budget", budget.as_millis()),
            ),
        };
        if let Some(failed) = failed.filter(|f| f.variant == fallback) {
            let reason = format!("the fallback variant itself failed: {why}");
            return (
                Answered {
                    result: Err(InferError::Plugin {
                        endpoint: endpoint.name.clone(),
                        reason,
                    }),
                    ..failed
                },
                false,
            );
        }
        tracing::warn!(endpoint = %endpoint.name, fallback = %endpoint.variants[fallback].name, reason = %why, "answering from the fallback variant");
        let (request, ctx) = spare;
        let answered = self.answer(endpoint, Some(fallback), ctx, request).await;
        let result = answered.result.map(|response| InferResponse {
            fallback: true,
            ..response
        });
        let answered = Answered {
            reason: format!("fallback: {why}"),
            result,
            ..answered
        };
        (answered, true)
    }

    /// Flags, router (unless `variant` is forced), processors and model for one request, on
    /// the blocking pool; shadows are queued once the answer is there.
    async fn answer(
        &self,
        endpoint: &Arc<Endpoint>,
        variant: Option<usize>,
        ctx: crate::plugins::RequestContext,
        request: InferRequest,
    ) -> Answered {
        let started = Instant::now();
        let default = endpoint.default_variant;
        let failed = |reason: String, result: InferError| Answered {
            variant: variant.unwrap_or(default),
            reason,
            shadows: Vec::new(),
            flags: Vec::new(),
            result: Err(result),
        };
        let queued = Instant::now();
        let slot = match self.slot(&endpoint.name).await {
            Ok(slot) => slot,
            Err(error) => return failed("not served".to_string(), error),
        };
        let (serving, repository) = (endpoint.clone(), self.repository.clone());
        let shadows = self.shadows.clone();
        let id = ctx.id.clone();
        let segment = endpoint.segment_by.as_ref().and_then(|attribute| {
            ctx.attributes
                .iter()
                .find(|(k, _)| k == attribute)
                .map(|(_, v)| v.clone())
        });
        let at_ms = ctx.now_ms;
        let span = tracing::Span::current();
        // Plugins and model run together on the blocking pool: one hand-off per request,
        // and WASI's blocking host calls (a guest writing a panic message, say) may block
        // there, which they may not on the reactor.
        let answered = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let _span = span.enter();
            if let Some(seconds) = &serving.queue_seconds {
                seconds.observe(queued.elapsed());
            }
            let mut ctx = ctx;
            let flags = evaluate_flags(&serving, &mut ctx);
            let routing = match variant {
                Some(index) => Routing {
                    index,
                    shadows: Vec::new(),
                    reason: "fallback variant".to_string(),
                },
                None => route(&serving, &ctx),
            };
            let chosen = &serving.variants[routing.index];
            let inputs = (!routing.shadows.is_empty()).then(|| Arc::new(request.inputs.clone()));
            let result = serve_variant(&repository, &serving, chosen, &ctx, request);
            chosen.stats.record(started.elapsed(), result.is_err());
            if let (Some(inputs), Ok(response)) = (inputs, &result) {
                let primary = Arc::new(response.outputs.clone());
                for &shadow in &routing.shadows {
                    shadows.submit(ShadowJob {
                        endpoint: serving.clone(),
                        variant: shadow,
                        ctx: ctx.clone(),
                        inputs: inputs.clone(),
                        primary: primary.clone(),
                        span: tracing::Span::current(),
                    });
                }
            }
            Answered {
                variant: routing.index,
                reason: routing.reason,
                shadows: routing.shadows,
                flags,
                result,
            }
        })
        .await;
        let answered = match answered {
            Ok(answered) => answered,
            Err(join) => {
                let crashed = InferError::Plugin {
                    endpoint: endpoint.name.clone(),
                    reason: format!("the request crashed ({join})"),
                };
                failed("crashed".to_string(), crashed)
            }
        };
        // Only an answer the client gets is remembered for feedback: when a latency budget
        // gives up on this one, this future is dropped before it gets here.
        if let Ok(response) = &answered.result {
            let chosen = &endpoint.variants[answered.variant];
            let memo = Memo {
                segment,
                predictions: performance::predictions(&response.outputs),
                at_ms,
            };
            self.feedback.remember(
                &id,
                &endpoint.name,
                &chosen.name,
                chosen.stats.clone(),
                memo,
            );
        }
        answered
    }

    async fn slot(&self, what: &str) -> Result<tokio::sync::OwnedSemaphorePermit, InferError> {
        self.slots.clone().acquire_owned().await.map_err(|_| {
            InferError::Lookup(LookupError::Unavailable(format!(
                "the server is shutting down; '{what}' is not served any more"
            )))
        })
    }

    async fn run(
        &self,
        target: &Arc<LoadedVersion>,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, InferError> {
        let queued = Instant::now();
        let slot = self.slot(&target.model).await?;
        let running = target.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let _span = span.enter();
            if let Some(meters) = &running.meters {
                meters.queue.observe(queued.elapsed());
            }
            run_model(&running, inputs)
        })
        .await
        .map_err(|join| InferError::Backend {
            model: target.model.clone(),
            version: target.version,
            reason: format!("the backend crashed ({join})"),
        })?
    }
}

/// The model itself, counted: its inputs join the drift window, its run is timed.
fn run_model(target: &LoadedVersion, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, InferError> {
    if let Some(drift) = &target.drift {
        drift.observe(&inputs);
    }
    let started = Instant::now();
    let result = backend::run(&target.graph, inputs);
    if let Some(meters) = &target.meters {
        meters.inference.observe(started.elapsed());
    }
    result.map_err(|error| InferError::Backend {
        model: target.model.clone(),
        version: target.version,
        reason: error.to_string(),
    })
}

/// The `wanted` outputs, in that order; all of them when nothing was asked for.
fn select(mut outputs: Vec<Tensor>, wanted: Option<Vec<String>>) -> Vec<Tensor> {
    let Some(wanted) = wanted else {
        return outputs;
    };
    wanted
        .into_iter()
        .filter_map(|name| {
            let ix = outputs.iter().position(|t| t.name == name)?;
            Some(outputs.swap_remove(ix))
        })
        .collect()
}

/// Each flags plugin's evaluations, added to the context as attributes `flag.<name>`, and
/// returned as (flag, variant) for the request log; a failing flags plugin leaves its flags
/// unset.
fn evaluate_flags(
    endpoint: &Endpoint,
    ctx: &mut crate::plugins::RequestContext,
) -> Vec<(String, String)> {
    let mut evaluated = Vec::new();
    for flags in &endpoint.flags {
        match flags.pool.evaluate(ctx) {
            Ok(evaluations) => {
                if let Some(metrics) = telemetry::metrics() {
                    for e in &evaluations {
                        // Label values only from what the plugin declared, however it answers.
                        let (flag, variant) = match endpoint.flag_definitions.get(&e.flag) {
                            Some(definition) if definition.variants.contains(&e.variant) => {
                                (e.flag.as_str(), e.variant.as_str())
                            }
                            Some(_) => (e.flag.as_str(), "other"),
                            None => ("other", "other"),
                        };
                        metrics.flag_evaluated(&endpoint.name, flag, variant);
                    }
                }
                for e in evaluations {
                    ctx.attributes
                        .push((format!("flag.{}", e.flag), e.variant.clone()));
                    evaluated.push((e.flag, e.variant));
                }
            }
            Err(error) => {
                tracing::warn!(endpoint = %endpoint.name, %error, "flags plugin failed; its flags are unset")
            }
        }
    }
    evaluated
}

/// The variant for one request: the flag's when the endpoint routes by flag and the flag
/// has a mapped value, else the router's choice, else the default (no router, or it failed).
fn route(endpoint: &Endpoint, ctx: &crate::plugins::RequestContext) -> Routing {
    let default = |reason: String| Routing {
        index: endpoint.default_variant,
        shadows: Vec::new(),
        reason,
    };
    if let Some(by_flag) = &endpoint.flag_route
        && let Some((_, value)) = ctx.attributes.iter().find(|(k, _)| *k == by_flag.attribute)
        && let Some((_, index)) = by_flag.variants.iter().find(|(v, _)| v == value)
    {
        return Routing {
            index: *index,
            shadows: Vec::new(),
            reason: format!("flag {} = {value}", by_flag.flag),
        };
    }
    let Some(router) = &endpoint.router else {
        return default("default variant (no router)".to_string());
    };
    let stats = endpoint.stats();
    let state = endpoint.strategy.load();
    let decision = match router.pool.route(ctx, &stats, &state) {
        Ok(decision) => decision,
        Err(error) => {
            tracing::warn!(endpoint = %endpoint.name, %error, "router failed; using the default variant");
            return default(format!("default variant (router failed: {error})"));
        }
    };
    if let Some(new) = decision.state
        && endpoint.strategy.replace(&state, new)
    {
        telemetry::audit(Change {
            kind: "endpoint.state",
            actor: format!("plugin:{}", router.plugin),
            subject: endpoint.name.clone(),
            endpoint: Some(endpoint.name.clone()),
            from: Some(state.to_string()),
            to: Some(endpoint.strategy.load().to_string()),
            detail: Some(decision.reason.clone()),
        });
    }
    let index_of = |name: &str| endpoint.variants.iter().position(|v| v.name == name);
    let Some(index) = index_of(&decision.primary) else {
        tracing::warn!(endpoint = %endpoint.name, plugin = %router.plugin, primary = %decision.primary, "router chose an unknown variant; using the default");
        return default(format!(
            "default variant (router chose unknown '{}')",
            decision.primary
        ));
    };
    Routing {
        index,
        shadows: decision
            .shadows
            .iter()
            .filter_map(|s| index_of(s))
            .filter(|&s| s != index)
            .collect(),
        reason: decision.reason,
    }
}

/// Flags, preprocessors, the variant's model and postprocessors, on a blocking thread.
fn serve_variant(
    repository: &ModelRepository,
    endpoint: &Endpoint,
    variant: &Variant,
    ctx: &crate::plugins::RequestContext,
    request: InferRequest,
) -> Result<InferResponse, InferError> {
    let mut inputs = request.inputs;
    for processor in &endpoint.processors {
        inputs = process(endpoint, inputs, |t| processor.pool.preprocess(ctx, t))?;
    }
    let version = variant.version.map(|v| v.to_string());
    let target = repository
        .snapshot()?
        .resolve(&variant.model, version.as_deref())?;
    validate::inputs(&target, &inputs)?;
    let mut outputs = run_model(&target, inputs)?;
    for processor in endpoint.processors.iter().rev() {
        outputs = process(endpoint, outputs, |t| processor.pool.postprocess(ctx, t))?;
    }
    let wanted = request
        .outputs
        .map(|requested| {
            let names: Vec<&str> = outputs.iter().map(|t| t.name.as_str()).collect();
            validate::output_names(&format!("endpoint '{}'", endpoint.name), &names, requested)
        })
        .transpose()?;
    Ok(InferResponse {
        model: endpoint.name.clone(),
        source_model: target.model.clone(),
        version: target.version,
        id: Some(ctx.id.clone()),
        outputs: select(outputs, wanted),
        variant: Some(variant.name.clone()),
        fallback: false,
    })
}

/// One processor step, with the endpoint's failure policy.
fn process(
    endpoint: &Endpoint,
    tensors: Vec<Tensor>,
    step: impl FnOnce(
        &[crate::plugins::Tensor],
    ) -> Result<Vec<crate::plugins::Tensor>, crate::plugins::PluginError>,
) -> Result<Vec<Tensor>, InferError> {
    let keep =
        (endpoint.on_processor_error == ProcessorFailure::PassThrough).then(|| tensors.clone());
    let result = step(&context::to_plugin(tensors))
        .map_err(|e| e.to_string())
        .and_then(context::from_plugin);
    match (result, keep) {
        (Ok(tensors), _) => Ok(tensors),
        (Err(reason), Some(kept)) => {
            tracing::warn!(endpoint = %endpoint.name, %reason, "processor failed; passing the tensors through");
            Ok(kept)
        }
        (Err(reason), None) => Err(InferError::Plugin {
            endpoint: endpoint.name.clone(),
            reason,
        }),
    }
}
