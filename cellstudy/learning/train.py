"""Train one (network, fold): both regimes from one run, checkpoint/resume, history, faults.

Paper 4.3 / study spec section 6: cross-entropy on the 2-class softmax, SGD with a fixed
learning rate 1e-3 (momentum and batch size are parameters). One run gives both regimes: after
``epochs_short`` epochs the model is evaluated on the test fold and saved (regime ``short``),
then training continues to ``epochs_long`` (regime ``long``). With ``epochs_long_max`` the long
regime goes on to the training plateau (study.md section 12: "every scale trains each network
until its training accuracy plateaus in the long regime"): after every epoch from ``epochs_long``
on, the results chapter's rule (``cellstudy.learning.convergence.plateau`` on this run's training
accuracies) decides, and the run stops at the first epoch it calls converged, at the latest at
``epochs_long_max`` (``done.json``: ``long_stop`` "plateau" or "cap", ``epochs_trained``). The
rule reads the training history only, never the test fold.

Files written in ``out_dir`` (one folder per network x fold):

=====================  ===================================================================
``history.csv``        one row per epoch: epoch (1-based), loss, accuracy, seconds, images_per_s
``proba_short.npy``    (N_test, 2) float32 test-set probabilities after ``epochs_short`` epochs
``proba_long.npy``     (N_test, 2) float32 at the end of the long regime (``epochs_long`` epochs, or
                       where the plateau stop ended it)
``y_test.npy``         (N_test,) int labels, in the same row order
``model_short.keras``  the model (architecture and weights) at the short regime (``model_long.keras``:
                       long), for prediction and explanation: without the optimiser's state,
                       which halves the file (SGD's momentum is one more copy of the weights;
                       ResNet50 210 -> ~100 MB). Resuming uses ``checkpoint.npz``, never these.
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

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cellstudy import ONEDNN_ENV, atomic, onednn_enabled, seeds, threads
from cellstudy.config import LR_DECAYS
from cellstudy.learning import checkpoints as ck
from cellstudy.learning.checkpoints import (DONE, FAILED, HISTORY, HISTORY_COLUMNS, REGIMES,  # noqa: F401  (re-exported)
                          CheckpointMismatchError, OutputError, TrainError, TrainResult, load_result)
from cellstudy.learning.distribute import (StrategyInfo, op_determinism_enabled, precision_policy,
                         resolve_strategy, select_strategy, set_determinism)

__all__ = [
    "TrainError", "OutputError", "CheckpointMismatchError", "TrainResult", "WeightResetter",
    "train_fold", "make_train_dataset", "epoch_seed", "print_progress", "load_result", "select_strategy", "set_determinism", "precision_policy",
]

FORMAT_VERSION = 1


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
        upto = (f" (then on to the training plateau, at most {ev['epochs_long_max']} in all)"
                if ev.get("epochs_long_max") not in (None, ev["epochs_long"]) else "")
        line = (f"{head} start: {ev['n_train']} train / {ev['n_test']} test images, "
                f"epochs {ev['epochs_short']}+{ev['epochs_long'] - ev['epochs_short']}{upto}, "
                f"{ev['strategy']}" + (f", resuming after epoch {ev['resume_epoch']}"
                                        if ev.get("resume_epoch") else ""))
    elif kind == "plateau":
        line = (f"{head} training accuracy on its plateau after epoch {ev['epoch']} (the results "
                f"chapter's rule): the long regime ends there (at most {ev['epochs']})")
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


def save_for_inference(model, path: str | os.PathLike) -> None:
    """Save ``model`` as a ``.keras`` archive without its optimiser (architecture + weights):
    what prediction, explanation and export load (``models.load(path)``, compile=False). Keras 3
    writes the optimiser's variables of a compiled model into the archive and has no option to
    leave them out (``include_optimizer`` applies to .h5 only), so the optimiser is detached for
    the write and put back: training goes on from the same state. The archive is written as
    of an uncompiled model too, so ``keras.models.load_model(path)`` loads it without a warning
    about optimiser variables it does not hold (compile it to train it further)."""
    opt, compiled = getattr(model, "optimizer", None), getattr(model, "compiled", False)
    model.optimizer, model.compiled = None, False
    try:
        model.save(path)
    finally:
        model.optimizer, model.compiled = opt, compiled


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


def dihedral(x, k):
    """The dihedral transform ``k`` in 0..7 of images ``x`` (..., H, W, C), H == W: rotation by
    ``k % 4`` quarter turns, then a left-right flip when ``k >= 4``. The eight symmetries of the
    square grid: exact (no interpolation), and they commute with the per-pixel colour whitening
    (ZCA acts on each pixel's channels only), so they can follow it. NumPy or TensorFlow input."""
    import tensorflow as tf
    y = tf.image.rot90(x, k % 4)
    return tf.cond(k >= 4, lambda: tf.image.flip_left_right(y), lambda: y)


def _dihedral_map(seed: int, epoch: int):
    """Per-image random dihedral transform of epoch ``epoch``: image ``i`` of the epoch's
    (shuffled) order gets ``k = stateless_uniform(seed=(epoch_seed, i)) in 0..7`` — a function of
    ``(seed, epoch, i)`` only, so a resumed run sees the same images."""
    import tensorflow as tf
    es = epoch_seed(seed, epoch)

    def fn(i, xy):
        k = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(es, tf.int64), i]),
                                        maxval=8, dtype=tf.int32)
        return dihedral(xy[0], k), xy[1]
    return fn


