"""Run-level summaries of notebook ``08_xai`` over the explained folds of each network:
Gmean-Shape and Gmean-GradCam per class (eq. 14), the correlation image and its ratios (eq.
15-16), faithfulness, channel importance with bootstrap CIs, galleries, the Grad-CAM layer table,
and the files written under ``<run>/08_xai/`` (see :mod:`cellstudy.explain`).
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cellstudy import config
from cellstudy import networks as catalogue
from cellstudy.explain.fold import METHODS, MIN_MAP_SIDE, map_exclusions

if TYPE_CHECKING:
    from cellstudy.explain import XaiRun


# ---------------------------------------------------------------------------------------------
# Run-level summaries
# ---------------------------------------------------------------------------------------------
#: A map of isolated channel c (the RGB family): ``feat_<c>`` or one of its ``feat_<c>_s<stride>``
#: stages.
_CHANNEL_MAP = re.compile(r"^feat_([rgb])(_s\d+)?$")


def channel_of_map(name: str) -> int | None:
    """Channel index (0 = R, 1 = G, 2 = B) of an RGB-family per-channel map name (``feat_r``,
    ``feat_g_s16``, ...), None for any other map."""
    m = _CHANNEL_MAP.match(name)
    return None if m is None else "rgb".index(m.group(1))


def gmean_per_class(images: np.ndarray, maps: dict[str, np.ndarray], labels: np.ndarray,
                    eps: float = 1e-3, radius: int = 2, threshold: float = 0.5,
                    n_classes: int = 2, keep: dict[str, np.ndarray] | None = None) -> dict[int, dict[str, Any]]:
    """Gmean-Shape and Gmean-GradCam of each class, and the correlation image (eq. 14-16).

    images: (n, S, S, 3) stain-space cells (negatives clipped to 0); maps: name -> (n, S, S)
    Grad-CAM maps in [0, 1] (the class's own map per cell; must hold ``combined``); labels (n,);
    keep: name -> (n,) bool, the cells whose map of that name may be averaged
    (:func:`map_exclusions`; default: all). A map's Gmean-GradCam is taken over its kept cells and
    compared with the Gmean-Shape of the same cells; a map without kept cells in a class gives no
    Gmean and no ratio there (the exclusion table says why).
    Returns class -> {``shape_rgb`` (S,S,3) per-channel Gmean-Shape (over the cells kept for
    ``combined``, all the class's cells when none is), ``shape_gray`` (S,S) its channel mean,
    ``cam/<name>`` (S,S) Gmean-GradCam, ``corr`` (S,S) local correlation of the Gmean-Shape and
    cam/combined, ``corr/<channel>`` for the per-channel maps (``feat_r/g/b`` or their
    ``_s<stride>`` stages: that stain's Gmean-Shape vs that channel's Gmean-GradCam), ``n`` cells,
    ``n_used`` (name -> cells averaged), ``ratios``}. Classes without cells are absent.
    """
    from cellstudy.explain import xai

    if "combined" not in maps:
        raise ValueError(f"maps must include 'combined'; got {sorted(maps)}")
    x = np.clip(np.asarray(images, dtype=np.float64), 0, None)
    y = np.asarray(labels)
    keep = {k: np.asarray(v, bool) for k, v in (keep or {}).items()}
    out: dict[int, dict[str, Any]] = {}
    for c in range(n_classes):
        sel = np.flatnonzero(y == c)
        if not len(sel):
            continue
        shapes: dict[bytes, np.ndarray] = {}

        def shape_of(idx):
            key = idx.tobytes()
            if key not in shapes:
                shapes[key] = xai.gmean(x[idx], eps=eps)
            return shapes[key]

        used = {name: sel[keep[name][sel]] if name in keep else sel for name in maps}
        d: dict[str, Any] = {"n": len(sel), "n_used": {k: len(v) for k, v in used.items()}}
        d["shape_rgb"] = shape_of(used["combined"] if len(used["combined"]) else sel)
        d["shape_gray"] = d["shape_rgb"].mean(axis=-1)
        for name, m in maps.items():
            if len(used[name]):
                d[f"cam/{name}"] = xai.gmean(np.asarray(m, dtype=np.float64)[used[name]], eps=eps)
        d["ratios"] = {}
        if "cam/combined" in d:
            d["corr"] = xai.local_correlation(d["shape_gray"], d["cam/combined"], radius=radius)
            d["ratios"][("merged", "combined")] = xai.correlation_ratios(d["corr"], threshold)
        for feat in maps:
            ci = channel_of_map(feat)
            if ci is None or f"cam/{feat}" not in d:
                continue
            ch = config.CHANNELS[ci]
            r = xai.local_correlation(shape_of(used[feat])[..., ci], d[f"cam/{feat}"], radius=radius)
            d[f"corr/{ch}"] = r
            d["ratios"][(ch, feat)] = xai.correlation_ratios(r, threshold)
        out[c] = d
    return out


def summarise(res: XaiRun, radius: int, threshold: float, eps: float, n_gallery: int) -> None:
    from cellstudy.explain.xai import bootstrap_ci

    cls_names = config.CLASS_NAMES
    cell_rows, ratio_rows, faith_rows, ci_rows, cic_rows, gal_rows = [], [], [], [], [], []
    excl_rows, table_rows = [], []
    for name in res.networks:
        st = res.stacked(name)
        fam = catalogue.family(name, "?")
        n = len(st["label"])
        y = st["label"].astype(int)
        p = st["proba"]
        stored = [f.arrays.get("proba_stored") for f in res.folds[name]]
        ps = np.concatenate(stored) if all(s is not None for s in stored) else np.full_like(p, np.nan)
        cells = pd.DataFrame({"network": name, "family": fam, "fold": st["fold"], "cell_id": st["cell_id"],
                              "label": y, "class": [cls_names[i] for i in y],
                              "proba_normal": p[:, 0], "proba_abnormal": p[:, 1],
                              "predicted": p.argmax(1), "proba_stored_abnormal": ps[:, 1]})
        cell_rows.append(cells)
        table_rows += _table_of(res, name)
        # Gmean / correlation: each cell's map of its own (true) class, without the maps that
        # have no spatial resolution and the constant ones (recorded, not silent)
        own = {k[4:]: st[k][np.arange(n), y] for k in st if k.startswith("cam/")}
        hw = res.map_hw(name)
        keep, why = map_exclusions(own, {k: hw.get(k, (MIN_MAP_SIDE, MIN_MAP_SIDE)) for k in own})
        excl_rows += [{"network": name, "family": fam, **r} for r in why]
        gm = gmean_per_class(st["images"], own, y, eps=eps, radius=radius, threshold=threshold, keep=keep)
        res.gmeans[name] = gm
        for c, d in gm.items():
            for (shape, cam), (pos, neg) in d["ratios"].items():
                ratio_rows.append({"network": name, "family": fam, "class": cls_names[c], "shape": shape,
                                   "gradcam": cam, "positive_ratio": pos, "negative_ratio": neg,
                                   "n_cells": d["n_used"][cam], "radius": radius, "threshold": threshold})
        # faithfulness
        fx = res.folds[name]
        fr = fx[0].arrays["faith_fractions"]
        res.curves[name] = {"fractions": fr}
        for curve in ("deletion", "insertion"):
            res.curves[name][f"random/{curve}"] = np.concatenate(
                [f.arrays[f"faith/random/{curve}"] for f in fx]).mean(0)
        for method in METHODS:
            # Grad-CAM's saliency is the combined map: its excluded cells are not scored
            use = keep["combined"] if method == "gradcam" else np.ones(n, bool)
            for curve in ("deletion", "insertion"):
                auc = np.concatenate([f.arrays[f"faith/{method}/{curve}_auc"] for f in fx])[use]
                rnd = np.concatenate([f.arrays[f"faith/random/{curve}_auc"] for f in fx])[use]
                crv = np.concatenate([f.arrays[f"faith/{method}/{curve}"] for f in fx])[use]
                if not len(auc):
                    faith_rows.append({"network": name, "family": fam, "method": method, "curve": curve,
                                       "auc": np.nan, "random_auc": np.nan, "difference": np.nan,
                                       "ci_low": np.nan, "ci_high": np.nan, "n_cells": 0,
                                       "beats_random": False})
                    res.curves[name][f"{method}/{curve}"] = np.full(len(fr), np.nan)
                    continue
                diff = auc - rnd
                m, lo, hi = bootstrap_ci(diff, res.params.n_boot, res.params.seed)
                better = (m < 0) if curve == "deletion" else (m > 0)
                faith_rows.append({"network": name, "family": fam, "method": method, "curve": curve,
                                   "auc": float(auc.mean()), "random_auc": float(rnd.mean()),
                                   "difference": m, "ci_low": lo, "ci_high": hi, "n_cells": len(auc),
                                   "beats_random": bool(better and (hi < 0 if curve == "deletion" else lo > 0))})
                res.curves[name][f"{method}/{curve}"] = crv.mean(0)
        # channel importance (all explained cells of the network, bootstrap over cells)
        drop = np.concatenate([f.arrays["channel_drop"] for f in fx], axis=-1)  # (3, 2, n)
        for ci, ch in enumerate(config.CHANNELS):
            for mi, meth in enumerate(("zero", "mean")):
                m, lo, hi = bootstrap_ci(drop[ci, mi], res.params.n_boot, res.params.seed)
                ci_rows.append({"network": name, "family": fam, "channel": ch, "channel_index": ci,
                                "method": meth, "mean_drop": m, "ci_low": lo, "ci_high": hi, "n_cells": n})
                cic_rows.append(pd.DataFrame({"network": name, "fold": st["fold"], "cell_id": st["cell_id"],
                                              "label": y, "channel": ch, "method": meth, "drop": drop[ci, mi]}))
        # galleries: per true class, most confident (highest p(true)) and most ambiguous (p near 0.5)
        for c in range(len(cls_names)):
            sel = np.flatnonzero(y == c)
            if not len(sel):
                continue
            pt = p[sel, c]
            for kind, order in (("confident", np.argsort(-pt, kind="stable")),
                                ("ambiguous", np.argsort(np.abs(p[sel, 1] - 0.5), kind="stable"))):
                for r, j in enumerate(order[:n_gallery]):
                    i = sel[j]
                    gal_rows.append({"network": name, "class": cls_names[c], "kind": kind, "rank": r + 1,
                                     "row": int(i), "cell_id": st["cell_id"][i], "fold": int(st["fold"][i]),
                                     "proba_normal": p[i, 0], "proba_abnormal": p[i, 1]})
    res.cells = pd.concat(cell_rows, ignore_index=True)
    res.ratios = pd.DataFrame(ratio_rows)
    res.faithfulness = pd.DataFrame(faith_rows)
    res.channel_importance = pd.DataFrame(ci_rows)
    res.channel_importance_cells = pd.concat(cic_rows, ignore_index=True)
    res.gallery = pd.DataFrame(gal_rows)
    res.exclusions = pd.DataFrame(excl_rows, columns=["network", "family", "map", "map_h", "map_w",
                                                      "n_cells", "n_excluded", "reason"])
    res.gradcam_table = pd.DataFrame(table_rows)
    if len(res.exclusions):  # the chapter's not-computed / excluded table
        extra = pd.DataFrame([{"network": r.network, "fold": None, "status": "excluded",
                               "detail": f"Grad-CAM map {r.map} ({r.map_h} x {r.map_w}): {r.reason}"}
                              for r in res.exclusions.itertuples()])
        res.missing = pd.concat([res.missing, extra], ignore_index=True) if len(res.missing) else extra


def _table_of(res: XaiRun, name: str) -> list[dict]:
    """The network's Grad-CAM layer rows as recorded by its folds (the loaded models' layers);
    the registry's stride arithmetic for S when a fold recorded none (a non-registry model)."""
    from cellstudy.learning import models

    got = None
    for f in res.folds[name]:
        rows = json.loads(str(f.arrays.get("gradcam_table", "[]")))
        if got is None:
            got = rows
        elif rows != got:
            raise ValueError(f"{name}: the folds' models have different Grad-CAM layers "
                             f"({got} vs {rows} in fold {f.fold})")
    if not got and name in catalogue.NETWORK_NAMES and res.images is not None:
        got = models.gradcam_table(name, int(res.images.shape[1]), res.params.gradcam_min_size).to_dict("records")
    return got or []


def write_results(res: XaiRun) -> None:
    out = res.out_dir
    for name in ("cells", "ratios", "faithfulness", "channel_importance", "channel_importance_cells",
                 "gallery", "timings", "missing", "exclusions", "gradcam_table"):
        fname = "gradcam_layers" if name == "gradcam_table" else name
        getattr(res, name).to_csv(out / f"{fname}.csv", index=False)
    for net, gm in res.gmeans.items():
        arrs = {}
        for c, d in gm.items():
            for k, v in d.items():
                if isinstance(v, np.ndarray):
                    arrs[f"{config.CLASS_NAMES[c]}/{k}"] = v.astype(np.float32)
        np.savez_compressed(out / f"gmean_{net}.npz", **arrs)
    np.savez_compressed(out / "faithfulness_curves.npz",
                        **{f"{net}/{k}": v for net, d in res.curves.items() for k, v in d.items()})


def channel_claim(table: pd.DataFrame, method: str = "mean") -> pd.DataFrame:
    """Per network: which stain moves the prediction most (``method``), the third stain's drop with
    its CI, and whether the third stain is the most important one with a CI above 0 (the paper's
    claim that the networks rely on vimentin, here the third stain)."""
    rows = []
    t = table[table.method == method]
    for net, g in t.groupby("network", sort=False):
        g = g.set_index("channel")
        top = g["mean_drop"].idxmax()
        third = g.loc["third"]
        rows.append({"network": net, "most_important": top,
                     "third_drop": third.mean_drop, "third_ci_low": third.ci_low, "third_ci_high": third.ci_high,
                     "third_is_top": top == "third", "third_ci_above_0": bool(third.ci_low > 0),
                     "supports_claim": bool(top == "third" and third.ci_low > 0)})
    return pd.DataFrame(rows)


def gradcam_layer_notes(table: pd.DataFrame, size: int | None = None) -> list[str]:
    """One Markdown line per network of a Grad-CAM layer table (``XaiRun.gradcam_table`` or
    ``models.gradcam_table``): the layer(s) used and their map size, and what the last conv map
    would have been, e.g. "**resnet50**: Grad-CAM at `conv4_block6_out` (4 x 4); the last conv
    map `conv5_block3_out` would have been 2 x 2."."""
    def ticks(names):
        return ", ".join(f"`{n}`" for n in dict.fromkeys(names))

    lines = []
    if table is None or not len(table):
        return lines
    for net, g in table.groupby("network", sort=False):
        used = [f"{ticks(sub.layer)} ({h} x {w})" for (h, w), sub in g.groupby(["map_h", "map_w"], sort=False)]
        changed = g[g.layer != g.last_conv_layer]
        last = [f"{ticks(sub.last_conv_layer)} would have been {h} x {w}"
                for (h, w), sub in changed.groupby(["last_conv_h", "last_conv_w"], sort=False)]
        at = f" at S = {size}" if size else ""
        text = f"- **{net}**{at}: Grad-CAM at " + ", ".join(used) + "; "
        text += (f"the last conv map{'s' if len(changed) > 1 else ''} " + ", ".join(last) + "."
                 if last else "the patch-token grid itself." if set(g.layer) == {"vit_grid"}
                 else "this is the last conv map.")
        small = g[(g.map_h < MIN_MAP_SIDE) | (g.map_w < MIN_MAP_SIDE)]
        if len(small):
            text += (f" **No spatial resolution** ({ticks(small.layer)} below {MIN_MAP_SIDE} x "
                     f"{MIN_MAP_SIDE}): excluded from the Gmean, the ratios and the faithfulness.")
        lines.append(text)
    return lines
