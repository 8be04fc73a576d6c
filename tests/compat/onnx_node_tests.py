#!/usr/bin/env python3
"""The ONNX backend node tests, served: how many of them each Modelyard backend answers right.

    onnx_node_tests.py prepare OUT [--backends tract,onnxruntime] [--no-backend-key] [--only REGEX]
    onnx_node_tests.py run BASE_URL OUT [--backends ...] [--json-share 0.2] [--serve BINARY]
    onnx_node_tests.py check OUT BINARY [--min-share 0.95] [--share-of carriable|all] [--only REGEX]

`prepare` (needs onnx, onnxruntime, numpy) generates the node test cases with the onnx
package's own generators (the wheel ships no data directory), keeps those whose graph inputs
and outputs are all tensors, runs each in ONNX Runtime on the CPU to learn whether the
reference runtime itself passes it, and writes one model per case and backend:
OUT/models/<case>_<backend>/1/model.onnx with a model.toml saying `backend = "<backend>"`
(none with --no-backend-key), OUT/cases.json (what every case is, the ONNX Runtime verdict,
what was skipped and why) and OUT/tensors.pkl (inputs, expected outputs and, for the cases
ONNX Runtime fails, its own outputs, already in the protocol's binary encoding, so `run`
needs only numpy), and last OUT/stamp.json (the preparation format and the onnx and
onnxruntime versions that made it).

`run` (needs numpy) asks BASE_URL, serving OUT/models, for every case and backend: a model
that is not ready is "refused" (with the server's reason); otherwise the inputs go as binary
tensors (and, for a fixed share of cases whose values JSON can carry, as JSON too) and the
answer is "pass", "near" (a near miss, below), "rejected" (4xx), "error" (5xx or no answer)
or "WRONG" (200 with another datatype or shape than expected, or values beyond the near-miss
tolerance). A case whose tensors have no protocol datatype (float8, int4...) but whose model
loads is "unsendable". A WRONG answer to a case ONNX Runtime fails that is, within the
case's tolerance, ONNX Runtime's own answer is marked so (`ort_own_answer`), for
information: it is WRONG all the same. It prints a summary per backend and writes
OUT/summary.json, with per backend `ort_passing` (the cases ONNX Runtime itself passes),
`pass_of_ort_passing` (how many and what share of those the backend answers as pass or
near), the same for `ort_passing_carriable` (those of them whose graph tensors all have a
protocol datatype: no protocol server can be asked float8, int4 or int2 tensors) and `wrong`
(how many WRONG, `wrong_ort_own_answer` of them ONNX Runtime's own answer; the cases in
`wrong_cases`). Every ready model's metadata must name, in `engine.backend`, the backend its
name says: a model served by another backend fails the run (exit status 1) whatever its
answers. With --serve BINARY it starts `BINARY serve` over OUT/models itself, with an empty
configuration in a temporary directory, at BASE_URL's address (port 0: any free port, read
from the server's log), logging to OUT/server.log, and stops it afterwards, so the ready
time it reports is the server's; without, it reports how long it waited for GET
/v2/health/ready.

`check` is the one command for a test (tests/e2e/conformance.rs runs it): `prepare` into
OUT unless OUT already holds a preparation fit for it (its stamp.json names this script's
preparation format, the installed onnx and onnxruntime, the backends and --only asked; a
stale or unfinished preparation of this tool is prepared again, a folder that is not one is
refused), then `run --serve BINARY` on a free port, and exit status 1 when any backend
answers any case WRONG (ONNX Runtime's own answer included: the server must refuse what its
backend gets wrong), a model is served by another backend than its name says, or the
onnxruntime backend answers less than --min-share of the cases ONNX Runtime passes as pass
or near: of those the protocol can carry (float8, float4, int4 and int2 tensors have no Open
Inference Protocol datatype), or with --share-of all of them. It prints both shares, and
writes the gate to summary.json (`gate`). ORT_DYLIB_PATH, if set, reaches the server as it
is; if not, the binary looks for the ONNX Runtime library itself.

Two tolerances, for floating point, elementwise (NaN equal to NaN, an infinity only to
itself; at least two ULPs of relative tolerance for bfloat16, 2**-6; integers, booleans and
strings always exact):
  - pass: the onnx backend test runner's, the case's own,
        |got - want| <= atol + rtol * |want|, rtol 1e-3 and atol 1e-7 for every node test.
    ONNX Runtime's own verdict (`ort_pass`) is judged by it too.
  - near: outside that but within
        |got - want| <= 1e-5 * max(1, max|want| over that output) + 1e-2 * |want|
    -- the noise of another order of floating-point accumulation, another exp or tanh,
    which grows with the magnitudes involved. Reported and listed, not WRONG.

Example, from the repository root (what tests/e2e/conformance.rs runs):
    tests/compat/onnx_node_tests.py check target/onnx-node-tests target/release/modelyard \\
        --min-share 0.95
or a few cases only (prepared apart, so as not to replace the full preparation):
    tests/compat/onnx_node_tests.py check target/onnx-node-tests-some target/release/modelyard \\
        --only '^test_(relu|softmax)'
or, step by step (with a binary that knows no `backend` key yet, every model runs on tract,
so one backend is enough: `prepare ... --backends tract --no-backend-key`):
    tests/compat/onnx_node_tests.py prepare target/onnx-node-tests
    tests/compat/onnx_node_tests.py run http://127.0.0.1:0 target/onnx-node-tests \\
        --serve target/release/modelyard
Each step takes seconds: node test models are small, and requests share keep-alive
connections.
"""

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import numpy as np

# ONNX element type names (TensorProto.DataType) to Open Inference Protocol datatypes. Types
# missing here (float8, int4, complex, ...) have no protocol datatype: such a case can be
# loaded but not asked.
OIP_OF_ONNX = {
    "BOOL": "BOOL",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "FLOAT16": "FP16",
    "FLOAT": "FP32",
    "DOUBLE": "FP64",
    "STRING": "BYTES",
    "BFLOAT16": "BF16",
}

