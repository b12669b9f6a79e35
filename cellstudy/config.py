"""Study-wide settings: where the data is, channel order, and the named scales.

A *scale* changes numbers (image size, epochs, filter iterations), never code paths.

Channel order. Every image array inside cellstudy is ``(H, W, 3)`` float32 in **RGB order**, as
in the paper: index 0 = red = the third stain (vimentin in the paper; beta-tubulin in BBBC021;
ER / concanavalin A in RxRx1), index 1 = green = F-actin, index 2 = blue = DNA.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

#: Index -> (colour, stain role). Arrays are (H, W, 3) in this order.
CHANNELS: tuple[str, str, str] = ("third", "actin", "dna")
CHANNEL_COLOURS: tuple[str, str, str] = ("red", "green", "blue")

#: The class order used everywhere: label 0 = normal role, label 1 = abnormal role.
CLASS_NAMES: tuple[str, str] = ("normal", "abnormal")

#: The repository root (the folder holding ``cellstudy/``).
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Environment variable naming the data root.
DATA_ROOT_ENV = "CELLSTUDY_DATA_ROOT"


class ConfigError(ValueError):
    """A bad configuration value (unknown scale, cohort, parameter)."""


def data_root(path: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: ``path`` if given, else ``$CELLSTUDY_DATA_ROOT``, else
    ``../shared/data`` beside the repository. Raises ``FileNotFoundError`` naming the folder
    (and where the value came from) when it does not exist."""
    if path is not None and str(path) != "":
        root, source = Path(path), "the data_root parameter"
    elif os.environ.get(DATA_ROOT_ENV):
        root, source = Path(os.environ[DATA_ROOT_ENV]), f"${DATA_ROOT_ENV}"
    else:
        root, source = REPO_ROOT.parent / "shared" / "data", "the default (../shared/data)"
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} (from {source}) does not exist or is not a folder; "
            f"point {DATA_ROOT_ENV} or the data_root parameter at the folder holding the cohorts"
        )
    return root


def cache_dir() -> Path:
    """On-disk cache for preprocessed arrays (``$CELLSTUDY_CACHE`` or ``<repo>/.cache``)."""
    p = Path(os.environ.get("CELLSTUDY_CACHE", REPO_ROOT / ".cache"))
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------------------------------------
# Named scales. Keys are the same in every scale; only values change.
# ---------------------------------------------------------------------------------------------
_PREPROCESS_FULL = {
    "blur_repetitions": 1,          # BinomialBlur repetitions
    "psf_sigma": 1.0,               # Gaussian PSF sigma, pixels (at the stored resolution)
    "landweber_iterations": 10,
    "landweber_alpha": 1.0,         # Landweber step size
    "diffusion_time_step": 0.0625,  # <= 0.125 for stability in 2-D
    "diffusion_conductance": 1.0,
    "diffusion_iterations": 5,
}

