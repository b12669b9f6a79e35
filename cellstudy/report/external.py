"""The external test: a run's models scored on cells of source fields its cohort never used.

study.md section 11: the default cohort ``bbbc021-paper`` draws 10 of the 16 DMSO fields and 10 of
the 18 treated fields of BBBC021; the cells of the other fields (cohort ``bbbc021-unseen``, 240
normal in 6 fields + 320 abnormal in 8 fields) were seen by no model, in training or in testing.
Each network's fold ensemble (the mean of its fold models' class probabilities) and the
classical baseline (``cellstudy.learning.baseline``, when present) are scored on them.

How a cell is scored, per fold model: the external cohort is loaded and robust-scaled
(``data.load_cohort``) and preprocessed exactly like the run's cohort
(``preprocess.preprocess_batch`` at the run's scale), whitened with **that fold's** ZCA fit
(``zca.json``, fitted on the fold's training set) and predicted by that fold's model
(``model_<regime>.keras``) in batches of 64. One model object per network: later folds load their
weights into it (``explain.load_weights``).

Uncertainty: the cells of one field share a well, a site and an exposure, so they are not
independent. The AUC's confidence interval is a **cluster bootstrap over fields**
(:func:`field_bootstrap_auc`): fields are resampled with replacement (within each class, since
every BBBC021 field holds one class), each drawn field brings all its cells, 2,000 resamples,
seeded, percentile interval. With 6 + 8 fields the interval is wide; that is the honest width.

``evaluate`` returns an :class:`ExternalResult`; ``write`` stores its tables. No TensorFlow at
import time (the models are imported inside ``evaluate``).
"""
from __future__ import annotations

import gc
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cellstudy import config, rundir
from cellstudy import networks as catalogue

__all__ = ["EXTERNAL_COHORTS", "BASELINES", "ExternalResult", "external_cohort_for", "check_disjoint",
           "field_bootstrap_auc", "calibration_table", "expected_calibration_error", "brier_score",
           "score", "evaluate", "write"]

#: The run's cohort -> its external test set (a cohort sharing no field with it).
EXTERNAL_COHORTS: dict[str, str] = {"bbbc021-paper": "bbbc021-unseen"}

#: The classical baseline's models (``<run>/training/<name>``, ``cellstudy.learning.baseline``).
BASELINES: tuple[str, ...] = ("rf", "logreg")
#: Family label of the baseline rows (``metrics.NETWORK_FAMILY`` holds the networks').
BASELINE_FAMILY = catalogue.CLASSICAL

N_BOOT = 2000
N_BINS = 10
BATCH_SIZE = 64

#: How many shared groups / cells a disjointness error names before counting the rest.
_MAX_LISTED = 5


@dataclass
class ExternalResult:
    """The external test of one run.

    predictions: one row per cell x model: ``cell_id, group, y_true, network, family,
        proba_normal, proba_abnormal`` (the fold-ensemble mean), ``fold_sd`` (sample SD over the
        fold models of p(abnormal); NaN with one fold), ``n_folds``.
    metrics: one row per model: ``network, family, n_cells, n_fields, n_folds, folds`` (the fold
        models averaged, e.g. ``"0,1,2"``), ``auc, auc_ci_low, auc_ci_high`` (ROC AUC of
        p(abnormal); 95% field-cluster bootstrap, ``n_boot`` resamples used), ``balanced_accuracy,
        accuracy`` (argmax of the ensemble), ``brier`` (of p(abnormal)), ``ece`` (10 equal-width
        bins), ``n_boot``.
    calibration: ``network, bin, lower, upper, mean_predicted, fraction_positive, count``.
    notes: ``network, fold, status, detail``: what could not be scored and why.
    """

    predictions: pd.DataFrame
    metrics: pd.DataFrame
    calibration: pd.DataFrame
    notes: pd.DataFrame
    cohort: str = ""
    external: str = ""
    regime: str = "long"
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Which cells, and that they are really unseen
# ---------------------------------------------------------------------------------------------
def external_cohort_for(cohort: str) -> str | None:
    """The external test cohort of ``cohort`` (``"bbbc021-paper"`` -> ``"bbbc021-unseen"``);
    None when the study defines none for it."""
    return EXTERNAL_COHORTS.get(str(cohort))


