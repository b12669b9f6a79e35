"""The eleven networks of the study (study.md section 5), in one registry.

``build(name, input_size, n_classes=2, weights=None, **params)`` returns a plain, flat Keras 3
model (every backbone layer lives in the model's own graph; no nested sub-model) named ``name``,
whose input ``"image"`` is ``(N, H, W, 3)`` float32 in RGB order and whose output ``"probs"`` is the
``(N, n_classes)`` float32 softmax (the pre-softmax scores are the output of layer ``"logits"``).

``gradcam_layers(model_or_name, min_size=None, input_size=None)`` gives the Grad-CAM target
layer names: each one's ``model.get_layer(name).output`` is a 4-D ``(N, h, w, C)`` feature map
connected to ``model.inputs``, so
``keras.Model(model.inputs, [model.get_layer(name).output, model.output])`` works. One target per
backbone (two for DenRes-131), one per isolated channel for the RGB family. With ``min_size`` None
each is the backbone's last conv map (``feat_r``, ``feat_g``, ``feat_b`` for the RGB family; see
:mod:`cellstudy.learning.models.attention`); with ``min_size`` (the scale's ``gradcam_min_size``) each is the
deepest candidate layer of its backbone whose map is at least ``min_size`` x ``min_size``
(study.md section 12; :data:`GRADCAM_CANDIDATES`, e.g. ResNet50 at S = 64: ``conv4_block6_out``,
4 x 4, where the last map ``conv5_block3_out`` is 2 x 2; at S = 512 the last conv map).
``gradcam_table(...)`` lists, per target, the chosen layer, its map size and the last conv map's.

Parameters (``**params``; unknown keys are rejected):

- every network: ``head_pooling`` ("avg" | "max" | "flatten"), ``head_units`` ((1024, 512)),
  ``head_dropout`` (0.3), ``weights_sha256`` (None or the expected hex sha256 of ``weights``).
- ``denres131``: ``level_filters`` (256), ``level_kernel`` (3).
- ``vit``: ``patch_size`` (None = automatic), ``width`` (64), ``depth`` (4), ``num_heads`` (4),
  ``mlp_dim`` (128), ``attention_dropout`` (0.0).
- RGB / MHL families: ``token_dim`` (RGB family 16, MHL family 128), ``num_heads`` (2),
  ``max_token_grid`` (16), ``cnn_filters`` ((32, 64, 128), for ``rgb`` / ``mhl``).

``weights``: None (random initialisation) or a local ``.h5`` / ``.weights.h5`` file of backbone
weights (for ``denres131`` a mapping ``{"resnet50": path, "densenet121": path}``). Nothing is ever
downloaded. ``load(path)`` loads any saved network of the study (its custom layers,
the RGB family's ``StackChannels`` / ``UnstackChannels`` / ``StackMaps`` (and ``ChannelSlice``, which
models saved before 2026-12-07 use) and the ViT's ``PositionEmbedding``, are registered when this module is imported; plain
``keras.saving.load_model`` fails with "Could not locate class 'StackChannels'" without it).
"""
from __future__ import annotations


import keras
import numpy as np

from cellstudy import networks as catalogue
from cellstudy.learning.models import backbones
from cellstudy.learning.models.attention import (ChannelSlice, StackChannels, StackMaps, UnstackChannels,
                                                build_mhl, build_rgb)
from cellstudy.learning.models.denres import build_denres
from cellstudy.learning.models.dl import build_dl
from cellstudy.learning.models.head import HEAD_DEFAULTS, classification_head
from cellstudy.learning.models.vit import PositionEmbedding, build_vit

#: network name -> one-line description (from the catalogue, cellstudy.networks; order = the book's).
NETWORKS: dict[str, str] = {n: catalogue.SPECS[n].description for n in catalogue.NETWORK_NAMES}

#: network name -> family ("DL", "ViT", "RGB", "MHL").
FAMILIES: dict[str, str] = {n: catalogue.FAMILY[n] for n in catalogue.NETWORK_NAMES}

#: network name -> backbone(s) whose weights ``weights=`` loads.
BACKBONE_OF: dict[str, tuple[str, ...]] = {n: catalogue.SPECS[n].backbones for n in catalogue.NETWORK_NAMES}


