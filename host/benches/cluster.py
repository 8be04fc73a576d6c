#!/usr/bin/env python3
"""Figures for replicas sharing state through Redis (BENCHMARKS.md, "Issue 14").

1. Bandit convergence: a Thompson-sampling bandit between iris@1 ("worse", paid 40 % of the
   time) and iris@2 ("better", 60 %), 300 requests round robin over three replicas sharing
   through Redis, each reward sent to another replica than the one that answered; against
   the same on one server, and on three replicas that share nothing (each reward to the
   replica that answered, the only one that knows the answer). The share of the last 100
   requests that went to the better variant, median over --runs seeds.
2. The request path's cost of clustering: wrk at concurrency 8 on the bandit endpoint of a
   replica in a cluster of three (Redis configured) and of a server without Redis, in the
   same run, alternating round by round; medians of --runs rounds.

Needs target/release/modelyard, the plugins built (plugins/build) and redis-server.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import BODY, ROOT, WRK_SCRIPT, wait_ready, wrk  # noqa: E402

BANDIT = """
[endpoints.bandit]
variants = {{ worse = "iris@1", better = "iris@2" }}
router = {{ plugin = "bandit", config = {{ algorithm = "thompson" }} }}
"""


@contextlib.contextmanager
def redis_server(port):
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def servers(work: Path, ports, redis_url, seed):
    """One server per port, sharing through `redis_url` when given."""
    # A namespace per seed: one run's replicas must not count in the next run's sums.
    cluster = f'[cluster]\nredis_url = "{redis_url}"\nnamespace = "bench-{seed}"\n' if redis_url else ""
    procs = []
    try:
        for port in ports:
            config = work / f"modelyard-{port}.toml"
            config.write_text(f"""[server]
seed = {seed + port}
[plugins]
dir = "{ROOT / 'plugins'}"
cache_dir = "{work / 'cache'}"
[models]
dir = "{ROOT / 'models'}"
[monitoring]
database = ""
{cluster}{BANDIT.format()}""")
            procs.append(subprocess.Popen(
                [ROOT / "target/release/modelyard", "serve", "--listen", f"127.0.0.1:{port}", "--config", config],
                stderr=subprocess.DEVNULL))
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        for base, proc in zip(bases, procs):
            wait_ready(f"{base}/v2/health/ready", proc)
        yield bases
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.load(r)


def convergence(bases, seed, shared, pace, rounds=300):
    """The share of the last 100 of `rounds` requests the better variant answered; rewards
    go to another replica than the one that answered when the replicas are `shared`."""
    state = seed * 0x9E3779B97F4A7C15 % 2**64 or 1

    def coin(p):
        nonlocal state
        state ^= (state << 13) % 2**64
        state ^= state >> 7
        state ^= (state << 17) % 2**64
        return (state >> 11) / 2**53 < p

    better_late = 0
    for i in range(rounds):
        answer = post(f"{bases[i % len(bases)]}/v2/models/bandit/infer", BODY)
        variant = answer["parameters"]["variant"]
        paid = coin(0.6 if variant == "better" else 0.4)
        taking = bases[(i + int(shared)) % len(bases)]
        post(f"{taking}/v2/models/bandit/feedback", {"id": answer["id"], "reward": int(paid)})
        time.sleep(pace)
        if i >= rounds - 100 and variant == "better":
            better_late += 1
    return better_late


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--pace-ms", type=float, default=20,
                        help="pause between a reward and the next request (the bandit runs: 300 in about 6 s at 20 ms)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    (work / "cache").mkdir()
    script = work / "infer.lua"
    script.write_text(WRK_SCRIPT % json.dumps(BODY))

    shares = {"one server": [], "three replicas sharing": [], "three replicas, nothing shared": []}
    with redis_server(16379) as url:
        for run in range(args.runs):
            with servers(work, [18091], None, run) as bases:
                shares["one server"].append(convergence(bases, run + 1, False, args.pace_ms / 1000))
            with servers(work, [18091, 18092, 18093], url, run) as bases:
                shares["three replicas sharing"].append(convergence(bases, run + 1, True, args.pace_ms / 1000))
            with servers(work, [18091, 18092, 18093], None, run) as bases:
                shares["three replicas, nothing shared"].append(convergence(bases, run + 1, False, args.pace_ms / 1000))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]}" for k, v in shares.items()), file=sys.stderr)
        print(f"bandit (thompson), better variant's share of the last 100 of 300 requests, {args.pace_ms} ms "
              f"between rounds, {args.runs} seeds:")
        for what, values in shares.items():
            print(f"  {what}: median {statistics.median(values)} (runs: {values})")

        rps = {"Redis configured": [], "without Redis": []}
        with servers(work, [18092, 18093], url, 0), servers(work, [18091], url, 0) as clustered, \
                servers(work, [18094], None, 0) as alone:
            for run in range(args.runs):
                for what, bases in (("Redis configured", clustered), ("without Redis", alone)):
                    r = wrk(f"{bases[0]}/v2/models/bandit/infer", 8, args.duration, script)
                    rps[what].append(r["rps"])
                    print(f"round {run + 1} {what}: {r['rps']:.0f} req/s, p50 {r['p50']:.0f} us, {r['errors']} errors",
                          file=sys.stderr)
            # What one exchange carries: each replica's report, as Redis holds it.
            cli = ["redis-cli", "-p", "16379"]
            keys = subprocess.run(cli + ["--scan", "--pattern", "bench-0:report:*"], capture_output=True,
                                  text=True, check=True).stdout.split()
            sizes = [int(subprocess.run(cli + ["strlen", k], capture_output=True, text=True, check=True).stdout)
                     for k in keys]
        with_redis, without = (statistics.median(rps[k]) for k in rps)
        print(f"bandit endpoint, wrk c=8, {args.duration} s rounds, medians of {args.runs}:")
        print(f"  Redis configured (cluster of three): {with_redis:.0f} req/s")
        print(f"  without Redis: {without:.0f} req/s")
        print(f"  cost of clustering: {100 * (1 - with_redis / without):.1f} %")
        print(f"reports in Redis (one endpoint, two variants): {sorted(sizes)} bytes")


if __name__ == "__main__":
    main()
