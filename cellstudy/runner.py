"""The study runner: a study config (YAML) -> papermill runs -> a run folder -> the book.

A study config names the cohort, the scale, the seed and the steps (numbered notebooks)::

    name: default
    cohort: bbbc021-paper
    scale: cpu
    seed: 0
    data_root: null          # null: $CELLSTUDY_DATA_ROOT, else ../shared/data
    overrides: {}            # scale overrides, e.g. {image_size: 64}
    steps: [00_cohort, 01_preprocessing]
    notebook_parameters:     # optional: extra parameters of single steps
      06_gpu_training: {network: mhl}

``run_study`` checks everything it can before long work starts (config values, data root,
manifest, checksums), prepares the run folder ``<runs>/<name>-<timestamp>/`` (``status.json``,
``scale.json``, ``provenance.json``, ``study.yaml``) and runs the study's Snakemake workflow in
it (``cellstudy.workflow``, ``workflow/Snakefile``): Snakemake orders, runs and resumes the jobs
-- one training job per network (all its folds; one per (network, fold) on a cluster), one
papermill job per notebook into ``<run>/notebooks/`` (each notebook writes its tables, figures
and arrays under ``<run>/<step>/``), and the book, built from the executed notebooks into
``<run>/book/_build/html`` and checked in headless Chromium. A failing notebook stops the run,
names the notebook and the cell, marks the run failed and no book is published.

``workers: N`` (config) / ``--workers N``: how many jobs run at once (Snakemake's ``--cores``;
every job is ``threads: 1``). A job starts as soon as the files it needs exist (each notebook
declares the steps it needs in its metadata, ``"cellstudy": {"needs": ["01_preprocessing"]}``;
a notebook without that waits for every step listed before it). On 2 cores, two at once pay off
because much of a job's time is single-threaded (TensorFlow tracing a network's graph, Python):
measured 1.6x on two training runs side by side (README). With ``workers`` > 1 each job's
TensorFlow gets ``cores // workers`` threads (``cellstudy.threads``); the thread count changes
floating-point summation order, so a run repeats exactly at the same ``workers`` (or with the
thread variables exported), not across different ``workers``.

Runs are never overwritten: a new run gets a new folder. An *incomplete* run of the same config
(interrupted or failed) is resumed instead, unless ``new=True``: finished steps and folds are
kept and the remaining ones run (an interrupted fold resumes from its checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from cellstudy import atomic, config, progress, provenance, rundir, threads

log = logging.getLogger("cellstudy.runner")

NOTEBOOK_DIR = config.REPO_ROOT / "notebooks"
#: Environment variable naming another notebook folder (the tests' small notebooks; every job
#: of a workflow reads it, so it crosses into Snakemake's processes).
NOTEBOOKS_ENV = "CELLSTUDY_NOTEBOOKS"
BOOK_TEMPLATE_DIR = config.REPO_ROOT / "book"
MATHJAX_DIR = config.REPO_ROOT / "node_modules" / "mathjax" / "es5"

#: Keep the kernel's C-level stderr (TensorFlow's oneDNN lines) out of notebook outputs.
KERNEL_ARGS = ["--IPKernelApp.capture_fd_output=False"]


class StudyError(RuntimeError):
    """A run failed; the message names the notebook and cell."""


@dataclass
class StudyConfig:
    name: str
    cohort: str
    scale: str
    steps: list[str]
    seed: int = 0
    data_root: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    title: str = "cellstudy"
    #: extra papermill parameters for single steps, e.g. {"06_gpu_training": {"network": "mhl"}}
    notebook_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: how many jobs may run at once (training jobs, notebooks); does not change the results
    workers: int = 1
    #: pretrained backbone weights: {backbone: {path: local file, sha256: its checksum}} for
    #: vgg16 / resnet50 / densenet121 / cnn3; every network on that backbone starts from it
    weights: dict[str, dict[str, str]] = field(default_factory=dict)

    def digest(self) -> str:
        """A short hash identifying what this config computes (used to match runs to resume): the
        config without its title and workers, and the scale's resolved values (an edited scale in
        config.py makes a new digest, so a run is never resumed at other values)."""
        return self._digest(config.get_scale(self.scale, self.overrides))

    def _digest(self, scale: dict[str, Any], overrides: dict[str, Any] | None = None) -> str:
        d = asdict(self)
        d.pop("title", None)
        d.pop("workers", None)
        if overrides is not None:
            d["overrides"] = overrides
        d["resolved_scale"] = scale
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def digests(self) -> set[str]:
        """Every digest a run of this config may carry: :meth:`digest`, and the digests that the
        versions before each scale key of ``config.ADDED_SCALE_KEYS`` was added gave it, while the
        added keys still have the value those versions computed with (set by the scale, or by an
        override to that value, which those versions did not have: ``{epochs_long_max: null}`` on
        the default scale resumes a run of the fixed 10 epochs). A run interrupted before a scale
        key was added is resumed by the new version (its ``scale.json`` is read the same way:
        ``rundir.read_scale_file``)."""
        scale = config.get_scale(self.scale, self.overrides)
        overrides = dict(self.overrides or {})
        out = {self._digest(scale)}
        for key, old in reversed(list(config.ADDED_SCALE_KEYS.items())):  # newest key first
            if scale.get(key) != old:
                break
            scale = {k: v for k, v in scale.items() if k != key}
            if key in overrides and overrides[key] == old:
                overrides.pop(key)
            out.add(self._digest(scale, overrides))
        return out


def notebook_dir() -> Path:
    """The study's notebooks: ``$CELLSTUDY_NOTEBOOKS`` when set, else ``notebooks/``."""
    env = os.environ.get(NOTEBOOKS_ENV)
    return Path(env) if env else NOTEBOOK_DIR


