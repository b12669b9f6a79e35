"""The data layer: manifests, image readers, verification, robust scaling and cohorts.

A *manifest* (CSV, one row per cell image, in ``data_manifest/<cohort>.csv``) has the columns

``cell_id``   unique id of the cell image
``path``      file path relative to the data root; one-file-per-channel data: the R;G;B files
              joined by ``;`` (RGB order: R = third stain, G = F-actin, B = DNA)
``label``     0 = normal role, 1 = abnormal role (``config.CLASS_NAMES``)
``class_name`` the source's own class name (``DMSO``, ``protein_synthesis``, ``normal``, ``cancer``)
``group``     the source field / replicate; never split between training and test
``channels``  the stored channel index that gives R,G,B (``"2,1,0"``: R <- ch2, G <- ch1,
              B <- ch0); with one file per channel, the index inside each file (``"0,0,0"``)
``sha256``    sha256 of each file (``;``-joined like ``path``)

and optionally ``crop_y, crop_x, crop_size`` (top-left corner and side, pixels, of a crop cut from
a larger field), ``shape`` (each stored file's shape, ``"68x68x3"``, ``;``-joined like ``path``)
and free metadata columns (cell_type, plate, ...).

Nothing under the data root is ever written: files are read as bytes once, hashed and decoded
from memory.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from cellstudy import config

#: Folder holding the committed manifests.
MANIFEST_DIR = config.REPO_ROOT / "data_manifest"

#: Columns every manifest must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("cell_id", "path", "label", "class_name", "group",
                                     "channels", "sha256")
#: The label columns: a study cohort needs them; cells to predict (``cellstudy predict``) may
#: leave them out or empty (an unlabelled manifest, ``cellstudy manifest --unlabelled``).
LABEL_COLUMNS: tuple[str, str] = ("label", "class_name")
#: Optional column naming the stains in R, G, B order (``"tubulin,F-actin,DNA"``), one value for
#: the whole manifest: ``cellstudy predict`` refuses cells whose stains differ from the run's.
STAINS_COLUMN = "stains"
#: Optional crop columns (all three or none).
CROP_COLUMNS: tuple[str, str, str] = ("crop_y", "crop_x", "crop_size")

#: Default robust-scaling percentiles (per image, per channel).
DEFAULT_LOW, DEFAULT_HIGH = 1.0, 99.8

#: How many problems a DataError lists before summarising the rest as a count.
MAX_LISTED = 10

_IMAGE_SUFFIXES = (".npy", ".tif", ".tiff", ".png")


class DataError(ValueError):
    """Bad input data: a missing/corrupt/mismatching file, an empty class, a mixed group, an
    unknown cohort. ``.problems`` lists every problem found (the message shows the first
    ``MAX_LISTED`` and a count of the rest)."""

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


class MissingFileError(DataError, FileNotFoundError):
    """Every problem found is a missing file (both a ``DataError`` and a ``FileNotFoundError``)."""


_FILE_NAME = re.compile(r"(?:(?<=^)|(?<=[\s(,;'\"]))[^\s,;()'\"{}*?\[\]]+\.(?:ome\.tiff?|tiff?|npy|png)\b",
                        flags=re.I)


def group_problems(problems: list[str], examples: int = 3) -> list[str]:
    """``problems`` ("<file>: <what is wrong>") for a reader: the problems that differ only in their
    file keep their first ``examples`` lines, then one line "... and N more: <what is wrong>"; the
    order is that of first appearance. A wrong option gives one problem per file; its cause then
    reads once instead of 60 times."""
    def kind(p: str) -> str:
        head, sep, rest = p.partition(": ")
        if not (sep and ("/" in head or "." in head or ";" in head)):
            return p
        # a file name (after a space, bracket, comma or quote); not a pattern such as
        # '_{channel}.tif', whose braces keep it out, so that the cause keeps its option's value
        return _FILE_NAME.sub("<file>", rest)
    order: dict[str, list[str]] = {}
    for p in problems:
        order.setdefault(kind(p), []).append(p)
    out = []
    for k, ps in order.items():
        out += ps[:examples]
        if len(ps) > examples:
            out.append(f"... and {len(ps) - examples} more file(s) with the same problem: {k}")
    return out


def _raise_problems(problems: list[str], what: str, missing_only: bool = False) -> None:
    if not problems:
        return
    # a problem that repeats file after file reads once with examples (group_problems), as the
    # manifest command lists them; then at most MAX_LISTED lines (every one is in .problems)
    shown = group_problems(problems)
    listed = "\n".join(f"  - {p}" for p in shown[:MAX_LISTED])
    more = len(shown) - MAX_LISTED
    tail = f"\n  ... and {more} more line(s)" if more > 0 else ""
    msg = f"{len(problems)} problem(s) in {what}:\n{listed}{tail}"
    if missing_only:   # every problem a missing file: most often the data root, not the files
        msg += ("\n  (only missing files: is the data root right? The manifest's paths are relative to it: "
                "--data-root, a notebook's data_root parameter, or $CELLSTUDY_DATA_ROOT)")
    cls = MissingFileError if missing_only else DataError
    raise cls(msg, problems)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path`` (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _channel_last_guess(a: np.ndarray) -> np.ndarray:
    """A 3-D array without axis metadata: the small axis (<= 8) is the channel axis; the last
    axis when both ends are small."""
    if a.shape[-1] <= 8:
        return a
    if a.shape[0] <= 8:
        return np.moveaxis(a, 0, -1)
    return a


def _to_hwc(a: np.ndarray, axes: str | None, name: str) -> np.ndarray:
    """Bring a decoded array to (H, W) or (H, W, C) (channel last)."""
    if axes is not None and len(axes) == a.ndim:
        # drop singleton non-spatial axes (T, Z, ...), keep Y, X and the channel axis
        keep = [i for i, ax in enumerate(axes) if a.shape[i] != 1 or ax in "YX"]
        a = a.reshape([a.shape[i] for i in keep])
        axes = "".join(axes[i] for i in keep)
        if a.ndim == 3:
            for ch in ("C", "S"):
                if ch in axes and axes.count(ch) == 1:
                    return np.moveaxis(a, axes.index(ch), -1)
    else:
        a = a.squeeze() if a.ndim > 3 else a
    if a.ndim == 2:
        return a
    if a.ndim == 3:
        return _channel_last_guess(a)
    raise DataError(f"{name}: decoded array has shape {a.shape}; expected (H, W) or a "
                    f"3-D multi-channel image")


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode the bytes of a ``.npy``, TIFF / OME-TIFF or PNG file (chosen by ``name``'s suffix)
    into its stored dtype, shape (H, W) or (H, W, C), channel last. PNG colour channels keep the
    stored order (R, G, B[, A]), not OpenCV's BGR. Raises ``DataError`` naming ``name`` when the
    bytes cannot be decoded (unreadable or truncated)."""
    suffix = Path(name).suffix.lower()
    try:
        if suffix == ".npy":
            a = np.load(io.BytesIO(data), allow_pickle=False)
            return _to_hwc(np.asarray(a), None, name)
        if suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                s = tif.series[0]
                a = s.asarray()
                axes = s.axes
            return _to_hwc(np.asarray(a), axes, name)
        if suffix == ".png":
            import cv2

            buf = np.frombuffer(data, np.uint8)
            if len(data) < 8 or data[:8] != b"\x89PNG\r\n\x1a\n":
                raise ValueError("not a PNG file (bad signature)")
            if b"IEND" not in data[-16:]:
                raise ValueError("PNG has no IEND chunk (truncated)")
            a = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if a is None:
                raise ValueError("OpenCV could not decode it")
            if a.ndim == 3 and a.shape[2] == 3:
                a = a[:, :, ::-1]
            elif a.ndim == 3 and a.shape[2] == 4:
                a = a[:, :, [2, 1, 0, 3]]
            return np.ascontiguousarray(a)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(f"{name}: unreadable or truncated image ({type(e).__name__}: {e}); "
                        f"expected a valid {suffix} file") from e
    raise DataError(f"{name}: unsupported file type {suffix!r}; expected one of {_IMAGE_SUFFIXES}")


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read one image file in its stored dtype: (H, W) or (H, W, C) channel last.
    ``FileNotFoundError`` naming the path if it is missing; ``DataError`` if unreadable."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file {p} does not exist")
    return decode_image(p.read_bytes(), str(p))


