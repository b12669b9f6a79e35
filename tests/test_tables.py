"""The book's narrow tables (cellstudy.report.tables): nothing lost, readable headers."""
import numpy as np
import pandas as pd
import pytest

from cellstudy.learning import metrics
from cellstudy.report import tables


def test_column_chunks_keep_every_column_once_in_order():
    t = pd.DataFrame(np.arange(18).reshape(2, 9), index=["VGG16", "MHL"], columns=list(metrics.TABLE_METRICS))
    parts = tables.column_chunks(t, size=5)
    assert [len(p.columns) for p in parts] == [5, 4]
    # the book's split: one kind of metric a table (recall and precision, AUC, F1)
    kinds = tables.column_chunks(t, keep_level=tables.metric_kind)
    assert [list(p.columns) for p in kinds] == [["recall_macro", "precision_macro"],
                                                ["auc_macro", "auc_micro", "auc_weighted"],
                                                ["f1_samples", "f1_macro", "f1_micro", "f1_weighted"]]
    assert [c for p in parts for c in p.columns] == list(t.columns)
    for p in parts:
        assert list(p.index) == ["VGG16", "MHL"]
        pd.testing.assert_frame_equal(p, t[p.columns])
    assert len(tables.column_chunks(t[t.columns[:4]])) == 1
    assert [len(p.columns) for p in tables.column_chunks(t, size=3)] == [3, 3, 3]
    assert [len(p.columns) for p in tables.column_chunks(t.iloc[:, :6], size=5)] == [3, 3]
    with pytest.raises(ValueError, match="at least 1"):
        tables.column_chunks(t, size=0)


def test_ci_text():
    assert tables.ci_text(0.89249, 0.8064, 0.97851) == "0.892 (0.806–0.979)"
    assert tables.ci_text(0.9, float("nan"), 1.0) == "0.900"
    assert tables.ci_text(float("nan"), 0.1, 0.2) == ""


def _verdicts():
    return pd.DataFrame({
        "network": ["vgg16", "rf", "logreg"], "display": ["VGG16", "Random forest", "Logistic regression"],
        "family": ["DL", "Classical", "Classical"], "k": [5, 5, 5], "mean": [0.8925, 0.876, 0.9025],
        "sd": [0.046, 0.047, 0.048], "ci_low": [0.8065, 0.789, 0.813], "ci_high": [0.9785, 0.964, 0.992],
        "beats_chance": [True, True, True], "baseline": ["logreg", "logreg", "logreg"],
        "diff": [-0.01, -0.026, np.nan], "diff_low": [-0.1419, -0.113, np.nan], "diff_high": [0.1219, 0.061, np.nan],
        "p": [0.84, 0.448, np.nan], "p_adj": [1.0, np.nan, np.nan], "d_z": [-0.141, -0.56, np.nan],
        "versus": ["not distinguishable from", "not distinguishable from", ""], "note": ["", "", ""]})


def test_verdicts_table_reads_as_the_sentences_do():
    t = tables.verdicts(_verdicts())
    assert list(t.index) == ["VGG16", "Random forest", "Logistic regression"]
    diff = "vs Logistic regression: difference (95% CI)"
    assert list(t.columns) == ["family", "folds", "AUC (95% CI)", "beats chance", diff, "p", "d_z", "verdict"]
    assert t.loc["VGG16", "AUC (95% CI)"] == "0.892 (0.806–0.979)"   # 0.8925 is 0.892 in the book
    assert t.loc["VGG16", diff] == "-0.010 (-0.142 to +0.122)"
    assert t.loc["VGG16", "p"] == "1" and t.loc["VGG16", "d_z"] == "-0.14"
    assert t.loc["Random forest", "p"] == "0.448 (unadj.)"   # a classical model is outside Holm's family
    assert t.loc["Logistic regression", "verdict"] == "the baseline"
    assert t.loc["Logistic regression", diff] == "" and t.loc["Logistic regression", "p"] == ""
    assert t.loc["VGG16", "beats chance"] == "yes"


def test_convergence_table():
    conv = pd.DataFrame({"network": ["vgg16", "mhl"], "converged": [True, False], "folds_converged": [5, 4],
                         "n_folds": [5, 5], "final_train_accuracy": [0.92329, 0.9],
                         "epochs_min": [18, 30], "epochs": [25, 30], "why_not": ["", "fold 2: still rising"]})
    t = tables.convergence(conv, {"vgg16": "VGG16", "mhl": "MHL"}.get)
    assert t.loc["VGG16", "epochs"] == "18–25" and t.loc["MHL", "epochs"] == "30"
    assert t.loc["MHL", "folds on the plateau"] == "4 of 5" and t.loc["MHL", "on its plateau"] == "no"
    assert t.loc["VGG16", "final training accuracy (median)"] == "0.923"
    assert t.loc["MHL", "why not"] == "fold 2: still rising"
    assert "why not" not in tables.convergence(conv.iloc[:1]).columns


