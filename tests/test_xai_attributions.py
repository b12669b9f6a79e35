"""Integrated Gradients, occlusion, deletion/insertion faithfulness and channel importance on
hand-built Keras models with known behaviour."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from cellstudy.explain.xai import (attribution_map, channel_importance, deletion_insertion,  # noqa: E402
                           integrated_gradients, occlusion)

S = 16
R = 4  # the region the "region model" reads: rows 0..3, cols 0..3


def _region_model():
    """Reads only the top-left R x R pixels: logit_1 - logit_0 = 4 * (sum of the region's channel
    means) - 4.5, so bright region -> class 1 (p ~ 0.99), black region -> class 0."""
    inp = keras.Input((S, S, 3))
    crop = keras.layers.Cropping2D(((0, S - R), (0, S - R)))(inp)
    g = keras.layers.GlobalAveragePooling2D()(crop)
    dense = keras.layers.Dense(2, activation="softmax")
    m = keras.Model(inp, dense(g), name="region")
    dense.set_weights([np.array([[-2.0, 2.0]] * 3), np.array([2.25, -2.25])])
    return m


def _images(n=6, seed=0):
    return np.random.default_rng(seed).uniform(0.5, 1.0, size=(n, S, S, 3)).astype(np.float32)


def test_deletion_auc_of_perfect_explanation_beats_random():
    m = _region_model()
    x = _images()
    perfect = np.zeros((len(x), S, S))
    perfect[:, :R, :R] = 1.0
    res = deletion_insertion(m, x, 1, perfect, steps=20, fill=0.0, seed=0)
    assert res.fractions[0] == 0 and res.fractions[-1] == 1 and len(res.fractions) == 21
    assert res.deletion.shape == (6, 21) and res.random_deletion_auc.shape == (6,)
    np.testing.assert_allclose(res.deletion[:, 0], m.predict(x, verbose=0)[:, 1], rtol=1e-5)
    assert np.all(res.deletion[:, 2:] < 0.02)  # region gone after 2 steps (10% > 16/256 pixels)
    assert np.all(res.deletion_auc < 0.1)
    assert np.all(res.random_deletion_auc > 0.3)
    assert np.all(res.insertion_auc > 0.85) and np.all(res.random_insertion_auc < 0.7)
    # the worst explanation (region last) is worse than random
    worst = deletion_insertion(m, x, 1, -perfect, steps=20, random_baseline=False)
    assert worst.random_deletion is None
    assert np.all(worst.deletion_auc > res.random_deletion_auc)
    tab = res.summary()
    assert list(tab["curve"]) == ["deletion", "insertion"]
    assert tab.loc[0, "difference"] < -0.2 and tab.loc[1, "difference"] > 0.2
    # seeded
    again = deletion_insertion(m, x, 1, perfect, steps=20, seed=0)
    np.testing.assert_array_equal(again.random_deletion_auc, res.random_deletion_auc)


def test_deletion_insertion_bad_input():
    m = _region_model()
    x = _images(2)
    with pytest.raises(ValueError, match="saliency has shape"):
        deletion_insertion(m, x, 1, np.zeros((2, S, S - 1)))
    with pytest.raises(ValueError, match="fill"):
        deletion_insertion(m, x, 1, np.zeros((2, S, S)), fill=[0, 0])
    with pytest.raises(ValueError, match="expected 16, given 8"):
        deletion_insertion(m, x[:, :8], 1, np.zeros((2, 8, S)))


def test_occlusion_finds_the_region():
    m = _region_model()
    x = _images(3)
    occ = occlusion(m, x, 1, patch=R, stride=R)
    assert occ.shape == (3, S, S)
    outside = occ.copy()
    outside[:, :R, :R] = 0
    assert np.abs(outside).max() < 1e-6  # float32 round-off between batches only
    # inside: exactly p(x) - p(x with the region blacked out)
    xo = x.copy()
    xo[:, :R, :R] = 0
    p = m.predict(x, verbose=0)[:, 1] - m.predict(xo, verbose=0)[:, 1]
    np.testing.assert_allclose(occ[:, :R, :R], np.broadcast_to(p[:, None, None], (3, R, R)), rtol=1e-5)
    assert p.min() > 0.9
    # overlapping patches: a per-pixel mean over covering positions; still zero far away
    occ2 = occlusion(m, x, 1, patch=4, stride=2)
    assert np.abs(occ2[:, 8:, :]).max() < 1e-6 and np.all(occ2[:, :2, :2] > 0.1)
    with pytest.raises(ValueError, match="larger than the images"):
        occlusion(m, x, 1, patch=20)


def _linear_model():
    """identity 1x1 conv -> GAP -> Dense: logit_c = sum_k W[k, c] mean(x_k) + b_c (linear)."""
    inp = keras.Input((S, S, 3))
    feat = keras.layers.Conv2D(3, 1, use_bias=False)(inp)
    dense = keras.layers.Dense(2, activation="softmax")
    m = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(feat)))
    m.layers[1].set_weights([np.eye(3).reshape(1, 1, 3, 3)])
    W = np.array([[1.0, -2.0], [-1.5, 0.5], [0.7, 1.2]])
    dense.set_weights([W, np.array([0.1, -0.2])])
    return m, W


def test_integrated_gradients_linear_model_exact():
    m, W = _linear_model()
    x = _images(3, seed=1)
    cls = np.array([0, 1, 0])
    ig = integrated_gradients(m, x, cls, steps=4, batch_size=5)
    expected = x * W[:, cls].T[:, None, None, :] / (S * S)
    np.testing.assert_allclose(ig, expected, rtol=1e-4, atol=1e-8)
    # per-channel baseline
    b = np.array([0.2, 0.5, 0.9], np.float32)
    ig_b = integrated_gradients(m, x, cls, baseline=b, steps=3)
    np.testing.assert_allclose(ig_b, (x - b) * W[:, cls].T[:, None, None, :] / (S * S), rtol=1e-4, atol=1e-7)
    amap = attribution_map(ig)
    assert amap.shape == (3, S, S)
    with pytest.raises(ValueError, match="baseline has shape"):
        integrated_gradients(m, x, cls, baseline=np.zeros((5, 5)))


def test_integrated_gradients_completeness_nonlinear():
    keras.utils.set_random_seed(3)
    inp = keras.Input((S, S, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(inp)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(h)
    dense = keras.layers.Dense(2, activation="softmax")
    m = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(h)))
    x = _images(2, seed=2) * 2
    ig = integrated_gradients(m, x, 1, steps=64)
    sub = keras.Model(inp, dense.input)
    W, b = dense.get_weights()
    logit = lambda z: sub(z).numpy() @ W[:, 1] + b[1]  # noqa: E731
    diff = logit(x) - logit(np.zeros_like(x))
    assert np.abs(diff).min() > 1e-3
    np.testing.assert_allclose(ig.sum(axis=(1, 2, 3)), diff, rtol=1e-2, atol=1e-5)


def _dna_only_model():
    """Sees only channel 2 (DNA): logit_1 - logit_0 = 10 * mean(DNA) - 5."""
    inp = keras.Input((S, S, 3))
    conv = keras.layers.Conv2D(1, 1, use_bias=False)
    dense = keras.layers.Dense(2, activation="softmax")
    m = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(conv(inp))))
    conv.set_weights([np.array([0, 0, 1.0]).reshape(1, 1, 3, 1)])
    dense.set_weights([np.array([[-5.0, 5.0]]), np.array([2.5, -2.5])])
    return m


def _cells(n=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.uniform(0, 1, size=(n, S, S, 3)).astype(np.float32)
    x[..., 2] = np.where(labels[:, None, None] == 1, rng.uniform(0.7, 1.0, (n, S, S)),
                         rng.uniform(0.0, 0.3, (n, S, S)))
    return x, labels


def test_channel_importance_model_that_sees_one_channel():
    m = _dna_only_model()
    x, y = _cells()
    means = x.reshape(-1, 3).mean(0)
    tab, cells = channel_importance(m, x, y, means, n_boot=500, seed=0, return_per_cell=True)
    assert list(tab.columns[:6]) == ["channel", "channel_index", "method", "mean_drop", "ci_low", "ci_high"]
    assert len(tab) == 6 and len(cells) == 6 * len(x)
    assert list(tab["channel"].unique()) == ["third", "actin", "dna"]
    others = tab[tab.channel_index != 2]
    assert np.all(np.abs(others.mean_drop) < 1e-6)
    assert np.all((others.ci_low <= 0) & (others.ci_high >= 0))
    dna = tab[tab.channel_index == 2].set_index("method")
    assert dna.loc["zero", "mean_drop"] > 0.3 and dna.loc["zero", "ci_low"] > 0.2
    assert dna.loc["mean", "mean_drop"] > 0.3 and dna.loc["mean", "ci_low"] > 0.2
    assert dna.loc["zero", "ci_low"] < dna.loc["zero", "mean_drop"] < dna.loc["zero", "ci_high"]
    # reproducible
    assert channel_importance(m, x, y, means, n_boot=500, seed=0).equals(tab)


def test_channel_importance_perturbs_before_transform():
    """With a channel-reversing transform the model (reading input channel 2) sees stain 0, so
    stain 0 must be the important one: perturbation happens in stain space, before transform."""
    m = _dna_only_model()
    x, y = _cells()
    x = x[..., ::-1].copy()  # the informative stain is now channel 0
    tab = channel_importance(m, x, y, np.full(3, 0.5), n_boot=200, transform=lambda a: a[..., ::-1])
    imp = tab[tab.method == "zero"].set_index("channel_index")["mean_drop"]
    assert imp[0] > 0.3 and abs(imp[1]) < 1e-6 and abs(imp[2]) < 1e-6


def test_channel_importance_bad_input():
    m = _dna_only_model()
    x, y = _cells(4)
    with pytest.raises(ValueError, match="train_means"):
        channel_importance(m, x, y, np.zeros(2))
    with pytest.raises(ValueError, match="labels must have shape"):
        channel_importance(m, x, y[:3], np.zeros(3))
    with pytest.raises(ValueError, match="methods"):
        channel_importance(m, x, y, np.zeros(3), methods=("blur",))
    with pytest.raises(ValueError, match=r"labels holds \[2\]"):
        channel_importance(m, x, np.array([0, 1, 2, 0]), np.zeros(3))


def test_compiled_functions_trace_once_for_any_batch_size():
    """Predict (8 cells), occlusion / IG / faithfulness (batches of 64) and Grad-CAM share one
    trace per function: a second batch size used to trace the network again."""
    from cellstudy.explain.xai import _keras as XK
    from cellstudy.explain.xai import gradcam

    inp = keras.Input((S, S, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="feat")(inp)
    m = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(h)))
    x = _images(5)
    p_small = XK.predict_proba(m, x[:3], batch_size=2)
    p_big = XK.predict_proba(m, x, batch_size=64)
    np.testing.assert_allclose(p_small, p_big[:3], rtol=1e-6)
    occlusion(m, x, 0, patch=4, batch_size=7)
    integrated_gradients(m, x, 1, steps=3, batch_size=4)
    integrated_gradients(m, x[:2], 1, steps=2, batch_size=64)
    gradcam(m, x[:2], 0, "feat", batch_size=2)
    gradcam(m, x, 1, "feat", batch_size=64)
    counts = {k[0]: f.experimental_get_tracing_count() for k, f in XK.model_cache(m).items()
              if hasattr(f, "experimental_get_tracing_count")}
    assert counts == {"forward": 1, "ig": 1, "gradcam": 1}
