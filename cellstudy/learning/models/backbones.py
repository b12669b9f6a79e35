"""Convolutional backbones built *flat* into the caller's graph.

A backbone is applied to a symbolic tensor with :func:`apply_backbone`; its layers become layers
of the outer model (``keras.applications.*(input_tensor=...)``), so every intermediate feature map
and its gradient is reachable by name. Nothing is downloaded: backbones are built with
``weights=None`` and pretrained weights come from a local file (:mod:`cellstudy.learning.models.weights`).

Backbones (name -> last convolutional feature map, the default Grad-CAM layer):

- ``vgg16``: ``block5_conv3`` (stride 16); the backbone output is ``block5_pool`` (stride 32).
- ``resnet50``: ``conv5_block3_out`` (stride 32).
- ``densenet121``: ``relu`` (stride 32, the final BN + ReLU).
- ``cnn3``: the paper's 3-layer CNN for RGB / MHL: three blocks Conv 3x3 -> BatchNorm -> ReLU,
  with 2x2 max pooling after the first two (stride 4): ``cnn_relu3``.

Grad-CAM candidates (:data:`STAGES`, deep -> shallow, with their nominal strides): the last conv
map, then the stage outputs before each downsampling, e.g. ResNet50 ``conv5_block3_out`` (32),
``conv4_block6_out`` (16), ``conv3_block4_out`` (8), ``conv2_block3_out`` (4); DenseNet121 ``relu``
(32) and the transition layers' BN-ReLU before their pooling, ``pool4_relu`` (16), ``pool3_relu``
(8), ``pool2_relu`` (4). :func:`stage_size` gives each one's map size for an input size without
building anything (Keras' padding arithmetic: ResNet50's and DenseNet121's stem and ResNet50's
strided convolutions round up, every 2 x 2 pooling rounds down).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
from keras import layers

from cellstudy.networks import CNN3_FILTERS  # the paper's 3-layer CNN's filters (the catalogue's)

from cellstudy.networks import BACKBONE_NAMES as BACKBONES  # noqa: E402  (one list: the catalogue's)

#: Smallest input side each backbone accepts (pixels).
MIN_SIZE = {"vgg16": 32, "resnet50": 32, "densenet121": 32, "cnn3": 8}

#: The last convolutional feature map (Grad-CAM target) of each backbone.
LAST_CONV = {"vgg16": "block5_conv3", "resnet50": "conv5_block3_out", "densenet121": "relu",
             "cnn3": "cnn_relu3"}

#: Output layer of each backbone (what the head / tokens read).
OUTPUT = {"vgg16": "block5_pool", "resnet50": "conv5_block3_out", "densenet121": "relu",
          "cnn3": "cnn_relu3"}

#: Grad-CAM candidates per backbone, deep -> shallow: (layer, nominal stride). The first is the
#: last convolutional feature map (``LAST_CONV``).
STAGES = {
    "vgg16": (("block5_conv3", 16), ("block4_conv3", 8), ("block3_conv3", 4)),
    "resnet50": (("conv5_block3_out", 32), ("conv4_block6_out", 16), ("conv3_block4_out", 8),
                 ("conv2_block3_out", 4)),
    "densenet121": (("relu", 32), ("pool4_relu", 16), ("pool3_relu", 8), ("pool2_relu", 4)),
    "cnn3": (("cnn_relu3", 4),),
}

#: The downsampling steps of each backbone, in order: "ceil" (a padded or 1x1 strided conv / a
#: padded pooling: ceil(n / 2)) or "floor" (a 2x2 valid pooling: floor(n / 2)); a stage of nominal
#: stride 2^k sits after the first k steps.
_STEPS = {"vgg16": ("floor",) * 5, "resnet50": ("ceil",) * 5,
          "densenet121": ("ceil", "ceil", "floor", "floor", "floor"), "cnn3": ("floor", "floor")}

#: Default filters of the 3-layer CNN.

_APPS = {"vgg16": "VGG16", "resnet50": "ResNet50", "densenet121": "DenseNet121"}


@dataclass
class Backbone:
    """What :func:`apply_backbone` returns.

    ``output``: the backbone's output tensor ``(N, h, w, C)``; ``features``: the last conv feature
    map (Grad-CAM target) tensor; ``layer_names``: names of the backbone's own layers in the outer
    graph (prefix applied); ``name``: backbone name; ``prefix``: the name prefix used.
    """

    name: str
    output: Any
    features: Any
    layer_names: list[str]
    prefix: str = ""


def stage_size(backbone: str, layer: str, hw: tuple[int, int]) -> tuple[int, int]:
    """Map size ``(h, w)`` of candidate ``layer`` (a :data:`STAGES` name, no prefix) of
    ``backbone`` for an ``hw`` input, from the strides alone (checked against built models in
    the tests). ValueError for a layer that is not a candidate."""
    check_backbone(backbone)
    strides = dict(STAGES[backbone])
    if layer not in strides:
        raise ValueError(f"{layer!r} is not a Grad-CAM candidate of backbone {backbone!r}; "
                         f"expected one of {list(strides)}")
    k = int(strides[layer]).bit_length() - 1
    out = []
    for n in hw:
        n = int(n)
        for step in _STEPS[backbone][:k]:
            n = -(-n // 2) if step == "ceil" else n // 2
        out.append(n)
    return out[0], out[1]


def check_backbone(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def check_min_size(network: str, backbone: str, hw: tuple[int, int]) -> None:
    """ValueError when ``hw`` is below the backbone's minimum input side."""
    m = MIN_SIZE[backbone]
    if min(hw) < m:
        raise ValueError(
            f"input_size {hw[0]}x{hw[1]} is below the minimum {m}x{m} of network {network!r} "
            f"(backbone {backbone}); use input_size >= {m}")


