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
             min_size: int | None = None, **params) -> pd.DataFrame:
    """One row per (network, size): ``network``, ``family``, ``image_size``, ``n_params``
    (all weights), ``n_trainable``, ``input_shape``, ``output_shape``, ``gradcam_layers``
    (``gradcam_layers(model, min_size)``), ``gradcam_shapes`` (``N x h x w x C``), ``gradcam_grid``
    (``h x w``), ``gradcam_min_size``,
    ``last_conv_layers`` / ``last_conv_grid`` (the last conv maps and their ``h x w``),
    ``token_grid`` (``gh x gw`` the attention runs over, :func:`token_grid`; "" for the DL family),
    ``n_tokens`` (0 for the DL family), ``forward_ms`` (median single-image ``predict_on_batch``
    time on this machine, only for sizes in ``time_sizes``; NaN otherwise). ``networks`` None =
    all eleven. ``params`` go to ``build``. The per-map fields (one entry per Grad-CAM target,
    e.g. the RGB family's three channels) are :func:`join_list`-ed ("; ", so a book table cell can
    wrap) and read back with :func:`split_list`.
    """
    from cellstudy.learning.models import NETWORKS, build, check_name

    names = list(NETWORKS) if networks is None else [check_name(n) for n in networks]
    time_sizes = set(time_sizes or ())
    rows = []
    for name in names:
        for s in sizes:
            m = build(name, int(s), n_classes=n_classes, **params)
            rows.append(_row(name, m, int(s), int(s) in time_sizes, n_runs, min_size))
            del m
    return pd.DataFrame(rows)


#: Separator of the per-map lists in a card row (written by :func:`join_list`).
LIST_SEP = "; "


def join_list(values: Iterable[str]) -> str:
    """One card cell from a per-map list: ``["a", "b"] -> "a; b"``."""
    return LIST_SEP.join(values)


def split_list(cell) -> list[str]:
    """The list in a card cell: ``"a; b"`` and an older run's ``"a;b"`` both give ``["a", "b"]``."""
    return [v.strip() for v in str(cell).split(LIST_SEP.strip())]


def _grid(t) -> str:
    return f"{int(t.shape[1])} x {int(t.shape[2])}"


def _row(name: str, m, size: int, timed: bool, n_runs: int, min_size: int | None = None) -> dict:
    """One row of :func:`describe` for the built network ``m`` at ``size``."""
    from cellstudy.learning.models import FAMILIES, gradcam_layers

    gl = gradcam_layers(m, min_size=min_size)
    last = gradcam_layers(m)
    tg = token_grid(m)
    return {
        "network": name, "family": FAMILIES[name], "image_size": size,
        "n_params": int(m.count_params()),
        "n_trainable": int(sum(int(np.prod(w.shape)) for w in m.trainable_weights)),
        "input_shape": _shape(m.inputs[0]), "output_shape": _shape(m.outputs[0]),
        "gradcam_layers": join_list(gl),
        "gradcam_shapes": join_list(_shape(m.get_layer(n).output) for n in gl),
        "gradcam_grid": join_list(_grid(m.get_layer(n).output) for n in gl),
        "gradcam_min_size": min_size,
        "last_conv_layers": join_list(last),
        "last_conv_grid": join_list(_grid(m.get_layer(n).output) for n in last),
        "token_grid": "" if tg is None else f"{tg[0]} x {tg[1]}",
        "n_tokens": 0 if tg is None else tg[0] * tg[1],
        "forward_ms": forward_time_ms(m, n_runs=n_runs) if timed else np.nan,
    }


