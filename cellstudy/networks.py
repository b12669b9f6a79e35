"""The study's catalogue of models: one record per network (study.md section 5) and per classical
classifier (section 11), read by every module that names, orders, groups or builds them.

No TensorFlow: the metrics, plots, statistics, findings and run-folder code import this module
without loading Keras; :mod:`cellstudy.learning.models` builds a record's network from its ``builder``.
Adding a network is one :class:`ModelSpec` in :data:`CATALOGUE` (and its builder in
``cellstudy.learning.models`` when the builder is new).

Order matters: :data:`CATALOGUE`'s order is the book's order (tables, figures, the runner), the
networks first, then the classical baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The study's families, in the book's order; ``"Classical"`` is the feature-based baseline.
FAMILY_ORDER: tuple[str, ...] = ("DL", "ViT", "RGB", "MHL", "Classical")
#: The baseline's family label.
CLASSICAL = "Classical"

#: The paper's 3-layer CNN (RGB / MHL families): filters of its three conv blocks.
CNN3_FILTERS: tuple[int, int, int] = (32, 64, 128)
#: The backbones a local weights file can supply (``models.backbones.BACKBONES``; the study
#: config's ``weights`` keys).
BACKBONE_NAMES: tuple[str, ...] = ("vgg16", "resnet50", "densenet121", "cnn3")

#: Parameters of the shared classification head (cellstudy.learning.models.head) and their paper defaults.
HEAD_DEFAULTS: dict[str, Any] = {"head_pooling": "avg", "head_units": (1024, 512), "head_dropout": 0.3}
#: DenRes-131's fusion parameters.
DENRES_DEFAULTS: dict[str, Any] = {"level_filters": 256, "level_kernel": 3}
#: The ViT's parameters (``patch_size`` None: chosen from the input size).
VIT_DEFAULTS: dict[str, Any] = {"patch_size": None, "width": 64, "depth": 4, "num_heads": 4,
                                "mlp_dim": 128, "attention_dropout": 0.0}
#: The MHL family's attention parameters (``models.build`` applies a network's defaults).
ATTENTION_DEFAULTS: dict[str, Any] = {"token_dim": 128, "num_heads": 2, "max_token_grid": 16,
                                      "cnn_filters": CNN3_FILTERS}
#: The RGB family's: narrower tokens. Its six attention blocks each see one or two isolated stains
#: and their six pooled vectors are concatenated (6 x token_dim features into the head); at 128 the
#: RGB network fits its training cells (training AUC 0.96-0.99) and generalises worse than MHL.
#: Measured (RGB, S = 64, 10 epochs, per-stain whitening, the default run's five folds, one thread
#: each; /tmp sweep of 2026-12-06): token_dim 128 / 32 / 16 -> long-regime AUC 0.859 / 0.868 / 0.881
#: and 150 / 85 / 85 s a fold. Differences of 0.01-0.02 are within the folds' spread (SD ~0.05).
RGB_ATTENTION_DEFAULTS: dict[str, Any] = {**ATTENTION_DEFAULTS, "token_dim": 16}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study.

    ``name``: registry name (folder names in a run, config values); ``family``: one of
    :data:`FAMILY_ORDER`; ``display``: the paper's name for tables and figures; ``description``:
    one line; ``backbones``: the backbones whose weights a local file can supply (``()`` none);
    ``gradcam_last``: per Grad-CAM target the last convolutional map's layer name (the paper's
    choice; ``cellstudy.learning.models.gradcam_layers`` picks a shallower one by map size); ``builder``:
    which builder of ``cellstudy.learning.models`` makes it (``"dl"``, ``"denres"``, ``"vit"``, ``"rgb"``,
    ``"mhl"``; ``""`` for a classical classifier, built by ``cellstudy.learning.baseline``); ``defaults``:
    its own build parameters (besides the head's) and their defaults; ``train_images_per_s``: its
    training speed alone on a 2-core CPU, images/s at S = 64, batch 32
    (``benchmarks/train_throughput.py``, all eleven in one process, 2026-12-06, a 2-core Xeon with
    AMX-BF16; None for a classical classifier): what the workflow's job
    priorities go by (:func:`train_priority`); ``model_mb``: the size of one saved model file
    (``model_<regime>.keras``, MB; Keras 3.15, built at S = 64 and saved, 2026-12-06; the same at
    S = 32, the heads pool globally; at the paper's S = 512 the same for RGB and MHL, the ViT's
    4.0 MB against 3.2, its patches larger: measured), from which ``cellstudy run`` estimates the disk a run's
    models take (two files per fold, one per regime) before it trains."""

    name: str
    family: str
    display: str
    description: str
    backbones: tuple[str, ...] = ()
    gradcam_last: tuple[str, ...] = ()
    builder: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    train_images_per_s: float | None = None
    model_mb: float | None = None

    @property
    def is_network(self) -> bool:
        """True for a neural network (trained by cellstudy.learning.train), False for a classical classifier."""
        return self.family != CLASSICAL