SCALES: dict[str, dict[str, Any]] = {
    # Seconds to a few minutes: for the tests.
    "ci": {
        "image_size": 32,
        "preprocess": {**_PREPROCESS_FULL, "landweber_iterations": 3, "diffusion_iterations": 2},
        "n_splits": 5,
        "max_shift_px_at_512": 20,
        "max_rotation_deg": 15.0,
        "epochs_short": 1,
        "epochs_long": 2,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "momentum": 0.9,
        # One light network per family (the networks chapters still build all eleven; the
        # model tests train every one): the tests' run stays within minutes.
        "networks": ["vgg16", "vit", "rgb", "mhl"],
        "folds_to_run": [0, 1, 2],   # None = all folds
        "xai_max_cells": 8,
        "warmup_epochs": 0,
        "bn_momentum": None,
        "he_init": [],
        "gradcam_min_size": 4,
        "whitening": "zca",      # "zca" (3 x 3, the paper's) or "channel" (each stain on its own)
        "flips": False,          # a random rotation by quarter turns / flip per training image per epoch
        "lr_decay": "none",      # after the warm-up: "none" (fixed rate) or "cosine" (to 0 by the last epoch)
        "epochs_long_max": None,  # None: the long regime is epochs_long epochs; an int: on to the plateau, at most this
    },
    # A look in ~20 minutes (configs/quick.yaml): the former CPU default, all eleven networks x 5
    # folds at S = 32 and 1 + 1 epochs. The networks do NOT learn at this scale (AUC 0.49-0.78 in
    # the default run of 2026-12-02, VGG16 one class in every fold): its book says its numbers are
    # not conclusive. Measured: 21-23 min end to end on 2 cores.
    "quick": {
        "image_size": 32,
        "preprocess": dict(_PREPROCESS_FULL),
        "n_splits": 5,
        "max_shift_px_at_512": 20,
        "max_rotation_deg": 15.0,
        "epochs_short": 1,
        "epochs_long": 2,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "momentum": 0.9,
        "networks": None,
        "folds_to_run": None,
        "xai_max_cells": 8,
        "warmup_epochs": 0,
        "bn_momentum": None,
        "he_init": [],
        "gradcam_min_size": 4,
        "whitening": "zca",      # "zca" (3 x 3, the paper's) or "channel" (each stain on its own)
        "flips": False,          # a random rotation by quarter turns / flip per training image per epoch
        "lr_decay": "none",      # after the warm-up: "none" (fixed rate) or "cosine" (to 0 by the last epoch)
        "epochs_long_max": None,  # None: the long regime is epochs_long epochs; an int: on to the plateau, at most this
    },
    # The CPU default of `make study`: all eleven networks x 5 folds x both regimes on a 2-core
    # machine, at the BBBC021 crops' native size (68 px -> S = 64: stride-32 backbones keep a
    # 2 x 2 map, so every attention network attends over >= 2 x 2 tokens and Grad-CAM finds a
    # >= 4 x 4 layer). Epochs, rate and warm-up chosen by measurement (book/default_scale.md): SGD
    # (momentum 0.9) at 3e-3 after a 2-epoch linear warm-up brings the training accuracy of the
    # backbones to ~0.95 by epoch 6-8 (ResNet50, DenseNet121 fold 0); at the paper's fixed 1e-3
    # they needed ~15 epochs. Measured 2026-12-02 (/tmp probes of that day): five of the networks (configs/
    # five.yaml) 28 min on 2 cores, long-regime AUC 0.79-0.93, none yet on its plateau after 10
    # epochs; all eleven estimated at ~95 min (the 60-minute target is not met). 2026-12-06, a
    # 2-core Xeon, `make study` stopped after 64 min with 6 networks done: ~2 h 15 min estimated
    # end to end; long-regime AUC ViT 0.931, DenseNet121 0.921, VGG16 0.872, ResNet50 0.848, RGB
    # 0.833 (the RGB family short of 0.90: more epochs, a coarser token grid or 1e-2 did not help).
    # Measured to the end later that day (Snakemake engine, fresh clone): 2 h 05 min, of which
    # training 96 min (188 core-min; DenRes-131, RGB-Res, RGB-Den 54% of it).
    # With the RGB family's current defaults (below), again from a fresh clone: 1 h 49 min, training
    # 87 min (171 core-min; book/default_scale.md, "Time"); RGB 0.881 (0.896 at 20 epochs, not the default: book/default_scale.md).
    # Until 2026-12-07 the long regime was a fixed 10 epochs (book/default_scale.md, "The trade-off":
    # more epochs raised no network's AUC by more than 0.015), at which the attention networks and
    # ResNet50 were not on their training plateau. study.md section 12 asks for the plateau at every
    # scale: since then the long regime goes on from epoch 10 until the results chapter's
    # convergence rule holds on the fold's training accuracies, at most 30 epochs (epochs_long_max;
    # book/default_scale.md, "The long regime on to the plateau").
    # Measured 2026-12-07 (a 2-core AMD EPYC with AVX-512, book/default_scale.md, "The full default
    # on to the plateau"): all 55 folds stopped on the plateau after 10-27 epochs, none at the cap;
    # training 208 core-min, `make study` ~2 h 02 min; best of each family VGG16 0.893, ViT 0.902,
    # RGB 0.902, MHL 0.901 (logistic regression 0.903).
    # Whitening per family: the RGB family isolates the stains into streams, and the 3 x 3 ZCA
    # makes each stream a mix of all three; with each stain whitened on its own RGB's AUC rose
    # (token width 32: 0.801 with ZCA, 0.868 per stain over the five folds; width 128: 0.832 / 0.859).
    # The other families see the stains together and keep the paper's ZCA.
    "cpu": {
        "image_size": 64,
        "preprocess": dict(_PREPROCESS_FULL),
        "n_splits": 5,
        "max_shift_px_at_512": 20,
        "max_rotation_deg": 15.0,
        "epochs_short": 5,
        "epochs_long": 10,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "momentum": 0.9,
        "networks": None,
        "folds_to_run": None,
        "xai_max_cells": 8,
        "warmup_epochs": 2,
        "bn_momentum": 0.9,
        "he_init": ["vgg16"],    # He-normal conv kernels: VGG16 (no BatchNorm) does not train from Glorot
        "gradcam_min_size": 4,
        "whitening": {"RGB": "channel"},  # per family (above); the families not named: "zca"
        "flips": False,          # a random rotation by quarter turns / flip per training image per epoch
        "lr_decay": "none",      # after the warm-up: "none" (fixed rate) or "cosine" (to 0 by the last epoch)
        "epochs_long_max": 30,   # the long regime: from epoch 10 on to the training plateau, at most 30 (book/default_scale.md)
    },
    # The paper's scale: S = 512, short (< 100) and long (> 100) regimes. Needs a GPU.
    "paper": {
        "image_size": 512,
        "preprocess": dict(_PREPROCESS_FULL),
        "n_splits": 5,
        "max_shift_px_at_512": 20,
        "max_rotation_deg": 15.0,
        "epochs_short": 50,
        "epochs_long": 150,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "momentum": 0.9,
        "networks": None,
        "folds_to_run": None,
        "xai_max_cells": None,
        "warmup_epochs": 0,
        "bn_momentum": None,
        "he_init": ["vgg16"],    # VGG16 from random weights needs He-normal kernels (experiment.he_initialise),
        "gradcam_min_size": 4,
        "whitening": "zca",      # "zca" (3 x 3, the paper's) or "channel" (each stain on its own)
        "flips": False,          # a random rotation by quarter turns / flip per training image per epoch
        "lr_decay": "none",      # after the warm-up: "none" (fixed rate) or "cosine" (to 0 by the last epoch)
        "epochs_long_max": None,  # None: the long regime is epochs_long epochs; an int: on to the plateau, at most this
    },
}


