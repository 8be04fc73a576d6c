#!/usr/bin/env python3
"""The static binary and the OCI image, run for real.

    tests/deploy/static_binary.py

What it does:
- runs deploy/image once: it builds the static (musl) binary (cargo reuses a build already
  made) and, where buildah works, the image and its OCI archive;
- checks that the binary is static (no program interpreter, nothing for ld.so to load);
- serves the sample models with the standard plugins (built by plugins/build when missing)
  and the sample configuration on a free port, and checks: /v2/health/ready; an inference on
  iris (the README's two flowers: setosa, then virginica); one through the iris-ab endpoint
  (flowers by feature name, the weighted router, a label out); that the models run on tract,
  with the log saying why ONNX Runtime is not there (a static binary cannot load it); that
  SIGTERM stops it with exit status 0;
- where the image was built and this runs as root: unpacks the OCI archive's layers into a
  root filesystem, checks the image's configuration (user 65532:65532, entrypoint, command,
  port 8080), puts the configuration, models and plugins where the image expects them
  mounted (read-only to the server's user), and runs the image's entrypoint and command
  chrooted into it as 65532:65532 with the image's environment only: readiness, one
  inference, SIGTERM, and the monitoring database and compiled plugins written where the
  image gives its user room to write.

Skips only the image part, saying why, where buildah cannot build images or this is not
root. Any other failure exits 1.
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = "x86_64-unknown-linux-musl"
PLUGINS = ["weighted", "iris-features", "bandit", "canary", "blue-green", "flagd"]
USER = 65532
# The README's "Try it" requests.
FLOWERS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4],
                       "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}]}
BY_NAME = {"inputs": [{"name": "features", "datatype": "BYTES", "shape": [1], "data": [json.dumps(
    {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3})]}]}
# The database, where the image's user may write: the sample configuration leaves it
# beside itself, in what is a read-only mount in a container.
IMAGE_MONITORING = '\n[monitoring]\ndatabase = "/var/lib/modelyard/modelyard.db"\n'


class Failed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Failed(what)


def target_dir() -> Path:
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return Path(json.loads(out)["target_directory"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, body=None, headers=None):
    """(status, headers, JSON body) of a GET, or a POST of `body`."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode(errors="replace")


