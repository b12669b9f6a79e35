"""Speed measurements of training (used by ``benchmarks/`` and the GPU chapter): training
throughput on an in-memory batch, the input pipeline's overhead, and the cost of re-tracing vs
reusing a model across folds. Measurements, not tests: warm up, take medians, compare within one
process.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cellstudy.learning.checkpoints import TrainError, input_shape
from cellstudy.learning.distribute import precision_policy, resolve_strategy, set_determinism
from cellstudy.learning.train import (WeightResetter, _base_dataset, _check_arrays, _epoch_dataset, build_training_state,
                    train_fold)


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
    s = input_shape(model)[0] if size is None else int(size)
    if input_shape(model)[:2] != [s, s]:
        raise TrainError(f"throughput: the model expects {input_shape(model)}, size is {s}")
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