# The protocol's fixed-size datatypes as little-endian numpy dtypes. BF16 travels as its
# 16 bits and is widened to float32 for comparison (numpy has no bfloat16 of its own).
WIRE_DTYPE = {
    "BOOL": np.dtype("u1"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}
FLOAT_OIP = {"FP16", "FP32", "FP64", "BF16"}

# TensorProto.DataType by number, for readers that name a type by its number alone.
ONNX_TYPE_NAMES = [
    "UNDEFINED", "FLOAT", "UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64", "STRING",
    "BOOL", "FLOAT16", "DOUBLE", "UINT32", "UINT64", "COMPLEX64", "COMPLEX128", "BFLOAT16",
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "UINT4", "INT4",
    "FLOAT4E2M1", "FLOAT8E8M0", "UINT2", "INT2",
]

OUTCOMES = ["pass", "near", "refused", "rejected", "error", "WRONG", "unsendable"]
# Answered right: within the case's tolerance, or a near miss.
SERVED_RIGHT = ("pass", "near")

# The onnx backend test runner's tolerance (each case carries its own; every node test has
# these): |got - want| <= atol + rtol * |want|. And the wider one within which a difference
# is a near miss, not WRONG: another order of floating-point accumulation, another exp or
# tanh. Accumulation error grows with the magnitudes summed, so the near miss's absolute
# part scales with the output's largest finite |want| (never below 1):
# |got - want| <= atol * max(1, max|want|) + rtol * |want|.
ONNX_TOLERANCE = (1e-3, 1e-7)
NEAR_TOLERANCE = (1e-2, 1e-5)
NEAR_RULE = (f"|got - want| <= {NEAR_TOLERANCE[1]:g} * max(1, max|want| over the output) "
             f"+ {NEAR_TOLERANCE[0]:g} * |want|")
TOLERANCE_NOTE = (f"pass: within the case's tolerance, |got - want| <= atol + rtol * |want| (rtol {ONNX_TOLERANCE[0]:g}, "
                  f"atol {ONNX_TOLERANCE[1]:g} for every node test); near: {NEAR_RULE}; NaN equals NaN, "
                  "infinities must match exactly; WRONG: beyond, or another datatype or shape")

# The preparation's format: bumped when cases.json or tensors.pkl change, so that `check`
# prepares again instead of reading a preparation of an older script. With the versions of
# onnx and onnxruntime that made it, it is written to OUT/stamp.json.
PREPARATION_FORMAT = 2
STAMP = "stamp.json"


# ---------------------------------------------------------------------------- encoding


def encode(array, oip):
    """The binary tensor data extension's bytes for `array` as datatype `oip`."""
    if oip == "BYTES":
        parts = []
        for item in array.ravel(order="C"):
            raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    if oip == "BF16":
        return np.ascontiguousarray(array).view(np.uint16).astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=WIRE_DTYPE[oip]).tobytes()


def decode(raw, oip, shape):
    """The array that `raw` (binary extension bytes) holds, in the form `compare` takes."""
    count = int(np.prod(shape, dtype=np.int64))
    if oip == "BYTES":
        items, at = [], 0
        for _ in range(count):
            if at + 4 > len(raw):
                raise ValueError(f"BYTES data ends after {len(items)} of {count} elements")
            (n,) = struct.unpack_from("<I", raw, at)
            items.append(bytes(raw[at + 4 : at + 4 + n]))
            at += 4 + n
        if at != len(raw):
            raise ValueError(f"{len(raw) - at} bytes follow the {count} BYTES elements")
        out = np.empty(count, dtype=object)
        out[:] = items
        return out.reshape(shape)
    dtype = WIRE_DTYPE[oip]
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"{len(raw)} bytes for {count} {oip} elements (want {count * dtype.itemsize})")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if oip == "BOOL":
        return array != 0
    if oip == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def from_json_data(data, oip, shape):
    """A JSON answer's `data` (flat or nested) as the array `compare` takes."""
    flat = []

    def walk(value):
        if isinstance(value, list):
            for v in value:
                walk(v)
        else:
            flat.append(value)

    walk(data)
    if oip == "BYTES":
        out = np.empty(len(flat), dtype=object)
        out[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in flat]
        return out.reshape(shape)
    if oip in FLOAT_OIP:
        # JSON has no NaN or infinity; serializers write null (or a string) for them.
        flat = [float("nan") if v is None else float(v) if isinstance(v, str) else v for v in flat]
        return np.array(flat, dtype=np.float64 if oip == "FP64" else np.float32).reshape(shape)
    if oip == "BOOL":
        return np.array(flat, dtype=bool).reshape(shape)
    return np.array(flat, dtype=WIRE_DTYPE[oip]).reshape(shape)


def json_values(raw, oip, shape):
    """The tensor as a flat JSON list, or None when JSON cannot carry it exactly."""
    array = decode(raw, oip, shape)
    if oip == "BYTES":
        try:
            return [b.decode("utf-8") for b in array.ravel()]
        except UnicodeDecodeError:
            return None
    if oip in FLOAT_OIP and not np.all(np.isfinite(array)):
        return None
    return array.ravel().tolist()


# -------------------------------------------------------------------------- comparison


def compare(name, want, got, rtol, atol, bf16=False, scaled=False):
    """None when `got` matches `want` (decoded arrays of one datatype), else a one-line diff.
    Floats: |got - want| <= atol + rtol * |want| elementwise, NaN equal to NaN, an infinity
    only to itself; with `scaled`, atol is multiplied by max(1, the largest finite |want|)."""
    if tuple(got.shape) != tuple(want.shape):
        return f"output '{name}': shape {list(got.shape)}, want {list(want.shape)}"
    if want.size == 0:
        return None
    if want.dtype == object:
        ok = np.array([g == w for g, w in zip(got.ravel(), want.ravel())]).reshape(want.shape)
    elif want.dtype.kind == "f":
        if bf16:
            rtol = max(rtol, 2.0**-6)
        g, w = got.astype(np.float64), want.astype(np.float64)
        if scaled:
            finite = np.abs(w[np.isfinite(w)])
            atol *= max(1.0, float(finite.max()) if finite.size else 1.0)
        # numpy's isclose: |g - w| <= atol + rtol * |w|; infinities equal only to themselves.
        ok = np.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    else:
        ok = got == want
    if ok.all():
        return None
    bad = np.argwhere(~ok)
    first = tuple(int(i) for i in bad[0])
    line = (
        f"output '{name}': {len(bad)}/{want.size} values differ, first at {list(first)}: "
        f"got {_show(got[first])}, want {_show(want[first])}"
    )
    if want.dtype.kind == "f":
        with np.errstate(all="ignore"):
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        diff = diff[~ok]
        finite = diff[np.isfinite(diff)]
        if finite.size:
            line += f"; max |diff| {finite.max():.4g}"
    return line


def _show(value):
    if isinstance(value, bytes):
        return repr(value[:40])
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return repr(value.item() if isinstance(value, np.generic) else value)


# --------------------------------------------------------------------------- prepare


