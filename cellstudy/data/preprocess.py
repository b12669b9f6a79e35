"""Preprocessing of single-cell images (paper section 4.2; study.md section 3), with SimpleITK.

Per channel, per image, once, in this order:

1. :func:`binomial_blur` - ITK ``BinomialBlurImageFilter`` (a repeated [1, 2, 1] / 4 smoothing).
2. :func:`landweber_deconvolution` - ITK (projected) ``LandweberDeconvolutionImageFilter`` with an
   explicit Gaussian point-spread function (PSF), normalised to sum 1.
3. :func:`anisotropic_diffusion` - ITK ``CurvatureAnisotropicDiffusionImageFilter``
   (Perona-Malik family, edge preserving).
4. :func:`resample` - to ``S x S``: OpenCV area interpolation (``cv2.INTER_AREA``) when shrinking,
   bicubic (``cv2.INTER_CUBIC``) when enlarging (e.g. 68 px BBBC021 crops to S = 512).

The filters run at the stored resolution (``psf_sigma`` is in stored pixels); resampling is last.
Every parameter is explicit; the names are the keys of
``cellstudy.config.SCALES[<scale>]["preprocess"]``. :func:`preprocess_batch` caches its results on
disk, one ``.npy`` per image, keyed by a hash of the parameters, the output size and each image's
key (e.g. the sha256 of the input file).

All single-image functions take and return 2-D ``float32`` arrays (``(H, W)``);
:func:`preprocess_image` takes ``(H, W, 3)`` and returns ``(S, S, 3)`` float32.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import SimpleITK as sitk

from cellstudy import atomic

#: The parameter names of :func:`preprocess_image` (the keys of a scale's "preprocess" dict).
PARAM_NAMES: tuple[str, ...] = (
    "blur_repetitions",
    "psf_sigma",
    "landweber_iterations",
    "landweber_alpha",
    "diffusion_time_step",
    "diffusion_conductance",
    "diffusion_iterations",
)

#: Largest stable time step of the 2-D curvature anisotropic diffusion (ITK: spacing / 2^(N+1)).
MAX_STABLE_TIME_STEP_2D = 0.125

#: Bumped whenever the pipeline's numerics change, so old cache entries are not reused.
CACHE_VERSION = "preprocess-v1"

MIN_SIZE = 8


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------
def _check_2d(img2d: np.ndarray, name: str = "img2d") -> np.ndarray:
    a = np.asarray(img2d)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (H, W) image, got shape {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"{name}: expected at least 2 x 2 pixels, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf values; expected finite intensities")
    return np.ascontiguousarray(a)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(value: Any, name: str, *, positive: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def _to_sitk(a: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(a)  # spacing 1, float32


def _from_sitk(im: sitk.Image) -> np.ndarray:
    return np.ascontiguousarray(sitk.GetArrayFromImage(im), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the four filters
# ---------------------------------------------------------------------------------------------
def binomial_blur(img2d: np.ndarray, repetitions: int) -> np.ndarray:
    """Binomial blur (ITK BinomialBlurImageFilter; paper 4.2, step 1).

    Each repetition convolves every axis with the kernel [1, 2, 1] / 4 (a discrete Gaussian of
    variance 1/2 px^2 per repetition); intensities are preserved on average.

    Args:
        img2d: (H, W) real array, converted to float32.
        repetitions: number of passes, >= 0 (0 returns a copy).
    Returns:
        (H, W) float32.
    """
    a = _check_2d(img2d)
    repetitions = _check_int(repetitions, "repetitions", 0)
    if repetitions == 0:
        return a.copy()
    return _from_sitk(sitk.BinomialBlur(_to_sitk(a), repetitions))


def gaussian_psf(sigma: float, radius: int | None = None) -> np.ndarray:
    """An isotropic 2-D Gaussian point-spread function, normalised to sum 1.

    Args:
        sigma: standard deviation in pixels, > 0.
        radius: half-width in pixels; default ``ceil(4 sigma)`` (at least 1). Shape (2r+1, 2r+1).
    Returns:
        (2r+1, 2r+1) float32, sum 1, centred.
    """
    sigma = _check_float(sigma, "psf_sigma")
    r = max(1, int(math.ceil(4.0 * sigma))) if radius is None else _check_int(radius, "radius", 1)
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    k = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    return (k / k.sum()).astype(np.float32)


def landweber_deconvolution(img2d: np.ndarray, psf_sigma: float, iterations: int, alpha: float,
                            projected: bool = True) -> np.ndarray:
    """Landweber deconvolution with a Gaussian PSF (ITK (Projected)LandweberDeconvolution;
    paper 4.2, step 2).

    Iterates f_{n+1} = f_n + alpha H^T (g - H f_n), f_0 = g, where H is convolution with the
    Gaussian PSF (:func:`gaussian_psf`, sum 1, so |H| <= 1 and 0 < alpha < 2 converges). The
    projected variant sets negative values to 0 after every iteration (non-negativity).
    Boundaries: zero-flux Neumann padding; output the size of the input.

    Args:
        img2d: (H, W) real array.
        psf_sigma: Gaussian PSF sigma in pixels (> 0).
        iterations: number of Landweber iterations (>= 0; 0 returns a copy).
        alpha: step size, 0 < alpha < 2.
        projected: use ProjectedLandweberDeconvolution (non-negative output).
    Returns:
        (H, W) float32.
    """
    a = _check_2d(img2d)
    psf_sigma = _check_float(psf_sigma, "psf_sigma")
    iterations = _check_int(iterations, "landweber_iterations", 0)
    alpha = _check_float(alpha, "landweber_alpha")
    if alpha >= 2.0:
        raise ValueError(f"landweber_alpha: expected 0 < alpha < 2 for a PSF of sum 1 "
                         f"(convergence), got {alpha!r}")
    if iterations == 0:
        return a.copy()
    psf = gaussian_psf(psf_sigma)
    if psf.shape[0] > a.shape[0] or psf.shape[1] > a.shape[1]:
        r = (min(a.shape) - 1) // 2
        psf = gaussian_psf(psf_sigma, radius=max(1, r))
    fn = sitk.ProjectedLandweberDeconvolution if projected else sitk.LandweberDeconvolution
    out = fn(_to_sitk(a), _to_sitk(psf), alpha, iterations, False,
             sitk.LandweberDeconvolutionImageFilter.ZERO_FLUX_NEUMANN_PAD,
             sitk.LandweberDeconvolutionImageFilter.SAME)
    return _from_sitk(out)


def anisotropic_diffusion(img2d: np.ndarray, time_step: float, conductance: float,
                          iterations: int) -> np.ndarray:
    """Curvature anisotropic diffusion (ITK CurvatureAnisotropicDiffusionImageFilter, modified
    curvature diffusion of the Perona-Malik family; paper 4.2, step 3). Smooths within regions
    and keeps edges.

    Args:
        img2d: (H, W) real array (spacing 1 px).
        time_step: 0 < time_step <= 0.125 (the 2-D stability limit; larger raises ValueError).
        conductance: conductance parameter K (> 0); lower keeps more edges.
        iterations: number of iterations (>= 0; 0 returns a copy).
    Returns:
        (H, W) float32.
    """
    a = _check_2d(img2d)
    time_step = _check_float(time_step, "diffusion_time_step")
    if time_step > MAX_STABLE_TIME_STEP_2D:
        raise ValueError(
            f"diffusion_time_step: {time_step!r} is unstable for 2-D curvature anisotropic "
            f"diffusion; expected 0 < time_step <= {MAX_STABLE_TIME_STEP_2D}")
    conductance = _check_float(conductance, "diffusion_conductance")
    iterations = _check_int(iterations, "diffusion_iterations", 0)
    if iterations == 0:
        return a.copy()
    return _from_sitk(sitk.CurvatureAnisotropicDiffusion(_to_sitk(a), time_step, conductance,
                                                         1, iterations))


def resample(img2d: np.ndarray, size: int) -> np.ndarray:
    """Resample to ``size x size`` (paper 4.2, step 4).

    Shrinking (``size`` <= H and <= W): area interpolation (``cv2.INTER_AREA``; preserves the
    mean). Otherwise (enlarging along any axis): bicubic (``cv2.INTER_CUBIC``), which may
    overshoot slightly near sharp edges. Non-square inputs are stretched to square.

    Args:
        img2d: (H, W) real array.
        size: output side S in pixels, >= 8.
    Returns:
        (S, S) float32.
    """
    a = _check_2d(img2d)
    size = _check_int(size, "size", MIN_SIZE)
    h, w = a.shape
    if (h, w) == (size, size):
        return a.copy()
    interp = cv2.INTER_AREA if (size <= h and size <= w) else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(a, (size, size), interpolation=interp),
                                dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# one image, a batch, the cache
# ---------------------------------------------------------------------------------------------
def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validate a preprocessing parameter dict (exactly the keys :data:`PARAM_NAMES`).

    Returns a normalised copy (ints as int, floats as float). Raises ValueError naming the
    missing / unknown key or the bad value."""
    if not isinstance(params, dict):
        raise ValueError(f"params: expected a dict with keys {list(PARAM_NAMES)}, got "
                         f"{type(params).__name__}")
    missing = [k for k in PARAM_NAMES if k not in params]
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if missing or unknown:
        raise ValueError(f"params: missing {missing}, unknown {unknown}; expected exactly "
                         f"{list(PARAM_NAMES)}")
    p = {
        "blur_repetitions": _check_int(params["blur_repetitions"], "blur_repetitions", 0),
        "psf_sigma": _check_float(params["psf_sigma"], "psf_sigma"),
        "landweber_iterations": _check_int(params["landweber_iterations"],
                                           "landweber_iterations", 0),
        "landweber_alpha": _check_float(params["landweber_alpha"], "landweber_alpha"),
        "diffusion_time_step": _check_float(params["diffusion_time_step"],
                                            "diffusion_time_step"),
        "diffusion_conductance": _check_float(params["diffusion_conductance"],
                                              "diffusion_conductance"),
        "diffusion_iterations": _check_int(params["diffusion_iterations"],
                                           "diffusion_iterations", 0),
    }
    if p["landweber_alpha"] >= 2.0:
        raise ValueError(f"landweber_alpha: expected 0 < alpha < 2, got {p['landweber_alpha']!r}")
    if p["diffusion_time_step"] > MAX_STABLE_TIME_STEP_2D:
        raise ValueError(f"diffusion_time_step: {p['diffusion_time_step']!r} is unstable; "
                         f"expected 0 < time_step <= {MAX_STABLE_TIME_STEP_2D}")
    return p