def parse_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """``"a;b;c"`` or ``["a", "b", "c"]`` -> list of path strings."""
    if isinstance(paths, (str, os.PathLike)):
        return [s.strip() for s in str(paths).split(";")]
    return [str(p) for p in paths]


def parse_channels(channels: str | Sequence[int]) -> list[int]:
    """``"2,1,0"`` or ``(2, 1, 0)`` -> ``[2, 1, 0]`` (three non-negative ints, R,G,B)."""
    if isinstance(channels, str):
        try:
            ch = [int(c) for c in channels.replace(";", ",").split(",")]
        except ValueError:
            raise DataError(f"channels {channels!r}: expected three comma-separated integers "
                            f"(stored channel index of R,G,B), e.g. '2,1,0'") from None
    else:
        ch = [int(c) for c in channels]
    if len(ch) != 3 or min(ch) < 0:
        raise DataError(f"channels {channels!r}: expected three non-negative indices "
                        f"(stored channel of R,G,B)")
    return ch


def _select(arrays: list[np.ndarray], names: list[str], ch: list[int]) -> np.ndarray:
    """Pick R,G,B planes: from one multi-channel array (indices into its channels) or from three
    arrays (index into each; 0 for a grey file). Returns (H, W, 3) in the stored dtype."""
    planes = []
    for k in range(3):
        a, name = (arrays[0], names[0]) if len(arrays) == 1 else (arrays[k], names[k])
        n = 1 if a.ndim == 2 else a.shape[2]
        if ch[k] >= n:
            raise DataError(
                f"{name}: has {n} channel(s) (shape {'x'.join(map(str, a.shape))}); expected "
                f"at least {ch[k] + 1} for channel index {ch[k]} ({config.CHANNEL_COLOURS[k]})")
        planes.append(a if a.ndim == 2 else a[:, :, ch[k]])
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise DataError(f"{';'.join(names)}: channel images differ in size {sorted(shapes)}; "
                        f"expected one size")
    return np.stack(planes, axis=-1)