def prepare(args):
    import warnings

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    out = Path(args.out)
    backends = _backends(args.backends)
    models_dir = out / "models"
    if models_dir.exists():
        if not (out / "cases.json").exists() and not (out / STAMP).exists():
            sys.exit(f"{models_dir} exists and is not this tool's output; refusing to replace it")
        shutil.rmtree(models_dir)
    models_dir.mkdir(parents=True)
    # Unfinished until the end rewrites it: an interrupted preparation is this tool's, and stale.
    stamp = {"format": PREPARATION_FORMAT, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
             "backends": backends, "backend_key": not args.no_backend_key, "only": args.only, "complete": False}
    (out / STAMP).write_text(json.dumps(stamp, indent=1))

    started = time.monotonic()
    from onnx.backend.test.case.node import collect_testcases

    # The generators compute expected values with numpy and warn about the NaNs and
    # overflows their cases are about.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    only = re.compile(args.only) if args.only else None
    if only:
        cases = [c for c in cases if only.search(c.name)]
    generated = time.monotonic()

    so = ort.SessionOptions()
    so.log_severity_level = 4  # load failures are the verdict; not for the terminal
    ort.set_default_logger_severity(4)
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1

    # The node each case exercises; an "_expanded" case (the op's function body) is named
    # by the op it expands.
    single_nodes = {
        c.name: c.model.graph.node[0] for c in cases if len(c.model.graph.node) == 1
    }

    skipped, records, tensors = collections.Counter(), [], {}
    skipped_cases = collections.defaultdict(list)
    dtype_mismatch = []
    for case in cases:
        graph = case.model.graph
        kinds = [
            (where, vi.type.WhichOneof("value"))
            for where, vis in (("input", graph.input), ("output", graph.output))
            for vi in vis
        ]
        other = sorted({f"{kind.removesuffix('_type')} {where}" for where, kind in kinds if kind != "tensor_type"})
        if other:
            reason = ", ".join(other)
            skipped[reason] += 1
            skipped_cases[reason].append(case.name)
            continue
        base = re.sub(r"_expanded(_ver\d+)?$", "", case.name)
        node = single_nodes.get(base)
        record = {
            "name": case.name,
            "op": node.op_type if node is not None else None,
            "domain": node.domain if node is not None else None,
            "attributes": _attributes(node, helper) if node is not None else {},
            "ops": sorted({n.op_type for n in graph.node}),
            "opsets": {o.domain or "ai.onnx": o.version for o in case.model.opset_import},
            "rtol": case.rtol,
            "atol": case.atol,
            "inputs": [],
            "outputs": [],
        }
        elem = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.input) + list(graph.output)}
        datasets = []
        unsendable = []
        for inputs, outputs in case.data_sets:
            ins = [_as_array(a, numpy_helper, TensorProto) for a in inputs]
            outs = [_as_array(a, numpy_helper, TensorProto) for a in outputs]
            if len(ins) != len(graph.input) or len(outs) != len(graph.output):
                raise SystemExit(f"{case.name}: data set does not match the graph's inputs and outputs")
            entry = {"inputs": [], "outputs": []}
            for side, vis, arrays in (("inputs", graph.input, ins), ("outputs", graph.output, outs)):
                for vi, array in zip(vis, arrays):
                    onnx_type = TensorProto.DataType.Name(elem[vi.name])
                    oip = OIP_OF_ONNX.get(onnx_type)
                    want_dtype = helper.tensor_dtype_to_np_dtype(elem[vi.name])
                    if array.dtype != want_dtype:
                        dtype_mismatch.append(f"{case.name}: {side[:-1]} '{vi.name}' is {array.dtype}, graph says {onnx_type}")
                        array = array.astype(want_dtype)
                    if oip is None:
                        unsendable.append(f"{side[:-1]} '{vi.name}' is {onnx_type}")
                        raw = None
                    else:
                        raw = encode(array, oip)
                    entry[side].append({"name": vi.name, "datatype": oip, "onnx_type": onnx_type,
                                        "shape": list(array.shape), "data": raw})
            datasets.append((entry, ins, outs))
        for vi in graph.input:
            record["inputs"].append({"name": vi.name, "onnx_type": TensorProto.DataType.Name(elem[vi.name])})
        for vi in graph.output:
            record["outputs"].append({"name": vi.name, "onnx_type": TensorProto.DataType.Name(elem[vi.name])})
        record["unsendable"] = sorted(set(unsendable))
        record["ort_pass"], record["ort_detail"], ort_answers = _ort_verdict(
            case, datasets, ort, so, TensorProto, numpy_helper)
        if not record["ort_pass"] and ort_answers is not None:
            # What ONNX Runtime answers where it is wrong: the onnxruntime backend should
            # answer the same, and an answer that is is ORT's deviation, not the server's.
            for (entry, _, _), answers in zip(datasets, ort_answers):
                entry["ort_outputs"] = [_encode_or_none(a, t["datatype"]) for a, t in zip(answers, entry["outputs"])]
        tensors[case.name] = [entry for entry, _, _ in datasets]
        records.append(record)

        serialized = case.model.SerializeToString()
        for backend in backends:
            version = models_dir / f"{case.name}_{backend}" / "1"
            version.mkdir(parents=True)
            (version / "model.onnx").write_bytes(serialized)
            if not args.no_backend_key:
                (version.parent / "model.toml").write_text(
                    f"# Written by tests/compat/onnx_node_tests.py prepare.\nbackend = \"{backend}\"\n"
                )
    finished = time.monotonic()

    ort_pass = sum(r["ort_pass"] for r in records)
    meta = {
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "backends": backends,
        "backend_key": not args.no_backend_key,
        "total_cases": len(cases),
        "tensor_cases": len(records),
        "ort_pass": ort_pass,
        "skipped": dict(skipped),
        "skipped_cases": dict(skipped_cases),
        "dtype_mismatches": dtype_mismatch,
        "cases": records,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1))
    with open(out / "tensors.pkl", "wb") as f:
        pickle.dump(tensors, f, protocol=pickle.HIGHEST_PROTOCOL)
    (out / STAMP).write_text(json.dumps(dict(stamp, complete=True), indent=1))

    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    print(f"{len(cases)} node test cases; {len(records)} with tensors only; skipped:")
    for reason, n in skipped.most_common():
        print(f"  {n:4d}  {reason}")
    if dtype_mismatch:
        print(f"{len(dtype_mismatch)} arrays whose dtype differs from the graph's (cast to the graph's):")
        for line in dtype_mismatch[:10]:
            print(f"  {line}")
    print(f"ONNX Runtime passes {ort_pass} of {len(records)}")
    print(f"{len(records) * len(backends)} models under {models_dir} "
          f"({'with' if not args.no_backend_key else 'without'} a backend key)")
    print(f"time: generate {generated - started:.1f} s, ONNX Runtime and write {finished - generated:.1f} s")


def _backends(text):
    return [b.strip() for b in text.split(",") if b.strip()]


def _as_array(value, numpy_helper, TensorProto):
    # Cases whose values numpy cannot hold (float8, int4, ...) give TensorProtos.
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def _attributes(node, helper):
    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, list):
            value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
            if value and not isinstance(value[0], (int, float, str)):
                value = f"<{len(value)} {type(value[0]).__name__}>"
        elif hasattr(value, "dims") and hasattr(value, "data_type"):
            value = f"<tensor {list(value.dims)}>"
        elif not isinstance(value, (int, float, str)):
            value = f"<{type(value).__name__}>"
        if isinstance(value, float):
            value = float(f"{value:.6g}")
        attrs[attr.name] = value
    return attrs