def _check_image(img: np.ndarray, name: str = "img") -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) image, got shape {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"{name}: expected at least 2 x 2 pixels, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf values; expected finite intensities")
    return a.astype(np.float32, copy=False)


def preprocess_image(img: np.ndarray, size: int, blur_repetitions: int, psf_sigma: float,
                     landweber_iterations: int, landweber_alpha: float,
                     diffusion_time_step: float, diffusion_conductance: float,
                     diffusion_iterations: int) -> np.ndarray:
    """Blur -> projected Landweber deconvolution -> curvature anisotropic diffusion -> resample,
    on each of the 3 channels independently (paper 4.2).

    Args:
        img: (H, W, 3) real array (RGB order, see ``cellstudy.config.CHANNELS``).
        size: output side S (>= 8).
        other args: see :func:`binomial_blur`, :func:`landweber_deconvolution`,
            :func:`anisotropic_diffusion` (names = keys of a scale's "preprocess" dict).
    Returns:
        (S, S, 3) float32.
    """
    a = _check_image(img)
    size = _check_int(size, "size", MIN_SIZE)
    p = check_params(dict(blur_repetitions=blur_repetitions, psf_sigma=psf_sigma,
                          landweber_iterations=landweber_iterations,
                          landweber_alpha=landweber_alpha,
                          diffusion_time_step=diffusion_time_step,
                          diffusion_conductance=diffusion_conductance,
                          diffusion_iterations=diffusion_iterations))
    out = np.empty((size, size, 3), np.float32)
    for c in range(3):
        x = binomial_blur(a[..., c], p["blur_repetitions"])
        x = landweber_deconvolution(x, p["psf_sigma"], p["landweber_iterations"],
                                    p["landweber_alpha"], projected=True)
        x = anisotropic_diffusion(x, p["diffusion_time_step"], p["diffusion_conductance"],
                                  p["diffusion_iterations"])
        out[..., c] = resample(x, size)
    return out


