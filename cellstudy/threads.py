"""How many CPU threads each TensorFlow process gets when several run at once.

TensorFlow sizes its two thread pools (intra-op: the threads one kernel such as a convolution
splits over; inter-op: the ops run side by side) to the number of cores of the machine. Two
processes on 2 cores then run 4 or more busy threads, which wait for and spin on each other. When
the study runs ``N`` notebooks at once (``workers: N``), 08_xai explains networks in ``N``
worker processes, or ``cellstudy replicate --workers N`` trains seeds in ``N``, each process is
given ``cores // N`` threads of each kind (at least 1) through the variables TensorFlow reads once,
when it loads: ``TF_NUM_INTRAOP_THREADS`` and ``TF_NUM_INTEROP_THREADS``. A value the user exported is kept.

Measured on this 2-core machine (two processes each training ResNet50 at 32 px on folds 0-1 of the
default scale, alternating the settings three times, wall of the pair): 1 thread each 93.6 /
90.7 / 84.1 s, TensorFlow's default 110.4 / 104.0 / 99.0 s (medians 90.7 vs 104.0 s, 0.87x; CPU
time per process 87 vs 103 s). One process alone with 1 thread instead of 2 was ~10 % slower
(79 / 85 vs 77 / 70 s), which is why this applies only when processes share the machine.

Numbers. The thread count decides how TensorFlow splits its sums, so it changes the rounding of
every training step; after the cpu scale's 2 epochs that is visible for some networks (MHL-Den fold
0, 1 vs 2 threads: probabilities up to 0.13 apart, 6 of 44 test predictions changed; MHL 2e-6).
A run repeats exactly with the same seed and the same thread settings, which ``done.json``
(``tf_threads``) and the run's provenance record; exporting both variables pins them.
"""
from __future__ import annotations

import os
from typing import Mapping

INTRA_ENV = "TF_NUM_INTRAOP_THREADS"
INTER_ENV = "TF_NUM_INTEROP_THREADS"


def available_cpus() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return max(1, os.cpu_count() or 1)


def threads_per_process(n_processes: int, cpus: int | None = None) -> int:
    """``cpus // n_processes``, at least 1 (``cpus``: :func:`available_cpus` when None)."""
    if isinstance(n_processes, bool) or not isinstance(n_processes, int) or n_processes < 1:
        raise ValueError(f"n_processes={n_processes!r}; expected an int >= 1")
    cpus = available_cpus() if cpus is None else int(cpus)
    return max(1, cpus // n_processes)


def thread_env(n_processes: int, cpus: int | None = None,
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to add to the environment of ``n_processes`` TensorFlow processes that run
    at once: ``{INTRA_ENV: t, INTER_ENV: t}`` with ``t = threads_per_process(...)``, without the
    ones already set in ``environ`` (default ``os.environ``); ``{}`` for a single process (it keeps
    TensorFlow's default, all cores)."""
    environ = os.environ if environ is None else environ
    t = str(threads_per_process(n_processes, cpus))
    if n_processes == 1:
        return {}
    return {k: t for k in (INTRA_ENV, INTER_ENV) if not environ.get(k)}


def current() -> dict[str, str | None]:
    """This process's settings, for provenance: the two variables (None: TensorFlow's default)."""
    return settings_for(1)


def settings_for(n_processes: int, environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """What each of ``n_processes`` processes started now gets, as :func:`current` reports it:
    the exported values, else :func:`thread_env`'s (None: TensorFlow's default)."""
    environ = os.environ if environ is None else environ
    env = thread_env(n_processes, environ=environ)
    return {k: environ.get(k) or env.get(k) or None for k in (INTRA_ENV, INTER_ENV)}


def init_worker(env: Mapping[str, str]) -> None:
    """A worker process's initializer (``ProcessPoolExecutor(initializer=...)``, spawned), run
    before TensorFlow loads: put its thread settings (:func:`thread_env`) in its environment."""
    os.environ.update(env)