#: Scale keys added after runs were made, with the value that reproduces those runs: a run
#: folder's ``scale.json`` without the key is read as having it (``rundir.read_scale_file``).
ADDED_SCALE_KEYS: dict[str, Any] = {"whitening": "zca", "flips": False, "lr_decay": "none",
                                    "epochs_long_max": None}

# Scales for a look or for the tests: their networks are not trained to the plateau, and the
# books of their runs say that their numbers are not conclusive (``not_conclusive_note``).
LOOK_SCALES: dict[str, str] = {"ci": "the tests' scale", "quick": "a look in ~20 minutes"}


def not_conclusive_note(scale_name: str, scale: dict[str, Any] | None = None) -> str:
    """The sentence a run's book states for a scale of ``LOOK_SCALES`` ("" for the others):
    which scale, its image size and epochs (``scale``: the run's resolved values; default the
    named scale's), and that the numbers are not conclusive."""
    if scale_name not in LOOK_SCALES:
        return ""
    sc = scale if scale is not None else get_scale(scale_name)
    return (f"This run is the `{scale_name}` scale ({LOOK_SCALES[scale_name]}: S = {sc['image_size']}, "
            f"{epochs_text(sc)}): the networks are not trained to their plateau "
            "and **its numbers are not conclusive**. Run the default scale for the study's findings.")