def static_elf(path: Path):
    """Why `path` is not a static executable, or None: a program interpreter (PT_INTERP)
    means ld.so, and so shared libraries, at exec."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return "not a 64-bit ELF file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for header in range(phoff, phoff + phnum * phentsize, phentsize):
        kind, = struct.unpack_from("<I", data, header)
        if kind == 3:  # PT_INTERP
            start, = struct.unpack_from("<Q", data, header + 8)
            interpreter = data[start:data.index(b"\0", start)].decode()
            return f"it asks for a program interpreter, {interpreter}"
    return None


class Server:
    """The binary, started with `argv`, its log in `log`; stopped with SIGTERM."""

    def __init__(self, argv, log: Path, port: int, env, preexec_fn=None):
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=preexec_fn)

    def log_text(self):
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout=180):
        # Cold, each standard plugin is compiled before the server is ready.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failed(f"the server exited ({self.proc.returncode}) before it was ready:\n{self.log_text()}")
            try:
                if request(f"{self.base}/v2/health/ready")[0] == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.05)
        raise Failed(f"not ready within {timeout} s:\n{self.log_text()}")

    def stop(self):
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise Failed(f"still running 40 s after SIGTERM:\n{self.log_text()}")


def check_iris(base):
    status, _, answer = request(f"{base}/v2/models/iris/infer", FLOWERS)
    check(status == 200, f"iris answered {status}: {answer}")
    out = {o["name"]: o for o in answer["outputs"]}
    probabilities = out.get("probabilities")
    check(probabilities is not None and probabilities["shape"] == [2, 3], f"iris: no [2, 3] probabilities in {answer}")
    rows = [probabilities["data"][i * 3:(i + 1) * 3] for i in range(2)] \
        if not isinstance(probabilities["data"][0], list) else probabilities["data"]
    for row in rows:
        check(abs(sum(row) - 1) < 1e-3, f"iris: probabilities do not sum to 1: {row}")
    classes = [row.index(max(row)) for row in rows]
    check(classes == [0, 2], f"iris: classes {classes} for a setosa and a virginica, not [0, 2]")


def check_endpoint(base):
    status, headers, answer = request(f"{base}/v2/models/iris-ab/infer", BY_NAME, {"x-user-id": "alice"})
    check(status == 200, f"iris-ab answered {status}: {answer}")
    variant = headers.get("x-modelyard-variant")
    check(variant in ("stable", "candidate"), f"iris-ab: variant {variant!r}")
    out = {o["name"]: o for o in answer["outputs"]}
    check("label" in out and out["label"]["data"] == ["virginica"], f"iris-ab: no label 'virginica' in {answer}")
    return variant


def check_tract(server):
    status, _, meta = request(f"{server.base}/v2/models/iris")
    check(status == 200, f"iris metadata: {status} {meta}")
    check(meta["engine"]["backend"] == "tract", f"iris runs on {meta['engine']}, not tract")
    line = next((l for l in server.log_text().splitlines() if "ONNX Runtime is not available" in l), None)
    check(line is not None, f"no log line saying ONNX Runtime is not available:\n{server.log_text()}")
    return line


def serve_static(binary: Path, work: Path):
    """The static binary over a copy of the sample repository."""
    for name in ("models", "plugins"):
        (work / name).mkdir()
    shutil.copytree(ROOT / "models", work / "models", dirs_exist_ok=True)
    for plugin in PLUGINS:
        shutil.copy(ROOT / "plugins" / f"{plugin}.wasm", work / "plugins")
    shutil.copy(ROOT / "plugins/flags.json", work / "plugins")
    shutil.copy(ROOT / "modelyard.toml", work)
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"), RUST_LOG="info")
    # Offered a real ONNX Runtime library, the static binary must still refuse it cleanly.
    library = ROOT / "target/onnxruntime/libonnxruntime.so"
    if library.exists():
        env["ORT_DYLIB_PATH"] = str(library.resolve())
    port = free_port()
    server = Server([binary, "serve", "--config", work / "modelyard.toml", "--listen", f"127.0.0.1:{port}"],
                    work / "server.log", port, env)
    try:
        ready = server.wait_ready()
        check_iris(server.base)
        variant = check_endpoint(server.base)
        line = check_tract(server)
    finally:
        status = server.stop()
    check(status == 0, f"exit status {status} after SIGTERM:\n{server.log_text()}")
    print(f"static binary: ready in {ready:.2f} s, iris and iris-ab ({variant}) answered, "
          f"tract; stopped cleanly by SIGTERM\n  {line.strip()}")


def blob(layout: Path, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":")
    return layout / "blobs" / algorithm / hex_digest


def extract(tar: tarfile.TarFile, into: Path, trusted: bool):
    # Extraction filters came in Python 3.11.4 (and 3.8.17, 3.9.17, 3.10.12).
    if hasattr(tarfile, "data_filter"):
        tar.extractall(into, numeric_owner=trusted, filter="fully_trusted" if trusted else "data")
    else:
        tar.extractall(into, numeric_owner=trusted)


def unpack_image(archive: Path, rootfs: Path):
    """The image's configuration, its layers unpacked into `rootfs` (owners kept)."""
    layout = rootfs.parent / "layout"
    with tarfile.open(archive) as tar:
        extract(tar, layout, trusted=False)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(layout, index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(layout, manifest["config"]["digest"]).read_text())
    rootfs.mkdir()
    for layer in manifest["layers"]:
        # Owners and modes as the image has them: the server's user owns its directories.
        with tarfile.open(blob(layout, layer["digest"])) as tar:
            check(not any(Path(m.name).name.startswith(".wh.") for m in tar.getmembers()),
                  "a whiteout in an image built from scratch")
            extract(tar, rootfs, trusted=True)
    return config, manifest


