#!/usr/bin/env python3
"""Validates the deployment manifests under deploy/ offline; exits 1 on any failure.

- Every kustomization under deploy/kubernetes: the files it names exist (and lie at or
  below it, as kustomize requires); it renders, with the subset of kustomize it uses
  (resources, configMapGenerator, strategic-merge patches, replicas, images), which this
  script implements, and, where kubectl is installed, the rendering equals
  `kubectl kustomize`'s. The plugin ConfigMaps render from the staged plugins, else the
  built ones (plugins/*.wasm), else placeholders.
- Every rendered object, and every manifest no kustomization names, against the
  Kubernetes JSON schemas kubernetes-validate bundles, strict (unknown fields fail), for
  the Kubernetes versions in KUBERNETES_VERSIONS.
- What the schemas cannot know: the modelyard.toml inside the ConfigMap parses, has only
  the sections and keys the server reads (host/src/config), and agrees with the pod (ports,
  mounts, writable paths, probes, the grace period, shared state for several replicas);
  the flags file and the plugins it names are there; the command line uses the binary's
  flags (host/src/main.rs); the autoscaler's custom metric is one the server exports.
- Plugins: every ConfigMap fits 1 MiB (an oversized plugin in one fails); a standard
  plugin no ConfigMap holds is one too large for any (flagd: examples/plugins-from-image
  brings it from an image); deploy/kubernetes/stage-plugins, run on a scratch copy, stages
  exactly the plugins the generators name and refuses, staging nothing, one over 1 MiB.
- The KServe custom resources against the openAPIV3Schema of KServe's CRDs
  (tests/deploy/schemas), closed as the API server's strict field validation closes them,
  their metadata against Kubernetes' ObjectMeta, and against the runtime's contract.
- Negative checks: broken copies of the manifests must fail each kind of check above, so
  that a check that cannot fail is caught.
"""

import base64
import copy
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate.utils import schema_contents

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
HOST = ROOT / "host" / "src"
# The scratch copy of deploy/kubernetes that is rendered (with plugin files in place).
WORK = None

# 1.31: the oldest release the manifests are written for (the preStop sleep action is on
# by default from 1.30); 1.35: a recent one, so that a removed API shows.
KUBERNETES_VERSIONS = ("1.31", "1.35")
# The overlays and examples that are whole deployments, and what each must be.
DEPLOYMENTS = {
    "overlays/single": {"replicas": 1, "cluster": False},
    "overlays/cluster": {"replicas": 3, "cluster": True},
    "examples/hpa-inflight": {"replicas": 3, "cluster": True},
    "examples/plugins-from-image": {"replicas": 3, "cluster": True},
}
# The top-level tables of modelyard.toml the server knows ([cluster]: shared state).
SECTIONS = {"server", "models", "plugins", "monitoring", "endpoints", "cluster"}
HEALTH = {"readiness": "/v2/health/ready", "liveness": "/v2/health/live"}
CONFIGMAP_LIMIT = 1024 * 1024
PLACEHOLDER_WASM = b"\0asm\r\0\x01\0\xff placeholder, not a component"


class Checks:
    """Named checks with their outcome; printed as they are made unless quiet."""

    def __init__(self, quiet=False):
        self.quiet = quiet
        self.failed = []
        self.passed = 0

    def that(self, ok, what, why=""):
        if ok:
            self.passed += 1
            if not self.quiet:
                print(f"  ok    {what}")
        else:
            self.failed.append(f"{what}: {why}" if why else what)
            if not self.quiet:
                print(f"  FAIL  {what}{': ' + why if why else ''}")
        return ok

    def section(self, title):
        if not self.quiet:
            print(f"\n{title}")


def rel(path):
    """path as the repository names it (the scratch copy of deploy/kubernetes included)."""
    path = Path(path)
    if WORK is not None and path.is_relative_to(WORK):
        return (Path("deploy/kubernetes") / path.relative_to(WORK)).as_posix()
    if path.is_relative_to(ROOT):
        return path.relative_to(ROOT).as_posix()
    return str(path)


def load_docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def key_of(obj):
    return (obj.get("apiVersion"), obj.get("kind"), obj.get("metadata", {}).get("name"))


# --- kustomize, the subset these manifests use -------------------------------------------


class KustomizeError(Exception):
    pass


KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "generatorOptions", "configMapGenerator",
    "patches", "replicas", "images",
}
GENERATOR_KEYS = {"name", "behavior", "files", "options"}
# patchMergeKey of the lists these patches touch; every other list is replaced whole, as
# in Kubernetes' strategic merge (e.g. projected.sources and an HPA's metrics are atomic).
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
    "volumeMounts": "mountPath", "imagePullSecrets": "name",
}


def inside(path, root):
    """kustomize's load restrictor: a file must resolve to a place at or below the root."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def named_files(directory):
    """Every file or directory a kustomization names, by role: [(role, path)]."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    named = [("resource", directory / r) for r in k.get("resources", [])]
    named += [("patch", directory / p["path"]) for p in k.get("patches", []) if "path" in p]
    for generator in k.get("configMapGenerator", []):
        for source in generator.get("files", []):
            named.append(("generator file", directory / source.split("=", 1)[-1]))
    return k, named


def strategic_merge(target, patch):
    for field, value in patch.items():
        if field.startswith("$"):
            if field == "$patch" and value in ("merge",):
                continue
            raise KustomizeError(f"patch directive {field}: {value} is not supported here")
        if value is None:
            target.pop(field, None)
        elif isinstance(value, dict) and isinstance(target.get(field), dict):
            if value.get("$patch") == "replace":
                target[field] = {k: copy.deepcopy(v) for k, v in value.items() if k != "$patch"}
            elif value.get("$patch") == "delete":
                target.pop(field)
            else:
                strategic_merge(target[field], value)
        elif isinstance(value, list) and isinstance(target.get(field), list) and (
            field in MERGE_KEYS or field == "ports"
        ):
            merge_key = MERGE_KEYS.get(field) or (
                "containerPort" if all("containerPort" in i for i in value) else "port"
            )
            # kustomize's order: the patch's items (merged into their originals), then the
            # originals it does not name.
            merged, named = [], set()
            for item in value:
                if not isinstance(item, dict) or merge_key not in item:
                    raise KustomizeError(f"{field} item without its merge key {merge_key}")
                named.add(item[merge_key])
                match = [e for e in target[field] if e.get(merge_key) == item[merge_key]]
                if item.get("$patch") == "delete":
                    continue
                if match:
                    strategic_merge(match[0], item)
                    merged.append(match[0])
                else:
                    merged.append(copy.deepcopy(item))
            target[field] = merged + [e for e in target[field] if e.get(merge_key) not in named]
        else:
            target[field] = copy.deepcopy(value)


