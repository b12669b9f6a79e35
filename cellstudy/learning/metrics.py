"""Per-fold evaluation metrics, per-cell prediction tables, tidy results and summary tables.

Spec: ``study.md`` section 7 (paper section 5, Tables 1-2). Everything here is pure NumPy /
pandas / scikit-learn; no TensorFlow.

Conventions
-----------
* ``y_true``: ``(n,)`` integer labels, 0 = normal role, 1 = abnormal role (``config.CLASS_NAMES``).
* ``proba``: ``(n, 2)`` float predicted probabilities (softmax output), column ``c`` = class ``c``;
  every row in [0, 1] and summing to 1 (tolerance ``PROBA_SUM_ATOL``).
* Predictions are ``argmax(proba, axis=1)`` (a tie 0.5 / 0.5 goes to class 0).
* Positive class for the confusion-matrix entries ``tn, fp, fn, tp``: class 1 (abnormal).

A test fold whose truth holds only one class has no ROC curve: the AUCs are returned as NaN and the
``warning`` field says why (we do not raise, so the other folds and networks of a study still
report; the summary tables then average over the folds that have a value and report ``n``).
Recall / precision / F1 of an absent class follow scikit-learn's ``zero_division=0``.

The authors' published code computes its metrics with truth and prediction swapped on hard labels
(``study.md`` section 10); :func:`paper_code_metrics` reproduces that so the book can show the
difference. It is never used for our results.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from cellstudy import networks
from cellstudy.config import CLASS_NAMES

__all__ = [
    "METRIC_NAMES",
    "TABLE_METRICS",
    "NETWORK_FAMILY",
    "NETWORK_ORDER",
    "PROBA_COLUMNS",
    "PROBA_SUM_ATOL",
    "fold_metrics",
    "paper_code_metrics",
    "predictions_frame",
    "tidy_metrics",
    "summary_numeric",
    "summary_table",
    "write_tables",
]

#: Allowed deviation of a probability row's sum from 1 (float32 softmax is good to ~1e-6).
PROBA_SUM_ATOL = 1e-3

#: Numeric fields returned by :func:`fold_metrics`, in table order.
TABLE_METRICS: tuple[str, ...] = (
    "recall_macro", "precision_macro", "auc_macro", "auc_micro", "auc_weighted",
    "f1_samples", "f1_macro", "f1_micro", "f1_weighted",
)
"""The metric columns of the paper's Tables 1 and 2 (in their order)."""

#: Numeric fields returned by :func:`fold_metrics`, in table order.
METRIC_NAMES: tuple[str, ...] = TABLE_METRICS + ("accuracy", "balanced_accuracy", "tn", "fp", "fn", "tp", "n")

#: Model -> family, the paper's display names and the tables' row order: the catalogue's
#: (:mod:`cellstudy.networks`, networks then the classical baseline), named here for the tables.
NETWORK_FAMILY: dict[str, str] = networks.FAMILY
DISPLAY_NAMES: dict[str, str] = networks.DISPLAY
#: Row order of the summary tables (unknown networks follow, alphabetically).
NETWORK_ORDER: tuple[str, ...] = networks.ORDER

#: Probability columns of :func:`predictions_frame`, one per class in ``CLASS_NAMES`` order.
PROBA_COLUMNS: tuple[str, ...] = tuple(f"proba_{c}" for c in CLASS_NAMES)

