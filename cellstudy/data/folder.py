"""A cohort manifest built from a folder of the user's own cell images (``cellstudy manifest``).

The folder holds one image per cell (a multi-channel ``.npy`` / TIFF / OME-TIFF / PNG file, any
bit depth) or one grey file per channel. Everything the study needs is given explicitly:

* the class of each cell: the first subfolder of its path (``FOLDER/<class>/...``) or a labels
  CSV (a file column and a class column), and which class is the *normal* role (label 0) and
  which the *abnormal* one (label 1);
* the group of each cell (the field / well / replicate that the folds never split between
  training and test): a regular expression with a named group ``group`` searched in the file's
  path relative to the folder, or a column of the labels CSV;
* the channels: which stored channel (or, with one file per channel, which file) is R = third
  stain, G = F-actin and B = DNA (``cellstudy.config.CHANNELS``).

:func:`build_manifest` reads every file once (sha256, decoding, shape), checks what the study
needs and raises one :class:`cellstudy.data.DataError` whose ``.problems`` lists every problem
found, each naming its file; nothing is written. :func:`write_manifest` writes the table (the
columns of ``cellstudy.data``'s manifests, paths relative to the data root) and refuses to
overwrite an existing file unless asked to. The folder itself is only read.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pandas as pd

from cellstudy import atomic, config
from cellstudy.data import (DataError, _check_table, _raise_problems, decode_image,
                            iter_image_files, sha256_bytes)

__all__ = ["ChannelMap", "parse_channel_map", "channel_regex", "build_manifest", "write_manifest",
           "summary", "MANIFEST_COLUMNS"]

#: The columns of a manifest written here, in order (extra labels-CSV columns follow them).
MANIFEST_COLUMNS: tuple[str, ...] = ("cell_id", "path", "label", "class_name", "group", "channels",
                                     "sha256", "shape")

#: Names accepted for the R, G, B keys of ``--channels`` (besides ``config.CHANNELS``).
_KEY_ALIASES = {"r": "third", "red": "third", "g": "actin", "green": "actin", "f-actin": "actin",
                "b": "dna", "blue": "dna"}

#: The placeholder of a ``{channel}`` channel pattern.
PLACEHOLDER = "{channel}"


@dataclass(frozen=True)
class ChannelMap:
    """Which stored channel gives R, G, B.

    values: three strings in R, G, B order (third stain, F-actin, DNA): stored channel indices
        (``"2"``) for one multi-channel file per cell, or the channel tokens of the file names
        (``"w3"``) for one file per channel.
    per_file: True for one file per channel.
    spec: the text it was parsed from (for messages).
    """

    values: tuple[str, str, str]
    per_file: bool
    spec: str

    @property
    def indices(self) -> list[int]:
        """The stored channel indices of R, G, B (one multi-channel file per cell)."""
        return [int(v) for v in self.values]

    def describe(self, k: int) -> str:
        """``"dna (w1)"``: the stain of RGB position ``k`` and its stored channel."""
        return f"{config.CHANNELS[k]} ({self.values[k]})"


def parse_channel_map(spec: str, per_file: bool = False) -> ChannelMap:
    """Parse ``--channels``.

    spec: ``"third=2,actin=1,dna=0"`` (keys ``third`` / ``actin`` / ``dna``, or ``r`` / ``g`` /
        ``b``, in any order) or three values in R, G, B order (``"2,1,0"``). For one multi-channel
        file per cell the values are stored channel indices (0-based, non-negative ints); with
        one file per channel (``per_file``) they are the channel tokens of the file names
        (``"third=w3,actin=w2,dna=w1"``), all different.
    Raises ``DataError`` saying what is expected.
    """
    form = ("'third=w3,actin=w2,dna=w1' (the channel token of each stain's files)" if per_file
            else "'third=2,actin=1,dna=0' (the stored channel index of each stain)")
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if len(items) != 3:
        raise DataError(f"--channels {spec!r}: expected three entries, e.g. {form}")
    if all("=" in s for s in items):
        found: dict[str, str] = {}
        for s in items:
            k, v = (t.strip() for t in s.split("=", 1))
            key = _KEY_ALIASES.get(k.lower(), k.lower())
            if key not in config.CHANNELS or key in found or not v:
                raise DataError(f"--channels {spec!r}: entry {s!r}; expected each of "
                                f"{list(config.CHANNELS)} once with a value, e.g. {form}")
            found[key] = v
        values = tuple(found[k] for k in config.CHANNELS)
    elif any("=" in s for s in items):
        raise DataError(f"--channels {spec!r}: mixes named and positional entries; expected {form}")
    else:
        values = tuple(items)
    if per_file:
        if len(set(values)) != 3:
            raise DataError(f"--channels {spec!r}: the three stains name the same file token; "
                            f"expected three different tokens, e.g. {form}")
    else:
        if not all(re.fullmatch(r"\d+", v) for v in values):
            # a token given with its extension ("w1.tif") is named without it
            tok = _without_image_suffix(next(v for v in values if not re.fullmatch(r"\d+", v)))
            raise DataError(f"--channels {spec!r}: values {list(values)}; expected stored channel "
                            f"indices (0, 1, 2, ...), e.g. {form}; file-name tokens such as {tok!r} "
                            f"need --channel-pattern, how a file name holds its token (one file per "
                            f"channel), e.g. --channel-pattern '_{{channel}}.tif' for names that end "
                            f"in _{tok}.tif")
        if len({int(v) for v in values}) != 3:
            raise DataError(f"--channels {spec!r}: stains read the same stored channel (R, G, B = "
                            f"{', '.join(values)}); expected three different channel indices, e.g. {form}")
    return ChannelMap(values=values, per_file=per_file, spec=str(spec))  # type: ignore[arg-type]


def channel_regex(pattern: str, tokens: Sequence[str]) -> re.Pattern[str]:
    """The regular expression that finds the channel token in a file's relative path.

    pattern: either a literal text with one ``{channel}`` placeholder (``"_{channel}.tif"``: the
        placeholder matches one of ``tokens`` or any other letters-and-digits token, everything
        else literally), or a regular
        expression with a named group ``channel`` (``r"_(?P<channel>w\\d)\\.tif$"``).
    tokens: the channel tokens of the mapping (R, G, B).
    Raises ``DataError`` for a pattern with neither, or an invalid regular expression.
    """
    if PLACEHOLDER in pattern:
        parts = pattern.split(PLACEHOLDER)
        if len(parts) != 2:
            raise DataError(f"--channel-pattern '{pattern}': expected one {PLACEHOLDER} placeholder")
        # the mapping's tokens first, then any other letters-and-digits token (reported as ignored)
        alt = "|".join([re.escape(t) for t in sorted(tokens, key=len, reverse=True)] + ["[A-Za-z0-9]+"])
        return re.compile(re.escape(parts[0]) + f"(?P<channel>{alt})" + re.escape(parts[1]))
    return _named_regex(pattern, "--channel-pattern", "channel",
                        f"expected a {PLACEHOLDER} placeholder ('_{{channel}}.tif') or a regular expression "
                        f"with a named group (?P<channel>...)")


def _named_regex(pattern: str, option: str, group: str, expected: str) -> re.Pattern[str]:
    """``pattern`` compiled; DataError naming ``option`` when it is not a regular expression or
    has no named group ``group`` (``expected`` says what it should be)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"{option} '{pattern}' is not a valid regular expression: {e}") from None
    if group not in rx.groupindex:
        raise DataError(f"{option} '{pattern}': {expected}")
    return rx


