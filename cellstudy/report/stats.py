"""Statistics of the study: the paper's Table 3 and what a cross-validated comparison needs beyond it.

Spec: ``study.md`` section 9 (paper section 3.3, Table 3). Pure NumPy / SciPy / statsmodels.

* :func:`welch_family_tests` - the paper's test: Welch's two-sample t-test between the families
  DL, RGB and MHL on the per-fold values of all their networks, Bonferroni over the 3 pairs.
  Caveat (stated in the book): those values are not independent (every network of a family uses
  the same 5 folds, and training sets overlap between folds), so its nominal n is inflated.
* :func:`shapiro_then_correlate`, :func:`zscore`, :func:`describe` - normality-driven choices.
* :func:`corrected_resampled_ttest` (Nadeau & Bengio 2003), :func:`paired_effect_size`
  (Cohen's d_z with a noncentral-t interval), :func:`paired_network_comparisons` - paired
  comparisons that use the shared folds.
* :func:`table3_tests` - the assembly of the paper's Table 3 for a run: every pair of families,
  a family the run lacks reported instead of failing, Bonferroni over all pairs.
* :func:`naive_paired_p` - the plain paired t-test's p for a comparison of
  :func:`paired_network_comparisons`, for contrast with the corrected one.
* :func:`minimum_detectable_effect`, :func:`minimum_detectable_effect_or_nan`,
  :func:`minimum_detectable_effect_table`, :func:`power_statement` - what k = 5 folds can support.

The per-fold input is the tidy results table of :func:`cellstudy.learning.metrics.tidy_metrics`: columns
``network, family, fold, regime, metric, value``.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats as sps
from statsmodels.stats.multitest import multipletests

__all__ = [
    "FAMILIES",
    "TEST_METRICS",
    "welch_family_tests",
    "table3",
    "table3_tests",
    "shapiro_then_correlate",
    "zscore",
    "describe",
    "corrected_resampled_ttest",
    "paired_effect_size",
    "paired_network_comparisons",
    "naive_paired_p",
    "minimum_detectable_effect",
    "minimum_detectable_effect_or_nan",
    "minimum_detectable_effect_table",
    "power_statement",
]

#: The families compared in the paper's Table 3.
FAMILIES: tuple[str, ...] = ("DL", "RGB", "MHL")
#: The metrics of the paper's Table 3 (recall, F1, precision, AUC-ROC).
TEST_METRICS: tuple[str, ...] = ("recall_macro", "f1_macro", "precision_macro", "auc_macro")

_PER_FOLD_COLUMNS = ("network", "family", "fold", "regime", "metric", "value")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _check_alpha_families(alpha: float, families: Sequence[str]) -> list[str]:
    """``families`` as a list; ValueError for an ``alpha`` outside (0, 1) or fewer than 2 distinct
    families."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    families = list(families)
    if len(families) < 2 or len(set(families)) != len(families):
        raise ValueError(f"families must name at least 2 distinct families, got {families}")
    return families


def _vector(x: Any, name: str, min_n: int = 1) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values; drop them first")
    if a.size < min_n:
        raise ValueError(f"{name} has {a.size} value(s); expected at least {min_n}")
    return a


