#!/usr/bin/env python3
"""Runs the load benchmark that host/benches/load.sh sets up (see there).

With --strategies it measures modelyard alone instead: the bare model and each sample
endpoint of modelyard.toml (one per deployment strategy), with the request log written and
with it turned off (RUST_LOG=info,modelyard::requests=off). Needs the plugins built.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [[5.1, 3.5, 1.4, 0.2]]}]}


def wait_ready(url, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited early: {proc.args}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} never became ready")


@contextlib.contextmanager
def modelyard(config, rust_log, models=None, binary=ROOT / "target/release/modelyard", log=subprocess.DEVNULL):
    """A modelyard server on port 18080 with `config` (and `models`, when given), its log
    going to `log`, ready; stopped on leaving. The other benchmark scripts and the soak
    (tests/soak) start theirs with it too."""
    extra = ["--models", models] if models else []
    proc = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:18080",
                             "--config", config, *extra], stderr=log,
                            env=dict(os.environ, RUST_LOG=rust_log))
    base = "http://127.0.0.1:18080"
    try:
        wait_ready(f"{base}/v2/models/iris/ready", proc)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_config(work: Path, plugins: Path, cache: Path, endpoints: str) -> Path:
    """A modelyard.toml in `work` for a benchmark: its plugin directory and cache, nothing
    kept on disk, and `endpoints`."""
    config = work / "modelyard.toml"
    config.write_text(f"""
