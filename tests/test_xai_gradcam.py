"""Grad-CAM (eq. 12-13) on hand-built Keras models: analytic CAMs, head detection, errors, tokens,
and agreement with a naive per-image implementation on a flat ResNet50."""
import os
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from cellstudy.explain import xai  # noqa: E402
from cellstudy.explain.xai import NoSoftmaxHeadError, gradcam, gradcam_multi, gradcam_tokens  # noqa: E402

S = 16
WEIGHTS = np.array([[1.0, -2.0], [-1.5, 0.5], [0.7, 1.2]])  # (K=3 channels, 2 classes)
BIAS = np.array([0.1, -0.2])


def _linear_cam_model(head="dense_softmax", stride=1):
    """input -> 1x1 identity conv "feat" -> GAP -> Dense(2) with WEIGHTS/BIAS (+ variants).

    logit_c = sum_k W[k, c] mean_ij x_k  =>  dlogit_c/dA^k_ij = W[k, c]/(h w), so
    CAM_c = ReLU(sum_k W[k, c] x_k) / (h w) (eq. 12-13) in closed form."""
    inp = keras.Input((S, S, 3))
    feat = keras.layers.Conv2D(3, 1, strides=stride, use_bias=False, name="feat")(inp)
    g = keras.layers.GlobalAveragePooling2D(name="gap")(feat)
    if head == "dense_softmax":
        dense = keras.layers.Dense(2, activation="softmax", name="out")
        out = dense(g)
    elif head == "float32_activation":  # mixed-precision style
        dense = keras.layers.Dense(2, activation="softmax", name="dense")
        out = keras.layers.Activation("linear", dtype="float32", name="out")(dense(g))
    elif head == "separate_softmax":
        dense = keras.layers.Dense(2, name="dense")
        out = keras.layers.Activation("softmax", name="out")(dense(g))
    elif head == "no_softmax":
        dense = keras.layers.Dense(2, activation="sigmoid", name="out")
        out = dense(g)
    model = keras.Model(inp, out, name=f"lin_{head}")
    model.get_layer("feat").set_weights([np.eye(3).reshape(1, 1, 3, 3)])
    dense.set_weights([WEIGHTS, BIAS])
    return model


def _closed_form(x, cls):
    cam = np.maximum(np.einsum("nhwk,nk->nhw", x, WEIGHTS[:, cls].T), 0) / (S * S)
    lo = cam.min(axis=(1, 2), keepdims=True)
    hi = cam.max(axis=(1, 2), keepdims=True)
    return cam, (cam - lo) / (hi - lo)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 1, size=(5, S, S, 3)).astype(np.float32)


@pytest.mark.parametrize("head", ["dense_softmax", "float32_activation", "separate_softmax"])
def test_gradcam_matches_closed_form(images, head):
    model = _linear_cam_model(head)
    cls = np.array([0, 1, 1, 0, 1])
    raw_expected, expected = _closed_form(images, cls)
    raw = gradcam(model, images, cls, layer="feat", normalize=False, batch_size=2)
    np.testing.assert_allclose(raw, raw_expected, rtol=1e-4, atol=1e-7)
    maps = gradcam(model, images, cls, layer="feat", batch_size=3)
    assert maps.shape == (5, S, S) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert maps.min() == 0.0 and maps.max() == 1.0
    # int class index, and the two classes give different maps
    m0 = gradcam(model, images, 0, layer="feat")
    np.testing.assert_allclose(m0, _closed_form(images, np.zeros(5, int))[1], atol=1e-5)
    assert np.abs(m0 - gradcam(model, images, 1, layer="feat")).max() > 0.5


def test_gradcam_predicted_class_and_constant_map(images):
    model = _linear_cam_model()
    pred = model.predict(images, verbose=0).argmax(1)
    np.testing.assert_allclose(gradcam(model, images, None, layer="feat"),
                               _closed_form(images, pred)[1], atol=1e-5)
    # a constant image gives a constant CAM -> all zeros
    const = np.full((2, S, S, 3), 0.5, np.float32)
    assert np.all(gradcam(model, const, 0, layer="feat") == 0)