_N_CLASSES = len(CLASS_NAMES)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _check_labels(y: Any, name: str) -> np.ndarray:
    """Return ``y`` as a 1-D int64 array of labels in ``{0, ..., n_classes-1}``."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; expected at least one label")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or infinite values; expected integer labels")
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} contains non-integer values; expected labels 0..{_N_CLASSES - 1}")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name} has dtype {arr.dtype}; expected integer labels 0..{_N_CLASSES - 1}")
    arr = arr.astype(np.int64)
    bad = np.setdiff1d(np.unique(arr), np.arange(_N_CLASSES))
    if bad.size:
        raise ValueError(
            f"{name} contains label(s) {bad.tolist()}; expected labels in 0..{_N_CLASSES - 1} "
            f"({', '.join(CLASS_NAMES)})"
        )
    return arr


def _check_proba(proba: Any, n: int, name: str = "proba") -> np.ndarray:
    """Return ``proba`` as an ``(n, n_classes)`` float64 array of valid probability rows."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != _N_CLASSES:
        raise ValueError(f"{name} must have shape (n, {_N_CLASSES}), got {p.shape}")
    if p.shape[0] != n:
        raise ValueError(f"{name} has {p.shape[0]} rows but y_true has {n} labels; expected equal lengths")
    if not np.all(np.isfinite(p)):
        rows = np.flatnonzero(~np.all(np.isfinite(p), axis=1))
        raise ValueError(f"{name} contains NaN or infinite values (rows {rows[:10].tolist()})")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"{name} values must lie in [0, 1]; found min {p.min():.6g}, max {p.max():.6g} "
            "(pass softmax probabilities, not logits)"
        )
    dev = np.abs(p.sum(axis=1) - 1.0)
    if dev.max() > PROBA_SUM_ATOL:
        i = int(dev.argmax())
        raise ValueError(
            f"{name} rows must sum to 1 (within {PROBA_SUM_ATOL}); row {i} sums to {p[i].sum():.6g}"
        )
    return p


def _one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(_N_CLASSES, dtype=np.int64)[y]