def render(directory):
    """The objects `kustomize build directory` makes, for the features listed above."""
    directory = Path(directory)
    k, _ = named_files(directory)
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(
            f"{rel(directory)}: {sorted(unknown)} is outside the kustomize subset this "
            "validator renders; extend render() in tests/deploy/validate.py"
        )
    objects = []
    for resource in k.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            if not inside(path, directory):
                raise KustomizeError(f"{rel(path)} is outside {rel(directory)}")
            objects += load_docs(path)
        else:
            raise KustomizeError(f"{rel(directory)}: resource {resource} does not exist")
    defaults = k.get("generatorOptions", {})
    for generator in k.get("configMapGenerator", []):
        unknown = set(generator) - GENERATOR_KEYS
        if unknown:
            raise KustomizeError(f"configMapGenerator {generator.get('name')}: {sorted(unknown)}")
        options = {**defaults, **generator.get("options", {})}
        behavior = generator.get("behavior", "create")
        existing = [o for o in objects if key_of(o) == ("v1", "ConfigMap", generator["name"])]
        # A hashed name would be rewritten into every reference; these ConfigMaps are
        # updated in place instead (README.md, "Kubernetes"), so no generator may hash.
        if not options.get("disableNameSuffixHash") and not (behavior != "create" and existing):
            raise KustomizeError(
                f"configMapGenerator {generator['name']} must set disableNameSuffixHash: the "
                "ConfigMaps are updated in place, so that edits apply without a restart"
            )
        data, binary = {}, {}
        for source in generator.get("files", []):
            key, _, file = source.rpartition("=")
            path = directory / file
            if not path.is_file():
                raise KustomizeError(f"{rel(directory)}: generator file {file} does not exist")
            if not inside(path, directory):
                raise KustomizeError(f"{rel(path)} is outside {rel(directory)}: kustomize refuses it")
            content = path.read_bytes()
            key = key or PurePosixPath(file).name
            try:
                data[key] = content.decode("utf-8")
            except UnicodeDecodeError:
                binary[key] = base64.b64encode(content).decode()
        made = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}}
        if data:
            made["data"] = data
        if binary:
            made["binaryData"] = binary
        if behavior == "create":
            if existing:
                raise KustomizeError(f"ConfigMap {generator['name']} exists already")
            objects.append(made)
        elif behavior in ("replace", "merge"):
            if not existing:
                raise KustomizeError(f"ConfigMap {generator['name']} to {behavior} does not exist")
            if behavior == "replace":
                existing[0].pop("data", None)
                existing[0].pop("binaryData", None)
            for field in ("data", "binaryData"):
                if field in made:
                    existing[0].setdefault(field, {}).update(made[field])
        else:
            raise KustomizeError(f"configMapGenerator behavior {behavior}")
    for entry in k.get("patches", []):
        if set(entry) != {"path"}:
            raise KustomizeError(f"{rel(directory)}: only patches by path are rendered here")
        path = directory / entry["path"]
        if not path.is_file():
            raise KustomizeError(f"{rel(directory)}: patch {entry['path']} does not exist")
        if not inside(path, directory):
            raise KustomizeError(f"{rel(path)} is outside {rel(directory)}")
        for patch in load_docs(path):
            targets = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (patch.get("kind"), patch.get("metadata", {}).get("name"))]
            if len(targets) != 1 or targets[0]["apiVersion"] != patch.get("apiVersion"):
                raise KustomizeError(f"{rel(path)}: no single {patch.get('apiVersion')} {patch.get('kind')} {patch.get('metadata', {}).get('name')} to patch")
            if patch.get("$patch") == "delete":
                objects.remove(targets[0])
            else:
                strategic_merge(targets[0], {k: v for k, v in patch.items() if k != "$patch"})
    for entry in k.get("replicas", []):
        targets = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet") and o["metadata"]["name"] == entry["name"]]
        if not targets:
            raise KustomizeError(f"{rel(directory)}: replicas for {entry['name']}, which does not exist")
        for target in targets:
            target["spec"]["replicas"] = entry["count"]
    for entry in k.get("images", []):
        for obj in objects:
            spec = obj.get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                name, sep, tag = container["image"].rpartition(":")
                name, tag = (name, tag) if sep and "/" not in tag else (container["image"], "")
                if name == entry["name"]:
                    image = entry.get("newName", name)
                    tag = entry.get("newTag", tag)
                    container["image"] = image + (f"@{entry['digest']}" if "digest" in entry else f":{tag}" if tag else "")
    return objects


def kubectl_kustomize(directory):
    """`kubectl kustomize`'s objects, or None when no usable kubectl is installed."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    try:
        probe = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode != 0:
        return None
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {directory.name}: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


def comparable(obj):
    """obj with binaryData as one unbroken base64 string (kustomize wraps its lines)."""
    if "binaryData" not in obj:
        return obj
    obj = copy.deepcopy(obj)
    obj["binaryData"] = {k: base64.b64encode(base64.b64decode(v)).decode() for k, v in obj["binaryData"].items()}
    return obj


def staged_copy(workdir):
    """deploy/kubernetes copied to workdir, with a file for every plugin the generators
    name: the staged one, else the built one, else a placeholder. Returns where each came
    from."""
    shutil.copytree(KUBE, workdir, ignore=shutil.ignore_patterns("*.wasm"))
    k, named = named_files(KUBE / "plugins")
    sources = {}
    for role, path in named:
        if role != "generator file" or not path.name.endswith(".wasm"):
            continue
        for candidate, kind in ((path, "staged"), (ROOT / "plugins" / path.name, "built")):
            if candidate.is_file():
                shutil.copyfile(candidate, workdir / "plugins" / path.name)
                sources[path.name] = (kind, candidate.stat().st_size)
                break
        else:
            (workdir / "plugins" / path.name).write_bytes(PLACEHOLDER_WASM)
            sources[path.name] = ("placeholder", None)
    return sources


# --- Kubernetes schemas ------------------------------------------------------------------


def schema_problem(obj, version):
    """Why kubernetes-validate (strict) refuses obj, or None."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return e.message
    return None


def object_meta_validator(version):
    """A validator of ObjectMeta alone, from the schemas kubernetes-validate bundles."""
    directory = f"kubernetes-json-schema/v{version}.0-local-strict"
    schema = schema_contents(f"{directory}/objectmeta-meta-v1.json", version)
    definitions = schema_contents(f"{directory}/_definitions.json", version)
    registry = referencing.Resource.from_contents(schema) @ referencing.Registry()
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


# --- what the schemas cannot know --------------------------------------------------------


def rust_sources():
    """The host's sources, host/src/config first: struct names resolve there first."""
    paths = sorted(HOST.rglob("*.rs"), key=lambda p: (not p.is_relative_to(HOST / "config"), p))
    return {p: p.read_text() for p in paths}


