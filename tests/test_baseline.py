"""The classical baseline (cellstudy.learning.baseline) on synthetic cells: features, folds, files, read-back."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cellstudy.learning import baseline, folds as folds_mod, metrics
from cellstudy import config


def _cells(n=60, size=32, seed=0, n_groups=12):
    """Synthetic cells: a bright DNA blob (nucleus) inside a disc of cytoplasm (third stain and
    actin); the two classes differ ONLY in the actin channel (class 1: brighter and striped).
    Groups of n / n_groups cells, each group one class."""
    rng = np.random.default_rng(seed)
    per = -(-n // n_groups)
    labels = np.repeat(np.arange(n_groups) % 2, per)[:n]
    groups = np.repeat([f"field{g:02d}" for g in range(n_groups)], per)[:n].astype(object)
    yy, xx = np.mgrid[:size, :size]
    imgs = np.zeros((n, size, size, 3), np.float32)
    for i in range(n):
        cy, cx = (size - 1) / 2 + rng.uniform(-1.5, 1.5, 2)
        rc, rn = rng.uniform(0.36, 0.44) * size, rng.uniform(0.14, 0.2) * size
        d = np.hypot(yy - cy, xx - cx)
        cell, nuc = d <= rc, d <= rn
        third = cell * rng.uniform(0.5, 0.7)
        if labels[i]:
            stripes = 0.5 + 0.5 * np.sin(xx * rng.uniform(1.8, 2.4) + rng.uniform(0, 6))
            actin = cell * (0.55 + 0.35 * stripes)
        else:
            actin = cell * 0.35
        dna = nuc * rng.uniform(0.8, 1.0)
        img = np.stack([third, actin, dna], -1) + rng.normal(0, 0.03, (size, size, 3))
        imgs[i] = np.clip(img, 0, 1)
    return imgs, labels.astype(np.int64), groups


def _prepared(tmp_path, labels=None, n=60, seed=0, folds_to_run=None):
    imgs, y, g = _cells(n=n, seed=seed)
    if labels is not None:
        y = labels
    f = folds_mod.make_folds(y, g, n_splits=5, seed=0)
    ids = np.array([f"cell{i:03d}" for i in range(len(y))], dtype=object)
    sc = config.get_scale("ci", {"folds_to_run": folds_to_run})
    return SimpleNamespace(cohort=SimpleNamespace(images=imgs), labels=y, groups=g, cell_ids=ids, folds=f,
                           scale=sc, run_dir=Path(tmp_path))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """run_baseline on the synthetic cohort, all 5 folds (shared by the tests below)."""
    run = tmp_path_factory.mktemp("run")
    p = _prepared(run)
    res = baseline.run_baseline(p, "06_classical_baseline", seed=0, echo=lambda s: None)
    return p, res


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
def test_features_have_the_documented_columns_finite_and_deterministic():
    imgs, _, _ = _cells(n=6)
    f = baseline.cell_features(imgs)
    assert list(f.columns) == list(baseline.FEATURE_NAMES) and len(f) == 6
    assert 40 <= f.shape[1] <= 80
    assert np.isfinite(f.to_numpy()).all() and (f.dtypes == np.float64).all()
    pd.testing.assert_frame_equal(f, baseline.cell_features(imgs.copy()))
    # every column is documented in the module docstring and belongs to exactly one group
    doc = baseline.__doc__
    for s in ("shape_<m>_", "<s>_glcm_", "<s>_ring1", "nuc_cyto_log2ratio", "gradient_mean", "integrated"):
        assert s in doc
    grouped = [c for g in baseline.GROUPS for c in baseline.FEATURE_GROUPS[g]]
    assert sorted(grouped) == sorted(baseline.FEATURE_NAMES)
    assert {baseline.feature_stain(c) for c in f.columns} == {"dna", "actin", "third", "shape"}
    assert baseline.feature_stain("actin_mean") == "actin" and baseline.feature_stain("shape_cell_area") == "shape"
    with pytest.raises(ValueError, match="no known group"):
        baseline.feature_stain("red_mean")
    # the shape of the synthetic masks is what was drawn: nucleus ~ pi r^2, inside the cell
    m = baseline.cell_masks(imgs[0])
    assert not m["nucleus_fallback"] and not m["cell_fallback"]
    assert (m["nucleus"] & ~m["cell"]).sum() == 0 and m["cytoplasm"].any()
    assert 0.1 < f["shape_nucleus_cell_area_ratio"].iloc[0] < 0.5
    assert f["dna_nuc_cyto_log2ratio"].iloc[0] > 2


def test_flat_and_empty_channels_fall_back_to_a_central_disc():
    flat = np.zeros((2, 24, 24, 3), np.float32)
    flat[1] = 0.5
    m = baseline.cell_masks(flat[0])
    assert m["nucleus_fallback"] and m["cell_fallback"] and m["nucleus"][12, 12]
    f = baseline.cell_features(flat)
    assert np.isfinite(f.to_numpy()).all()


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 32, 32), np.float32), r"shape \(4, 32, 32\).*\(N, H, W, 3\)"),
    (np.zeros((4, 32, 32, 4), np.float32), r"shape \(4, 32, 32, 4\)"),
    (np.zeros((32, 32, 3), np.float32), r"shape \(32, 32, 3\)"),
    (np.zeros((2, 4, 4, 3), np.float32), "at least 8 x 8"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        baseline.cell_features(bad)


def test_nan_input_names_the_cells():
    imgs, _, _ = _cells(n=4)
    imgs[2, 3, 3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values \(cells \[2\]"):
        baseline.cell_features(imgs)


def test_no_tensorflow():
    code = ("import sys, numpy as np; import cellstudy.learning.baseline as b; "
            "b.cell_features(np.zeros((1, 16, 16, 3), np.float32)); b.make_classifier('rf'); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=config.REPO_ROOT)
    src = Path(baseline.__file__).read_text()
    assert "tensorflow" not in src.replace("No TensorFlow", "") and "import keras" not in src


def test_unknown_classifier_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown classifier 'svm'; expected one of \['rf', 'logreg'\]"):
        baseline.make_classifier("svm", 0)
    rf = baseline.make_classifier("rf", 3)
    assert rf.named_steps["clf"].get_params()["random_state"] == 3
    assert rf.named_steps["clf"].get_params()["n_estimators"] == 500
    assert baseline.make_classifier("logreg", 0).named_steps["clf"].get_params()["max_iter"] == 5000


# ---------------------------------------------------------------------------------------------
# the cross-validated baseline
# ---------------------------------------------------------------------------------------------
def test_run_baseline_separates_classes_that_differ_in_actin(fitted):
    p, res = fitted
    auc = res.tidy[(res.tidy.metric == "auc_macro") & (res.tidy.regime == "long")]
    assert set(auc["network"]) == {"rf", "logreg"} and set(auc["family"]) == {"Classical"}
    assert set(auc["fold"]) == set(range(5))
    assert auc[auc.network == "rf"]["value"].mean() > 0.97
    # one prediction per test cell per regime, short == long (a classifier has no epochs)
    pr = res.predictions
    for name in ("rf", "logreg"):
        for k in range(5):
            got = pr[(pr.network == name) & (pr.fold == k) & (pr.regime == "long")]
            assert set(got["cell_id"]) == set(p.cell_ids[p.folds == k]) and len(got) == (p.folds == k).sum()
        d = p.run_dir / "training" / name / "fold0"
        np.testing.assert_array_equal(np.load(d / "proba_short.npy"), np.load(d / "proba_long.npy"))
        assert np.load(d / "proba_long.npy").dtype == np.float32
    step = p.run_dir / "06_classical_baseline"
    for f in ("metrics_tidy.csv", "summary_long.csv", "predictions.csv", "timings.csv", "features.parquet",
              "features.csv"):
        assert (step / f).is_file(), f
    cached = pd.read_parquet(step / "features.parquet")
    assert list(cached["cell_id"]) == list(p.cell_ids) and list(cached.columns[1:]) == list(baseline.FEATURE_NAMES)


def test_top_stain_is_actin(fitted):
    p, _ = fitted
    imp = baseline.stain_importance(p, p.run_dir, n_repeats=3, seed=0, step="06_classical_baseline")
    assert list(imp.columns[:5]) == ["classifier", "group", "auc_drop_mean", "auc_drop_sd", "n_folds"]
    assert len(imp) == 8 and set(imp["group"]) == set(baseline.GROUPS)
    for name in ("rf", "logreg"):
        sub = imp[imp.classifier == name]
        assert sub.iloc[0]["group"] == "actin", sub
        assert sub.iloc[0]["auc_drop_mean"] > 0.05 and (sub["n_folds"] == 5).all()
    # deterministic (features recomputed here, not read from the step's cache)
    again = baseline.stain_importance(p, p.run_dir, n_repeats=3, seed=0, classifiers=["logreg"])
    pd.testing.assert_frame_equal(imp[imp.classifier == "logreg"].reset_index(drop=True), again)


def test_no_leakage_each_fold_model_saw_only_its_training_folds(fitted):
    p, _ = fitted
    for name in ("rf", "logreg"):
        for k in range(5):
            d = p.run_dir / "training" / name / f"fold{k}"
            done = json.loads((d / "done.json").read_text())
            cells = pd.read_csv(d / "test_cells.csv", dtype={"cell_id": str, "group": str})
            assert list(cells.columns) == ["cell_id", "group", "label"]
            train_ids = set(done["train_cells"])
            assert train_ids == set(p.cell_ids[p.folds != k])
            assert not train_ids & set(cells["cell_id"])
            train_groups = set(p.groups[np.isin(p.cell_ids, list(train_ids))])
            assert not train_groups & set(cells["group"])  # grouped: no field on both sides
            assert done["n_train"] == len(train_ids) and done["n_test"] == len(cells)
            model = baseline.load_fold_model(p.run_dir, name, k)
            assert model.named_steps["scale"].n_samples_seen_ == len(train_ids)
            np.testing.assert_array_equal(np.load(d / "y_test.npy"), cells["label"].to_numpy())


def test_finished_folds_are_read_back_not_refitted(fitted):
    p, res = fitted
    files = sorted((p.run_dir / "training").glob("*/fold*/model.joblib"))
    assert len(files) == 10
    before = {f: f.stat().st_mtime_ns for f in files}
    lines = []
    again = baseline.run_baseline(p, "06_classical_baseline", seed=0, echo=lines.append)
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert sum("(read back)" in s for s in lines) == 10 and any("read back from" in s for s in lines)
    pd.testing.assert_frame_equal(again.tidy, res.tidy)


def test_another_seed_refits(tmp_path):
    p = _prepared(tmp_path, folds_to_run=[0])
    baseline.run_baseline(p, "s", seed=0, echo=lambda s: None, classifiers=["logreg"])
    f = p.run_dir / "training" / "logreg" / "fold0" / "done.json"
    lines = []
    baseline.run_baseline(p, "s", seed=1, echo=lines.append, classifiers=["logreg"])
    assert json.loads(f.read_text())["seed"] == 1 and any("refitting" in s for s in lines)
    assert not (p.run_dir / "training" / "logreg" / "fold1").exists()  # folds_to_run respected


def test_collect_lists_the_baseline_as_family_classical(fitted):
    from cellstudy.learning import experiment

    p, res = fitted
    col = experiment.collect(p.run_dir, out=p.run_dir / "results")
    rows = col.tidy[col.tidy.network.isin(["rf", "logreg"])]
    assert set(rows["network"]) == {"rf", "logreg"} and set(rows["family"]) == {"Classical"}
    assert set(rows["regime"]) == {"short", "long"}
    mine = res.tidy.sort_values(["network", "fold", "regime", "metric"]).reset_index(drop=True)
    back = rows.sort_values(["network", "fold", "regime", "metric"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, back)
    assert metrics.DISPLAY_NAMES["rf"] == "Random forest"
    assert list(metrics.NETWORK_ORDER)[-2:] == ["rf", "logreg"]


def test_predict_proba_is_the_mean_of_the_fold_models(fitted):
    p, _ = fitted
    new, _, _ = _cells(n=12, seed=7)
    ens = baseline.predict_proba(p.run_dir, "rf", new)
    feats = baseline.cell_features(new)
    mean = np.mean([baseline.load_fold_model(p.run_dir, "rf", k).predict_proba(feats) for k in range(5)], axis=0)
    np.testing.assert_allclose(ens, mean)
    assert ens.shape == (12, 2) and np.allclose(ens.sum(1), 1)
    two = baseline.predict_proba(p.run_dir, "rf", new, folds=[0, 3])
    np.testing.assert_allclose(two, np.mean([baseline.load_fold_model(p.run_dir, "rf", k).predict_proba(feats)
                                             for k in (0, 3)], axis=0))
    with pytest.raises(FileNotFoundError, match=r"fold 7 is not fitted.*fold7"):
        baseline.predict_proba(p.run_dir, "rf", new, folds=[0, 7])
    with pytest.raises(FileNotFoundError, match="no fitted fold"):
        baseline.predict_proba(p.run_dir / "nothing", "logreg", new)


@pytest.mark.slow
def test_shuffled_labels_score_chance(tmp_path):
    imgs, y, g = _cells()
    rng = np.random.default_rng(1)
    # shuffle the class of whole groups (a group must hold one class): labels unrelated to the cells
    gl = {gg: int(v) for gg, v in zip(np.unique(g), rng.permutation(np.arange(len(np.unique(g))) % 2))}
    y_shuf = np.array([gl[gg] for gg in g], dtype=np.int64)
    assert not np.array_equal(y_shuf, y)
    p = _prepared(tmp_path, labels=y_shuf)
    res = baseline.run_baseline(p, "s", seed=0, echo=lambda s: None)
    for name in ("rf", "logreg"):
        v = res.tidy[(res.tidy.network == name) & (res.tidy.metric == "auc_macro") & (res.tidy.regime == "long")]
        v = v["value"].to_numpy()
        lo, hi = sps.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=v.std(ddof=1) / np.sqrt(len(v)))
        assert lo <= 0.5 <= hi, (name, v, lo, hi)


def test_stale_feature_cache_is_recomputed_and_same_values_are_read_back(tmp_path):
    p = _prepared(tmp_path, folds_to_run=[0])
    baseline.run_baseline(p, "s", seed=0, echo=lambda s: None, classifiers=["logreg"])
    meta_p = p.run_dir / "s" / "features.json"
    meta = json.loads(meta_p.read_text())
    meta["features_code_sha256"] = "other feature code"
    meta_p.write_text(json.dumps(meta))
    lines = []
    baseline.run_baseline(p, "s", seed=0, echo=lines.append, classifiers=["logreg"])
    assert any("computed" in s for s in lines)          # the cache was not trusted ...
    assert any("(read back)" in s for s in lines)       # ... but the same values: no refit
    # other feature values (here: other cells' images) -> the fold is refitted
    p.cohort.images = p.cohort.images[:, ::-1].copy()
    lines = []
    baseline.run_baseline(p, "s", seed=0, echo=lines.append, classifiers=["logreg"])
    assert any("refitting" in s for s in lines)
