"""The study as a Snakemake workflow (``workflow/Snakefile``): its plan and the commands its jobs run.

``cellstudy run CONFIG`` (``make study``) and ``cellstudy workflow CONFIG [--profile DIR]`` both
prepare the run folder (checks, ``scale.json``, ``provenance.json``, ``study.yaml``) and run this
workflow in it: Snakemake is the one engine that orders, runs and resumes the study's steps.

The unit of work is one (network, fold), both regimes, into ``<run>/training/<N>/fold<K>/``.
On a cluster (a profile or ``--executor`` other than local) each one is its own job,
``cellstudy train-fold RUN_DIR --network N --fold K``, so 55 folds can run on 55 GPUs; on one
machine one job trains every fold of a network, ``cellstudy train-network RUN_DIR --network N``
(one process builds and traces the network once; the same numbers: ``experiment.fold_builder``
resets the weights to the seeded initial ones for every fold). Either job ends a fold with
``ended.json`` (the workflow's target; ``done.json`` or, for a run that diverged, ``failed.json``
beside it: a failed fold is a result the book reports, not a crash). The notebooks run one job
each through ``cellstudy step RUN_DIR STEP`` (``runner.execute_step`` with the run's
parameters); the family chapters (02-05) read the finished folds back instead of training. The
book is built and checked in headless Chromium by ``cellstudy book RUN_DIR --report
book/browser_check.json`` (the callers fail the run on a failed check).

The Snakefile runs with the run folder as its working directory, so every target is a path
relative to the run folder (``rundir.Run`` layout)::

    notebooks/<step>.ipynb                  a step's executed notebook; its job log: logs/<step>.job.log
    training/<network>/fold<k>/ended.json   a trained fold; its log: train.log beside it (fold
                                            jobs) or training/<network>/train.log (network jobs)
    book/_build/html/index.html             the book; its browser check: book/browser_check.json
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from cellstudy import atomic, config, networks, progress, provenance, rundir, runner, threads
from cellstudy.learning import experiment

#: The workflow's Snakefile (Snakemake runs it with the run folder as working directory).
SNAKEFILE = config.REPO_ROOT / "workflow" / "Snakefile"
#: The profiles shipped with the repository (``--profile profiles/slurm``).
PROFILES = config.REPO_ROOT / "profiles"
#: The family chapters and the family each one trains (the notebooks' ``FAMILY``).
FAMILY_STEPS: dict[str, str] = {"02_dl_family": "DL", "03_vit": "ViT", "04_rgb_family": "RGB",
                                "05_mhl_family": "MHL"}
#: The XAI chapter (on a cluster its folds are explained by one job each first).
XAI_STEP = "08_xai"
#: Steps that want a GPU on a cluster (the profile gives their rules ``gpu=1``).
GPU_STEPS: tuple[str, ...] = ("06_gpu_training", "08_xai")
#: Keys a workflow's ``--config`` may add to the study config.
WORKFLOW_KEYS: tuple[str, ...] = ("study", "run_dir", "fold_jobs")
#: The browser check's report (``cellstudy book RUN --check``), relative to the run folder.
BROWSER_CHECK = "book/browser_check.json"


class WorkflowError(RuntimeError):
    """The workflow could not start or failed; the message names the profile, job or file."""


@dataclass(frozen=True)
class Plan:
    """What the Snakefile builds for one study config.

    steps: the config's notebooks, in order; needs: the steps each one waits for
    (``runner.step_needs``); train: every (network, fold) to train, in the book's order;
    family_folds: the (network, fold) pairs each family chapter reads back."""

    steps: list[str]
    needs: dict[str, list[str]]
    train: list[tuple[str, int]]
    family_folds: dict[str, list[tuple[str, int]]]
    #: the regime the XAI chapter explains (its ``regime`` parameter; "long" by default)
    xai_regime: str = "long"

    @property
    def networks(self) -> list[str]:
        """The networks trained, in the book's order."""
        return list(dict.fromkeys(n for n, _ in self.train))

    def done_file(self, network: str, fold: int) -> str:
        """The training target of (network, fold), relative to the run folder: its
        ``ended.json`` (the fold trained to its end, done or failed)."""
        return f"training/{network}/fold{int(fold)}/{rundir.ENDED}"

    @property
    def folds(self) -> list[int]:
        """The folds trained, in order."""
        return sorted({k for _, k in self.train})

    def xai_file(self, network: str, fold: int) -> str:
        """The target of the (network, fold) explanation job, relative to the run folder (in the
        regime the XAI chapter explains, :attr:`xai_regime`)."""
        return f"{XAI_STEP}/jobs/{network}/fold{int(fold)}_{self.xai_regime}.json"

    def step_inputs(self, step: str, fold_jobs: bool = False) -> list[str]:
        """A step's input files, relative to the run folder: the executed notebooks of the steps
        it needs and, for a family chapter, the ``ended.json`` of every fold it reads back; with
        ``fold_jobs`` (a cluster) the XAI chapter also waits for one explanation job per
        (network, fold), whose results it reads from its cache."""
        files = [f"notebooks/{d}.ipynb" for d in self.needs[step]]
        files += [self.done_file(n, k) for n, k in self.family_folds.get(step, [])]
        if fold_jobs and step == XAI_STEP:
            files += [self.xai_file(n, k) for n, k in self.train]
        return files


