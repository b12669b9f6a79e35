"""Floating-point work of a Keras model, counted from its layers' shapes (for benchmarks).

``forward_flops(model)``: multiply-adds x 2 of the convolutions (``Conv2D``, ``DepthwiseConv2D``)
and dense layers of one image's forward pass; element-wise work (BatchNorm, activations, pooling,
attention's softmax) is left out, so the count is a lower bound dominated by what a CPU spends its
time on. ``Conv2D``: ``2 * h_out * w_out * k_h * k_w * (c_in / groups) * c_out``; ``Dense`` applied
to ``(..., d_in)``: ``2 * prod(leading dims) * d_in * d_out``; ``MultiHeadAttention``: its four
projections plus ``2 * 2 * T_q * T_k * d`` for the scores and the weighted sum.
``training_flops(model) = 3 * forward_flops(model)``: the usual estimate for a training step (the
backward pass costs about twice the forward). Used by ``benchmarks/train_throughput.py`` to put a
network's images/s against the machine's matrix-multiply peak.
"""
from __future__ import annotations

import math


def _shape(t) -> tuple:
    return tuple(int(d) if d is not None else 1 for d in t.shape[1:])


def _node_flops(layer, node) -> float:
    """FLOPs of one call (``node``) of ``layer`` on one image."""
    import keras

    ins = [t for t in node.input_tensors]
    outs = [t for t in node.outputs]
    if not ins or not outs:
        return 0.0
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        h, w, c = _shape(outs[0])
        kh, kw = layer.kernel_size
        return 2.0 * h * w * kh * kw * c
    if isinstance(layer, keras.layers.Conv2D):
        h, w, cout = _shape(outs[0])
        cin = _shape(ins[0])[-1]
        kh, kw = layer.kernel_size
        return 2.0 * h * w * kh * kw * (cin / max(1, int(getattr(layer, "groups", 1)))) * cout
    if isinstance(layer, keras.layers.Dense):
        s = _shape(ins[0])
        return 2.0 * math.prod(s[:-1]) * s[-1] * int(layer.units)
    if isinstance(layer, keras.layers.MultiHeadAttention):
        q, v = _shape(ins[0]), _shape(ins[1] if len(ins) > 1 else ins[0])
        tq, dq = math.prod(q[:-1]), q[-1]
        tk, dk = math.prod(v[:-1]), v[-1]
        heads, kd = int(layer.num_heads), int(layer.key_dim)
        vd = int(layer.value_dim or kd)
        return (2.0 * (tq * dq * heads * kd      # query projection
                       + tk * dk * heads * kd    # key projection
                       + tk * dk * heads * vd    # value projection
                       + tq * heads * vd * dq)   # output projection
                + 2.0 * heads * tq * tk * (kd + vd))  # scores and the weighted sum
    return 0.0


def forward_flops(model) -> float:
    """FLOPs (2 x multiply-adds) of one image's forward pass through ``model``'s convolutions,
    dense layers and attention (see the module docstring).

    Only the calls on the path from the model's inputs to its outputs count, each as often as
    images of the batch pass through it per input image: a layer whose class defines
    ``batch_multiplier(input_multipliers, input_tensors) -> output multipliers`` changes that count (the RGB
    family's ``StackChannels`` puts the three stains of an image on the batch axis, so its shared
    backbone runs three times per image; ``UnstackChannels`` / ``StackMaps`` undo and redo it)."""
    mult: dict[int, float] = {}   # id(tensor) -> images per input image
    total = 0.0
    for depth in sorted(model._nodes_by_depth, reverse=True):   # inputs first
        for node in model._nodes_by_depth[depth]:
            op = node.operation
            ins = list(node.input_tensors)
            in_m = [mult.get(id(t), 1.0) for t in ins]
            m = max(in_m) if in_m else 1.0
            total += m * _node_flops(op, node)
            out_m = op.batch_multiplier(in_m, ins) if hasattr(op, "batch_multiplier") else [m] * len(node.outputs)
            for t, v in zip(node.outputs, out_m):
                mult[id(t)] = float(v)
    return float(total)


def training_flops(model) -> float:
    """Estimated FLOPs of one image's training step: 3 x :func:`forward_flops`."""
    return 3.0 * forward_flops(model)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict:
    """Measured ``n x n @ n x n`` matrix-multiply speed in GFLOP/s (``2 n^3`` per product):
    median and best of ``repeats`` timed products after one warm-up, in TensorFlow (the library the
    networks train with)."""
    import statistics
    import time

    import tensorflow as tf

    a = tf.random.stateless_normal((n, n), seed=(1, 2), dtype=dtype)
    b = tf.random.stateless_normal((n, n), seed=(3, 4), dtype=dtype)
    (a @ b).numpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        (a @ b).numpy()
        times.append(time.perf_counter() - t0)
    g = [2.0 * n ** 3 / t / 1e9 for t in times]
    return {"n": n, "dtype": dtype, "gflops_median": statistics.median(g), "gflops_best": max(g)}
