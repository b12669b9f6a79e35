"""Figures of the XAI chapter (08_xai; paper Figs 9-13 and the checks beyond the paper).

Every function takes arrays / tables (as produced by :mod:`cellstudy.explain`) and returns a
``matplotlib.figure.Figure`` (no pyplot state, nothing shown). Cell images are (H, W, 3) in stain
space, RGB order (red = third stain, green = F-actin, blue = DNA); maps are (H, W) in [0, 1].
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from cellstudy import config, networks
from cellstudy.learning.metrics import DISPLAY_NAMES
from cellstudy.report.figures import _display, _tint

CLASS_NAMES = config.CLASS_NAMES
STAIN_LABELS = {"third": "third stain (R)", "actin": "F-actin (G)", "dna": "DNA (B)"}
METHOD_LABELS = {"gradcam": "Grad-CAM", "integrated_gradients": "Integrated Gradients",
                 "occlusion": "occlusion"}


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The display image of a cell (grey, channel mean) blended with a heat map: (H, W, 3) in [0, 1].

    image: (H, W, 3) stain-space cell; heat: (H, W) in [0, 1]."""
    img = np.asarray(image, dtype=np.float32)
    h = np.asarray(heat, dtype=np.float32)
    if img.ndim != 3 or h.shape != img.shape[:2]:
        raise ValueError(f"image (H, W, 3) and heat (H, W) must match; got {img.shape} and {h.shape}")
    grey = _display(img).mean(-1, keepdims=True).repeat(3, -1)
    col = colormaps[cmap](np.clip(h, 0, 1))[..., :3]
    return np.clip((1 - alpha) * grey + alpha * col, 0, 1)


def is_constant_map(heat: np.ndarray, rtol: float = 1e-6) -> bool:
    """True when the (H, W) heat map has no contrast by ``explain.fold.constant_maps`` (the rule
    that leaves it out of the Gmean and the faithfulness). Its overlay is a uniform tint, shown
    with that said."""
    from cellstudy.explain.fold import constant_maps

    return bool(constant_maps(np.asarray(heat)[None], rtol)[0])


#: What an overlay of a constant map says in its panel title.
CONSTANT_MAP_TITLE = "Grad-CAM: constant map\n(nothing raises the class score)"


def _proba_title(p: np.ndarray, label: int | None = None, cell_id: str | None = None) -> str:
    s = " / ".join(f"p({CLASS_NAMES[c]}) {p[c]:.2f}" for c in range(len(p)))
    head = []
    if label is not None:
        head.append(f"true {CLASS_NAMES[int(label)]}")
    if cell_id is not None:  # ids can be long paths: keep the tail
        cid = str(cell_id).split("/")[-1]
        head.append(cid if len(cid) <= 14 else "..." + cid[-12:])
    return (", ".join(head) + "\n" if head else "") + s


