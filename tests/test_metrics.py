"""cellstudy.learning.metrics against hand-computed cases."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from cellstudy.learning import metrics as M

# ---------------------------------------------------------------------------------------------
# The hand example: 10 cells, 4 normal (label 0) + 6 abnormal (label 1).
# p1 = P(abnormal); values are dyadic fractions so 1 - p1 is exact and ties stay ties.
#   normal   p1: 0.125 0.25 | 0.625 0.75                 -> predicted 0 0 | 1 1   : TN = 2, FP = 2
#   abnormal p1: 0.25 | 0.5625 0.625 0.8125 0.875 0.9375 -> predicted 0 | 1 1 1 1 1: FN = 1, TP = 5
# Per class:
#   recall0 = TN/(TN+FP) = 2/4 = 1/2        recall1 = TP/(TP+FN) = 5/6
#   prec0   = TN/(TN+FN) = 2/3              prec1   = TP/(TP+FP) = 5/7
#   f1_0 = 2*(2/3)*(1/2)/((2/3)+(1/2)) = (2/3)/(7/6) = 4/7
#   f1_1 = 2*(5/7)*(5/6)/((5/7)+(5/6)) = (50/42)/(65/42) = 10/13
# recall_macro    = (1/2 + 5/6)/2 = 2/3
# precision_macro = (2/3 + 5/7)/2 = 29/42
# f1_macro        = (4/7 + 10/13)/2 = 61/91
# f1_weighted     = (4*4/7 + 6*10/13)/10 = 628/910
# accuracy = f1_micro = f1_samples = (2 + 5)/10 = 7/10; balanced accuracy = recall_macro = 2/3
# AUC (class 1 score p1; 6 positives x 4 negatives = 24 pairs; count neg < pos, ties 1/2):
#   pos 0.25 -> 1 + 0.5 (tie with 0.25) = 1.5; 0.5625 -> 2; 0.625 -> 2 + 0.5 = 2.5;
#   0.8125, 0.875, 0.9375 -> 4 each.  Sum = 18  -> AUC = 18/24 = 0.75.
#   Class 0 (score 1 - p1) gives the same 0.75, so auc_macro = auc_weighted = 0.75.
# AUC micro: the 20 (one-hot truth, score) pairs flattened; 10 positives, 10 negatives.
#   pos scores: normal's class-0 entries 0.875 0.75 0.375 0.25; abnormal's class-1 entries
#               0.25 0.5625 0.625 0.8125 0.875 0.9375
#   neg scores (sorted): 0.0625 0.125 0.125 0.1875 0.25 0.375 0.4375 0.625 0.75 0.75
#   counts: 0.875 -> 10; 0.75 -> 8 + 2*0.5 = 9; 0.375 -> 5 + 0.5 = 5.5; 0.25 -> 4.5 (twice);
#           0.5625 -> 7; 0.625 -> 7 + 0.5 = 7.5; 0.8125, 0.875, 0.9375 -> 10 each.
#   Sum = 78 -> AUC micro = 78/100 = 0.78.
# ---------------------------------------------------------------------------------------------
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
P1 = np.array([0.125, 0.25, 0.625, 0.75, 0.25, 0.5625, 0.625, 0.8125, 0.875, 0.9375])
PROBA = np.stack([1 - P1, P1], axis=1)

EXPECTED = {
    "recall_macro": 2 / 3,
    "precision_macro": 29 / 42,
    "auc_macro": 0.75,
    "auc_micro": 0.78,
    "auc_weighted": 0.75,
    "f1_samples": 0.7,
    "f1_macro": 61 / 91,
    "f1_micro": 0.7,
    "f1_weighted": 628 / 910,
    "accuracy": 0.7,
    "balanced_accuracy": 2 / 3,
    "tn": 2,
    "fp": 2,
    "fn": 1,
    "tp": 5,
    "n": 10,
}


def rank_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg), by brute force over all (positive, negative) pairs."""
    pos, neg = score[truth == 1], score[truth == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (pos.size * neg.size)


def test_fold_metrics_hand_example():
    m = M.fold_metrics(Y, PROBA)
    for k, v in EXPECTED.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    assert m["warning"] == ""
    assert set(M.METRIC_NAMES) <= set(m)


def test_auc_matches_rank_statistic():
    m = M.fold_metrics(Y, PROBA)
    assert m["auc_macro"] == pytest.approx(rank_auc(Y, P1))
    onehot = np.eye(2, dtype=int)[Y]
    assert m["auc_micro"] == pytest.approx(rank_auc(onehot.ravel(), PROBA.ravel()))
    # a random, larger case (float ties improbable)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 57)
    p = rng.uniform(size=57)
    proba = np.stack([1 - p, p], axis=1)
    m = M.fold_metrics(y, proba)
    assert m["auc_macro"] == pytest.approx(rank_auc(y, p))
    assert m["auc_micro"] == pytest.approx(rank_auc(np.eye(2, dtype=int)[y].ravel(), proba.ravel()))


def test_paper_code_bug_differs_from_ours():
    ours = M.fold_metrics(Y, PROBA)
    pred = PROBA.argmax(axis=1)
    paper = M.paper_code_metrics(Y, pred)
    # study.md section 10: everything the paper's code reports equals accuracy (7/10) ...
    for k in ("recall", "precision", "auc_micro", "f1_samples", "f1_micro"):
        assert paper[k] == pytest.approx(0.7), k
    # ... which does not match our recall, precision and micro AUC on this asymmetric example.
    assert paper["recall"] - ours["recall_macro"] == pytest.approx(0.7 - 2 / 3)  # 0.033
    assert paper["precision"] - ours["precision_macro"] == pytest.approx(0.7 - 29 / 42)  # 0.0095
    assert paper["auc_micro"] - ours["auc_micro"] == pytest.approx(0.7 - 0.78)  # -0.08
    # The swap on its own (macro): swapped recall is our precision and vice versa.
    swapped = M.paper_code_metrics(Y, pred, average="macro")
    assert swapped["recall"] == pytest.approx(29 / 42)
    assert swapped["precision"] == pytest.approx(2 / 3)
    assert swapped["recall"] != pytest.approx(ours["recall_macro"])


def test_one_class_fold_gives_nan_auc_and_warning():
    y = np.ones(4, dtype=int)
    proba = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7]])
    m = M.fold_metrics(y, proba)
    assert math.isnan(m["auc_macro"]) and math.isnan(m["auc_micro"]) and math.isnan(m["auc_weighted"])
    assert "normal" in m["warning"] and "AUC" in m["warning"]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)  # recall of the class present
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (0, 0, 1, 3)