def _candidates(name: str) -> list[tuple[str, str, tuple[tuple[str, str, int], ...]]]:
    """Per Grad-CAM target of network ``name``: ``(target, backbone, candidates)``, candidates
    deep -> shallow as ``(layer name in the model, backbone layer name, nominal stride)``; the
    first candidate is the target's ``ModelSpec.gradcam_last`` layer (the last conv map). The ViT's one
    candidate has backbone ``"vit"`` and stride None (its patch size)."""
    from cellstudy.learning.models.attention import CHANNEL_KEYS, stage_taps, tap_name

    fam = FAMILIES[check_name(name)]
    if name == "vit":
        return [("tokens", "vit", (("vit_grid", "vit_grid", None),))]
    if name == "denres131":
        return [(b, b, tuple((p + n, n, st) for n, st in backbones.STAGES[b]))
                for b, p in (("resnet50", "res_"), ("densenet121", "den_"))]
    b = BACKBONE_OF[name][0]
    stages = backbones.STAGES[b]
    if fam == "RGB":
        taps = stage_taps(b)
        return [(f"{c.upper()} channel", b,
                 tuple((tap_name(c, taps.get(n)), n, st) for n, st in stages)) for c in CHANNEL_KEYS]
    return [(b, b, tuple((n, n, st) for n, st in stages))]


#: Network -> per Grad-CAM target, its candidate layers deep -> shallow (names in the model).
GRADCAM_CANDIDATES: dict[str, tuple[tuple[str, ...], ...]] = {}

def check_name(name: str) -> str:
    """Return ``name`` if it is a registered network, else raise ValueError listing them."""
    return catalogue.check_network(name)


def input_hw(input_size) -> tuple[int, int]:
    """``S``, ``(H, W)`` or ``(H, W, 3)`` -> ``(H, W)``; ValueError otherwise (e.g. 1 or 4 channels)."""
    if isinstance(input_size, (bool, str, bytes)):
        raise ValueError(f"input_size={input_size!r}; expected an int S or (H, W) or (H, W, 3)")
    if isinstance(input_size, int):
        hw = (input_size, input_size)
    else:
        try:
            t = tuple(int(v) for v in input_size)
        except (TypeError, ValueError):
            raise ValueError(f"input_size={input_size!r}; expected an int S or (H, W) or (H, W, 3)") from None
        if len(t) == 3:
            if t[2] != 3:
                raise ValueError(f"input_size={input_size!r} has {t[2]} channels; every network takes "
                                 "3-channel RGB images (R = third stain, G = actin, B = DNA)")
            t = t[:2]
        if len(t) != 2:
            raise ValueError(f"input_size={input_size!r}; expected an int S or (H, W) or (H, W, 3)")
        hw = t
    if min(hw) < 1:
        raise ValueError(f"input_size={input_size!r}; expected positive sizes")
    return hw


def valid_params(name: str) -> dict:
    """The ``**params`` ``build(name, ...)`` accepts, with their defaults."""
    return {**HEAD_DEFAULTS, "weights_sha256": None, **catalogue.SPECS[check_name(name)].defaults}


def build(name: str, input_size, n_classes: int = 2, weights=None, **params) -> keras.Model:
    """Build network ``name`` for ``input_size`` (S, (H, W) or (H, W, 3)) images and ``n_classes``.

    Returns a flat Keras model named ``name``: input ``(N, H, W, 3)`` float32, output
    ``(N, n_classes)`` float32 softmax. Raises ValueError for an unknown name (listing the valid
    ones), an input size below the backbone's minimum, a channel count other than 3, an unknown
    parameter (listing the valid ones) or a ViT size that is not a multiple of the patch size;
    FileNotFoundError for a missing weights file.
    """
    check_name(name)
    hw = input_hw(input_size)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes={n_classes!r}; expected an int >= 2")
    allowed = valid_params(name)
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ValueError(f"unknown parameter(s) {bad} for network {name!r}; expected some of {sorted(allowed)}")
    # the catalogue's defaults (cellstudy.networks) are what a network is built with, e.g. the RGB
    # family's token width; the builders' own keyword defaults serve direct calls only
    params = {**catalogue.SPECS[name].defaults, **params}
    head = {k[len("head_"):]: params.pop(k) for k in list(params) if k.startswith("head_")}
    sha = params.pop("weights_sha256", None)
    if weights is not None:
        _check_weights(name, weights, sha)
    return _BUILDERS[catalogue.SPECS[name].builder](name, hw, n_classes, head, weights, sha, **params)


