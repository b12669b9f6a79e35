"""Train one (network, fold): both regimes from one run, checkpoint/resume, history, faults.

Paper 4.3 / study spec section 6: cross-entropy on the 2-class softmax, SGD with a fixed
learning rate 1e-3 (momentum and batch size are parameters). One run gives both regimes: after
``epochs_short`` epochs the model is evaluated on the test fold and saved (regime ``short``),
then training continues to ``epochs_long`` (regime ``long``).

Files written in ``out_dir`` (one folder per network x fold):

=====================  ===================================================================
``history.csv``        one row per epoch: epoch (1-based), loss, accuracy, seconds, images_per_s
``proba_short.npy``    (N_test, 2) float32 test-set probabilities after ``epochs_short`` epochs
``proba_long.npy``     (N_test, 2) float32 after ``epochs_long`` epochs
``y_test.npy``         (N_test,) int labels, in the same row order
``model_short.keras``  the whole model at the short regime (``model_long.keras``: long)
``checkpoint.npz``     last finished epoch: model variables (incl. dropout RNG state), optimiser
                       variables, and JSON metadata (network, input shape, parameter count,
                       seed, hyper-parameters, history). Removed when the run is done unless
                       ``keep_checkpoint=True`` (without it the last epoch's is not written:
                       the run's models and done.json follow at once). ``checkpoint.json``: the
                       same metadata, readable.
``done.json``          marker of a finished run, with timings; a re-run with it present is skipped
``failed.json``        a run stopped by a NaN / inf loss: reason and epoch
=====================  ===================================================================

Resume. The shuffling order of epoch ``e`` is a function of ``(seed, e)`` only
(``epoch_seed``), and every random state the training step uses (Keras seed generators of dropout
layers) is a model variable saved in the checkpoint, so a run killed after epoch k and restarted
gives the same weights and predictions as an uninterrupted run (bit-identical on CPU with
``deterministic=True``; tested).

Weight reuse across folds: wrap the builder in ``WeightResetter``; the model is built (and its
train / predict functions traced) once per process, and each fold restores the freshly
initialised weights and the optimiser's initial state instead of rebuilding.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import ONEDNN_ENV, atomic, onednn_enabled, rundir, seeds, threads
from .distribute import (StrategyInfo, op_determinism_enabled, precision_policy,
                         resolve_strategy, select_strategy, set_determinism)

__all__ = [
    "TrainError", "OutputError", "CheckpointMismatchError", "TrainResult", "WeightResetter",
    "train_fold", "make_train_dataset", "epoch_seed", "print_progress", "pipeline_overhead",
    "throughput", "load_result", "select_strategy", "set_determinism", "precision_policy",
]

REGIMES = ("short", "long")
CHECKPOINT = "checkpoint.npz"
CHECKPOINT_JSON = "checkpoint.json"
DONE = rundir.DONE
FAILED = rundir.FAILED
HISTORY = "history.csv"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "seconds", "images_per_s")
FORMAT_VERSION = 1


class TrainError(ValueError):
    """A training run cannot start or go on (bad input, bad output folder, bad checkpoint)."""


class OutputError(TrainError, atomic.OutputError):
    """The output folder cannot be written (unwritable, not a folder, disk full)."""


class CheckpointMismatchError(TrainError):
    """A checkpoint / finished run in ``out_dir`` belongs to another network, size or setting."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of 0-based ``epoch`` for run seed ``seed``: a 31-bit int that depends on
    ``(seed, epoch)`` only (NumPy SeedSequence), so a resumed run reshuffles as the original."""
    return seeds.int_seed(seed, "shuffle", epoch, bits=31)


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def print_progress(ev: dict[str, Any]) -> None:
    """Default progress reporter: one plain line per event, flushed (notebooks, logs).

    Epoch lines: ``<network> fold <k> epoch <e>/<E> loss <l> acc <a> <r> imgs/s ETA <m:ss>``,
    where ETA is the time left for this (network, fold) run."""
    head = f"{ev.get('network')} fold {ev.get('fold')}"
    kind = ev.get("event")
    if kind == "epoch":
        line = (f"{head} epoch {ev['epoch']}/{ev['epochs']} loss {ev['loss']:.4f} "
                f"acc {ev['accuracy']:.3f} {ev['images_per_s']:.1f} imgs/s "
                f"ETA {_fmt_s(ev['eta_s'])}")
    elif kind == "regime":
        line = (f"{head} regime {ev['regime']} saved at epoch {ev['epoch']} "
                f"(test accuracy {ev['test_accuracy']:.3f})")
    elif kind == "start":
        line = (f"{head} start: {ev['n_train']} train / {ev['n_test']} test images, "
                f"epochs {ev['epochs_short']}+{ev['epochs_long'] - ev['epochs_short']}, "
                f"{ev['strategy']}" + (f", resuming after epoch {ev['resume_epoch']}"
                                        if ev.get("resume_epoch") else ""))
    elif kind == "done":
        line = f"{head} done in {_fmt_s(ev['seconds'])}"
    elif kind == "skipped":
        line = f"{head} already {ev['status']} ({ev['path']}); skipped"
    elif kind == "failed":
        line = f"{head} FAILED at epoch {ev['epoch']}: {ev['reason']}"
    else:
        line = f"{head} {ev}"
    print(line, flush=True)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic.write_json(path, obj)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic.save_npy(path, arr)


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    def w(f):
        import io
        s = io.StringIO()
        wr = csv.DictWriter(s, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r[k] for k in HISTORY_COLUMNS})
        f.write(s.getvalue().encode())
    atomic.write(path, w)


def check_writable(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` (with parents) and prove it is writable by writing and removing a
    probe file. Raises ``OutputError`` naming the folder otherwise."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"cellstudy probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output folder {out} is not writable: {e.strerror or e} "
                          f"({type(e).__name__}); choose another out_dir or fix its "
                          "permissions / free disk space") from e
    return out


# ---------------------------------------------------------------------------------------------
# data pipeline
# ---------------------------------------------------------------------------------------------
def _base_dataset(x: np.ndarray, y: np.ndarray, cache: bool = True):
    import tensorflow as tf
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.cache() if cache else ds


PREFETCH = 2  # batches prepared ahead of the training step


def _pipeline_options():
    """tf.data options of every cellstudy pipeline: autotuning off.

    With autotuning on (tf.data's default), deleting an iterator waits for the autotuner's
    background loop, which sleeps in doubling periods (10 ms, 20 ms, ...) from the iterator's
    start; every ``fit`` / ``predict`` then returned only at the next wake-up. A default study's
    epoch times clustered at 1.28, 2.56, 5.12, 10.24, 20.48 and 40.96 s. Measured on DenseNet121
    at 32 px (352 images, 6 epochs per setting): 0.0-4.3 s between the last step and
    ``fit`` returning with autotuning, 0.01 s without. The pipelines here are fixed (cached
    tensors, shuffle, batch), so a fixed prefetch depth loses nothing."""
    import tensorflow as tf
    opts = tf.data.Options()
    opts.autotune.enabled = False
    return opts


def _epoch_dataset(base, n: int, batch_size: int, seed: int, epoch: int):
    ds = base.shuffle(n, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
    return ds.batch(batch_size).prefetch(PREFETCH).with_options(_pipeline_options())


def make_train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int,
                       cache: bool = True):
    """The training pipeline of one epoch: ``from_tensor_slices((x, y))`` -> ``cache`` ->
    ``shuffle`` (full buffer, seed ``epoch_seed(seed, epoch)``) -> ``batch`` -> ``prefetch``
    (``PREFETCH`` batches; tf.data autotuning off, see ``_pipeline_options``).

    x: (N, S, S, 3) float32; y: (N,) int32. Yields ((B, S, S, 3), (B,)) with B <= batch_size.
    No Python runs per image."""
    return _epoch_dataset(_base_dataset(x, y, cache), len(x), batch_size, seed, epoch)


def _test_dataset(x: np.ndarray, batch_size: int):
    import tensorflow as tf
    return (tf.data.Dataset.from_tensor_slices(x).batch(batch_size).prefetch(PREFETCH)
            .with_options(_pipeline_options()))


# ---------------------------------------------------------------------------------------------
# model state helpers
# ---------------------------------------------------------------------------------------------
def _state_variables(model) -> list:
    """The model's own state: weights plus seed-generator (dropout RNG) states, in a stable
    order. Excludes optimiser and metric variables."""
    return list(model.variables)


def _optimizer_variables(model) -> list:
    opt = model.optimizer
    return list(opt.variables) if opt is not None else []


def _n_params(model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.weights))


def _input_shape(model) -> list[int | None]:
    shp = model.input_shape
    if isinstance(shp, list):
        raise TrainError(f"model {model.name!r} has {len(shp)} inputs; expected one "
                         "(N, S, S, 3) image input")
    return list(shp[1:])


class WeightResetter:
    """Build a network once per process and reset it for every fold.

    ``WeightResetter(build_fn)`` is itself a zero-argument builder: the first call runs
    ``build_fn()`` and stores the freshly initialised state (weights and dropout RNG states);
    every later call assigns that state back and returns the *same* model object. Given to
    ``train_fold``, the compiled training and prediction functions are then reused (no
    re-tracing); ``train_fold`` restores the optimiser's initial state (SGD momenta, iteration
    count) itself. Fold results equal those of a fresh build with the same seed.

    Attributes: ``builds``, ``resets`` (counts), ``build_seconds``."""

    def __init__(self, build_fn: Callable[[], Any]):
        self.build_fn = build_fn
        self.model = None
        self._init: list[np.ndarray] | None = None
        self.builds = 0
        self.resets = 0
        self.build_seconds: float | None = None

    def __call__(self):
        if self.model is None:
            t = time.perf_counter()
            self.model = self.build_fn()
            self._init = [np.array(v.numpy()) for v in _state_variables(self.model)]
            self.build_seconds = time.perf_counter() - t
            self.builds += 1
        else:
            self.reset()
        return self.model

    def reset(self) -> None:
        """Assign the stored initial state back to the model."""
        if self.model is None or self._init is None:
            raise TrainError("WeightResetter.reset() before the first build")
        vars_ = _state_variables(self.model)
        if len(vars_) != len(self._init):
            raise TrainError(f"model {self.model.name!r} now has {len(vars_)} state variables, "
                             f"{len(self._init)} when first built; was it modified?")
        for v, a in zip(vars_, self._init):
            v.assign(a)
        self.resets += 1


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What ``train_fold`` returns.

    ``status``: ``"done"`` or ``"failed"``; ``proba``: regime -> (N_test, 2) float32 (a failed
    run holds the regimes it finished); ``history``: list of per-epoch dicts
    (``HISTORY_COLUMNS``); ``timings``: seconds (total, to short, per epoch, images/s);
    ``skipped``: the run was already finished or failed on disk and was not re-run;
    ``resumed_from``: epochs taken from a checkpoint; ``failure``: failed.json content."""

    network: str
    fold: int
    status: str
    out_dir: Path
    proba: dict[str, np.ndarray] = field(default_factory=dict)
    y_test: np.ndarray | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    resumed_from: int = 0
    failure: dict[str, Any] | None = None
    strategy: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def history_frame(self):
        import pandas as pd
        return pd.DataFrame(self.history, columns=list(HISTORY_COLUMNS))


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({"epoch": int(r["epoch"]), **{k: float(r[k]) for k in HISTORY_COLUMNS[1:]}})
    return rows


