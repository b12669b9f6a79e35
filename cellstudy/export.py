"""A trained network leaves the study as a bioimage.io model package (``cellstudy export``).

``export(run_dir, network, out_zip)`` packages ONE fold's model of a finished run (``fold``:
default the lowest finished fold, no selection on a test score; the package's documentation says
which) in the bioimage.io format 0.5 (read by ilastik, deepImageJ, QuPath and napari plugins):

- weights: Keras 3 (``keras_v3``, backend tensorflow), the fold's saved model with its
  whitening (3 x 3 ZCA or per stain, ``zca.json``; fitted on that fold's training cells) baked in as a first, frozen per-pixel layer
  (``zca_whitening``: a Dense 3 -> 3 with kernel ``W^T`` and bias ``-W m``, exactly
  ``ZCAWhitening.transform``), so the package takes the study's preprocessed image;
- input ``image``: (batch, y, x, channel) float32, S x S, channels R, G, B = the cohort's stains
  (third stain, F-actin, DNA), robust-scaled per cell and filtered as ``cellstudy.data.preprocess``
  does at the run's scale (not expressible as bioimage.io preprocessing: the documentation states
  it and ``cellstudy.data.preprocess.preprocess_batch`` does it);
- output ``probabilities``: (batch, channel) softmax over normal / abnormal;
- test input / output tensors: a test cell of that fold and the model's output on it; a sample
  image (PNG); a cover: the cell and its Grad-CAM (the study's layer choice);
- citations (the paper, the data), licence, the run's metrics in the documentation.

Networks that use cellstudy's own Keras layers (the RGB family's ``StackChannels``, ``UnstackChannels``, ``StackMaps``, the ViT's
``PositionEmbedding``) load only where ``cellstudy`` is imported first (Keras 3 stores no class
code); the documentation says so. Needs the optional dependencies ``pip install -e ".[export]"``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cellstudy import config, networks, rundir

#: The paper and the data, cited in every package.
PAPER = ("Mamalakis et al., A novel framework employing deep multi-attention channels network for the "
         "autonomous detection of metastasizing cells through fluorescence microscopy, arXiv:2309.00911",
         "10.48550/arXiv.2309.00911")
DATA_CITATIONS = {
    "bbbc021": [("Ljosa, Sokolnicki and Carpenter, Annotated high-throughput microscopy image sets for "
                 "validation, Nature Methods 9(7):637 (2012); image set BBBC021v1 of the Broad Bioimage "
                 "Benchmark Collection", "10.1038/nmeth.2083"),
                ("Caie et al., High-content phenotypic profiling of drug response signatures across distinct "
                 "cancer cells, Molecular Cancer Therapeutics 9(6):1913-1926 (2010)", "10.1158/1535-7163.MCT-09-1148")],
    "rxrx1": [("Sypetkowski et al., RxRx1: A Dataset for Evaluating Experimental Batch Correction Methods, "
               "CVPR Workshops 2023", "10.48550/arXiv.2301.05768")],
}
#: Networks whose saved models hold cellstudy's own layer classes.
CUSTOM_LAYER_NETWORKS = ("rgb", "rgb_res", "rgb_den", "vit")


class ExportError(ValueError):
    """The package cannot be made (no such network or fold in the run, the optional dependencies
    missing, an output that exists)."""


def whitened_model(model, zca_state: dict[str, Any]):
    """``model`` with the fold's ZCA whitening as a frozen first layer: input the preprocessed
    image (N, S, S, 3), the same output as ``model(ZCAWhitening.transform(x))``."""
    import keras

    W = np.asarray(zca_state["W"], np.float64)
    m = np.asarray(zca_state["mean"], np.float64)
    S = tuple(model.inputs[0].shape[1:3])
    inp = keras.Input((S[0], S[1], 3), name="image")
    dense = keras.layers.Dense(3, name="zca_whitening", trainable=False)
    x = dense(inp)
    dense.set_weights([W.T.astype(np.float32), (-(m @ W.T)).astype(np.float32)])
    return keras.Model(inp, model(x), name=f"{model.name}_with_whitening")


def _cover(image: np.ndarray, cam: np.ndarray, path: Path) -> None:
    """A 2:1 cover: the cell (RGB) and its Grad-CAM over it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.subplots(1, 2)
    rgb = np.clip(image, 0, 1)
    ax[0].imshow(rgb)
    ax[1].imshow(rgb.mean(axis=2), cmap="gray")
    ax[1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    for a, t in zip(ax, ("cell (R third stain, G F-actin, B DNA)", "Grad-CAM")):
        a.set_axis_off()
        a.set_title(t, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _metrics(run: rundir.Run, network: str, fold: int, regime: str) -> dict[str, Any]:
    """The fold's test AUC and the cross-validated AUC of the network (from its folds' stored
    test probabilities)."""
    from sklearn.metrics import roc_auc_score

    aucs = {}
    for fd in run.usable_folds(network, regime)[0]:
        y = np.load(fd.path / "y_test.npy")
        p = np.load(fd.proba(regime))[:, 1]
        if len(np.unique(y)) == 2:
            aucs[fd.fold] = float(roc_auc_score(y, p))
    return {"fold_auc": aucs.get(fold), "cv_auc_mean": float(np.mean(list(aucs.values()))) if aucs else None,
            "folds": sorted(aucs)}


def check_package(path: str | os.PathLike) -> Path:
    """``path`` as a Path; FileNotFoundError when there is nothing there (``cellstudy test-package``
    checks it before TensorFlow loads)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"package {p} does not exist; expected a .zip written by cellstudy export")
    return p


def test_package(path: str | os.PathLike):
    """bioimageio.core's ``test_model`` of a package (zip or rdf.yaml) with cellstudy's Keras layers
    registered (the ViT's and the RGB family's packages need them; ``bioimageio test`` in a fresh
    process cannot load those) and the TensorFlow Keras backend. Returns the validation summary
    (``.status``: "passed" or "failed"; ``.format()``). FileNotFoundError for a missing path."""
    p = check_package(path)
    os.environ["KERAS_BACKEND"] = "tensorflow"   # the packages are TensorFlow Keras; bioimageio.core's default is torch
    import cellstudy.learning.models  # noqa: F401  (registers the custom layers)
    import logging

    import keras
    from bioimageio.core import test_model

    # bioimageio's predict() calls draw Keras progress bars; without interactive logging Keras
    # sends them to absl's logger at INFO instead, which is held at WARNING for the test.
    interactive = keras.utils.is_interactive_logging_enabled()
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    keras.utils.disable_interactive_logging()
    absl_log.setLevel(logging.WARNING)
    try:
        return test_model(p)
    finally:
        absl_log.setLevel(level)
        if interactive:
            keras.utils.enable_interactive_logging()


def short_report(summary, source: str | os.PathLike = "") -> str:
    """bioimageio's validation summary (:func:`test_package`) in a few lines: the result, then one
    line per check (✔ passed, ✘ failed) with its errors in full and the first line of each
    warning (a "note" below logging's WARNING level, 30). ``summary.format()`` is the full report (conda environments, the tolerances)."""
    def where(loc) -> str:
        return ".".join(str(x) for x in loc) if loc else ""

    n = len(summary.details)
    lines = [f"bioimageio test of {source or summary.source_name}: {summary.status} ({n} check{'s' * (n != 1)}, "
             f"format {summary.type} {summary.format_version})"]
    for d in summary.details:
        lines.append(f"  {'✔' if d.status == 'passed' else '✘'} {d.name}")
        for e in d.errors:
            lines.append(f"      error {where(e.loc)}: {e.msg}")
        for w in d.warnings:
            first = str(w.msg).strip().splitlines()[0] if str(w.msg).strip() else ""
            kind = "note" if int(getattr(w, "severity", 30) or 30) < 30 else "warning"   # logging's levels
            lines.append(f"      {kind} {where(w.loc)}: {first}")
    return "\n".join(lines)


def export(run_dir: str | os.PathLike, network: str, out: str | os.PathLike, *, fold: int | None = None,
           regime: str = "long", license: str = "CC-BY-NC-SA-4.0", authors: tuple[str, ...] = ("cellstudy",),
           force: bool = False, test: bool = True, echo: Callable[[str], None] = print) -> Path:
    """Write the bioimage.io package (zip) of ``network``'s fold model of the run ``run_dir`` to
    ``out`` (see the module docstring); with ``test`` the package is checked with
    ``bioimageio.core.test_model`` (its test tensors reproduced) before it is kept. Returns ``out``."""
    try:
        from bioimageio.spec import save_bioimageio_package
        from bioimageio.spec.model import v0_5 as bio
    except ImportError:
        raise ExportError("cellstudy export needs the optional dependencies: .venv/bin/pip install -c "
                          "constraints.txt -e '.[export]' (bioimageio.core, bioimageio.spec)") from None
    import keras
    import tensorflow as tf

    from cellstudy import data, study
    from cellstudy.explain import xai
    from cellstudy.learning.models import load as load_model
    from cellstudy.predict import run_settings

    network = networks.resolve(network)   # an id or the paper's name: "MHL-Res" is mhl_res
    out = Path(out)
    if out.suffix != ".zip":
        raise ExportError(f"{out}: expected a .zip file name for the package")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; not overwritten (--force replaces it)")
    run = rundir.Run(run_dir)
    folds = [fd.fold for fd in run.usable_folds(network, regime)[0]]
    if not folds:
        trained = run.trained_networks(regime)
        raise ExportError(run.no_model_message(regime, network)
                          + (f"; networks with one: {trained}" if trained else ""))
    fold = folds[0] if fold is None else int(fold)
    if fold not in folds:
        raise ExportError(f"{network} fold {fold} is not a finished fold of {run.root}; finished: {folds}")
    st = run_settings(run.root)
    sc = st["values"]
    look = config.not_conclusive_note(st["scale"], sc)   # a scale for a look or for the tests
    if look:
        echo(f"export: warning: {look} The package says so in its README.")
    S = int(sc["image_size"])
    fd = run.fold(network, fold)
    prepared = study.prepare(st["cohort"], st["scale"], run.root, data_root=st["data_root"], seed=st["seed"],
                             overrides=st["overrides"], progress=False)
    stains = data.stains_of(data.load_manifest(st["cohort"])) or ("third stain", "F-actin", "DNA")
    zca = json.loads(fd.zca.read_text())
    model = whitened_model(load_model(fd.model(regime)), zca)
    # a test cell of this fold (its first), the model's output on it
    import pandas as pd
    test_ids = pd.read_csv(fd.test_cells, dtype={"cell_id": str})["cell_id"].tolist()
    idx = int(np.flatnonzero(np.asarray(prepared.cell_ids).astype(str) == test_ids[0])[0])
    x = prepared.images[idx:idx + 1].astype(np.float32)
    y = np.asarray(model.predict_on_batch(x), np.float32)
    stored = np.load(fd.proba(regime))[0:1]
    if not np.allclose(y, stored, atol=1e-4):
        raise ExportError(f"the packaged model gives {y[0]} on test cell {test_ids[0]}, the fold stored "
                          f"{stored[0]}: the whitening layer does not reproduce the fold's input")
    inner = load_model(fd.model(regime))
    from cellstudy.learning import augment
    xw = augment.ZCAWhitening.from_state(zca).transform(x)
    cam = xai.gradcam(inner, xw, np.array([int(y.argmax())]), min_size=int(sc.get("gradcam_min_size", 4)))[0]
    met = _metrics(run, network, fold, regime)
    kind = "bbbc021" if "bbbc021" in str(st["cohort"]) else "rxrx1" if "rxrx1" in str(st["cohort"]) else None
    with tempfile.TemporaryDirectory(prefix="cellstudy-export-") as tmp:
        d = Path(tmp)
        model.save(d / "model.keras")
        np.save(d / "test_input.npy", x)
        np.save(d / "test_output.npy", y)
        from PIL import Image
        Image.fromarray((np.clip(x[0], 0, 1) * 255).astype(np.uint8)).save(d / "sample_input.png")
        _cover(x[0], cam, d / "cover.png")
        disp = networks.DISPLAY[network]
        custom = network in CUSTOM_LAYER_NETWORKS
        n_splits = int(sc["n_splits"])
        # the fold's own record of its whitening (zca.json, what the layer bakes in); runs made
        # before the per-stain mode have no "mode": theirs was the ZCA
        whitening_words = ("a 3 x 3 ZCA of the three stains" if zca.get("mode", "zca") == "zca"
                           else "each stain whitened on its own")
        doc = "\n".join([
            f"# {disp}: normal vs abnormal cells from three stains (cellstudy)", "",
            f"A {disp} network ({networks.SPECS[network].description}) trained by cellstudy, a re-creation of "
            f"Mamalakis et al. (arXiv:2309.00911), on the cohort `{Path(str(st['cohort'])).stem}` at "
            f"S = {S} (scale `{st['scale']}`, seed {st['seed']}), regime `{regime}`.", "",
            *([f"**Not for use on cells.** {look} This package is a smoke test of the export, not a "
               "model to apply.", ""] if look else []),
            f"**Which model.** The model of fold {fold} of the run's grouped {n_splits}-fold cross-validation "
            "(the lowest finished fold unless chosen: no selection on a test score), with that fold's whitening "
            f"({whitening_words}, fitted on its training cells) as its first, frozen layer `zca_whitening`.", "",
            "**Metrics of the run.** "
            + (f"Test AUC of this fold: {met['fold_auc']:.3f}. " if met["fold_auc"] is not None else "")
            + (f"Cross-validated AUC (mean over folds {met['folds']}): {met['cv_auc_mean']:.3f}."
               if met["cv_auc_mean"] is not None else ""), "",
            "**Input.** One cell per image, S x S x 3, float32, channels R, G, B = "
            f"{', '.join(stains)}: each channel robust-scaled per cell (percentiles 1 and 99.8 to [0, 1]), "
            "then filtered and resampled to S as `cellstudy.data.preprocess.preprocess_batch` does "
            "(binomial blur, Landweber deconvolution, anisotropic diffusion; parameters in the run's "
            "scale.json). bioimage.io preprocessing cannot express these steps: run them with cellstudy.",
            "",
            "**Output.** Softmax probabilities over (normal, abnormal).", "",
            ("**Loading.** This network uses cellstudy's own Keras layers: `import cellstudy.learning.models` "
             "before loading the weights (Keras 3 stores no class code)." if custom else
             "**Loading.** Standard Keras 3 layers only."),
            ("With bioimageio.core set `KERAS_BACKEND=tensorflow` (its default is torch). Test this package "
             "with `cellstudy test-package <package>.zip` (bioimageio's test with cellstudy's layers loaded; "
             "`bioimageio test` alone cannot load them)." if custom else
             "With bioimageio.core set `KERAS_BACKEND=tensorflow` (its default is torch): "
             "`KERAS_BACKEND=tensorflow bioimageio test <package>.zip`."), "",
            "## Validation", "",
            f"Grouped {n_splits}-fold cross-validation by source field (cells of one field never on both sides); the "
            "test fold of this model was never used to fit it, its whitening or its checkpoint. The metrics "
            "above are on those test folds. The run's book has the per-network tables, the classical "
            "baseline on the same folds and the explanations.", "",
            ("Cite the paper and the data below." if DATA_CITATIONS.get(kind) else
             "Cite the paper below, and the source of the cells the run was trained on."), ""])
        (d / "README.md").write_text(doc)
        cites = [bio.CiteEntry(text=PAPER[0], doi=bio.Doi(PAPER[1]))]
        cites += [bio.CiteEntry(text=t, doi=bio.Doi(doi)) for t, doi in DATA_CITATIONS.get(kind, [])]
        channel_ids = [bio.Identifier(s.lower().replace(" ", "_").replace("-", "_")) for s in stains]
        inp = bio.InputTensorDescr(
            id=bio.TensorId("image"),
            axes=[bio.BatchAxis(), bio.SpaceInputAxis(id=bio.AxisId("y"), size=S),
                  bio.SpaceInputAxis(id=bio.AxisId("x"), size=S), bio.ChannelAxis(channel_names=channel_ids)],
            test_tensor=bio.FileDescr(source=d / "test_input.npy"),
            sample_tensor=bio.FileDescr(source=d / "sample_input.png"),
            description="one preprocessed cell, R G B = " + ", ".join(stains))
        outp = bio.OutputTensorDescr(
            id=bio.TensorId("probabilities"),
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in config.CLASS_NAMES])],
            test_tensor=bio.FileDescr(source=d / "test_output.npy"),
            description="softmax probabilities of the normal and abnormal roles")
        descr = bio.ModelDescr(
            name=f"cellstudy {disp} fold {fold}",
            description=f"{disp} telling normal from abnormal cells from three stains (cellstudy run "
                        f"{run.root.name}, fold {fold})",
            authors=[bio.Author(name=a) for a in authors],
            cite=cites, license=bio.LicenseId(license),
            documentation=bio.FileDescr(source=d / "README.md"), covers=[bio.FileDescr(source=d / "cover.png")],
            tags=["cellstudy", "fluorescence-light-microscopy", "classification", "2d", "cells", "keras"],
            inputs=[inp], outputs=[outp],
            weights=bio.WeightsDescr(keras_v3=bio.KerasV3WeightsDescr(
                source=d / "model.keras", keras_version=keras.__version__,
                backend=("tensorflow", tf.__version__))),
        )
        tmp_zip = d / "package.zip"
        save_bioimageio_package(descr, output_path=tmp_zip)
        if test:
            summary = test_package(tmp_zip)
            if summary.status != "passed":
                raise ExportError(f"the package of {network} fold {fold} failed bioimageio's test:\n"
                                  + summary.format())
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_zip, out)
    echo(f"export: {out} ({disp}, fold {fold}, regime {regime}"
         + (f", fold AUC {met['fold_auc']:.3f}" if met["fold_auc"] is not None else "") + ")")
    return out
