#!/usr/bin/env bash
# GPU benchmark: resnet18 on Modelyard's ONNX Runtime backend with device = "cuda"
# (require_device = true) against device = "cpu", throughput and latency at concurrency 1
# and 8 (host/benches/engine.py gpu). For a machine with an NVIDIA GPU and its driver:
#   host/benches/gpu.sh [--runs N] [--duration SECONDS]
# Installs what it needs: wrk (Debian package), and onnxruntime-gpu with the CUDA and cuDNN
# libraries as wheels (its `cuda` and `cudnn` extras), onnx and numpy in a virtualenv under
# target/. Prints a markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi, so no NVIDIA driver here" >&2; exit 1; }
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
# onnxruntime-gpu 1.27 and later are built for CUDA 13, which needs driver 580 or later;
# 1.26 is the last for CUDA 12.
cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p')
spec='onnxruntime-gpu[cuda,cudnn]'
[ "${cuda:-0}" -ge 13 ] || spec="$spec<1.27"
venv=target/gpu-venv
if ! "$venv/bin/python" -c 'import onnx, numpy, onnxruntime as o; assert "CUDAExecutionProvider" in o.get_available_providers()' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec" onnx numpy
fi
# The server loads the wheel's libonnxruntime (engine.py sets ORT_DYLIB_PATH to it), whose
# CUDA provider opens the CUDA and cuDNN libraries by name: the nvidia wheels' library
# directories must be on the loader's path before the server starts.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LD_LIBRARY_PATH=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
cargo build --release --quiet -p modelyard
exec "$venv/bin/python" host/benches/engine.py gpu "$@"
