#!/usr/bin/env bash
# Load benchmark: modelyard against MLServer (a Python KServe v2 server) on the same task,
# iris with one row per request, measured with `wrk` in the same run.
#   host/benches/load.sh [--runs N] [--duration SECONDS] [--strategies | --monitoring | --compare BINARY [--compare-config TOML]]
# --strategies measures modelyard's sample endpoints instead, one per deployment strategy
# (run plugins/build first). --monitoring measures the monitoring at its default settings
# (metrics, request log, audit store, drift) against all of it off. --compare measures
# another build of modelyard (e.g. one built from the last commit in a worktree) against
# this one, run by run in turn, on the bare model and two sample endpoints.
# Installs what it needs: wrk (Debian package), and MLServer with its scikit-learn runtime
# in a virtualenv under target/. Prints a markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
venv=target/bench-venv
if ! "$venv/bin/python" -c 'import mlserver, mlserver_sklearn, sklearn, uvloop; assert uvloop.__version__ < "0.22"' 2>/dev/null; then
    python3 -m venv "$venv"
    # uvloop 0.22 broke MLServer 1.7's workers (no implicit event loop); pin the last that works.
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'mlserver==1.7.1' 'mlserver-sklearn==1.7.1' 'uvloop<0.22' scikit-learn
fi
cargo build --release --quiet -p modelyard
PATH="$PWD/$venv/bin:$PATH" exec "$venv/bin/python" host/benches/load.py "$@"
