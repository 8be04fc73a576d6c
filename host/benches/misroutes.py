#!/usr/bin/env python3
"""Misroutes under a saturating load: how often a correct router's call is cut and the
default variant answers instead, while both cores are busy and the router is swapped.

    python3 host/benches/misroutes.py [--runs N] [--duration SECONDS]

Needs the release binary, plugins/weighted.wasm (tests/run or plugins/build) and wrk (the
Debian package). Each run is a fresh server with the default plugin limits
(call_deadline_ms = 10) and one endpoint whose `weighted` router sends every request to
variant `b` (the default variant is `a`): an answer from `a` is a misroute. wrk keeps 16
connections busy, two processes spin on both cores, and the router's file is replaced by
an equivalent build (the same component with another custom section, so another hash)
every 250 ms, so fresh instances are made under load. Counts come from /metrics.
"""

import argparse
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from load import ROOT, bench_config, cores_busy, modelyard
BODY = '{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[[5.1,3.5,1.4,0.2]]}]}'


def leb128(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def with_custom_section(wasm, payload):
    """The component with one more custom section: the same code under another hash."""
    name = b"modelyard-bench"
    content = leb128(len(name)) + name + payload
    return wasm + b"\x00" + leb128(len(content)) + content


def metric(base, name, labels):
    with urllib.request.urlopen(f"{base}/metrics") as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run(duration, seed):
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        plugins = work / "plugins"
        plugins.mkdir()
        wasm = (ROOT / "plugins/weighted.wasm").read_bytes()
        builds = [with_custom_section(wasm, f"{seed}-{i}".encode()) for i in range(2)]
        (plugins / "router.wasm").write_bytes(builds[0])
        config = bench_config(work, plugins, work / "cache", """
[endpoints.pinned]
variants = { a = "iris@1", b = "iris@2" }
default_variant = "a"
router = { plugin = "router", config = { weights = { a = 0, b = 1 } } }
""")
        script = work / "post.lua"
        script.write_text(f"wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\n"
                          f"wrk.body = '{BODY}'\n")
        with modelyard(config, "error", ROOT / "models") as (base, _), cores_busy():
            wrk = subprocess.Popen(["wrk", "-t2", "-c16", f"-d{duration}s", "-s", script,
                                    f"{base}/v2/models/pinned/infer"], stdout=subprocess.DEVNULL)
            swaps = 0
            while wrk.poll() is None:
                time.sleep(0.25)
                temp = plugins / ".router.wasm.tmp"
                temp.write_bytes(builds[(swaps + 1) % 2])
                temp.rename(plugins / "router.wasm")
                swaps += 1
            time.sleep(0.5)
            answered_b = metric(base, "modelyard_requests_total", ['endpoint="pinned"', 'variant="b"'])
            answered_a = metric(base, "modelyard_requests_total", ['endpoint="pinned"', 'variant="a"'])
            failures = metric(base, "modelyard_plugin_failures_total", ['plugin="router"'])
            return int(answered_a + answered_b), int(answered_a), int(failures), swaps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=20)
    args = parser.parse_args()
    print("| run | requests | misrouted (answered by the default variant) | router failures | swaps |")
    print("|---|---|---|---|---|")
    for seed in range(args.runs):
        total, misrouted, failures, swaps = run(args.duration, seed)
        print(f"| {seed + 1} | {total} | {misrouted} | {failures} | {swaps} |", flush=True)


if __name__ == "__main__":
    main()
