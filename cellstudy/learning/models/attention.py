"""RGB and MHL families: attention over the spatial tokens of a CNN backbone (paper 3.2).

**RGB family** (``rgb`` = 3-layer CNN, ``rgb_res`` = ResNet50, ``rgb_den`` = DenseNet121).
The isolator splits the image into its 1-channel images ``X_R, X_G, X_B`` (``isolate_r/g/b``).
ONE backbone ``f`` (one set of weights) is applied to each: ``F_c = f(X_c)``, ``(h, w, C)``
(eq. 3's per-channel features). The spatial positions of ``F_c`` are the tokens, average-pooled to
at most ``max_token_grid`` per side, and projected to a common width ``d = token_dim`` (16 by
default, the catalogue's ``RGB_ATTENTION_DEFAULTS``; the MHL family's is 128):
``T_c = F_c W_c`` (``tokens_r/g/b``, ``(N, T, d)``). Six 2-head attention blocks form the upper
triangle of eq. 4-5: self-attention RR, GG, BB and cross-attention RG, RB, GB with queries from the
first channel and keys / values from the second (eq. 6-9:
``A_ab = softmax(Q_a K_b^T / sqrt(d_k)) V_b``, ``Q_a = T_a W_Q``, ``K_b = T_b W_K``, ``V_b = T_b W_V``,
heads concatenated and projected). Each block adds its query tokens (residual) and is
LayerNorm-ed (``att_ab_ln``), pooled over tokens (``att_ab_pool``); the six vectors are
concatenated (eq. 3, ``att_concat``) and go to the shared head.

Grad-CAM layers (``gradcam_layers``): ``feat_r``, ``feat_g``, ``feat_b``. The shared backbone's
layers (e.g. ``conv5_block3_out``) are called three times, so their ``.output`` is ill-defined (it
is a 1-channel template's, not connected to the model's input). Each call's last conv feature map
goes through an identity layer (``Activation("linear")``) named ``feat_<c>``: the 4-D
``(N, h, w, C)`` feature map of channel c is ``model.get_layer("feat_r").output`` (``feat_g``,
``feat_b``), and ``keras.Model(model.inputs, [model.get_layer("feat_r").output, model.output])``
gives it with the prediction; its gradient is the gradient w.r.t. the backbone's map for that
channel. The same is done for each call's intermediate stages (the Grad-CAM candidates of
``backbones.STAGES`` below the last map: ResNet50 ``conv4_block6_out`` / ``conv3_block4_out`` /
``conv2_block3_out``, DenseNet121 ``pool4_relu`` / ``pool3_relu`` / ``pool2_relu``), named by
their nominal stride: ``feat_<c>_s16``, ``feat_<c>_s8``, ``feat_<c>_s4`` (:data:`STAGE_TAPS`).
These identity layers sit inline (the next backbone layer reads their output), so they are part
of the model, have no weights and change no number: ``gradcam_layers(model, min_size=...)``
picks among ``feat_<c>`` and ``feat_<c>_s<stride>`` the deepest map of at least min_size.

**MHL family** (``mhl``, ``mhl_res``, ``mhl_den``): the same backbones on the whole RGB image,
tokens projected to ``d`` (``tokens``), one 2-head self-attention block (eq. 10-11, ``att_self``),
residual + LayerNorm, pooled over tokens, head. Grad-CAM layer: the backbone's last conv map
(``cnn_relu3``, ``conv5_block3_out``, ``relu``).
"""
from __future__ import annotations

import keras
from keras import layers

from cellstudy.learning.models import backbones as bbs
from cellstudy.learning.models.denres import pool_to
from cellstudy.learning.models.head import classification_head
from cellstudy.networks import ATTENTION_DEFAULTS, RGB_ATTENTION_DEFAULTS

RGB_BACKBONE = {"rgb": "cnn3", "rgb_res": "resnet50", "rgb_den": "densenet121"}
MHL_BACKBONE = {"mhl": "cnn3", "mhl_res": "resnet50", "mhl_den": "densenet121"}
CHANNEL_KEYS = ("r", "g", "b")
#: The six attention blocks of the RGB family (query channel, key/value channel).
RGB_BLOCKS = (("r", "r"), ("g", "g"), ("b", "b"), ("r", "g"), ("r", "b"), ("g", "b"))


def stage_taps(backbone: str) -> dict[str, int]:
    """The intermediate stages of an RGB-family backbone that get per-channel identity layers:
    ``{backbone layer name: nominal stride}`` (every Grad-CAM candidate but the last conv map,
    which is ``feat_<c>``). Empty for the 3-layer CNN (its only candidate is its last map)."""
    return {name: stride for name, stride in bbs.STAGES[backbone][1:]}


def tap_name(channel: str, stride: int | None = None) -> str:
    """Name of the identity layer on channel ``channel``'s map: ``feat_<c>`` (the last conv map,
    ``stride`` None) or ``feat_<c>_s<stride>``."""
    return f"feat_{channel}" if stride is None else f"feat_{channel}_s{int(stride)}"


