//! One request's way through the host, after HTTP has decoded it and before HTTP encodes
//! the answer. For an endpoint: flags → flag routing or router → preprocessors → model →
//! postprocessors, with the variant's counters updated at the end, shadows queued and the
//! decision logged; for a bare model: the model alone.
//! Plugins and model run together on the blocking pool, off the async reactor, at most one
//! request per inference slot; each plugin call is bounded by its own CPU deadline. A
//! failure anywhere — a plugin, the model, a crash of the backend, a missed latency
//! budget — is charged to the variant that was serving, before any fallback answers.
//!
//! Owns: the order of those steps, failure policies (fallback and latency budget included),
//! per-variant statistics, routing state and the concurrency limit on model runs. Must not touch: wire formats (http), how models are
//! found on disk (registry), how models or plugins run (backend, plugins).

mod attempt;
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

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ProcessorFailure;
use crate::plugins::{Direction, Library};
use crate::registry::{LoadedVersion, LookupError, ModelRepository};
use crate::runner::RunFailure;
use crate::telemetry::{self, Change, VariantFailure};
use crate::tensor::Tensor;
use attempt::{Abandoned, Attempt};
use sampling::{Outcome, Sampled};

pub use endpoints::{Bound, Build, Endpoint, EndpointSet, RunFailures, Variant};
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
    /// The backend panicked running the model; caught, and this run alone failed.
    #[error("model '{model}' version {version} failed to run: the backend crashed ({panic})")]
    Crashed {
        model: String,
        version: u64,
        panic: String,
    },
    /// The model's queue is full, or the request's timeout passed while it waited: 503,
    /// to be retried.
    #[error("model '{model}' version {version} is overloaded: {reason}")]
    Overloaded {
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

impl InferError {
    /// How a variant that failed this way is charged.
    fn failure(&self) -> VariantFailure {
        match self {
            InferError::Crashed { .. } => VariantFailure::Crash,
            InferError::Overloaded { .. } => VariantFailure::Refused,
            _ => VariantFailure::Error,
        }
    }
}

/// Counts a failure charged to `variant` in the metrics; its statistics are recorded where
/// the failure is known, with the time it took.
fn charge(endpoint: &Endpoint, variant: &Variant, failure: VariantFailure) {
    if let Some(metrics) = telemetry::metrics() {
        metrics.variant_failed(&endpoint.name, &variant.name, failure);
    }
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
    /// Runs past their latency budget a variant may have going before its requests go
    /// straight to the fallback: what bounds the work nobody waits for. Half the inference
    /// slots (at least one), so that abandoned runs, which cannot be stopped, leave cores
    /// for the answers clients do wait for.
    past_budget_limit: usize,
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

/// The flags evaluated for a request: (flag, variant).
type Flagged = Vec<(String, String)>;

/// One run of `answer`: the request, and what it brings along.
struct Run {
    /// When it began waiting for its slot: its queue time and its latency count from here.
    since: Instant,
    /// The variant to run; `None` asks the router.
    variant: Option<usize>,
    ctx: crate::plugins::RequestContext,
    request: InferRequest,
    /// A slot handed over by a run the budget gave up on.
    slot: Option<OwnedSemaphorePermit>,
    /// The request's flags, shared by the routed run and its fallback.
    flagged: Option<Arc<OnceLock<Flagged>>>,
    /// Set when a latency budget may give up on this run.
    attempt: Option<Arc<Attempt>>,
}

impl Run {
    fn routed(ctx: crate::plugins::RequestContext, request: InferRequest) -> Run {
        Run {
            since: Instant::now(),
            variant: None,
            ctx,
            request,
            slot: None,
            flagged: None,
            attempt: None,
        }
    }
}

/// What `answer` did: the variant that served, why it was chosen, and the outcome.
struct Answered {
    variant: usize,
    reason: String,
    shadows: Vec<usize>,
    /// The flags evaluated for the request.
    flags: Flagged,
    result: Result<InferResponse, InferError>,
}

impl Answered {
    /// A request that failed before any variant answered.
    fn failed(variant: usize, reason: &str, error: InferError) -> Answered {
        Answered {
            variant,
            reason: reason.to_string(),
            shadows: Vec::new(),
            flags: Vec::new(),
            result: Err(error),
        }
    }
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
            past_budget_limit: (options.parallelism / 2).max(1),
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
        let deadline = queue_deadline(&request.parameters)?;
        let outputs = self.run(&target, request.inputs, deadline).await?;
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
            return (
                self.answer(endpoint, Run::routed(ctx, request)).await,
                false,
            );
        };
        let since = Instant::now();
        let deadline = endpoint
            .latency_budget
            .map(|budget| (budget, tokio::time::Instant::from_std(since) + budget));
        // The request's one slot: the routed run holds it, the fallback inherits it.
        let slot = match self.slot(&endpoint.name).await {
            Ok(slot) => slot,
            Err(error) => return (Answered::failed(fallback, "not served", error), false),
        };
        // The fallback may need the request again, and the flags the primary evaluated.
        let (spare_request, spare_ctx) = (request.clone(), ctx.clone());
        let flagged = Arc::new(OnceLock::new());
        let fall_back = |why: String, slot: Option<OwnedSemaphorePermit>| {
            let run = Run {
                variant: Some(fallback),
                slot,
                flagged: Some(flagged.clone()),
                ..Run::routed(spare_ctx, spare_request)
            };
            self.fall_back(endpoint, why, run)
        };
        if let Some((budget, at)) = deadline
            && tokio::time::Instant::now() >= at
        {
            // Its whole budget went waiting for a slot: no variant ran, none is charged.
            let why = format!("no slot within the {} ms budget", budget.as_millis());
            return (fall_back(why, Some(slot)).await, true);
        }
        let attempt = Arc::new(Attempt::new(slot, fallback));
        let run = Run {
            since,
            flagged: Some(flagged.clone()),
            attempt: Some(attempt.clone()),
            ..Run::routed(ctx, request)
        };
        let mut primary = Box::pin(self.answer(endpoint, run));
        let answered = match deadline {
            None => primary.await,
            Some((budget, at)) => tokio::select! {
                answered = &mut primary => answered,
                () = tokio::time::sleep_until(at) => match attempt.abandon(endpoint, budget) {
                    // It finished just now, or it is the fallback's own run: wait for it.
                    Abandoned::No => primary.await,
                    Abandoned::Yes { routed, slot } => {
                        drop(primary);
                        let why = match routed {
                            Some(v) => format!(
                                "'{}' gave no answer within the {} ms budget",
                                endpoint.variants[v].name,
                                budget.as_millis()
                            ),
                            None => format!("no answer within the {} ms budget", budget.as_millis()),
                        };
                        return (fall_back(why, slot).await, true);
                    }
                },
            },
        };
        if answered.result.is_ok() {
            return (answered, false);
        }
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
        if answered.variant == fallback {
            let reason = format!("the fallback variant itself failed: {why}");
            return (
                Answered {
                    result: Err(InferError::Plugin {
                        endpoint: endpoint.name.clone(),
                        reason,
                    }),
                    ..answered
                },
                false,
            );
        }
        (fall_back(why, attempt.take_slot()).await, true)
    }

    /// The fallback variant's answer for a request whose routed variant failed (`why`).
    async fn fall_back(&self, endpoint: &Arc<Endpoint>, why: String, run: Run) -> Answered {
        let fallback = run
            .variant
            .map_or("", |v| endpoint.variants[v].name.as_str());
        tracing::warn!(endpoint = %endpoint.name, %fallback, reason = %why, "answering from the fallback variant");
        let answered = self.answer(endpoint, run).await;
        Answered {
            reason: format!("fallback: {why}"),
            result: answered.result.map(|response| InferResponse {
                fallback: true,
                ..response
            }),
            ..answered
        }
    }

    /// Flags, router (unless the run names its variant), processors and model for one
    /// request, on the blocking pool; shadows are queued once the answer is there.
    async fn answer(&self, endpoint: &Arc<Endpoint>, run: Run) -> Answered {
        let Run {
            since: started,
            variant,
            ctx,
            request,
            slot,
            flagged,
            attempt,
        } = run;
        let default = variant.unwrap_or(endpoint.default_variant);
        let failed =
            move |reason: &str, result: InferError| Answered::failed(default, reason, result);
        // A routed run with a fallback keeps its slot in its attempt, for the fallback.
        let slot = match (slot, &attempt) {
            (_, Some(_)) => None,
            (Some(slot), None) => Some(slot),
            (None, None) => match self.slot(&endpoint.name).await {
                Ok(slot) => Some(slot),
                Err(error) => return failed("not served", error),
            },
        };
        let (serving, repository) = (endpoint.clone(), self.repository.clone());
        let shadows = self.shadows.clone();
        let past_budget_limit = self.past_budget_limit;
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
        let watched = attempt.clone();
        let answered = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let _span = span.enter();
            if let Some(seconds) = &serving.queue_seconds {
                seconds.observe(started.elapsed());
            }
            let given_up = || {
                failed(
                    "given up on",
                    InferError::Lookup(LookupError::Unavailable(
                        "given up on by the latency budget before it began".to_string(),
                    )),
                )
            };
            // Given up on while it waited for a thread: neither flags nor router run for
            // a request the fallback answers.
            if attempt.as_ref().is_some_and(|a| a.abandoned()) {
                return given_up();
            }
            let mut ctx = ctx;
            // Flags are evaluated once per request, whichever of the routed run and the
            // fallback gets there first; the other waits for the result.
            let flags = match &flagged {
                Some(once) => once
                    .get_or_init(|| evaluate_flags(&serving, &ctx))
                    .clone(),
                None => evaluate_flags(&serving, &ctx),
            };
            ctx.attributes
                .extend(flags.iter().map(|(f, v)| (format!("flag.{f}"), v.clone())));
            let routing = match variant {
                Some(index) => Routing {
                    index,
                    shadows: Vec::new(),
                    reason: "fallback variant".to_string(),
                },
                None => route(&serving, &ctx),
            };
            let chosen = &serving.variants[routing.index];
            let answered = |result| Answered {
                variant: routing.index,
                reason: routing.reason.clone(),
                shadows: routing.shadows.clone(),
                flags: flags.clone(),
                result,
            };
            let finishing = match &attempt {
                Some(attempt) => match attempt.start(&serving, routing.index) {
                    Some(finishing) => Some(finishing),
                    None => return given_up(),
                },
                None => None,
            };
            let running = chosen.stats.past_budget();
            if finishing.is_some() && running >= past_budget_limit {
                // Too slow to take more work: charged, and the fallback answers.
                chosen.stats.record(started.elapsed(), true);
                charge(&serving, chosen, VariantFailure::Refused);
                return answered(Err(InferError::Lookup(LookupError::Unavailable(format!(
                    "variant '{}' has {running} answers past the latency budget still running; not starting another",
                    chosen.name
                )))));
            }
            let inputs = (!routing.shadows.is_empty()).then(|| Arc::new(request.inputs.clone()));
            let result = serve_variant(&repository, &serving, chosen, &ctx, request);
            // An abandoned run was charged its timeout already; it counts nothing more and
            // sends no shadows, since nobody gets its answer.
            if attempt.as_ref().is_some_and(|a| !a.finish(&serving)) {
                return answered(result);
            }
            drop(finishing);
            chosen.stats.record(started.elapsed(), result.is_err());
            if let Err(error) = &result {
                charge(&serving, chosen, error.failure());
            }
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
            answered(result)
        })
        .await;
        let answered = match answered {
            Ok(answered) => answered,
            Err(join) => {
                // A bug of ours, not the model's (a backend panic is caught where it runs):
                // still the routed variant's failed request.
                if let Some(v) = watched.as_ref().and_then(|a| a.routed()).or(variant) {
                    let charged = &endpoint.variants[v];
                    charged.stats.record(started.elapsed(), true);
                    charge(endpoint, charged, VariantFailure::Error);
                }
                let crashed = InferError::Plugin {
                    endpoint: endpoint.name.clone(),
                    reason: format!("the request crashed ({join})"),
                };
                failed("crashed", crashed)
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
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| shutting_down(what))
    }

    async fn run(
        &self,
        target: &Arc<LoadedVersion>,
        inputs: Vec<Tensor>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Tensor>, InferError> {
        if let Some(drift) = &target.drift {
            drift.observe(&inputs);
        }
        target
            .runner
            .run(inputs, &self.slots, deadline)
            .await
            .map_err(|failure| model_failed(target, failure))
    }
}