def study_config(snakemake_config: dict[str, Any]) -> runner.StudyConfig:
    """The study config of a Snakemake ``config``: the file named by ``config["study"]``, else the
    mapping itself (``--configfile configs/paper.yaml``), without the workflow's own keys."""
    if snakemake_config.get("study"):
        return runner.load_config(snakemake_config["study"])
    raw = {k: v for k, v in snakemake_config.items() if k not in WORKFLOW_KEYS}
    if not raw:
        raise WorkflowError("the workflow has no study config: pass --configfile configs/<name>.yaml "
                            "or --config study=<file>")
    return runner.config_from_dict(raw, "the workflow's --configfile")


def fold_jobs(snakemake_config: dict[str, Any]) -> bool:
    """Whether the workflow trains one job per (network, fold) (``--config fold_jobs=true``: a
    cluster) or one per network (default: one machine)."""
    v = snakemake_config.get("fold_jobs", False)
    return v is True or str(v).strip().lower() in ("1", "true", "yes")


def make_plan(cfg: runner.StudyConfig) -> Plan:
    """The jobs of ``cfg``: one training job per (network, fold) of every family chapter in its
    steps (networks from the scale's ``networks`` or the family's all; folds from
    ``folds_to_run`` or all); ValueError when a listed family chapter has no network left."""
    sc = config.get_scale(cfg.scale, cfg.overrides)
    needs = {s: runner.step_needs(s, cfg.steps) for s in cfg.steps}
    folds = experiment.folds_for(sc)
    family_folds: dict[str, list[tuple[str, int]]] = {}
    for step in cfg.steps:
        if step in FAMILY_STEPS:
            names = experiment.networks_for(FAMILY_STEPS[step], sc)
            if not names:
                raise config.ConfigError(
                    f"step {step} trains family {FAMILY_STEPS[step]} but the scale's networks="
                    f"{sc.get('networks')} selects none of it: drop the step from the config's steps")
            family_folds[step] = [(n, k) for n in names for k in folds]
    order = networks.ordered(n for pairs in family_folds.values() for n, _ in pairs)
    train = [(n, k) for n in order for k in folds]
    return Plan(steps=list(cfg.steps), needs=needs, train=train, family_folds=family_folds,
                xai_regime=xai_regime(cfg))


def xai_regime(cfg: runner.StudyConfig) -> str:
    """The regime the config's XAI chapter explains (``notebook_parameters: {08_xai: {regime: ...}}``)."""
    r = (cfg.notebook_parameters.get(XAI_STEP) or {}).get("regime", "long")
    if r not in rundir.REGIMES:
        raise config.ConfigError(f"notebook_parameters[{XAI_STEP!r}].regime={r!r}; expected one of {rundir.REGIMES}")
    return r


# ---------------------------------------------------------------------------------------------
# The jobs' commands: cellstudy train-fold, cellstudy step
# ---------------------------------------------------------------------------------------------
def prepared_run(run_dir: str | os.PathLike) -> tuple[rundir.Run, runner.StudyConfig, dict[str, Any]]:
    """The run folder's owner, its study config and resolved scale; RunFolderError naming the
    folder when it is not a prepared run (no ``study.yaml`` / ``scale.json``, or a scale that
    differs from the config's)."""
    run = rundir.check_prepared(run_dir)
    cfg = runner.load_config(run.study_config)
    return run, cfg, run.scale(cfg.scale, cfg.overrides)


def run_training(run_dir: str | os.PathLike, network: str,
                 fold: int | None = None) -> tuple[rundir.Run, runner.StudyConfig, dict[str, Any]]:
    """``prepared_run`` of a run folder that trains ``network`` (and ``fold``) and whose folds
    are made: ValueError naming the network or fold when the run's scale does not train it,
    RunFolderError when the folds file (01_preprocessing) is missing."""
    run, cfg, sc = prepared_run(run_dir)
    networks.check_network(network)
    chosen = experiment.networks_for(list(networks.NETWORK_NAMES), sc)
    if network not in chosen:
        raise ValueError(f"network {network!r} is not trained in run {run.root}: its scale's networks are "
                         f"{chosen}")
    n = int(sc["n_splits"])
    if fold is not None and not 0 <= int(fold) < n:
        raise ValueError(f"fold {fold} is outside 0..{n - 1} (run {run.root} has n_splits={n})")
    folds_file = run.folds_file(cfg.cohort, create=False)
    if not folds_file.is_file():
        raise rundir.RunFolderError(f"{run.root} is not prepared: its folds file {folds_file} is missing "
                                    "(the 01_preprocessing step writes it)")
    return run, cfg, sc


