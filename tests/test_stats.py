"""cellstudy.report.stats against hand-computed formulas and independent implementations."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttest_ind as sm_ttest_ind

from cellstudy.report import stats as S

NETS = {"DL": ["VGG16", "ResNet50", "DenseNet121", "DenRes-131"], "RGB": ["RGB", "RGB-Res", "RGB-Den"],
        "MHL": ["MHL", "MHL-Res", "MHL-Den"]}


def make_per_fold(seed: int = 0, shift: dict | None = None) -> pd.DataFrame:
    """Synthetic tidy per-fold table: 10 networks x 5 folds x 2 regimes x 2 metrics."""
    shift = shift or {"DL": 0.0, "RGB": 0.08, "MHL": 0.02}
    rng = np.random.default_rng(seed)
    rows = []
    for regime in ("short", "long"):
        for metric in ("recall_macro", "auc_macro"):
            fold_effect = rng.normal(0, 0.02, 5)  # folds shared by all networks
            for fam, nets in NETS.items():
                for net in nets:
                    for fold in range(5):
                        v = 0.8 + shift[fam] + fold_effect[fold] + rng.normal(0, 0.03)
                        rows.append((net, fam, fold, regime, metric, v))
    return pd.DataFrame(rows, columns=["network", "family", "fold", "regime", "metric", "value"])


# ---------------------------------------------------------------------------------------------
# Welch (paper Table 3)
# ---------------------------------------------------------------------------------------------
def test_welch_against_formula_and_statsmodels():
    pf = make_per_fold()
    res = S.welch_family_tests(pf, metrics=("recall_macro", "auc_macro"))
    assert len(res) == 2 * 2 * 3  # regimes x metrics x 3 pairs
    for _, r in res.iterrows():
        sel = (pf.regime == r.regime) & (pf.metric == r.metric)
        a = pf.loc[sel & (pf.family == r.family_a), "value"].to_numpy()
        b = pf.loc[sel & (pf.family == r.family_b), "value"].to_numpy()
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        t = (a.mean() - b.mean()) / math.sqrt(va + vb)  # Welch t
        df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))  # Welch-Satterthwaite
        p = 2 * sps.t.sf(abs(t), df)
        assert (r.n_a, r.n_b) == (a.size, b.size)
        assert r.t == pytest.approx(t, rel=1e-10)
        assert r.df == pytest.approx(df, rel=1e-10)
        assert r.p == pytest.approx(p, rel=1e-8)
        sm_t, sm_p, sm_df = sm_ttest_ind(a, b, usevar="unequal")
        assert (r.t, r.p, r.df) == pytest.approx((sm_t, sm_p, sm_df), rel=1e-8)
        # Bonferroni for 3 tests, capped at 1
        assert r.p_bonferroni == pytest.approx(min(1.0, 3 * p))
        assert r.threshold == pytest.approx(0.05 / 3)
        assert r.significant == (p < 0.05 / 3)
    # DL vs RGB differ by 0.08 with SD ~0.035: clearly significant
    assert res.loc[(res.family_a == "DL") & (res.family_b == "RGB"), "significant"].all()


def test_welch_bonferroni_cap_and_threshold():
    # MHL values are a permutation of RGB's: t = 0, p = 1, p_bonferroni = min(1, 3) = 1.
    pf = make_per_fold()
    pf = pf[(pf.regime == "short") & (pf.metric == "auc_macro")].copy()
    rgb = pf.loc[pf.family == "RGB", "value"].to_numpy()
    pf.loc[pf.family == "MHL", "value"] = rgb[::-1]
    res = S.welch_family_tests(pf, metrics=("auc_macro",), alpha=0.01)
    row = res[(res.family_a == "RGB") & (res.family_b == "MHL")].iloc[0]
    assert row.t == pytest.approx(0.0, abs=1e-12)
    assert row.p == pytest.approx(1.0)
    assert row.p_bonferroni == 1.0
    assert row.threshold == pytest.approx(0.01 / 3)
    assert not row.significant
    tab = S.table3(res, "short")
    assert list(tab.columns) == ["DL vs RGB", "DL vs MHL", "RGB vs MHL", "threshold"]
    assert tab.loc["auc_macro", "threshold"] == pytest.approx(0.01 / 3)
    with pytest.raises(ValueError, match="regime"):
        S.table3(res, "long")


def test_welch_rejects_bad_input():
    pf = make_per_fold()
    with pytest.raises(ValueError, match="family"):
        S.welch_family_tests(pf, families=("DL", "ViT"))
    with pytest.raises(ValueError, match="metric"):
        S.welch_family_tests(pf, metrics=("f1_macro",))
    with pytest.raises(ValueError, match="lacks column"):
        S.welch_family_tests(pf.drop(columns="family"))


# ---------------------------------------------------------------------------------------------
# normality-driven choices
# ---------------------------------------------------------------------------------------------
def test_shapiro_path_choice():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = 0.6 * x + rng.normal(size=200)
    res = S.shapiro_then_correlate(x, y)
    assert res["method"] == "pearson" and res["normal_x"] and res["normal_y"]
    assert res["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert res["n"] == 200

    xs = rng.exponential(size=200) ** 3  # clearly skewed
    ys = xs + rng.exponential(size=200) ** 3
    res = S.shapiro_then_correlate(xs, ys)
    assert res["method"] == "spearman" and not res["normal_x"]
    # Spearman = Pearson on ranks
    assert res["r"] == pytest.approx(np.corrcoef(sps.rankdata(xs), sps.rankdata(ys))[0, 1])

    with pytest.raises(ValueError, match="constant"):
        S.shapiro_then_correlate(np.ones(10), x[:10])
    with pytest.raises(ValueError, match="equal lengths"):
        S.shapiro_then_correlate(x[:10], y[:11])


def test_zscore_and_describe():
    v = np.array([1.0, 2.0, 4.0, 5.0])
    # mean 3, sample SD sqrt((4 + 1 + 1 + 4)/3) = sqrt(10/3)
    np.testing.assert_allclose(S.zscore(v), (v - 3) / math.sqrt(10 / 3))
    np.testing.assert_allclose(S.zscore(np.array([1.0, np.nan, 3.0])), [-1 / math.sqrt(2), np.nan, 1 / math.sqrt(2)])
    with pytest.raises(ValueError, match="constant"):
        S.zscore(np.ones(4))

    rng = np.random.default_rng(2)
    normal = rng.normal(0.9, 0.03, 100)
    d = S.describe(normal)
    assert d["normal"] is True
    assert d["text"] == f"{normal.mean():.3f} \u00b1 {normal.std(ddof=1):.3f}"
    skewed = rng.lognormal(0, 1.5, 100)
    d = S.describe(skewed)
    q1, med, q3 = np.percentile(skewed, [25, 50, 75])
    assert d["normal"] is False
    assert d["text"] == f"{med:.3f} (IQR {q1:.3f}-{q3:.3f}; mean {skewed.mean():.3f})"
    assert d["iqr"] == pytest.approx(q3 - q1)


# ---------------------------------------------------------------------------------------------
# corrected resampled t-test and effect sizes
# ---------------------------------------------------------------------------------------------
A = np.array([0.90, 0.85, 0.88, 0.91, 0.87])
B = np.array([0.86, 0.84, 0.83, 0.90, 0.85])


def test_corrected_ttest_hand_example():
    # d = 0.04 0.01 0.05 0.01 0.02; mean 0.026; squared deviations 0.000196 0.000256 0.000576
    # 0.000256 0.000036, sum 0.00132, sample variance 0.00033.
    # n_train 176, n_test 44: factor 1/5 + 44/176 = 0.45; se = sqrt(0.45 * 0.00033) = 0.0121861
    # t = 0.026 / 0.0121861 = 2.13358, df = 4.
    r = S.corrected_resampled_ttest(A, B, n_train=176, n_test=44)
    se = math.sqrt(0.45 * 0.00033)
    assert r["mean_diff"] == pytest.approx(0.026)
    assert r["se"] == pytest.approx(se)
    assert r["t"] == pytest.approx(0.026 / se) and r["t"] == pytest.approx(2.13358, abs=1e-5)
    assert r["df"] == 4
    assert r["p"] == pytest.approx(2 * sps.t.sf(0.026 / se, 4))
    q = sps.t.ppf(0.975, 4)  # 2.7764
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.026 - q * se, 0.026 + q * se))
    # default ratio for k-fold is 1/(k-1) = 0.25: the same here
    assert S.corrected_resampled_ttest(A, B)["t"] == pytest.approx(r["t"])
    # with a vanishing test/train ratio it is the ordinary paired t-test (t = 3.2004)
    naive = S.corrected_resampled_ttest(A, B, n_train=1e12, n_test=1e-12)
    ref = sps.ttest_rel(A, B)
    assert naive["t"] == pytest.approx(ref.statistic) and naive["p"] == pytest.approx(ref.pvalue)
    assert naive["t"] == pytest.approx(3.2004, abs=1e-4)
    assert r["p"] > naive["p"]  # the correction is more conservative


def test_corrected_ttest_degenerate_and_bad():
    r = S.corrected_resampled_ttest(A, A)
    assert (r["t"], r["p"]) == (0.0, 1.0)
    r = S.corrected_resampled_ttest(A + 0.1, A)
    assert math.isnan(r["t"]) and "constant" in r["note"]
    with pytest.raises(ValueError, match="equal lengths"):
        S.corrected_resampled_ttest(A, B[:4])
    with pytest.raises(ValueError, match="both n_train and n_test"):
        S.corrected_resampled_ttest(A, B, n_train=10)
    with pytest.raises(ValueError, match="NaN"):
        S.corrected_resampled_ttest([0.1, np.nan, 0.3], [0.1, 0.2, 0.3])


def test_paired_effect_size():
    r = S.paired_effect_size(A, B)
    d = A - B
    assert r["d_z"] == pytest.approx(d.mean() / d.std(ddof=1))  # 0.026 / sqrt(0.00033) = 1.4313
    assert r["d_z"] == pytest.approx(1.43125, abs=1e-4)
    # test inversion: the observed t sits at the 97.5% / 2.5% points of nct at the bounds
    t_obs = r["d_z"] * math.sqrt(5)
    assert sps.nct.cdf(t_obs, 4, r["ci_low"] * math.sqrt(5)) == pytest.approx(0.975, abs=1e-7)
    assert sps.nct.cdf(t_obs, 4, r["ci_high"] * math.sqrt(5)) == pytest.approx(0.025, abs=1e-7)
    # the corrected interval is wider
    rc = S.paired_effect_size(A, B, n_train=176, n_test=44)
    assert rc["ci_low"] < r["ci_low"] and rc["ci_high"] > r["ci_high"]
    # large k: agrees with the normal approximation d +- 1.96 sqrt(1/k + d^2 / (2k))
    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 1, 400)
    big = S.paired_effect_size(x, np.zeros(400))
    se = math.sqrt(1 / 400 + big["d_z"] ** 2 / 800)
    assert big["ci_low"] == pytest.approx(big["d_z"] - 1.96 * se, abs=5e-3)
    assert big["ci_high"] == pytest.approx(big["d_z"] + 1.96 * se, abs=5e-3)


def test_paired_effect_size_three_folds_far_tail():
    """3 folds (the ci scale; df = 2) with a large t: scipy's nct.cdf is NaN in the bracket's
    tail (t 12, nc -8), which stopped the statistics chapter of a user's own 3-fold run. The
    interval is finite and still the test inversion."""
    # the scipy behaviour this guards against (scipy 1.17.1): sps.nct.cdf(12.0, 2, -8.0) is NaN
    for t in (12.0, -12.0, -12.75, 40.0):
        lo, hi = S._nct_ci(t, 2, 0.95)
        assert np.isfinite([lo, hi]).all() and lo < hi
        assert sps.nct.cdf(t, 2, lo) == pytest.approx(0.975, abs=1e-7)
        assert sps.nct.cdf(t, 2, hi) == pytest.approx(0.025, abs=1e-7)
    # through the public function: three folds whose differences (0.35 -+ 0.05068) give
    # t = d_z sqrt(3) = 11.96, one of the t's whose bracket reached scipy's NaN (the old code raised)
    r = S.paired_effect_size([0.79932, 0.85, 0.90068], [0.50, 0.50, 0.50])
    assert r["d_z"] * math.sqrt(3) == pytest.approx(11.96, abs=0.01)
    assert np.isfinite([r["d_z"], r["ci_low"], r["ci_high"]]).all()
    assert r["ci_low"] < r["d_z"] < r["ci_high"]


def test_paired_network_comparisons():
    pf = make_per_fold(3)
    res = S.paired_network_comparisons(pf, metrics=("auc_macro",), correction="holm")
    n_net, n_fam = math.comb(10, 2), math.comb(3, 2)
    assert len(res) == 2 * (n_net + n_fam)
    sub = pf[(pf.regime == "long") & (pf.metric == "auc_macro")]
    # one network pair, directly
    row = res[(res.regime == "long") & (res.level == "network") & (res.a == "VGG16") & (res.b == "RGB")].iloc[0]
    a = sub[sub.network == "VGG16"].sort_values("fold")["value"].to_numpy()
    b = sub[sub.network == "RGB"].sort_values("fold")["value"].to_numpy()
    ref = S.corrected_resampled_ttest(a, b)
    assert row.k == 5 and row.t == pytest.approx(ref["t"]) and row.p == pytest.approx(ref["p"])
    # families: per-fold mean over the family's networks
    frow = res[(res.regime == "long") & (res.level == "family") & (res.a == "DL") & (res.b == "RGB")].iloc[0]
    fa = sub[sub.family == "DL"].groupby("fold")["value"].mean().to_numpy()
    fb = sub[sub.family == "RGB"].groupby("fold")["value"].mean().to_numpy()
    assert frow.mean_diff == pytest.approx((fa - fb).mean())
    assert frow.t == pytest.approx(S.corrected_resampled_ttest(fa, fb)["t"])
    # Holm within the 45 network tests of one regime/metric, by hand
    blk = res[(res.regime == "long") & (res.level == "network")]
    p = blk["p"].to_numpy()
    order = np.argsort(p)
    m = p.size
    holm = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        holm[i] = running
    np.testing.assert_allclose(blk["p_adj"].to_numpy(), holm)
    # Bonferroni variant
    bon = S.paired_network_comparisons(pf, metrics=("auc_macro",), correction="bonferroni")
    bb = bon[(bon.regime == "long") & (bon.level == "family")]
    np.testing.assert_allclose(bb["p_adj"], np.minimum(1, 3 * bb["p"]))
    with pytest.raises(ValueError, match="correction"):
        S.paired_network_comparisons(pf, correction="fdr")


def test_paired_comparisons_missing_fold():
    pf = make_per_fold(4)
    pf = pf[~((pf.network == "MHL") & (pf.fold == 2))]
    res = S.paired_network_comparisons(pf, metrics=("recall_macro",))
    row = res[(res.level == "network") & (res.a == "VGG16") & (res.b == "MHL")].iloc[0]
    assert row.k == 4 and row.df == 3


# ---------------------------------------------------------------------------------------------
# power
# ---------------------------------------------------------------------------------------------
def test_minimum_detectable_effect_vs_statsmodels():
    for k in (5, 10):
        ref = TTestPower().solve_power(nobs=k, alpha=0.05, power=0.8, alternative="two-sided")
        assert S.minimum_detectable_effect(k, 0.05, 0.8, ratio=0.0) == pytest.approx(ref, rel=1e-5)
    # corrected: noncentrality scaled by sqrt((1/k) / (1/k + 1/(k-1))) at k = 5 -> sqrt(0.2/0.45)
    naive = S.minimum_detectable_effect(5, ratio=0.0)
    corr = S.minimum_detectable_effect(5, ratio=None)
    assert corr == pytest.approx(naive * math.sqrt(0.45 / 0.2), rel=1e-6)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_minimum_detectable_effect_has_its_power_by_simulation_in_scipys_nan_tail(k):
    """At alpha = 0.05 / 6 and k = 3 or 4, scipy's noncentral t gives NaN for the lower tail near
    the root; read as a power of 1, that put d_z at 7.71 / 6.84 (k = 3, plain / corrected: the
    corrected test below the plain one) and 3.60 (k = 4, power 0.72). A simulation of the paired
    t statistic at the returned d_z gives power 0.80, and the corrected test always needs more."""
    alpha = 0.05 / 6
    rng = np.random.default_rng(k)
    for ratio in (0.0, None):
        d = S.minimum_detectable_effect(k, alpha, 0.8, ratio)
        r = 1.0 / (k - 1) if ratio is None else ratio
        nc = d / math.sqrt(1.0 / k + r)
        z = rng.normal(size=400_000) + nc
        t = z / np.sqrt(rng.chisquare(k - 1, 400_000) / (k - 1))
        crit = sps.t.ppf(1 - alpha / 2, k - 1)
        assert np.mean(np.abs(t) > crit) == pytest.approx(0.8, abs=0.005)
    assert S.minimum_detectable_effect(k, alpha, 0.8, None) > S.minimum_detectable_effect(k, alpha, 0.8, 0.0)


def test_power_statement_states_numbers():
    txt = S.power_statement(k=5, n_comparisons=3)
    assert "k = 5" in txt and "4 degrees of freedom" in txt
    assert f"{S.minimum_detectable_effect(5, 0.05 / 3, 0.8, 0.0):.2f}" in txt
    assert f"{S.minimum_detectable_effect(5, 0.05 / 3, 0.8, None):.2f}" in txt
    assert "cannot" in txt


def test_minimum_detectable_effect_small_k_does_not_crash():
    # scipy's nct gives NaN at large noncentrality for df <= 3; the power there is 1.
    for k in (2, 3, 4):
        for alpha in (0.05, 0.05 / 3):
            d = S.minimum_detectable_effect(k=k, alpha=alpha, ratio=None)
            assert np.isfinite(d) and d > S.minimum_detectable_effect(k=k + 1, alpha=alpha, ratio=None)


# ---------------------------------------------------------------------------------------------
# Table 3 assembly, the naive paired p, the minimum-detectable-effect table (from 09_statistics)
# ---------------------------------------------------------------------------------------------
def test_table3_tests_missing_family_and_bonferroni_over_all_pairs():
    pf = make_per_fold()
    # a constant family in one (regime, metric): Welch undefined there
    pf.loc[(pf.family == "MHL") & (pf.regime == "long") & (pf.metric == "auc_macro"), "value"] = 0.5
    pf.loc[(pf.family == "RGB") & (pf.regime == "long") & (pf.metric == "auc_macro"), "value"] = 0.75  # exact in binary: variance 0
    fams = ("DL", "RGB", "MHL", "Classical")  # Classical has no results: 3 of 6 pairs missing
    welch, nc = S.table3_tests(pf, families=fams, metrics=("recall_macro", "auc_macro"), alpha=0.05)
    assert len(welch) == 6 * 2 * 2  # pairs x regimes x metrics, missing pairs included
    assert [d["what"] for d in nc] == ["Welch DL vs Classical", "Welch RGB vs Classical", "Welch MHL vs Classical",
                                       "Welch RGB vs MHL, auc_macro, long"]
    assert nc[0]["why"] == "family Classical has no results in this run"
    assert np.allclose(welch["threshold"], 0.05 / 6)
    missing = welch[welch.family_b == "Classical"]
    assert (missing[["n_a", "n_b"]] == 0).all().all() and missing["p"].isna().all()
    assert not missing["significant"].any()
    done = welch[welch.family_b != "Classical"].dropna(subset=["p"])
    assert len(done) == 3 * 2 * 2 - 1
    for r in done.itertuples():
        sel = (pf.regime == r.regime) & (pf.metric == r.metric)
        a = pf.loc[sel & (pf.family == r.family_a), "value"]
        b = pf.loc[sel & (pf.family == r.family_b), "value"]
        ref = sps.ttest_ind(a, b, equal_var=False)
        assert (r.t, r.p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-10)
        assert r.p_bonferroni == pytest.approx(min(1.0, 6 * ref.pvalue))
        assert r.significant == (ref.pvalue < 0.05 / 6)
    # the paper's layout reads it: the missing pairs are "n/a", the threshold is over 6 pairs
    t3 = S.table3(welch, "short")
    assert (t3["DL vs Classical"] == "n/a").all() and t3["threshold"].iloc[0] == pytest.approx(0.05 / 6)


def test_table3_tests_empty_run_and_bad_input():
    empty = pd.DataFrame(columns=["network", "family", "fold", "regime", "metric", "value"])
    for run_without_results in (empty, pd.DataFrame()):
        welch, nc = S.table3_tests(run_without_results)
        assert welch.empty and len(nc) == 3
    assert nc[0] == {"what": "Welch DL vs RGB", "why": "family DL, RGB has no results in this run"}
    with pytest.raises(ValueError, match="alpha"):
        S.table3_tests(make_per_fold(), alpha=1.5)
    with pytest.raises(ValueError, match="distinct"):
        S.table3_tests(make_per_fold(), families=("DL", "DL"))


def test_naive_paired_p_equals_scipy_ttest_rel():
    rng = np.random.default_rng(3)
    ts, ks, refs = [], [], []
    for k in (3, 5, 8):
        a = rng.normal(0.85, 0.03, k)
        b = a - rng.normal(0.02, 0.02, k)
        corrected = S.corrected_resampled_ttest(a, b, n_train=176, n_test=44)
        ts.append(corrected["t"])
        ks.append(k)
        refs.append(sps.ttest_rel(a, b).pvalue)
        assert float(S.naive_paired_p(corrected["t"], k, 44 / 176)) == pytest.approx(refs[-1], rel=1e-9)
        assert refs[-1] < corrected["p"]  # the plain test is the more liberal one
    assert S.naive_paired_p(ts, ks, 44 / 176) == pytest.approx(refs, rel=1e-9)  # vectorised
    assert np.isnan(S.naive_paired_p(np.nan, 5, 0.25))
    with pytest.raises(ValueError, match="k must be"):
        S.naive_paired_p(1.0, 1, 0.25)
    with pytest.raises(ValueError, match="ratio"):
        S.naive_paired_p(1.0, 5, -0.1)


def _power(dz, k, alpha, ratio):
    """Two-sided power of the (corrected) paired t-test, written out with SciPy's noncentral t."""
    crit = sps.t.ppf(1 - alpha / 2, k - 1)
    nc = dz / math.sqrt(1 / k + ratio)
    return sps.nct.sf(crit, k - 1, nc) + sps.nct.cdf(-crit, k - 1, nc)


