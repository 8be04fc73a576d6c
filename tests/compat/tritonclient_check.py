#!/usr/bin/env python3
"""Drives a running Modelyard with tritonclient's HTTP client, as a KServe user would.

Usage: tritonclient_check.py HOST:PORT path/to/iris.csv   (exits non-zero on any failure)
"""

import csv
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main(url, csv_path):
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1")
    assert not client.is_model_ready("iris", "9")
    meta = client.get_model_metadata("iris")
    assert meta["inputs"][0]["shape"] == [-1, 4], meta

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    x = np.array([[float(r[k]) for k in list(r)[:4]] for r in rows], dtype=np.float32)
    labels = np.array([int(r["label"]) for r in rows])

    results = {}
    for binary in (False, True):
        for version in ("1", "2"):
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
            result = client.infer("iris", [inp], model_version=version, outputs=[out], request_id=f"r-{version}")
            probs = result.as_numpy("probabilities")
            assert probs.shape == (150, 3) and probs.dtype == np.float32, (probs.shape, probs.dtype)
            response = result.get_response()
            assert response["model_version"] == version and response["id"] == f"r-{version}", response
            results[(binary, version)] = probs
            accuracy = float((probs.argmax(axis=1) == labels).mean())
            print(f"binary={binary} version={version} accuracy={accuracy:.4f}")
    for version in ("1", "2"):
        assert np.array_equal(results[(False, version)], results[(True, version)]), version
    acc = {v: float((results[(True, v)].argmax(axis=1) == labels).mean()) for v in ("1", "2")}
    assert acc["2"] > acc["1"] >= 0.85, acc

    # No outputs named: tritonclient asks for binary outputs with binary_data_output.
    inp = httpclient.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(x[:1])
    assert client.infer("iris", [inp]).as_numpy("probabilities").shape == (1, 3)

    try:
        client.infer("nope", [inp])
        raise AssertionError("an unknown model was served")
    except InferenceServerException as e:
        assert "unknown model 'nope'" in str(e), e
    bad = httpclient.InferInput("input", [1, 4], "FP64")
    bad.set_data_from_numpy(x[:1].astype(np.float64))
    try:
        client.infer("iris", [bad])
        raise AssertionError("a wrong datatype was accepted")
    except InferenceServerException as e:
        assert "expects FP32" in str(e), e
    print("tritonclient: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
