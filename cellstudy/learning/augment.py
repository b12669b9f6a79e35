"""Partial offline augmentation and channel ZCA whitening (paper 4.2-4.3; study.md section 4).

Per fold ``k``, from the training folds only:

* the training set is every original training image plus **one** augmented copy of each
  (2x the data; 352 images per fold in the paper): rotation about the image centre by
  ``U(-max_rotation_deg, max_rotation_deg)`` degrees and width / height shifts of
  ``U(-max_shift_px, max_shift_px)`` pixels (20 px at S = 512 in the paper, scaled with S:
  ``cellstudy.config.max_shift_px``);
* ZCA whitening (the paper's "add noise" step) is fitted on that training set only and applied
  to it and to the test fold;
* the test fold is the untouched original images of fold ``k``, whitened with the training fit.

Nothing fitted ever sees the test fold (``tests/test_augment.py`` proves it).

Border handling: pixels moved in from outside the image are filled by reflection
(``cv2.BORDER_REFLECT_101``, i.e. ``dcb|abcd|cba``), so no artificial black wedge appears that
a network could learn to associate with augmented images. Interpolation is bilinear.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from cellstudy import seeds

BORDER_MODE = cv2.BORDER_REFLECT_101
INTERPOLATION = cv2.INTER_LINEAR


def _check_batch(images: Any, name: str = "images") -> np.ndarray:
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name}: expected an (N, S, S, 3) batch, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty; expected N >= 1 images")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or inf values; expected finite intensities")
    return a.astype(np.float32, copy=False)


def _check_nonneg(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}") from None
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return v


def augment_copy(images: np.ndarray, max_shift_px: float, max_rotation_deg: float, seed: int,
                 return_params: bool = False):
    """One augmented copy of each image: rotation about the centre, then a shift.

    For image i: angle_i ~ U(-max_rotation_deg, max_rotation_deg) degrees (positive =
    counter-clockwise), dx_i, dy_i ~ U(-max_shift_px, max_shift_px) pixels (width, height),
    drawn from ``numpy.random.default_rng(seed)``; applied with one ``cv2.warpAffine`` (bilinear,
    reflected borders; see the module docstring). A zero angle and zero shift return the input
    exactly.

    Args:
        images: (N, S, S, 3) real array (any H x W works).
        max_shift_px: largest shift in pixels (>= 0).
        max_rotation_deg: largest rotation in degrees (>= 0).
        seed: integer seed.
        return_params: also return the drawn parameters.
    Returns:
        (N, S, S, 3) float32; with ``return_params``, ``(copies, params)`` where params is a dict
        of (N,) arrays ``angle_deg``, ``dx_px``, ``dy_px``.
    """
    x = _check_batch(images)
    max_shift_px = _check_nonneg(max_shift_px, "max_shift_px")
    max_rotation_deg = _check_nonneg(max_rotation_deg, "max_rotation_deg")
    rng = np.random.default_rng(int(seed))
    n, h, w, _ = x.shape
    angle = rng.uniform(-max_rotation_deg, max_rotation_deg, n)
    dx = rng.uniform(-max_shift_px, max_shift_px, n)
    dy = rng.uniform(-max_shift_px, max_shift_px, n)
    centre = ((w - 1) / 2.0, (h - 1) / 2.0)
    out = np.empty_like(x)
    for i in range(n):
        m = cv2.getRotationMatrix2D(centre, float(angle[i]), 1.0)
        m[0, 2] += dx[i]
        m[1, 2] += dy[i]
        out[i] = cv2.warpAffine(np.ascontiguousarray(x[i]), m, (w, h), flags=INTERPOLATION,
                                borderMode=BORDER_MODE)
    if return_params:
        return out, {"angle_deg": angle, "dx_px": dx, "dy_px": dy}
    return out


class ZCAWhitening:
    """ZCA whitening over the **3 channels** (a 3 x 3 channel covariance).

    The paper whitens the training images (ImageDataGenerator's ``zca_whitening``), which builds
    a full-image covariance of size (S*S*3)^2: at 512 x 512 x 3 that is 786,432^2 entries
    (~2.5 TB in float32), intractable. Here every pixel of every training image is one
    3-vector sample: ``fit`` estimates the per-channel mean ``m`` (3,) and the channel
    covariance ``C`` (3, 3) over all pixels of the training images, and
    ``W = U diag(1 / sqrt(l + eps)) U^T`` from ``C = U diag(l) U^T``; ``transform`` maps each
    pixel ``p`` to ``W (p - m)``. The whitened training pixels have channel covariance
    ``U diag(l / (l + eps)) U^T`` ~ identity. Spatial correlations are left alone.

    Args:
        eps: regulariser added to the eigenvalues (> 0), in squared intensity units.
    """

    #: ``mode``: "zca" (the 3 x 3 whitening above: it mixes the stains) or "channel" (each
    #: channel standardised on its own, ``W = diag(1 / sqrt(C_cc + eps))``: the stains stay apart,
    #: what the RGB family's per-stain streams assume; a scale number, ``whitening``).
    MODES = ("zca", "channel")

    def __init__(self, eps: float = 1e-5, mode: str = "zca"):
        eps = float(eps)
        if not np.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
        if mode not in self.MODES:
            raise ValueError(f"whitening mode {mode!r}; expected one of {self.MODES}")
        self.eps = eps
        self.mode = mode
        self.mean_: np.ndarray | None = None
        self.cov_: np.ndarray | None = None
        self.eigenvalues_: np.ndarray | None = None
        self.W_: np.ndarray | None = None
        self.n_pixels_: int | None = None
        self.n_images_: int | None = None

    def fit(self, x: np.ndarray, chunk: int = 64) -> "ZCAWhitening":
        """Fit on training images ``x`` (N, H, W, 3); float64 accumulation in chunks of
        ``chunk`` images (two passes: mean, then centred covariance). Returns self."""
        x = _check_batch(x, "x")
        n_img = len(x)
        n_pix = x.shape[0] * x.shape[1] * x.shape[2]
        s = np.zeros(3)
        for i in range(0, n_img, chunk):
            s += x[i:i + chunk].reshape(-1, 3).sum(axis=0, dtype=np.float64)
        mean = s / n_pix
        c = np.zeros((3, 3))
        for i in range(0, n_img, chunk):
            d = x[i:i + chunk].reshape(-1, 3).astype(np.float64) - mean
            c += d.T @ d
        cov = c / n_pix
        cov = (cov + cov.T) / 2
        lam, u = np.linalg.eigh(cov)
        lam = np.clip(lam, 0.0, None)
        self.mean_, self.cov_, self.eigenvalues_ = mean, cov, lam
        if self.mode == "zca":
            self.W_ = (u * (1.0 / np.sqrt(lam + self.eps))) @ u.T
        else:
            self.W_ = np.diag(1.0 / np.sqrt(np.diag(cov) + self.eps))
        self.n_pixels_, self.n_images_ = int(n_pix), int(n_img)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Whiten ``x`` (N, H, W, 3) or (H, W, 3) with the fitted statistics; float32, same
        shape."""
        if self.W_ is None:
            raise ValueError("ZCAWhitening.transform: not fitted; call fit(training images) "
                             "first")
        a = np.asarray(x)
        if a.ndim not in (3, 4) or a.shape[-1] != 3:
            raise ValueError(f"x: expected (N, H, W, 3) or (H, W, 3), got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("x: contains NaN or inf values; expected finite intensities")
        flat = a.reshape(-1, 3).astype(np.float64)
        out = (flat - self.mean_) @ self.W_.T
        return out.astype(np.float32).reshape(a.shape)

    def state(self) -> dict[str, Any]:
        """Plain-Python provenance record (JSON-serialisable) of the fit."""
        if self.W_ is None:
            return {"method": "zca-channels", "eps": self.eps, "mode": self.mode, "fitted": False}
        return {
            "method": ("zca-channels (3x3 channel covariance over all training pixels)" if self.mode == "zca"
                       else "per-channel standardisation (channel variances over all training pixels)"),
            "eps": self.eps,
            "mode": self.mode,
            "fitted": True,
            "n_images": self.n_images_,
            "n_pixels": self.n_pixels_,
            "mean": self.mean_.tolist(),
            "cov": self.cov_.tolist(),
            "eigenvalues": self.eigenvalues_.tolist(),
            "W": self.W_.tolist(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ZCAWhitening":
        """Rebuild a fitted whitening from :meth:`state`."""
        z = cls(state["eps"], state.get("mode", "zca"))
        if state.get("fitted"):
            z.mean_ = np.asarray(state["mean"], float)
            z.cov_ = np.asarray(state["cov"], float)
            z.eigenvalues_ = np.asarray(state["eigenvalues"], float)
            z.W_ = np.asarray(state["W"], float)
            z.n_images_, z.n_pixels_ = state["n_images"], state["n_pixels"]
        return z


def fold_seed(seed: int, k: int) -> int:
    """The augmentation seed of fold ``k``: independent streams per (seed, fold)."""
    return seeds.int_seed(seed, "augment", k)


def fold_arrays(images: np.ndarray, labels: np.ndarray, folds: np.ndarray, k: int,
                max_shift_px: float, max_rotation_deg: float, seed: int, zca: bool = True,
                eps: float = 1e-5, whitening: str = "zca") -> dict[str, Any]:
    """Training and test arrays of fold ``k`` (partial offline augmentation + ZCA).

    Args:
        images: (N, S, S, 3) preprocessed images of the whole cohort.
        labels: (N,) int labels.
        folds: (N,) int test fold per image (``cellstudy.learning.folds.make_folds``).
        k: the test fold.
        max_shift_px, max_rotation_deg: augmentation ranges (see :func:`augment_copy`).
        seed: augmentation seed; fold k uses :func:`fold_seed` (seed, k).
        zca: fit :class:`ZCAWhitening` on the training set and apply it to both sets.
        eps: ZCA regulariser.
    Returns:
        dict with ``x_train`` (2 N_train, S, S, 3) float32 = [originals; augmented copies],
        ``y_train`` (2 N_train,), ``x_test`` (N_test, S, S, 3), ``y_test``, ``train_index``
        (N_train,) and ``test_index`` (N_test,) into ``images``, ``train_source_index``
        (2 N_train,) the original each training row comes from, ``augment_params`` (the drawn
        angles and shifts), ``zca_state`` (None when ``zca`` is False).
    """
    x = _check_batch(images)
    y = np.asarray(labels)
    f = np.asarray(folds)
    if y.shape != (len(x),) or f.shape != (len(x),):
        raise ValueError(f"labels, folds: expected shape ({len(x)},) each (one per image), got "
                         f"{y.shape} and {f.shape}")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"folds: expected integer fold numbers, got dtype {f.dtype}")
    fold_ids = np.unique(f)
    if k not in fold_ids:
        raise ValueError(f"k: fold {k!r} not among the folds {fold_ids.tolist()}")
    test_index = np.flatnonzero(f == k)
    train_index = np.flatnonzero(f != k)
    if len(train_index) == 0:
        raise ValueError(f"k: fold {k} holds every image; expected training images outside it")
    x_orig = x[train_index]
    copies, params = augment_copy(x_orig, max_shift_px, max_rotation_deg, fold_seed(seed, k),
                                  return_params=True)
    x_train = np.concatenate([x_orig, copies])
    y_train = np.concatenate([y[train_index], y[train_index]])
    x_test = x[test_index].copy()
    state = None
    if zca:
        z = ZCAWhitening(eps, whitening).fit(x_train)
        x_train = z.transform(x_train)
        x_test = z.transform(x_test)
        state = z.state()
    return {
        "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y[test_index].copy(),
        "train_index": train_index, "test_index": test_index,
        "train_source_index": np.concatenate([train_index, train_index]),
        "augment_params": params, "zca_state": state,
    }