@keras.saving.register_keras_serializable(package="cellstudy")
class ChannelSlice(layers.Layer):
    """``(N, H, W, C) -> (N, H, W, 1)``: channel ``index`` of the input (the isolator)."""

    def __init__(self, index: int, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, x):
        return x[..., self.index:self.index + 1]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1,)

    def get_config(self):
        return {**super().get_config(), "index": self.index}


def _check(token_dim, num_heads, max_token_grid):
    if int(token_dim) < 1 or int(num_heads) < 1 or int(max_token_grid) < 1:
        raise ValueError(f"token_dim={token_dim!r}, num_heads={num_heads!r}, "
                         f"max_token_grid={max_token_grid!r}: expected positive ints")
    if token_dim % num_heads:
        raise ValueError(f"token_dim={token_dim} is not a multiple of num_heads={num_heads}")


def _tokens(f, max_token_grid, suffix, token_dim):
    """(N, h, w, C) -> pooled to <= max_token_grid per side -> (N, T, token_dim)."""
    h, w = int(f.shape[1]), int(f.shape[2])
    g = (min(h, max_token_grid), min(w, max_token_grid))
    f = pool_to(f, g, f"tokpool{suffix}")
    t = layers.Reshape((g[0] * g[1], int(f.shape[3])), name=f"tokens_flat{suffix}")(f)
    return layers.Dense(int(token_dim), name=f"tokens{suffix}")(t)


def _attend(q, kv, name, num_heads, token_dim, pooling):
    y = layers.MultiHeadAttention(int(num_heads), int(token_dim) // int(num_heads), name=name)(q, kv)
    y = layers.Add(name=f"{name}_add")([q, y])
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(y)
    pool = layers.GlobalMaxPooling1D if pooling == "max" else layers.GlobalAveragePooling1D
    if pooling == "flatten":
        return layers.Flatten(name=f"{name}_pool")(y)
    return pool(name=f"{name}_pool")(y)


def _start(network, backbone, hw, head, token_dim, num_heads, max_token_grid):
    """What both families' builders check and start from: ``(backbone, head parameters, the
    image input (H, W, 3))``."""
    bbs.check_min_size(network, backbone, hw)
    _check(token_dim, num_heads, max_token_grid)
    return backbone, dict(head or {}), keras.Input((hw[0], hw[1], 3), name="image")


def _finish(network, inp, x, n_classes, head, backbone, weights, weights_sha256, hw, cnn_filters):
    """The shared head on ``x``, the model, and the backbone's local weights file when given."""
    model = keras.Model(inp, classification_head(x, n_classes, **head), name=network)
    if weights is not None:
        from cellstudy.learning.models.weights import load_backbone_weights
        load_backbone_weights(model, backbone, weights, hw, sha256=weights_sha256, cnn_filters=cnn_filters)
    return model


def build_rgb(network, hw, n_classes=2, head=None, weights=None, weights_sha256=None,
              token_dim=RGB_ATTENTION_DEFAULTS["token_dim"], num_heads=2, max_token_grid=16,
              cnn_filters=bbs.CNN3_FILTERS):
    """Build ``rgb`` / ``rgb_res`` / ``rgb_den`` at input (H, W, 3) (see the module docstring)."""
    backbone, head, inp = _start(network, RGB_BACKBONE[network], hw, head, token_dim, num_heads, max_token_grid)
    template = bbs.shared_backbone(backbone, hw, cnn_filters=cnn_filters)
    toks = {}
    for i, c in enumerate(CHANNEL_KEYS):
        xc = ChannelSlice(i, name=f"isolate_{c}")(inp)
        taps = {n: layers.Activation("linear", name=tap_name(c, st))
                for n, st in stage_taps(backbone).items()}
        f = layers.Activation("linear", name=tap_name(c))(bbs.replay(template, xc, taps))
        toks[c] = _tokens(f, int(max_token_grid), f"_{c}", token_dim)
    pooled = [_attend(toks[a], toks[b], f"att_{a}{b}", num_heads, token_dim,
                      head.get("pooling", "avg")) for a, b in RGB_BLOCKS]
    x = layers.Concatenate(name="att_concat")(pooled)
    return _finish(network, inp, x, n_classes, head, backbone, weights, weights_sha256, hw, cnn_filters)


def build_mhl(network, hw, n_classes=2, head=None, weights=None, weights_sha256=None,
              token_dim=ATTENTION_DEFAULTS["token_dim"], num_heads=2, max_token_grid=16,
              cnn_filters=bbs.CNN3_FILTERS):
    """Build ``mhl`` / ``mhl_res`` / ``mhl_den`` at input (H, W, 3) (see the module docstring)."""
    backbone, head, inp = _start(network, MHL_BACKBONE[network], hw, head, token_dim, num_heads, max_token_grid)
    bb = bbs.apply_backbone(backbone, inp, cnn_filters=cnn_filters)
    t = _tokens(bb.features, int(max_token_grid), "", token_dim)
    x = _attend(t, t, "att_self", num_heads, token_dim, head.get("pooling", "avg"))
    return _finish(network, inp, x, n_classes, head, backbone, weights, weights_sha256, hw, cnn_filters)
