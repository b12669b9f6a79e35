"""cellstudy.data: readers, robust scaling, manifest verification (every bad input), loading."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import re

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellstudy import data
from cellstudy.data import DataError, MissingFileError

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def _rand(shape, dtype):
    hi = np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else 1.0
    return RNG.integers(0, int(hi) + 1, size=shape).astype(dtype) if np.dtype(dtype).kind == "u" \
        else RNG.random(shape).astype(dtype)


def test_npy_roundtrip_any_dtype(tmp_path):
    for dt in (np.uint8, np.uint16, np.float32):
        a = _rand((9, 11, 3), dt)
        np.save(tmp_path / "a.npy", a)
        got = data.read_array(tmp_path / "a.npy")
        assert got.dtype == dt and np.array_equal(got, a)
        img = data.read_image(tmp_path / "a.npy", "0,1,2")
        assert img.dtype == np.float32 and np.array_equal(img, a.astype(np.float32))


@pytest.mark.parametrize("dt", [np.uint8, np.uint16])
def test_tiff_channel_last_and_first(tmp_path, dt):
    a = _rand((20, 30, 3), dt)
    tifffile.imwrite(tmp_path / "last.tif", a)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(a, -1, 0), photometric="rgb",
                     planarconfig="separate")
    tifffile.imwrite(tmp_path / "first.tif", np.moveaxis(a, -1, 0), photometric="minisblack")
    tifffile.imwrite(tmp_path / "ome.ome.tif", np.moveaxis(a, -1, 0), ome=True,
                     metadata={"axes": "CYX"})
    for name in ("last.tif", "planar.tif", "first.tif", "ome.ome.tif"):
        got = data.read_array(tmp_path / name)
        assert got.shape == (20, 30, 3), name
        assert got.dtype == dt and np.array_equal(got, a), name


def test_tiff_two_channels_without_axes(tmp_path):
    a = _rand((20, 30, 2), np.uint16)
    tifffile.imwrite(tmp_path / "last.tif", a)
    tifffile.imwrite(tmp_path / "first.tif", np.moveaxis(a, -1, 0))
    for name in ("last.tif", "first.tif"):
        assert np.array_equal(data.read_array(tmp_path / name), a), name


@pytest.mark.parametrize("dt", [np.uint8, np.uint16])
def test_tiff_one_file_per_channel(tmp_path, dt):
    a = _rand((16, 12, 3), dt)
    names = []
    for k, c in enumerate("RGB"):
        tifffile.imwrite(tmp_path / f"{c}.tif", a[:, :, k])
        names.append(f"{c}.tif")
    img = data.read_image(";".join(names), "0,0,0", root=tmp_path)
    assert img.dtype == np.float32 and np.array_equal(img, a.astype(np.float32))


@pytest.mark.parametrize("dt", [np.uint8, np.uint16])
def test_png_grey_any_bit_depth(tmp_path, dt):
    a = _rand((17, 13), dt)
    assert cv2.imwrite(str(tmp_path / "g.png"), a)
    got = data.read_array(tmp_path / "g.png")
    assert got.dtype == dt and np.array_equal(got, a)


def test_png_colour_keeps_rgb_order(tmp_path):
    # written by an independent RGB writer (imageio), so OpenCV's BGR must be undone
    import imageio.v3 as iio

    a = _rand((10, 14, 3), np.uint8)
    a[..., 0], a[..., 2] = 200, 10
    iio.imwrite(tmp_path / "c.png", a)
    got = data.read_array(tmp_path / "c.png")
    assert np.array_equal(got, a)
    # 16-bit colour (written via OpenCV, which expects BGR)
    b = _rand((10, 14, 3), np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), b[:, :, ::-1])
    got16 = data.read_array(tmp_path / "c16.png")
    assert got16.dtype == np.uint16 and np.array_equal(got16, b)


def test_png_per_channel_files_and_channel_mapping_and_crop(tmp_path):
    a = _rand((40, 50, 3), np.uint16)
    for k in range(3):
        cv2.imwrite(str(tmp_path / f"w{k}.png"), a[:, :, k])
    # R <- file w2, G <- w1, B <- w0
    img = data.read_image(["w2.png", "w1.png", "w0.png"], (0, 0, 0), crop=(5, 7, 16),
                          root=tmp_path)
    assert img.shape == (16, 16, 3)
    assert np.array_equal(img, a[5:21, 7:23, ::-1].astype(np.float32))
    # one multi-channel file with mapping "2,1,0"
    np.save(tmp_path / "m.npy", a)
    img2 = data.read_image(tmp_path / "m.npy", "2,1,0")
    assert np.array_equal(img2, a[:, :, ::-1].astype(np.float32))
    with pytest.raises(DataError, match=r"crop .* not inside"):
        data.read_image(tmp_path / "m.npy", "2,1,0", crop=(30, 0, 16))


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npy"):
        data.read_image(tmp_path / "nothere.npy", "0,1,2")
    np.save(tmp_path / "two.npy", np.zeros((8, 8, 2), np.uint16))
    with pytest.raises(DataError, match=r"two\.npy.*2 channel"):
        data.read_image(tmp_path / "two.npy", "2,1,0")
    np.save(tmp_path / "nan.npy", np.full((8, 8, 3), np.nan, np.float32))
    with pytest.raises(DataError, match=r"nan\.npy.*NaN"):
        data.read_image(tmp_path / "nan.npy", "0,1,2")
    (tmp_path / "x.jpg").write_bytes(b"123")
    with pytest.raises(DataError, match=r"x\.jpg.*unsupported"):
        data.read_image(tmp_path / "x.jpg", "0,1,2")
    with pytest.raises(DataError, match="channels"):
        data.parse_channels("2,1")


@pytest.mark.parametrize("suffix", [".npy", ".png", ".tif"])
def test_truncated_files_are_unreadable(tmp_path, suffix):
    a = _rand((32, 32, 3), np.uint16)
    p = tmp_path / f"t{suffix}"
    if suffix == ".npy":
        np.save(p, a)
    elif suffix == ".png":
        cv2.imwrite(str(p), a)
    else:
        tifffile.imwrite(p, a)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=rf"t\{suffix}.*(unreadable|truncated)"):
        data.read_array(p)


# ---------------------------------------------------------------------------------------------
# Robust scaling
# ---------------------------------------------------------------------------------------------
def test_robust_scale_range_shape_dtype_and_endpoints():
    img = RNG.normal(100, 20, size=(50, 40, 3)).astype(np.float64)
    out, (lo, hi) = data.robust_scale(img, 1, 99, return_params=True)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    for c in range(3):
        assert lo[c] == pytest.approx(np.percentile(img[..., c], 1), rel=1e-5)
        assert hi[c] == pytest.approx(np.percentile(img[..., c], 99), rel=1e-5)
        # ~1% of pixels at or below lo are 0, ~1% at or above hi are 1
        assert abs((out[..., c] == 0).mean() - 0.01) < 0.005
        assert abs((out[..., c] == 1).mean() - 0.01) < 0.005
    # monotone per channel
    c = img[..., 1].ravel()
    o = out[..., 1].ravel()
    order = np.argsort(c)
    assert np.all(np.diff(o[order]) >= 0)


def test_robust_scale_per_channel_affine_invariance_and_input_untouched():
    img = RNG.random((30, 30, 3)).astype(np.float32)
    copy = img.copy()
    scaled = img * np.array([1.0, 1000.0, 0.01], np.float32) + np.array([0, 500, -3], np.float32)
    a, b = data.robust_scale(img), data.robust_scale(scaled)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.array_equal(img, copy)


def test_robust_scale_constant_channel_is_zero_not_nan():
    img = RNG.random((20, 20, 3)).astype(np.float32)
    img[..., 0] = 7.0
    img[..., 2] = 0.0
    img[0, 0, 2] = 5.0   # one bright pixel: its 99.8th percentile < max, still not constant
    out = data.robust_scale(img, 1, 99.8)
    assert np.isfinite(out).all()
    assert np.all(out[..., 0] == 0)
    assert out[..., 1].max() == 1.0


def test_robust_scale_batch_equals_per_image_and_bad_args():
    batch = RNG.random((4, 16, 16, 3)).astype(np.float32) * np.arange(1, 5)[:, None, None, None]
    out, (lo, hi) = data.robust_scale(batch, return_params=True)
    assert lo.shape == (4, 3) and hi.shape == (4, 3)
    for i in range(4):
        np.testing.assert_array_equal(out[i], data.robust_scale(batch[i]))
    with pytest.raises(ValueError, match="low=50"):
        data.robust_scale(batch, 50, 10)
    with pytest.raises(ValueError, match="shape"):
        data.robust_scale(np.zeros((5, 5)))
    bad = batch.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        data.robust_scale(bad)


# ---------------------------------------------------------------------------------------------
# Fake data roots and manifests
# ---------------------------------------------------------------------------------------------
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_root(tmp_path: Path, per_group: int = 3, groups_per_class: int = 2):
    """A small data root: fake/<class>/<group>_<i>.npy (12x12x3 uint16) and its manifest."""
    root = tmp_path / "root"
    rows = []
    for label, cls in enumerate(("ctrl", "treated")):
        d = root / "fake" / cls
        d.mkdir(parents=True)
        for g in range(groups_per_class):
            grp = f"{cls}-field{g}"
            for i in range(per_group):
                a = RNG.integers(100, 4000, size=(12, 12, 3)).astype(np.uint16)
                p = d / f"{grp}_{i}.npy"
                np.save(p, a)
                rows.append({"cell_id": f"{grp}_{i}", "path": p.relative_to(root).as_posix(),
                             "label": label, "class_name": cls, "group": grp,
                             "channels": "2,1,0", "sha256": _sha(p), "shape": "12x12x3"})
    df = pd.DataFrame(rows)
    return root, df


def write_manifest(tmp_path: Path, df: pd.DataFrame) -> Path:
    p = tmp_path / "fake-cohort.csv"
    df.to_csv(p, index=False)
    return p


def snapshot(root: Path):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


def test_load_cohort_from_fake_root(tmp_path):
    root, df = make_root(tmp_path)
    m = write_manifest(tmp_path, df)
    before = snapshot(root)
    c = data.load_cohort(str(m), root=root)
    assert snapshot(root) == before          # nothing under the data root is written
    assert c.images.shape == (12, 12, 12, 3) and c.images.dtype == np.float32
    assert c.images.min() >= 0 and c.images.max() <= 1
    assert list(c.labels) == [0] * 6 + [1] * 6
    assert list(c.groups) == list(df.group)
    assert len(set(c.sha256)) == 12
    # RGB mapping "2,1,0": red = stored channel 2
    raw = np.load(root / df.path[0])
    np.testing.assert_allclose(c.images[0], data.robust_scale(raw[:, :, ::-1]), atol=1e-6)
    assert c.scaling["low"] == data.DEFAULT_LOW and c.scaling["lo"].shape == (12, 3)
    assert c.counts()["cells"].tolist() == [6, 6]
    assert list(c.counts().columns) == ["label", "class", "in the manifest", "cells", "groups"]


def test_missing_data_root(tmp_path):
    _, df = make_root(tmp_path)
    m = write_manifest(tmp_path, df)
    nope = tmp_path / "no-such-root"
    with pytest.raises(FileNotFoundError, match="no-such-root"):
        data.load_cohort(str(m), root=nope)
    with pytest.raises(FileNotFoundError, match="no-such-root"):
        data.verify_manifest(df, nope)


def test_missing_file(tmp_path):
    root, df = make_root(tmp_path)
    (root / df.path[4]).unlink()
    with pytest.raises(MissingFileError) as e:
        data.verify_manifest(df, root)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    assert df.path[4] in str(e.value) and "does not exist" in str(e.value)
    assert "is the data root right?" in str(e.value)   # only missing files: the hint names the usual cause
    m = write_manifest(tmp_path, df)
    with pytest.raises(FileNotFoundError, match=df.path[4]):
        data.load_cohort(str(m), root=root)
    with pytest.raises(FileNotFoundError, match=df.path[4]):  # sha-only path too
        data.verify_manifest(df, root, check_images=False)


def test_checksum_mismatch(tmp_path):
    root, df = make_root(tmp_path)
    p = root / df.path[2]
    np.save(p, np.zeros((12, 12, 3), np.uint16))   # a valid file, but not the manifest's
    with pytest.raises(DataError, match=rf"{df.path[2]}: sha256 .* does not match"):
        data.verify_manifest(df, root)
    with pytest.raises(DataError, match=rf"{df.path[2]}: sha256"):
        data.verify_manifest(df, root, check_images=False)
    data.verify_manifest(df.drop(index=2).reset_index(drop=True), root)  # rest is fine
    data.verify_manifest(df, root, check_sha=False)                      # opt-out works


def test_truncated_image(tmp_path):
    root, df = make_root(tmp_path)
    p = root / df.path[1]
    p.write_bytes(p.read_bytes()[:100])
    df.loc[1, "sha256"] = _sha(p)           # the checksum matches the truncated bytes
    with pytest.raises(DataError, match=rf"{df.path[1]}: unreadable or truncated"):
        data.verify_manifest(df, root)
    with pytest.raises(DataError, match=rf"{df.path[1]}: unreadable or truncated"):
        data.load_cohort(str(write_manifest(tmp_path, df)), root=root)


def test_wrong_channel_count(tmp_path):
    root, df = make_root(tmp_path)
    p = root / df.path[7]
    np.save(p, np.zeros((12, 12, 2), np.uint16))
    df.loc[7, "sha256"] = _sha(p)
    with pytest.raises(DataError, match=rf"{df.path[7]}: shape 12x12x2; expected 12x12x3"):
        data.verify_manifest(df, root)
    # without a 'shape' column the channel mapping catches it
    with pytest.raises(DataError, match=rf"{df.path[7]}: has 2 channel\(s\).*at least 3"):
        data.verify_manifest(df.drop(columns="shape"), root)


def test_nan_and_inf(tmp_path):
    root, df = make_root(tmp_path)
    for i, bad in ((3, np.nan), (9, np.inf)):
        a = np.ones((12, 12, 3), np.float32)
        a[2, 3, 1] = bad
        p = root / df.path[i]
        np.save(p, a)
        df.loc[i, "sha256"] = _sha(p)
    df["shape"] = "12x12x3"
    with pytest.raises(DataError) as e:
        data.verify_manifest(df, root)
    msg = str(e.value)
    assert f"{df.path[3]}: contains 1 NaN/inf" in msg and f"{df.path[9]}: contains 1 NaN/inf" \
        in msg and len(e.value.problems) == 2


def test_class_with_no_images(tmp_path):
    root, df = make_root(tmp_path)
    only_normal = df[df.label == 0].reset_index(drop=True)
    with pytest.raises(DataError, match=r"class 'abnormal' \(label 1\) has no images"):
        data.verify_manifest(only_normal, root)
    m = write_manifest(tmp_path, only_normal)
    with pytest.raises(DataError, match=r"class 'abnormal'"):
        data.load_cohort(str(m), root=root)


def test_group_spanning_both_classes(tmp_path):
    root, df = make_root(tmp_path)
    df.loc[df.index[-1], "group"] = "ctrl-field0"
    with pytest.raises(DataError, match=r"group 'ctrl-field0' spans both classes"):
        data.verify_manifest(df, root)
    data.verify_manifest(df, root, allow_mixed_groups=True)


def test_unknown_cohort_name():
    with pytest.raises(DataError, match=r"unknown cohort 'no-such-cohort'.*bbbc021-paper"):
        data.load_cohort("no-such-cohort")
    with pytest.raises(DataError, match="no-such-cohort"):
        data.load_manifest("no-such-cohort")


def test_bad_labels_and_columns(tmp_path):
    root, df = make_root(tmp_path)
    d2 = df.copy()
    d2.loc[0, "label"] = 5
    with pytest.raises(DataError, match=rf"cell {d2.cell_id[0]}: label '5'"):
        data.verify_manifest(d2, root)
    with pytest.raises(DataError, match=r"missing column\(s\) \['sha256'\]"):
        data.verify_manifest(df.drop(columns="sha256"), root)
    d3 = pd.concat([df, df.iloc[[0]]], ignore_index=True)
    with pytest.raises(DataError, match="appears more than once"):
        data.verify_manifest(d3, root)


def test_all_problems_collected_and_capped(tmp_path):
    root, df = make_root(tmp_path, per_group=5, groups_per_class=2)   # 20 files
    for rel in df.path[:12]:
        (root / rel).unlink()
    p = root / df.path[15]
    p.write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        data.verify_manifest(df, root)
    err = e.value
    assert len(err.problems) == 13
    assert not isinstance(err, FileNotFoundError)          # not only missing files
    msg = str(err)
    # the 12 missing files read as 3 examples and a count, the broken file on its own line
    assert msg.startswith("13 problem(s)") and "... and 9 more file(s) with the same problem" in msg
    assert msg.count("\n  - ") == 5 and df.path[15] in msg
    assert any(df.path[15] in q for q in err.problems)
    # problems that all differ are capped at MAX_LISTED lines
    with pytest.raises(DataError) as e:
        data._raise_problems([f"problem {i}" for i in range(13)], "x")
    assert str(e.value).count("\n  - ") == data.MAX_LISTED and "... and 3 more line(s)" in str(e.value)


def test_nothing_written_on_failure(tmp_path):
    root, df = make_root(tmp_path)
    (root / df.path[0]).write_bytes(b"x")
    before = snapshot(root)
    with pytest.raises(DataError):
        data.load_cohort(str(write_manifest(tmp_path, df)), root=root)
    assert snapshot(root) == before


def test_crops_and_per_channel_files_in_a_manifest(tmp_path):
    root = tmp_path / "root"
    (root / "f").mkdir(parents=True)
    rows = []
    for label, cls in enumerate(("a", "b")):
        for fld in range(2):
            field = RNG.integers(0, 255, size=(48, 48, 3)).astype(np.uint8)
            rels = []
            for k, w in enumerate(("w2", "w3", "w1")):
                rel = f"f/{cls}{fld}_{w}.png"
                cv2.imwrite(str(root / rel), field[:, :, k])
                rels.append(rel)
            for j, (y, x) in enumerate(((0, 0), (10, 20), (32, 32))):
                rows.append({"cell_id": f"{cls}{fld}-{j}", "path": ";".join(rels),
                             "label": label, "class_name": cls, "group": f"{cls}{fld}",
                             "channels": "0,0,0",
                             "sha256": ";".join(_sha(root / r) for r in rels),
                             "crop_y": y, "crop_x": x, "crop_size": 16})
    df = pd.DataFrame(rows)
    c = data.load_cohort(str(write_manifest(tmp_path, df)), root=root)
    assert c.images.shape == (12, 16, 16, 3)
    assert len(set(c.sha256)) == 12          # crops of one field still get distinct keys
    raw = data.read_image(df.path[1], df.channels[1], crop=(10, 20, 16), root=root)
    np.testing.assert_allclose(c.images[1], data.robust_scale(raw), atol=1e-6)
    # a crop outside its field is named
    df.loc[2, "crop_y"] = 40
    with pytest.raises(DataError, match=rf"cell {df.cell_id[2]}: .*crop \(y=40"):
        data.verify_manifest(df, root)


def test_a_relative_manifest_path_that_is_not_there_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"manifest file my.csv does not exist \(looked for "
                                                rf"{re.escape(str(tmp_path / 'my.csv'))}.*absolute path"):
        data.manifest_path("my.csv")
    with pytest.raises(FileNotFoundError, match=r"does not exist$"):
        data.manifest_path(str(tmp_path / "no.csv"))


def test_class_names_of_a_manifest_and_the_books_role_text():
    t = pd.DataFrame({"label": [0, 0, 1], "class_name": ["healthy", "healthy", "tumour"]})
    names = data.class_names_of(t)
    assert names == {0: "healthy", 1: "tumour"}
    assert data.role_text(1, names) == "abnormal (tumour)" and data.role_text(0, None) == "normal"
    assert data.role_text(0, {0: "normal", 1: "x"}) == "normal"          # no "normal (normal)"
    assert data.class_names_of(t.assign(class_name=["a", "b", "tumour"])) is None   # two names for a role
    assert data.class_names_of(t.drop(columns="class_name")) is None
