//! The sampled requests of the request log: which ones (`monitoring.request_sample`),
//! and what is kept of each, handed to telemetry to store and send.

use std::time::Instant;

use super::request::{InferError, InferResponse};
use crate::telemetry::{RequestRecord, Telemetry, now_ms};
use serde_json::value::RawValue;

use crate::tensor::{Tensor, TensorJson};

/// A request picked for the log, from its start.
pub(super) struct Sampled<'t> {
    telemetry: &'t Telemetry,
    started: Instant,
    at_ms: u64,
    payloads: bool,
    inputs: Option<Box<RawValue>>,
}

/// What the pipeline knows of a request once it is answered.
pub(super) struct Outcome<'a> {
    pub id: String,
    pub trace_id: Option<String>,
    pub endpoint: &'a str,
    pub variant: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub flags: &'a [(String, String)],
    pub result: &'a Result<InferResponse, InferError>,
}

/// Tensors as JSON text: kept raw so that an FP32 `5.1` stays `5.1`, not its f64 widening.
fn tensors(tensors: &[Tensor]) -> Option<Box<RawValue>> {
    let objects: Vec<TensorJson> = tensors.iter().map(TensorJson).collect();
    serde_json::value::to_raw_value(&objects).ok()
}

impl<'t> Sampled<'t> {
    /// `Some` when this request is to be recorded; its inputs are copied now, before the
    /// pipeline consumes them, only when payloads are kept.
    pub fn start(telemetry: &'t Telemetry, inputs: &[Tensor]) -> Option<Sampled<'t>> {
        let payloads = telemetry.sample()?;
        Some(Sampled {
            telemetry,
            started: Instant::now(),
            at_ms: now_ms(),
            payloads,
            inputs: if payloads { tensors(inputs) } else { None },
        })
    }

    pub fn finish(self, outcome: Outcome<'_>) {
        let (model, version, outputs, error) = match outcome.result {
            Ok(response) => (
                Some(response.source_model.clone()),
                Some(response.version),
                if self.payloads {
                    tensors(&response.outputs)
                } else {
                    None
                },
                None,
            ),
            Err(error) => (None, None, None, Some(error.to_string())),
        };
        self.telemetry.record_request(RequestRecord {
            id: outcome.id,
            trace_id: outcome.trace_id,
            at_ms: self.at_ms,
            endpoint: outcome.endpoint.to_string(),
            variant: outcome.variant.map(str::to_string),
            model,
            version,
            reason: outcome.reason.map(str::to_string),
            flags: outcome.flags.iter().cloned().collect(),
            latency_us: self.started.elapsed().as_micros() as u64,
            status: if outcome.result.is_ok() {
                "ok"
            } else {
                "error"
            }
            .to_string(),
            error,
            inputs: self.inputs,
            outputs,
        });
    }
}