@pytest.mark.parametrize(
    "y, proba, match",
    [
        (Y[:9], PROBA, "9 labels"),
        (Y, PROBA[:, :1], r"shape \(n, 2\)"),
        (Y, np.where(np.arange(10)[:, None] == 3, np.nan, PROBA), "NaN"),
        (Y, PROBA * 1.5, r"\[0, 1\]"),
        (Y, np.full((10, 2), 0.3), "sum to 1"),
        (Y + 1, PROBA, r"label\(s\) \[2\]"),
        (Y.astype(float) + 0.5, PROBA, "non-integer"),
        (np.array([], dtype=int), np.zeros((0, 2)), "empty"),
    ],
)
def test_fold_metrics_rejects_bad_input(y, proba, match):
    with pytest.raises(ValueError, match=match):
        M.fold_metrics(y, proba)


def test_predictions_frame():
    df = M.predictions_frame([f"c{i}" for i in range(10)], list("aabbccddee"), 2, "resnet50", "short", Y, PROBA)
    assert len(df) == 10
    assert list(df.columns) == ["cell_id", "group", "fold", "network", "regime", "y_true", "y_pred",
                                "proba_normal", "proba_abnormal"]
    assert df["y_pred"].tolist() == [0, 0, 1, 1, 0, 1, 1, 1, 1, 1]
    assert (df["fold"] == 2).all() and (df["network"] == "resnet50").all()
    np.testing.assert_allclose(df["proba_abnormal"], P1)
    with pytest.raises(ValueError, match="cell_ids"):
        M.predictions_frame(["a"] * 9, list("aabbccddee"), 0, "vgg16", "short", Y, PROBA)
    with pytest.raises(ValueError, match="duplicates"):
        M.predictions_frame(["a"] * 10, list("aabbccddee"), 0, "vgg16", "short", Y, PROBA)


def _records():
    rng = np.random.default_rng(0)
    recs = []
    for net in ("resnet50", "vgg16", "mhl"):
        for fold in range(5):
            for regime in ("short", "long"):
                p = np.clip(Y * 0.5 + rng.uniform(0, 0.5, 10), 0, 1)
                m = M.fold_metrics(Y, np.stack([1 - p, p], 1))
                recs.append({**m, "network": net, "fold": fold, "regime": regime})
    return recs


