"""Cohort definitions and the builders of their manifests (``data_manifest/<name>.csv``).

The manifests are built once, from the real data in the data root, and committed; loading a
cohort reads its manifest, never re-draws or re-segments. Rebuild them with::

    python -m cellstudy.data.cohorts build [--root DATA_ROOT] [--out data_manifest] [--cohort NAME]
    python -m cellstudy.data.cohorts verify [--root DATA_ROOT] [--cohort NAME]

Cohorts
-------
``bbbc021-full``  every BBBC021 MCF-7 crop: 640 DMSO (normal, 16 fields) + 720
                  protein_synthesis (abnormal, 18 fields); group = source field.
``bbbc021-paper`` the paper-sized draw: 100 normal + 120 abnormal (see ``draw_paper_cells``).
``bbbc021-unseen`` the external test set: every BBBC021 crop of the source fields that
                  ``bbbc021-paper`` does not use (see ``unseen_cells``): 240 normal (6 fields) +
                  320 abnormal (8 fields), 40 crops per field.
``rxrx1-cells``   single cells cut from the 36 RxRx1 fields: nuclear segmentation of w1, a
                  64 x 64 crop per nucleus, at most 40 crops per field (seeded); normal = HUVEC +
                  RPE, abnormal ("cancer") = HepG2 + U2OS; group = experiment/plate/site.
"""
from __future__ import annotations

import argparse
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from cellstudy import config, seeds
from cellstudy.data import (MANIFEST_DIR, DataError, decode_image, load_manifest,
                   sha256_file, verify_manifest)
from cellstudy.data.segment import SEGMENT_DEFAULTS, nucleus_table, segment_nuclei

#: Cohort name -> one-line description.
COHORTS: dict[str, str] = {
    "bbbc021-paper": "BBBC021 MCF-7, paper-sized: 100 DMSO (normal) + 120 protein-synthesis "
                     "inhibitor (abnormal) cells, 10 fields per class, seeded draw",
    "bbbc021-full": "BBBC021 MCF-7, every crop: 640 DMSO (normal, 16 fields) + 720 "
                    "protein-synthesis inhibitor (abnormal, 18 fields)",
    "bbbc021-unseen": "BBBC021 MCF-7, the external test set: every crop of the fields "
                      "bbbc021-paper does not use (240 DMSO in 6 fields + 320 "
                      "protein-synthesis inhibitor in 8 fields)",
    "rxrx1-cells": "RxRx1 single cells: 64 px crops around segmented nuclei, <= 40 per field; "
                   "HUVEC + RPE (normal) vs HepG2 + U2OS (cancer)",
}

BBBC021_DIR = "bbbc021-mcf7"
BBBC021_CLASSES: dict[str, int] = {"DMSO": 0, "protein_synthesis": 1}
#: BBBC021 .npy channels: 0 = DNA, 1 = F-actin, 2 = beta-tubulin -> R <- 2, G <- 1, B <- 0.
BBBC021_CHANNELS = "2,1,0"
#: The stains of BBBC021's R, G, B (the manifests' ``stains`` column; predict compares it).
BBBC021_STAINS = "tubulin,F-actin,DNA"

RXRX1_DIR = "rxrx1-celltypes"
RXRX1_CLASSES: dict[str, int] = {"normal": 0, "cancer": 1}
#: RxRx1 files per channel: R <- w2 (concanavalin A / ER), G <- w3 (phalloidin), B <- w1 (Hoechst).
RXRX1_RGB_FILES = ("w2", "w3", "w1")
#: The stains of the RxRx1 cohort's R, G, B (w2 concanavalin A, w3 phalloidin, w1 Hoechst).
RXRX1_STAINS = "concanavalin A,F-actin,DNA"

#: The paper's cohort size per label and the drawing rule's parameters.
PAPER_COUNTS: dict[int, int] = {0: 100, 1: 120}
PAPER_SEED = 0
N_SPLITS = 5
MIN_FIELDS_PER_CLASS = 2 * N_SPLITS
MAX_PER_FIELD = 40