def head_parameter_counts(name: str, S, **params) -> dict:
    """Parameters of network ``name`` built at input size ``S`` with cellstudy's head (global
    average pooling, the paper's text) and with the authors' Flatten head (their code).

    The head (:func:`cellstudy.learning.models.head.classification_head`) is ``head_pool`` -> Dense
    ``head_dense1`` (u_1 = 1024 units) -> ``head_dense2`` (512) -> ``logits``. Its pooling layer
    takes the last feature map, ``h x w x C`` (or ``T x C`` tokens); with pooling the first Dense
    has ``C u_1 + u_1`` weights, with a Flatten ``h w C u_1 + u_1``, so the Flatten network has
    ``(h w C - C) u_1`` more. This is computed from the built model's shapes (one build; equal to
    ``build(name, S, head_pooling="flatten").count_params()``). Networks whose head input is
    already a pooled vector (the RGB and MHL families) have no ``head_pool``: the count is then
    read at ``head_dense1``'s input and a Flatten changes nothing.

    ``S``: the input size (S or (H, W)); ``params`` go to :func:`cellstudy.learning.models.build`. Returns
    a dict (the book's column names): ``"feature map into the head"`` (e.g. ``"16x16x512"``),
    ``"params (ours)"`` (the whole network), ``"head (ours)"`` (the Dense layers ``head_dense*``
    and ``logits``), ``"params (Flatten head)"``, ``"head (Flatten)"``.
    """
    from cellstudy.learning.models import build, check_name

    if params.get("head_pooling", "avg") == "flatten":
        raise ValueError("head_parameter_counts compares the pooled head with a Flatten one; got "
                         "head_pooling='flatten', expected 'avg' or 'max'")
    m = build(check_name(name), S, **params)
    total = int(m.count_params())
    u1 = int(m.get_layer("head_dense1").units)
    try:
        pool_in = m.get_layer("head_pool").input.shape[1:]
    except ValueError:  # no pooling layer: the head starts from a pooled vector
        pool_in = m.get_layer("head_dense1").input.shape[1:]
    C = int(pool_in[-1])
    flat_in = int(np.prod([int(d) for d in pool_in]))
    dense = [l for l in m.layers if l.name.startswith("head_dense") or l.name == "logits"]
    head = sum(int(l.count_params()) for l in dense)
    extra = (flat_in - C) * u1
    return {"feature map into the head": "x".join(str(int(d)) for d in pool_in), "params (ours)": total,
            "head (ours)": head, "params (Flatten head)": total + extra, "head (Flatten)": head + extra}


#: Network family -> the layer whose input (RGB: ``_r``; its 4-D map before flattening) or output
#: (ViT) is the grid of tokens the attention runs over.
_TOKEN_LAYER = {"RGB": ("tokens_flat_r", "input"), "MHL": ("tokens_flat", "input"),
                "ViT": ("vit_grid", "output")}


def token_grid(name_or_model, S=None, **params) -> tuple[int, int] | None:
    """The grid ``(gh, gw)`` of spatial tokens the attention of a network runs over, read from a
    built model: the RGB family's per-channel token map (the backbone's last map, average-pooled
    to at most ``max_token_grid`` per side; the same for R, G and B), the MHL family's token map,
    the ViT's patch grid. None for the DL family (no attention).

    ``name_or_model``: a built model, or a network name with ``S`` (the input size: S or (H, W));
    the name is built at S (``params`` go to ``build``) only to read the shape. E.g. RGB-Res at
    S = 64: ``(2, 2)``, 4 tokens; at S = 32: ``(1, 1)``, a single token.
    """
    from cellstudy.learning.models import FAMILIES, build, check_name

    if isinstance(name_or_model, str):
        name = check_name(name_or_model)
        if FAMILIES[name] not in _TOKEN_LAYER:
            return None
        if S is None:
            raise ValueError(f"token_grid({name!r}): S (the input size) is required for a name")
        m = build(name, S, **params)
    else:
        m = name_or_model
        name = check_name(m.name)
        if FAMILIES[name] not in _TOKEN_LAYER:
            return None
    layer, end = _TOKEN_LAYER[FAMILIES[name]]
    t = getattr(m.get_layer(layer), end)
    return int(t.shape[1]), int(t.shape[2])


