"""The book's tables, narrow enough for its text column (752 px in a 1280 px window).

A step's CSV files keep every column as it is computed; what a page shows is reshaped here, so a
reader does not have to scroll a table sideways to find a network's number (the browser check
lists the tables that still scroll: ``browser.PageCheck.wide_tables``):

- :func:`column_chunks` / :func:`show`: a wide table (the paper's Tables 1-2: nine metric columns
  of ``"0.893 ± 0.046"``) shown as consecutive tables of at most :data:`MAX_COLUMNS` columns,
  each with the full index;
- :func:`ci_text`: an estimate and its interval as one column, ``"0.893 (0.806–0.979)"``;
- :func:`verdicts` and :func:`convergence`: the results chapter's per-network tables with
  readable headers and intervals in one column; :func:`importance` the baseline's per-stain
  importance; :func:`readable` any computed table with headers in words;
- :func:`show_metrics`: the paper's Tables 1-2 one kind of metric a table.

Every number is written with Python's format (``num_text``: ``"{:.3f}"``), as the book's sentences
write it, not rounded by pandas / numpy (``round(0.8775, 3)`` is 0.878, ``f"{0.8775:.3f}"`` 0.877:
the stored binary value is below the half). Pure functions of pandas tables (``show`` displays with IPython).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

#: Columns of a value ± SD ("0.893 ± 0.046") that fit unbroken beside an index of model names.
MAX_COLUMNS = 4


def metric_kind(column: Any) -> str:
    """A metric column's kind, its name up to the first ``_``: ``"auc_micro"`` -> ``"auc"``
    (:func:`column_chunks` keeps a kind's columns in one table: recall and precision, AUC, F1)."""
    return str(column).split("_", 1)[0]


def column_chunks(table: pd.DataFrame, size: int = MAX_COLUMNS,
                  keep_level: int | Callable[[Any], Any] | None = None) -> list[pd.DataFrame]:
    """``table`` cut into consecutive pieces of at most ``size`` columns, in its column order,
    each with ``table``'s whole index; every column in exactly one piece. A table of ``size``
    columns or fewer comes back as one piece. With ``keep_level`` (a level of MultiIndex
    columns, e.g. the network of (network, image size) columns), or a function of a column
    giving its group (:func:`metric_kind`), the consecutive columns of one group stay in one
    piece (a piece is then filled greedily with whole groups; a group wider than ``size`` is a
    piece of its own)."""
    if size < 1:
        raise ValueError(f"size: expected at least 1 column per piece, got {size}")
    cols = list(table.columns)
    if len(cols) <= size:
        return [table]
    if keep_level is None:
        n = -(-len(cols) // size)            # as few pieces as needed, as even as possible
        per = -(-len(cols) // n)
        return [table.iloc[:, i:i + per] for i in range(0, len(cols), per)]
    keys = ([keep_level(c) for c in cols] if callable(keep_level)
            else list(table.columns.get_level_values(keep_level)))
    groups: list[list[int]] = []
    for i, k in enumerate(keys):
        if groups and keys[groups[-1][0]] == k:
            groups[-1].append(i)
        else:
            groups.append([i])
    pieces: list[list[int]] = []
    for g in groups:
        if pieces and len(pieces[-1]) + len(g) <= size:
            pieces[-1].extend(g)
        else:
            pieces.append(list(g))
    return [table.iloc[:, p] for p in pieces]


def show(table: pd.DataFrame, size: int = MAX_COLUMNS,
         keep_level: int | Callable[[Any], Any] | None = None) -> None:
    """Display ``table`` in the notebook as :func:`column_chunks` (one table each)."""
    from IPython.display import display

    for part in column_chunks(table, size, keep_level):
        display(part)


def num_text(value: Any, fmt: str = ".3f") -> str:
    """``format(value, fmt)``; an empty string for None / NaN (a missing number is a blank cell)."""
    if value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return ""
    return format(value, fmt)


def ci_text(value: float, low: float, high: float, digits: int = 3, signed: bool = False) -> str:
    """``"0.893 (0.806–0.979)"``, ``"0.022 (-0.029 to 0.077)"`` when the interval starts below 0;
    with ``signed`` (a difference) every number carries its sign, ``"-0.010 (-0.142 to +0.122)"``.
    The value alone without a finite interval, an empty string when ``value`` is not a number."""
    if value is None or not np.isfinite(value):
        return ""
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f.format(value)
    sep = "–" if low >= 0 and not signed else " to "   # a dash after a minus sign reads as another minus
    return f"{f.format(value)} ({f.format(low)}{sep}{f.format(high)})"


def verdicts(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The results chapter's table of ``findings.network_verdicts`` (one row per model), for the
    page: index = the model's display name; ``family``; ``folds``; ``AUC (95% CI)``; ``beats
    chance`` (yes / no); ``vs <baseline>: difference (95% CI)``; ``p`` (Holm-adjusted over the
    networks; a classical model's p is unadjusted, marked ``"(unadj.)"``); ``d_z``; ``verdict``
    (``findings``' "better than" / "worse than" / "not distinguishable from", or "the baseline").
    The baseline is the one the table names (its column header says which)."""
    from cellstudy.learning.metrics import DISPLAY_NAMES

    t = table.reset_index(drop=True)
    base = t["baseline"].dropna()
    base_name = DISPLAY_NAMES.get(base.iloc[0], base.iloc[0]) if len(base) else "the baseline"
    diff_col = f"vs {base_name}: difference (95% CI)"
    p_txt, verdict = [], []
    notes = t["note"].fillna("").astype(str) if "note" in t else pd.Series([""] * len(t))
    for r, note in zip(t.itertuples(index=False), notes):
        if isinstance(r.versus, str) and r.versus:
            adj = r.p_adj is not None and np.isfinite(r.p_adj)
            p_txt.append(f"{r.p_adj:.3g}" if adj else (f"{r.p:.3g} (unadj.)" if np.isfinite(r.p) else ""))
            verdict.append(r.versus)
        else:
            p_txt.append("")
            verdict.append("the baseline" if r.network == r.baseline else note)   # why there is no comparison
    out = pd.DataFrame({
        "family": t["family"].to_numpy(),
        "folds": t["k"].astype(int).to_numpy(),
        "AUC (95% CI)": [ci_text(m, lo, hi, digits) for m, lo, hi in zip(t["mean"], t["ci_low"], t["ci_high"])],
        "beats chance": np.where(t["beats_chance"].astype(bool), "yes", "no"),
        diff_col: [ci_text(d, lo, hi, digits, signed=True) for d, lo, hi in zip(t["diff"], t["diff_low"], t["diff_high"])],
        "p": p_txt,
        "d_z": [num_text(v, ".2f") for v in t["d_z"].astype(float)],
        "verdict": verdict},
        index=pd.Index(t["display"].to_numpy(), name="model"))
    if not len(base):   # no classical baseline in the run: no comparison columns to show
        out = out.drop(columns=[diff_col, "p", "d_z", "verdict"])
    return out


def convergence(table: pd.DataFrame, display: Callable[[str], str] = str, digits: int = 3) -> pd.DataFrame:
    """``convergence.network_convergence``'s table (one row per network) for the page: index =
    the display name; ``on its plateau`` (yes / no), ``folds on the plateau`` (``"5 of 5"``),
    ``final training accuracy (median)`` (over the folds), ``epochs`` (``"18–25"``, the
    folds' fewest to most; one number when equal) and, when any network has one, ``why not``."""
    t = table.reset_index(drop=True)
    lo, hi = t["epochs_min"].astype(int), t["epochs"].astype(int)
    out = pd.DataFrame({
        "on its plateau": np.where(t["converged"].astype(bool), "yes", "no"),
        "folds on the plateau": [f"{int(a)} of {int(b)}" for a, b in zip(t["folds_converged"], t["n_folds"])],
        "final training accuracy (median)": [num_text(v, f".{digits}f") for v in t["final_train_accuracy"].astype(float)],
        "epochs": [str(a) if a == b else f"{a}–{b}" for a, b in zip(lo, hi)]},
        index=pd.Index([display(n) for n in t["network"]], name="network"))
    why = t["why_not"].fillna("").astype(str) if "why_not" in t else pd.Series([""] * len(t))
    if why.str.len().gt(0).any():
        out["why not"] = why.to_numpy()
    return out


def importance(table: pd.DataFrame, display: Callable[[str], str] | dict = str,
               groups: dict[str, str] | None = None, digits: int = 3) -> pd.DataFrame:
    """``baseline.stain_importance``'s table (one row per classifier and feature group, the
    largest drop first) for the page: ``classifier``, ``features of`` (the group's label from
    ``groups``), ``AUC drop when permuted`` (``"0.119 ± 0.088"``: mean ± SD over folds x repeats),
    ``folds``, ``AUC`` (the classifier's fold-mean AUC unpermuted); no positional index."""
    name = display.get if isinstance(display, dict) else display
    t = table.reset_index(drop=True)
    from cellstudy.learning.metrics import mean_sd_text   # "mean ± SD", as the paper's tables write it

    return pd.DataFrame({
        "classifier": [name(c) or c for c in t["classifier"]],
        "features of": [(groups or {}).get(g, g) for g in t["group"]],
        "AUC drop when permuted (mean ± SD)": [mean_sd_text(m, sd, digits) for m, sd in zip(t["auc_drop_mean"], t["auc_drop_sd"])],
        "folds": t["n_folds"].astype(int).to_numpy(),
        "AUC": [num_text(v, f".{digits}f") for v in t["auc"].astype(float)]}).set_index(["classifier", "features of"])


def readable(table: pd.DataFrame, columns: dict[str, str], index: list[str] | None = None,
             ci: dict[str, tuple[str, str, str]] | None = None, display: Callable[[str], str] | None = None,
             digits: int = 3, formats: dict[str, str] | None = None) -> pd.DataFrame:
    """A computed table as a page shows it: ``ci`` first joins each (value, low, high) triple of
    columns into one text column named by its key (:func:`ci_text`); then ``columns`` (an ordered
    mapping old name -> header) selects and renames the columns (a key of ``ci`` maps to its
    header too); booleans read yes / no, other numbers are written with ``formats[header]`` (e.g.
    ``".3g"`` for a p-value, which ``digits`` would write 0.000) or ``digits`` decimals; the ``network``
    column is passed through ``display`` (its display name) when given; ``index`` (headers) become
    the index, else the first column does (no positional 0, 1, 2, ...). The step's CSV keeps the
    table as computed."""
    t = table.reset_index(drop=True).copy()
    for key, (v, lo, hi) in (ci or {}).items():
        t[key] = [ci_text(a, b, c, digits) for a, b, c in zip(t[v], t[lo], t[hi])]
    missing = [c for c in columns if c not in t.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the table (it has {list(t.columns)})")
    if display is not None and "network" in t.columns:
        t["network"] = [display(n) for n in t["network"]]
    t = t[list(columns)].rename(columns=columns)
    for c in t.columns:
        if t[c].dtype == bool:
            t[c] = np.where(t[c], "yes", "no")
        elif pd.api.types.is_float_dtype(t[c]) or c in (formats or {}):
            fmt = (formats or {}).get(c, f".{digits}f")
            t[c] = [num_text(v, fmt) for v in t[c]]
    return t.set_index(index or [t.columns[0]])


def show_metrics(table: pd.DataFrame) -> None:
    """Display a table of metric columns (the paper's Tables 1-2: ``metrics.summary_table``) as
    :func:`show` does, one kind of metric a table where they fit (recall and precision, AUC, F1)."""
    show(table, keep_level=metric_kind)