def available_steps() -> list[str]:
    """Notebook stems in ``notebooks/`` (e.g. ``00_cohort``), sorted."""
    return sorted(p.stem for p in notebook_dir().glob("[0-9][0-9]_*.ipynb"))


def step_needs(step: str, steps: list[str]) -> list[str]:
    """The steps of ``steps`` that ``step`` needs done before it starts: the notebook's metadata
    ``cellstudy.needs`` restricted to ``steps`` (a needed step that is not in the config is not
    waited for), or every step listed before it when the notebook declares nothing."""
    nb = json.loads((notebook_dir() / f"{step}.ipynb").read_text())
    declared = (nb.get("metadata", {}).get("cellstudy") or {}).get("needs")
    if declared is None:
        return list(steps[:steps.index(step)])
    if not isinstance(declared, list) or not all(isinstance(d, str) for d in declared):
        raise config.ConfigError(f"notebook {step}.ipynb: metadata cellstudy.needs must be a list of step "
                                 f"names, got {declared!r}")
    return [d for d in declared if d in steps]


def load_config(path: str | os.PathLike, **override: Any) -> StudyConfig:
    """Read and validate a study config; keyword overrides (cohort, scale, data_root, ...) win
    over the file's values when not None. Every value is checked here, before any work."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise config.ConfigError(f"study config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise config.ConfigError(f"study config {path}: expected a mapping, got {type(raw).__name__}")
    for k, v in override.items():
        if v is not None:
            raw[k] = v
    return config_from_dict(raw, path)


def config_from_dict(raw: dict[str, Any], path: str | os.PathLike = "<config>") -> StudyConfig:
    """A study config from its parsed YAML mapping (``load_config``'s checks; ``path`` names it in
    the errors): what the workflow's Snakefile gets from ``--configfile``."""
    raw = dict(raw)
    known = {f for f in StudyConfig.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise config.ConfigError(f"study config {path}: unknown key(s) {sorted(unknown)}; expected {sorted(known)}")
    missing = {"name", "cohort", "scale", "steps"} - set(raw)
    if missing:
        raise config.ConfigError(f"study config {path}: missing key(s) {sorted(missing)}")
    cfg = StudyConfig(**raw)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(cfg.name)):
        raise config.ConfigError(f"study config {path}: name {cfg.name!r} must be letters, digits, '_', '-', '.'")
    cfg.overrides = dict(cfg.overrides or {})
    config.get_scale(cfg.scale, cfg.overrides)  # raises on an unknown scale or parameter
    from cellstudy.data import cohorts
    if str(cfg.cohort).lower().endswith(".csv"):  # a manifest of your own (cellstudy manifest)
        cohort_path = Path(str(cfg.cohort)).expanduser()
        if not cohort_path.is_absolute():  # the notebooks run elsewhere: relative to the config's caller
            cohort_path = Path.cwd() / cohort_path
        if not cohort_path.is_file():
            raise FileNotFoundError(f"cohort manifest {cohort_path} does not exist")
        cfg.cohort = str(cohort_path.resolve())
    elif cfg.cohort not in cohorts.COHORTS:
        raise config.ConfigError(f"unknown cohort {cfg.cohort!r}; expected one of {sorted(cohorts.COHORTS)} "
                                 "or a path to a manifest .csv (cellstudy manifest)")
    if cfg.data_root is not None and str(cfg.data_root).strip():
        # as the cohort's path: relative to the caller's folder, made absolute (the jobs run in the run folder)
        root = Path(str(cfg.data_root)).expanduser()
        if not root.is_absolute():   # an absolute one is kept as written (the config's digest finds its run)
            cfg.data_root = str((Path.cwd() / root).resolve())
    steps = available_steps()
    bad = [s for s in cfg.steps if s not in steps]
    if bad:
        raise config.ConfigError(f"study config {path}: unknown step(s) {bad}; notebooks/ has {steps}")
    cfg.notebook_parameters = dict(cfg.notebook_parameters or {})
    bad = [s for s in cfg.notebook_parameters if s not in cfg.steps]
    if bad:
        raise config.ConfigError(f"study config {path}: notebook_parameters names step(s) {bad} not in steps")
    reserved = {"run_dir", "data_root", "cohort", "scale", "seed", "overrides"}
    for step, extra in cfg.notebook_parameters.items():
        if not isinstance(extra, dict) or set(extra) & reserved:
            raise config.ConfigError(f"study config {path}: notebook_parameters[{step!r}] must be a mapping of "
                                     f"notebook parameters other than {sorted(reserved)}")
    if len(set(cfg.steps)) != len(cfg.steps):
        raise config.ConfigError(f"study config {path}: a step is listed twice in {cfg.steps}")
    cfg.weights = check_weights_entries(cfg.weights, path)
    if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 1:
        raise config.ConfigError(f"study config {path}: workers={cfg.workers!r}; expected an int >= 1 "
                                 "(how many notebooks run at once)")
    for i, step in enumerate(cfg.steps):
        later = [d for d in step_needs(step, cfg.steps) if cfg.steps.index(d) > i]
        if later:
            raise config.ConfigError(f"study config {path}: step {step} needs {later}, listed after it; "
                                     "list them before it")
    return cfg