/// The model itself, from a thread of the inference pool: its inputs join the drift
/// window, then its runner answers (cache, batch, or a run here).
fn run_model(
    target: &LoadedVersion,
    inputs: Vec<Tensor>,
    deadline: Option<Instant>,
) -> Result<Vec<Tensor>, InferError> {
    if let Some(drift) = &target.drift {
        drift.observe(&inputs);
    }
    target
        .runner
        .run_blocking(inputs, deadline)
        .map_err(|failure| model_failed(target, failure))
}

/// A failed model call as the request's error, naming the model and version.
fn model_failed(target: &LoadedVersion, failure: RunFailure) -> InferError {
    let (model, version) = (target.model.clone(), target.version);
    match failure {
        RunFailure::Rejected(reason) => InferError::Invalid(format!(
            "model '{model}' version {version} cannot take this input: {reason}"
        )),
        RunFailure::Failed(reason) => InferError::Backend {
            model,
            version,
            reason,
        },
        RunFailure::Crashed(panic) => InferError::Crashed {
            model,
            version,
            panic,
        },
        RunFailure::ShuttingDown => shutting_down(&model),
        overloaded @ (RunFailure::QueueFull(_) | RunFailure::TimedOut(_)) => {
            tracing::warn!(model = %model, version, reason = %overloaded, "request not run");
            InferError::Overloaded {
                model,
                version,
                reason: overloaded.to_string(),
            }
        }
    }
}

