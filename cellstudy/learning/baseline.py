"""The classical baseline: per-cell features and scikit-learn classifiers (study.md section 11).

What CellProfiler (Analyst) users would build: segment the cell, measure its shape, intensity and
texture, and train a random forest or a logistic regression on the measurements. It is trained on
the **same training folds** and scored on the **same test folds** as the networks, and writes its
results where a trained network writes them (``<run>/training/<rf|logreg>/fold<k>/``), so that
``experiment.collect`` and the results chapter show it as one more row (family ``"Classical"``,
``metrics.NETWORK_FAMILY``). No TensorFlow: NumPy, pandas, SciPy, scikit-image, scikit-learn.

Input
-----
``images``: ``(N, H, W, 3)`` float, RGB order (``config.CHANNELS``: 0 = third stain, e.g.
beta-tubulin in BBBC021; 1 = F-actin; 2 = DNA), robust-scaled per cell and channel to roughly
[0, 1] (``data.load_cohort``). The features are computed from the cells at their **stored** size
(``Prepared.cohort.images``, 68 x 68 for BBBC021), not from the resized network inputs; lengths
and areas are in stored pixels, so new cells must come at the same pixel size.

Masks (:func:`cell_masks`)
--------------------------
* **Nucleus**: the DNA channel smoothed by a Gaussian (sigma ``SMOOTH_SIGMA`` = 1 px,
  ``segment.gaussian_filter``: the same result on every CPU), Otsu threshold, the 8-connected
  component nearest the image centre (smallest distance from the centre to one of its pixels;
  ties: the larger component; components under ``MIN_COMPONENT_FRACTION`` = 10 % of the largest
  one's area are debris and not taken), holes filled. Empty (a flat channel): the central disc of radius
  min(H, W) / 8.
* **Cell**: the same on the sum of the three channels (fallback disc radius min(H, W) / 4); the
  nucleus is added to it, so the nucleus always lies inside the cell.
* **Cytoplasm**: cell minus nucleus (when that is empty, the image outside the nucleus; when the
  nucleus fills the image, the whole image).

Features (:func:`cell_features`, one row per cell, all float64, finite)
-----------------------------------------------------------------------
Shape (group ``shape``), from ``skimage.measure.regionprops`` of each mask (``<m>`` = ``nucleus``
or ``cell``; lengths in pixels, areas in pixels squared):

* ``shape_<m>_area``, ``shape_<m>_perimeter``, ``shape_<m>_eccentricity`` (0 = circle),
  ``shape_<m>_solidity`` (area / convex hull area), ``shape_<m>_major_axis``,
  ``shape_<m>_minor_axis`` (axes of the ellipse with the same second moments);
* ``shape_nucleus_cell_area_ratio``: nucleus area / cell area.

Per stain ``<s>`` = ``third``, ``actin``, ``dna`` (group = the stain), on the channel's values:

* ``<s>_mean``, ``<s>_sd``, ``<s>_p10``, ``<s>_p50``, ``<s>_p90``: mean, SD (ddof 0) and 10th /
  50th / 90th percentiles of the pixels inside the cell mask;
* ``<s>_integrated``: sum of the pixels inside the cell mask (intensity x pixels);
* ``<s>_mean_nucleus``, ``<s>_mean_cytoplasm``: mean inside the nucleus, inside the cytoplasm;
* ``<s>_nuc_cyto_log2ratio``: log2((mean_nucleus + 0.01) / (mean_cytoplasm + 0.01)), the
  nucleus / cytoplasm ratio on a log scale (the 0.01 keeps it finite for an empty channel);
* ``<s>_gradient_mean``: mean Sobel gradient magnitude (``skimage.filters.sobel``) inside the cell
  mask;
* ``<s>_glcm_contrast``, ``<s>_glcm_homogeneity``, ``<s>_glcm_energy``, ``<s>_glcm_correlation``:
  Haralick texture of the whole crop from the grey-level co-occurrence matrix
  (``skimage.feature.graycomatrix``, symmetric, normalised) of the channel quantised to
  ``GLCM_LEVELS`` = 32 levels (``floor(clip(x, 0, 1) * 32)``, 1.0 -> level 31), at distances 1
  and 2 px and angles 0, 45, 90, 135 degrees, averaged over the 8 (distance, angle) pairs
  (``graycoprops``; correlation of a flat channel is taken as 1);
* ``<s>_ring1`` ... ``<s>_ring4``: the radial intensity profile, as CellProfiler's
  MeasureObjectIntensityDistribution: each cell pixel's normalised radius
  r = d_c / (d_c + d_e), d_c its distance to the nucleus centroid, d_e its distance to the cell's
  edge (Euclidean distance transform of the cell mask), in 4 rings [0, 1/4), ..., [3/4, 1]; each
  ring's mean intensity divided by the channel's mean inside the cell (both + 0.01); an empty
  ring reads 1.0 (no difference from the mean).

13 shape + 3 x 18 stain features = 67 columns (``FEATURE_NAMES``, in that order);
``FEATURE_GROUPS`` maps each group to its columns and :func:`feature_stain` a column to its group.
The features are deterministic (no random numbers; the same input gives the same bytes).

Classifiers (:func:`make_classifier`)
-------------------------------------
``rf``: ``StandardScaler`` -> ``RandomForestClassifier(n_estimators=500, min_samples_leaf=1,
n_jobs=1, random_state=seed)`` (the scaler changes nothing for trees; it keeps the two pipelines
alike). ``logreg``: ``StandardScaler`` -> ``LogisticRegression(C=1.0, max_iter=5000)``. The scaler
is inside the pipeline, so it is fitted on the training folds only.

Files (:func:`run_baseline`)
----------------------------
``<run>/<step>/features.parquet`` / ``features.csv`` (one row per cohort cell: ``cell_id``, then
the features; ``features.json`` keys the cache by ``FEATURES_VERSION``, checksums of the feature
code and of the images) and the step's tables (``metrics_tidy.csv`` ... as ``experiment.run_networks`` writes);
per classifier and fold ``<run>/training/<name>/fold<k>/``: ``proba_short.npy`` and
``proba_long.npy`` (**the same** (n_test, 2) float32 array: a classifier has no epochs, so it has
no short and long regimes; both files exist so that every table of the study lists it beside the
networks in either regime), ``y_test.npy``, ``test_cells.csv``, ``model.joblib`` (the fitted
pipeline) and, last, ``done.json``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from cellstudy import atomic, config, networks, rundir, seeds

__all__ = [
    "FEATURES_VERSION", "STAINS", "GROUPS", "FEATURE_NAMES", "FEATURE_GROUPS", "CLASSIFIERS",
    "feature_stain", "cell_masks", "cell_features", "features_for", "make_classifier",
    "run_baseline", "stain_importance", "load_fold_model", "predict_proba",
]

#: Bump when a feature's definition changes: cached features of an older version are recomputed.
FEATURES_VERSION = 1
#: The stains in channel order (``config.CHANNELS``): column prefixes of the intensity features.
STAINS: tuple[str, ...] = tuple(config.CHANNELS)
#: Feature groups, in the order of the tables: the three stains and the masks' shape.
GROUPS: tuple[str, ...] = ("dna", "actin", "third", "shape")

SMOOTH_SIGMA = 1.0
#: Components smaller than this fraction of the largest are debris, never "nearest the centre".
MIN_COMPONENT_FRACTION = 0.1
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
N_RINGS = 4
_EPS = 0.01
_MIN_SIZE = 8

_SHAPE_PROPS = ("area", "perimeter", "eccentricity", "solidity", "major_axis", "minor_axis")
_STAIN_FEATURES = (
    "mean", "sd", "p10", "p50", "p90", "integrated", "mean_nucleus", "mean_cytoplasm",
    "nuc_cyto_log2ratio", "gradient_mean", "glcm_contrast", "glcm_homogeneity", "glcm_energy",
    "glcm_correlation",
) + tuple(f"ring{i + 1}" for i in range(N_RINGS))

#: Every feature column, in order: shape first, then the stains in channel order.
FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"shape_{m}_{p}" for m in ("nucleus", "cell") for p in _SHAPE_PROPS)
    + ("shape_nucleus_cell_area_ratio",)
    + tuple(f"{s}_{f}" for s in STAINS for f in _STAIN_FEATURES)
)

#: Group -> its feature columns (in ``FEATURE_NAMES`` order).
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    g: tuple(n for n in FEATURE_NAMES if n.split("_", 1)[0] == g) for g in GROUPS
}

#: The classifiers of the baseline (``training/<name>``), in table order.
CLASSIFIERS: tuple[str, ...] = networks.CLASSIFIER_NAMES

#: Written into every fold's done.json; a fold is refitted when it differs.
_FORMAT = "cellstudy-baseline/1"


def feature_stain(name: str) -> str:
    """The group of feature column ``name``: ``"dna"``, ``"actin"``, ``"third"`` or ``"shape"``
    (the column's prefix). Unknown prefix: ValueError."""
    g = str(name).split("_", 1)[0]
    if g not in GROUPS or "_" not in str(name):
        raise ValueError(f"feature {name!r} has no known group prefix; expected a name starting with "
                         f"one of {[x + '_' for x in GROUPS]}")
    return g


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def _check_images(images: Any) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"images has shape {a.shape}; expected (N, H, W, 3) in RGB order "
                         f"{tuple(config.CHANNELS)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"images has dtype {a.dtype}; expected float images scaled to [0, 1]")
    if a.shape[1] < _MIN_SIZE or a.shape[2] < _MIN_SIZE:
        raise ValueError(f"images has shape {a.shape}; expected cells of at least "
                         f"{_MIN_SIZE} x {_MIN_SIZE} pixels")
    a = a.astype(np.float64, copy=False)
    if a.size and not np.all(np.isfinite(a)):
        bad = np.flatnonzero(~np.all(np.isfinite(a.reshape(len(a), -1)), axis=1))
        raise ValueError(f"images contains NaN or infinite values (cells {bad[:10].tolist()}"
                         f"{' ...' if len(bad) > 10 else ''}); expected finite values in [0, 1]")
    return a


def _disc(shape: tuple[int, int], radius: float) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= radius ** 2


def _central_component(img: np.ndarray) -> np.ndarray | None:
    """Otsu foreground of the smoothed ``img``, its component nearest the centre, holes filled;
    None when there is no foreground (a flat image)."""
    from skimage.filters import threshold_otsu

    from cellstudy.data.segment import gaussian_filter

    sm = gaussian_filter(np.ascontiguousarray(img, dtype=np.float64), SMOOTH_SIGMA)
    if not np.isfinite(sm).all() or sm.max() - sm.min() < 1e-9:
        return None
    mask = sm > threshold_otsu(sm)
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    h, w = img.shape
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2
    idx = np.arange(1, n + 1)
    dmin = np.asarray(ndi.minimum(d2, lab, idx), dtype=np.float64)
    area = np.asarray(ndi.sum(np.ones_like(d2), lab, idx), dtype=np.float64)
    dmin = np.where(area >= MIN_COMPONENT_FRACTION * area.max(), dmin, np.inf)  # debris: last
    best = idx[np.lexsort((idx, -area, dmin))[0]]  # nearest, then larger, then lower label
    return ndi.binary_fill_holes(lab == best)


def cell_masks(image: np.ndarray) -> dict[str, Any]:
    """The masks of one cell ``image`` ``(H, W, 3)`` (RGB order): ``nucleus``, ``cell``,
    ``cytoplasm`` (H, W) bool, and ``nucleus_fallback`` / ``cell_fallback`` (True where the
    central disc replaced an empty Otsu foreground). See the module docstring for the rules."""
    a = _check_images(np.asarray(image)[None])[0]
    h, w = a.shape[:2]
    nuc = _central_component(a[..., STAINS.index("dna")])
    nuc_fb = nuc is None
    if nuc_fb:
        nuc = _disc((h, w), min(h, w) / 8)
    cell = _central_component(a.sum(axis=-1))
    cell_fb = cell is None
    if cell_fb:
        cell = _disc((h, w), min(h, w) / 4)
    cell = cell | nuc
    cyto = cell & ~nuc
    if not cyto.any():
        cyto = ~nuc if (~nuc).any() else np.ones_like(nuc)
    return {"nucleus": nuc, "cell": cell, "cytoplasm": cyto, "nucleus_fallback": nuc_fb,
            "cell_fallback": cell_fb}


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
def _shape(mask: np.ndarray) -> list[float]:
    from skimage.measure import regionprops

    rp = regionprops(mask.astype(np.uint8))[0]
    try:
        solidity = float(rp.solidity)
    except Exception:  # degenerate hull (a line of pixels)
        solidity = 1.0
    vals = [float(rp.area), float(rp.perimeter), float(rp.eccentricity), solidity,
            float(rp.axis_major_length), float(rp.axis_minor_length)]
    return [v if np.isfinite(v) else 0.0 for v in vals]


def _glcm(channel: np.ndarray) -> list[float]:
    from skimage.feature import graycomatrix, graycoprops

    q = np.minimum(np.floor(np.clip(channel, 0.0, 1.0) * GLCM_LEVELS), GLCM_LEVELS - 1).astype(np.uint8)
    P = graycomatrix(q, distances=list(GLCM_DISTANCES), angles=list(GLCM_ANGLES), levels=GLCM_LEVELS,
                     symmetric=True, normed=True)
    out = []
    for prop, flat in (("contrast", 0.0), ("homogeneity", 1.0), ("energy", 1.0), ("correlation", 1.0)):
        v = np.asarray(graycoprops(P, prop), dtype=np.float64)
        v = np.where(np.isfinite(v), v, flat)
        out.append(float(v.mean()))
    return out


def _one_cell(a: np.ndarray) -> list[float]:
    from skimage.filters import sobel

    m = cell_masks(a)
    nuc, cell, cyto = m["nucleus"], m["cell"], m["cytoplasm"]
    n_area, c_area = float(nuc.sum()), float(cell.sum())
    row = _shape(nuc) + _shape(cell) + [n_area / c_area]
    # normalised radius of each cell pixel: 0 at the nucleus centroid, 1 at the cell's edge
    h, w = nuc.shape
    cy, cx = ndi.center_of_mass(nuc)
    yy, xx = np.mgrid[:h, :w]
    d_c = np.hypot(yy - cy, xx - cx)
    d_e = ndi.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
    r = d_c / np.maximum(d_c + d_e, 1e-12)
    ring = np.minimum((r * N_RINGS).astype(np.int64), N_RINGS - 1)
    for s in STAINS:
        x = a[..., STAINS.index(s)]
        inside = x[cell]
        mean = float(inside.mean())
        p10, p50, p90 = (float(v) for v in np.percentile(inside, [10, 50, 90]))
        mn, mc = float(x[nuc].mean()), float(x[cyto].mean())
        grad = sobel(x)
        rings = []
        for i in range(N_RINGS):
            sel = cell & (ring == i)
            rings.append(float((x[sel].mean() + _EPS) / (mean + _EPS)) if sel.any() else 1.0)
        row += [mean, float(inside.std()), p10, p50, p90, float(inside.sum()), mn, mc,
                float(np.log2((mn + _EPS) / (mc + _EPS))), float(grad[cell].mean())]
        row += _glcm(x) + rings
    return row


def cell_features(images: Any) -> pd.DataFrame:
    """Per-cell features of ``images`` ``(N, H, W, 3)`` (RGB order, robust-scaled to ~[0, 1]).

    Returns a DataFrame of N rows (index 0..N-1, in input order) and the float64 columns
    ``FEATURE_NAMES`` (defined in the module docstring), all finite. Deterministic.
    Raises ValueError naming the shape or the bad values for input that is not 4-D with 3
    channels, smaller than 8 x 8 pixels, or holds NaN / infinite values."""
    a = _check_images(images)
    rows = [_one_cell(a[i]) for i in range(len(a))]
    df = pd.DataFrame(np.asarray(rows, dtype=np.float64).reshape(len(a), len(FEATURE_NAMES)),
                      columns=list(FEATURE_NAMES))
    if not np.isfinite(df.to_numpy()).all():  # pragma: no cover - every feature is guarded
        bad = df.columns[~np.isfinite(df.to_numpy()).all(axis=0)].tolist()
        raise ValueError(f"non-finite features {bad}")
    return df


def _images_digest(images: np.ndarray) -> str:
    a = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    h = hashlib.sha256(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _features_code_digest() -> str:
    """A checksum of the code and constants that define the features: a cache written by other
    feature code is recomputed even if ``FEATURES_VERSION`` was not bumped."""
    import inspect

    parts = [inspect.getsource(f) for f in (_central_component, cell_masks, _shape, _glcm, _one_cell, cell_features)]
    parts.append(repr((FEATURE_NAMES, SMOOTH_SIGMA, MIN_COMPONENT_FRACTION, GLCM_LEVELS, GLCM_DISTANCES,
                       GLCM_ANGLES, N_RINGS, _EPS)))
    return _hash_list(parts)


def features_for(prepared, cache_dir: str | Path | None = None, echo: Callable[[str], None] = print
                 ) -> pd.DataFrame:
    """The features of every cell of ``prepared.cohort.images`` (row i = cell i), cached in
    ``cache_dir/features.parquet`` (+ ``features.csv``, ``features.json``) when given: the cache is
    read back when its ``FEATURES_VERSION``, feature-code checksum, images checksum and cell ids
    match, else recomputed.
    The frame has the columns ``FEATURE_NAMES`` (the files also a first column ``cell_id``)."""
    images = prepared.cohort.images
    ids = np.asarray(prepared.cell_ids).astype(str)
    key = {"features_version": FEATURES_VERSION, "features_code_sha256": _features_code_digest(),
           "images_sha256": _images_digest(images),
           "n_cells": int(len(ids)), "cell_ids_sha256": _hash_list(ids),
           "feature_names_sha256": _hash_list(FEATURE_NAMES)}
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        meta_p, pq = cache_dir / "features.json", cache_dir / "features.parquet"
        if meta_p.is_file() and pq.is_file():
            try:
                meta = json.loads(meta_p.read_text())
            except ValueError:
                meta = {}
            if all(meta.get(k) == v for k, v in key.items()):
                df = pd.read_parquet(pq)
                if list(df["cell_id"].astype(str)) == list(ids) and list(df.columns[1:]) == list(FEATURE_NAMES):
                    echo(f"features of {len(ids)} cells read back from {pq}")
                    return df.drop(columns="cell_id").reset_index(drop=True)
    t0 = time.perf_counter()
    df = cell_features(images)
    secs = time.perf_counter() - t0
    echo(f"features of {len(ids)} cells computed in {secs:.1f} s ({len(FEATURE_NAMES)} per cell)")
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        full = pd.concat([pd.DataFrame({"cell_id": ids}), df], axis=1)

        def parquet(f):
            buf = io.BytesIO()
            full.to_parquet(buf, engine="pyarrow", index=False)
            f.write(buf.getvalue())

        atomic.write(cache_dir / "features.parquet", parquet)
        atomic.write_text(cache_dir / "features.csv", full.to_csv(index=False))
        atomic.write_json(cache_dir / "features.json", {**key, "seconds": secs})
    return df


# ---------------------------------------------------------------------------------------------
# classifiers
# ---------------------------------------------------------------------------------------------
def make_classifier(name: str, seed: int = 0):
    """A fresh scikit-learn Pipeline for classifier ``name`` (``CLASSIFIERS``), seeded with
    ``seed``. Unknown name: ValueError listing the valid ones."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "rf":
        clf = RandomForestClassifier(n_estimators=500, min_samples_leaf=1, n_jobs=1, random_state=int(seed))
    elif name == "logreg":
        clf = LogisticRegression(C=1.0, max_iter=5000)
    else:
        raise ValueError(f"unknown classifier {name!r}; expected one of {list(CLASSIFIERS)}")
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _hash_list(items: Iterable[Any]) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()


def _features_hash(feats: pd.DataFrame, ids: np.ndarray) -> str:
    h = hashlib.sha256(_hash_list(feats.columns).encode())
    h.update(_hash_list(ids).encode())
    h.update(np.ascontiguousarray(feats.to_numpy(dtype=np.float64)).tobytes())
    return h.hexdigest()


def _params_hash(name: str, seed: int) -> str:
    p = make_classifier(name, seed).get_params(deep=True)
    return _hash_list(f"{k}={p[k]!r}" for k in sorted(p) if "__" in k)


def _fit_fold(name: str, k: int, feats: pd.DataFrame, prepared, fhash: str, seed: int,
              echo: Callable[[str], None]):
    """Fit (or read back) classifier ``name`` on the training folds of fold ``k``; returns
    (train.TrainResult, test_cells frame)."""
    import joblib
    from sklearn import __version__ as skl_version

    from cellstudy.learning import train

    y_all = np.asarray(prepared.labels).astype(np.int64)
    ids = np.asarray(prepared.cell_ids).astype(str)
    groups = np.asarray(prepared.groups).astype(str)
    folds = np.asarray(prepared.folds)
    test, tr = folds == k, folds != k
    if not test.any():
        raise ValueError(f"fold {k} has no test cells (folds hold {sorted(set(folds.tolist()))})")
    fd = rundir.Run(prepared.run_dir).fold(name, k, create=True)
    d = fd.path
    cells = pd.DataFrame({"cell_id": ids[test], "group": groups[test], "label": y_all[test]})
    phash = _params_hash(name, seed)
    done = fd.done
    if done.is_file() and fd.classifier_model.is_file() and fd.proba("long").is_file():
        try:
            meta = json.loads(done.read_text())
        except ValueError:
            meta = {}
        same = (meta.get("format") == _FORMAT and meta.get("seed") == int(seed)
                and meta.get("features_hash") == fhash and meta.get("params_hash") == phash
                and meta.get("train_cells") == ids[tr].tolist() and meta.get("test_cells") == ids[test].tolist())
        if same:
            return train.load_result(d), cells
        echo(f"{name} fold {k}: {done} is for other features, folds, seed or settings; refitting")
    done.unlink(missing_ok=True)
    x_tr, x_te = feats.loc[tr], feats.loc[test]
    pipe = make_classifier(name, seed)
    t0 = time.perf_counter()
    pipe.fit(x_tr, y_all[tr])
    t1 = time.perf_counter()
    proba = pipe.predict_proba(x_te).astype(np.float32)
    t2 = time.perf_counter()
    classes = [int(c) for c in pipe.classes_]
    if classes != [0, 1]:
        raise ValueError(f"{name} fold {k}: the training folds hold class(es) {classes} only; "
                         "expected both 0 and 1")
    for regime in rundir.REGIMES:
        atomic.save_npy(fd.proba(regime), proba)
    atomic.save_npy(d / "y_test.npy", y_all[test])
    atomic.write_text(fd.test_cells, cells.to_csv(index=False))
    atomic.write(fd.classifier_model, lambda f: joblib.dump(pipe, f))
    timings = {"seconds_training": t1 - t0, "seconds_predict": t2 - t1}
    meta = {"format": _FORMAT, "network": name, "kind": "classical", "fold": int(k), "status": "done",
            "seed": int(seed), "n_train": int(tr.sum()), "n_test": int(test.sum()),
            "features_hash": fhash, "feature_names_hash": _hash_list(feats.columns),
            "feature_names": list(feats.columns), "features_version": FEATURES_VERSION,
            "params_hash": phash, "classifier": repr(pipe.named_steps["clf"]), "sklearn": skl_version,
            "regimes": "a classifier has no epochs: proba_short.npy and proba_long.npy are the same array",
            "timings": timings, "train_cells": ids[tr].tolist(), "test_cells": ids[test].tolist()}
    atomic.write_json(done, meta)
    res = train.TrainResult(network=name, fold=int(k), status="done", out_dir=d,
                            proba={"short": proba, "long": proba}, y_test=y_all[test], timings=timings)
    return res, cells


def run_baseline(prepared, step: str, seed: int = 0, echo: Callable[[str], None] = print,
                 classifiers: Sequence[str] = CLASSIFIERS) -> Any:
    """Fit and score every classifier of ``classifiers`` on every fold of ``prepared``
    (``study.prepare``'s result, or anything with ``cohort.images``, ``labels``, ``groups``,
    ``cell_ids``, ``folds``, ``scale``, ``run_dir``) that ``experiment.folds_for(scale)`` selects.

    Per classifier and fold k the pipeline is fitted on the features of the cells with
    ``folds != k`` and predicts the cells with ``folds == k``; the files are those of a trained
    network (module docstring), with the same array in ``proba_short.npy`` and ``proba_long.npy``
    (a classifier has no epoch regimes). Finished folds (``done.json`` for the same seed, features,
    training and test cells and classifier settings) are read back, not refitted. The features
    are cached in ``<run>/<step>/``, where the step's tables are written too.

    Returns ``experiment.FamilyResults`` (tidy metrics, predictions, empty history, failures,
    timings), like ``experiment.run_networks``."""
    from cellstudy.learning import experiment

    names = list(classifiers)
    for n in names:
        if n not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {n!r}; expected one of {list(CLASSIFIERS)}")
    folds = experiment.folds_for(prepared.scale)
    out = Path(prepared.run_dir) / step
    out.mkdir(parents=True, exist_ok=True)
    feats = features_for(prepared, out, echo=echo)
    ids = np.asarray(prepared.cell_ids).astype(str)
    fhash = _features_hash(feats, ids)
    records, preds, hist, fails, times = [], [], [], [], []
    total, i, t0 = len(names) * len(folds), 0, time.perf_counter()
    for name in names:
        for k in folds:
            res, cells = _fit_fold(name, k, feats, prepared, fhash, seed, echo)
            i += 1
            auc = _auc(cells["label"].to_numpy(), res.proba["long"][:, 1])
            echo(f"[{i}/{total}] {name} fold {k}: {res.status}{' (read back)' if res.skipped else ''}, "
                 f"test AUC {auc:.3f}; {time.perf_counter() - t0:.1f} s elapsed")
            experiment._collect_one(res, cells, name, k, records, preds, hist, fails, times)
    return experiment._write(out, records, preds, hist, fails, times)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else math.nan


# ---------------------------------------------------------------------------------------------
# fitted models
# ---------------------------------------------------------------------------------------------
def load_fold_model(run_dir: str | Path, name: str, k: int):
    """The fitted pipeline of classifier ``name`` for fold ``k`` of a run
    (``<run>/training/<name>/fold<k>/model.joblib``). FileNotFoundError naming the folder when
    the fold has not been fitted (no done.json or model.joblib)."""
    import joblib

    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; expected one of {list(CLASSIFIERS)}")
    fd = rundir.Run(run_dir).fold(name, int(k))
    if fd.problem(classical=True) is not None:
        raise FileNotFoundError(f"classifier {name!r} fold {k} is not fitted: no {rundir.DONE} / "
                                f"{rundir.CLASSIFIER_MODEL} in {fd.path}; run baseline.run_baseline first")
    return joblib.load(fd.classifier_model)


def _fitted_folds(run_dir: str | Path, name: str) -> list[int]:
    return [fd.fold for fd in rundir.Run(run_dir).usable_folds(name, classical=True)[0]]


def predict_proba(run_dir: str | Path, name: str, images: Any, folds: Sequence[int] | None = None
                  ) -> np.ndarray:
    """The fold ensemble of classifier ``name`` on new cells: the mean over the fold models
    (``folds``; None: every fitted fold of the run) of their class probabilities for the
    features of ``images`` ``(N, H, W, 3)`` (same stored pixel size and scaling as the run's
    cohort). Returns ``(N, 2)`` float64. FileNotFoundError naming the folder when a fold (or,
    with ``folds=None``, every fold) is not fitted."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; expected one of {list(CLASSIFIERS)}")
    if folds is None:
        folds = _fitted_folds(run_dir, name)
        if not folds:
            raise FileNotFoundError(f"no fitted fold of classifier {name!r} under "
                                    f"{Path(run_dir) / 'training' / name}; run baseline.run_baseline first")
    models = [load_fold_model(run_dir, name, k) for k in folds]
    feats = cell_features(images)
    return np.mean([m.predict_proba(feats) for m in models], axis=0)


# ---------------------------------------------------------------------------------------------
# which stain matters
# ---------------------------------------------------------------------------------------------
def stain_importance(prepared, run_dir: str | Path, n_repeats: int = 10, seed: int = 0,
                     classifiers: Sequence[str] = CLASSIFIERS, step: str | None = None) -> pd.DataFrame:
    """Grouped permutation importance per classifier: on each test fold, with that fold's fitted
    model, all columns of one group (``GROUPS``: dna, actin, third, shape) are permuted together
    (one permutation of the test cells per repeat, seeded by (seed, fold, repeat)) and the drop
    of the ROC AUC (of p(abnormal)) from the unpermuted AUC is recorded.

    Returns one row per classifier x group: ``classifier, group, auc_drop_mean, auc_drop_sd``
    (mean and sample SD over folds x repeats), ``n_folds``, plus ``auc`` (the mean unpermuted
    AUC); rows ordered by classifier, then by decreasing drop. Folds with one class in the test
    fold are skipped. The features are read from ``<run_dir>/<step>/`` when ``step`` names the
    baseline's step (its cache), else computed. FileNotFoundError when a fold is not fitted."""
    from cellstudy.learning import experiment

    if int(n_repeats) < 1:
        raise ValueError(f"n_repeats={n_repeats!r}; expected an int >= 1")
    cache = Path(run_dir) / step if step is not None else None
    feats = features_for(prepared, cache, echo=lambda s: None)
    y_all = np.asarray(prepared.labels).astype(np.int64)
    ids = np.asarray(prepared.cell_ids).astype(str)
    folds = np.asarray(prepared.folds)
    rows = []
    for name in classifiers:
        drops: dict[str, list[float]] = {g: [] for g in GROUPS}
        base_aucs, used = [], []
        for k in experiment.folds_for(prepared.scale):
            model = load_fold_model(run_dir, name, k)
            test = folds == k
            tc = rundir.Run(run_dir).fold(name, k).test_cells
            stored = pd.read_csv(tc, dtype={"cell_id": str})["cell_id"].tolist()
            if stored != ids[test].tolist():
                raise ValueError(f"{tc} lists other cells than fold {k} of these folds; "
                                 "the model was fitted on other folds")
            x, y = feats.loc[test].reset_index(drop=True), y_all[test]
            if len(np.unique(y)) < 2:
                continue
            base = _auc(y, model.predict_proba(x)[:, 1])
            base_aucs.append(base)
            used.append(k)
            for gi, g in enumerate(GROUPS):
                cols = list(FEATURE_GROUPS[g])
                for r in range(int(n_repeats)):
                    rng = seeds.rng(seed, "permutation", k, r, gi)
                    xp = x.copy()
                    xp[cols] = x[cols].to_numpy()[rng.permutation(len(x))]
                    drops[g].append(base - _auc(y, model.predict_proba(xp)[:, 1]))
        for g in GROUPS:
            v = np.asarray(drops[g], dtype=np.float64)
            rows.append({"classifier": name, "group": g,
                         "auc_drop_mean": float(v.mean()) if v.size else math.nan,
                         "auc_drop_sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,
                         "n_folds": len(used), "auc": float(np.mean(base_aucs)) if base_aucs else math.nan})
    df = pd.DataFrame(rows, columns=["classifier", "group", "auc_drop_mean", "auc_drop_sd", "n_folds", "auc"])
    rank = {n: i for i, n in enumerate(classifiers)}
    df = df.assign(_r=df["classifier"].map(rank)).sort_values(["_r", "auc_drop_mean"], ascending=[True, False],
                                                              kind="mergesort")
    return df.drop(columns="_r").reset_index(drop=True)