def check_weights_entries(weights: Any, path: str | os.PathLike = "<config>") -> dict[str, dict[str, str]]:
    """The config's ``weights`` mapping checked for form (not the files: :func:`check_weights`):
    ``{backbone: {"path": str, "sha256": 64 hex digits}}`` with a backbone of
    ``models.backbones.BACKBONES``; a relative path is taken from the current folder and made
    absolute (the jobs run elsewhere). ConfigError naming the entry otherwise."""
    from cellstudy.networks import BACKBONE_NAMES

    if weights in (None, {}):
        return {}
    if not isinstance(weights, dict):
        raise config.ConfigError(f"study config {path}: weights must be a mapping backbone -> "
                                 "{path: FILE, sha256: HEX}, got " + type(weights).__name__)
    out = {}
    for b, entry in weights.items():
        if b not in BACKBONE_NAMES:
            raise config.ConfigError(f"study config {path}: weights for unknown backbone {b!r}; expected one of "
                                     f"{list(BACKBONE_NAMES)}")
        if not isinstance(entry, dict) or set(entry) != {"path", "sha256"}:
            raise config.ConfigError(f"study config {path}: weights[{b!r}] must be {{path: FILE, sha256: HEX}}, "
                                     f"got {entry!r}")
        sha = str(entry["sha256"]).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise config.ConfigError(f"study config {path}: weights[{b!r}].sha256 {entry['sha256']!r} is not a "
                                     "sha256 (64 hex digits; `sha256sum FILE` prints it)")
        p = Path(str(entry["path"])).expanduser()
        out[b] = {"path": str(p if p.is_absolute() else (Path.cwd() / p).resolve()), "sha256": sha}
    return out


def _check_pretraining_record(path: Path, backbone: str, cfg: StudyConfig) -> None:
    """A weights file made by ``cellstudy pretrain`` has a record beside it (``<file>.json``): its
    pre-training must share no file and no source field with the study's cohort (ValueError
    naming the file otherwise). Files without a record (ImageNet, your own) are taken as they are."""
    rec_path = Path(str(path) + ".json")
    if not rec_path.is_file():
        return
    from cellstudy import data

    rec = json.loads(rec_path.read_text())
    table = data.load_manifest(cfg.cohort)
    fields = set(rec.get("fields_used", [])) & set(table["group"].astype(str))
    files = set(rec.get("files_used_sha256", [])) & {h for v in table["sha256"].astype(str) for h in v.split(";")}
    if fields or files:
        raise ValueError(f"weights file {path} (weights[{backbone!r}]) was pre-trained on {len(files)} file(s) and "
                         f"{len(fields)} source field(s) of this study's cohort {cfg.cohort!r} (e.g. "
                         f"{sorted(fields or files)[:3]}; record {rec_path}): its test folds would not be unseen. "
                         f"Pre-train with --serves {cfg.cohort}")


def check_weights(cfg: StudyConfig) -> dict[str, Any]:
    """Before any work: every weights file of ``cfg`` exists, has its sha256 and fits its
    backbone at the run's image size (loaded into the bare backbone). Returns the provenance
    ``{backbone: {path, sha256, bytes, networks}}``; FileNotFoundError / ValueError naming the
    file otherwise."""
    if not cfg.weights:
        return {}
    from cellstudy import networks as catalogue
    from cellstudy.learning.models.weights import fitted_backbone, resolve_weights_path

    S = int(config.get_scale(cfg.scale, cfg.overrides)["image_size"])
    out = {}
    for b, e in cfg.weights.items():
        p = resolve_weights_path(e["path"], e["sha256"])
        try:
            fitted_backbone(b, p, (S, S))
        except ValueError as ex:
            raise ValueError(f"{ex} (study config weights[{b!r}])") from None
        _check_pretraining_record(p, b, cfg)
        out[b] = {**e, "bytes": p.stat().st_size,
                  "networks": catalogue.networks_on(b)}
    return out


