//! End-to-end tests: the real binary, real HTTP, real ONNX models.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cluster;
mod compat;
mod conformance;
mod engine;
mod failures;
mod harness;
mod lifecycle;
mod monitoring;
mod overload;
mod plugins;
mod protocol;
mod repository;
mod sdk;
mod strategies;
mod tls;
