"""What the authors' code fed its classification networks: their input chain, replicated exactly.

The authors' loader (``datasetnet.load_images`` of their repository, the ``CL`` branch used for
classification; study.md section 10) holds a cell as an ``(H, W, 3)`` array (RGB, as read by PIL)
and does, with ``C = 3`` channels and ``S`` the network's input size::

    image_p = np.reshape(img, [C * H, W])                                      # a reshape, not a transpose
    image_p = cv2.resize(image_p, (C * S, S), interpolation=cv2.INTER_NEAREST)  # dsize is (width, height)
    image_p = np.reshape(image_p, [1, C, S, S])
    ...
    X = np.reshape(images, [N, S, S, C])                                       # create_dataset

OpenCV's ``dsize`` is ``(width, height)``, so the resized array has shape ``(S, 3S)``. Every step is
a reshape (memory order kept), and the only resampling is the nearest-neighbour resize of the
``(3H, W)`` array, which picks rows ``floor(i * 3H / S)`` and columns ``floor(c * W / (3S))``. The
result: output pixel ``(i, j)``, channel ``k``, is element ``(floor(3iH/S), floor((3j+k)W/(3S)))``
of the ``(3H, W)`` array, so

* the three output channels of a pixel come from (nearly) the same column, i.e. the same input
  value: the channels are near-identical (identical when ``W == S``);
* a row of the ``(3H, W)`` array is one third of an image row, its three stains interleaved value
  by value; with ``H == S`` every output row ``i`` is the *left third* of image row ``i`` (row
  ``3i`` of the ``(3H, W)`` array), and otherwise it is a third of an image row chosen by the
  rounding of ``3iH/S``.

:func:`authors_input` is that chain as a pure function; :func:`authors_source_index` says, for
every output value, which input pixel and channel it is (computed the same way, for tests and
for the reproducibility chapter's explanation).
"""
from __future__ import annotations

import numpy as np

__all__ = ["authors_input", "authors_source_index", "flat_source"]


def authors_input(img: np.ndarray, size: int) -> np.ndarray:
    """The image the authors' networks saw for ``img``: their ``CL`` loader's chain (module
    docstring), reshape ``(H, W, 3) -> (3H, W)``, ``cv2.resize`` to ``(S, 3S)`` with
    ``INTER_NEAREST``, reshape to ``(3, S, S)``, reshape to ``(S, S, 3)``.

    img: ``(H, W, 3)`` array (any dtype OpenCV resizes: uint8, uint16, int32 ids, float32, float64).
    size: S, the network input size (int >= 1). Returns an ``(S, S, 3)`` array of ``img``'s dtype
    whose every value is a value of ``img``. Raises ValueError for another shape or a bad size.
    """
    import cv2

    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"authors_input: img has shape {img.shape}; expected (H, W, 3)")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"authors_input: size={size!r}; expected an int >= 1")
    S = int(size)
    H, W, C = img.shape
    x = np.ascontiguousarray(img).reshape(C * H, W)                        # the reshape
    x = cv2.resize(x, (C * S, S), interpolation=cv2.INTER_NEAREST)         # -> (S, 3S)
    if x.shape != (S, C * S):
        raise AssertionError(f"cv2.resize returned shape {x.shape}, expected {(S, C * S)}")
    x = x.reshape(1, C, S, S)                                              # "channels first"
    return x.reshape(S, S, C)                                              # create_dataset's reshape


def _nearest(dst: int, src: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST source index of each destination index: ``floor(d * src / dst)``
    (computed as OpenCV does, with the inverse of the double scale), clipped to ``src - 1``."""
    ifx = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst) * ifx).astype(np.int64), src - 1)


def flat_source(shape: tuple[int, int, int], size: int) -> np.ndarray:
    """For an input of ``shape`` (H, W, 3): the flat (C-order) index into the input of every value
    of :func:`authors_input`'s ``(S, S, 3)`` output, computed from the index arithmetic alone
    (no image)."""
    H, W, C = (int(v) for v in shape)
    S = int(size)
    rows = _nearest(S, C * H)           # resized row r <- (3H, W) row rows[r]
    cols = _nearest(C * S, W)           # resized col c <- (3H, W) col cols[c]
    out = np.arange(S * S * C).reshape(S, S, C)        # flat index into the (S, 3S) resized array
    r, c = out // (C * S), out % (C * S)
    return rows[r] * W + cols[c]                      # flat index into (3H, W), = into (H, W, 3)


def authors_source_index(shape: tuple[int, int, int], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, col, channel)`` of the input value behind every value of the ``(S, S, 3)`` output
    (three int arrays of shape ``(S, S, 3)``), from :func:`flat_source`."""
    H, W, C = (int(v) for v in shape)
    f = flat_source(shape, size)
    return f // (W * C), (f // C) % W, f % C