# ---------------------------------------------------------------------------------------------
# Run folders and status
# ---------------------------------------------------------------------------------------------
def _status_path(run_dir: Path) -> Path:
    return rundir.Run(run_dir).status


def read_status(run_dir: Path) -> dict[str, Any]:
    p = _status_path(Path(run_dir))
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
    provenance.write_json(_status_path(run_dir), status)


def find_resumable(runs_dir: Path, cfg: StudyConfig) -> Path | None:
    """The newest run folder of this config (same digest) that did not complete."""
    if not runs_dir.is_dir():
        return None
    cands = sorted(runs_dir.glob(f"{cfg.name}-*"), key=lambda p: p.name, reverse=True)
    ours = cfg.digests()
    for run in cands:
        st = read_status(run)
        if st.get("digest") in ours and st.get("state") != "complete":
            return run
        if st.get("digest") in ours:
            return None  # the newest matching run completed: start a new one
    return None


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """A fresh folder ``<runs_dir>/<name>-<YYYYmmdd-HHMMSS>[-n]``; never an existing one."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        cand = runs_dir / (f"{name}-{stamp}" + (f"-{i}" if i else ""))
        try:
            cand.mkdir()
            return cand
        except FileExistsError:
            continue
    raise StudyError(f"could not create a new run folder under {runs_dir}")


def _check_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".write-probe"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise StudyError(f"output folder {folder} is not writable: {e}") from None


# ---------------------------------------------------------------------------------------------
# Checks before long work
# ---------------------------------------------------------------------------------------------
def check_cohort_folds(cfg: StudyConfig, table) -> None:
    """StudyError, before a run folder is made or resumed, when the cohort cannot be split into
    the scale's grouped folds (``folds`` refuses it the same way inside 01_preprocessing): fewer
    groups than ``n_splits`` in a class, a group holding both classes, one class only."""
    from cellstudy.learning import folds as folds_mod

    n_splits = config.get_scale(cfg.scale, cfg.overrides)["n_splits"]
    try:
        folds_mod._check_inputs(table["label"].to_numpy(), table["group"].astype(str).to_numpy(), n_splits)
    except folds_mod.FoldsError as e:
        raise StudyError(f"cohort {cfg.cohort!r} cannot be split into the {cfg.scale} scale's "
                         f"{n_splits} grouped folds: {e}") from None


def check_resumable_cohort(run_dir: Path, cfg: StudyConfig) -> None:
    """StudyError when the unfinished run folder that this config would resume was made for other
    cells than its cohort's manifest now lists (``cohort.json``: an edited manifest at the same
    path keeps the config's digest): resuming would fail inside the first chapter. Names ``--new``
    (``cellstudy run``; ``cellstudy workflow`` checks its ``--run-dir`` or resumed folder the same way)."""
    from cellstudy import data
    from cellstudy.study import cohort_identity

    rec_file = rundir.Run(run_dir).cohort_file
    if not rec_file.is_file():
        return
    try:
        rec = json.loads(rec_file.read_text())
        old_hash, old_n = rec["cells_hash"], rec.get("n_cells")
    except (OSError, ValueError, KeyError, TypeError):
        return   # an unreadable record: the chapters refuse it with their own message
    now, n_now = cohort_identity(data.load_manifest(cfg.cohort))
    if now != old_hash:
        raise StudyError(
            f"the unfinished run folder {run_dir} of this config was made for other cells ({old_n} cells) than "
            f"cohort {cfg.cohort!r} lists now ({n_now} cells): its manifest changed since. Add --new to "
            "start a new run folder with these cells (the old folder is kept), or restore the manifest to "
            "resume that run.")


def preflight(cfg: StudyConfig) -> dict[str, Any]:
    """Resolve the data root and verify the cohort's manifest (files, checksums) before any
    notebook runs. Returns the data provenance (root, manifest checksum, counts)."""
    from cellstudy import data

    progress.interval_from_env()   # a bad $CELLSTUDY_PROGRESS_S is said now, not after the run folder is made
    root = config.data_root(cfg.data_root)
    weights = check_weights(cfg)
    table = data.load_manifest(cfg.cohort)
    data.verify_manifest(table, root, check_sha=True)
    if any(s != "00_cohort" for s in cfg.steps):   # the cohort chapter alone needs no folds
        check_cohort_folds(cfg, table)
    manifest_path = data.manifest_path(cfg.cohort)
    return {
        "data_root": str(root),
        "cohort": cfg.cohort,
        "manifest": str(manifest_path.relative_to(config.REPO_ROOT)
                        if manifest_path.resolve().is_relative_to(config.REPO_ROOT) else manifest_path),
        "manifest_sha256": provenance.sha256_file(manifest_path),
        "n_cells": int(len(table)),
        "n_per_class": {str(k): int(v) for k, v in table["label"].value_counts().sort_index().items()},
        "n_groups": int(table["group"].nunique()),
        "files_verified_sha256": True,
        "weights": weights,
    }


# ---------------------------------------------------------------------------------------------
# Executing notebooks
# ---------------------------------------------------------------------------------------------
def _error_location(nb_path: Path) -> str:
    """Find the cell with an error output in an executed notebook: 'cell N (line ...)'."""
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, ValueError):
        return "unknown cell"
    code_i = 0
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        code_i += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                src = "".join(cell.get("source", "")).strip().splitlines()
                first = src[0][:80] if src else ""
                return f"cell {i} (code cell {code_i}, starting {first!r}): {out.get('ename')}: {out.get('evalue')}"
    return "unknown cell"


_ENV_LOCK = threading.Lock()
_ENV_DEPTH = 0
_ENV_BACKUP: dict[str, str] = {}


@contextmanager
def kernel_env(workers: int = 1):
    """The environment the notebook kernels start with (they inherit ``os.environ``): TensorFlow's
    C++ log level, the inline Matplotlib backend, this repository on PYTHONPATH and this
    interpreter's folder first on PATH; with ``workers`` > 1 notebooks at once, each kernel's
    TensorFlow gets ``cores // workers`` threads (``cellstudy.threads``; exported values kept).
    Re-entrant and shared by concurrent steps: the first entry sets it, the last exit restores
    ``os.environ`` as it was."""
    global _ENV_DEPTH, _ENV_BACKUP
    with _ENV_LOCK:
        if _ENV_DEPTH == 0:
            _ENV_BACKUP = dict(os.environ)
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
            os.environ["PYTHONPATH"] = str(config.REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
            # The kernel runs this interpreter (jupyter_client maps the spec's "python" to sys.executable).
            os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
            os.environ.update(threads.thread_env(workers))
        _ENV_DEPTH += 1
    try:
        yield
    finally:
        with _ENV_LOCK:
            _ENV_DEPTH -= 1
            if _ENV_DEPTH == 0:
                os.environ.clear()
                os.environ.update(_ENV_BACKUP)


def execute_step(step: str, run_dir: Path, params: dict[str, Any], log_output: bool = True) -> float:
    """Execute ``notebooks/<step>.ipynb`` with papermill into ``<run>/notebooks/<step>.ipynb``.
    Returns the wall time in seconds; raises StudyError naming the notebook and cell on failure.
    Safe to call from several threads at once (each call starts its own kernel)."""
    import papermill as pm

    src = notebook_dir() / f"{step}.ipynb"
    run = rundir.Run(run_dir)
    out = run.executed(step)
    out.parent.mkdir(parents=True, exist_ok=True)
    run.step(step)
    t0 = time.perf_counter()
    for attempt in range(1, KERNEL_START_ATTEMPTS + 1):
        try:
            with kernel_env():
                pm.execute_notebook(
                    str(src), str(out), parameters=params, kernel_name="python3", cwd=str(run.step(step)),
                    log_output=log_output, progress_bar=False, extra_arguments=KERNEL_ARGS,
                )
            break
        except pm.PapermillExecutionError as e:
            raise StudyError(
                f"notebook {step}.ipynb failed at cell {e.exec_count} ({e.ename}: {e.evalue}); "
                f"executed copy with the traceback: {out}"
            ) from None
        except Exception as e:  # kernel died, bad notebook, ...
            if attempt < KERNEL_START_ATTEMPTS and _kernel_did_not_start(e) and not _any_cell_started(out):
                # The kernel did not come up (two kernels started at once can pick the same free
                # port: "Kernel died before replying to kernel_info", zmq "Address already in
                # use"). No cell ran, so nothing was written: start it again.
                print(f"[{step}] the notebook's kernel did not start ({type(e).__name__}: {e}); "
                      f"starting it again (attempt {attempt + 1} of {KERNEL_START_ATTEMPTS})",
                      file=sys.stderr, flush=True)
                time.sleep(KERNEL_RETRY_DELAY_S * attempt)
                continue
            where = _error_location(out) if out.exists() else "before its first cell"
            raise StudyError(f"notebook {step}.ipynb failed ({type(e).__name__}: {e}); {where}; see {out}") from None
    return time.perf_counter() - t0


#: How often a notebook's kernel is started before its step fails, when it dies before the
#: notebook's first cell ran (``execute_step``), and the pause before the next try (x the try).
KERNEL_START_ATTEMPTS = 3
KERNEL_RETRY_DELAY_S = 2.0


def _kernel_did_not_start(e: BaseException) -> bool:
    """Whether ``e`` is a kernel that did not come up: "Kernel died before replying to
    kernel_info", a ZMQ error (a port already in use) or a timeout waiting for the kernel's
    reply. Other errors (a missing or malformed notebook) are not retried."""
    text = f"{type(e).__name__}: {e}"
    return ("Kernel died before replying to kernel_info" in text or type(e).__module__.startswith("zmq")
            or (isinstance(e, TimeoutError) and "kernel" in text.lower()))


def _any_cell_started(nb_path: Path) -> bool:
    """Whether papermill began any cell of the executed copy at ``nb_path``: a cell with a
    ``papermill.start_time`` (set when papermill starts the cell, before its code runs) or an
    execution count. Not the cells' ``status``: after a dead kernel papermill marks the pending
    cells "completed". A missing or unreadable copy: False (papermill writes it before the kernel
    starts)."""
    try:
        nb = json.loads(Path(nb_path).read_text())
    except (OSError, ValueError):
        return False
    for cell in nb.get("cells", []):
        if cell.get("metadata", {}).get("papermill", {}).get("start_time") is not None \
                or cell.get("execution_count") is not None:
            return True
    return False


def notebook_errors(nb_path: Path) -> list[str]:
    """Error outputs in an executed notebook (the book must not show any)."""
    nb = json.loads(Path(nb_path).read_text())
    errs = []
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errs.append(f"{nb_path.name} cell {i}: {out.get('ename')}: {out.get('evalue')}")
    return errs


# ---------------------------------------------------------------------------------------------
# The whole study
# ---------------------------------------------------------------------------------------------
def open_run(cfg: StudyConfig, runs_dir: Path, resumable: Path | None,
             echo: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The run folder for ``cfg`` under ``runs_dir`` and its status (state "running"):
    ``resumable``, the incomplete run of the same config that the caller's ``find_resumable``
    found (None for ``new`` or when there is none: a new folder). The callers look once, for
    ``check_disk`` and for this."""
    run_dir = resumable
    if run_dir is not None:
        status = read_status(run_dir)
        echo(f"resuming the incomplete run {run_dir} (steps done: "
             f"{[s for s, v in status.get('steps', {}).items() if v.get('state') == 'done']})")
    else:
        run_dir = new_run_dir(runs_dir, cfg.name)
        status = {"name": cfg.name, "digest": cfg.digest(), "state": "running", "started": provenance.now(),
                  "steps": {}}
        echo(f"new run folder {run_dir}")
    status["state"] = "running"
    return run_dir, status