_BUILDERS = {
    "dl": build_dl,
    "denres": lambda name, *a, **kw: build_denres(*a, **kw),
    "vit": lambda name, *a, **kw: build_vit(*a, **kw),
    "rgb": build_rgb,
    "mhl": build_mhl,
}


def load(path, compile: bool = False) -> keras.Model:
    """Load a saved network of the study (``model_<regime>.keras`` of a run's fold folder, or any
    ``.keras`` file ``build`` made) with its custom layers; ``compile=False`` (default) for
    prediction and explanation. FileNotFoundError naming the path when there is no such file;
    ValueError naming it when the file is not a Keras model archive."""
    import zipfile
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no saved model at {p}; expected a .keras file, e.g. "
                                "<run>/training/<network>/fold<k>/model_long.keras")
    if p.suffix != ".keras" or not zipfile.is_zipfile(p):
        raise ValueError(f"{p} is not a Keras model archive (.keras); expected a file written by "
                         "model.save(...) or cellstudy.learning.train")
    return keras.saving.load_model(p, compile=compile)


def _check_weights(name, weights, sha) -> None:
    """Validate ``weights`` (and the files) before anything is built."""
    from cellstudy.learning.models.weights import resolve_weights_path

    if not BACKBONE_OF[name]:
        raise ValueError(f"{name}: weights must be None (no pretrained weights for this network)")
    if name == "denres131":
        if not isinstance(weights, dict) or not set(weights) <= {"resnet50", "densenet121"}:
            raise ValueError(f"denres131: weights={weights!r}; expected a mapping "
                             "{'resnet50': path, 'densenet121': path}")
        if sha is not None and not isinstance(sha, dict):
            raise ValueError("denres131: weights_sha256 must be a mapping like weights")
        for b, p in weights.items():
            if p is not None:
                resolve_weights_path(p, (sha or {}).get(b))
    else:
        resolve_weights_path(weights, sha)


def _check_min_size(min_size) -> int | None:
    if min_size is None:
        return None
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"min_size={min_size!r}; expected None (the last conv map) or an int >= 1 "
                         "(the scale's gradcam_min_size)")
    return int(min_size)


