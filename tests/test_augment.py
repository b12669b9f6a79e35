"""Tests for cellstudy.learning.augment: augmented copies, channel ZCA, and no test-fold leakage."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cellstudy.learning import augment as A


def cells(n=12, s=32, seed=0):
    """Smooth blobs with correlated channels (so ZCA has something to undo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s]
    out = np.empty((n, s, s, 3), np.float32)
    for i in range(n):
        cy, cx = rng.uniform(s * 0.3, s * 0.7, 2)
        r = rng.uniform(s * 0.1, s * 0.25)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        noise = rng.normal(0, 0.05, (s, s, 3))
        out[i, ..., 2] = blob
        out[i, ..., 1] = 0.6 * blob + 0.3 * np.roll(blob, 3, axis=1)
        out[i, ..., 0] = 0.2 + 0.5 * blob ** 2
        out[i] += noise
    return out


# ------------------------------------------------------------------------------ augment_copy
def test_augment_copy_shape_and_change():
    x = cells(4)
    y = A.augment_copy(x, 5, 15, seed=0)
    assert y.shape == x.shape and y.dtype == np.float32
    assert all(not np.array_equal(x[i], y[i]) for i in range(4))
    assert np.isfinite(y).all()


def test_zero_rotation_and_shift_is_identity():
    x = cells(3)
    np.testing.assert_array_equal(A.augment_copy(x, 0, 0, seed=3), x)


def test_augment_deterministic_with_seed():
    x = cells(5)
    a, pa = A.augment_copy(x, 4, 15, seed=7, return_params=True)
    b, pb = A.augment_copy(x, 4, 15, seed=7, return_params=True)
    c = A.augment_copy(x, 4, 15, seed=8)
    np.testing.assert_array_equal(a, b)
    for key in ("angle_deg", "dx_px", "dy_px"):
        np.testing.assert_array_equal(pa[key], pb[key])
    assert not np.array_equal(a, c)
    assert np.all(np.abs(pa["angle_deg"]) <= 15) and np.all(np.abs(pa["dx_px"]) <= 4)
    assert np.all(np.abs(pa["dy_px"]) <= 4)


def test_pure_integer_shift_moves_content():
    x = np.zeros((1, 32, 32, 3), np.float32)
    x[0, 10, 12, :] = 1.0
    # build the shift directly: with max_rotation 0 the angle is 0; find a seed's shift
    y, p = A.augment_copy(x, 6, 0, seed=1, return_params=True)
    dx, dy = p["dx_px"][0], p["dy_px"][0]
    # centre of mass moves by (dx, dy) (bilinear keeps the mass of an interior point)
    yy, xx = np.mgrid[:32, :32]
    m = y[0, ..., 0]
    assert abs(m.sum() - 1) < 1e-5
    assert abs((m * xx).sum() - (12 + dx)) < 1e-4
    assert abs((m * yy).sum() - (10 + dy)) < 1e-4


def test_rotation_about_centre():
    s = 33  # odd: the centre pixel (16, 16) is fixed by any rotation
    x = np.zeros((1, s, s, 3), np.float32)
    x[0, 16, 16] = 1.0
    x[0, 16, 26] = 0.5  # 10 px right of centre
    y, p = A.augment_copy(x, 0, 30, seed=2, return_params=True)
    assert abs(p["angle_deg"][0]) > 1  # a real rotation was drawn
    assert y[0, 16, 16, 0] > 0.99
    # the off-centre point keeps its distance from the centre
    m = y[0, ..., 0].copy()
    m[15:18, 15:18] = 0
    yy, xx = np.mgrid[:s, :s]
    cx, cy = (m * xx).sum() / m.sum(), (m * yy).sum() / m.sum()
    assert abs(np.hypot(cx - 16, cy - 16) - 10) < 0.3
    a = np.deg2rad(p["angle_deg"][0])  # counter-clockwise on screen (y points down)
    assert abs(cx - (16 + 10 * np.cos(a))) < 0.3 and abs(cy - (16 - 10 * np.sin(a))) < 0.3


@pytest.mark.parametrize("kw, match", [
    (dict(max_shift_px=-1, max_rotation_deg=0), "max_shift_px"),
    (dict(max_shift_px=1, max_rotation_deg=float("nan")), "max_rotation_deg"),
])
def test_augment_rejects_bad_ranges(kw, match):
    with pytest.raises(ValueError, match=match):
        A.augment_copy(cells(1), seed=0, **kw)