def test_tidy_and_summary_tables(tmp_path):
    recs = _records()
    tidy = M.tidy_metrics(recs)
    assert list(tidy.columns) == ["network", "family", "fold", "regime", "metric", "value"]
    # one row per network x fold x regime x numeric metric (warning dropped)
    assert len(tidy) == 3 * 5 * 2 * len(M.METRIC_NAMES)
    assert set(tidy.loc[tidy.network == "mhl", "family"]) == {"MHL"}
    assert set(tidy.loc[tidy.network == "vgg16", "family"]) == {"DL"}

    num = M.summary_numeric(tidy, ["recall_macro", "auc_macro"])
    v = tidy[(tidy.network == "vgg16") & (tidy.regime == "long") & (tidy.metric == "auc_macro")]["value"]
    row = num[(num.network == "vgg16") & (num.regime == "long") & (num.metric == "auc_macro")].iloc[0]
    assert row["mean"] == pytest.approx(v.to_numpy().mean())
    assert row["sd"] == pytest.approx(v.to_numpy().std(ddof=1))
    assert row["n"] == 5

    tab = M.summary_table(tidy, ["recall_macro", "auc_macro"], regime="long")
    assert list(tab.index) == ["vgg16", "resnet50", "mhl"]  # study order, not alphabetical
    assert list(tab.columns) == ["recall_macro", "auc_macro"]
    assert tab.loc["vgg16", "auc_macro"] == f"{v.mean():.3f} \u00b1 {v.std(ddof=1):.3f}"
    both = M.summary_table(tidy, ["auc_macro"])
    assert both.index.names == ["regime", "network"] and len(both) == 6

    paths = M.write_tables(tidy, tmp_path / "tables")
    back = pd.read_parquet(paths["metrics_tidy.parquet"])
    pd.testing.assert_frame_equal(back, tidy)
    assert pd.read_csv(paths["metrics_tidy.csv"]).shape == tidy.shape
    assert (tmp_path / "tables" / "summary_short.csv").exists()
    assert (tmp_path / "tables" / "summary_long.csv").exists()


def test_tidy_rejects_duplicates_and_missing_keys():
    rec = {**M.fold_metrics(Y, PROBA), "network": "vgg16", "fold": 0, "regime": "short"}
    with pytest.raises(ValueError, match="duplicate"):
        M.tidy_metrics([rec, rec])
    with pytest.raises(ValueError, match="regime"):
        M.tidy_metrics([{"network": "vgg16", "fold": 0, "accuracy": 1.0}])
    with pytest.raises(ValueError, match="not in the tidy table"):
        M.summary_table(M.tidy_metrics([rec]), ["nope"])


def test_summary_skips_nan_fold():
    recs = [{"network": "vgg16", "fold": f, "regime": "short", "auc_macro": v}
            for f, v in enumerate([0.8, 0.9, float("nan"), 1.0])]
    num = M.summary_numeric(M.tidy_metrics(recs), ["auc_macro"])
    assert num["n"].item() == 3
    assert num["mean"].item() == pytest.approx(0.9)
    assert num["sd"].item() == pytest.approx(0.1)


def test_write_tables_unwritable(tmp_path):
    tidy = M.tidy_metrics([{"network": "vgg16", "fold": 0, "regime": "short", "accuracy": 1.0}])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="file"):
        M.write_tables(tidy, blocker / "sub")


# ---------------------------------------------------------------------------------------------
# One rule for "the best network" (results chapter, findings, prediction)
# ---------------------------------------------------------------------------------------------
def test_stable_mean_is_the_same_float_in_any_order():
    from cellstudy.learning.metrics import stable_mean
    vals = [0.8409090909090909, 0.8863636363636364, 0.7954545454545454, 0.8863636363636364, 0.8534090909090909]
    means = {stable_mean(p) for p in ([*vals], vals[::-1], [vals[i] for i in (2, 0, 4, 1, 3)])}
    assert len(means) == 1
    assert np.isnan(stable_mean([np.nan, np.nan]))
    assert stable_mean([1.0, np.nan, 0.0]) == 0.5


def test_rank_models_breaks_a_round_off_tie_by_the_sd_then_the_catalogue():
    from cellstudy.learning.metrics import rank_models, tied_with_best
    # vit and rgb differ in the 16th digit only (the run of 2026-12-07): a tie, the lower SD first
    f = pd.DataFrame({"network": ["vit", "rgb", "mhl", "vgg16"],
                      "mean": [0.9016666666666666, 0.9016666666666667, 0.90125, 0.8925],
                      "sd": [0.054, 0.048, 0.070, 0.046]})
    r = rank_models(f)
    assert list(r["network"]) == ["rgb", "vit", "mhl", "vgg16"]
    assert tied_with_best(r) == ["vit"]           # both show 0.902; mhl shows 0.901
    # the SD decides even when the round-off favours the other network
    f2 = f.assign(mean=[0.9016666666666667, 0.9016666666666666, 0.90125, 0.8925])
    assert list(rank_models(f2)["network"])[:2] == ["rgb", "vit"]
    # equal means and SDs: the catalogue's order (vgg16 before vit)
    f3 = pd.DataFrame({"network": ["vit", "vgg16"], "mean": [0.9, 0.9], "sd": [0.05, 0.05]})
    assert list(rank_models(f3)["network"]) == ["vgg16", "vit"]
    # a clear difference is not a tie, whatever the SD
    f4 = pd.DataFrame({"network": ["vit", "rgb"], "mean": [0.91, 0.90], "sd": [0.2, 0.01]})
    assert list(rank_models(f4)["network"]) == ["vit", "rgb"]
    assert tied_with_best(rank_models(f4)) == []