def struct_fields(sources, name):
    """The serde field names of `pub struct name`, or None where no such struct is."""
    for text in sources.values():
        m = re.search(r"pub struct %s\s*\{(.*?)\n\}" % re.escape(name), text, re.S)
        if m:
            fields, rename = {}, None
            for line in m.group(1).splitlines():
                r = re.search(r'#\[serde\([^)]*rename\s*=\s*"([^"]+)"', line)
                if r:
                    rename = r.group(1)
                f = re.match(r"\s*pub (\w+):\s*(.+?),?\s*$", line)
                if f:
                    fields[rename or f.group(1)] = f.group(2)
                    rename = None
            return fields
    return None


def inner_type(rust_type):
    """The struct a field's type holds: Option<X>, Vec<X>, BTreeMap<String, X> → X."""
    t = rust_type.strip()
    while True:
        m = re.fullmatch(r"(?:Option|Vec|Box)<(.+)>", t) or re.fullmatch(r"(?:BTreeMap|HashMap)<\s*String\s*,\s*(.+)>", t)
        if not m:
            return t
        t = m.group(1).strip()


def config_key_problems(sources, table, struct, where):
    """Keys of `table` that `struct` has no field for (serde refuses them: deny_unknown_fields)."""
    fields = struct_fields(sources, struct)
    if fields is None:
        return []
    problems = []
    for key, value in table.items():
        if key not in fields:
            problems.append(f"{where}.{key} is not a key of {struct}")
            continue
        inner = inner_type(fields[key])
        keyed = re.match(r"(?:BTreeMap|HashMap)<", fields[key].strip().removeprefix("Option<"))
        values = value.values() if keyed and isinstance(value, dict) else value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, dict) and struct_fields(sources, inner) is not None:
                problems += config_key_problems(sources, v, inner, f"{where}.{key}")
    return problems


def cli_flags(main_rs):
    """Long flags of the binary's command line, and its subcommands."""
    flags = set()
    for attrs, field in re.findall(r"#\[arg\(([^\]]*)\)\]\s*(\w+)\s*:", main_rs):
        named = re.search(r'long\s*=\s*"([^"]+)"', attrs)
        if named:
            flags.add(named.group(1))
        elif re.search(r"\blong\b", attrs):
            flags.add(field.replace("_", "-"))
    commands = re.search(r"enum Command\s*\{(.*?)\n\}", main_rs, re.S)
    subcommands = {v.lower() for v in re.findall(r"^\s{4}(\w+)\s*\{", commands.group(1), re.M)} if commands else set()
    return flags, subcommands


def exported_metrics(sources):
    text = sources.get(HOST / "telemetry" / "metrics.rs", "")
    prefix = re.search(r'Registry::with_prefix\("(\w+)"\)', text)
    names = re.findall(r'register\(\s*&mut \w+,\s*"(\w+)",\s*"[^"]*",\s*(\w+)', text)
    if not prefix:
        return set()
    exported = set()
    for name, kind in names:
        full = f"{prefix.group(1)}_{name}"
        exported.add(full if kind.startswith("Gauge") or kind.startswith("Histogram") else f"{full}_total")
        exported.add(full)
    return exported


def pod_spec(obj):
    return obj.get("spec", {}).get("template", {}).get("spec", {})


