"""Backbone pre-training (the paper pre-trains the RGB / MHL backbones for 100 epochs before
training the networks): ``cellstudy pretrain`` trains one backbone with a small classification
head on the cells of a *pre-training cohort* and writes the backbone's weights file, which a study
config then names (``weights: {cnn3: {path, sha256}}``).

The rule that keeps it from leaking: the weights serve every fold of the study's cohort, so no cell
of the served cohort may be in the pre-training -- not its test folds only, none of its cells, and
no cell of a source field (group) that any of its cells come from (:func:`pretraining_cells`).
With ``bbbc021-full`` as the pre-training cohort and ``bbbc021-paper`` as the served one, the
pre-training uses the BBBC021 fields the paper-sized cohort does not (``bbbc021-unseen``'s fields
are among them: a package trained so would no longer be tested on unseen fields; say so when you
report them).

The model: the backbone on the (S, S, 3) preprocessed image (ZCA-whitened on the pre-training
cells), global average pooling, Dense 2 softmax; SGD with the scale's rate, momentum, warm-up
and batch size, the scale's augmentation (one shifted / rotated copy per cell). The weights file
holds the bare backbone (``backbones.standalone``), what ``models.build(..., weights=path)``
loads (the RGB family sums its first kernel over the three input channels).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cellstudy import atomic, config, seeds


class PretrainError(ValueError):
    """The pre-training cannot run as asked (overlap with the served cohort, too few cells, a
    backbone without pre-training, an existing output)."""


def pretraining_cells(pre_table, served_table) -> np.ndarray:
    """Boolean mask over the rows of the pre-training manifest ``pre_table``: the cells that may
    be used, i.e. not a cell of ``served_table`` (same ``cell_id``, same file path or a file with
    the same sha256: also under another data root or name) and not from a source field
    (``group``) of it. PretrainError when fewer than two classes remain."""
    served_groups = set(served_table["group"].astype(str))
    served_ids = set(served_table["cell_id"].astype(str))
    served_paths = set(served_table["path"].astype(str))
    served_files = {h for v in served_table["sha256"].astype(str) for h in v.split(";")}
    same_file = pre_table["sha256"].astype(str).map(lambda v: any(h in served_files for h in v.split(";")))
    keep = (~pre_table["group"].astype(str).isin(served_groups)
            & ~pre_table["cell_id"].astype(str).isin(served_ids)
            & ~pre_table["path"].astype(str).isin(served_paths) & ~same_file).to_numpy()
    labels = set(pre_table.loc[keep, "label"].astype(int))
    if labels != {0, 1}:
        raise PretrainError(f"after leaving out every field of the served cohort, {int(keep.sum())} cells of "
                            f"class(es) {sorted(labels)} remain; pre-training needs both classes")
    return keep


def epoch_echo(label: str, epochs: int, n_images: int, echo: Callable[[str], None]):
    """A Keras callback that says, after each epoch, ``<label>: epoch e/E, training accuracy a,
    r images/s, ETA m:ss`` through ``echo`` (the pre-training's progress: its ``fit`` runs
    silently). ETA: the mean epoch time so far times the epochs left."""
    import keras

    from cellstudy.learning.train import _fmt_s

    class EpochEcho(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.t_epoch = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now, e = time.perf_counter(), int(epoch) + 1
            acc = float((logs or {}).get("accuracy", float("nan")))
            echo(f"{label}: epoch {e}/{epochs}, training accuracy {acc:.3f}, "
                 f"{n_images / max(now - self.t_epoch, 1e-9):.1f} images/s, "
                 f"ETA {_fmt_s((now - self.t0) / e * (epochs - e))}")
    return EpochEcho()


def _whitening(scale: dict[str, Any], backbone: str, family: str | None) -> str:
    """The whitening mode of the pre-training input (see :func:`pretrain_backbone`); PretrainError
    for a family that has no network on ``backbone``."""
    if family is None:
        return config.whitening_for(scale)
    from cellstudy import networks
    fams = sorted({networks.family(n) for n in networks.networks_on(backbone)})
    if family not in fams:
        raise PretrainError(f"family {family!r} has no network on backbone {backbone!r}; expected one of {fams}")
    return config.family_whitening(scale, family)


def check_output(out: str | os.PathLike, force: bool = False) -> Path:
    """``out`` as a Path; PretrainError when it is not a ``.weights.h5`` name or exists without
    ``force`` (``cellstudy pretrain`` checks it before TensorFlow loads)."""
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise PretrainError(f"{out}: the weights file name must end in .weights.h5")
    if out.exists() and not force:
        raise PretrainError(f"{out} exists; not overwritten (--force replaces it)")
    return out


def pretrain_backbone(backbone: str, cohort: str, serves: str, out: str | os.PathLike, *, scale: str = "cpu",
                      overrides: dict[str, Any] | None = None, epochs: int | None = None, seed: int = 0,
                      data_root: str | None = None, max_cells: int | None = None, force: bool = False,
                      family: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Pre-train ``backbone`` on ``cohort`` minus every field of ``serves`` (the cohort the weights
    will start networks of) at ``scale``; write the backbone's weights to ``out`` (``.weights.h5``)
    and ``out`` + ``.json`` (what was done: cohorts, cells, fields, epochs, final training
    accuracy, the sha256 to put in the study config). ``epochs``: default the scale's
    ``epochs_long``. ``max_cells``: a seeded, class-balanced subsample (tests). ``family``: the
    network family the weights are for; the input is whitened as the scale whitens that family's
    (``config.family_whitening``: e.g. each stain on its own for RGB at the default scale). None:
    the scale's one mode, or ZCA when the scale names a mode per family (the backbone may serve
    families whitened differently). Returns the record."""
    import keras

    from cellstudy import data
    from cellstudy.data import preprocess
    from cellstudy.learning import augment
    from cellstudy.learning.models import backbones as bbs

    if backbone not in bbs.BACKBONES:
        raise PretrainError(f"unknown backbone {backbone!r}; expected one of {list(bbs.BACKBONES)}")
    out = check_output(out, force)
    sc = config.get_scale(scale, overrides)
    whitening = _whitening(sc, backbone, family)
    S = int(sc["image_size"])
    epochs = int(epochs if epochs is not None else sc["epochs_long"])
    if epochs < 1:
        raise PretrainError(f"epochs={epochs}; expected >= 1")
    pre_table, served = data.load_manifest(cohort), data.load_manifest(serves)
    keep = pretraining_cells(pre_table, served)
    idx = np.flatnonzero(keep)
    if max_cells is not None and len(idx) > max_cells:
        rng = seeds.rng(seed, "pretrain", 0)
        lab = pre_table["label"].astype(int).to_numpy()[idx]
        per = max(1, int(max_cells) // 2)
        idx = np.sort(np.concatenate([rng.choice(idx[lab == c], size=min(per, int((lab == c).sum())), replace=False)
                                      for c in (0, 1)]))
    sub = pre_table.iloc[idx].reset_index(drop=True)
    with_path = Path(out).with_suffix("").with_suffix(".cells.csv")
    tmp_manifest = with_path.parent / f".{with_path.name}"
    tmp_manifest.parent.mkdir(parents=True, exist_ok=True)
    sub.to_csv(tmp_manifest, index=False)
    try:
        coh = data.load_cohort(str(tmp_manifest), root=data_root)
    finally:
        tmp_manifest.unlink(missing_ok=True)
    t0 = time.perf_counter()
    echo(f"pretrain {backbone}: {len(coh)} cells of {cohort} ({sub['group'].nunique()} fields; every field of "
         f"{serves} left out), S = {S}, {epochs} epoch(s), whitening {whitening}"
         + (f" (family {family})" if family else ""))
    x = preprocess.preprocess_batch(coh.images, list(coh.sha256), S, sc["preprocess"], progress=False)
    copies = augment.augment_copy(x, config.max_shift_px(sc), sc["max_rotation_deg"],
                                  seeds.int_seed(seed, "pretrain", 1))
    xt = np.concatenate([x, copies])
    yt = np.concatenate([coh.labels, coh.labels])
    zca = augment.ZCAWhitening(mode=whitening).fit(xt)
    xt = zca.transform(xt)
    keras.utils.set_random_seed(seeds.int_seed(seed, "pretrain", 2))
    inp = keras.Input((S, S, 3))
    bb = bbs.standalone(backbone, (S, S, 3))
    h = keras.layers.GlobalAveragePooling2D()(bb(inp))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))
    steps = int(np.ceil(len(xt) / int(sc["batch_size"])))
    from cellstudy.learning.train import decay_steps_for, learning_rate_schedule
    warm = int(sc.get("warmup_epochs", 0) or 0)
    lr = learning_rate_schedule(float(sc["learning_rate"]), warm * steps,
                                decay_steps_for(sc.get("lr_decay", "none"), epochs, warm, steps))
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=float(sc["momentum"])),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    hist = model.fit(xt, yt, batch_size=int(sc["batch_size"]), epochs=epochs, shuffle=True, verbose=0,
                     callbacks=[epoch_echo(f"pretrain {backbone}", epochs, len(xt), echo)])
    acc = [float(a) for a in hist.history["accuracy"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    bb.save_weights(out)
    from cellstudy.data import sha256_file
    rec = {"backbone": backbone, "weights": str(out.resolve()), "sha256": sha256_file(out),
           "pretraining_cohort": cohort, "serves": serves, "n_cells": int(len(coh)),
           "n_fields": int(sub["group"].nunique()), "fields_used": sorted(set(sub["group"].astype(str))),
           "files_used_sha256": sorted({h for v in sub["sha256"].astype(str) for h in v.split(";")}),
           "fields_left_out": sorted(set(served["group"].astype(str))
                                                                           & set(pre_table["group"].astype(str))),
           "rule": "no cell and no source field of the served cohort is used", "scale": scale,
           "image_size": S, "epochs": epochs, "family": family, "whitening": whitening,
           "learning_rate": float(sc["learning_rate"]), "warmup_epochs": warm,
           "lr_decay": sc.get("lr_decay", "none"),
           "train_accuracy_by_epoch": acc, "seed": int(seed),
           "seconds": round(time.perf_counter() - t0, 1)}
    atomic.write_text(Path(str(out) + ".json"), json.dumps(rec, indent=1))
    echo(f"pretrain {backbone}: wrote {out} (training accuracy {acc[-1]:.2f} after {epochs} epoch(s), "
         f"{rec['seconds']:.0f} s); in the study config:\n"
         f"weights:\n  {backbone}: {{path: {out.resolve()}, sha256: {rec['sha256']}}}")
    return rec