def load_result(out_dir: str | os.PathLike) -> TrainResult:
    """Read a finished (``done.json``) or failed (``failed.json``) run back from its folder."""
    out = Path(out_dir)
    if (out / DONE).exists():
        meta, status = json.loads((out / DONE).read_text()), "done"
    elif (out / FAILED).exists():
        meta, status = json.loads((out / FAILED).read_text()), "failed"
    else:
        raise FileNotFoundError(f"no {DONE} or {FAILED} in {out}: the run has not finished")
    proba = {r: np.load(out / f"proba_{r}.npy") for r in REGIMES
             if (out / f"proba_{r}.npy").exists()}
    y = np.load(out / "y_test.npy") if (out / "y_test.npy").exists() else None
    return TrainResult(network=meta.get("network"), fold=meta.get("fold"), status=status,
                       out_dir=out, proba=proba, y_test=y, history=_read_history(out / HISTORY),
                       timings=meta.get("timings", {}), skipped=True,
                       failure=meta if status == "failed" else None,
                       strategy=meta.get("strategy"))


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _check_arrays(x, y, what: str, network: str, fold: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    where = f"network {network!r} fold {fold}"
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
        raise TrainError(f"x_{what} for {where} has shape {x.shape}; expected (N, S, S, 3)")
    if not np.issubdtype(x.dtype, np.floating):
        raise TrainError(f"x_{what} for {where} has dtype {x.dtype}; expected float32 images")
    if len(x) == 0:
        raise TrainError(f"x_{what} for {where} is empty")
    if y.shape != (len(x),):
        raise TrainError(f"y_{what} for {where} has shape {y.shape}; expected ({len(x)},) "
                         f"to match x_{what}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise TrainError(f"y_{what} for {where} has dtype {y.dtype}; expected int labels")
    if y.min() < 0 or y.max() > 1:
        raise TrainError(f"y_{what} for {where} has labels {sorted(set(y.tolist()))}; "
                         "expected 0 (normal) / 1 (abnormal)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).sum())
        raise TrainError(f"x_{what} for {where} has NaN/inf values in {bad} image(s)")
    return x, y.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _ckpt_identity(meta: dict[str, Any]) -> str:
    shp = "x".join(str(s) for s in meta.get("input_shape", []))
    return (f"network {meta.get('network')!r} (input {shp}, {meta.get('n_params')} parameters, "
            f"fold {meta.get('fold')})")


def _save_checkpoint(out: Path, model, meta: dict[str, Any]) -> None:
    arrays = {f"m{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(_state_variables(model))}
    arrays.update({f"o{i:05d}": np.asarray(v.numpy())
                   for i, v in enumerate(_optimizer_variables(model))})
    blob = json.dumps(meta, default=atomic.json_default)
    atomic.write(out / CHECKPOINT, lambda f: np.savez(f, __meta__=np.array(blob), **arrays))
    _write_json(out / CHECKPOINT_JSON, meta)


def _read_checkpoint_meta(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["__meta__"]))
    except Exception as e:  # noqa: BLE001 - a truncated / foreign file
        raise CheckpointMismatchError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                                      f"{e}); delete it to start this run over") from e


def _compare_meta(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    ident = ("network", "input_shape", "n_params")
    if any(old.get(k) != new.get(k) for k in ident):
        raise CheckpointMismatchError(
            f"{path} was written by {_ckpt_identity(old)} but this run is "
            f"{_ckpt_identity(new)}; use another out_dir or delete the old files")
    keys = ("fold", "seed", "batch_size", "learning_rate", "momentum", "n_train", "n_test",
            "epochs_short", "warmup_epochs")
    defaults = {"warmup_epochs": 0}  # checkpoints written before the warm-up existed
    diff = {k: (old.get(k, defaults.get(k)), new.get(k)) for k in keys
            if old.get(k, defaults.get(k)) != new.get(k)}
    if diff:
        raise CheckpointMismatchError(
            f"{path} ({_ckpt_identity(old)}) was written with other settings: "
            + ", ".join(f"{k} {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
            + "; use another out_dir or delete the old files")


def _restore_checkpoint(path: Path, model, meta_now: dict[str, Any]) -> dict[str, Any]:
    meta = _read_checkpoint_meta(path)
    _compare_meta(path, meta, meta_now)
    vars_m, vars_o = _state_variables(model), _optimizer_variables(model)
    with np.load(path, allow_pickle=False) as z:
        mk = sorted(k for k in z.files if k.startswith("m"))
        ok = sorted(k for k in z.files if k.startswith("o"))
        if len(mk) != len(vars_m) or len(ok) != len(vars_o):
            raise CheckpointMismatchError(
                f"checkpoint {path} holds {len(mk)} model / {len(ok)} optimiser variables; "
                f"{_ckpt_identity(meta_now)} has {len(vars_m)} / {len(vars_o)}")
        for v, k in zip(vars_m + vars_o, mk + ok):
            a = z[k]
            if tuple(a.shape) != tuple(v.shape):
                raise CheckpointMismatchError(
                    f"checkpoint {path} variable {k} has shape {a.shape}; {v.path} of "
                    f"{_ckpt_identity(meta_now)} has {tuple(v.shape)}")
            v.assign(a)
    return meta


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def _compile_cfg(learning_rate, momentum, jit_compile, strategy, policy, warmup_steps=0) -> tuple:
    return (float(learning_rate), float(momentum), bool(jit_compile), id(strategy), policy,
            int(warmup_steps))


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 0):
    """SGD's learning rate: the fixed ``learning_rate`` (paper 4.3), reached after a linear
    warm-up from 0 over ``warmup_steps`` optimiser steps when ``warmup_steps`` > 0.

    With a warm-up this is Keras' own ``CosineDecay`` with ``alpha=1`` (no decay: constant at
    ``learning_rate`` after the warm-up), a built-in schedule, so saved models load without
    cellstudy. The step count is the optimiser's ``iterations`` variable, saved in every
    checkpoint, so a resumed run continues the schedule where it stopped."""
    if int(warmup_steps) <= 0:
        return float(learning_rate)
    import keras
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=1, alpha=1.0, warmup_target=float(learning_rate),
        warmup_steps=int(warmup_steps))


def build_training_state(model, x_example, y_example) -> None:
    """Create a compiled model's optimiser, loss and metric variables before its first ``fit``.

    Without a ``tf.distribute`` strategy in scope, Keras (3.x, TensorFlow backend) creates them
    lazily inside the first trace of the training step; ``tf.function`` then discards that trace
    and traces the step a second time without variable creation. Building them first (Keras'
    own symbolic build, which ``fit`` runs only under a non-default strategy) makes the step trace
    once: DenseNet121 at 32 px, first ``fit`` epoch 43.5 s -> 28.4 s, ResNet50 25.6 s -> 17.7 s.
    Same weights, same training. x_example: (B, S, S, 3); y_example: (B,)."""
    model.optimizer.build(model.trainable_variables)
    build = getattr(model, "_symbolic_build", None)
    if build is not None:  # absent in other Keras versions: the step is then traced twice
        build(data_batch=(np.asarray(x_example), np.asarray(y_example), None))


def _prepare_model(model, cfg: tuple, learning_rate, momentum, jit_compile, x_example,
                   y_example, warmup_steps: int = 0) -> bool:
    """Compile (first time / other settings) or reset the optimiser of an already-compiled model.
    Returns True when the compiled functions were reused."""
    import keras

    if getattr(model, "_cellstudy_cfg", None) == cfg and model.optimizer is not None:
        for v, a in zip(_optimizer_variables(model), model._cellstudy_opt_init):
            v.assign(a)
        return True
    model.compile(optimizer=keras.optimizers.SGD(
                      learning_rate=learning_rate_schedule(learning_rate, warmup_steps),
                      momentum=momentum),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=bool(jit_compile))
    build_training_state(model, x_example, y_example)
    model._cellstudy_opt_init = [np.array(v.numpy()) for v in _optimizer_variables(model)]
    model._cellstudy_cfg = cfg
    return False


_ONEDNN_WARNED = False


def _warn_if_onednn_off(sinfo: StrategyInfo) -> None:
    """Warn once when training on CPUs without oneDNN's kernels although nobody opted out:
    TensorFlow was imported before cellstudy (see ``cellstudy.__init__``)."""
    global _ONEDNN_WARNED
    if _ONEDNN_WARNED or sinfo.gpus or os.environ.get(ONEDNN_ENV) == "0" or onednn_enabled() is not False:
        return
    _ONEDNN_WARNED = True
    import warnings
    warnings.warn(f"TensorFlow runs without its oneDNN CPU kernels: it was imported before "
                  f"cellstudy set {ONEDNN_ENV}=1, so training on this CPU is up to 6x slower. "
                  f"Import cellstudy first (or export {ONEDNN_ENV}=1; =0 silences this).",
                  RuntimeWarning, stacklevel=3)


def train_fold(build_fn: Callable[[], Any], x_train, y_train, x_test, y_test,
               out_dir: str | os.PathLike, epochs_short: int, epochs_long: int, *,
               batch_size: int = 16, learning_rate: float = 1e-3, momentum: float = 0.9,
               warmup_epochs: int = 0, seed: int = 0, deterministic: bool = False, strategy: Any = None,
               mixed_precision: str | None = None, jit_compile: bool = False,
               progress: Callable[[dict[str, Any]], None] | None = None,
               network_name: str = "network", fold: int = 0,
               callbacks: list | None = None, keep_checkpoint: bool = False,
               retry_failed: bool = False, cache: bool = True) -> TrainResult:
    """Train one (network, fold) and evaluate both regimes; resumable.

    build_fn: zero-argument builder of an *uncompiled* Keras 3 model, input (S, S, 3), output a
        2-way softmax (a ``WeightResetter`` to reuse one model across folds).
    x_train: (N, S, S, 3) float32 (originals + augmented copies); y_train: (N,) int in {0, 1}.
    x_test: (M, S, S, 3) float32; y_test: (M,) int.
    out_dir: this run's folder (created); see the module docstring for its files.
    epochs_short < epochs_long: the regimes (epoch counts, >= 1).
    batch_size: global batch size (split over replicas); learning_rate, momentum: SGD.
    warmup_epochs: linear learning-rate warm-up over this many epochs (0: the fixed rate from the
        first step; see ``learning_rate_schedule``).
    seed: weights, dropout and shuffling; deterministic: TensorFlow op determinism (process-wide).
    strategy: None (default strategy), "auto" / "default" / "mirrored" / "multiworker", a
        ``StrategyInfo`` or a ``tf.distribute.Strategy``.
    mixed_precision: None, "float16" or "bfloat16" (policy restored after the run);
    jit_compile: XLA for the train step.
    progress: called with a dict per event (``print_progress`` prints them); None: silent.
    callbacks: extra Keras callbacks for each epoch's ``fit``.
    keep_checkpoint: keep ``checkpoint.npz`` after a finished run.
    retry_failed: re-run a run that has ``failed.json`` (otherwise it is returned as failed).

    Returns a ``TrainResult``. A NaN / inf loss stops the run, writes ``failed.json`` and returns
    a failed result (no exception). Raises ``TrainError`` (a ``ValueError``) before training
    for bad arrays or a one-class training set, ``OutputError`` for an unwritable folder,
    ``CheckpointMismatchError`` for files of another network / size / setting in ``out_dir``.
    """
    import keras
    import tensorflow as tf

    where = f"network {network_name!r} fold {fold}"
    # ---- arguments ---------------------------------------------------------------------------
    for name, val in (("epochs_short", epochs_short), ("epochs_long", epochs_long),
                      ("batch_size", batch_size)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
            raise TrainError(f"{name} for {where} must be an int >= 1, got {val!r}")
    if epochs_short >= epochs_long:
        raise TrainError(f"epochs_short ({epochs_short}) must be < epochs_long ({epochs_long}) "
                         f"for {where}: the two regimes come from one run")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise TrainError(f"learning_rate for {where} must be > 0, got {learning_rate!r}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, np.integer)) \
            or not 0 <= warmup_epochs < epochs_long:
        raise TrainError(f"warmup_epochs for {where} must be an int in [0, epochs_long), got "
                         f"{warmup_epochs!r}")
    if not (0 <= momentum < 1):
        raise TrainError(f"momentum for {where} must be in [0, 1), got {momentum!r}")
    x_train, y_train = _check_arrays(x_train, y_train, "train", network_name, fold)
    x_test, y_test = _check_arrays(x_test, y_test, "test", network_name, fold)
    counts = np.bincount(y_train, minlength=2)
    if (counts > 0).sum() < 2:
        raise TrainError(f"the training set of {where} has one class only "
                         f"(counts normal={counts[0]}, abnormal={counts[1]}); a classifier "
                         "needs both: check the folds (grouped stratification) and the cohort")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise TrainError(f"x_test {x_test.shape[1:]} and x_train {x_train.shape[1:]} of {where} "
                         "have different image shapes")
    emit = progress or (lambda ev: None)

    # ---- output folder, finished runs ---------------------------------------------------------
    sinfo = resolve_strategy(strategy)
    out = Path(out_dir)
    if not sinfo.is_chief:  # multi-worker: only the chief writes the run's files
        out = out / f".worker-{sinfo.task[0]}-{sinfo.task[1]}"
    out = check_writable(out)
    ident_now = {"network": network_name, "fold": int(fold),
                 "input_shape": list(x_train.shape[1:])}
    for marker, status in ((DONE, "done"), (FAILED, "failed")):
        p = out / marker
        if p.exists() and not (status == "failed" and retry_failed):
            old = json.loads(p.read_text())
            if (old.get("network"), old.get("fold"), old.get("input_shape")) != (
                    network_name, int(fold), list(x_train.shape[1:])):
                raise CheckpointMismatchError(
                    f"{p} belongs to {_ckpt_identity(old)}, not {_ckpt_identity(ident_now)}; "
                    "use another out_dir")
            emit({"event": "skipped", "network": network_name, "fold": fold,
                  "status": status, "path": str(p)})
            return load_result(out)
    if retry_failed and (out / FAILED).exists():
        (out / FAILED).unlink()

    # ---- model --------------------------------------------------------------------------------
    _warn_if_onednn_off(sinfo)
    t_start = time.perf_counter()
    # a WeightResetter's second call restores the whole model state: keep TF's compiled kernels
    set_determinism(int(seed), deterministic,
                    keep_compiled=isinstance(build_fn, WeightResetter) and build_fn.model is not None)
    with precision_policy(mixed_precision) as policy:
        with sinfo.strategy.scope():
            t_build = time.perf_counter()
            model = build_fn()
            build_s = time.perf_counter() - t_build
            if not isinstance(model, keras.Model):
                raise TrainError(f"build_fn for {where} returned {type(model).__name__}; "
                                 "expected a keras.Model")
            in_shape = _input_shape(model)
            if in_shape != list(x_train.shape[1:]):
                raise TrainError(f"model {network_name!r} expects input {in_shape}; the images "
                                 f"of fold {fold} are {list(x_train.shape[1:])}")
            if tuple(model.output_shape[1:]) != (2,):
                raise TrainError(f"model {network_name!r} outputs {model.output_shape}; expected "
                                 "(None, 2) class probabilities (2-way softmax)")
            warmup_steps = int(warmup_epochs) * math.ceil(len(x_train) / int(batch_size))
            cfg = _compile_cfg(learning_rate, momentum, jit_compile, sinfo.strategy, policy,
                               warmup_steps)
            reused = _prepare_model(model, cfg, learning_rate, momentum, jit_compile,
                                    x_train[:1], y_train[:1], warmup_steps)

        meta = {
            "format": FORMAT_VERSION, "network": network_name, "fold": int(fold),
            "input_shape": list(x_train.shape[1:]), "n_params": _n_params(model),
            "seed": int(seed), "batch_size": int(batch_size),
            "learning_rate": float(learning_rate), "momentum": float(momentum),
            "warmup_epochs": int(warmup_epochs), "n_train": int(len(x_train)), "n_test": int(len(x_test)),
            "epochs_short": int(epochs_short), "epochs_long": int(epochs_long),
            "deterministic": bool(deterministic), "mixed_precision": policy,
            "jit_compile": bool(jit_compile),
        }

        # ---- resume ---------------------------------------------------------------------------
        history: list[dict[str, Any]] = []
        start_epoch = 0
        test_acc: dict[str, float] = {}
        ckpt = out / CHECKPOINT
        if ckpt.exists():
            old = _restore_checkpoint(ckpt, model, meta)
            start_epoch = int(old["epoch"])
            history = list(old.get("history", []))[:start_epoch]
            test_acc = dict(old.get("test_accuracy", {}))
            if start_epoch > epochs_long:
                raise CheckpointMismatchError(
                    f"checkpoint {ckpt} is at epoch {start_epoch}, beyond epochs_long "
                    f"{epochs_long}; use another out_dir")
            if start_epoch >= epochs_short and not (out / "proba_short.npy").exists():
                raise CheckpointMismatchError(
                    f"checkpoint {ckpt} is past the short regime (epoch {start_epoch}) but "
                    f"{out / 'proba_short.npy'} is missing; delete the folder to start over")
            _write_history(out / HISTORY, history)
        _save_npy(out / "y_test.npy", y_test.astype(np.int64))

        emit({"event": "start", "network": network_name, "fold": fold,
              "n_train": len(x_train), "n_test": len(x_test), "epochs_short": epochs_short,
              "epochs_long": epochs_long, "strategy": sinfo.describe(),
              "resume_epoch": start_epoch, "reused_model": reused})

        base = _base_dataset(x_train, y_train, cache)
        test_ds = _test_dataset(x_test, batch_size)
        n = len(x_train)
        extra_cbs = list(callbacks or [])
        first_epoch_s = None

        def evaluate(regime: str, epoch: int) -> None:
            proba = np.asarray(model.predict(test_ds, verbose=0), dtype=np.float32)
            if proba.shape != (len(x_test), 2) or not np.isfinite(proba).all():
                raise _NaNStop(f"test probabilities of regime {regime} are not finite "
                               f"(shape {proba.shape})")
            _save_npy(out / f"proba_{regime}.npy", proba)
            tmp = out / f".model_{regime}.tmp.keras"
            try:
                model.save(tmp)
                os.replace(tmp, out / f"model_{regime}.keras")
            except OSError as e:
                raise OutputError(f"could not write {out / f'model_{regime}.keras'}: {e}") from e
            acc = float((proba.argmax(1) == y_test).mean())
            test_acc[regime] = acc
            emit({"event": "regime", "network": network_name, "fold": fold,
                  "regime": regime, "epoch": epoch, "test_accuracy": acc})

        # ---- epochs ---------------------------------------------------------------------------
        try:
            for epoch in range(start_epoch, epochs_long):
                ds = _epoch_dataset(base, n, batch_size, seed, epoch)
                t0 = time.perf_counter()
                h = model.fit(ds, initial_epoch=epoch, epochs=epoch + 1, verbose=0,
                              shuffle=False,
                              callbacks=[keras.callbacks.TerminateOnNaN(), *extra_cbs])
                dt = time.perf_counter() - t0
                if first_epoch_s is None:
                    first_epoch_s = dt
                loss = float(h.history.get("loss", [float("nan")])[-1])
                acc = float(h.history.get("accuracy", [float("nan")])[-1])
                if not math.isfinite(loss):
                    raise _NaNStop(f"training loss became {loss} during epoch {epoch + 1}",
                                   epoch + 1)
                row = {"epoch": epoch + 1, "loss": loss, "accuracy": acc, "seconds": dt,
                       "images_per_s": n / dt if dt > 0 else float("nan")}
                history.append(row)
                _write_history(out / HISTORY, history)
                done_s = [r["seconds"] for r in history[start_epoch:]]
                # time left: mean of this session's epochs, the first (tracing) one excluded
                per = statistics.mean(done_s[1:]) if len(done_s) > 1 else done_s[0]
                emit({"event": "epoch", "network": network_name, "fold": fold,
                      "epoch": epoch + 1, "epochs": epochs_long, "loss": loss, "accuracy": acc,
                      "seconds": dt, "images_per_s": row["images_per_s"],
                      "eta_s": per * (epochs_long - epoch - 1)})
                if epoch + 1 == epochs_short:
                    evaluate("short", epoch + 1)
                if epoch + 1 == epochs_long:
                    evaluate("long", epoch + 1)
                if epoch + 1 < epochs_long or keep_checkpoint:
                    # the last epoch's checkpoint would be deleted right after done.json: not
                    # written (a kill before done.json resumes from the previous epoch's)
                    _save_checkpoint(out, model, {**meta, "epoch": epoch + 1, "history": history,
                                                  "test_accuracy": test_acc})
        except _NaNStop as stop:
            failure = {**meta, "status": "failed", "reason": stop.reason,
                       "epoch": stop.epoch if stop.epoch is not None else len(history),
                       "completed_epochs": len(history),
                       "regimes_saved": sorted(test_acc), "strategy": sinfo.as_dict()}
            _write_json(out / FAILED, failure)
            emit({"event": "failed", "network": network_name, "fold": fold,
                  "epoch": failure["epoch"], "reason": stop.reason})
            res = load_result(out)
            res.skipped = False
            return res

    total = time.perf_counter() - t_start
    ep_s = [r["seconds"] for r in history]
    timings = {
        "seconds_total_this_session": total,
        "seconds_build": build_s,
        "seconds_first_epoch_this_session": first_epoch_s,
        "seconds_training": float(sum(ep_s)),
        "seconds_to_short": float(sum(ep_s[:epochs_short])),
        "seconds_per_epoch_median": float(statistics.median(ep_s)),
        "images_per_s_median": float(statistics.median(r["images_per_s"] for r in history)),
        "reused_model": bool(reused),
        "resumed_from_epoch": start_epoch,
    }
    done = {**meta, "status": "done", "test_accuracy": test_acc, "timings": timings,
            "strategy": sinfo.as_dict(), "op_determinism": op_determinism_enabled(),
            "onednn": onednn_enabled(), "tf_threads": threads.current(),
            "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                         "keras": keras.__version__, "numpy": np.__version__},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json(out / DONE, done)
    if not keep_checkpoint:
        for p in (out / CHECKPOINT, out / CHECKPOINT_JSON):
            p.unlink(missing_ok=True)
    emit({"event": "done", "network": network_name, "fold": fold, "seconds": total})
    res = load_result(out)
    res.skipped = False
    res.resumed_from = start_epoch
    return res


class _NaNStop(Exception):
    def __init__(self, reason: str, epoch: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.epoch = epoch


# ---------------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------------
def _compiled(build_fn, learning_rate=1e-3, momentum=0.9, jit_compile=False):
    import keras
    model = build_fn()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=momentum),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=bool(jit_compile))
    return model


def throughput(build_fn: Callable[[], Any], size: int | None = None, batch_size: int = 16,
               steps: int = 10, warmup: int = 3, seed: int = 0,
               mixed_precision: str | None = None, jit_compile: bool = False,
               strategy: Any = None) -> dict[str, Any]:
    """Training throughput of ``build_fn()``'s model: median over ``steps`` timed
    ``train_on_batch`` calls (after ``warmup`` untimed ones, which include tracing) on one
    random in-memory batch of shape (batch_size, size, size, 3).

    Returns ``{"images_per_s", "step_s_median", "step_s": [...], "size", "batch_size"}``."""
    import tensorflow as tf

    set_determinism(seed)
    sinfo = resolve_strategy(strategy)
    with precision_policy(mixed_precision), sinfo.strategy.scope():
        model = _compiled(build_fn, jit_compile=jit_compile)
    s = _input_shape(model)[0] if size is None else int(size)
    if _input_shape(model)[:2] != [s, s]:
        raise TrainError(f"throughput: the model expects {_input_shape(model)}, size is {s}")
    rng = np.random.default_rng(seed)
    xb = tf.constant(rng.random((batch_size, s, s, 3), dtype=np.float32))
    yb = tf.constant(np.arange(batch_size) % 2, dtype=tf.int32)
    with sinfo.strategy.scope():
        build_training_state(model, xb, yb)
    for _ in range(warmup):
        model.train_on_batch(xb, yb)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.train_on_batch(xb, yb)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"images_per_s": batch_size / med, "step_s_median": med, "step_s": times,
            "size": s, "batch_size": batch_size}


def pipeline_overhead(build_fn: Callable[[], Any], x, y, batch_size: int = 16, steps: int = 20,
                      warmup: int = 3, seed: int = 0, rounds: int = 2,
                      cache: bool = True) -> dict[str, Any]:
    """Cost of the input pipeline: median step time of ``model.fit`` on the real training
    pipeline (``make_train_dataset``, repeated) vs ``model.train_on_batch`` on pre-sliced
    in-memory batches (tensors made before timing), same model, after warm-up, alternating
    ``rounds`` times. Steps are timed end to end (between consecutive batch ends).

    x: (N, S, S, 3) float32; y: (N,) int. Returns ``{"pipeline_step_s", "memory_step_s",
    "ratio"}`` (ratio = pipeline / memory; 1.05 means 5% overhead) and the raw times."""
    import keras
    import tensorflow as tf

    x, y = _check_arrays(x, y, "bench", "pipeline_overhead", 0)
    set_determinism(seed)
    model = _compiled(build_fn)
    build_training_state(model, x[:1], y[:1])
    n = len(x)
    nb = n // batch_size
    if nb < 1:
        raise TrainError(f"pipeline_overhead needs at least batch_size={batch_size} images, "
                         f"got {n}")
    batches = [(tf.constant(x[i * batch_size:(i + 1) * batch_size]),
                tf.constant(y[i * batch_size:(i + 1) * batch_size]))
               for i in range(nb)]

    class _StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            if logs:  # force the step's results to be ready
                [float(np.asarray(v)) for v in logs.values()]
            self.ends.append(time.perf_counter())

    pipe_t: list[float] = []
    mem_t: list[float] = []
    for r in range(rounds):
        # pipeline: whole batches only, so every timed step has batch_size images
        ds = _epoch_dataset(_base_dataset(x[:nb * batch_size], y[:nb * batch_size], cache),
                            nb * batch_size, batch_size, seed, r).repeat()
        timer = _StepTimer()
        model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False,
                  callbacks=[timer])
        d = np.diff(timer.ends)[warmup - 1:] if warmup >= 1 else np.diff(timer.ends)
        pipe_t += [float(v) for v in d]
        # in-memory
        for i in range(warmup):
            model.train_on_batch(*batches[i % nb])
        for i in range(steps):
            t = time.perf_counter()
            model.train_on_batch(*batches[i % nb])
            mem_t.append(time.perf_counter() - t)
    p, m = statistics.median(pipe_t), statistics.median(mem_t)
    return {"pipeline_step_s": p, "memory_step_s": m, "ratio": p / m,
            "pipeline_times": pipe_t, "memory_times": mem_t, "batch_size": batch_size,
            "image_shape": list(x.shape[1:])}


def measure_reuse(build_fn: Callable[[], Any], x_train, y_train, x_test, y_test,
                  out_root: str | os.PathLike, batch_size: int = 16, seed: int = 0,
                  **kwargs) -> dict[str, Any]:
    """What ``WeightResetter`` saves: time to (build +) train one epoch + evaluate for a second
    fold with a fresh build vs with the reused, reset model. Runs 3 tiny ``train_fold`` calls
    (1 + 1 epochs each) under ``out_root``; returns seconds for each and the saving."""
    out_root = Path(out_root)
    common = dict(epochs_short=1, epochs_long=2, batch_size=batch_size, seed=seed,
                  network_name="reuse-bench", **kwargs)
    t = time.perf_counter()
    train_fold(build_fn, x_train, y_train, x_test, y_test, out_root / "fresh0", fold=0, **common)
    fresh_first = time.perf_counter() - t
    t = time.perf_counter()
    r_fresh = train_fold(build_fn, x_train, y_train, x_test, y_test, out_root / "fresh1", fold=1,
                         **common)
    fresh = time.perf_counter() - t
    wr = WeightResetter(build_fn)
    train_fold(wr, x_train, y_train, x_test, y_test, out_root / "reuse0", fold=0, **common)
    t = time.perf_counter()
    r_reuse = train_fold(wr, x_train, y_train, x_test, y_test, out_root / "reuse1", fold=1,
                         **common)
    reuse = time.perf_counter() - t
    return {"fresh_first_run_s": fresh_first, "fresh_run_s": fresh, "reused_run_s": reuse,
            "saved_s": fresh - reuse,
            "fresh_first_epoch_s": r_fresh.history[0]["seconds"],
            "reused_first_epoch_s": r_reuse.history[0]["seconds"],
            "same_predictions": bool(np.array_equal(r_fresh.proba["long"],
                                                    r_reuse.proba["long"]))}


if __name__ == "__main__":  # pragma: no cover
    sys.exit("cellstudy.train is a library; see train_fold")
