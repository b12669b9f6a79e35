"""Channel importance: how much each stain moves the prediction (the quantitative test of the
paper's claim that the networks rely on vimentin, here the third channel)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from cellstudy.explain.xai import _keras as K

METHODS = ("zero", "mean")


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the mean of ``values`` (1-D) over resampled cells:
    (mean, low, high)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array; got shape {v.shape}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int; got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def channel_importance(model, images, labels, train_means, n_boot: int = 1000, seed: int = 0,
                       methods=METHODS, transform: Callable | None = None,
                       channel_names=None, batch_size: int = 64, level: float = 0.95,
                       return_per_cell: bool = False):
    """Drop of the true class's predicted probability when one channel is perturbed.

    For each channel c and method: ``"zero"`` sets channel c to 0 (occlusion); ``"mean"`` sets it
    to ``train_means[c]`` (the training mean of that channel). Per cell,
    ``drop = p_true(x) - p_true(x perturbed)`` (probability units; positive = the channel
    supports the true class). The table gives the mean drop over cells with a percentile
    bootstrap CI over cells (``n_boot`` resamples, ``seed``).

    Parameters
    ----------
    images : (N, H, W, C) in *stain space* (channel c = one stain, RGB order of
        ``cellstudy.config.CHANNELS``), before any channel-mixing transform.
    labels : (N,) true class indices.
    train_means : (C,) per-channel training means in the same space as ``images``.
    transform : optional callable applied to the (perturbed) images before the model, e.g. the
        fold's ``ZCAWhitening.transform``: ZCA whitening mixes the channels, so perturbing a
        whitened channel would not isolate one stain. The model must accept its output.
    channel_names : (C,) names (default ``cellstudy.config.CHANNELS`` for C = 3).

    Returns
    -------
    DataFrame with columns channel, channel_index, method, mean_drop, ci_low, ci_high, n_cells,
    mean_p_true (before perturbation); with ``return_per_cell=True`` also a per-cell DataFrame
    (cell, channel, method, p_true, p_perturbed, drop).
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) batch; got shape {x.shape}")
    n, C = len(x), x.shape[-1]
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},); got {y.shape}")
    means = np.asarray(train_means, dtype=np.float32)
    if means.shape != (C,) or not np.all(np.isfinite(means)):
        raise ValueError(f"train_means must be a finite ({C},) array; got {train_means!r}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not len(methods):
        raise ValueError(f"methods must be a non-empty subset of {METHODS}; got {methods!r}")
    if channel_names is None:
        if C == 3:
            from cellstudy.config import CHANNELS  # noqa: PLC0415
            channel_names = list(CHANNELS)
        else:
            channel_names = [f"channel{c}" for c in range(C)]
    if len(channel_names) != C:
        raise ValueError(f"channel_names must have {C} entries; got {channel_names!r}")
    tr = transform if transform is not None else (lambda a: a)
    x_in = K.check_images(model, tr(x), "images (after transform)")
    cls = K.check_class_index(y, n, K.n_classes(model), "labels")
    p0 = K.predict_scores(model, x_in, cls, "probability", batch_size)
    rows, cells = [], []
    for c in range(C):
        for method in methods:
            xp = x.copy()
            xp[..., c] = 0.0 if method == "zero" else means[c]
            xp = K.check_images(model, tr(xp), "images (after transform)")
            p1 = K.predict_scores(model, xp, cls, "probability", batch_size)
            drop = p0 - p1
            m, lo, hi = bootstrap_ci(drop, n_boot, seed, level)
            rows.append({"channel": channel_names[c], "channel_index": c, "method": method,
                         "mean_drop": m, "ci_low": lo, "ci_high": hi, "n_cells": n,
                         "mean_p_true": float(p0.mean())})
            if return_per_cell:
                cells.append(pd.DataFrame({"cell": np.arange(n), "channel": channel_names[c],
                                           "method": method, "p_true": p0, "p_perturbed": p1,
                                           "drop": drop}))
    table = pd.DataFrame(rows)
    if return_per_cell:
        return table, pd.concat(cells, ignore_index=True)
    return table