def _listed(items: Sequence[str]) -> str:
    items = sorted(map(str, items))
    more = len(items) - _MAX_LISTED
    return ", ".join(items[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def check_disjoint(cohort_df: pd.DataFrame, external_df: pd.DataFrame, cohort: str = "the cohort",
                   external: str = "the external set") -> None:
    """Raise ``ValueError`` when ``external_df`` shares a source field (``group``) or a cell
    (``cell_id``) with ``cohort_df`` (manifest, folds or test-cell tables); the message names
    the shared fields and cells (the first few, then a count). Returns None when disjoint."""
    for what, df in ((cohort, cohort_df), (external, external_df)):
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}")
        missing = [c for c in ("cell_id", "group") if c not in df.columns]
        if missing:
            raise ValueError(f"{what}: table lacks column(s) {missing}; it has {list(df.columns)}")
    groups = set(cohort_df["group"].astype(str)) & set(external_df["group"].astype(str))
    cells = set(cohort_df["cell_id"].astype(str)) & set(external_df["cell_id"].astype(str))
    if groups or cells:
        parts = []
        if groups:
            parts.append(f"{len(groups)} field(s) ({_listed(groups)})")
        if cells:
            parts.append(f"{len(cells)} cell(s) ({_listed(cells)})")
        raise ValueError(f"{external} shares {' and '.join(parts)} with {cohort}; an external test "
                         "set must hold only cells of fields the run never used")


def _run_tables(run_dir: Path, cohort: str) -> list[tuple[str, pd.DataFrame]]:
    """The tables that say which cells and fields the run used: the cohort's manifest (when
    it is a known cohort), the run's folds file and every fold's test_cells.csv."""
    from cellstudy import data
    from cellstudy.learning import folds

    out: list[tuple[str, pd.DataFrame]] = []
    try:
        m = data.load_manifest(cohort)
        out.append((f"cohort {cohort!r} (manifest {m.attrs.get('manifest')})", m))
    except (data.DataError, FileNotFoundError):
        pass
    run = rundir.Run(run_dir)
    fp = run.folds_file(cohort, create=False)
    if fp.is_file():
        out.append((f"the run's folds file {fp}", folds.read_folds(fp)[0]))
    for fd in run.all_folds():
        if fd.test_cells.is_file():
            out.append((f"{fd.test_cells}", pd.read_csv(fd.test_cells, dtype={"cell_id": str, "group": str})))
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def _check_scores(y_true, score, groups=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and score: expected two (n,) arrays of one length, got shapes "
                         f"{y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true: expected labels 0 (normal) or 1 (abnormal), got {np.unique(y)[:5]}")
    if not np.isfinite(s).all():
        raise ValueError("score: contains NaN or inf; expected finite probabilities")
    g = None
    if groups is not None:
        g = np.asarray(groups).astype(str)
        if g.shape != y.shape:
            raise ValueError(f"groups: expected shape {y.shape} like y_true, got {g.shape}")
    return y.astype(np.int64), s, g


def _pair_counts(y: np.ndarray, s: np.ndarray, codes: np.ndarray, n_fields: int) -> np.ndarray:
    """(F, F) matrix: entry [f, g] = sum over positive cells i of field f and negative cells j
    of field g of [s_i > s_j] + 0.5 [s_i = s_j] (the Mann-Whitney count, split by field pair)."""
    c = np.zeros((n_fields, n_fields))
    pos = y == 1
    for gi in np.unique(codes[~pos]):
        neg = np.sort(s[(~pos) & (codes == gi)])
        sp = s[pos]
        lo = np.searchsorted(neg, sp, side="left")
        hi = np.searchsorted(neg, sp, side="right")
        c[:, gi] = np.bincount(codes[pos], weights=lo + 0.5 * (hi - lo), minlength=n_fields)
    return c


def field_bootstrap_auc(y_true, score, groups, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95,
                        stratify: bool = True) -> dict[str, Any]:
    """ROC AUC of ``score`` for ``y_true == 1`` with a cluster-bootstrap CI over fields.

    The cells of one field are correlated, so the resampling unit is the field (``groups``): a
    resample draws fields with replacement and takes every cell of each drawn field (a field
    drawn twice counts twice). With ``stratify`` (and every field holding one class, as in
    BBBC021) fields are drawn within each class, as many as the class has, so every resample
    holds both classes; otherwise all fields are drawn together and resamples with one class
    only are dropped (counted in ``n_dropped``). Percentile interval at ``level``.

    Exact and fast: the Mann-Whitney count is split by (positive field, negative field) once
    (:func:`_pair_counts`); resample ``b`` with field counts ``w`` has
    ``AUC_b = w^T C w / ((w . n_pos) (w . n_neg))``.

    Args:
        y_true: (n,) int labels 0/1. score: (n,) float, higher = more abnormal.
        groups: (n,) field of each cell. n_boot: resamples (> 0). seed: the generator's seed.

    Returns:
        dict ``auc`` (the point estimate, equal to ``sklearn.metrics.roc_auc_score``),
        ``ci_low``, ``ci_high``, ``n_boot`` (resamples used), ``n_dropped``, ``n_fields``,
        ``stratified``. NaN AUC and CI when the truth holds one class.
    """
    y, s, g = _check_scores(y_true, score, groups)
    if g is None:
        raise ValueError("groups: required (the field of each cell)")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot: expected a positive number of resamples, got {n_boot!r}")
    if not 0 < float(level) < 1:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level!r}")
    fields, codes = np.unique(g, return_inverse=True)
    nf = len(fields)
    n_pos = np.bincount(codes, weights=(y == 1), minlength=nf)
    n_neg = np.bincount(codes, weights=(y == 0), minlength=nf)
    out = {"auc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_boot": 0,
           "n_dropped": 0, "n_fields": int(nf), "stratified": False}
    if n_pos.sum() == 0 or n_neg.sum() == 0:
        return out
    c = _pair_counts(y, s, codes, nf)
    out["auc"] = float(c.sum() / (n_pos.sum() * n_neg.sum()))
    rng = np.random.default_rng(seed)
    pure = bool(np.all((n_pos == 0) | (n_neg == 0)))
    strat = bool(stratify and pure)
    if strat:
        w = np.zeros((int(n_boot), nf))
        for members in (np.flatnonzero(n_pos > 0), np.flatnonzero(n_neg > 0)):
            draw = rng.choice(members, size=(int(n_boot), len(members)), replace=True)
            for row, d in zip(w, draw):
                row += np.bincount(d, minlength=nf)
    else:
        draw = rng.integers(0, nf, size=(int(n_boot), nf))
        w = np.stack([np.bincount(d, minlength=nf) for d in draw]).astype(float)
    den = (w @ n_pos) * (w @ n_neg)
    ok = den > 0
    num = np.einsum("bf,fg,bg->b", w[ok], c, w[ok])
    aucs = num / den[ok]
    a = (1 - float(level)) / 2
    if aucs.size:
        out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(aucs, [a, 1 - a]))
    out.update(n_boot=int(aucs.size), n_dropped=int((~ok).sum()), stratified=strat)
    return out