_RGB_FEATS = ("feat_r", "feat_g", "feat_b")

#: Every model of the study, in the book's order.
CATALOGUE: tuple[ModelSpec, ...] = (
    ModelSpec("vgg16", "DL", "VGG16", "VGG16 backbone + head", ("vgg16",), ("block5_conv3",), "dl",
              train_images_per_s=32, model_mb=63.2),
    ModelSpec("resnet50", "DL", "ResNet50", "ResNet50 backbone + head", ("resnet50",),
              ("conv5_block3_out",), "dl", train_images_per_s=53, model_mb=105.5),
    ModelSpec("densenet121", "DL", "DenseNet121", "DenseNet121 backbone + head", ("densenet121",),
              ("relu",), "dl", train_images_per_s=52, model_mb=36.0),
    ModelSpec("denres131", "DL", "DenRes-131",
              "ResNet50 and DenseNet121 side by side, four levels fused at stride 32 + head",
              ("resnet50", "densenet121"), ("res_conv5_block3_out", "den_relu"), "denres", DENRES_DEFAULTS,
              train_images_per_s=19, model_mb=192.4),
    ModelSpec("vit", "ViT", "ViT", "Vision Transformer (patch embedding, encoder blocks) + head", (),
              ("vit_grid",), "vit", VIT_DEFAULTS, train_images_per_s=97, model_mb=3.2),
    ModelSpec("rgb", "RGB", "RGB",
              "isolated R, G, B through one shared 3-layer CNN, six 2-head attention blocks + head",
              ("cnn3",), _RGB_FEATS, "rgb", RGB_ATTENTION_DEFAULTS, train_images_per_s=83, model_mb=3.2),
    ModelSpec("rgb_res", "RGB", "RGB-Res",
              "isolated R, G, B through one shared ResNet50, six 2-head attention blocks + head",
              ("resnet50",), _RGB_FEATS, "rgb", RGB_ATTENTION_DEFAULTS, train_images_per_s=20, model_mb=98.2),
    ModelSpec("rgb_den", "RGB", "RGB-Den",
              "isolated R, G, B through one shared DenseNet121, six 2-head attention blocks + head",
              ("densenet121",), _RGB_FEATS, "rgb", RGB_ATTENTION_DEFAULTS, train_images_per_s=23, model_mb=32.8),
    ModelSpec("mhl", "MHL", "MHL",
              "3-layer CNN on the RGB image, one 2-head self-attention block over its tokens + head",
              ("cnn3",), ("cnn_relu3",), "mhl", ATTENTION_DEFAULTS, train_images_per_s=226, model_mb=3.4),
    ModelSpec("mhl_res", "MHL", "MHL-Res",
              "ResNet50 on the RGB image, one 2-head self-attention block over its tokens + head",
              ("resnet50",), ("conv5_block3_out",), "mhl", ATTENTION_DEFAULTS, train_images_per_s=46, model_mb=99.0),
    ModelSpec("mhl_den", "MHL", "MHL-Den",
              "DenseNet121 on the RGB image, one 2-head self-attention block over its tokens + head",
              ("densenet121",), ("relu",), "mhl", ATTENTION_DEFAULTS, train_images_per_s=60, model_mb=33.1),
    ModelSpec("rf", CLASSICAL, "Random forest",
              "random forest on 67 per-cell shape, intensity and texture features (cellstudy.learning.baseline)"),
    ModelSpec("logreg", CLASSICAL, "Logistic regression",
              "standardised logistic regression on the same features (cellstudy.learning.baseline)"),
)

