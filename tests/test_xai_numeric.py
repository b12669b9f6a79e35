"""Pure numeric parts of cellstudy.explain.xai: gmean (eq. 14), correlation image (eq. 15-16), helpers."""
import numpy as np
import pytest
from scipy import stats

from cellstudy.explain.xai import (attention_rollout, bootstrap_ci, correlation_ratios, gmean,
                           local_correlation, normalize_maps)


# ----------------------------------------------------------------------------- gmean
def test_gmean_equals_scipy_for_unit_weights():
    rng = np.random.default_rng(0)
    stack = rng.uniform(0.05, 2.0, size=(7, 6, 5, 3))
    np.testing.assert_allclose(gmean(stack, eps=0), stats.gmean(stack, axis=0), rtol=1e-12)
    # the default eps only shifts by about eps for values >> eps
    np.testing.assert_allclose(gmean(stack), stats.gmean(stack, axis=0), rtol=2e-5)
    # explicit unit weights = no weights; 3-D stacks work too
    np.testing.assert_allclose(gmean(stack[..., 0], weights=np.ones(7), eps=0),
                               stats.gmean(stack[..., 0], axis=0), rtol=1e-12)


def test_gmean_weights_zero_one_select_images():
    rng = np.random.default_rng(1)
    stack = rng.uniform(0.1, 1.0, size=(5, 4, 4))
    w = np.array([1, 0, 1, 0, 1.0])
    np.testing.assert_allclose(gmean(stack, w, eps=0), stats.gmean(stack[[0, 2, 4]], axis=0),
                               rtol=1e-12)
    # a single weight of 1 returns that image (up to eps)
    np.testing.assert_allclose(gmean(stack, np.eye(5)[3], eps=0), stack[3], rtol=1e-12)
    # fractional weights = scipy's weighted gmean
    wf = np.array([0.2, 0.5, 1.0, 0.0, 0.7])
    np.testing.assert_allclose(gmean(stack, wf, eps=0), stats.gmean(stack, axis=0, weights=wf[:, None, None] * np.ones_like(stack)), rtol=1e-12)
    # scaling all weights by a constant changes nothing
    np.testing.assert_allclose(gmean(stack, wf * 0.5, eps=0), gmean(stack, wf, eps=0), rtol=1e-12)


def test_gmean_zeros_use_eps():
    stack = np.ones((4, 2, 2))
    stack[0, 0, 0] = 0.0
    g = gmean(stack, eps=1e-6)
    assert np.isfinite(g).all()
    expected = np.exp((np.log(1e-6) + 3 * np.log(1 + 1e-6)) / 4)
    assert g[0, 0] == pytest.approx(expected, rel=1e-12)
    assert g[1, 1] == pytest.approx(1 + 1e-6, rel=1e-12)
    # eps=0: a zero forces 0 (no -inf, no warning leaks as NaN)
    assert gmean(stack, eps=0)[0, 0] == 0.0
    # all zero -> eps
    assert gmean(np.zeros((3, 2, 2)), eps=1e-4)[0, 0] == pytest.approx(1e-4)
    # a zero in an image with weight 0 does not matter
    assert gmean(stack, np.array([0, 1, 1, 1.0]), eps=0)[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("stack, weights, match", [
    (np.zeros((0, 4, 4)), None, "empty"),
    ([], None, "empty"),
    (np.ones((3, 4)), None, r"\(N, H, W\)"),
    (-np.ones((2, 3, 3)), None, "negative"),
    (np.ones((3, 4, 4)), np.zeros(3), "all zero"),
    (np.ones((3, 4, 4)), np.ones(2), r"shape \(3,\)"),
    (np.ones((3, 4, 4)), np.array([0.5, 1.5, 1]), r"\[0, 1\]"),
    (np.ones((3, 4, 4)), np.array([0.5, -0.1, 1]), r"\[0, 1\]"),
    (np.full((2, 3, 3), np.nan), None, "NaN"),
])
def test_gmean_bad_input(stack, weights, match):
    with pytest.raises(ValueError, match=match):
        gmean(stack, weights)


def test_gmean_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        gmean(np.ones((2, 2, 2)), eps=-1e-3)


# ----------------------------------------------------------------------------- correlation
def _brute_corr(a, b, r):
    H, W = a.shape
    pa, pb = np.pad(a, r, mode="symmetric"), np.pad(b, r, mode="symmetric")
    out = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            wa = pa[i:i + 2 * r + 1, j:j + 2 * r + 1].ravel()
            wb = pb[i:i + 2 * r + 1, j:j + 2 * r + 1].ravel()
            if wa.std() < 1e-12 or wb.std() < 1e-12:
                continue
            out[i, j] = np.corrcoef(wa, wb)[0, 1]
    return out


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_local_correlation_equals_brute_force(radius):
    rng = np.random.default_rng(radius)
    a = rng.normal(size=(13, 11))
    b = 0.3 * a + rng.normal(size=(13, 11))
    got = local_correlation(a, b, radius)
    np.testing.assert_allclose(got, _brute_corr(a, b, radius), atol=1e-9)
    assert got.max() - got.min() > 0.4  # not a degenerate case


def test_local_correlation_plus_minus_one_and_constant():
    rng = np.random.default_rng(3)
    a = rng.uniform(size=(10, 12))
    np.testing.assert_allclose(local_correlation(a, 3 * a + 7), 1.0, atol=1e-9)
    np.testing.assert_allclose(local_correlation(a, -0.5 * a + 2), -1.0, atol=1e-9)
    # constant image -> 0 everywhere, even with a large offset (round-off in var = E[a^2]-E[a]^2)
    assert np.all(local_correlation(a, np.full_like(a, 1e6 + 0.1)) == 0)
    # a constant left half: windows fully inside it give 0, the rest +1
    b = a.copy()
    b[:, :6] = 0.25
    c = local_correlation(a, b, radius=1)
    assert np.all(c[:, :5] == 0)           # windows cols j-1..j+1 all inside the constant half
    np.testing.assert_allclose(c[:, 7:], 1.0, atol=1e-9)


def test_local_correlation_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        local_correlation(np.zeros((5, 5)), np.zeros((5, 6)))
    with pytest.raises(ValueError, match="2-D"):
        local_correlation(np.zeros((5, 5, 3)), np.zeros((5, 5, 3)))
    with pytest.raises(ValueError, match="radius"):
        local_correlation(np.zeros((5, 5)), np.zeros((5, 5)), radius=0)
    with pytest.raises(ValueError, match="finite"):
        local_correlation(np.full((5, 5), np.nan), np.zeros((5, 5)))


def test_correlation_ratios():
    c = np.array([[0.9, 0.6, 0.5], [-0.51, -1.0, 0.0]])
    assert correlation_ratios(c) == (pytest.approx(2 / 6), pytest.approx(2 / 6))
    assert correlation_ratios(c, 0.95) == (0.0, pytest.approx(1 / 6))
    mask = np.array([[1, 0, 0], [1, 1, 1]], bool)
    assert correlation_ratios(c, 0.5, mask) == (pytest.approx(1 / 4), pytest.approx(2 / 4))
    with pytest.raises(ValueError, match="threshold"):
        correlation_ratios(c, 1.5)
    with pytest.raises(ValueError, match="mask shape"):
        correlation_ratios(c, 0.5, np.ones((3, 3), bool))


# ----------------------------------------------------------------------------- helpers
def test_normalize_maps():
    m = np.stack([np.arange(12.0).reshape(3, 4) + 5, np.full((3, 4), 2.0), np.zeros((3, 4))])
    out = normalize_maps(m)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], (np.arange(12.0).reshape(3, 4)) / 11, rtol=1e-6)
    assert np.all(out[1] == 0) and np.all(out[2] == 0)