def _crop(img: np.ndarray, crop: tuple[int, int, int] | None, name: str) -> np.ndarray:
    if crop is None:
        return img
    y, x, s = (int(v) for v in crop)
    h, w = img.shape[:2]
    if s <= 0 or y < 0 or x < 0 or y + s > h or x + s > w:
        raise DataError(f"{name}: crop (y={y}, x={x}, size={s}) is not inside the "
                        f"{h}x{w} image; expected 0 <= y, y+size <= {h}, 0 <= x, x+size <= {w}")
    return img[y:y + s, x:x + s]


def read_image(paths: str | os.PathLike | Sequence[str | os.PathLike],
               channels: str | Sequence[int] = (0, 1, 2),
               crop: tuple[int, int, int] | None = None,
               root: str | os.PathLike | None = None) -> np.ndarray:
    """Read one cell image as raw (unscaled) ``(H, W, 3)`` float32 in RGB order.

    paths: one multi-channel file (``.npy``, TIFF/OME-TIFF channel-first or channel-last, PNG)
        or three single-channel files R;G;B (a ``;``-joined string or a sequence), relative to
        ``root`` when given. Any bit depth (8/16-bit integer, float) -> float32 of the stored
        values (no rescaling).
    channels: stored channel index giving R,G,B (``"2,1,0"``); per file for three files.
    crop: ``(y, x, size)`` top-left corner and side in pixels, or None for the whole image.
    Raises ``FileNotFoundError`` for a missing file, ``DataError`` for an unreadable file,
    too few channels, a crop outside the image or NaN/inf values, each naming the file.
    """
    names = parse_paths(paths)
    ch = parse_channels(channels)
    if len(names) not in (1, 3):
        raise DataError(f"paths {paths!r}: expected one multi-channel file or three "
                        f"single-channel files (R;G;B), got {len(names)}")
    full = [Path(root) / n if root is not None else Path(n) for n in names]
    arrays = [read_array(p) for p in full]
    img = _crop(_select(arrays, [str(p) for p in full], ch), crop, ";".join(map(str, full)))
    out = img.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{';'.join(map(str, full))}: contains NaN or inf values; expected "
                        f"finite intensities")
    return out