def test_augment_rejects_bad_images():
    with pytest.raises(ValueError, match=r"\(N, S, S, 3\)"):
        A.augment_copy(np.zeros((2, 8, 8)), 1, 1, 0)
    bad = cells(2)
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        A.augment_copy(bad, 1, 1, 0)


# ------------------------------------------------------------------------------ ZCA
def test_zca_whitened_training_covariance_is_identity():
    x = cells(16)
    c0 = np.cov(x.reshape(-1, 3).T)
    assert abs(c0[1, 2]) > 0.5 * np.sqrt(c0[1, 1] * c0[2, 2])  # strongly correlated to start
    z = A.ZCAWhitening(eps=1e-8).fit(x)
    w = z.transform(x)
    assert w.shape == x.shape and w.dtype == np.float32
    flat = w.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(flat.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(flat.T, bias=True), np.eye(3), atol=1e-3)
    # ZCA (not PCA): W symmetric, and the output stays closest to the input
    np.testing.assert_allclose(z.W_, z.W_.T, atol=1e-10)


def test_zca_matches_formula_and_default_eps():
    x = cells(6)
    z = A.ZCAWhitening().fit(x)
    assert z.eps == 1e-5
    flat = x.reshape(-1, 3).astype(np.float64)
    m = flat.mean(axis=0)
    c = (flat - m).T @ (flat - m) / len(flat)
    lam, u = np.linalg.eigh(c)
    w = u @ np.diag(1 / np.sqrt(lam + 1e-5)) @ u.T
    np.testing.assert_allclose(z.mean_, m, rtol=1e-10)
    np.testing.assert_allclose(z.W_, w, rtol=1e-8)
    # chunked accumulation agrees with one pass
    z2 = A.ZCAWhitening().fit(x, chunk=1)
    np.testing.assert_allclose(z2.W_, z.W_, rtol=1e-10)


def test_zca_state_roundtrip_and_errors():
    x = cells(4)
    z = A.ZCAWhitening().fit(x)
    st = json.loads(json.dumps(z.state()))
    assert st["n_images"] == 4 and st["n_pixels"] == 4 * 32 * 32
    z2 = A.ZCAWhitening.from_state(st)
    np.testing.assert_allclose(z2.transform(x), z.transform(x), atol=1e-6)
    with pytest.raises(ValueError, match="not fitted"):
        A.ZCAWhitening().transform(x)
    with pytest.raises(ValueError, match="eps"):
        A.ZCAWhitening(eps=0)


