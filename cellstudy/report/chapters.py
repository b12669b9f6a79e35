"""The shared code of the family chapters (notebooks 02_dl_family, 03_vit, 04_rgb_family,
05_mhl_family; study.md sections 5-7): each network's card, the family's summary table with the
Grad-CAM layers at the run's S, the results per regime and the sentence under them. The chapters
keep their own prose; this module holds what was four copies of one template.

* :class:`FamilyChapter` - writes and shows the cards and the summary of one chapter
  (``<out_dir>/<network>_summary.csv``, ``<network>_stages.csv``, ``networks_summary.csv``).
* :func:`resolution_notes`, :func:`regime_tables`, :func:`results_sentence` - pure: a summary /
  tidy table in, Markdown text or tables out.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cellstudy import config
from cellstudy.learning import metrics

__all__ = ["FamilyChapter", "resolution_notes", "regime_tables", "results_sentence", "REGIMES"]

#: The regimes of a run, in the order the chapters show them.
REGIMES: tuple[str, ...] = ("short", "long")


def _name(network: str) -> str:
    return metrics.DISPLAY_NAMES.get(network, network)


def _ipython_display(obj: Any) -> None:
    from IPython.display import display  # noqa: PLC0415  (only where a chapter shows something)

    display(obj)


def _markdown(text: str) -> Any:
    from IPython.display import Markdown  # noqa: PLC0415

    return Markdown(text)


class FamilyChapter:
    """The cards and the summary of one family chapter.

    ``S``: the run's image size (px); ``min_size``: the scale's ``gradcam_min_size`` (Grad-CAM's
    smallest map side); ``out_dir``: the chapter's folder in the run (the CSVs go there; it must
    exist); ``big_size``: the second size of each card (the paper's 512 px); ``show``: called with
    each table / Markdown object to show (default IPython's ``display``).
    """

    def __init__(self, S: int, min_size: int | None, out_dir: str | Path, big_size: int = 512,
                 show: Callable[[Any], None] | None = None):
        if int(S) != S or S < 1:
            raise ValueError(f"S must be a positive image size in px, got {S!r}")
        self.S, self.min_size, self.big_size = int(S), min_size, int(big_size)
        self.out_dir = Path(out_dir)
        if not self.out_dir.is_dir():
            raise ValueError(f"out_dir {str(self.out_dir)!r} is not a folder; create it first")
        self.show = show or _ipython_display

    def card(self, name: str, **params) -> pd.DataFrame:
        """The card of network ``name``: :func:`cellstudy.learning.models.describe.network_card` at S and
        at ``big_size`` (``params`` go to ``models.build``), written as ``<name>_summary.csv`` and
        ``<name>_stages.csv``; shows the summary (transposed, one column per size), the stage table
        and the Grad-CAM note at S (:func:`cellstudy.learning.models.describe.resolution_note`). Returns the
        summary (2 rows: S and ``big_size``)."""
        from cellstudy.learning.models.describe import network_card, resolution_note  # noqa: PLC0415  (Keras)

        summary, stages = network_card(name, self.S, big_size=self.big_size, min_size=self.min_size, **params)
        summary.to_csv(self.out_dir / f"{name}_summary.csv", index=False)
        stages.to_csv(self.out_dir / f"{name}_stages.csv", index=False)
        self.show(summary.set_index("image_size").T)
        self.show(stages)
        self.show(_markdown(resolution_note(summary.iloc[0], _name(name))))
        return summary

    def summary(self, cards: Sequence[pd.DataFrame]) -> pd.DataFrame:
        """The family's cards (:meth:`card`'s return values) in one table, written as
        ``networks_summary.csv``; returned whole (the chapter picks the columns it shows)."""
        if not len(cards):
            raise ValueError("cards is empty; expected the summaries returned by card()")
        summary = pd.concat(list(cards), ignore_index=True)
        summary.to_csv(self.out_dir / "networks_summary.csv", index=False)
        return summary

    def resolution_notes(self, summary: pd.DataFrame, attention: str = "") -> Any:
        """:func:`resolution_notes` for this chapter's S and ``min_size``, as Markdown."""
        return _markdown(resolution_notes(summary, self.S, self.min_size, attention))


def resolution_notes(summary: pd.DataFrame, S: int, min_size: int | None, attention: str = "") -> str:
    """Markdown: one bullet per network of ``summary`` at image size ``S``
    (:func:`cellstudy.learning.models.describe.resolution_note`: its Grad-CAM layer(s) and map size, the
    token grid), under a line naming S and the minimum map side ``min_size``; ``attention``, if
    given, is appended to that line after "; " (e.g. "the attention runs over the patch-token
    grid"). ``summary``: :func:`cellstudy.learning.models.describe.describe` rows (column ``image_size``
    in px and the columns ``resolution_note`` reads); rows at other sizes are ignored.
    """
    from cellstudy.learning.models.describe import resolution_note  # noqa: PLC0415  (no Keras needed for the text)

    if "image_size" not in summary.columns:
        raise ValueError(f"summary lacks the column 'image_size'; it has {list(summary.columns)}")
    at_s = summary[summary.image_size == S]
    if at_s.empty:
        raise ValueError(f"summary has no row at S = {S}; its sizes are {sorted(set(summary['image_size']))}")
    lines = [f"- {resolution_note(r, _name(r.network))}" for _, r in at_s.iterrows()]
    head = (f"Grad-CAM layers and map sizes at this run's S = {S} (minimum map side {min_size}; "
            "computed from the built models)" + (f"; {attention}" if attention else ""))
    return head + ":\n\n" + "\n".join(lines)


def regime_tables(tidy: pd.DataFrame, epochs: Mapping[str, Any],
                  regimes: Iterable[str] = REGIMES) -> list[tuple[str, pd.DataFrame]]:
    """The paper's Tables 1 and 2 for a family: per regime of ``regimes`` present in ``tidy``, a
    Markdown title ``"**long regime** (2 epochs)"`` and :func:`cellstudy.learning.metrics.summary_table`
    (mean ± SD over the test folds) with the networks' display names as index.

    ``tidy``: :func:`cellstudy.learning.metrics.tidy_metrics`' table; ``epochs``: the scale (a mapping with
    ``epochs_short`` and ``epochs_long``). Returns ``[(title, table), ...]``; empty when ``tidy``
    has none of ``regimes``.
    """
    present = set(tidy["regime"]) if len(tidy) else set()
    out = []
    for regime in regimes:
        if regime in present:
            key = f"epochs_{regime}"
            if key not in epochs:
                raise ValueError(f"epochs lacks {key!r} (the scale's epoch count of regime {regime!r})")
            t = metrics.summary_table(tidy, regime=regime)
            t.index = [_name(n) for n in t.index]
            out.append((f"**{regime} regime** ({config.regime_epochs_text(epochs, regime)})", t))
    return out


def results_sentence(tidy: pd.DataFrame, n_failures: int = 0) -> str:
    """Markdown: "In this run, VGG16: AUC-ROC 0.912 ± 0.031, accuracy 0.880 (long regime); ...",
    per network of ``tidy`` with long-regime results: the mean ± sample SD over folds of the macro
    AUC-ROC and the mean accuracy (:func:`cellstudy.learning.metrics.summary_numeric`), then "**n run(s)
    failed** (see `failures.csv`)" when ``n_failures`` > 0.
    """
    if n_failures < 0:
        raise ValueError(f"n_failures must be >= 0, got {n_failures}")
    num = metrics.summary_numeric(tidy, ["auc_macro", "accuracy"])
    parts = []
    for net in dict.fromkeys(num["network"]):
        r = num[(num.network == net) & (num.metric == "auc_macro")].set_index("regime")
        a = num[(num.network == net) & (num.metric == "accuracy")].set_index("regime")
        if "long" in r.index:
            parts.append(f"{_name(net)}: AUC-ROC {r.loc['long', 'mean']:.3f} ± "
                         f"{r.loc['long', 'sd']:.3f}, accuracy {a.loc['long', 'mean']:.3f} (long regime)")
    return ("In this run, " + "; ".join(parts) + "." +
            (f" **{n_failures} run(s) failed** (see `failures.csv`)." if n_failures else ""))


def starting_weights(weights: Mapping[str, Mapping[str, str]] | None, networks: Iterable[str]) -> str:
    """What ``networks`` start from in a run whose study config has ``weights`` (``{backbone:
    {"path", "sha256"}}``, ``Run.config_weights()``): one sentence naming, per backbone file, the
    networks that loaded it (file name and the sha256's first 12 digits), and the ones that start
    from random weights. The departures table and the networks chapters print it."""
    from cellstudy import networks as catalogue

    nets = list(networks)
    loaded: dict[str, list[str]] = {}
    for n in nets:
        for b in catalogue.SPECS[n].backbones:
            if b in (weights or {}):
                loaded.setdefault(b, []).append(catalogue.DISPLAY[n])
    if not loaded:
        return "random weights (seeded): the study config names no pretrained weights file (`weights:`)"
    parts = [f"{', '.join(sorted(set(v), key=v.index))} from `{Path(weights[b]['path']).name}` "
             f"({b}, sha256 {weights[b]['sha256'][:12]}...)" for b, v in loaded.items()]
    rest = [catalogue.DISPLAY[n] for n in nets
            if not any(b in (weights or {}) for b in catalogue.SPECS[n].backbones)]
    return "; ".join(parts) + (f"; random weights (seeded): {', '.join(rest)}" if rest else "")
