#!/usr/bin/env python3
"""The soak: the release binary under steady load over every endpoint kind while models,
plugins and the configuration change under it.

    tests/soak/soak.py [--seconds 600] [--concurrency 32] [--binary target/release/modelyard]
                       [--swap-every 2]

Needs the standard plugins (plugins/build), the fixture router and processor in both
builds (target/fixtures/a and b, which tests/run makes) and wrk.

What it does:
- copies the sample models and the plugins into a scratch directory, beside a
  modelyard.toml with every endpoint of the sample configuration (one per deployment
  strategy, flags included), the README's A/B test, an endpoint routed by the fixture
  router and one through the fixture processor (on_processor_error = "pass-through"); the
  server's log goes to a file in that same directory, which its watch must ignore;
- drives wrk at --concurrency connections spread over those endpoints and the bare model
  (by name and by version), for --seconds;
- every --swap-every seconds changes one thing, in turn: a model version (a new iris
  version copied aside and renamed into place, or the last one added removed), the plugin
  files (the fixture router replaced by its other build, weighted.wasm rewritten), and the
  configuration (the A/B weights changed, an extra endpoint added or removed, and every
  other time the fixture router made to trap on every call and the fixture processor to
  fail);
- after each round of the three, samples the server's resident memory, open file
  descriptors, metric series (the sample lines of /metrics) and requests answered, and
  prints the curve at the end.

It fails (exit 1) when:
- any request was not answered 200. Nothing else is expected: the README promises that
  model versions, plugins and the configuration change without a failed request, that a
  router that fails leaves the choice to the endpoint's default variant, and that a
  processor that fails under "pass-through" is passed by. Another status, a connection
  error or a timeout (10 s) is a failure;
- after warm-up (a quarter of the rounds, at least two), compared with the first round
  after warm-up in the same state (the swaps alternate, so rounds k and k-2 serve the same
  models, plugins and configuration): resident memory grew by more than 10 % + 16 MiB,
  open descriptors by more than 4, or metric series by more than 4;
- the control plane reread its files more often than they were changed (plus once at
  start): the log written beside the configuration must wake nothing.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "host/benches"))
from load import BODY, modelyard  # noqa: E402

TOKEN = "soak"
FEATURES = json.loads(json.dumps(BODY).replace('"input"', '"features"'))
# Every endpoint of the configuration below, and the bare model: what wrk calls, with the
# body each takes (iris-ab's processor takes the flower as `features`).
TARGETS = [
    ("iris", BODY), ("iris/versions/1", BODY), ("iris/versions/2", BODY),
    ("iris-ab", FEATURES), ("iris-ab-test", BODY), ("iris-bandit", BODY), ("iris-safe", BODY),
    ("iris-canary", BODY), ("iris-shadow", BODY), ("iris-bg", BODY), ("iris-flags", BODY),
    ("soak-router", BODY), ("soak-processor", BODY),
]
RSS_TOLERANCE = (0.10, 16 * 1024)  # share, and KiB
FD_TOLERANCE = 4
SERIES_TOLERANCE = 4

# Varied users (sticky routing, flag buckets) and countries (the flag's rule); every
# status counted per wrk thread and written out at the end.
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {}; n = 0 end
function request()
  n = n + 1
  wrk.headers["x-user-id"] = "user-" .. (n %% 997)
  wrk.headers["x-country"] = (n %% 5 == 0) and "NL" or "US"
  return wrk.format()
end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("ERRORS %%d %%d %%d %%d\\n", e.connect, e.read, e.write, e.timeout))
  for _, t in ipairs(threads) do
    for status, count in pairs(t:get("statuses")) do io.write(string.format("STATUS %%d %%d\\n", status, count)) end
  end
end
"""

EXTRA_ENDPOINTS = """
[endpoints.iris-ab-test]
variants = { control = "iris@1", treatment = "iris@2" }
default_variant = "control"
targeting_key_header = "x-user-id"
router = { plugin = "weighted", config = { weights = { control = 50, treatment = 50 } } }

[endpoints.soak-router]
variants = { first = "iris@1", last = "iris" }
default_variant = "first"
router = { plugin = "fixture-router", config = { mode = "%(router)s" } }

[endpoints.soak-processor]
variants = { only = "iris" }
on_processor_error = "pass-through"
[[endpoints.soak-processor.processors]]
plugin = "fixture-processor"
config = { mode = "%(processor)s" }
"""