def _cnn3(x, filters=CNN3_FILTERS, prefix: str = "cnn_"):
    names = []
    for i, f in enumerate(filters, start=1):
        conv = layers.Conv2D(int(f), 3, padding="same", use_bias=False, name=f"{prefix}conv{i}")
        bn = layers.BatchNormalization(name=f"{prefix}bn{i}")
        act = layers.Activation("relu", name=f"{prefix}relu{i}")
        x = act(bn(conv(x)))
        names += [conv.name, bn.name, act.name]
        if i < len(filters):
            pool = layers.MaxPooling2D(2, name=f"{prefix}pool{i}")
            x = pool(x)
            names.append(pool.name)
    return x, names


def apply_backbone(name: str, x, prefix: str = "", cnn_filters=CNN3_FILTERS) -> Backbone:
    """Build backbone ``name`` on the symbolic tensor ``x`` ``(N, H, W, C)``, flat.

    ``prefix`` is prepended to every backbone layer name (DenRes-131 holds two backbones whose
    Keras names collide, e.g. ``conv1_conv``). Returns a :class:`Backbone`.
    """
    check_backbone(name)
    if name == "cnn3":
        out, names = _cnn3(x, cnn_filters, prefix=prefix + "cnn_")
        return Backbone(name, out, out, names, prefix)
    app = getattr(keras.applications, _APPS[name])
    model = app(include_top=False, weights=None, input_tensor=x)
    # The applications model runs from the source Input(s) of x; only the layers after x are
    # the backbone's own (layers reached before x belong to the caller).
    own = [l for l in model.layers if not isinstance(l, layers.InputLayer)]
    before = _layers_before(x)
    own = [l for l in own if id(l) not in before]
    if prefix:
        for l in own:
            l.name = prefix + l.name
    out = model.get_layer(prefix + OUTPUT[name]).output
    feats = model.get_layer(prefix + LAST_CONV[name]).output
    return Backbone(name, out, feats, [l.name for l in own], prefix)


def _layers_before(x) -> set[int]:
    """ids of the operations upstream of the symbolic tensor ``x`` (inclusive)."""
    seen: set[int] = set()
    stack = [x]
    while stack:
        t = stack.pop()
        hist = getattr(t, "_keras_history", None)
        if hist is None:
            continue
        op = hist[0]
        if id(op) in seen:
            continue
        seen.add(id(op))
        node = op._inbound_nodes[hist[1]]
        stack.extend(node.input_tensors)
    return seen


def standalone(name: str, input_shape: tuple[int, int, int], cnn_filters=CNN3_FILTERS) -> keras.Model:
    """A standalone backbone model ``Input(input_shape) -> backbone output`` (weights=None).

    Used as the reference structure when loading a local weights file and by the tests to write
    one. Layer names are the backbone's own (no prefix).
    """
    inp = keras.Input(input_shape, name="input_layer")
    bb = apply_backbone(name, inp, cnn_filters=cnn_filters)
    return keras.Model(inp, bb.output, name=f"{name}_backbone")


def shared_backbone(name: str, hw: tuple[int, int], cnn_filters=CNN3_FILTERS) -> keras.Model:
    """A 1-channel backbone template ``Input((H, W, 1)) -> last conv feature map``.

    Apply it flat to several tensors with :func:`replay`: the same layer objects (one set of
    weights) are called on each tensor, so the outer graph holds the backbone once, reused.
    Its intermediate stages (:data:`STAGES`) are the template's layers of those names.
    """
    inp = keras.Input((hw[0], hw[1], 1), name="shared_backbone_template")
    bb = apply_backbone(name, inp, cnn_filters=cnn_filters)
    return keras.Model(inp, bb.features, name=f"{name}_shared")


def replay(template: keras.Model, x, taps: dict | None = None):
    """Call ``template``'s layers, in graph order, on the symbolic tensor ``x``: a flat (not
    nested) application of the same layers, returning the template's output for input ``x``.

    ``taps``: ``{layer name: callable tensor -> tensor}``: the output of that template layer, for
    this call, goes through the callable and every later layer reads its result. The RGB family
    passes a split per stain -> one identity layer each (``feat_r_s16``, ...) -> stacked again
    (``attention._per_channel``): the computation is unchanged (no weights), but each stain's
    intermediate map is a layer of its own in the outer graph, with a well-defined ``.output`` (the
    template layer itself is called once per replay).
    """
    if not taps:
        return template._run_through_graph([x], operation_fn=lambda op: op)
    missing = sorted(set(taps) - {l.name for l in template.layers})
    if missing:
        raise ValueError(f"replay: template {template.name!r} has no layer(s) {missing}")
    by_id = {id(template.get_layer(n)): ident for n, ident in taps.items()}

    def operation_fn(op):
        ident = by_id.get(id(op))
        if ident is None:
            return op
        return lambda *args, **kwargs: ident(op(*args, **kwargs))

    return template._run_through_graph([x], operation_fn=operation_fn)