def calibration_table(y_true, proba_abnormal, n_bins: int = N_BINS) -> pd.DataFrame:
    """Reliability table of p(abnormal): ``n_bins`` equal-width bins on [0, 1] (bin ``i`` holds
    ``i/n <= p < (i+1)/n``; p = 1 falls in the last bin). Columns ``bin, lower, upper,
    mean_predicted, fraction_positive`` (observed fraction of abnormal cells), ``count``; every
    bin is listed (empty ones with count 0 and NaN means), so the counts sum to n."""
    y, p, _ = _check_scores(y_true, proba_abnormal)
    if int(n_bins) < 1:
        raise ValueError(f"n_bins: expected a positive number of bins, got {n_bins!r}")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"proba_abnormal: expected probabilities in [0, 1], got [{p.min()}, {p.max()}]")
    n = int(n_bins)
    b = np.clip(np.floor(p * n).astype(int), 0, n - 1)
    count = np.bincount(b, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mp = np.bincount(b, weights=p, minlength=n) / count
        fp = np.bincount(b, weights=y, minlength=n) / count
    edges = np.linspace(0.0, 1.0, n + 1)
    return pd.DataFrame({"bin": np.arange(n), "lower": edges[:-1], "upper": edges[1:], "mean_predicted": mp,
                         "fraction_positive": fp, "count": count.astype(int)})


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE of a :func:`calibration_table`: sum over bins of count/n x |fraction positive - mean
    predicted| (empty bins contribute nothing)."""
    t = table[table["count"] > 0]
    n = t["count"].sum()
    if n == 0:
        return float("nan")
    return float((t["count"] * (t["fraction_positive"] - t["mean_predicted"]).abs()).sum() / n)


def brier_score(y_true, proba_abnormal) -> float:
    """Mean squared difference between p(abnormal) and the truth (0/1)."""
    y, p, _ = _check_scores(y_true, proba_abnormal)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def score(y_true, proba, groups, n_boot: int = N_BOOT, seed: int = 0,
          n_bins: int = N_BINS) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics of one model's (n, 2) ensemble probabilities on the external cells: (dict ``n_cells,
    n_fields, auc, auc_ci_low, auc_ci_high, balanced_accuracy, accuracy, brier, ece``,
    calibration table)."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2 or p.shape != (len(y), 2):
        raise ValueError(f"proba: expected shape ({len(y)}, 2), got {p.shape}")
    pa = p[:, 1]
    boot = field_bootstrap_auc(y, pa, groups, n_boot=n_boot, seed=seed)
    pred = p.argmax(axis=1)
    present = np.unique(y)
    cal = calibration_table(y, pa, n_bins)
    m = {"n_cells": int(len(y)), "n_fields": boot["n_fields"], "auc": boot["auc"],
         "auc_ci_low": boot["ci_low"], "auc_ci_high": boot["ci_high"],
         "balanced_accuracy": float(np.mean([np.mean(pred[y == c] == c) for c in present])),
         "accuracy": float(np.mean(pred == y)), "brier": brier_score(y, pa),
         "ece": expected_calibration_error(cal), "n_boot": boot["n_boot"]}
    return m, cal


# ---------------------------------------------------------------------------------------------
# Scoring a run
# ---------------------------------------------------------------------------------------------
def _whitener(fd: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The fold's input transform from ``zca.json``: its ZCA fit, or the identity when the fold
    was trained without whitening (``null``)."""
    from cellstudy.learning import augment

    state = json.loads((fd / rundir.ZCA).read_text())
    if state is None:
        return lambda x: np.asarray(x, dtype=np.float32)
    if not isinstance(state, dict) or not state.get("fitted"):
        raise ValueError(f"{fd / rundir.ZCA}: expected a fitted ZCAWhitening state (augment.ZCAWhitening"
                         f".state()) or null, got {str(state)[:120]}")
    return augment.ZCAWhitening.from_state(state).transform


def _predict(model, images: np.ndarray, transform, batch_size: int) -> np.ndarray:
    """(N, 2) float64 probabilities of ``model`` on ``transform(images)``, batch by batch."""
    out = []
    for i in range(0, len(images), batch_size):
        xb = transform(images[i:i + batch_size])
        out.append(np.asarray(model.predict_on_batch(xb), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, 2))


def _network_probas(name: str, folds: list[tuple[int, Path]], regime: str, images: np.ndarray,
                    batch_size: int, notes: list[dict], echo) -> tuple[list[int], list[np.ndarray]]:
    """Per-fold (N, 2) probabilities of one network: one model object, loaded from the first
    fold's archive; later folds load their weights into it. An unreadable fold becomes a note; a
    model of another input size raises ValueError."""
    from cellstudy.explain import load_weights
    from cellstudy.learning.models import load as load_saved

    S = images.shape[1]
    model, used, probas = None, [], []
    for k, fd in folds:
        path = fd / rundir.model_file(regime)
        t0 = time.perf_counter()
        try:
            if model is None:
                model = load_saved(path)
            else:
                load_weights(model, path)
        except Exception as e:  # unreadable or mismatching archive: note it, score the other folds
            notes.append({"network": name, "fold": k, "status": "unreadable",
                          "detail": f"{path}: {type(e).__name__}: {str(e)[:200]}"})
            continue
        in_hw = tuple(model.inputs[0].shape[1:3])
        if in_hw != (S, S):
            raise ValueError(f"{path} takes {in_hw} images but the external cells were preprocessed to "
                             f"{S} x {S}; pass the scale (and overrides) the run was trained at")
        p = _predict(model, images, _whitener(fd), batch_size)
        if p.shape != (len(images), 2) or not np.isfinite(p).all():
            notes.append({"network": name, "fold": k, "status": "bad output",
                          "detail": f"{path}: probabilities of shape {p.shape} (finite: "
                                    f"{bool(np.isfinite(p).all())}); expected ({len(images)}, 2)"})
            continue
        used.append(k)
        probas.append(p)
        echo(f"external: {name} fold {k}: {len(images)} cells, {time.perf_counter() - t0:.1f} s")
    del model
    gc.collect()
    return used, probas


def _baseline_module(notes: list[dict]):
    """``cellstudy.learning.baseline`` when it provides ``cell_features`` and ``load_fold_model`` or
    ``predict_proba``; else None and a note."""
    try:
        mod = importlib.import_module("cellstudy.learning.baseline")
    except ModuleNotFoundError as e:
        if e.name != "cellstudy.learning.baseline":
            raise
        notes.append({"network": ",".join(BASELINES), "fold": None, "status": "no baseline module",
                      "detail": "cellstudy.learning.baseline is not in this checkout; the classical baseline was "
                                "not scored"})
        return None
    has = {f: callable(getattr(mod, f, None)) for f in ("cell_features", "load_fold_model", "predict_proba")}
    if not has["cell_features"] or not (has["load_fold_model"] or has["predict_proba"]):
        notes.append({"network": ",".join(BASELINES), "fold": None, "status": "baseline API missing",
                      "detail": "cellstudy.learning.baseline lacks cell_features and load_fold_model / predict_proba "
                                f"({', '.join(f for f, ok in has.items() if not ok)} missing); the classical "
                                "baseline was not scored"})
        return None
    return mod


def _baseline_probas(mod, run_dir: Path, name: str, images: np.ndarray, cache: dict,
                     notes: list[dict]) -> tuple[list[int], list[np.ndarray], np.ndarray | None]:
    """The baseline ``name``'s probabilities on the external cells: (folds used, per-fold (N, 2)
    arrays, the (N, 2) ensemble when only that is available). The features come from the
    robust-scaled cells at their **stored** size (``images`` = ``Cohort.images``, the size the
    baseline was fitted at), computed once for all baselines (kept in ``cache``). With
    ``baseline.load_fold_model`` every fitted fold (``done.json`` and ``model.joblib``) predicts
    them; otherwise ``baseline.predict_proba(run_dir, name, images)`` gives the fold-ensemble mean
    (no per-fold spread)."""
    run = rundir.Run(run_dir)
    d = run.training / name
    if not d.is_dir():
        notes.append({"network": name, "fold": None, "status": "not trained", "detail": f"no folder {d}"})
        return [], [], None
    if callable(getattr(mod, "load_fold_model", None)):
        fitted, why = run.usable_folds(name, classical=True)
        notes += [r for r in why if r["fold"] is not None]
        used, probas = [], []
        for k in (fd.fold for fd in fitted):
            if "features" not in cache:
                t0 = time.perf_counter()
                cache["features"] = mod.cell_features(images)
                cache["seconds"] = time.perf_counter() - t0
            p = np.asarray(mod.load_fold_model(run_dir, name, k).predict_proba(cache["features"]), np.float64)
            if p.shape != (len(images), 2):
                notes.append({"network": name, "fold": k, "status": "bad output",
                              "detail": f"fold model's predict_proba gave shape {p.shape}; expected "
                                        f"({len(images)}, 2)"})
                continue
            used.append(k)
            probas.append(p)
        if not used:
            notes.append({"network": name, "fold": None, "status": "not scored",
                          "detail": f"no fitted fold (done.json and model.joblib) in {d}"})
        return used, probas, None
    try:
        a = np.asarray(mod.predict_proba(run_dir, name, images), dtype=np.float64)
    except (FileNotFoundError, ValueError) as e:
        notes.append({"network": name, "fold": None, "status": "not scored",
                      "detail": f"baseline.predict_proba: {type(e).__name__}: {str(e)[:200]}"})
        return [], [], None
    if a.shape != (len(images), 2):
        notes.append({"network": name, "fold": None, "status": "bad output",
                      "detail": f"baseline.predict_proba returned shape {a.shape}; expected ({len(images)}, 2)"})
        return [], [], None
    ks = [fd.fold for fd in run.folds(name)]
    notes.append({"network": name, "fold": None, "status": "ensemble only",
                  "detail": "baseline.predict_proba gives the fold-ensemble mean only: fold_sd is NaN"})
    return ks, [], a


def _model_rows(coh, name: str, family: str, folds_used: list[int], probas: list[np.ndarray],
                ensemble: np.ndarray | None, n_boot: int, seed: int, n_bins: int):
    """(predictions, metrics row, calibration) of one model."""
    from cellstudy.learning.metrics import PROBA_COLUMNS

    if ensemble is None:
        stack = np.stack(probas)                     # (folds, N, 2)
        ensemble = stack.mean(axis=0)
        sd = stack[:, :, 1].std(axis=0, ddof=1) if len(stack) > 1 else np.full(len(coh.labels), np.nan)
    else:
        sd = np.full(len(coh.labels), np.nan)
    pred = pd.DataFrame({"cell_id": coh.cell_ids.astype(str), "group": coh.groups.astype(str),
                         "y_true": coh.labels.astype(int), "network": name, "family": family,
                         PROBA_COLUMNS[0]: ensemble[:, 0], PROBA_COLUMNS[1]: ensemble[:, 1],
                         "fold_sd": sd, "n_folds": len(folds_used)})
    m, cal = score(coh.labels, ensemble, coh.groups, n_boot=n_boot, seed=seed, n_bins=n_bins)
    row = {"network": name, "family": family, "n_cells": m.pop("n_cells"), "n_fields": m.pop("n_fields"),
           "n_folds": len(folds_used), "folds": ",".join(map(str, folds_used)), **m}
    return pred, row, cal.assign(network=name)


_METRIC_COLUMNS = ["network", "family", "n_cells", "n_fields", "n_folds", "folds", "auc", "auc_ci_low",
                   "auc_ci_high", "balanced_accuracy", "accuracy", "brier", "ece", "n_boot"]
_CAL_COLUMNS = ["network", "bin", "lower", "upper", "mean_predicted", "fraction_positive", "count"]
_NOTE_COLUMNS = ["network", "fold", "status", "detail"]


def _select(networks: Sequence[str] | None, all_networks: Sequence[str]) -> tuple[list[str], list[str]]:
    if networks is None:
        return list(all_networks), list(BASELINES)
    if isinstance(networks, str):
        networks = [networks]
    known = list(all_networks) + list(BASELINES)
    bad = [n for n in networks if n not in known]
    if bad:
        raise ValueError(f"networks: unknown name(s) {bad}; expected names from {known}")
    return [n for n in all_networks if n in networks], [n for n in BASELINES if n in networks]


def evaluate(run_dir: str | Path, cohort: str, scale_name: str, overrides: dict[str, Any] | None = None,
             data_root: str | Path | None = None, regime: str = "long", networks: Sequence[str] | None = None,
             echo: Callable[[str], None] = print, external: str | None = None, n_boot: int = N_BOOT,
             seed: int = 0, n_bins: int = N_BINS, batch_size: int = BATCH_SIZE) -> ExternalResult:
    """Score every finished model of the run ``run_dir`` (trained on ``cohort`` at scale
    ``scale_name`` with ``overrides``) on ``cohort``'s external test set.

    ``external`` (default ``external_cohort_for(cohort)``) is loaded from ``data_root`` and
    preprocessed like the run's cohort (``preprocess_batch`` at ``get_scale(scale_name,
    overrides)``). For each network of ``networks`` (default: every network of
    ``models.NETWORKS`` and the baselines ``rf``, ``logreg``) with finished folds (``done.json`` and
    ``model_<regime>.keras`` in ``<run>/training/<network>/fold<k>``): each fold's model predicts
    the cells whitened with that fold's ``zca.json``; the ensemble is the mean of the fold
    probabilities. Baselines (``cellstudy.learning.baseline``, ``<run>/training/<rf|logreg>``): features
    of the robust-scaled cells at their stored size (``baseline.cell_features(coh.images)``, once),
    each fitted fold's ``baseline.load_fold_model`` predicts them (else ``baseline.predict_proba``,
    the ensemble only); no baseline module or folder: a note. Metrics per model: see :class:`ExternalResult`
    (AUC CI: field-cluster bootstrap, ``n_boot`` resamples, ``seed``).

    Raises:
        ValueError: no external set for ``cohort``; the external set shares a field or a cell
            with the run's cohort (its manifest, the run's folds file or a fold's test cells); a
            model whose input size differs from the scale's; an unknown network name.
    """
    from cellstudy import data
    from cellstudy.data import preprocess

    run_dir = Path(run_dir)
    ext = external or external_cohort_for(cohort)
    if ext is None:
        raise ValueError(f"cohort {cohort!r} has no external test set; expected one of "
                         f"{sorted(EXTERNAL_COHORTS)} or an explicit external=")
    if regime not in ("short", "long"):
        raise ValueError(f"regime: expected 'short' or 'long', got {regime!r}")
    if not (run_dir / "training").is_dir():
        raise FileNotFoundError(f"run folder {run_dir} has no training/ folder; expected a trained run")
    ext_manifest = data.load_manifest(ext)
    for what, table in _run_tables(run_dir, cohort):
        check_disjoint(table, ext_manifest, cohort=what, external=f"external cohort {ext!r}")
    nets, bases = _select(networks, list(catalogue.NETWORK_NAMES))

    sc = config.get_scale(scale_name, overrides)
    t0 = time.perf_counter()
    coh = data.load_cohort(ext, root=data_root)
    images = preprocess.preprocess_batch(coh.images, list(coh.sha256), sc["image_size"], sc["preprocess"],
                                         progress=False)
    echo(f"external: {ext}: {len(coh)} cells ({int((coh.labels == 0).sum())} normal, "
         f"{int((coh.labels == 1).sum())} abnormal) in {len(set(coh.groups))} fields, preprocessed to "
         f"{sc['image_size']} px in {time.perf_counter() - t0:.1f} s")

    notes: list[dict] = []
    preds, rows, cals = [], [], []
    run = rundir.Run(run_dir)
    for name in nets:
        d = run.training / name
        if not d.is_dir():
            notes.append({"network": name, "fold": None, "status": "not trained", "detail": f"no folder {d}"})
            continue
        usable, why = run.usable_folds(name, regime, need_test_cells=False)
        notes += [r for r in why if r["fold"] is not None]
        folds = [(fd.fold, fd.path) for fd in usable]
        if not folds:
            notes.append({"network": name, "fold": None, "status": "not scored",
                          "detail": f"no finished fold with model_{regime}.keras in {d}"})
            continue
        used, probas = _network_probas(name, folds, regime, images, int(batch_size), notes, echo)
        if not used:
            continue
        p, r, c = _model_rows(coh, name, catalogue.family(name, ""), used, probas, None, n_boot, seed, n_bins)
        preds.append(p), rows.append(r), cals.append(c)
    if bases:
        mod = _baseline_module(notes)
        cache: dict = {}
        for name in bases if mod is not None else []:
            used, probas, ens = _baseline_probas(mod, run_dir, name, coh.images, cache, notes)
            if not probas and ens is None:
                continue
            p, r, c = _model_rows(coh, name, catalogue.family(name, BASELINE_FAMILY), used, probas, ens,
                                  n_boot, seed, n_bins)
            preds.append(p), rows.append(r), cals.append(c)
            echo(f"external: baseline {name}: AUC {r['auc']:.3f}")
    pred = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(
        columns=["cell_id", "group", "y_true", "network", "family", "proba_normal", "proba_abnormal",
                 "fold_sd", "n_folds"])
    met = pd.DataFrame(rows, columns=_METRIC_COLUMNS)
    cal = pd.concat(cals, ignore_index=True)[_CAL_COLUMNS] if cals else pd.DataFrame(columns=_CAL_COLUMNS)
    nts = pd.DataFrame(notes, columns=_NOTE_COLUMNS)
    for r in rows:
        echo(f"external: {r['network']}: AUC {r['auc']:.3f} [{r['auc_ci_low']:.3f}, {r['auc_ci_high']:.3f}] "
             f"over {r['n_fields']} fields, {r['n_folds']} fold model(s)")
    info = {"cohort": cohort, "external": ext, "scale": scale_name, "image_size": int(sc["image_size"]),
            "regime": regime, "n_boot": int(n_boot), "seed": int(seed), "n_bins": int(n_bins),
            "n_cells": int(len(coh)), "n_fields": int(len(set(coh.groups))),
            "class_counts": {config.CLASS_NAMES[i]: int((coh.labels == i).sum()) for i in (0, 1)}}
    return ExternalResult(predictions=pred, metrics=met, calibration=cal, notes=nts, cohort=cohort,
                          external=ext, regime=regime, info=info)


def write(result: ExternalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``external_predictions.csv`` / ``.parquet``, ``external_metrics.csv``,
    ``external_calibration.csv`` and ``external_notes.csv`` under ``out_dir`` (created).
    Returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"predictions": out / "external_predictions.csv",
             "predictions_parquet": out / "external_predictions.parquet",
             "metrics": out / "external_metrics.csv", "calibration": out / "external_calibration.csv",
             "notes": out / "external_notes.csv"}
    result.predictions.to_csv(paths["predictions"], index=False)
    result.predictions.to_parquet(paths["predictions_parquet"], index=False)
    result.metrics.to_csv(paths["metrics"], index=False)
    result.calibration.to_csv(paths["calibration"], index=False)
    result.notes.to_csv(paths["notes"], index=False)
    return paths


def book_table(metrics: pd.DataFrame, display: Callable[[str], str] = str, digits: int = 3) -> pd.DataFrame:
    """The results chapter's table of :func:`evaluate`'s ``metrics`` (one row per model), narrow
    enough for a book page: index = the model's display name, ``family``, ``AUC (95% CI)`` as one
    text column (field bootstrap), ``balanced accuracy``, ``accuracy``, ``Brier``, ``ECE``, rounded
    to ``digits``. The cells, fields and folds each model was scored with get a column
    (``cells / fields / folds``) only when they differ between models (a fold that could not be
    scored); otherwise the chapter's text states them once."""
    from cellstudy.report.tables import ci_text, num_text

    m = metrics.reset_index(drop=True)
    out = pd.DataFrame({
        "family": m["family"].to_numpy(),
        "AUC (95% CI)": [ci_text(a, lo, hi, digits) for a, lo, hi in zip(m["auc"], m["auc_ci_low"], m["auc_ci_high"])],
        **{head: [num_text(v, f".{digits}f") for v in m[col].astype(float)]
           for head, col in (("balanced accuracy", "balanced_accuracy"), ("accuracy", "accuracy"),
                             ("Brier", "brier"), ("ECE", "ece"))}},
        index=pd.Index([display(n) for n in m["network"]], name="model"))
    sizes = m[["n_cells", "n_fields", "n_folds"]]
    if len(sizes.drop_duplicates()) > 1:
        out.insert(1, "cells / fields / folds",
                   [f"{c} / {g} / {k}" for c, g, k in sizes.itertuples(index=False)])
    return out