# ---------------------------------------------------------------------------------------------
# Robust scaling
# ---------------------------------------------------------------------------------------------
def robust_scale(img: np.ndarray, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH,
                 return_params: bool = False):
    """Per-channel robust intensity scaling to [0, 1].

    For each image and channel c: ``lo_c, hi_c`` = the ``low``-th and ``high``-th percentiles
    (over H x W) and ``out = clip((x - lo_c) / (hi_c - lo_c), 0, 1)``. A channel with
    ``hi_c <= lo_c`` (constant, or nearly so at those percentiles) becomes all zeros (no NaN).
    Each image is scaled on its own: nothing is fitted across images (no leakage between folds).

    img: ``(H, W, C)`` or a batch ``(N, H, W, C)``, any real dtype, finite values.
    low, high: percentiles in [0, 100], ``low < high``.
    Returns float32 of the same shape; with ``return_params`` also ``(lo, hi)`` of shape
    ``(C,)`` or ``(N, C)`` (float32, in the input's units).
    """
    a = np.asarray(img)
    if a.ndim not in (3, 4):
        raise ValueError(f"robust_scale: img has shape {a.shape}; expected (H, W, C) or "
                         f"(N, H, W, C)")
    if not (0.0 <= low < high <= 100.0):
        raise ValueError(f"robust_scale: percentiles low={low}, high={high}; expected "
                         f"0 <= low < high <= 100")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("robust_scale: img contains NaN or inf; expected finite values")
    lo, hi = np.percentile(a, [low, high], axis=(-3, -2)).astype(np.float32)
    span = hi - lo
    ok = span > 0
    safe = np.where(ok, span, 1.0).astype(np.float32)
    out = a - lo[..., None, None, :]           # a new float32 array; the input is untouched
    out /= safe[..., None, None, :]
    np.clip(out, 0.0, 1.0, out=out)
    out *= ok[..., None, None, :].astype(np.float32)
    return (out, (lo, hi)) if return_params else out


# ---------------------------------------------------------------------------------------------
# Manifests and verification
# ---------------------------------------------------------------------------------------------
def available_cohorts() -> list[str]:
    """Names of the committed manifests in ``data_manifest/``."""
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.csv"))


def manifest_path(cohort: str) -> Path:
    """Path of cohort ``cohort``'s manifest (``data_manifest/<cohort>.csv``); a path to a CSV
    file is accepted as is. ``DataError`` naming the cohort for an unknown name."""
    p = Path(str(cohort))
    if p.suffix.lower() == ".csv":
        if not p.is_file():
            where = "" if p.is_absolute() else (
                f" (looked for {Path.cwd() / p}: a relative path is read from the current folder, here "
                f"{Path.cwd()}, which in a notebook is the notebook's folder; give the manifest's absolute path)")
            raise FileNotFoundError(f"manifest file {p} does not exist{where}")
        return p
    q = MANIFEST_DIR / f"{cohort}.csv"
    if not q.is_file():
        raise DataError(f"unknown cohort {cohort!r}; expected one of {available_cohorts()} "
                        f"(manifests in {MANIFEST_DIR}) or a path to a manifest .csv")
    return q


def load_manifest(cohort: str) -> pd.DataFrame:
    """Read cohort ``cohort``'s manifest into a DataFrame (every column as read; ``label``,
    crop columns as int; ``path``, ``group``, ``sha256``, ``channels``, ``cell_id`` as str)."""
    p = manifest_path(cohort)
    df = pd.read_csv(p, dtype={"cell_id": str, "path": str, "group": str, "sha256": str,
                               "channels": str, "class_name": str, "shape": str},
                     keep_default_na=False)
    df.attrs["name"] = str(cohort)
    df.attrs["manifest"] = str(p)
    return df


def is_unlabelled(df: pd.DataFrame) -> bool:
    """True when manifest ``df`` labels none of its cells: no ``label`` column, or every
    ``label`` empty (an unlabelled manifest: cells to predict, not a study cohort)."""
    if "label" not in df.columns:
        return True
    return bool((df["label"].astype(str).str.strip() == "").all())