def _encode_or_none(array, oip):
    try:
        return encode(array, oip) if oip else None
    except (TypeError, ValueError, AttributeError, UnicodeError):
        return None


def _ort_verdict(case, datasets, ort, so, TensorProto, numpy_helper):
    """(passes, why not, its answers per data set or None): ONNX Runtime's answers against
    the expected outputs."""
    import ctypes

    graph = case.model.graph
    verdict, all_answers = None, []
    try:
        session = ort.InferenceSession(case.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure is the verdict
        return False, "load: " + _first_line(e), None
    for _, ins, outs in datasets:
        if any(array.dtype == object for array in ins):
            # ORT makes no OrtValue of strings; its numpy interface takes them (and the
            # string ops' outputs are numpy's own types).
            try:
                answers = session.run(None, {vi.name: a for vi, a in zip(graph.input, ins)})
            except Exception as e:  # noqa: BLE001
                return False, "run: " + _first_line(e), None
            answers = [np.asarray(a) for a in answers]
        else:
            feeds = {}
            for vi, array in zip(graph.input, ins):
                elem = vi.type.tensor_type.elem_type
                if array.dtype.name in WIRE_NATIVE:
                    feeds[vi.name] = ort.OrtValue.ortvalue_from_numpy(np.asarray(array, order="C"))
                else:
                    # bfloat16, float8, int4...: the tensor's raw (packed) bytes into a fresh value.
                    raw = numpy_helper.from_array(array).raw_data
                    value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), elem)
                    if len(raw) != value.tensor_size_in_bytes():
                        return False, f"cannot feed input '{vi.name}' ({len(raw)} bytes)", None
                    if raw:
                        ctypes.memmove(value.data_ptr(), raw, len(raw))
                    feeds[vi.name] = value
            try:
                results = session.run_with_ort_values(None, feeds)
            except Exception as e:  # noqa: BLE001
                return False, "run: " + _first_line(e), None
            answers = []
            for vi, value in zip(graph.output, results):
                elem = vi.type.tensor_type.elem_type
                got_type = value.data_type()
                want_type = f"tensor({TensorProto.DataType.Name(elem).lower()})"
                if got_type != want_type:
                    return False, f"output '{vi.name}': type {got_type}, want {want_type}", None
                if elem == TensorProto.STRING:
                    answers.append(value.numpy())
                else:
                    # numpy has no bfloat16, float8 or int4: the raw bytes, read as onnx does.
                    size = value.tensor_size_in_bytes()
                    raw = ctypes.string_at(value.data_ptr(), size) if size else b""
                    answers.append(numpy_helper.to_array(
                        TensorProto(dims=value.shape(), data_type=elem, raw_data=raw)
                    ))
        all_answers.append(answers)
        for vi, want, got in zip(graph.output, outs, answers):
            elem = vi.type.tensor_type.elem_type
            if got.dtype != want.dtype and not (got.dtype.kind in "OUS" and want.dtype.kind in "OUS"):
                return False, f"output '{vi.name}': dtype {got.dtype}, want {want.dtype}", None
            if verdict is None:
                verdict = compare(vi.name, _comparable(want), _comparable(got), case.rtol, case.atol,
                                  bf16=elem == TensorProto.BFLOAT16)
    return verdict is None, verdict, all_answers


WIRE_NATIVE = {
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64",
}


def _comparable(array):
    """numpy's own dtypes for `compare`: strings as bytes, the ml_dtypes types widened."""
    if array.dtype == object or array.dtype.kind in "US":
        out = np.empty(array.size, dtype=object)
        out[:] = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.ravel()]
        return out.reshape(array.shape)
    if array.dtype.name in WIRE_NATIVE:
        return array
    if "float" in array.dtype.name:
        return array.astype(np.float64)
    return array.astype(np.int64)


def _first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


# -------------------------------------------------------------------------------- run


class Client:
    """One keep-alive connection per thread."""

    def __init__(self, base_url, timeout):
        url = urllib.parse.urlsplit(base_url)
        self.host, self.port = url.hostname, url.port or 80
        self.prefix = url.path.rstrip("/")
        self.timeout = timeout
        self.local = threading.local()

    def request(self, method, path, body=None, headers=None):
        """(status, headers, body); status 0 with the reason when there is no answer."""
        for attempt in range(2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                conn.request(method, self.prefix + path, body=body, headers=headers or {})
                reply = conn.getresponse()
                return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                self.local.conn = None
                # A kept-alive connection the server closed meanwhile: once more on a new one.
                if attempt == 1 or isinstance(e, TimeoutError):
                    return 0, {}, f"no answer: {type(e).__name__}: {e}".encode()
        raise AssertionError("unreachable")


def _error_text(body):
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:300]


def _refusal(text, model):
    """The server's reason, without the model's name, version and file around it."""
    text = text.replace(f"'{model}'", "'<model>'")
    text = re.sub(r"^model '<model>' has no loaded version: ", "", text)
    text = re.sub(r"^version \d+: ", "", text)
    text = re.sub(r"^\S*model\.onnx refused: ", "", text)
    return text


def _group(reason):
    """What a refusal comes down to, with what is particular to the case left out, so
    that reasons can be counted: the datatype, the op, the failing step."""
    carry = re.search(r"^(input|output) '[^']*' is (.+?), which (wasi-nn tensors|the Open Inference Protocol) cannot carry",
                      reason)
    if carry:
        return f"{carry.group(1)} of type {carry.group(2)}, which {carry.group(3)} cannot carry"
    unimplemented = re.search(r"Unimplemented\((\w+)\)", reason)
    if unimplemented:
        return f"op {unimplemented.group(1)} not implemented"
    elem = re.search(r"translating to fact: Tensor \{ elem_type: (\w+)", reason)
    if elem:
        name = elem.group(1)
        if name.isdigit() and int(name) < len(ONNX_TYPE_NAMES):
            name = f"{name} ({ONNX_TYPE_NAMES[int(name)]})"
        return f"tensor type {name} unreadable"
    reason = re.sub(r" \(if an input's type or shape is open in the file, declare it in model\.toml\)$", "", reason)
    reason = re.sub(r"^cannot prepare the model for inference: ", "", reason)
    reason = re.sub(r"(Translating|Failed analyse for) node #\d+ \"[^\"]*\" ", "", reason)
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"`[^`]*`", "`…`", reason)
    reason = re.sub(r"in output_facts invocation for \S+", "in output_facts", reason)
    reason = re.sub(r"\[[^\]]*\]", "[…]", reason)
    reason = re.sub(r"\b\d+\b", "N", reason)
    return reason[:140]