def _prepared(run: rundir.Run, cfg: runner.StudyConfig, data_root: str | None):
    """``study.prepare`` of a run folder with its config's cohort, scale, seed and overrides (the
    data root: ``data_root``, else the config's, else the default): what every job trains or
    explains from."""
    from cellstudy import study

    root = config.data_root(data_root or cfg.data_root)
    return study.prepare(cfg.cohort, cfg.scale, run.root, data_root=str(root), seed=int(cfg.seed),
                         overrides=cfg.overrides, progress=False)


def train_fold(run_dir: str | os.PathLike, network: str, fold: int, *, data_root: str | None = None,
               echo: Callable[[str], None] = print):
    """Train one (network, fold) of a prepared run folder, both regimes (``experiment.run_fold``
    with the run's cohort, scale and seed); a finished fold is read back, never redone. Returns
    the ``TrainResult``. ValueError naming the network or fold when the run does not train it;
    RunFolderError when the folder is not prepared (no study.yaml, scale.json or folds file)."""
    from cellstudy.learning import train

    run, cfg, sc = run_training(run_dir, network, fold)
    k = int(fold)
    fd = run.fold(network, k)
    if fd.can_read_back():
        echo(f"{network} fold {k}: finished earlier ({fd.done if fd.done.exists() else fd.failed}); kept")
        res = train.load_result(fd.path)
        mark_ended(fd, res)   # a fold trained by another job or an earlier version gets its target
        return res
    prepared = _prepared(run, cfg, data_root)
    res, _ = experiment.run_fold(prepared, network, k, seed=int(cfg.seed), progress=train.print_progress,
                                 weights=cfg.weights)
    mark_ended(fd, res)
    echo(f"{network} fold {k}: {res.status} ({fd.path})")
    return res


def mark_ended(fd: rundir.FoldDir, res) -> None:
    """Write the fold's ``ended.json`` (the workflow's target): its status and where its result is;
    an existing one is kept (never rewritten: Snakemake protects it)."""
    if fd.ended.exists():
        return
    atomic.write_json(fd.ended, {"network": fd.network, "fold": fd.fold, "status": res.status,
                                 "marker": (fd.done if fd.done.exists() else fd.failed).name,
                                 "ended": provenance.now()}, indent=1)


def train_network(run_dir: str | os.PathLike, network: str, *, data_root: str | None = None,
                  echo: Callable[[str], None] = print) -> list:
    """Train every fold of ``network`` in a prepared run folder in this one process (one build
    and trace of the network, weights reset per fold: ``experiment.fold_builder``); finished
    folds are read back. Each fold gets its ``ended.json``. Returns the ``TrainResult`` list."""
    from cellstudy.learning import train

    run, cfg, sc = run_training(run_dir, network)
    prepared = _prepared(run, cfg, data_root)
    builder = experiment.fold_builder(network, sc, experiment.weights_params(network, cfg.weights))
    out, folds = [], experiment.folds_for(sc)
    t0 = time.perf_counter()
    for i, k in enumerate(folds, 1):
        res, _ = experiment.run_fold(prepared, network, k, builder, seed=int(cfg.seed),
                                     progress=train.print_progress, weights=cfg.weights)
        mark_ended(run.fold(network, k), res)
        el = time.perf_counter() - t0
        echo(f"[{i}/{len(folds)}] {network} fold {k}: {res.status}{' (read back)' if res.skipped else ''}; "
             f"{el:.0f} s elapsed, ~{el / i * (len(folds) - i):.0f} s left")
        out.append(res)
    return out


def _seed_fold(run: rundir.Run, cfg: runner.StudyConfig, network: str, seed: int, k: int) -> rundir.FoldDir:
    """Where fold ``k`` of ``network`` at training seed ``seed`` lives: the study's own folder
    at the run's seed, its replicate folder at any other."""
    return run.fold(network, k) if seed == int(cfg.seed) else run.replicate(network, k, seed)


