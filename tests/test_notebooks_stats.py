"""Notebooks 09_statistics and 10_reproducibility on a tiny real run (3 networks, 3 folds, ci scale).

The run: the real default cohort at the `ci` scale, networks VGG16 (DL), RGB (RGB) and MHL (MHL),
folds 0-2 of 5, both regimes. The tables the notebooks write are checked against independent
computations (SciPy's Welch test, the Nadeau-Bengio formula written out, parameter counts by hand).
"""
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cellstudy.learning import experiment
from cellstudy import runner, study

pytestmark = pytest.mark.slow

NETWORKS = ["mhl", "rgb", "vgg16"]
OVERRIDES = {"networks": NETWORKS, "folds_to_run": [0, 1, 2]}
METRIC_ROWS = ["recall", "F1", "precision", "AUC-ROC"]


def _params(run, shared_data):
    return {"run_dir": str(run), "data_root": str(shared_data), "cohort": "bbbc021-paper", "scale": "ci",
            "seed": 0, "overrides": OVERRIDES}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data, ci_run):
    """The three networks' trained folds of the session's ci run, copied into a fresh run folder
    (no training here; no 08_xai outputs), then read back by run_networks as a check."""
    run = tmp_path_factory.mktemp("statsrun")
    shutil.copytree(ci_run / "folds", run / "folds")
    for net in NETWORKS:
        for k in OVERRIDES["folds_to_run"]:
            shutil.copytree(ci_run / "training" / net / f"fold{k}", run / "training" / net / f"fold{k}")
    p = study.prepare("bbbc021-paper", "ci", run, data_root=str(shared_data), overrides=OVERRIDES, progress=False)
    for family, step in (("DL", "02_dl_family"), ("RGB", "04_rgb_family"), ("MHL", "05_mhl_family")):
        res = experiment.run_networks(p, family, step, progress=lambda ev: None, echo=lambda s: None)
        assert res.timings["skipped"].all(), "the copied runs must be read back, not retrained"
    return run


@pytest.fixture(scope="module")
def stats_run(tiny_run, shared_data):
    runner.execute_step("09_statistics", tiny_run, _params(tiny_run, shared_data), log_output=False)
    return tiny_run


@pytest.fixture(scope="module")
def repro_run(tiny_run, shared_data):
    runner.execute_step("10_reproducibility", tiny_run, _params(tiny_run, shared_data), log_output=False)
    return tiny_run


def _tidy(run):
    return experiment.collect(run, out=run / "_test_collect").tidy


def _markdown(nb_path):
    import json
    nb = json.loads(nb_path.read_text())
    return "\n".join("".join(o["data"]["text/markdown"]) for c in nb["cells"] for o in c.get("outputs", [])
                     if "text/markdown" in o.get("data", {}))


# ---------------------------------------------------------------------------------------------
# 09_statistics
# ---------------------------------------------------------------------------------------------
def test_table3_in_the_papers_layout_matches_scipy_welch(stats_run):
    out = stats_run / "09_statistics"
    assert runner.notebook_errors(stats_run / "notebooks" / "09_statistics.ipynb") == []
    for regime in ("short", "long"):
        t3 = pd.read_csv(out / f"table3_{regime}.csv", index_col=0)
        assert list(t3.index) == METRIC_ROWS
        assert list(t3.columns) == ["DL vs RGB", "DL vs MHL", "RGB vs MHL", "threshold"]
        assert np.allclose(t3["threshold"], 0.05 / 3)
    welch = pd.read_csv(out / "welch_tests.csv")
    tidy = _tidy(stats_run)
    checked = 0
    for r in welch.itertuples():
        a = tidy[(tidy.regime == r.regime) & (tidy.metric == r.metric) & (tidy.family == r.family_a)]["value"].dropna()
        b = tidy[(tidy.regime == r.regime) & (tidy.metric == r.metric) & (tidy.family == r.family_b)]["value"].dropna()
        assert (r.n_a, r.n_b) == (len(a), len(b)) == (3, 3)  # one network x 3 folds per family
        if np.isfinite(r.p):
            ref = sps.ttest_ind(a, b, equal_var=False)
            assert r.t == pytest.approx(ref.statistic, rel=1e-9)
            assert r.p == pytest.approx(ref.pvalue, rel=1e-9)
            assert r.significant == (r.p < 0.05 / 3)
            checked += 1
    assert checked >= 6, "too few finite Welch tests to check"


def test_fold_sizes_count_original_cells_and_paired_tests_use_them(stats_run):
    out = stats_run / "09_statistics"
    sizes = pd.read_csv(out / "fold_sizes.csv")
    assert len(sizes) == 5 and sizes["n_test"].sum() == 220
    assert ((sizes["n_train"] + sizes["n_test"]) == 220).all()
    assert (sizes["n_train_with_copies"] == 2 * sizes["n_train"]).all()
    ratio = sizes["n_test"].mean() / sizes["n_train"].mean()
    paired = pd.read_csv(out / "paired_comparisons.csv")
    fam = paired[paired["level"] == "family"]
    pairs = {frozenset(p) for p in fam[["a", "b"]].to_numpy().tolist()}
    assert pairs == {frozenset(p) for p in (("DL", "RGB"), ("DL", "MHL"), ("RGB", "MHL"))}
    assert (fam["k"] == 3).all()
    # one comparison recomputed by hand: the Nadeau-Bengio corrected t on the 3 shared folds
    tidy = _tidy(stats_run)
    row = paired[(paired.level == "network") & (paired.metric == "auc_macro") & (paired.regime == "long")
                 & paired.t.notna()].iloc[0]
    wide = tidy[(tidy.metric == "auc_macro") & (tidy.regime == "long")].pivot(index="fold", columns="network",
                                                                               values="value")
    d = (wide[row.a] - wide[row.b]).dropna().to_numpy()
    t = d.mean() / np.sqrt((1 / len(d) + ratio) * d.var(ddof=1))
    assert row.t == pytest.approx(t, rel=1e-9)
    assert row.p == pytest.approx(2 * sps.t.sf(abs(t), len(d) - 1), rel=1e-9)
    assert row.ci_low < row.mean_diff < row.ci_high