def stains_of(df: pd.DataFrame) -> tuple[str, str, str] | None:
    """The stains of manifest ``df`` in R, G, B order, from its ``stains`` column
    (``"tubulin,F-actin,DNA"``); None when the column is missing or empty. ``DataError`` when the
    cells disagree or a value does not name three stains."""
    if STAINS_COLUMN not in df.columns:
        return None
    vals = sorted({str(v).strip() for v in df[STAINS_COLUMN].tolist()} - {"", "nan"})
    if not vals:
        return None
    if len(vals) > 1:
        raise DataError(f"manifest column {STAINS_COLUMN!r} holds {len(vals)} different values "
                        f"({vals[:3]}); expected one value for every cell: the R, G, B stains")
    parts = tuple(p.strip() for p in vals[0].split(","))
    if len(parts) != 3 or not all(parts):
        raise DataError(f"manifest column {STAINS_COLUMN!r} = {vals[0]!r}; expected three stain "
                        "names in R, G, B order, e.g. 'vimentin,F-actin,DNA'")
    return parts  # type: ignore[return-value]


def _check_table(df: pd.DataFrame, allow_mixed_groups: bool = False, labelled: bool = True) -> list[str]:
    """Table-level checks: columns, labels, empty classes, mixed groups, duplicate ids, stains.
    ``labelled=False`` (cells to predict): the label columns may be missing or empty; labels
    that are given must still be 0 or 1, and the class checks are skipped."""
    problems: list[str] = []
    need = REQUIRED_COLUMNS if labelled else tuple(c for c in REQUIRED_COLUMNS if c not in LABEL_COLUMNS)
    missing = [c for c in need if c not in df.columns]
    if missing:
        return [f"manifest is missing column(s) {missing}; expected {list(need)}"]
    if labelled and is_unlabelled(df):
        return ["manifest labels none of its cells (every label is empty): a study cohort needs "
                "label 0 (normal) or 1 (abnormal) for every cell; an unlabelled manifest (cellstudy "
                "manifest --unlabelled) is for `cellstudy predict`"]
    crop_present = [c for c in CROP_COLUMNS if c in df.columns]
    if crop_present and len(crop_present) != 3:
        problems.append(f"manifest has crop column(s) {crop_present}; expected all of "
                        f"{list(CROP_COLUMNS)} or none")
    try:
        stains_of(df)
    except DataError as e:
        problems.append(str(e))
    if "label" in df.columns:
        given = df["label"].astype(str).str.strip() != ""
        labels = pd.to_numeric(df["label"], errors="coerce")
        bad = ~labels.isin([0, 1]) & (given | labelled)
        for cid, lab in zip(df.loc[bad, "cell_id"].tolist(), df.loc[bad, "label"].tolist()):
            problems.append(f"cell {cid}: label {str(lab)!r}; expected 0 (normal) or 1 (abnormal)"
                            + ("" if labelled else " or empty (unknown)"))
    else:
        labels, bad = pd.Series(np.nan, index=df.index), pd.Series(True, index=df.index)
    if labelled:
        for lab, name in enumerate(config.CLASS_NAMES):
            if int((labels == lab).sum()) == 0:
                problems.append(f"class {name!r} (label {lab}) has no images; expected at least one "
                                f"image per class")
    g = pd.DataFrame({"group": df["group"].astype(str), "label": labels})[~bad & labels.notna()]
    nlab = g.groupby("group")["label"].nunique()
    if not allow_mixed_groups and labelled:
        for grp in nlab.index[nlab > 1]:
            problems.append(f"group {grp!r} spans both classes; expected every group (source "
                            f"field) to hold one class only")
    dup = df["cell_id"][df["cell_id"].duplicated()].unique().tolist()
    for cid in dup:
        problems.append(f"cell_id {cid!r} appears more than once; expected unique ids")
    for p, s in zip(df["path"].astype(str).tolist(), df["sha256"].astype(str).tolist()):
        n_p, n_s = len(parse_paths(p)), len(s.split(";"))
        if n_p != n_s:
            problems.append(f"{p}: {n_s} checksum(s) for {n_p} file(s); expected one per file")
    return problems


