"""The cross-validated experiment: every (network, fold) of a family, trained and evaluated.

``run_networks`` is what the family notebooks (02-05) call. For each network it builds the model
once per process (``train.WeightResetter``: the weights are reset for every fold instead of
re-tracing), and for each fold it builds the fold's training set from the training folds only
(originals + one augmented copy each, ZCA fitted on them: ``augment.fold_arrays``), trains both
regimes in one run (``train.train_fold``: checkpoint every epoch, resumable, NaN -> recorded
failure), and evaluates the untouched test fold.

Everything lands in the run folder (its layout: :mod:`cellstudy.rundir`)::

    <run>/training/<network>/fold<k>/   train_fold's files + test_cells.csv (cell id, group, label)
    <run>/<step>/                        metrics_tidy.csv/.parquet, predictions.csv/.parquet,
                                         history.csv, summary_<regime>.csv, failures.csv

``collect`` reads every finished (network, fold) of a run back into one set of tables (for
07_results, the XAI and the statistics), recomputing the metrics from the stored probabilities.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cellstudy import atomic, config, networks, rundir
from cellstudy.learning import augment, metrics


@dataclass
class FamilyResults:
    tidy: pd.DataFrame            # network x fold x regime x metric
    predictions: pd.DataFrame     # one row per cell x network x regime
    history: pd.DataFrame         # one row per network x fold x epoch
    failures: pd.DataFrame        # failed runs: network, fold, epoch, reason
    timings: pd.DataFrame         # network, fold, seconds, images_per_s, resumed_from, skipped


def networks_for(family: str | Sequence[str], scale: dict[str, Any]) -> list[str]:
    """The networks of a family (``"DL"``, ``"ViT"``, ``"RGB"``, ``"MHL"``) or an explicit list,
    restricted to ``scale["networks"]`` when that is set. Unknown names: ValueError."""
    if isinstance(family, str):
        names = networks.networks_of(family)
    else:
        names = [networks.check_network(n) for n in family]
    allowed = scale.get("networks")
    if allowed:
        bad = [n for n in allowed if n not in networks.NETWORK_NAMES]
        if bad:
            raise ValueError(f"scale parameter networks lists unknown network(s) {bad}; "
                             f"expected names from {list(networks.NETWORK_NAMES)}")
        names = [n for n in names if n in allowed]
    return names


def folds_for(scale: dict[str, Any]) -> list[int]:
    """The folds to run: ``scale["folds_to_run"]`` or all ``range(n_splits)``."""
    k = int(scale["n_splits"])
    chosen = scale.get("folds_to_run")
    if chosen is None:
        return list(range(k))
    bad = [f for f in chosen if not (0 <= int(f) < k)]
    if bad:
        raise ValueError(f"scale parameter folds_to_run has fold(s) {bad} outside 0..{k - 1}")
    return [int(f) for f in chosen]


def he_initialise(model):
    """Redraw every ``Conv2D`` kernel of ``model`` from He's normal initialiser (in place; returns
    the model), instead of Keras' Glorot-uniform default; biases stay zero.

    He et al. (2015): N(0, 2 / fan_in) keeps the activations' variance through ReLU layers; with
    Glorot's 1 / fan_avg it halves at each one. VGG16 has 13 ReLU convolutions and no
    normalisation: trained from random weights with Glorot's initialisation it stayed at the class
    prior (training accuracy 0.545 for 8 epochs at learning rate 3e-3 or 1e-2, S = 64, fold 0:
    every test cell one class); with He's it learned (0.73 at epoch 3). The networks with
    BatchNorm do not need it. Which networks get it is a scale number (``he_init``); draws come
    from Keras' seeded global generator, so they repeat with the run's seed."""
    import keras
    init = keras.initializers.HeNormal()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D):
            layer.kernel.assign(init(tuple(layer.kernel.shape)))
    return model


def set_bn_momentum(model, momentum: float | None):
    """Set the moving-average momentum of every BatchNormalization layer of ``model`` (in place;
    returns the model). None keeps Keras' default (0.99).

    The moving mean and variance that a BN layer uses at test time are updated once per training
    step, ``m <- momentum * m + (1 - momentum) * batch``. With the study's small training sets (352
    images, 11 steps an epoch at batch 32) Keras' 0.99 leaves the initial statistics (0 and 1) a
    weight of 0.99^110 = 0.33 after 10 epochs, and the test-time network differs from the trained
    one: measured on DenseNet121 fold 0 at S = 64, the test cells were all given one class at
    epochs 6-12 although their AUC was 0.84-0.88; at 0.9 that weight is 1e-5. A scale number
    (``bn_momentum``); it changes no weight and no trainable parameter."""
    if momentum is None:
        return model
    m = float(momentum)
    if not 0.0 <= m < 1.0:
        raise ValueError(f"bn_momentum={momentum!r}; expected a float in [0, 1) or None")
    import keras
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = m
    return model


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def weights_params(name: str, weights: dict[str, dict[str, str]] | None) -> dict[str, Any]:
    """``models.build`` parameters that start network ``name`` from the study config's pretrained
    backbone weights (``weights``: ``{backbone: {"path", "sha256"}}``, see
    ``runner.check_weights``): ``{"weights": path, "weights_sha256": sha}`` when its backbone has a
    file (DenRes-131: mappings for its two backbones), ``{}`` when none does (random, seeded)."""
    from cellstudy import networks as catalogue

    weights = weights or {}
    have = [b for b in catalogue.SPECS[name].backbones if b in weights]
    if not have:
        return {}
    if name == "denres131":
        return {"weights": {b: weights[b]["path"] for b in have},
                "weights_sha256": {b: weights[b]["sha256"] for b in have}}
    b = have[0]
    return {"weights": weights[b]["path"], "weights_sha256": weights[b]["sha256"]}


def initial_weights(name: str, weights: dict[str, dict[str, str]] | None) -> dict[str, Any] | None:
    """What network ``name`` starts from, for ``done.json`` and the chapters: ``{backbone:
    {"path", "sha256"}}`` of the files it loads; None: random initialisation (seeded)."""
    from cellstudy import networks as catalogue

    got = {b: dict(weights[b]) for b in catalogue.SPECS[name].backbones if b in (weights or {})}
    return got or None


def fold_builder(name: str, scale: dict[str, Any], params: dict[str, Any] | None = None):
    """The builder ``train.train_fold`` gets for network ``name`` at ``scale``: a
    ``train.WeightResetter`` (one build per process, weights reset for every further fold) around
    ``models.build`` with the scale's He initialisation (``he_init``) and BatchNorm momentum
    (``bn_momentum``)."""
    from cellstudy.learning import models, train

    params = dict(params or {})
    S = int(scale["image_size"])
    bn, he = scale.get("bn_momentum"), name in (scale.get("he_init") or ())

    def build():
        model = models.build(name, S, **params)
        return set_bn_momentum(he_initialise(model) if he else model, bn)
    return train.WeightResetter(build)


def _built_identity(builder) -> dict[str, Any]:
    """``{"n_params", "architecture", "architecture_keras"}`` of the network ``builder`` builds
    (``checkpoints.n_params``, ``checkpoints.architecture_meta``), from a fresh build once per
    builder (kept on it): not the builder's cached model, whose first build a later fold's
    training seeds."""
    from cellstudy.learning import checkpoints

    ident = getattr(builder, "_checked_identity", None)
    if ident is None:
        model = getattr(builder, "build_fn", builder)()
        ident = {"n_params": int(checkpoints.n_params(model)), **checkpoints.architecture_meta(model)}
        del model
        try:
            builder._checked_identity = ident
        except AttributeError:  # a plain function: build again next time
            pass
    return ident


def read_back(fd: rundir.FoldDir, image_size: int, builder=None):
    """A finished fold's result and test cells, read from its folder without touching it;
    CheckpointMismatchError when its marker belongs to another network, fold or image size, or
    (``builder`` given, marker with ``n_params`` / ``architecture``) was trained with another
    parameter count or architecture fingerprint (``checkpoints.architecture``) than ``builder``
    builds the network with now: its model parameters or the catalogue's defaults changed since
    (e.g. the RGB family's token width, a dropout rate), and its results would sit beside folds of
    a different network. Markers written before the fingerprint existed, or by
    another Keras version, are compared by parameter count only."""
    from cellstudy.learning import checkpoints, train

    res = train.load_result(fd.path)
    marker = fd.done if fd.done.exists() else fd.failed
    meta = json.loads(marker.read_text())
    shape = meta.get("input_shape")
    if (meta.get("network"), meta.get("fold")) != (fd.network, fd.fold) or (
            shape is not None and list(shape)[:2] != [image_size, image_size]):
        raise checkpoints.CheckpointMismatchError(
            f"{marker} belongs to network {meta.get('network')!r} fold {meta.get('fold')} at input "
            f"{shape}, not {fd.network!r} fold {fd.fold} at {image_size} px; use another run folder")
    if builder is not None and (meta.get("n_params") is not None or meta.get("architecture")):
        now = _built_identity(builder)
        if meta.get("n_params") is not None and int(meta["n_params"]) != now["n_params"]:
            raise checkpoints.CheckpointMismatchError(
                f"{marker} was trained with {int(meta['n_params']):,} parameters, but {fd.network!r} is built "
                f"with {now['n_params']:,} now (its model parameters or the catalogue's defaults changed "
                "since, e.g. the RGB family's token width); use another run folder, or delete the fold's "
                "folder to train it again")
        if checkpoints.architecture_differs(meta, now):
            raise checkpoints.CheckpointMismatchError(
                f"{marker} was trained with architecture {meta['architecture']}, but {fd.network!r} is "
                f"built as {now['architecture']} now (the same parameter count, other layer settings or "
                "wiring: e.g. its token grid, pooling, dropout rate or BatchNorm momentum changed since); use "
                "another run folder, or delete the fold's folder to train it again")
    cells = pd.read_csv(fd.test_cells, dtype={"cell_id": str, "group": str})
    return res, cells


def run_fold(prepared, name: str, k: int, builder=None, *, seed: int = 0,
             model_params: dict[str, Any] | None = None, strategy: Any = None,
             mixed_precision: str | None = None, jit_compile: bool = False, deterministic: bool = False,
             progress: Callable[[dict], None] | None = None, weights: dict[str, dict[str, str]] | None = None,
             fold_dir: rundir.FoldDir | None = None):
    """Train and evaluate network ``name`` on fold ``k`` of ``prepared`` (``study.prepare``'s
    result), both regimes, into ``<run>/training/<name>/fold<k>/``; returns ``(TrainResult,
    test cells frame)``. The unit of work of the study: ``run_networks`` calls it for every
    (network, fold) of a family, ``cellstudy train-fold`` (one workflow job) for one.

    A finished fold (``done.json`` or ``failed.json`` and its ``test_cells.csv``) is read back and
    none of its files is written again; an interrupted one resumes from its checkpoint.
    ``builder``: a ``fold_builder`` to reuse across folds of one network (None: a new one).
    ``weights``: the study config's pretrained backbone weights (``runner.check_weights``); the
    network starts from its backbone's file (recorded in ``done.json``).
    ``fold_dir``: where to train instead of the run's ``training/<name>/fold<k>/`` (a seed
    replicate's ``rundir.Run.replicate`` folder)."""
    from cellstudy.learning import train

    sc = prepared.scale
    S = int(sc["image_size"])
    folds = folds_for(sc)
    if int(k) not in range(int(sc["n_splits"])):
        raise ValueError(f"fold {k} of network {name!r} is outside 0..{int(sc['n_splits']) - 1} "
                         f"(the scale's n_splits={sc['n_splits']})")
    if int(k) not in folds:
        raise ValueError(f"fold {k} is not one the run trains (the scale's folds_to_run={folds})")
    run = rundir.Run(prepared.run_dir)
    fd = fold_dir if fold_dir is not None else run.fold(name, k)
    builder = builder if builder is not None else fold_builder(
        name, sc, {**weights_params(name, weights), **(model_params or {})})
    if fd.can_read_back():
        if progress is not None:
            progress({"event": "skipped", "network": name, "fold": k,
                      "status": "done" if fd.done.exists() else "failed",
                      "path": str(fd.done if fd.done.exists() else fd.failed)})
        return read_back(fd, S, builder)
    fa = augment.fold_arrays(prepared.images, prepared.labels, prepared.folds, k,
                             max_shift_px=config.max_shift_px(sc),
                             max_rotation_deg=sc["max_rotation_deg"], seed=seed,
                             whitening=config.whitening_for(sc, name))
    fd.path.mkdir(parents=True, exist_ok=True)
    test_idx = fa["test_index"]
    cells = pd.DataFrame({"cell_id": prepared.cell_ids[test_idx], "group": prepared.groups[test_idx],
                          "label": prepared.labels[test_idx]})
    atomic.write_text(fd.test_cells, cells.to_csv(index=False))
    atomic.write_json(fd.zca, fa["zca_state"], default=lambda o: np.asarray(o).tolist(), indent=None)
    res = train.train_fold(
        builder, fa["x_train"], fa["y_train"], fa["x_test"], fa["y_test"], fd.path,
        **training_options(sc), seed=seed,
        deterministic=deterministic, strategy=strategy, mixed_precision=mixed_precision,
        jit_compile=jit_compile, progress=progress, network_name=name, fold=k,
        initial_weights=initial_weights(name, weights))
    return res, cells


def training_options(sc: dict[str, Any], replicas: int = 1) -> dict[str, Any]:
    """``train.train_fold``'s keywords that a scale sets: both regimes' epochs (and the long
    regime's cap when it goes on to the plateau), the global batch
    (the scale's per-replica ``batch_size`` x ``replicas``), SGD's rate, momentum, warm-up and
    decay, the flips. The study's training jobs and the GPU chapter both train with these."""
    return {"epochs_short": int(sc["epochs_short"]), "epochs_long": int(sc["epochs_long"]),
            "batch_size": int(sc["batch_size"]) * max(1, int(replicas)),
            "learning_rate": float(sc["learning_rate"]), "momentum": float(sc["momentum"]),
            "warmup_epochs": int(sc.get("warmup_epochs", 0) or 0), "flips": bool(sc.get("flips", False)),
            "lr_decay": str(sc.get("lr_decay", "none")),
            "epochs_long_max": None if sc.get("epochs_long_max") is None else int(sc["epochs_long_max"])}


def run_networks(prepared, family: str | Sequence[str], step: str, *, seed: int = 0,
                 model_params: dict[str, dict[str, Any]] | None = None, strategy: Any = None,
                 mixed_precision: str | None = None, jit_compile: bool = False,
                 deterministic: bool = False, progress: Callable[[dict], None] | None = None,
                 echo: Callable[[str], None] = print, weights: dict[str, dict[str, str]] | None | str = "run"
                 ) -> FamilyResults:
    """Train and evaluate every network of ``family`` on every fold of ``prepared``
    (``study.prepare``'s result) at its scale (``run_fold`` for each); results are written under
    the run folder and returned. Finished (network, fold) runs are read back, not retrained (a
    workflow's per-fold jobs may have trained them); interrupted ones resume. ``weights``: the
    pretrained backbone weights (``run_fold``); ``"run"``: those of the run's study config
    (``study.yaml``'s ``weights``), none when it has none.
    """
    from cellstudy.learning import train

    sc = prepared.scale
    names = networks_for(family, sc)
    folds = folds_for(sc)
    if not names:
        raise ValueError(f"no network of {family!r} is selected by the scale's networks={sc.get('networks')}")
    if isinstance(weights, str):
        weights = rundir.Run(prepared.run_dir).config_weights()
    out = rundir.Run(prepared.run_dir).step(step)
    progress = train.print_progress if progress is None else progress
    records, preds, hist, fails, times = [], [], [], [], []
    total = len(names) * len(folds)
    done_runs, t0 = 0, time.perf_counter()
    for name in names:
        builder = fold_builder(name, sc, {**weights_params(name, weights), **((model_params or {}).get(name) or {})})
        for k in folds:
            res, cells = run_fold(prepared, name, k, builder, seed=seed, strategy=strategy,
                                  mixed_precision=mixed_precision, jit_compile=jit_compile,
                                  deterministic=deterministic, progress=progress, weights=weights)
            done_runs += 1
            elapsed = time.perf_counter() - t0
            echo(f"[{done_runs}/{total}] {name} fold {k}: {res.status}"
                 f"{' (read back)' if res.skipped else ''}; study step {step}: "
                 f"{_fmt_eta(elapsed)} elapsed, ~{_fmt_eta(elapsed / done_runs * (total - done_runs))} left")
            _collect_one(res, cells, name, k, records, preds, hist, fails, times)
    return _write(out, records, preds, hist, fails, times)


def _collect_one(res, cells: pd.DataFrame, name: str, k: int, records, preds, hist, fails, times) -> None:
    y = cells["label"].to_numpy()
    for regime, p in res.proba.items():
        m = metrics.fold_metrics(y, p)
        records.append({**m, "network": name, "fold": k, "regime": regime})
        preds.append(metrics.predictions_frame(cells["cell_id"].to_numpy(), cells["group"].to_numpy(), k, name,
                                               regime, y, p))
    h = res.history_frame()
    if len(h):
        hist.append(h.assign(network=name, fold=k))
    if res.failed:
        f = res.failure or {}
        fails.append({"network": name, "fold": k, "epoch": f.get("epoch"), "reason": f.get("reason")})
    t = res.timings or {}
    times.append({"network": name, "fold": k, "status": res.status,
                  "seconds_training": t.get("seconds_training"), "seconds_build": t.get("seconds_build"),
                  "seconds_first_epoch": t.get("seconds_first_epoch_this_session"),
                  "images_per_s": t.get("images_per_s_median"), "reused_model": t.get("reused_model"),
                  "resumed_from": res.resumed_from, "skipped": res.skipped})


def _write(out: Path, records, preds, hist, fails, times) -> FamilyResults:
    tidy = metrics.tidy_metrics(records, families=metrics.NETWORK_FAMILY) if records else pd.DataFrame(
        columns=["network", "family", "fold", "regime", "metric", "value"])
    if len(tidy):
        metrics.write_tables(tidy, out)
    pr = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    hi = pd.concat(hist, ignore_index=True) if hist else pd.DataFrame()
    fa = pd.DataFrame(fails, columns=["network", "fold", "epoch", "reason"])
    ti = pd.DataFrame(times)
    if len(pr):
        pr.to_csv(out / "predictions.csv", index=False)
        pr.to_parquet(out / "predictions.parquet", index=False)
    hi.to_csv(out / "history.csv", index=False)
    fa.to_csv(out / "failures.csv", index=False)
    ti.to_csv(out / "timings.csv", index=False)
    return FamilyResults(tidy=tidy, predictions=pr, history=hi, failures=fa, timings=ti)


def collect(run_dir: str | Path, out: str | Path | None = None) -> FamilyResults:
    """Every finished or failed (network, fold) of a run, read back from ``<run>/training``; with
    ``out`` the tables are written there too."""
    from cellstudy.learning import train

    run = rundir.Run(run_dir)
    records, preds, hist, fails, times = [], [], [], [], []
    for fd in run.all_folds():
        if not fd.is_finished():
            continue  # unfinished
        res = train.load_result(fd.path)
        cells = pd.read_csv(fd.test_cells, dtype={"cell_id": str, "group": str})
        _collect_one(res, cells, fd.network, fd.fold, records, preds, hist, fails, times)
    target = Path(out) if out is not None else run.root / "results"
    target.mkdir(parents=True, exist_ok=True)
    return _write(target, records, preds, hist, fails, times)