def serve_image(archive: Path, work: Path, plugins_from: Path):
    rootfs = work / "rootfs"
    image, manifest = unpack_image(archive, rootfs)
    config = image["config"]
    check(config.get("User") == f"{USER}:{USER}", f"image user {config.get('User')!r}")
    check(config.get("Entrypoint") == ["/modelyard"], f"entrypoint {config.get('Entrypoint')}")
    cmd = config.get("Cmd") or []
    check(cmd[:3] == ["serve", "--config", "/etc/modelyard/modelyard.toml"], f"command {cmd}")
    check("8080/tcp" in config.get("ExposedPorts", {}), f"exposed ports {config.get('ExposedPorts')}")
    labels = config.get("Labels", {})
    for key in ("version", "licenses"):
        check(f"org.opencontainers.image.{key}" in labels, f"no org.opencontainers.image.{key} label: {labels}")
    check(labels["org.opencontainers.image.licenses"] == "Apache-2.0", f"licence label {labels}")
    files = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*") if p.is_file())
    check(files == ["modelyard"], f"the image holds more than the binary: {files}")
    check(static_elf(rootfs / "modelyard") is None, "the image's binary is not static")

    # What a container runtime would mount: root's files, which the server's user can read
    # but not write.
    etc = rootfs / "etc/modelyard"
    shutil.copytree(ROOT / "models", etc / "models")
    (etc / "plugins").mkdir()
    for plugin in PLUGINS:
        shutil.copy(plugins_from / f"{plugin}.wasm", etc / "plugins")
    shutil.copy(plugins_from / "flags.json", etc / "plugins")
    (etc / "modelyard.toml").write_text((ROOT / "modelyard.toml").read_text() + IMAGE_MONITORING)

    port = free_port()
    argv = config["Entrypoint"] + cmd
    listen = argv.index("--listen") + 1 if "--listen" in argv else None
    if listen:
        argv[listen] = f"127.0.0.1:{port}"
    else:
        argv += ["--listen", f"127.0.0.1:{port}"]
    env = dict(e.split("=", 1) for e in config.get("Env", []))
    workdir = config.get("WorkingDir") or "/"

    def enter():
        os.chroot(rootfs)
        os.chdir(workdir)
        os.setgroups([])
        os.setgid(USER)
        os.setuid(USER)

    server = Server(argv, work / "image.log", port, env, preexec_fn=enter)
    try:
        ready = server.wait_ready()
        check_iris(server.base)
        check_endpoint(server.base)
        check_tract(server)
    finally:
        status = server.stop()
    check(status == 0, f"exit status {status} after SIGTERM:\n{server.log_text()}")
    database = rootfs / "var/lib/modelyard/modelyard.db"
    check(database.exists() and database.stat().st_uid == USER, "no monitoring database written by the image's user")
    cached = [p for p in (rootfs / "var/cache/modelyard").rglob("*") if p.is_file()]
    check(cached and all(p.stat().st_uid == USER for p in cached), "no compiled plugins cached by the image's user")
    layers = sum(layer["size"] for layer in manifest["layers"])
    print(f"image: its root filesystem run as {USER}:{USER} ({' '.join(argv)}): ready in {ready:.2f} s, "
          f"iris and iris-ab answered; stopped cleanly by SIGTERM; {layers / 2**20:.1f} MiB of layers")


def main():
    # In step with the output of the commands it runs.
    sys.stdout.reconfigure(line_buffering=True)
    built = subprocess.run([ROOT / "deploy/image"], cwd=ROOT)
    if built.returncode not in (0, 3):
        raise Failed(f"deploy/image failed ({built.returncode})")
    binary = target_dir() / TARGET / "release/modelyard"
    why = static_elf(binary)
    check(why is None, f"{binary} is not static: {why}")
    if shutil.which("file"):
        print(subprocess.run(["file", "-b", binary], capture_output=True, text=True).stdout.strip())
    if not all((ROOT / "plugins" / f"{p}.wasm").exists() for p in PLUGINS):
        subprocess.run([ROOT / "plugins/build"], cwd=ROOT, check=True)

    with tempfile.TemporaryDirectory(prefix="modelyard-static-") as tmp:
        serve_static(binary, Path(tmp))

    archive = target_dir() / "image/modelyard-oci.tar"
    if built.returncode == 3:
        print("SKIPPED the image: buildah cannot build images here (deploy/image said why above)")
    elif os.geteuid() != 0:
        print("SKIPPED the image: running its root filesystem as its user needs root (chroot, setuid)")
    else:
        with tempfile.TemporaryDirectory(prefix="modelyard-image-") as tmp:
            serve_image(archive, Path(tmp), ROOT / "plugins")


if __name__ == "__main__":
    try:
        main()
    except Failed as failure:
        sys.exit(f"FAILED: {failure}")