/// No more inference slots: the server is stopping.
fn shutting_down(what: &str) -> InferError {
    InferError::Lookup(LookupError::Unavailable(format!(
        "the server is shutting down; '{what}' is not served any more"
    )))
}

/// The deadline a request's OIP `timeout` parameter (microseconds) sets on its wait in
/// the queue.
fn queue_deadline(parameters: &[(String, String)]) -> Result<Option<Instant>, InferError> {
    let Some((_, timeout)) = parameters.iter().find(|(k, _)| k == "timeout") else {
        return Ok(None);
    };
    let micros: u64 = timeout.parse().map_err(|_| {
        InferError::Invalid(format!(
            "parameter 'timeout' is '{timeout}'; it is a whole number of microseconds"
        ))
    })?;
    Ok(Instant::now().checked_add(std::time::Duration::from_micros(micros)))
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

/// Each flags plugin's evaluations as (flag, variant): the context's attributes
/// `flag.<name>` for routers and processors, and the request log's flags. A failing flags
/// plugin leaves its flags unset.
fn evaluate_flags(endpoint: &Endpoint, ctx: &crate::plugins::RequestContext) -> Flagged {
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
                evaluated.extend(evaluations.into_iter().map(|e| (e.flag, e.variant)));
            }
            Err(error) => {
                tracing::warn!(endpoint = %endpoint.name, plugin = %flags.plugin, %error, "flags plugin failed; its flags are unset")
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
            tracing::warn!(endpoint = %endpoint.name, plugin = %router.plugin, %error, "router failed; using the default variant");
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
        inputs = process(endpoint, processor, Direction::Pre, ctx, inputs)?;
    }
    let version = variant.version.map(|v| v.to_string());
    let target = repository
        .snapshot()?
        .resolve(&variant.model, version.as_deref())?;
    validate::inputs(&target, &inputs)?;
    let deadline = queue_deadline(&request.parameters)?;
    let mut outputs = run_model(&target, inputs, deadline)?;
    for processor in endpoint.processors.iter().rev() {
        outputs = process(endpoint, processor, Direction::Post, ctx, outputs)?;
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

/// One processor step, with the endpoint's failure policy. A failure of any kind — an
/// `err`, a trap, a deadline, tensors that do not fill their shapes — is the plugin's: it
/// is counted against it and logged with its name whichever way the policy goes.
fn process(
    endpoint: &Endpoint,
    processor: &Bound<crate::plugins::ProcessorWorld>,
    direction: Direction,
    ctx: &crate::plugins::RequestContext,
    tensors: Vec<Tensor>,
) -> Result<Vec<Tensor>, InferError> {
    let keep =
        (endpoint.on_processor_error == ProcessorFailure::PassThrough).then(|| tensors.clone());
    let result = processor.pool.process(
        direction,
        ctx,
        &context::to_plugin(tensors),
        context::from_plugin,
    );
    let error = match result {
        Ok(tensors) => return Ok(tensors),
        Err(error) => error.to_string(),
    };
    tracing::warn!(
        endpoint = %endpoint.name, plugin = %processor.plugin, ?direction, %error,
        passed_through = keep.is_some(), "processor failed"
    );
    keep.ok_or(InferError::Plugin {
        endpoint: endpoint.name.clone(),
        reason: error,
    })
}
