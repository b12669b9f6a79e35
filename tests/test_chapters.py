"""cellstudy.report.chapters (the family chapters' shared code) on small synthetic tables; no model is built."""
import importlib

import numpy as np
import pandas as pd
import pytest

from cellstudy.report import chapters
from cellstudy.learning import metrics

describe = importlib.import_module("cellstudy.learning.models.describe")  # the module (cellstudy.learning.models.describe is
# also the name of a function re-exported by cellstudy.learning.models)


def _tidy():
    """VGG16 (3 folds, both regimes) and ResNet50 (2 folds, short only), AUC and accuracy."""
    rows = []
    vals = {("vgg16", "long", "auc_macro"): [0.9, 0.8, 0.7], ("vgg16", "long", "accuracy"): [0.5, 0.6, 0.85],
            ("vgg16", "short", "auc_macro"): [0.6, 0.65, 0.7], ("vgg16", "short", "accuracy"): [0.5, 0.5, 0.5],
            ("resnet50", "short", "auc_macro"): [0.55, 0.45], ("resnet50", "short", "accuracy"): [0.5, 0.4]}
    for (net, regime, metric), v in vals.items():
        for fold, x in enumerate(v):
            rows.append({"network": net, "family": "DL", "fold": fold, "regime": regime, "metric": metric, "value": x})
            if metric == "accuracy":  # the tables' other metrics, constant
                rows += [{"network": net, "family": "DL", "fold": fold, "regime": regime, "metric": m, "value": 0.5}
                         for m in metrics.TABLE_METRICS if m not in ("auc_macro", "accuracy")]
    return pd.DataFrame(rows)


def test_results_sentence_long_regime_only_and_failures():
    tidy = _tidy()
    txt = chapters.results_sentence(tidy, n_failures=0)
    auc = np.array([0.9, 0.8, 0.7])
    # only VGG16 has a long regime; mean ± sample SD (ddof 1) of its AUC, mean accuracy
    assert txt == (f"In this run, VGG16: AUC-ROC {auc.mean():.3f} ± {auc.std(ddof=1):.3f}, accuracy "
                   f"{np.mean([0.5, 0.6, 0.85]):.3f} (long regime).")
    assert txt == "In this run, VGG16: AUC-ROC 0.800 ± 0.100, accuracy 0.650 (long regime)."
    assert chapters.results_sentence(tidy, 2).endswith(" **2 run(s) failed** (see `failures.csv`).")
    with pytest.raises(ValueError, match="n_failures must be >= 0, got -1"):
        chapters.results_sentence(tidy, -1)


def test_regime_tables_titles_order_and_display_names():
    tidy = _tidy()
    tabs = chapters.regime_tables(tidy, {"epochs_short": 1, "epochs_long": 2})
    assert [t for t, _ in tabs] == ["**short regime** (1 epoch)", "**long regime** (2 epochs)"]
    short = tabs[0][1]
    assert list(short.index) == ["VGG16", "ResNet50"]
    assert short.loc["ResNet50", "auc_macro"] == f"{0.5:.3f} ± {np.std([0.55, 0.45], ddof=1):.3f}"
    assert list(tabs[1][1].index) == ["VGG16"]
    only_short = chapters.regime_tables(tidy[tidy.regime == "short"], {"epochs_short": 1})
    assert len(only_short) == 1
    with pytest.raises(ValueError, match="epochs_long"):
        chapters.regime_tables(tidy, {"epochs_short": 1})


def _summary_rows():
    row = {"network": "resnet50", "image_size": 64, "gradcam_layers": "conv4_block6_out", "gradcam_grid": "4 x 4",
           "last_conv_layers": "conv5_block3_out", "last_conv_grid": "2 x 2", "gradcam_min_size": 4, "token_grid": ""}
    big = {**row, "image_size": 512, "gradcam_layers": "conv5_block3_out", "gradcam_grid": "16 x 16",
           "last_conv_grid": "16 x 16"}
    return pd.DataFrame([row, big])


