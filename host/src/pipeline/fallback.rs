//! An endpoint with a fallback variant: the routed run holds the request's slot; when it
//! fails, or its latency budget passes first, the fallback variant answers with the same
//! slot, and the record says what was routed and why it was passed over.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::OwnedSemaphorePermit;

use super::answer::{Answered, Answering, Run};
use super::attempt::{Abandoned, Attempt};
use super::request::{InferError, InferRequest, InferResponse};
use crate::endpoint::Endpoint;
use crate::plugins::RequestContext;

/// The routed variant's answer, or the fallback's when that one fails or is over
/// budget; and whether the fallback answered.
pub(super) async fn answer_or_fall_back(
    answering: &Answering,
    endpoint: &Arc<Endpoint>,
    ctx: RequestContext,
    request: InferRequest,
) -> (Answered, bool) {
    let Some(fallback) = endpoint.fallback else {
        return (
            answering.answer(endpoint, Run::routed(ctx, request)).await,
            false,
        );
    };
    let since = Instant::now();
    let deadline = endpoint
        .latency_budget
        .map(|budget| (budget, tokio::time::Instant::from_std(since) + budget));
    // The request's one slot: the routed run holds it, the fallback inherits it.
    let slot = match answering.slot(&endpoint.name, request.deadline).await {
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
        fall_back(answering, endpoint, why, run)
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
    let mut primary = Box::pin(answering.answer(endpoint, run));
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
async fn fall_back(
    answering: &Answering,
    endpoint: &Arc<Endpoint>,
    why: String,
    run: Run,
) -> Answered {
    let fallback = run
        .variant
        .map_or("", |v| endpoint.variants[v].name.as_str());
    tracing::warn!(endpoint = %endpoint.name, %fallback, reason = %why, "answering from the fallback variant");
    let answered = answering.answer(endpoint, run).await;
    Answered {
        reason: format!("fallback: {why}"),
        result: answered.result.map(|response| InferResponse {
            fallback: true,
            ..response
        }),
        ..answered
    }
}
