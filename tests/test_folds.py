"""Tests for cellstudy.learning.folds: stratified, grouped, seeded folds and the folds file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellstudy.learning import folds as F

BBBC = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc021-mcf7"


def synthetic_cohort(seed=0, n_groups=(12, 14), sizes=(4, 15)):
    """Groups of unequal size, each holding one class."""
    rng = np.random.default_rng(seed)
    ids, labels, groups = [], [], []
    for cls, ng in enumerate(n_groups):
        for gi in range(ng):
            for c in range(int(rng.integers(*sizes))):
                ids.append(f"c{cls}_g{gi}_{c}")
                labels.append(cls)
                groups.append(f"field_{cls}_{gi}")
    return np.array(ids), np.array(labels), np.array(groups)


def check_fold_properties(labels, groups, folds, n_splits, tol):
    labels, groups, folds = map(np.asarray, (labels, groups, folds))
    # every sample tested exactly once: one fold per sample, all folds used
    assert folds.shape == labels.shape
    assert set(np.unique(folds)) == set(range(n_splits))
    # no group in two folds
    per_group = pd.Series(folds).groupby(groups).nunique()
    assert (per_group == 1).all()
    # stratified: class share per fold close to overall
    overall = labels.mean()
    for k in range(n_splits):
        share = labels[folds == k].mean()
        assert abs(share - overall) < tol, (k, share, overall)
        assert 0 < share < 1


def test_make_folds_properties():
    ids, y, g = synthetic_cohort()
    f = F.make_folds(y, g, n_splits=5, seed=0)
    assert f.dtype.kind == "i"
    check_fold_properties(y, g, f, 5, tol=0.15)
    # the union of test folds is every cell, each once (train/test partitions)
    counts = np.bincount(np.concatenate([np.flatnonzero(f == k) for k in range(5)]),
                         minlength=len(y))
    assert (counts == 1).all()


def test_make_folds_seeded():
    _, y, g = synthetic_cohort()
    a = F.make_folds(y, g, 5, seed=0)
    b = F.make_folds(y, g, 5, seed=0)
    c = F.make_folds(y, g, 5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mixed_group_is_an_error_naming_it():
    _, y, g = synthetic_cohort()
    y = y.copy()
    i = np.flatnonzero(g == "field_0_3")[0]
    y[i] = 1
    with pytest.raises(F.FoldsError, match="field_0_3"):
        F.make_folds(y, g, 5)


def test_too_few_groups_per_class():
    _, y, g = synthetic_cohort(n_groups=(3, 10))
    with pytest.raises(ValueError, match="class 0: 3 group"):
        F.make_folds(y, g, 5)
    F.make_folds(y, g, 3)  # enough for 3 folds


@pytest.mark.parametrize("labels, groups, n_splits, match", [
    ([0, 0, 0], ["a", "b", "c"], 2, "only class"),
    ([0, 1], ["a"], 2, "same length"),
    ([], [], 2, "empty"),
    ([0.5, 1.0], ["a", "b"], 2, "integer"),
    ([0, 1], ["a", "b"], 1, "n_splits"),
])
def test_bad_inputs(labels, groups, n_splits, match):
    with pytest.raises(ValueError, match=match):
        F.make_folds(labels, groups, n_splits)


def test_save_read_roundtrip(tmp_path):
    ids, y, g = synthetic_cohort()
    f = F.make_folds(y, g, 5, 0)
    p = F.save_folds(tmp_path / "sub" / "folds.csv", ids, y, g, f, {"n_splits": 5, "seed": 0})
    table, meta = F.read_folds(p)
    assert list(table.columns) == ["cell_id", "group", "label", "fold"]
    np.testing.assert_array_equal(table["fold"], f)
    np.testing.assert_array_equal(table["cell_id"], ids)
    assert meta["n_splits"] == 5 and meta["seed"] == 0 and meta["n_cells"] == len(ids)
    assert meta["cells_sha256"] == F.cells_hash(ids, y, g)
    assert not list(tmp_path.rglob("*.tmp"))


def test_load_or_make_reuses_file(tmp_path, monkeypatch):
    ids, y, g = synthetic_cohort()
    path = tmp_path / "folds.csv"
    a = F.load_or_make_folds(path, ids, y, g, 5, 0)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(F, "make_folds", lambda *a, **k: calls.append(1))
    b = F.load_or_make_folds(path, ids, y, g, 5, 0)
    assert calls == [] and path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(a, b)
    # another row order of the same cohort: same folds per cell
    perm = np.random.default_rng(0).permutation(len(ids))
    c = F.load_or_make_folds(path, ids[perm], y[perm], g[perm], 5, 0)
    np.testing.assert_array_equal(c, a[perm])


def test_stale_folds_file_detected(tmp_path):
    ids, y, g = synthetic_cohort()
    path = tmp_path / "folds.csv"
    a = F.load_or_make_folds(path, ids, y, g, 5, 0)
    before = path.read_bytes()
    # cohort changed: a cell dropped
    with pytest.raises(F.StaleFoldsError, match="cells_sha256"):
        F.load_or_make_folds(path, ids[1:], y[1:], g[1:], 5, 0)
    # a label changed (whole group relabelled, still valid)
    y2 = y.copy()
    y2[g == "field_1_0"] = 0
    with pytest.raises(F.StaleFoldsError, match=str(path.name)):
        F.load_or_make_folds(path, ids, y2, g, 5, 0)
    with pytest.raises(F.StaleFoldsError, match="seed"):
        F.load_or_make_folds(path, ids, y, g, 5, 1)
    with pytest.raises(F.StaleFoldsError, match="n_splits"):
        F.load_or_make_folds(path, ids, y, g, 4, 0)
    assert path.read_bytes() == before  # never touched on error
    # explicit regeneration
    b = F.load_or_make_folds(path, ids, y, g, 5, 1, on_stale="regenerate")
    assert not np.array_equal(a, b)
    assert F.read_folds(path)[1]["seed"] == 1


def test_tampered_file_rows_detected(tmp_path):
    ids, y, g = synthetic_cohort()
    path = tmp_path / "folds.csv"
    F.load_or_make_folds(path, ids, y, g, 5, 0)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # a row removed, header left as it was
    with pytest.raises(F.StaleFoldsError, match="cell list"):
        F.load_or_make_folds(path, ids, y, g, 5, 0)


def test_not_a_folds_file(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("cell_id,fold\na,0\n")
    with pytest.raises(F.FoldsError, match="not a cellstudy folds file"):
        F.read_folds(p)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        F.read_folds(tmp_path / "nope.csv")


def test_duplicate_cell_ids(tmp_path):
    ids, y, g = synthetic_cohort()
    ids = ids.copy()
    ids[1] = ids[0]
    with pytest.raises(F.FoldsError, match="duplicated"):
        F.load_or_make_folds(tmp_path / "f.csv", ids, y, g, 5, 0)


def test_fold_summary():
    ids, y, g = synthetic_cohort()
    f = F.make_folds(y, g, 5, 0)
    s = F.fold_summary(y, g, f)
    assert list(s.index) == [0, 1, 2, 3, 4, "all"]
    assert {"n_normal", "n_abnormal", "n_cells", "n_groups", "frac_abnormal"} <= set(s.columns)
    assert s.loc["all", "n_cells"] == len(y)
    assert s.loc[[0, 1, 2, 3, 4], "n_cells"].sum() == len(y)
    assert s.loc[[0, 1, 2, 3, 4], "n_groups"].sum() == len(np.unique(g))
    assert s.loc[2, "n_abnormal"] == int(((f == 2) & (y == 1)).sum())


# ------------------------------------------------------------------------------ real data
def bbbc021_table():
    rows = []
    for label, cls in enumerate(["DMSO", "protein_synthesis"]):
        for p in sorted((BBBC / cls).glob("*.npy")):
            rows.append((f"{cls}/{p.name}", label, p.stem.rsplit("_", 1)[0]))
    return pd.DataFrame(rows, columns=["cell_id", "label", "group"])


@pytest.mark.skipif(not BBBC.is_dir(), reason=f"real data not present at {BBBC}")
def test_real_bbbc021_grouped_folds(tmp_path):
    t = bbbc021_table()
    assert len(t) == 1360 and t.groupby("label")["group"].nunique().tolist() == [16, 18]
    # a couple of real files read with numpy: (68, 68, 3) crops
    for cid in t["cell_id"].iloc[[0, -1]]:
        assert np.load(BBBC / cid).shape == (68, 68, 3)
    f = F.load_or_make_folds(tmp_path / "folds.csv", t["cell_id"], t["label"], t["group"], 5, 0)
    check_fold_properties(t["label"], t["group"], f, 5, tol=0.12)
    s = F.fold_summary(t["label"], t["group"], f)
    assert s.loc["all", "n_groups"] == 34
    # a paper-sized subset: 100 + 120 cells drawn from >= 5 fields per class
    rng = np.random.default_rng(0)
    parts = []
    for label, n_fields, per in ((0, 5, 20), (1, 6, 20)):
        fields = rng.choice(sorted(t.loc[t.label == label, "group"].unique()), n_fields,
                            replace=False)
        for fld in fields:
            parts.append(t[t.group == fld].sample(per, random_state=0))
    sub = pd.concat(parts)
    assert len(sub) == 220
    fs = F.make_folds(sub["label"], sub["group"], 5, 0)
    check_fold_properties(sub["label"], sub["group"], fs, 5, tol=0.2)