def resolution_note(row, display_name: str | None = None) -> str:
    """One Markdown sentence about a :func:`describe` / :func:`network_card` row: the Grad-CAM
    layer(s) at the row's S with their map size, the last conv map it replaces (when it does), and
    for the attention networks the token grid, e.g. "At S = 64, MHL-Res's Grad-CAM uses
    `conv4_block6_out` (a 4 x 4 map): the deepest candidate of at least 4 x 4; the last conv map
    `conv5_block3_out` would have been 2 x 2. The attention runs over 2 x 2 = 4 tokens at S = 64."
    ``row``: a mapping / Series with ``network``, ``image_size``, ``gradcam_layers``,
    ``gradcam_grid``, ``last_conv_layers``, ``last_conv_grid``, ``gradcam_min_size``,
    ``token_grid``; ``display_name``: the name to print (default ``row["network"]``)."""
    r = dict(row)
    name = display_name or r["network"]
    S = int(r["image_size"])
    layers, grids = split_list(r["gradcam_layers"]), split_list(r["gradcam_grid"])
    last, last_grids = split_list(r["last_conv_layers"]), split_list(r["last_conv_grid"])
    if len(set(grids)) == 1 and len(layers) == 3 and all(l.startswith("feat_") for l in layers):
        # the RGB family: one map per isolated channel, all of the same size
        used = f"`{'`, `'.join(layers)}` (one per isolated channel; {grids[0]} maps each)"
    else:
        used = ", ".join(f"`{l}` (a {g} map)" for l, g in zip(layers, grids))
    ms = r.get("gradcam_min_size")
    by_size = not (ms is None or (isinstance(ms, float) and np.isnan(ms)))
    why = f"the deepest candidate of at least {int(ms)} x {int(ms)}" if by_size else "the last conv map"
    changed: dict[str, list[str]] = {}
    for l, g, c in zip(last, last_grids, layers):
        if l != c:
            changed.setdefault(g, []).append(f"`{l}`")
    text = f"At S = {S}, {name}'s Grad-CAM uses {used}: {why}"
    if layers == ["vit_grid"]:
        text = f"At S = {S}, {name}'s Grad-CAM uses {used}, its patch-token grid (the only candidate)"
    elif changed:
        n = sum(len(v) for v in changed.values())
        text += f"; the last conv map{'s' if n > 1 else ''} " + ", ".join(
            f"{', '.join(ls)} would have been {g}" for g, ls in changed.items())
    elif by_size:
        text += " (here the last conv map)"
    text += "."
    for l, g in zip(layers, grids):
        h, w = (int(v) for v in g.split(" x "))
        if h < 2 or w < 2:
            text += (f" **`{l}` is {g}: no spatial resolution** (its maps are left out of the Gmean, "
                     "the ratios and the faithfulness in the XAI chapter).")
    if r.get("token_grid"):
        gh, gw = (int(v) for v in r["token_grid"].split(" x "))
        text += f" The attention runs over {gh} x {gw} = {gh * gw} token{'s' if gh * gw != 1 else ''} at S = {S}"
        text += (" (a single token: every attention weight is 1, no spatial correlation)."
                 if gh * gw == 1 else ".")
    return text


