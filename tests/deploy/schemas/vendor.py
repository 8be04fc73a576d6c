#!/usr/bin/env python3
"""Rewrites the vendored KServe schemas from KServe's CRD files.

    python3 tests/deploy/schemas/vendor.py KSERVE_CHECKOUT

reads config/crd/full/serving.kserve.io_{clusterservingruntimes,inferenceservices}.yaml
from the checkout and writes, for each, the served version's openAPIV3Schema as JSON:
descriptions dropped and every subschema that occurs more than once (the Kubernetes
container, pod and volume schemas the CRDs inline over and over) written once under
$defs and referred to. Neither changes what validates: this only makes the files small
enough to keep in the repository (about 100 KB instead of 2 MB of YAML). Needs PyYAML.
"""

import collections
import hashlib
import json
import sys
from pathlib import Path

import yaml

CRDS = {
    "clusterservingruntime": "serving.kserve.io_clusterservingruntimes.yaml",
    "inferenceservice": "serving.kserve.io_inferenceservices.yaml",
}
# Subschemas shorter than this stay inline: a $ref to a one-line schema saves nothing.
MIN_SHARED = 300
# Keywords whose values are data, not schemas: never factored out or searched.
DATA = {"enum", "required", "default", "x-kubernetes-list-map-keys"}


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def canonical(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def subschemas(node):
    """Every schema below `node` (property names are not schemas; data keywords hold none)."""
    for key, value in node.items():
        if key in DATA:
            continue
        if key == "properties":
            children = list(value.values())
        elif isinstance(value, dict):
            children = [value]
        elif isinstance(value, list):
            children = [v for v in value if isinstance(v, dict)]
        else:
            children = []
        for child in children:
            yield child
            yield from subschemas(child)


def factor(schema: dict) -> dict:
    counts = collections.Counter(
        c for c in map(canonical, subschemas(schema)) if len(c) >= MIN_SHARED
    )
    defs: dict = {}

    def rewrite(node):
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        text = canonical(node)
        if counts[text] < 2:
            return children(node)
        name = hashlib.sha256(text.encode()).hexdigest()[:12]
        if name not in defs:
            defs[name] = children(node)
        return {"$ref": f"#/$defs/{name}"}

    def children(node: dict) -> dict:
        out = {}
        for key, value in node.items():
            if key in DATA:
                out[key] = value
            elif key == "properties":
                out[key] = {name: rewrite(v) for name, v in value.items()}
            else:
                out[key] = rewrite(value)
        return out

    top = children(schema)
    top["$defs"] = dict(sorted(defs.items()))
    return top


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    crd_dir = Path(sys.argv[1]) / "config" / "crd" / "full"
    out_dir = Path(__file__).resolve().parent
    for name, file in CRDS.items():
        crd = yaml.safe_load((crd_dir / file).read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
        schema = factor(strip(version["schema"]["openAPIV3Schema"]))
        document = {
            "group": crd["spec"]["group"],
            "kind": crd["spec"]["names"]["kind"],
            "version": version["name"],
            "scope": crd["spec"]["scope"],
            "openAPIV3Schema": schema,
        }
        target = out_dir / f"{name}.json"
        target.write_text(json.dumps(document, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"wrote {target.name}: {target.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