[plugins]
dir = "{plugins}"
cache_dir = "{cache}"
[monitoring]
database = ""
{endpoints}
""")
    return config


@contextlib.contextmanager
def cores_busy(on=True):
    """Two processes spinning on both cores while inside (when `on`): scheduling noise."""
    # Processes, not threads: Python threads would share one core.
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if on else 0)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def mlserver_model(workdir: Path):
    """The same MLP as iris version 2 (see models/make_iris.py), as MLServer serves it."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPClassifier

    data = load_iris()
    mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=4000, random_state=7).fit(data.data, data.target)
    model_dir = workdir / "iris"
    model_dir.mkdir()
    joblib.dump(mlp, model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps(
        {"name": "iris", "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"uri": "./model.joblib"}}
    ))
    (workdir / "settings.json").write_text(json.dumps(
        {"http_port": 18090, "grpc_port": 18091, "metrics_port": 18092}
    ))


# wrk keeps each connection busy with one request at a time (no pipelining) and reports
# latency percentiles to the microsecond; non-2xx answers are counted as errors.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%f %%d %%d %%d\\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk(url, concurrency, duration, script, timeout=2):
    # wrk counts an answer slower than `timeout` seconds as an error and leaves it out of
    # the latencies; 2 s is its default.
    out = subprocess.run(
        ["wrk", "-t", str(min(concurrency, 2)), "-c", str(concurrency), "-d", f"{duration}s",
         "--timeout", f"{timeout}s", "-s", script, url],
        check=True, capture_output=True, text=True,
    ).stdout
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    requests, seconds, p50, p99, errors = line.split()[1:]
    return {"rps": int(requests) / float(seconds), "p50": float(p50), "p99": float(p99), "errors": int(errors),
            "requests": int(requests)}


def cpu_seconds(pid):
    """User and system CPU time the process (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def medians(results):
    """Per key, the median of each measure over its runs."""
    return {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50", "p99", "errors")}
            for k, v in results.items()}


def measure(base, endpoint, concurrency, duration, scripts, what):
    """One wrk run against `endpoint`'s infer route, reported on stderr as it ends."""
    script, features_script = scripts
    # iris-ab's processor takes the flower as the tensor `features`.
    body = features_script if endpoint == "iris-ab" else script
    r = wrk(f"{base}/v2/models/{endpoint}/infer", concurrency, duration, body)
    print(f"{what} {endpoint} c={concurrency}: {r['rps']:.0f} req/s, p50 {r['p50']:.0f} us, "
          f"{r['errors']} errors", file=sys.stderr)
    return r


STRATEGY_ENDPOINTS = ["iris", "iris-ab", "iris-canary", "iris-bg", "iris-shadow", "iris-bandit", "iris-flags", "iris-safe"]


def strategies(args, script, features_script):
    """Each sample endpoint at concurrency 8, request log on and off; a table of medians."""
    results = {}
    for log in ("on", "off"):
        rust_log = "info,modelyard::requests=debug" if log == "on" else "info"
        with modelyard(ROOT / "modelyard.toml", rust_log) as (base, _):
            for run in range(args.runs):
                for endpoint in STRATEGY_ENDPOINTS:
                    r = measure(base, endpoint, 8, args.duration, (script, features_script),
                                f"run {run + 1} log {log}")
                    results.setdefault((endpoint, log), []).append(r)
    med = medians(results)
    print(f"median of {args.runs} runs of {args.duration} s each, concurrency 8, wrk on the same machine\n")
    print("| endpoint | req/s | p50 (µs) | p99 (µs) | req/s, request log off | p50 (µs), log off | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for endpoint in STRATEGY_ENDPOINTS:
        on, off = med[(endpoint, "on")], med[(endpoint, "off")]
        print(f"| {endpoint} | {on['rps']:.0f} | {on['p50']:.0f} | {on['p99']:.0f} | {off['rps']:.0f} | "
              f"{off['p50']:.0f} | {on['errors'] + off['errors']:.0f} |")


COMPARED = [("iris", 1), ("iris", 8), ("iris-ab", 8), ("iris-canary", 8)]


def compare(args, script, features_script):
    """Another build of the server (`--compare BINARY`, e.g. the last commit's) against this
    one, alternating run by run on the sample configuration: the bare model at concurrency
    1 and 8, and two endpoints with plugins at 8; a table of medians side by side."""
    before_config = Path(args.compare_config) if args.compare_config else ROOT / "modelyard.toml"
    builds = {
        "before": (Path(args.compare), before_config),
        "after": (ROOT / "target/release/modelyard", ROOT / "modelyard.toml"),
    }
    results = {}
    for run in range(args.runs):
        for build, (binary, config) in builds.items():
            with modelyard(config, "info", binary=binary) as (base, _):
                for endpoint, c in COMPARED:
                    r = measure(base, endpoint, c, args.duration, (script, features_script),
                                f"run {run + 1} {build}")
                    results.setdefault((build, endpoint, c), []).append(r)
    med = medians(results)
    print(f"median of {args.runs} runs of {args.duration} s each per build, alternating, wrk on the same machine\n")
    print("| endpoint | concurrency | req/s before | req/s after | p50 (µs) before | p50 (µs) after | p99 (µs) before | p99 (µs) after | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for endpoint, c in COMPARED:
        b, a = med[("before", endpoint, c)], med[("after", endpoint, c)]
        print(f"| {endpoint} | {c} | {b['rps']:.0f} | {a['rps']:.0f} | {b['p50']:.0f} | {a['p50']:.0f} | "
              f"{b['p99']:.0f} | {a['p99']:.0f} | {b['errors'] + a['errors']:.0f} |")


MONITORED_ENDPOINTS = ["iris", "iris-canary"]


def monitoring_config(tmp: Path, on: bool, drift: bool = True) -> Path:
    """A configuration with the sample endpoints and metrics and logging at their defaults
    (`on`), or off: no metrics, no request store, no sampled requests. `drift = False`
    serves models without their drift references."""
    name = f"{'on' if on else 'off'}{'' if drift else '-nodrift'}"
    models = tmp / f"models-{name}"
    shutil.copytree(ROOT / "models", models)
    if not drift:
        for reference in models.glob("*/*/reference.json"):
            reference.unlink()
    text = (ROOT / "modelyard.toml").read_text()
    text = text.replace('dir = "models"', f'dir = "{models}"', 1)
    text = text.replace('dir = "plugins"', f'dir = "{ROOT / "plugins"}"', 1)
    text = text.replace('config_file = "plugins/', f'config_file = "{ROOT / "plugins"}/')
    if on:
        text += f'\n[monitoring]\ndatabase = "{tmp / name}.db"\n'
    else:
        text = text.replace("[server]\n", "[server]\nmetrics = false\n", 1)
        text += '\n[monitoring]\ndatabase = ""\nrequest_sample = 0.0\n'
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def monitoring(args, script):
    """Metrics and logging at their defaults against both off (drift on in both), and drift
    against none (metrics and logging on), at concurrency 8, alternating servers run by
    run; a table of medians."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "on": monitoring_config(Path(tmp), True),
            "off": monitoring_config(Path(tmp), False),
            "no drift": monitoring_config(Path(tmp), True, drift=False),
        }
        for run in range(args.runs):
            for mode, config in configs.items():
                # Logging off: only warnings and errors, so no request span either.
                with modelyard(config, "warn" if mode == "off" else "info") as (base, pid):
                    for endpoint in MONITORED_ENDPOINTS:
                        cpu = cpu_seconds(pid)
                        r = wrk(f"{base}/v2/models/{endpoint}/infer", 8, args.duration, script)
                        # The server's own CPU per request: what a neighbour taking the
                        # machine's time changes far less than throughput.
                        r["cpu_us"] = 1e6 * (cpu_seconds(pid) - cpu) / max(r["requests"], 1)
                        results.setdefault((endpoint, mode), []).append(r)
                        print(f"run {run + 1} {endpoint} monitoring {mode}: {r['rps']:.0f} req/s, "
                              f"p50 {r['p50']:.0f} us, {r['cpu_us']:.1f} us CPU per request, "
                              f"{r['errors']} errors", file=sys.stderr)
    med = medians(results)
    cpu = {k: statistics.median(r["cpu_us"] for r in v) for k, v in results.items()}
    print(f"median of {args.runs} runs of {args.duration} s each, concurrency 8, wrk on the same machine\n")
    print("| endpoint | server CPU per request (µs): defaults | metrics and logging off | their cost | no drift reference | drift's cost |")
    print("| --- | --- | --- | --- | --- | --- |")
    for endpoint in MONITORED_ENDPOINTS:
        on, off, bare = (cpu[(endpoint, mode)] for mode in ("on", "off", "no drift"))
        print(f"| {endpoint} | {on:.1f} | {off:.1f} | {100 * (on / off - 1):.1f} % | {bare:.1f} | "
              f"{100 * (on / bare - 1):.1f} % |")
    print()
    print("| endpoint | req/s, defaults | req/s, metrics and logging off | their cost | req/s, no drift reference | drift's cost | p50 (µs): defaults, off, no drift | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for endpoint in MONITORED_ENDPOINTS:
        on, off, bare = (med[(endpoint, mode)] for mode in ("on", "off", "no drift"))
        print(f"| {endpoint} | {on['rps']:.0f} | {off['rps']:.0f} | {100 * (1 - on['rps'] / off['rps']):.1f} % | "
              f"{bare['rps']:.0f} | {100 * (1 - on['rps'] / bare['rps']):.1f} % | "
              f"{on['p50']:.0f}, {off['p50']:.0f}, {bare['p50']:.0f} | "
              f"{on['errors'] + off['errors'] + bare['errors']:.0f} |")


def wrk_scripts(tmp: Path):
    """wrk scripts posting the iris flower as the models' `input`, and as the `features`
    the iris-features processor takes."""
    script, features = tmp / "infer.lua", tmp / "features.lua"
    script.write_text(WRK_SCRIPT % json.dumps(BODY))
    features.write_text(WRK_SCRIPT % json.dumps(BODY).replace('"input"', '"features"'))
    return str(script), str(features)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--strategies", action="store_true", help="modelyard alone: each sample endpoint")
    ap.add_argument("--monitoring", action="store_true", help="modelyard alone: monitoring at defaults vs off")
    ap.add_argument("--compare", metavar="BINARY", help="modelyard alone: another build of it against this one")
    ap.add_argument("--compare-config", metavar="TOML",
                    help="the configuration the other build serves (its checkout's modelyard.toml, whose "
                         "plugins were built for its contract); default: this one's")
    args = ap.parse_args()
    if args.compare:
        with tempfile.TemporaryDirectory() as tmp:
            compare(args, *wrk_scripts(Path(tmp)))
        return
    if args.monitoring:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "infer.lua"
            script.write_text(WRK_SCRIPT % json.dumps(BODY))
            monitoring(args, str(script))
        return
    if args.strategies:
        with tempfile.TemporaryDirectory() as tmp:
            strategies(args, *wrk_scripts(Path(tmp)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        script = tmp / "infer.lua"
        script.write_text(WRK_SCRIPT % json.dumps(BODY))
        (tmp / "ml").mkdir()
        mlserver_model(tmp / "ml")

        servers = {
            "modelyard": (
                subprocess.Popen([ROOT / "target/release/modelyard", "serve", "--listen", "127.0.0.1:18080",
                                  "--models", ROOT / "models"], stderr=subprocess.DEVNULL),
                "http://127.0.0.1:18080",
            ),
            "MLServer": (
                subprocess.Popen(["mlserver", "start", str(tmp / "ml")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True),
                "http://127.0.0.1:18090",
            ),
        }
        try:
            for proc, base in servers.values():
                wait_ready(f"{base}/v2/models/iris/ready", proc)
            results = {(name, c): [] for name in servers for c in (1, 8)}
            for run in range(args.runs):
                for name, (_, base) in servers.items():
                    for c in (1, 8):
                        r = wrk(f"{base}/v2/models/iris/infer", c, args.duration, str(script))
                        results[(name, c)].append(r)
                        print(f"run {run + 1} {name} c={c}: {r['rps']:.0f} req/s, p50 {r['p50']:.0f} us, "
                              f"p99 {r['p99']:.0f} us, {r['errors']} errors", file=sys.stderr)
        finally:
            for proc, _ in servers.values():
                os.killpg(proc.pid, signal.SIGTERM) if proc.args[0] == "mlserver" else proc.terminate()
                proc.wait(timeout=30)

    med = medians(results)
    print(f"median of {args.runs} runs of {args.duration} s each, wrk on the same machine\n")
    print("| server | concurrency | req/s | p50 (µs) | p99 (µs) | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (name, c), m in med.items():
        print(f"| {name} | {c} | {m['rps']:.0f} | {m['p50']:.0f} | {m['p99']:.0f} | {m['errors']:.0f} |")
    my, ml = "modelyard", "MLServer"
    print(f"\nthroughput at concurrency 8: {med[(my, 8)]['rps'] / med[(ml, 8)]['rps']:.1f}x MLServer's; "
          f"median latency at concurrency 1: 1/{med[(ml, 1)]['p50'] / med[(my, 1)]['p50']:.1f} of MLServer's")


if __name__ == "__main__":
    main()