def _group_regex(pattern: str) -> re.Pattern[str]:
    return _named_regex(pattern, "--group-pattern", "group",
                        "expected a regular expression with a named group (?P<group>...), e.g. "
                        "'(?P<group>[A-Z]\\d{2}_s\\d+)'")


@dataclass
class _Cell:
    """One cell: its files (relative to the folder; R, G, B for one file per channel)."""

    cell_id: str
    files: list[str]
    class_name: str | None = None
    group: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _without_image_suffix(name: str) -> str:
    """``name`` without its image file suffix (``.ome.tif`` as a whole; any case), else as is."""
    for suf in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".npy"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _cell_id(rel: str) -> str:
    """``"DMSO/B02_s1_c3_{channel}.tif"`` -> ``"DMSO/B02_s1_c3"``: the path without its suffix
    (``.ome.tif`` included) and without the channel placeholder and the separators it leaves."""
    p = PurePosixPath(rel.replace(PLACEHOLDER, ""))
    name = _without_image_suffix(p.name)
    name = re.sub(r"[_\-. ]{2,}", "_", name).strip("_-. ") or p.name
    return str(p.parent / name) if str(p.parent) != "." else name


def _find_cells(rels: list[str], cmap: ChannelMap, channel_pattern: str | None,
                problems: list[str], notes: list[str]) -> list[_Cell]:
    """Group the image files into cells (one file, or one file per mapped channel token)."""
    if not cmap.per_file:
        return [_Cell(cell_id=_cell_id(r), files=[r]) for r in rels]
    rx = channel_regex(str(channel_pattern), cmap.values)
    by_key: dict[str, dict[str, str]] = {}
    id_of: dict[str, str] = {}
    literal = PLACEHOLDER in str(channel_pattern)
    ignored: Counter[str] = Counter()
    for rel in rels:
        m = rx.search(rel)
        if m is None:
            problems.append(f"{rel}: does not match --channel-pattern '{channel_pattern}'; expected "
                            f"one file per channel named with one of the tokens {list(cmap.values)}")
            continue
        token = m.group("channel")
        if token not in cmap.values:
            ignored[token] += 1
            continue
        key = rel[: m.start("channel")] + PLACEHOLDER + rel[m.end("channel"):]
        by_key.setdefault(key, {})[token] = rel
        # a {channel} pattern's literal text is the same in every file name, so the cell's id drops
        # the whole match ("_w1.tif" of "_w{channel}.tif"): "B02_c3_w1.tif" is cell "B02_c3", not
        # "B02_c3_w" (a folder separator in the match stays one); a regular expression may match
        # text that differs from cell to cell, so there only the channel token goes
        if literal:
            cut = m.group(0)
            joined = rel[: m.start()] + ("/" if "/" in cut else "_") + rel[m.end():]
            id_of.setdefault(key, re.sub(r"/+", "/", joined).lstrip("/"))
        else:
            id_of.setdefault(key, key)
    for token, n in sorted(ignored.items()):
        notes.append(f"{n} file(s) of channel {token!r} ignored: not in --channels {cmap.spec!r}")
    seen = set(ignored) | {t for found in by_key.values() for t in found}
    absent = [t for t in cmap.values if t not in seen]
    if absent and seen:   # the cause of every "missing channel file" below, said once
        problems.append(f"no file name carries the channel token(s) {absent} of --channels {cmap.spec!r}; "
                        f"the tokens found in the file names: {sorted(seen)}")
    cells = []
    for key, found in by_key.items():
        missing = [k for k in range(3) if cmap.values[k] not in found]
        if missing:
            for k in missing:
                problems.append(
                    f"{key.replace(PLACEHOLDER, cmap.values[k])}: missing channel file for "
                    f"{cmap.describe(k)} of the cell with "
                    f"{', '.join(sorted(found.values()))}; expected one file per channel")
            continue
        cells.append(_Cell(cell_id=_cell_id(id_of[key]), files=[found[t] for t in cmap.values]))
    return cells


