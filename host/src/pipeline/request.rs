//! A request on its way through the pipeline: the decoded request, the answer, the errors
//! it can end in, and the rules every path shares (the deadline a request sets, the
//! outputs it asks for, a failed model call as the request's error).

use std::time::{Duration, Instant};

use crate::registry::{LoadedVersion, LookupError};
use crate::runner::RunFailure;
use crate::telemetry::VariantFailure;
use crate::tensor::Tensor;

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
    /// When its client stops waiting: set once, by `Pipeline::deadline`, from the
    /// request's `timeout` parameter and the server's request timeout.
    pub deadline: Option<Instant>,
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
    /// No inference slot came free before the request's deadline: 503, to be retried.
    #[error(
        "'{what}' waited {waited_ms} ms for an inference slot until its deadline passed; the server is busy"
    )]
    Busy { what: String, waited_ms: u128 },
    /// A processor failed and the endpoint's policy is to fail the request.
    #[error("endpoint '{endpoint}': {reason}")]
    Plugin { endpoint: String, reason: String },
    /// Any of the above, charged to what was serving the request: the endpoint variant
    /// (and its model), or the model called by name.
    #[error("{error}")]
    Charged {
        variant: Option<String>,
        model: String,
        error: Box<InferError>,
    },
}

impl InferError {
    /// `error`, charged to `variant` (of an endpoint) and `model`.
    pub(super) fn charged(variant: Option<&str>, model: &str, error: InferError) -> InferError {
        InferError::Charged {
            variant: variant.map(str::to_string),
            model: model.to_string(),
            error: Box::new(error),
        }
    }

    /// How a variant that failed this way is charged.
    pub(super) fn failure(&self) -> VariantFailure {
        match self {
            InferError::Crashed { .. } => VariantFailure::Crash,
            InferError::Overloaded { .. } | InferError::Busy { .. } => VariantFailure::Refused,
            _ => VariantFailure::Error,
        }
    }
}

/// Looks a request header up by lowercase name.
pub type Headers<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// A failed model call as the request's error, naming the model and version.
pub(super) fn model_failed(target: &LoadedVersion, failure: RunFailure) -> InferError {
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
        overloaded @ (RunFailure::QueueFull(_) | RunFailure::TimedOut(_) | RunFailure::Busy(_)) => {
            if let Some(unlogged) = target.runner.may_warn() {
                tracing::warn!(model = %model, version, reason = %overloaded, unlogged, "request not run");
            }
            InferError::Overloaded {
                model,
                version,
                reason: overloaded.to_string(),
            }
        }
    }
}

/// No more inference slots: the server is stopping.
pub(super) fn shutting_down(what: &str) -> InferError {
    InferError::Lookup(LookupError::Unavailable(format!(
        "the server is shutting down; '{what}' is not served any more"
    )))
}

/// When the client stops waiting: after its OIP `timeout` parameter (microseconds) or the
/// server's own limit, whichever is sooner. Queues stop waiting then, and the HTTP layer
/// answers 504 for a run still going.
pub(super) fn deadline(
    parameters: &[(String, String)],
    server: Option<Duration>,
) -> Result<Option<Instant>, InferError> {
    let now = Instant::now();
    let server = server.and_then(|limit| now.checked_add(limit));
    let Some((_, timeout)) = parameters.iter().find(|(k, _)| k == "timeout") else {
        return Ok(server);
    };
    let micros: u64 = timeout.parse().map_err(|_| {
        InferError::Invalid(format!(
            "parameter 'timeout' is '{timeout}'; it is a whole number of microseconds"
        ))
    })?;
    let asked = now.checked_add(Duration::from_micros(micros));
    Ok(match (asked, server) {
        (Some(asked), Some(server)) => Some(asked.min(server)),
        (asked, server) => asked.or(server),
    })
}

/// The `wanted` outputs, in that order; all of them when nothing was asked for.
pub(super) fn select(mut outputs: Vec<Tensor>, wanted: Option<Vec<String>>) -> Vec<Tensor> {
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
