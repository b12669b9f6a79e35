"""Nuclear segmentation of a DNA channel and fixed-size single-cell crops (study.md section 2).

Fields of view (RxRx1, 512 x 512) become single-cell images: nuclei are segmented on the DNA
channel (Gaussian smoothing, Otsu threshold, hole filling, distance-transform watershed), and a
``size`` x ``size`` crop is centred on each nucleus' centroid. Crops that would touch or cross the
image border are dropped (every kept crop lies fully inside the field).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

#: Default segmentation parameters (pixels at the stored resolution; tuned on RxRx1 w1).
SEGMENT_DEFAULTS: dict[str, float] = {
    "smooth_sigma": 1.0,       # Gaussian sigma before thresholding, px
    "min_area": 40,            # smallest nucleus kept, px^2
    "min_distance": 7,         # minimum distance between watershed seeds, px
    "distance_sigma": 2.0,     # Gaussian sigma on the distance transform, px
}


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The normalised 1-D Gaussian of ``scipy.ndimage.gaussian_filter`` (radius
    ``int(truncate * sigma + 0.5)`` px), with each tap's exponential from the C library
    (``math.exp``) instead of NumPy's. NumPy picks its ``exp`` by CPU at run time, and on AVX-512
    CPUs the kernel for sigma 2 differs in the last bit of 4 of its 17 taps; the watershed then
    moved a pixel between two touching nuclei, and the RxRx1 manifest built on such a machine
    differed from the one built on an AVX2 machine. Shape (2 * radius + 1,), float64, sums to 1."""
    if not sigma > 0:
        raise ValueError(f"gaussian_kernel: sigma={sigma!r}; expected > 0 px")
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.array([math.exp(v) for v in (-0.5 / (sigma * sigma) * x ** 2)])
    return phi / phi.sum()


