#!/usr/bin/env python3
"""Build the two benchmark models: a ResNet-18 and a BERT-mini, with random weights.

Only the shapes and the amount of work matter to a benchmark, so nothing is trained or
downloaded: the weights come from a fixed seed, scaled so that the outputs stay finite and
vary from input to input (the ResNet's BatchNorm statistics come from a numpy pass over a
few synthetic images). The graphs use only ops that both tract and ONNX Runtime run
(opset 13, where the Reduce ops still take their axes as attributes; LayerNorm and GELU
spelled out in elementary ops), so the same file benchmarks either backend.

  resnet18   input "input" FP32 [batch, 3, 224, 224] -> "logits" FP32 [batch, 1000]
             the ResNet-18 topology, BatchNorm folded into the convolutions' weights and bias
  bert-mini  input "input_ids" INT64 [batch, 128] -> "embedding" FP32 [batch, 256]
             vocabulary 30522, hidden 256, 4 layers of 4 heads, intermediate 1024,
             pooled like BERT: the first token through a dense layer and tanh

Run with: python3 models/make_bench_models.py OUT_DIR   (needs numpy and onnx)
It writes OUT_DIR/{resnet18,bert-mini}/1/model.onnx and a model.toml with a card beside
each. Both files are tens of megabytes: the engine benchmarks (host/benches/engine.sh)
generate them under target/, and they are not to be committed.
"""

import sys

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20240601
OPSET = 13


class Graph:
    """Nodes and initializers under unique names, so the builders below read like the model."""

    def __init__(self, rng):
        self.rng, self.nodes, self.inits, self.count = rng, [], [], 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint, dtype=np.float32):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def normal(self, shape, std, hint):
        return self.const(self.rng.standard_normal(shape) * std, hint)

    def model(self, name, inputs, outputs):
        """The graph, its last node writing the one output."""
        self.nodes[-1].output[0] = outputs[0].name
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelyard")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


# ResNet-18 ---------------------------------------------------------------------------------


def conv2d(x, w, stride, pad):
    """NCHW convolution in numpy (no bias), for the calibration pass."""
    k = w.shape[-1]
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return np.einsum("nchwij,ocij->nohw", windows, w, optimize=True)


def conv(g, x, c_in, c_out, k, stride, relu=True):
    """A convolution followed by BatchNorm, folded into the convolution's weights and bias.
    The statistics come from the calibration activations in `x`, as a network trained with
    BatchNorm has them: each channel leaves near zero mean and unit variance. Returns the
    node's name and its activations."""
    name, value = x
    w = g.rng.standard_normal((c_out, c_in, k, k)).astype(np.float32) * np.sqrt(2.0 / (c_in * k * k))
    y = conv2d(value, w, stride, k // 2)
    mean, std = y.mean(axis=(0, 2, 3)), y.std(axis=(0, 2, 3)) + 1e-5
    w = w / std[:, None, None, None]
    b = -mean / std
    y = (y - mean[None, :, None, None]) / std[None, :, None, None]
    out = g.op("Conv", [name, g.const(w, "conv_w"), g.const(b, "conv_b")], "conv",
               kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
    return (g.op("Relu", [out], "relu"), np.maximum(y, 0)) if relu else (out, y)


def basic_block(g, x, c_in, c_out, stride):
    h = conv(g, conv(g, x, c_in, c_out, 3, stride), c_out, c_out, 3, 1, relu=False)
    shortcut = conv(g, x, c_in, c_out, 1, stride, relu=False) if stride != 1 or c_in != c_out else x
    return g.op("Relu", [g.op("Add", [h[0], shortcut[0]], "residual")], "relu"), np.maximum(h[1] + shortcut[1], 0)


def calibration_images(rng, n=8):
    """Inputs with the coarse structure of normalised photographs: smooth regions of colour
    plus fine detail. Plain noise would make every image look alike to the network."""
    coarse = rng.standard_normal((n, 3, 7, 7)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 32, axis=2), 32, axis=3) + 0.3 * rng.standard_normal((n, 3, 224, 224)).astype(np.float32)


def resnet18(rng):
    g = Graph(rng)
    x = conv(g, ("input", calibration_images(rng)), 3, 64, 7, 2)
    # MaxPool's padding is -inf, which after a Relu is the same as zero.
    padded = np.pad(x[1], ((0, 0), (0, 0), (1, 1), (1, 1)))
    pooled = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(4, 5))
    x = g.op("MaxPool", [x[0]], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), pooled
    c_in = 64
    for stage, c_out in enumerate((64, 128, 256, 512)):
        for block in range(2):
            x = basic_block(g, x, c_in, c_out, 2 if stage > 0 and block == 0 else 1)
            c_in = c_out
    features = x[1].mean(axis=(2, 3))
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x[0]], "pool")], "flatten", axis=1)
    # Standardising the pooled features (folded into the classifier) takes out what all
    # images share, so the logits differ from image to image.
    # One scale for all features, not one each: a feature that barely varied over the few
    # calibration images must not blow up on other inputs.
    mean, std = features.mean(axis=0), np.sqrt(features.var(axis=0).mean())
    w = rng.standard_normal((1000, 512)).astype(np.float32) / np.sqrt(512) / std
    b = -w @ mean + 0.01 * rng.standard_normal(1000)
    g.op("Gemm", [x, g.const(w, "fc_w"), g.const(b, "fc_b")], "fc", transB=1)
    return g.model(
        "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
    )


# BERT-mini ---------------------------------------------------------------------------------

VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE, SEQ, MAX_POSITIONS = 30522, 256, 4, 4, 1024, 128, 512


def layer_norm(g, x):
    """LayerNormalization over the last axis (epsilon 1e-12, as BERT), in elementary ops."""
    mean = g.op("ReduceMean", [x], "ln_mean", axes=[-1], keepdims=1)
    centred = g.op("Sub", [x, mean], "ln_centred")
    var = g.op("ReduceMean", [g.op("Mul", [centred, centred], "ln_sq")], "ln_var", axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(1e-12, "ln_eps")], "ln_var_eps")], "ln_std")
    normed = g.op("Div", [centred, std], "ln_normed")
    gamma = g.const(1.0 + 0.1 * g.rng.standard_normal(HIDDEN), "ln_gamma")
    beta = g.normal((HIDDEN,), 0.1, "ln_beta")
    return g.op("Add", [g.op("Mul", [normed, gamma], "ln_scaled"), beta], "ln")


def dense(g, x, n_in, n_out):
    w = g.normal((n_in, n_out), 1.0 / np.sqrt(n_in), "dense_w")
    b = g.normal((n_out,), 0.02, "dense_b")
    return g.op("Add", [g.op("MatMul", [x, w], "matmul"), b], "dense")


def gelu(g, x):
    """The exact GELU that BERT uses: x * (1 + erf(x / sqrt 2)) / 2."""
    erf = g.op("Erf", [g.op("Div", [x, g.const(np.sqrt(2.0), "sqrt2")], "gelu_scaled")], "gelu_erf")
    one_plus = g.op("Add", [erf, g.const(1.0, "one")], "gelu_1p")
    return g.op("Mul", [g.op("Mul", [x, one_plus], "gelu_x"), g.const(0.5, "half")], "gelu")


def heads(g, x, perm):
    """[batch, seq, hidden] to one slice per head: [batch, heads, seq, head size] (or, for
    the keys, [batch, heads, head size, seq])."""
    shape = g.const([0, SEQ, HEADS, HIDDEN // HEADS], "heads_shape", np.int64)
    return g.op("Transpose", [g.op("Reshape", [x, shape], "heads")], "heads_t", perm=perm)


def encoder_layer(g, x):
    q = heads(g, dense(g, x, HIDDEN, HIDDEN), [0, 2, 1, 3])
    k = heads(g, dense(g, x, HIDDEN, HIDDEN), [0, 2, 3, 1])
    v = heads(g, dense(g, x, HIDDEN, HIDDEN), [0, 2, 1, 3])
    scores = g.op("Div", [g.op("MatMul", [q, k], "scores"), g.const(np.sqrt(HIDDEN // HEADS), "scale")], "scaled")
    context = g.op("MatMul", [g.op("Softmax", [scores], "attention", axis=-1), v], "context")
    context = g.op("Transpose", [context], "context_t", perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, g.const([0, SEQ, HIDDEN], "merge_shape", np.int64)], "merged")
    x = layer_norm(g, g.op("Add", [dense(g, context, HIDDEN, HIDDEN), x], "attn_residual"))
    h = dense(g, gelu(g, dense(g, x, HIDDEN, INTERMEDIATE)), INTERMEDIATE, HIDDEN)
    return layer_norm(g, g.op("Add", [h, x], "ffn_residual"))


def bert_mini(rng):
    g = Graph(rng)
    words = g.op("Gather", [g.normal((VOCAB, HIDDEN), 0.02, "word_embeddings"), "input_ids"], "words", axis=0)
    positions = g.op(
        "Gather",
        [g.normal((MAX_POSITIONS, HIDDEN), 0.02, "position_embeddings"), g.const(np.arange(SEQ), "position_ids", np.int64)],
        "positions",
        axis=0,
    )
    # Every token has segment 0: its type embedding is one row, added to all.
    token_type = g.normal((HIDDEN,), 0.02, "token_type_embedding")
    x = g.op("Add", [g.op("Add", [words, positions], "embed_sum"), token_type], "embeddings")
    x = layer_norm(g, x)
    for _ in range(LAYERS):
        x = encoder_layer(g, x)
    first = g.op("Gather", [x, g.const(0, "first_token", np.int64)], "first", axis=1)
    g.op("Tanh", [dense(g, first, HIDDEN, HIDDEN)], "pooled")
    return g.model(
        "bert-mini",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", HIDDEN])],
    )


CARDS = {
    "resnet18": "ResNet-18 topology (BatchNorm folded), random weights: [batch, 3, 224, 224] FP32 to 1000 logits.",
    "bert-mini": "BERT-mini encoder (4 layers, hidden 256, 4 heads), random weights: [batch, 128] token ids to a 256-float pooled embedding.",
}


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_bench_models.py OUT_DIR")
    out = Path(sys.argv[1])
    # One generator per model: each model's weights do not depend on the other being built.
    for name, build, seed in (("resnet18", resnet18, SEED), ("bert-mini", bert_mini, SEED + 1)):
        model = build(np.random.default_rng(seed))
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        onnx.save(model, out / name / "1" / "model.onnx")
        (out / name / "model.toml").write_text(
            f"""# Written by models/make_bench_models.py; rerun it rather than editing by hand.
[card]
description = "{CARDS[name]}"
intended_use = "Benchmarking the inference backends; its answers mean nothing."
owner = "Modelyard maintainers"
"""
        )
        size = (out / name / "1" / "model.onnx").stat().st_size
        print(f"{name}: {size} bytes, {sum(np.prod(i.dims) for i in model.graph.initializer)} parameters")


if __name__ == "__main__":
    main()
