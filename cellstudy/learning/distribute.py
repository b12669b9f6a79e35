"""Where training runs: distribution strategy, mixed precision, seeds and determinism.

Nothing here changes global TensorFlow state at import time. Each function that does change it
(``set_determinism``, ``precision_policy``, strategy creation) says so.

Strategies (``select_strategy``):

* ``"default"``: TensorFlow's default strategy (one device: the GPU if there is one, else the CPU).
* ``"mirrored"``: ``tf.distribute.MirroredStrategy`` over every local GPU; on a machine without
  GPUs but with several logical CPU devices (tests), over those CPU devices.
* ``"multiworker"``: ``tf.distribute.MultiWorkerMirroredStrategy`` from ``$TF_CONFIG``. It must be
  created before TensorFlow runs any op, i.e. at the start of the program (call
  ``select_strategy`` first thing in the script / notebook).
* ``"auto"``: ``TF_CONFIG`` naming more than one task -> multiworker; several local GPUs ->
  mirrored; otherwise default (one GPU or the CPU).

Batch sizes given to ``cellstudy.learning.train`` are *global*: under a strategy with R replicas each
replica sees ``batch_size / R`` images per step, so results are comparable across set-ups.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

STRATEGY_KINDS = ("auto", "default", "mirrored", "multiworker")
PRECISIONS = {
    None: None,
    "float32": None,
    "float16": "mixed_float16",
    "mixed_float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "mixed_bfloat16": "mixed_bfloat16",
}

_STRATEGY_CACHE: dict[str, "StrategyInfo"] = {}


@dataclass
class StrategyInfo:
    """A distribution strategy and what it runs on.

    Attributes: ``strategy`` (a ``tf.distribute.Strategy``), ``kind`` (``default`` / ``mirrored`` /
    ``multiworker``), ``replicas`` (replicas in sync), ``devices`` (the devices of this worker that
    hold replicas), ``gpus`` (local physical GPUs), ``workers`` (machines), ``task`` (this
    worker's ``(type, index)`` under TF_CONFIG, else None), ``is_chief`` (this process writes the
    run's files)."""

    strategy: Any
    kind: str
    replicas: int
    devices: list[str]
    gpus: int
    workers: int = 1
    task: tuple[str, int] | None = None
    is_chief: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: kind, replicas, devices, workers."""
        return (f"strategy {self.kind}: {self.replicas} replica(s) on {', '.join(self.devices)}; "
                f"{self.gpus} local GPU(s); {self.workers} worker(s)"
                + (f"; this task {self.task[0]}:{self.task[1]}" if self.task else ""))

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "replicas": self.replicas, "devices": list(self.devices),
                "gpus": self.gpus, "workers": self.workers,
                "task": list(self.task) if self.task else None, "is_chief": self.is_chief}


def _tf_config() -> dict[str, Any] | None:
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"$TF_CONFIG is not valid JSON ({e}); expected "
                         '{"cluster": {"worker": [...]}, "task": {"type": ..., "index": ...}}') from e
    if not isinstance(cfg, dict) or "cluster" not in cfg:
        raise ValueError(f"$TF_CONFIG has no 'cluster' entry: {raw[:200]!r}")
    return cfg


def _n_tasks(cfg: dict[str, Any]) -> int:
    return sum(len(v) for k, v in cfg.get("cluster", {}).items() if k in ("worker", "chief"))


def chief_from_tf_config(cfg: dict[str, Any] | None) -> tuple[bool, tuple[str, int] | None]:
    """Is this task the chief (the one that writes files)? The ``chief`` task if the cluster has
    one, else worker 0. Without TF_CONFIG: True."""
    if not cfg:
        return True, None
    task = cfg.get("task", {}) or {}
    ttype, tindex = str(task.get("type", "worker")), int(task.get("index", 0))
    has_chief = bool(cfg.get("cluster", {}).get("chief"))
    chief = ttype == "chief" or (not has_chief and ttype == "worker" and tindex == 0)
    return chief, (ttype, tindex)


def select_strategy(kind: str | None = "auto") -> StrategyInfo:
    """Create (once per process and kind) and describe a distribution strategy.

    ``kind``: ``"auto"`` (default), ``"default"``, ``"mirrored"``, ``"multiworker"``; ``None``
    means ``"default"``. Raises ``ValueError`` for an unknown kind or a bad ``$TF_CONFIG``.
    Creating a strategy initialises TensorFlow's devices (after that, logical device
    configuration can no longer change)."""
    import tensorflow as tf

    kind = "default" if kind is None else str(kind).lower()
    if kind not in STRATEGY_KINDS:
        raise ValueError(f"unknown strategy {kind!r}; expected one of {STRATEGY_KINDS} or a "
                         "tf.distribute.Strategy")
    cfg = _tf_config()
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "auto":
        if cfg is not None and _n_tasks(cfg) > 1:
            kind = "multiworker"
        elif len(gpus) > 1:
            kind = "mirrored"
        else:
            kind = "default"
    if kind in _STRATEGY_CACHE:
        return _STRATEGY_CACHE[kind]

    chief, task = True, None
    workers = 1
    if kind == "default":
        strategy = tf.distribute.get_strategy()
        devices = [d.name for d in tf.config.list_logical_devices("GPU")[:1]] or \
                  [d.name for d in tf.config.list_logical_devices("CPU")[:1]]
    elif kind == "mirrored":
        if gpus:
            strategy = tf.distribute.MirroredStrategy()
        else:
            cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
            strategy = tf.distribute.MirroredStrategy(devices=cpus)
        devices = list(strategy.extended.worker_devices)
    else:  # multiworker
        if cfg is None:
            raise ValueError("strategy 'multiworker' needs $TF_CONFIG describing the cluster, e.g. "
                             '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                             '"task": {"type": "worker", "index": 0}}')
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        devices = list(strategy.extended.worker_devices)
        workers = max(1, _n_tasks(cfg))
        chief, task = chief_from_tf_config(cfg)
    info = StrategyInfo(strategy=strategy, kind=kind, replicas=int(strategy.num_replicas_in_sync),
                        devices=devices, gpus=len(gpus), workers=workers, task=task, is_chief=chief)
    _STRATEGY_CACHE[kind] = info
    return info


def resolve_strategy(strategy: Any) -> StrategyInfo:
    """``None`` / a kind name / a ``StrategyInfo`` / a ``tf.distribute.Strategy`` -> StrategyInfo."""
    import tensorflow as tf

    if strategy is None:
        return select_strategy("default")
    if isinstance(strategy, StrategyInfo):
        return strategy
    if isinstance(strategy, str):
        return select_strategy(strategy)
    if isinstance(strategy, tf.distribute.Strategy):
        kind = {"MirroredStrategy": "mirrored", "MultiWorkerMirroredStrategy": "multiworker",
                "CollectiveAllReduceStrategy": "multiworker"}.get(type(strategy).__name__,
                                                                   type(strategy).__name__)
        chief, task = chief_from_tf_config(_tf_config()) if kind == "multiworker" else (True, None)
        return StrategyInfo(strategy=strategy, kind=kind,
                            replicas=int(strategy.num_replicas_in_sync),
                            devices=list(getattr(strategy.extended, "worker_devices", []) or []),
                            gpus=len(tf.config.list_physical_devices("GPU")),
                            task=task, is_chief=chief)
    raise ValueError(f"strategy must be None, one of {STRATEGY_KINDS}, a StrategyInfo or a "
                     f"tf.distribute.Strategy; got {strategy!r}")


@contextlib.contextmanager
def precision_policy(name: str | None) -> Iterator[str]:
    """Set Keras' global dtype policy inside the block and restore the previous one after.

    ``name``: None / "float32" (no change), "float16" / "mixed_float16", "bfloat16" /
    "mixed_bfloat16". Layers take the policy when they are *constructed*, so build the model
    inside the block. Yields the policy name in force."""
    import keras

    if name not in PRECISIONS:
        raise ValueError(f"unknown mixed_precision {name!r}; expected one of "
                         f"{[k for k in PRECISIONS if k]} or None")
    policy = PRECISIONS[name]
    old = keras.mixed_precision.global_policy()
    if policy is None:
        yield old.name
        return
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy(old)


def set_determinism(seed: int, deterministic: bool = False, keep_compiled: bool = False) -> None:
    """Seed Python, NumPy, TensorFlow and Keras (``keras.utils.set_random_seed``); with
    ``deterministic=True`` also turn on TensorFlow op determinism
    (``tf.config.experimental.enable_op_determinism``), which is process-wide and stays on
    (TensorFlow has no public switch to turn it off). Changes global state, by design.

    ``keep_compiled=True`` (for a model that is reused with its whole state restored, see
    ``train.WeightResetter``): when TensorFlow's global seed already is ``seed``, only Python and
    NumPy are re-seeded. Setting TensorFlow's seed again clears its kernel caches, so every
    compiled function is re-instantiated: measured 16 s of the first epoch of each reused
    DenseNet121 fold at 32 px on 2 cores (20.9 s -> 4.1 s)."""
    import random

    import keras
    import numpy as np
    import tensorflow as tf

    if not isinstance(seed, (int,)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    try:  # the seed keras.utils.set_random_seed last set (None if never)
        from keras.src.utils.rng_utils import get_random_seed
        current = get_random_seed()
    except ImportError:  # pragma: no cover - private API moved: always re-seed everything
        current = None
    if keep_compiled and current == int(seed):
        random.seed(int(seed))
        np.random.seed(int(seed))
    else:
        keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def op_determinism_enabled() -> bool:
    """Whether TensorFlow op determinism is on in this process."""
    try:
        from tensorflow.python.framework import config as _cfg
        return bool(_cfg.is_op_determinism_enabled())
    except Exception:  # pragma: no cover - private API moved
        return False
