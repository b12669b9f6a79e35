"""The correlation image (paper eq. 15-16) and its positive / negative ratios."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Border handling of the windows: scipy's "reflect" (half-sample symmetric: d c b a | a b c d,
#: numpy's ``np.pad(..., mode="symmetric")``).
BORDER_MODE = "reflect"


def local_correlation(a, b, radius: int = 2, var_rtol: float = 1e-8) -> np.ndarray:
    """Per-pixel Pearson correlation of ``a`` and ``b`` over (2r+1) x (2r+1) windows (eq. 15-16).

    At pixel (i, j) the window is rows i-r..i+r, columns j-r..j+r (eq. 16 with r = 2: a 5 x 5
    window). Vectorised with box filters (``scipy.ndimage.uniform_filter``) of the values, squares
    and cross-products: ``cov = E[ab] - E[a]E[b]``, ``var = E[a^2] - E[a]^2``, in float64 after
    subtracting each image's global mean (Pearson is shift invariant; this limits cancellation).
    Borders: windows are completed by mirroring (``BORDER_MODE = "reflect"``, i.e. numpy's
    ``symmetric`` padding).

    Constant windows: where the window variance of ``a`` or of ``b`` is <= ``var_rtol`` times that
    window's mean square (i.e. constant up to float round-off), the correlation is 0. Results are
    clipped to [-1, 1].

    Parameters: ``a``, ``b``: (H, W) real arrays of the same shape (Gmean-Shape and Gmean-GradCam,
    e.g. a single channel or a channel mean of the shape image); ``radius`` >= 1 int.
    Returns: (H, W) float64 in [-1, 1].
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(
            f"a and b must be 2-D (H, W) images; got shapes {a.shape} and {b.shape} "
            "(reduce a colour image to one channel first)"
        )
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape; got {a.shape} and {b.shape}")
    if not isinstance(radius, (int, np.integer)) or radius < 1:
        raise ValueError(f"radius must be an int >= 1; got {radius!r}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("a and b must be finite (no NaN / inf)")
    if var_rtol < 0:
        raise ValueError(f"var_rtol must be >= 0; got {var_rtol}")
    size = 2 * radius + 1
    a = a - a.mean()
    b = b - b.mean()

    def box(v):
        return ndimage.uniform_filter(v, size=size, mode=BORDER_MODE)

    ma, mb = box(a), box(b)
    saa, sbb, sab = box(a * a), box(b * b), box(a * b)
    va = saa - ma * ma
    vb = sbb - mb * mb
    cov = sab - ma * mb
    tiny = np.finfo(np.float64).tiny
    ok = (va > var_rtol * saa + tiny) & (vb > var_rtol * sbb + tiny)
    denom = np.sqrt(np.where(ok, va * vb, 1.0))
    r = np.where(ok, cov / denom, 0.0)
    return np.clip(r, -1.0, 1.0)


def correlation_ratios(corr, threshold: float = 0.5, mask=None) -> tuple[float, float]:
    """(positive_ratio, negative_ratio): share of pixels with ``corr > threshold`` and with
    ``corr < -threshold`` (paper: 0.5). ``mask`` (same shape, bool) restricts the count to those
    pixels (e.g. the cell). Ratios are fractions in [0, 1] (multiply by 100 for %)."""
    c = np.asarray(corr, dtype=np.float64)
    if c.size == 0:
        raise ValueError("corr is empty")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must lie in [0, 1]; got {threshold}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != c.shape:
            raise ValueError(f"mask shape {mask.shape} does not match corr shape {c.shape}")
        if not mask.any():
            raise ValueError("mask selects no pixels")
        c = c[mask]
    return float(np.mean(c > threshold)), float(np.mean(c < -threshold))