def test_bootstrap_ci_covers_mean_and_is_seeded():
    v = np.random.default_rng(0).normal(1.0, 1.0, size=200)
    m, lo, hi = bootstrap_ci(v, 500, seed=1)
    assert lo < m < hi and lo < 1.0 < hi and hi - lo < 0.5
    assert bootstrap_ci(v, 500, seed=1) == (m, lo, hi)
    assert bootstrap_ci(np.zeros(10), 100) == (0.0, 0.0, 0.0)


def test_attention_rollout_identity_and_focus():
    n, T = 2, 5  # class token + 2x2 grid
    eye = np.broadcast_to(np.eye(T), (n, 2, T, T))
    # identity attention everywhere: the class token only keeps itself -> patch map constant -> 0
    assert np.all(attention_rollout([eye, eye]) == 0)
    # every token attends to patch token 3 -> the class token's rollout peaks there
    att = np.zeros((n, 2, T, T))
    att[..., 3] = 1.0
    r = attention_rollout([att])
    assert r.shape == (n, 2, 2)
    assert r.reshape(n, -1).argmax(1).tolist() == [2, 2] and r.max() == 1.0


def test_a_constant_grad_cam_map_is_said_in_its_panel():
    """ResNet50's example abnormal cells showed a uniform tint with no word why: a constant map
    (all zero after the ReLU) is titled as such in the examples and the galleries."""
    import pandas as pd
    from cellstudy.explain import figures as F
    rng = np.random.default_rng(0)
    images = rng.random((2, 8, 8, 3)).astype(np.float32)
    maps = np.stack([np.zeros((8, 8)), rng.random((8, 8))]).astype(np.float32)
    proba = np.array([[0.2, 0.8], [0.9, 0.1]])
    assert F.is_constant_map(maps[0]) and not F.is_constant_map(maps[1]) and F.is_constant_map(np.full((4, 4), 0.3))
    fig = F.heatmap_examples(images, maps, proba, np.array([1, 0]), rows=[0, 1])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1] == F.CONSTANT_MAP_TITLE and titles[3] == "Grad-CAM"
    g = pd.DataFrame({"class": ["abnormal", "normal"], "kind": ["confident"] * 2, "rank": [1, 1], "row": [0, 1]})
    gt = [ax.get_title() for ax in F.gallery_figure(images, maps, proba, np.array([1, 0]), g).axes]
    assert gt[0].endswith("constant map") and not gt[1].endswith("constant map")


def test_gmean_figure_has_one_colour_scale_and_display_names():
    """Gmean-GradCam panels had no colour bar and each its own scale (jet stretched to its range):
    now one 0-1 scale and a colour bar; rows are named as in the book (RGB-Res, not rgb_res)."""
    from cellstudy.explain import figures as F
    rng = np.random.default_rng(1)
    d = {"shape_rgb": rng.random((8, 8, 3)), "cam/combined": 0.2 + 0.1 * rng.random((8, 8))}
    fig = F.gmean_figure({"rgb_res": {0: d, 1: d}})
    heat = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "jet"]
    assert heat and all(im.get_clim() == (0.0, 1.0) for im in heat)
    assert any("Gmean-GradCam (0: no weight" in ax.get_ylabel() for ax in fig.axes)   # the colour bar
    assert fig.axes[0].get_ylabel() == "RGB-Res"