def _kind(group):
    """A refusal reason's broad kind, for the one-line overview."""
    if "cannot carry" in group or "no datatype for" in group:
        return "a tensor type the protocol path cannot carry"
    if group.startswith("op "):
        return "an op not implemented"
    if re.search(r"unreadable|Unknown DatumType|unknown ONNX TensorProto.DataType", group):
        return "a tensor type tract cannot read"
    if re.search(r"not supp|[Uu]nsupported", group):
        return "an attribute, input or mode the op does not support"
    if re.search(r"const|variable|Expect", group):
        return "an input tract needs constant (axes, shapes, pads...)"
    return "other analysis failures"


def ask(client, model, record, dataset, as_json):
    """(outcome, detail) of one request of one data set."""
    inputs = dataset["inputs"]
    if as_json:
        body = json.dumps({
            "inputs": [
                {"name": t["name"], "datatype": t["datatype"], "shape": t["shape"],
                 "data": json_values(t["data"], t["datatype"], t["shape"])}
                for t in inputs
            ]
        }).encode()
        headers = {"Content-Type": "application/json"}
    else:
        header = json.dumps({
            "inputs": [
                {"name": t["name"], "datatype": t["datatype"], "shape": t["shape"],
                 "parameters": {"binary_data_size": len(t["data"])}}
                for t in inputs
            ],
            "parameters": {"binary_data_output": True},
        }).encode()
        body = header + b"".join(t["data"] for t in inputs)
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(len(header))}
    status, reply_headers, reply = client.request("POST", f"/v2/models/{model}/infer", body, headers)
    if status == 0:
        return "error", reply.decode(), False
    if 400 <= status < 500:
        return "rejected", f"{status}: {_error_text(reply)}", False
    if status != 200:
        return "error", f"{status}: {_error_text(reply)}", False
    try:
        json_length = int(reply_headers.get("inference-header-content-length", len(reply)))
        answer = json.loads(reply[:json_length])
        binary = memoryview(reply)[json_length:]
        got = {}
        for output in answer.get("outputs", []):
            shape = [int(d) for d in output["shape"]]
            size = (output.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                raw, binary = bytes(binary[:size]), binary[size:]
                if len(raw) != size:
                    raise ValueError(f"output '{output['name']}' announces {size} bytes past the body's end")
                array = decode(raw, output["datatype"], shape) if output["datatype"] in WIRE_DTYPE or output["datatype"] == "BYTES" else None
            else:
                array = from_json_data(output.get("data", []), output["datatype"], shape)
            got[output["name"]] = (output["datatype"], shape, array)
        if len(binary):
            raise ValueError(f"{len(binary)} bytes after the announced binary outputs")
    except (ValueError, KeyError, TypeError, struct.error) as e:
        return "WRONG", f"unreadable answer: {e}", False
    answers = dict(got)
    diffs, near = [], True
    for want in dataset["outputs"]:
        name = want["name"]
        if name not in got:
            diffs.append(f"output '{name}' missing (got {sorted(got)})")
            near = False
            continue
        datatype, shape, array = got.pop(name)
        if datatype != want["datatype"]:
            diffs.append(f"output '{name}': datatype {datatype}, want {want['datatype']}")
            near = False
            continue
        expected = decode(want["data"], want["datatype"], want["shape"])
        diff = compare(name, expected, array, record["rtol"], record["atol"], bf16=datatype == "BF16")
        if diff:
            diffs.append(diff)
            near = near and compare(name, expected, array, *_near_tolerance(record), bf16=datatype == "BF16",
                                    scaled=True) is None
    for name in sorted(got):
        diffs.append(f"unexpected output '{name}'")
        near = False
    if diffs:
        detail = ("json: " if as_json else "") + "; ".join(diffs)
        if near:
            return "near", detail, False
        return "WRONG", detail, _is_ort_answer(record, dataset, answers)
    return "pass", None, False


def _is_ort_answer(record, dataset, answers):
    """Whether `answers` are, within the case's tolerance, what ONNX Runtime itself answered
    in `prepare` (kept for the cases it fails)."""
    ort_outputs = dataset.get("ort_outputs")
    if not ort_outputs or len(answers) != len(dataset["outputs"]):
        return False
    for want, raw in zip(dataset["outputs"], ort_outputs):
        if raw is None or want["name"] not in answers:
            return False
        datatype, shape, array = answers[want["name"]]
        if datatype != want["datatype"] or array is None:
            return False
        try:
            ort_array = decode(raw, datatype, shape)
        except ValueError:
            return False
        if compare(want["name"], ort_array, array, record["rtol"], record["atol"], bf16=datatype == "BF16"):
            return False
    return True


def _near_tolerance(record):
    """The near-miss tolerance (rtol, atol before scaling), never tighter than the case's own."""
    return max(NEAR_TOLERANCE[0], record["rtol"]), max(NEAR_TOLERANCE[1], record["atol"])


def check(client, model, record, datasets, json_share):
    """(outcome, detail, asked in JSON too, the backend the server says serves the model,
    whether a WRONG answer is ONNX Runtime's own)."""
    status, _, body = client.request("GET", f"/v2/models/{model}/ready")
    if status == 0:
        return "error", body.decode(), False, None, False
    if status != 200:
        if status == 404:
            return "refused", f"not in the repository: {_error_text(body)}", False, None, False
        if status == 503:
            return "refused", _refusal(_error_text(body), model), False, None, False
        return "error", f"ready: {status}: {_error_text(body)}", False, None, False
    served_by = _served_by(client, model)
    if record["unsendable"]:
        return "unsendable", "no protocol datatype: " + ", ".join(record["unsendable"]), False, served_by, False
    in_json = (zlib.crc32(record["name"].encode()) & 0xFFFFFFFF) / 2**32 < json_share and all(
        json_values(t["data"], t["datatype"], t["shape"]) is not None
        for ds in datasets for t in ds["inputs"] + ds["outputs"]
    )
    rank = {o: i for i, o in enumerate(["pass", "near", "rejected", "error", "WRONG"])}
    worst, as_ort = ("pass", None, False), True
    for dataset in datasets:
        for as_json in ((False, True) if in_json else (False,)):
            outcome = ask(client, model, record, dataset, as_json)
            if outcome[0] == "WRONG":
                as_ort = as_ort and outcome[2]
            if rank[outcome[0]] > rank[worst[0]]:
                worst = outcome
    return worst[0], worst[1], in_json, served_by, worst[0] == "WRONG" and as_ort


def _served_by(client, model):
    """The backend the model's metadata names in `engine.backend`, or None. A server that
    refuses a model.toml keeps serving the model on its default backend, so without this
    an "onnxruntime" model could be answered by tract unnoticed."""
    status, _, body = client.request("GET", f"/v2/models/{model}")
    if status != 200:
        return None
    try:
        engine = json.loads(body).get("engine")
    except (ValueError, AttributeError):
        return None
    backend = engine.get("backend") if isinstance(engine, dict) else None
    return backend if isinstance(backend, str) else None


def run(args):
    """Asks every case of every backend; (summary, failures), failures being why the run
    fails: models served by another backend than their name says."""
    out = Path(args.out)
    meta = json.loads((out / "cases.json").read_text())
    with open(out / "tensors.pkl", "rb") as f:
        tensors = pickle.load(f)
    backends = _backends(args.backends) if args.backends else meta["backends"]
    missing = [b for b in backends if b not in meta["backends"]]
    if missing:
        sys.exit(f"{out} has no models for {', '.join(missing)} (prepared: {', '.join(meta['backends'])})")
    records = meta["cases"]
    if args.only:
        only = re.compile(args.only)
        records = [r for r in records if only.search(r["name"])]

    server, base_url = None, args.base_url
    started = time.monotonic()
    if args.serve:
        server, base_url = _start(args.serve, args.base_url, out, args.ready_timeout)
    try:
        client = Client(base_url, args.timeout)
        _wait_ready(client, args.ready_timeout - (time.monotonic() - started), server)
        ready_s = time.monotonic() - started
        print(f"{base_url} ready after {ready_s:.1f} s ({'from the server start' if server else 'of waiting'})")
        run_started = time.monotonic()
        jobs = [(r, b) for r in records for b in backends]
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            results = list(pool.map(
                lambda job: check(client, f"{job[0]['name']}_{job[1]}", job[0], tensors[job[0]["name"]], args.json_share),
                jobs,
            ))
        run_s = time.monotonic() - run_started
    finally:
        if server:
            _stop(server)

    summary = {
        "onnx": meta["onnx"],
        "onnxruntime": meta["onnxruntime"],
        "tolerances": {
            "pass": {"rtol": ONNX_TOLERANCE[0], "atol": ONNX_TOLERANCE[1], "rule": "|got - want| <= atol + rtol * |want|",
                     "note": "the case's own; these for every node test"},
            "near": {"rtol": NEAR_TOLERANCE[0], "atol": NEAR_TOLERANCE[1], "atol_scaled_by": "max(1, max|want| over the output)",
                     "rule": NEAR_RULE, "note": "NaN equals NaN; infinities must match exactly"},
        },
        "total_cases": meta["total_cases"],
        "tensor_cases": meta["tensor_cases"],
        "asked_cases": len(records),
        "ort_pass": meta["ort_pass"],
        "skipped": meta["skipped"],
        "ready_seconds": round(ready_s, 2),
        "ready_measured_from": "server start" if server else "start of waiting",
        "run_seconds": round(run_s, 2),
        "json_share": args.json_share,
        "backends": {},
    }
    per_backend = collections.defaultdict(list)
    other_backend = collections.defaultdict(list)
    unnamed = collections.defaultdict(list)
    for (record, backend), (outcome, detail, in_json, served_by, as_ort) in zip(jobs, results):
        per_backend[backend].append((record, outcome, detail, in_json, as_ort))
        if outcome == "refused":
            continue
        if served_by is None:
            unnamed[backend].append(record["name"])
        elif served_by != backend:
            other_backend[backend].append(f"{record['name']}: {served_by}")
    print(f"{meta['total_cases']} node test cases, {meta['tensor_cases']} with tensors only "
          f"({len(records)} asked), ONNX Runtime {meta['onnxruntime']} passes {meta['ort_pass']}")
    print(TOLERANCE_NOTE)
    failures = []
    for backend in backends:
        report = summary["backends"][backend] = _report(backend, per_backend[backend])
        report["served_by_another_backend"] = other_backend[backend]
        report["backend_not_named"] = unnamed[backend]
        if other_backend[backend]:
            failures.append(f"{backend}: {len(other_backend[backend])} models are served by another backend "
                            f"(engine.backend), e.g. {other_backend[backend][0]}")
        if unnamed[backend] and meta["backend_key"]:
            failures.append(f"{backend}: {len(unnamed[backend])} ready models name no engine.backend in their "
                            f"metadata, e.g. {unnamed[backend][0]}")
    if server:
        refused_tomls = sum(1 for line in open(out / "server.log", errors="replace") if "model.toml refused" in line)
        if refused_tomls:
            print(f"\nWARNING: the server refused {refused_tomls} model.toml files (see server.log); "
                  "their models run with the defaults, whatever backend they name")
        summary["model_toml_refused"] = refused_tomls
    summary["backends_compared"] = _compare_backends(backends, per_backend)
    _table(summary)
    summary["failures"] = failures
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"time: ready {ready_s:.1f} s, run {run_s:.1f} s; summary in {out / 'summary.json'}")
    return summary, failures