def init_run(cfg: StudyConfig, config_path: str | os.PathLike, run_dir: Path, data_prov: dict[str, Any],
             status: dict[str, Any], processes: int | None = None) -> dict[str, Any]:
    """Write what every step of a run reads before it starts: ``status.json`` (``status``),
    ``scale.json`` (the resolved scale, once; a resumed run is checked against it),
    ``provenance.json`` and ``study.yaml``. Returns the notebooks' papermill parameters. Used by
    ``run_study`` and by the Snakemake workflow (``cellstudy workflow``).
    ``processes``: how many TensorFlow jobs run at once on this machine (their thread settings
    go into the provenance); None: the config's ``workers``; 0: the jobs run elsewhere (a
    cluster), each with the threads its node gives it."""
    _write_status(run_dir, status)
    scale = rundir.Run(run_dir).scale(cfg.scale, cfg.overrides)
    prov = {
        "config": asdict(cfg),
        "config_file": str(Path(config_path).resolve()),
        "scale_parameters": scale,
        "data": data_prov,
        "git": provenance.git_state(),
        "hardware": provenance.hardware(),
        "packages": provenance.package_versions(),
        "all_packages": provenance.package_versions(all_packages=True),
        "started": status.get("started"),
    }
    # the kernels' TensorFlow threads (the runner process itself does not train)
    if processes == 0:
        prov["hardware"]["tf_threads"] = "set per cluster job (TensorFlow's default unless the job's environment sets them)"
    else:
        prov["hardware"]["tf_threads"] = threads.settings_for(cfg.workers if processes is None else processes)
    run = rundir.Run(run_dir)
    provenance.write_json(run.provenance, prov)
    atomic.write_text(run.study_config, yaml.safe_dump(asdict(cfg), sort_keys=False))
    return step_parameters(cfg, run_dir, data_prov["data_root"])


