"""Faithfulness of a saliency map: deletion and insertion curves (Petsiuk et al. 2018, RISE)
against a random-order baseline."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellstudy.explain.xai import _keras as K
from cellstudy.explain.xai.attributions import _fill_array


@dataclass
class Faithfulness:
    """Deletion / insertion curves and their areas.

    ``fractions``: (steps+1,) share of pixels deleted (inserted), 0..1. Curves (N, steps+1):
    the class score after deleting the top-ranked pixels (``deletion``) or after inserting them
    into the ``fill`` image (``insertion``); ``random_*``: the same for a random pixel order.
    AUCs (N,): trapezoid areas over the fractions (in score units, 0..1 for probabilities).
    A faithful explanation has a *low* deletion AUC and a *high* insertion AUC relative to random.
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    random_deletion: np.ndarray | None = None
    random_insertion: np.ndarray | None = None
    random_deletion_auc: np.ndarray | None = None
    random_insertion_auc: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per curve kind: mean AUC over images for the explanation and for random, and
        the mean paired difference (explanation - random)."""
        rows = []
        for kind in ("deletion", "insertion"):
            auc = getattr(self, f"{kind}_auc")
            rnd = getattr(self, f"random_{kind}_auc")
            rows.append({
                "curve": kind,
                "auc": float(np.mean(auc)),
                "random_auc": float(np.mean(rnd)) if rnd is not None else np.nan,
                "difference": float(np.mean(auc - rnd)) if rnd is not None else np.nan,
                "n_images": int(len(auc)),
            })
        return pd.DataFrame(rows)


def _auc(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    y = curves
    return ((y[:, 1:] + y[:, :-1]) * np.diff(fractions)[None] / 2).sum(axis=1)


def pixel_order(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, H*W) flat pixel indices, most salient first; ties broken at random (seeded)."""
    n = len(saliency)
    flat = saliency.reshape(n, -1)
    tie = rng.random(flat.shape)
    # lexsort: last key is primary -> sort by -saliency, then by the random tie-breaker
    return np.stack([np.lexsort((tie[i], -flat[i])) for i in range(n)])


def _curves(model, x, cls, order, fill, steps, output, batch_size):
    n, H, W, C = x.shape
    P = H * W
    counts = np.round(np.linspace(0, 1, steps + 1) * P).astype(int)
    ranks = np.empty_like(order)
    rows = np.arange(n)[:, None]
    ranks[rows, order] = np.arange(P)[None]  # rank of each pixel in the order
    ranks = ranks.reshape(n, H, W)
    blank = np.broadcast_to(fill, x.shape).astype(np.float32)
    dele = np.empty((n, steps + 1))
    ins = np.empty((n, steps + 1))
    # deletion and insertion images of several steps per forward call (full batches; a call per
    # step of 2N images left the batches small: N = 8 cells gave 16-image calls)
    per = max(1, int(batch_size) // (2 * n))
    for j0 in range(0, len(counts), per):
        js = range(j0, min(j0 + per, len(counts)))
        parts = []
        for j in js:
            removed = (ranks < counts[j])[..., None]
            parts += [np.where(removed, blank, x), np.where(removed, x, blank)]
        sc = K.predict_scores(model, np.concatenate(parts), np.tile(cls, 2 * len(js)), output, batch_size)
        for t, j in enumerate(js):
            dele[:, j], ins[:, j] = sc[2 * t * n:(2 * t + 1) * n], sc[(2 * t + 1) * n:(2 * t + 2) * n]
    return dele, ins


def deletion_insertion(model, images, class_index, saliency, steps: int = 20, fill=0.0,
                       random_baseline: bool = True, seed: int = 0, output: str = "probability",
                       batch_size: int = 64) -> Faithfulness:
    """Deletion and insertion curves of ``saliency`` for ``model`` (see :class:`Faithfulness`).

    Parameters
    ----------
    images : (N, H, W, C) model inputs. class_index : int, (N,) ints or None (predicted class).
    saliency : (N, H, W) maps (any real scale; only the order matters); pixels are deleted /
        inserted in decreasing saliency, ties in random (seeded) order.
    steps : number of equal pixel-fraction steps (curves have steps+1 points, 0 and 1 included).
    fill : the "deleted" value, a scalar or a (C,) per-channel value (default 0: black, or the
        training mean for whitened inputs). Insertion starts from the all-``fill`` image.
    random_baseline : also compute the curves for a uniformly random pixel order (seeded).
    output : ``"probability"`` (softmax of the class, default) or ``"logit"``.

    Cost: 2 N (steps+1) forward passes, doubled with the random baseline.
    """
    x = K.check_images(model, images)
    batch_size = K.check_batch_size(batch_size)
    n, H, W, C = x.shape
    s = np.asarray(saliency, dtype=np.float64)
    if s.shape != (n, H, W):
        raise ValueError(f"saliency has shape {s.shape}; expected (N, H, W) = {(n, H, W)}")
    if not np.all(np.isfinite(s)):
        raise ValueError("saliency contains NaN or inf values")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    f = _fill_array(fill, C)
    cls = K.target_classes(model, x, class_index, batch_size)
    rng = np.random.default_rng(seed)
    fractions = np.round(np.linspace(0, 1, steps + 1) * H * W) / (H * W)
    order = pixel_order(s, rng)
    dele, ins = _curves(model, x, cls, order, f, steps, output, batch_size)
    res = Faithfulness(fractions, dele, ins, _auc(dele, fractions), _auc(ins, fractions),
                       meta={"steps": steps, "fill": f.tolist(), "seed": seed, "output": output})
    if random_baseline:
        rorder = np.stack([rng.permutation(H * W) for _ in range(n)])
        rd, ri = _curves(model, x, cls, rorder, f, steps, output, batch_size)
        res.random_deletion, res.random_insertion = rd, ri
        res.random_deletion_auc, res.random_insertion_auc = _auc(rd, fractions), _auc(ri, fractions)
    return res
