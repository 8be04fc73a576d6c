#!/usr/bin/env python3
"""Checks that the README's two commands share one build.

`cargo run --release -p modelyard` resolves the server's dependencies alone;
`tests/run` resolves the whole workspace with its dev-dependencies. Cargo reuses an
artifact only when its features are the same in both, and one crate built with other
features rebuilds everything above it (wasmtime and cranelift, minutes). This compares
the features each crate gets in the two resolutions (`cargo tree`, nothing is built) and
names every crate that differs, with the features to turn on in `host/Cargo.toml`.

    python3 tests/architecture/one_build.py
"""

from __future__ import annotations

import re
import subprocess
import sys

LINE = re.compile(r"^(\S+) (v\S+)(?: \([^)]*\))?(?: \(\*\))? \[(.*)\]$")


def features(*selection: str) -> dict[tuple[str, str], set[frozenset[str]]]:
    """Each crate (name, version) with the feature sets it is built with: more than one
    when build scripts and proc macros need it with other features than the code does."""
    out = subprocess.run(
        ["cargo", "tree", "--prefix", "none", "--format", "{p} [{f}]", *selection],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    crates: dict[tuple[str, str], set[frozenset[str]]] = {}
    for line in out.splitlines():
        m = LINE.match(line.strip())
        if m:
            features = frozenset(f for f in m.group(3).split(",") if f)
            crates.setdefault((m.group(1), m.group(2)), set()).add(features)
    return crates


def main() -> int:
    serve = features("-p", "modelyard", "-e", "normal,build")
    tests = features("--workspace", "-e", "normal,build,dev")
    if not serve or not tests:
        print("cargo tree listed no crates; cannot compare")
        return 1
    differ = 0
    for crate in sorted(set(serve) & set(tests)):
        if serve[crate] != tests[crate]:
            differ += 1
            name, version = crate
            extra = sorted(set().union(*tests[crate]) - set().union(*serve[crate]))
            print(f"{name} {version}: built with {sorted(map(sorted, serve[crate]))} for the server "
                  f"alone, {sorted(map(sorted, tests[crate]))} in the workspace (adds {extra}); "
                  f"turn them on in host/Cargo.toml so that `cargo run -p modelyard` builds it alike")
    if differ:
        return 1
    print(f"one build: the {len(serve)} crates the server needs resolve alike for `cargo run -p modelyard` and `tests/run`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
