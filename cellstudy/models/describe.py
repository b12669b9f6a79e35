"""Tables describing the networks for the book (parameter counts, shapes, Grad-CAM layers,
forward time, stages)."""
from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import pandas as pd


def forward_time_ms(model, n_runs: int = 5, warmup: int = 2, seed: int = 0) -> float:
    """Median wall time (ms) of ``model.predict_on_batch`` on one random image, after ``warmup``
    calls (the first traces the graph)."""
    shape = (1,) + tuple(int(v) for v in model.inputs[0].shape[1:])
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    for _ in range(max(1, warmup)):
        model.predict_on_batch(x)
    times = []
    for _ in range(max(1, n_runs)):
        t0 = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _shape(t) -> str:
    return "x".join("N" if v is None else str(int(v)) for v in t.shape)


def describe(networks: Iterable[str] | None = None, sizes: Iterable[int] = (48, 512),
             time_sizes: Iterable[int] | None = None, n_classes: int = 2, n_runs: int = 5,
             **params) -> pd.DataFrame:
    """One row per (network, size): ``network``, ``family``, ``image_size``, ``n_params``
    (all weights), ``n_trainable``, ``input_shape``, ``output_shape``, ``gradcam_layers``
    (";"-joined), ``gradcam_shapes`` (";"-joined ``N x h x w x C``), ``forward_ms`` (median
    single-image ``predict_on_batch`` time on this machine, only for sizes in ``time_sizes``;
    NaN otherwise). ``networks`` None = all eleven. ``params`` go to ``build``.
    """
    from . import NETWORKS, build, check_name

    names = list(NETWORKS) if networks is None else [check_name(n) for n in networks]
    time_sizes = set(time_sizes or ())
    rows = []
    for name in names:
        for s in sizes:
            m = build(name, int(s), n_classes=n_classes, **params)
            rows.append(_row(name, m, int(s), int(s) in time_sizes, n_runs))
            del m
    return pd.DataFrame(rows)


def _row(name: str, m, size: int, timed: bool, n_runs: int) -> dict:
    """One row of :func:`describe` for the built network ``m`` at ``size``."""
    from . import FAMILIES, gradcam_layers

    gl = gradcam_layers(m)
    return {
        "network": name, "family": FAMILIES[name], "image_size": size,
        "n_params": int(m.count_params()),
        "n_trainable": int(sum(int(np.prod(w.shape)) for w in m.trainable_weights)),
        "input_shape": _shape(m.inputs[0]), "output_shape": _shape(m.outputs[0]),
        "gradcam_layers": ";".join(gl),
        "gradcam_shapes": ";".join(_shape(m.get_layer(n).output) for n in gl),
        "forward_ms": forward_time_ms(m, n_runs=n_runs) if timed else np.nan,
    }


#: Curated stages per network: (stage, layer name). Shapes are read from a built model.
_STAGES = {
    "vgg16": [("input", "image"), ("block1", "block1_pool"), ("block2", "block2_pool"),
              ("block3", "block3_pool"), ("block4", "block4_pool"), ("block5 (Grad-CAM)", "block5_conv3"),
              ("block5 pool", "block5_pool")],
    "resnet50": [("input", "image"), ("stem", "pool1_pool"), ("conv2 (x3)", "conv2_block3_out"),
                 ("conv3 (x4)", "conv3_block4_out"), ("conv4 (x6)", "conv4_block6_out"),
                 ("conv5 (x3, Grad-CAM)", "conv5_block3_out")],
    "densenet121": [("input", "image"), ("stem", "pool1"), ("dense2 + transition", "pool2_pool"),
                    ("dense3 + transition", "pool3_pool"), ("dense4 + transition", "pool4_pool"),
                    ("dense5 + BN-ReLU (Grad-CAM)", "relu")],
    "denres131": [("input", "image")]
    + [(f"level {i} ResNet50", f"res_{n}") for i, n in enumerate(
        ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"), 1)]
    + [(f"level {i} DenseNet121", f"den_{n}") for i, n in enumerate(
        ("pool2_relu", "pool3_relu", "pool4_relu", "relu"), 1)]
    + [(f"level {i} pair -> conv -> pool", f"denres_l{i}_conv") for i in range(1, 5)]
    + [("fused levels", "denres_concat")],
    "vit": [("input", "image"), ("patch embedding", "vit_patch_embed"), ("tokens", "vit_tokens"),
            ("+ position", "vit_pos_embed"), ("encoder blocks", "vit_ln"), ("grid (Grad-CAM)", "vit_grid")],
    "mhl": [("input", "image"), ("CNN (Grad-CAM)", "cnn_relu3"), ("tokens", "tokens"),
            ("self-attention", "att_self_ln"), ("pooled", "att_self_pool")],
}
for _n, _last in (("rgb", None), ("rgb_res", None), ("rgb_den", None)):
    _STAGES[_n] = ([("input", "image")] + [(f"isolate {c.upper()}", f"isolate_{c}") for c in "rgb"]
                   + [(f"shared backbone on {c.upper()} (Grad-CAM)", f"feat_{c}") for c in "rgb"]
                   + [(f"tokens {c.upper()}", f"tokens_{c}") for c in "rgb"]
                   + [(f"attention {a.upper()}{b.upper()}", f"att_{a}{b}_pool")
                      for a, b in (("r", "r"), ("g", "g"), ("b", "b"), ("r", "g"), ("r", "b"), ("g", "b"))]
                   + [("concatenated (eq. 3)", "att_concat")])
_STAGES["mhl_res"] = [("input", "image"), ("ResNet50 (Grad-CAM)", "conv5_block3_out")] + _STAGES["mhl"][2:]
_STAGES["mhl_den"] = [("input", "image"), ("DenseNet121 (Grad-CAM)", "relu")] + _STAGES["mhl"][2:]
_HEAD = [("head: pool", "head_pool"), ("head: dense 1", "head_dense1"), ("head: dense 2", "head_dense2"),
         ("logits", "logits"), ("softmax", "probs")]


def stage_table(model) -> pd.DataFrame:
    """Compact stage table of a built network: ``stage``, ``layer``, ``output_shape``,
    ``params`` (weights of that one layer). The head rows follow the network's own stages."""
    from . import check_name

    name = check_name(model.name)
    rows = []
    for stage, lname in _STAGES[name] + _HEAD:
        try:
            layer = model.get_layer(lname)
        except ValueError:
            continue  # e.g. head_dense2 absent with custom head_units
        out = model.inputs[0] if lname == "image" else layer.output
        rows.append({"stage": stage, "layer": lname, "output_shape": _shape(out),
                     "params": int(layer.count_params()) if layer.built else 0})
    return pd.DataFrame(rows)


def network_card(name: str, image_size: int, big_size: int = 512, n_runs: int = 3,
                 n_classes: int = 2, **params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The book's card of one network: ``(summary, stages)``.

    ``summary``: :func:`describe`'s columns, one row at ``image_size`` (with ``forward_ms``, the
    median compiled single-image forward time) and one at ``big_size`` (no timing; built only to
    count parameters and read shapes). ``stages``: :func:`stage_table` at ``image_size``.
    Each size is built once.
    """
    from . import build, check_name

    check_name(name)
    rows, stages = [], None
    for s, timed in ((int(image_size), True), (int(big_size), False)):
        m = build(name, s, n_classes=n_classes, **params)
        rows.append(_row(name, m, s, timed, n_runs))
        if timed:
            stages = stage_table(m)
        del m
    return pd.DataFrame(rows), stages
