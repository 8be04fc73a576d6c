//! One answer of an endpoint: a slot among the inference slots, then, on the blocking pool,
//! flags, routing and the chosen variant; the outcome counted against that variant, its
//! shadows queued, and the answer remembered for feedback. Also the slot-bounded run of a
//! bare model.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::attempt::Attempt;
use super::request::{InferError, InferRequest, InferResponse, model_failed, shutting_down};
use super::route::{Flagged, Routing, evaluate_flags, route};
use super::shadow::{ShadowJob, ShadowQueue};
use super::variant::{observed, serve_variant};
use crate::endpoint::{Endpoint, FeedbackBook, Memo, predictions};
use crate::plugins::RequestContext;
use crate::registry::{LoadedVersion, LookupError, ModelRepository};
use crate::telemetry::VariantFailure;
use crate::tensor::Tensor;

/// What answering needs, shared by every request.
pub(super) struct Answering {
    pub(super) repository: Arc<ModelRepository>,
    /// Answers remembered for the feedback API.
    pub(super) feedback: Arc<FeedbackBook>,
    slots: Arc<Semaphore>,
    /// Runs past their latency budget a variant may have going before its requests go
    /// straight to the fallback: what bounds the work nobody waits for. Half the inference
    /// slots (at least one), so that abandoned runs, which cannot be stopped, leave cores
    /// for the answers clients do wait for.
    past_budget_limit: usize,
    shadows: Arc<ShadowQueue>,
}

/// One run of `answer`: the request, and what it brings along.
pub(super) struct Run {
    /// When it began waiting for its slot: its queue time and its latency count from here.
    pub(super) since: Instant,
    /// The variant to run; `None` asks the router.
    pub(super) variant: Option<usize>,
    pub(super) ctx: RequestContext,
    pub(super) request: InferRequest,
    /// A slot handed over by a run the budget gave up on.
    pub(super) slot: Option<OwnedSemaphorePermit>,
    /// The request's flags, shared by the routed run and its fallback.
    pub(super) flagged: Option<Arc<OnceLock<Flagged>>>,
    /// Set when a latency budget may give up on this run.
    pub(super) attempt: Option<Arc<Attempt>>,
}

impl Run {
    pub(super) fn routed(ctx: RequestContext, request: InferRequest) -> Run {
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
pub(super) struct Answered {
    pub(super) variant: usize,
    pub(super) reason: String,
    pub(super) shadows: Vec<usize>,
    /// The flags evaluated for the request.
    pub(super) flags: Flagged,
    pub(super) result: Result<InferResponse, InferError>,
}

impl Answered {
    /// A request that failed before any variant answered.
    pub(super) fn failed(variant: usize, reason: &str, error: InferError) -> Answered {
        Answered {
            variant,
            reason: reason.to_string(),
            shadows: Vec::new(),
            flags: Vec::new(),
            result: Err(error),
        }
    }
}

impl Answering {
    pub(super) fn new(
        repository: Arc<ModelRepository>,
        feedback: FeedbackBook,
        parallelism: usize,
        shadow_queue: usize,
    ) -> Answering {
        Answering {
            shadows: Arc::new(ShadowQueue::start(shadow_queue, repository.clone())),
            repository,
            feedback: Arc::new(feedback),
            slots: Arc::new(Semaphore::new(parallelism.max(1))),
            past_budget_limit: (parallelism / 2).max(1),
        }
    }

    /// Flags, router (unless the run names its variant), processors and model for one
    /// request, on the blocking pool; shadows are queued once the answer is there.
    pub(super) async fn answer(&self, endpoint: &Arc<Endpoint>, run: Run) -> Answered {
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
            (None, None) => match self.slot(&endpoint.name, request.deadline).await {
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
                serving.charge(chosen, started.elapsed(), VariantFailure::Refused);
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
            match &result {
                Ok(_) => chosen.stats.record(started.elapsed(), false),
                Err(error) => serving.charge(chosen, started.elapsed(), error.failure()),
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
                    endpoint.charge(charged, started.elapsed(), VariantFailure::Error);
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
                predictions: predictions(&response.outputs),
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

    /// A slot, waited for until `deadline` at most.
    pub(super) async fn slot(
        &self,
        what: &str,
        deadline: Option<Instant>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, InferError> {
        let since = Instant::now();
        let acquire = self.slots.clone().acquire_owned();
        let acquired = match deadline {
            None => acquire.await,
            Some(deadline) => tokio::time::timeout_at(deadline.into(), acquire)
                .await
                .map_err(|_| InferError::Busy {
                    what: what.to_string(),
                    waited_ms: since.elapsed().as_millis(),
                })?,
        };
        acquired.map_err(|_| shutting_down(what))
    }

    pub(super) async fn run(
        &self,
        target: &Arc<LoadedVersion>,
        inputs: Vec<Tensor>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Tensor>, InferError> {
        let inputs = observed(target, inputs);
        let outputs = target.runner.run(inputs, &self.slots, deadline).await;
        outputs.map_err(|failure| model_failed(target, failure))
    }
}