def test_gradcam_downsampled_layer_is_upsampled(images):
    model = _linear_cam_model(stride=2)  # feature map 8x8, CAM on the even pixels
    cls = np.array([1, 0, 1, 0, 1])
    raw = gradcam(model, images, cls, layer="feat", normalize=False)
    low = np.maximum(np.einsum("nhwk,nk->nhw", images[:, ::2, ::2], WEIGHTS[:, cls].T), 0) / 64
    expected = tf.image.resize(low[..., None], (S, S), method="bilinear")[..., 0].numpy()
    assert raw.shape == (5, S, S)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-7)


def test_gradcam_default_layer_without_registry(images, monkeypatch):
    monkeypatch.setitem(sys.modules, "cellstudy.learning.models", None)  # import fails -> last 4-D layer
    model = _linear_cam_model()
    assert xai.default_layers(model) == ["feat"]
    np.testing.assert_allclose(gradcam(model, images, 1), gradcam(model, images, 1, layer="feat"),
                               atol=1e-6)


def _two_branch_model():
    """Two branches on x: "fa" (channel 0 only) and "fb" (channel 2 only) -> concat -> GAP -> Dense."""
    inp = keras.Input((S, S, 3))
    fa = keras.layers.Conv2D(1, 1, use_bias=False, name="fa")(inp)
    fb = keras.layers.Conv2D(1, 1, use_bias=False, name="fb")(inp)
    cat = keras.layers.Concatenate(name="cat")([fa, fb])
    out = keras.layers.Dense(2, activation="softmax", name="out")(
        keras.layers.GlobalAveragePooling2D()(cat))
    m = keras.Model(inp, out)
    m.get_layer("fa").set_weights([np.array([1.0, 0, 0]).reshape(1, 1, 3, 1)])
    m.get_layer("fb").set_weights([np.array([0, 0, 1.0]).reshape(1, 1, 3, 1)])
    m.get_layer("out").set_weights([np.array([[1.0, -1.0], [2.0, -2.0]]), np.zeros(2)])
    return m


