"""DL family: VGG16, ResNet50, DenseNet121 (Keras Applications backbones, no top) + the head.

Paper 3.1: a pretrained backbone ``f`` maps the image ``X`` (S x S x 3) to a feature map
``F = f(X)`` (h x w x C), global average pooling and the dense head give ``p = softmax(W F̄ + b)``.
"""
from __future__ import annotations

import keras

from cellstudy.learning.models import backbones as bbs
from cellstudy.learning.models.head import classification_head

DL_BACKBONE = {"vgg16": "vgg16", "resnet50": "resnet50", "densenet121": "densenet121"}


def build_dl(network: str, hw, n_classes=2, head=None, weights=None, weights_sha256=None):
    """Build ``network`` (vgg16 / resnet50 / densenet121) at input (H, W, 3)."""
    backbone = DL_BACKBONE[network]
    bbs.check_min_size(network, backbone, hw)
    inp = keras.Input((hw[0], hw[1], 3), name="image")
    bb = bbs.apply_backbone(backbone, inp)
    out = classification_head(bb.output, n_classes, **(head or {}))
    model = keras.Model(inp, out, name=network)
    if weights is not None:
        from cellstudy.learning.models.weights import load_backbone_weights
        load_backbone_weights(model, backbone, weights, hw, sha256=weights_sha256)
    return model