def configuration(round_: int) -> str:
    """The configuration of round `round_`: odd rounds trap and fail in the fixture
    plugins and add an endpoint no one calls (its series must go when it goes)."""
    sample = (ROOT / "modelyard.toml").read_text()
    endpoints = sample[sample.index("[endpoints."):]
    if round_ % 2:
        endpoints = endpoints.replace("weights = { stable = 90, candidate = 10 }",
                                      "weights = { stable = 50, candidate = 50 }")
    odd = round_ % 2 == 1
    text = f"""# written by tests/soak/soak.py, round {round_}
[server]
feedback_memory = 1000          # bounded collections reach their bound within warm-up
[server.tokens.soak]
token = "{TOKEN}"
role = "read"
[models]
dir = "models"
[plugins]
dir = "plugins"
cache_dir = "cache"
[monitoring]
database = "soak.db"
request_sample = 0.05
request_retention = 5000
{endpoints}
{EXTRA_ENDPOINTS % {"router": "panic" if odd else "pin", "processor": "err" if odd else "tag"}}
"""
    if odd:
        text += f'\n[endpoints.soak-extra-{round_}]\nvariants = {{ only = "iris" }}\n'
    return text


def replace(path: Path, data: bytes):
    """Writes `path` the way operators are told to: aside, then renamed into place."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.rename(path)


class Swaps:
    """The three changes, in turn; each round ends in the state of its parity."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.models = scratch / "models/iris"
        self.version = None
        self.counts = {"model": 0, "plugin": 0, "config": 0}

    def model(self, round_: int):
        if round_ % 2 == 0:
            self.version = 3 + round_ // 2
            aside = self.models / f".{self.version}.tmp"
            shutil.copytree(self.models / "2", aside)
            aside.rename(self.models / str(self.version))
        else:
            gone = self.models / f".{self.version}.gone"
            (self.models / str(self.version)).rename(gone)
            shutil.rmtree(gone)
        self.counts["model"] += 1

    def plugin(self, round_: int):
        flavor = "b" if round_ % 2 == 0 else "a"
        built = ROOT / f"target/fixtures/{flavor}/fixture-router.wasm"
        replace(self.scratch / "plugins/fixture-router.wasm", built.read_bytes())
        weighted = self.scratch / "plugins/weighted.wasm"
        replace(weighted, weighted.read_bytes())
        self.counts["plugin"] += 1

    def config(self, round_: int):
        replace(self.scratch / "modelyard.toml", configuration(round_).encode())
        self.counts["config"] += 1


def prepare(scratch: Path):
    shutil.copytree(ROOT / "models", scratch / "models", ignore=shutil.ignore_patterns("*.py", "*.csv"))
    plugins = scratch / "plugins"
    plugins.mkdir()
    for plugin in list((ROOT / "plugins").glob("*.wasm")) + [ROOT / "plugins/flags.json"]:
        shutil.copy(plugin, plugins)
    for fixture in ("fixture-router", "fixture-processor"):
        shutil.copy(ROOT / f"target/fixtures/a/{fixture}.wasm", plugins)
    (scratch / "modelyard.toml").write_text(configuration(0))