def _epoch_dataset(base, n: int, batch_size: int, seed: int, epoch: int, flips: bool = False):
    ds = base.shuffle(n, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
    if flips:
        ds = ds.enumerate().map(_dihedral_map(seed, epoch))
    return ds.batch(batch_size).prefetch(PREFETCH).with_options(_pipeline_options())


def make_train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int,
                       cache: bool = True, flips: bool = False):
    """The training pipeline of one epoch: ``from_tensor_slices((x, y))`` -> ``cache`` ->
    ``shuffle`` (full buffer, seed ``epoch_seed(seed, epoch)``) -> [``flips``: a random dihedral
    transform per image, :func:`_dihedral_map`] -> ``batch`` -> ``prefetch``
    (``PREFETCH`` batches; tf.data autotuning off, see ``_pipeline_options``).

    x: (N, S, S, 3) float32; y: (N,) int32. Yields ((B, S, S, 3), (B,)) with B <= batch_size.
    No Python runs per image."""
    return _epoch_dataset(_base_dataset(x, y, cache), len(x), batch_size, seed, epoch, flips)


def _test_dataset(x: np.ndarray, batch_size: int):
    import tensorflow as tf
    return (tf.data.Dataset.from_tensor_slices(x).batch(batch_size).prefetch(PREFETCH)
            .with_options(_pipeline_options()))


# ---------------------------------------------------------------------------------------------
# model state helpers
# ---------------------------------------------------------------------------------------------
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
            self._init = [np.array(v.numpy()) for v in ck.state_variables(self.model)]
            self.build_seconds = time.perf_counter() - t
            self.builds += 1
        else:
            self.reset()
        return self.model

    def reset(self) -> None:
        """Assign the stored initial state back to the model."""
        if self.model is None or self._init is None:
            raise TrainError("WeightResetter.reset() before the first build")
        vars_ = ck.state_variables(self.model)
        if len(vars_) != len(self._init):
            raise TrainError(f"model {self.model.name!r} now has {len(vars_)} state variables, "
                             f"{len(self._init)} when first built; was it modified?")
        for v, a in zip(vars_, self._init):
            v.assign(a)
        self.resets += 1


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
# the run
# ---------------------------------------------------------------------------------------------
def _compile_cfg(learning_rate, momentum, jit_compile, strategy, policy, warmup_steps=0,
                 decay_steps=0) -> tuple:
    return (float(learning_rate), float(momentum), bool(jit_compile), id(strategy), policy,
            int(warmup_steps), int(decay_steps))


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 0, decay_steps: int = 0):
    """SGD's learning rate at optimiser step t: the fixed ``learning_rate`` (paper 4.3), reached
    after a linear warm-up from 0 over ``warmup_steps`` steps when ``warmup_steps`` > 0; with
    ``decay_steps`` > 0 it then falls as a half cosine, ``lr * (1 + cos(pi * u)) / 2`` with
    ``u = min(t - warmup_steps, decay_steps) / decay_steps``, to 0 after ``decay_steps`` more steps
    (SGDR's annealing, Loshchilov & Hutter 2017, without restarts; ``decay_steps_for`` sets it to
    the end of the long regime, so the last epochs take ever smaller steps).

    A float when the rate is constant; else Keras' own ``CosineDecay`` (``alpha=1``, no decay,
    when only warming up), a built-in schedule, so saved models load without cellstudy. The step
    count is the optimiser's ``iterations`` variable, saved in every checkpoint, so a resumed run
    continues the schedule where it stopped."""
    warmup_steps, decay_steps = int(warmup_steps), int(decay_steps)
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps}, decay_steps={decay_steps}; expected >= 0")
    if warmup_steps <= 0 and decay_steps <= 0:
        return float(learning_rate)
    import keras
    # a warm-up starts from 0 and reaches the rate; no decay: alpha 1 over a nominal step
    warm = {"warmup_target": float(learning_rate), "warmup_steps": warmup_steps} if warmup_steps > 0 else {}
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warm else float(learning_rate), decay_steps=decay_steps or 1,
        alpha=0.0 if decay_steps > 0 else 1.0, **warm)