def step_parameters(cfg: StudyConfig, run_dir: Path, data_root: str) -> dict[str, Any]:
    """The papermill parameters every notebook of a run gets (its ``parameters`` cell)."""
    return {
        "run_dir": str(Path(run_dir).resolve()),
        "data_root": str(data_root),
        "cohort": cfg.cohort,
        "scale": cfg.scale,
        "seed": int(cfg.seed),
        "overrides": cfg.overrides,
    }


def update_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Set top-level fields of ``status.json`` under its lock (the workflow's step jobs write
    their entries into it at the same time); returns the status as written."""
    from cellstudy.workflow import locked

    with locked(Path(run_dir) / ".status.lock"):
        st = read_status(run_dir)
        st.update(fields)
        _write_status(run_dir, st)
    return st


def check_built_book(run_dir: Path, index: Path, report: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check the built book ``index`` of ``run_dir`` in headless Chromium (screenshots into the
    run's ``screenshots/``; the findings page against the run's CSVs); prints the summary and,
    with ``report``, writes ``{"ok", "skipped", "problems", "screenshots", "index", "summary"}``
    there as JSON. Returns that mapping (``ok``: True / False, None when no Chromium)."""
    from cellstudy.report.browser import check_book

    run = rundir.Run(run_dir)
    print("checking the book in headless Chromium ...", flush=True)
    check = check_book(Path(index).parent, run.screenshots, run_dir=run_dir)
    out = {"ok": check.ok, "skipped": check.skipped, "problems": check.problems,
           "screenshots": [str(p) for p in check.screenshots], "index": str(index), "summary": check.summary()}
    print(out["summary"], flush=True)
    if report is not None:
        atomic.write_json(report, out)
    return out