@dataclass
class _Scan:
    """Result of one pass over a manifest's files."""

    problems: list[str] = field(default_factory=list)
    images: np.ndarray | None = None
    missing_only: bool = True


def _scan(df: pd.DataFrame, root: Path, check_sha: bool, keep: bool) -> _Scan:
    """Read every file once (bytes), check existence / checksum / decodability / shape /
    channel count / NaN-inf and the crop; collect all problems. With ``keep``, also assemble the
    raw (N, H, W, 3) float32 images (stacked only if there are no problems)."""
    res = _Scan()
    n = len(df)
    paths = [parse_paths(p) for p in df["path"].astype(str)]
    shas = [s.split(";") for s in df["sha256"].astype(str)]
    shapes = ([s.split(";") for s in df["shape"].astype(str)] if "shape" in df.columns
              else [[""] * len(p) for p in paths])
    has_crop = all(c in df.columns for c in CROP_COLUMNS)
    crops = (df[list(CROP_COLUMNS)].to_numpy() if has_crop else None)
    chans = df["channels"].astype(str).tolist()
    cids = df["cell_id"].astype(str).tolist()
    rel_paths = df["path"].astype(str).tolist()

    # Visit rows grouped by their file set so every file is read and decoded once and
    # released afterwards (RxRx1: many crops per field).
    order: OrderedDict[tuple[str, ...], list[int]] = OrderedDict()
    for i, p in enumerate(paths):
        order.setdefault(tuple(p), []).append(i)

    out: list[np.ndarray | None] = [None] * n

    def problem(msg: str, missing: bool = False) -> None:
        res.problems.append(msg)
        if not missing:
            res.missing_only = False

    for key, rows in order.items():
        i0 = rows[0]
        arrays: list[np.ndarray] | None = []
        for k, rel in enumerate(key):
            full = root / rel
            if not full.is_file():
                problem(f"{rel}: file does not exist under data root {root}", missing=True)
                arrays = None
                continue
            data = full.read_bytes()
            expected = shas[i0][k] if k < len(shas[i0]) else ""
            if check_sha:
                got = sha256_bytes(data)
                if got != expected:
                    problem(f"{rel}: sha256 {got[:16]}... does not match the manifest's "
                            f"{expected[:16]}...; expected the file the manifest was built from")
                    arrays = None
                    continue
            try:
                a = decode_image(data, rel)
            except DataError as e:
                problem(str(e))
                arrays = None
                continue
            want = shapes[i0][k] if k < len(shapes[i0]) else ""
            got_shape = "x".join(map(str, a.shape))
            if want and want != got_shape:
                problem(f"{rel}: shape {got_shape}; expected {want} (manifest 'shape')")
                arrays = None
                continue
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                problem(f"{rel}: contains {int((~np.isfinite(a)).sum())} NaN/inf value(s); "
                        f"expected finite intensities")
                arrays = None
                continue
            if arrays is not None:
                arrays.append(a)
        if arrays is None:
            continue
        if len(key) not in (1, 3):
            problem(f"{';'.join(key)}: {len(key)} files; expected one multi-channel file or "
                    f"three single-channel files (R;G;B)")
            continue
        for i in rows:
            try:
                ch = parse_channels(chans[i])
                img = _select(arrays, list(key), ch)
                crop = tuple(int(v) for v in crops[i]) if has_crop and str(crops[i][0]) != "" \
                    else None
                img = _crop(img, crop, ";".join(key))
            except (DataError, ValueError) as e:
                problem(f"cell {cids[i]}: {e}")
                continue
            if keep:
                out[i] = img.astype(np.float32)
    if keep and not res.problems:
        sizes = {o.shape for o in out if o is not None}
        if len(sizes) > 1:
            counts = pd.Series([o.shape for o in out]).value_counts()
            common = counts.index[0]
            for i, o in enumerate(out):
                if o.shape != common:
                    problem(f"cell {cids[i]} ({rel_paths[i]}): image size "
                            f"{o.shape}; expected {common} like the rest of the cohort")
        else:
            res.images = np.stack(out) if n else np.zeros((0, 0, 0, 3), np.float32)
    return res


