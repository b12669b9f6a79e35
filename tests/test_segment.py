"""cellstudy.data.segment: nuclei on synthetic blobs and on a real RxRx1 field; crops."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellstudy import data
from cellstudy.data import segment

CENTRES = [(30, 30), (30, 90), (30, 150), (90, 40), (90, 110), (100, 200), (160, 60),
           (160, 140), (200, 200), (210, 100)]


def _blobs(shape=(256, 256), centres=CENTRES, r=8, noise=3.0, seed=0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 10.0)
    for cy, cx in centres:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 120.0
    img += np.random.default_rng(seed).normal(0, noise, shape)
    return img.astype(np.float32)


def test_finds_known_blobs_with_centroids():
    lab = segment.segment_nuclei(_blobs())
    assert lab.dtype == np.int32 and lab.max() == len(CENTRES)
    t = segment.nucleus_table(lab, size=32)
    found = t[["centroid_y", "centroid_x"]].to_numpy()
    for c in CENTRES:
        assert np.min(np.hypot(*(found - np.array(c)).T)) < 1.5, c
    # area of a radius-8 disc is ~201 px
    assert t.area.between(150, 260).all()


def test_touching_nuclei_are_split():
    lab = segment.segment_nuclei(_blobs(centres=[(60, 60), (60, 75)], r=8))
    assert lab.max() == 2


def test_small_objects_and_empty_images():
    img = _blobs(centres=[(50, 50)], r=8)
    img[120:122, 120:122] = 200.0          # 4 px speck < min_area
    assert segment.segment_nuclei(img).max() == 1
    assert segment.segment_nuclei(np.zeros((64, 64))).max() == 0
    with pytest.raises(ValueError, match="NaN"):
        segment.segment_nuclei(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match=r"shape \(8, 8, 3\)"):
        segment.segment_nuclei(np.zeros((8, 8, 3)))


def test_crops_inside_and_border_dropped():
    centres = CENTRES + [(5, 128), (250, 20)]          # two nuclei cut by the border
    dna = _blobs(centres=centres, r=6)
    field = np.stack([dna * 0.5, dna * 0.2, dna], axis=-1)
    crops, t = segment.nucleus_crops(field, size=48)
    assert crops.shape == (len(t), 48, 48, 3) and crops.dtype == field.dtype
    # (30, 30) etc. fit; the border nuclei and those within 24 px of the edge do not
    expected = [c for c in centres
                if c[0] - 24 >= 1 and c[1] - 24 >= 1 and c[0] + 24 <= 255 and c[1] + 24 <= 255]
    assert len(t) == len(expected)
    for (_, r), crop in zip(t.iterrows(), crops):
        assert 1 <= r.crop_y and r.crop_y + 48 <= 255 and 1 <= r.crop_x and r.crop_x + 48 <= 255
        np.testing.assert_array_equal(crop, field[r.crop_y:r.crop_y + 48, r.crop_x:r.crop_x + 48])
        assert crop[24, 24, 2] > 100          # the nucleus is at the crop centre
    with pytest.raises(ValueError, match="crop size 0"):
        segment.nucleus_table(np.zeros((4, 4), int), 0)


def test_real_rxrx1_field(shared_data):
    base = shared_data / "rxrx1-celltypes"
    if not base.is_dir():
        pytest.skip(f"rxrx1-celltypes not found under {shared_data}")
    prefix = "rxrx1-celltypes/train/HUVEC-01/Plate1/B02_s1"
    field = data.read_image([f"{prefix}_w2.png", f"{prefix}_w3.png", f"{prefix}_w1.png"],
                            "0,0,0", root=shared_data)
    assert field.shape == (512, 512, 3)
    crops, t = segment.nucleus_crops(field, size=64)
    labels = segment.segment_nuclei(field[..., 2])
    # the README: 60-250 cells per field
    assert 60 <= labels.max() <= 250, labels.max()
    assert 30 <= len(t) <= labels.max()
    assert crops.shape == (len(t), 64, 64, 3)
    assert (t.crop_y >= 1).all() and (t.crop_x >= 1).all()
    assert (t.crop_y + 64 <= 511).all() and (t.crop_x + 64 <= 511).all()
    # nuclei are brighter in DNA than the background at their centroids
    cy, cx = t.centroid_y.round().astype(int), t.centroid_x.round().astype(int)
    assert np.median(field[cy, cx, 2]) > 3 * np.median(field[..., 2])
    # the committed manifest's crops of this field are a subset of these
    m = pd.read_csv(data.MANIFEST_DIR / "rxrx1-cells.csv")
    m = m[m.group == "HUVEC-01/Plate1/B02_s1"]
    assert len(m) == min(40, len(t)) and (m.crops_in_field == len(t)).all()
    got = set(zip(t.crop_y, t.crop_x))
    assert set(zip(m.crop_y, m.crop_x)) <= got


def test_gaussian_is_scipys_with_the_c_librarys_exp():
    """The smoothing equals scipy's gaussian_filter up to the kernel's last bits, and the kernel is
    built from math.exp (the same on every x86-64 CPU), not from NumPy's CPU-dispatched exp."""
    import math

    from scipy import ndimage as ndi
    for sigma in (1.0, 2.0, 0.7):
        k = segment.gaussian_kernel(sigma)
        r = int(4.0 * sigma + 0.5)
        ref = [math.exp(-0.5 / sigma ** 2 * x * x) for x in range(-r, r + 1)]
        assert k.shape == (2 * r + 1,) and k.dtype == np.float64
        np.testing.assert_array_equal(k, np.array(ref) / np.array(ref).sum())
        assert abs(k.sum() - 1) < 1e-12 and (k == k[::-1]).all()
    rng = np.random.default_rng(0)
    for a in (rng.random((40, 50)).astype(np.float32), rng.random((40, 50))):
        for sigma in (1.0, 2.0):
            g = segment.gaussian_filter(a, sigma)
            assert g.dtype == a.dtype and g.shape == a.shape
            np.testing.assert_allclose(g, ndi.gaussian_filter(a, sigma), rtol=1e-6 if a.dtype == np.float32 else 1e-14)
    with pytest.raises(ValueError, match="sigma"):
        segment.gaussian_kernel(0)
