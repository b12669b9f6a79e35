import json
import re

import numpy as np
import pandas as pd
import pytest

from cellstudy import rundir
from cellstudy.report import findings, stats


def _tidy(values: dict[str, list[float]]) -> pd.DataFrame:
    fam = {"rf": "Classical", "logreg": "Classical", "mhl": "MHL", "vgg16": "DL"}
    rows = [{"network": n, "family": fam[n], "fold": k, "regime": "long", "metric": "auc_macro", "value": v}
            for n, vs in values.items() for k, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_verdicts_chance_baseline_and_ci():
    tidy = _tidy({"vgg16": [0.45, 0.55, 0.5, 0.52, 0.48], "mhl": [0.9, 0.94, 0.88, 0.93, 0.91],
                  "rf": [0.99, 0.98, 1.0, 0.97, 0.99], "logreg": [0.95, 0.96, 0.94, 0.97, 0.93]})
    v = findings.network_verdicts(tidy, n_train=176, n_test=44).set_index("network")
    assert list(v.index) == ["vgg16", "mhl", "rf", "logreg"]        # book order
    assert v.loc["rf", "baseline"] == "rf"                           # the best classical model
    assert not v.loc["vgg16", "beats_chance"] and v.loc["mhl", "beats_chance"]
    # the CI is the Nadeau-Bengio corrected one, centred on the mean
    vals = np.array([0.9, 0.94, 0.88, 0.93, 0.91])
    half = v.loc["mhl", "mean"] - v.loc["mhl", "ci_low"]
    from scipy import stats as sps
    expect = sps.t.ppf(0.975, 4) * np.sqrt((1 / 5 + 44 / 176) * vals.var(ddof=1))
    assert half == pytest.approx(expect)
    # against the baseline: the same numbers as the statistics module's paired test
    tt = stats.corrected_resampled_ttest(vals, [0.99, 0.98, 1.0, 0.97, 0.99], 176, 44)
    assert v.loc["mhl", "diff"] == pytest.approx(tt["mean_diff"]) and v.loc["mhl", "p"] == pytest.approx(tt["p"])
    assert v.loc["vgg16", "versus"] == "worse than"
    assert v.loc["rf", "versus"] == "" and np.isnan(v.loc["rf", "p_adj"])
    text = findings.verdict_sentences(v.reset_index())
    assert any("VGG16" in s and "**not** above chance" in s for s in text)
    assert any("Random forest" in s and "best classical baseline" in s for s in text)
    c = findings.summary_counts(v.reset_index())
    assert c["networks"] == 2 and c["above_chance"] == 1 and c["worse"] >= 1
    best = findings.best_per_family(v.reset_index()).set_index("family")
    assert best.loc["Classical", "network"] == "rf"


def test_verdicts_without_baseline_and_errors():
    tidy = _tidy({"mhl": [0.9, 0.94, 0.88, 0.93, 0.91]})
    v = findings.network_verdicts(tidy, 176, 44)
    assert v["baseline"].isna().all() and (v["versus"] == "").all()
    with pytest.raises(ValueError, match="no 'f1_macro'"):
        findings.network_verdicts(tidy, 176, 44, metric="f1_macro")
    with pytest.raises(ValueError, match="baseline 'rf'"):
        findings.network_verdicts(tidy, 176, 44, baseline="rf")


def test_one_class_folds_and_fold_sizes(tmp_path):
    pred = pd.DataFrame({"network": ["a"] * 4 + ["b"] * 4, "fold": [0, 0, 1, 1] * 2,
                         "regime": "long", "y_pred": [1, 1, 0, 1, 0, 0, 0, 0]})
    bad = findings.one_class_folds(pred)
    assert bad.to_dict("records") == [{"network": "a", "fold": 0, "predicted": 1},
                                      {"network": "b", "fold": 0, "predicted": 0},
                                      {"network": "b", "fold": 1, "predicted": 0}]
    from cellstudy.learning import folds
    labels = np.array([0, 1] * 10)
    groups = np.array([f"g{i}" for i in range(20)])
    ids = np.array([f"c{i}" for i in range(20)])
    f = tmp_path / "folds.csv"
    folds.load_or_make_folds(f, ids, labels, groups, n_splits=5, seed=0)
    n_train, n_test, k = findings.fold_sizes(f)
    assert (n_train, n_test, k) == (16.0, 4.0, 5)


def _fake_run(tmp_path):
    """A run folder with the CSVs the findings page reads (values chosen by hand)."""
    from cellstudy.learning import folds
    run = tmp_path / "run"
    for d in ("07_results", "09_statistics", "08_xai", "06_classical_baseline", "folds"):
        (run / d).mkdir(parents=True)
    (run / "study.yaml").write_text("cohort: toy\nscale: cpu\n")
    labels = np.array([0, 1] * 10)
    folds.load_or_make_folds(run / "folds" / "toy.csv", np.array([f"c{i}" for i in range(20)]), labels,
                             np.array([f"g{i}" for i in range(20)]), n_splits=5, seed=0)
    tidy = _tidy({"vgg16": [0.45, 0.55, 0.5, 0.52, 0.48], "mhl": [0.9, 0.94, 0.88, 0.93, 0.91],
                  "rf": [0.99, 0.98, 1.0, 0.97, 0.99], "logreg": [0.95, 0.96, 0.94, 0.97, 0.93]})
    findings.network_verdicts(tidy, 176, 44).to_csv(run / "07_results" / "verdicts_long.csv", index=False)
    pd.DataFrame({"network": ["mhl", "rf"], "family": ["MHL", "Classical"], "n_cells": [560, 560], "n_fields": [14, 14],
                  "auc": [0.912, 0.977], "auc_ci_low": [0.85, 0.95], "auc_ci_high": [0.96, 0.99]}).to_csv(
        run / "07_results" / "external_metrics.csv", index=False)
    pd.DataFrame({"network": ["vgg16", "mhl"], "converged": [False, True], "epochs": [10, 10]}).to_csv(
        run / "07_results" / "convergence.csv", index=False)
    pd.DataFrame({"regime": ["long", "long"], "metric": ["auc_macro", "f1_macro"], "family_a": ["DL", "DL"],
                  "family_b": ["MHL", "Classical"], "p": [0.001, 0.2], "significant": [True, False]}).to_csv(
        run / "09_statistics" / "welch_tests.csv", index=False)
    pd.DataFrame({"network": ["mhl"] * 3, "channel": ["third", "actin", "dna"], "method": ["mean"] * 3,
                  "mean_drop": [0.01, 0.2, 0.05]}).to_csv(run / "08_xai" / "channel_importance.csv", index=False)
    pd.DataFrame({"network": ["mhl", "mhl"], "method": ["gradcam", "gradcam"], "curve": ["deletion", "insertion"],
                  "beats_random": [True, True]}).to_csv(run / "08_xai" / "faithfulness.csv", index=False)
    pd.DataFrame({"classifier": ["rf", "rf"], "group": ["actin", "dna"], "auc_drop_mean": [0.14, 0.01]}).to_csv(
        run / "06_classical_baseline" / "stain_importance.csv", index=False)
    return run


def test_findings_page_numbers_equal_the_csvs(tmp_path):
    run = _fake_run(tmp_path)
    page = findings.findings_page(run)
    md, num = page["markdown"], page["numbers"]
    v = pd.read_csv(run / "07_results" / "verdicts_long.csv").set_index("network")
    assert num["best_MHL"][0] == round(v.loc["mhl", "mean"], 3) and f"**{v.loc['mhl', 'mean']:.3f}**" in md
    assert num["best_Classical"][0] == round(v.loc["rf", "mean"], 3)
    assert num["cells_normal"][0] == 10 and num["cells_abnormal"][0] == 10 and num["fields"][0] == 20
    assert num["external_best_network"][0] == 0.912 and "**0.912**" in md and "**0.977**" in md
    assert num["converged"][0] == 1 and "(not: VGG16; their numbers are those of a training stopped after 10 epochs" in md
    assert num["table3_significant"][0] == 1 and "DL vs MHL: AUC" in md
    assert num["networks_top_stain"][0] == "actin" and num["classical_top_stain_rf"][0] == "actin"
    assert num["faithful_gradcam"][0] == 1
    assert "No network beats the classical baseline" in md
    # the learning target: MHL (0.912) meets it, DL (VGG16 0.5) does not; the classical family is not counted
    assert num["families_at_target"][0] == 1
    # a shortfall whose CI is below the target is bold; the default scale's selection caveat is there
    assert "met by 1 of 2 families (MHL)" in md and "not met by **DL (best: VGG16, 0.500)**" in md
    # MHL's interval (0.865-0.959) holds 0.90, VGG16's does not: the page says the target cannot tell MHL from it
    assert v.loc["mhl", "ci_low"] < 0.9 < v.loc["mhl", "ci_high"] and v.loc["vgg16", "ci_high"] < 0.9
    assert num["families_ci_contains_target"][0] == 1
    assert ("the 95% CIs of 1 of 2 families' best networks contain 0.90 (MHL), so the folds cannot tell whether "
            "that network is above or below 0.90") in md
    assert "not shown to be better" not in md        # a CI against a line says nothing about two families
    # the networks short of the plateau are named in the book's order, not the CSV's
    pd.DataFrame({"network": ["mhl", "vgg16"], "converged": [False, False], "epochs": [10, 10]}).to_csv(
        run / "07_results" / "convergence.csv", index=False)
    assert "(not: VGG16, MHL;" in findings.findings_page(run)["markdown"]
    pd.DataFrame({"network": ["vgg16", "mhl"], "converged": [False, True], "epochs": [10, 10]}).to_csv(
        run / "07_results" / "convergence.csv", index=False)
    for chapter in ("07_results.ipynb", "09_statistics.ipynb", "08_xai.ipynb", "06_classical_baseline.ipynb"):
        assert f"]({chapter})" in md                          # every paragraph links its chapter
    book = tmp_path / "book"
    book.mkdir()
    p = findings.write_findings_page(run, book)
    assert p.read_text() == md and (book / "findings_auc.png").stat().st_size > 1000


def test_findings_point_to_the_default_scale_page_when_a_target_is_missed(tmp_path):
    run = _fake_run(tmp_path)                 # cpu scale; DL misses 0.90, VGG16 not on its plateau
    # the pointer to what more epochs and other settings gave (the link itself is in the
    # selection caveat of every default-scale run)
    link = ("What more epochs, another schedule, other seeds and other settings gave at this scale, measured "
            "while it was chosen: [How the CPU default scale was chosen](default_scale.md)")
    assert link in findings.findings_page(run)["markdown"]
    # every family at the target but one network short of its plateau: still
    v = pd.read_csv(run / "07_results" / "verdicts_long.csv")
    v.loc[v["network"] == "vgg16", "mean"] = 0.95
    v.to_csv(run / "07_results" / "verdicts_long.csv", index=False)
    assert link in findings.findings_page(run)["markdown"]
    # both met: nothing to explain
    pd.DataFrame({"network": ["vgg16", "mhl"], "converged": [True, True], "epochs": [10, 10]}).to_csv(
        run / "07_results" / "convergence.csv", index=False)
    assert link not in findings.findings_page(run)["markdown"]
    # the page measures the cpu scale: another scale's findings do not point to it
    pd.DataFrame({"network": ["vgg16", "mhl"], "converged": [False, True], "epochs": [10, 10]}).to_csv(
        run / "07_results" / "convergence.csv", index=False)
    (run / "study.yaml").write_text("cohort: toy\nscale: quick\n")
    assert link not in findings.findings_page(run)["markdown"]


def test_findings_page_states_missing_parts_and_quick_scale(tmp_path):
    run = _fake_run(tmp_path)
    (run / "study.yaml").write_text("cohort: toy\nscale: quick\n")
    for f in ("07_results/external_metrics.csv", "09_statistics/welch_tests.csv", "08_xai/faithfulness.csv"):
        (run / f).unlink()
    md = findings.findings_page(run)["markdown"]
    assert "not conclusive" in md and "No external test in this run" in md
    from cellstudy import config
    q = config.get_scale("quick")
    assert f"`quick` scale (a look in ~20 minutes: S = {q['image_size']}, {q['epochs_short']} + {q['epochs_long'] - q['epochs_short']} epochs)" in md
    # the tests' scale says so too (its book read like findings); the default scale does not
    (run / "study.yaml").write_text("cohort: toy\nscale: ci\n")
    assert "`ci` scale (the tests' scale" in findings.findings_page(run)["markdown"]
    (run / "study.yaml").write_text("cohort: toy\nscale: cpu\n")
    assert "not conclusive" not in findings.findings_page(run)["markdown"]
    # the run's own values (scale.json, overrides included) are the ones stated
    (run / "study.yaml").write_text("cohort: toy\nscale: ci\n")
    rundir.Run(run).scale("ci", {"epochs_long": 3})
    assert "1 + 2 epochs" in findings.findings_page(run)["markdown"]   # short 1, long 3: 1 + 2 more
    assert "statistics step did not run" in md and "No faithfulness results" in md
    (run / "07_results" / "verdicts_long.csv").unlink()
    with pytest.raises(FileNotFoundError, match="verdicts_long.csv"):
        findings.findings_page(run)


def test_expected_on_page_is_what_the_page_writes(tmp_path):
    # every recorded number, as the page writes it, is in the page's markdown; a stain by its name
    run = _fake_run(tmp_path)
    md = findings.findings_page(run)["markdown"]
    exp = findings.expected_on_page(run)
    assert len(exp) == len(findings.findings_page(run)["numbers"]) and exp
    for token, what in exp:
        assert token in md, what
    assert ("0.912", "external_best_network = 0.912 (from external_metrics.csv:auc/mhl)") in exp
    assert findings.shown_as(0.5) == "0.500" and findings.shown_as(3) == "3"
    assert findings.shown_as("actin") == findings.STAIN_NAMES["actin"]


def test_findings_page_says_confound_regime_stain_method_and_unseen_gap(tmp_path):
    # the page states what the CSVs hold: the class / well confound, the regime of the significant
    # Welch tests (here the short one only), how the stain ranking depends on the method and whether
    # the intervals separate the stains, and the networks' ensembles against the classical model on
    # the unseen fields
    run = _fake_run(tmp_path)
    (run / "00_cohort").mkdir()
    pd.DataFrame({"source": ["well"], "normal cells from": ["B02 (100)"], "abnormal cells from": ["B03 (60)"],
                  "shared by both classes": ["none"]}).to_csv(run / "00_cohort" / "class_vs_source.csv", index=False)
    pd.DataFrame({"regime": ["short", "long"], "metric": ["recall_macro", "f1_macro"], "family_a": ["RGB", "DL"],
                  "family_b": ["MHL", "Classical"], "p": [0.001, 0.2], "significant": [True, False]}).to_csv(
        run / "09_statistics" / "welch_tests.csv", index=False)
    ci = pd.DataFrame({"network": ["mhl"] * 6 + ["vgg16"] * 6, "channel": ["third", "actin", "dna"] * 4,
                       "method": (["mean"] * 3 + ["zero"] * 3) * 2,
                       "mean_drop": [0.01, 0.2, 0.05, 0.3, 0.1, 0.0, 0.0, 0.1, 0.3, 0.0, 0.1, 0.3],
                       "ci_low": [0.0, 0.15, 0.0, 0.2, 0.0, 0.0, 0.0, 0.05, 0.05, 0.0, 0.0, 0.2],
                       "ci_high": [0.05, 0.25, 0.1, 0.4, 0.2, 0.1, 0.1, 0.2, 0.5, 0.1, 0.2, 0.4],
                       "n_cells": 40})
    ci.to_csv(run / "08_xai" / "channel_importance.csv", index=False)
    pd.DataFrame({"network": ["mhl", "mhl"], "method": ["gradcam", "gradcam"], "curve": ["deletion", "insertion"],
                  "difference": [-0.02, 0.04], "beats_random": [True, True]}).to_csv(
        run / "08_xai" / "faithfulness.csv", index=False)
    page = findings.findings_page(run)
    md, num = page["markdown"], page["numbers"]
    assert "the class coincides with the well" in md and "B02 (100)" in md and num["confounded_with"][0] == "well"
    assert "none in the long regime" in md and "in the short regime: RGB vs MHL: recall" in md
    assert "in the long regime: RGB" not in md
    # mean: MHL actin, VGG16 DNA; zero: MHL third, VGG16 DNA -> agree for 1 of 2
    assert "agree on the top stain for 1 of 2 networks" in md
    # MHL: actin [0.15, 0.25] vs DNA [0.0, 0.1] separate; VGG16: DNA [0.05, 0.5] vs actin [0.05, 0.2] overlap
    assert num["stain_ci_overlap"][0] == 1 and "for 1 of 2 networks the top stain's 95% interval overlaps" in md
    assert "(AUC drop 0.140)" in md and "−0." not in md
    # unseen fields: MHL 0.912 < RF 0.977
    assert "median distance from the random curve's area 0.030" in md     # |-0.02|, |0.04|
    assert num["external_networks_below_classical"][0] == 1 and "1 of 1 network ensembles score below" in md
    for token, what in findings.expected_on_page(run):
        assert token in md, what
    # without the confound (a source shared by both classes) no box
    pd.DataFrame({"source": ["well"], "normal cells from": ["B02"], "abnormal cells from": ["B02"],
                  "shared by both classes": ["B02"]}).to_csv(run / "00_cohort" / "class_vs_source.csv", index=False)
    assert "coincides" not in findings.findings_page(run)["markdown"]


def test_verdict_sentence_says_when_p_is_not_holm_adjusted():
    tidy = _tidy({"mhl": [0.9, 0.94, 0.88, 0.93, 0.91], "rf": [0.99, 0.98, 1.0, 0.97, 0.99],
                  "logreg": [0.95, 0.96, 0.94, 0.97, 0.93]})
    v = findings.network_verdicts(tidy, n_train=176, n_test=44)
    text = findings.verdict_sentences(v)
    lr = next(s for s in text if s.startswith("**Logistic regression**"))
    mhl = next(s for s in text if s.startswith("**MHL**"))
    assert "Holm-adjusted" not in lr and "not adjusted" in lr
    assert "Holm-adjusted p" in mhl
    assert "than the random forest baseline" in mhl   # a common noun mid-sentence, not "the Random forest"


def test_book_tables_are_not_cut():
    # the book's tables (convergence reasons, exclusion reasons, the paired comparisons) show
    # their text and rows whole: every notebook calls report.book_table_options(); importing the
    # package does not change a user's pandas options
    import importlib
    import json

    import cellstudy.report as report
    from cellstudy import config
    pd.reset_option("display.max_colwidth")
    pd.reset_option("display.max_rows")
    pd.reset_option("display.min_rows")
    importlib.reload(report)
    df = pd.DataFrame({"why_not": ["fold 0: still rising: +0.047 over the last 3 epochs; fold 1: " + "x" * 80] * 120})
    assert "..." in df._repr_html_()                   # pandas' defaults cut both, after the import too
    report.book_table_options()
    html = df._repr_html_()
    assert "..." not in html and html.count("still rising") == 120
    pd.reset_option("display.max_colwidth")
    pd.reset_option("display.max_rows")
    pd.reset_option("display.min_rows")
    notebooks = sorted((config.REPO_ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 12
    for p in notebooks:
        code = "\n".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")
        assert re.search(r"^book_table_options\(\)", code, re.M), f"{p.name} does not call book_table_options()"


def test_console_summary_says_what_the_run_found(tmp_path):
    run = _fake_run(tmp_path)
    lines = findings.console_summary(run)
    text = "\n".join(lines)
    v = pd.read_csv(run / "07_results" / "verdicts_long.csv").set_index("network")
    mhl = v.loc["mhl"]
    assert f"MHL:       MHL {mhl['mean']:.3f} ({mhl['ci_low']:.3f}-{mhl['ci_high']:.3f})" in text
    assert "Classical: Random forest" in text
    assert "DL:        VGG16 0.500" in text and "not above chance" in lines[1]
    # MHL (0.912) meets the target but its CI holds 0.90: said, as the book's page says it
    assert ("learning target (each family's best >= 0.90): met by MHL; not by DL (the 95% CI of MHL contains "
            "0.90: the folds cannot tell whether it is above or below)") in text
    assert "against the classical baseline (Random forest): no network better" in text
    assert ("training: 1 of 2 networks on their training plateau in every fold; no network called every cell of a "
            "test fold the same class") in text
    assert "unseen fields (560 cells the cohort never uses): best network ensemble MHL 0.912, best classical " \
           "Random forest 0.977" in text
    assert "11_predict" not in text                      # the step did not run
    assert "not conclusive" not in text                   # the default scale
    (run / "study.yaml").write_text("cohort: toy\nscale: quick\n")
    assert "This run is the 'quick' scale" in findings.console_summary(run)[1] and \
        "its numbers are not conclusive" in findings.console_summary(run)[1]
    (run / "study.yaml").write_text("cohort: toy\nscale: cpu\n")
    # the prediction step ran without a prediction set (an own cohort with no unseen fields): said, with the command
    (run / "notebooks").mkdir()
    (run / "notebooks" / "11_predict.ipynb").write_text("{}")
    assert f"11_predict: no new cells predicted (the cohort has no fields it never uses); apply the run to your own " \
           f"cells with: cellstudy predict {run.resolve()}" in "\n".join(findings.console_summary(run))
    # it predicted labelled new cells: their score
    pj = run / "11_predict" / "predictions"
    pj.mkdir(parents=True)
    (pj / "prediction.json").write_text(json.dumps({
        "n_cells": 560, "cells": "bbbc021-unseen", "network": "mhl", "not_scored_why": None,
        "scored_against_labels": {"auc": 0.93, "auc_ci_low": 0.9, "auc_ci_high": 0.96}}))
    assert "11_predict: 560 cells of bbbc021-unseen predicted by MHL; AUC 0.930 (0.900-0.960) against their classes" \
        in findings.console_summary(run)[-1]
    # a prediction.json of an older run (no CI) and unseen fields without an AUC: each part says what it
    # has, the others are not hidden
    (pj / "prediction.json").write_text(json.dumps({"n_cells": 560, "cells": "bbbc021-unseen", "network": "mhl",
                                                    "scored_against_labels": {"auc": 0.93}}))
    pd.DataFrame({"network": ["mhl"], "family": ["MHL"], "n_cells": [560], "n_fields": [14], "auc": [float("nan")],
                  "auc_ci_low": [0.8], "auc_ci_high": [0.9]}).to_csv(run / "07_results" / "external_metrics.csv",
                                                                      index=False)
    lines = findings.console_summary(run)
    assert lines[-1].endswith("predicted by MHL; AUC 0.930 against their classes")
    assert not any("unseen fields" in x or "could not be read" in x for x in lines)
    (pj / "prediction.json").write_text("{not json")
    lines = findings.console_summary(run)
    assert lines[-1].startswith("  (11_predict: could not be read: JSONDecodeError") and "learning target" in lines[-4]
    # only classical models: no baseline line about "no network"
    v = pd.read_csv(run / "07_results" / "verdicts_long.csv")
    v[v["family"] == "Classical"].to_csv(run / "07_results" / "verdicts_long.csv", index=False)
    assert not any("against the classical baseline" in x for x in findings.console_summary(run))
    (run / "07_results" / "verdicts_long.csv").unlink()
    assert findings.console_summary(run) == []          # no results chapter: nothing to say


def test_findings_state_the_plateau_stop(tmp_path):
    """A run whose long regime went on to the plateau (the default scale's epochs_long_max): the
    training paragraph gives the span of epochs, and a network not on its plateau was stopped at
    the scale's cap."""
    run = _fake_run(tmp_path)
    rundir.Run(run).scale("cpu")                                   # scale.json: epochs_long_max 30
    pd.DataFrame({"network": ["vgg16", "mhl"], "converged": [False, True], "epochs_min": [30, 11],
                  "epochs": [30, 17]}).to_csv(run / "07_results" / "convergence.csv", index=False)
    md = findings.findings_page(run)["markdown"]
    assert "(the long regime: 11-30 epochs a fold)" in md
    assert "(not: VGG16; their numbers are those of a training stopped after 30 epochs (the scale cap)" in md
    pd.DataFrame({"network": ["vgg16", "mhl"], "converged": [True, True], "epochs_min": [10, 10],
                  "epochs": [10, 10]}).to_csv(run / "07_results" / "convergence.csv", index=False)
    md = findings.findings_page(run)["markdown"]
    assert "2 of 2 networks reached their training plateau in every fold;" in md and "a fold)" not in md
    # a fixed long regime: no span (a failed fold's shorter history is no stop), no cap
    (run / "scale.json").unlink()
    rundir.Run(run).scale("cpu", {"epochs_long_max": None})
    pd.DataFrame({"network": ["vgg16", "mhl"], "converged": [False, True], "epochs_min": [3, 10],
                  "epochs": [10, 10]}).to_csv(run / "07_results" / "convergence.csv", index=False)
    md = findings.findings_page(run)["markdown"]
    assert "a fold)" not in md and "stopped after 10 epochs, short" in md


def test_best_per_family_and_prediction_name_the_same_network_on_a_round_off_tie(tmp_path):
    """The run of 2026-12-07: ViT and RGB tied to the 16th digit; every page names one best."""
    from cellstudy import predict, rundir
    v = pd.DataFrame({"network": ["vgg16", "vit", "rgb", "mhl", "logreg"],
                      "family": ["DL", "ViT", "RGB", "MHL", "Classical"],
                      "mean": [0.8925, 0.9016666666666666, 0.9016666666666667, 0.90125, 0.9025],
                      "sd": [0.046, 0.054, 0.048, 0.070, 0.05]})
    best = findings.best_per_family(v)
    assert list(best["family"]) == ["DL", "ViT", "RGB", "MHL", "Classical"]
    # a family of two tied networks: the lower SD, also when the round-off favours the other
    v2 = v.assign(family=["DL", "ViT", "ViT", "MHL", "Classical"],
                  mean=[0.8925, 0.9016666666666667, 0.9016666666666666, 0.90125, 0.9025])
    assert findings.best_per_family(v2).set_index("family").loc["ViT", "network"] == "rgb"
    run = tmp_path / "run"
    step = rundir.Run(run).step("07_results")
    v.to_csv(step / "verdicts_long.csv", index=False)
    name, why = predict.best_network_why(run, ["vgg16", "vit", "rgb", "mhl"])
    assert name == "rgb" and "0.902" in why


def test_findings_do_not_bold_a_shortfall_the_folds_cannot_tell(tmp_path):
    """A best network below 0.90 whose 95% CI contains 0.90 is named, not set in bold."""
    run = _fake_run(tmp_path)
    f = run / "07_results" / "verdicts_long.csv"
    v = pd.read_csv(f)
    v.loc[v.network == "vgg16", ["mean", "ci_low", "ci_high"]] = [0.893, 0.806, 0.979]
    v.to_csv(f, index=False)
    md = findings.findings_page(run)["markdown"]
    assert "not met by DL (best: VGG16, 0.893)" in md and "**DL (best" not in md and "**not met" not in md
    assert "the 95% CIs of all 2 families' best networks contain 0.90" in md


def test_findings_of_the_default_scale_say_how_it_was_chosen(tmp_path):
    """The default scale was chosen on bbbc021-paper's folds: that cohort's findings say so and
    point to the unseen fields; another cohort's, or another scale's, do not."""
    run = _fake_run(tmp_path)
    (run / "study.yaml").write_text("cohort: bbbc021-paper\nscale: cpu\n")
    md = findings.findings_page(run)["markdown"]
    assert "chosen by probes scored on these same test folds" in md
    assert "unseen fields below took no part in any choice" in md
    (run / "study.yaml").write_text("cohort: toy\nscale: cpu\n")
    assert "chosen by probes" not in findings.findings_page(run)["markdown"]
    (run / "study.yaml").write_text("cohort: bbbc021-paper\nscale: quick\n")
    assert "chosen by probes" not in findings.findings_page(run)["markdown"]


def test_the_unseen_fields_are_said_to_be_new_fields_of_the_cohorts_wells():
    """Findings read 'unseen fields, AUC 0.927' as if new wells: they are other fields of the
    same wells (BBBC021), which the sentence now says, with their classes."""
    txt = findings._external_provenance("bbbc021-paper")
    assert txt.startswith("They are 240 normal-role and 320 abnormal-role cells from other fields of the "
                          "cohort's own well positions (the manifests record no plate): a check on new fields, "
                          "not on new wells")
    assert findings._external_provenance("rxrx1-cells") == ""      # no external set defined