#: Curated stages per network: (stage, layer name). Shapes are read from a built model.
_STAGES = {
    "vgg16": [("input", "image"), ("block1", "block1_pool"), ("block2", "block2_pool"),
              ("block3", "block3_pool"), ("block4", "block4_pool"), ("block5 (last conv map)", "block5_conv3"),
              ("block5 pool", "block5_pool")],
    "resnet50": [("input", "image"), ("stem", "pool1_pool"), ("conv2 (x3)", "conv2_block3_out"),
                 ("conv3 (x4)", "conv3_block4_out"), ("conv4 (x6)", "conv4_block6_out"),
                 ("conv5 (x3, last conv map)", "conv5_block3_out")],
    "densenet121": [("input", "image"), ("stem", "pool1"), ("dense2 + transition", "pool2_pool"),
                    ("dense3 + transition", "pool3_pool"), ("dense4 + transition", "pool4_pool"),
                    ("dense5 + BN-ReLU (last conv map)", "relu")],
    "denres131": [("input", "image")]
    + [(f"level {i} ResNet50", f"res_{n}") for i, n in enumerate(
        ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"), 1)]
    + [(f"level {i} DenseNet121", f"den_{n}") for i, n in enumerate(
        ("pool2_relu", "pool3_relu", "pool4_relu", "relu"), 1)]
    + [(f"level {i} pair -> conv -> pool", f"denres_l{i}_conv") for i in range(1, 5)]
    + [("fused levels", "denres_concat")],
    "vit": [("input", "image"), ("patch embedding", "vit_patch_embed"), ("tokens", "vit_tokens"),
            ("+ position", "vit_pos_embed"), ("encoder blocks", "vit_ln"), ("grid (Grad-CAM)", "vit_grid")],
    "mhl": [("input", "image"), ("CNN (last conv map)", "cnn_relu3"), ("tokens", "tokens"),
            ("self-attention", "att_self_ln"), ("pooled", "att_self_pool")],
}
for _n, _last in (("rgb", None), ("rgb_res", None), ("rgb_den", None)):
    _STAGES[_n] = ([("input", "image"), ("isolate R, G, B (stacked on the batch axis)", "isolate")]
                   + [(f"shared backbone on R, stride-{st} stage", f"feat_r_s{st}") for st in (4, 8, 16)]
                   + [(f"shared backbone on {c.upper()} (last conv map)", f"feat_{c}") for c in "rgb"]
                   + [(f"tokens {c.upper()}", f"tokens_{c}") for c in "rgb"]
                   + [(f"attention {a.upper()}{b.upper()}", f"att_{a}{b}_pool")
                      for a, b in (("r", "r"), ("g", "g"), ("b", "b"), ("r", "g"), ("r", "b"), ("g", "b"))]
                   + [("concatenated (eq. 3)", "att_concat")])
_STAGES["mhl_res"] = [("input", "image"), ("ResNet50 (last conv map)", "conv5_block3_out")] + _STAGES["mhl"][2:]
_STAGES["mhl_den"] = [("input", "image"), ("DenseNet121 (last conv map)", "relu")] + _STAGES["mhl"][2:]
_HEAD = [("head: pool", "head_pool"), ("head: dense 1", "head_dense1"), ("head: dense 2", "head_dense2"),
         ("logits", "logits"), ("softmax", "probs")]


def stage_table(model) -> pd.DataFrame:
    """Compact stage table of a built network: ``stage``, ``layer``, ``output_shape``,
    ``params up to here`` (the weights of every layer between the input and this stage's output:
    a sub-model's count) and ``params in stage`` (those of its weights that no row above uses: a
    parallel branch counts its own, a backbone shared by the R, G and B streams counts once).
    The head rows follow the network's own stages. (A layer's own weights alone, the former
    ``params`` column, read 0 for a whole ResNet stage that ends in an Add.)"""
    import keras

    from cellstudy.learning.models import check_name

    name = check_name(model.name)
    rows, seen = [], set()
    for stage, lname in _STAGES[name] + _HEAD:
        try:
            layer = model.get_layer(lname)
        except ValueError:
            continue  # e.g. head_dense2 absent with custom head_units
        out = model.inputs[0] if lname == "image" else layer.output
        try:
            weights = [] if lname == "image" else keras.Model(model.inputs, out).weights
        except Exception:   # noqa: BLE001 - a tensor a sub-model cannot end at: the layer's own weights
            weights = list(layer.weights) if layer.built else []
        sizes = {id(w): int(np.prod(w.shape)) for w in weights}
        new = {k: v for k, v in sizes.items() if k not in seen}
        seen.update(sizes)
        rows.append({"stage": stage, "layer": lname, "output_shape": _shape(out),
                     "params up to here": sum(sizes.values()), "params in stage": sum(new.values())})
    return pd.DataFrame(rows)


def network_card(name: str, image_size: int, big_size: int = 512, n_runs: int = 3,
                 n_classes: int = 2, min_size: int | None = None,
                 **params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The book's card of one network: ``(summary, stages)``.

    ``summary``: :func:`describe`'s columns, one row at ``image_size`` (with ``forward_ms``, the
    median compiled single-image forward time) and one at ``big_size`` (no timing; built only to
    count parameters and read shapes); the Grad-CAM layers are chosen with ``min_size`` (the
    scale's ``gradcam_min_size``; None: the last conv maps). ``stages``: :func:`stage_table` at
    ``image_size``. Each size is built once.
    """
    from cellstudy.learning.models import build, check_name

    check_name(name)
    rows, stages = [], None
    for s, timed in ((int(image_size), True), (int(big_size), False)):
        m = build(name, s, n_classes=n_classes, **params)
        rows.append(_row(name, m, s, timed, n_runs, min_size))
        if timed:
            stages = stage_table(m)
        del m
    return pd.DataFrame(rows), stages