# ---------------------------------------------------------------------------------------------
# per-fold metrics
# ---------------------------------------------------------------------------------------------
def fold_metrics(y_true: Any, proba: Any) -> dict[str, Any]:
    """Metrics of one test fold from predicted probabilities (``study.md`` section 7).

    Parameters
    ----------
    y_true : (n,) int
        True labels, 0 = normal, 1 = abnormal.
    proba : (n, 2) float
        Predicted class probabilities (rows in [0, 1], summing to 1).

    Returns
    -------
    dict
        ``recall_macro``, ``precision_macro`` (argmax predictions, macro average over the two
        classes); ``auc_macro``, ``auc_micro``, ``auc_weighted`` (ROC AUC of the one-hot truth
        ``(n, 2)`` against ``proba``; micro flattens the ``2n`` (truth, score) pairs);
        ``f1_samples`` (one-hot truth vs one-hot argmax prediction; for single-label data it
        equals accuracy), ``f1_macro``, ``f1_micro`` (= accuracy for single-label data),
        ``f1_weighted``; ``accuracy``, ``balanced_accuracy``; confusion-matrix counts ``tn``,
        ``fp``, ``fn``, ``tp`` (positive = class 1) and ``n``; ``warning`` (``""`` or why a value
        is NaN). All rates are fractions in [0, 1].

    Raises
    ------
    ValueError
        Mismatched lengths, labels outside {0, 1}, probabilities that are NaN, outside [0, 1] or
        whose rows do not sum to 1.

    Notes
    -----
    A fold whose truth has one class only: the AUCs are NaN and ``warning`` says so (not raised).
    """
    y = _check_labels(y_true, "y_true")
    p = _check_proba(proba, y.size)
    pred = p.argmax(axis=1)
    labels = list(range(_N_CLASSES))
    y1, pred1 = _one_hot(y), _one_hot(pred)
    warnings: list[str] = []

    present = np.unique(y)
    if present.size < _N_CLASSES:
        missing = [CLASS_NAMES[c] for c in labels if c not in present]
        warnings.append(
            f"truth has no {', '.join(missing)} cells: ROC AUC undefined (NaN); "
            "recall/precision/F1 of the absent class count as 0"
        )
        auc_macro = auc_micro = auc_weighted = math.nan
    else:
        auc_macro = float(skm.roc_auc_score(y1, p, average="macro"))
        auc_micro = float(skm.roc_auc_score(y1, p, average="micro"))
        auc_weighted = float(skm.roc_auc_score(y1, p, average="weighted"))

    cm = skm.confusion_matrix(y, pred, labels=labels)
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    zd = dict(zero_division=0)
    out: dict[str, Any] = {
        "recall_macro": float(skm.recall_score(y, pred, labels=labels, average="macro", **zd)),
        "precision_macro": float(skm.precision_score(y, pred, labels=labels, average="macro", **zd)),
        "auc_macro": auc_macro,
        "auc_micro": auc_micro,
        "auc_weighted": auc_weighted,
        "f1_samples": float(skm.f1_score(y1, pred1, average="samples", **zd)),
        "f1_macro": float(skm.f1_score(y, pred, labels=labels, average="macro", **zd)),
        "f1_micro": float(skm.f1_score(y, pred, labels=labels, average="micro", **zd)),
        "f1_weighted": float(skm.f1_score(y, pred, labels=labels, average="weighted", **zd)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        # balanced accuracy = mean per-class recall over the classes present in the truth
        "balanced_accuracy": float(np.mean([np.mean(pred[y == c] == c) for c in present])),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "n": int(y.size),
        "warning": "; ".join(warnings),
    }
    return out


def paper_code_metrics(y_true: Any, y_pred: Any, average: str = "micro") -> dict[str, float]:
    """The authors' metric computation, reproduced *with its bug* (``study.md`` section 10).

    Their code passes hard labels to scikit-learn with truth and prediction swapped
    (``metric(y_pred, y_true)``) on one-hot indicator matrices. The values they report as recall,
    precision, AUC micro, F1 samples and F1 micro then all equal the accuracy. This function exists
    so that the book can show the difference to :func:`fold_metrics`; never use it for results.

    Parameters
    ----------
    y_true, y_pred : (n,) int
        True and predicted (hard, argmax) labels in {0, 1}.
    average : {"micro", "macro"}
        Averaging for recall and precision. ``"micro"`` is the reconstruction in ``study.md``
        (everything equals accuracy); ``"macro"`` shows the swap on its own: swapped macro recall
        is our macro precision and vice versa.

    Returns
    -------
    dict with ``recall``, ``precision``, ``auc_micro``, ``f1_samples``, ``f1_micro``, ``accuracy``.
    """
    if average not in ("micro", "macro"):
        raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")
    t = _check_labels(y_true, "y_true")
    q = _check_labels(y_pred, "y_pred")
    if t.size != q.size:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {q.size}; expected equal lengths")
    t1, q1 = _one_hot(t), _one_hot(q)
    zd = dict(zero_division=0)
    # Deliberately swapped: prediction in the truth slot, truth in the prediction / score slot.
    try:
        auc_micro = float(skm.roc_auc_score(q1, t1, average="micro"))
    except ValueError:  # degenerate (all one value in the flattened "truth"): cannot happen for n >= 1
        auc_micro = math.nan
    return {
        "recall": float(skm.recall_score(q1, t1, average=average, **zd)),
        "precision": float(skm.precision_score(q1, t1, average=average, **zd)),
        "auc_micro": auc_micro,
        "f1_samples": float(skm.f1_score(q1, t1, average="samples", **zd)),
        "f1_micro": float(skm.f1_score(q1, t1, average="micro", **zd)),
        "accuracy": float(skm.accuracy_score(q, t)),
    }


# ---------------------------------------------------------------------------------------------
# per-cell predictions
# ---------------------------------------------------------------------------------------------
def predictions_frame(
    cell_ids: Sequence[Any],
    groups: Sequence[Any],
    fold: int,
    network: str,
    regime: str,
    y_true: Any,
    proba: Any,
) -> pd.DataFrame:
    """One row per test cell: ``cell_id, group, fold, network, regime, y_true, y_pred,
    proba_normal, proba_abnormal`` (``PROBA_COLUMNS``).

    ``cell_ids``, ``groups``, ``y_true``: length ``n``; ``proba``: ``(n, 2)``. ``y_pred`` is the
    argmax of ``proba``. Raises ``ValueError`` on mismatched lengths or invalid probabilities.
    """
    y = _check_labels(y_true, "y_true")
    p = _check_proba(proba, y.size)
    ids = np.asarray(cell_ids)
    grp = np.asarray(groups)
    for name, arr in (("cell_ids", ids), ("groups", grp)):
        if arr.ndim != 1 or arr.shape[0] != y.size:
            raise ValueError(f"{name} has shape {arr.shape}; expected ({y.size},) like y_true")
    if pd.Series(ids).duplicated().any():
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].tolist()[:5]
        raise ValueError(f"cell_ids contains duplicates {dup}; expected one row per cell")
    if not isinstance(network, str) or not network:
        raise ValueError(f"network must be a non-empty string, got {network!r}")
    if not isinstance(regime, str) or not regime:
        raise ValueError(f"regime must be a non-empty string, got {regime!r}")
    df = pd.DataFrame(
        {
            "cell_id": ids,
            "group": grp,
            "fold": np.full(y.size, int(fold), dtype=np.int64),
            "network": network,
            "regime": regime,
            "y_true": y,
            "y_pred": p.argmax(axis=1).astype(np.int64),
        }
    )
    for c, col in enumerate(PROBA_COLUMNS):
        df[col] = p[:, c]
    return df


