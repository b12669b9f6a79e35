"""Did a network train to its plateau? A stated rule on the per-epoch training history.

study.md section 12: every scale trains each network until its training accuracy plateaus in the
long regime. This module says, from a run's ``history.csv`` (one row per epoch: epoch, loss,
accuracy), whether that happened, with one rule for every network:

A (network, fold) run is **converged** when, over its last ``window`` epochs,

1. the training accuracy is at least ``min_accuracy`` on average (the network fits its training
   cells; a network stuck at the class prior, ~0.55 here, has "plateaued" without learning), and
2. the training accuracy has stopped rising: the mean of the last ``window`` epochs exceeds the
   mean of the ``window`` epochs before them by less than ``tol``, **or** it is at least
   ``1 - tol`` (the ceiling: no room is left to rise by ``tol``; a network that has fitted every
   training cell for the last epochs is on its plateau however fast it got there. Without this
   clause a run at 1.0 for three epochs after 0.90-0.99 was called "still rising").

A run with fewer than ``2 * window`` epochs cannot show a plateau and is not converged. A network
is converged when every one of its folds is. Defaults (``window`` 3, ``tol`` 0.02,
``min_accuracy`` 0.9) are the rule the book states; they are arguments, not hidden constants.
Pure functions on small frames; no TensorFlow.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

WINDOW = 3
TOL = 0.02
MIN_ACCURACY = 0.9


def rule_text(window: int = WINDOW, tol: float = TOL, min_accuracy: float = MIN_ACCURACY) -> str:
    """The rule in one sentence, for the book."""
    return (f"a (network, fold) run is *converged* when its mean training accuracy over the last "
            f"{window} epochs is at least {min_accuracy:.2f} and either exceeds that of the {window} "
            f"epochs before them by less than {tol:.2f} or is at least {1 - tol:.2f}, the ceiling (it fits "
            f"the training cells and has stopped improving, or has no room left to); a network is "
            f"converged when all its folds are")


def plateau(accuracy: Sequence[float], window: int = WINDOW, tol: float = TOL,
            min_accuracy: float = MIN_ACCURACY) -> dict:
    """The rule on one run's per-epoch training accuracy ``(E,)`` (epoch order).

    Returns ``{"converged": bool, "final_accuracy", "last_mean", "previous_mean", "gain",
    "epochs", "reason"}``; ``reason`` says why a run is not converged ("" when it is).
    ValueError for a window < 1 or non-finite accuracies."""
    if int(window) < 1:
        raise ValueError(f"window={window!r}; expected an int >= 1")
    a = np.asarray(accuracy, dtype=np.float64).ravel()
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"accuracy has non-finite values: {a.tolist()}")
    out = {"converged": False, "final_accuracy": float(a[-1]) if a.size else float("nan"),
           "last_mean": float("nan"), "previous_mean": float("nan"), "gain": float("nan"),
           "epochs": int(a.size), "reason": ""}
    if a.size < 2 * window:
        out["reason"] = f"{a.size} epoch(s): a plateau needs at least {2 * window}"
        return out
    last, prev = float(a[-window:].mean()), float(a[-2 * window:-window].mean())
    out.update(last_mean=last, previous_mean=prev, gain=last - prev)
    if last < min_accuracy:
        out["reason"] = f"training accuracy {last:.3f} < {min_accuracy:.2f} over the last {window} epochs"
    elif last - prev >= tol and last < 1 - tol:
        out["reason"] = f"still rising: +{last - prev:.3f} over the last {window} epochs"
    else:
        out["converged"] = True
    return out


def convergence_table(history: pd.DataFrame, window: int = WINDOW, tol: float = TOL,
                      min_accuracy: float = MIN_ACCURACY) -> pd.DataFrame:
    """One row per (network, fold) of a history frame (columns network, fold, epoch, accuracy):
    the :func:`plateau` fields."""
    need = {"network", "fold", "epoch", "accuracy"}
    if not need <= set(history.columns):
        raise ValueError(f"history lacks column(s) {sorted(need - set(history.columns))}")
    rows = []
    for (net, fold), g in history.sort_values("epoch").groupby(["network", "fold"], sort=False):
        rows.append({"network": net, "fold": int(fold),
                     **plateau(g["accuracy"].to_numpy(), window, tol, min_accuracy)})
    return pd.DataFrame(rows, columns=["network", "fold", "converged", "final_accuracy", "last_mean",
                                       "previous_mean", "gain", "epochs", "reason"])


def network_convergence(history: pd.DataFrame, window: int = WINDOW, tol: float = TOL,
                        min_accuracy: float = MIN_ACCURACY) -> pd.DataFrame:
    """One row per network, in the book's order (``networks.ordered``): ``converged`` (all folds),
    ``folds_converged`` / ``n_folds``, the median final training accuracy, and the reasons of the
    folds that did not converge."""
    t = convergence_table(history, window, tol, min_accuracy)
    from cellstudy import networks

    rows = []
    for net in networks.ordered(t["network"]):
        g = t[t["network"] == net]
        bad = g[~g["converged"]].sort_values("fold")
        rows.append({"network": net, "converged": bool(len(bad) == 0),
                     "folds_converged": int(g["converged"].sum()), "n_folds": int(len(g)),
                     "final_train_accuracy": float(g["final_accuracy"].median()),
                     "epochs_min": int(g["epochs"].min()), "epochs": int(g["epochs"].max()),
                     "why_not": "; ".join(f"fold {r.fold}: {r.reason}" for r in bad.itertuples())})
    return pd.DataFrame(rows, columns=["network", "converged", "folds_converged", "n_folds",
                                       "final_train_accuracy", "epochs_min", "epochs", "why_not"])
