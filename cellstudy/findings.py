"""What a run found, per network, in plain terms: AUC with a 95% CI, chance, the baseline.

Pure functions on the run's tidy per-fold metrics (``experiment.collect``'s ``tidy``: columns
network, family, fold, regime, metric, value) and predictions; no TensorFlow. The results chapter
and the book's findings read these, so that every sentence there is computed, not typed.

Intervals. The k test folds of a cross-validation share most of their training cells, so the
fold-to-fold spread understates the uncertainty of a mean score. Every interval here uses the
Nadeau-Bengio corrected variance (``stats.corrected_resampled_ttest``; ``(1/k + n_test/n_train)
s^2``), as the statistics chapter does:

- a network's AUC: mean over folds, 95% CI = mean ± t_{0.975, k-1} · sqrt((1/k + n_test/n_train) s²),
  clipped to [0, 1] (AUC's range); it **beats chance** when the CI's lower end is above 0.5 (a one-sided test at 2.5 %);
- against the classical baseline: the paired per-fold difference (network − baseline) with the
  same corrected test, Holm-adjusted over the networks, and Cohen's d_z with its interval.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from . import stats
from .metrics import DISPLAY_NAMES, NETWORK_FAMILY, NETWORK_ORDER

CLASSICAL = "Classical"


def fold_sizes(folds_csv: str | Path) -> tuple[float, float, int]:
    """``(n_train, n_test, k)`` of a run's folds file (``<run>/folds/<cohort>.csv``, read with
    ``folds.read_folds``: one row per cell with its test fold): the mean test-fold size and the rest of the
    cohort. Read from the folds file, not from the folds that ran."""
    from .folds import read_folds

    df, _ = read_folds(folds_csv)
    sizes = df["fold"].value_counts()
    n_test = float(sizes.mean())
    return float(len(df) - n_test), n_test, int(len(sizes))


def _ordered(names: Sequence[str]) -> list[str]:
    order = {n: i for i, n in enumerate(NETWORK_ORDER)}
    return sorted(dict.fromkeys(names), key=lambda n: (order.get(n, len(order)), n))


def best_baseline(tidy: pd.DataFrame, metric: str = "auc_macro", regime: str = "long") -> str | None:
    """The classical model (family "Classical") with the highest fold-mean ``metric``; None if
    the run has none."""
    sub = tidy[(tidy["metric"] == metric) & (tidy["regime"] == regime)]
    sub = sub[sub["network"].map(NETWORK_FAMILY).eq(CLASSICAL) | sub.get("family", "").eq(CLASSICAL)]
    if sub.empty:
        return None
    return str(sub.groupby("network")["value"].mean().idxmax())


def network_verdicts(tidy: pd.DataFrame, n_train: float, n_test: float, metric: str = "auc_macro",
                     regime: str = "long", baseline: str | None = "best", alpha: float = 0.05,
                     chance: float = 0.5) -> pd.DataFrame:
    """One row per model of the run (networks and classical models, book order).

    Columns: network, display, family, k, mean, sd, ci_low, ci_high, beats_chance, and against
    ``baseline`` (the best classical model by default; None: no comparison): baseline, diff,
    diff_low, diff_high, p, p_adj (Holm over the compared networks), d_z, d_z_low, d_z_high,
    versus ("better than" | "worse than" | "not distinguishable from", at ``alpha`` after
    Holm), note. The baseline's own row has no comparison.
    """
    sub = tidy[(tidy["metric"] == metric) & (tidy["regime"] == regime)].dropna(subset=["value"])
    if sub.empty:
        raise ValueError(f"no {metric!r} values for regime {regime!r} in the tidy metrics")
    wide = sub.pivot_table(index="fold", columns="network", values="value", aggfunc="first")
    base = best_baseline(tidy, metric, regime) if baseline == "best" else baseline
    if base is not None and base not in wide.columns:
        raise ValueError(f"baseline {base!r} has no {metric} values for regime {regime!r}")
    q = lambda k: float(sps.t.ppf(1 - alpha / 2, k - 1)) if k >= 2 else math.nan
    rows = []
    for net in _ordered(wide.columns):
        v = wide[net].dropna()
        k = len(v)
        mean, sd = float(v.mean()), float(v.std(ddof=1)) if k >= 2 else math.nan
        factor = (1.0 / k + n_test / n_train) if k >= 1 else math.nan
        half = q(k) * math.sqrt(factor) * sd if k >= 2 else math.nan
        row = {"network": net, "display": DISPLAY_NAMES.get(net, net),
               "family": NETWORK_FAMILY.get(net, "?"), "k": k, "mean": mean, "sd": sd,
               "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half),
               "beats_chance": bool(k >= 2 and mean - half > chance), "baseline": base, "note": ""}
        if base is not None and net != base:
            both = wide[[net, base]].dropna()
            if len(both) >= 2:
                tt = stats.corrected_resampled_ttest(both[net], both[base], n_train, n_test, alpha)
                es = stats.paired_effect_size(both[net], both[base], 1 - alpha, n_train, n_test)
                row.update(diff=tt["mean_diff"], diff_low=tt["ci_low"], diff_high=tt["ci_high"],
                           p=tt["p"], d_z=es["d_z"], d_z_low=es["ci_low"], d_z_high=es["ci_high"],
                           note=tt["note"])
            else:
                row["note"] = f"only {len(both)} fold(s) shared with {base}"
        rows.append(row)
    out = pd.DataFrame(rows)
    for c in ("diff", "diff_low", "diff_high", "p", "d_z", "d_z_low", "d_z_high"):
        if c not in out.columns:
            out[c] = math.nan
    out["p_adj"] = math.nan
    compared = out["p"].notna() & out["family"].ne(CLASSICAL)
    if compared.any():
        from statsmodels.stats.multitest import multipletests
        out.loc[compared, "p_adj"] = multipletests(out.loc[compared, "p"], method="holm")[1]

    def versus(r) -> str:
        if r["network"] == base or base is None or not np.isfinite(r["diff"]):
            return ""
        if np.isfinite(r["p_adj"]) and r["p_adj"] < alpha:
            return "better than" if r["diff"] > 0 else "worse than"
        if not np.isfinite(r["p_adj"]) and np.isfinite(r["p"]) and r["p"] < alpha:
            return "better than" if r["diff"] > 0 else "worse than"
        return "not distinguishable from"

    out["versus"] = out.apply(versus, axis=1)
    cols = ["network", "display", "family", "k", "mean", "sd", "ci_low", "ci_high", "beats_chance",
            "baseline", "diff", "diff_low", "diff_high", "p", "p_adj", "d_z", "d_z_low", "d_z_high",
            "versus", "note"]
    return out[cols]


def one_class_folds(predictions: pd.DataFrame, regime: str = "long") -> pd.DataFrame:
    """(network, fold) pairs whose argmax prediction is the same class for every test cell.

    ``predictions``: ``experiment.collect``'s predictions (network, fold, regime, y_pred)."""
    need = {"network", "fold", "regime", "y_pred"}
    if not need <= set(predictions.columns):
        raise ValueError(f"predictions lack column(s) {sorted(need - set(predictions.columns))}")
    p = predictions[predictions["regime"] == regime]
    g = p.groupby(["network", "fold"])["y_pred"].nunique().reset_index(name="classes")
    bad = g[g["classes"] < 2].copy()
    bad["predicted"] = [int(p[(p.network == r.network) & (p.fold == r.fold)]["y_pred"].iloc[0])
                        for r in bad.itertuples()]
    return bad[["network", "fold", "predicted"]].reset_index(drop=True)


