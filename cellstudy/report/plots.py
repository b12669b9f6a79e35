"""Figures of the results: ROC curves (paper Figs 5-6), metric box plots (Figs 7-8), training curves.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global figure
registry, no ``plt.show``), so it works under any backend, in notebooks and in tests; save it with
``fig.savefig(path)``. No TensorFlow.

Inputs are the tables of :mod:`cellstudy.learning.metrics`: per-cell predictions
(:func:`~cellstudy.learning.metrics.predictions_frame`), the tidy per-fold metrics
(:func:`~cellstudy.learning.metrics.tidy_metrics`), and a per-epoch training history (columns ``epoch``,
``loss``, ``accuracy``, optionally ``val_*``, ``network``, ``fold``, ``regime``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from cellstudy import networks
from cellstudy.config import CLASS_NAMES
from cellstudy.learning.metrics import DISPLAY_NAMES, NETWORK_ORDER, PROBA_COLUMNS
from cellstudy.report.external import expected_calibration_error

__all__ = ["roc_summary", "roc_curves", "metric_boxplots", "training_curves", "step_times"]

_FAMILY_ORDER = networks.FAMILY_ORDER


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")


_ordered = networks.ordered


def _grid(n: int, ncols: int, width: float, height: float) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def _select_regime(df: pd.DataFrame, regime: str | None, what: str) -> pd.DataFrame:
    regimes = list(dict.fromkeys(df["regime"]))
    if regime is None:
        if len(regimes) > 1:
            raise ValueError(f"{what} holds regimes {regimes}; pass regime= to choose one")
        return df
    if regime not in regimes:
        raise ValueError(f"regime {regime!r} not in {what}; it has {regimes}")
    return df[df["regime"] == regime]


# ---------------------------------------------------------------------------------------------
# ROC curves (Figs 5-6)
# ---------------------------------------------------------------------------------------------
def roc_summary(
    predictions: pd.DataFrame, regime: str | None = None, grid_points: int = 101
) -> pd.DataFrame:
    """Fold-averaged ROC curves per network and class ("vertical averaging").

    For each network, class ``c`` and test fold, the one-vs-rest ROC of truth ``y_true == c``
    against score ``proba_<class c>`` is interpolated at ``grid_points`` false-positive rates in
    [0, 1]; the mean and SD of the true-positive rate over folds are reported. Folds whose truth
    holds one class only are skipped (``n_folds`` counts the rest). Folds are averaged, not pooled.

    Returns columns ``network, class, fpr, tpr_mean, tpr_sd, n_folds, auc_mean, auc_sd`` (AUC per
    fold by the trapezoid rule on the exact curve, then mean and sample SD over folds).
    """
    _need(predictions, ["network", "fold", "regime", "y_true", *PROBA_COLUMNS], "predictions")
    df = _select_regime(predictions, regime, "predictions")
    if df.empty:
        raise ValueError("predictions is empty; expected one row per test cell")
    grid = np.linspace(0.0, 1.0, grid_points)
    out = []
    for net in _ordered(df["network"], NETWORK_ORDER):
        dn = df[df["network"] == net]
        for c, (cname, col) in enumerate(zip(CLASS_NAMES, PROBA_COLUMNS)):
            tprs, aucs = [], []
            for _, dfold in dn.groupby("fold", sort=True):
                truth = (dfold["y_true"].to_numpy() == c).astype(int)
                if truth.min() == truth.max():
                    continue
                fpr, tpr, _ = roc_curve(truth, dfold[col].to_numpy())
                aucs.append(float(np.trapezoid(tpr, fpr)))
                t = np.interp(grid, fpr, tpr)
                t[0] = 0.0
                tprs.append(t)
            k = len(tprs)
            tp = np.array(tprs) if k else np.full((1, grid_points), np.nan)
            out.append(pd.DataFrame({
                "network": net, "class": cname, "fpr": grid,
                "tpr_mean": tp.mean(axis=0),
                "tpr_sd": tp.std(axis=0, ddof=1) if k > 1 else np.zeros(grid_points),
                "n_folds": k,
                "auc_mean": float(np.mean(aucs)) if k else np.nan,
                "auc_sd": float(np.std(aucs, ddof=1)) if k > 1 else np.nan,
            }))
    return pd.concat(out, ignore_index=True)


def roc_curves(
    predictions: pd.DataFrame,
    regime: str | None = None,
    networks: Sequence[str] | None = None,
    ncols: int = 4,
    grid_points: int = 101,
    title: str | None = None,
) -> Figure:
    """ROC curves per class per network, as the paper's Figs 5-6: one panel per network, one
    curve per class (fold-averaged TPR, :func:`roc_summary`) with a band of ± 1 SD over folds,
    the chance diagonal, and the legend giving AUC mean ± SD over folds.

    Each panel has ``len(CLASS_NAMES) + 1`` lines (classes + diagonal).
    """
    summ = roc_summary(predictions, regime, grid_points)
    nets = list(dict.fromkeys(summ["network"]))
    if networks is not None:
        unknown = sorted(set(networks) - set(nets))
        if unknown:
            raise ValueError(f"network(s) {unknown} not in predictions; it has {nets}")
        nets = list(networks)
    fig, axes = _grid(len(nets), ncols, 3.2, 3.0)
    colours = sns.color_palette("colorblind", len(CLASS_NAMES))
    for ax, net in zip(axes, nets):
        for cname, colour in zip(CLASS_NAMES, colours):
            s = summ[(summ["network"] == net) & (summ["class"] == cname)]
            label = f"{cname}: AUC {s['auc_mean'].iloc[0]:.3f} \u00b1 {s['auc_sd'].iloc[0]:.3f}"
            ax.plot(s["fpr"], s["tpr_mean"], color=colour, lw=1.8, label=label)
            ax.fill_between(s["fpr"], np.clip(s["tpr_mean"] - s["tpr_sd"], 0, 1),
                            np.clip(s["tpr_mean"] + s["tpr_sd"], 0, 1), color=colour, alpha=0.2, lw=0)
        ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false-positive rate", ylabel="true-positive rate",
               title=f"{DISPLAY_NAMES.get(net, net)} ({int(summ.loc[summ['network'] == net, 'n_folds'].max())} folds)")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize="x-small")
    reg = regime if regime is not None else predictions["regime"].iloc[0]
    fig.suptitle(title or f"ROC curves per class, mean \u00b1 SD over folds ({reg} regime)")
    return fig


# ---------------------------------------------------------------------------------------------
# metric box plots (Figs 7-8)
# ---------------------------------------------------------------------------------------------
def metric_boxplots(
    tidy: pd.DataFrame,
    metrics: Sequence[str] = ("recall_macro", "f1_macro", "precision_macro", "auc_macro"),
    families: Sequence[str] | None = None,
    regimes: Sequence[str] | None = None,
    ncols: int = 4,
) -> Figure:
    """Box plots of each metric per family and regime (paper Figs 7-8): one panel per metric,
    x = family, boxes coloured by regime, each point one network x fold value."""
    _need(tidy, ["family", "regime", "metric", "value"], "tidy")
    metrics = list(metrics)
    missing = sorted(set(metrics) - set(tidy["metric"]))
    if missing:
        raise ValueError(f"metric(s) {missing} not in tidy; it has {sorted(set(tidy['metric']))}")
    fams = list(families) if families is not None else _ordered(tidy["family"], _FAMILY_ORDER)
    regs = list(regimes) if regimes is not None else list(dict.fromkeys(tidy["regime"]))
    for name, wanted, have in (("family", fams, tidy["family"]), ("regime", regs, tidy["regime"])):
        unknown = sorted(set(wanted) - set(have))
        if unknown:
            raise ValueError(f"{name}(s) {unknown} not in tidy; it has {sorted(set(have))}")
    fig, axes = _grid(len(metrics), ncols, 3.4, 3.2)
    colours = sns.color_palette("colorblind", len(regs))
    width = 0.8 / len(regs)
    rng = np.random.default_rng(0)  # jitter of the points only
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        sub = tidy[(tidy["metric"] == metric)].dropna(subset=["value"])
        for j, (reg, colour) in enumerate(zip(regs, colours)):
            pos = np.arange(len(fams)) + (j - (len(regs) - 1) / 2) * width
            data = [sub.loc[(sub["family"] == f) & (sub["regime"] == reg), "value"].to_numpy() for f in fams]
            keep = [k for k, d in enumerate(data) if d.size]
            bp = ax.boxplot([data[k] for k in keep], positions=pos[keep], widths=width * 0.85,
                            patch_artist=True, showfliers=False, manage_ticks=False,
                            medianprops={"color": "0.1"})
            for box in bp["boxes"]:
                box.set(facecolor=colour, alpha=0.75)
            bp["boxes"][0].set_label(reg) if bp["boxes"] else None
            for k in keep:
                x = pos[k] + rng.uniform(-width * 0.25, width * 0.25, data[k].size)
                ax.scatter(x, data[k], s=8, color="0.2", zorder=3)
        ax.set_xticks(np.arange(len(fams)), fams)
        ax.set(title=metric, xlabel="family", ylabel="value" if i == 0 else "")
        if i == 0:
            ax.legend(title="regime", fontsize="x-small")
    fig.suptitle("Per-fold metrics by family and regime (each point: one network on one fold)")
    return fig


# ---------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------
#: More networks than this in one training-curves figure: one panel per network and metric
#: (eleven networks' 55 lines in one panel cannot be told apart).
SMALL_MULTIPLES_ABOVE = 3

_CURVE_LABELS = {"loss": "training loss", "accuracy": "training accuracy"}


def _training_small_multiples(history: pd.DataFrame, metrics: Sequence[str], mark_epochs: Sequence[int],
                              title: str | None, ncols: int = 4) -> Figure:
    """:func:`training_curves` for many networks: for each metric, one panel per network (book
    order, four a row), one line per fold (the folds' colours the same in every panel), a shared
    y range per metric; ``val_<metric>`` dashed where present."""
    nets = [n for n in NETWORK_ORDER if n in set(history["network"])]
    nets += [n for n in dict.fromkeys(history["network"]) if n not in nets]
    folds = sorted(history["fold"].unique()) if "fold" in history.columns else [None]
    palette = sns.color_palette("tab10", max(len(folds), 1))
    nrows_per = math.ceil(len(nets) / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.0 * nrows_per * len(metrics) + 0.8), layout="constrained")
    grid = fig.subplots(nrows_per * len(metrics), ncols, squeeze=False)
    has_val = any(f"val_{m}" in history.columns for m in metrics)
    for mi, metric in enumerate(metrics):
        cols = [metric] + ([f"val_{metric}"] if f"val_{metric}" in history.columns else [])
        vals = history[cols].to_numpy(dtype=float)
        vals = vals[np.isfinite(vals)]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        pad = 0.05 * (hi - lo or 1.0)
        for j in range(nrows_per * ncols):
            ax = grid[mi * nrows_per + j // ncols, j % ncols]
            if j >= len(nets):
                ax.set_visible(False)
                continue
            net = nets[j]
            sub = history[history["network"] == net]
            for fi, fold in enumerate(folds):
                run = (sub[sub["fold"] == fold] if fold is not None else sub).sort_values("epoch")
                if run.empty:
                    continue
                lab = f"fold {fold}" if fold is not None else None
                ax.plot(run["epoch"], run[metric], color=palette[fi], lw=1.0, alpha=0.9, label=lab)
                if f"val_{metric}" in run.columns:
                    ax.plot(run["epoch"], run[f"val_{metric}"], color=palette[fi], lw=1.0, ls="--")
            for e in mark_epochs:
                ax.axvline(e, color="0.4", ls=":", lw=1)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_title(f"{DISPLAY_NAMES.get(net, net)}: {_CURVE_LABELS.get(metric, metric)}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if j % ncols == 0:
                ax.set_ylabel(_CURVE_LABELS.get(metric, metric), fontsize=7)
            if j >= len(nets) - ncols:
                ax.set_xlabel("epoch", fontsize=7)
    handles, labels = grid[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(title or ("Training curves, one panel per network, one line per fold (training "
                           "accuracy: Keras' running mean over the epoch's batches, dropout on)"
                           + ("; dashed: validation" if has_val else "")), fontsize=9)
    return fig


def training_curves(
    history: pd.DataFrame,
    metrics: Sequence[str] = ("loss", "accuracy"),
    mark_epochs: Sequence[int] = (),
    title: str | None = None,
) -> Figure:
    """Training curves from a per-epoch history: one panel per metric, one line per run
    (a run = each distinct ``network`` x ``fold`` present; a single run if neither column is
    there), plus a dashed line for ``val_<metric>`` where that column exists. When a network has
    several folds, its folds share one colour and the legend names the networks (up to 14).
    ``mark_epochs``: vertical dotted lines, e.g. the short regime's epoch.
    """
    _need(history, ["epoch", *metrics], "history")
    if history.empty:
        raise ValueError("history is empty; expected one row per epoch")
    keys = [c for c in ("network", "fold") if c in history.columns]
    if "network" in keys and history["network"].nunique() > SMALL_MULTIPLES_ABOVE:
        return _training_small_multiples(history, metrics, mark_epochs, title)
    runs = list(history.groupby(keys, sort=False)) if keys else [((), history)]
    # one colour per network (its folds share it, one legend entry each), else one per run
    by_net = "network" in keys and history["network"].nunique() < len(runs)
    names = list(dict.fromkeys(history["network"])) if by_net else None
    n_col = len(names) if by_net else len(runs)
    palette = sns.color_palette("husl" if n_col > 10 else "tab10", n_col)
    has_val = any(f"val_{m}" in history.columns for m in metrics)
    fig, axes = _grid(len(metrics), len(metrics), 4.0, 3.0)
    for ax, metric in zip(axes, metrics):
        labelled = set()
        for i, (key, run) in enumerate(runs):
            run = run.sort_values("epoch")
            key = key if isinstance(key, tuple) else (key,)
            if by_net:
                net = key[keys.index("network")]
                colour = palette[names.index(net)]
                name = DISPLAY_NAMES.get(net, net) if net not in labelled else None
                labelled.add(net)
            else:
                colour, name = palette[i], ", ".join(f"{k} {v}" for k, v in zip(keys, key)) or "train"
            ax.plot(run["epoch"], run[metric], color=colour, lw=1.0 if by_net else 1.2, alpha=0.8, label=name)
            if f"val_{metric}" in run.columns:
                ax.plot(run["epoch"], run[f"val_{metric}"], color=colour, lw=1.2, ls="--")
        for e in mark_epochs:
            ax.axvline(e, color="0.4", ls=":", lw=1)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        if n_col <= 14:
            ax.legend(fontsize="x-small", ncol=1 if n_col <= 7 else 2)
    fig.suptitle(title or ("Training curves" + (" (one colour per network, one line per fold)" if by_net else "")
                           + (" (dashed: validation)" if has_val else "")))
    return fig


# ---------------------------------------------------------------------------------------------
# input-pipeline step times
# ---------------------------------------------------------------------------------------------
def step_times(overhead: dict, title: str | None = None) -> Figure:
    """Per-step training times of the ``tf.data`` pipeline against in-memory batches, from
    :func:`cellstudy.learning.train.pipeline_overhead` (keys ``pipeline_times``, ``memory_times``: seconds
    per step). Left: every timed step in order; right: their distributions with the medians
    marked and the ratio pipeline / in-memory in the title. Times are shown in ms.
    """
    for k in ("pipeline_times", "memory_times"):
        if k not in overhead or len(overhead[k]) == 0:
            raise ValueError(f"step_times needs a non-empty {k!r} list of step seconds "
                             f"(the result of train.pipeline_overhead); got keys {sorted(overhead)}")
    series = {"tf.data pipeline": np.asarray(overhead["pipeline_times"], float) * 1000,
              "in-memory batches": np.asarray(overhead["memory_times"], float) * 1000}
    fig, axes = _grid(2, 2, 4.2, 3.0)
    colours = sns.color_palette("tab10", 2)
    for (name, t), c in zip(series.items(), colours):
        axes[0].plot(np.arange(1, len(t) + 1), t, marker="o", ms=3, lw=1, color=c, label=name)
    axes[0].set(xlabel="timed step", ylabel="step time (ms)", title="every step")
    axes[0].legend(fontsize="x-small")
    axes[1].boxplot(list(series.values()), showfliers=True)
    axes[1].set_xticks([1, 2], list(series))
    for i, t in enumerate(series.values(), start=1):
        axes[1].scatter(np.full(len(t), i), t, s=8, color=colours[i - 1], alpha=0.6, zorder=3)
    axes[1].set(ylabel="step time (ms)", title="distribution (line: median)")
    ratio = float(np.median(series["tf.data pipeline"]) / np.median(series["in-memory batches"]))
    fig.suptitle(title or f"Input pipeline: median step ratio {ratio:.2f} (pipeline / in-memory)")
    return fig


# ---------------------------------------------------------------------------------------------
# the external test (cellstudy.report.external): reliability diagrams and AUC with its CI
# ---------------------------------------------------------------------------------------------
def reliability(calibration_df: pd.DataFrame, networks: Sequence[str] | None = None, ncols: int = 4,
                title: str | None = None) -> Figure:
    """Reliability diagrams from :func:`cellstudy.report.external.calibration_table` rows (columns
    ``network, mean_predicted, fraction_positive, count``): one panel per network, the observed
    fraction of abnormal cells against the mean predicted p(abnormal) per bin (empty bins left
    out), marker area proportional to the bin's cell count (one scale for all panels), the
    diagonal of perfect calibration, and the ECE in the panel title. Panels ordered like
    ``metrics.NETWORK_ORDER`` (others after) unless ``networks`` is given."""
    _need(calibration_df, ["network", "mean_predicted", "fraction_positive", "count"], "calibration_df")
    if not len(calibration_df):
        raise ValueError("calibration_df has no rows; expected external.calibration_table rows per network")
    have = list(dict.fromkeys(calibration_df["network"]))
    nets = _ordered(have, NETWORK_ORDER) if networks is None else list(networks)
    unknown = sorted(set(nets) - set(have))
    if unknown:
        raise ValueError(f"network(s) {unknown} not in calibration_df; it has {have}")
    fig, axes = _grid(len(nets), ncols, 3.0, 3.0)
    biggest = max(float(calibration_df["count"].max()), 1.0)
    colour = sns.color_palette("colorblind", 1)[0]
    for ax, net in zip(axes, nets):
        s = calibration_df[(calibration_df["network"] == net) & (calibration_df["count"] > 0)]
        n = float(s["count"].sum())
        ece = expected_calibration_error(s)
        ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1)
        ax.plot(s["mean_predicted"], s["fraction_positive"], color=colour, lw=1)
        ax.scatter(s["mean_predicted"], s["fraction_positive"], s=10 + 190 * s["count"] / biggest,
                   color=colour, alpha=0.8, edgecolor="0.2", lw=0.5, zorder=3)
        ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="mean predicted p(abnormal)",
               ylabel="fraction abnormal")
        # two lines: long names ("Logistic regression") ran into the next panel's title
        ax.set_title(f"{DISPLAY_NAMES.get(net, net)}\nECE {ece:.3f}, n = {int(n)}", fontsize="small")
        ax.set_aspect("equal")
    fig.suptitle(title or "Reliability on the external test set (marker area: cells in the bin)")
    return fig


def external_auc(metrics_df: pd.DataFrame, title: str | None = None) -> Figure:
    """AUC of each model on the external test set with its confidence interval (columns
    ``network, auc, auc_ci_low, auc_ci_high``, optionally ``family``, ``n_fields``; from
    :func:`cellstudy.report.external.evaluate`): one row per model, ordered like
    ``metrics.NETWORK_ORDER`` (others, e.g. the baselines, after), coloured by family, with a line
    at chance (0.5)."""
    _need(metrics_df, ["network", "auc", "auc_ci_low", "auc_ci_high"], "metrics_df")
    if not len(metrics_df):
        raise ValueError("metrics_df has no rows; expected one row per network (external.evaluate)")
    order = _ordered(metrics_df["network"], NETWORK_ORDER)
    m = metrics_df.drop_duplicates("network").set_index("network").loc[order]
    fams = list(m["family"].fillna("")) if "family" in m.columns else [""] * len(m)
    fam_order = _ordered(fams, _FAMILY_ORDER)
    palette = dict(zip(fam_order, sns.color_palette("colorblind", len(fam_order))))
    fig = Figure(figsize=(6.0, 0.9 + 0.38 * len(m)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(m))[::-1]
    auc = m["auc"].to_numpy(float)
    err = np.vstack([auc - m["auc_ci_low"].to_numpy(float), m["auc_ci_high"].to_numpy(float) - auc])
    for fam in fam_order:
        k = np.array([f == fam for f in fams])
        ax.errorbar(auc[k], y[k], xerr=np.clip(err[:, k], 0, None), fmt="o", capsize=3,
                    color=palette[fam], label=fam or None)
    ax.axvline(0.5, ls="--", color="0.5", lw=1)
    ax.set_yticks(y, [DISPLAY_NAMES.get(n, n) for n in m.index])
    lo = np.nanmin(np.r_[m["auc_ci_low"].to_numpy(float), auc, 0.5])
    ax.set(xlim=(max(0.0, lo - 0.05), 1.01), xlabel="AUC (95% CI)")
    if any(fams):
        ax.legend(title="family", fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    nf = f" ({int(m['n_fields'].max())} fields)" if "n_fields" in m.columns and m["n_fields"].notna().any() else ""
    fig.suptitle(title or f"External test set{nf}: AUC with a field-bootstrap CI")
    return fig


__all__ += ["reliability", "external_auc"]