def test_gradcam_multi_per_branch_and_combined(images):
    m = _two_branch_model()
    res = gradcam_multi(m, images, 0, ["fa", "fb"])
    assert set(res) == {"fa", "fb", "combined"}
    norm = xai.normalize_maps
    # class 0: logit = 1 * mean(fa) + 2 * mean(fb) -> raw CAMs x0 / hw and 2 x2 / hw; the two maps
    # of a cell share one maximum, the combined map is the raw mean min-max scaled once
    a, b = images[..., 0], 2 * images[..., 2]
    top = np.maximum(a.max(axis=(1, 2)), b.max(axis=(1, 2)))[:, None, None]
    np.testing.assert_allclose(res["fa"], a / top, atol=1e-5)
    np.testing.assert_allclose(res["fb"], b / top, atol=1e-5)
    assert np.allclose(np.maximum(res["fa"], res["fb"]).max(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(res["combined"], norm((a + b) / 2), atol=1e-5)
    # combine= restricts the layers averaged into combined
    only_a = gradcam_multi(m, images, 0, ["fa", "fb"], combine=["fa"])
    np.testing.assert_allclose(only_a["combined"], norm(a), atol=1e-5)
    np.testing.assert_allclose(only_a["fb"], res["fb"], atol=1e-6)
    with pytest.raises(ValueError, match="combine"):
        gradcam_multi(m, images, 0, ["fa", "fb"], combine=["fc"])
    # class 1 has negative weights on both -> ReLU kills everything -> zeros
    assert np.all(gradcam_multi(m, images, 1, ["fa", "fb"])["fa"] == 0)
    # gradcam with a list returns the combined map
    np.testing.assert_allclose(gradcam(m, images, 0, ["fa", "fb"]), res["combined"], atol=1e-6)


def test_gradcam_channels_of_very_different_strength_keep_their_ratio():
    """An R map of strength 50 and a G map of strength 1e-4 (the same image in both channels):
    scaled by one common maximum, G stays 2e-6 of R at every pixel (separate min-max scaling
    made both 1.0); the combined map is built from the raw maps."""
    m = _two_branch_model()
    m.get_layer("out").set_weights([np.array([[50.0, -1.0], [1e-4, -1.0]]), np.zeros(2)])
    g = np.random.default_rng(3).uniform(0.1, 1, size=(3, S, S)).astype(np.float32)
    x = np.stack([g, np.zeros_like(g), g], axis=-1)  # fa sees channel 0, fb channel 2: both g
    res = gradcam_multi(m, x, 0, ["fa", "fb"])
    np.testing.assert_allclose(res["fa"].max(axis=(1, 2)), 1.0, atol=1e-6)
    ratio = res["fb"] / res["fa"]
    np.testing.assert_allclose(ratio, 1e-4 / 50, rtol=1e-3)
    assert res["fb"].max() < 1e-5
    raw = [gradcam(m, x, 0, layer=n, normalize=False) for n in ("fa", "fb")]
    np.testing.assert_allclose(res["combined"], xai.normalize_maps((raw[0] + raw[1]) / 2), atol=1e-5)
    np.testing.assert_allclose(res["combined"], xai.normalize_maps(g), atol=1e-4)  # R dominates


def test_gradcam_default_layer_without_registry_respects_min_size(monkeypatch):
    """Outside the registry: the last 4-D layer whose map is >= min_size (the last one when
    none is, or with min_size None)."""
    monkeypatch.setitem(sys.modules, "cellstudy.learning.models", None)
    inp = keras.Input((S, S, 3))
    big = keras.layers.Conv2D(2, 1, name="big")(inp)
    small = keras.layers.Conv2D(2, 8, strides=8, name="small")(big)  # 2 x 2
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(small))
    m = keras.Model(inp, out)
    assert xai.default_layers(m) == ["big"]  # default min_size 4
    assert xai.default_layers(m, min_size=2) == ["small"]
    assert xai.default_layers(m, min_size=None) == ["small"]
    assert xai.default_layers(m, min_size=32) == ["small"]


def test_gradcam_default_layers_from_registry(images, monkeypatch):
    m = _two_branch_model()
    fake = types.ModuleType("cellstudy.learning.models")
    seen = []

    def registry(model, min_size=None):
        seen.append(min_size)
        return ["fa", "fb"]

    fake.gradcam_layers = registry
    monkeypatch.setitem(sys.modules, "cellstudy.learning.models", fake)
    np.testing.assert_allclose(gradcam(m, images, 0),
                               gradcam_multi(m, images, 0, ["fa", "fb"])["combined"], atol=1e-6)
    assert set(gradcam_multi(m, images, 0)) == {"fa", "fb", "combined"}
    gradcam_multi(m, images, 0, min_size=8)
    assert seen == [4, 4, 8]  # the default smallest map side, then the caller's (a scale's)

    def unknown(model, min_size=None):
        raise ValueError(f"unknown model {model.name!r}")

    fake.gradcam_layers = unknown
    with pytest.warns(UserWarning, match="unknown model"):
        assert xai.default_layers(m) == ["cat"]  # the last 4-D layer


def test_gradcam_errors(images):
    model = _linear_cam_model()
    with pytest.raises(ValueError, match=r"no layer named 'nope'.*\['feat'\]"):
        gradcam(model, images, 0, layer="nope")
    with pytest.raises(ValueError, match=r"'gap'.*outputs shape \(None, 3\).*4-D"):
        gradcam(model, images, 0, layer="gap")
    with pytest.raises(ValueError, match=r"expects \(16, 16, 3\).*expected 16, given 20"):
        gradcam(model, np.zeros((2, 20, 16, 3), np.float32), 0, layer="feat")
    with pytest.raises(ValueError, match=r"images\[None\]"):
        gradcam(model, images[0], 0, layer="feat")
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        gradcam(model, images, 2, layer="feat")
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        gradcam(model, images, np.array([0, 1]), layer="feat")
    with pytest.raises(NoSoftmaxHeadError, match=r"does not end in a softmax Dense.*'out'.*sigmoid"):
        gradcam(_linear_cam_model("no_softmax"), images, 0, layer="feat")
    assert issubclass(NoSoftmaxHeadError, ValueError)


def _tiny_vit(cls_token):
    """Patch embedding (4x4 patches of a 16 px image -> 4x4 grid) -> tokens (N, 16, D) -> a
    dense "block" -> GAP over tokens -> softmax. With a class token, a learned-constant token is
    prepended (the model pools only the patch tokens, the class token must be dropped)."""
    inp = keras.Input((S, S, 3))
    p = keras.layers.Conv2D(4, 4, strides=4, name="patch")(inp)
    t = keras.layers.Reshape((16, 4), name="tokens")(p)
    if cls_token:
        ones = keras.layers.Lambda(lambda z: tf.ones_like(z[:, :1, :]))(t)
        t = keras.layers.Concatenate(axis=1)([ones, t])
    t = keras.layers.Dense(4, activation="relu", name="block")(t)
    if cls_token:
        t_p = keras.layers.Lambda(lambda z: z[:, 1:])(t)
    else:
        t_p = t
    out = keras.layers.Dense(2, activation="softmax", name="out")(
        keras.layers.GlobalAveragePooling1D()(t_p))
    return keras.Model(inp, out, name=f"vit{int(cls_token)}")


@pytest.mark.parametrize("cls_token", [False, True])
def test_gradcam_tokens_equals_naive(images, cls_token):
    keras.utils.set_random_seed(0)
    m = _tiny_vit(cls_token)
    maps = gradcam_tokens(m, images, 1, "block", grid=(4, 4) if cls_token else None)
    assert maps.shape == (5, S, S)
    # naive: tokens -> grid, eq. 12-13, per image, on the probability's logit via log-odds
    sub = keras.Model(m.inputs, [m.get_layer("block").output, m.get_layer("out").input])
    W, b = m.get_layer("out").get_weights()
    for i in range(len(images)):
        x = tf.constant(images[i:i + 1])
        with tf.GradientTape() as tape:
            a, pre = sub(x)
            score = (tf.matmul(pre, W) + b)[0, 1]
        g = tape.gradient(score, a).numpy()[0]
        a = a.numpy()[0]
        if cls_token:
            a, g = a[1:], g[1:]
        cam = np.maximum((a * g.mean(0)).sum(-1), 0).reshape(4, 4)
        up = tf.image.resize(cam[None, ..., None], (S, S))[0, ..., 0].numpy()
        np.testing.assert_allclose(maps[i], xai.normalize_maps(up[None])[0], atol=1e-4)
    with pytest.raises(ValueError, match="grid"):
        gradcam_tokens(m, images, 1, "block", grid=(3, 3))
    with pytest.raises(ValueError, match=r"token sequence"):
        gradcam_tokens(m, images, 1, "patch")


def _naive_gradcam(model, images, cls, layer):
    """A second, straightforward implementation: per image, eager GradientTape on a sub-model that
    outputs (feature map, logits) where the logits come from a *new* linear Dense layer holding the
    softmax Dense's weights."""
    dense = model.layers[-1]
    lin = keras.layers.Dense(dense.units, activation=None)
    logits = lin(dense.input)
    lin.set_weights(dense.get_weights())
    sub = keras.Model(model.inputs, [model.get_layer(layer).output, logits])
    out = []
    for i in range(len(images)):
        x = tf.constant(images[i:i + 1])
        with tf.GradientTape() as tape:
            a, z = sub(x, training=False)
            score = z[0, cls[i]]
        g = tape.gradient(score, a)[0].numpy()
        a = a[0].numpy()
        cam = np.maximum((a * g.mean(axis=(0, 1))).sum(-1), 0)
        out.append(tf.image.resize(cam[None, ..., None], images.shape[1:3])[0, ..., 0].numpy())
    return np.stack(out)


@pytest.mark.slow
def test_gradcam_equals_naive_on_flat_resnet50():
    keras.utils.set_random_seed(2)  # seed checked to give non-zero maps (asserted below)
    inp = keras.Input((32, 32, 3))
    base = keras.applications.ResNet50(weights=None, include_top=False, input_tensor=inp)
    h = keras.layers.GlobalAveragePooling2D()(base.output)
    h = keras.layers.Dense(32, activation="tanh")(h)  # tanh: no dead units with random weights
    h = keras.layers.Dropout(0.3)(h)
    out = keras.layers.Dense(2, activation="softmax")(h)
    model = keras.Model(inp, out)
    x = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
    cls = np.array([0, 1, 1])
    for layer in ["conv3_block4_out", "conv4_block6_out"]:  # 4x4 and 2x2 at 32 px
        raw = gradcam(model, x, cls, layer=layer, normalize=False, batch_size=2)
        naive = _naive_gradcam(model, x, cls, layer)
        assert (naive.max(axis=(1, 2)) > 0).all()  # non-trivial maps for every image
        np.testing.assert_allclose(raw, naive, rtol=2e-3, atol=1e-5 * naive.max())
    both = gradcam_multi(model, x, cls, ["conv3_block4_out", "conv4_block6_out"])
    n3, n4 = (_naive_gradcam(model, x, cls, n) for n in ("conv3_block4_out", "conv4_block6_out"))
    top = np.maximum(n3.max(axis=(1, 2)), n4.max(axis=(1, 2)))[:, None, None]  # one per cell
    np.testing.assert_allclose(both["conv3_block4_out"], n3 / top, atol=2e-3)
    np.testing.assert_allclose(both["combined"], xai.normalize_maps((n3 + n4) / 2), atol=2e-3)


# ---------------------------------------------------------------------------------------------
# the authors' variant: the gradient of the softmax probability (chapter 10)
# ---------------------------------------------------------------------------------------------
def _closed_form_authors(x, cls):
    """dp_c/dA^k_ij = p_c (1 - p_c) (W[k, c] - W[k, c']) / (h w) for the linear model, so
    CAM = ReLU(sum_k p_c (1 - p_c) (W[k, c] - W[k, c']) x_k) / (h w) and
    max |grad| = p_c (1 - p_c) max_k |W[k, c] - W[k, c']| / (h w)."""
    logits = x.mean(axis=(1, 2)) @ WEIGHTS + BIAS
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pc = p[np.arange(len(cls)), cls]
    dw = (WEIGHTS[:, cls] - WEIGHTS[:, 1 - cls]).T  # (N, K)
    scale = (pc * (1 - pc))[:, None]
    cam = np.maximum(np.einsum("nhwk,nk->nhw", x, scale * dw), 0) / (S * S)
    gmax = (scale * np.abs(dw)).max(axis=1) / (S * S)
    return cam, p, gmax


@pytest.mark.parametrize("head", ["dense_softmax", "separate_softmax"])
def test_gradcam_authors_matches_closed_form(images, head):
    model = _linear_cam_model(head)
    cls = np.array([0, 1, 1, 0, 1])
    cam, p, gmax = _closed_form_authors(images.astype(np.float64), cls)
    res = xai.gradcam_authors(model, images, cls, layer="feat", normalize=False, batch_size=2)
    assert set(res) == {"maps", "proba", "max_abs_grad"}
    np.testing.assert_allclose(res["maps"], cam, rtol=1e-4, atol=1e-7)  # float32 sums
    np.testing.assert_allclose(res["proba"], p, rtol=1e-5)
    np.testing.assert_allclose(res["max_abs_grad"], gmax, rtol=1e-4)
    # normalised, and through gradcam(variant="authors")
    maps = gradcam(model, images, cls, layer="feat", variant="authors")
    np.testing.assert_allclose(maps, xai.normalize_maps(cam), atol=1e-5)
    # not the paper's map: the softmax gradient weighs channel k by W[k, c] - W[k, c'], eq. 12 by W[k, c]
    assert np.abs(maps - gradcam(model, images, cls, layer="feat")).max() > 0.1


def test_gradcam_authors_errors(images):
    model = _linear_cam_model()
    with pytest.raises(ValueError, match="variant='nope'"):
        gradcam(model, images, 0, layer="feat", variant="nope")
    with pytest.raises(ValueError, match="single layer"):
        gradcam(model, images, 0, layer=["feat", "feat"], variant="authors")
    with pytest.raises(ValueError, match="one layer name"):
        xai.gradcam_authors(model, images, 0, layer=["feat"])
    with pytest.raises(NoSoftmaxHeadError):
        xai.gradcam_authors(_linear_cam_model("no_softmax"), images, 0, layer="feat")