def _table(summary):
    """One line per backend: the outcomes, and the share of ONNX Runtime's passes served right."""
    width = max([len(b) for b in summary["backends"]] + [7])
    print(f"\n{'backend':{width}}  " + "  ".join(f"{o:>{max(len(o), 4)}}" for o in OUTCOMES)
          + "  pass+near of ORT-passing   (protocol-carriable)")
    for backend, report in summary["backends"].items():
        right, carriable = report["pass_of_ort_passing"], report["pass_of_ort_passing_carriable"]
        print(f"{backend:{width}}  " + "  ".join(f"{report['counts'][o]:>{max(len(o), 4)}}" for o in OUTCOMES)
              + f"  {right['count']:>4}/{report['ort_passing']} = {right['share']:6.1%}"
              + f"   {carriable['count']:>4}/{report['ort_passing_carriable']} = {carriable['share']:6.1%}")


def _report(backend, rows):
    counts = collections.Counter(o for _, o, _, _, _ in rows)
    ort_rows = [row for row in rows if row[0]["ort_pass"]]
    ort_counts = collections.Counter(o for _, o, _, _, _ in ort_rows)
    served_right = sum(ort_counts[o] for o in SERVED_RIGHT)
    share = served_right / len(ort_rows) if ort_rows else 0.0
    # The ORT-passing cases whose every graph tensor has a protocol datatype: no
    # Open Inference Protocol server can be asked the others (float8, int4, int2...).
    carriable = [row for row in ort_rows if not row[0]["unsendable"]]
    carriable_right = sum(1 for row in carriable if row[1] in SERVED_RIGHT)
    carriable_share = carriable_right / len(carriable) if carriable else 0.0
    uncarriable_types = sorted({t["onnx_type"] for row in ort_rows if row[0]["unsendable"]
                                for t in row[0]["inputs"] + row[0]["outputs"] if t["onnx_type"] not in OIP_OF_ONNX})
    lists = {o: [] for o in OUTCOMES}
    for record, outcome, detail, in_json, as_ort in rows:
        lists[outcome].append({
            "case": record["name"],
            "op": record["op"],
            "attributes": record["attributes"],
            "ops": record["ops"],
            "types": sorted({t["onnx_type"] for t in record["inputs"] + record["outputs"]}),
            "ort_pass": record["ort_pass"],
            "json_too": in_json,
            "ort_own_answer": as_ort,
            "detail": detail,
        })
    reasons = collections.Counter(_group(item["detail"]) for item in lists["refused"])
    ort_reasons = collections.Counter(_group(item["detail"]) for item in lists["refused"] if item["ort_pass"])
    kinds = collections.Counter()
    for reason, n in reasons.items():
        kinds[_kind(reason)] += n
    json_asked = sum(1 for _, _, _, j, _ in rows if j)
    wrong_as_ort = sum(1 for item in lists["WRONG"] if item["ort_own_answer"])

    print(f"\n== {backend}: {len(rows)} cases ({len(ort_rows)} that ONNX Runtime passes; "
          f"{json_asked} asked in JSON as well as binary)")
    print("   all:           " + "  ".join(f"{o} {counts[o]}" for o in OUTCOMES))
    print("   ORT passes:    " + "  ".join(f"{o} {ort_counts[o]}" for o in OUTCOMES))
    print(f"   pass or near of the cases ONNX Runtime passes: {served_right}/{len(ort_rows)} = {share:.1%}; "
          f"of those the protocol can carry: {carriable_right}/{len(carriable)} = {carriable_share:.1%}")
    if lists["WRONG"]:
        print(f"   WRONG: {wrong_as_ort} of {len(lists['WRONG'])} are ONNX Runtime's own answer (ORT fails the case; "
              "still WRONG)")
    for outcome in ("WRONG", "near", "error", "rejected", "unsendable"):
        if lists[outcome]:
            print(f"   {outcome} ({len(lists[outcome])}):")
            for item in lists[outcome]:
                attrs = ", ".join(f"{k}={v!r}" for k, v in item["attributes"].items())
                what = f"{item['op']}({attrs})" if item["op"] else "+".join(item["ops"])
                if item["op"] and item["ops"] != [item["op"]]:
                    what += f" expanded into {len(item['ops'])} ops"
                ort = "" if item["ort_pass"] else " [ORT fails too]"
                if item["ort_own_answer"]:
                    ort = " [ORT fails too, and answers the same]"
                print(f"     {item['case']}  {what} {'/'.join(item['types'])}{ort}\n        {item['detail']}")
    if reasons:
        print(f"   refused ({len(lists['refused'])}), by kind:")
        for kind, n in kinds.most_common():
            print(f"     {n:4d}  {kind}")
        print(f"   refused, the {min(TOP_REASONS, len(reasons))} commonest of {len(reasons)} reasons:")
        for reason, n in reasons.most_common(TOP_REASONS):
            print(f"     {n:4d}  {reason}")
    if ort_reasons:
        print(f"   refused although ONNX Runtime passes ({sum(ort_reasons.values())}), "
              f"the {min(TOP_REASONS, len(ort_reasons))} commonest of {len(ort_reasons)} reasons:")
        for reason, n in ort_reasons.most_common(TOP_REASONS):
            print(f"     {n:4d}  {reason}")
    return {
        "cases": len(rows),
        "counts": {o: counts[o] for o in OUTCOMES},
        "ort_passing": len(ort_rows),
        "counts_where_ort_passes": {o: ort_counts[o] for o in OUTCOMES},
        "pass_of_ort_passing": {"count": served_right, "share": round(share, 4)},
        "ort_passing_carriable": len(carriable),
        "pass_of_ort_passing_carriable": {"count": carriable_right, "share": round(carriable_share, 4)},
        "ort_passing_uncarriable_types": uncarriable_types,
        "wrong": len(lists["WRONG"]),
        "wrong_ort_own_answer": wrong_as_ort,
        "wrong_cases": lists["WRONG"],
        "json_asked": json_asked,
        "refusal_kinds": dict(kinds.most_common()),
        "refusal_reasons": dict(reasons.most_common()),
        "refusal_reasons_where_ort_passes": dict(ort_reasons.most_common()),
        **{f"{o}_cases": lists[o] for o in OUTCOMES if o not in ("pass", "WRONG")},
        "passed": [item["case"] for item in lists["pass"]],
    }