def plural(n: int, noun: str) -> str:
    """``"1 group"``, ``"2 groups"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _per_channel_hint(rels: list[str]) -> str:
    """The problem line for grey files read as one multi-channel file per cell: give
    ``--channel-pattern``; names the tokens when the file names end in one (``_w1.tif``)."""
    msg = (f"all {len(rels)} image files have one grey channel, so each cannot be a cell's three stains: "
           f"for one file per channel give --channel-pattern (how a file name holds its channel) and "
           f"--channels with the names' tokens")
    split = [re.fullmatch(r"(.+?)([_\-.])([A-Za-z0-9]+)(\.[A-Za-z.]+)", PurePosixPath(r).name) for r in rels]
    tokens = Counter(m.group(3) for m in split if m)
    stems = Counter((m.group(1), m.group(4)) for m in split if m)
    if all(split) and 2 <= len(tokens) <= 8 and min(stems.values()) >= 2:
        sep, ext = split[0].group(2), split[0].group(4)
        t = sorted(tokens)
        pattern = f"--channel-pattern '{sep}{{channel}}{ext}'"
        if len(t) == 3:
            return (msg + f"; the names end in the tokens {t}, e.g. {pattern} --channels "
                    f"third={t[2]},actin={t[1]},dna={t[0]} (put each stain's own token)")
        if len(t) == 2:
            return (msg + f"; the names end in only two tokens {t}, e.g. {pattern}, but the study needs "
                    "three stains (R = third stain, G = F-actin, B = DNA): a channel's files are missing")
        return (msg + f"; the names end in the tokens {t}, e.g. {pattern} --channels third=<token>,"
                "actin=<token>,dna=<token> with three of them (the others are ignored)")
    return msg + ", e.g. --channel-pattern '_{channel}.tif' --channels third=w3,actin=w2,dna=w1"


def _read_labels(labels: str | os.PathLike | pd.DataFrame, file_column: str, class_column: str | None,
                 group_column: str | None) -> tuple[pd.DataFrame, str]:
    if isinstance(labels, pd.DataFrame):
        table, name = labels.astype(str), "labels table"
    else:
        p = Path(labels)
        if not p.is_file():
            where = "" if p.is_absolute() else f" (a relative path is read from the working directory {Path.cwd()})"
            raise FileNotFoundError(f"labels CSV {p} does not exist{where}")
        table = pd.read_csv(p, dtype=str, keep_default_na=False)
        name = f"labels CSV {p}"
    want = [file_column] + ([class_column] if class_column else []) + ([group_column] if group_column else [])
    missing = [c for c in want if c not in table.columns]
    if missing:
        raise DataError(f"{name}: no column(s) {missing}; its columns are {list(table.columns)} "
                        f"(name them with --file-column / --class-column / --group-column)")
    return table, name


def _apply_labels(cells: list[_Cell], table: pd.DataFrame, name: str, file_column: str,
                  class_column: str, group_column: str | None, problems: list[str],
                  unlabelled: bool = False) -> None:
    """Class (and group, and free columns) of each cell from the labels table; a row names any
    one of the cell's files, by its path relative to the folder or by a file name that is unique."""
    by_rel = {f: c for c in cells for f in c.files}
    base = Counter(PurePosixPath(f).name for f in by_rel)
    by_name = {PurePosixPath(f).name: c for f, c in by_rel.items() if base[PurePosixPath(f).name] == 1}
    used = {file_column} | (set() if unlabelled else {class_column})  # the group column stays too, under its own name (well, ...)
    extra_cols = [c for c in table.columns if c not in used and c not in MANIFEST_COLUMNS]
    labelled: set[int] = set()
    for i, row in enumerate(table.to_dict("records")):
        ref = PurePosixPath(str(row[file_column]).strip().replace("\\", "/")).as_posix()
        ref = ref[2:] if ref.startswith("./") else ref
        cell = by_rel.get(ref) or by_name.get(ref)
        where = f"{name} row {i + 2} ({file_column}={row[file_column]!r})"
        if cell is None:
            problems.append(f"{where}: no such image file in the folder (or not one of the "
                            f"mapped channels); expected a path relative to the folder")
            continue
        cls = "" if unlabelled else str(row[class_column]).strip()
        grp = str(row[group_column]).strip() if group_column else None
        if not cls and not unlabelled:
            problems.append(f"{where}: empty {class_column!r}; expected the cell's class")
        if group_column and not grp:
            problems.append(f"{where}: empty {group_column!r}; expected the cell's group")
        if id(cell) in labelled:
            if (cell.class_name, cell.group) != (cls, grp if group_column else cell.group):
                problems.append(f"{where}: gives {cell.cell_id} class {cls!r}"
                                + (f", group {grp!r}" if group_column else "")
                                + f"; an earlier row gave {cell.class_name!r}"
                                + (f", {cell.group!r}" if group_column else ""))
            continue
        labelled.add(id(cell))
        cell.class_name = cls or None
        if group_column:
            cell.group = grp or None
        cell.extra = {c: str(row[c]) for c in extra_cols}
    for c in cells:
        if id(c) not in labelled and (not unlabelled or group_column):
            problems.append(f"{c.files[0]}: not in the {name}; expected a row naming it "
                            f"(column {file_column!r}) with its " + ("group" if unlabelled else "class"))


