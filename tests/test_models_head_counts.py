"""cellstudy.learning.models.describe.head_parameter_counts (chapter 10's head table) against counts by hand
and against a real build with the Flatten head. Tiny sizes only."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

keras = pytest.importorskip("keras")

from cellstudy.learning import models  # noqa: E402
from cellstudy.learning.models.describe import head_parameter_counts  # noqa: E402

VGG16_CONV = 14_714_688  # VGG16's 13 conv layers (Simonyan & Zisserman; Keras Applications)


def _dense(n_in, n_out):
    return n_in * n_out + n_out


def test_vgg16_at_64_by_hand_and_against_a_flatten_build():
    c = head_parameter_counts("vgg16", 64)
    ours_head = _dense(512, 1024) + _dense(1024, 512) + _dense(512, 2)
    flat_head = _dense(2 * 2 * 512, 1024) + _dense(1024, 512) + _dense(512, 2)  # a 2 x 2 x 512 map
    assert c == {"feature map into the head": "2x2x512", "params (ours)": VGG16_CONV + ours_head,
                 "head (ours)": ours_head, "params (Flatten head)": VGG16_CONV + flat_head,
                 "head (Flatten)": flat_head}
    keras.backend.clear_session()
    assert models.build("vgg16", 64, head_pooling="flatten").count_params() == c["params (Flatten head)"]


def test_mhl_pooled_tokens_flatten_changes_nothing_and_custom_units():
    c = head_parameter_counts("mhl", 32)
    keras.backend.clear_session()
    m = models.build("mhl", 32)
    assert c["params (ours)"] == m.count_params() == c["params (Flatten head)"]
    width = int(c["feature map into the head"])  # a pooled vector: one dimension
    assert c["head (ours)"] == c["head (Flatten)"] == _dense(width, 1024) + _dense(1024, 512) + _dense(512, 2)
    keras.backend.clear_session()
    small = head_parameter_counts("mhl", 32, head_units=(16,))
    assert small["head (ours)"] == _dense(width, 16) + _dense(16, 2)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown network 'vgg17'"):
        head_parameter_counts("vgg17", 32)
    with pytest.raises(ValueError, match="head_pooling='flatten'"):
        head_parameter_counts("vgg16", 32, head_pooling="flatten")