def find(objects, kind, name=None):
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def port_number(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def configmap_files(objects, volume):
    """{file name: (ConfigMap, key)} that a configMap or projected volume shows."""
    sources = []
    if "configMap" in volume:
        sources = [{"configMap": volume["configMap"]}]
    elif "projected" in volume:
        sources = volume["projected"].get("sources", [])
    files = {}
    for source in sources:
        ref = source.get("configMap")
        if not ref:
            continue
        for cm in find(objects, "ConfigMap", ref["name"]):
            keys = {**cm.get("data", {}), **cm.get("binaryData", {})}
            items = ref.get("items") or [{"key": k, "path": k} for k in keys]
            for item in items:
                files[item["path"]] = (cm, item["key"])
    return files


def configmap_text(cm, key):
    if key in cm.get("data", {}):
        return cm["data"][key]
    return base64.b64decode(cm["binaryData"][key]).decode("utf-8")


def mount_for(container, volumes, path):
    """The deepest mount at or above path: (mount, volume), or (None, None)."""
    best = (None, None)
    for mount in container.get("volumeMounts", []):
        m = PurePosixPath(mount["mountPath"])
        p = PurePosixPath(path)
        if (p == m or m in p.parents) and (best[0] is None or len(m.parts) > len(PurePosixPath(best[0]["mountPath"]).parts)):
            best = (mount, volumes.get(mount["name"]))
    return best


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_deployment(c, objects, expect, sources, label):
    """The Modelyard Deployment of one rendered overlay against its configuration."""
    deployments = find(objects, "Deployment", "modelyard")
    if not c.that(len(deployments) == 1, f"{label}: one Deployment modelyard"):
        return None
    deployment = deployments[0]
    spec = pod_spec(deployment)
    containers = {x["name"]: x for x in spec.get("containers", [])}
    server = containers.get("modelyard")
    if not c.that(server is not None, f"{label}: container modelyard"):
        return None
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    # The command line.
    main_rs = (HOST / "main.rs").read_text()
    flags, subcommands = cli_flags(main_rs)
    args = server.get("args", [])
    c.that(server.get("command") == ["/modelyard"], f"{label}: runs /modelyard", str(server.get("command")))
    c.that(args[:1] == ["serve"] and "serve" in subcommands, f"{label}: `modelyard serve`", str(args))
    used = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    c.that(all(f[2:] in flags for f in used), f"{label}: flags {used} are the binary's", f"known: {sorted(flags)}")
    config_path = args[args.index("--config") + 1] if "--config" in args else None
    if not c.that(config_path is not None, f"{label}: --config names the configuration"):
        return None

    # The configuration file, as the pod sees it.
    mount, volume = mount_for(server, volumes, config_path)
    files = configmap_files(objects, volume or {}) if mount and PurePosixPath(config_path).parent == PurePosixPath(mount["mountPath"]) else {}
    name = PurePosixPath(config_path).name
    if not c.that(name in files, f"{label}: {config_path} comes from a ConfigMap mounted there"):
        return None
    cm, key = files[name]
    try:
        config = tomllib.loads(configmap_text(cm, key))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        c.that(False, f"{label}: {cm['metadata']['name']}/{key} parses as TOML", str(e))
        return None
    c.that(True, f"{label}: {cm['metadata']['name']}/{key} parses as TOML")
    check_config(c, config, label, sources)
    server_cfg = config.get("server", {})
    grace_cfg = server_cfg.get("shutdown_grace_seconds", 30)

    # Ports, probes, shutdown.
    listen = server_cfg.get("listen", "127.0.0.1:8080")
    host, _, port = listen.rpartition(":")
    c.that(host in ("0.0.0.0", "[::]"), f"{label}: server.listen {listen} takes connections from other pods")
    c.that(port_number(server, "http") == int(port), f"{label}: container port http is server.listen's {port}")
    metrics_listen = config.get("monitoring", {}).get("metrics_listen")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    if metrics_listen:
        mport = int(metrics_listen.rpartition(":")[2])
        c.that(port_number(server, "metrics") == mport, f"{label}: container port metrics is monitoring.metrics_listen's {mport}")
        c.that(annotations.get("prometheus.io/port") == str(mport), f"{label}: pods are scraped on the metrics port")
    for probe, path in HEALTH.items():
        p = server.get(f"{probe}Probe", {}).get("httpGet", {})
        c.that(p.get("path") == path and port_number(server, p.get("port")) == int(port),
               f"{label}: {probe} probe GET {path} on {port}", f"{p.get('path')} on {p.get('port')}")
    pre_stop = server.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    c.that(pre_stop > 0, f"{label}: a preStop sleep lets endpoints drop the pod before SIGTERM")
    c.that(grace >= pre_stop + grace_cfg,
           f"{label}: terminationGracePeriodSeconds {grace} >= preStop {pre_stop} + shutdown_grace_seconds {grace_cfg}")
    timeout = server_cfg.get("request_timeout_ms", 60000)
    c.that(0 < timeout <= grace_cfg * 1000,
           f"{label}: request_timeout_ms {timeout} within shutdown_grace_seconds, so a drained request is answered")
    strategy = deployment["spec"].get("strategy", {})
    c.that(strategy.get("type", "RollingUpdate") == "RollingUpdate" and strategy.get("rollingUpdate", {}).get("maxUnavailable") == 0,
           f"{label}: rolling update with maxUnavailable 0")

    # Security and resources.
    pod_security = spec.get("securityContext", {})
    c.that(pod_security.get("runAsNonRoot") is True and pod_security.get("runAsUser") == 65532,
           f"{label}: runs as non-root uid 65532")
    for x in spec.get("containers", []) + spec.get("initContainers", []):
        sc = x.get("securityContext", {})
        c.that(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False,
               f"{label}: container {x['name']}: read-only root, no privilege escalation")
        res = x.get("resources", {})
        c.that("cpu" in res.get("requests", {}) and "memory" in res.get("requests", {}) and "memory" in res.get("limits", {}),
               f"{label}: container {x['name']}: cpu and memory requests, memory limit")

    # Where the configuration points, in the pod.
    def writable(path, what):
        m, v = mount_for(server, volumes, path)
        c.that(m is not None and not m.get("readOnly") and v is not None and "emptyDir" in v,
               f"{label}: {what} {path} is on a writable emptyDir")
        return m

    models = config.get("models", {}).get("dir")
    c.that(models is not None and any(m["mountPath"] == models for m in server.get("volumeMounts", [])),
           f"{label}: models.dir {models} is a mounted volume")
    plugins_dir = config.get("plugins", {}).get("dir")
    c.that(plugins_dir is not None and any(m["mountPath"] == plugins_dir for m in server.get("volumeMounts", [])),
           f"{label}: plugins.dir {plugins_dir} is a mounted volume")
    cache = config.get("plugins", {}).get("cache_dir")
    if c.that(cache is not None, f"{label}: plugins.cache_dir is set (HOME is on the read-only root)"):
        m = writable(cache, "plugins.cache_dir")
        c.that(m is None or PurePosixPath(cache) != PurePosixPath(m["mountPath"]),
               f"{label}: plugins.cache_dir is below the emptyDir, not its world-writable root")
    database = config.get("monitoring", {}).get("database", "modelyard.db")
    if database:
        c.that(PurePosixPath(database).is_absolute(), f"{label}: monitoring.database is absolute")
        writable(database, "monitoring.database")

    # Every ConfigMap a volume needs is there, and each fits.
    for v in spec.get("volumes", []):
        refs = [v["configMap"]] if "configMap" in v else [s["configMap"] for s in v.get("projected", {}).get("sources", []) if "configMap" in s]
        for ref in refs:
            c.that(ref.get("optional") or find(objects, "ConfigMap", ref["name"]),
                   f"{label}: ConfigMap {ref['name']} of volume {v['name']} exists")
    for cm in find(objects, "ConfigMap"):
        size = sum(len(t.encode()) for t in cm.get("data", {}).values())
        size += sum(len(base64.b64decode(b)) for b in cm.get("binaryData", {}).values())
        c.that(size <= CONFIGMAP_LIMIT, f"{label}: ConfigMap {cm['metadata']['name']} is {size} bytes, within 1 MiB")

    # Plugins and flag files the endpoints name.
    plugin_files = {}
    m, v = mount_for(server, volumes, plugins_dir or "/")
    if m and m["mountPath"] == plugins_dir and v and ("projected" in v or "configMap" in v):
        plugin_files = configmap_files(objects, v)
    elif m and v and "emptyDir" in v:
        filled = [i["name"] for i in spec.get("initContainers", []) if any(im["name"] == m["name"] for im in i.get("volumeMounts", []))]
        c.that(bool(filled), f"{label}: plugins.dir is filled by init container {filled}")
        plugin_files = None
    for endpoint, e in config.get("endpoints", {}).items():
        refs = ([e["router"]] if "router" in e else []) + e.get("processors", []) + e.get("flags", [])
        for ref in refs:
            if plugin_files is not None:
                c.that(f"{ref['plugin']}.wasm" in plugin_files, f"{label}: endpoint {endpoint}: plugin {ref['plugin']}.wasm is in plugins.dir")
            if "config_file" in ref:
                f = ref["config_file"]
                fm, fv = mount_for(server, volumes, f)
                shown = configmap_files(objects, fv) if fm and PurePosixPath(f).parent == PurePosixPath(fm["mountPath"]) else {}
                if c.that(PurePosixPath(f).name in shown, f"{label}: endpoint {endpoint}: {f} is mounted from a ConfigMap"):
                    text = configmap_text(*shown[PurePosixPath(f).name])
                    if ref["plugin"] == "flagd":
                        check_flags(c, text, e.get("flag_routing"), f"{label}: {f}")

    # Service, disruption budget, autoscaler, shared state.
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    c.that(selects(deployment["spec"]["selector"].get("matchLabels"), labels), f"{label}: the Deployment selects its pods")
    for svc in find(objects, "Service", "modelyard"):
        c.that(selects(svc["spec"].get("selector"), labels), f"{label}: Service modelyard selects the pods")
        for p in svc["spec"]["ports"]:
            c.that(port_number(server, p.get("targetPort", p["port"])) is not None, f"{label}: Service port {p['name']} reaches a container port")
    c.that(len(find(objects, "Service", "modelyard")) == 1, f"{label}: Service modelyard")
    for pdb in find(objects, "PodDisruptionBudget"):
        c.that(selects(pdb["spec"]["selector"].get("matchLabels"), labels), f"{label}: PodDisruptionBudget {pdb['metadata']['name']} selects the pods")
    hpas = find(objects, "HorizontalPodAutoscaler")
    replicas = deployment["spec"].get("replicas", 1)
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        c.that(target.get("kind") == "Deployment" and target.get("name") == "modelyard", f"{label}: the autoscaler scales Deployment modelyard")
        # An applied count would reset the autoscaler's, or conflict with its ownership of
        # the field under server-side apply.
        c.that("replicas" not in deployment["spec"], f"{label}: the Deployment leaves its replica count to the autoscaler",
               f"spec.replicas is {deployment['spec'].get('replicas')}")
        lo, hi = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
        c.that(lo <= hi, f"{label}: the autoscaler's range {lo}..{hi}")
        replicas = lo
        exported = exported_metrics(sources)
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] == "Pods":
                name = metric["pods"]["metric"]["name"]
                c.that(name in exported, f"{label}: autoscaler metric {name} is one the server exports (host/src/telemetry)")
    c.that(replicas == expect["replicas"], f"{label}: replicas from {expect['replicas']}", str(replicas))
    shared = config.get("cluster", {}).get("redis_url")
    c.that(bool(shared) == expect["cluster"], f"{label}: [cluster] redis_url {'set' if expect['cluster'] else 'absent'}")
    c.that(shared or (replicas == 1 and not hpas), f"{label}: more than one replica only with shared state ([cluster])")
    if shared:
        m = re.fullmatch(r"redis://([a-z0-9.-]+):(\d+)/?\d*", shared)
        svc = find(objects, "Service", m.group(1).split(".")[0]) if m else []
        if c.that(bool(svc) and any(p["port"] == int(m.group(2)) for p in svc[0]["spec"]["ports"]),
                  f"{label}: {shared} is a Service of this deployment"):
            backing = [d for d in find(objects, "Deployment") if selects(svc[0]["spec"]["selector"], d["spec"]["template"]["metadata"].get("labels", {}))]
            c.that(bool(backing), f"{label}: a Deployment serves {svc[0]['metadata']['name']}")
    return config