# ------------------------------------------------------------------------------ fold arrays
def cohort(n=20, s=24):
    x = cells(n, s, seed=1)
    y = np.array([0, 1] * (n // 2))
    folds = np.arange(n) % 5
    return x, y, folds


def test_fold_arrays_layout():
    x, y, f = cohort()
    d = A.fold_arrays(x, y, f, k=2, max_shift_px=3, max_rotation_deg=15, seed=0, zca=False)
    tr, te = d["train_index"], d["test_index"]
    assert set(tr) | set(te) == set(range(len(x))) and not set(tr) & set(te)
    np.testing.assert_array_equal(te, np.flatnonzero(f == 2))
    assert d["x_train"].shape == (2 * len(tr),) + x.shape[1:]
    np.testing.assert_array_equal(d["y_train"], np.concatenate([y[tr], y[tr]]))
    # first half: the originals; second half: their augmented copies
    np.testing.assert_array_equal(d["x_train"][:len(tr)], x[tr])
    assert not np.array_equal(d["x_train"][len(tr):], x[tr])
    # the test fold: untouched originals
    np.testing.assert_array_equal(d["x_test"], x[te])
    np.testing.assert_array_equal(d["y_test"], y[te])
    assert d["zca_state"] is None
    # deterministic, and different folds get different augmentation streams
    d2 = A.fold_arrays(x, y, f, k=2, max_shift_px=3, max_rotation_deg=15, seed=0, zca=False)
    np.testing.assert_array_equal(d["x_train"], d2["x_train"])
    assert A.fold_seed(0, 1) != A.fold_seed(0, 2) != A.fold_seed(1, 2)


def test_fold_arrays_zca_uses_training_statistics_only():
    x, y, f = cohort()
    d = A.fold_arrays(x, y, f, k=0, max_shift_px=3, max_rotation_deg=15, seed=0, zca=True)
    raw = A.fold_arrays(x, y, f, k=0, max_shift_px=3, max_rotation_deg=15, seed=0, zca=False)
    z = A.ZCAWhitening().fit(raw["x_train"])  # fitted on the (augmented) training set alone
    assert d["zca_state"] == z.state()
    np.testing.assert_array_equal(d["x_train"], z.transform(raw["x_train"]))
    np.testing.assert_array_equal(d["x_test"], z.transform(x[f == 0]))
    flat = d["x_train"].reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(np.cov(flat.T, bias=True), np.eye(3), atol=2e-2)
    # and it differs from a fit that would include the test fold
    z_all = A.ZCAWhitening().fit(np.concatenate([raw["x_train"], x[f == 0]]))
    assert not np.allclose(z_all.W_, z.W_, rtol=1e-6)


@pytest.mark.parametrize("corrupt", ["scale", "noise"])
def test_no_test_fold_leakage(corrupt):
    """Changing every test-fold image leaves the training arrays and the fit bit-identical,
    and the test arrays are the new test images mapped with the *training* statistics."""
    x, y, f = cohort()
    k = 3
    base = A.fold_arrays(x, y, f, k, max_shift_px=3, max_rotation_deg=15, seed=0)
    x2 = x.copy()
    m = f == k
    if corrupt == "scale":
        x2[m] *= 1000.0
    else:
        x2[m] = np.random.default_rng(9).normal(50, 20, x2[m].shape).astype(np.float32)
    new = A.fold_arrays(x2, y, f, k, max_shift_px=3, max_rotation_deg=15, seed=0)
    np.testing.assert_array_equal(new["x_train"], base["x_train"])
    np.testing.assert_array_equal(new["y_train"], base["y_train"])
    assert new["zca_state"] == base["zca_state"]
    for key in ("angle_deg", "dx_px", "dy_px"):
        np.testing.assert_array_equal(new["augment_params"][key], base["augment_params"][key])
    # x_test did change, and exactly as the training fit maps it
    assert not np.allclose(new["x_test"], base["x_test"])
    z = A.ZCAWhitening.from_state(base["zca_state"])
    np.testing.assert_allclose(new["x_test"], z.transform(x2[m]), rtol=1e-6, atol=1e-6)


def test_fold_arrays_bad_inputs():
    x, y, f = cohort()
    with pytest.raises(ValueError, match="fold 7"):
        A.fold_arrays(x, y, f, 7, 1, 1, 0)
    with pytest.raises(ValueError, match="labels, folds"):
        A.fold_arrays(x, y[:-1], f, 0, 1, 1, 0)
    with pytest.raises(ValueError, match="every image"):
        A.fold_arrays(x, y, np.zeros(len(x), int), 0, 1, 1, 0)


def test_per_channel_whitening_keeps_the_stains_apart():
    """whitening: "channel" standardises each channel on its own (W diagonal): channel c of the
    output depends on channel c of the input only; the default 3 x 3 ZCA mixes them."""
    rng = np.random.default_rng(0)
    base = rng.random((6, 8, 8, 1))
    x = np.concatenate([base, base * 0.5 + 0.1 * rng.random((6, 8, 8, 1)), rng.random((6, 8, 8, 1))], axis=3)
    z = A.ZCAWhitening(mode="channel").fit(x)
    assert np.allclose(z.W_, np.diag(np.diag(z.W_)))
    y = z.transform(x).reshape(-1, 3)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1, atol=1e-3)
    zca = A.ZCAWhitening().fit(x)
    assert abs(zca.W_[0, 1]) > 0.1                     # ZCA mixes correlated channels
    again = A.ZCAWhitening.from_state(z.state())
    assert again.mode == "channel" and np.allclose(again.W_, z.W_)
    with pytest.raises(ValueError, match="whitening mode 'pca'"):
        A.ZCAWhitening(mode="pca")
    fa = A.fold_arrays(x.astype(np.float32), np.array([0, 1] * 3), np.array([0, 0, 1, 1, 2, 2]), 0,
                             max_shift_px=0, max_rotation_deg=0, seed=0, whitening="channel")
    assert fa["zca_state"]["mode"] == "channel"
