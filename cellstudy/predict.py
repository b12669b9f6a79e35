"""Apply a finished run's models to new cells: ``cellstudy predict RUN_DIR INPUT -o OUT``.

For one network of a run (default: the run's best network by long-regime AUC) every trained fold
model predicts the new cells, each with its own fold's whitening (``zca.json``), after the run's
own preprocessing at the run's scale (``scale.json``). Per cell:

* ``p_abnormal``: the fold ensemble (mean over the fold models) of the abnormal-class probability,
  and ``fold_sd``, its spread across the folds;
* Monte Carlo dropout (``mc_samples`` = T stochastic passes of every fold model through the
  head's two dropouts, the backbone run once; Gal & Ghahramani 2016): ``mc_mean``, ``mc_sd``;
* ``margin_uncertainty`` = 1 - (p_max - p_second) of the ensemble (0: certain, 1: a coin toss);
* QC flags: a near-empty stain (raw intensity range below a tenth of the run's cohort's median for
  that stain) or a saturated one, a nucleus far smaller or larger than the training cells'
  (outside the 1st-99th percentile of the run's cohort, DNA mask of ``learning.baseline``);
* ``in_run_cohort``: the cell is one of the run's own cells (same pixels), which all fold models
  but one were trained on: its prediction tests nothing;
* CellProfiler-style columns ``Classifier_Class`` and ``Classifier_Probability_<class>`` beside
  the manifest's identifiers (and ``ImageNumber`` / ``ObjectNumber`` when the manifest has them),
  so the table joins a CellProfiler per-object export.

With ``classical=True`` the run's classical baseline (random forest, logistic regression) adds
its fold-ensemble probability per cell. Written to ``OUT/``: ``predictions.csv`` and
``.parquet`` (one row per cell), ``gallery_confident_<class>.png``, ``gallery_uncertain.png`` (the
cells), the same with ``_gradcam`` (Grad-CAM of the ensemble's call at the scale's Grad-CAM
layers, eq. 12-13, averaged over the fold models, on the preprocessed cell) and ``prediction.json``
(what was run, on what, the QC thresholds).

Refused before any model is loaded: an unknown network, a network the run has not trained, a
run folder without trained folds, input cells whose stored pixel size differs from the run's
cohort's (the classical features and the preprocessing assume it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cellstudy import atomic, config, networks, rundir, seeds

#: QC: a stain is near-empty in a cell when its raw intensity range (the robust scaling's
#: 99.8th - 1st percentile) is below this fraction of the median range of that stain in the run's
#: cohort (robust scaling stretches any channel, noise included, to [0, 1]: the range is where an
#: empty channel shows).
EMPTY_RANGE_FRACTION = 0.1
#: QC: a channel with more than this fraction of its pixels at its maximum is saturated (robust
#: scaling clips 0.2 % of pixels to 1 by construction).
SATURATED_FRACTION = 0.05
#: QC: nucleus areas outside these percentiles of the run's cohort are flagged.
SIZE_PERCENTILES = (1.0, 99.0)
#: A call is *confident* when the ensemble's probability of the called class is at least this: a
#: "most confident" gallery whose cells all fall short says so in its title and in the notes.
CONFIDENT_P = 0.75


class PredictError(ValueError):
    """The run or the input cannot be used for prediction; the message names what and why."""


@dataclass
class Prediction:
    """What :func:`predict` returns. ``table``: one row per cell (see the module docstring);
    ``fold_probas``: fold -> (N, 2) probabilities of that fold's model; ``mc``: (folds x T, N)
    abnormal-class probabilities of the Monte Carlo passes; ``info``: what was run."""

    table: pd.DataFrame
    fold_probas: dict[int, np.ndarray]
    mc: np.ndarray | None
    info: dict[str, Any]
    images: np.ndarray = field(repr=False, default=None)
    #: gallery name -> row indices (:func:`gallery_cells`); cell row -> its (S, S) Grad-CAM of the
    #: ensemble's class (mean over the fold models) and its preprocessed (S, S, 3) input
    gallery: dict[str, np.ndarray] = field(default_factory=dict)
    gradcam: dict[int, np.ndarray] = field(repr=False, default_factory=dict)
    inputs: dict[int, np.ndarray] = field(repr=False, default_factory=dict)


def run_settings(run_dir: str | Path) -> dict[str, Any]:
    """The cohort, scale name, overrides, seed and data root a run was made with (``study.yaml``
    written by the runner; else ``scale.json`` and the run's one folds file), and its resolved
    scale. PredictError naming the folder when it is not a run."""
    import yaml

    run = rundir.Run(run_dir)
    if not run.root.is_dir():
        raise PredictError(rundir.missing_run_folder(run.root))
    if not run.training.is_dir():
        raise PredictError(f"{run.root} has no training/ folder; expected a run folder with trained models"
                           + rundir.runs_inside_hint(run.root))
    cfg = yaml.safe_load(run.study_config.read_text()) if run.study_config.is_file() else {}
    rec = rundir.read_scale_file(run.scale_file) if run.scale_file.is_file() else None
    scale = cfg.get("scale") or (rec or {}).get("name")
    overrides = cfg.get("overrides") if "overrides" in cfg else (rec or {}).get("overrides", {})
    cohort = cfg.get("cohort")
    if cohort is None:
        files = sorted((run.root / "folds").glob("*.csv")) if (run.root / "folds").is_dir() else []
        cohort = files[0].stem if len(files) == 1 else None
    if scale is None or cohort is None:
        raise PredictError(f"{run.root}: cannot tell the run's scale and cohort (no study.yaml, scale.json "
                           "or single folds file)")
    values = rec["values"] if rec is not None else config.get_scale(scale, overrides)
    return {"cohort": cohort, "scale": scale, "overrides": overrides or {}, "seed": int(cfg.get("seed", 0)),
            "data_root": cfg.get("data_root"), "values": values}


def best_network_why(run_dir: str | Path, trained: Sequence[str]) -> tuple[str, str]:
    """The run's best trained network by long-regime AUC (``07_results/verdicts_long.csv``), else
    the first trained one in the catalogue's order; and why, in words: "the run's best by
    long-regime AUC macro (fold mean 0.918)", or "the first trained network ..."."""
    v = rundir.Run(run_dir).step("07_results", create=False) / "verdicts_long.csv"
    if v.is_file():
        t = pd.read_csv(v)
        t = t[t["network"].isin(trained)]
        if len(t):
            from cellstudy.learning.metrics import rank_models
            row = rank_models(t).iloc[0]   # the results chapter's and the findings' rule
            return str(row["network"]), f"the run's best by long-regime AUC macro (fold mean {float(row['mean']):.3f})"
    return (networks.ordered(trained)[0], "the first trained network in the catalogue's order (the run has "
            "no results chapter to rank them: 07_results/verdicts_long.csv)")


def labelled_metrics(labels: np.ndarray, proba: np.ndarray, own: np.ndarray, groups: np.ndarray,
                     names: dict[int, str] | None = None, run_names: dict[int, str] | None = None
                     ) -> tuple[dict[str, Any] | None, str]:
    """For new cells with known classes: ``(metrics, why)``. ``labels`` (N,) 0 / 1, -1 where
    unknown; ``proba`` (N, 2) the ensemble's probabilities; ``own`` (N,) bool, the run's own cells
    (their calls test nothing); ``groups`` (N,) their fields. Scored on the labelled cells that are
    not the run's own, with ``report.external.score`` (AUC with a field-bootstrap 95% CI, balanced
    accuracy of the ensemble's call): ``n_cells, n_normal, n_abnormal, n_run_cells_left_out,
    n_unlabelled_left_out``, and for the more and the less uncertain half of the cells (by rank of
    the margin uncertainty: the n // 2 most uncertain, and the rest) ``n_<half>``, ``wrong_<half>``
    (wrong calls) and ``accuracy_<half>``, ``<half>`` = ``uncertain_half`` / ``certain_half``. None with the reason when fewer than one cell of each
    class is left, or when the cells' class names (``names``, from their manifest) differ from the
    run's (``run_names``): label 1 would then not be the run's abnormal class."""
    y = np.asarray(labels).astype(int)
    own = np.asarray(own, dtype=bool)
    if names and run_names and names != run_names:
        return None, (f"not scored against their classes: the cells' classes are normal = {names[0]!r}, "
                      f"abnormal = {names[1]!r}, the run's normal = {run_names[0]!r}, abnormal = "
                      f"{run_names[1]!r} (build their manifest with the run's --normal / --abnormal)")
    keep = ~own & (y >= 0)
    if len(np.unique(y[keep])) < 2:
        return None, ("" if not (y >= 0).any() else
                      "not scored against their classes: fewer than one labelled cell of each class that "
                      "is not one of the run's own")
    from cellstudy.report import external

    m, _ = external.score(y[keep], np.asarray(proba, dtype=float)[keep], np.asarray(groups)[keep])
    yk = y[keep]
    m.update(n_normal=int((yk == 0).sum()), n_abnormal=int((yk == 1).sum()),
             n_run_cells_left_out=int((own & (y >= 0)).sum()), n_unlabelled_left_out=int((y < 0).sum()))
    # is the uncertainty worth reading? the calls in the more and the less uncertain half, split by
    # rank (the n // 2 most uncertain cells; ties at the split divided by the cells' order)
    pk = np.asarray(proba, dtype=float)[keep]
    mu = margin_uncertainty(pk)
    right = pk.argmax(axis=1) == yk
    upper = np.zeros(len(mu), bool)
    upper[np.argsort(-mu, kind="stable")[: len(mu) // 2]] = True
    for name, part in (("uncertain_half", upper), ("certain_half", ~upper)):
        m[f"n_{name}"] = int(part.sum())
        m[f"wrong_{name}"] = int((~right[part]).sum())
        m[f"accuracy_{name}"] = float(right[part].mean()) if part.any() else None
    return m, ""


def qc_flags(images: np.ndarray, raw_range: np.ndarray, ref_range: np.ndarray, nucleus_area: np.ndarray,
             area_range: tuple[float, float]) -> pd.DataFrame:
    """QC of robust-scaled cells ``images`` (N, H, W, 3) in [0, 1] with their raw per-channel
    intensity ranges ``raw_range`` (N, 3) (the robust scaling's hi - lo, raw units): per stain
    ``qc_empty_<stain>`` (range below :data:`EMPTY_RANGE_FRACTION` x the median of ``ref_range``
    (M, 3), the run's cohort's ranges) and ``qc_saturated_<stain>`` (more than
    :data:`SATURATED_FRACTION` of the pixels at the channel's maximum, which is not 0);
    ``qc_size`` (nucleus area in stored pixels outside ``area_range``); ``qc_ok`` (no flag)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images: expected (N, H, W, 3), got {x.shape}")
    rr, ref = np.asarray(raw_range, dtype=float), np.asarray(ref_range, dtype=float)
    if rr.shape != (len(x), 3) or ref.ndim != 2 or ref.shape[1] != 3:
        raise ValueError(f"raw_range (N, 3) and ref_range (M, 3) expected, got {rr.shape} and {ref.shape}")
    floor = EMPTY_RANGE_FRACTION * np.median(ref, axis=0)
    flat = x.reshape(len(x), -1, 3)
    out = {}
    mx = flat.max(axis=1)
    at_max = (flat >= mx[:, None, :] - 1e-6).mean(axis=1)
    for c, stain in enumerate(config.CHANNELS):
        out[f"qc_empty_{stain}"] = rr[:, c] < floor[c]
        out[f"qc_saturated_{stain}"] = (mx[:, c] > 0) & (at_max[:, c] > SATURATED_FRACTION)
    a = np.asarray(nucleus_area, dtype=float)
    out["qc_size"] = (a < area_range[0]) | (a > area_range[1]) | ~np.isfinite(a)
    df = pd.DataFrame(out)
    df["qc_ok"] = ~df.any(axis=1)
    return df


def margin_uncertainty(proba: np.ndarray) -> np.ndarray:
    """1 - (p_max - p_second) per row of ``proba`` (N, K): 0 when one class has all the
    probability, 1 when the two most likely classes tie."""
    p = np.sort(np.asarray(proba, dtype=float), axis=1)
    return 1.0 - (p[:, -1] - p[:, -2])


def head_layers(model) -> list[tuple[Any, Any]]:
    """The classification head's ``(head_dense<i>, head_dropout<i> or None)`` pairs in order, then
    ``("logits", None)`` and ``("probs", None)`` (cellstudy.learning.models.head: any number of
    dense layers; a dropout of 0 adds no Dropout layer). PredictError when the model has no such head."""
    names = {layer.name: layer for layer in model.layers}
    dense = sorted((n for n in names if n.startswith("head_dense") and n[10:].isdigit()), key=lambda n: int(n[10:]))
    if not dense or "logits" not in names or "probs" not in names:
        raise PredictError(f"model {model.name!r} has no cellstudy head (head_dense<i>, logits, probs): Monte Carlo "
                           "dropout needs one")
    pairs = [(names[d], names.get("head_dropout" + d[10:])) for d in dense]
    return pairs + [(names["logits"], None), (names["probs"], None)]


def mc_dropout(model, x: np.ndarray, samples: int, seed: int, batch_size: int = 64,
               dropout: bool = True, fold: int = 0) -> np.ndarray:
    """Monte Carlo dropout through the classification head: ``samples`` stochastic passes,
    (samples, N, n_classes) float64. The network up to the head's first dense layer runs once (test mode:
    BatchNorm uses its moving statistics); the head's dense layers then run ``samples`` times with
    its dropouts active (``dropout=False``: inactive, each pass equals the plain forward pass). The
    masks come from the stream ``seeds.rng(seed, "mc_dropout", fold)``."""
    import keras

    if isinstance(samples, bool) or int(samples) < 1:
        raise ValueError(f"samples={samples!r}; expected an int >= 1")
    head = head_layers(model)
    feats_model = keras.Model(model.inputs, head[0][0].input)   # what the head's first dense layer sees
    feats = np.concatenate([np.asarray(feats_model.predict_on_batch(x[i:i + batch_size]))
                            for i in range(0, len(x), batch_size)]) if len(x) else np.zeros((0, 1))
    rng = seeds.rng(seed, "mc_dropout", fold)

    def drop(h, layer):
        # inverted dropout as keras.layers.Dropout trains (keep with probability 1 - rate, scale by
        # 1 / (1 - rate)), drawn from the seeded stream so that a prediction repeats exactly
        h = np.asarray(h)
        if layer is None or not dropout or float(layer.rate) == 0.0:
            return h
        keep = rng.random(h.shape) >= float(layer.rate)
        return (h * keep / (1.0 - float(layer.rate))).astype(h.dtype)

    out = []
    for _ in range(int(samples)):
        h = feats
        for layer, dropout_layer in head:
            h = drop(layer(h), dropout_layer)
        out.append(np.asarray(h, dtype=np.float64))
    return np.stack(out)


def predict(run_dir: str | Path, cells: str | Path, network: str | None = None, regime: str = "long",
            mc_samples: int = 20, classical: bool = False, data_root: str | Path | None = None,
            out_dir: str | Path | None = None, batch_size: int = 64, n_gallery: int = 8,
            gradcam: bool = True, overwrite: bool = False, ignore_stains: bool = False,
            echo: Callable[[str], None] = print) -> Prediction:
    """Predict cohort or manifest ``cells`` with ``network`` of the run ``run_dir`` (see the
    module docstring); with ``out_dir`` the table, galleries and ``prediction.json`` are written
    there (a folder that must not hold a ``predictions.csv`` already, unless ``overwrite``: the
    prediction chapter rewrites its own step folder). The cells need no labels (an unlabelled
    manifest, ``cellstudy manifest --unlabelled``). When both manifests name their stains (column
    ``stains``, R, G, B) and they differ, PredictError unless ``ignore_stains``. Returns a
    :class:`Prediction`."""
    from cellstudy import data
    from cellstudy.data import preprocess
    from cellstudy.report import external

    t0 = time.perf_counter()
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, (int, np.integer)) or mc_samples < 0:
        raise PredictError(f"mc_samples={mc_samples!r}; expected an int >= 0 (0: no Monte Carlo dropout)")
    run = rundir.Run(run_dir)
    st = run_settings(run_dir)
    trained = run.trained_networks(regime, need_test_cells=False)
    if not trained:
        raise PredictError(run.no_model_message(regime, networks.resolve(network) if network else None))
    why = "chosen with --network"
    if network is None:
        network, why = best_network_why(run_dir, trained)
    network = networks.resolve(network)   # an id or the paper's name: "MHL-Res" is mhl_res
    if network not in trained:
        if network in run.models_deleted(regime):
            raise PredictError(run.no_model_message(regime, network) + f"; networks with their models: {trained}")
        raise PredictError(f"network {network!r} has no trained fold with model_{regime}.keras in {run.training}; "
                           f"trained: {trained}")
    folds = run.usable_folds(network, regime, need_test_cells=False)[0]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / "predictions.csv").exists() and not overwrite:
        raise PredictError(f"{out / 'predictions.csv'} exists; choose another output folder (nothing is overwritten; "
                           "--force replaces it)")
    sc = st["values"]
    S = int(sc["image_size"])
    # the new cells from data_root (their manifest's paths are relative to it); the run's cohort,
    # for the QC references and the overlap check, from the run's own data root
    new_stains = data.stains_of(data.load_manifest(str(cells)))
    ref_stains = data.stains_of(data.load_manifest(st["cohort"]))
    if new_stains and ref_stains and [x.lower() for x in new_stains] != [x.lower() for x in ref_stains] \
            and not ignore_stains:
        raise PredictError(
            f"the cells of {cells} are stained R, G, B = {', '.join(new_stains)}; the run's cohort "
            f"{st['cohort']!r} was R, G, B = {', '.join(ref_stains)}: the models read each colour as the "
            "stain they were trained on. Map your channels to the run's order (cellstudy manifest "
            "--channels), or pass --ignore-stains to predict anyway (a stand-in stain, as this study's "
            "tubulin for vimentin)")
    from cellstudy.data import cohorts
    if data_root is not None:
        root, whence = data_root, "--data-root"
    elif str(cells) in cohorts.COHORTS and st["cohort"] not in cohorts.COHORTS:
        # a shipped cohort (bbbc021-unseen) for a run of your own cells: the shipped data's root
        root, whence = str(config.data_root(None)), "the shipped cohorts' data root"
    else:
        root, whence = str(config.data_root(st["data_root"])), "the run's data root"
    try:
        coh = data.load_cohort(str(cells), root=root, labelled=False)
    except data.MissingFileError as e:
        raise PredictError(f"{e}\nThe paths of {cells} are read relative to {root} ({whence}); pass "
                           "--data-root FOLDER, the folder they are relative to") from None
    ref = data.load_cohort(st["cohort"], root=st["data_root"])
    if coh.images.shape[1:3] != ref.images.shape[1:3]:
        raise PredictError(f"the cells of {cells} are stored at {coh.images.shape[1]} x {coh.images.shape[2]} px, "
                           f"the run's cohort {st['cohort']!r} at {ref.images.shape[1]} x {ref.images.shape[2]}: "
                           "crop them at the run's pixel size (the preprocessing and the classical features assume it)")
    echo(f"predict: {len(coh)} cells of {cells} with {network} ({why}; {len(folds)} fold model(s), "
         f"regime {regime}, S = {S})")
    images = preprocess.preprocess_batch(coh.images, list(coh.sha256), S, sc["preprocess"], progress=False)
    notes: list[dict] = []
    used, probas = external._network_probas(network, [(fd.fold, fd.path) for fd in folds], regime, images,
                                            batch_size, notes, lambda s: echo(s.replace("external:", "predict:")))
    if not used:
        raise PredictError(f"no fold model of {network} could predict: {notes}")
    fold_probas = dict(zip(used, probas))
    ens = np.mean(probas, axis=0)
    mc, pred = None, ens.argmax(axis=1)
    shown = gallery_cells(ens, n_gallery)
    galleries = gallery_ranges(ens, shown)
    sel = np.unique(np.concatenate(list(shown.values()))) if shown else np.zeros(0, int)
    cams = np.zeros((len(sel), S, S), np.float32)
    if mc_samples or (gradcam and len(sel)):
        from cellstudy.explain import load_weights, xai
        from cellstudy.learning.models import load as load_saved

        passes, model = [], None
        for fd in folds:
            if fd.fold not in fold_probas:
                continue
            if model is None:
                model = load_saved(fd.model(regime))
            else:
                load_weights(model, fd.model(regime))
            x = external._whitener(fd.path)(images)
            if mc_samples:
                passes.append(mc_dropout(model, x, mc_samples, seed=st["seed"], fold=fd.fold,
                                         batch_size=batch_size)[:, :, 1])
            if gradcam and len(sel):   # Grad-CAM of the ensemble's class, averaged over the fold models
                cams += xai.gradcam(model, x[sel], pred[sel], min_size=int(sc.get("gradcam_min_size", 4))) / len(used)
        mc = np.concatenate(passes) if passes else None
    # QC against the run's cohort
    from cellstudy.learning import baseline

    area_col = "shape_nucleus_area"
    ref_area = baseline.cell_features(ref.images)[area_col].to_numpy()
    lo, hi = np.nanpercentile(ref_area, SIZE_PERCENTILES)
    feats = baseline.cell_features(coh.images)
    qc = qc_flags(coh.images, coh.scaling["hi"] - coh.scaling["lo"], ref.scaling["hi"] - ref.scaling["lo"],
                  feats[area_col].to_numpy(), (float(lo), float(hi)))
    # the table
    ids = coh.table.reset_index(drop=True)
    keep = [c for c in ("cell_id", "path", "group", "class_name", "label", "ImageNumber", "ObjectNumber")
            if c in ids.columns]
    tab = ids[keep].copy()
    tab["network"] = network
    tab["Classifier_Class"] = [config.CLASS_NAMES[i] for i in pred]
    # the run's own names of the two roles (a cohort from `cellstudy manifest`: its folders' names)
    run_names = data.class_names_of(ref.table)
    if run_names:
        tab["Classifier_Class_name"] = [run_names[i] for i in pred]
    for i, name in enumerate(config.CLASS_NAMES):
        tab[f"Classifier_Probability_{name}"] = ens[:, i]
    tab["p_abnormal"] = ens[:, 1]
    tab["fold_sd"] = np.std([p[:, 1] for p in probas], axis=0) if len(probas) > 1 else np.nan
    tab["n_folds"] = len(probas)
    if mc is not None:
        tab["mc_mean"], tab["mc_sd"] = mc.mean(axis=0), mc.std(axis=0)
    tab["margin_uncertainty"] = margin_uncertainty(ens)
    tab["nucleus_area_px"] = feats[area_col].to_numpy()
    # a cell of the run's own cohort was in the training folds of all fold models but one: its
    # prediction is not a test of anything (same pixels: the same content checksum)
    tab["in_run_cohort"] = np.isin(np.asarray(coh.sha256, dtype=str), np.asarray(ref.sha256, dtype=str))
    tab = pd.concat([tab, qc], axis=1)
    n_own, said = int(tab["in_run_cohort"].sum()), []
    if n_own:
        said.append({"network": network, "fold": None, "status": "in run cohort",
                     "detail": f"{n_own} of {len(tab)} cells are the run's own cells (same pixels; column "
                               "in_run_cohort): each is a training cell of every fold model but the one whose "
                               "test fold held it, so their calls test nothing"})
    if not (new_stains and ref_stains):
        said.append({"network": network, "fold": None, "status": "stains not compared",
                     "detail": f"{'the run cohort ' + repr(st['cohort']) if not ref_stains else str(cells)} "
                               "names no stains (manifest column stains; cellstudy manifest --stains), so "
                               "whether the cells are stained as the models learned was not checked"})
    for name in config.CLASS_NAMES:
        if f"confident_{name}" not in galleries and len(coh):
            said.append({"network": network, "fold": None, "status": "no call of a class",
                         "detail": f"no cell is called {name}: there is no gallery of {name} calls"})
    for kind, g in galleries.items():
        if g.get("confident") is False:
            said.append({"network": network, "fold": None, "status": "no confident call",
                         "detail": f"no cell is called {g['class']} with p >= {CONFIDENT_P:.2f} (the highest: "
                                   f"{p_text(g['p_max'])}): the gallery of the most confident {g['class']} calls shows "
                                   "uncertain calls"})
    for n in said:
        echo(f"predict: note: {n['detail']}")
    notes += said
    classical_p: dict[str, np.ndarray] = {}
    if classical:
        mod = external._baseline_module(notes)
        cache: dict = {}
        for name in networks.CLASSIFIER_NAMES if mod is not None else []:
            _, pr, e = external._baseline_probas(mod, run.root, name, coh.images, cache, notes)
            if pr or e is not None:
                classical_p[name] = (np.mean(pr, axis=0) if pr else e)
                tab[f"p_abnormal_{name}"] = classical_p[name][:, 1]
    own, groups, names = tab["in_run_cohort"].to_numpy(), np.asarray(coh.groups), data.class_names_of(coh.table)
    scored, why_not = labelled_metrics(coh.labels, ens, own, groups, names, run_names)
    classical_scored = {name: labelled_metrics(coh.labels, pr, own, groups, names, run_names)[0]
                        for name, pr in classical_p.items()} if scored is not None else {}
    if scored is not None:
        left = [f"{scored[k]} {w} left out" for k, w in (("n_run_cells_left_out", "of the run's own cells"),
                                                         ("n_unlabelled_left_out", "unlabelled")) if scored[k]]
        echo(f"predict: against the cells' own classes: AUC {scored['auc']:.3f} (95% CI {scored['auc_ci_low']:.3f}-"
             f"{scored['auc_ci_high']:.3f}, bootstrap over {scored['n_fields']} fields), balanced accuracy "
             f"{scored['balanced_accuracy']:.3f} on {scored['n_cells']} cells ({scored['n_normal']} normal, "
             f"{scored['n_abnormal']} abnormal" + "".join(f"; {x}" for x in left) + ")")
    elif why_not:
        echo(f"predict: note: {why_not}")
    for name, m in classical_scored.items():   # the baseline the user asked for, scored the same way
        if m:
            echo(f"predict: {networks.display(name)} (classical) against the cells' own classes: AUC {m['auc']:.3f} "
                 f"(95% CI {m['auc_ci_low']:.3f}-{m['auc_ci_high']:.3f}), balanced accuracy "
                 f"{m['balanced_accuracy']:.3f} on {m['n_cells']} cells")
    for line in qc_lines(tab):
        echo(f"predict: {line}")
    cells_ref = str(Path(cells).resolve()) if Path(str(cells)).is_file() else str(cells)
    info = {"run_dir": str(run.root.resolve()), "cells": cells_ref, "n_cells": int(len(coh)), "network": network,
            "network_why": why, "scored_against_labels": scored, "not_scored_why": why_not or None,
            "classical_scored_against_labels": classical_scored or None, "galleries": galleries,
            "regime": regime, "folds": used, "mc_samples": int(mc_samples), "scale": st["scale"],
            "stains": list(new_stains) if new_stains else None,
            "stains_of_run": list(ref_stains) if ref_stains else None,
            "labelled": bool((coh.labels >= 0).all()),
            "overrides": st["overrides"], "image_size": S, "cohort_of_run": st["cohort"],
            "n_in_run_cohort": int(tab["in_run_cohort"].sum()),
            "qc": {"empty_range_fraction": EMPTY_RANGE_FRACTION, "saturated_fraction": SATURATED_FRACTION,
                   "nucleus_area_range_px": [float(lo), float(hi)], "percentiles": list(SIZE_PERCENTILES)},
            "notes": notes, "seconds": round(time.perf_counter() - t0, 1)}
    res = Prediction(table=tab, fold_probas=fold_probas, mc=mc, info=info, images=coh.images,
                     gallery=shown, gradcam={int(i): cams[j] for j, i in enumerate(sel)} if gradcam else {},
                     inputs={int(i): images[i] for i in sel})
    if out is not None:
        write(res, out)
        echo(f"predict: wrote {out / 'predictions.csv'} ({len(tab)} cells) and the galleries")
    return res


def gallery_cells(proba: np.ndarray, n: int = 8) -> dict[str, np.ndarray]:
    """Row indices of the galleries: ``confident_<class>`` (the ``n`` cells called ``<class>`` with
    the highest probability of it) and ``uncertain`` (the ``n`` largest margin uncertainties)."""
    p = np.asarray(proba, dtype=float)
    call = p.argmax(axis=1)
    out = {}
    for c, name in enumerate(config.CLASS_NAMES):
        idx = np.flatnonzero(call == c)
        if len(idx):
            out[f"confident_{name}"] = idx[np.argsort(-p[idx, c], kind="stable")][:n]
    if len(p):
        out["uncertain"] = np.argsort(-margin_uncertainty(p), kind="stable")[:n]
    return out


def gallery_ranges(proba: np.ndarray, shown: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """What each gallery of :func:`gallery_cells` shows, for its title and the notes. ``proba``
    (N, 2) the ensemble's probabilities; per gallery ``{"cells", "class", "p_min", "p_max"}`` with
    the probability of the called class (``class``) of its cells, and for a ``confident_<class>``
    gallery ``confident``: whether its best call reaches :data:`CONFIDENT_P`. The uncertain gallery
    has ``class`` None and the ``p_abnormal`` range of its cells."""
    p = np.asarray(proba, dtype=float)
    out: dict[str, dict[str, Any]] = {}
    for kind, idx in shown.items():
        idx = np.asarray(idx, dtype=int)
        if not len(idx):
            continue
        name = kind[len("confident_"):] if kind.startswith("confident_") else None
        q = p[idx, config.CLASS_NAMES.index(name) if name else 1]
        # 4 decimals, rounded down where rounding would reach the confidence level it is below
        r4 = lambda v: _floor_to(v, 4) if _reaches_level(v, 4) else round(v, 4)  # noqa: E731
        out[kind] = {"cells": int(len(idx)), "class": name, "p_min": r4(float(q.min())),
                     "p_max": r4(float(q.max()))}
        if name:
            out[kind]["confident"] = bool(q.max() >= CONFIDENT_P)
    return out


def gallery_title(kind: str, info: dict[str, Any] | None) -> str:
    """A gallery's title: what it shows and its cells' probabilities, e.g. "most confident
    abnormal calls (p(abnormal) 0.52-0.61; none reaches 0.75: no confident call)"."""
    if kind == "uncertain":
        what = "most uncertain cells"
    else:
        what = f"most confident {kind[len('confident_'):]} calls"
    if not info:
        return what
    cls = info.get("class") or "abnormal"
    if info.get("confident") is False:   # its best shown rounded down: 0.7496 is not "0.75"
        return (f"{what} (p({cls}) {p_text(info['p_min'])}-{p_text(info['p_max'])}; none reaches "
                f"{CONFIDENT_P:.2f}: no confident call)")
    return f"{what} (p({cls}) {info['p_min']:.2f}-{info['p_max']:.2f})"


SUMMARY_COLUMNS = ["model", "cells", "fields", "auc", "auc_ci_low", "auc_ci_high", "balanced_accuracy",
                   "accuracy_uncertain_half", "accuracy_certain_half"]


def qc_table(table: pd.DataFrame) -> pd.DataFrame:
    """The prediction chapter's QC table: one row per flag of :func:`qc_flags` in words
    ("F-actin nearly empty", "nucleus size outside the run's range"), with its column in
    ``predictions.csv`` (``flag``) and the cells it flags, then ``any flag``."""
    words = {"empty": "nearly empty", "saturated": "saturated"}
    stains = {"third": "third stain", "actin": "F-actin", "dna": "DNA"}
    rows = []
    for c in [c for c in table.columns if c.startswith("qc_") and c != "qc_ok"]:
        parts = c.split("_")   # qc_<kind>_<stain> or qc_size
        what = ("nucleus size outside the run's range" if c == "qc_size" else
                f"{stains.get(parts[-1], parts[-1])} {words.get(parts[1], parts[1])}" if len(parts) == 3 else c)
        rows.append({"QC flag": what, "flag": c, "cells flagged": int(table[c].astype(bool).sum())})
    if "qc_ok" in table.columns:
        rows.append({"QC flag": "any flag", "flag": "not qc_ok", "cells flagged": int((~table["qc_ok"].astype(bool)).sum())})
    return pd.DataFrame(rows, columns=["QC flag", "flag", "cells flagged"]).set_index("QC flag")


def qc_lines(table: pd.DataFrame) -> list[str]:
    """What the terminal says about the cells' QC flags (``qc_*`` columns of :func:`qc_flags`):
    how many cells were flagged and by which flag, and, when most of them are, that the stains
    may be mapped wrong (``--channels``). [] when no cell was flagged."""
    if "qc_ok" not in table.columns or not len(table):
        return []
    n, bad = len(table), int((~table["qc_ok"].astype(bool)).sum())
    if bad == 0:
        return []
    flags = [c for c in table.columns if c.startswith("qc_") and c != "qc_ok"]
    counts = ", ".join(f"{c} {int(table[c].astype(bool).sum())}" for c in flags if table[c].astype(bool).any())
    out = [f"QC: {bad} of {n} cells flagged ({counts}; the qc_* columns of predictions.csv): read their calls with care"]
    if bad > n / 2:
        out.append("QC: most cells are flagged: check the stain mapping of the manifest (--channels of "
                   "`cellstudy manifest`: which stored channel is the DNA, F-actin and the third stain) and "
                   "the pixel size against the run's cells")
    return out


def summary_table(res: Prediction) -> pd.DataFrame:
    """One row per model of a prediction scored against the new cells' own classes (the network's
    fold ensemble, then each classical model): ``model, cells, auc, auc_ci_low, auc_ci_high,
    balanced_accuracy, fields``, from ``info["scored_against_labels"]`` and
    ``info["classical_scored_against_labels"]`` (:func:`labelled_metrics`: the run's own and
    unlabelled cells left out), with the accuracy of the call in the more and the less uncertain
    half of the cells. Empty when the cells were not scored."""
    rows = []
    from cellstudy.learning.metrics import DISPLAY_NAMES

    net = res.info.get("network")
    items = [(f"{DISPLAY_NAMES.get(net, net)} (fold ensemble)", res.info.get("scored_against_labels"))]
    items += [(f"{DISPLAY_NAMES.get(k, k)} (classical)", m)
              for k, m in (res.info.get("classical_scored_against_labels") or {}).items()]
    for name, m in items:
        if m:
            rows.append({"model": name, "cells": m.get("n_cells"), "fields": m.get("n_fields"), "auc": m.get("auc"),
                         "auc_ci_low": m.get("auc_ci_low"), "auc_ci_high": m.get("auc_ci_high"),
                         "balanced_accuracy": m.get("balanced_accuracy"),
                         "accuracy_uncertain_half": m.get("accuracy_uncertain_half"),
                         "accuracy_certain_half": m.get("accuracy_certain_half")})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_for_reading(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`summary_table` as a reader sees it in the book: one row per model (the index), AUC
    with its 95% CI in one column, three decimals, accuracies as percentages (the cell and field
    counts, the same for every model, are said in the text above it)."""
    out = pd.DataFrame(index=pd.Index(table["model"], name="model"))
    def num(x, fmt: str) -> str:
        return "" if x is None or pd.isna(x) else format(float(x), fmt)

    out["AUC (95% CI)"] = [f"{num(a, '.3f')} ({num(lo, '.3f')}-{num(hi, '.3f')})" if lo is not None and not pd.isna(lo)
                           else num(a, ".3f") for a, lo, hi in
                           zip(table["auc"], table["auc_ci_low"], table["auc_ci_high"])]
    out["balanced accuracy"] = [num(x, ".3f") for x in table["balanced_accuracy"]]
    for col, name in (("accuracy_certain_half", "right, more certain half"),
                      ("accuracy_uncertain_half", "right, more uncertain half")):
        out[name] = [num(x, ".0%") for x in table[col]]
    return out


def short_id(cell_id: str, width: int = 18, parts: int = 1) -> str:
    """A cell id short enough for a gallery title: its last ``parts`` path parts, middle elided."""
    s = "/".join(str(cell_id).split("/")[-parts:])
    return s if len(s) <= width else s[: width // 2 - 1] + "…" + s[-(width // 2):]


def short_ids(cell_ids: Sequence[str], width: int = 18) -> list[str]:
    """:func:`short_id` of each id, with as many trailing path parts as make them tell the cells
    apart (``a/f1_3`` and ``b/f1_3`` are not both "f1_3"), up to the whole id."""
    ids = [str(c) for c in cell_ids]
    most = max((len(c.split("/")) for c in ids), default=1)
    for k in range(1, most + 1):
        out = [short_id(c, width, k) for c in ids]
        if len(set(out)) == len(set(ids)):
            return out
    return [short_id(c, max(width, max(len(i) for i in ids)), most) for c in ids]


def p_text(p: float) -> str:
    """A probability for a gallery: two decimals, but never shown as reaching :data:`CONFIDENT_P`
    when it does not (0.7496 is "0.749", not "0.75", beside "none reaches 0.75")."""
    p = float(p)
    return f"{_floor_to(p, 3):.3f}" if _reaches_level(p, 2) else f"{p:.2f}"


def _reaches_level(p: float, decimals: int) -> bool:
    """Whether ``p``, below :data:`CONFIDENT_P`, reaches it once rounded to ``decimals``."""
    return p < CONFIDENT_P <= round(p, decimals)


def _floor_to(p: float, decimals: int) -> float:
    """``p`` rounded down to ``decimals`` (0.7496 -> 0.749 at 3; 0.69, stored as 0.68999..., stays
    0.69 at 2)."""
    return math.floor(round(p * 10 ** decimals, 6)) / 10 ** decimals


def write(res: Prediction, out: str | Path) -> None:
    """Write ``predictions.csv`` / ``.parquet``, ``prediction.json`` and the galleries to ``out``."""
    from cellstudy.report import figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("gallery_*.png"):   # an earlier prediction's galleries (overwrite=True)
        old.unlink()
    atomic.write_text(out / "predictions.csv", res.table.to_csv(index=False))
    atomic.write(out / "predictions.parquet", lambda f: res.table.to_parquet(f, index=False))
    atomic.write_json(out / "prediction.json", res.info)
    t = res.table
    from cellstudy.explain.figures import overlay

    for kind, idx in res.gallery.items():
        what = gallery_title(kind, (res.info.get("galleries") or {}).get(kind))
        titles = [f"{sid}\np(abnormal)={p_text(t.loc[i, 'p_abnormal'])}"
                  for sid, i in zip(short_ids([t.loc[i, "cell_id"] for i in idx]), idx)]
        fig = figures.cell_gallery(res.images[idx], titles, title=what)
        atomic.write(out / f"gallery_{kind}.png", lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
        if res.gradcam:
            heat = np.stack([overlay(res.inputs[int(i)], res.gradcam[int(i)]) for i in idx])
            fig = figures.cell_gallery(heat, titles, title=f"{what}: Grad-CAM of the call (mean over the fold models)",
                                       stretch=False)
            atomic.write(out / f"gallery_{kind}_gradcam.png", lambda f, fig=fig: fig.savefig(f, format="png", dpi=100))
