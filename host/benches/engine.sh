#!/usr/bin/env bash
# Engine benchmarks: ONNX Runtime in-process against Modelyard serving the same models on its
# ONNX Runtime and tract backends, dynamic batching on and off, and the response cache.
#   host/benches/engine.sh [engine|batching|cache|all] [--runs N] [--duration SECONDS]
#                          [--max-batch-size N] [--max-queue-delay-us N] [--backend B] [--threads N]
# (--backend and --threads: the model.toml settings of the batching and cache measurements.)
# The models (a ResNet-18 and a BERT-mini with random weights, about 45 MB each) are made by
# models/make_bench_models.py into target/bench-models on the first run, and again when that
# script changes. Installs what it needs: wrk (Debian package), and onnx, onnxruntime and
# numpy in a virtualenv under target/. Prints markdown tables for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
venv=target/engine-venv
if ! "$venv/bin/python" -c 'import onnx, onnxruntime, numpy' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check onnx onnxruntime numpy
fi
cargo build --release --quiet -p modelyard
exec "$venv/bin/python" host/benches/engine.py "$@"