def test_resolution_notes_lists_the_rows_at_S():
    summary = _summary_rows()
    txt = chapters.resolution_notes(summary, 64, 4, attention="the attention runs over nothing")
    note = describe.resolution_note(summary.iloc[0], "ResNet50")
    assert txt == ("Grad-CAM layers and map sizes at this run's S = 64 (minimum map side 4; computed from the "
                   "built models); the attention runs over nothing:\n\n- " + note)
    assert "`conv4_block6_out` (a 4 x 4 map)" in note and "would have been 2 x 2" in note
    assert chapters.resolution_notes(summary, 64, 4).startswith(
        "Grad-CAM layers and map sizes at this run's S = 64 (minimum map side 4; computed from the built models):")
    with pytest.raises(ValueError, match="no row at S = 32"):
        chapters.resolution_notes(summary, 32, 4)


def test_resolution_note_reads_lists_with_or_without_spaces():
    """describe joins per-channel lists with "; " (a book table cell can wrap there); a summary
    CSV of an older run has ";": both give the same note."""
    rgb = {"network": "rgb", "image_size": 64, "gradcam_layers": "feat_r; feat_g; feat_b",
           "gradcam_grid": "16 x 16; 16 x 16; 16 x 16", "last_conv_layers": "feat_r; feat_g; feat_b",
           "last_conv_grid": "16 x 16; 16 x 16; 16 x 16", "gradcam_min_size": 4, "token_grid": "16 x 16"}
    old = {k: v.replace("; ", ";") if isinstance(v, str) else v for k, v in rgb.items()}
    note = describe.resolution_note(rgb, "RGB")
    assert note == describe.resolution_note(old, "RGB")
    assert "`feat_r`, `feat_g`, `feat_b` (one per isolated channel; 16 x 16 maps each)" in note


def test_family_chapter_writes_and_shows(tmp_path, monkeypatch):
    summary = _summary_rows()
    stages = pd.DataFrame({"stage": ["input"], "layer": ["image"], "output_shape": ["Nx64x64x3"], "params": [0]})
    calls = []

    def fake_card(name, S, big_size, min_size, **params):
        calls.append((name, S, big_size, min_size, params))
        return summary, stages

    monkeypatch.setattr(describe, "network_card", fake_card)
    shown = []
    ch = chapters.FamilyChapter(64, 4, tmp_path, show=shown.append)
    got = ch.card("resnet50", head_units=(8,))
    assert calls == [("resnet50", 64, 512, 4, {"head_units": (8,)})]
    pd.testing.assert_frame_equal(got, summary)
    read = lambda f: pd.read_csv(tmp_path / f, keep_default_na=False)  # noqa: E731
    pd.testing.assert_frame_equal(read("resnet50_summary.csv"), summary, check_dtype=False)
    pd.testing.assert_frame_equal(read("resnet50_stages.csv"), stages, check_dtype=False)
    assert len(shown) == 3 and list(shown[0].columns) == [64, 512]  # transposed, one column per size
    assert shown[2].data == describe.resolution_note(summary.iloc[0], "ResNet50")
    both = ch.summary([got, got])
    assert len(both) == 4 and (tmp_path / "networks_summary.csv").exists()
    with pytest.raises(ValueError, match="cards is empty"):
        ch.summary([])
    with pytest.raises(ValueError, match="is not a folder"):
        chapters.FamilyChapter(64, 4, tmp_path / "missing")


def test_notebook_outputs_write_no_tex_math():
    """The book renders $...$ in markdown *cells* (dollarmath) but not in what code cells display
    (``display(Markdown(...))``): MathJax leaves the output areas alone, so TeX there shows as raw
    dollars and backslashes (09_statistics' n_test / n_train, 10's p_c (1 - p_c) did). Code cells
    write plain text or Unicode instead."""
    import json
    import re
    from pathlib import Path
    tex = re.compile(r"\$[^$\n]*(\\\\[A-Za-z]+|[A-Za-z]_[A-Za-z{])[^$\n]*\$")
    bad = []
    for nb in sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")):
        for i, c in enumerate(json.loads(nb.read_text())["cells"]):
            if c["cell_type"] != "code":
                continue
            for line in "".join(c["source"]).splitlines():
                if tex.search(line):
                    bad.append(f"{nb.name} cell {i}: {line.strip()[:100]}")
    assert not bad, "TeX math in code cells' output strings:\n" + "\n".join(bad)