def pick_examples(labels: np.ndarray, proba: np.ndarray, n_per_class: int = 2) -> list[int]:
    """Rows of the most confident correctly classified cells of each class (falling back to the
    highest p(true class) when none is correct): the paper's healthy and abnormal examples."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(proba)
    rows: list[int] = []
    for c in range(p.shape[1]):
        sel = np.flatnonzero(y == c)
        rows += [int(i) for i in sel[np.argsort(-p[sel, c], kind="stable")][:n_per_class]]
    return rows


def heatmap_examples(images: np.ndarray, maps: np.ndarray, proba: np.ndarray, labels: np.ndarray,
                     rows: Sequence[int] | None = None, cell_ids: Sequence[str] | None = None,
                     title: str | None = None, n_per_class: int = 2) -> Figure:
    """Paper Figs 9-11: each cell's input next to its Grad-CAM overlay, titled with both class
    probabilities; healthy (normal) and abnormal examples.

    images (n, H, W, 3); maps (n, H, W) (e.g. each cell's map of its predicted or true class);
    proba (n, K); labels (n,); rows: which cells (default :func:`pick_examples`)."""
    images, maps, proba = np.asarray(images), np.asarray(maps), np.asarray(proba)
    if not (len(images) == len(maps) == len(proba) == len(labels)):
        raise ValueError(f"images, maps, proba, labels must have one entry per cell; got lengths "
                         f"{len(images)}, {len(maps)}, {len(proba)}, {len(labels)}")
    rows = pick_examples(labels, proba, n_per_class) if rows is None else list(rows)
    if not rows:
        raise ValueError("no cells to show (rows is empty)")
    ncol = 2 * len(rows)
    fig = Figure(figsize=(1.9 * ncol, 2.6), layout="constrained")
    axes = fig.subplots(1, ncol, squeeze=False)[0]
    for j, i in enumerate(rows):
        a, b = axes[2 * j], axes[2 * j + 1]
        a.imshow(_display(images[i]))
        b.imshow(overlay(images[i], maps[i]))
        a.set_title(_proba_title(proba[i], labels[i], None if cell_ids is None else cell_ids[i]), fontsize=7)
        b.set_title(CONSTANT_MAP_TITLE if is_constant_map(maps[i]) else "Grad-CAM", fontsize=7)
        _off(a)
        _off(b)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _channel_of(name: str) -> int | None:
    """0 / 1 / 2 for an RGB-family per-channel map (``feat_r``, ``feat_g_s16``, ...), else None."""
    from cellstudy.explain import channel_of_map

    return channel_of_map(name)


def channel_maps(images: np.ndarray, maps: Mapping[str, np.ndarray], proba: np.ndarray,
                 labels: np.ndarray, rows: Sequence[int], title: str | None = None,
                 map_hw: Mapping[str, Sequence[int]] | None = None) -> Figure:
    """Per-channel Grad-CAM (RGB family; or per backbone for DenRes): one row per cell; columns:
    the merged input, then each map (``feat_r``, ``feat_g``, ``feat_b`` or their ``_s<stride>``
    stages, ``combined``...) over its own stain (tinted) or over the merged image. ``map_hw``:
    name -> the feature map's (h, w), added to the column titles (e.g. "feat_r_s16 (4 x 4)")."""
    names = list(maps)
    if not names or not len(rows):
        raise ValueError("channel_maps needs at least one map and one row")
    fig = Figure(figsize=(1.9 * (len(names) + 1), 2.0 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), len(names) + 1, squeeze=False)
    for r, i in enumerate(rows):
        disp = _display(images[i])
        axes[r, 0].imshow(disp)
        axes[r, 0].set_title(_proba_title(proba[i], labels[i]), fontsize=7)
        for j, name in enumerate(names):
            ax = axes[r, j + 1]
            c = _channel_of(name)
            if c is not None:
                base = _tint(disp[..., c], c)
                col = colormaps["jet"](np.clip(maps[name][i], 0, 1))[..., :3]
                ax.imshow(np.clip(0.5 * base + 0.5 * col, 0, 1))
                lab = f"{name} on {config.CHANNELS[c]}"
            else:
                ax.imshow(overlay(images[i], maps[name][i]))
                lab = name
            if map_hw is not None and name in map_hw:
                h, w = (int(v) for v in map_hw[name])
                lab += f"\n({h} x {w} map)"
            if r == 0:
                ax.set_title(lab, fontsize=8)
    for ax in axes.ravel():
        _off(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def gmean_figure(gmeans: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]], cam: str = "combined") -> Figure:
    """Paper Fig. 12: Gmean-Shape (colour, per-channel eq. 14) and Gmean-GradCam per class, one
    row per network. ``gmeans``: network -> class -> {"shape_rgb", "cam/<cam>", ...}; a class
    whose ``cam/<cam>`` is absent (all its maps excluded: no spatial resolution or constant) shows
    "excluded" in place of the heat map."""
    nets = list(gmeans)
    if not nets:
        raise ValueError("gmeans is empty")
    classes = sorted({c for g in gmeans.values() for c in g})
    fig = Figure(figsize=(2.0 * 2 * len(classes) + 0.8, 2.0 * len(nets) + 0.5), layout="constrained")
    axes = fig.subplots(len(nets), 2 * len(classes), squeeze=False)
    im = None
    for r, net in enumerate(nets):
        for j, c in enumerate(classes):
            a, b = axes[r, 2 * j], axes[r, 2 * j + 1]
            d = gmeans[net].get(c)
            if d is not None:
                a.imshow(_display(d["shape_rgb"]))
                if f"cam/{cam}" in d:   # maps in [0, 1], so their geometric mean too: one scale for all
                    im = b.imshow(d[f"cam/{cam}"], cmap="jet", vmin=0.0, vmax=1.0)
                else:  # every map of this class was excluded (see the exclusion table)
                    b.text(0.5, 0.5, "excluded", ha="center", va="center", fontsize=8,
                           transform=b.transAxes)
            if r == 0:
                a.set_title(f"Gmean-Shape\n{CLASS_NAMES[c]}", fontsize=8)
                b.set_title(f"Gmean-GradCam\n{CLASS_NAMES[c]}", fontsize=8)
        axes[r, 0].set_ylabel(networks.display(net), fontsize=9)
    for ax in axes.ravel():
        _off(ax)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6,
                     label="Gmean-GradCam (0: no weight; 1: the maps' maximum)")
    return fig



