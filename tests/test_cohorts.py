"""cellstudy.data.cohorts: the committed manifests match the real data; the draws are reproducible."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellstudy.data import cohorts
from cellstudy import data
from cellstudy.data import DataError

MANIFESTS = Path(__file__).resolve().parent.parent / "data_manifest"


def _read(name_or_path) -> pd.DataFrame:
    p = name_or_path if isinstance(name_or_path, Path) else MANIFESTS / f"{name_or_path}.csv"
    return pd.read_csv(p, dtype=str, keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# The drawing rule, on a synthetic table (no data needed)
# ---------------------------------------------------------------------------------------------
def _synthetic_full(fields=(16, 18), per_field=40) -> pd.DataFrame:
    rows = []
    for label, nf in enumerate(fields):
        for f in range(nf):
            for i in range(per_field):
                rows.append({"cell_id": f"{label}-{f}-{i}", "label": label,
                             "group": f"L{label}F{f:02d}"})
    return pd.DataFrame(rows)


def test_draw_rule_blocks_per_field_and_determinism():
    full = _synthetic_full()
    d = cohorts.draw_paper_cells(full, seed=0)
    per = d.groupby(["label", "group"]).size()
    assert d.label.value_counts().to_dict() == {0: 100, 1: 120}
    assert sorted(per[0].tolist()) == [10] * 10 and sorted(per[1].tolist()) == [12] * 10
    assert d.cell_id.is_unique
    again = cohorts.draw_paper_cells(full, seed=0)
    pd.testing.assert_frame_equal(d, again)
    other = cohorts.draw_paper_cells(full, seed=1)
    assert set(other.cell_id) != set(d.cell_id)


def test_draw_rule_uses_whole_fields_when_min_fields_allows():
    full = _synthetic_full()
    d = cohorts.draw_paper_cells(full, counts={0: 80, 1: 120}, min_fields=2, seed=3)
    per = d.groupby(["label", "group"]).size()
    assert per[0].tolist() == [40, 40] and per[1].tolist() == [40, 40, 40]
    # uneven split: the remainder goes one cell at a time to the first fields
    d2 = cohorts.draw_paper_cells(full, counts={0: 103, 1: 120}, seed=3)
    assert sorted(d2[d2.label == 0].groupby("group").size().tolist()) == [10] * 7 + [11] * 3


def test_draw_rule_refuses_too_few_fields():
    full = _synthetic_full(fields=(6, 18))
    with pytest.raises(DataError, match=r"label 0: 6 field\(s\) available; expected at least 10"):
        cohorts.draw_paper_cells(full)


def test_checksums_from_sha256sums_else_computed(tmp_path):
    root = tmp_path / "r"
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "sub" / "x.bin").write_bytes(b"hello")
    (root / "a" / "y.bin").write_bytes(b"world")
    (root / "a" / "SHA256SUMS").write_text("abc123  sub/x.bin\n")
    sums = cohorts._Sums(root)
    assert sums("a/sub/x.bin") == "abc123"                       # listed: taken from the file
    assert sums("a/y.bin") == data.sha256_file(root / "a" / "y.bin")   # not listed: computed


def test_unknown_cohort_in_builder():
    with pytest.raises(DataError, match="unknown cohort 'nope'"):
        cohorts.build("nope")


def test_cohort_list_matches_manifests():
    assert set(cohorts.COHORTS) == set(cohorts.BUILDERS)
    for n in cohorts.COHORTS:
        assert (MANIFESTS / f"{n}.csv").is_file(), n
        assert n in data.available_cohorts()


# ---------------------------------------------------------------------------------------------
# The committed manifests against the real data
# ---------------------------------------------------------------------------------------------
def test_manifest_columns_and_counts():
    for name in cohorts.COHORTS:
        df = _read(name)
        assert set(data.REQUIRED_COLUMNS) <= set(df.columns), name
        assert df.cell_id.is_unique, name
        assert (df.groupby("group").label.nunique() == 1).all(), name
    paper, full = _read("bbbc021-paper"), _read("bbbc021-full")
    assert paper.label.value_counts().to_dict() == {"0": 100, "1": 120}
    assert full.label.value_counts().to_dict() == {"0": 640, "1": 720}
    assert paper.groupby("label").group.nunique().to_dict() == {"0": 10, "1": 10}
    assert full.groupby("label").group.nunique().to_dict() == {"0": 16, "1": 18}
    assert set(paper.cell_id) <= set(full.cell_id)
    assert (paper.channels == "2,1,0").all()
    # 10 cells from each of 10 DMSO fields, 12 from each of 10 treated fields
    per = paper.groupby(["label", "group"]).size()
    assert set(per["0"]) == {10} and set(per["1"]) == {12}
    rx = _read("rxrx1-cells")
    assert set(rx.cell_type[rx.label == "0"]) == {"HUVEC", "RPE"}
    assert set(rx.cell_type[rx.label == "1"]) == {"HEPG2", "U2OS"}
    assert rx.group.nunique() == 36
    assert rx.groupby("group").size().max() <= cohorts.RXRX1_CAP_PER_FIELD
    y, x, s = (rx[c].astype(int) for c in data.CROP_COLUMNS)
    assert (s == 64).all() and (y >= 1).all() and (x >= 1).all()
    assert (y + s <= 511).all() and (x + s <= 511).all()
    assert all(p.split(";")[2].endswith("_w1.png") and p.split(";")[0].endswith("_w2.png")
               for p in rx.path)


@pytest.mark.parametrize("name", ["bbbc021-paper", "bbbc021-full", "rxrx1-cells"])
def test_committed_manifest_verifies_against_real_data(shared_data, name):
    data.verify_manifest(data.load_manifest(name), shared_data, check_sha=True)


def test_checksums_agree_with_sha256sums(shared_data):
    sums = {}
    for line in (shared_data / "bbbc021-mcf7" / "SHA256SUMS").read_text().splitlines():
        h, f = line.split(None, 1)
        sums[f"bbbc021-mcf7/{f.strip()}"] = h
    full = _read("bbbc021-full")
    assert len(full) == 1360 and all(sums[p] == h for p, h in zip(full.path, full.sha256))


def test_paper_draw_is_reproducible(shared_data, tmp_path):
    assert cohorts.main(["build", "--root", str(shared_data), "--out", str(tmp_path),
                         "--cohort", "bbbc021-paper", "--cohort", "bbbc021-full"]) == 0
    for name in ("bbbc021-paper", "bbbc021-full"):
        assert (tmp_path / f"{name}.csv").read_bytes() == (MANIFESTS / f"{name}.csv").read_bytes()


@pytest.mark.slow
def test_rxrx1_manifest_is_reproducible(shared_data, tmp_path):
    if not (shared_data / "rxrx1-celltypes").is_dir():
        pytest.skip("rxrx1-celltypes not in the data root")
    out = cohorts.build("rxrx1-cells", shared_data, tmp_path / "rx.csv")
    assert out.read_bytes() == (MANIFESTS / "rxrx1-cells.csv").read_bytes()


def test_load_paper_cohort_fast_and_mapped(shared_data):
    t = time.perf_counter()
    c = data.load_cohort("bbbc021-paper", root=shared_data)
    dt = time.perf_counter() - t
    assert dt < 10.0, f"loading 220 cells took {dt:.1f} s"
    assert c.images.shape == (220, 68, 68, 3) and c.images.dtype == np.float32
    assert np.bincount(c.labels).tolist() == [100, 120]
    assert np.isfinite(c.images).all() and c.images.min() >= 0 and c.images.max() <= 1
    # blue = stored channel 0 (DNA), red = stored channel 2 (tubulin)
    raw = np.load(shared_data / c.table.path[0])
    np.testing.assert_allclose(c.images[0], data.robust_scale(raw[:, :, [2, 1, 0]]), atol=1e-6)
    assert list(c.sha256) == list(dict.fromkeys(c.sha256))   # unique per cell


def test_load_rxrx1_cells(shared_data):
    if not (shared_data / "rxrx1-celltypes").is_dir():
        pytest.skip("rxrx1-celltypes not in the data root")
    c = data.load_cohort("rxrx1-cells", root=shared_data, check_sha=False)
    assert c.images.shape[1:] == (64, 64, 3)
    assert len(c) == len(_read("rxrx1-cells"))
    # the crop is centred on a nucleus: the DNA (blue) channel is brighter in the centre
    centre = c.images[:, 24:40, 24:40, 2].mean()
    edge = c.images[:, :8, :, 2].mean()
    assert centre > edge


# ---------------------------------------------------------------------------------------------
# bbbc021-unseen: the external test set (the fields bbbc021-paper does not use)
# ---------------------------------------------------------------------------------------------
def test_unseen_cells_rule_whole_fields_only():
    full = _synthetic_full()
    paper = cohorts.draw_paper_cells(full, seed=0)
    u = cohorts.unseen_cells(full, paper)
    assert not set(u.group) & set(paper.group) and not set(u.cell_id) & set(paper.cell_id)
    assert set(u.group) | set(paper.group) == set(full.group)
    assert u.groupby("group").size().eq(40).all()               # whole fields
    assert u.label.value_counts().to_dict() == {0: 6 * 40, 1: 8 * 40}
    pd.testing.assert_frame_equal(u, cohorts.unseen_cells(full, paper))
    with pytest.raises(DataError, match="expected at least one unseen field"):
        cohorts.unseen_cells(full, full)
    with pytest.raises(DataError, match="lacks the 'group' column"):
        cohorts.unseen_cells(full, paper.drop(columns="group"))


def test_unseen_manifest_counts_and_disjoint_from_paper():
    paper, full, unseen = _read("bbbc021-paper"), _read("bbbc021-full"), _read("bbbc021-unseen")
    assert unseen.label.value_counts().to_dict() == {"0": 240, "1": 320}
    assert unseen.groupby("label").group.nunique().to_dict() == {"0": 6, "1": 8}
    assert not set(unseen.group) & set(paper.group)
    assert not set(unseen.cell_id) & set(paper.cell_id)
    pd.testing.assert_frame_equal(cohorts.unseen_cells(full, paper), unseen)
    assert "bbbc021-unseen" in cohorts.COHORTS and "bbbc021-unseen" in cohorts.BUILDERS


def test_unseen_manifest_verifies_and_is_reproducible(shared_data, tmp_path):
    data.verify_manifest(data.load_manifest("bbbc021-unseen"), shared_data, check_sha=True)
    assert cohorts.main(["build", "--root", str(shared_data), "--out", str(tmp_path),
                         "--cohort", "bbbc021-unseen"]) == 0
    assert (tmp_path / "bbbc021-unseen.csv").read_bytes() == (MANIFESTS / "bbbc021-unseen.csv").read_bytes()
