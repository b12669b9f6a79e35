"""Convolutional backbones built *flat* into the caller's graph.

A backbone is applied to a symbolic tensor with :func:`apply_backbone`; its layers become layers
of the outer model (``keras.applications.*(input_tensor=...)``), so every intermediate feature map
and its gradient is reachable by name. Nothing is downloaded: backbones are built with
``weights=None`` and pretrained weights come from a local file (:mod:`cellstudy.models.weights`).

Backbones (name -> last convolutional feature map, the default Grad-CAM layer):

- ``vgg16``: ``block5_conv3`` (stride 16); the backbone output is ``block5_pool`` (stride 32).
- ``resnet50``: ``conv5_block3_out`` (stride 32).
- ``densenet121``: ``relu`` (stride 32, the final BN + ReLU).
- ``cnn3``: the paper's 3-layer CNN for RGB / MHL: three blocks Conv 3x3 -> BatchNorm -> ReLU,
  with 2x2 max pooling after the first two (stride 4): ``cnn_relu3``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
from keras import layers

BACKBONES = ("vgg16", "resnet50", "densenet121", "cnn3")

#: Smallest input side each backbone accepts (pixels).
MIN_SIZE = {"vgg16": 32, "resnet50": 32, "densenet121": 32, "cnn3": 8}

#: The last convolutional feature map (Grad-CAM target) of each backbone.
LAST_CONV = {"vgg16": "block5_conv3", "resnet50": "conv5_block3_out", "densenet121": "relu",
             "cnn3": "cnn_relu3"}

#: Output layer of each backbone (what the head / tokens read).
OUTPUT = {"vgg16": "block5_pool", "resnet50": "conv5_block3_out", "densenet121": "relu",
          "cnn3": "cnn_relu3"}

#: Default filters of the 3-layer CNN.
CNN3_FILTERS = (32, 64, 128)

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
    """
    inp = keras.Input((hw[0], hw[1], 1), name="shared_backbone_template")
    bb = apply_backbone(name, inp, cnn_filters=cnn_filters)
    return keras.Model(inp, bb.features, name=f"{name}_shared")


def replay(template: keras.Model, x):
    """Call ``template``'s layers, in graph order, on the symbolic tensor ``x``: a flat (not
    nested) application of the same layers, returning the template's output for input ``x``."""
    return template._run_through_graph([x], operation_fn=lambda op: op)