def verify_manifest(df: pd.DataFrame, root: str | os.PathLike | None = None,
                    check_sha: bool = True, check_images: bool = True,
                    allow_mixed_groups: bool = False, labelled: bool = True) -> None:
    """Check a manifest against its data root before any long work.

    Checks: required columns; labels 0/1; both classes present; no group spanning both classes
    (unless ``allow_mixed_groups``); unique cell ids; every file exists; its sha256 matches
    (``check_sha``); and with ``check_images`` each file decodes (not truncated), has the
    manifest's ``shape`` if given, enough channels for ``channels``, only finite values, and
    each crop lies inside its image. All problems are collected and raised together as one
    ``DataError`` (first ``MAX_LISTED`` listed, plus a count); a ``MissingFileError`` (also a
    ``FileNotFoundError``) when every problem is a missing file. The data root is only read.
    ``root``: resolved with ``config.data_root`` (FileNotFoundError if absent).
    ``labelled=False``: cells to predict (``cellstudy manifest --unlabelled``): the label checks
    are skipped (``_check_table``), the files are checked as for a cohort.
    """
    root = config.data_root(root)
    what = f"manifest {df.attrs.get('name', '<table>')} (data root {root})"
    problems = _check_table(df, allow_mixed_groups, labelled=labelled)
    if problems and any("missing column" in p for p in problems):
        _raise_problems(problems, what)
    if check_images:
        scan = _scan(df, root, check_sha, keep=False)
        _raise_problems(problems + scan.problems, what, missing_only=not problems and
                        scan.missing_only)
    else:
        scan_problems: list[str] = []
        for p_str, s_str in zip(df["path"].astype(str), df["sha256"].astype(str)):
            for rel, sha in zip(parse_paths(p_str), s_str.split(";")):
                full = root / rel
                if not full.is_file():
                    scan_problems.append(f"{rel}: file does not exist under data root {root}")
                elif check_sha and sha256_file(full) != sha:
                    scan_problems.append(f"{rel}: sha256 does not match the manifest's "
                                         f"{sha[:16]}...")
        only_missing = not problems and all("does not exist" in p for p in scan_problems)
        _raise_problems(problems + sorted(set(scan_problems), key=scan_problems.index), what,
                        missing_only=only_missing)


# ---------------------------------------------------------------------------------------------
# Cohorts
# ---------------------------------------------------------------------------------------------
@dataclass
class Cohort:
    """A loaded cohort.

    images: (N, H, W, 3) float32 in [0, 1], RGB order, robust-scaled per image and channel.
    labels: (N,) int64, 0 = normal role, 1 = abnormal role (-1: unknown, only in a cohort
        loaded with ``labelled=False``: cells to predict).
    groups: (N,) str, the source field of each cell (the CV grouping).
    cell_ids: (N,) str.
    sha256: (N,) str, a content checksum per cell: sha256 of that cell's scaled float32 image
        bytes (unique per cell, also for crops sharing one field file; use it as a cache key).
        The files' own checksums are ``table["sha256"]``.
    table: the manifest DataFrame (row i = cell i).
    scaling: the scaling parameters (method, percentiles, per-cell lo/hi (N, 3) raw units).
    """

    name: str
    root: Path
    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    cell_ids: np.ndarray
    sha256: np.ndarray
    table: pd.DataFrame
    scaling: dict[str, Any]

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        n = np.bincount(self.labels, minlength=2) if len(self.labels) else [0, 0]
        return (f"Cohort({self.name!r}: {len(self)} cells, images {self.images.shape} "
                f"{self.images.dtype}, {n[0]} normal + {n[1]} abnormal, "
                f"{len(set(self.groups))} groups, root {str(self.root)!r})")

    @property
    def class_names(self) -> tuple[str, str]:
        return config.CLASS_NAMES

    def counts(self) -> pd.DataFrame:
        """Cells and groups per class: columns label, class (the role: normal / abnormal),
        ``in the manifest`` (the manifest's own class name, e.g. DMSO; empty without one: see
        :func:`class_names_of`), cells, groups."""
        t = pd.DataFrame({"label": self.labels, "group": self.groups})
        own = class_names_of(self.table) or {}
        rows = []
        for lab, name in enumerate(config.CLASS_NAMES):
            s = t[t.label == lab]
            rows.append({"label": lab, "class": name, "in the manifest": own.get(lab, ""), "cells": len(s),
                         "groups": s.group.nunique()})
        return pd.DataFrame(rows)