def get_scale(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a deep copy of scale ``name`` with ``overrides`` applied (unknown keys rejected)."""
    if name not in SCALES:
        raise ConfigError(f"unknown scale {name!r}; expected one of {sorted(SCALES)}")
    p = copy.deepcopy(SCALES[name])
    overrides = dict(overrides or {})
    if "epochs_long" in overrides and "epochs_long_max" not in overrides \
            and p.get("epochs_long_max") is not None:
        # epochs_long alone asks for that many epochs: a fixed long regime (with epochs_long_max
        # too, a plateau stop between the two)
        overrides["epochs_long_max"] = None
    for k, v in overrides.items():
        if k not in p:
            raise ConfigError(f"unknown scale parameter {k!r}; expected one of {sorted(p)}")
        if k == "whitening":      # a mode or a mapping family -> mode: the override replaces it whole
            p[k] = copy.deepcopy(v)
        elif isinstance(p[k], dict) and isinstance(v, dict):
            bad = set(v) - set(p[k])
            if bad:
                raise ConfigError(f"unknown {k} parameter(s) {sorted(bad)}; expected {sorted(p[k])}")
            p[k].update(v)
        else:
            p[k] = v
    check_whitening(p.get("whitening", "zca"))
    check_lr_decay(p.get("lr_decay", "none"))
    check_epochs_long_max(p)
    return p


def check_epochs_long_max(scale: dict[str, Any]) -> None:
    """ConfigError unless the scale's ``epochs_long_max`` is None (the long regime is
    ``epochs_long`` epochs) or an int >= ``epochs_long`` (the long regime trains at least
    ``epochs_long`` epochs and stops at the first epoch from there on at which the training
    accuracy is on its plateau by the results chapter's rule, ``cellstudy.learning.convergence``,
    at most ``epochs_long_max``). Not with a cosine decay above ``epochs_long`` (the decay's
    length is the regime's). An override of ``epochs_long`` alone makes the long regime that many
    epochs, fixed (``get_scale``)."""
    m = scale.get("epochs_long_max")
    if m is None:
        return
    lo = scale.get("epochs_long")
    if isinstance(m, bool) or not isinstance(m, int) or not isinstance(lo, int) or m < lo:
        raise ConfigError(f"epochs_long_max={m!r}; expected null (the long regime is epochs_long = {lo!r} "
                          f"epochs) or an int >= epochs_long (train on to the plateau, at most that many epochs)")
    if scale.get("lr_decay", "none") != "none" and m > lo:
        raise ConfigError(f"epochs_long_max={m!r} with lr_decay={scale.get('lr_decay')!r}: a decay runs to the "
                          "last epoch, which a stop at the plateau does not know in advance; set epochs_long_max "
                          f"to epochs_long ({lo}) or null for a fixed long regime")


def plateau_cap(scale: dict[str, Any]) -> int | None:
    """The long regime's cap when ``scale``'s long regime goes on to the training plateau
    (``epochs_long_max`` an int above ``epochs_long``), else None (a fixed long regime, or a scale
    of a run made before the key). The one test of "plateau stop or fixed" (the book's texts, the
    progress estimate)."""
    m, lo = scale.get("epochs_long_max"), scale.get("epochs_long")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (m, lo))
    return int(m) if ints and m > lo else None


def plateau_stop_text(scale: dict[str, Any]) -> str:
    """How the scale's long regime ends, for the results chapter beside the convergence rule: ""
    for a fixed count, else "The long regime of every (network, fold) stopped at the first epoch
    from 10 on at which this rule held, or at 30 where it did not ...". """
    m = plateau_cap(scale)
    if m is None:
        return ""
    return (f"The long regime of every (network, fold) went on from epoch {int(scale['epochs_long'])} until this "
            f"rule held, on the training accuracies alone (never the test fold), and stopped there; where it did "
            f"not hold by epoch {int(m)}, the scale's cap, the training stopped at the cap and the table says "
            "not converged.")


def regime_epochs_text(scale: dict[str, Any], regime: str) -> str:
    """One regime's epochs in words: "5 epochs", "10 epochs" (fixed) or "on to the training
    plateau, 10-30 epochs" (a long regime with ``epochs_long_max``)."""
    n = int(scale[f"epochs_{regime}"])
    m = plateau_cap(scale) if regime == "long" else None
    return f"{n} epoch{'' if n == 1 else 's'}" if m is None else f"on to the training plateau, {n}-{m} epochs"


def epochs_text(scale: dict[str, Any]) -> str:
    """The scale's epochs in words, for the book: "5 + 5 epochs" (fixed), or "5 epochs for the
    short regime, then on to the training plateau for the long, 10 to 30 epochs in all"."""
    short, long_, m = int(scale["epochs_short"]), int(scale["epochs_long"]), plateau_cap(scale)
    if m is None:
        return f"{short} + {long_ - short} epochs"
    return (f"{short} epochs for the short regime, then on to the training plateau for the long, "
            f"{long_} to {m} epochs in all")


#: The learning-rate decays after the warm-up (a scale's ``lr_decay``): "none", the paper's fixed
#: rate; "cosine", a half cosine from the rate to 0 over the rest of the long regime
#: (``train.learning_rate_schedule``).
LR_DECAYS = ("none", "cosine")


def check_lr_decay(value: Any) -> None:
    """ConfigError unless ``value`` is one of :data:`LR_DECAYS`."""
    if value not in LR_DECAYS:
        raise ConfigError(f"lr_decay={value!r}; expected 'none' (the rate stays fixed after the warm-up) "
                          "or 'cosine' (it falls to 0 by the end of the long regime)")


def rate_text(scale: dict[str, Any]) -> str:
    """SGD's learning rate at ``scale`` in words, for the book: "0.003 after a 2-epoch linear
    warm-up, then a cosine decay to 0 by the last epoch", "0.001, fixed" (the paper's)."""
    warm = int(scale.get("warmup_epochs") or 0)
    decay = scale.get("lr_decay", "none") == "cosine"
    out = f"{float(scale['learning_rate']):g}"
    if warm:
        out += f" after a {warm}-epoch linear warm-up"
    if decay:
        out += (", then" if warm else ",") + " a cosine decay to 0 by the last epoch"
    return out if warm or decay else out + ", fixed"


#: The input whitening modes (``augment.ZCAWhitening``): "zca", the paper's 3 x 3 ZCA over the
#: channels (each output channel a mix of the three stains), or "channel", each stain standardised
#: on its own.
WHITENING_MODES = ("zca", "channel")


def check_whitening(value: Any) -> None:
    """ConfigError unless ``value`` is a whitening mode or a mapping family -> mode over the
    network families (DL, ViT, RGB, MHL; a family not named gets "zca"). An override of the
    scale's ``whitening`` replaces it whole: ``{"MHL": "channel"}`` on the default scale gives MHL
    per-stain whitening and every other family, RGB included, the ZCA."""
    from cellstudy.networks import CLASSICAL, FAMILY_ORDER

    fams = [f for f in FAMILY_ORDER if f != CLASSICAL]
    if isinstance(value, str) and value in WHITENING_MODES:
        return
    if isinstance(value, dict) and set(value) <= set(fams) and all(v in WHITENING_MODES for v in value.values()):
        return
    raise ConfigError(f"whitening={value!r}; expected one of {list(WHITENING_MODES)} (every network) or a "
                      f"mapping family -> mode over {fams}, e.g. {{'RGB': 'channel'}}")


def family_whitening(scale: dict[str, Any], family: str) -> str:
    """The whitening of network family ``family``'s input at ``scale``: its ``whitening`` when it
    is one mode for every network, else the mapping's mode for the family ("zca" for a family it
    does not name; a scale without the key: "zca"). ConfigError for a bad value."""
    value = scale.get("whitening", "zca")
    check_whitening(value)
    return value if isinstance(value, str) else value.get(family, "zca")


def whitening_for(scale: dict[str, Any], network: str | None = None) -> str:
    """The whitening of ``network``'s input at ``scale`` (:func:`family_whitening` of its family).
    ``network`` None (backbone pre-training, which serves more than one family): the scale's mode
    when it is one for all, else "zca". ConfigError for a bad value."""
    from cellstudy.networks import family

    if network is not None:
        return family_whitening(scale, family(network))
    value = scale.get("whitening", "zca")
    check_whitening(value)
    return value if isinstance(value, str) else "zca"


def per_stain_families(scale: dict[str, Any]) -> list[str]:
    """The network families whose input ``scale`` whitens each stain on its own ("channel"), in
    the book's order (what the preprocessing and reproducibility chapters state)."""
    from cellstudy.networks import CLASSICAL, FAMILY_ORDER

    return [f for f in FAMILY_ORDER if f != CLASSICAL and family_whitening(scale, f) == "channel"]


def max_shift_px(scale: dict[str, Any]) -> float:
    """Maximum width/height shift in pixels at this scale: 20 px at S = 512, scaled with S."""
    return scale["max_shift_px_at_512"] * scale["image_size"] / 512.0
