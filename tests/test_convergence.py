import pandas as pd
import pytest

from cellstudy.learning import convergence


def test_plateau_on_hand_made_histories():
    rising = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.96, 0.99]
    flat_high = [0.5, 0.8, 0.95, 0.98, 0.99, 0.99, 0.99, 1.0, 0.99]
    stuck = [0.55] * 10
    short = [0.9, 0.95, 0.99]
    r = convergence.plateau(rising)
    assert not r["converged"] and "still rising" in r["reason"]
    assert convergence.plateau(flat_high)["converged"]
    s = convergence.plateau(stuck)
    assert not s["converged"] and "< 0.90" in s["reason"]
    assert not convergence.plateau(short)["converged"]
    assert "needs at least 6" in convergence.plateau(short)["reason"]
    # at the ceiling (>= 1 - tol over the last window) a steep rise before it is no longer "rising":
    # DenseNet121 fitted every training cell from epoch 8 of 10 (measured) and was called still rising
    ceiling = [0.54, 0.75, 0.53, 0.78, 0.90, 0.97, 0.99, 1.0, 1.0, 1.0]
    c = convergence.plateau(ceiling)
    assert c["converged"] and c["gain"] > 0.02 and c["reason"] == ""
    assert not convergence.plateau(ceiling[:-1] + [0.93])["converged"]       # mean 0.977 < 0.98: rising
    near = ceiling[:-2] + [0.99, 1.0]                                          # mean 0.997
    assert convergence.plateau(near)["converged"]
    assert not convergence.plateau(near, tol=0.001)["converged"]               # the ceiling follows tol
    # the rule's numbers are arguments
    assert convergence.plateau(stuck, min_accuracy=0.5)["converged"]
    assert convergence.plateau(rising, tol=0.2)["converged"]


def test_plateau_rejects_bad_input():
    with pytest.raises(ValueError, match="window"):
        convergence.plateau([1.0] * 6, window=0)
    with pytest.raises(ValueError, match="non-finite"):
        convergence.plateau([0.5, float("nan")] * 3)


def test_network_convergence_needs_every_fold():
    rows = []
    for fold, acc in ((0, [0.6, 0.9, 0.99, 0.99, 1.0, 1.0, 0.99, 1.0, 1.0]), (1, [0.5, 0.55, 0.6, 0.65, 0.7, 0.8])):
        rows += [{"network": "mhl", "fold": fold, "epoch": e + 1, "accuracy": a} for e, a in enumerate(acc)]
    rows += [{"network": "vit", "fold": 0, "epoch": e + 1, "accuracy": 1.0} for e in range(6)]
    t = convergence.network_convergence(pd.DataFrame(rows))
    mhl = t.set_index("network").loc["mhl"]
    assert not mhl["converged"] and mhl["folds_converged"] == 1 and mhl["n_folds"] == 2
    assert (mhl["epochs_min"], mhl["epochs"]) == (6, 9)     # folds stopped at different epochs
    assert "fold 1" in mhl["why_not"]
    assert t.set_index("network").loc["vit", "converged"]
    assert list(t["network"]) == ["vit", "mhl"]              # the book's order, not the history's
    with pytest.raises(ValueError, match="lacks"):
        convergence.network_convergence(pd.DataFrame({"network": ["a"]}))
    assert "last 3 epochs" in convergence.rule_text() and "at least 0.98, the ceiling" in convergence.rule_text()
