"""Prediction on new cells with a finished run's models (cellstudy.predict, `cellstudy predict`)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellstudy import predict as P


def test_margin_uncertainty_and_short_ids():
    p = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    np.testing.assert_allclose(P.margin_uncertainty(p), [0.0, 1.0, 0.4])
    assert P.short_id("DMSO/B02_s1_w16F89C55C-7808-4136-82E4_0") == "B02_s1_w…36-82E4_0"
    assert P.short_id("cell_1") == "cell_1"
    # ids that share their last part keep as much of the path as tells them apart
    assert P.short_ids(["a/f1_3", "b/f1_3", "a/f1_4"]) == ["a/f1_3", "b/f1_3", "a/f1_4"]
    assert P.short_ids(["x/a/f1", "x/b/f2"]) == ["f1", "f2"]
    # a panel's probability is not shown reaching the confidence level when it does not
    assert P.p_text(0.7496) == "0.749" and P.p_text(0.75) == "0.75" and P.p_text(0.7449) == "0.74"


def test_qc_flags_find_empty_saturated_and_odd_sized_cells():
    rng = np.random.default_rng(0)
    x = rng.random((4, 16, 16, 3)).astype(np.float32)
    x[2, :8, :, 2] = 1.0                     # half the DNA channel at its maximum
    raw = np.full((4, 3), 1000.0)
    raw[1, 0] = 30.0                          # its raw range: noise, stretched to [0, 1] by the scaling
    ref = np.full((10, 3), 800.0)
    qc = P.qc_flags(x, raw, ref, np.array([100.0, 100.0, 100.0, 900.0]), (50.0, 500.0))
    assert qc["qc_empty_third"].tolist() == [False, True, False, False]
    assert qc["qc_saturated_dna"].tolist() == [False, False, True, False]
    assert not qc["qc_saturated_third"].any()          # an all-zero channel is empty, not saturated
    assert qc["qc_size"].tolist() == [False, False, False, True]
    assert qc["qc_ok"].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"expected \(N, H, W, 3\)"):
        P.qc_flags(x[..., :2], raw, ref, np.ones(4), (0, 1))


def _fake_run(tmp_path):
    run = tmp_path / "run"
    for k in (0, 1):
        d = run / "training" / "mhl" / f"fold{k}"
        d.mkdir(parents=True)
        for f in ("done.json", "model_long.keras", "zca.json"):
            (d / f).write_text("{}")
    (run / "study.yaml").write_text("cohort: bbbc021-paper\nscale: ci\nseed: 0\noverrides: {}\n")
    return run


def test_bad_requests_are_refused_before_any_model_loads(tmp_path):
    with pytest.raises(P.PredictError, match="no training/ folder"):
        P.predict(tmp_path, "bbbc021-paper")
    run = _fake_run(tmp_path)
    with pytest.raises(ValueError, match="unknown network 'resnet5'"):
        P.predict(run, "bbbc021-paper", network="resnet5")
    with pytest.raises(P.PredictError, match=r"network 'vgg16' has no trained fold.*trained: \['mhl'\]"):
        P.predict(run, "bbbc021-paper", network="VGG16")   # the paper's name is the network's id
    with pytest.raises(P.PredictError, match="exists; choose another output folder"):   # "MHL" is mhl: past the name
        (tmp_path / "o2").mkdir()
        (tmp_path / "o2" / "predictions.csv").write_text("x")
        P.predict(run, "bbbc021-paper", network="MHL", out_dir=tmp_path / "o2")
    # mhl's folds are finished but have no model_short.keras: deleted, not untrained
    with pytest.raises(P.PredictError, match=r"the networks' \(mhl\) folds finished \(done.json\) but their "
                                             r"model_short.keras files were deleted"):
        P.predict(run, "bbbc021-paper", regime="short")
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("x")
    with pytest.raises(P.PredictError, match="exists; choose another output folder"):
        P.predict(run, "bbbc021-paper", network="mhl", out_dir=out)
    assert P.run_settings(run)["cohort"] == "bbbc021-paper" and P.run_settings(run)["values"]["image_size"] == 32


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
    """A run trained at the ci scale: MHL, folds 0 and 1 (scale.json written by prepare)."""
    from cellstudy import study
    from cellstudy.learning import experiment

    run = tmp_path_factory.mktemp("tinyrun")
    p = study.prepare("bbbc021-paper", "ci", run, data_root=str(shared_data),
                      overrides={"networks": ["mhl"], "folds_to_run": [0, 1]}, progress=False)
    experiment.run_networks(p, "MHL", "05_mhl_family", echo=lambda s: None, progress=lambda e: None)
    return run


@pytest.mark.slow
def test_predict_reproduces_the_runs_test_fold_probabilities(tiny_run, shared_data, tmp_path):
    res = P.predict(tiny_run, "bbbc021-paper", network="mhl", mc_samples=3, data_root=shared_data,
                    out_dir=tmp_path / "out", echo=lambda s: None)
    t = res.table
    assert len(t) == 220 and t["cell_id"].is_unique and t["in_run_cohort"].all()   # the run's own cells
    for k in (0, 1):   # each fold model, on its own test cells, gives what training stored
        d = tiny_run / "training" / "mhl" / f"fold{k}"
        cells = pd.read_csv(d / "test_cells.csv", dtype={"cell_id": str})
        rows = t.index[t["cell_id"].isin(cells["cell_id"])]
        order = pd.Series(range(len(t)), index=t["cell_id"])[cells["cell_id"]].to_numpy()
        assert len(rows) == len(cells)
        np.testing.assert_allclose(res.fold_probas[k][order], np.load(d / "proba_long.npy"), atol=1e-5)
    ens = np.mean([res.fold_probas[0], res.fold_probas[1]], axis=0)
    np.testing.assert_allclose(t["Classifier_Probability_abnormal"], ens[:, 1], atol=1e-12)
    assert set(t["Classifier_Class"]) <= {"normal", "abnormal"}
    # the run's own class names beside the roles
    names = t["Classifier_Class"].map({"normal": "DMSO", "abnormal": "protein_synthesis"})
    assert (t["Classifier_Class_name"] == names).all()
    assert res.mc.shape == (2 * 3, 220) and (t["mc_sd"] >= 0).all()
    written = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(written) == 220 and {"Classifier_Class", "Classifier_Probability_normal", "Classifier_Probability_abnormal",
                                    "fold_sd", "mc_mean", "mc_sd", "margin_uncertainty", "qc_ok", "label", "group"} <= set(written.columns)
    assert pd.read_parquet(tmp_path / "out" / "predictions.parquet").shape == written.shape
    info = json.loads((tmp_path / "out" / "prediction.json").read_text())
    assert info["folds"] == [0, 1] and info["network"] == "mhl" and info["image_size"] == 32
    assert info["network_why"] == "chosen with --network" and Path(info["run_dir"]).is_absolute()
    assert info["scored_against_labels"] is None       # every cell is the run's own: nothing to score
    # the run's own cells are said to test nothing (the prediction's notes, and the terminal)
    assert any(n["status"] == "in run cohort" and "220 of 220 cells" in n["detail"] for n in info["notes"])
    assert not any(n["status"] == "stains not compared" for n in info["notes"])   # both name their stains
    assert (tmp_path / "out" / "gallery_uncertain.png").stat().st_size > 5000
    assert (tmp_path / "out" / "gallery_uncertain_gradcam.png").stat().st_size > 5000
    assert set(res.gradcam) == set(np.concatenate(list(res.gallery.values())).tolist())
    assert all(m.shape == (32, 32) and 0 <= m.min() and m.max() <= 1 for m in res.gradcam.values())


@pytest.mark.slow
def test_mc_dropout_without_dropout_is_the_forward_pass(tiny_run):
    from cellstudy.learning.models import load

    model = load(tiny_run / "training" / "mhl" / "fold0" / "model_long.keras")
    x = np.random.default_rng(0).random((5, 32, 32, 3)).astype(np.float32)
    plain = np.asarray(model.predict_on_batch(x), dtype=np.float64)
    np.testing.assert_allclose(P.mc_dropout(model, x, 1, seed=0, dropout=False)[0], plain, atol=1e-6)
    on = P.mc_dropout(model, x, 4, seed=0)
    assert on.shape == (4, 5, 2) and not np.allclose(on[0], on[1])          # dropout is on
    np.testing.assert_allclose(on, P.mc_dropout(model, x, 4, seed=0))       # and seeded
    assert not np.allclose(on, P.mc_dropout(model, x, 4, seed=0, fold=1))   # another fold, other masks


@pytest.mark.slow
def test_cells_of_another_pixel_size_are_refused(tiny_run, shared_data):
    with pytest.raises(P.PredictError, match="stained R, G, B = concanavalin A, F-actin, DNA"):
        P.predict(tiny_run, "rxrx1-cells", network="mhl", mc_samples=0, data_root=shared_data, echo=lambda s: None)
    with pytest.raises(P.PredictError, match="stored at .* crop them at the run's pixel size"):
        P.predict(tiny_run, "rxrx1-cells", network="mhl", mc_samples=0, data_root=shared_data,
                  ignore_stains=True, echo=lambda s: None)


def test_labelled_metrics_leave_out_the_runs_own_and_unlabelled_cells():
    y = np.array([0, 0, 1, 1, 1, 0, -1])
    pa = np.array([0.1, 0.4, 0.8, 0.3, 0.9, 0.95, 0.7])
    proba = np.stack([1 - pa, pa], axis=1)
    own = np.array([False, False, False, False, False, True, False])    # the 6th: a training cell
    groups = np.array(["f1", "f1", "f2", "f2", "f3", "f1", "f4"])
    m, why = P.labelled_metrics(y, proba, own, groups)
    assert why == "" and m["n_cells"] == 5 and m["n_run_cells_left_out"] == 1 and m["n_unlabelled_left_out"] == 1
    assert m["auc"] == pytest.approx(5 / 6)                  # 0.3 ranks below 0.4 once of 6 pairs
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"]
    # margin uncertainties of the 5 scored cells: 0.2, 0.8, 0.4, 0.6, 0.2: the more uncertain half by
    # rank is the 2 most uncertain (0.8: right, 0.6: wrong), the rest the other 3 (all right)
    assert (m["n_uncertain_half"], m["wrong_uncertain_half"], m["accuracy_uncertain_half"]) == (2, 1, 0.5)
    assert (m["n_certain_half"], m["wrong_certain_half"], m["accuracy_certain_half"]) == (3, 0, 1.0)
    # every cell equally uncertain (saturated calls): still two halves, no NaN (prediction.json is JSON)
    sat, _ = P.labelled_metrics(np.array([0, 1, 0, 1]), np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]),
                                np.zeros(4, bool), np.array(["a", "b", "c", "d"]))
    assert (sat["n_uncertain_half"], sat["n_certain_half"]) == (2, 2)
    assert json.loads(json.dumps(sat, allow_nan=False)) == sat
    # an exact 0.5 is called as the ensemble calls it (argmax: normal), as Classifier_Class
    m2, _ = P.labelled_metrics(np.array([0, 1]), np.array([[0.5, 0.5], [0.2, 0.8]]), np.zeros(2, bool),
                               np.array(["a", "b"]))
    assert m2["balanced_accuracy"] == 1.0
    assert P.labelled_metrics(np.array([-1, -1]), proba[:2], np.zeros(2, bool), groups[:2]) == (None, "")
    none, why = P.labelled_metrics(y, proba, np.ones(7, bool), groups)
    assert none is None and "fewer than one labelled cell of each class" in why
    # classes named otherwise than the run's (roles swapped): not scored, and said why
    none, why = P.labelled_metrics(y, proba, own, groups, {0: "treated", 1: "control"}, {0: "control", 1: "treated"})
    assert none is None and "the cells' classes are normal = 'treated'" in why and "--normal" in why


def test_gallery_cells():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.05, 0.95], [0.5, 0.5]])
    g = P.gallery_cells(p, n=2)
    assert g["confident_normal"].tolist() == [0, 2] and g["confident_abnormal"].tolist() == [3, 1]
    assert g["uncertain"].tolist() == [4, 2]
    r = P.gallery_ranges(p, g)
    assert r["confident_abnormal"] == {"cells": 2, "class": "abnormal", "p_min": 0.8, "p_max": 0.95, "confident": True}
    assert r["uncertain"]["class"] is None and (r["uncertain"]["p_min"], r["uncertain"]["p_max"]) == (0.45, 0.5)
    assert P.gallery_title("confident_abnormal", r["confident_abnormal"]) == \
        "most confident abnormal calls (p(abnormal) 0.80-0.95)"
    # no abnormal call reaches CONFIDENT_P: the title says so, not "most confident" alone
    q = np.array([[0.9, 0.1], [0.48, 0.52], [0.45, 0.55]])
    rq = P.gallery_ranges(q, P.gallery_cells(q, n=8))
    assert rq["confident_abnormal"]["confident"] is False and rq["confident_normal"]["confident"] is True
    assert P.gallery_title("confident_abnormal", rq["confident_abnormal"]) == \
        "most confident abnormal calls (p(abnormal) 0.52-0.55; none reaches 0.75: no confident call)"
    assert P.gallery_title("uncertain", None) == "most uncertain cells"
    # a best call of 0.7496 is not shown as 0.75 beside "none reaches 0.75"
    assert P.gallery_title("confident_normal", {"class": "normal", "p_min": 0.6, "p_max": 0.7496,
                                                "confident": False}).startswith(
        "most confident normal calls (p(normal) 0.60-0.749; none reaches 0.75")
    assert "0.66-0.69; none" in P.gallery_title("confident_normal", {"class": "normal", "p_min": 0.66, "p_max": 0.69,
                                                                     "confident": False})   # 0.69 * 100 = 68.999...


def test_summary_table_rows_are_the_scored_models():
    m = {"n_cells": 40, "n_fields": 4, "auc": 0.9, "auc_ci_low": 0.8, "auc_ci_high": 0.97, "balanced_accuracy": 0.85,
         "accuracy_uncertain_half": 0.7, "accuracy_certain_half": 1.0}
    res = P.Prediction(table=pd.DataFrame(), fold_probas={}, mc=None,
                       info={"network": "mhl", "scored_against_labels": m,
                             "classical_scored_against_labels": {"rf": dict(m, auc=0.95), "logreg": None}})
    t = P.summary_table(res)
    assert t["model"].tolist() == ["MHL (fold ensemble)", "Random forest (classical)"]
    assert t["auc"].tolist() == [0.9, 0.95] and list(t.columns) == P.SUMMARY_COLUMNS
    shown = P.summary_for_reading(t)
    assert shown.loc["MHL (fold ensemble)", "AUC (95% CI)"] == "0.900 (0.800-0.970)"
    assert shown.loc["Random forest (classical)", "right, more uncertain half"] == "70%"
    # an older prediction.json (no CI, no halves) is shown with what it has
    old = P.summary_table(P.Prediction(table=pd.DataFrame(), fold_probas={}, mc=None, info={
        "network": "mhl", "scored_against_labels": {"n_cells": 10, "auc": 0.8, "balanced_accuracy": 0.7}}))
    assert P.summary_for_reading(old).iloc[0].tolist() == ["0.800", "0.700", "", ""]
    assert list(shown.columns) == ["AUC (95% CI)", "balanced accuracy", "right, more certain half",
                                   "right, more uncertain half"]
    res.info.update(scored_against_labels=None, classical_scored_against_labels=None)
    assert P.summary_table(res).empty


@pytest.mark.slow
def test_unlabelled_cells_and_other_stains(tiny_run, shared_data, tmp_path):
    """Cells without labels are predicted (no AUC, labels stay empty); cells whose manifest names
    other stains than the run's cohort are refused before any model loads, unless asked."""
    from cellstudy import data

    m = data.load_manifest("bbbc021-unseen").head(12).copy()
    m["label"], m["class_name"] = "", ""
    m.to_csv(tmp_path / "unlab.csv", index=False)
    res = P.predict(tiny_run, str(tmp_path / "unlab.csv"), network="mhl", mc_samples=0, data_root=shared_data,
                    gradcam=False, echo=lambda s: None)
    assert len(res.table) == 12 and res.info["labelled"] is False and not res.table["in_run_cohort"].any()
    assert res.info["scored_against_labels"] is None and Path(res.info["cells"]).is_absolute()
    # the same kind of cells with their classes: scored against them, and said
    lab = pd.concat([g.head(6) for _, g in data.load_manifest("bbbc021-unseen").groupby("label")])
    lab.to_csv(tmp_path / "lab.csv", index=False)
    said = []
    res = P.predict(tiny_run, str(tmp_path / "lab.csv"), network="mhl", mc_samples=0, data_root=shared_data,
                    gradcam=False, echo=said.append)
    sc = res.info["scored_against_labels"]
    from sklearn.metrics import roc_auc_score
    assert sc["n_cells"] == 12 and sc["n_normal"] == sc["n_abnormal"] == 6
    assert sc["auc"] == pytest.approx(roc_auc_score(res.table["label"], res.table["p_abnormal"]))
    assert any(f"AUC {sc['auc']:.3f} (95% CI" in s and "on 12 cells (6 normal, 6 abnormal)" in s for s in said)
    # the same cells with their class names swapped: not scored, and said why
    lab["class_name"] = lab["label"].map({0: "protein_synthesis", 1: "DMSO"})
    lab.to_csv(tmp_path / "swapped.csv", index=False)
    said = []
    res = P.predict(tiny_run, str(tmp_path / "swapped.csv"), network="mhl", mc_samples=0, data_root=shared_data,
                    gradcam=False, echo=said.append)
    assert res.info["scored_against_labels"] is None and "normal = 'protein_synthesis'" in res.info["not_scored_why"]
    assert any("not scored against their classes" in s for s in said)
    assert res.info["stains"] == res.info["stains_of_run"] == ["tubulin", "F-actin", "DNA"]
    m["stains"] = "vimentin,F-actin,DNA"
    m.to_csv(tmp_path / "vim.csv", index=False)
    with pytest.raises(P.PredictError, match=r"stained R, G, B = vimentin, F-actin, DNA.*tubulin, F-actin, DNA"
                                             r".*--ignore-stains"):
        P.predict(tiny_run, str(tmp_path / "vim.csv"), network="mhl", mc_samples=0, data_root=shared_data,
                  echo=lambda s: None)
    res = P.predict(tiny_run, str(tmp_path / "vim.csv"), network="mhl", mc_samples=0, data_root=shared_data,
                    gradcam=False, ignore_stains=True, echo=lambda s: None)
    assert res.info["stains"] == ["vimentin", "F-actin", "DNA"]
    # cells whose paths do not exist under the root used: the error says which root and why, and the option
    m.drop(columns=["stains"]).to_csv(tmp_path / "nostain.csv", index=False)
    said = []
    res = P.predict(tiny_run, str(tmp_path / "nostain.csv"), network="mhl", mc_samples=0, data_root=shared_data,
                    gradcam=False, echo=said.append)
    assert any(n["status"] == "stains not compared" for n in res.info["notes"])
    assert any("names no stains" in s and "not checked" in s for s in said)
    with pytest.raises(P.PredictError, match=r"(?s)file does not exist.*read relative to .*\(--data-root\); pass "
                                             r"--data-root FOLDER"):
        P.predict(tiny_run, str(tmp_path / "unlab.csv"), network="mhl", mc_samples=0, data_root=tmp_path,
                  echo=lambda s: None)