def _fmt_ci(r, digits: int = 3) -> str:
    return f"{r['mean']:.{digits}f} (95% CI {r['ci_low']:.{digits}f}–{r['ci_high']:.{digits}f})"


def verdict_sentences(verdicts: pd.DataFrame, metric_label: str = "AUC") -> list[str]:
    """One plain sentence per model from :func:`network_verdicts`, e.g. "MHL: AUC 0.912 (95% CI
    0.85–0.97), above chance; not distinguishable from Random forest (difference -0.05, 95% CI
    -0.12 to 0.02, Holm-adjusted p 0.31, d_z -0.9)"."""
    out = []
    for r in verdicts.itertuples(index=False):
        r = r._asdict()
        s = f"**{r['display']}**: {metric_label} {_fmt_ci(r)}, " + (
            "above chance" if r["beats_chance"] else "**not** above chance (its CI includes 0.5)")
        if r["versus"]:
            base = DISPLAY_NAMES.get(r["baseline"], r["baseline"])
            p = r["p_adj"] if np.isfinite(r["p_adj"]) else r["p"]
            s += (f"; {r['versus']} the {base} baseline (difference {r['diff']:+.3f}, 95% CI "
                  f"{r['diff_low']:+.3f} to {r['diff_high']:+.3f}, Holm-adjusted p {p:.3g}, "
                  f"d_z {r['d_z']:.2f})")
        elif r["family"] == CLASSICAL and r["network"] == r["baseline"]:
            s += "; the best classical baseline, against which the networks are compared"
        out.append(s + ".")
    return out


def summary_counts(verdicts: pd.DataFrame) -> dict[str, int]:
    """How many networks (not classical models) beat chance / are better, worse or not
    distinguishable from the baseline."""
    n = verdicts[verdicts["family"] != CLASSICAL]
    return {"networks": int(len(n)), "above_chance": int(n["beats_chance"].sum()),
            "better": int((n["versus"] == "better than").sum()),
            "worse": int((n["versus"] == "worse than").sum()),
            "indistinguishable": int((n["versus"] == "not distinguishable from").sum())}


def best_per_family(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The model with the highest mean of each family (book order of families)."""
    idx = verdicts.groupby("family", sort=False)["mean"].idxmax()
    return verdicts.loc[idx].reset_index(drop=True)
