//! Modelyard: a model-serving host. ONNX models served over the Open Inference Protocol,
//! with every decision about which model answers and how its tensors are shaped left to
//! sandboxed WebAssembly plugins (coming in the plugin runtime).
//!
//! One folder per concern: `config` (the settings file), `telemetry` (logs), `registry`
//! (the model repository on disk), `backend` (running models on tract or ONNX Runtime,
//! behind wasi-nn's traits), `runner` (one version's calls: cache, batching, where they
//! run), `pipeline` (one request's way), `http` (the protocol on the wire). `server` ties
//! them together for the binary.

pub mod backend;
pub mod config;
pub mod control;
pub mod endpoint;
pub mod http;
pub mod pipeline;
pub mod plugins;
pub mod registry;
pub mod runner;
pub mod server;
pub mod telemetry;
pub mod tensor;
pub mod watch;
