"""The study's shared preparation: cohort -> preprocessing -> folds, as every notebook needs it.

``prepare`` is what a notebook calls after its parameters cell: it resolves the scale, loads and
verifies the cohort, preprocesses every cell to S x S (cached on disk, so only the first notebook
of a run pays for it) and loads the run's folds file (made once per run, reused by every later
step so all networks share the same folds).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellstudy import data, rundir, threads
from cellstudy.learning import folds as folds_mod
from cellstudy.data import preprocess


@dataclass
class Prepared:
    """A cohort ready for the folds.

    images: (N, S, S, 3) float32, preprocessed, RGB order (config.CHANNELS).
    raw: the loaded Cohort (robust-scaled images at their stored size, manifest table).
    folds: (N,) int, the test fold of each cell.
    """

    cohort: data.Cohort
    images: np.ndarray
    folds: np.ndarray
    scale: dict[str, Any]
    scale_name: str
    run_dir: Path
    folds_path: Path
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return self.cohort.labels

    @property
    def groups(self) -> np.ndarray:
        return self.cohort.groups

    @property
    def cell_ids(self) -> np.ndarray:
        return self.cohort.cell_ids

    @property
    def n_splits(self) -> int:
        return int(self.scale["n_splits"])


def step_dir(run_dir: str | os.PathLike, step: str) -> Path:
    """``<run_dir>/<step>/``, created: where a notebook writes its tables, figures and arrays
    (``rundir.Run.step``)."""
    return rundir.Run(run_dir).step(step)


def folds_path(run_dir: str | os.PathLike, cohort: str) -> Path:
    """The run's folds file: ``<run_dir>/folds/<cohort>.csv``, named by the cohort the run was made
    with (``rundir.Run.folds_file``: a renamed manifest of the same cells reads the same file)."""
    return rundir.Run(run_dir).folds_file(cohort)


def run_scale(run_dir: str | os.PathLike, scale: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's resolved scale (``<run>/scale.json``, written by the first step, read back by
    every later one; ``rundir.Run.scale``): what a notebook uses after its parameters cell."""
    return rundir.Run(run_dir).scale(scale, overrides)


def cohort_identity(table) -> tuple[str, int]:
    """``(cells hash, cell count)`` of a cohort's manifest table: what a run folder records of its
    cohort (``cohort.json``, ``rundir.Run.check_cohort``). The hash is ``folds.cells_hash`` of the
    cell ids, labels and groups."""
    return (folds_mod.cells_hash(table["cell_id"].astype(str), table["label"].astype(int),
                                 table["group"].astype(str)), len(table))


def check_run_cohort(run_dir: str | Path, cohort: str, strict: bool = True):
    """Refuse ``cohort`` for the run folder ``run_dir`` when the run was made for other cells
    (``rundir.Run.check_cohort``; the first step to call it records the cohort), from the cohort's
    manifest alone (no image is read): every chapter that takes a ``cohort`` parameter calls it
    (``prepare`` does), so a notebook run by hand with another cohort stops before it reads or
    writes anything. Returns the manifest table (``data.load_manifest``). A cohort whose manifest
    cannot be read this way (an unknown name, a missing column) raises its error (DataError /
    FileNotFoundError) unless ``strict=False`` (``prepare``: ``data.load_cohort`` then refuses it with
    its own message), which returns None."""
    try:
        tab = data.load_manifest(cohort)
        ident = cohort_identity(tab)
    except (ValueError, KeyError, TypeError) as e:
        if strict:
            if isinstance(e, data.DataError):
                raise
            raise data.DataError(f"cohort {cohort!r}: its manifest has no usable cell_id / label / group "
                                 f"columns ({type(e).__name__}: {e}); `cellstudy verify {cohort}` says more") from e
        return None
    rundir.Run(run_dir).check_cohort(cohort, *ident)
    return tab


