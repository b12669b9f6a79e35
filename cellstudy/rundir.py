"""The run folder: every path and file name of a study run, and the questions asked of it.

One owner for the layout. Modules and notebooks ask a :class:`Run` for a path instead of joining
names themselves::

    <run>/
      study.yaml          the study config the runner ran        Run.study_config
      scale.json          the resolved scale, written once       Run.scale_file / Run.scale()
      cohort.json         the run's cohort (its cells' hash)     Run.cohort_file / Run.check_cohort()
      provenance.json     config, scale, versions, checksums     Run.provenance
      status.json         steps, timings, state                  Run.status
      logs/<step>.log     a step's progress output               Run.log(step)
      notebooks/<step>.ipynb  the executed notebooks             Run.executed(step)
      screenshots/ book/  the browser check's pages, the book    Run.screenshots, Run.book
      folds/<cohort>.csv  the run's folds (of its one cohort)    Run.folds_file(cohort)
      <step>/             what notebook <step> writes            Run.step(step)
      training/<model>/fold<k>/                                  Run.fold(model, k) -> FoldDir
          done.json | failed.json, zca.json, test_cells.csv,
          model_<regime>.keras, proba_<regime>.npy, model.joblib (classical), ...

No TensorFlow, no pandas at import: paths, JSON and the folder's state only (``Run.check_cohort``
reads old folds files' headers with ``cellstudy.learning.folds.read_header``, imported when called).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellstudy import atomic, config

#: A (model, fold) folder's markers: finished, failed.
DONE = "done.json"
FAILED = "failed.json"
#: The workflow's target for a (model, fold): its training job ended (done or failed).
ENDED = "ended.json"
#: The fold's whitening (``augment.ZCAWhitening`` state, fitted on the fold's training cells).
ZCA = "zca.json"
#: The fold's test cells: cell_id, group, label.
TEST_CELLS = "test_cells.csv"
#: A classical classifier's fitted pipeline (cellstudy.learning.baseline).
CLASSIFIER_MODEL = "model.joblib"
#: The training regimes (study.md section 6): short and long.
REGIMES: tuple[str, ...] = ("short", "long")
#: The run's resolved scale.
SCALE_FILE = "scale.json"


class RunFolderError(ValueError):
    """The run folder does not hold what was asked for, or holds something else (another scale)."""


def model_file(regime: str) -> str:
    """``model_<regime>.keras``: a network's whole saved model at the end of ``regime``."""
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r}; expected one of {REGIMES}")
    return f"model_{regime}.keras"


def proba_file(regime: str) -> str:
    """``proba_<regime>.npy``: the fold's test-cell probabilities, (n_test, n_classes) float32."""
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r}; expected one of {REGIMES}")
    return f"proba_{regime}.npy"