# ---------------------------------------------------------------------------------------------
# tidy tables and summaries
# ---------------------------------------------------------------------------------------------
_ID_COLUMNS = ("network", "family", "fold", "regime")


def tidy_metrics(
    records: Iterable[Mapping[str, Any]], families: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Long results table: one row per network x fold x regime x metric.

    Parameters
    ----------
    records : iterable of mappings
        Each has ``network``, ``fold``, ``regime`` and either the metric values at top level
        (e.g. ``{**fold_metrics(y, p), "network": ..., "fold": ..., "regime": ...}``) or under a
        ``"metrics"`` key. An optional ``family`` overrides the lookup.
    families : mapping, optional
        Network -> family; default ``NETWORK_FAMILY``. Unknown networks get family ``"other"``.

    Returns
    -------
    DataFrame with columns ``network, family, fold, regime, metric, value`` (value float64; NaN kept,
    e.g. the AUCs of a one-class fold). Non-numeric fields (``warning``) are dropped.
    """
    fam = dict(NETWORK_FAMILY if families is None else families)
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"records[{i}] is a {type(rec).__name__}; expected a mapping")
        missing = [k for k in ("network", "fold", "regime") if k not in rec]
        if missing:
            raise ValueError(f"records[{i}] lacks key(s) {missing}; expected network, fold, regime")
        values = rec["metrics"] if "metrics" in rec else rec
        network = str(rec["network"])
        family = str(rec.get("family") or fam.get(network, "other"))
        for k, v in values.items():
            if k in _ID_COLUMNS or k in ("metrics", "warning"):
                continue
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                continue
            rows.append(
                {"network": network, "family": family, "fold": int(rec["fold"]),
                 "regime": str(rec["regime"]), "metric": str(k), "value": float(v)}
            )
    df = pd.DataFrame(rows, columns=["network", "family", "fold", "regime", "metric", "value"])
    dup = df.duplicated(["network", "fold", "regime", "metric"])
    if dup.any():
        r = df[dup].iloc[0]
        raise ValueError(
            f"duplicate result for network {r.network!r}, fold {r.fold}, regime {r.regime!r}, "
            f"metric {r.metric!r}; expected one value each"
        )
    df["fold"] = df["fold"].astype(np.int64)
    df["value"] = df["value"].astype(np.float64)
    return df


def _check_tidy(tidy: pd.DataFrame, need: Sequence[str] = ("network", "fold", "regime", "metric", "value")) -> None:
    if not isinstance(tidy, pd.DataFrame):
        raise ValueError(f"tidy must be a pandas DataFrame, got {type(tidy).__name__}")
    missing = [c for c in need if c not in tidy.columns]
    if missing:
        raise ValueError(f"tidy table lacks column(s) {missing}; expected {list(need)}")


def _network_sort_key(names: Iterable[str]) -> list[str]:
    order = {n: i for i, n in enumerate(NETWORK_ORDER)}
    return sorted(set(names), key=lambda n: (order.get(n, len(order)), n))


#: Fold means are rounded to this many decimals where they are computed: two means of the same
#: values summed in another order (pandas' groupby, NumPy, a loop) differ in the 16th digit, and
#: a mean that ends in 5 at the fourth decimal (five folds of 44 cells: 0.8525) would otherwise
#: round to 0.852 on one page and 0.853 on another, and decide which of two tied networks is "best".
MEAN_DECIMALS = 12


def stable_mean(values) -> float:
    """The mean of ``values`` (NaN skipped) rounded to ``MEAN_DECIMALS`` decimals: the same float
    whatever the order of summation (unless the exact mean sits on a 12th-decimal rounding
    boundary, which five-fold means of fractions do not). NaN for no finite value."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return round(float(v.mean()), MEAN_DECIMALS) if v.size else math.nan


def rank_models(frame: pd.DataFrame, mean: str = "mean", sd: str = "sd",
                network: str = "network") -> pd.DataFrame:
    """The rows of ``frame`` (one per model, with its fold ``mean`` and ``sd``) best first: the
    higher mean (rounded to ``MEAN_DECIMALS``: a round-off difference is a tie), then the lower SD
    (the steadier over the folds), then the catalogue's order. One rule for every "best network"
    of the book (results chapter, findings, prediction) so they name the same one."""
    if frame.empty:
        return frame.copy()
    order = {n: i for i, n in enumerate(NETWORK_ORDER)}
    key = pd.DataFrame({
        "m": -pd.to_numeric(frame[mean], errors="coerce").round(MEAN_DECIMALS).fillna(-np.inf),
        "s": pd.to_numeric(frame[sd], errors="coerce").fillna(np.inf) if sd in frame.columns else 0.0,
        "o": frame[network].map(lambda n: order.get(n, len(order))),
        "n": frame[network].astype(str)}, index=frame.index)
    idx = key.sort_values(["m", "s", "o", "n"], kind="mergesort").index
    return frame.loc[idx]


def tied_with_best(ranked: pd.DataFrame, digits: int = 3, mean: str = "mean",
                   network: str = "network") -> list[str]:
    """The models of ``rank_models``' output after the first whose mean shows the same at
    ``digits`` decimals as the best's (the book's rounding): a tie a reader should be told of."""
    if len(ranked) < 2:
        return []
    m = pd.to_numeric(ranked[mean], errors="coerce").round(MEAN_DECIMALS)
    if not np.isfinite(m.iloc[0]):
        return []
    best = f"{m.iloc[0]:.{digits}f}"
    return [str(n) for n, v in zip(ranked[network].iloc[1:], m.iloc[1:])
            if np.isfinite(v) and f"{v:.{digits}f}" == best]


def summary_numeric(tidy: pd.DataFrame, metrics: Sequence[str] = TABLE_METRICS) -> pd.DataFrame:
    """Mean and SD over folds per network, regime and metric.

    Returns columns ``regime, network, family, metric, mean, sd, n``. ``sd`` is the sample SD
    (ddof = 1) over the folds that have a value (NaN values, e.g. a one-class fold's AUC, are
    skipped and ``n`` counts the rest; ``sd`` is NaN when ``n < 2``).
    """
    _check_tidy(tidy)
    unknown = sorted(set(metrics) - set(tidy["metric"]))
    if unknown:
        raise ValueError(f"metric(s) {unknown} not in the tidy table; it has {sorted(tidy['metric'].unique())}")
    sub = tidy[tidy["metric"].isin(list(metrics))]
    keys = ["regime", "network"] + (["family"] if "family" in sub.columns else []) + ["metric"]
    g = sub.groupby(keys, sort=False, dropna=False)["value"]
    out = g.agg(mean="mean", sd=lambda v: v.std(ddof=1), n="count").reset_index()
    if "family" not in out.columns:
        out.insert(2, "family", out["network"].map(NETWORK_FAMILY).fillna("other"))
    out["n"] = out["n"].astype(np.int64)
    out["mean"] = out["mean"].round(MEAN_DECIMALS)   # the same float on every page (MEAN_DECIMALS)
    return out.reset_index(drop=True)


def mean_sd_text(mean: float, sd: float, digits: int = 3) -> str:
    """``"0.893 ± 0.046"`` (the paper's Tables 1-2); the mean alone without an SD, "n/a" without a mean."""
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} \u00b1 {sd:.{digits}f}"