def _classes_from_folders(cells: list[_Cell], problems: list[str]) -> None:
    for c in cells:
        parts = PurePosixPath(c.files[0]).parts
        if len(parts) < 2:
            problems.append(f"{c.files[0]}: not inside a class subfolder; expected FOLDER/<class>/... "
                            f"(or give --labels)")
        else:
            c.class_name = parts[0]


def _groups_from_pattern(cells: list[_Cell], rx: re.Pattern[str], problems: list[str]) -> str | None:
    """Each cell's group from ``rx`` (its named group ``group``) searched in its files' paths.
    A group that ends in a digit followed by another digit in the path (``_s\\d`` on
    ``B02_s10_c3.tif`` gives ``B02_s1``) cuts a number, which merges sites 1 and 10: returns a note
    saying so (once, with an example), since the folds then see fewer groups than the folder has;
    None when no group cuts one."""
    cut = []
    for c in cells:
        found = []
        for f in c.files:
            m = rx.search(f)
            if m is None or not m.group("group"):
                problems.append(f"{f}: --group-pattern '{rx.pattern}' does not match it; expected "
                                f"every file's path (relative to the folder) to name its group")
            else:
                found.append(m.group("group"))
                end = m.end("group")
                if m.group("group")[-1].isdigit() and end < len(f) and f[end].isdigit():
                    cut.append((f, m.group("group")))
        if len(set(found)) > 1:
            problems.append(f"{';'.join(c.files)}: the files of one cell give different groups "
                            f"{sorted(set(found))}; expected one")
        elif found and len(found) == len(c.files):
            c.group = found[0]
    if not cut:
        return None
    f, g = cut[0]
    return (f"--group-pattern cut a number in {len(cut)} file(s), e.g. group {g!r} of {f!r} (the next "
            "character is a digit too): sites such as s1 and s10 then fall into one group. Use \\d+ "
            "for the whole number (e.g. '(?P<group>[A-Z]\\d{2}_s\\d+)') unless that is meant")


