import keras
import pytest

import cellstudy  # noqa: F401  (oneDNN before TensorFlow)
from cellstudy.learning import flops


def test_flops_of_a_tiny_model_by_hand():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)          # 2*8*8*3*3*3*4 = 13824
    x = keras.layers.MaxPooling2D()(x)                          # not counted
    x = keras.layers.Conv2D(2, 1)(x)                            # 2*4*4*1*1*4*2 = 256
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(5)(x)                              # 2*32*5 = 320
    m = keras.Model(inp, out)
    assert flops.forward_flops(m) == 13824 + 256 + 320
    assert flops.training_flops(m) == 3 * (13824 + 256 + 320)


def test_attention_flops_by_hand():
    q = keras.Input((4, 6))
    att = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)
    m = keras.Model(q, att(q, q))
    # projections: q, k, v 4*6*2*3 each, output 4*2*3*6; scores + sum 2*4*4*(3+3)
    expect = 2 * (3 * 4 * 6 * 2 * 3 + 4 * 2 * 3 * 6) + 2 * 2 * 4 * 4 * 6
    assert flops.forward_flops(m) == pytest.approx(expect)


def test_the_rgb_familys_shared_backbone_counts_once_per_stain():
    """RGB runs its one 3-layer CNN over the three stains stacked on the batch axis: per image
    its convolutions count three times (1-channel input), never for the template the backbone is
    built from; the MHL network's same CNN on the RGB image counts once."""
    from cellstudy.learning import models

    s = 32
    cnn = {1: 2 * s * s * 9 * 1 * 32, 2: 2 * (s // 2) ** 2 * 9 * 32 * 64, 3: 2 * (s // 4) ** 2 * 9 * 64 * 128}
    rgb, mhl = models.build("rgb", s), models.build("mhl", s)

    rgb_convs = flops.forward_flops(keras.Model(rgb.inputs, rgb.get_layer("feat_b").output))
    assert rgb_convs == 3 * sum(cnn.values())
    mhl_convs = flops.forward_flops(keras.Model(mhl.inputs, mhl.get_layer("cnn_relu3").output))
    assert mhl_convs == sum(cnn.values()) + 2 * s * s * 9 * 2 * 32   # 3 input channels, not 1
    # the whole network: its backbone's three passes and the rest (tokens, attention, head) once
    assert flops.forward_flops(rgb) > rgb_convs