def check_disk(plan, where: str | os.PathLike, run_dir: str | os.PathLike | None = None,
               error: type[Exception] | None = None, echo: Callable[[str], None] = print,
               free_bytes: int | None = None) -> float:
    """Before any training: the model files a run still has to write (each (network, fold) of
    ``plan`` (``workflow.make_plan``: the caller's, already checked) that has not finished keeps a short- and a long-regime model, ``networks.ModelSpec.model_mb``
    each) against the free space at ``where`` (the runs folder or the run folder; its nearest
    existing folder; ``free_bytes``: a test's stand-in). ``run_dir``: the run to be resumed (its
    finished folds, done or failed, need nothing; models deleted after a finished run are not
    trained again), None for a new run. ``error`` (StudyError) naming both and what to do when
    they do not fit (with a tenth spare for the notebooks' figures and the book); else the
    estimate is echoed. Called before the run folder is made or opened, so a refusal leaves
    nothing behind. Returns the estimate in MB: the default study's models take ~6.7 GB, a
    ``ci`` run's ~0.44 GB."""
    import shutil

    from cellstudy import networks

    error = error or StudyError
    run = rundir.Run(run_dir) if run_dir is not None and Path(run_dir).is_dir() else None
    todo = [(n, k) for n, k in plan.train if run is None or not run.fold(n, k).is_finished()]
    need_mb = sum(2 * (networks.SPECS[n].model_mb or 0.0) for n, _ in todo)
    place = Path(where).resolve()
    while not place.exists() and place != place.parent:
        place = place.parent
    free_mb = (shutil.disk_usage(place).free if free_bytes is None else free_bytes) / 1e6
    if need_mb * 1.1 > free_mb:
        raise error(f"the run's models need ~{need_mb / 1e3:.1f} GB ({len(todo)} fold(s) x 2 regimes; "
                    f"the heaviest: {_heaviest(todo)}) and {place} has {free_mb / 1e3:.1f} GB free; nothing "
                    "was started. Free space there (old runs' training/*/fold*/model_*.keras are the bulk) and "
                    "rerun the same command, or choose fewer networks (overrides: {networks: [...]}; a changed "
                    "config starts a new run folder)")
    if todo:
        echo(f"the models of {len(todo)} fold(s) will take ~{need_mb / 1e3:.1f} GB ({free_mb / 1e3:.0f} GB "
             f"free in {place})")
    return need_mb


def _heaviest(pairs) -> str:
    from cellstudy import networks

    names = sorted({n for n, _ in pairs}, key=lambda n: -(networks.SPECS[n].model_mb or 0.0))[:3]
    return ", ".join(f"{networks.display(n)} {networks.SPECS[n].model_mb:.0f} MB a file" for n in names)