def check_config(c, config, label, sources):
    sections = set(config)
    c.that(sections <= SECTIONS, f"{label}: modelyard.toml sections {sorted(sections)} are known", f"unknown: {sorted(sections - SECTIONS)}")
    fields = struct_fields(sources, "Config") or {}
    for section in sorted(sections & SECTIONS):
        if section not in fields:
            print(f"  note  {label}: [{section}] is not in host's Config yet: the server refuses this file until it is")
            continue
        struct = inner_type(fields[section])
        table = config[section]
        if section == "endpoints":
            problems = [p for name, e in table.items() for p in config_key_problems(sources, e, struct, f"endpoints.{name}")]
        else:
            problems = config_key_problems(sources, table, struct, section)
        c.that(not problems, f"{label}: [{section}] keys are {struct}'s", "; ".join(problems))


def check_flags(c, text, routing, label):
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        c.that(False, f"{label} is JSON", str(e))
        return
    flags = document.get("flags", {})
    for name, flag in flags.items():
        c.that(flag.get("state") in ("ENABLED", "DISABLED") and flag.get("defaultVariant") in flag.get("variants", {}),
               f"{label}: flag {name} has a state and a default among its variants")
    if routing:
        c.that(routing["flag"] in flags, f"{label}: flag_routing's flag {routing['flag']} is defined")


def without(config, *paths):
    config = copy.deepcopy(config)
    for path in paths:
        *parents, last = path.split(".")
        table = config
        for p in parents:
            table = table.get(p, {})
        table.pop(last, None)
    return config


def config_of(objects):
    deployment = find(objects, "Deployment", "modelyard")[0]
    server = [x for x in pod_spec(deployment)["containers"] if x["name"] == "modelyard"][0]
    args = server["args"]
    path = args[args.index("--config") + 1]
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    _, volume = mount_for(server, volumes, path)
    return tomllib.loads(configmap_text(*configmap_files(objects, volume)[PurePosixPath(path).name]))


# --- KServe ------------------------------------------------------------------------------


