"""Vision Transformer (study.md section 5; Dosovitskiy et al. 2021), small by default.

Patches of ``patch_size`` px are linearly projected to ``width`` (a strided conv,
``vit_patch_embed``), a learned position embedding is added (``vit_pos_embed``), ``depth`` encoder
blocks follow (pre-norm: LayerNorm -> ``num_heads``-head self-attention -> residual; LayerNorm ->
MLP ``mlp_dim`` GELU -> residual; the attention of eq. 6-9 with Q = K = V = the tokens), a final
LayerNorm, and the tokens are laid back on their ``(S/p) x (S/p)`` grid (``vit_grid``, the 4-D map
Grad-CAM uses) before the shared head (global average pooling over the grid = mean over tokens).

Defaults are sized for ~200-1,000 training images: width 64, depth 4, 4 heads, MLP 128, and a
patch size giving a grid of at most 16 x 16 tokens (:func:`default_patch_size`).
"""
from __future__ import annotations

import keras
from keras import layers, ops

from cellstudy.learning.models.head import classification_head



@keras.saving.register_keras_serializable(package="cellstudy")
class PositionEmbedding(layers.Layer):
    """Adds a learned ``(T, D)`` position embedding to tokens ``(N, T, D)``."""

    def build(self, input_shape):
        self.embedding = self.add_weight(
            name="embedding", shape=(int(input_shape[1]), int(input_shape[2])),
            initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, x):
        return x + ops.cast(self.embedding, x.dtype)[None]


def default_patch_size(hw) -> int:
    """Smallest p in (2, 4, 8, 16, 32) dividing both sides with a grid of <= 16 per side."""
    for p in (2, 4, 8, 16, 32):
        if hw[0] % p == 0 and hw[1] % p == 0 and max(hw) // p <= 16:
            return p
    raise ValueError(f"vit: no default patch size for input_size {hw[0]}x{hw[1]} (tried 2, 4, 8, 16, 32 "
                     "with a grid <= 16 x 16); pass patch_size= explicitly, dividing the input size")


def build_vit(hw, n_classes=2, head=None, weights=None, weights_sha256=None, patch_size=None,
              width=64, depth=4, num_heads=4, mlp_dim=128, attention_dropout=0.0):
    """Build the ViT at input (H, W, 3). H and W must be multiples of ``patch_size``."""
    if weights is not None:
        raise ValueError("vit: weights must be None (no pretrained ViT weights are used in this study)")
    p = default_patch_size(hw) if patch_size is None else int(patch_size)
    if p < 1 or hw[0] % p or hw[1] % p:
        raise ValueError(f"vit: input_size {hw[0]}x{hw[1]} is not a multiple of patch_size={p}; "
                         f"choose an input size divisible by {p} or another patch_size")
    for k, v in {"width": width, "depth": depth, "num_heads": num_heads, "mlp_dim": mlp_dim}.items():
        if int(v) < 1:
            raise ValueError(f"vit: {k}={v!r}; expected a positive int")
    if width % num_heads:
        raise ValueError(f"vit: width={width} is not a multiple of num_heads={num_heads}")
    gh, gw = hw[0] // p, hw[1] // p
    inp = keras.Input((hw[0], hw[1], 3), name="image")
    x = layers.Conv2D(width, p, strides=p, name="vit_patch_embed")(inp)
    x = layers.Reshape((gh * gw, width), name="vit_tokens")(x)
    x = PositionEmbedding(name="vit_pos_embed")(x)
    for i in range(1, depth + 1):
        y = layers.LayerNormalization(epsilon=1e-6, name=f"vit_block{i}_ln1")(x)
        y = layers.MultiHeadAttention(num_heads, width // num_heads, dropout=attention_dropout,
                                      name=f"vit_block{i}_attn")(y, y)
        x = layers.Add(name=f"vit_block{i}_add1")([x, y])
        y = layers.LayerNormalization(epsilon=1e-6, name=f"vit_block{i}_ln2")(x)
        y = layers.Dense(mlp_dim, activation="gelu", name=f"vit_block{i}_mlp1")(y)
        y = layers.Dense(width, name=f"vit_block{i}_mlp2")(y)
        x = layers.Add(name=f"vit_block{i}_add2")([x, y])
    x = layers.LayerNormalization(epsilon=1e-6, name="vit_ln")(x)
    x = layers.Reshape((gh, gw, width), name="vit_grid")(x)
    out = classification_head(x, n_classes, **(head or {}))
    return keras.Model(inp, out, name="vit")