def run_study(
    config_path: str | os.PathLike,
    runs_dir: str | os.PathLike | None = None,
    new: bool = False,
    build: bool = True,
    log_output: bool = True,
    echo: Callable[[str], None] = print,
    **override: Any,
) -> Path:
    """Run a study config end to end through its Snakemake workflow; returns the run folder. See
    the module docstring. ``log_output=False`` keeps Snakemake's job log off the terminal (the
    jobs' own logs are in the run folder either way)."""
    from cellstudy import workflow

    cfg = load_config(config_path, **override)
    plan = workflow.make_plan(cfg)  # a config whose steps select no network fails here, before any work
    runs_dir = Path(runs_dir) if runs_dir else config.REPO_ROOT / "runs"
    data_prov = preflight(cfg)  # fails before any long work
    if build:
        from cellstudy.report.book import check_mathjax
        check_mathjax("pass --no-book to run the notebooks only", StudyError)
    _check_writable(runs_dir)

    # the disk the models take, before the run folder is made or opened (not when it fills)
    resumable = None if new else find_resumable(runs_dir, cfg)
    if resumable is not None:
        check_resumable_cohort(resumable, cfg)
    check_disk(plan, runs_dir, resumable, StudyError, echo)
    run_dir, status = open_run(cfg, runs_dir, resumable, echo)
    status["engine"] = "snakemake"
    init_run(cfg, config_path, run_dir, data_prov, status)
    run = rundir.Run(run_dir)
    report_file = run.root / workflow.BROWSER_CHECK
    if report_file.is_file() and json.loads(report_file.read_text()).get("ok") is False:
        report_file.unlink()  # a book that failed its check is built and checked again
    n_steps = len(cfg.steps)
    done = [s for s in cfg.steps if status.get("steps", {}).get(s, {}).get("state") == "done"
            and run.executed(s).is_file()]
    if done:
        echo(f"steps done earlier, kept: {done}")
    echo(f"running the workflow: {n_steps - len(done)} notebook(s), {len(plan.networks)} network(s) to train or read back"
         + (" and the book" if build else "") + f", up to {cfg.workers} job(s) at once"
         + (" (training jobs and notebooks side by side)" if cfg.workers > 1 else "")
         + "; Snakemake's job count adds its own target and leaves out what is done")
    t_study = time.perf_counter()
    before = {s: dict(v) for s, v in read_status(run_dir).get("steps", {}).items()}
    try:
        # a line a minute (folds done, what trains now, the training time left): also when
        # Snakemake's own lines are kept off the terminal, where it is all the terminal shows
        with progress.for_plan(run.root, plan, cfg, cfg.workers, echo):
            workflow.snakemake(run.root, cores=cfg.workers, targets=["all"] if build else ["notebooks"],
                               data_root=data_prov["data_root"], quiet=not log_output, echo=echo,
                               thread_env=threads.thread_env(cfg.workers))
    except workflow.WorkflowError as e:
        st = update_status(run_dir, state="failed")
        failed = [v.get("error", "") for s, v in st.get("steps", {}).items()
                  if v.get("state") == "failed" and before.get(s) != v]   # this run's failures only (a
        # step that fails again has a new failed_at)
        raise StudyError((failed[0] if failed else str(e)) + "\nThe book was not built. Fix the cause and "
                         "rerun the same command to resume this run (finished steps and folds are kept).") from None

    errors = [e for s in cfg.steps for e in notebook_errors(run.executed(s))]
    if errors:
        update_status(run_dir, state="failed")
        raise StudyError("executed notebooks hold error outputs: " + "; ".join(errors))
    fields: dict[str, Any] = {"notebooks_seconds": round(time.perf_counter() - t_study, 1)}
    if build:
        rep = json.loads(report_file.read_text())
        fields["book"] = rep["index"]
        fields["browser_check"] = {k: rep[k] for k in ("ok", "skipped", "problems", "screenshots")}
        echo(rep["summary"])
        if rep["ok"] is False:
            update_status(run_dir, state="failed", **fields)
            report_file.unlink()
            more = len(rep["problems"]) - 10
            raise StudyError(f"the built book failed the browser check ({len(rep['problems'])} problem(s); "
                             f"screenshots in {run.screenshots}): " + "; ".join(rep["problems"][:10])
                             + (f"; and {more} more" if more > 0 else ""))
    update_status(run_dir, state="complete", finished=provenance.now(), **fields)
    echo_finished(run.root, fields.get("book"), echo)
    return run_dir


def echo_finished(run_dir: Path, book_index: str | None, echo: Callable[[str], None] = print) -> None:
    """The end of a finished run on the terminal (``cellstudy run`` and ``cellstudy workflow``): its
    findings in a few lines (``report.findings.console_summary``; a summary that cannot be read is
    said, not raised: the run is complete), then the book's path (``book_index``, relative to the
    run folder; None: no book)."""
    try:
        # imported here, inside the guard: a summary that cannot be made (even code changed under
        # a long run) must not hide the book's path
        from cellstudy.report.findings import console_summary

        lines = console_summary(run_dir)
    except Exception as e:   # noqa: BLE001 - the run and its book are done; say what failed
        lines = [f"(the findings summary could not be read: {type(e).__name__}: {e}; the book's findings page has them)"]
    if lines:
        echo("")
        for line in lines:
            echo(line)
    if book_index:
        echo(f"\nThe book: {(Path(run_dir) / book_index).resolve()}")