def _train_replicates(run_dir, network: str, seeds: list[int], data_root: str | None,
                      echo: Callable[[str], None], tag: str = ""):
    """Train (or read back) every fold the run trains of ``network`` at each of ``seeds``, one
    after the other in this process; returns ``(run, cfg, sc, folds, folder, builder, rows)``
    with ``rows[(seed, fold)]`` the fold's ``replicates.fold_rows``. ``tag``: put before each
    line (a worker's seed)."""
    from cellstudy.learning import replicates, train

    run, cfg, sc = run_training(run_dir, network)
    prepared = _prepared(run, cfg, data_root)
    params = experiment.weights_params(network, cfg.weights)
    folds = experiment.folds_for(sc)
    jobs = [(s, k) for s in seeds for k in folds]

    def folder(s: int, k: int) -> rundir.FoldDir:
        return _seed_fold(run, cfg, network, s, k)

    def progress(ev):
        if tag:
            print(tag, end="")
        train.print_progress(ev)

    t0, trained, rows, builder = time.perf_counter(), 0, {}, None
    for i, (s, k) in enumerate(jobs, 1):
        own, fd = s == int(cfg.seed), folder(s, k)
        was_finished = fd.can_read_back()
        if k == folds[0]:   # a WeightResetter keeps its first call's initial weights: one per seed
            builder = experiment.fold_builder(network, sc, params)
        res, _ = experiment.run_fold(prepared, network, k, builder, seed=s, progress=progress,
                                     weights=cfg.weights, fold_dir=fd)
        if own and not was_finished:   # the study's fold, trained here: the workflow's target too
            mark_ended(fd, res)
        trained += not was_finished
        el = time.perf_counter() - t0
        rows[s, k] = replicates.fold_rows(fd.path, network, s, k)
        auc = {r["regime"]: r["auc_macro"] for r in rows[s, k]}
        todo = sum(1 for j in jobs[i:] if not folder(*j).is_finished())
        eta = f", ~{el / trained * todo:.0f} s left" if trained and todo else ""
        echo(f"{tag}[{i}/{len(jobs)}] {network} seed {s}{' (the study)' if own else ''} fold {k}: "
             f"{res.status}{' (read back)' if was_finished else ''}, AUC macro short {auc['short']:.3f} "
             f"long {auc['long']:.3f}; {el:.0f} s elapsed{eta}")
    return run, cfg, sc, folds, folder, builder, rows


def _replicate_seed(run_dir: str, network: str, seed: int, data_root: str | None) -> int:
    """Worker process of ``replicate_network(..., workers=N)``: trains every fold of one seed
    (no table: the calling process makes it); returns the seed."""
    _train_replicates(run_dir, network, [seed], data_root, echo=lambda line: print(line, flush=True),
                      tag=f"[seed {seed}] ")
    return seed


