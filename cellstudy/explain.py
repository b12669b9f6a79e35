"""Explain a trained run (study.md section 8; paper 3.3, Figs 9-13): notebook ``08_xai``.

For every trained network and fold of a run, the fold's saved model (regime ``"long"`` by
default) explains **its own test cells** only: a cell of test fold k is explained by
``<run>/training/<network>/fold<k>/model_<regime>.keras``, the model that never saw it (neither
it nor its augmented copy was in that model's training set). The model sees exactly what it saw at
evaluation time: the preprocessed cell, whitened with the fold's ZCA (``zca.json``); the
recomputed probabilities are checked against the stored ``proba_<regime>.npy``.

Per (network, fold) (:func:`explain_fold`), on up to ``max_cells`` test cells (scale key
``xai_max_cells``; drawn per fold, balanced over the classes, seeded by (seed, fold) only, so every
network explains the same cells):

* Grad-CAM (eq. 12-13) at the network's Grad-CAM layers and their ``combined`` map, for both
  classes: ``cellstudy.models.gradcam_layers(model, min_size=gradcam_min_size)``, per backbone
  the deepest layer whose map is at least ``gradcam_min_size`` x ``gradcam_min_size`` (the scale's
  key, 4 by default; study.md section 12: the last conv layer at 512 px, an earlier stage at
  32-64 px where the last map is 1 x 1 or 2 x 2); per isolated channel (``feat_r/g/b``, or their
  ``_s<stride>`` stages) for the RGB family, per backbone for DenRes-131, and for the ViT at
  ``vit_grid`` (the last block's patch tokens after the final LayerNorm, laid back on their patch
  grid as a 4-D map by the model itself, so the ordinary Grad-CAM applies: token Grad-CAM). A
  cell's per-layer maps share one maximum (their relative strength is kept); ``combined`` is the
  mean of the raw maps of the layers with a spatial map (>= 2 x 2), min-max scaled once;
* Integrated Gradients (signed sum over channels, ``ig_steps`` midpoint steps from the training
  mean) and occlusion (patch S/8 set to the training mean, stride = patch: 8 x 8 positions) of
  the true class;
* deletion / insertion curves of the true-class probability for the three maps (Grad-CAM
  combined, IG, occlusion) and for a random pixel order; deleted pixels take the value 0 in
  whitened space, i.e. the training mean;
* channel importance: the drop of the true-class probability when one stain is set to 0
  (``zero``) or to its training mean (``mean``), perturbing the image in **stain space** and
  whitening afterwards (``transform = zca.transform``; the training means are the fold's ZCA
  means, i.e. the channel means over the fold's training pixels, originals + augmented copies).

Results are cached per (network, fold, regime) in ``<run>/08_xai/cache/<network>/`` (an ``.npz``
with a JSON key of everything that determines it: the model file's size and mtime, the cells,
the parameters); a second call reads them back, a changed model or parameter recomputes. Run-level
results (:func:`explain_run`), over the folds of each network:

* Gmean-Shape per class (eq. 14): computed **per channel** over the class's explained cell
  images (stain space, negatives clipped to 0) -> an (S, S, 3) colour image; its grey version for
  the correlation is the per-channel Gmean-Shape averaged over the three channels (the merged
  image). Gmean-GradCam per class: over the true-class ``combined`` Grad-CAM maps of the class's
  cells (and per layer, e.g. per isolated channel for the RGB family).
* The correlation image (eq. 15-16, radius 2: a 5 x 5 window) between Gmean-Shape and
  Gmean-GradCam and its positive / negative ratios (|r| > 0.5, over the whole image as in the
  paper); for the RGB family also each stain's Gmean-Shape against that channel's map.
* Faithfulness (AUCs vs random, with a bootstrap CI over cells of the paired difference),
  channel importance with bootstrap CIs over all explained cells, ranked galleries.
* Exclusions (:func:`map_exclusions`): a Grad-CAM map below 2 x 2 (no spatial resolution) is left
  out of the Gmean, the correlation ratios and the faithfulness altogether, and a cell whose map
  is constant (e.g. all zero after the ReLU) is left out of that map's Gmean (and, for
  ``combined``, of Grad-CAM's faithfulness); never silently: each exclusion is a row of
  ``exclusions.csv`` and of ``missing.csv`` (status ``excluded``), shown by the chapter.
* The Grad-CAM layer table (``gradcam_layers.csv``, ``models.gradcam_table`` of each network's
  loaded model): per target the layer used, its map size, and the last conv map it replaces.

Written under ``<run>/08_xai/``: ``cells.csv``, ``ratios.csv``, ``faithfulness.csv``,
``channel_importance.csv``, ``channel_importance_cells.csv``, ``gallery.csv``, ``timings.csv``,
``missing.csv``, ``exclusions.csv``, ``gradcam_layers.csv``; arrays ``gmean_<network>.npz`` and
``faithfulness_curves.npz``.

Gmean epsilon. The ``combined`` maps are min-max scaled, so every map has zeros (its minimum, and
all pixels the ReLU removed; the per-layer maps have the latter). With eq. 14's epsilon at 1e-6,
one zero among the cells pulls a pixel to ~1e-6 and the Gmean-GradCam becomes an "all cells
agree" mask; ``gmean_eps`` (default 1e-3, i.e. 0.1 % of a map's range) keeps it graded. The cell images are not affected in practice (their
zeros are background).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from . import atomic, config, rundir, seeds, threads
from . import networks as catalogue

STEP = "08_xai"
METHODS = ("gradcam", "integrated_gradients", "occlusion")
#: Bump when the cached per-fold content changes meaning.
#: 2: Grad-CAM layers chosen by map size, per-layer maps on a common maximum, map sizes stored.
CACHE_VERSION = 2
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
    zca : the fold's fitted ``cellstudy.augment.ZCAWhitening`` (what the model was trained with).
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
    from . import xai

    x = np.asarray(images, dtype=np.float32)
    y = np.asarray(labels).astype(np.int32)
    n, S = len(x), x.shape[1]
    xw = zca.transform(x)
    K = int(model.outputs[0].shape[-1])
    bs = int(params.batch_size)
    t: dict[str, float] = {}
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    from .xai import _keras as XK
    out["proba"] = XK.predict_proba(model, xw, bs)
    t["predict"] = time.perf_counter() - t0
    from .xai.gradcam import map_size

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
    from . import models

    try:
        t = models.gradcam_table(model, min_size=min_size)
    except (ValueError, KeyError):
        return []
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in t.to_dict("records")]


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
        lo, hi = m.min(axis=(1, 2)), m.max(axis=(1, 2))
        const = (hi - lo) <= rtol * np.maximum(np.abs(hi), np.abs(lo))
        keep[name] = ~const
        if const.any():
            rows.append({"map": name, "map_h": h, "map_w": w, "n_cells": n, "n_excluded": int(const.sum()),
                         "reason": f"{int(const.sum())} of {n} cells' maps are constant (e.g. all zero "
                                   "after the ReLU): those cells are left out of this map's Gmean"
                                   + (" and of Grad-CAM's faithfulness" if name == "combined" else "")})
    return keep, rows


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass
class FoldExplanation:
    network: str
    fold: int
    index: np.ndarray          # (n,) rows into prepared.images
    cell_ids: np.ndarray
    labels: np.ndarray
    arrays: dict[str, Any]
    cached: bool
    seconds: float


@dataclass
class XaiRun:
    """Everything 08_xai shows. ``folds[network]``: the per-fold explanations; ``gmeans[network]``:
    per class ``{"shape_rgb" (S,S,3), "shape_gray" (S,S), "cam/<layer>" (S,S), "corr" (S,S),
    ...}``; tables as documented in the module docstring."""

    out_dir: Path
    params: XaiParams
    networks: list[str]
    missing: pd.DataFrame
    folds: dict[str, list[FoldExplanation]]
    cells: pd.DataFrame
    ratios: pd.DataFrame
    faithfulness: pd.DataFrame
    channel_importance: pd.DataFrame
    channel_importance_cells: pd.DataFrame
    gallery: pd.DataFrame
    timings: pd.DataFrame
    gmeans: dict[str, dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    exclusions: pd.DataFrame = field(default_factory=pd.DataFrame)     # map_exclusions rows
    gradcam_table: pd.DataFrame = field(default_factory=pd.DataFrame)  # layer used per target
    images: np.ndarray | None = None      # prepared.images (stain space)
    seconds_wall: float = float("nan")    # explain_run's wall time (timings.seconds: per-fold work)
    workers: int = 0                      # worker processes used (0: all in this process)

    def stacked(self, network: str) -> dict[str, np.ndarray]:
        """The network's explained cells over all folds: ``index``, ``cell_id``, ``fold``,
        ``label``, ``proba``, ``images`` (stain space), ``cam/<layer>`` (n, K, S, S) float32,
        ``ig``, ``occlusion``."""
        fx = self.folds[network]
        out: dict[str, np.ndarray] = {
            "index": np.concatenate([f.index for f in fx]),
            "cell_id": np.concatenate([f.cell_ids for f in fx]),
            "fold": np.concatenate([np.full(len(f.index), f.fold) for f in fx]),
            "label": np.concatenate([f.labels for f in fx]),
            "proba": np.concatenate([f.arrays["proba"] for f in fx]),
            "ig": np.concatenate([f.arrays["ig"] for f in fx]),
            "occlusion": np.concatenate([f.arrays["occlusion"] for f in fx]),
        }
        for k in fx[0].arrays:
            if k.startswith("cam/"):
                out[k] = np.concatenate([f.arrays[k] for f in fx]).astype(np.float32)
        if self.images is not None:
            out["images"] = self.images[out["index"]]
        return out

    def layers(self, network: str) -> list[str]:
        """Grad-CAM map names of a network (recorded layers, then ``combined``)."""
        return [k[4:] for k in self.folds[network][0].arrays if k.startswith("cam/")]

    def map_hw(self, network: str) -> dict[str, tuple[int, int]]:
        """Feature-map size (h, w) of each Grad-CAM map of a network (``combined``: the smallest
        of the maps averaged into it). ValueError when the folds disagree."""
        sizes: dict[str, tuple[int, int]] = {}
        for f in self.folds[network]:
            for k, v in f.arrays.items():
                if k.startswith("cam_hw/"):
                    v = tuple(int(x) for x in np.asarray(v))
                    if sizes.setdefault(k[7:], v) != v:
                        raise ValueError(f"{network}: Grad-CAM map {k[7:]!r} is {sizes[k[7:]]} in one fold "
                                         f"and {v} in fold {f.fold}")
        return sizes


def _fold_dirs(run_dir: Path, regime: str) -> tuple[dict[str, list[int]], list[dict]]:
    """Trained (network, fold) pairs with a model for ``regime``, and the missing / failed ones
    (``rundir.Run.usable_folds``: done, the regime's model, the whitening and the test cells)."""
    run = rundir.Run(run_dir)
    found: dict[str, list[int]] = {}
    notes: list[dict] = []
    for name in catalogue.NETWORK_NAMES:
        usable, why = run.usable_folds(name, regime)
        if usable:
            found[name] = [fd.fold for fd in usable]
        notes += why
    return found, notes


def _key(model_path: Path, cell_ids: np.ndarray, params: XaiParams, size: int) -> str:
    st = model_path.stat()
    d = {"version": CACHE_VERSION, "model": str(model_path.name), "size": st.st_size,
         "mtime_ns": st.st_mtime_ns, "cells": hashlib.sha256("\n".join(map(str, cell_ids)).encode()).hexdigest(),
         "params": {k: v for k, v in params.__dict__.items() if k != "n_boot"}, "image_size": int(size)}
    return json.dumps(d, sort_keys=True)


def _save_npz(path: Path, arrays: dict[str, Any], key: str) -> None:
    flat = {k: np.asarray(v) for k, v in arrays.items() if k != "seconds"}
    flat["__key__"] = np.asarray(key)
    flat["__seconds__"] = np.asarray(json.dumps(arrays.get("seconds", {})))
    atomic.write(path, lambda f: np.savez_compressed(f, **flat))


def _cache_is_current(path: Path, key: str) -> bool:
    """Whether the cached fold at ``path`` was made for ``key``, reading only its key member (not
    the arrays: the worker pool's to-do list checks every fold before any work)."""
    if not path.exists():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return str(z["__key__"]) == key
    except (OSError, ValueError, KeyError):
        return False


def _load_npz(path: Path, key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["__key__"]) != key:
                return None
            out = {k: z[k] for k in z.files if not k.startswith("__")}
            out["seconds"] = json.loads(str(z["__seconds__"]))
    except (OSError, ValueError, KeyError):
        return None
    out["gradcam_images_per_s"] = float(out["gradcam_images_per_s"])
    return out


def _fold_cells(prepared, fd: Path, network: str, k: int) -> np.ndarray:
    """Rows of ``prepared`` for the fold's test cells, checked against the run's folds."""
    tc = fd / rundir.TEST_CELLS
    cells = pd.read_csv(tc, dtype={"cell_id": str, "group": str})
    ids = np.asarray(prepared.cell_ids).astype(str)
    pos = {c: i for i, c in enumerate(ids)}
    missing = [c for c in cells["cell_id"] if c not in pos]
    if missing:
        raise ValueError(f"{tc} lists {len(missing)} cell(s) not in the prepared cohort "
                         f"(e.g. {missing[:3]}); expected the cohort the run was trained on")
    idx = np.array([pos[c] for c in cells["cell_id"]])
    if not np.all(np.asarray(prepared.folds)[idx] == k):
        raise ValueError(f"{tc}: these cells are not all in test fold {k} of the run's "
                         f"folds file {prepared.folds_path}; expected the folds {network} was trained with")
    if not np.array_equal(np.asarray(prepared.labels)[idx], cells["label"].to_numpy()):
        raise ValueError(f"{tc}: labels differ from the prepared cohort's labels")
    return idx


def _quiet_tensorflow(fn):
    """Keep TensorFlow's "retracing" warnings (each network's model traces its own functions,
    and a fold's last, smaller batch traces again, by design) out of the output while ``fn``
    runs."""
    import functools
    import logging

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tf_log = logging.getLogger("tensorflow")
        level = tf_log.level
        tf_log.setLevel(logging.ERROR)
        try:
            return fn(*args, **kwargs)
        finally:
            tf_log.setLevel(level)
    return wrapper


def load_weights(model, path: str | os.PathLike) -> None:
    """``model.load_weights(path)`` for a ``.keras`` archive, read through a temporary extracted
    copy of its ``model.weights.h5``: Keras otherwise has h5py read the archive member through
    Python's zip stream, which seeks slowly (DenRes-131, 382 MB: 14 s from the archive, 3.3 s
    from the extracted file; the copy takes well under a second). Other files: plain
    ``load_weights``. Raises like ``load_weights`` on a mismatching file."""
    import tempfile
    import zipfile

    path = Path(path)
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        model.load_weights(path)
        return
    with zipfile.ZipFile(path) as z:
        if "model.weights.h5" not in z.namelist():
            model.load_weights(path)
            return
        with tempfile.TemporaryDirectory(prefix="cellstudy-weights-") as d:
            z.extract("model.weights.h5", d)
            model.load_weights(Path(d) / "model.weights.h5")


@dataclass
class _Cohort:
    """What the fold loop needs of ``study.prepare``'s result; picklable for worker processes."""

    run_dir: Path
    images: np.ndarray
    labels: np.ndarray
    cell_ids: np.ndarray
    folds: np.ndarray
    folds_path: Path

    @classmethod
    def of(cls, prepared) -> "_Cohort":
        return cls(Path(prepared.run_dir), np.asarray(prepared.images), np.asarray(prepared.labels),
                   np.asarray(prepared.cell_ids), np.asarray(prepared.folds), Path(prepared.folds_path))


def _fold_plan(coh: _Cohort, name: str, k: int, params: XaiParams, S: int, out: Path) -> dict[str, Any]:
    """The cells, model file, cache file and cache key of one (network, fold)."""
    fd = rundir.Run(coh.run_dir).fold(name, k).path
    idx_all = _fold_cells(coh, fd, name, k)
    labels_all = np.asarray(coh.labels)[idx_all]
    sel = select_cells(labels_all, params.max_cells, params.seed, k)
    idx = idx_all[sel]
    ids = np.asarray(coh.cell_ids).astype(str)[idx]
    model_path = fd / rundir.model_file(params.regime)
    cache = out / "cache" / name / f"fold{k}_{params.regime}.npz"
    return {"fd": fd, "idx": idx, "sel": sel, "labels": labels_all[sel], "ids": ids,
            "model_path": model_path, "cache": cache, "key": _key(model_path, ids, params, S)}


def _explain_network(coh: _Cohort, name: str, ks: Sequence[int], params: XaiParams, S: int, out: Path,
                     on_fold: Callable[[FoldExplanation, dict], None]) -> None:
    """Explain (or read from the cache) every fold ``ks`` of one network; ``on_fold(fold
    explanation, timing row)`` after each. One model object per network: later folds load their
    weights into it, so the traced Grad-CAM / IG / occlusion / forward functions (cached per model
    object) are reused instead of being traced again for every fold."""
    import keras

    from . import augment

    model = None
    for k in ks:
        plan = _fold_plan(coh, name, k, params, S, out)
        plan["cache"].parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        arrays = _load_npz(plan["cache"], plan["key"])
        cached = arrays is not None
        reused = False
        if not cached:
            reused = model is not None
            model_path = plan["model_path"]
            if model is None:
                model = keras.saving.load_model(model_path, compile=False)
            else:  # same network and size: a mismatching file raises in load_weights
                load_weights(model, model_path)
            in_hw = tuple(model.inputs[0].shape[1:3])
            if in_hw != (S, S):
                raise ValueError(f"{model_path} takes {in_hw} images but the prepared cohort is {S} x {S}; "
                                 "call study.prepare with the scale (and overrides) the run was trained at")
            zca = augment.ZCAWhitening.from_state(json.loads((plan["fd"] / rundir.ZCA).read_text()))
            arrays = explain_fold(model, coh.images[plan["idx"]], plan["labels"], zca, params)
            stored = plan["fd"] / rundir.proba_file(params.regime)
            if stored.exists():
                arrays["proba_stored"] = np.load(stored)[plan["sel"]]
            _save_npz(plan["cache"], arrays, plan["key"])
        secs = time.perf_counter() - t0
        fe = FoldExplanation(name, k, plan["idx"], plan["ids"], plan["labels"], arrays, cached, secs)
        on_fold(fe, {"network": name, "fold": k, "n_cells": len(plan["idx"]), "cached": cached,
                     "reused_model": reused, "worker": False, "seconds": secs,
                     "gradcam_images_per_s": arrays["gradcam_images_per_s"],
                     **{f"seconds_{m}": v for m, v in arrays["seconds"].items()}})


def _init_worker(env: dict[str, str]) -> None:
    """Worker process start, before TensorFlow loads: its thread settings (``cellstudy.threads``)."""
    os.environ.update(env)


@_quiet_tensorflow
def _worker_explain(coh: _Cohort, name: str, ks: list[int], params: XaiParams, S: int, out: Path) -> list[dict]:
    """Worker process: fill the cache of one network's folds; returns the timing rows."""
    import cellstudy.models  # noqa: F401  (registers the custom layers for load_model)
    rows: list[dict] = []
    _explain_network(coh, name, ks, params, S, out, lambda fe, row: rows.append(
        {**row, "worker": True, "tf_threads": os.environ.get(threads.INTRA_ENV)}))
    return rows


def _expected_cost(plans: list[dict[str, Any]]) -> tuple[float, int]:
    """How long a network's folds will take to explain, for ordering the worker tasks (longest
    first): its training seconds per epoch summed over the folds (``done.json``; an explanation
    is forward and backward passes like training), then its model files' bytes. The file size
    alone put the RGB-Den network (75 MB, 149 s of XAI) seventh of eleven and the ViT last."""
    epoch_s, size = 0.0, 0
    for p in plans:
        size += p["model_path"].stat().st_size
        try:
            done = json.loads((p["fd"] / rundir.DONE).read_text())
            epoch_s += float(done["timings"]["seconds_per_epoch_median"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return epoch_s, size


def _prefill_in_workers(coh: _Cohort, found: dict[str, list[int]], params: XaiParams, S: int, out: Path,
                        workers: int, echo: Callable[[str], None]) -> tuple[dict[tuple[str, int], dict], int]:
    """Explain the networks that are not cached yet in ``workers`` processes at once (one network
    per task, the costliest first: :func:`_expected_cost`); each writes the usual per-fold cache, which the
    calling process then reads. Returns the workers' timing rows by (network, fold) and the
    number of worker processes used (0: fewer than two networks to explain)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = {}
    for name, ks in found.items():
        plans = [_fold_plan(coh, name, k, params, S, out) for k in ks]
        if not all(_cache_is_current(p["cache"], p["key"]) for p in plans):
            todo[name] = _expected_cost(plans)
    if len(todo) < 2:
        return {}, 0
    n = min(int(workers), len(todo))
    echo(f"explaining {len(todo)} networks in {n} worker processes (slowest networks first) ...")
    rows: dict[tuple[str, int], dict] = {}
    t_start = time.perf_counter()
    # each worker's TensorFlow gets cores // n threads (unless the environment already says)
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads.thread_env(n),)) as pool:
        futs = {pool.submit(_worker_explain, coh, name, found[name], params, S, out): name
                for name in sorted(todo, key=todo.get, reverse=True)}
        for i, fut in enumerate(as_completed(futs), 1):
            name = futs[fut]
            try:
                got = fut.result()
            except Exception as e:
                for f in futs:
                    f.cancel()
                raise RuntimeError(f"explaining {name} in a worker process failed: {type(e).__name__}: {e}") from e
            for r in got:
                rows[(r["network"], r["fold"])] = r
            echo(f"[{i}/{len(futs)}] xai {name}: {len(got)} fold(s) in {sum(r['seconds'] for r in got):.0f} s "
                 f"(worker); {time.perf_counter() - t_start:.0f} s elapsed")
    return rows, n


@_quiet_tensorflow
def explain_run(prepared, regime: str = "long", max_cells: int | None | str = "scale", seed: int = 0,
                networks: Sequence[str] | None = None, params: XaiParams | None = None,
                radius: int = 2, threshold: float = 0.5, gmean_eps: float = 1e-3,
                n_gallery: int = 3, workers: int = 1, echo: Callable[[str], None] = print,
                gradcam_min_size: int | None | str = "scale") -> XaiRun:
    """Explain every trained (network, fold) of ``prepared.run_dir`` (see the module docstring).

    ``prepared``: ``cellstudy.study.prepare(...)`` of the run (same cohort, scale and folds as the
    training). ``max_cells``: cells per fold (``"scale"``: the scale's ``xai_max_cells``; None:
    all). ``seed``: the cell selection and the random orders. ``networks``: restrict to these
    (default: every network with a trained fold). ``params``: the other knobs (:class:`XaiParams`;
    its regime, max_cells and seed are replaced by the arguments). ``workers``: explain up to this
    many networks at once in separate processes (spawned; each loads its own TensorFlow); the
    results are the same as with 1 (they go through the same cache), only sooner where one
    process leaves cores idle (graph tracing is single-threaded). ``gradcam_min_size``: the
    smallest Grad-CAM map side (``"scale"``: the scale's ``gradcam_min_size``, 4 when the scale
    has none; None: the last conv maps).
    Raises FileNotFoundError when the run has no trained model at all.
    """
    import cellstudy.models  # noqa: F401  (registers the custom layers for load_model)

    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers={workers!r}; expected an int >= 1")
    run_dir = Path(prepared.run_dir)
    if max_cells == "scale":
        max_cells = prepared.scale.get("xai_max_cells")
    if isinstance(gradcam_min_size, str):
        if gradcam_min_size != "scale":
            raise ValueError(f"gradcam_min_size={gradcam_min_size!r}; expected 'scale', None or an int >= 1")
        gradcam_min_size = prepared.scale.get("gradcam_min_size", 4)
    params = replace(params or XaiParams(), regime=regime, max_cells=max_cells, seed=int(seed),
                     gradcam_min_size=gradcam_min_size).check()
    S = int(prepared.images.shape[1])
    out = run_dir / STEP
    (out / "cache").mkdir(parents=True, exist_ok=True)
    found, notes = _fold_dirs(run_dir, params.regime)
    if networks is not None:
        for n in networks:
            catalogue.check_network(n)
        found = {n: f for n, f in found.items() if n in networks}
    if not found:
        raise FileNotFoundError(
            f"no trained model_{params.regime}.keras under {run_dir / 'training'}; run the family "
            "notebooks (02-05) on this run folder first")
    noted = {(r["network"], r["fold"]) for r in notes}
    for name, ks in found.items():
        for k in range(prepared.n_splits):
            if k not in ks and (name, k) not in noted:
                notes.append({"network": name, "fold": k, "status": "not trained",
                              "detail": f"no folder {rundir.Run(run_dir).fold(name, k).path}"})
    missing = pd.DataFrame(notes, columns=["network", "fold", "status", "detail"])
    coh = _Cohort.of(prepared)
    t_wall = time.perf_counter()
    worker_rows, n_workers = (_prefill_in_workers(coh, found, params, S, out, workers, echo)
                              if workers > 1 else ({}, 0))
    total = sum(len(v) for v in found.values())
    t_start = time.perf_counter()
    folds: dict[str, list[FoldExplanation]] = {}
    timing_rows = []

    def on_fold(fe: FoldExplanation, row: dict) -> None:
        folds.setdefault(fe.network, []).append(fe)
        if (fe.network, fe.fold) in worker_rows:  # computed by a worker just now: its timing
            row = worker_rows[(fe.network, fe.fold)]
            fe.cached, fe.seconds = False, row["seconds"]
        timing_rows.append(row)
        el = time.perf_counter() - t_start
        arrays = fe.arrays
        echo(f"[{len(timing_rows)}/{total}] xai {fe.network} fold {fe.fold}: {len(fe.index)} cells, "
             + ("computed by a worker process, " if (fe.network, fe.fold) in worker_rows else "")
             + ("read from cache" if row["cached"] else
                f"{row['seconds']:.1f} s (Grad-CAM {arrays['gradcam_images_per_s']:.0f} images/s)")
             + f"; {el:.0f} s elapsed")

    for name, ks in found.items():
        _explain_network(coh, name, ks, params, S, out, on_fold)
    res = XaiRun(out_dir=out, params=params, networks=list(folds), missing=missing, folds=folds,
                 cells=pd.DataFrame(), ratios=pd.DataFrame(), faithfulness=pd.DataFrame(),
                 channel_importance=pd.DataFrame(), channel_importance_cells=pd.DataFrame(),
                 gallery=pd.DataFrame(), timings=pd.DataFrame(timing_rows), images=prepared.images)
    _summarise(res, radius, threshold, gmean_eps, n_gallery)
    res.seconds_wall, res.workers = time.perf_counter() - t_wall, n_workers
    _write(res)
    return res


# ---------------------------------------------------------------------------------------------
# Run-level summaries
# ---------------------------------------------------------------------------------------------
#: A map of isolated channel c (the RGB family): ``feat_<c>`` or one of its ``feat_<c>_s<stride>``
#: stages.
_CHANNEL_MAP = re.compile(r"^feat_([rgb])(_s\d+)?$")


def channel_of_map(name: str) -> int | None:
    """Channel index (0 = R, 1 = G, 2 = B) of an RGB-family per-channel map name (``feat_r``,
    ``feat_g_s16``, ...), None for any other map."""
    m = _CHANNEL_MAP.match(name)
    return None if m is None else "rgb".index(m.group(1))


def gmean_per_class(images: np.ndarray, maps: dict[str, np.ndarray], labels: np.ndarray,
                    eps: float = 1e-3, radius: int = 2, threshold: float = 0.5,
                    n_classes: int = 2, keep: dict[str, np.ndarray] | None = None) -> dict[int, dict[str, Any]]:
    """Gmean-Shape and Gmean-GradCam of each class, and the correlation image (eq. 14-16).

    images: (n, S, S, 3) stain-space cells (negatives clipped to 0); maps: name -> (n, S, S)
    Grad-CAM maps in [0, 1] (the class's own map per cell; must hold ``combined``); labels (n,);
    keep: name -> (n,) bool, the cells whose map of that name may be averaged
    (:func:`map_exclusions`; default: all). A map's Gmean-GradCam is taken over its kept cells and
    compared with the Gmean-Shape of the same cells; a map without kept cells in a class gives no
    Gmean and no ratio there (the exclusion table says why).
    Returns class -> {``shape_rgb`` (S,S,3) per-channel Gmean-Shape (over the cells kept for
    ``combined``, all the class's cells when none is), ``shape_gray`` (S,S) its channel mean,
    ``cam/<name>`` (S,S) Gmean-GradCam, ``corr`` (S,S) local correlation of the Gmean-Shape and
    cam/combined, ``corr/<channel>`` for the per-channel maps (``feat_r/g/b`` or their
    ``_s<stride>`` stages: that stain's Gmean-Shape vs that channel's Gmean-GradCam), ``n`` cells,
    ``n_used`` (name -> cells averaged), ``ratios``}. Classes without cells are absent.
    """
    from . import xai

    if "combined" not in maps:
        raise ValueError(f"maps must include 'combined'; got {sorted(maps)}")
    x = np.clip(np.asarray(images, dtype=np.float64), 0, None)
    y = np.asarray(labels)
    keep = {k: np.asarray(v, bool) for k, v in (keep or {}).items()}
    out: dict[int, dict[str, Any]] = {}
    for c in range(n_classes):
        sel = np.flatnonzero(y == c)
        if not len(sel):
            continue
        shapes: dict[bytes, np.ndarray] = {}

        def shape_of(idx):
            key = idx.tobytes()
            if key not in shapes:
                shapes[key] = xai.gmean(x[idx], eps=eps)
            return shapes[key]

        used = {name: sel[keep[name][sel]] if name in keep else sel for name in maps}
        d: dict[str, Any] = {"n": len(sel), "n_used": {k: len(v) for k, v in used.items()}}
        d["shape_rgb"] = shape_of(used["combined"] if len(used["combined"]) else sel)
        d["shape_gray"] = d["shape_rgb"].mean(axis=-1)
        for name, m in maps.items():
            if len(used[name]):
                d[f"cam/{name}"] = xai.gmean(np.asarray(m, dtype=np.float64)[used[name]], eps=eps)
        d["ratios"] = {}
        if "cam/combined" in d:
            d["corr"] = xai.local_correlation(d["shape_gray"], d["cam/combined"], radius=radius)
            d["ratios"][("merged", "combined")] = xai.correlation_ratios(d["corr"], threshold)
        for feat in maps:
            ci = channel_of_map(feat)
            if ci is None or f"cam/{feat}" not in d:
                continue
            ch = config.CHANNELS[ci]
            r = xai.local_correlation(shape_of(used[feat])[..., ci], d[f"cam/{feat}"], radius=radius)
            d[f"corr/{ch}"] = r
            d["ratios"][(ch, feat)] = xai.correlation_ratios(r, threshold)
        out[c] = d
    return out


def _summarise(res: XaiRun, radius: int, threshold: float, eps: float, n_gallery: int) -> None:
    from .xai import bootstrap_ci

    cls_names = config.CLASS_NAMES
    cell_rows, ratio_rows, faith_rows, ci_rows, cic_rows, gal_rows = [], [], [], [], [], []
    excl_rows, table_rows = [], []
    for name in res.networks:
        st = res.stacked(name)
        fam = catalogue.family(name, "?")
        n = len(st["label"])
        y = st["label"].astype(int)
        p = st["proba"]
        stored = [f.arrays.get("proba_stored") for f in res.folds[name]]
        ps = np.concatenate(stored) if all(s is not None for s in stored) else np.full_like(p, np.nan)
        cells = pd.DataFrame({"network": name, "family": fam, "fold": st["fold"], "cell_id": st["cell_id"],
                              "label": y, "class": [cls_names[i] for i in y],
                              "proba_normal": p[:, 0], "proba_abnormal": p[:, 1],
                              "predicted": p.argmax(1), "proba_stored_abnormal": ps[:, 1]})
        cell_rows.append(cells)
        table_rows += _table_of(res, name)
        # Gmean / correlation: each cell's map of its own (true) class, without the maps that
        # have no spatial resolution and the constant ones (recorded, not silent)
        own = {k[4:]: st[k][np.arange(n), y] for k in st if k.startswith("cam/")}
        hw = res.map_hw(name)
        keep, why = map_exclusions(own, {k: hw.get(k, (MIN_MAP_SIDE, MIN_MAP_SIDE)) for k in own})
        excl_rows += [{"network": name, "family": fam, **r} for r in why]
        gm = gmean_per_class(st["images"], own, y, eps=eps, radius=radius, threshold=threshold, keep=keep)
        res.gmeans[name] = gm
        for c, d in gm.items():
            for (shape, cam), (pos, neg) in d["ratios"].items():
                ratio_rows.append({"network": name, "family": fam, "class": cls_names[c], "shape": shape,
                                   "gradcam": cam, "positive_ratio": pos, "negative_ratio": neg,
                                   "n_cells": d["n_used"][cam], "radius": radius, "threshold": threshold})
        # faithfulness
        fx = res.folds[name]
        fr = fx[0].arrays["faith_fractions"]
        res.curves[name] = {"fractions": fr}
        for curve in ("deletion", "insertion"):
            res.curves[name][f"random/{curve}"] = np.concatenate(
                [f.arrays[f"faith/random/{curve}"] for f in fx]).mean(0)
        for method in METHODS:
            # Grad-CAM's saliency is the combined map: its excluded cells are not scored
            use = keep["combined"] if method == "gradcam" else np.ones(n, bool)
            for curve in ("deletion", "insertion"):
                auc = np.concatenate([f.arrays[f"faith/{method}/{curve}_auc"] for f in fx])[use]
                rnd = np.concatenate([f.arrays[f"faith/random/{curve}_auc"] for f in fx])[use]
                crv = np.concatenate([f.arrays[f"faith/{method}/{curve}"] for f in fx])[use]
                if not len(auc):
                    faith_rows.append({"network": name, "family": fam, "method": method, "curve": curve,
                                       "auc": np.nan, "random_auc": np.nan, "difference": np.nan,
                                       "ci_low": np.nan, "ci_high": np.nan, "n_cells": 0,
                                       "beats_random": False})
                    res.curves[name][f"{method}/{curve}"] = np.full(len(fr), np.nan)
                    continue
                diff = auc - rnd
                m, lo, hi = bootstrap_ci(diff, res.params.n_boot, res.params.seed)
                better = (m < 0) if curve == "deletion" else (m > 0)
                faith_rows.append({"network": name, "family": fam, "method": method, "curve": curve,
                                   "auc": float(auc.mean()), "random_auc": float(rnd.mean()),
                                   "difference": m, "ci_low": lo, "ci_high": hi, "n_cells": len(auc),
                                   "beats_random": bool(better and (hi < 0 if curve == "deletion" else lo > 0))})
                res.curves[name][f"{method}/{curve}"] = crv.mean(0)
        # channel importance (all explained cells of the network, bootstrap over cells)
        drop = np.concatenate([f.arrays["channel_drop"] for f in fx], axis=-1)  # (3, 2, n)
        for ci, ch in enumerate(config.CHANNELS):
            for mi, meth in enumerate(("zero", "mean")):
                m, lo, hi = bootstrap_ci(drop[ci, mi], res.params.n_boot, res.params.seed)
                ci_rows.append({"network": name, "family": fam, "channel": ch, "channel_index": ci,
                                "method": meth, "mean_drop": m, "ci_low": lo, "ci_high": hi, "n_cells": n})
                cic_rows.append(pd.DataFrame({"network": name, "fold": st["fold"], "cell_id": st["cell_id"],
                                              "label": y, "channel": ch, "method": meth, "drop": drop[ci, mi]}))
        # galleries: per true class, most confident (highest p(true)) and most ambiguous (p near 0.5)
        for c in range(len(cls_names)):
            sel = np.flatnonzero(y == c)
            if not len(sel):
                continue
            pt = p[sel, c]
            for kind, order in (("confident", np.argsort(-pt, kind="stable")),
                                ("ambiguous", np.argsort(np.abs(p[sel, 1] - 0.5), kind="stable"))):
                for r, j in enumerate(order[:n_gallery]):
                    i = sel[j]
                    gal_rows.append({"network": name, "class": cls_names[c], "kind": kind, "rank": r + 1,
                                     "row": int(i), "cell_id": st["cell_id"][i], "fold": int(st["fold"][i]),
                                     "proba_normal": p[i, 0], "proba_abnormal": p[i, 1]})
    res.cells = pd.concat(cell_rows, ignore_index=True)
    res.ratios = pd.DataFrame(ratio_rows)
    res.faithfulness = pd.DataFrame(faith_rows)
    res.channel_importance = pd.DataFrame(ci_rows)
    res.channel_importance_cells = pd.concat(cic_rows, ignore_index=True)
    res.gallery = pd.DataFrame(gal_rows)
    res.exclusions = pd.DataFrame(excl_rows, columns=["network", "family", "map", "map_h", "map_w",
                                                      "n_cells", "n_excluded", "reason"])
    res.gradcam_table = pd.DataFrame(table_rows)
    if len(res.exclusions):  # the chapter's not-computed / excluded table
        extra = pd.DataFrame([{"network": r.network, "fold": None, "status": "excluded",
                               "detail": f"Grad-CAM map {r.map} ({r.map_h} x {r.map_w}): {r.reason}"}
                              for r in res.exclusions.itertuples()])
        res.missing = pd.concat([res.missing, extra], ignore_index=True) if len(res.missing) else extra


def _table_of(res: XaiRun, name: str) -> list[dict]:
    """The network's Grad-CAM layer rows as recorded by its folds (the loaded models' layers);
    the registry's stride arithmetic for S when a fold recorded none (a non-registry model)."""
    from . import models

    got = None
    for f in res.folds[name]:
        rows = json.loads(str(f.arrays.get("gradcam_table", "[]")))
        if got is None:
            got = rows
        elif rows != got:
            raise ValueError(f"{name}: the folds' models have different Grad-CAM layers "
                             f"({got} vs {rows} in fold {f.fold})")
    if not got and name in catalogue.NETWORK_NAMES and res.images is not None:
        got = models.gradcam_table(name, int(res.images.shape[1]), res.params.gradcam_min_size).to_dict("records")
    return got or []


def _write(res: XaiRun) -> None:
    out = res.out_dir
    for name in ("cells", "ratios", "faithfulness", "channel_importance", "channel_importance_cells",
                 "gallery", "timings", "missing", "exclusions", "gradcam_table"):
        fname = "gradcam_layers" if name == "gradcam_table" else name
        getattr(res, name).to_csv(out / f"{fname}.csv", index=False)
    for net, gm in res.gmeans.items():
        arrs = {}
        for c, d in gm.items():
            for k, v in d.items():
                if isinstance(v, np.ndarray):
                    arrs[f"{config.CLASS_NAMES[c]}/{k}"] = v.astype(np.float32)
        np.savez_compressed(out / f"gmean_{net}.npz", **arrs)
    np.savez_compressed(out / "faithfulness_curves.npz",
                        **{f"{net}/{k}": v for net, d in res.curves.items() for k, v in d.items()})


def channel_claim(table: pd.DataFrame, method: str = "mean") -> pd.DataFrame:
    """Per network: which stain moves the prediction most (``method``), the third stain's drop with
    its CI, and whether the third stain is the most important one with a CI above 0 (the paper's
    claim that the networks rely on vimentin, here the third stain)."""
    rows = []
    t = table[table.method == method]
    for net, g in t.groupby("network", sort=False):
        g = g.set_index("channel")
        top = g["mean_drop"].idxmax()
        third = g.loc["third"]
        rows.append({"network": net, "most_important": top,
                     "third_drop": third.mean_drop, "third_ci_low": third.ci_low, "third_ci_high": third.ci_high,
                     "third_is_top": top == "third", "third_ci_above_0": bool(third.ci_low > 0),
                     "supports_claim": bool(top == "third" and third.ci_low > 0)})
    return pd.DataFrame(rows)


def gradcam_layer_notes(table: pd.DataFrame, size: int | None = None) -> list[str]:
    """One Markdown line per network of a Grad-CAM layer table (``XaiRun.gradcam_table`` or
    ``models.gradcam_table``): the layer(s) used and their map size, and what the last conv map
    would have been, e.g. "**resnet50**: Grad-CAM at `conv4_block6_out` (4 x 4); the last conv
    map `conv5_block3_out` would have been 2 x 2."."""
    def ticks(names):
        return ", ".join(f"`{n}`" for n in dict.fromkeys(names))

    lines = []
    if table is None or not len(table):
        return lines
    for net, g in table.groupby("network", sort=False):
        used = [f"{ticks(sub.layer)} ({h} x {w})" for (h, w), sub in g.groupby(["map_h", "map_w"], sort=False)]
        changed = g[g.layer != g.last_conv_layer]
        last = [f"{ticks(sub.last_conv_layer)} would have been {h} x {w}"
                for (h, w), sub in changed.groupby(["last_conv_h", "last_conv_w"], sort=False)]
        at = f" at S = {size}" if size else ""
        text = f"- **{net}**{at}: Grad-CAM at " + ", ".join(used) + "; "
        text += (f"the last conv map{'s' if len(changed) > 1 else ''} " + ", ".join(last) + "."
                 if last else "the patch-token grid itself." if set(g.layer) == {"vit_grid"}
                 else "this is the last conv map.")
        small = g[(g.map_h < MIN_MAP_SIDE) | (g.map_w < MIN_MAP_SIDE)]
        if len(small):
            text += (f" **No spatial resolution** ({ticks(small.layer)} below {MIN_MAP_SIDE} x "
                     f"{MIN_MAP_SIDE}): excluded from the Gmean, the ratios and the faithfulness.")
        lines.append(text)
    return lines
