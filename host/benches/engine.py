#!/usr/bin/env python3
"""Runs the engine benchmarks that host/benches/engine.sh (and gpu.sh) set up; see there.

  engine    resnet18 and bert-mini: ONNX Runtime in-process against Modelyard serving the
            same file with backend = "onnxruntime" and with backend = "tract", at 1 and 2
            intra-op threads and concurrency 1 and 2
  batching  resnet18 and iris version 2, one row per request at concurrency 1 to 64, with
            dynamic batching on and off
  cache     resnet18 with its response cache, the same request over and over, against it
            uncached and against a bare iris request
  gpu       resnet18 with device = "cuda" against device = "cpu" (needs an NVIDIA GPU)
  all       engine, batching and cache

The models come from models/make_bench_models.py, made into target/bench-models when they
are missing or older than that script. Every server answer is checked against ONNX Runtime
in-process before it is measured. The server gets the libonnxruntime of the onnxruntime
package this script imports, through ORT_DYLIB_PATH.
Prints markdown tables for BENCHMARKS.md on stdout, progress on stderr.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import BODY, ROOT, WRK_SCRIPT, bench_config, wait_ready, wrk  # noqa: E402

LISTEN = "127.0.0.1:18080"
BASE = f"http://{LISTEN}"
# Slow answers (a batch of ResNets on two cores) must count as latency, not as errors.
TIMEOUT = 60
# The inputs and outputs of each model; iris is the sample model's version 2.
MODELS = {
    "resnet18": ("input", "logits"),
    "bert-mini": ("input_ids", "embedding"),
    "iris": ("input", "probabilities"),
}
DATATYPES = {"float32": "FP32", "int64": "INT64"}
NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8"}
# load.py's `done` callback: one RESULT line with requests, seconds, p50, p99 and errors.
WRK_DONE = WRK_SCRIPT[WRK_SCRIPT.index("done = "):].replace("%%", "%")
# Lua strings hold any bytes, but a long-bracket literal would turn CR LF in the tensor into
# LF; the body is read from its file instead.
BINARY_SCRIPT = """
local f = assert(io.open(%s, "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = "%d"
"""


def onnx_file(args, model):
    if model == "iris":
        return ROOT / "models/iris/2/model.onnx"
    return Path(args.models) / model / "1" / "model.onnx"


def sample(model):
    """One request's input, the same in every run."""
    rng = np.random.default_rng(7)
    if model == "resnet18":
        # Like the images make_bench_models.py calibrated the network on: smooth regions of
        # colour and fine detail.
        coarse = rng.standard_normal((1, 3, 7, 7)).astype(np.float32)
        return np.repeat(np.repeat(coarse, 32, axis=2), 32, axis=3) + 0.3 * rng.standard_normal(
            (1, 3, 224, 224)).astype(np.float32)
    if model == "bert-mini":
        return rng.integers(0, 30522, (1, 128), dtype=np.int64)
    return np.array(BODY["inputs"][0]["data"], dtype=np.float32)


def binary_body(model, x):
    """The request in the binary tensor extension, and the length of its JSON part."""
    header = json.dumps({
        "inputs": [{"name": MODELS[model][0], "datatype": DATATYPES[x.dtype.name], "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    return header + x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes(), len(header)


def binary_script(work: Path, model, x) -> str:
    body, header_length = binary_body(model, x)
    (work / f"{model}.bin").write_bytes(body)
    script = work / f"{model}.lua"
    script.write_text(BINARY_SCRIPT % (json.dumps(str(work / f"{model}.bin")), header_length) + WRK_DONE)
    return str(script)


def json_script(work: Path) -> str:
    script = work / "iris-json.lua"
    script.write_text(WRK_SCRIPT % json.dumps(BODY))
    return str(script)


def infer(url, model, x):
    """The model's output for `x` as the server answers it, over the binary extension."""
    body, header_length = binary_body(model, x)
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            data = response.read()
            json_length = int(response.headers.get("Inference-Header-Content-Length") or len(data))
    except urllib.error.HTTPError as e:
        sys.exit(f"{url}: {e.code} {e.read().decode(errors='replace')}")
    header, offset = json.loads(data[:json_length]), json_length
    for output in header["outputs"]:
        if output["name"] != MODELS[model][1]:
            offset += output.get("parameters", {}).get("binary_data_size", 0)
        elif "data" in output:
            return np.array(output["data"], dtype=NUMPY_TYPES[output["datatype"]]).reshape(output["shape"])
        else:
            size = output["parameters"]["binary_data_size"]
            return np.frombuffer(data[offset:offset + size], NUMPY_TYPES[output["datatype"]]).reshape(output["shape"])
    sys.exit(f"{url}: no output {MODELS[model][1]!r} in {header}")


def session(path, threads=1):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def reference(args, model, x):
    return session(onnx_file(args, model)).run(None, {MODELS[model][0]: x})[0]


def check(url, model, x, expected, tolerance=1e-4):
    got = infer(url, model, x)
    if got.shape != expected.shape or not np.allclose(got, expected, atol=tolerance, rtol=tolerance):
        diff = np.abs(got - expected).max() if got.shape == expected.shape else f"shape {got.shape}"
        sys.exit(f"{url}: answer differs from ONNX Runtime in-process (max difference {diff})")
    return float(np.abs(got - expected).max())


def ort_load(sess, feed, concurrency, duration):
    """`concurrency` threads calling `run` on one session back to back for `duration` seconds;
    the same figures wrk gives for a server."""
    for _ in range(3):
        sess.run(None, feed)
    latencies = [[] for _ in range(concurrency)]
    start = time.perf_counter()
    stop = start + duration

    def loop(out):
        # run releases the GIL: the threads' runs overlap as a server's would.
        while True:
            t0 = time.perf_counter()
            sess.run(None, feed)
            t1 = time.perf_counter()
            out.append(t1 - t0)
            if t1 >= stop:
                return

    threads = [threading.Thread(target=loop, args=(out,)) for out in latencies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    all_us = np.array([l for out in latencies for l in out]) * 1e6
    return {"rps": len(all_us) / elapsed, "p50": float(np.percentile(all_us, 50)),
            "p99": float(np.percentile(all_us, 99)), "errors": 0, "requests": len(all_us)}


def ensure_models(args):
    """Makes the benchmark models when they are missing or older than the script that
    makes them; aside, then moved into place, so that an interrupted run leaves no
    half-written model behind."""
    out, maker = Path(args.models), ROOT / "models/make_bench_models.py"
    last = out / "bert-mini/1/model.onnx"
    if last.exists() and last.stat().st_mtime >= maker.stat().st_mtime:
        return
    aside = out.with_name(out.name + ".tmp")
    shutil.rmtree(aside, ignore_errors=True)
    subprocess.run([sys.executable, maker, aside], check=True, stdout=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    aside.rename(out)


def link_or_copy(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@contextlib.contextmanager
def serving(args, work: Path, models, backend=None):
    """A modelyard server with `models` ({name: (onnx file, version, model.toml text)}) and
    nothing else, every model ready; stopped on leaving. Checks that each model version
    loaded on `backend` when given."""
    work = Path(tempfile.mkdtemp(dir=work))
    for name, (path, version, toml) in models.items():
        (work / "models" / name / str(version)).mkdir(parents=True)
        link_or_copy(path, work / "models" / name / str(version) / "model.onnx")
        (work / "models" / name / "model.toml").write_text(toml)
    (work / "plugins").mkdir()
    config = bench_config(work, work / "plugins", work / "cache", "")
    log = work / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([args.server, "serve", "--listen", LISTEN, "--config", config,
                                 "--models", work / "models"], stderr=err, env=dict(os.environ, RUST_LOG="info"))
    try:
        try:
            for name in models:
                # Loading includes a warm-up run (and on a GPU, the kernels' set-up).
                wait_ready(f"{BASE}/v2/models/{name}/ready", proc, timeout=300)
        except SystemExit:
            sys.stderr.write(log.read_text(errors="replace")[-4000:])
            raise
        # A model may load on another backend than asked (backend = "auto", or a fallback):
        # the metadata says which it got; a model.toml naming its backend overrides `backend`.
        for name, (_, _, toml) in models.items():
            asked = re.search(r'^backend = "(\w+)"', toml, re.M)
            wanted = asked.group(1) if asked else backend
            with urllib.request.urlopen(f"{BASE}/v2/models/{name}") as r:
                got = json.load(r)["engine"]["backend"]
            if wanted and got != wanted:
                sys.exit(f"{name}: asked for backend {wanted}, but it runs on {got}")
        yield BASE
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def measure(label, url, concurrency, duration, script):
    r = wrk(url, concurrency, duration, script, timeout=TIMEOUT)
    report(label, concurrency, r)
    return r


def report(label, concurrency, r):
    print(f"{label} c={concurrency}: {r['rps']:.1f} req/s, p50 {r['p50'] / 1e3:.2f} ms, "
          f"p99 {r['p99'] / 1e3:.2f} ms, {r['errors']} errors", file=sys.stderr)


def warm(url, concurrency, script):
    """A second of load before measuring; it also shows that wrk's requests are answered
    (wrk counts any other status than 2xx and 3xx as an error)."""
    r = wrk(url, concurrency, 1, script, timeout=TIMEOUT)
    if r["errors"] or not r["requests"]:
        sys.exit(f"{url}: {r['errors']} of wrk's {r['requests']} requests failed")


def med(results, key, measure="rps"):
    return statistics.median(r[measure] for r in results[key])


def errors(results, *keys):
    return sum(r["errors"] for key in keys for r in results[key])


def machine(args):
    """The facts a reader needs to set the figures in context."""
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20
    tract = re.search(r'name = "tract-onnx"\nversion = "([^"]+)"', (ROOT / "Cargo.lock").read_text())
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB; ONNX Runtime {ort.__version__} "
            f"(the same library in-process and in the server: {Path(os.environ['ORT_DYLIB_PATH']).name}); "
            f"tract-onnx {tract.group(1) if tract else '?'}; wrk on the same machine; "
            f"median of {args.runs} runs of {args.duration} s each")


def engine(args, work: Path):
    results = {}
    systems = ("ORT", "onnxruntime", "tract")
    for run in range(args.runs):
        for model in ("resnet18", "bert-mini"):
            x = sample(model)
            expected = reference(args, model, x)
            script = binary_script(work, model, x)
            url = f"{BASE}/v2/models/{model}/infer"
            for threads in (1, 2):
                # In turn: ORT in-process, then Modelyard on each backend.
                sess = session(onnx_file(args, model), threads)
                for c in (1, 2):
                    r = ort_load(sess, {MODELS[model][0]: x}, c, args.duration)
                    report(f"run {run + 1} {model} ORT in-process threads={threads}", c, r)
                    results.setdefault((model, threads, "ORT", c), []).append(r)
                del sess
                for backend in systems[1:]:
                    # Two sessions, as ONNX Runtime in-process runs two calls on one session at once.
                    toml = f'backend = "{backend}"\nthreads = {threads}\ninstances = 2\n'
                    with serving(args, work, {model: (onnx_file(args, model), 1, toml)}, backend) as base:
                        diff = check(url, model, x, expected)
                        print(f"{model} on {backend}: max difference from ORT in-process {diff:.2e}", file=sys.stderr)
                        warm(url, 2, script)
                        for c in (1, 2):
                            r = measure(f"run {run + 1} {model} modelyard {backend} threads={threads}", url, c,
                                        args.duration, script)
                            results.setdefault((model, threads, backend, c), []).append(r)
    print(f"### ONNX Runtime in-process against Modelyard\n\n{machine(args)}.\n")
    print("One input per request: resnet18 one 224×224 image (602,112 bytes of FP32), bert-mini one row of "
          "128 token ids. ONNX Runtime in-process: Python's `InferenceSession.run` on one session from "
          "`concurrency` threads, CPU provider, `intra_op_num_threads` = threads, `inter_op_num_threads` = 1, "
          "sequential execution, default graph optimisations. Modelyard: the same file, `backend`, "
          "`threads` and `instances = 2` (two sessions: two runs at once, as in-process) in its "
          "model.toml and every other setting at its default, driven by wrk "
          "(`concurrency` connections, one request in flight on each), binary tensor extension both ways "
          "(`binary_data_output`). The runs alternate between the three. Ratio: Modelyard's throughput "
          "over ONNX Runtime in-process at the same threads and concurrency.\n")
    print("| model | threads | concurrency | ORT in-process req/s | Modelyard + ORT req/s | ratio | "
          "Modelyard + tract req/s | ratio | p50 (ms): ORT, Modelyard + ORT, Modelyard + tract | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in ("resnet18", "bert-mini"):
        for threads in (1, 2):
            for c in (1, 2):
                keys = [(model, threads, system, c) for system in systems]
                base, mine, tract = (med(results, k) for k in keys)
                p50 = ", ".join(f"{med(results, k, 'p50') / 1e3:.2f}" for k in keys)
                print(f"| {model} | {threads} | {c} | {base:.1f} | {mine:.1f} | {mine / base:.2f} | {tract:.1f} | "
                      f"{tract / base:.2f} | {p50} | {errors(results, *keys)} |")
    print()


BATCHING_CONCURRENCY = (1, 4, 16, 64)


def batching(args, work: Path):
    results = {}
    models = ("resnet18", "iris")
    section = (f"[batching]\nmax_batch_size = {args.max_batch_size}\nmax_queue_delay_us = {args.max_queue_delay_us}\n"
               "max_queue_size = 1024\n")
    for run in range(args.runs):
        for mode in ("off", "on"):
            toml = f'backend = "{args.backend}"\nthreads = {args.threads}\n' + (section if mode == "on" else "")
            # iris as its version 2 alone: the MLP, as the other benchmarks measure it.
            served = {m: (onnx_file(args, m), 2 if m == "iris" else 1, toml) for m in models}
            with serving(args, work, served, args.backend) as base:
                for model in models:
                    x = sample(model)
                    url = f"{base}/v2/models/{model}/versions/{served[model][1]}/infer"
                    check(url, model, x, reference(args, model, x))
                    script = binary_script(work, model, x)
                    warm(url, 4, script)
                    for c in BATCHING_CONCURRENCY:
                        r = measure(f"run {run + 1} {model} batching {mode}", url, c, args.duration, script)
                        results.setdefault((model, mode, c), []).append(r)
    print(f"### Dynamic batching\n\n{machine(args)}.\n")
    print(f"One row per request (binary tensor extension), wrk with `concurrency` connections, one request "
          f"in flight on each; resnet18 and iris version 2 in one server, `backend = \"{args.backend}\"`, "
          f"`threads = {args.threads}`; batching on: `max_batch_size = {args.max_batch_size}`, "
          f"`max_queue_delay_us = {args.max_queue_delay_us}`, `max_queue_size = 1024`. The runs alternate "
          f"between batching off and on.\n")
    print("| model | concurrency | req/s, off | p50 / p99 (ms), off | req/s, on | p50 / p99 (ms), on | "
          "throughput on / off | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in models:
        for c in BATCHING_CONCURRENCY:
            off, on = (model, "off", c), (model, "on", c)
            print(f"| {model} | {c} | {med(results, off):.1f} | {med(results, off, 'p50') / 1e3:.2f} / "
                  f"{med(results, off, 'p99') / 1e3:.2f} | {med(results, on):.1f} | "
                  f"{med(results, on, 'p50') / 1e3:.2f} / {med(results, on, 'p99') / 1e3:.2f} | "
                  f"{med(results, on) / med(results, off):.2f} | {errors(results, off, on)} |")
    print()


CACHE_BYTES = 268435456


def cache(args, work: Path):
    results = {}
    plain = f'backend = "{args.backend}"\nthreads = {args.threads}\n'
    served = {
        "resnet18": (onnx_file(args, "resnet18"), 1, plain + f"[cache]\nmax_bytes = {CACHE_BYTES}\n"),
        "resnet18-uncached": (onnx_file(args, "resnet18"), 1, plain),
        "iris": (onnx_file(args, "iris"), 2, plain),
        "iris-tract": (onnx_file(args, "iris"), 2, 'backend = "tract"\n'),
    }
    x = sample("resnet18")
    expected = reference(args, "resnet18", x)
    script = binary_script(work, "resnet18", x)
    iris_script = json_script(work)
    rows = (
        ("resnet18, the same image again (cache hit)", f"{BASE}/v2/models/resnet18/infer", script),
        ("resnet18, no cache", f"{BASE}/v2/models/resnet18-uncached/infer", script),
        ("iris version 2, JSON, no cache", f"{BASE}/v2/models/iris/infer", iris_script),
        ("iris version 2 on tract, JSON, no cache", f"{BASE}/v2/models/iris-tract/infer", iris_script),
    )
    for run in range(args.runs):
        with serving(args, work, served, args.backend):
            # The first answer fills the cache, the second comes out of it: both must be right.
            for _ in range(2):
                for url in (rows[0][1], rows[1][1]):
                    check(url, "resnet18", x, expected)
            for label, url, body in rows:
                warm(url, 1, body)
                results.setdefault(label, []).append(measure(f"run {run + 1} {label}", url, 1, args.duration, body))
    print(f"### Response cache\n\n{machine(args)}.\n")
    print(f"Concurrency 1, the same request over and over, wrk. resnet18: one image in the binary tensor "
          f"extension, `[cache] max_bytes = {CACHE_BYTES}` against the same model without a cache (both in "
          f"one server, `backend = \"{args.backend}\"`); iris: load.py's one-row JSON request, no cache.\n")
    print("| request | p50 (µs) | p99 (µs) | req/s | errors |")
    print("| --- | --- | --- | --- | --- |")
    for label, _, _ in rows:
        print(f"| {label} | {med(results, label, 'p50'):.0f} | {med(results, label, 'p99'):.0f} | "
              f"{med(results, label):.1f} | {errors(results, label)} |")
    print()


def gpu(args, work: Path):
    results = {}
    x = sample("resnet18")
    expected = reference(args, "resnet18", x)
    script = binary_script(work, "resnet18", x)
    url = f"{BASE}/v2/models/resnet18/infer"
    devices = {
        "cuda": 'backend = "onnxruntime"\ndevice = "cuda"\nrequire_device = true\n',
        "cpu": 'backend = "onnxruntime"\ndevice = "cpu"\n',
    }
    for run in range(args.runs):
        for device, toml in devices.items():
            with serving(args, work, {"resnet18": (onnx_file(args, "resnet18"), 1, toml)}, "onnxruntime"):
                # cuDNN may compute in TF32: close to the CPU's answer, not equal to 1e-4.
                diff = check(url, "resnet18", x, expected, 1e-4 if device == "cpu" else 5e-2)
                print(f"resnet18 on {device}: max difference from ORT in-process on the CPU {diff:.2e}",
                      file=sys.stderr)
                warm(url, 8, script)
                for c in (1, 8):
                    results.setdefault((device, c), []).append(
                        measure(f"run {run + 1} resnet18 {device}", url, c, args.duration, script))
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip().replace("\n", "; ")
    except OSError:
        gpus = "?"
    print(f"### GPU\n\n{machine(args)}; GPU: {gpus}.\n")
    print("resnet18, one image per request in the binary tensor extension, wrk with `concurrency` "
          "connections; Modelyard with `backend = \"onnxruntime\"` and `device = \"cuda\"` "
          "(`require_device = true`) against `device = \"cpu\"`, other settings at their defaults; the runs "
          "alternate between the two.\n")
    print("| device | concurrency | req/s | p50 (ms) | p99 (ms) | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (device, c) in results:
        print(f"| {device} | {c} | {med(results, (device, c)):.1f} | {med(results, (device, c), 'p50') / 1e3:.2f} | "
              f"{med(results, (device, c), 'p99') / 1e3:.2f} | {errors(results, (device, c))} |")
    print("\n" + "; ".join(f"concurrency {c}: CUDA {med(results, ('cuda', c)) / med(results, ('cpu', c)):.1f}× "
                           f"the CPU's throughput" for c in (1, 8)) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=("engine", "batching", "cache", "gpu", "all"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--backend", default="onnxruntime", help="batching and cache: the backend served")
    ap.add_argument("--threads", type=int, default=1, help="batching and cache: threads per run")
    ap.add_argument("--models", default=str(ROOT / "target/bench-models"),
                    help="where models/make_bench_models.py writes the models")
    ap.add_argument("--server", default=str(ROOT / "target/release/modelyard"))
    args = ap.parse_args()
    # The server runs the very library measured in-process, whatever the shell had set.
    libraries = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    if not libraries:
        sys.exit(f"no libonnxruntime.so.* in the onnxruntime package at {Path(ort.__file__).parent}")
    os.environ["ORT_DYLIB_PATH"] = str(libraries[-1])
    ensure_models(args)
    (ROOT / "target").mkdir(exist_ok=True)
    # Under target/: the servers' model files are hard links to the generated ones there.
    with tempfile.TemporaryDirectory(dir=ROOT / "target", prefix="engine-bench-") as work:
        for name, bench in (("engine", engine), ("batching", batching), ("cache", cache), ("gpu", gpu)):
            if args.what == name or (args.what == "all" and name != "gpu"):
                bench(args, Path(work))


if __name__ == "__main__":
    main()
