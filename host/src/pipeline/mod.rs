//! One request's way through the host, after HTTP has decoded it and before HTTP encodes
//! the answer: endpoint lookup → input checks against the model's signature → the model
//! (off the async reactor, at most one run per inference slot) → the requested outputs.
//! Flags, routers and processors slot in between lookup and model as plugins arrive.
//!
//! Owns: the order of those steps and the concurrency limit on model runs. Must not touch:
//! wire formats (http), how models are found on disk (registry), how they run (backend).

mod validate;

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::backend;
use crate::registry::{LoadedVersion, LookupError, ModelRepository};
use crate::tensor::Tensor;

/// A decoded inference request.
#[derive(Debug, Default)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    /// The outputs wanted, in the order wanted; `None` for all of them.
    pub outputs: Option<Vec<String>>,
}

/// What the model answered, ready to encode.
#[derive(Debug)]
pub struct InferResponse {
    pub model: String,
    pub version: u64,
    pub id: Option<String>,
    pub outputs: Vec<Tensor>,
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
}

pub struct Pipeline {
    repository: Arc<ModelRepository>,
    slots: Arc<Semaphore>,
}

impl Pipeline {
    /// `parallelism` model runs at most at once; more wait their turn rather than crowd
    /// the cores.
    pub fn new(repository: Arc<ModelRepository>, parallelism: usize) -> Pipeline {
        Pipeline {
            repository,
            slots: Arc::new(Semaphore::new(parallelism.max(1))),
        }
    }

    pub fn repository(&self) -> &Arc<ModelRepository> {
        &self.repository
    }

    pub async fn infer(
        &self,
        model: &str,
        version: Option<&str>,
        request: InferRequest,
    ) -> Result<InferResponse, InferError> {
        let target = self.repository.snapshot()?.resolve(model, version)?;
        validate::inputs(&target, &request.inputs)?;
        let wanted = validate::outputs(&target, request.outputs)?;
        let mut outputs = self.run(&target, request.inputs).await?;
        let outputs = wanted
            .into_iter()
            .filter_map(|name| {
                let ix = outputs.iter().position(|t| t.name == name)?;
                Some(outputs.swap_remove(ix))
            })
            .collect();
        Ok(InferResponse {
            model: target.model.clone(),
            version: target.version,
            id: request.id,
            outputs,
        })
    }

    async fn run(
        &self,
        target: &Arc<LoadedVersion>,
        inputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, InferError> {
        let failed = |reason: String| InferError::Backend {
            model: target.model.clone(),
            version: target.version,
            reason,
        };
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| failed("the server is shutting down".to_string()))?;
        let running = target.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            backend::run(&running.graph, inputs)
        })
        .await
        .map_err(|join| failed(format!("the backend crashed ({join})")))?
        .map_err(|error| failed(error.to_string()))
    }
}