def closed(schema):
    """The CRD schema as the API server applies it with strict field validation: an object
    with properties and neither additionalProperties nor x-kubernetes-preserve-unknown-fields
    takes no other field; int-or-string is an integer or a string."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("enum", "required", "default", "x-kubernetes-list-map-keys"):
            out[key] = value
        elif key == "properties":
            out[key] = {name: closed(v) for name, v in value.items()}
        else:
            out[key] = closed(value)
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def kserve_validator(file):
    vendored = json.loads((SCHEMAS / file).read_text())
    schema = closed(vendored["openAPIV3Schema"])
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return vendored, jsonschema.Draft202012Validator(schema)


def kserve_problems(obj, vendored, validator, meta):
    problems = []
    api = f"{vendored['group']}/{vendored['version']}"
    if obj.get("apiVersion") != api or obj.get("kind") != vendored["kind"]:
        problems.append(f"not a {api} {vendored['kind']}")
    for e in validator.iter_errors(obj):
        problems.append(f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}")
    for e in meta.iter_errors(obj.get("metadata", {})):
        problems.append(f"metadata.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}")
    if vendored["scope"] == "Cluster" and "namespace" in obj.get("metadata", {}):
        problems.append("a cluster-scoped resource with a namespace")
    return problems


def check_runtime(c, runtime, isvc):
    spec = runtime["spec"]
    onnx = [f for f in spec.get("supportedModelFormats", []) if f["name"] == "onnx"]
    c.that(onnx and onnx[0].get("autoSelect") is True and onnx[0].get("version") == "1",
           "runtime: supports onnx version 1, autoSelect")
    c.that(spec.get("protocolVersions") == ["v2"], "runtime: protocol v2")
    containers = spec["containers"]
    c.that([x["name"] for x in containers] == ["kserve-container"], "runtime: one container, kserve-container")
    x = containers[0]
    args = x.get("args", [])
    flags, subcommands = cli_flags((HOST / "main.rs").read_text())
    used = [a for a in args if a.startswith("--")]
    c.that(x.get("command") == ["/modelyard"] and args[:1] == ["serve"] and "serve" in subcommands, "runtime: runs `/modelyard serve`")
    c.that(all(f[2:] in flags for f in used), f"runtime: flags {used} are the binary's")
    value = lambda flag: args[args.index(flag) + 1] if flag in args else None  # noqa: E731
    c.that(value("--models") == "/mnt/models", "runtime: models from /mnt/models, where the storage initializer puts them")
    listen = value("--listen") or ""
    c.that(listen == "0.0.0.0:8080" and [p["containerPort"] for p in x.get("ports", [])] == [8080], "runtime: listens on 0.0.0.0:8080, its one port")
    for probe, path in HEALTH.items():
        c.that(x.get(f"{probe}Probe", {}).get("httpGet", {}).get("path") == path, f"runtime: {probe} probe GET {path}")
    sc = x.get("securityContext", {})
    c.that(sc.get("readOnlyRootFilesystem") and sc.get("runAsNonRoot") and sc.get("runAsUser") == 65532, "runtime: non-root uid 65532, read-only root")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    work, volume = mount_for(x, volumes, x.get("workingDir", "/"))
    c.that(work is not None and work["mountPath"] == x.get("workingDir") and volume and "emptyDir" in volume,
           "runtime: the working directory (plugins dir, database by default) is an emptyDir")
    cache = {e["name"]: e.get("value") for e in x.get("env", [])}.get("XDG_CACHE_HOME")
    m, v = mount_for(x, volumes, cache or "/")
    c.that(cache and m is not None and v and "emptyDir" in v, "runtime: XDG_CACHE_HOME (the plugin cache) is on the emptyDir")
    model = isvc["spec"]["predictor"].get("model", {})
    c.that(model.get("runtime") == runtime["metadata"]["name"], "inferenceservice: names the modelyard runtime")
    c.that(model.get("modelFormat", {}).get("name") == "onnx", "inferenceservice: model format onnx")
    c.that(model.get("protocolVersion", "v2") == "v2", "inferenceservice: protocol v2")
    c.that(bool(model.get("storageUri")), "inferenceservice: a storageUri")


# --- the run -----------------------------------------------------------------------------


def kubernetes_section(c, workdir, sources):
    """Renders and checks deploy/kubernetes; returns {deployment dir: objects}."""
    c.section("Kustomizations: the files they name")
    kustomizations = sorted(p.parent for p in workdir.rglob("kustomization.yaml"))
    named_anywhere = set()
    for directory in kustomizations:
        _, named = named_files(directory)
        for role, path in named:
            named_anywhere.add(path.resolve())
            exists = path.exists()
            within = path.is_dir() or inside(path, directory)
            c.that(exists and within, f"{rel_k(directory)}: {role} {path.relative_to(directory) if within else path} exists at or below it",
                   "missing" if not exists else "outside the kustomization: kustomize refuses it")

    c.section("Rendering (this validator's kustomize subset; compared with kubectl kustomize where installed)")
    rendered = {}
    have_kubectl = True
    for directory in kustomizations:
        label = rel_k(directory)
        try:
            objects = render(directory)
        except KustomizeError as e:
            c.that(False, f"{label}: renders", str(e))
            continue
        names = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
        c.that(True, f"{label}: renders: {names}")
        rendered[label] = objects
        if have_kubectl:
            try:
                reference = kubectl_kustomize(directory)
            except KustomizeError as e:
                c.that(False, f"{label}: kubectl kustomize renders it", str(e))
                continue
            if reference is None:
                have_kubectl = False
                print("  skip  kubectl is not installed: no comparison with kubectl kustomize")
                continue
            ours = sorted(canonical(comparable(o)) for o in objects)
            theirs = sorted(canonical(comparable(o)) for o in reference)
            differing = sorted({f"{k[1]}/{k[2]}" for o in set(ours) ^ set(theirs) for k in [key_of(json.loads(o))]})
            c.that(ours == theirs, f"{label}: same objects as kubectl kustomize", f"differ: {differing}")

    c.section(f"Kubernetes schemas, strict, Kubernetes {' and '.join(KUBERNETES_VERSIONS)} (kubernetes-validate {kubernetes_validate.__version__})")
    seen = set()
    for label, objects in rendered.items():
        for obj in objects:
            text = canonical(obj)
            if text in seen:
                continue
            seen.add(text)
            for version in KUBERNETES_VERSIONS:
                problem = schema_problem(obj, version)
                c.that(problem is None, f"{label}: {obj['kind']}/{obj['metadata']['name']} valid for {version}", problem)
    for path in sorted(workdir.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.resolve() in named_anywhere:
            continue
        for obj in load_docs(path):
            for version in KUBERNETES_VERSIONS:
                problem = schema_problem(obj, version)
                c.that(problem is None, f"{path.relative_to(workdir)} (no kustomization names it): {obj['kind']}/{obj['metadata']['name']} valid for {version}", problem)

    c.section("Plugins in the ConfigMaps")
    for name, (kind, size) in sorted(sources.items()):
        if kind == "placeholder":
            print(f"  note  {name}: neither staged nor built (plugins/build): rendered from a placeholder, size unchecked")
        else:
            c.that(size <= CONFIGMAP_LIMIT, f"{name} ({kind}) is {size} bytes, within a ConfigMap's 1 MiB")
        crate = ROOT / "plugins" / name.removesuffix(".wasm") / "Cargo.toml"
        c.that(crate.is_file(), f"{name} is a plugin this repository builds (plugins/{name.removesuffix('.wasm')})")
    # The standard plugins no ConfigMap holds: only those too large for one, which come from
    # an image (examples/plugins-from-image); a plugin that fits is a ConfigMap, for live
    # updates.
    for crate in sorted((ROOT / "plugins").glob("*/Cargo.toml")):
        name = f"{crate.parent.name}.wasm"
        if name in sources:
            continue
        built = ROOT / "plugins" / name
        if not built.is_file():
            print(f"  note  {name}: in no ConfigMap, and not built (plugins/build): its size, which decides, unchecked")
            continue
        size = built.stat().st_size
        c.that(size > CONFIGMAP_LIMIT,
               f"{name} (built) is in no ConfigMap: at {size} bytes it is over a ConfigMap's 1 MiB, "
               "so only examples/plugins-from-image brings it",
               "it fits a ConfigMap: name it in plugins/kustomization.yaml and the Deployment's projected volume")
    return rendered


def rel_k(directory):
    """A kustomization's name: its directory below deploy/kubernetes."""
    return Path(directory).relative_to(WORK).as_posix()



