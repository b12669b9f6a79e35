import numpy as np
import pandas as pd
import pytest

from cellstudy import findings, stats


def _tidy(values: dict[str, list[float]]) -> pd.DataFrame:
    fam = {"rf": "Classical", "logreg": "Classical", "mhl": "MHL", "vgg16": "DL"}
    rows = [{"network": n, "family": fam[n], "fold": k, "regime": "long", "metric": "auc_macro", "value": v}
            for n, vs in values.items() for k, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_verdicts_chance_baseline_and_ci():
    tidy = _tidy({"vgg16": [0.45, 0.55, 0.5, 0.52, 0.48], "mhl": [0.9, 0.94, 0.88, 0.93, 0.91],
                  "rf": [0.99, 0.98, 1.0, 0.97, 0.99], "logreg": [0.95, 0.96, 0.94, 0.97, 0.93]})
    v = findings.network_verdicts(tidy, n_train=176, n_test=44).set_index("network")
    assert list(v.index) == ["vgg16", "mhl", "rf", "logreg"]        # book order
    assert v.loc["rf", "baseline"] == "rf"                           # the best classical model
    assert not v.loc["vgg16", "beats_chance"] and v.loc["mhl", "beats_chance"]
    # the CI is the Nadeau-Bengio corrected one, centred on the mean
    vals = np.array([0.9, 0.94, 0.88, 0.93, 0.91])
    half = v.loc["mhl", "mean"] - v.loc["mhl", "ci_low"]
    from scipy import stats as sps
    expect = sps.t.ppf(0.975, 4) * np.sqrt((1 / 5 + 44 / 176) * vals.var(ddof=1))
    assert half == pytest.approx(expect)
    # against the baseline: the same numbers as the statistics module's paired test
    tt = stats.corrected_resampled_ttest(vals, [0.99, 0.98, 1.0, 0.97, 0.99], 176, 44)
    assert v.loc["mhl", "diff"] == pytest.approx(tt["mean_diff"]) and v.loc["mhl", "p"] == pytest.approx(tt["p"])
    assert v.loc["vgg16", "versus"] == "worse than"
    assert v.loc["rf", "versus"] == "" and np.isnan(v.loc["rf", "p_adj"])
    text = findings.verdict_sentences(v.reset_index())
    assert any("VGG16" in s and "**not** above chance" in s for s in text)
    assert any("Random forest" in s and "best classical baseline" in s for s in text)
    c = findings.summary_counts(v.reset_index())
    assert c["networks"] == 2 and c["above_chance"] == 1 and c["worse"] >= 1
    best = findings.best_per_family(v.reset_index()).set_index("family")
    assert best.loc["Classical", "network"] == "rf"


def test_verdicts_without_baseline_and_errors():
    tidy = _tidy({"mhl": [0.9, 0.94, 0.88, 0.93, 0.91]})
    v = findings.network_verdicts(tidy, 176, 44)
    assert v["baseline"].isna().all() and (v["versus"] == "").all()
    with pytest.raises(ValueError, match="no 'f1_macro'"):
        findings.network_verdicts(tidy, 176, 44, metric="f1_macro")
    with pytest.raises(ValueError, match="baseline 'rf'"):
        findings.network_verdicts(tidy, 176, 44, baseline="rf")


def test_one_class_folds_and_fold_sizes(tmp_path):
    pred = pd.DataFrame({"network": ["a"] * 4 + ["b"] * 4, "fold": [0, 0, 1, 1] * 2,
                         "regime": "long", "y_pred": [1, 1, 0, 1, 0, 0, 0, 0]})
    bad = findings.one_class_folds(pred)
    assert bad.to_dict("records") == [{"network": "a", "fold": 0, "predicted": 1},
                                      {"network": "b", "fold": 0, "predicted": 0},
                                      {"network": "b", "fold": 1, "predicted": 0}]
    from cellstudy import folds
    labels = np.array([0, 1] * 10)
    groups = np.array([f"g{i}" for i in range(20)])
    ids = np.array([f"c{i}" for i in range(20)])
    f = tmp_path / "folds.csv"
    folds.load_or_make_folds(f, ids, labels, groups, n_splits=5, seed=0)
    n_train, n_test, k = findings.fold_sizes(f)
    assert (n_train, n_test, k) == (16.0, 4.0, 5)
