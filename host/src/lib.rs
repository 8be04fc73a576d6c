//! Modelyard: a model-serving host. ONNX models served over the Open Inference Protocol,
//! with every decision about which model answers and how its tensors are shaped left to
//! sandboxed WebAssembly plugins.
//!
//! One folder per concern, each using only those before it: `config` (the settings file),
//! `watch` (file-system change signals), `tensor` (the shared tensor form), `telemetry`
//! (logs, metrics, audit, request log, drift: one handle, passed in), `backend` (running
//! models on tract or ONNX Runtime, behind wasi-nn's traits), `runner` (one version's
//! calls: cache, batching, where they run), `registry` (the model repository on disk),
//! `plugins` (the plugin runtime), `endpoint` (what an endpoint is and keeps), `pipeline`
//! (the steps of one request), `cluster` (replicas sharing strategy state through Redis),
//! `http` (the protocol on the wire), `control` (follows the
//! configuration and the plugin directory). `server` ties them together for the binary.
//! `tests/architecture/imports.py` checks that imports go that one way.

pub mod backend;
pub mod cluster;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod endpoint;
#[cfg(test)]
mod fuzzing;
pub mod http;
pub mod pipeline;
pub mod plugins;
pub mod registry;
pub mod runner;
pub mod server;
pub mod telemetry;
pub mod tensor;
#[cfg(test)]
mod testing;
pub mod watch;
