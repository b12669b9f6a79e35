"""What one (network, fold) run leaves on disk and reads back: its errors, the model's state
variables, checkpoints (resume), the per-epoch history and the finished result.

``cellstudy.learning.train`` trains; this module owns the files of its output folder (the file table is
in ``train``'s docstring; the folder itself is ``rundir.Run.fold(...)``). No TensorFlow import:
the variables are read through the model objects they belong to.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellstudy import atomic, rundir

REGIMES = rundir.REGIMES
CHECKPOINT = "checkpoint.npz"
CHECKPOINT_JSON = "checkpoint.json"
DONE = rundir.DONE
FAILED = rundir.FAILED
HISTORY = "history.csv"
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "seconds", "images_per_s")


class TrainError(ValueError):
    """A training run cannot start or go on (bad input, bad output folder, bad checkpoint)."""


class OutputError(TrainError, atomic.OutputError):
    """The output folder cannot be written (unwritable, not a folder, disk full)."""


class CheckpointMismatchError(TrainError):
    """A checkpoint / finished run in ``out_dir`` belongs to another network, size or setting."""


# ---------------------------------------------------------------------------------------------
# model state
# ---------------------------------------------------------------------------------------------
def state_variables(model) -> list:
    """The model's own state: weights plus seed-generator (dropout RNG) states, in a stable
    order. Excludes optimiser and metric variables."""
    return list(model.variables)


def optimizer_variables(model) -> list:
    opt = model.optimizer
    return list(opt.variables) if opt is not None else []


def n_params(model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.weights))


#: Keys left out of a layer's config in :func:`architecture`: names are auto-generated per build
#: ("dense_7"), the dtype policy is the run's precision (recorded as ``mixed_precision``).
_NOT_ARCHITECTURE = frozenset({"name", "dtype", "trainable"})


def _canonical(o, drop: frozenset, index: dict[str, int] | None = None):
    """A Keras config with its keys sorted and the keys in ``drop`` left out, at every depth; with
    ``index``, a ``keras_history`` reference names its source layer by position instead of name."""
    if isinstance(o, dict):
        if index is not None and "keras_history" in o:
            h = list(o["keras_history"])
            return {"keras_history": [index.get(h[0], "?")] + h[1:]}
        return {k: _canonical(v, drop, index) for k, v in sorted(o.items()) if k not in drop}
    if isinstance(o, (list, tuple)):
        return [_canonical(v, drop, index) for v in o]
    return o


def _wiring(model) -> list | None:
    """Which layers feed which: every layer's inbound nodes from the model's config, with each
    source layer's (auto-generated) name replaced by its position in the config's layer list.
    None for a model without a functional config (a subclassed model)."""
    try:
        cfg = model.get_config()
    except Exception:  # noqa: BLE001 - a subclassed model without get_config
        return None
    layer_cfgs = cfg.get("layers") if isinstance(cfg, dict) else None
    if not isinstance(layer_cfgs, list):
        return None
    index = {c.get("name"): i for i, c in enumerate(layer_cfgs)}
    return [_canonical(c.get("inbound_nodes", []), frozenset({"name"}), index) for c in layer_cfgs]


def _not_json(o):
    # no repr: an object's default repr holds its memory address, which differs per process
    return type(o).__qualname__


def architecture(model) -> str:
    """A fingerprint of the network's architecture: 16 hex digits of the sha256 of every layer's
    class, configuration (without names, dtype policy, trainable flag) and weight shapes, in
    layer order, and of the wiring (which layer's output feeds which, by position). Two builds of
    one network with the same parameters give the same fingerprint (in any process, at any
    precision); a changed token grid, pooling, dropout rate, BatchNorm momentum or wiring (e.g. a
    residual added from another layer) gives another, even where the parameter count is the same.
    Not covered: how the weights were initialised (e.g. the scale's ``he_init``, fixed per run
    folder by its ``scale.json``). Keras
    versions add keys to layer configs, so a fingerprint is only compared with one made by the
    same Keras version (:func:`architecture_differs`). Recorded in every checkpoint and
    ``done.json`` (``architecture``, ``architecture_keras``)."""
    rows = [[type(l).__name__, _canonical(l.get_config(), _NOT_ARCHITECTURE),
             [list(w.shape) for w in l.weights]] for l in model.layers]
    blob = json.dumps([rows, _wiring(model)], sort_keys=True, default=_not_json).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def architecture_meta(model) -> dict[str, str]:
    """``{"architecture": fingerprint, "architecture_keras": Keras version}`` for a meta dict
    (Keras is already imported by whoever holds a model)."""
    import keras

    return {"architecture": architecture(model), "architecture_keras": str(keras.__version__)}


def architecture_differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """True when both metas carry a fingerprint made by the same Keras version and the two differ.
    A marker written before the fingerprint existed, or by another Keras version, cannot be
    compared by it (its parameter count still is)."""
    a, b = old.get("architecture"), new.get("architecture")
    return (bool(a) and bool(b) and old.get("architecture_keras") == new.get("architecture_keras")
            and a != b)


def input_shape(model) -> list[int | None]:
    shp = model.input_shape
    if isinstance(shp, list):
        raise TrainError(f"model {model.name!r} has {len(shp)} inputs; expected one "
                         "(N, S, S, 3) image input")
    return list(shp[1:])


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


def read_history(path: Path) -> list[dict[str, Any]]:
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
    proba = {r: np.load(out / rundir.proba_file(r)) for r in REGIMES
             if (out / rundir.proba_file(r)).exists()}
    y = np.load(out / "y_test.npy") if (out / "y_test.npy").exists() else None
    return TrainResult(network=meta.get("network"), fold=meta.get("fold"), status=status,
                       out_dir=out, proba=proba, y_test=y, history=read_history(out / HISTORY),
                       timings=meta.get("timings", {}), skipped=True,
                       failure=meta if status == "failed" else None,
                       strategy=meta.get("strategy"))


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    def w(f):
        import io
        s = io.StringIO()
        wr = csv.DictWriter(s, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r[k] for k in HISTORY_COLUMNS})
        f.write(s.getvalue().encode())
    atomic.write(path, w)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def identity(meta: dict[str, Any]) -> str:
    shp = "x".join(str(s) for s in meta.get("input_shape", []))
    arch = f", architecture {meta['architecture']}" if meta.get("architecture") else ""
    return (f"network {meta.get('network')!r} (input {shp}, {meta.get('n_params')} parameters{arch}, "
            f"fold {meta.get('fold')})")


def save_checkpoint(out: Path, model, meta: dict[str, Any]) -> None:
    arrays = {f"m{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(state_variables(model))}
    arrays.update({f"o{i:05d}": np.asarray(v.numpy())
                   for i, v in enumerate(optimizer_variables(model))})
    blob = json.dumps(meta, default=atomic.json_default)
    atomic.write(out / CHECKPOINT, lambda f: np.savez(f, __meta__=np.array(blob), **arrays))
    atomic.write_json(out / CHECKPOINT_JSON, meta)


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["__meta__"]))
    except Exception as e:  # noqa: BLE001 - a truncated / foreign file
        raise CheckpointMismatchError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                                      f"{e}); delete it to start this run over") from e


def compare_meta(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    ident = ("network", "input_shape", "n_params")
    if any(old.get(k) != new.get(k) for k in ident) or architecture_differs(old, new):
        raise CheckpointMismatchError(
            f"{path} was written by {identity(old)} but this run is "
            f"{identity(new)}; use another out_dir or delete the old files")
    keys = ("fold", "seed", "batch_size", "learning_rate", "momentum", "n_train", "n_test",
            "epochs_short", "warmup_epochs", "initial_weights", "flips", "lr_decay", "decay_steps",
            "epochs_long_max")
    # checkpoints written before the warm-up / the pretrained weights / the flips / the decay existed
    defaults = {"warmup_epochs": 0, "initial_weights": None, "flips": False, "lr_decay": "none",
                "decay_steps": 0, "epochs_long_max": None}
    diff = {k: (old.get(k, defaults.get(k)), new.get(k, defaults.get(k))) for k in keys
            if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))}
    if diff:
        raise CheckpointMismatchError(
            f"{path} ({identity(old)}) was written with other settings: "
            + ", ".join(f"{k} {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
            + "; use another out_dir or delete the old files")


def restore_checkpoint(path: Path, model, meta_now: dict[str, Any]) -> dict[str, Any]:
    meta = read_checkpoint_meta(path)
    compare_meta(path, meta, meta_now)
    vars_m, vars_o = state_variables(model), optimizer_variables(model)
    with np.load(path, allow_pickle=False) as z:
        mk = sorted(k for k in z.files if k.startswith("m"))
        ok = sorted(k for k in z.files if k.startswith("o"))
        if len(mk) != len(vars_m) or len(ok) != len(vars_o):
            raise CheckpointMismatchError(
                f"checkpoint {path} holds {len(mk)} model / {len(ok)} optimiser variables; "
                f"{identity(meta_now)} has {len(vars_m)} / {len(vars_o)}")
        for v, k in zip(vars_m + vars_o, mk + ok):
            a = z[k]
            if tuple(a.shape) != tuple(v.shape):
                raise CheckpointMismatchError(
                    f"checkpoint {path} variable {k} has shape {a.shape}; {v.path} of "
                    f"{identity(meta_now)} has {tuple(v.shape)}")
            v.assign(a)
    return meta