def summary_table(
    tidy: pd.DataFrame,
    metrics: Sequence[str] = TABLE_METRICS,
    regime: str | None = None,
    digits: int = 3,
) -> pd.DataFrame:
    """The paper's Tables 1 and 2: rows = networks, columns = metrics, cells ``"0.912 ± 0.031"``
    (mean ± sample SD over folds, see :func:`summary_numeric`).

    With ``regime`` given, the index is the network (one table per regime, as in the paper: Table 1
    short, Table 2 long); otherwise a ``(regime, network)`` MultiIndex holds every regime.
    """
    num = summary_numeric(tidy, metrics)
    if regime is not None:
        if regime not in set(num["regime"]):
            raise ValueError(f"regime {regime!r} not in the tidy table; it has {sorted(num['regime'].unique())}")
        num = num[num["regime"] == regime]
    num = num.assign(cell=[mean_sd_text(m, s, digits) for m, s in zip(num["mean"], num["sd"])])
    wide = num.pivot(index=["regime", "network"], columns="metric", values="cell")
    wide = wide.reindex(columns=list(metrics))
    nets = _network_sort_key(num["network"])
    regimes = list(dict.fromkeys(num["regime"]))
    idx = pd.MultiIndex.from_tuples(
        [(r, n) for r in regimes for n in nets if (r, n) in wide.index], names=["regime", "network"]
    )
    wide = wide.reindex(idx)
    wide.columns.name = None
    if regime is not None:
        wide = wide.droplevel("regime")
    return wide