def class_names_of(table: pd.DataFrame) -> dict[int, str] | None:
    """``{0: name, 1: name}``: a manifest's class names (column ``class_name``) for the normal (0)
    and abnormal (1) roles, e.g. ``{0: "DMSO", 1: "protein_synthesis"}``; None when the manifest
    has no such column or a role has not exactly one name (an empty name is none)."""
    if "class_name" not in table.columns or "label" not in table.columns:
        return None
    out = {}
    lab = pd.to_numeric(table["label"], errors="coerce")
    for role in (0, 1):
        names = set(table.loc[lab == role, "class_name"].dropna().astype(str)) - {""}
        if len(names) != 1:
            return None
        out[role] = names.pop()
    return out


def role_text(role: int, names: dict[int, str] | None) -> str:
    """The book's name of a class: ``"abnormal (tumour)"``, the role with the manifest's own name
    (:func:`class_names_of`) where it has one and it differs; the role alone otherwise."""
    base = config.CLASS_NAMES[role]
    own = (names or {}).get(role)
    return f"{base} ({own})" if own and own != base else base


def load_cohort(cohort: str, root: str | os.PathLike | None = None, verify: bool = True,
                check_sha: bool = True, low: float = DEFAULT_LOW,
                high: float = DEFAULT_HIGH, labelled: bool = True,
                manifest: pd.DataFrame | None = None) -> Cohort:
    """Load cohort ``cohort`` (a name in ``data_manifest/`` or a manifest path) from ``root``
    (``config.data_root(root)``) as a ``Cohort`` of robust-scaled images.

    With ``verify`` the manifest is checked first (columns, classes, groups; see
    ``verify_manifest``) and file checksums are checked while reading when ``check_sha``.
    Every file is read once; all problems are reported together in one ``DataError`` before
    anything is returned. Nothing is written anywhere.

    ``labelled=False``: cells to predict (``cellstudy predict``): the manifest may leave
    ``label`` / ``class_name`` out or empty; an unknown label is -1 in ``Cohort.labels``.
    ``manifest``: ``load_manifest(cohort)`` when the caller has read it already (not read again).
    """
    df = load_manifest(cohort) if manifest is None else manifest
    root = config.data_root(root)
    what = f"cohort {cohort!r} (manifest {df.attrs['manifest']}, data root {root})"
    problems = _check_table(df, labelled=labelled) if verify else []
    if problems and any("missing column" in p or "labels none" in p for p in problems):
        _raise_problems(problems, what)
    scan = _scan(df, root, check_sha=verify and check_sha, keep=True)
    _raise_problems(problems + scan.problems, what,
                    missing_only=not problems and scan.missing_only)
    images, (lo, hi) = robust_scale(scan.images, low, high, return_params=True)
    images = np.ascontiguousarray(images, dtype=np.float32)
    keys = np.array([sha256_bytes(im.tobytes()) for im in images], dtype=object)
    scaling = {"method": "robust percentile, per image and channel, clipped to [0, 1]",
               "low": float(low), "high": float(high), "lo": lo, "hi": hi}
    return Cohort(name=str(cohort), root=root, images=images,
                  labels=_labels(df, labelled),
                  groups=df["group"].astype(str).to_numpy(dtype=object),
                  cell_ids=df["cell_id"].astype(str).to_numpy(dtype=object),
                  sha256=keys, table=df, scaling=scaling)


def _labels(df: pd.DataFrame, labelled: bool) -> np.ndarray:
    """(N,) int64 labels of manifest ``df``; -1 for a cell without one (``labelled=False``)."""
    if labelled:
        return df["label"].astype(np.int64).to_numpy()
    if "label" not in df.columns:
        return np.full(len(df), -1, np.int64)
    return pd.to_numeric(df["label"], errors="coerce").fillna(-1).astype(np.int64).to_numpy()


def iter_image_files(folder: Path) -> Iterable[Path]:
    """Image files (npy/tif/tiff/png) under ``folder``, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