# Refusal reasons printed; summary.json has them all.
TOP_REASONS = 25


def _compare_backends(backends, per_backend):
    """Cases one backend answers right (pass or near) and another does not, for every pair."""
    outcome = {b: {r["name"]: o for r, o, _, _, _ in per_backend[b]} for b in backends}
    pairs = {}
    for a in backends:
        for b in backends:
            if a != b:
                only = sorted(n for n, o in outcome[a].items()
                              if o in SERVED_RIGHT and outcome[b].get(n) not in SERVED_RIGHT)
                pairs[f"{a} answers right, {b} does not"] = only
    return pairs


def _start(binary, base_url, out, timeout):
    """Starts `binary serve` over OUT/models at base_url's address (port 0: a free one);
    (the server, its base URL). ORT_DYLIB_PATH and the rest of the environment pass through."""
    url = urllib.parse.urlsplit(base_url)
    workdir = Path(tempfile.mkdtemp(prefix="onnx-node-tests-"))
    config = workdir / "modelyard.toml"
    config.write_text("")
    log_path = out / "server.log"
    log = open(log_path, "wb")
    # Its own working directory and an empty configuration: nothing of the caller's
    # modelyard.toml, database or plugins applies. Info logs: the address comes from them.
    env = dict(os.environ, RUST_LOG="info")
    process = subprocess.Popen(
        [str(Path(binary).resolve()), "serve", "--listen", f"{url.hostname}:{url.port or 0}",
         "--config", str(config), "--models", str((out / "models").resolve())],
        cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
    )
    server = (process, workdir, log)
    started = time.monotonic()
    listening = re.compile(r"\blistening addr=(\S+)")
    while True:
        text = re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text(errors="replace"))
        found = listening.search(text)
        if found:
            return server, f"{url.scheme or 'http'}://{found.group(1)}{url.path.rstrip('/')}"
        if process.poll() is not None:
            _stop(server)
            sys.exit(f"the server exited ({process.returncode}) before it listened; see {log_path}")
        if time.monotonic() - started > timeout:
            _stop(server)
            sys.exit(f"the server did not listen within {timeout} s; see {log_path}")
        time.sleep(0.05)


def _stop(server):
    process, workdir, log = server
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()
    shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(client, timeout, server):
    started = time.monotonic()
    while True:
        status, _, body = client.request("GET", "/v2/health/ready")
        if status == 200:
            return time.monotonic() - started
        if server and server[0].poll() is not None:
            sys.exit(f"the server exited ({server[0].returncode}) before it was ready; see server.log")
        if time.monotonic() - started > timeout:
            sys.exit(f"not ready after {timeout:.0f} s: {status} {body[:200]!r}")
        time.sleep(0.1)