def deployments_section(c, rendered, sources):
    c.section("The deployments against their configuration and the server")
    configs = {}
    for label, expect in DEPLOYMENTS.items():
        objects = rendered.get(label)
        if not c.that(objects is not None, f"{label}: rendered"):
            continue
        configs[label] = check_deployment(c, objects, expect, sources, label)
    single = rendered.get("overlays/single", [])
    c.that(not find(single, "HorizontalPodAutoscaler") and not find(single, "Deployment", "redis"), "overlays/single: no autoscaler, no Redis")
    cluster = rendered.get("overlays/cluster", [])
    hpa = find(cluster, "HorizontalPodAutoscaler", "modelyard")
    c.that(hpa and hpa[0]["spec"].get("minReplicas") == 3, "overlays/cluster: autoscaler from 3 replicas")
    c.that(bool(find(cluster, "Deployment", "redis")) and bool(find(cluster, "Service", "redis")), "overlays/cluster: Redis Deployment and Service")
    base = config_of(rendered["base"]) if "base" in rendered else None
    if base is not None:
        # The overlays' copies of modelyard.toml may differ from the base's only where
        # they mean to.
        for label, drop in (("overlays/single", ()), ("overlays/cluster", ("cluster",)),
                            ("examples/hpa-inflight", ("cluster",)),
                            ("examples/plugins-from-image", ("cluster", "plugins.dir", "endpoints.iris-flags"))):
            if configs.get(label) is not None:
                c.that(without(configs[label], *drop) == without(base, *[d for d in drop if d not in ("cluster", "endpoints.iris-flags")]),
                       f"{label}: modelyard.toml is the base's{' but for ' + ', '.join(drop) if drop else ''}")

    image = configs.get("examples/plugins-from-image") or {}
    flagged = [name for name, e in image.get("endpoints", {}).items() if any(f.get("plugin") == "flagd" for f in e.get("flags", []))]
    c.that(bool(flagged), "examples/plugins-from-image: an endpoint routes by flagd flags (the plugin no ConfigMap can hold)")

    adapter = KUBE / "examples" / "hpa-inflight" / "prometheus-adapter-rules.yaml"
    hpa = find(rendered.get("examples/hpa-inflight", []), "HorizontalPodAutoscaler", "modelyard")
    wanted = {m["pods"]["metric"]["name"] for m in hpa[0]["spec"]["metrics"] if m["type"] == "Pods"} if hpa else set()
    served = set()
    for doc in load_docs(adapter):
        for rule in yaml.safe_load(doc["data"]["config.yaml"]).get("rules", []):
            series = re.match(r"\s*'?(\w+)", rule["seriesQuery"]).group(1)
            served.add(rule.get("name", {}).get("as", series))
            c.that(series in exported_metrics(sources), f"prometheus adapter rule: series {series} is exported by the server")
            c.that({"namespace", "pod"} <= set(rule["resources"]["overrides"]), "prometheus adapter rule: maps namespace and pod")
    c.that(bool(wanted) and wanted <= served, f"examples/hpa-inflight: the autoscaler's metrics {sorted(wanted)} are served by the adapter rule")


def kserve_section(c):
    c.section("KServe custom resources against KServe's CRD schemas (tests/deploy/schemas), closed as strict field validation closes them")
    meta = object_meta_validator(KUBERNETES_VERSIONS[0])
    found = {}
    for path in sorted(KSERVE.glob("*.yaml")):
        for obj in load_docs(path):
            file = {"ClusterServingRuntime": "clusterservingruntime.json", "InferenceService": "inferenceservice.json"}.get(obj.get("kind"))
            if not c.that(file is not None, f"{path.name}: {obj.get('kind')} has a vendored schema"):
                continue
            vendored, validator = kserve_validator(file)
            problems = kserve_problems(obj, vendored, validator, meta)
            c.that(not problems, f"{path.name}: {obj['kind']}/{obj['metadata']['name']} valid", "; ".join(problems[:5]))
            found[obj["kind"]] = obj
    c.section("KServe: the runtime's contract")
    if "ClusterServingRuntime" in found and "InferenceService" in found:
        check_runtime(c, found["ClusterServingRuntime"], found["InferenceService"])
    else:
        c.that(False, "both a ClusterServingRuntime and an InferenceService")
    return found


