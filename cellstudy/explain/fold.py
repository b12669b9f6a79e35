"""The per-(network, fold) explanation of notebook ``08_xai``: the parameters that determine it,
the cells explained, Grad-CAM / Integrated Gradients / occlusion / faithfulness / channel
importance of one fold's model on its own test cells, and which maps are left out (1 x 1 maps,
constant maps). The method, its equations and its outputs: :mod:`cellstudy.explain`; the
orchestration over a run (cache, worker processes) is there too, the run-level summaries in
:mod:`cellstudy.explain.summary`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from cellstudy import config, seeds

METHODS = ("gradcam", "integrated_gradients", "occlusion")
#: A Grad-CAM map needs at least this many rows and columns to be averaged into the Gmean, the
#: correlation ratios or the faithfulness (a 1 x 1 map is a constant heat map).
MIN_MAP_SIDE = 2


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class XaiParams:
    """What determines a (network, fold) explanation (part of the cache key)."""

    regime: str = "long"
    max_cells: int | None = 8
    seed: int = 0
    ig_steps: int = 16
    occlusion_patch: int | None = None      # None: max(2, S // 8)
    occlusion_stride: int | None = None     # None: the patch (non-overlapping, 8 x 8 positions)
    faithfulness_steps: int = 10
    n_boot: int = 1000
    batch_size: int = 32
    gradcam_min_size: int | None = 4        # the scale's gradcam_min_size; None: last conv maps

    def check(self) -> "XaiParams":
        if self.regime not in ("short", "long"):
            raise ValueError(f"regime={self.regime!r}; expected 'short' or 'long'")
        if self.max_cells is not None and (not isinstance(self.max_cells, (int, np.integer)) or self.max_cells < 1):
            raise ValueError(f"max_cells={self.max_cells!r}; expected None (all test cells) or an int >= 1")
        for name in ("ig_steps", "faithfulness_steps", "n_boot", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r}; expected an int >= 1")
        for name in ("occlusion_patch", "occlusion_stride", "gradcam_min_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name}={v!r}; expected None or an int >= 1")
        return self

    def patch_for(self, size: int) -> int:
        return int(self.occlusion_patch) if self.occlusion_patch else max(2, size // 8)


def select_cells(labels: np.ndarray, max_cells: int | None, seed: int, fold: int) -> np.ndarray:
    """Positions (sorted) of at most ``max_cells`` of a fold's test cells, balanced over the
    classes (half each, the rest from the other class when one is short), drawn with a generator
    seeded by ``(seed, fold)`` only, so every network of a run explains the same cells."""
    y = np.asarray(labels)
    n = len(y)
    if max_cells is None or max_cells >= n:
        return np.arange(n)
    rng = seeds.rng(seed, "xai_cells", fold)
    classes = np.unique(y)
    pools = {c: list(rng.permutation(np.flatnonzero(y == c))) for c in classes}
    chosen: list[int] = []
    quota = {c: max_cells // len(classes) + (1 if i < max_cells % len(classes) else 0)
             for i, c in enumerate(classes)}
    for c in classes:
        take = pools[c][:quota[c]]
        chosen += take
        pools[c] = pools[c][len(take):]
    rest = [i for c in classes for i in pools[c]]
    rest = list(rng.permutation(rest)) if rest else []
    chosen += rest[:max_cells - len(chosen)]
    return np.sort(np.asarray(chosen, dtype=int))


# ---------------------------------------------------------------------------------------------
# One fold
# ---------------------------------------------------------------------------------------------
def explain_fold(model, images: np.ndarray, labels: np.ndarray, zca, params: XaiParams,
                 layers: Sequence[str] | None = None) -> dict[str, Any]:
    """Every explanation of one model on its test cells.

    Parameters
    ----------
    model : the fold's Keras model (softmax head).
    images : (n, S, S, 3) float32 test cells in **stain space** (before ZCA).
    labels : (n,) int true classes.
    zca : the fold's fitted ``cellstudy.learning.augment.ZCAWhitening`` (what the model was trained with).
    layers : Grad-CAM layers (default: ``xai.default_layers(model, params.gradcam_min_size)``,
        i.e. ``models.gradcam_layers(model, min_size=...)``).

    Returns a dict of arrays: ``proba`` (n, K) float64; ``cam/<layer>`` (n, K, S, S) float16
    Grad-CAM of every class in [0, 1] (per-layer maps on one common maximum per cell and class;
    ``cam/combined``: the mean of the raw maps of the layers whose feature map is at least
    ``MIN_MAP_SIDE`` per side, or of all layers when none is, min-max scaled); ``cam_hw/<layer>``
    (2,) int: the feature map's (h, w) (``combined``: the smallest of its layers');
    ``gradcam_table`` (a JSON string: ``models.gradcam_table(model, min_size=...)`` rows; "[]"
    for a model outside the registry); ``ig`` (n, S, S) float32 signed
    IG map of the true class (logit units); ``occlusion`` (n, S, S) float32 (probability drops);
    ``faith/<method>/<curve>`` (n, steps+1) curves, ``faith/<method>/<curve>_auc`` (n,) and the
    random pixel order ``faith/random/<curve>`` (same pixel-fraction grid, ``faith_fractions``);
    ``channel_drop`` (3, 2, n): drop of p(true class) per channel x method
    (``zero``, ``mean``); ``train_means`` (3,); ``seconds`` dict; ``gradcam_images_per_s``.
    """
    from cellstudy.explain import xai

    x = np.asarray(images, dtype=np.float32)
    y = np.asarray(labels).astype(np.int32)
    n, S = len(x), x.shape[1]
    xw = zca.transform(x)
    K = int(model.outputs[0].shape[-1])
    bs = int(params.batch_size)
    t: dict[str, float] = {}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    from cellstudy.explain.xai import _keras as XK
    out["proba"] = XK.predict_proba(model, xw, bs)
    t["predict"] = time.perf_counter() - t0
    from cellstudy.explain.xai.gradcam import map_size

    ms = params.gradcam_min_size
    layers = list(xai.default_layers(model, ms) if layers is None else layers)
    hw = {name: map_size(model, name) for name in layers}
    spatial = [l for l in layers if min(hw[l]) >= MIN_MAP_SIDE]
    combine = spatial or layers
    hw["combined"] = (min(hw[l][0] for l in combine), min(hw[l][1] for l in combine))
    for name, v in hw.items():
        out[f"cam_hw/{name}"] = np.asarray(v, dtype=np.int64)
    out["gradcam_table"] = json.dumps(_gradcam_rows(model, ms))
    cams = {name: np.empty((n, K, S, S), np.float16) for name in [*layers, "combined"]}
    class_seconds = []
    for c in range(K):
        tc = time.perf_counter()
        res = xai.gradcam_multi(model, xw, c, layers, batch_size=bs, combine=combine)
        class_seconds.append(time.perf_counter() - tc)
        for name, m in res.items():
            cams[name][:, c] = m.astype(np.float16)
    t["gradcam"] = float(sum(class_seconds))
    # the first class call traces the compiled step; the later ones are the steady-state rate
    warm = class_seconds[1:] if len(class_seconds) > 1 else class_seconds
    out["gradcam_images_per_s"] = float(n * len(warm) / max(sum(warm), 1e-9))
    for name, m in cams.items():
        out[f"cam/{name}"] = m
    t0 = time.perf_counter()
    ig = xai.integrated_gradients(model, xw, y, steps=int(params.ig_steps), batch_size=max(bs, 64))
    out["ig"] = xai.attribution_map(ig, "sum").astype(np.float32)
    t["integrated_gradients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    patch = params.patch_for(S)
    out["occlusion"] = xai.occlusion(model, xw, y, patch=patch, stride=int(params.occlusion_stride or patch),
                                     batch_size=max(bs, 64))
    t["occlusion"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sal = {"gradcam": cams["combined"][np.arange(n), y].astype(np.float32),
           "integrated_gradients": out["ig"], "occlusion": out["occlusion"]}
    for i, (method, s) in enumerate(sal.items()):
        # the random order does not depend on the method: computed once (with the first)
        f = xai.deletion_insertion(model, xw, y, s, steps=int(params.faithfulness_steps), fill=0.0,
                                   random_baseline=(i == 0), seed=int(params.seed),
                                   batch_size=max(bs, 64))
        out["faith_fractions"] = f.fractions
        for curve in ("deletion", "insertion"):
            out[f"faith/{method}/{curve}"] = getattr(f, curve).astype(np.float32)
            out[f"faith/{method}/{curve}_auc"] = getattr(f, f"{curve}_auc")
            if i == 0:
                out[f"faith/random/{curve}"] = getattr(f, f"random_{curve}").astype(np.float32)
                out[f"faith/random/{curve}_auc"] = getattr(f, f"random_{curve}_auc")
    t["faithfulness"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    means = np.asarray(zca.mean_, dtype=np.float32)
    _, cells = xai.channel_importance(model, x, y, means, n_boot=1, seed=int(params.seed),
                                      transform=zca.transform, batch_size=max(bs, 64),
                                      return_per_cell=True)
    drop = np.empty((3, 2, n))
    for ci, ch in enumerate(config.CHANNELS):
        for mi, meth in enumerate(("zero", "mean")):
            g = cells[(cells.channel == ch) & (cells.method == meth)].sort_values("cell")
            drop[ci, mi] = g["drop"].to_numpy()
    out["channel_drop"] = drop
    out["train_means"] = means
    t["channel_importance"] = time.perf_counter() - t0
    out["seconds"] = t
    return out


def _gradcam_rows(model, min_size) -> list[dict]:
    """``models.gradcam_table(model, min_size=...)`` as JSON-able rows; [] for a model the
    registry does not know (e.g. a hand-built one)."""
    from cellstudy.learning import models

    try:
        t = models.gradcam_table(model, min_size=min_size)
    except (ValueError, KeyError):
        return []
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in t.to_dict("records")]


def constant_maps(maps: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """(n,) bool: which of the (n, H, W) maps have no contrast, their range <= ``rtol`` x their
    largest absolute value (e.g. all zero after Grad-CAM's ReLU: no region raises the class score)."""
    m = np.asarray(maps, dtype=np.float64)
    lo, hi = m.min(axis=(1, 2)), m.max(axis=(1, 2))
    return (hi - lo) <= rtol * np.maximum(np.abs(hi), np.abs(lo))


def map_exclusions(maps: dict[str, np.ndarray], map_hw: dict[str, Sequence[int]],
                   min_side: int = MIN_MAP_SIDE, rtol: float = 1e-6) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Which cells' Grad-CAM maps may be averaged (Gmean, correlation ratios, faithfulness).

    ``maps``: name -> (n, H, W) each cell's map (e.g. of its true class); ``map_hw``: name ->
    the (h, w) of the feature map it was computed at. A map whose feature map is below
    ``min_side`` x ``min_side`` is excluded for every cell (an upsampled 1 x 1 map is constant:
    no spatial information); otherwise a cell's map is excluded when it is constant (range <=
    ``rtol`` x its largest absolute value, e.g. all zero after the ReLU).

    Returns ``(keep, rows)``: ``keep`` name -> (n,) bool (True: used); ``rows``: one dict per map
    with exclusions: ``map``, ``map_h``, ``map_w``, ``n_cells``, ``n_excluded``, ``reason``.
    """
    keep: dict[str, np.ndarray] = {}
    rows: list[dict] = []
    for name, m in maps.items():
        m = np.asarray(m, dtype=np.float64)
        if m.ndim != 3:
            raise ValueError(f"maps[{name!r}] has shape {m.shape}; expected (n, H, W)")
        if name not in map_hw:
            raise ValueError(f"map_hw has no size for map {name!r}; expected an (h, w) per map")
        h, w = (int(v) for v in map_hw[name])
        n = len(m)
        if min(h, w) < min_side:
            keep[name] = np.zeros(n, bool)
            rows.append({"map": name, "map_h": h, "map_w": w, "n_cells": n, "n_excluded": n,
                         "reason": f"feature map {h} x {w} is below {min_side} x {min_side}: no spatial "
                                   "resolution (an upsampled constant); left out of the Gmean, the "
                                   "correlation ratios and the faithfulness"})
            continue
        const = constant_maps(m, rtol)
        keep[name] = ~const
        if const.any():
            rows.append({"map": name, "map_h": h, "map_w": w, "n_cells": n, "n_excluded": int(const.sum()),
                         "reason": f"{int(const.sum())} of {n} cells' maps are constant (e.g. all zero "
                                   "after the ReLU): those cells are left out of this map's Gmean"
                                   + (" and of Grad-CAM's faithfulness" if name == "combined" else "")})
    return keep, rows
