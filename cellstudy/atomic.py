"""Atomic file writes, the package's one writer: a file appears under its name whole or not at
all (a crash, a full disk or a killed process leaves the previous version, if any, intact).

Each write goes to a unique temporary file in the target's folder (``tempfile.mkstemp``, so
processes writing the same name at once never share one), is flushed to disk, then renamed over
the target (``os.replace``, atomic on one file system).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


#: Files are created with the mode an ordinary ``open`` gives (0o666 less the process's umask):
#: ``mkstemp`` alone makes them readable by their owner only.
FILE_MODE = 0o666 & ~_umask()


class OutputError(ValueError):
    """A result file could not be written (disk full, folder not writable); names the file."""


def write(path: str | os.PathLike, data: bytes | Callable[[Any], None]) -> Path:
    """Write ``data`` (bytes, or a function given the open binary file) to ``path`` atomically;
    the folder is created. ``OSError`` -> :class:`OutputError` naming the file. Returns the path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"could not write {path}: {e.strerror or e} (disk full or folder not "
                          "writable?); the previous version, if any, is kept") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write(path, text.encode("utf-8"))


def json_default(o: Any) -> Any:
    """JSON for NumPy scalars and arrays and paths; TypeError for anything else."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_json(path: str | os.PathLike, obj: Any, default: Callable[[Any], Any] | None = json_default,
               indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``default`` serialises what json cannot)."""
    return write_text(path, json.dumps(obj, indent=indent, default=default))


def create_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> bool:
    """Write ``obj`` as JSON to ``path`` only if no file of that name exists: whole (a temporary
    file, hard-linked to the name, which fails when the name exists, so of two processes creating
    it at once exactly one succeeds). True when this call created it, False when it existed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(obj)}.tmp")
    write_text(tmp, json.dumps(obj, indent=indent, default=json_default))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise OutputError(f"could not write {path}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: str | os.PathLike, arr: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically (no pickles)."""
    return write(path, lambda f: np.save(f, np.asarray(arr), allow_pickle=False))
