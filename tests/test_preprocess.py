"""Tests for cellstudy.data.preprocess: each filter's shape, dtype and defining property; the cache."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cellstudy import config
from cellstudy.data import preprocess as pp

PARAMS = dict(config.SCALES["ci"]["preprocess"])
BBBC = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc021-mcf7"


def step_edge(n=64, low=0.1, high=0.9):
    x = np.full((n, n), low, np.float32)
    x[:, n // 2:] = high
    return x


# ------------------------------------------------------------------------------ binomial blur
def test_binomial_blur_lowers_white_noise_variance_and_keeps_mean():
    rng = np.random.default_rng(0)
    w = rng.normal(0.5, 0.1, (64, 64)).astype(np.float32)
    b1 = pp.binomial_blur(w, 1)
    b3 = pp.binomial_blur(w, 3)
    assert b1.shape == w.shape and b1.dtype == np.float32
    # one [1,2,1]/4 pass per axis: variance factor (6/16)^2 = 0.14 for white noise
    assert b1.var() < 0.25 * w.var()
    assert b3.var() < b1.var()
    assert abs(b1.mean() - w.mean()) < 1e-3 and abs(b3.mean() - w.mean()) < 1e-3
    np.testing.assert_array_equal(pp.binomial_blur(w, 0), w)


def test_binomial_blur_accepts_other_dtypes_and_rejects_bad_input():
    out = pp.binomial_blur(np.arange(100, dtype=np.uint16).reshape(10, 10), 1)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="2-D"):
        pp.binomial_blur(np.zeros((4, 4, 3), np.float32), 1)
    bad = np.zeros((8, 8), np.float32)
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pp.binomial_blur(bad, 1)
    with pytest.raises(ValueError, match="repetitions"):
        pp.binomial_blur(np.zeros((8, 8), np.float32), -1)


# ------------------------------------------------------------------------------ Landweber
def test_gaussian_psf_normalised_and_centred():
    k = pp.gaussian_psf(1.5)
    assert k.shape == (13, 13) and k.dtype == np.float32
    assert abs(k.sum() - 1) < 1e-6
    assert np.unravel_index(k.argmax(), k.shape) == (6, 6)
    np.testing.assert_allclose(k, k.T)
    with pytest.raises(ValueError, match="psf_sigma"):
        pp.gaussian_psf(0)


def test_landweber_sharpens_blurred_edge_with_true_psf():
    x = step_edge()
    blurred = cv2.GaussianBlur(x, (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)
    for projected in (True, False):
        d = pp.landweber_deconvolution(blurred, 1.5, 10, 1.0, projected=projected)
        assert d.shape == x.shape and d.dtype == np.float32
        # closer to the sharp original than the blurred input was
        assert np.abs(d - x).mean() < 0.93 * np.abs(blurred - x).mean()
        # a steeper edge
        assert np.abs(np.diff(d[32])).max() > 1.3 * np.abs(np.diff(blurred[32])).max()


def test_projected_landweber_is_non_negative():
    x = np.zeros((48, 48), np.float32)
    x[20:28, 20:28] = 1.0  # a bright square on a zero background: ringing goes negative
    blurred = cv2.GaussianBlur(x, (0, 0), 1.5)
    free = pp.landweber_deconvolution(blurred, 1.5, 20, 1.5, projected=False)
    proj = pp.landweber_deconvolution(blurred, 1.5, 20, 1.5, projected=True)
    assert free.min() < -1e-3  # the test can fail: unconstrained does undershoot
    assert proj.min() >= 0.0


def test_landweber_rejects_bad_parameters():
    img = np.ones((16, 16), np.float32)
    with pytest.raises(ValueError, match="landweber_alpha"):
        pp.landweber_deconvolution(img, 1.0, 3, 2.5)
    with pytest.raises(ValueError, match="psf_sigma"):
        pp.landweber_deconvolution(img, -1.0, 3, 1.0)
    with pytest.raises(ValueError, match="landweber_iterations"):
        pp.landweber_deconvolution(img, 1.0, 2.5, 1.0)


def test_landweber_psf_larger_than_image_is_cropped():
    out = pp.landweber_deconvolution(np.random.default_rng(0).random((9, 9)).astype(np.float32),
                                     3.0, 2, 1.0)
    assert out.shape == (9, 9) and np.isfinite(out).all()


# ------------------------------------------------------------------------------ diffusion
def test_diffusion_lowers_noise_and_keeps_edge_better_than_gaussian():
    rng = np.random.default_rng(0)
    x = step_edge()
    noisy = x + rng.normal(0, 0.1, x.shape).astype(np.float32)
    d = pp.anisotropic_diffusion(noisy, 0.0625, 1.0, 10)
    assert d.shape == x.shape and d.dtype == np.float32
    flat = np.s_[:, 4:26]

    def edge(im):
        return np.abs(im[:, 32] - im[:, 31]).mean()

    assert d[flat].var() < 0.3 * noisy[flat].var()          # noise variance down
    assert edge(d) > 0.85 * (0.9 - 0.1)                      # edge contrast mostly kept
    # a Gaussian blur with the same noise reduction (sigma found by bisection) loses the edge
    lo, hi = 0.1, 5.0
    for _ in range(30):
        s = (lo + hi) / 2
        g = cv2.GaussianBlur(noisy, (0, 0), s, borderType=cv2.BORDER_REFLECT)
        lo, hi = (s, hi) if g[flat].var() > d[flat].var() else (lo, s)
    assert edge(d) > 1.4 * edge(g)


def test_diffusion_rejects_unstable_time_step():
    with pytest.raises(ValueError, match="diffusion_time_step.*0.125"):
        pp.anisotropic_diffusion(np.ones((16, 16), np.float32), 0.2, 1.0, 2)
    with pytest.raises(ValueError, match="diffusion_conductance"):
        pp.anisotropic_diffusion(np.ones((16, 16), np.float32), 0.1, 0.0, 2)


# ------------------------------------------------------------------------------ resample
def test_resample_shrink_is_area_and_keeps_mean():
    rng = np.random.default_rng(1)
    a = rng.random((68, 68)).astype(np.float32)
    r = pp.resample(a, 34)
    assert r.shape == (34, 34) and r.dtype == np.float32
    # exact 2x2 block means for an integer factor
    np.testing.assert_allclose(r, a.reshape(34, 2, 34, 2).mean(axis=(1, 3)), atol=1e-6)
    r48 = pp.resample(a, 48)
    assert r48.shape == (48, 48)
    assert abs(r48.mean() - a.mean()) < 2e-3


def test_resample_enlarge_and_validation():
    a = np.random.default_rng(2).random((68, 68)).astype(np.float32)
    up = pp.resample(a, 512)
    assert up.shape == (512, 512) and up.dtype == np.float32
    assert abs(up.mean() - a.mean()) < 5e-3
    np.testing.assert_array_equal(pp.resample(a, 68), a)
    with pytest.raises(ValueError, match="size"):
        pp.resample(a, 4)


# ------------------------------------------------------------------------------ one image
def test_preprocess_image_shape_dtype_and_channels_independent():
    rng = np.random.default_rng(3)
    img = rng.random((40, 40, 3)).astype(np.float32)
    out = pp.preprocess_image(img, 16, **PARAMS)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert np.isfinite(out).all()
    # per channel: changing channel 0 leaves channels 1, 2 unchanged
    img2 = img.copy()
    img2[..., 0] = rng.random((40, 40))
    out2 = pp.preprocess_image(img2, 16, **PARAMS)
    np.testing.assert_array_equal(out[..., 1:], out2[..., 1:])
    assert not np.array_equal(out[..., 0], out2[..., 0])


def test_preprocess_image_param_names_match_config():
    for scale in config.SCALES.values():
        assert set(scale["preprocess"]) == set(pp.PARAM_NAMES)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((16, 16), np.float32), r"\(H, W, 3\)"),
    (np.zeros((16, 16, 4), np.float32), r"\(H, W, 3\)"),
    (np.full((16, 16, 3), np.inf, np.float32), "NaN or inf"),
])
def test_preprocess_image_rejects_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        pp.preprocess_image(bad, 16, **PARAMS)


def test_check_params_rejects_missing_and_unknown():
    p = dict(PARAMS)
    del p["psf_sigma"]
    with pytest.raises(ValueError, match="psf_sigma"):
        pp.check_params(p)
    with pytest.raises(ValueError, match="bogus"):
        pp.check_params({**PARAMS, "bogus": 1})
    with pytest.raises(ValueError, match="diffusion_time_step"):
        pp.check_params({**PARAMS, "diffusion_time_step": 0.13})


# ------------------------------------------------------------------------------ batch + cache
@pytest.fixture
def counting(monkeypatch):
    calls = []
    real = pp.preprocess_image

    def wrapped(img, size, **kw):
        calls.append(float(img.sum()))
        return real(img, size, **kw)

    monkeypatch.setattr(pp, "preprocess_image", wrapped)
    return calls


def _batch(n=4, seed=0, side=24):
    rng = np.random.default_rng(seed)
    return rng.random((n, side, side, 3)).astype(np.float32), [f"k{seed}_{i}" for i in range(n)]


def test_batch_matches_single_images(tmp_path):
    imgs, keys = _batch(3)
    out = pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=False)
    assert out.shape == (3, 16, 16, 3) and out.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(out[i], pp.preprocess_image(imgs[i], 16, **PARAMS))


def test_cache_hit_on_second_call(tmp_path, counting):
    imgs, keys = _batch(4)
    a = pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=False)
    assert len(counting) == 4
    files = sorted((tmp_path / "preprocess").rglob("*.npy"))
    assert len(files) == 4
    mtimes = [f.stat().st_mtime_ns for f in files]
    b = pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=False)
    assert len(counting) == 4  # nothing recomputed
    np.testing.assert_array_equal(a, b)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert not list((tmp_path / "preprocess").rglob("*.tmp"))
    # a subset / re-ordering reuses the per-image entries
    c = pp.preprocess_batch(imgs[[2, 0]], [keys[2], keys[0]], 16, PARAMS, cache_dir=tmp_path,
                            progress=False)
    assert len(counting) == 4
    np.testing.assert_array_equal(c, a[[2, 0]])


def test_cache_miss_when_parameter_size_or_key_changes(tmp_path, counting):
    imgs, keys = _batch(3)
    pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=False)
    assert len(counting) == 3
    pp.preprocess_batch(imgs, keys, 16, {**PARAMS, "psf_sigma": 1.5}, cache_dir=tmp_path,
                        progress=False)
    assert len(counting) == 6
    pp.preprocess_batch(imgs, keys, 20, PARAMS, cache_dir=tmp_path, progress=False)
    assert len(counting) == 9
    keys2 = list(keys)
    keys2[1] = "changed"
    pp.preprocess_batch(imgs, keys2, 16, PARAMS, cache_dir=tmp_path, progress=False)
    assert len(counting) == 10  # only the image whose key changed
    pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=False, cache=False)
    assert len(counting) == 13


def test_corrupt_cache_entry_is_recomputed(tmp_path, counting):
    imgs, keys = _batch(2)
    a = pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=False)
    p = pp.cache_path(tmp_path, PARAMS, 16, keys[0])
    p.write_bytes(p.read_bytes()[:50])  # truncated
    b = pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=False)
    assert len(counting) == 3
    np.testing.assert_array_equal(a, b)


def test_default_cache_dir_from_env(tmp_path, monkeypatch, counting):
    monkeypatch.setenv("CELLSTUDY_CACHE", str(tmp_path / "c"))
    imgs, keys = _batch(1)
    pp.preprocess_batch(imgs, keys, 16, PARAMS, progress=False)
    assert len(list((tmp_path / "c" / "preprocess").rglob("*.npy"))) == 1


def test_batch_validates_before_work(tmp_path, counting):
    imgs, keys = _batch(3)
    bad = imgs.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf.*\[2\]"):
        pp.preprocess_batch(bad, keys, 16, PARAMS, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="keys"):
        pp.preprocess_batch(imgs, keys[:2], 16, PARAMS, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        pp.preprocess_batch(imgs[..., :2], keys, 16, PARAMS, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="size"):
        pp.preprocess_batch(imgs, keys, 4, PARAMS, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="diffusion_time_step"):
        pp.preprocess_batch(imgs, keys, 16, {**PARAMS, "diffusion_time_step": 0.5},
                            cache_dir=tmp_path, progress=False)
    assert counting == []
    assert not (tmp_path / "preprocess").exists()


def test_progress_line(tmp_path, capsys):
    imgs, keys = _batch(2)
    pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=True)
    assert "2/2 images" in capsys.readouterr().out
    pp.preprocess_batch(imgs, keys, 16, PARAMS, cache_dir=tmp_path, progress=True)
    assert capsys.readouterr().out == ""  # all cached: nothing to report


def test_timings_keys():
    t = pp.timings(np.random.default_rng(0).random((32, 32)).astype(np.float32), PARAMS,
                   size=16, repeats=1)
    assert set(t) == {"binomial_blur", "landweber_deconvolution", "anisotropic_diffusion",
                      "resample", "total"}
    assert all(v >= 0 for v in t.values())


# ------------------------------------------------------------------------------ real cells
@pytest.mark.skipif(not BBBC.is_dir(), reason=f"real data not present at {BBBC}")
def test_real_bbbc021_cells(tmp_path):
    files = sorted((BBBC / "DMSO").glob("*.npy"))[:3]
    raw = np.stack([np.load(f) for f in files]).astype(np.float32)     # (3, 68, 68, 3) uint16
    rgb = raw[..., [2, 1, 0]]                                           # tubulin, actin, DNA
    hi = np.percentile(rgb, 99.8, axis=(0, 1, 2))
    rgb = np.clip(rgb / hi, 0, 1)
    out = pp.preprocess_batch(rgb, [f.name for f in files], 48, config.SCALES["cpu"]["preprocess"],
                              cache_dir=tmp_path, progress=False)
    assert out.shape == (3, 48, 48, 3) and np.isfinite(out).all()
    assert out.min() >= -0.2 and out.max() < 2.0
    # the DNA channel stays bright at the centre (the crop is centred on a nucleus)
    assert out[:, 20:28, 20:28, 2].mean() > out[:, :6, :6, 2].mean()