def _replicate_in_workers(run_dir, network: str, todo: list[int], data_root: str | None,
                          workers: int, echo: Callable[[str], None]) -> None:
    """Train the seeds ``todo`` in up to ``workers`` spawned processes, one seed per task, each
    with ``cores // workers`` TensorFlow threads (``cellstudy.threads``; on a GPU, memory taken as
    needed); the workers print their own lines, tagged ``[seed s]``. A worker's error is told at
    once and raised, naming its seed, when the other workers have finished their seed (finished
    folds are kept: a rerun resumes)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    n = min(workers, len(todo))
    echo(f"training {network} at seed{'s' if len(todo) > 1 else ''} {', '.join(map(str, todo))} "
         f"in {n} worker process{'es' if n > 1 else ''} ...")
    env = {**threads.thread_env(workers),
           "TF_FORCE_GPU_ALLOW_GROWTH": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "true")}
    failed: list[str] = []
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                             initializer=threads.init_worker, initargs=(env,)) as pool:
        futs = {pool.submit(_replicate_seed, str(run_dir), network, s, data_root): s for s in todo}
        for fut in as_completed(futs):
            if fut.cancelled():   # after another seed's error: not started
                continue
            try:
                fut.result()
            except BrokenProcessPool:
                left = sorted(futs[f] for f in futs
                              if not (f.done() and not f.cancelled() and f.exception() is None))
                failed.append(f"a worker process died (killed? out of memory?) with seed(s) {left} unfinished")
                break
            except Exception as e:
                failed.append(f"training {network} at seed {futs[fut]} in a worker process failed: "
                              f"{type(e).__name__}: {e}")
                echo(f"{failed[-1]}; the other workers finish their seed first")
                for f in futs:
                    f.cancel()
    if failed:
        raise RuntimeError("; ".join(failed) + " (finished folds are kept: the same command resumes)")


def replicate_network(run_dir: str | os.PathLike, network: str, seeds: Sequence[int], *,
                      data_root: str | None = None, echo: Callable[[str], None] = print,
                      workers: int = 1):
    """Seed replicates of ``network`` in a prepared run folder (``learning.replicates``): every
    fold the run trains, at each training seed of ``seeds``, on the run's own folds, into
    ``<run>/replicates/seed<s>/<network>/fold<k>/``. Each seed gets its own builder, so its
    initial weights and dropout stream are its own whatever was trained before in the process.
    The run's own seed, when in ``seeds``, is the study's folds (``training/<network>/``): read
    back and left as they are; a fold the study has not trained yet is trained there, as
    ``train_network`` would. Finished replicate folds are read back, never redone; an
    interrupted one resumes. Writes ``<run>/replicates/<network>.csv`` (every seed of ``seeds``,
    any other seed already in the replicates folder and the study's own finished folds) and
    returns ``(table, summary)`` (``replicates.summary`` over the run's folds). Prints each fold
    with the time left. ``workers`` > 1: the seeds with folds to train are trained up to that
    many at once, each in its own spawned process with ``cores // workers`` TensorFlow threads
    (the thread count changes the round-off: ``done.json`` records it, ``cellstudy.threads``),
    also when only one seed is left to train (a resumed call keeps the threads); this process
    then makes the table from the folds read back."""
    import pandas as pd

    from cellstudy.learning import replicates

    seeds = replicates.check_seeds(seeds)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: expected an int >= 1")
    if workers > 1:
        run, cfg, sc = run_training(run_dir, network)
        todo = [s for s in seeds
                if not all(_seed_fold(run, cfg, network, s, k).can_read_back() for k in experiment.folds_for(sc))]
        if todo:
            _replicate_in_workers(run_dir, network, todo, data_root, workers, echo)
    run, cfg, sc, folds, folder, builder, rows = _train_replicates(run_dir, network, seeds, data_root, echo)
    # the table: this call's folds, and those of seeds trained before (other calls, the study)
    found = {int(p.name[4:]) for p in run.replicates.glob("seed*") if p.name[4:].isdigit()}
    for s in sorted(found | {int(cfg.seed)}):
        for k in folds:
            if (s, k) not in rows and folder(s, k).is_finished():
                # another architecture (e.g. an RGB-family fold trained before 2026-12-07): refused
                experiment.read_back(folder(s, k), int(sc["image_size"]), builder)
                rows[s, k] = replicates.fold_rows(folder(s, k).path, network, s, k)
    table = pd.DataFrame([r for key in sorted(rows) for r in rows[key]], columns=list(replicates.COLUMNS))
    run.replicates.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run.replicates / f"{network}.csv", table.to_csv(index=False))
    return table, replicates.summary(table, folds=folds)


def explain_fold(run_dir: str | os.PathLike, network: str, fold: int, *, data_root: str | None = None,
                 echo: Callable[[str], None] = print) -> Path:
    """One (network, fold) explanation job of a prepared run folder whose fold has ended
    (``explain.explain_fold_job`` with the run's cohort, scale and seed); returns its marker."""
    from cellstudy import explain

    run, cfg, sc = prepared_run(run_dir)
    networks.check_network(network)
    k = int(fold)
    if not run.fold(network, k).ended.is_file() and not run.fold(network, k).is_finished():
        raise rundir.RunFolderError(f"{network} fold {k} of {run.root} has not been trained (no "
                                    f"{rundir.ENDED}); train it first (cellstudy train-fold)")
    prepared = _prepared(run, cfg, data_root)
    return explain.explain_fold_job(prepared, network, k, regime=xai_regime(cfg), seed=int(cfg.seed), echo=echo)


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path`` (created) while the block runs: steps that run at once
    update ``status.json`` one after another."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _set_step_status(run: rundir.Run, step: str, entry: dict[str, Any]) -> None:
    with locked(run.root / ".status.lock"):
        st = runner.read_status(run.root)
        st.setdefault("steps", {})[step] = entry
        provenance.write_json(run.status, st)


def run_step(run_dir: str | os.PathLike, step: str, *, log_output: bool = True) -> float:
    """Execute notebook ``step`` of a prepared run folder with the run's parameters
    (``runner.execute_step``; ``notebook_parameters`` of its study config added) and record it in
    ``status.json``. Returns the seconds; StudyError naming the notebook and cell on failure."""
    run, cfg, _ = prepared_run(run_dir)
    if step not in cfg.steps:
        raise ValueError(f"step {step!r} is not one of run {run.root}'s steps {cfg.steps}")
    root = config.data_root(cfg.data_root)
    params = {**runner.step_parameters(cfg, run.root, str(root)), **cfg.notebook_parameters.get(step, {})}
    _set_step_status(run, step, {"state": "running", "started": provenance.now()})
    try:
        secs = runner.execute_step(step, run.root, params, log_output=log_output)
    except runner.StudyError as e:
        # Snakemake removes a failed job's output (the executed notebook): keep a copy for the reader
        msg, nb = str(e), run.executed(step)
        if nb.is_file():
            import shutil
            kept = run.logs / f"{step}.failed.ipynb"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(nb, kept)
            msg = msg.replace(str(nb), str(kept))
        _set_step_status(run, step, {"state": "failed", "error": msg, "failed_at": provenance.now()})
        raise runner.StudyError(msg) from None
    errors = runner.notebook_errors(run.executed(step))
    if errors:
        _set_step_status(run, step, {"state": "failed", "error": "; ".join(errors), "failed_at": provenance.now()})
        raise runner.StudyError("executed notebook holds error outputs: " + "; ".join(errors))
    _set_step_status(run, step, {"state": "done", "seconds": round(secs, 1), "finished": provenance.now()})
    return secs


# ---------------------------------------------------------------------------------------------
# cellstudy workflow CONFIG: prepare the run folder, call Snakemake
# ---------------------------------------------------------------------------------------------
def check_profile(profile: str | os.PathLike) -> Path:
    """The profile folder ``profile`` (a path, or a name under ``profiles/``) with a readable
    ``config.yaml`` mapping; WorkflowError naming the folder or file otherwise."""
    p = Path(profile)
    if not p.is_dir() and (PROFILES / str(profile)).is_dir():
        p = PROFILES / str(profile)
    if not p.is_dir():
        raise WorkflowError(f"workflow profile {profile} is not a folder (expected e.g. profiles/slurm "
                            f"with a config.yaml; shipped: {sorted(q.name for q in PROFILES.iterdir())})")
    f = p / "config.yaml"
    if not f.is_file():
        raise WorkflowError(f"workflow profile {p} has no config.yaml")
    try:
        data = yaml.safe_load(f.read_text())
    except yaml.YAMLError as e:
        raise WorkflowError(f"workflow profile {f} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"workflow profile {f}: expected a mapping of Snakemake options, got "
                            f"{type(data).__name__}")
    if data.get("executor") == "slurm":
        from shutil import which
        if which("sbatch") is None:
            raise WorkflowError(f"workflow profile {f} uses the slurm executor but `sbatch` is not on PATH: "
                                "run it on the cluster's login node")
    return p.resolve()


def on_cluster(profile: Path | None, extra: Sequence[str] = ()) -> bool:
    """Whether the jobs go to a cluster executor (the profile's ``executor`` or ``--executor`` in
    ``extra``, other than local): then each (network, fold) is its own training job."""
    ex = None
    if profile is not None:
        ex = (yaml.safe_load((Path(profile) / "config.yaml").read_text()) or {}).get("executor")
    extra = list(extra)
    for i, a in enumerate(extra):
        if a == "--executor" and i + 1 < len(extra):
            ex = extra[i + 1]
        elif a.startswith("--executor="):
            ex = a.split("=", 1)[1]
    return ex not in (None, "local", "dryrun", "touch")


def snakemake_command(run_dir: Path, profile: Path | None = None, cores: int | None = None,
                      targets: Sequence[str] = (), extra: Sequence[str] = (),
                      fold_jobs: bool | None = None) -> list[str]:
    """The Snakemake command line for a prepared run folder (this interpreter's Snakemake).
    ``fold_jobs``: one training job per (network, fold); default: on a cluster (:func:`on_cluster`)."""
    run = rundir.Run(run_dir)
    fj = on_cluster(profile, extra) if fold_jobs is None else bool(fold_jobs)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
           "--configfile", str(run.study_config), "--config", f"fold_jobs={fj}",
           "--directory", str(run.root), "--rerun-incomplete",
           # a job reruns only when an input is newer than its output: never because the workflow's
           # code, a rule or the engine's mode (per network / per fold) changed
           "--rerun-triggers", "mtime"]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if cores is not None or profile is None:
        cmd += ["--cores", str(cores or available_cores())]
    return cmd + list(targets) + list(extra)  # targets first: extra may end in a many-valued option


def snakemake(run_dir: Path, *, cores: int | None = None, profile: Path | None = None,
              targets: Sequence[str] = (), extra: Sequence[str] = (), data_root: str | None = None,
              quiet: bool = False, thread_env: dict[str, str] | None = None,
              echo: Callable[[str], None] = print) -> None:
    """Run the workflow in the prepared run folder ``run_dir``; WorkflowError naming the run folder
    and where the failed job's log is when Snakemake fails. ``thread_env``: TensorFlow thread
    variables for the jobs (``threads.thread_env(cores)`` on one machine)."""
    cmd = snakemake_command(run_dir, profile, cores, targets, list(extra) + (["--quiet", "all"] if quiet else []))
    env = {**os.environ, **(thread_env or {}),
           "PYTHONPATH": os.pathsep.join(p for p in (str(config.REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if data_root is not None:
        env[config.DATA_ROOT_ENV] = str(data_root)
    if not quiet:
        echo("$ " + " ".join(cmd))
    t0, started = time.perf_counter(), time.time() - 1.0
    r = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if r.returncode != 0:
        tail = ((r.stdout or "") + (r.stderr or ""))[-4000:] if quiet else ""
        failed = failed_job_lines(run_dir, since=started)
        raise WorkflowError(f"the workflow of run {run_dir} failed (snakemake exit {r.returncode}, "
                            f"{time.perf_counter() - t0:.0f} s): the failed job and its log are named "
                            "above (logs/<step>.job.log, training/<network>/train.log or "
                            "training/<network>/fold<k>/train.log in the run folder)"
                            + "".join(f"\n  {line}" for line in failed)
                            + (f"\n{tail}" if tail else ""))


#: Where each kind of job writes its log in a run folder, as workflow/Snakefile's rules name it
#: (their ``log:``): a (network, fold) training job, a network's training job (one machine), a
#: (network, fold) explanation job, a notebook step (and the book, step "book").
LOG_TEMPLATES = {"fold": "training/{network}/fold{fold}/train.log",
                 "network": "training/{network}/train.log",
                 "xai": "08_xai/jobs/{network}/fold{fold}_{regime}.log",
                 "step": "logs/{step}.job.log"}
#: The same as globs over a run folder (what ``failed_job_lines`` reads).
JOB_LOGS = tuple(re.sub(r"\{\w+\}", "*", t) for t in LOG_TEMPLATES.values())
#: A job's error line: what ``cellstudy`` prints before exiting on an error, or the last line of a
#: Python traceback ("cellstudy.runner.StudyError: ..."). Not "failed" in a line of its own: a
#: diverged fold ("mhl fold 0 failed: ... the book reports it") or a kept "failed.json" are results.
_ERROR_LINE = re.compile(r"^(?:cellstudy: error:|(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt):)")


def failed_job_lines(run_dir: Path, since: float) -> list[str]:
    """For a failed workflow: ``"<log>: <its last error line>"`` for each job log of ``run_dir``
    (``JOB_LOGS``) written since ``since`` (epoch seconds) that holds an error line
    (``_ERROR_LINE``), the newest first, at most 3: the cause, said where the command ends, also
    when Snakemake's own lines above are many. (A failed notebook step is told by its status entry
    instead: ``runner.run_study``.)"""
    run_dir = Path(run_dir)
    found = []
    for pattern in JOB_LOGS:
        for log in run_dir.glob(pattern):
            try:
                mtime = log.stat().st_mtime
                if mtime < since:
                    continue
                lines = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            errs = [ln.strip() for ln in lines if _ERROR_LINE.match(ln.strip())]
            if errs:
                found.append((mtime, f"{log.relative_to(run_dir)}: {errs[-1][:400]}"))
    return [line for _, line in sorted(found, reverse=True)[:3]]


def available_cores() -> int:
    """The CPUs this process may use."""
    from cellstudy import threads
    return threads.available_cpus()


def check_same_config(run_dir: Path, cfg: runner.StudyConfig) -> None:
    """RunFolderError when ``run_dir`` was made by another study config (its status digest)."""
    st = runner.read_status(run_dir)
    if st.get("digest") and st["digest"] not in cfg.digests():
        raise rundir.RunFolderError(
            f"run folder {run_dir} was made by another study config ("
            + (config_differences(run_dir, cfg) or "the same settings, another version of the scale's values")
            + f"; digest {st['digest']} in {rundir.Run(run_dir).status}, this config's {cfg.digest()}); "
            "use a new run folder")


def config_differences(run_dir: Path, cfg: runner.StudyConfig) -> str:
    """What differs between the config a run folder was made with (its ``study.yaml``) and
    ``cfg``, in words: "scale: cpu there, ci here; overrides: {} there, {'epochs_long': 20} here"
    ("" when the folder has no readable study.yaml or the compared settings are equal)."""
    import yaml
    from dataclasses import asdict

    f = Path(run_dir) / "study.yaml"
    try:   # read as a config is read (defaults filled in), else as it is written
        made = asdict(runner.load_config(f))
    except Exception:   # noqa: BLE001 - a config this version refuses: compare its text
        try:
            made = yaml.safe_load(f.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return ""
    now = asdict(cfg)
    keys = ("name", "cohort", "scale", "seed", "overrides", "steps", "data_root", "weights", "notebook_parameters")
    diff = [f"{k}: {made.get(k)!r} there, {now.get(k)!r} here" for k in keys
            if k in now and made.get(k) != now.get(k) and not (k == "weights" and not made.get(k) and not now.get(k))]
    return "; ".join(d if len(d) <= 300 else d[:297] + "..." for d in diff)


def run_workflow(config_path: str | os.PathLike, *, profile: str | None = None, run_dir: str | None = None,
                 runs_dir: str | None = None, new: bool = False, cores: int | None = None,
                 targets: Sequence[str] = (), extra: Sequence[str] = (), data_root: str | None = None,
                 cohort: str | None = None, scale: str | None = None,
                 echo: Callable[[str], None] = print) -> Path:
    """Prepare the run folder for a study config (checks first, as ``cellstudy run``) and run the
    workflow in it; returns the run folder. ``cohort``, ``scale``, ``data_root``: override the
    config's, as ``cellstudy run``'s options do. WorkflowError naming the log of the failed job's
    rule when Snakemake fails (its report above names the job and its log)."""
    cfg = runner.load_config(config_path, data_root=data_root, cohort=cohort, scale=scale)
    plan = make_plan(cfg)  # a config whose steps select no network fails here, before any work
    prof = check_profile(profile) if profile else None
    data_prov = runner.preflight(cfg)
    looking = {"-n", "--dry-run", "--dryrun", "--list", "-l", "--touch", "-t", "--list-rules",
               "--summary", "-S", "--detailed-summary", "-D", "--dag", "--rulegraph"} & set(extra)
    if not looking and (not targets or {"all", "book"} & set(targets)):   # the book is built: MathJax first
        from cellstudy.report.book import check_mathjax
        check_mathjax("pass --target notebooks / training to leave the book out", WorkflowError)
    if run_dir:
        rd = Path(run_dir).resolve()
        if not looking:   # the disk the models take, before the run folder is made (not when it fills)
            runner.check_disk(plan, rd, rd, WorkflowError, echo)
        rd.mkdir(parents=True, exist_ok=True)
        check_same_config(rd, cfg)
        runner.check_resumable_cohort(rd, cfg)
        status = runner.read_status(rd) or {"name": cfg.name, "digest": cfg.digest(), "started": provenance.now(),
                                            "steps": {}}
        status["state"] = "running"
    else:
        runs = Path(runs_dir) if runs_dir else config.REPO_ROOT / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        resumable = None if new else runner.find_resumable(runs, cfg)
        if resumable is not None:
            runner.check_resumable_cohort(resumable, cfg)
        if not looking:
            runner.check_disk(plan, runs, resumable, WorkflowError, echo)
        rd, status = runner.open_run(cfg, runs, resumable, echo)
    status["engine"] = "snakemake"
    local = prof is None and not on_cluster(None, extra)
    jobs_here = (cores or available_cores()) if local else 0   # TensorFlow jobs at once on this machine
    runner.init_run(cfg, config_path, rd, data_prov, status, processes=jobs_here)
    # on this machine, a line a minute (folds done, what trains now, the training time left); a
    # cluster's jobs report through its scheduler, a dry run or listing runs nothing
    monitor = (progress.for_plan(rd, plan, cfg, jobs_here, echo) if local and not looking
               else nullcontext())
    try:
        with monitor:
            snakemake(rd, cores=cores, profile=prof, targets=targets, extra=extra, data_root=data_prov["data_root"],
                      thread_env=threads.thread_env(jobs_here) if local else None, echo=echo)
    except WorkflowError as e:
        _set_state(rd, "failed")
        raise WorkflowError(f"{e}; rerun the same command with --run-dir {rd} to resume (finished folds are "
                            "kept)") from None
    if not targets and (rd / BROWSER_CHECK).is_file():   # not a dry run, --touch, a listing
        report = rd / BROWSER_CHECK
        rep = json.loads(report.read_text())
        if rep.get("ok") is False:
            _set_state(rd, "failed")
            report.unlink()   # rebuilt and checked again on the next run
            raise WorkflowError(f"the book of run {rd} failed the browser check: " + "; ".join(rep["problems"][:10]))
        _set_state(rd, "complete")
        runner.echo_finished(rd, rep.get("index"), echo)
    return rd


def _set_state(run_dir: Path, state: str) -> None:
    with locked(Path(run_dir) / ".status.lock"):
        st = runner.read_status(run_dir)
        st["state"] = state
        provenance.write_json(rundir.Run(run_dir).status, st)


def slurm_jobs_of(log_text: str) -> list[str]:
    """The Slurm job ids a Snakemake log reports submitting ("... has been submitted with SLURM
    jobid 12 ..." / "... jobid 12_3 ..."), in order."""
    import re
    return re.findall(r"SLURM jobid (\d+(?:_\d+)?)", log_text)


def dry_run(run_dir: str | os.PathLike, config_file: str | os.PathLike, *, extra: Sequence[str] = (),
            fold_jobs: bool = True) -> str:
    """The text of a dry run (``snakemake -n``) of ``config_file`` in ``run_dir``: every job it
    would run now, with its rule, outputs and priority (``fold_jobs``: as on a cluster)."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(SNAKEFILE),
           "--configfile", str(config_file), "--config", f"fold_jobs={bool(fold_jobs)}",
           "--directory", str(run_dir), "--cores", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise WorkflowError(f"snakemake -n of {config_file} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def dag_jobs(run_dir: str | os.PathLike, config_file: str | os.PathLike, *, extra: Sequence[str] = (),
             fold_jobs: bool = True) -> dict[str, int]:
    """Jobs per rule of a dry run (:func:`dry_run`): what the workflow would run now
    (``fold_jobs``: as on a cluster, one training job per (network, fold))."""
    import re
    text = dry_run(run_dir, config_file, extra=extra, fold_jobs=fold_jobs)
    table = text[text.find("Job stats:"):]
    counts = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)\s*$", line)
        if not m or m.group(1) == "total":
            if m and m.group(1) == "total":
                break
            continue
        counts[m.group(1)] = int(m.group(2))
    return counts