def _read_cells(cells: list[_Cell], folder: Path, cmap: ChannelMap,
                problems: list[str]) -> dict[str, tuple[str, str, int]]:
    """Read every file once: sha256, decoded shape, channel count; check each file's channels
    against the mapping and that a cell's files share one size. Returns rel -> (sha256, shape
    text, channel count) for the files that decoded."""
    info: dict[str, tuple[str, str, int]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for c in cells:
        for k, rel in enumerate(c.files):
            try:
                data = (folder / rel).read_bytes()
            except OSError as e:
                problems.append(f"{rel}: cannot be read ({e.strerror or e})")
                continue
            try:
                a = decode_image(data, rel)
            except DataError as e:
                problems.append(str(e))
                continue
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                problems.append(f"{rel}: contains {int((~np.isfinite(a)).sum())} NaN/inf "
                                f"value(s); expected finite intensities")
            n = 1 if a.ndim == 2 else int(a.shape[2])
            info[rel] = (sha256_bytes(data), "x".join(map(str, a.shape)), n)
            sizes[rel] = (int(a.shape[0]), int(a.shape[1]))
            if cmap.per_file and n != 1:
                problems.append(f"{rel}: has {n} channels (shape {info[rel][1]}); expected one "
                                f"grey channel: the file of {cmap.describe(k)}")
            if not cmap.per_file and n <= max(cmap.indices):
                problems.append(f"{rel}: has {n} channel(s) (shape {info[rel][1]}); --channels "
                                f"{cmap.spec!r} needs at least {max(cmap.indices) + 1}")
        got = {sizes[f] for f in c.files if f in sizes}
        if len(got) > 1:
            problems.append(f"{';'.join(c.files)}: the channel files of one cell differ in size "
                            f"{sorted(got)}; expected one size")
    # one channel count and one image size for the whole cohort (the study stacks the cells)
    counts = Counter(v[2] for v in info.values())
    if not cmap.per_file and len(counts) > 1:
        common, n_common = counts.most_common(1)[0]
        for rel, v in info.items():
            if v[2] != common and v[2] > max(cmap.indices):
                problems.append(f"{rel}: has {v[2]} channels; expected {common} like the other "
                                f"{n_common} file(s)")
    hw = Counter(sizes.values())
    if len(hw) > 1:
        common_hw, n_common = hw.most_common(1)[0]
        for rel, s in sizes.items():
            if s != common_hw:
                problems.append(f"{rel}: image size {s[0]}x{s[1]}; expected {common_hw[0]}x"
                                f"{common_hw[1]} like the other {n_common} file(s) (the study "
                                f"needs one size; crop or resize them first)")
    return info


def build_manifest(folder: str | os.PathLike, *, normal: str | None = None, abnormal: str | None = None,
                   channels: str, unlabelled: bool = False, stains: str | None = None,
                   labels: str | os.PathLike | pd.DataFrame | None = None,
                   file_column: str = "file", class_column: str = "class",
                   group_column: str | None = None, group_pattern: str | None = None,
                   channel_pattern: str | None = None, n_splits: int = 5,
                   data_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Build a cohort manifest for the images under ``folder``; nothing is written.

    folder: the folder of cell images (``.npy``, ``.tif`` / ``.tiff`` / OME-TIFF, ``.png``; files
        and folders whose names start with ``.`` are skipped). Without ``labels`` the class of a
        file is its first subfolder (``folder/<class>/...``).
    normal, abnormal: the class names that take the *normal* role (label 0) and the *abnormal*
        role (label 1). Any other class found, or a missing one, is a problem.
    unlabelled: cells to predict (``cellstudy predict``), not a study cohort: no classes (no
        ``normal`` / ``abnormal`` / ``labels`` class column; ``label`` and ``class_name`` are
        left empty), no group-count check, and without a group pattern or column each cell's
        group is its subfolder (``"."`` at the top).
    stains: the stains in R, G, B order, ``"vimentin,F-actin,DNA"``: written to the ``stains``
        column, which ``cellstudy predict`` compares with the run's cohort.
    channels: the R, G, B mapping (``parse_channel_map``): ``"third=2,actin=1,dna=0"`` (stored
        channel indices of one multi-channel file per cell) or, with ``channel_pattern``,
        ``"third=w3,actin=w2,dna=w1"`` (the channel tokens of the per-channel files' names).
    labels: a labels CSV (path) or table with a ``file_column`` (the image's path relative to
        ``folder``, or its name when unique; with one file per channel any one of the cell's
        files) and a ``class_column``; its other columns (the group column included) are kept as
        free metadata columns.
    group_column: the labels column holding each cell's group (field / well / replicate).
    group_pattern: a regular expression with a named group ``group``, searched in each file's
        path relative to ``folder`` (``r"(?P<group>[A-Z]\\d{2}_s\\d)"``). Exactly one of
        ``group_column`` / ``group_pattern`` must be given.
    channel_pattern: one file per channel: how a file name holds its channel token, either
        literal text with a ``{channel}`` placeholder (``"_{channel}.tif"``) or a regular
        expression with a named group ``channel``; the files whose names differ only in the token
        are one cell. None: one multi-channel file per cell.
    n_splits: the study's number of folds; each class needs at least ``n_splits`` groups (the
        study's rule, :mod:`cellstudy.learning.folds`), and fewer than ``2 * n_splits`` is noted.
    data_root: the folder the manifest's paths are relative to (``folder`` or a folder above it;
        default ``folder``): the data root to run the study with.

    Returns the manifest (columns ``MANIFEST_COLUMNS`` plus the labels' free columns, one row per
    cell, sorted by file) with ``attrs["data_root"]`` (absolute path) and ``attrs["notes"]``
    (files ignored). Raises ``DataError`` (``.problems``: every problem, each naming its file)
    when anything the study needs is missing or wrong; ``FileNotFoundError`` for a missing
    folder or labels CSV; ``DataError`` for contradictory arguments.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    root = Path(data_root).expanduser().resolve() if data_root is not None else folder
    try:
        prefix = folder.relative_to(root)
    except ValueError:
        raise DataError(f"--data-root {root}: the image folder {folder} is not inside it; expected "
                        f"the folder itself or a folder above it") from None
    if unlabelled:
        if normal is not None or abnormal is not None:
            raise DataError("--unlabelled takes no --normal / --abnormal: its cells have no class")
    elif normal is None or abnormal is None:
        raise DataError("give --normal and --abnormal (the two class names), or --unlabelled for "
                        "cells to predict")
    elif normal == abnormal:
        raise DataError(f"--normal and --abnormal are both {normal!r}; expected two different classes")
    if group_column is not None and group_pattern is not None:
        raise DataError("give only one of --group-pattern and --group-column")
    if (group_column is None) == (group_pattern is None) and not unlabelled:
        raise DataError("give exactly one of --group-pattern (a regular expression with a named group "
                        "(?P<group>...) searched in each file's path) and --group-column (a column "
                        "of the labels CSV): the group (field / well / replicate) is the unit the "
                        "folds never split")
    if group_column is not None and labels is None:
        raise DataError(f"--group-column {group_column!r} needs --labels (the CSV holding it)")
    if int(n_splits) < 2:
        raise DataError(f"--n-splits {n_splits}: expected at least 2 folds")
    cmap = parse_channel_map(channels, per_file=channel_pattern is not None)
    if stains is not None:
        parts = [x.strip() for x in str(stains).split(",")]
        if len(parts) != 3 or not all(parts):
            raise DataError(f"--stains {stains!r}: expected three stain names in R, G, B order, "
                            "e.g. 'vimentin,F-actin,DNA'")
        stains = ",".join(parts)
    g_rx = _group_regex(group_pattern) if group_pattern is not None else None
    table = None
    if labels is not None:
        table, labels_name = _read_labels(labels, file_column, None if unlabelled else class_column,
                                          group_column)

    rels = [p.relative_to(folder).as_posix() for p in iter_image_files(folder)]
    rels = [r for r in rels if not any(part.startswith(".") for part in PurePosixPath(r).parts)]
    if not rels:
        raise DataError(f"image folder {folder}: no .npy / .tif / .tiff / .png files found")

    problems: list[str] = []
    notes: list[str] = []
    cells = _find_cells(rels, cmap, channel_pattern, problems, notes)
    if table is not None:
        _apply_labels(cells, table, labels_name, file_column, class_column, group_column, problems,
                      unlabelled=unlabelled)
    elif not unlabelled:
        _classes_from_folders(cells, problems)
    cut_note = None   # a --group-pattern that cuts a number: a note, and part of a too-few-groups error
    if g_rx is not None:
        cut_note = _groups_from_pattern(cells, g_rx, problems)
        if cut_note:
            notes.append(cut_note)
    elif unlabelled and group_column is None:
        for c in cells:
            c.group = PurePosixPath(c.files[0]).parent.as_posix()

    found = Counter(c.class_name for c in cells if c.class_name)
    if not unlabelled and set(found) != {normal, abnormal}:
        listing = ", ".join(f"{k!r} ({n} cells)" for k, n in sorted(found.items())) or "none"
        problems.append(f"classes found: {listing}; expected exactly the two classes --normal "
                        f"{normal!r} and --abnormal {abnormal!r}"
                        + (" (remove or relabel the others)" if len(found) > 2 else ""))

    info = _read_cells(cells, folder, cmap, problems)
    if not cmap.per_file and info and all(v[2] == 1 for v in info.values()):
        problems.insert(0, _per_channel_hint(list(info)))

    label_of = {normal: 0, abnormal: 1}
    rows = []
    for c in sorted(cells, key=lambda c: c.files[0]):
        rows.append({
            "cell_id": c.cell_id,
            "path": ";".join((prefix / f).as_posix() for f in c.files),
            "label": "" if unlabelled else label_of.get(c.class_name or "", -1),
            "class_name": "" if unlabelled else c.class_name or "",
            "group": c.group or "",
            "channels": "0,0,0" if cmap.per_file else ",".join(cmap.values),
            "sha256": ";".join(info[f][0] if f in info else "" for f in c.files),
            "shape": ";".join(info[f][1] if f in info else "" for f in c.files),
            **({"stains": stains} if stains is not None else {}),
            **c.extra,
        })
    extra = (["stains"] if stains is not None else []) + sorted({k for c in cells for k in c.extra} - {"stains"})
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS) + extra)
    if unlabelled:
        _raise_problems(problems + [p for p in _check_table(df, labelled=False)], f"image folder {folder}")
        df.attrs["data_root"] = str(root)
        df.attrs["notes"] = notes
        return df

    # the table's checks on the cells of the two classes with a group (the rest are named above)
    ok = df[(df["label"] >= 0) & (df["group"] != "")]
    if len(ok):
        problems += [p for p in _check_table(ok) if "has no images" not in p]
        for lab, name in ((0, normal), (1, abnormal)):
            groups = sorted(ok.loc[ok["label"] == lab, "group"].unique())
            # the study's own rule (learning.folds): at least n_splits groups a class, so that
            # every test fold holds both classes; under 2 x n_splits a note (one field a class per
            # test fold: its metrics rest on one or two fields)
            if 0 < len(groups) < int(n_splits):
                problems.append(
                    f"class {name!r} ({config.CLASS_NAMES[lab]} role) has {len(groups)} group(s) "
                    f"({', '.join(groups)}); expected at least n_splits = {int(n_splits)} "
                    f"(fields / wells / replicates) so that every fold tests on its own groups "
                    f"of both classes")
                if cut_note and cut_note not in problems:
                    problems.append(cut_note)
            elif 0 < len(groups) < 2 * int(n_splits):
                notes.append(f"class {name!r} has {len(groups)} groups for {int(n_splits)} folds: each test fold "
                             f"holds one or two of them, so each fold's metrics rest on very few fields "
                             f"({2 * int(n_splits)} or more groups a class make them steadier)")
    _raise_problems(problems, f"image folder {folder}")
    df["label"] = df["label"].astype(int)
    df.attrs["data_root"] = str(root)
    df.attrs["notes"] = notes
    return df


