"""Figures of cells: example montages (paper Fig. 1B), filter stages, folds, augmentation.

Every function takes arrays and returns a matplotlib Figure (never shows it). Images are
(H, W, 3) in RGB order (red = third stain, green = F-actin, blue = DNA).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cellstudy import config

STAIN_LABELS = {"third": "third stain (red)", "actin": "F-actin (green)", "dna": "DNA (blue)"}


def _display(img: np.ndarray) -> np.ndarray:
    """Stretch each channel of an (H, W, 3) image to [0, 1] for display (1st-99.5th percentile)."""
    a = np.asarray(img, dtype=np.float32)
    lo = np.percentile(a, 1, axis=(0, 1), keepdims=True)
    hi = np.percentile(a, 99.5, axis=(0, 1), keepdims=True)
    return np.clip((a - lo) / np.maximum(hi - lo, 1e-8), 0, 1)


def _tint(channel: np.ndarray, index: int) -> np.ndarray:
    """A 2-D channel shown in its own colour: (H, W) -> (H, W, 3)."""
    out = np.zeros(channel.shape + (3,), np.float32)
    out[..., index] = channel
    return out


def cell_montage(images: np.ndarray, labels: np.ndarray, n_per_class: int = 3, seed: int = 0,
                 titles: Sequence[str] | None = None, class_names: Sequence[str] = config.CLASS_NAMES,
                 stain_names: Sequence[str] | None = None) -> Figure:
    """Example cells of each class: one row per cell, columns = the three stains in their colours
    and the merged RGB image (as the paper's Fig. 1B).

    images: (N, H, W, 3); labels: (N,) int. Cells are drawn at random with ``seed``.
    ``stain_names``: the R, G, B stains by name (a manifest's ``stains``, ``data.stains_of``),
    shown with their colour; without them the columns read "third stain (red)", "F-actin
    (green)", "DNA (blue)"."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(len(class_names)):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            picks += [(c, i) for i in rng.choice(idx, size=min(n_per_class, len(idx)), replace=False)]
    fig = Figure(figsize=(8, 2.1 * len(picks)), layout="constrained")
    axes = fig.subplots(len(picks), 4, squeeze=False)
    for r, (c, i) in enumerate(picks):
        disp = _display(images[i])
        for k, stain in enumerate(config.CHANNELS):
            axes[r, k].imshow(_tint(disp[..., k], k))
            if r == 0:
                axes[r, k].set_title(STAIN_LABELS[stain] if stain_names is None else
                                     f"{stain_names[k]} ({('red', 'green', 'blue')[k]})", fontsize=9)
        axes[r, 3].imshow(disp)
        if r == 0:
            axes[r, 3].set_title("merged", fontsize=9)
        label = class_names[c] + (f"\n{titles[i]}" if titles is not None else "")
        axes[r, 0].set_ylabel(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def cell_gallery(images: np.ndarray, titles: Sequence[str], title: str | None = None, ncols: int = 4,
                 stretch: bool = True) -> Figure:
    """A grid of cells (merged RGB, each channel stretched for display unless ``stretch`` is False,
    e.g. for Grad-CAM overlays already in [0, 1]), one title each.

    images: (N, H, W, 3), N >= 1; titles: N strings (e.g. the cell id and its probability)."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0 or len(titles) != len(images):
        raise ValueError(f"cell_gallery: expected N >= 1 images (N, H, W, 3) and N titles, got {images.shape} "
                         f"and {len(titles)} titles")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    if title:   # wrapped to the figure's width (about 11 characters an inch at 10 pt), not cut at its edges
        import textwrap
        title = textwrap.fill(str(title), width=int(11 * 2.0 * ncols))
    n_title_lines = title.count("\n") + 1 if title else 0
    fig = Figure(figsize=(2.0 * ncols, 2.3 * nrows + 0.3 * n_title_lines), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < len(images):
            ax.imshow(_display(images[i]) if stretch else np.clip(images[i], 0, 1))
            ax.set_title(str(titles[i]), fontsize=7)
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def stage_figure(stages: Mapping[str, np.ndarray], title: str | None = None) -> Figure:
    """Each preprocessing stage of one cell: columns = stages, rows = the three stains (grey,
    one shared display range per stain so changes in contrast are visible)."""
    names = list(stages)
    fig = Figure(figsize=(2.0 * len(names), 6.3), layout="constrained")
    axes = fig.subplots(3, len(names), squeeze=False)
    for k, stain in enumerate(config.CHANNELS):
        ref = np.asarray(stages[names[0]])[..., k]
        lo, hi = np.percentile(ref, 1), np.percentile(ref, 99.5)
        for j, name in enumerate(names):
            axes[k, j].imshow(np.asarray(stages[name])[..., k], cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
            axes[k, j].set_xticks([])
            axes[k, j].set_yticks([])
            if k == 0:
                shp = np.asarray(stages[name]).shape
                axes[k, j].set_title(f"{name}\n{shp[0]}x{shp[1]}", fontsize=9)
        axes[k, 0].set_ylabel(STAIN_LABELS[stain], fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def fold_figure(summary: pd.DataFrame) -> Figure:
    """Cells per class in each test fold (stacked bars) with the number of fields on top.

    summary: ``folds.fold_summary`` output (rows per fold plus "all")."""
    if "fold" not in summary.columns:
        summary = summary.reset_index()
    s = summary[summary["fold"].astype(str) != "all"]
    cols = [c for c in s.columns if c.startswith("n_") and c not in ("n_cells", "n_groups")]
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(s))
    for c, colour in zip(cols, ["#4c72b0", "#dd8452", "#55a868"]):
        ax.bar(s["fold"].astype(str), s[c].to_numpy(), bottom=bottom, label=c[2:], color=colour)
        bottom += s[c].to_numpy()
    for x, (b, g) in enumerate(zip(bottom, s["n_groups"])):
        ax.text(x, b + 0.5, f"{g} fields", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("test fold")
    ax.set_ylabel("cells")
    ax.set_ylim(0, bottom.max() * 1.18)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return fig


def pairs_figure(originals: np.ndarray, copies: np.ndarray, n: int = 4, titles: Sequence[str] | None = None) -> Figure:
    """Originals (top row) above their augmented copies (bottom row), merged RGB."""
    n = min(n, len(originals))
    fig = Figure(figsize=(2.0 * n, 4.3), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(_display(originals[j]))
        axes[1, j].imshow(_display(copies[j]))
        if titles is not None:
            axes[1, j].set_title(titles[j], fontsize=8)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("augmented copy")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def covariance_figure(before: np.ndarray, after: np.ndarray) -> Figure:
    """The 3 x 3 channel covariance of the training set before and after ZCA whitening."""
    fig = Figure(figsize=(7, 3.0), layout="constrained")
    axes = fig.subplots(1, 2)
    labels = ["R", "G", "B"]
    for ax, m, t in zip(axes, (before, after), ("before ZCA", "after ZCA (training folds)")):
        im = ax.imshow(m, cmap="coolwarm", vmin=-np.abs(m).max(), vmax=np.abs(m).max())
        for i in range(3):
            for j in range(3):
                ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(3), labels)
        ax.set_yticks(range(3), labels)
        ax.set_title(t, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def channel_covariance(x: np.ndarray) -> np.ndarray:
    """The 3 x 3 covariance of the channels over all pixels of (N, H, W, 3) images."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    return np.cov(flat, rowvar=False)


def show(fig: Figure, path=None, dpi: int = 120, caption: str | None = None):
    """Save ``fig`` as PNG at ``path`` (when given) and display it in a notebook as an image,
    followed by its caption (``caption``: what the figure shows and the paper figure it
    corresponds to, shown as "**Figure.** ..." under the image; the book keeps it).

    Works for figures made with ``matplotlib.figure.Figure`` (no pyplot state), whatever the
    notebook's matplotlib backend. Returns the PNG bytes."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    png = buf.getvalue()
    if path is not None:
        from pathlib import Path
        Path(path).write_bytes(png)
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
        if get_ipython() is not None:
            display(Image(data=png))
            if caption:
                from IPython.display import Markdown
                display(Markdown(caption_markdown(caption)))
    except ImportError:  # pragma: no cover - IPython is a dependency
        pass
    return png


def caption_markdown(caption: str) -> str:
    """The Markdown under a figure: ``**Figure.** <caption>`` (ValueError for an empty caption)."""
    text = " ".join(str(caption).split())
    if not text:
        raise ValueError("caption is empty; say what the figure shows and which paper figure it corresponds to")
    return f"**Figure.** {text}"