def decay_steps_for(lr_decay: str, epochs_long: int, warmup_epochs: int, steps_per_epoch: int) -> int:
    """Optimiser steps of the decay after the warm-up: 0 for ``lr_decay`` "none"; for "cosine"
    the rest of the long regime, ``(epochs_long - warmup_epochs) * steps_per_epoch``.
    ValueError for another ``lr_decay``."""
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"lr_decay={lr_decay!r}; expected one of {list(LR_DECAYS)}")
    if lr_decay == "none":
        return 0
    return max(0, int(epochs_long) - int(warmup_epochs)) * int(steps_per_epoch)


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
                   y_example, warmup_steps: int = 0, decay_steps: int = 0) -> bool:
    """Compile (first time / other settings) or reset the optimiser of an already-compiled model.
    Returns True when the compiled functions were reused."""
    import keras

    if getattr(model, "_cellstudy_cfg", None) == cfg and model.optimizer is not None:
        for v, a in zip(ck.optimizer_variables(model), model._cellstudy_opt_init):
            v.assign(a)
        return True
    model.compile(optimizer=keras.optimizers.SGD(
                      learning_rate=learning_rate_schedule(learning_rate, warmup_steps, decay_steps),
                      momentum=momentum),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=bool(jit_compile))
    build_training_state(model, x_example, y_example)
    model._cellstudy_opt_init = [np.array(v.numpy()) for v in ck.optimizer_variables(model)]
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
               retry_failed: bool = False, cache: bool = True,
               initial_weights: dict[str, Any] | None = None, flips: bool = False,
               lr_decay: str = "none", epochs_long_max: int | None = None) -> TrainResult:
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
    flips: a random dihedral transform (rotation by quarter turns, flip) of every training image
        in every epoch, on top of the offline augmentation (``_dihedral_map``; seeded by epoch
        and position, so a resume repeats it). Recorded in ``done.json`` (``flips``).
    lr_decay: "none" (the rate stays fixed after the warm-up) or "cosine" (it falls to 0 by the
        end of the long regime; ``learning_rate_schedule``). Recorded in ``done.json`` when not
        "none".
    epochs_long_max: None (the long regime is ``epochs_long`` epochs) or an int >= ``epochs_long``:
        on to the training plateau, at least ``epochs_long`` and at most ``epochs_long_max``
        epochs (module docstring; :func:`stops_at_plateau`). With ``lr_decay`` "cosine" only
        when equal to ``epochs_long`` (the decay's length is the regime's).
    initial_weights: where the model's backbone weights came from (``{backbone: {"path",
        "sha256"}}``; None: random, seeded), recorded in ``done.json`` and checked on resume.

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
    if lr_decay not in LR_DECAYS:
        raise TrainError(f"lr_decay for {where} must be one of {list(LR_DECAYS)}, got {lr_decay!r}")
    if epochs_long_max is not None:
        if isinstance(epochs_long_max, bool) or not isinstance(epochs_long_max, (int, np.integer)) \
                or epochs_long_max < epochs_long:
            raise TrainError(f"epochs_long_max for {where} must be None or an int >= epochs_long "
                             f"({epochs_long}), got {epochs_long_max!r}")
        if lr_decay != "none" and epochs_long_max > epochs_long:
            raise TrainError(f"epochs_long_max for {where} with lr_decay {lr_decay!r}: a decay runs to "
                             "the last epoch, which a stop at the plateau does not know in advance")
    last_epoch = int(epochs_long_max) if epochs_long_max is not None else int(epochs_long)
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
                    f"{p} belongs to {ck.identity(old)}, not {ck.identity(ident_now)}; "
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
            in_shape = ck.input_shape(model)
            if in_shape != list(x_train.shape[1:]):
                raise TrainError(f"model {network_name!r} expects input {in_shape}; the images "
                                 f"of fold {fold} are {list(x_train.shape[1:])}")
            if tuple(model.output_shape[1:]) != (2,):
                raise TrainError(f"model {network_name!r} outputs {model.output_shape}; expected "
                                 "(None, 2) class probabilities (2-way softmax)")
            steps_per_epoch = math.ceil(len(x_train) / int(batch_size))
            warmup_steps = int(warmup_epochs) * steps_per_epoch
            decay_steps = decay_steps_for(lr_decay, epochs_long, warmup_epochs, steps_per_epoch)
            cfg = _compile_cfg(learning_rate, momentum, jit_compile, sinfo.strategy, policy,
                               warmup_steps, decay_steps)
            reused = _prepare_model(model, cfg, learning_rate, momentum, jit_compile,
                                    x_train[:1], y_train[:1], warmup_steps, decay_steps)

        meta = {
            "format": FORMAT_VERSION, "network": network_name, "fold": int(fold),
            "input_shape": list(x_train.shape[1:]), "n_params": ck.n_params(model),
            **ck.architecture_meta(model),
            "seed": int(seed), "batch_size": int(batch_size),
            "learning_rate": float(learning_rate), "momentum": float(momentum),
            "warmup_epochs": int(warmup_epochs), "n_train": int(len(x_train)), "n_test": int(len(x_test)),
            "epochs_short": int(epochs_short), "epochs_long": int(epochs_long),
            "deterministic": bool(deterministic), "mixed_precision": policy,
            "jit_compile": bool(jit_compile), "initial_weights": initial_weights or None,
        }
        if flips:  # only when on: checkpoints and done.json of earlier runs stay valid
            meta["flips"] = True
        if lr_decay != "none":  # likewise; the decay's length depends on epochs_long
            meta["lr_decay"], meta["decay_steps"] = lr_decay, int(decay_steps)
        if epochs_long_max is not None:  # likewise
            meta["epochs_long_max"] = int(epochs_long_max)

        # ---- resume ---------------------------------------------------------------------------
        history: list[dict[str, Any]] = []
        start_epoch = 0
        test_acc: dict[str, float] = {}
        ckpt = out / ck.CHECKPOINT
        if ckpt.exists():
            old = ck.restore_checkpoint(ckpt, model, meta)
            start_epoch = int(old["epoch"])
            history = list(old.get("history", []))[:start_epoch]
            test_acc = dict(old.get("test_accuracy", {}))
            if start_epoch > last_epoch:
                raise CheckpointMismatchError(
                    f"checkpoint {ckpt} is at epoch {start_epoch}, beyond the long regime's last "
                    f"epoch {last_epoch}; use another out_dir")
            if start_epoch >= epochs_short and not (out / "proba_short.npy").exists():
                raise CheckpointMismatchError(
                    f"checkpoint {ckpt} is past the short regime (epoch {start_epoch}) but "
                    f"{out / 'proba_short.npy'} is missing; delete the folder to start over")
            ck.write_history(out / HISTORY, history)
        _save_npy(out / "y_test.npy", y_test.astype(np.int64))

        emit({"event": "start", "network": network_name, "fold": fold,
              "n_train": len(x_train), "n_test": len(x_test), "epochs_short": epochs_short,
              "epochs_long": epochs_long, "epochs_long_max": epochs_long_max, "strategy": sinfo.describe(),
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
                save_for_inference(model, tmp)
                os.replace(tmp, out / f"model_{regime}.keras")
            except OSError as e:
                raise OutputError(f"could not write {out / f'model_{regime}.keras'}: {e}") from e
            acc = float((proba.argmax(1) == y_test).mean())
            test_acc[regime] = acc
            emit({"event": "regime", "network": network_name, "fold": fold,
                  "regime": regime, "epoch": epoch, "test_accuracy": acc})

        def stop_after(epoch: int) -> str | None:
            """Whether the long regime ends after ``epoch`` (1-based) epochs: "fixed" / "cap" /
            "plateau", None to go on."""
            if epoch < epochs_long:
                return None
            if epochs_long_max is None:
                return "fixed"
            if stops_at_plateau([r["accuracy"] for r in history[:epoch]]):
                return "plateau"
            return "cap" if epoch >= last_epoch else None

        # ---- epochs ---------------------------------------------------------------------------
        long_stop = stop_after(start_epoch) if start_epoch else None
        try:
            if long_stop is not None:  # a kept checkpoint of a run that had ended: its long regime again
                evaluate("long", start_epoch)
            for epoch in range(start_epoch, last_epoch if long_stop is None else start_epoch):
                ds = _epoch_dataset(base, n, batch_size, seed, epoch, flips)
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
                ck.write_history(out / HISTORY, history)
                done_s = [r["seconds"] for r in history[start_epoch:]]
                # time left: mean of this session's epochs, the first (tracing) one excluded
                per = statistics.mean(done_s[1:]) if len(done_s) > 1 else done_s[0]
                emit({"event": "epoch", "network": network_name, "fold": fold,
                      "epoch": epoch + 1, "epochs": last_epoch, "loss": loss, "accuracy": acc,
                      "seconds": dt, "images_per_s": row["images_per_s"],
                      "eta_s": per * (last_epoch - epoch - 1)})
                if epoch + 1 == epochs_short:
                    evaluate("short", epoch + 1)
                long_stop = stop_after(epoch + 1)
                if long_stop is not None:
                    evaluate("long", epoch + 1)
                    if long_stop == "plateau" and epoch + 1 < last_epoch:
                        emit({"event": "plateau", "network": network_name, "fold": fold,
                              "epoch": epoch + 1, "epochs": last_epoch})
                if long_stop is None or keep_checkpoint:
                    # the last epoch's checkpoint would be deleted right after done.json: not
                    # written (a kill before done.json resumes from the previous epoch's)
                    ck.save_checkpoint(out, model, {**meta, "epoch": epoch + 1, "history": history,
                                                  "test_accuracy": test_acc})
                if long_stop is not None:
                    break
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
    extra = {} if epochs_long_max is None else {"long_stop": long_stop, "epochs_trained": len(history)}
    done = {**meta, **extra, "status": "done", "test_accuracy": test_acc, "timings": timings,
            "strategy": sinfo.as_dict(), "op_determinism": op_determinism_enabled(),
            "onednn": onednn_enabled(), "tf_threads": threads.current(),
            "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                         "keras": keras.__version__, "numpy": np.__version__},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_json(out / DONE, done)
    if not keep_checkpoint:
        for p in (out / ck.CHECKPOINT, out / ck.CHECKPOINT_JSON):
            p.unlink(missing_ok=True)
    emit({"event": "done", "network": network_name, "fold": fold, "seconds": total})
    res = load_result(out)
    res.skipped = False
    res.resumed_from = start_epoch
    return res


def stops_at_plateau(accuracy) -> bool:
    """Whether a long regime with ``epochs_long_max`` ends after these per-epoch training
    accuracies ``(E,)``: the results chapter's rule (``convergence.plateau`` with its stated
    defaults) calls them converged. The same rule the book applies to the run's history, so a fold
    stopped here is one the book calls converged (and one stopped at the cap is shown as not)."""
    from cellstudy.learning import convergence

    return bool(convergence.plateau(accuracy)["converged"])


class _NaNStop(Exception):
    def __init__(self, reason: str, epoch: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.epoch = epoch