def _pair(a: Any, b: Any, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a = _vector(a, "a", min_n)
    b = _vector(b, "b", min_n)
    if a.size != b.size:
        raise ValueError(f"a has {a.size} values and b has {b.size}; paired values need equal lengths")
    return a, b


def _check_per_fold(per_fold: pd.DataFrame, need: Sequence[str] = _PER_FOLD_COLUMNS) -> None:
    if not isinstance(per_fold, pd.DataFrame):
        raise ValueError(f"per_fold must be a pandas DataFrame, got {type(per_fold).__name__}")
    missing = [c for c in need if c not in per_fold.columns]
    if missing:
        raise ValueError(f"per_fold lacks column(s) {missing}; expected {list(need)}")


def _welch_df(a: np.ndarray, b: np.ndarray) -> float:
    """Welch-Satterthwaite degrees of freedom."""
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    den = va**2 / (a.size - 1) + vb**2 / (b.size - 1)
    return float((va + vb) ** 2 / den) if den > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# the paper's Table 3
# ---------------------------------------------------------------------------------------------
def welch_family_tests(
    per_fold: pd.DataFrame,
    families: Sequence[str] = FAMILIES,
    metrics: Sequence[str] = TEST_METRICS,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Welch's two-sample t-tests between families, per metric and regime (paper Table 3).

    For each regime and metric, the values of family A are the per-fold values of all its networks
    (e.g. DL: 4 networks x 5 folds = 20 values); each pair of ``families`` is tested with
    ``scipy.stats.ttest_ind(equal_var=False)``: t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b),
    Welch-Satterthwaite df. Bonferroni over the ``m = C(len(families), 2)`` pairs of one metric
    and regime: ``p_bonferroni = min(1, m p)``, ``threshold = alpha / m``, ``significant = p <
    threshold`` (equivalently ``p_bonferroni < alpha``). NaN values are dropped (``n_a``, ``n_b``
    count the rest); fewer than 2 values or zero variance in both groups give NaN statistics.

    Returns
    -------
    DataFrame with columns ``regime, metric, family_a, family_b, n_a, n_b, mean_a, sd_a, mean_b,
    sd_b, t, df, p, p_bonferroni, threshold, significant``.
    """
    _check_per_fold(per_fold)
    families = _check_alpha_families(alpha, families)
    for name, wanted, have in (("family", families, per_fold["family"]), ("metric", metrics, per_fold["metric"])):
        missing = sorted(set(wanted) - set(have))
        if missing:
            raise ValueError(f"{name}(s) {missing} not in per_fold; it has {sorted(set(have))}")
    pairs = list(itertools.combinations(families, 2))
    m = len(pairs)
    rows = []
    for regime in dict.fromkeys(per_fold["regime"]):
        for metric in metrics:
            sub = per_fold[(per_fold["regime"] == regime) & (per_fold["metric"] == metric)]
            for fa, fb in pairs:
                a = sub.loc[sub["family"] == fa, "value"].dropna().to_numpy(np.float64)
                b = sub.loc[sub["family"] == fb, "value"].dropna().to_numpy(np.float64)
                t = df = p = math.nan
                if a.size >= 2 and b.size >= 2 and (a.var() > 0 or b.var() > 0):
                    res = sps.ttest_ind(a, b, equal_var=False)
                    t, p = float(res.statistic), float(res.pvalue)
                    df = _welch_df(a, b)
                rows.append({
                    "regime": regime, "metric": metric, "family_a": fa, "family_b": fb,
                    "n_a": int(a.size), "n_b": int(b.size),
                    "mean_a": float(a.mean()) if a.size else math.nan,
                    "sd_a": float(a.std(ddof=1)) if a.size > 1 else math.nan,
                    "mean_b": float(b.mean()) if b.size else math.nan,
                    "sd_b": float(b.std(ddof=1)) if b.size > 1 else math.nan,
                    "t": t, "df": df, "p": p,
                    "p_bonferroni": min(1.0, p * m) if np.isfinite(p) else math.nan,
                    "threshold": alpha / m,
                    "significant": bool(np.isfinite(p) and p < alpha / m),
                })
    return pd.DataFrame(rows)


def table3(welch: pd.DataFrame, regime: str, digits: int = 3) -> pd.DataFrame:
    """The paper's Table 3 layout from :func:`welch_family_tests`: rows = metrics, columns =
    family pairs ("DL vs RGB", ...), cells ``"t = 2.31, p = 0.031*"`` (``*``: p below the
    Bonferroni threshold, shown in the column ``threshold``)."""
    need = ["regime", "metric", "family_a", "family_b", "t", "p", "threshold", "significant"]
    missing = [c for c in need if c not in welch.columns]
    if missing:
        raise ValueError(f"welch table lacks column(s) {missing}; pass welch_family_tests(...)'s output")
    sub = welch[welch["regime"] == regime]
    if sub.empty:
        raise ValueError(f"regime {regime!r} not in the welch table; it has {sorted(set(welch['regime']))}")

    def cell(r: pd.Series) -> str:
        if not np.isfinite(r["p"]):
            return "n/a"
        star = "*" if r["significant"] else ""
        return f"t = {r['t']:.2f}, p = {r['p']:.{digits}g}{star}"

    sub = sub.assign(pair=sub["family_a"] + " vs " + sub["family_b"], cell=sub.apply(cell, axis=1))
    wide = sub.pivot(index="metric", columns="pair", values="cell")
    wide = wide.reindex(index=list(dict.fromkeys(sub["metric"])), columns=list(dict.fromkeys(sub["pair"])))
    wide["threshold"] = float(sub["threshold"].iloc[0])
    wide.columns.name = None
    return wide


def table3_tests(
    per_fold: pd.DataFrame,
    families: Sequence[str] = FAMILIES,
    metrics: Sequence[str] = TEST_METRICS,
    alpha: float = 0.05,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The Welch tests behind the paper's Table 3 (paper section 3.3; ``study.md`` section 9) for a
    run that may lack some families, with Bonferroni over ALL pairs of ``families``.

    ``per_fold``: the tidy table of :func:`cellstudy.learning.metrics.tidy_metrics` (columns ``network,
    family, fold, regime, metric, value``; other metrics may be present), possibly empty (then
    without columns: every pair is reported as not computed).
    ``families``: the families of the table, e.g. :data:`FAMILIES` or ``FAMILIES + ("Classical",)``;
    their ``m = C(len(families), 2)`` pairs are the family of tests. Each pair whose two families
    both have results is tested with :func:`welch_family_tests` (per regime and metric); a pair
    with a family absent from ``per_fold`` gets rows with ``n_a = n_b = 0`` and NaN statistics
    (one per regime of ``per_fold`` and metric) and is reported as not computed. Then, over the m
    pairs (whether computed or not, so the threshold means the same at every scale):
    ``threshold = alpha / m``, ``p_bonferroni = min(1, m p)``, ``significant = p < alpha / m``.

    Returns ``(welch, not_computed)``: ``welch`` has :func:`welch_family_tests`' columns (one row per
    regime x metric x pair; empty without regimes); ``not_computed`` is a list of ``{"what",
    "why"}``: first the pairs with a missing family (in pair order), then every computed pair,
    metric and regime whose p is NaN (fewer than 2 values or no variance in both families;
    sorted by regime, metric, family_a, family_b).
    """
    if not isinstance(per_fold, pd.DataFrame):
        raise ValueError(f"per_fold must be a pandas DataFrame, got {type(per_fold).__name__}")
    if len(per_fold):  # an empty table (a run without results) may lack the columns
        _check_per_fold(per_fold)
    families = _check_alpha_families(alpha, families)
    present = set(per_fold["family"]) if len(per_fold) else set()
    regimes = list(dict.fromkeys(per_fold["regime"])) if len(per_fold) else []
    pairs = list(itertools.combinations(families, 2))
    m = len(pairs)
    rows: list[dict[str, Any]] = []
    not_computed: list[dict[str, str]] = []
    for fa, fb in pairs:
        if fa not in present or fb not in present or not regimes:
            missing = [f for f in (fa, fb) if f not in present]
            not_computed.append({"what": f"Welch {fa} vs {fb}",
                                 "why": f"family {', '.join(missing)} has no results in this run"})
            for regime in regimes:
                for metric in metrics:
                    rows.append({"regime": regime, "metric": metric, "family_a": fa, "family_b": fb,
                                 "n_a": 0, "n_b": 0, "t": np.nan, "df": np.nan, "p": np.nan})
            continue
        w = welch_family_tests(per_fold, families=[fa, fb], metrics=metrics, alpha=alpha)
        rows += w.to_dict("records")
    welch = pd.DataFrame(rows)
    if len(welch):
        welch["threshold"] = alpha / m
        welch["p_bonferroni"] = np.minimum(1.0, welch["p"] * m)
        welch["significant"] = welch["p"] < alpha / m
        for (r, met, a, b), g in welch.groupby(["regime", "metric", "family_a", "family_b"]):
            if g["n_a"].iloc[0] and g["n_b"].iloc[0] and not np.isfinite(g["p"].iloc[0]):
                not_computed.append({"what": f"Welch {a} vs {b}, {met}, {r}",
                                     "why": "fewer than 2 values or no variance in both families"})
    return welch, not_computed


# ---------------------------------------------------------------------------------------------
# normality-driven descriptive statistics and correlation
# ---------------------------------------------------------------------------------------------
def shapiro_then_correlate(x: Any, y: Any, alpha: float = 0.05) -> dict[str, Any]:
    """Shapiro-Wilk on ``x`` and ``y``; Pearson if neither rejects normality at ``alpha``, else
    Spearman (``study.md`` section 9).

    ``x``, ``y``: ``(n,)`` paired values, n >= 3, finite, neither constant (e.g. the flattened
    Gmean-Shape and Gmean-GradCam pixel values). Returns ``method`` ("pearson" | "spearman"),
    ``r``, ``p`` (two-sided), ``n``, ``shapiro_p_x``, ``shapiro_p_y``, ``normal_x``, ``normal_y``.
    Shapiro-Wilk's p-value is approximate for n > 5000 (SciPy warns); with large n it rejects
    normality for trivial deviations, so Spearman is then the usual outcome.
    """
    x, y = _pair(x, y, min_n=3)
    for name, v in (("x", x), ("y", y)):
        if np.ptp(v) == 0:
            raise ValueError(f"{name} is constant ({v[0]}); a correlation is undefined")
    px = float(sps.shapiro(x).pvalue)
    py = float(sps.shapiro(y).pvalue)
    normal_x, normal_y = px > alpha, py > alpha
    if normal_x and normal_y:
        method, res = "pearson", sps.pearsonr(x, y)
    else:
        method, res = "spearman", sps.spearmanr(x, y)
    return {
        "method": method, "r": float(res.statistic), "p": float(res.pvalue), "n": int(x.size),
        "shapiro_p_x": px, "shapiro_p_y": py, "normal_x": bool(normal_x), "normal_y": bool(normal_y),
    }


def zscore(values: Any, ddof: int = 1) -> np.ndarray:
    """Standardise ``(n,)`` values to ``(x - mean) / SD`` (sample SD with ``ddof=1`` by default).

    NaN values stay NaN and are ignored for the mean and SD. Raises ``ValueError`` when fewer than
    ``ddof + 1`` finite values remain or they are constant.
    """
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {a.shape}")
    fin = a[np.isfinite(a)]
    if fin.size <= ddof:
        raise ValueError(f"values has {fin.size} finite value(s); expected more than ddof = {ddof}")
    sd = fin.std(ddof=ddof)
    if sd == 0:
        raise ValueError("values are constant; the z-score is undefined")
    return (a - fin.mean()) / sd


def describe(values: Any, alpha: float = 0.05, digits: int = 3) -> dict[str, Any]:
    """Descriptive statistics by normality: mean ± SD if Shapiro-Wilk does not reject normality at
    ``alpha``, else median and IQR (25th-75th percentile, linear interpolation).

    ``values``: ``(n,)`` finite. With n < 3 normality cannot be tested (``shapiro_p`` NaN,
    ``normal`` None) and mean ± SD is reported. Returns ``n, normal, shapiro_p, mean, sd, median,
    q1, q3, iqr, text`` where ``text`` is ``"0.912 ± 0.031"`` or ``"0.910 (IQR 0.880-0.940;
    mean 0.897)"``: the mean every other table of the book shows is there too, so a median that
    differs from it (five folds, one of them low) is not read as another result.
    """
    a = _vector(values, "values", min_n=1)
    n = a.size
    shapiro_p = math.nan
    normal: bool | None = None
    if n >= 3 and np.ptp(a) > 0:
        shapiro_p = float(sps.shapiro(a).pvalue)
        normal = bool(shapiro_p > alpha)
    q1, med, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    mean = float(a.mean())
    sd = float(a.std(ddof=1)) if n > 1 else math.nan
    if normal is False:
        text = f"{med:.{digits}f} (IQR {q1:.{digits}f}-{q3:.{digits}f}; mean {mean:.{digits}f})"
    else:
        text = f"{mean:.{digits}f} \u00b1 {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
    return {"n": n, "normal": normal, "shapiro_p": shapiro_p, "mean": mean, "sd": sd, "median": med,
            "q1": q1, "q3": q3, "iqr": q3 - q1, "text": text}


# ---------------------------------------------------------------------------------------------
# paired comparisons over shared folds
# ---------------------------------------------------------------------------------------------
def _variance_factor(k: int, n_train: float | None, n_test: float | None) -> tuple[float, float]:
    """(1/k + n_test/n_train, n_test/n_train); k-fold default ratio 1/(k-1) when both are None."""
    if (n_train is None) != (n_test is None):
        raise ValueError("give both n_train and n_test, or neither (then n_test/n_train = 1/(k-1))")
    if n_train is None:
        ratio = 1.0 / (k - 1)
    else:
        if not (n_train > 0 and n_test > 0):
            raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
        ratio = float(n_test) / float(n_train)
    return 1.0 / k + ratio, ratio


def corrected_resampled_ttest(
    a: Any, b: Any, n_train: float | None = None, n_test: float | None = None, alpha: float = 0.05
) -> dict[str, Any]:
    """Nadeau & Bengio (2003) corrected resampled t-test for paired per-fold scores.

    ``a``, ``b``: ``(k,)`` scores of two models on the same k folds; ``d = a - b``.
    ``t = mean(d) / sqrt((1/k + n_test/n_train) * s_d^2)`` with ``s_d^2`` the sample variance
    (ddof = 1); ``df = k - 1``; two-sided ``p``; ``ci`` = mean(d) ± t_{1-alpha/2, k-1} times the
    corrected standard error. The naive paired t-test uses ``1/k`` alone and is anti-conservative
    because the training sets overlap. ``n_train`` / ``n_test``: training and test set sizes of
    one fold (distinct cells; augmented copies are not independent samples); if both are None the
    k-fold ratio ``1/(k-1)`` is used. (Nadeau & Bengio derived the correction for repeated random
    splits; applying it to k-fold CV follows Bouckaert & Frank 2004.)

    Returns ``t, df, p, mean_diff, se, ci_low, ci_high, k, factor, note``. All-zero differences
    give t = 0, p = 1; constant non-zero differences give NaN with a ``note``.
    """
    a, b = _pair(a, b, min_n=2)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    d = a - b
    k = d.size
    factor, _ = _variance_factor(k, n_train, n_test)
    mean = float(d.mean())
    var = float(d.var(ddof=1))
    se = math.sqrt(factor * var)
    note = ""
    if var == 0:
        if mean == 0:
            t, p = 0.0, 1.0
            note = "all differences are zero"
        else:
            t = p = math.nan
            note = "the differences are constant and non-zero: zero variance, the test is undefined"
    else:
        t = mean / se
        p = float(2 * sps.t.sf(abs(t), k - 1))
    q = float(sps.t.ppf(1 - alpha / 2, k - 1))
    return {"t": t, "df": k - 1, "p": p, "mean_diff": mean, "se": se,
            "ci_low": mean - q * se, "ci_high": mean + q * se, "k": k, "factor": factor, "note": note}


def _nct_ci(t_obs: float, df: int, level: float) -> tuple[float, float]:
    """Noncentrality parameters (lo, hi) with nct.cdf(t_obs, df, lo) = 1 - a/2 and
    nct.cdf(t_obs, df, hi) = a/2 (test inversion).

    scipy's ``nct.cdf`` returns NaN far in its tails (e.g. t = 12, df = 2, nc = -8, where the
    value is ~1; 3 folds give df = 2): there it is taken as its limit, 1 for nc below t_obs and 0
    above, so the bracket search and the root finder stay on finite values."""
    a = 1 - level

    def cdf(nc: float) -> float:
        v = float(sps.nct.cdf(t_obs, df, nc))
        return v if np.isfinite(v) else (1.0 if nc < t_obs else 0.0)

    def root(target: float) -> float:
        f = lambda nc: cdf(nc) - target  # decreasing in nc
        lo, hi = t_obs - 10.0, t_obs + 10.0
        while f(lo) < 0:
            lo -= 10.0
        while f(hi) > 0:
            hi += 10.0
        return float(optimize.brentq(f, lo, hi, xtol=1e-10))

    return root(1 - a / 2), root(a / 2)


def paired_effect_size(
    a: Any, b: Any, level: float = 0.95, n_train: float | None = None, n_test: float | None = None
) -> dict[str, Any]:
    """Cohen's d_z = mean(d) / SD(d) of paired per-fold differences ``d = a - b`` (``(k,)`` each),
    with a confidence interval from the noncentral t distribution (test inversion; no bootstrap,
    which has only C(2k-1, k) = 126 distinct resamples at k = 5).

    Without ``n_train``/``n_test`` the interval treats the k differences as independent
    (t = d_z sqrt(k), t ~ nct(k-1, delta sqrt(k))). With them, it uses the Nadeau-Bengio variance
    factor c = 1/k + n_test/n_train instead of 1/k (t = d_z / sqrt(c)), which widens it to
    account for overlapping training sets; ``method`` says which. Returns ``d_z, ci_low,
    ci_high, level, k, method``; NaN when SD(d) = 0.
    """
    a, b = _pair(a, b, min_n=2)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = a - b
    k = d.size
    if (n_train is None) and (n_test is None):
        factor, method = 1.0 / k, "noncentral t (independent folds)"
    else:
        factor, _ = _variance_factor(k, n_train, n_test)
        method = "noncentral t, Nadeau-Bengio corrected variance"
    sd = float(d.std(ddof=1))
    if sd == 0:
        return {"d_z": math.nan, "ci_low": math.nan, "ci_high": math.nan, "level": level, "k": k,
                "method": method}
    dz = float(d.mean()) / sd
    t_obs = dz / math.sqrt(factor)
    lo, hi = _nct_ci(t_obs, k - 1, level)
    s = math.sqrt(factor)
    return {"d_z": dz, "ci_low": lo * s, "ci_high": hi * s, "level": level, "k": k, "method": method}


def paired_network_comparisons(
    per_fold: pd.DataFrame,
    metrics: Sequence[str] = TEST_METRICS,
    n_train: float | None = None,
    n_test: float | None = None,
    correction: str = "holm",
    alpha: float = 0.05,
    families: Sequence[str] | None = None,
    networks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Paired comparisons of every pair of networks, and of families, over the shared folds.

    For each regime and metric: all pairs of ``networks`` (default: all in ``per_fold``) compared
    fold by fold with :func:`corrected_resampled_ttest` and :func:`paired_effect_size` (corrected
    variance). Families: per fold, the mean over the family's networks, then every pair of
    ``families`` (default: all in ``per_fold``) the same way. Only folds where both sides have a
    value are used (``k``). Multiple-comparison correction (``"holm"`` or ``"bonferroni"``,
    statsmodels ``multipletests``) within each (regime, metric, level) set of tests.

    Returns columns ``regime, metric, level ("network" | "family"), a, b, k, mean_a, mean_b,
    mean_diff, ci_low, ci_high, t, df, p, p_adj, significant, d_z, d_z_low, d_z_high, note``.
    """
    _check_per_fold(per_fold)
    if correction not in ("holm", "bonferroni"):
        raise ValueError(f"correction must be 'holm' or 'bonferroni', got {correction!r}")
    missing = sorted(set(metrics) - set(per_fold["metric"]))
    if missing:
        raise ValueError(f"metric(s) {missing} not in per_fold; it has {sorted(set(per_fold['metric']))}")
    dup = per_fold.duplicated(["network", "fold", "regime", "metric"])
    if dup.any():
        r = per_fold[dup].iloc[0]
        raise ValueError(f"per_fold has more than one value for {r.network!r}, fold {r.fold}, "
                         f"regime {r.regime!r}, metric {r.metric!r}")
    nets = list(networks) if networks is not None else list(dict.fromkeys(per_fold["network"]))
    fams = list(families) if families is not None else list(dict.fromkeys(per_fold["family"]))
    rows = []
    for regime in dict.fromkeys(per_fold["regime"]):
        for metric in metrics:
            sub = per_fold[(per_fold["regime"] == regime) & (per_fold["metric"] == metric)]
            wide_net = sub.pivot(index="fold", columns="network", values="value")
            fam_of = sub.drop_duplicates("network").set_index("network")["family"]
            wide_fam = wide_net.T.groupby(fam_of).mean().T  # per fold, mean over the family's networks
            for level, wide, names in (("network", wide_net, nets), ("family", wide_fam, fams)):
                block = []
                for x, y in itertools.combinations([n for n in names if n in wide.columns], 2):
                    both = wide[[x, y]].dropna()
                    row = {"regime": regime, "metric": metric, "level": level, "a": x, "b": y,
                           "k": len(both)}
                    if len(both) >= 2:
                        tt = corrected_resampled_ttest(both[x], both[y], n_train, n_test, alpha)
                        es = paired_effect_size(both[x], both[y], 1 - alpha, n_train, n_test)
                        row.update(mean_a=float(both[x].mean()), mean_b=float(both[y].mean()),
                                   mean_diff=tt["mean_diff"], ci_low=tt["ci_low"], ci_high=tt["ci_high"],
                                   t=tt["t"], df=tt["df"], p=tt["p"], d_z=es["d_z"],
                                   d_z_low=es["ci_low"], d_z_high=es["ci_high"], note=tt["note"])
                    else:
                        row.update(p=math.nan, note=f"only {len(both)} shared fold(s)")
                    block.append(row)
                ps = np.array([r["p"] for r in block], dtype=np.float64)
                ok = np.isfinite(ps)
                adj = np.full(ps.shape, math.nan)
                if ok.any():
                    adj[ok] = multipletests(ps[ok], alpha=alpha, method=correction)[1]
                for r, pa in zip(block, adj):
                    r["p_adj"] = float(pa)
                    r["significant"] = bool(np.isfinite(pa) and pa < alpha)
                rows.extend(block)
    cols = ["regime", "metric", "level", "a", "b", "k", "mean_a", "mean_b", "mean_diff", "ci_low",
            "ci_high", "t", "df", "p", "p_adj", "significant", "d_z", "d_z_low", "d_z_high", "note"]
    return pd.DataFrame(rows).reindex(columns=cols)


def naive_paired_p(t_corrected: Any, k: Any, ratio: float) -> np.ndarray:
    """The p-value the plain paired t-test would give for a comparison whose Nadeau-Bengio
    corrected t (:func:`corrected_resampled_ttest`, as in :func:`paired_network_comparisons`'
    ``t`` and ``k`` columns) is ``t_corrected``.

    Both tests divide the mean difference by a standard error from the same sample variance
    ``s_d^2``; the corrected one uses ``(1/k + ratio) s_d^2``, the plain one ``s_d^2 / k``, so
    ``t_plain = t_corrected * sqrt((1/k + ratio) * k)`` and ``p = 2 P(T_{k-1} > |t_plain|)``
    (equal to ``scipy.stats.ttest_rel`` on the same folds). ``t_corrected``, ``k``: scalars or
    ``(n,)`` arrays (broadcast); ``ratio``: the n_test/n_train the corrected t was computed with
    (>= 0; 0 gives back the corrected p). Returns float64 p-values with the broadcast shape; NaN
    where ``t_corrected`` is NaN.
    """
    t = np.asarray(t_corrected, dtype=np.float64)
    kk = np.asarray(k, dtype=np.float64)
    if np.any(kk < 2) or np.any(kk != np.round(kk)):
        raise ValueError(f"k must be integers >= 2 (the shared folds), got {k}")
    if not ratio >= 0:
        raise ValueError(f"ratio (n_test/n_train) must be >= 0, got {ratio}")
    return 2 * sps.t.sf(np.abs(t) * np.sqrt((1 / kk + ratio) * kk), kk - 1)


# ---------------------------------------------------------------------------------------------
# what n = 5 folds can support
# ---------------------------------------------------------------------------------------------
def minimum_detectable_effect(
    k: int = 5, alpha: float = 0.05, power: float = 0.8, ratio: float | None = 0.0
) -> float:
    """Smallest standardised paired effect d_z detectable with probability ``power`` by a two-sided
    paired t-test at level ``alpha`` over ``k`` folds.

    ``ratio``: n_test/n_train of the Nadeau-Bengio correction; 0 = the naive paired t-test
    (noncentrality delta sqrt(k)); None = the k-fold ratio 1/(k-1). The noncentrality is
    ``d_z / sqrt(1/k + ratio)``; power = P(|T| > t_{1-alpha/2, k-1}), T ~ nct(k-1, ncp).
    """
    if int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha} and {power}")
    k = int(k)
    ratio = 1.0 / (k - 1) if ratio is None else float(ratio)
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    df = k - 1
    crit = sps.t.ppf(1 - alpha / 2, df)
    scale = math.sqrt(1.0 / k + ratio)

    def pw(nc: float) -> float:
        # scipy's noncentral t returns NaN here and there far in a tail (large ncp, small df):
        # the lower tail P(T < -crit) is then 0 to machine precision, the upper P(T > crit) 1
        # only when it is NaN beyond the critical value (reading a NaN of the lower tail as a
        # power of 1 put the root at k = 3, alpha = 0.05 / 6 wrong: d_z 7.71 / 6.84 for the
        # plain / corrected test against 8.02 / 12.68)
        lower = float(sps.nct.cdf(-crit, df, nc))
        upper = float(sps.nct.sf(crit, df, nc))
        if not math.isfinite(lower):
            lower = 0.0
        if not math.isfinite(upper):
            upper = 1.0 if nc > crit else 0.0
        return min(1.0, upper + lower)

    # The power depends on the noncentrality only, so solve for it once and scale: the same root
    # for the plain and the corrected test (solving in d_z units put the corrected test's bracket
    # where scipy returns NaN, and gave a d_z below the plain test's: k = 3, alpha = 0.05 / 6).
    hi = 1.0
    while pw(hi) < power:
        hi *= 2
    nc = float(optimize.brentq(lambda v: pw(v) - power, 0.0, hi, xtol=1e-12))
    return nc * scale


def minimum_detectable_effect_or_nan(
    k: int, alpha: float = 0.05, power: float = 0.8, ratio: float | None = 0.0
) -> tuple[float, str]:
    """:func:`minimum_detectable_effect`, or NaN with the reason when it cannot be computed.

    Returns ``(d_z, "")`` or ``(nan, message of the ValueError)``, e.g. for k < 2 or an alpha
    outside (0, 1), so a chapter can report the gap instead of stopping.
    """
    try:
        return minimum_detectable_effect(k, alpha, power, ratio), ""
    except ValueError as e:
        return math.nan, str(e)


def minimum_detectable_effect_table(
    ks: Sequence[int] = (3, 4, 5, 10),
    alphas: Sequence[float] = (0.05, 0.05 / 3),
    power: float = 0.8,
    k_run: int | None = None,
    ratio_run: float | None = None,
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Minimum detectable standardised paired effect d_z for several fold counts and levels.

    One row per ``k`` in ``ks`` and ``alpha`` in ``alphas`` (index ``["folds k", "alpha"]``), with
    columns ``"d_z, plain paired t"`` (ratio 0) and ``"d_z, Nadeau-Bengio"``: the corrected test
    with ``ratio_run`` (this run's n_test/n_train) where ``k == k_run``, else the k-fold ratio
    1/(k-1). Two-sided tests at power ``power`` (:func:`minimum_detectable_effect`); a value that
    cannot be computed is NaN and listed in the returned ``not_computed`` (``{"what", "why"}``,
    in row order, plain before corrected).
    """
    rows, not_computed = [], []

    def one(k: int, a: float, ratio: float | None) -> float:
        v, why = minimum_detectable_effect_or_nan(k, a, power, ratio)
        if why:
            not_computed.append({"what": f"minimum detectable effect, k = {k}, alpha = {a:.4g}", "why": why})
        return v

    for k in ks:
        for a in alphas:
            rows.append({"folds k": k, "alpha": a, "d_z, plain paired t": one(k, a, 0.0),
                         "d_z, Nadeau-Bengio": one(k, a, ratio_run if k == k_run else None)})
    return pd.DataFrame(rows).set_index(["folds k", "alpha"]), not_computed


def power_statement(
    k: int = 5, alpha: float = 0.05, power: float = 0.8, n_train: float | None = None,
    n_test: float | None = None, n_comparisons: int = 1,
) -> str:
    """Plain-language statement of what ``k`` paired folds can and cannot support.

    Gives the critical t, the minimum detectable d_z (naive paired test, and Nadeau-Bengio
    corrected with ratio n_test/n_train, default 1/(k-1)) at level ``alpha / n_comparisons``
    (Bonferroni), and what that means in metric units for a given fold-to-fold SD.
    """
    if n_comparisons < 1:
        raise ValueError(f"n_comparisons must be >= 1, got {n_comparisons}")
    if (n_train is None) != (n_test is None):
        raise ValueError("give both n_train and n_test, or neither")
    ratio = 1.0 / (k - 1) if n_train is None else float(n_test) / float(n_train)
    a = alpha / n_comparisons
    crit = float(sps.t.ppf(1 - a / 2, k - 1))
    naive = minimum_detectable_effect(k, a, power, 0.0)
    corr = minimum_detectable_effect(k, a, power, ratio)
    ex_sd = 0.03
    lines = [
        f"With k = {k} folds, a paired comparison has {k - 1} degrees of freedom; at a two-sided "
        f"level of {a:.4g}" + (f" (alpha = {alpha} / {n_comparisons} comparisons)" if n_comparisons > 1 else "")
        + f" it needs |t| > {crit:.2f}.",
        f"For {power:.0%} power the smallest detectable standardised difference is d_z = {naive:.2f} "
        f"with the naive paired t-test, and d_z = {corr:.2f} with the Nadeau-Bengio correction "
        f"(n_test/n_train = {ratio:.3g}), which accounts for the folds' overlapping training sets.",
        f"In metric units: if the fold-to-fold SD of a difference is {ex_sd}, only mean differences "
        f"of about {corr * ex_sd:.3f} or more would be detected reliably.",
        "What k = 5 can support: large, consistent differences (the same sign in every fold) and "
        "interval estimates of the mean difference and of d_z.",
        "What it cannot support: claims that two networks are equivalent (a non-significant test "
        "with wide intervals is not evidence of no difference); small differences (a few "
        "hundredths of AUC); normality checks (Shapiro-Wilk has almost no power at n = 5); and "
        "treating the per-fold values of several networks as independent samples (the paper's "
        "Welch test on 15-20 values per family) inflates the effective n, because all networks share "
        "the same 5 test folds.",
    ]
    return "\n".join(lines)