def write_manifest(df: pd.DataFrame, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the manifest ``df`` to the CSV file ``out`` (atomically; its folder is created).

    force: overwrite an existing ``out``; without it an existing file is kept and
        ``FileExistsError`` naming it is raised.
    Returns the path written.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; not overwritten (pass --force to replace it)")
    return atomic.write_text(out, df.to_csv(index=False))


def shape_line(df: pd.DataFrame) -> str:
    """The images' shape as the study reads it (the manifest's ``shape`` column: H x W x C,
    channel last, a channel-first file's axes moved), for the command line."""
    shapes = Counter(s for v in df["shape"].astype(str) for s in v.split(";") if s)
    if not shapes:
        return "  images: no shape read"
    common, rest = shapes.most_common(1)[0][0], len(shapes) - 1
    dims = common.split("x")
    per_file = df["path"].astype(str).str.contains(";").any()
    what = (common if len(dims) < 2 else f"{dims[0]} x {dims[1]} px, "
            + ("one grey file per channel" if per_file else f"{dims[2] if len(dims) > 2 else 1} channel(s)"))
    how = (f"shape column {common} a file: height x width; --channels names each stain's file token" if per_file
           else f"shape column {common}: height x width x channels, channel last; --channels indexes that last axis")
    return f"  images: {what} as read ({how})" + (f"; {rest} other shape(s)" if rest else "")


def summary(df: pd.DataFrame) -> str:
    """One line per class: cells and groups, and the images' shape (for the command line)."""
    lines = [shape_line(df)]
    for lab in (0, 1):
        s = df[df["label"] == lab]
        name = s["class_name"].iloc[0] if len(s) else "?"
        lines.append(f"  label {lab} ({config.CLASS_NAMES[lab]} role) = {name!r}: {len(s)} cells in "
                     f"{plural(s['group'].nunique(), 'group')}")
    return "\n".join(lines)
