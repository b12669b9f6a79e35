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
  classes: ``cellstudy.learning.models.gradcam_layers(model, min_size=gradcam_min_size)``, per backbone
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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cellstudy import atomic, rundir, threads
from cellstudy import networks as catalogue
# the per-fold work and the run-level summaries (re-exported: explain.X is what notebooks call)
from cellstudy.explain.fold import (METHODS, MIN_MAP_SIDE, XaiParams, explain_fold, map_exclusions,  # noqa: F401
                       select_cells)
from cellstudy.explain.summary import (channel_claim, channel_of_map, summarise, write_results,  # noqa: F401
                          gmean_per_class, gradcam_layer_notes)

STEP = "08_xai"
#: Bump when the cached per-fold content changes meaning.
#: 2: Grad-CAM layers chosen by map size, per-layer maps on a common maximum, map sizes stored.
CACHE_VERSION = 2


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
    from cellstudy.learning.models import load as load_saved

    from cellstudy.learning import augment

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
                model = load_saved(model_path)
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


@_quiet_tensorflow
def _worker_explain(coh: _Cohort, name: str, ks: list[int], params: XaiParams, S: int, out: Path) -> list[dict]:
    """Worker process: fill the cache of one network's folds; returns the timing rows."""
    import cellstudy.learning.models  # noqa: F401  (registers the custom layers for load_model)
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
                             initializer=threads.init_worker, initargs=(threads.thread_env(n),)) as pool:
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
    import cellstudy.learning.models  # noqa: F401  (registers the custom layers for load_model)

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
    summarise(res, radius, threshold, gmean_eps, n_gallery)
    res.seconds_wall, res.workers = time.perf_counter() - t_wall, n_workers
    write_results(res)
    return res




def job_marker(run_dir: str | os.PathLike, network: str, fold: int, regime: str = "long") -> Path:
    """``<run>/08_xai/jobs/<network>/fold<k>_<regime>.json``: the workflow's target of one
    (network, fold) explanation job (:func:`explain_fold_job`)."""
    return Path(run_dir) / STEP / "jobs" / network / f"fold{int(fold)}_{regime}.json"


def explain_fold_job(prepared, network: str, fold: int, regime: str = "long", seed: int = 0,
                     echo: Callable[[str], None] = print) -> Path:
    """Explain one (network, fold) of a run into the 08_xai cache, with exactly the parameters
    the XAI chapter uses (``explain_run``'s defaults at the run's scale: its ``xai_max_cells``,
    ``gradcam_min_size`` and seed), so that the chapter reads it instead of computing it: a
    workflow job on a cluster (one GPU per (network, fold)). A fold without a usable model
    (failed or unfinished) is recorded as skipped with the reason (the chapter reports it).
    Writes and returns :func:`job_marker`."""
    import cellstudy.learning.models  # noqa: F401  (registers the custom layers for load_model)

    catalogue.check_network(network)
    run_dir = Path(prepared.run_dir)
    params = replace(XaiParams(), regime=regime, max_cells=prepared.scale.get("xai_max_cells"), seed=int(seed),
                     gradcam_min_size=prepared.scale.get("gradcam_min_size", 4)).check()
    S = int(prepared.images.shape[1])
    out = run_dir / STEP
    (out / "cache").mkdir(parents=True, exist_ok=True)
    marker = job_marker(run_dir, network, fold, regime)
    problem = rundir.Run(run_dir).fold(network, int(fold)).problem(regime)
    t0 = time.perf_counter()
    if problem is not None:
        info = {"network": network, "fold": int(fold), "regime": regime, "status": "skipped",
                "reason": f"{problem['status']}: {problem['detail']}"}
    else:
        coh = _Cohort.of(prepared)
        rows: list[dict] = []
        _explain_network(coh, network, [int(fold)], params, S, out, lambda fe, row: rows.append(row))
        plan = _fold_plan(coh, network, int(fold), params, S, out)
        info = {"network": network, "fold": int(fold), "regime": regime, "status": "explained",
                "cache": str(plan["cache"].relative_to(run_dir)), "n_cells": int(len(plan["idx"])),
                "cached_before": bool(rows and rows[0].get("cached"))}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    atomic.write_json(marker, info)
    echo(f"xai {network} fold {fold}: {info['status']} ({info.get('cache') or info.get('reason')}), "
         f"{info['seconds']} s")
    return marker