RXRX1_CROP_SIZE = 64
RXRX1_CAP_PER_FIELD = 40
RXRX1_SEED = 0


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------
class _Sums:
    """sha256 of files under the data root: from the nearest ``SHA256SUMS`` above a file that
    lists it, else computed."""

    def __init__(self, root: Path):
        self.root = root
        self._tables: dict[Path, dict[str, str]] = {}

    def _table(self, folder: Path) -> dict[str, str]:
        if folder not in self._tables:
            t: dict[str, str] = {}
            f = folder / "SHA256SUMS"
            if f.is_file():
                for line in f.read_text().splitlines():
                    parts = line.strip().split(None, 1)
                    if len(parts) == 2:
                        t[parts[1].lstrip("*").strip()] = parts[0].lower()
            self._tables[folder] = t
        return self._tables[folder]

    def __call__(self, rel: str) -> str:
        full = self.root / rel
        folder = full.parent
        while True:
            t = self._table(folder)
            key = full.relative_to(folder).as_posix()
            if key in t:
                return t[key]
            if folder == self.root or folder.parent == folder:
                break
            folder = folder.parent
        return sha256_file(full)


def _write(df: pd.DataFrame, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False, lineterminator="\n")
    return out


# ---------------------------------------------------------------------------------------------
# BBBC021
# ---------------------------------------------------------------------------------------------
def build_bbbc021_full(root: str | Path | None = None) -> pd.DataFrame:
    """Every BBBC021 crop as a manifest table (sorted by class, field, cell index).

    Columns: the required ones plus ``shape`` (68x68x3), ``dataset``, ``well``, ``site``,
    ``cell_index``. group = the source field ``<well>_s<site>_w1<UUID>``.
    """
    root = config.data_root(root)
    base = root / BBBC021_DIR
    if not base.is_dir():
        raise FileNotFoundError(f"BBBC021 folder {base} does not exist under data root {root}")
    sums = _Sums(root)
    rows = []
    for cls, label in BBBC021_CLASSES.items():
        folder = base / cls
        files = sorted(folder.glob("*.npy")) if folder.is_dir() else []
        if not files:
            raise DataError(f"class folder {folder} holds no .npy images; expected the "
                            f"{cls!r} crops of BBBC021")
        for f in files:
            field, _, idx = f.stem.rpartition("_")
            if not field or not idx.isdigit():
                raise DataError(f"{f}: file name does not match <well>_s<site>_w1<UUID>_<cell>"
                                f".npy")
            well, site = field.split("_")[0], field.split("_")[1].lstrip("s")
            rel = f.relative_to(root).as_posix()
            rows.append({"cell_id": f"{cls}/{f.stem}", "path": rel, "label": label,
                         "class_name": cls, "group": field, "channels": BBBC021_CHANNELS,
                         "sha256": sums(rel), "shape": "68x68x3", "stains": BBBC021_STAINS,
                         "dataset": "BBBC021v1",
                         "well": well, "site": int(site), "cell_index": int(idx)})
    df = pd.DataFrame(rows)
    df = df.sort_values(["label", "group", "cell_index"], kind="stable").reset_index(drop=True)
    return df


def draw_paper_cells(full: pd.DataFrame, counts: dict[int, int] | None = None,
                     seed: int = PAPER_SEED, min_fields: int = MIN_FIELDS_PER_CLASS,
                     max_per_field: int = MAX_PER_FIELD) -> pd.DataFrame:
    """Draw the paper-sized cohort from ``full`` (a manifest table), per class.

    Rule ("whole fields where possible", constrained by grouped 5-fold CV): for a class with a
    target of ``n`` cells, use ``k = max(min_fields, ceil(n / max_per_field))`` fields, i.e. the
    fewest fields that still spread the class over at least ``min_fields`` (= 2 x 5 folds, so
    every test fold holds >= 2 fields of each class and the training folds stay balanced); draw
    the ``k`` fields at random (seeded), then a block of ``n // k`` cells from each (the first
    ``n % k`` fields give one more), drawn at random within the field. With the defaults:
    normal 10 fields x 10 cells, abnormal 10 fields x 12 cells. Returns the rows, sorted like
    ``full``. Deterministic for a given ``seed``.
    """
    counts = dict(PAPER_COUNTS if counts is None else counts)
    rng = np.random.default_rng(seed)
    keep = []
    for label in sorted(counts):
        n = int(counts[label])
        sub = full[full["label"] == label]
        fields = sorted(sub["group"].unique())
        k = max(int(min_fields), math.ceil(n / max_per_field))
        if k > len(fields):
            raise DataError(f"class label {label}: {len(fields)} field(s) available; expected "
                            f"at least {k} to draw {n} cells over >= {min_fields} fields")
        chosen = sorted(rng.choice(fields, size=k, replace=False).tolist())
        base, extra = divmod(n, k)
        for j, fld in enumerate(chosen):
            q = base + (1 if j < extra else 0)
            cells = sub[sub["group"] == fld]
            if q > len(cells):
                raise DataError(f"field {fld!r}: {len(cells)} cells; expected at least {q}")
            pick = rng.choice(cells.index.to_numpy(), size=q, replace=False)
            keep.extend(pick.tolist())
    return full.loc[sorted(keep)].reset_index(drop=True)