def params_hash(params: dict[str, Any], size: int) -> str:
    """Hex sha256 of the (validated) parameters, the output size and :data:`CACHE_VERSION`."""
    p = check_params(params)
    blob = json.dumps({"version": CACHE_VERSION, "size": _check_int(size, "size", MIN_SIZE),
                       "params": p}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, params: dict[str, Any], size: int, key: str) -> Path:
    """Where the cached result for one image lives:
    ``<cache_dir>/preprocess/<params_hash[:16]>/<sha256(key)[:32]>.npy``."""
    sub = Path(cache_dir) / "preprocess" / params_hash(params, size)[:16]
    return sub / (hashlib.sha256(str(key).encode()).hexdigest()[:32] + ".npy")


def _try_load(path: Path, size: int) -> np.ndarray | None:
    """A cached array, or None when absent or unreadable / of the wrong shape (then recomputed)."""
    if not path.is_file():
        return None
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if a.shape != (size, size, 3) or a.dtype != np.float32:
        return None
    return a


class _Progress:
    """A plain-text progress line every ``every_s`` seconds (and at the end)."""

    def __init__(self, total: int, label: str, enabled: bool, every_s: float = 5.0,
                 stream=None):
        self.total, self.label, self.enabled, self.every_s = total, label, enabled, every_s
        self.stream = stream if stream is not None else sys.stdout
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        el = now - self.t0
        eta = el / done * (self.total - done) if done else float("nan")
        print(f"{self.label}: {done}/{self.total} images, {el:.1f} s elapsed, ~{eta:.0f} s left",
              file=self.stream, flush=True)