def _stale(out, backends, only):
    """Why OUT's preparation cannot serve a check of `backends` and `only`, or None."""
    import onnx
    import onnxruntime as ort

    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return f"it has no {STAMP} (a preparation of an older script)"
    if not stamp.get("complete"):
        return "its preparation did not finish"
    for key, want in (("format", PREPARATION_FORMAT), ("onnx", onnx.__version__), ("onnxruntime", ort.__version__)):
        if stamp.get(key) != want:
            return f"it was prepared with {key} {stamp.get(key)}, not {want}"
    if not stamp.get("backend_key"):
        return "it was prepared with --no-backend-key, and check needs models that name their backend"
    missing = [b for b in backends if b not in stamp.get("backends", [])]
    if missing:
        return f"it has no models for {', '.join(missing)}"
    if stamp.get("only") not in (None, only):
        return f"it holds only the cases matching {stamp['only']!r}"
    return None


def check_all(args):
    """prepare (unless OUT holds a preparation fit for this check), serve, run, gate;
    (summary, failures)."""
    out = Path(args.out)
    started = time.monotonic()
    backends = args.backends or "tract,onnxruntime"
    ours = (out / "cases.json").exists() or (out / STAMP).exists()
    if not ours and out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is neither empty nor a preparation of this tool")
    stale = _stale(out, _backends(backends), args.only) if ours else "there is none"
    if stale:
        print(f"preparing {out}: {stale}")
        prepare(argparse.Namespace(out=str(out), backends=backends, no_backend_key=False, only=args.only))
        print(f"prepared in {time.monotonic() - started:.1f} s\n")
    else:
        print(f"using the preparation in {out}")
    args.base_url = "http://127.0.0.1:0"
    args.serve = args.binary
    summary, failures = run(args)
    for backend, report in summary["backends"].items():
        # A WRONG answer fails on every backend, ONNX Runtime's own answer to a case it
        # fails included: the server must refuse what its backend gets wrong.
        wrong = [item["case"] for item in report["wrong_cases"]]
        if wrong:
            own = report["wrong_ort_own_answer"]
            failures.append(f"{backend}: {len(wrong)} cases answered WRONG"
                            + (f" ({own} of them ONNX Runtime's own answer)" if own else "") + ": "
                            + ", ".join(wrong[:10]) + (" ..." if len(wrong) > 10 else ""))
    ort = summary["backends"].get("onnxruntime")
    gate = {"backend": "onnxruntime", "min_share": args.min_share, "of": args.share_of,
            "wrong": "any WRONG answer on any backend fails, ONNX Runtime's own answer included"}
    if ort is None:
        failures.append("no onnxruntime backend asked: its share cannot be checked")
    else:
        carriable, every = ort["pass_of_ort_passing_carriable"], ort["pass_of_ort_passing"]
        uncarried = ort["ort_passing_uncarriable_types"]
        uncarriable = ort["ort_passing"] - ort["ort_passing_carriable"]
        why = ("float8, float4, int4 and int2 tensors have no Open Inference Protocol datatype; "
               + (f"{uncarriable} cases have such tensors: {', '.join(uncarried)}" if uncarriable
                  else "no case here has such tensors"))
        gate.update(carriable={"count": carriable["count"], "of": ort["ort_passing_carriable"], "share": carriable["share"]},
                    all={"count": every["count"], "of": ort["ort_passing"], "share": every["share"]},
                    not_carriable=why)
        gated, total = ((every["count"], ort["ort_passing"]) if args.share_of == "all"
                        else (carriable["count"], ort["ort_passing_carriable"]))
        share = gated / total if total else 0.0
        print(f"\ngate (onnxruntime, pass or near of the cases ONNX Runtime passes, at least {args.min_share:.1%}):")
        mark = {True: "  <- gated", False: ""}
        print(f"   of those the protocol can carry: {carriable['count']}/{ort['ort_passing_carriable']} = "
              f"{carriable['share']:.1%}{mark[args.share_of == 'carriable']}  ({why})")
        print(f"   of all of them:                  {every['count']}/{ort['ort_passing']} = "
              f"{every['share']:.1%}{mark[args.share_of == 'all']}")
        for backend, report in summary["backends"].items():
            print(f"   {backend}: WRONG {report['wrong']} (ONNX Runtime's own answer: {report['wrong_ort_own_answer']}); "
                  "any WRONG fails")
        if share < args.min_share:
            reasons = ort["refusal_reasons_where_ort_passes"]
            commonest = next(iter(reasons.items()), None)
            failures.append(f"onnxruntime: {gated}/{total} = {share:.1%} of the cases ONNX Runtime "
                            f"passes ({args.share_of}) answered right, under {args.min_share:.1%}"
                            + (f"; commonest refusal ({commonest[1]}): {commonest[0]}" if commonest else ""))
    summary["min_share"] = {"share": args.min_share, "of": args.share_of}
    summary["gate"] = gate
    summary["failures"] = failures
    summary["check_seconds"] = round(time.monotonic() - started, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"check: {time.monotonic() - started:.1f} s in all")
    return summary, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="generate the cases, the ONNX Runtime verdicts and the models")
    p.add_argument("out")
    p.add_argument("--backends", default="tract,onnxruntime")
    p.add_argument("--no-backend-key", action="store_true", help="write no model.toml (servers that know no `backend` key)")
    p.add_argument("--only", help="only the cases whose name this regular expression finds")
    r = sub.add_parser("run", help="ask a server serving OUT/models and summarise")
    r.add_argument("base_url", help="with --serve, the address to start it at (port 0: a free port)")
    r.add_argument("out")
    r.add_argument("--serve", metavar="BINARY", help="start this modelyard over OUT/models at BASE_URL, and stop it after")
    c = sub.add_parser("check", help="prepare (unless done), serve, run; exit 1 on WRONG answers or too few right")
    c.add_argument("out")
    c.add_argument("binary", help="the modelyard binary to serve OUT/models with")
    c.add_argument("--min-share", type=float, default=0.95,
                   help="least share of the cases ONNX Runtime passes that the onnxruntime backend must answer right")
    c.add_argument("--share-of", choices=["carriable", "all"], default="carriable",
                   help="of the ORT-passing cases whose tensors all have a protocol datatype (default), or of all")
    for q in (r, c):
        q.add_argument("--backends", help="default: those prepared (check prepares tract,onnxruntime)")
        q.add_argument("--json-share", type=float, default=0.2, help="share of cases also asked in JSON")
        q.add_argument("--only", help="only the cases whose name this regular expression finds")
        q.add_argument("--workers", type=int, default=4, help="requests at once")
        q.add_argument("--timeout", type=float, default=120, help="seconds one request may take")
        q.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for /v2/health/ready")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args)
        return
    _, failures = run(args) if args.command == "run" else check_all(args)
    if failures:
        print("\nFAILED:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)
    if args.command == "check":
        print("check passed")


if __name__ == "__main__":
    main()