def test_descriptives_power_and_what_could_not_be_computed(stats_run):
    out = stats_run / "09_statistics"
    desc = pd.read_csv(out / "descriptive.csv")
    assert set(desc["network"]) == set(NETWORKS) and (desc["n"] <= 3).all()
    assert desc["text"].str.contains("±|IQR").all()
    statement = (out / "power_statement.txt").read_text()
    assert "k = 5 folds" in statement and "cannot support" in statement
    mde = pd.read_csv(out / "minimum_detectable_effect.csv")
    five = mde[(mde["folds k"] == 5) & np.isclose(mde["alpha"], 0.05)].iloc[0]
    assert five["d_z, Nadeau-Bengio"] > five["d_z, plain paired t"] > 1.0
    nc = pd.read_csv(out / "not_computed.csv")
    assert nc["what"].str.contains("Gmean-Shape vs Gmean-GradCam").any()  # no 08_xai in this run
    corr = pd.read_csv(out / "metric_correlations.csv")
    assert set(corr["method"]) <= {"pearson", "spearman"} and len(corr) >= 1
    text = _markdown(stats_run / "notebooks" / "09_statistics.ipynb")
    assert "3 network(s) in 3 famil(ies)" in text and "Only 3 of the 5 folds" in text


def test_statistics_with_one_family_reports_instead_of_failing(tiny_run, shared_data, tmp_path):
    run = tmp_path / "onefamily"
    shutil.copytree(tiny_run / "folds", run / "folds")
    shutil.copytree(tiny_run / "training" / "vgg16", run / "training" / "vgg16")
    runner.execute_step("09_statistics", run, _params(run, shared_data), log_output=False)
    out = run / "09_statistics"
    nc = pd.read_csv(out / "not_computed.csv")
    for pair in ("DL vs RGB", "DL vs MHL", "RGB vs MHL"):
        assert nc["what"].str.contains(f"Welch {pair}").any()
    t3 = pd.read_csv(out / "table3_long.csv", index_col=0, keep_default_na=False)
    assert (t3.drop(columns="threshold") == "n/a").all().all()


# ---------------------------------------------------------------------------------------------
# 10_reproducibility
# ---------------------------------------------------------------------------------------------
def test_metric_swap_on_our_predictions_equals_accuracy(repro_run):
    assert runner.notebook_errors(repro_run / "notebooks" / "10_reproducibility.ipynb") == []
    per_fold = pd.read_csv(repro_run / "10_reproducibility" / "metric_swap_per_fold.csv")
    assert len(per_fold) == 3 * 3 * 2  # networks x folds x regimes
    for col in ("code_recall", "code_precision", "code_auc_micro", "code_f1_samples", "code_f1_micro"):
        assert np.allclose(per_fold[col], per_fold["accuracy"], atol=1e-12), col
    assert (per_fold["ours_max_abs_diff_to_accuracy"] > 1e-6).any()
    summary = pd.read_csv(repro_run / "10_reproducibility" / "metric_swap.csv")
    assert set(summary["network"]) == {"VGG16", "RGB", "MHL"}


def test_reshape_bug_and_head_parameter_counts(repro_run):
    out = repro_run / "10_reproducibility"
    bug = pd.read_csv(out / "reshape_vs_transpose.csv", index_col=0)
    # the authors' chain (cellstudy.data.authors_input): every channel they fed holds the three stains
    # interleaved, from the whole height of the cell but only the left third of each row
    for c in ("third", "actin", "dna"):
        assert np.allclose(bug[f"share of {c} values"], 1 / 3, atol=0.01)
    assert set(bug["cell columns per output row"]) == {"23 of 68"}
    assert len(set(bug["cell rows it shows"])) == 1
    assert (out / "reshape_vs_transpose.png").stat().st_size > 10_000
    heads = pd.read_csv(out / "head_parameters.csv").set_index(["network", "S"])
    # VGG16 by hand: 14,714,688 conv weights; our head 512*1024+1024 + 1024*512+512 + 512*2+2
    ours_head = 512 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 2 + 2
    assert heads.loc[("VGG16", 512), "params (ours)"] == 14_714_688 + ours_head
    flat_head = 16 * 16 * 512 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 2 + 2
    assert heads.loc[("VGG16", 512), "params (Flatten head)"] == 14_714_688 + flat_head == 149_459_266
    for net in ("RGB", "MHL"):  # pooled tokens: a Flatten changes nothing
        assert heads.loc[(net, 32), "params (Flatten head)"] == heads.loc[(net, 32), "params (ours)"]
    cams = pd.read_csv(out / "gradcam_softmax_vs_logit.csv")
    assert 1 <= len(cams) <= 32 and cams["p(true class)"].between(0, 1).all()