def preprocess_batch(images: np.ndarray, keys: Sequence[str], size: int, params: dict[str, Any],
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     cache: bool = True) -> np.ndarray:
    """Preprocess a batch with :func:`preprocess_image`, caching each image's result on disk.

    The cache (default ``cellstudy.config.cache_dir()``) holds one ``.npy`` per image at
    :func:`cache_path`, keyed by a hash of ``params`` + ``size`` + :data:`CACHE_VERSION` and by the
    image's key; present entries are reused, missing or unreadable ones computed and written
    atomically (temporary file, then rename). A key must identify the input's content (e.g. the
    sha256 of its file): a key reused for a different image would return the cached result.

    Args:
        images: (N, H, W, 3) real array (all validated before any work starts).
        keys: N strings, one per image (e.g. the input's sha256).
        size: output side S (>= 8).
        params: dict with exactly the keys :data:`PARAM_NAMES`.
        cache_dir: cache root; None = ``config.cache_dir()``.
        progress: print a progress line every few seconds while computing.
        cache: False computes everything and neither reads nor writes the cache.
    Returns:
        (N, S, S, 3) float32.
    """
    imgs = np.asarray(images)
    if imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"images: expected an (N, H, W, 3) batch, got shape {imgs.shape}")
    if imgs.shape[0] == 0:
        raise ValueError("images: the batch is empty; expected N >= 1 images")
    if not np.issubdtype(imgs.dtype, np.number) or np.issubdtype(imgs.dtype, np.complexfloating):
        raise ValueError(f"images: expected a real numeric array, got dtype {imgs.dtype}")
    bad = np.flatnonzero(~np.isfinite(imgs).reshape(len(imgs), -1).all(axis=1))
    if bad.size:
        raise ValueError(f"images: {bad.size} image(s) contain NaN or inf, e.g. index "
                         f"{bad[:5].tolist()}; expected finite intensities")
    if isinstance(keys, (str, bytes)):
        raise ValueError("keys: expected a sequence of N strings, got a single string")
    keys = [str(k) for k in np.asarray(keys, dtype=object).ravel()]
    if len(keys) != len(imgs):
        raise ValueError(f"keys: expected {len(imgs)} keys (one per image), got {len(keys)}")
    if any(k == "" for k in keys):
        raise ValueError("keys: empty key; expected a non-empty string per image")
    size = _check_int(size, "size", MIN_SIZE)
    p = check_params(params)

    out = np.empty((len(imgs), size, size, 3), np.float32)
    todo: list[int] = []
    paths: list[Path | None] = [None] * len(imgs)
    if cache:
        root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        for i, k in enumerate(keys):
            paths[i] = cache_path(root, p, size, k)
            hit = _try_load(paths[i], size)
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
    else:
        todo = list(range(len(imgs)))
    if todo and cache:
        meta = paths[todo[0]].parent / "params.json"
        if not meta.is_file():
            meta.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(meta, json.dumps({"version": CACHE_VERSION, "size": size,
                                                 "params": p}, indent=1, sort_keys=True))
    prog = _Progress(len(todo), f"preprocess (S={size})", progress and len(todo) > 0)
    done_by_key: dict[str, int] = {}
    for n, i in enumerate(todo, 1):
        k = keys[i]
        if k in done_by_key and np.array_equal(imgs[done_by_key[k]], imgs[i]):
            out[i] = out[done_by_key[k]]
        else:
            out[i] = preprocess_image(imgs[i], size, **p)
            done_by_key[k] = i
            if cache:
                atomic.save_npy(paths[i], out[i])
        prog.update(n)
    return out


