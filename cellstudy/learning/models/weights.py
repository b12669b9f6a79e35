"""Pretrained backbone weights from a local file (nothing is ever downloaded).

``load_backbone_weights`` builds the backbone standalone (3-channel input, ``weights=None``), loads
the file into it with Keras (``.h5``: the Keras 2 / ImageNet "notop" layout, matched by layer
order; ``.weights.h5``: the Keras 3 layout, matched by layer name), then copies every layer's
weights by name into the network. For 1-channel inputs (the RGB family's isolated channels) the
first convolution's kernel ``(k, k, 3, F)`` is summed over its input channels to ``(k, k, 1, F)``:
a grey image ``g`` then gives the same response as the RGB image ``(g, g, g)`` did.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from cellstudy.learning.models import backbones as bbs


from cellstudy.data import sha256_file  # noqa: E402  (one implementation for the package)


def resolve_weights_path(path: str | os.PathLike, sha256: str | None = None) -> Path:
    """Check a local weights path: it must end in ``.h5`` (``.weights.h5`` included) and exist;
    if ``sha256`` is given the file's checksum must match. Returns the resolved Path.

    Raises FileNotFoundError naming the path, ValueError for a wrong suffix or checksum.
    """
    if isinstance(path, str) and path.lower() in ("imagenet",):
        raise ValueError(
            "weights='imagenet' would download; pass a local path to the ImageNet weights file "
            "(e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5)")
    p = Path(path).expanduser()
    if not str(p).endswith(".h5"):
        raise ValueError(f"weights file {p}: expected a Keras weights file ending in .h5 or .weights.h5")
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist (weights are never downloaded; "
                                "pass the path of a local copy)")
    if sha256 is not None:
        got = sha256_file(p)
        if got.lower() != str(sha256).lower():
            raise ValueError(f"weights file {p}: sha256 {got} does not match the expected {sha256}")
    return p.resolve()


def fitted_backbone(backbone: str, path, hw: tuple[int, int], cnn_filters=bbs.CNN3_FILTERS):
    """The bare backbone (RGB input at ``hw``) with the weights of the local file ``path`` loaded;
    ValueError naming the file when it does not fit (Keras raises, or warns that it skipped or
    mismatched parts and kept fresh weights there)."""
    p = Path(path)
    ref = bbs.standalone(backbone, (hw[0], hw[1], 3), cnn_filters=cnn_filters)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref.load_weights(str(p))
    except Exception as e:  # Keras raises several types for a structural mismatch
        raise ValueError(f"weights file {p} does not fit backbone {backbone!r}: {e}") from e
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()
               or "mismatch" in str(w.message).lower()]
    if skipped:  # Keras 3 warns (and keeps fresh weights) for parts it cannot match
        raise ValueError(f"weights file {p} does not fit backbone {backbone!r}: {skipped[0]}")
    return ref


def load_backbone_weights(model, backbone: str, path, hw: tuple[int, int], prefix: str = "",
                          sha256: str | None = None, cnn_filters=bbs.CNN3_FILTERS) -> list[str]:
    """Load backbone weights from the local file ``path`` into ``model``'s backbone layers.

    ``backbone``: one of ``backbones.BACKBONES``; ``hw``: the network's input (H, W);
    ``prefix``: the backbone's layer-name prefix inside ``model`` (DenRes: "res_" / "den_").
    Returns the names of the layers that received weights. Kernels whose input-channel axis is 3
    in the file and 1 in the model are summed over that axis (RGB family).
    """
    p = resolve_weights_path(path, sha256)
    ref = fitted_backbone(backbone, p, hw, cnn_filters)
    done = []
    for rl in ref.layers:
        src = rl.get_weights()
        if not src:
            continue
        try:
            tl = model.get_layer(prefix + rl.name)
        except ValueError as e:
            raise ValueError(f"network {model.name!r} has no layer {prefix + rl.name!r} for the "
                             f"weights of {backbone} layer {rl.name!r} from {p}") from e
        dst = tl.get_weights()
        new = []
        for s, d in zip(src, dst):
            if s.shape != d.shape:
                if s.ndim == 4 and s.shape[2] == 3 and d.shape[2] == 1 and \
                        s.shape[:2] + s.shape[3:] == d.shape[:2] + d.shape[3:]:
                    s = s.sum(axis=2, keepdims=True)
                else:
                    raise ValueError(f"weights file {p}: layer {rl.name!r} has shape {s.shape}, "
                                     f"network layer {tl.name!r} expects {d.shape}")
            new.append(np.asarray(s, dtype=d.dtype))
        tl.set_weights(new)
        done.append(tl.name)
    return done


# ---------------------------------------------------------------------------------------------
# Keras's published ImageNet "notop" files (for machines that are online): cellstudy weights fetch
# ---------------------------------------------------------------------------------------------
#: Where Keras publishes its application weights (``keras.applications``' own URLs).
KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
#: backbone -> (path under the base URL, the md5 Keras publishes for the file).
IMAGENET_NOTOP: dict[str, tuple[str, str]] = {
    "vgg16": ("vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
    "resnet50": ("resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "4d473c1dd8becc155b73f8504c6f6626"),
    "densenet121": ("densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "30ee3e1110167f948a6b9946edeeb738"),
}


class FetchError(RuntimeError):
    """A weights file could not be fetched or did not match its published hash."""


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_imagenet(names, cache: str | os.PathLike, base_url: str = KERAS_WEIGHTS_URL,
                   timeout: float = 60.0, echo=print) -> dict[str, dict[str, str]]:
    """Download Keras's ImageNet "notop" weights of the backbones ``names`` (vgg16, resnet50,
    densenet121) into the folder ``cache``, each checked against the md5 Keras publishes (a file
    already there with that md5 is kept, not downloaded again); returns the study config's
    ``weights`` block ``{backbone: {"path", "sha256"}}``. FetchError naming the file, its URL and
    where to place it when the machine is offline, and when a download does not match its hash
    (the download is then deleted). Only this command downloads; nothing in the study does."""
    import tempfile
    import urllib.error
    import urllib.request

    from cellstudy.data import sha256_file

    bad = [n for n in names if n not in IMAGENET_NOTOP]
    if bad or not names:
        raise ValueError(f"no published ImageNet weights for {bad or 'nothing'}; expected some of {sorted(IMAGENET_NOTOP)} "
                         "(the RGB / MHL 3-layer CNN has none: pre-train it on your cells)")
    cache = Path(cache).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        rel, md5 = IMAGENET_NOTOP[name]
        url = base_url.rstrip("/") + "/" + rel
        dest = cache / Path(rel).name
        if dest.is_file() and _md5(dest) == md5:
            echo(f"{name}: {dest} (already there, md5 matches)")
        else:
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{dest.name}.")
            os.close(fd)
            try:
                try:
                    with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as fh:
                        while block := r.read(1 << 20):
                            fh.write(block)
                except (urllib.error.URLError, OSError) as e:
                    raise FetchError(
                        f"{name}: could not download {url} ({e}). On a machine without internet, fetch that "
                        f"file elsewhere (Keras publishes its md5 {md5}), place it as {dest} and run this "
                        "command again: it checks the file and prints the weights block") from None
                got = _md5(Path(tmp))
                if got != md5:
                    raise FetchError(f"{name}: {url} gave a file with md5 {got}, not the published {md5}; "
                                     "not kept")
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            echo(f"{name}: {dest} (downloaded, md5 matches)")
        out[name] = {"path": str(dest), "sha256": sha256_file(dest)}
    return out


def weights_block(weights: dict[str, dict[str, str]]) -> str:
    """The ``weights:`` block of a study config for ``weights`` (YAML, to paste)."""
    lines = ["weights:"]
    for b, e in weights.items():
        lines.append(f"  {b}: {{path: {e['path']}, sha256: {e['sha256']}}}")
    return "\n".join(lines)
