"""Seed replicates: how much of a network's number is the network, and how much its seed.

A study reports each network from one training seed. On ~350 training images the networks of the
default scale are sensitive to it down to round-off (book/default_scale.md, "The plateau, measured again": one
extra forward pass per epoch moved one RGB fold from AUC 0.950 to 0.665). A seed replicate trains
the same network on the **same folds** (the run's folds file: the same cells on each side) with
another training seed: other initial weights, other offline augmented copies, another batch
order. ``cellstudy replicate RUN_DIR --network N --seeds 1 2`` (``workflow.replicate_network``)
trains them into ``<run>/replicates/seed<s>/<N>/fold<k>/`` (``rundir.Run.replicate``), next to
the study's own folds, which it reads as the run's seed and never retrains or overwrites, and
writes ``<run>/replicates/<N>.csv``: one row per (seed, fold, regime).

The functions here are pure: per-fold AUC from a fold folder's files, and the summary table.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

#: Columns of a replicate table (``<run>/replicates/<network>.csv``).
COLUMNS: tuple[str, ...] = ("network", "seed", "fold", "regime", "auc_macro", "balanced_accuracy")
REGIMES: tuple[str, ...] = ("short", "long")


def fold_rows(fold_dir, network: str, seed: int, fold: int) -> list[dict[str, Any]]:
    """The replicate rows of one finished fold folder (``y_test.npy``, ``proba_<regime>.npy``):
    AUC macro and balanced accuracy per regime (``metrics.fold_metrics``, the book's numbers).
    A failed fold (``failed.json``, no probabilities) gives NaN rows: it is a result, not a gap."""
    from pathlib import Path

    from cellstudy.learning import metrics

    p = Path(fold_dir)
    rows = []
    for regime in REGIMES:
        proba = p / f"proba_{regime}.npy"
        if proba.is_file() and (p / "y_test.npy").is_file():
            m = metrics.fold_metrics(np.load(p / "y_test.npy"), np.load(proba))
            auc, bacc = float(m["auc_macro"]), float(m["balanced_accuracy"])
        else:
            auc = bacc = float("nan")
        rows.append({"network": network, "seed": int(seed), "fold": int(fold), "regime": regime,
                     "auc_macro": auc, "balanced_accuracy": bacc})
    return rows


def check_seeds(seeds: Iterable[Any]) -> list[int]:
    """The seeds as distinct ints >= 0, in the order given; ValueError naming the bad value."""
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer, str)) or not str(s).lstrip("-").isdigit():
            raise ValueError(f"seed {s!r}: expected an int >= 0")
        s = int(s)
        if s < 0:
            raise ValueError(f"seed {s}: expected an int >= 0")
        if s in out:
            raise ValueError(f"seed {s} given twice")
        out.append(s)
    if not out:
        raise ValueError("no seed given: expected one or more ints >= 0")
    return out


def summary(table: pd.DataFrame, metric: str = "auc_macro", folds=None) -> pd.DataFrame:
    """Per network and regime: the fold mean of ``metric`` at each seed, and over the seeds their
    mean, SD (ddof 1), min, max and range (SD and range NaN with fewer than 2 complete seeds).

    ``table``: rows of ``COLUMNS`` (``fold_rows``). ``folds``: the folds every seed must have
    (the run's ``experiment.folds_for``); None: every fold that the network's rows name. Returns
    one row per (network, regime) with columns ``seeds`` (complete seeds), ``per_seed`` (``"s:
    value"`` joined by ``", "``), ``mean``, ``sd``, ``min``, ``max``, ``range``. A seed that lacks
    one of the folds (``incomplete``) or has a fold without a value (``failed fold``: a diverged
    run, or a test fold with one class) is named in ``per_seed`` and left out of the spread: fold
    means over different folds are not comparable."""
    need = {"network", "seed", "fold", "regime", metric}
    if missing := need - set(table.columns):
        raise ValueError(f"replicate table lacks columns {sorted(missing)}; expected {sorted(need)}")
    out = []
    for (net, regime), g in table.groupby(["network", "regime"], sort=False):
        want = {int(k) for k in (folds if folds is not None else g["fold"].unique())}
        per, shown = {}, []
        for seed, gs in g.groupby("seed", sort=True):
            by_fold = gs.drop_duplicates("fold", keep="last").set_index("fold")[metric].astype(float)
            if not want <= {int(k) for k in by_fold.index}:
                shown.append(f"{int(seed)}: incomplete")
            elif not np.isfinite(vals := by_fold.loc[sorted(want)].to_numpy()).all():
                shown.append(f"{int(seed)}: failed fold")
            else:
                per[int(seed)] = float(vals.mean())
                shown.append(f"{int(seed)}: {per[int(seed)]:.3f}")
        v = np.array(list(per.values()), float)
        nan = float("nan")
        out.append({"network": net, "regime": regime, "seeds": len(v), "per_seed": ", ".join(shown),
                    "mean": float(v.mean()) if len(v) else nan, "min": float(v.min()) if len(v) else nan,
                    "max": float(v.max()) if len(v) else nan,
                    "sd": float(v.std(ddof=1)) if len(v) > 1 else nan,
                    "range": float(v.max() - v.min()) if len(v) > 1 else nan})
    return pd.DataFrame(out, columns=["network", "regime", "seeds", "per_seed", "mean", "sd", "min", "max",
                                      "range"])


def read_run(run_dir) -> pd.DataFrame:
    """Every replicate table of a run folder (``<run>/replicates/<network>.csv``), concatenated
    in the catalogue's order; an empty frame with ``COLUMNS`` when there is none. ValueError
    naming the file when one lacks a column."""
    from pathlib import Path

    from cellstudy import networks

    d = Path(run_dir) / "replicates"
    files = {p.stem: p for p in sorted(d.glob("*.csv"))} if d.is_dir() else {}
    frames = []
    for name in networks.ordered(files):
        t = pd.read_csv(files[name])
        if missing := set(COLUMNS) - set(t.columns):
            raise ValueError(f"{files[name]} lacks columns {sorted(missing)}; expected {list(COLUMNS)} "
                             "(written by `cellstudy replicate`)")
        frames.append(t[list(COLUMNS)])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))


def sentence(summ: pd.DataFrame, regime: str = "long") -> str:
    """The results chapter's words for ``summary``'s rows of ``regime``: per network its fold-mean
    AUC at each seed and the range, and what the largest range means for comparing networks."""
    from cellstudy import networks

    rows = summ[summ["regime"] == regime]
    if not len(rows):
        return ""
    parts = [f"{networks.DISPLAY.get(r.network, r.network)} {r.per_seed}"
             + (f" (range {r.range:.3f})" if r.seeds > 1 else " (one complete seed: no spread yet)")
             for r in rows.itertuples()]
    text = "Fold-mean AUC macro per training seed, the same folds: " + "; ".join(parts) + "."
    multi = rows[rows["seeds"] > 1]
    if len(multi):
        top = multi.loc[multi["range"].idxmax()]
        text += (f" Another seed moved a network's fold mean by up to {top['range']:.3f} "
                 f"({networks.DISPLAY.get(top['network'], top['network'])}): a difference between two networks, or between "
                 "a network and a target, smaller than that is within what the seed alone gives.")
    return text
