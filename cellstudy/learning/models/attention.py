"""RGB and MHL families: attention over the spatial tokens of a CNN backbone (paper 3.2).

**RGB family** (``rgb`` = 3-layer CNN, ``rgb_res`` = ResNet50, ``rgb_den`` = DenseNet121).
The isolator splits the image into its 1-channel images ``X_R, X_G, X_B`` and stacks them on
the batch axis (``isolate``, :class:`StackChannels`: ``(N, H, W, 3) -> (3N, H, W, 1)``). ONE backbone
``f`` (one set of weights) runs once on the stacked batch and is split again per channel
(``unstack``): ``F_c = f(X_c)``, ``(h, w, C)`` (eq. 3's per-channel features). One pass over the
stacked batch, not one call per channel, so that its BatchNorm layers normalise the three stains in
training with the statistics they keep for inference (the three calls used before 2026-12-07
normalised each stain by its own batch statistics in training, while inference applied a mix of
them, weighted to the last stain's: the training and the test network differed). The spatial
positions of ``F_c`` are the tokens, average-pooled to at most ``max_token_grid`` per side, and
projected to a common width ``d = token_dim`` (16 by default, the catalogue's ``RGB_ATTENTION_DEFAULTS``; the MHL family's is 128):
``T_c = F_c W_c`` (``tokens_r/g/b``, ``(N, T, d)``). Six 2-head attention blocks form the upper
triangle of eq. 4-5: self-attention RR, GG, BB and cross-attention RG, RB, GB with queries from the
first channel and keys / values from the second (eq. 6-9:
``A_ab = softmax(Q_a K_b^T / sqrt(d_k)) V_b``, ``Q_a = T_a W_Q``, ``K_b = T_b W_K``, ``V_b = T_b W_V``,
heads concatenated and projected). Each block adds its query tokens (residual) and is
LayerNorm-ed (``att_ab_ln``), pooled over tokens (``att_ab_pool``); the six vectors are
concatenated (eq. 3, ``att_concat``) and go to the shared head.

Grad-CAM layers (``gradcam_layers``): ``feat_r``, ``feat_g``, ``feat_b``. The shared backbone's
layers (e.g. ``conv5_block3_out``) are a 1-channel template's, replayed on the stacked batch, so
their ``.output`` is the template's (on its own ``(H, W, 1)`` input), not connected to the
model's input. The last conv feature map is split per channel (``unstack``) and each part goes
through an identity layer (``Activation("linear")``) named ``feat_<c>``: the 4-D
``(N, h, w, C)`` feature map of channel c is ``model.get_layer("feat_r").output`` (``feat_g``,
``feat_b``), and ``keras.Model(model.inputs, [model.get_layer("feat_r").output, model.output])``
gives it with the prediction; its gradient is the gradient w.r.t. the backbone's map for that
channel. The same is done for the intermediate stages (the Grad-CAM candidates of
``backbones.STAGES`` below the last map: ResNet50 ``conv4_block6_out`` / ``conv3_block4_out`` /
``conv2_block3_out``, DenseNet121 ``pool4_relu`` / ``pool3_relu`` / ``pool2_relu``), named by
their nominal stride: ``feat_<c>_s16``, ``feat_<c>_s8``, ``feat_<c>_s4`` (:data:`STAGE_TAPS`).
These identity layers sit inline (split, identities, stacked again by ``restack_s<stride>``;
the next backbone layer reads the stacked map), so they are part of the model, have no weights
and change no number: ``gradcam_layers(model, min_size=...)`` picks among ``feat_<c>`` and
``feat_<c>_s<stride>`` the deepest map of at least min_size.

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
    """``(N, H, W, C) -> (N, H, W, 1)``: channel ``index`` of the input (the isolator of the RGB
    models saved before 2026-12-07; kept so that they still load)."""

    def __init__(self, index: int, **kwargs):
        super().__init__(**kwargs)
        self.index = int(index)

    def call(self, x):
        return x[..., self.index:self.index + 1]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1,)

    def get_config(self):
        return {**super().get_config(), "index": self.index}


@keras.saving.register_keras_serializable(package="cellstudy")
class StackChannels(layers.Layer):
    """The isolator: ``(N, H, W, C) -> (C * N, H, W, 1)``, the C 1-channel images stacked along
    the batch axis, channel-major (rows ``c * N .. c * N + N - 1`` are channel c).

    The shared backbone then sees the three stains as ONE batch: in training its BatchNorm layers
    normalise every stain with the statistics of the whole stacked batch and track those in their
    moving averages, the statistics they apply in inference. (Calling the shared layers once per
    stain instead normalised each stain by its own batch statistics in training while the moving
    averages, updated three times per step, mixed them: inference then differed from training.)"""

    def batch_multiplier(self, m, inputs):
        """Images on the batch axis per input image (``cellstudy.learning.flops``): x C."""
        return [m[0] * int(inputs[0].shape[-1])]

    def call(self, x):
        h, w = (int(v) for v in x.shape[1:3])
        x = keras.ops.transpose(x, (3, 0, 1, 2))
        return keras.ops.reshape(x, (-1, h, w, 1))

    def compute_output_shape(self, input_shape):
        return (None,) + tuple(input_shape[1:3]) + (1,)


@keras.saving.register_keras_serializable(package="cellstudy")
class UnstackChannels(layers.Layer):
    """``(n * N, h, w, F)`` (stacked by :class:`StackChannels`) -> ``n`` tensors ``(N, h, w, F)``."""

    def __init__(self, n: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.n = int(n)

    def batch_multiplier(self, m, inputs):
        """Each output holds 1 / n of the input's images (``cellstudy.learning.flops``)."""
        return [m[0] / self.n] * self.n

    def call(self, x):
        y = keras.ops.reshape(x, (self.n, -1) + tuple(int(v) for v in x.shape[1:]))
        return [y[i] for i in range(self.n)]

    def compute_output_shape(self, input_shape):
        return [(None,) + tuple(input_shape[1:])] * self.n

    def get_config(self):
        return {**super().get_config(), "n": self.n}


