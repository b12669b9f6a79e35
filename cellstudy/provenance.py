"""Provenance: what ran, on what, with which versions and data.

Every run folder gets ``provenance.json`` (config, scale parameters, package versions, data
checksums, git commit, hardware) so a result can be traced back to its inputs.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from cellstudy import ONEDNN_ENV, atomic, config, threads

#: The packages whose versions are shown on the provenance page (all installed ones are stored).
KEY_PACKAGES = (
    "cellstudy", "tensorflow-cpu", "tensorflow", "keras", "numpy", "scipy", "pandas",
    "scikit-learn", "scikit-image", "SimpleITK", "opencv-python-headless", "tifffile",
    "statsmodels", "seaborn", "matplotlib", "papermill", "jupyter-book",
)


def package_versions(all_packages: bool = False) -> dict[str, str]:
    """Installed versions of the key packages (or of every installed distribution)."""
    if all_packages:
        out = {}
        for d in metadata.distributions():
            name = d.metadata["Name"]
            if name:
                out[name] = d.version
        return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))
    out = {}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_state(repo: Path = config.REPO_ROOT) -> dict[str, Any]:
    """The repository's commit and whether the work tree has uncommitted changes."""
    def _git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def hardware() -> dict[str, Any]:
    """CPU count, memory and the machine; GPUs are added by the training code when present."""
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    mem = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "memory_gib": mem,
        "hostname": platform.node(),
        # cellstudy sets it to 1 unless the user did (TensorFlow's oneDNN CPU kernels)
        "tf_enable_onednn_opts": os.environ.get(ONEDNN_ENV),
        # TensorFlow's thread pools (None: its default, all cores); see cellstudy.threads
        "tf_threads": threads.current(),
    }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (``cellstudy.data.sha256_file``)."""
    from cellstudy.data import sha256_file as _sha

    return _sha(path)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    atomic.write_json(path, obj, default=str)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
