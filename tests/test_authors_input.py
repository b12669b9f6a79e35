"""The authors' input chain (cellstudy.data.authors_input) on images whose values are unique ids: each
output value names the input pixel and channel it came from."""
import numpy as np
import pytest

from cellstudy.data.authors_input import authors_input, authors_source_index, flat_source


def _ids(h, w, dtype=np.int32):
    return np.arange(h * w * 3, dtype=dtype).reshape(h, w, 3)


def _where(img, out):
    """(row, col, channel) of every output value in the id image."""
    return np.unravel_index(out.astype(np.int64), img.shape)


def test_same_size_gives_three_identical_channels_each_the_left_third_interleaved():
    # H = W = S: derived by hand, output (i, j, k) = img[i, j // 3, j % 3] for every k
    S = 6
    img = _ids(S, S)
    out = authors_input(img, S)
    assert out.shape == (S, S, 3) and out.dtype == img.dtype
    i, j = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    for k in range(3):
        np.testing.assert_array_equal(out[..., k], img[i, j // 3, j % 3])
    r, c, ch = _where(img, out)
    assert (r == i[..., None]).all()                 # row i of the cell ...
    assert c.max() == S // 3 - 1                     # ... only its left third of the columns
    assert set(np.unique(ch)) == {0, 1, 2}           # the stains interleaved along the row
    assert (ch[..., 0] == ch[..., 1]).all() and (ch[..., 1] == ch[..., 2]).all()  # channels identical


def test_halving_the_size_by_hand():
    # H = W = 2S: rows 6i of the (3H, W) array (image row 2i, its left third), columns
    # floor((3j + k) * 2 / 3) = 2j, 2j, 2j + 1 -> output (i, j, k) = img[2i, c // 3, c % 3]
    S = 4
    img = _ids(2 * S, 2 * S)
    out = authors_input(img, S)
    for i in range(S):
        for j in range(S):
            for k in range(3):
                c = 2 * j + (1 if k == 2 else 0)
                assert out[i, j, k] == img[2 * i, c // 3, c % 3], (i, j, k)


@pytest.mark.parametrize("h, w, s", [(68, 68, 64), (68, 68, 32), (68, 68, 512), (50, 70, 64), (7, 5, 3)])
@pytest.mark.parametrize("dtype", [np.int32, np.float32, np.float64])
def test_matches_the_index_arithmetic(h, w, s, dtype):
    img = _ids(h, w, dtype)
    out = authors_input(img, s)
    assert out.shape == (s, s, 3) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.astype(np.int64), flat_source(img.shape, s))
    r, c, ch = authors_source_index(img.shape, s)
    np.testing.assert_array_equal(img[r, c, ch], out)


def test_at_the_cpu_scale_the_channels_are_near_identical_and_not_the_stains():
    # the BBBC021 crops (68 x 68) at S = 64: neighbouring values of one (3H, W) row
    img = _ids(68, 68)
    out = authors_input(img, 64)
    r, c, ch = _where(img, out)
    # the three "channels" of a pixel come from input pixels at most one column apart in one row
    assert (r.max(axis=-1) == r.min(axis=-1)).all()
    assert (c.max(axis=-1) - c.min(axis=-1)).max() <= 1
    # each output channel holds all three stains in about equal shares
    for k in range(3):
        share = np.bincount(ch[..., k].ravel(), minlength=3) / ch[..., k].size
        assert share.min() > 0.25, share
    # and spans about a third of the cell's width in each output row
    assert c.max() <= 68 // 3 + 1 or (c.max(axis=1) - c.min(axis=1)).max() <= 68 // 3 + 1


def test_only_input_values_and_bad_input():
    img = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
    out = authors_input(img, 16)
    assert np.isin(out, img).all()
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\)"):
        authors_input(np.zeros((4, 4)), 4)
    with pytest.raises(ValueError, match="size=0"):
        authors_input(np.zeros((4, 4, 3)), 0)