#: name -> record, every model.
SPECS: dict[str, ModelSpec] = {s.name: s for s in CATALOGUE}
#: The eleven networks' names, in the book's order.
NETWORK_NAMES: tuple[str, ...] = tuple(s.name for s in CATALOGUE if s.is_network)
#: The classical classifiers' names (cellstudy.learning.baseline), in the book's order.
CLASSIFIER_NAMES: tuple[str, ...] = tuple(s.name for s in CATALOGUE if not s.is_network)
#: Every model's name in the book's order (networks, then the classifiers): table row order.
ORDER: tuple[str, ...] = tuple(s.name for s in CATALOGUE)
#: name -> family, every model.
FAMILY: dict[str, str] = {s.name: s.family for s in CATALOGUE}
#: name -> the paper's display name, every model.
DISPLAY: dict[str, str] = {s.name: s.display for s in CATALOGUE}


def train_priority(name: str) -> int:
    """Scheduling priority of network ``name``'s training job: its relative cost per image,
    ``round(1000 / images_per_s)`` (DenRes-131 53, RGB-Res 50, RGB-Den 43, VGG16 31 ... MHL 4).
    The slowest networks start first, so the last job to finish on a machine with fewer
    workers than networks is a short one (longest-processing-time-first); 1 for a model without
    a measured speed (``ModelSpec.train_images_per_s``)."""
    ips = SPECS[name].train_images_per_s if name in SPECS else None
    return max(1, round(1000 / ips)) if ips else 1


def spec(name: str) -> ModelSpec:
    """The record of model ``name``; ValueError listing the known names otherwise."""
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; expected one of {list(SPECS)}") from None


def check_network(name: str) -> str:
    """Return ``name`` if it is one of the eleven networks, else raise ValueError listing them."""
    if name not in NETWORK_NAMES:
        raise ValueError(f"unknown network {name!r}; expected one of {list(NETWORK_NAMES)}")
    return name


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


#: id and display name, normalised (``_key``) -> network id: what :func:`resolve` looks up.
_BY_KEY: dict[str, str] = {_key(k): n for n in NETWORK_NAMES for k in (n, DISPLAY[n])}


def resolve(name: str) -> str:
    """The network id (``mhl_res``) of ``name``, given as an id or as the paper's display name
    (``MHL-Res``), case-insensitive, ``-`` / ``_`` / space alike: what a user types after
    ``--network``. ValueError listing the ids with their display names otherwise."""
    try:
        return _BY_KEY[_key(name)]
    except KeyError:
        known = ", ".join(f"{n} ({DISPLAY[n]})" for n in NETWORK_NAMES)
        raise ValueError(f"unknown network {name!r}; expected one of: {known}") from None


def display(name: str) -> str:
    """The paper's name of ``name`` (the name itself for a model outside the catalogue)."""
    return DISPLAY.get(name, name)


def family(name: str, default: str = "other") -> str:
    """The family of ``name`` (``default`` for a model outside the catalogue)."""
    return FAMILY.get(name, default)


def networks_of(family_name: str) -> list[str]:
    """The networks of one family, in the book's order; ValueError for an unknown family."""
    fams = [f for f in FAMILY_ORDER if f != CLASSICAL]
    if family_name not in fams:
        raise ValueError(f"unknown family {family_name!r}; expected one of {sorted(fams)}")
    return [n for n in NETWORK_NAMES if FAMILY[n] == family_name]


def networks_on(backbone: str) -> list[str]:
    """The networks built on ``backbone`` (one of ``ModelSpec.backbones``), in the book's order:
    what a pretrained weights file for it starts. [] for a backbone no network uses."""
    return [n for n in NETWORK_NAMES if backbone in SPECS[n].backbones]


def ordered(names, order=ORDER) -> list[str]:
    """The distinct ``names`` sorted by ``order`` (the book's order by default); names outside it
    follow, alphabetically."""
    rank = {n: i for i, n in enumerate(order)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), str(n)))
