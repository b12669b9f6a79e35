"""Pixel-wise weighted geometric mean (paper eq. 14): Gmean-Shape and Gmean-GradCam."""
from __future__ import annotations

import numpy as np

#: Default epsilon added before the logarithm.
EPS = 1e-6


def gmean(stack, weights=None, eps: float = EPS) -> np.ndarray:
    """Weighted geometric mean over the first axis (eq. 14).

    ``G = exp( sum_i w_i ln(x_i + eps) / sum_i w_i )``, computed pixel-wise.

    Parameters
    ----------
    stack : (N, H, W) or (N, H, W, C) array (or a list of equal-shape arrays), values >= 0:
        cell images (Gmean-Shape) or Grad-CAM maps in [0, 1] (Gmean-GradCam).
    weights : (N,) values in [0, 1] (default: all 1). Images with weight 0 do not count.
    eps : >= 0, added to every value before the log. A zero pixel contributes ``ln(eps)``
        (= -13.8 for 1e-6) instead of ``-inf``, so one zero in the stack pulls the mean towards 0
        without forcing it to exactly 0; for values much larger than eps the effect is a shift of
        about eps. The result is *not* corrected by subtracting eps (with all-zero inputs it is
        eps). ``eps=0`` gives the plain geometric mean (any zero -> 0), as ``scipy.stats.gmean``.

    Returns
    -------
    (H, W) or (H, W, C) float64.

    Raises ValueError: empty stack, negative or non-finite values, weights of the wrong shape or
    outside [0, 1], all weights zero, negative eps.
    """
    x = np.asarray(stack, dtype=np.float64) if not isinstance(stack, np.ndarray) else stack
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"stack is empty (shape {np.shape(x)}); expected at least one image")
    if x.ndim not in (3, 4):
        raise ValueError(f"stack must be (N, H, W) or (N, H, W, C); got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"stack must be numeric; got dtype {x.dtype}")
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite value >= 0; got {eps!r}")
    n = x.shape[0]
    if weights is None:
        w = np.ones(n)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},) (one per image); got {w.shape}")
        if not np.all(np.isfinite(w)) or w.min() < 0 or w.max() > 1:
            raise ValueError(f"weights must lie in [0, 1]; got min {w.min()}, max {w.max()}")
    wsum = w.sum()
    if wsum <= 0:
        raise ValueError("weights are all zero; expected at least one positive weight")
    acc = np.zeros(x.shape[1:], dtype=np.float64)
    with np.errstate(divide="ignore"):
        for i in range(n):  # one image at a time: memory stays O(H W C)
            if w[i] == 0:
                continue
            xi = np.asarray(x[i], dtype=np.float64)
            if not np.all(np.isfinite(xi)):
                raise ValueError(f"stack[{i}] contains NaN or inf values")
            if xi.min() < 0:
                raise ValueError(
                    f"stack[{i}] has negative values (min {xi.min()}); the geometric mean needs "
                    "values >= 0 (rescale, e.g. with cellstudy.data.robust_scale)"
                )
            acc += w[i] * np.log(xi + eps)
    return np.exp(acc / wsum)