def correlation_figure(gmeans: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]], key: str = "corr",
                       threshold: float = 0.5) -> Figure:
    """Paper Fig. 13: the correlation image (eq. 15-16) of Gmean-Shape and Gmean-GradCam per
    network (rows) and class (columns), titled with the positive / negative ratios (% of pixels
    with r > threshold / r < -threshold)."""
    nets = list(gmeans)
    if not nets:
        raise ValueError("gmeans is empty")
    classes = sorted({c for g in gmeans.values() for c in g})
    fig = Figure(figsize=(2.4 * len(classes) + 0.8, 2.2 * len(nets) + 0.4), layout="constrained")
    axes = fig.subplots(len(nets), len(classes), squeeze=False)
    im = None
    for r, net in enumerate(nets):
        for j, c in enumerate(classes):
            ax = axes[r, j]
            d = gmeans[net].get(c)
            if d is not None and key in d:
                corr = d[key]
                im = ax.imshow(corr, cmap="coolwarm", vmin=-1, vmax=1)
                pos, neg = float(np.mean(corr > threshold)), float(np.mean(corr < -threshold))
                ax.set_title(f"{networks.display(net)}, {CLASS_NAMES[c]}\n+ {100 * pos:.1f}%  - {100 * neg:.1f}%", fontsize=8)
            _off(ax)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="local Pearson r")
    return fig