def negative_section(c, rendered, kserve, sources):
    """Broken copies that must fail: each proves a kind of check can fail."""
    c.section("Negative checks: broken copies must be refused")

    def refused(what, problems, because):
        """problems must hold one that contains `because`: refused, and for that reason."""
        problems = problems if isinstance(problems, list) else [problems] if problems else []
        reason = [p for p in problems if because in p]
        c.that(bool(reason), f"refused: {what}",
               f"refused for another reason: {problems[0]}" if problems else "accepted: this check cannot fail")
        if reason and not c.quiet:
            print(f"          ({reason[0]})")

    meta = object_meta_validator(KUBERNETES_VERSIONS[0])
    runtime = kserve.get("ClusterServingRuntime")
    if runtime:
        vendored, validator = kserve_validator("clusterservingruntime.json")
        broken = copy.deepcopy(runtime)
        broken["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
        refused("ClusterServingRuntime with a string containerPort", kserve_problems(broken, vendored, validator, meta), "containerPort: '8080' is not of type")
        broken = copy.deepcopy(runtime)
        broken["spec"]["supportedModelFormat"] = broken["spec"].pop("supportedModelFormats")
        refused("ClusterServingRuntime with spec.supportedModelFormat (misspelt)", kserve_problems(broken, vendored, validator, meta), "'supportedModelFormat' was unexpected")
        broken = copy.deepcopy(runtime)
        broken["metadata"]["lables"] = {"a": "b"}
        refused("ClusterServingRuntime with metadata.lables (misspelt)", kserve_problems(broken, vendored, validator, meta), "'lables' was unexpected")
    isvc = kserve.get("InferenceService")
    if isvc:
        vendored, validator = kserve_validator("inferenceservice.json")
        broken = copy.deepcopy(isvc)
        del broken["spec"]["predictor"]["model"]["modelFormat"]["name"]
        refused("InferenceService whose modelFormat has no name", kserve_problems(broken, vendored, validator, meta), "'name' is a required property")

    objects = rendered.get("overlays/cluster")
    if not objects:
        c.that(False, "negative checks need overlays/cluster rendered")
        return
    deployment = find(objects, "Deployment", "modelyard")[0]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    refused("Deployment with imagePullPolicyy (misspelt), strict", schema_problem(broken, KUBERNETES_VERSIONS[0]), "'imagePullPolicyy' was unexpected")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "three"
    refused("Deployment with replicas: \"three\"", schema_problem(broken, KUBERNETES_VERSIONS[0]), "spec.replicas: 'three' is not of type")

    def deployment_problems(mutate_objects):
        quiet = Checks(quiet=True)
        variant = copy.deepcopy(objects)
        mutate_objects(variant)
        check_deployment(quiet, variant, DEPLOYMENTS["overlays/cluster"], sources, "broken")
        return quiet.failed

    def set_toml(variant, edit):
        cm = find(variant, "ConfigMap", "modelyard-config")[0]
        cm["data"]["modelyard.toml"] = edit(cm["data"]["modelyard.toml"])

    def grace(variant):
        find(variant, "Deployment", "modelyard")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30

    def probes(variant):
        server = pod_spec(find(variant, "Deployment", "modelyard")[0])["containers"][0]
        server["readinessProbe"]["httpGet"]["path"] = "/v2/health/live"

    def no_redis(variant):
        variant.remove(find(variant, "Service", "redis")[0])

    def fixed_count(variant):
        find(variant, "Deployment", "modelyard")[0]["spec"]["replicas"] = 3

    refused("modelyard.toml with a [clusters] section", deployment_problems(lambda v: set_toml(v, lambda t: t.replace("[cluster]", "[clusters]"))), "unknown: ['clusters']")
    refused("modelyard.toml with server.shutdown_grace (misspelt key)", deployment_problems(lambda v: set_toml(v, lambda t: t.replace("shutdown_grace_seconds", "shutdown_grace"))), "server.shutdown_grace is not a key of ServerConfig")
    refused("modelyard.toml that does not parse", deployment_problems(lambda v: set_toml(v, lambda t: t + "\n[server\n")), "parses as TOML")
    refused("terminationGracePeriodSeconds 30 (< 5 s preStop + 30 s grace)", deployment_problems(grace), "terminationGracePeriodSeconds 30 >= preStop 5")
    refused("readiness probe on /v2/health/live", deployment_problems(probes), "readiness probe GET /v2/health/ready")
    refused("[cluster] redis_url with no Redis Service", deployment_problems(no_redis), "redis://redis:6379 is a Service")
    refused("spec.replicas beside the autoscaler", deployment_problems(fixed_count), "leaves its replica count to the autoscaler")
    refused("plugins.cache_dir on the read-only config volume", deployment_problems(lambda v: set_toml(v, lambda t: t.replace('cache_dir = "/var/lib/modelyard/plugin-cache"', 'cache_dir = "/etc/modelyard/cache"'))), "plugins.cache_dir /etc/modelyard/cache is on a writable emptyDir")
    refused("an endpoint naming a plugin no ConfigMap holds", deployment_problems(lambda v: set_toml(v, lambda t: t.replace('plugin = "iris-features"', 'plugin = "iris-featurez"'))), "plugin iris-featurez.wasm is in plugins.dir")
    refused("`modelyard serve --conf` (not a flag of the binary)", deployment_problems(lambda v: pod_spec(find(v, "Deployment", "modelyard")[0])["containers"][0]["args"].append("--conf")), "are the binary's")

    # A plugin over 1 MiB in a ConfigMap: flagd as built where it is, else as large.
    built = ROOT / "plugins" / "flagd.wasm"
    oversized = built.read_bytes() if built.is_file() and built.stat().st_size > CONFIGMAP_LIMIT else PLACEHOLDER_WASM.ljust(CONFIGMAP_LIMIT + 1, b"\0")

    def oversized_plugin(variant):
        variant.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "modelyard-plugin-flagd"},
                        "binaryData": {"flagd.wasm": base64.b64encode(oversized).decode()}})
        volumes = pod_spec(find(variant, "Deployment", "modelyard")[0])["volumes"]
        [v for v in volumes if v["name"] == "config"][0]["projected"]["sources"].append({"configMap": {"name": "modelyard-plugin-flagd"}})

    refused(f"a plugin of {len(oversized)} bytes in a ConfigMap", deployment_problems(oversized_plugin), "ConfigMap modelyard-plugin-flagd is")

    # stage-plugins, on a scratch copy of the repository's layout: it stages what the
    # generators name and nothing else, and refuses a plugin too large for a ConfigMap.
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "deploy" / "kubernetes" / "plugins").mkdir(parents=True)
        script = scratch / "deploy" / "kubernetes" / "stage-plugins"
        shutil.copy2(KUBE / "stage-plugins", script)
        shutil.copyfile(KUBE / "plugins" / "kustomization.yaml", scratch / "deploy" / "kubernetes" / "plugins" / "kustomization.yaml")
        named = sorted(p.name for role, p in named_files(KUBE / "plugins")[1] if p.name.endswith(".wasm"))
        (scratch / "plugins").mkdir()
        for name in named:
            (scratch / "plugins" / name).write_bytes(PLACEHOLDER_WASM)
        (scratch / "plugins" / "unnamed.wasm").write_bytes(PLACEHOLDER_WASM)
        (scratch / "deploy" / "kubernetes" / "plugins" / "stale.wasm").write_bytes(PLACEHOLDER_WASM)
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        staged = sorted(p.name for p in (scratch / "deploy" / "kubernetes" / "plugins").glob("*.wasm"))
        c.that(done.returncode == 0 and staged == named,
               f"stage-plugins stages exactly the plugins the generators name ({len(named)}), no other",
               f"exit {done.returncode}, staged {staged}: {done.stderr.strip()}")
        for p in (scratch / "deploy" / "kubernetes" / "plugins").glob("*.wasm"):
            p.unlink()
        (scratch / "plugins" / named[0]).write_bytes(oversized)
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        staged = sorted(p.name for p in (scratch / "deploy" / "kubernetes" / "plugins").glob("*.wasm"))
        refused(f"stage-plugins given a {named[0]} of {len(oversized)} bytes",
                [done.stderr.strip()] if done.returncode != 0 else [], "over a ConfigMap's")
        c.that(not staged, "stage-plugins, refusing, stages nothing", f"staged {staged}")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "kustomization.yaml").write_text("resources: [deployment.yaml]\npatches: [{path: missing.yaml}]\n")
        (scratch / "deployment.yaml").write_text(yaml.safe_dump(deployment))
        try:
            render(scratch)
            problems = []
        except KustomizeError as e:
            problems = [str(e)]
        refused("a kustomization naming a missing patch", problems, "patch missing.yaml does not exist")
        (scratch / "kustomization.yaml").write_text("generatorOptions: {disableNameSuffixHash: true}\nconfigMapGenerator: [{name: x, files: [../outside.toml]}]\n")
        (scratch.parent / "outside.toml").write_text("")
        try:
            render(scratch)
            problems = []
        except KustomizeError as e:
            problems = [str(e)]
        finally:
            (scratch.parent / "outside.toml").unlink()
        refused("a generator reading a file outside its kustomization", problems, "kustomize refuses it")


def main():
    global WORK
    c = Checks()
    print(f"deploy/ validation: kubernetes-validate {kubernetes_validate.__version__}, "
          f"jsonschema {importlib.metadata.version('jsonschema')}, Kubernetes {', '.join(KUBERNETES_VERSIONS)}")
    sources = rust_sources()
    with tempfile.TemporaryDirectory() as scratch:
        WORK = Path(scratch) / "kubernetes"
        plugin_sources = staged_copy(WORK)
        rendered = kubernetes_section(c, WORK, plugin_sources)
        deployments_section(c, rendered, sources)
        kserve = kserve_section(c)
        negative_section(c, rendered, kserve, sources)
    print(f"\n{c.passed} checks passed, {len(c.failed)} failed")
    for failure in c.failed:
        print(f"  FAIL  {failure}")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