@dataclass(frozen=True)
class FoldDir:
    """One (model, fold) folder: ``<run>/training/<network>/fold<k>/``."""

    path: Path
    network: str
    fold: int

    @property
    def done(self) -> Path:
        return self.path / DONE

    @property
    def failed(self) -> Path:
        return self.path / FAILED

    @property
    def ended(self) -> Path:
        return self.path / ENDED

    @property
    def zca(self) -> Path:
        return self.path / ZCA

    @property
    def test_cells(self) -> Path:
        return self.path / TEST_CELLS

    @property
    def classifier_model(self) -> Path:
        return self.path / CLASSIFIER_MODEL

    def model(self, regime: str) -> Path:
        return self.path / model_file(regime)

    def proba(self, regime: str) -> Path:
        return self.path / proba_file(regime)

    def is_finished(self) -> bool:
        """``done.json`` or ``failed.json`` is there: the (model, fold) will not train further."""
        return self.done.exists() or self.failed.exists()

    def can_read_back(self) -> bool:
        """Finished and its ``test_cells.csv`` written: ``experiment.run_fold`` reads the fold
        back instead of training it."""
        return self.is_finished() and self.test_cells.is_file()

    def problem(self, regime: str | None = None, *, need_test_cells: bool = True,
                classical: bool = False) -> dict[str, Any] | None:
        """None when this fold can be used for ``regime`` (a network: done, its model for the
        regime, its whitening and, with ``need_test_cells``, its test cells; a classical classifier:
        done and its fitted model), else ``{"network", "fold", "status", "detail"}`` saying why not
        (``status``: failed / unfinished / incomplete)."""
        row = {"network": self.network, "fold": self.fold}
        if self.failed.exists():
            return {**row, "status": "failed", "detail": self.failed.read_text()[:200]}
        if classical:
            if not self.done.is_file() or not self.classifier_model.is_file():
                return {**row, "status": "unfinished", "detail": f"no {DONE} or {CLASSIFIER_MODEL} in {self.path}"}
            return None
        model = self.model(regime or "long")
        if self.done.exists() and not model.exists():
            return {**row, "status": "model deleted",
                    "detail": f"{self.path} is finished ({DONE}) but its {model.name} is gone (deleted to free disk?)"}
        if not self.done.exists() or not model.exists():
            return {**row, "status": "unfinished", "detail": f"no {DONE} or {model.name} in {self.path}"}
        if not self.zca.exists():
            return {**row, "status": "incomplete",
                    "detail": f"{ZCA} missing in {self.path}: the fold's whitening is unknown"}
        if need_test_cells and not self.test_cells.exists():
            return {**row, "status": "incomplete", "detail": f"{TEST_CELLS} missing in {self.path}"}
        return None

    def read_done(self) -> dict[str, Any]:
        """The parsed ``done.json``."""
        return json.loads(self.done.read_text())


def _fold_number(p: Path) -> int | None:
    return int(p.name[4:]) if p.name.startswith("fold") and p.name[4:].isdigit() else None


