#!/usr/bin/env python3
"""How well the canary analysis judges, measured on the real server over HTTP.

    python3 host/benches/canary.py [--runs N] [--busy]

Needs the release binary and the plugins built (tests/run or plugins/build with
`cargo build --release`). Every run is a fresh server over a fresh model repository, with
the canary router configured as the README's sample (steps 5, 25, 50, 100 % of 2,000
requests each), and one client sending requests one after another until the canary is
promoted or rolled back:

- healthy: stable iris@2, canary iris@1 — both healthy, differently fast; a rollback here
  is a false rollback;
- latency: canary `lagging` (tests/fixtures), about a millisecond slower than stable;
- errors: canary `crashy`, with 5 % of the requests carrying a flower it crashes on.

--busy adds two threads spinning on both cores for the whole run: scheduling noise.
Prints, per scenario, the outcomes and the canary requests until the verdict.
"""

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from load import ROOT, bench_config, cores_busy, modelyard
HEALTHY = [5.1, 3.5, 1.4, 0.2]
CRASHING = [7.0, 3.2, 4.7, 1.4]
# The README's sample configuration (modelyard.toml's iris-canary), every analysis
# parameter at its default.
ROUTER = ('{ stable = "stable", canary = "canary", steps = [5, 25, 50, 100], '
          'step_requests = 2000, step_seconds = 300 }')


@contextlib.contextmanager
def server(canary_model):
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        models, plugins = work / "models", work / "plugins"
        shutil.copytree(ROOT / "models/iris", models / "iris")
        for fixture in ("lagging", "crashy"):
            shutil.copytree(ROOT / "tests/fixtures" / fixture, models / fixture)
        plugins.mkdir()
        shutil.copy(ROOT / "plugins/canary.wasm", plugins / "canary.wasm")
        config = bench_config(work, plugins, ROOT / "target/bench-plugin-cache", f"""
[endpoints.rollout]
variants = {{ stable = "iris@2", canary = "{canary_model}" }}
default_variant = "stable"
router = {{ plugin = "canary", config = {ROUTER} }}
""")
        with modelyard(config, "warn", models) as (base, _):
            yield base


def infer(base, row):
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "data": [row]}]}).encode()
    request = urllib.request.Request(f"{base}/v2/models/rollout/infer", data=body,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request) as reply:
            return reply.headers["x-modelyard-variant"]
    except urllib.error.HTTPError as error:
        return error.headers["x-modelyard-variant"]


def strategy(base):
    with urllib.request.urlopen(f"{base}/admin/endpoints/rollout") as reply:
        return json.load(reply)["strategy"]


def run(canary_model, error_share, seed):
    """One fresh rollout; (status, canary requests, all requests, reason)."""
    import random
    rng = random.Random(seed)
    with server(canary_model) as base:
        canary = total = 0
        while total < 9000:
            row = CRASHING if rng.random() < error_share else HEALTHY
            canary += infer(base, row) == "canary"
            total += 1
            if total % 25 == 0:
                state = strategy(base)
                if state["status"] != "progressing":
                    return state["status"], canary, total, state["reason"]
        state = strategy(base)
        return state["status"], canary, total, state["reason"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--busy", action="store_true")
    args = parser.parse_args()
    scenarios = [("healthy", "iris@1", 0.0), ("latency +1 ms", "lagging", 0.0),
                 ("errors +5 %", "crashy", 0.05)]
    print(f"| scenario | runs | promoted | rolled back | canary requests until the verdict: median (min–max) |")
    print("|---|---|---|---|---|")
    with cores_busy(args.busy):
        for name, model, errors in scenarios:
            results = [run(model, errors, seed) for seed in range(args.runs)]
            outcomes = [r[0] for r in results]
            judged = [r[1] for r in results if r[0] == "rolled-back"] if name != "healthy" \
                else [r[1] for r in results]
            print(f"| {name} | {len(results)} | {outcomes.count('promoted')} | "
                  f"{outcomes.count('rolled-back')} | {statistics.median(judged):.0f} "
                  f"({min(judged)}–{max(judged)}) |" if judged else f"| {name} | {len(results)} | "
                  f"{outcomes.count('promoted')} | {outcomes.count('rolled-back')} | – |", flush=True)
            for status, canary, total, reason in results:
                if (name == "healthy") == (status == "rolled-back"):
                    print(f"  {name}: {status} after {canary} canary / {total} requests: {reason}",
                          file=sys.stderr)


if __name__ == "__main__":
    main()