@keras.saving.register_keras_serializable(package="cellstudy")
class StackMaps(layers.Layer):
    """``n`` tensors ``(N, h, w, F)`` -> ``(n * N, h, w, F)``: back onto the batch axis, in order."""

    def batch_multiplier(self, m, inputs):
        """The inputs' images together (``cellstudy.learning.flops``)."""
        return [sum(m)]

    def call(self, xs):
        return keras.ops.concatenate(list(xs), axis=0)

    def compute_output_shape(self, input_shapes):
        return (None,) + tuple(input_shapes[0][1:])


def _per_channel(name_of, unstack_name, stack_name=None):
    """A function on a stacked map ``(3N, h, w, F)``: unstack it, pass channel c's map through an
    identity layer ``name_of(c)`` (its own layer in the outer graph, Grad-CAM's target), and, with
    ``stack_name``, stack the three back (the backbone goes on with them; without, the list of the
    three identities' outputs). No weights, no change to any number."""
    unstack = UnstackChannels(len(CHANNEL_KEYS), name=unstack_name)
    idents = [layers.Activation("linear", name=name_of(c)) for c in CHANNEL_KEYS]
    stack = StackMaps(name=stack_name) if stack_name else None

    def apply(y):
        parts = [ident(p) for ident, p in zip(idents, unstack(y))]
        return stack(parts) if stack is not None else parts
    return apply


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
    stacked = StackChannels(name="isolate")(inp)
    taps = {n: _per_channel(lambda c, st=st: tap_name(c, st), f"unstack_s{st}", f"restack_s{st}")
            for n, st in stage_taps(backbone).items()}
    feats = _per_channel(tap_name, "unstack")(bbs.replay(template, stacked, taps))
    toks = {c: _tokens(f, int(max_token_grid), f"_{c}", token_dim) for c, f in zip(CHANNEL_KEYS, feats)}
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