class Run:
    """A run folder (it need not exist yet). ``Run(path)``; ``str(run)`` is the path."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    # -- files at the top ------------------------------------------------------------------------
    @property
    def study_config(self) -> Path:
        return self.root / "study.yaml"

    @property
    def scale_file(self) -> Path:
        return self.root / SCALE_FILE

    @property
    def cohort_file(self) -> Path:
        return self.root / "cohort.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def screenshots(self) -> Path:
        return self.root / "screenshots"

    @property
    def training(self) -> Path:
        return self.root / "training"

    @property
    def book(self) -> Path:
        return self.root / "book"

    def executed(self, step: str) -> Path:
        """``<run>/notebooks/<step>.ipynb``: the executed copy of notebook ``step``."""
        return self.notebooks / f"{step}.ipynb"

    def config_weights(self) -> dict[str, dict[str, str]] | None:
        """The pretrained backbone weights of the run's study config (``study.yaml``'s
        ``weights``: ``{backbone: {"path", "sha256"}}``); None when it has none or no config."""
        import yaml

        if not self.study_config.is_file():
            return None
        w = (yaml.safe_load(self.study_config.read_text()) or {}).get("weights")
        return w or None

    def log(self, step: str) -> Path:
        """``<run>/logs/<step>.log``: a step's stream output, kept out of the book."""
        return self.logs / f"{step}.log"

    # -- steps and folds -------------------------------------------------------------------------
    def step(self, step: str, create: bool = True) -> Path:
        """``<run>/<step>/`` (created unless ``create`` is False): where notebook ``step`` writes."""
        p = self.root / step
        if create:
            p.mkdir(parents=True, exist_ok=True)
        return p

    def folds_file(self, cohort: str, create: bool = True) -> Path:
        """The run's folds file for ``cohort``: ``<run>/folds/<cohort>.csv``; for a cohort given as
        a manifest path, ``<run>/folds/<manifest file's stem>.csv`` (its folder created unless
        ``create`` is False). A run keeps one cohort (:meth:`check_cohort`, which every step calls
        first, passes the same cells under another name or manifest path): once ``cohort.json``
        records the name the run was made with, the file is that name's, whatever name ``cohort``
        gives the same cells (a manifest copied or renamed between two steps reads the run's
        folds, not a second folds file)."""
        d = self.root / "folds"
        if create:
            d.mkdir(parents=True, exist_ok=True)
        recorded = self.recorded_cohort()
        return d / f"{_folds_stem(recorded if recorded is not None else cohort)}.csv"

    def recorded_cohort(self) -> str | None:
        """The cohort name (or manifest path) ``cohort.json`` records; None without a readable one."""
        try:
            name = json.loads(self.cohort_file.read_text()).get("cohort")
        except (OSError, ValueError, AttributeError):
            return None
        return str(name) if name else None

    def fold(self, network: str, fold: int, create: bool = False) -> FoldDir:
        """The folder of ``network``'s fold ``fold`` (created with ``create``)."""
        p = self.training / network / f"fold{int(fold)}"
        if create:
            p.mkdir(parents=True, exist_ok=True)
        return FoldDir(p, network, int(fold))

    @property
    def replicates(self) -> Path:
        """``<run>/replicates/``: seed replicates of the run's networks (``cellstudy replicate``;
        ``learning.replicates``), kept apart from ``training/``, which the book reads."""
        return self.root / "replicates"

    def replicate(self, network: str, fold: int, seed: int, create: bool = False) -> FoldDir:
        """The folder of ``network``'s fold ``fold`` trained at training seed ``seed`` (a seed
        replicate): ``<run>/replicates/seed<s>/<network>/fold<k>/`` (created with ``create``);
        the same files as a study fold's."""
        p = self.replicates / f"seed{int(seed)}" / network / f"fold{int(fold)}"
        if create:
            p.mkdir(parents=True, exist_ok=True)
        return FoldDir(p, network, int(fold))

    def folds(self, network: str) -> list[FoldDir]:
        """The fold folders of ``network`` that exist, by fold number."""
        d = self.training / network
        if not d.is_dir():
            return []
        ks = sorted(k for k in (_fold_number(p) for p in d.iterdir() if p.is_dir()) if k is not None)
        return [self.fold(network, k) for k in ks]

    def models(self) -> list[str]:
        """The models (networks and classifiers) with a folder under ``training/``, in the
        catalogue's order (others after, alphabetically)."""
        from cellstudy import networks

        if not self.training.is_dir():
            return []
        return networks.ordered(p.name for p in self.training.iterdir() if p.is_dir())

    def all_folds(self) -> list[FoldDir]:
        """Every fold folder of every model, in the catalogue's then the folds' order."""
        return [fd for name in self.models() for fd in self.folds(name)]

    def usable_folds(self, network: str, regime: str | None = None, *, need_test_cells: bool = True,
                     classical: bool = False) -> tuple[list[FoldDir], list[dict[str, Any]]]:
        """Which folds of ``network`` can be used for ``regime`` (:meth:`FoldDir.problem`), and a
        note for each of the others; one "not trained" note when the network has no usable fold."""
        found, notes = [], []
        for fd in self.folds(network):
            prob = fd.problem(regime, need_test_cells=need_test_cells, classical=classical)
            (notes.append(prob) if prob else found.append(fd))
        if not found and not notes:
            d = self.training / network
            detail = f"no folder {d}" if not d.is_dir() else f"no finished fold in {d}"
            notes.append({"network": network, "fold": None, "status": "not trained", "detail": detail})
        return found, notes

    def models_deleted(self, regime: str) -> list[str]:
        """The networks (book's order) whose folds finished (``done.json``) but whose
        ``model_<regime>.keras`` files are all gone (the README says to delete them when done):
        what ``predict`` and ``export`` say instead of "not trained"."""
        from cellstudy import networks

        out = []
        for n in networks.NETWORK_NAMES:
            fds = self.folds(n)
            if fds and all(fd.done.exists() and not fd.model(regime).exists() for fd in fds):
                out.append(n)
        return out

    def no_model_message(self, regime: str, network: str | None = None) -> str:
        """Why ``predict`` / ``export`` find no ``model_<regime>.keras`` (of ``network``, or of any
        network): the models were deleted from finished folds, or nothing was trained."""
        deleted = self.models_deleted(regime)
        if network is not None and network in deleted or network is None and deleted:
            which = f"{network}'s" if network is not None else f"the networks' ({', '.join(deleted)})"
            return (f"{self.root}: {which} folds finished (done.json) but their model_{regime}.keras files "
                    "were deleted; prediction and export need them: use a run folder that kept its models, "
                    "or train the network again in a new run")
        what = f"of {network!r} " if network is not None else ""
        return f"{self.root} has no finished fold {what}with model_{regime}.keras: run the study first"

    def trained_networks(self, regime: str, *, need_test_cells: bool = True) -> list[str]:
        """The networks (book's order) with at least one fold usable for ``regime``
        (:meth:`usable_folds`): what ``predict`` and ``export`` offer."""
        from cellstudy import networks

        return [n for n in networks.NETWORK_NAMES
                if self.usable_folds(n, regime, need_test_cells=need_test_cells)[0]]

    # -- the resolved scale ----------------------------------------------------------------------
    def scale(self, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's resolved scale. The first call writes ``scale.json`` (``name``, the
        overrides, and every value resolved by ``config.get_scale``); later calls read it back and
        check that ``name`` and ``overrides`` still resolve to the same values, so that one run never
        mixes two scales (an edited scale in config.py, other overrides): RunFolderError naming the
        file and the differing keys otherwise."""
        resolved = config.get_scale(name, overrides)
        if not self.scale_file.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            atomic.write_json(self.scale_file, scale_record(name, overrides, resolved))
            return resolved
        rec = read_scale_file(self.scale_file)
        stored = rec["values"]
        now = json.loads(json.dumps(resolved))
        if rec.get("name") != name or stored != now:
            diff = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
            shown = "; ".join(f"{k}: {stored.get(k)!r} in the run, {now.get(k)!r} now" for k in diff[:4])
            more = f" (and {len(diff) - 4} more: {diff[4:]})" if len(diff) > 4 else ""
            same_ask = rec.get("name") == name and (rec.get("overrides") or {}) == json.loads(json.dumps(overrides or {}))
            if not diff:
                what = "which resolves to the same values under another name"
            elif same_ask:   # the same request, other values: the scale was edited since (config.py)
                what = f"the same request, but the scale's values have changed since the run was made: {shown}{more}"
            else:
                what = f"which differs in {shown}{more}"
            raise RunFolderError(
                f"this run folder was made at scale {rec.get('name')!r} with overrides {rec.get('overrides') or {}} "
                f"({self.scale_file}); you asked for scale {name!r} with overrides {overrides or {}}, {what}. "
                "A run keeps one scale: start a new run folder, or pass the scale and overrides it was made with")
        return resolved

    def check_cohort(self, cohort: str, cells_hash: str, n_cells: int) -> None:
        """The run's cohort, by its cells' hash (``folds.cells_hash``: cell ids, labels, groups).
        The first call writes ``cohort.json`` (created exclusively: of two processes starting at
        once, the second reads the first's record and is checked against it); later calls refuse
        another cohort with a RunFolderError naming both, so that one run never reads back folds
        trained on other cells (a notebook run by hand with another ``cohort`` in the same run
        folder). A run folder made before ``cohort.json`` existed is checked against the hashes in
        the headers of its folds files. The same cells under another name or manifest path pass."""
        rec = {"cohort": str(cohort), "cells_hash": str(cells_hash), "n_cells": int(n_cells)}
        if not self.cohort_file.is_file():
            from cellstudy.learning.folds import FoldsError, read_header

            for f in sorted((self.root / "folds").glob("*.csv")) if (self.root / "folds").is_dir() else []:
                try:
                    old = read_header(f)
                except (OSError, FoldsError):   # not a folds file: it records no cohort
                    continue
                if old.get("cells_sha256") not in (None, rec["cells_hash"]):
                    self._refuse(f"the cells of {f.name}", old.get("n_cells"), cohort, n_cells, f)
                if old.get("cells_sha256") == rec["cells_hash"]:   # its folds, under the name they were made with
                    rec["cohort"] = f.stem
            self.root.mkdir(parents=True, exist_ok=True)
            if atomic.create_json(self.cohort_file, rec):
                return
        try:
            stored = json.loads(self.cohort_file.read_text())
            old_hash, old_name, old_n = stored["cells_hash"], stored.get("cohort"), stored.get("n_cells")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunFolderError(f"{self.cohort_file}: cannot read the run's cohort record ({e})") from e
        if old_hash != rec["cells_hash"]:
            self._refuse(f"cohort {old_name!r}", old_n, cohort, n_cells, self.cohort_file)

    def _refuse(self, made_for: str, old_n: Any, cohort: str, n_cells: int, where: Path) -> None:
        raise RunFolderError(
            f"{self.root} was made for {made_for} ({old_n} cells), not {str(cohort)!r} ({int(n_cells)} cells; "
            f"other cells, labels or groups: {where}); a run keeps one cohort (its trained folds would be read "
            "back as this cohort's): start a new run folder, or pass the cohort it was made with")


def _folds_stem(cohort: str) -> str:
    """A folds file's stem: the cohort's name, or a manifest path's file stem."""
    name = str(cohort)
    if name.lower().endswith(".csv") or "/" in name or os.sep in name:
        name = Path(name).stem
    return name


def scale_record(name: str, overrides: dict[str, Any] | None, resolved: dict[str, Any]) -> dict[str, Any]:
    """What ``scale.json`` holds: the scale's name, the overrides and the resolved values."""
    return json.loads(json.dumps({"name": name, "overrides": overrides or {}, "values": resolved}))


def read_scale_file(path: str | os.PathLike) -> dict[str, Any]:
    """``scale.json`` parsed; RunFolderError naming the file when it is not one."""
    p = Path(path)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{p}: cannot read the run's resolved scale ({e})") from e
    if not isinstance(rec, dict) or not isinstance(rec.get("values"), dict):
        raise RunFolderError(f"{p}: expected {{'name', 'overrides', 'values'}} written by cellstudy")
    # a run made before a key existed was made with the value that key's default reproduces
    rec["values"] = {**{k: v for k, v in config.ADDED_SCALE_KEYS.items() if k not in rec["values"]},
                     **rec["values"]}
    return rec


def as_run(run: "Run | str | os.PathLike") -> Run:
    """``run`` as a :class:`Run` (a path or a Run)."""
    return run if isinstance(run, Run) else Run(run)


def check_prepared(run_dir: "Run | str | os.PathLike") -> Run:
    """The owner of a prepared run folder (one that ``cellstudy run`` / ``workflow`` made: its
    ``study.yaml`` and ``scale.json`` are there). RunFolderError naming the folder when it does not
    exist or is not one. Cheap: the commands that load TensorFlow call it first, so that a wrong
    path fails at once instead of after TensorFlow's ~5-10 s import."""
    run = as_run(run_dir)
    if not run.root.is_dir():
        raise RunFolderError(missing_run_folder(run.root))
    for f in (run.study_config, run.scale_file):
        if not f.is_file():
            raise RunFolderError(
                f"{run.root} is not a prepared run folder: {f.name} is missing (make one with "
                "`cellstudy workflow CONFIG` or `cellstudy run CONFIG`)" + runs_inside_hint(run.root))
    return run


def missing_run_folder(path: str | os.PathLike) -> str:
    """What to say when ``path`` is not a folder: it does not exist, or it is a file."""
    path = Path(path)
    return (f"{path} is a file, not a run folder" if path.exists()
            else f"run folder {path} does not exist")


def runs_inside_hint(folder: str | os.PathLike, most: int = 3) -> str:
    """``"; it holds run folders: a, b, ...: give one of them"`` when ``folder`` is a folder of
    runs (its subfolders have a ``study.yaml``, e.g. ``runs/``), the newest first; else ``""``."""
    folder = Path(folder)
    try:
        found = sorted((p for p in folder.iterdir() if (p / "study.yaml").is_file()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return ""
    if not found:
        return ""
    more = f" and {len(found) - most} more" if len(found) > most else ""
    return f"; it holds run folders: {', '.join(str(p) for p in found[:most])}{more}: give one of them"
