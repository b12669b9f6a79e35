"""Stratified, grouped k-fold cross-validation (paper 4.2-4.3; study.md section 4).

Every cell gets one *test fold* in ``0 .. n_splits-1`` (scikit-learn ``StratifiedGroupKFold``,
shuffled, seeded): cells of one group (source field) are always in the same fold, and each fold's
class proportions are close to the cohort's. The folds are written once per cohort to a folds
file and reused, so every network is evaluated on the same folds.

The folds file is a CSV with columns ``cell_id, group, label, fold`` preceded by two comment
lines::

    # cellstudy-folds v1
    # {"n_splits": 5, "seed": 0, "cells_sha256": "...", "n_cells": 220, ...}

``cells_sha256`` hashes the sorted ``(cell_id, group, label)`` rows. :func:`load_or_make_folds`
reuses the file only when the cohort (that hash), ``n_splits`` and ``seed`` all match; otherwise
it raises :class:`StaleFoldsError` (the default: a folds file is never silently replaced, since
results computed on the old folds would no longer be comparable) or, with
``on_stale="regenerate"``, writes new folds over it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cellstudy import atomic

FOLDS_MAGIC = "# cellstudy-folds v1"


class FoldsError(ValueError):
    """Folds cannot be made from these labels / groups."""


class StaleFoldsError(FoldsError):
    """A folds file exists but was made for another cohort, n_splits or seed."""


def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise FoldsError(f"{name}: expected a 1-D sequence (one entry per cell), got shape "
                         f"{a.shape}")
    return a


def _check_inputs(labels: Any, groups: Any, n_splits: Any) -> tuple[np.ndarray, np.ndarray, int]:
    y = _as_1d(labels, "labels")
    g = _as_1d(groups, "groups").astype(str)
    if len(y) != len(g):
        raise FoldsError(f"labels and groups: expected the same length, got {len(y)} and {len(g)}")
    if len(y) == 0:
        raise FoldsError("labels: the cohort is empty; expected at least one cell per class")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) \
                and np.all(y == np.round(y)):
            y = y.astype(int)
        else:
            raise FoldsError(f"labels: expected integer class labels, got dtype {y.dtype}")
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise FoldsError(f"n_splits: expected an integer >= 2, got {n_splits!r}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise FoldsError(f"labels: only class {classes.tolist()} present; expected at least two "
                         "classes (a class with no images)")
    # a group spanning classes
    df = pd.DataFrame({"g": g, "y": y})
    per_group = df.groupby("g")["y"].nunique()
    mixed = per_group[per_group > 1].index.tolist()
    if mixed:
        raise FoldsError(f"groups {mixed[:5]} contain cells of more than one class; expected each "
                         "group (source field) to hold a single class")
    groups_per_class = df.drop_duplicates("g").groupby("y")["g"].count()
    few = groups_per_class[groups_per_class < n_splits]
    if len(few):
        detail = ", ".join(f"class {c}: {n} group(s)" for c, n in few.items())
        raise FoldsError(f"not enough groups for {n_splits} grouped folds ({detail}); expected at "
                         f"least n_splits={n_splits} groups per class so every test fold holds "
                         "both classes")
    return y, g, int(n_splits)


def make_folds(labels: Sequence[int], groups: Sequence[str], n_splits: int = 5,
               seed: int = 0) -> np.ndarray:
    """Assign every cell a test fold with ``StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed)``.

    Args:
        labels: (N,) int class labels.
        groups: (N,) group names (source field); a group must hold one class only.
        n_splits: number of folds (>= 2); each class needs at least ``n_splits`` groups.
        seed: the shuffle seed.
    Returns:
        (N,) int array, the test fold of each cell (0 .. n_splits-1); every fold non-empty.
    Raises:
        FoldsError (a ValueError) naming the bad groups / classes.
    """
    y, g, n_splits = _check_inputs(labels, groups, n_splits)
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
    folds = np.full(len(y), -1, dtype=int)
    for k, (_, test) in enumerate(cv.split(np.zeros(len(y)), y, g)):
        folds[test] = k
    if (folds < 0).any():  # pragma: no cover - sklearn guarantees a partition
        raise FoldsError("StratifiedGroupKFold left cells without a test fold")
    for k in range(n_splits):
        present = np.unique(y[folds == k])
        if len(present) < len(np.unique(y)):
            raise FoldsError(f"fold {k} holds only class(es) {present.tolist()}; the groups are "
                             "too unequal in size for stratified grouped folds with "
                             f"n_splits={n_splits}")
    return folds


def cells_hash(cell_ids: Sequence[str], labels: Sequence[int], groups: Sequence[str]) -> str:
    """sha256 of the sorted ``(cell_id, group, label)`` rows: identifies the cohort, independent
    of the row order."""
    rows = sorted(f"{c}\t{g}\t{int(y)}" for c, g, y in zip(
        np.asarray(cell_ids).astype(str), np.asarray(groups).astype(str), np.asarray(labels)))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _check_ids(cell_ids: Any, n: int) -> np.ndarray:
    ids = _as_1d(cell_ids, "cell_ids").astype(str)
    if len(ids) != n:
        raise FoldsError(f"cell_ids: expected {n} ids (one per cell), got {len(ids)}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise FoldsError(f"cell_ids: duplicated ids {uniq[counts > 1][:5].tolist()}; expected "
                         "unique ids")
    return ids


def save_folds(path: str | os.PathLike, cell_ids: Sequence[str], labels: Sequence[int],
               groups: Sequence[str], folds: Sequence[int], meta: dict[str, Any] | None = None
               ) -> Path:
    """Write a folds file atomically (see the module docstring for the format).

    ``meta`` is stored in the header (it should hold ``n_splits`` and ``seed``);
    ``cells_sha256`` and ``n_cells`` are added. Returns the path."""
    y = _as_1d(labels, "labels")
    g = _as_1d(groups, "groups").astype(str)
    f = _as_1d(folds, "folds").astype(int)
    ids = _check_ids(cell_ids, len(y))
    if not (len(y) == len(g) == len(f)):
        raise FoldsError(f"labels, groups, folds: expected equal lengths, got {len(y)}, {len(g)}, "
                         f"{len(f)}")
    header = dict(meta or {})
    header.update(cells_sha256=cells_hash(ids, y, g), n_cells=int(len(y)))
    buf = io.StringIO()
    buf.write(FOLDS_MAGIC + "\n")
    buf.write("# " + json.dumps(header, sort_keys=True) + "\n")
    pd.DataFrame({"cell_id": ids, "group": g, "label": y.astype(int), "fold": f}).to_csv(
        buf, index=False)
    return atomic.write_text(path, buf.getvalue())


def _read_header(fh, path: Path) -> dict[str, Any]:
    """The metadata of an open folds file (its first two lines), leaving ``fh`` at the table."""
    first = fh.readline().rstrip("\r\n")
    second = fh.readline().rstrip("\r\n")
    if first != FOLDS_MAGIC or not second.startswith("# "):
        raise FoldsError(f"folds file {path}: expected the header line {FOLDS_MAGIC!r} and a "
                         "metadata line; not a cellstudy folds file")
    try:
        return json.loads(second[2:])
    except json.JSONDecodeError as e:
        raise FoldsError(f"folds file {path}: unreadable metadata line ({e})") from None


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """A folds file's metadata (``cells_sha256``, ``n_cells``, ``n_splits``, ``seed``) without
    reading its table; FoldsError when it is not a folds file."""
    with open(path, newline="") as fh:
        return _read_header(fh, Path(path))


def read_folds(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a folds file: (table with cell_id, group, label, fold; header metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"folds file {path} does not exist")
    with open(path, newline="") as fh:
        meta = _read_header(fh, path)
        table = pd.read_csv(fh, dtype={"cell_id": str, "group": str})
    need = ["cell_id", "group", "label", "fold"]
    if list(table.columns) != need:
        raise FoldsError(f"folds file {path}: columns {list(table.columns)}; expected {need}")
    return table, meta


def load_or_make_folds(path: str | os.PathLike, cell_ids: Sequence[str], labels: Sequence[int],
                       groups: Sequence[str], n_splits: int = 5, seed: int = 0,
                       on_stale: str = "error") -> np.ndarray:
    """The folds of this cohort: read from ``path`` when it was made for the same cells
    (``cells_sha256``), ``n_splits`` and ``seed``; otherwise made with :func:`make_folds` and
    written there.

    Args:
        path: the folds file (CSV, see the module docstring).
        cell_ids, labels, groups: (N,) the cohort (cell ids unique).
        n_splits, seed: as for :func:`make_folds`.
        on_stale: what to do when ``path`` exists but does not match: ``"error"`` (default)
            raises :class:`StaleFoldsError` naming the file and what differs;
            ``"regenerate"`` makes new folds and overwrites the file.
    Returns:
        (N,) int test fold per cell, in the order of ``cell_ids``.
    """
    if on_stale not in ("error", "regenerate"):
        raise ValueError(f"on_stale: expected 'error' or 'regenerate', got {on_stale!r}")
    y, g, n_splits = _check_inputs(labels, groups, n_splits)
    ids = _check_ids(cell_ids, len(y))
    want = {"n_splits": n_splits, "seed": int(seed), "cells_sha256": cells_hash(ids, y, g)}
    path = Path(path)
    if path.exists():
        table, meta = read_folds(path)
        diffs = [f"{k}: file has {meta.get(k)!r}, expected {v!r}" for k, v in want.items()
                 if meta.get(k) != v]
        if not diffs:
            stored = table.set_index("cell_id")
            if set(stored.index) != set(ids) or len(stored) != len(ids):
                diffs.append("the cell list in the file does not match its cells_sha256")
            else:
                folds = stored.loc[ids, "fold"].to_numpy(dtype=int)
                return folds
        if on_stale == "error":
            raise StaleFoldsError(
                f"folds file {path} was made for another cohort or settings ({'; '.join(diffs)}); "
                "delete it, point to another folds path, or pass on_stale='regenerate'")
    folds = make_folds(y, g, n_splits=n_splits, seed=seed)
    save_folds(path, ids, y, g, folds, meta={"n_splits": n_splits, "seed": int(seed),
                                             "method": "StratifiedGroupKFold(shuffle=True)"})
    return folds


def fold_summary(labels: Sequence[int], groups: Sequence[str], folds: Sequence[int],
                 class_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Counts per test fold: cells per class, total cells, groups, and the share of each class.

    Returns a DataFrame indexed by fold (0 .. k-1) plus a final ``"all"`` row, with columns
    ``n_<class>`` per class, ``n_cells``, ``n_groups``, ``frac_<class>`` per class."""
    y = _as_1d(labels, "labels")
    g = _as_1d(groups, "groups").astype(str)
    f = _as_1d(folds, "folds").astype(int)
    if not (len(y) == len(g) == len(f)):
        raise FoldsError(f"labels, groups, folds: expected equal lengths, got {len(y)}, {len(g)}, "
                         f"{len(f)}")
    classes = np.unique(y)
    if class_names is None:
        from cellstudy.config import CLASS_NAMES
        class_names = CLASS_NAMES
    name = {c: (class_names[c] if 0 <= c < len(class_names) else str(c)) for c in classes}
    rows = []
    for k in list(np.unique(f)) + ["all"]:
        m = np.ones(len(y), bool) if k == "all" else f == k
        r: dict[str, Any] = {"fold": k if k == "all" else int(k)}
        for c in classes:
            r[f"n_{name[c]}"] = int((y[m] == c).sum())
        r["n_cells"] = int(m.sum())
        r["n_groups"] = int(len(np.unique(g[m])))
        for c in classes:
            r[f"frac_{name[c]}"] = float((y[m] == c).mean()) if m.any() else float("nan")
        rows.append(r)
    return pd.DataFrame(rows).set_index("fold")