def wrk(base: str, target: str, body: dict, connections: int, seconds: int, scratch: Path):
    script = scratch / f"wrk-{target.replace('/', '-')}.lua"
    script.write_text(WRK_SCRIPT % json.dumps(body))
    return subprocess.Popen(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
         "-s", str(script), f"{base}/v2/models/{target}/infer"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def outcome(proc) -> dict:
    """Statuses and connection errors of one wrk run."""
    out, _ = proc.communicate()
    result = {"statuses": {}, "errors": {}}
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] == ["STATUS"]:
            result["statuses"][int(fields[1])] = int(fields[2])
        elif fields[:1] == ["ERRORS"]:
            result["errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, fields[1:])))
    if proc.returncode != 0 or not result["errors"]:
        result["errors"]["wrk"] = 1
        print(out, file=sys.stderr)
    return result


def get(base: str, path: str) -> str:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.read().decode()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples over its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def sample(base: str, pid: int, round_: int, started: float) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    text = get(base, "/metrics")
    return {
        "round": round_, "t": time.monotonic() - started, "rss_kib": rss,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "series": sum(1 for line in text.splitlines() if line and not line.startswith("#")),
        "answered": metric(text, "modelyard_requests_total"),
    }


def judge(samples: list, warmup: int) -> list:
    """Growth beyond the tolerances after warm-up, against the first round after it in the
    same state."""
    problems = []
    for s in samples[warmup:]:
        base = samples[warmup + (s["round"] - warmup) % 2]
        share, slack = RSS_TOLERANCE
        if s["rss_kib"] > base["rss_kib"] * (1 + share) + slack:
            problems.append(f"round {s['round']}: RSS {s['rss_kib']} KiB, from {base['rss_kib']} KiB in round {base['round']}")
        if s["fds"] > base["fds"] + FD_TOLERANCE:
            problems.append(f"round {s['round']}: {s['fds']} open descriptors, from {base['fds']} in round {base['round']}")
        if s["series"] > base["series"] + SERIES_TOLERANCE:
            problems.append(f"round {s['round']}: {s['series']} metric series, from {base['series']} in round {base['round']}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--binary", type=Path, default=ROOT / "target/release/modelyard")
    ap.add_argument("--swap-every", type=float, default=2.0, help="seconds between two changes")
    args = ap.parse_args()
    if args.concurrency < len(TARGETS):
        sys.exit(f"--concurrency must be at least {len(TARGETS)}: one connection per endpoint")
    missing = [p for p in [ROOT / "plugins/weighted.wasm", ROOT / "target/fixtures/b/fixture-router.wasm"] if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(map(str, missing))}: run plugins/build and tests/run's fixture builds first")

    with tempfile.TemporaryDirectory(prefix="modelyard-soak-") as scratch:
        scratch = Path(scratch)
        prepare(scratch)
        log = open(scratch / "server.log", "w")
        swaps = Swaps(scratch)
        samples = []
        with modelyard(scratch / "modelyard.toml", "info", binary=args.binary, log=log) as (base, pid):
            started = time.monotonic()
            each, extra = divmod(args.concurrency, len(TARGETS))
            runs = [(target, wrk(base, target, body, each + (i < extra), args.seconds, scratch))
                    for i, (target, body) in enumerate(TARGETS)]
            # wrk's output is read as it ends, so a full pipe never stalls it.
            results = {}
            readers = [threading.Thread(target=lambda t=t, p=p: results.__setitem__(t, outcome(p)))
                       for t, p in runs]
            for reader in readers:
                reader.start()
            round_ = 0
            while time.monotonic() - started + 3 * args.swap_every < args.seconds:
                for swap in (swaps.model, swaps.plugin, swaps.config):
                    swap(round_)
                    time.sleep(args.swap_every)
                samples.append(sample(base, pid, round_, started))
                s = samples[-1]
                print(f"round {round_:3d} at {s['t']:6.1f} s: RSS {s['rss_kib'] / 1024:6.1f} MiB, "
                      f"{s['fds']} fds, {s['series']} series, {s['answered']:.0f} answered", file=sys.stderr)
                round_ += 1
            for reader in readers:
                reader.join()
            final = get(base, "/metrics")
            refreshes = metric(final, "modelyard_config_refreshes_total")
            plugin_failures = metric(final, "modelyard_plugin_failures_total")
            recent = json.loads(get(base, "/admin/status")).get("recent_errors", [])
        log.close()
        log_tail = (scratch / "server.log").read_text().splitlines()[-20:]

    statuses, errors = {}, {}
    for target, r in results.items():
        for status, count in r["statuses"].items():
            statuses[(target, status)] = statuses.get((target, status), 0) + count
        for kind, count in r["errors"].items():
            if count:
                errors[(target, kind)] = errors.get((target, kind), 0) + count
    served = sum(statuses.values())
    unexpected = {k: v for k, v in statuses.items() if k[1] != 200}
    warmup = max(2, len(samples) // 4)
    problems = judge(samples, warmup)
    allowed = 1 + swaps.counts["config"] + 2 * swaps.counts["plugin"]
    if "modelyard_config_refreshes_total" not in final:
        problems.append("no modelyard_config_refreshes_total in /metrics: cannot tell how often the configuration was reread")
    elif refreshes > allowed:
        problems.append(f"{refreshes:.0f} configuration refreshes for {allowed - 1} changes of the files it follows")
    if len(samples) < warmup + 2:
        problems.append(f"only {len(samples)} rounds: too short to judge growth after {warmup} rounds of warm-up")

    print(f"soak: {args.seconds} s at concurrency {args.concurrency} over {len(TARGETS)} endpoints, "
          f"a change every {args.swap_every} s ({swaps.counts['model']} model, {swaps.counts['plugin']} plugin, "
          f"{swaps.counts['config']} configuration changes), warm-up {warmup} rounds\n")
    print("| round | time (s) | RSS (MiB) | open fds | metric series | requests answered |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in samples:
        print(f"| {s['round']} | {s['t']:.0f} | {s['rss_kib'] / 1024:.1f} | {s['fds']} | {s['series']} | {s['answered']:.0f} |")
    print(f"\nrequests served: {served} ({served / args.seconds:.0f}/s); answered 200: "
          f"{sum(v for k, v in statuses.items() if k[1] == 200)}; other statuses: {sum(unexpected.values())}; "
          f"connection errors and timeouts: {sum(errors.values())}")
    print(f"plugin failures (the trapping router and failing processor, expected): {plugin_failures:.0f}; "
          f"configuration refreshes: {refreshes:.0f} (at most {allowed} allowed)")
    for (target, status), count in sorted(unexpected.items()):
        print(f"UNEXPECTED: {count} x {status} from {target}")
    for (target, kind), count in sorted(errors.items()):
        print(f"UNEXPECTED: {count} x {kind} error on {target}")
    for problem in problems:
        print(f"GROWTH: {problem}")
    if unexpected or errors or problems:
        print("\nrecent errors:", json.dumps(recent, indent=1), "\nlast log lines:", *log_tail, sep="\n", file=sys.stderr)
        sys.exit(1)
    print("soak passed")


if __name__ == "__main__":
    main()