def test_minimum_detectable_effect_table():
    tab, nc = S.minimum_detectable_effect_table(ks=(1, 5, 10), alphas=(0.05, 0.05 / 3), k_run=5, ratio_run=0.3)
    assert list(tab.index.names) == ["folds k", "alpha"] and len(tab) == 6
    assert list(tab.columns) == ["d_z, plain paired t", "d_z, Nadeau-Bengio"]
    for k in (5, 10):
        for a in (0.05, 0.05 / 3):
            plain, corr = tab.loc[(k, a)]
            ref = TTestPower().solve_power(nobs=k, alpha=a, power=0.8, alternative="two-sided")
            assert plain == pytest.approx(ref, rel=1e-5)
            ratio = 0.3 if k == 5 else 1 / (k - 1)  # the run's ratio only at the run's k
            assert _power(corr, k, a, ratio) == pytest.approx(0.8, abs=1e-6)
    assert tab.loc[(1, 0.05)].isna().all()
    assert [d["what"] for d in nc] == ["minimum detectable effect, k = 1, alpha = 0.05"] * 2 + [
        "minimum detectable effect, k = 1, alpha = 0.01667"] * 2
    assert "k must be an integer >= 2" in nc[0]["why"]
    assert S.minimum_detectable_effect_or_nan(5, 0.05, 0.8, 0.0) == (S.minimum_detectable_effect(5), "")
    d, why = S.minimum_detectable_effect_or_nan(5, 1.2)
    assert np.isnan(d) and "alpha" in why