def build_bbbc021_paper(root: str | Path | None = None, seed: int = PAPER_SEED) -> pd.DataFrame:
    """The ``bbbc021-paper`` manifest: ``draw_paper_cells(build_bbbc021_full(root), seed=seed)``."""
    return draw_paper_cells(build_bbbc021_full(root), seed=seed)


def unseen_cells(full: pd.DataFrame, cohort: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``full`` whose ``group`` (source field) is not a group of ``cohort``.

    Whole fields only: a field that ``cohort`` draws even one cell from is left out entirely,
    since the cells of one field are correlated (same well, site, exposure). Returns the rows in
    ``full``'s order, re-indexed; deterministic. ``DataError`` when ``cohort`` lacks the
    ``group`` column or when nothing is left.
    """
    for what, df in (("full", full), ("cohort", cohort)):
        if "group" not in df.columns:
            raise DataError(f"{what} table lacks the 'group' column; it has {list(df.columns)}")
    used = set(cohort["group"].astype(str))
    keep = ~full["group"].astype(str).isin(used)
    if not keep.any():
        raise DataError(f"every one of the {full['group'].nunique()} fields of the full table is "
                        f"used by the cohort; expected at least one unseen field")
    return full[keep].reset_index(drop=True)


def build_bbbc021_unseen(root: str | Path | None = None, seed: int = PAPER_SEED) -> pd.DataFrame:
    """The ``bbbc021-unseen`` manifest (the study's external test set): every
    ``build_bbbc021_full(root)`` row whose field is not a field of the ``bbbc021-paper`` draw
    (``draw_paper_cells(full, seed=seed)``): 240 normal (6 fields) + 320 abnormal (8 fields)."""
    full = build_bbbc021_full(root)
    return unseen_cells(full, draw_paper_cells(full, seed=seed))


# ---------------------------------------------------------------------------------------------
# RxRx1
# ---------------------------------------------------------------------------------------------
def build_rxrx1_cells(root: str | Path | None = None, size: int = RXRX1_CROP_SIZE,
                      cap: int = RXRX1_CAP_PER_FIELD, seed: int = RXRX1_SEED,
                      seg_params: dict | None = None) -> pd.DataFrame:
    """Single-cell crops cut from the RxRx1 fields (``rxrx1-celltypes/manifest.csv``).

    Per field: ``segment_nuclei`` on w1 (Hoechst) with ``seg_params`` (default
    ``SEGMENT_DEFAULTS``), a ``size`` x ``size`` crop centred on each nucleus, crops touching the
    border dropped, then at most ``cap`` of them drawn at random (generator seeded by ``seed``
    and the field name), kept in label order. path = the field's w2;w3;w1 PNGs (R;G;B),
    channels ``0,0,0``. Extra columns: ``experiment, cell_type, plate, well_site, split,
    nucleus, centroid_y, centroid_x, area, nuclei_in_field, crops_in_field`` (before the cap).
    """
    root = config.data_root(root)
    base = root / RXRX1_DIR
    mpath = base / "manifest.csv"
    if not mpath.is_file():
        raise FileNotFoundError(f"RxRx1 manifest {mpath} does not exist under data root {root}")
    fields = pd.read_csv(mpath, dtype=str)
    params = {**SEGMENT_DEFAULTS, **(seg_params or {})}
    sums = _Sums(root)
    rows = []
    for _, r in fields.iterrows():
        cls = r["class_2way"]
        if cls not in RXRX1_CLASSES:
            raise DataError(f"{mpath}: class_2way {cls!r} for {r['path_prefix']}; expected one "
                            f"of {sorted(RXRX1_CLASSES)}")
        rels = [f"{RXRX1_DIR}/{r['path_prefix']}_{w}.png" for w in RXRX1_RGB_FILES]
        for rel in rels:
            if not (root / rel).is_file():
                raise FileNotFoundError(f"RxRx1 channel file {root / rel} does not exist")
        dna_bytes = (root / rels[2]).read_bytes()
        dna = decode_image(dna_bytes, rels[2])
        labels = segment_nuclei(dna, **params)
        t = nucleus_table(labels, size)
        n_nuclei = len(t)
        t = t[t["inside"].astype(bool)]
        n_inside = len(t)
        group = f"{r['experiment']}/{r['plate']}/{r['well_site']}"
        rng = seeds.rng(seed, "cohort_cells", zlib.crc32(group.encode()))
        if n_inside > cap:
            t = t.loc[np.sort(rng.choice(t.index.to_numpy(), size=cap, replace=False))]
        shas = ";".join(sums(rel) for rel in rels)
        shape = ";".join("x".join(map(str, dna.shape)) for _ in rels)
        for _, n in t.iterrows():
            rows.append({"cell_id": f"{group}/n{int(n['label']):03d}", "path": ";".join(rels),
                         "label": RXRX1_CLASSES[cls], "class_name": cls, "group": group,
                         "channels": "0,0,0", "sha256": shas, "shape": shape, "stains": RXRX1_STAINS,
                         "crop_y": int(n["crop_y"]), "crop_x": int(n["crop_x"]),
                         "crop_size": int(size), "dataset": "RxRx1",
                         "experiment": r["experiment"], "cell_type": r["cell_type"],
                         "plate": r["plate"], "well_site": r["well_site"], "split": r["split"],
                         "nucleus": int(n["label"]), "centroid_y": float(n["centroid_y"]),
                         "centroid_x": float(n["centroid_x"]), "area": int(n["area"]),
                         "nuclei_in_field": n_nuclei, "crops_in_field": n_inside})
    df = pd.DataFrame(rows)
    return df.sort_values(["label", "group", "nucleus"], kind="stable").reset_index(drop=True)


BUILDERS = {
    "bbbc021-paper": build_bbbc021_paper,
    "bbbc021-full": build_bbbc021_full,
    "bbbc021-unseen": build_bbbc021_unseen,
    "rxrx1-cells": build_rxrx1_cells,
}


def build(name: str, root: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Build cohort ``name``'s manifest from ``root`` and write it to ``out`` (default
    ``data_manifest/<name>.csv``). Returns the path written."""
    if name not in BUILDERS:
        raise DataError(f"unknown cohort {name!r}; expected one of {sorted(BUILDERS)}")
    df = BUILDERS[name](root)
    out = Path(out) if out is not None else MANIFEST_DIR / f"{name}.csv"
    return _write(df, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cellstudy.data.cohorts",
                                 description="Build or verify the cohort manifests.")
    ap.add_argument("command", choices=["build", "verify", "list"])
    ap.add_argument("--root", default=None, help="data root (default: $CELLSTUDY_DATA_ROOT or "
                                                 "../shared/data)")
    ap.add_argument("--out", default=str(MANIFEST_DIR), help="folder for the manifests")
    ap.add_argument("--cohort", action="append", choices=sorted(BUILDERS),
                    help="only this cohort (repeatable); default all")
    a = ap.parse_args(argv)
    names = a.cohort or list(BUILDERS)
    if a.command == "list":
        for n, d in COHORTS.items():
            print(f"{n}: {d}")
        return 0
    for n in names:
        if a.command == "build":
            p = build(n, a.root, Path(a.out) / f"{n}.csv")
            df = pd.read_csv(p)
            print(f"{n}: {len(df)} cells ({(df.label == 0).sum()} normal, "
                  f"{(df.label == 1).sum()} abnormal), {df.group.nunique()} groups -> {p}")
        else:
            verify_manifest(load_manifest(n), a.root)
            print(f"{n}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