def write_tables(
    tidy: pd.DataFrame, out_dir: str | os.PathLike, metrics: Sequence[str] = TABLE_METRICS
) -> dict[str, Path]:
    """Write the results tables under ``out_dir`` (created if needed) as CSV and Parquet (pyarrow).

    Files: ``metrics_tidy.{csv,parquet}``, ``summary_numeric.{csv,parquet}`` and, per regime,
    ``summary_<regime>.csv`` (the text table of :func:`summary_table`). Returns name -> path.
    Raises ``OSError`` naming the folder when it cannot be written.
    """
    _check_tidy(tidy)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the results folder {out}: {e}") from e
    if not os.access(out, os.W_OK):
        raise PermissionError(f"the results folder {out} is not writable")
    present = [m for m in metrics if m in set(tidy["metric"])]
    num = summary_numeric(tidy, present) if present else pd.DataFrame()
    paths: dict[str, Path] = {}
    try:
        for stem, df in (("metrics_tidy", tidy), ("summary_numeric", num)):
            paths[f"{stem}.csv"] = out / f"{stem}.csv"
            df.to_csv(paths[f"{stem}.csv"], index=False)
            paths[f"{stem}.parquet"] = out / f"{stem}.parquet"
            df.to_parquet(paths[f"{stem}.parquet"], engine="pyarrow", index=False)
        if present:
            for regime in dict.fromkeys(tidy["regime"]):
                name = f"summary_{regime}.csv"
                paths[name] = out / name
                summary_table(tidy, present, regime=regime).to_csv(paths[name])
    except OSError as e:
        raise OSError(f"cannot write results tables to {out}: {e}") from e
    return paths
