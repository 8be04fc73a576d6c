#!/usr/bin/env python3
"""Train the sample `iris` models and export them as plain ONNX graphs.

Version 1 is a heavily regularised linear model (logistic regression), version 2 a small
MLP, so strategies have two models of visibly different quality to compare. The graphs
use only MatMul, Add, Relu and Softmax, which every backend (tract included) runs; the
scikit-learn ONNX converters would emit ONNX-ML ops (ZipMap, LinearClassifier) instead.

Rerun with: python3 models/make_iris.py   (needs numpy, scikit-learn, onnx)
It rewrites models/iris/{1,2}/model.onnx, models/iris/model.toml and models/iris/iris.csv,
and the drift reference of each version, models/iris/{1,2}/reference.json: the percentiles
of every input feature over the training data. `--reference-only` rewrites just those.
"""

import json
import sys

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

HERE = Path(__file__).resolve().parent / "iris"


def graph(name, layers):
    """Dense layers (weights [in, out], bias [out]) with Relu between them, then Softmax."""
    nodes, inits, current = [], [], "input"
    for i, (w, b) in enumerate(layers):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"]),
        ]
        current = f"z{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"h{i}"]))
            current = f"h{i}"
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=1))
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="modelyard")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def accuracy(layers, x, y):
    h = x
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return float((softmax(h).argmax(axis=1) == y).mean())


FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def write_reference(x, out):
    """The training inputs' distribution, as the server's drift detection reads it."""
    reference = {
        "input": "input",
        "features": [
            {
                "name": name,
                "quantiles": [round(float(q), 6) for q in np.quantile(x[:, i], np.linspace(0, 1, 101))],
            }
            for i, name in enumerate(FEATURES)
        ],
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")


def main():
    data = load_iris()
    x, y = data.data.astype(np.float32), data.target
    for version in ("1", "2"):
        (HERE / version).mkdir(parents=True, exist_ok=True)
        write_reference(x.astype(np.float64), HERE / version)
    if "--reference-only" in sys.argv:
        return

    linear = LogisticRegression(C=0.01, max_iter=1000).fit(x, y)
    v1 = [(linear.coef_.T, linear.intercept_)]

    mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=4000, random_state=7).fit(x, y)
    v2 = list(zip(mlp.coefs_, mlp.intercepts_))

    acc = {}
    for version, layers in (("1", v1), ("2", v2)):
        out = HERE / version
        out.mkdir(parents=True, exist_ok=True)
        onnx.save(graph(f"iris-v{version}", layers), out / "model.onnx")
        acc[version] = accuracy(layers, x, y)
        print(f"iris v{version}: accuracy {acc[version]:.4f} on all 150 samples")

    with open(HERE / "iris.csv", "w") as f:
        f.write("sepal_length,sepal_width,petal_length,petal_width,label\n")
        for row, label in zip(data.data, y):
            f.write(",".join(f"{v:g}" for v in row) + f",{label}\n")

    (HERE / "model.toml").write_text(
        f"""# Written by models/make_iris.py; rerun it rather than editing by hand.
version_policy = "all"

[card]
description = "Iris species classifier: four flower measurements in centimetres to class probabilities."
intended_use = "Sample model for trying Modelyard's serving and routing; not for botanical decisions."
limitations = "Trained on 150 flowers of three species; inputs outside the measured ranges give meaningless probabilities."
owner = "Modelyard maintainers"
training_data = "Fisher's iris data set as shipped with scikit-learn (150 samples, 3 classes)."

# Drift against each version's reference.json (the training data's percentiles).
[drift]
window = 500
min_samples = 200
ks_threshold = 0.2
psi_threshold = 0.25

[card.metrics."1"]
model = "logistic regression, C=0.01"
accuracy = {acc["1"]:.4f}

[card.metrics."2"]
model = "MLP, one hidden layer of 16 ReLU units"
accuracy = {acc["2"]:.4f}
"""
    )


if __name__ == "__main__":
    main()