def _default_cache_dir() -> Path:
    from cellstudy import config
    return config.cache_dir()


def timings(img2d: np.ndarray, params: dict[str, Any], size: int | None = None,
            repeats: int = 3) -> dict[str, float]:
    """Seconds per call of each filter on one 2-D image (the median of ``repeats`` runs, after
    one warm-up call), for the preprocessing chapter.

    Args:
        img2d: (H, W) real array (one channel).
        params: preprocessing parameters (keys :data:`PARAM_NAMES`).
        size: resample target; default = the image's own height (then resample is a copy).
        repeats: timed runs per filter (>= 1).
    Returns:
        dict: ``binomial_blur``, ``landweber_deconvolution``, ``anisotropic_diffusion``,
        ``resample`` -> median seconds; ``total`` = their sum.
    """
    a = _check_2d(img2d)
    p = check_params(params)
    repeats = _check_int(repeats, "repeats", 1)
    size = a.shape[0] if size is None else _check_int(size, "size", MIN_SIZE)
    steps: dict[str, Callable[[], np.ndarray]] = {
        "binomial_blur": lambda: binomial_blur(a, p["blur_repetitions"]),
        "landweber_deconvolution": lambda: landweber_deconvolution(
            a, p["psf_sigma"], p["landweber_iterations"], p["landweber_alpha"]),
        "anisotropic_diffusion": lambda: anisotropic_diffusion(
            a, p["diffusion_time_step"], p["diffusion_conductance"], p["diffusion_iterations"]),
        "resample": lambda: resample(a, size),
    }
    res: dict[str, float] = {}
    for name, fn in steps.items():
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        res[name] = float(np.median(ts))
    res["total"] = float(sum(res.values()))
    return res