def gaussian_filter(a: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(a, sigma)`` (mode reflect, truncate 4, output of ``a``'s
    dtype) with :func:`gaussian_kernel`, so the result does not depend on the CPU."""
    a = np.asarray(a)
    w = gaussian_kernel(sigma)[::-1]
    out = np.empty_like(a)
    src = a
    for axis in range(a.ndim):  # one axis after the other, as scipy does
        ndi.correlate1d(src, w, axis=axis, output=out, mode="reflect")
        src = out
    return out


def segment_nuclei(dna: np.ndarray, smooth_sigma: float = 1.0, min_area: int = 40,
                   min_distance: int = 7, distance_sigma: float = 2.0) -> np.ndarray:
    """Label the nuclei in a DNA image.

    dna: (H, W) intensities, any real dtype (e.g. Hoechst / DAPI). Steps: Gaussian blur
    (``smooth_sigma`` px) -> Otsu threshold -> fill holes, drop objects < ``min_area`` px^2 ->
    Euclidean distance transform (smoothed by ``distance_sigma`` px) -> local maxima at least
    ``min_distance`` px apart as seeds -> watershed of the negative distance inside the mask ->
    drop labels < ``min_area`` px^2.
    Returns (H, W) int32 labels, 0 = background, 1..K = nuclei (consecutive).
    """
    from skimage import feature, filters, segmentation

    d = np.asarray(dna, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"segment_nuclei: dna has shape {d.shape}; expected (H, W)")
    if not np.isfinite(d).all():
        raise ValueError("segment_nuclei: dna contains NaN or inf; expected finite values")
    if d.max() <= d.min():
        return np.zeros(d.shape, np.int32)
    s = gaussian_filter(d, smooth_sigma) if smooth_sigma > 0 else d
    mask = s > filters.threshold_otsu(s)
    mask = ndi.binary_fill_holes(mask)
    lab0, n0 = ndi.label(mask)
    if n0 == 0:
        return np.zeros(d.shape, np.int32)
    area0 = np.bincount(lab0.ravel())
    mask &= (area0 >= min_area)[lab0]
    lab0[~mask] = 0
    dist = ndi.distance_transform_edt(mask)
    if distance_sigma > 0:
        dist = gaussian_filter(dist, distance_sigma)
    peaks = feature.peak_local_max(dist, min_distance=int(min_distance), labels=lab0,
                                   exclude_border=False)
    markers = np.zeros(d.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # every connected component gets at least one seed (a flat component may have none)
    seeded = np.unique(lab0[markers > 0])
    unseeded = np.setdiff1d(np.unique(lab0[lab0 > 0]), seeded)
    if len(unseeded):
        com = ndi.center_of_mass(mask, lab0, unseeded)
        for j, (y, x) in enumerate(com):
            yy, xx = int(round(y)), int(round(x))
            if lab0[yy, xx] != unseeded[j]:  # non-convex: take any pixel of the component
                ys, xs = np.nonzero(lab0 == unseeded[j])
                yy, xx = ys[0], xs[0]
            markers[yy, xx] = markers.max() + 1
    lab = segmentation.watershed(-dist, markers, mask=mask)
    area = np.bincount(lab.ravel())
    small = area < min_area
    small[0] = False
    lab[small[lab]] = 0
    lab, _, _ = segmentation.relabel_sequential(lab)
    return lab.astype(np.int32)


def nucleus_table(labels: np.ndarray, size: int = 64) -> pd.DataFrame:
    """Per nucleus: ``label, centroid_y, centroid_x, area, crop_y, crop_x, crop_size, inside``.

    The crop is ``size`` x ``size`` with top-left ``(crop_y, crop_x) = round(centroid) - size//2``;
    ``inside`` is False when it touches or crosses the border (``crop_y < 1``, ``crop_x < 1``,
    ``crop_y + size > H - 1`` or ``crop_x + size > W - 1``).
    """
    if size <= 0:
        raise ValueError(f"crop size {size}; expected a positive number of pixels")
    lab = np.asarray(labels)
    h, w = lab.shape
    ids = np.unique(lab[lab > 0])
    if len(ids) == 0:
        return pd.DataFrame(columns=["label", "centroid_y", "centroid_x", "area", "crop_y",
                                     "crop_x", "crop_size", "inside"])
    com = np.array(ndi.center_of_mass(np.ones_like(lab), lab, ids)).reshape(-1, 2)
    area = ndi.sum_labels(np.ones_like(lab), lab, ids).astype(int)
    cy = np.round(com[:, 0]).astype(int) - size // 2
    cx = np.round(com[:, 1]).astype(int) - size // 2
    inside = (cy >= 1) & (cx >= 1) & (cy + size <= h - 1) & (cx + size <= w - 1)
    return pd.DataFrame({"label": ids.astype(int), "centroid_y": com[:, 0].round(1),
                         "centroid_x": com[:, 1].round(1), "area": area, "crop_y": cy,
                         "crop_x": cx, "crop_size": int(size), "inside": inside})


def nucleus_crops(field: np.ndarray, size: int = 64, dna_channel: int = 2,
                  labels: np.ndarray | None = None, **seg_params):
    """Fixed-size crops centred on each nucleus of a field.

    field: (H, W, C) image (RGB order: DNA is channel 2 by default) or (H, W) DNA alone.
    size: crop side, px (default 64). ``labels``: precomputed nucleus labels, else
    ``segment_nuclei(field[..., dna_channel], **seg_params)``.
    Returns ``(crops, table)``: crops (K, size, size, C) (or (K, size, size)) in the field's
    dtype, one per nucleus whose crop lies fully inside the field (border-touching ones dropped),
    and the matching rows of ``nucleus_table`` (index reset).
    """
    f = np.asarray(field)
    dna = f if f.ndim == 2 else f[..., dna_channel]
    if labels is None:
        labels = segment_nuclei(dna, **seg_params)
    t = nucleus_table(labels, size)
    t = t[t["inside"].astype(bool)].reset_index(drop=True)
    crops = np.stack([f[y:y + size, x:x + size] for y, x in zip(t.crop_y, t.crop_x)]) \
        if len(t) else np.zeros((0, size, size) + f.shape[2:], f.dtype)
    return crops, t