def faithfulness_curves(curves: Mapping[str, Mapping[str, np.ndarray]],
                        methods: Sequence[str] = ("gradcam", "integrated_gradients", "occlusion")) -> Figure:
    """Mean deletion and insertion curves per network (rows) for each method and the random
    order: p(true class) against the fraction of pixels deleted / inserted.

    ``curves``: network -> {"fractions", "<method>/deletion", "<method>/insertion",
    "random/deletion", "random/insertion"} (``XaiRun.curves``)."""
    nets = list(curves)
    if not nets:
        raise ValueError("curves is empty")
    fig = Figure(figsize=(7.5, 2.2 * len(nets) + 0.4), layout="constrained")
    axes = fig.subplots(len(nets), 2, squeeze=False)
    for r, net in enumerate(nets):
        d = curves[net]
        fr = d["fractions"]
        for j, curve in enumerate(("deletion", "insertion")):
            ax = axes[r, j]
            for m in methods:
                if f"{m}/{curve}" in d:
                    ax.plot(fr, d[f"{m}/{curve}"], label=METHOD_LABELS.get(m, m))
            ax.plot(fr, d[f"random/{curve}"], "k--", label="random order")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{net}: {curve}", fontsize=9)
            ax.set_xlabel(f"fraction of pixels {'deleted' if curve == 'deletion' else 'inserted'}", fontsize=8)
            ax.set_ylabel("p(true class)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 1].legend(fontsize=7, loc="lower right")
    return fig


def channel_importance_figure(table: pd.DataFrame, methods: Sequence[str] = ("zero", "mean")) -> Figure:
    """Bar chart of the mean drop of p(true class) when each stain is removed (``zero``) or set to
    its training mean (``mean``), one bar per network, with the bootstrap CIs as error bars.

    ``table``: columns network, channel, method, mean_drop, ci_low, ci_high."""
    need = {"network", "channel", "method", "mean_drop", "ci_low", "ci_high"}
    if not need <= set(table.columns):
        raise ValueError(f"table lacks columns {sorted(need - set(table.columns))}")
    methods = [m for m in methods if m in set(table.method)]
    if not methods:
        raise ValueError(f"table has no rows for methods {methods}")
    nets = list(dict.fromkeys(table.network))
    chans = [c for c in config.CHANNELS if c in set(table.channel)]
    fig = Figure(figsize=(4.2 * len(methods), 3.2), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    width = 0.8 / max(1, len(nets))
    for ax, m in zip(axes, methods):
        t = table[table.method == m]
        for k, net in enumerate(nets):
            g = t[t.network == net].set_index("channel").reindex(chans)
            x = np.arange(len(chans)) + (k - (len(nets) - 1) / 2) * width
            err = np.vstack([g.mean_drop - g.ci_low, g.ci_high - g.mean_drop])
            ax.bar(x, g.mean_drop, width, yerr=err, capsize=2, label=DISPLAY_NAMES.get(net, net))
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(chans)), [STAIN_LABELS.get(c, c) for c in chans], fontsize=8)
        ax.set_ylabel("drop of p(true class)", fontsize=8)
        ax.set_title(f"channel set to {'0' if m == 'zero' else 'its training mean'}", fontsize=9)
    axes[-1].legend(fontsize=7, title="network", title_fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the bars, not on them
    return fig


def gallery_figure(images: np.ndarray, maps: np.ndarray, proba: np.ndarray, labels: np.ndarray,
                   gallery: pd.DataFrame, title: str | None = None) -> Figure:
    """Ranked galleries: for each (class, kind) of ``gallery`` (rows ``row`` into the arrays,
    ``kind`` = confident / ambiguous, ``rank``), the cells' Grad-CAM overlays in rank order,
    titled with both probabilities."""
    if gallery.empty:
        raise ValueError("gallery is empty")
    groups = list(gallery.groupby(["class", "kind"], sort=False))
    ncol = int(gallery.groupby(["class", "kind"]).size().max())
    fig = Figure(figsize=(1.9 * ncol + 1.0, 2.1 * len(groups) + 0.4), layout="constrained")
    axes = fig.subplots(len(groups), ncol, squeeze=False)
    for r, ((cls, kind), g) in enumerate(groups):
        for j, (_, row) in enumerate(g.sort_values("rank").iterrows()):
            i = int(row["row"])
            axes[r, j].imshow(overlay(images[i], maps[i]))
            axes[r, j].set_title(_proba_title(proba[i]) + ("\nconstant map" if is_constant_map(maps[i]) else ""),
                                 fontsize=6)
        axes[r, 0].set_ylabel(f"{cls}\n{kind}", fontsize=8)
    for ax in axes.ravel():
        _off(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def attribution_examples(images: np.ndarray, maps: Mapping[str, np.ndarray], proba: np.ndarray,
                         labels: np.ndarray, rows: Sequence[int], title: str | None = None) -> Figure:
    """The same cells under each attribution method (Grad-CAM, IG, occlusion): maps are scaled
    per cell to [0, 1] on their positive part for display."""
    names = list(maps)
    fig = Figure(figsize=(1.9 * (len(names) + 1), 2.0 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), len(names) + 1, squeeze=False)
    for r, i in enumerate(rows):
        axes[r, 0].imshow(_display(images[i]))
        axes[r, 0].set_title(_proba_title(proba[i], labels[i]), fontsize=7)
        for j, name in enumerate(names):
            m = np.clip(np.asarray(maps[name][i], dtype=np.float64), 0, None)
            m = m / m.max() if m.max() > 0 else m
            axes[r, j + 1].imshow(overlay(images[i], m))
            if r == 0:
                axes[r, j + 1].set_title(METHOD_LABELS.get(name, name), fontsize=8)
    for ax in axes.ravel():
        _off(ax)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