def prepare(cohort: str, scale: str, run_dir: str | os.PathLike, data_root: str | None = None,
            seed: int = 0, overrides: dict[str, Any] | None = None, progress: bool = True) -> Prepared:
    """Load, verify and preprocess ``cohort`` at ``scale``; make or reuse the run's folds. The
    scale is the run's (``run_scale``: a run folder made at other scale values is refused), and so
    is the cohort (``rundir.Run.check_cohort``: a run folder made for other cells is refused)."""
    sc = run_scale(run_dir, scale, overrides)
    t0 = time.perf_counter()
    # None: a manifest check_run_cohort cannot read, which load_cohort (reading it again) refuses
    # with its own message (an unknown cohort, a missing column, a label that is not 0 / 1)
    tab = check_run_cohort(run_dir, cohort, strict=False)
    coh = data.load_cohort(cohort, root=data_root, manifest=tab)
    t1 = time.perf_counter()
    images = preprocess.preprocess_batch(coh.images, list(coh.sha256), sc["image_size"], sc["preprocess"],
                                         progress=progress)
    t2 = time.perf_counter()
    fp = folds_path(run_dir, cohort)
    f = folds_mod.load_or_make_folds(fp, coh.cell_ids, coh.labels, coh.groups, n_splits=sc["n_splits"], seed=seed)
    t3 = time.perf_counter()
    return Prepared(cohort=coh, images=images, folds=f, scale=sc, scale_name=scale, run_dir=Path(run_dir),
                    folds_path=fp, seconds={"load": t1 - t0, "preprocess": t2 - t1, "folds": t3 - t2})


def run_workers(run_dir: str | os.PathLike) -> int:
    """How many notebooks the runner ran at once in this run: ``workers`` of the run's
    ``study.yaml`` (written by the runner), 1 when there is none (a notebook run by hand)."""
    import yaml

    p = rundir.Run(run_dir).study_config
    if not p.is_file():
        return 1
    w = (yaml.safe_load(p.read_text()) or {}).get("workers", 1)
    return int(w) if isinstance(w, int) and w >= 1 else 1


def shared_cpu_note(run_dir: str | os.PathLike, what: str = "These speeds") -> str:
    """A sentence for timings measured in a run whose steps ran at once ("" otherwise)."""
    w = run_workers(run_dir)
    if w <= 1:
        return ""
    t = kernel_tf_threads(run_dir)
    each = f", each job's TensorFlow with {t} thread(s)" if t else ""
    return (f"{what} were measured while up to {w} jobs (training jobs and notebooks) ran at once on this "
            f"machine (the study config's `workers`{each}): they shared its cores, so these are the speeds "
            "within this run, not each network's speed alone (`benchmarks/train_throughput.py` measures that).")


def kernel_tf_threads(run_dir: str | os.PathLike) -> str | None:
    """The intra-op TensorFlow threads the runner gave this run's notebooks (``provenance.json``,
    ``hardware.tf_threads``; ``cellstudy.threads``); None: TensorFlow's default or no record."""
    import json

    p = rundir.Run(run_dir).provenance
    try:
        t = (json.loads(p.read_text()).get("hardware") or {}).get("tf_threads") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return t.get(threads.INTRA_ENV) if isinstance(t, dict) else None


def preprocess_stages(img: np.ndarray, size: int, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every intermediate image of the preprocessing of one (H, W, 3) cell, in order: raw,
    binomial blur, Landweber deconvolution, curvature anisotropic diffusion, resampled to
    (size, size, 3). The last entry equals ``preprocess.preprocess_image(img, size, **params)``."""
    p = preprocess.check_params(params) if hasattr(preprocess, "check_params") else params

    def per_channel(a: np.ndarray, f) -> np.ndarray:
        return np.stack([f(np.ascontiguousarray(a[..., c], dtype=np.float32)) for c in range(a.shape[-1])], axis=-1)

    out = {"raw": np.asarray(img, dtype=np.float32)}
    out["binomial blur"] = per_channel(out["raw"], lambda a: preprocess.binomial_blur(a, p["blur_repetitions"]))
    out["Landweber"] = per_channel(out["binomial blur"], lambda a: preprocess.landweber_deconvolution(
        a, p["psf_sigma"], p["landweber_iterations"], p["landweber_alpha"]))
    out["diffusion"] = per_channel(out["Landweber"], lambda a: preprocess.anisotropic_diffusion(
        a, p["diffusion_time_step"], p["diffusion_conductance"], p["diffusion_iterations"]))
    out["resampled"] = per_channel(out["diffusion"], lambda a: preprocess.resample(a, size))
    return out