def test_importance_table():
    imp = pd.DataFrame({"classifier": ["rf", "rf"], "group": ["actin", "shape"], "auc_drop_mean": [0.1193125, 0.0695],
                        "auc_drop_sd": [0.0880002, 0.0419], "n_folds": [5, 5], "auc": [0.87625, 0.87625]})
    t = tables.importance(imp, {"rf": "Random forest"}, {"actin": "F-actin"})
    assert t.index.tolist() == [("Random forest", "F-actin"), ("Random forest", "shape")]
    assert t.loc[("Random forest", "F-actin"), "AUC drop when permuted (mean ± SD)"] == "0.119 ± 0.088"
    assert t.loc[("Random forest", "shape"), "AUC"] == "0.876"


def test_readable_joins_intervals_renames_and_reads_booleans():
    faith = pd.DataFrame({"network": ["vgg16"], "method": ["gradcam"], "curve": ["deletion"], "auc": [0.76234],
                          "random_auc": [0.7401], "difference": [0.0222], "ci_low": [-0.0291], "ci_high": [0.0771],
                          "beats_random": [False], "n_cells": [38]})
    t = tables.readable(faith, {"network": "network", "method": "method", "curve": "curve", "auc": "AUC",
                                "diff": "difference (95% CI)", "beats_random": "beats random", "n_cells": "cells"},
                        index=["network", "method", "curve"], ci={"diff": ("difference", "ci_low", "ci_high")},
                        display={"vgg16": "VGG16"}.get)
    row = t.loc[("VGG16", "gradcam", "deletion")]
    assert row["AUC"] == "0.762" and row["difference (95% CI)"] == "0.022 (-0.029 to 0.077)"
    assert row["beats random"] == "no" and row["cells"] == 38
    assert list(t.columns) == ["AUC", "difference (95% CI)", "beats random", "cells"]
    assert tables.readable(faith, {"curve": "curve", "auc": "AUC"}).index.name == "curve"
    with pytest.raises(KeyError, match="nope"):
        tables.readable(faith, {"nope": "x"})


def test_column_chunks_keep_a_networks_columns_together():
    cols = pd.MultiIndex.from_tuples([(n, s) for n in ("VGG16", "ResNet50", "DenseNet121") for s in (64, 512)],
                                     names=["network", "image_size"])
    t = pd.DataFrame([[1] * 6, [2] * 6], index=["n_params", "gradcam_grid"], columns=cols)
    parts = tables.column_chunks(t, size=4, keep_level=0)
    assert [list(p.columns.get_level_values(0).unique()) for p in parts] == [["VGG16", "ResNet50"], ["DenseNet121"]]
    assert sum(len(p.columns) for p in parts) == 6
    # plain cutting would have split ResNet50's two sizes
    assert [len(p.columns) for p in tables.column_chunks(t, size=4)] == [3, 3]


def test_numbers_are_written_as_the_books_sentences_write_them():
    # numpy rounds 0.8775 up (0.878); the book's f"{:.3f}" writes the stored value, 0.877
    t = pd.DataFrame({"network": ["mhl"], "balanced_accuracy": [0.8775], "p": [0.000123]})
    r = tables.readable(t, {"network": "network", "balanced_accuracy": "balanced accuracy", "p": "p"},
                        formats={"p": ".3g"})
    assert r.loc["mhl", "balanced accuracy"] == f"{0.8775:.3f}" == "0.877"
    assert r.loc["mhl", "p"] == "0.000123"            # not 0.000
    assert tables.num_text(float("nan")) == "" and tables.num_text(None) == ""


def test_verdicts_without_a_baseline_show_no_empty_comparison_columns():
    v = _verdicts()
    v = v[v["family"] != "Classical"].assign(baseline=None, versus="", diff=np.nan, diff_low=np.nan,
                                              diff_high=np.nan, p=np.nan, p_adj=np.nan, d_z=np.nan)
    t = tables.verdicts(v)
    assert list(t.columns) == ["family", "folds", "AUC (95% CI)", "beats chance"]
    # a network without a comparison says why (findings' note), and a missing interval is no "+nan"
    w = _verdicts().assign(note=["only 1 fold(s) shared with logreg", "", ""])
    w.loc[0, ["versus", "diff_low", "diff_high"]] = ["", np.nan, np.nan]
    t2 = tables.verdicts(w)
    assert t2.loc["VGG16", "verdict"] == "only 1 fold(s) shared with logreg"
    assert "nan" not in t2.loc["VGG16", "vs Logistic regression: difference (95% CI)"]
