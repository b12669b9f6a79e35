"""DenRes-131: ResNet50 and DenseNet121 side by side on one input (study.md section 5).

Four levels are tapped per backbone, at strides 4, 8, 16 and 32 (56/28/14/7 at 224):
ResNet50 ``conv2_block3_out``, ``conv3_block4_out``, ``conv4_block6_out``, ``conv5_block3_out``;
DenseNet121 ``pool2_relu``, ``pool3_relu``, ``pool4_relu``, ``relu``. Level ``l``'s pair is
concatenated (``F_l = [R_l, D_l]``), a conv (``level_filters`` filters, ``level_kernel``, ReLU) and
average pooling bring it to the stride-32 grid, the four levels are concatenated and go to the
shared head. Layer names: ResNet50 layers carry the prefix ``res_``, DenseNet121 layers ``den_``
(their Keras names collide), the fusion layers ``denres_``.

When S is not a multiple of 32 the two backbones' grids can differ by one cell (at 48 px ResNet50's
conv5 is 2 x 2, DenseNet121's is 1 x 1): the larger map of a pair is average-pooled to the smaller,
and the common target grid is the smallest stride-32 map.
"""
from __future__ import annotations

import keras
from keras import layers

from cellstudy.learning.models import backbones as bbs
from cellstudy.learning.models.head import classification_head

RES_LEVELS = ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")
DEN_LEVELS = ("pool2_relu", "pool3_relu", "pool4_relu", "relu")


def pool_to(x, size: tuple[int, int], name: str):
    """Average-pool ``x`` (N, h, w, C) to exactly ``size`` = (h', w') <= (h, w): stride
    ``s = h // h'``, window ``k = h - (h' - 1) s`` (so the output has h' rows). Identity if equal."""
    h, w = int(x.shape[1]), int(x.shape[2])
    if (h, w) == tuple(size):
        return x
    sh, sw = h // size[0], w // size[1]
    kh, kw = h - (size[0] - 1) * sh, w - (size[1] - 1) * sw
    return layers.AveragePooling2D((kh, kw), strides=(sh, sw), name=name)(x)


def build_denres(hw, n_classes=2, head=None, weights=None, weights_sha256=None,
                 level_filters=256, level_kernel=3):
    """Build DenRes-131 at input (H, W, 3). ``weights``: None or a mapping
    ``{"resnet50": path, "densenet121": path}`` (either key may be missing);
    ``weights_sha256`` likewise a mapping (or None)."""
    for b in ("resnet50", "densenet121"):
        bbs.check_min_size("denres131", b, hw)
    if int(level_filters) < 1 or int(level_kernel) < 1:
        raise ValueError(f"level_filters={level_filters!r}, level_kernel={level_kernel!r}: expected positive ints")
    inp = keras.Input((hw[0], hw[1], 3), name="image")
    res = bbs.apply_backbone("resnet50", inp, prefix="res_")
    den = bbs.apply_backbone("densenet121", inp, prefix="den_")
    m = keras.Model(inp, [res.output, den.output])  # only to look the taps up by name
    r_maps = [m.get_layer("res_" + n).output for n in RES_LEVELS]
    d_maps = [m.get_layer("den_" + n).output for n in DEN_LEVELS]
    target = (min(int(r_maps[-1].shape[1]), int(d_maps[-1].shape[1])),
              min(int(r_maps[-1].shape[2]), int(d_maps[-1].shape[2])))
    fused = []
    for lvl, (r, d) in enumerate(zip(r_maps, d_maps), start=1):
        size = (min(int(r.shape[1]), int(d.shape[1])), min(int(r.shape[2]), int(d.shape[2])))
        r = pool_to(r, size, f"denres_l{lvl}_res_align")
        d = pool_to(d, size, f"denres_l{lvl}_den_align")
        x = layers.Concatenate(name=f"denres_l{lvl}_concat")([r, d])
        x = layers.Conv2D(int(level_filters), int(level_kernel), padding="same", activation="relu",
                          name=f"denres_l{lvl}_conv")(x)
        x = pool_to(x, target, f"denres_l{lvl}_pool")
        fused.append(x)
    x = layers.Concatenate(name="denres_concat")(fused)
    out = classification_head(x, n_classes, **(head or {}))
    model = keras.Model(inp, out, name="denres131")
    if weights is not None:
        from cellstudy.learning.models.weights import load_backbone_weights
        if not isinstance(weights, dict) or set(weights) - {"resnet50", "densenet121"}:
            raise ValueError(f"denres131 weights={weights!r}; expected a mapping "
                             "{'resnet50': path, 'densenet121': path}")
        sha = weights_sha256 or {}
        for b, prefix in (("resnet50", "res_"), ("densenet121", "den_")):
            if weights.get(b) is not None:
                load_backbone_weights(model, b, weights[b], hw, prefix=prefix, sha256=sha.get(b))
    return model
