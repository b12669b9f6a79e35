"""End to end: the runner executes the ci study on the real default cohort and builds the book."""
import json

import pytest

from cellstudy import config, runner

pytestmark = pytest.mark.slow


# `ci_run` (the ci study, run once per session) is a fixture in conftest.py.


def test_run_folder_holds_executed_notebooks_outputs_and_provenance(ci_run):
    cfg = runner.load_config(config.REPO_ROOT / "configs" / "ci.yaml")
    st = runner.read_status(ci_run)
    assert st["state"] == "complete"
    for step in cfg.steps:
        nb = ci_run / "notebooks" / f"{step}.ipynb"
        assert nb.is_file() and runner.notebook_errors(nb) == []
        assert st["steps"][step]["state"] == "done"
        # the injected parameters reached the notebook
        text = nb.read_text()
        assert '"injected-parameters"' in text and 'scale = \\"ci\\"' in text
    prov = json.loads((ci_run / "provenance.json").read_text())
    assert prov["data"]["n_cells"] == 220 and prov["data"]["files_verified_sha256"]
    assert prov["data"]["manifest_sha256"] and len(prov["data"]["manifest_sha256"]) == 64
    assert prov["packages"]["tensorflow-cpu"].startswith("2.21") and prov["git"]["commit"]
    assert prov["scale_parameters"]["image_size"] == config.SCALES["ci"]["image_size"]


def test_cohort_and_preprocessing_outputs(ci_run):
    import pandas as pd
    counts = pd.read_csv(ci_run / "00_cohort" / "counts_per_class.csv")
    assert counts.set_index("class")["cells"].to_dict() == {"normal": 100, "abnormal": 120}
    assert (ci_run / "00_cohort" / "example_cells.png").stat().st_size > 10_000
    folds = pd.read_csv(ci_run / "folds" / "bbbc021-paper.csv", comment="#")
    assert len(folds) == 220 and folds.groupby("group")["fold"].nunique().max() == 1
    summary = pd.read_csv(ci_run / "01_preprocessing" / "fold_summary.csv")
    assert len(summary) == 6  # 5 folds + all
    for f in ("filter_stages.png", "folds.png", "augmentation_examples.png", "zca_covariance.png",
              "filter_timings_ms.csv", "zca_fold0.json"):
        assert (ci_run / "01_preprocessing" / f).is_file(), f


def test_book_is_built_offline_with_every_chapter(ci_run):
    html = ci_run / "book" / "_build" / "html"
    cfg = runner.load_config(config.REPO_ROOT / "configs" / "ci.yaml")
    assert (html / "index.html").is_file() and (html / "provenance.html").is_file()
    for step in cfg.steps:
        page = (html / f"{step}.html").read_text()
        assert "<img" in page, f"{step} has no figure"
        assert "Traceback" not in page and 'class="output error' not in page
    page = (html / "01_preprocessing.html").read_text()
    assert "mathjax/tex-chtml.js" in page and "cdn.jsdelivr" not in page
    assert (html / "mathjax" / "tex-chtml.js").is_file()
    intro = (html / "intro.html").read_text()
    assert "BBBC021" in intro and "CC BY-NC-SA" in intro


def test_the_prediction_chapter_predicts_the_unseen_fields(ci_run):
    # 11_predict: the run's best network on the 560 cells of the BBBC021 fields the cohort never uses
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    t = pd.read_csv(ci_run / "11_predict" / "predictions" / "predictions.csv")
    info = json.loads((ci_run / "11_predict" / "predictions" / "prediction.json").read_text())
    assert len(t) == info["n_cells"] == 560 and t["cell_id"].is_unique
    assert info["network"] in {"vgg16", "vit", "rgb", "mhl"} and info["folds"] == [0, 1, 2]
    assert set(t["Classifier_Class"]) <= {"normal", "abnormal"} and t["mc_sd"].notna().all()
    auc = roc_auc_score(t["label"], t["p_abnormal"])
    assert 0.0 <= auc <= 1.0 and {"p_abnormal_rf", "p_abnormal_logreg"} <= set(t.columns)
    # scored against the cells' own classes, the network beside the classical models, in the chapter too
    m = info["scored_against_labels"]
    assert m["n_cells"] == 560 and abs(m["auc"] - auc) < 1e-9
    assert set(info["classical_scored_against_labels"]) == {"rf", "logreg"}
    page = (ci_run / "book" / "_build" / "html" / "11_predict.html").read_text()
    assert "Against the cells" in page and f"{m['auc']:.3f}" in page and "Random forest (classical)" in page
    from cellstudy import predict
    for kind, g in info["galleries"].items():   # each gallery's caption states its probabilities
        assert predict.gallery_title(kind, g) in page and f"{g['p_min']:.2f}-" in page, kind


def test_the_terminal_says_what_the_run_found(ci_run):
    said = (ci_run.parent / "console.txt").read_text()
    info = json.loads((ci_run / "11_predict" / "predictions" / "prediction.json").read_text())
    assert "What this run found (long regime" in said and "learning target (each family's best >= 0.90)" in said
    assert "against the classical baseline" in said and "unseen fields (560 cells" in said
    assert "11_predict: 560 cells of bbbc021-unseen predicted by" in said
    assert f"AUC {info['scored_against_labels']['auc']:.3f}" in said
    assert said.index("What this run found") < said.index("The book: ")
    # while it ran, a progress line a minute (cellstudy.progress): folds done, notebooks done
    lines = [ln for ln in said.splitlines() if ln.startswith("progress ")]
    assert lines and all(" folds done" in ln and " notebooks " in ln for ln in lines), lines
    assert said.index(lines[-1]) < said.index("What this run found")