def _sized_candidates(model_or_name, input_size=None, **params):
    """``(network, [(target, backbone, [(layer, (h, w), stride), ...]), ...])``: every Grad-CAM
    candidate with its map size, deep -> shallow. A model: sizes from its layers' output shapes
    (candidates the model lacks, e.g. the RGB family's ``feat_<c>_s<stride>`` in a model saved
    before they existed, are left out; the last conv map must exist). A name: sizes from the
    strides for ``input_size`` (required)."""
    from cellstudy.learning.models.vit import default_patch_size

    if isinstance(model_or_name, str):
        name = check_name(model_or_name)
        if input_size is None:
            raise ValueError(f"{name}: input_size is required to size the Grad-CAM candidates of a "
                             "network given by name (or pass a built model)")
        hw = input_hw(input_size)
        bad = sorted(set(params) - set(valid_params(name)))
        if bad:
            raise ValueError(f"unknown parameter(s) {bad} for network {name!r}")
        model = None
    else:
        model = model_or_name
        name = check_name(model.name)
        hw = tuple(int(v) for v in model.inputs[0].shape[1:3])
        if input_size is not None and input_hw(input_size) != hw:
            raise ValueError(f"input_size={input_size!r} does not match model {name!r}'s input "
                             f"{hw[0]}x{hw[1]}")
    out = []
    for target, bb, cands in _candidates(name):
        sized = []
        for layer, base, stride in cands:
            if model is not None:
                try:
                    t = model.get_layer(layer).output
                except ValueError:
                    if layer == cands[0][0]:
                        raise  # the last conv map is always there
                    continue
                size = (int(t.shape[1]), int(t.shape[2]))
            elif bb == "vit":
                p = params.get("patch_size") or default_patch_size(hw)
                size = (hw[0] // int(p), hw[1] // int(p))
            else:
                size = backbones.stage_size(bb, base, hw)
            if bb == "vit":
                stride = -(-hw[0] // size[0]) if size[0] else None
            sized.append((layer, size, stride))
        out.append((target, bb, sized))
    return name, out


def _choose(sized, min_size):
    """The deepest candidate with both sides >= min_size; the shallowest (largest map) when none
    is; the first (last conv map) when min_size is None."""
    if min_size is None:
        return sized[0]
    for c in sized:
        if c[1][0] >= min_size and c[1][1] >= min_size:
            return c
    return sized[-1]


def gradcam_layers(model_or_name, min_size: int | None = None, input_size=None, **params) -> list[str]:
    """Names of the Grad-CAM target layers of a network (a name) or a built model.

    Each layer's ``.output`` is a 4-D ``(N, h, w, C)`` feature map reachable from
    ``model.inputs``; one per backbone (DenRes-131: two), one per isolated channel for the RGB
    family (``feat_r``, ``feat_g``, ``feat_b`` and their ``_s<stride>`` stages), the final tokens on
    their patch grid (``vit_grid``) for the ViT.

    ``min_size`` None: the last convolutional map of each backbone (for a model, checked to exist;
    no size needed). ``min_size`` an int (the scale's ``gradcam_min_size``): per target, the
    deepest candidate (:data:`GRADCAM_CANDIDATES`, deep -> shallow) whose map is at least
    ``min_size`` x ``min_size`` (the shallowest candidate, i.e. the largest map, when none is).
    Sizes are read from a model's layers; for a name ``input_size`` (S, (H, W) or (H, W, 3)) is
    required and the sizes come from the strides (``params``: build parameters that change them,
    i.e. the ViT's ``patch_size``). At S = 512 every choice is the last conv map.
    """
    min_size = _check_min_size(min_size)
    if min_size is None:
        if isinstance(model_or_name, str):
            return list(catalogue.SPECS[check_name(model_or_name)].gradcam_last)
        model = model_or_name
        names = list(catalogue.SPECS[check_name(model.name)].gradcam_last)
        for n in names:
            model.get_layer(n)  # ValueError if absent
        return names
    _, targets = _sized_candidates(model_or_name, input_size, **params)
    return [_choose(sized, min_size)[0] for _, _, sized in targets]


def gradcam_table(name_or_model, input_size=None, min_size: int | None = None, **params):
    """One row per Grad-CAM target: ``network``, ``target`` (backbone, or "R channel" ... for the
    RGB family, "tokens" for the ViT), ``layer`` (:func:`gradcam_layers` with ``min_size``),
    ``map_h``, ``map_w``, ``stride`` (nominal; the patch size for the ViT), ``last_conv_layer``,
    ``last_conv_h``, ``last_conv_w`` (the map the last conv layer would have given).

    ``name_or_model``: a network name (``input_size`` required; sizes from the strides), a built
    model (sizes from its layers), or a list of either (rows concatenated). Returns a DataFrame.
    """
    import pandas as pd

    items = [name_or_model] if isinstance(name_or_model, str) or hasattr(name_or_model, "layers") \
        else list(name_or_model)
    min_size = _check_min_size(min_size)
    rows = []
    for item in items:
        name, targets = _sized_candidates(item, input_size, **params)
        for target, _, sized in targets:
            layer, (h, w), stride = _choose(sized, min_size)
            last, (lh, lw), _ = sized[0]
            rows.append({"network": name, "target": target, "layer": layer, "map_h": h, "map_w": w,
                         "stride": stride, "last_conv_layer": last, "last_conv_h": lh, "last_conv_w": lw})
    return pd.DataFrame(rows, columns=["network", "target", "layer", "map_h", "map_w", "stride",
                                       "last_conv_layer", "last_conv_h", "last_conv_w"])


GRADCAM_CANDIDATES.update({n: tuple(tuple(c[0] for c in cands) for _, _, cands in _candidates(n))
                           for n in NETWORKS})

from cellstudy.learning.models.describe import describe, stage_table, token_grid  # noqa: E402

__all__ = ["NETWORKS", "FAMILIES", "BACKBONE_OF", "GRADCAM_CANDIDATES", "build", "load", "gradcam_layers",
           "gradcam_table", "describe", "stage_table", "token_grid", "valid_params", "input_hw",
           "check_name", "classification_head", "ChannelSlice", "StackChannels", "UnstackChannels", "StackMaps", "PositionEmbedding", "backbones"]