@pytest.mark.slow
def test_export_a_bioimageio_package_that_bioimageio_tests(tiny_run, tmp_path):
    """cellstudy export: one fold's model, its whitening baked in, passes `bioimageio test` in a
    fresh process (which knows nothing of cellstudy)."""
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import yaml

    from cellstudy import cli, export

    pkg = tmp_path / "mhl.zip"
    assert cli.main(["export", str(tiny_run), "--network", "mhl", "-o", str(pkg), "--fold", "1"]) == 0
    with zipfile.ZipFile(pkg) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
    assert {"rdf.yaml", "model.keras", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= names
    assert rdf["inputs"][0]["axes"][3]["channel_names"] == ["tubulin", "f_actin", "dna"]
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["normal", "abnormal"]
    assert "fold 1" in rdf["name"] and any("2309.00911" in c.get("doi", "") for c in rdf["cite"])
    # its README says the run's own fold count and the network's whitening (it said "5-fold" whatever
    # the run, and described both whitenings)
    with zipfile.ZipFile(pkg) as z:
        doc = z.read("README.md").decode()
    n_splits = json.loads((tiny_run / "scale.json").read_text())["values"]["n_splits"]
    assert f"grouped {n_splits}-fold cross-validation" in doc and f"Grouped {n_splits}-fold" in doc
    assert "(a 3 x 3 ZCA of the three stains, fitted on its training cells)" in doc
    assert "Cite the paper and the data below." in doc      # a shipped cohort: its data citation is there
    # a model of the tests' scale is a smoke test: its README says so (the terminal warns too)
    assert "**Not for use on cells.**" in doc and "not conclusive" in doc
    bio = Path(sys.executable).with_name("bioimageio")
    # bioimageio.core picks Keras' backend from KERAS_BACKEND, default torch (not installed here)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    r = subprocess.run([str(bio), "test", str(pkg)], capture_output=True, text=True, timeout=600, env=env)
    (tmp_path / "bioimageio_test.txt").write_text(r.stdout + r.stderr)
    assert r.returncode == 0 and "passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    # refusals: an existing file, a fold or network the run does not have
    with pytest.raises(export.ExportError, match="exists; not overwritten"):
        export.export(tiny_run, "mhl", pkg, echo=lambda s: None)
    with pytest.raises(export.ExportError, match=r"fold 4 is not a finished fold .* finished: \[0, 1\]"):
        export.export(tiny_run, "mhl", tmp_path / "x.zip", fold=4, echo=lambda s: None)
    with pytest.raises(export.ExportError, match=r"no finished fold of 'vgg16'.*networks with one: \['mhl'\]"):
        export.export(tiny_run, "VGG16", tmp_path / "x.zip", echo=lambda s: None)   # the paper's name works too
    with pytest.raises(ValueError, match=r"unknown network 'MHL-Resnet'.*mhl_res \(MHL-Res\)"):
        export.export(tiny_run, "MHL-Resnet", tmp_path / "x.zip", echo=lambda s: None)


@pytest.mark.slow
def test_a_vit_package_is_tested_with_cellstudys_layers(shared_data, tmp_path):
    """The ViT (and the RGB family) use cellstudy's own Keras layers: `bioimageio test` in a fresh
    process cannot load them (a newcomer found the README's check failing); `cellstudy
    test-package`, a fresh process too, can, and says passed."""
    import subprocess
    import sys
    from pathlib import Path

    from cellstudy import cli, study
    from cellstudy.learning import experiment

    run = tmp_path / "run"
    p = study.prepare("bbbc021-paper", "ci", run, data_root=str(shared_data),
                      overrides={"networks": ["vit"], "folds_to_run": [0]}, progress=False)
    experiment.run_networks(p, "ViT", "03_vit", echo=lambda s: None, progress=lambda e: None)
    pkg = tmp_path / "vit.zip"
    assert cli.main(["export", str(run), "--network", "vit", "-o", str(pkg), "--no-test"]) == 0
    exe = Path(sys.executable).with_name("cellstudy")
    r = subprocess.run([str(exe), "test-package", str(pkg)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"test-package: {pkg}: passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    # quiet: no Keras progress bars from bioimageio's predict() calls, no TensorFlow CPU-feature lines
    assert "ms/step" not in r.stdout + r.stderr and "cpu_feature_guard" not in r.stderr, r.stdout + r.stderr
    # the short report (one line a check; no conda environment), and no absl / oneDNN lines before it
    assert f"bioimageio test of {pkg}: passed" in r.stdout and "  ✔ Reproduce test outputs" in r.stdout
    assert "Conda Environment" not in r.stdout and "absl::InitializeLog" not in r.stderr, r.stdout + r.stderr
    assert "oneDNN custom operations" not in r.stderr
    r = subprocess.run([str(exe), "test-package", str(pkg), "--full"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Recommended Conda Environment" in r.stdout
    r = subprocess.run([str(exe), "test-package", str(tmp_path / "absent.zip")], capture_output=True, text=True)
    assert r.returncode != 0 and "absent.zip does not exist" in r.stderr


def test_short_report_of_a_bioimageio_summary():
    from types import SimpleNamespace as NS

    from cellstudy import export

    detail = lambda name, status, errors=(), warnings=(): NS(name=name, status=status, errors=list(errors),
                                                             warnings=list(warnings))
    summary = NS(status="failed", source_name="x.zip", type="model", format_version="0.5.12", details=[
        detail("Successfully created `ModelDescr` instance.", "passed",
               warnings=[NS(loc=("outputs", 0, "sample_tensor"), msg="Needs to be filled", severity=35)]),
        detail("Reproduce test outputs", "failed", errors=[NS(loc=("weights", "keras_v3"), msg="differ by 0.2")],
               warnings=[NS(loc=("weights", "keras_v3"), msg="agree?\nsecond line", severity=20)])])
    text = export.short_report(summary, "pkg.zip")
    assert text.splitlines() == [
        "bioimageio test of pkg.zip: failed (2 checks, format model 0.5.12)",
        "  ✔ Successfully created `ModelDescr` instance.",
        "      warning outputs.0.sample_tensor: Needs to be filled",
        "  ✘ Reproduce test outputs",
        "      error weights.keras_v3: differ by 0.2",
        "      note weights.keras_v3: agree?"]


def test_predict_and_export_say_when_the_models_were_deleted_not_untrained(tmp_path):
    """The README says to delete a run's models when done; predict / export then say so instead
    of "run the study first"."""
    from cellstudy import export, rundir
    run = _fake_run(tmp_path)
    for k in (0, 1):
        (run / "training" / "mhl" / f"fold{k}" / "model_long.keras").unlink()
    with pytest.raises(P.PredictError, match=r"mhl's folds finished \(done.json\) but their model_long.keras "
                                             r"files were deleted.*kept its models"):
        P.predict(run, "bbbc021-paper", network="mhl")
    with pytest.raises(P.PredictError, match=r"the networks' \(mhl\) folds finished"):
        P.predict(run, "bbbc021-paper")
    with pytest.raises(export.ExportError, match=r"mhl's folds finished \(done.json\) but their model_long"):
        export.export(run, "mhl", tmp_path / "x.zip")
    # never trained: the study is to run
    assert "run the study first" in rundir.Run(tmp_path / "empty").no_model_message("long")
    assert rundir.Run(run).models_deleted("long") == ["mhl"]


def test_qc_lines_count_the_flags_and_point_to_the_stain_mapping_when_most_cells_fail():
    import pandas as pd
    t = pd.DataFrame({"qc_empty_dna": [False] * 4, "qc_size": [True, True, True, False],
                      "qc_ok": [False, False, False, True]})
    lines = P.qc_lines(t)
    assert lines[0].startswith("QC: 3 of 4 cells flagged (qc_size 3;") and "--channels" in lines[1]
    few = t.assign(qc_size=[True, False, False, False], qc_ok=[False, True, True, True])
    assert len(P.qc_lines(few)) == 1 and "1 of 4" in P.qc_lines(few)[0]
    assert P.qc_lines(t.assign(qc_size=False, qc_ok=True)) == []


def test_qc_table_names_each_flag_in_words():
    t = pd.DataFrame({"qc_empty_third": [True, False, False], "qc_saturated_actin": [False, True, False],
                      "qc_size": [False, True, False], "qc_ok": [False, False, True]})
    q = P.qc_table(t)
    assert list(q.index) == ["third stain nearly empty", "F-actin saturated", "nucleus size outside the run's range",
                             "any flag"]
    assert q["cells flagged"].tolist() == [1, 1, 1, 2] and q.loc["F-actin saturated", "flag"] == "qc_saturated_actin"
