"""cellstudy.report.external: the unseen-field test set, its metrics and the scoring of a run."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cellstudy import config, data
from cellstudy.report import external

MANIFESTS = Path(__file__).resolve().parent.parent / "data_manifest"


def _read(name: str) -> pd.DataFrame:
    return pd.read_csv(MANIFESTS / f"{name}.csv", dtype=str, keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# The external cohort
# ---------------------------------------------------------------------------------------------
def test_external_cohort_for():
    assert external.external_cohort_for("bbbc021-paper") == "bbbc021-unseen"
    assert external.external_cohort_for("bbbc021-full") is None
    assert external.external_cohort_for("rxrx1-cells") is None


def test_unseen_shares_no_field_and_no_cell_with_paper():
    paper, full, unseen = _read("bbbc021-paper"), _read("bbbc021-full"), _read("bbbc021-unseen")
    external.check_disjoint(paper, unseen)                       # does not raise
    assert not set(paper.group) & set(unseen.group)
    assert not set(paper.cell_id) & set(unseen.cell_id)
    # every field of the full set is in exactly one of the two; unseen fields are whole
    assert set(paper.group) | set(unseen.group) == set(full.group)
    assert unseen.groupby("group").size().eq(40).all()
    assert set(unseen.cell_id) == set(full.cell_id[~full.group.isin(set(paper.group))])
    # class counts: 240 normal in 6 DMSO fields, 320 abnormal in 8 treated fields
    assert unseen.label.value_counts().to_dict() == {"1": 320, "0": 240}
    assert unseen.groupby("label").group.nunique().to_dict() == {"0": 6, "1": 8}
    assert (unseen.class_name[unseen.label == "0"] == "DMSO").all()
    # rows in the full manifest's order, byte-identical columns
    sub = full[full.cell_id.isin(set(unseen.cell_id))].reset_index(drop=True)
    pd.testing.assert_frame_equal(sub, unseen)


def test_check_disjoint_names_shared_fields_and_cells():
    a = pd.DataFrame({"cell_id": ["c1", "c2", "c3"], "group": ["F1", "F1", "F2"]})
    b = pd.DataFrame({"cell_id": ["c3", "c9"], "group": ["F2", "F7"]})
    with pytest.raises(ValueError, match=r"shares 1 field\(s\) \(F2\) and 1 cell\(s\) \(c3\)"):
        external.check_disjoint(a, b)
    c = pd.DataFrame({"cell_id": ["x"], "group": ["F1"]})
    with pytest.raises(ValueError, match=r"1 field\(s\) \(F1\) with"):
        external.check_disjoint(a, c)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['group'\]"):
        external.check_disjoint(a, pd.DataFrame({"cell_id": ["z"]}))
    external.check_disjoint(a, pd.DataFrame({"cell_id": ["z"], "group": ["F9"]}))


def test_full_and_paper_manifests_are_refused():
    full, unseen = _read("bbbc021-full"), _read("bbbc021-unseen")
    with pytest.raises(ValueError, match=r"shares 14 field\(s\) .* and 560 cell\(s\)"):
        external.check_disjoint(full, unseen, cohort="bbbc021-full")


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def _fields(n_neg=6, n_pos=8, per=40):
    g = np.repeat(np.arange(n_neg + n_pos), per)
    return g.astype(str), (g >= n_neg).astype(int)


def test_bootstrap_perfect_separation_gives_ci_1_1():
    g, y = _fields()
    r = external.field_bootstrap_auc(y, y + 0.01 * np.arange(len(y)) / len(y), g, n_boot=500, seed=0)
    assert r["auc"] == 1.0 and r["ci_low"] == 1.0 and r["ci_high"] == 1.0
    assert r["n_boot"] == 500 and r["stratified"] and r["n_fields"] == 14


def test_bootstrap_random_covers_half_and_is_seeded():
    g, y = _fields()
    rng = np.random.default_rng(3)
    # random scores with a field effect (cells of a field correlated) and cell noise
    s = rng.normal(size=14)[g.astype(int)] + rng.normal(size=len(y))
    r = external.field_bootstrap_auc(y, s, g, n_boot=2000, seed=1)
    assert r["auc"] == pytest.approx(roc_auc_score(y, s))
    assert r["ci_low"] < 0.5 < r["ci_high"]
    # clustering widens the interval: wider than a cell-level bootstrap would be (~ +-0.05)
    assert r["ci_high"] - r["ci_low"] > 0.2
    assert external.field_bootstrap_auc(y, s, g, n_boot=2000, seed=1) == r
    assert external.field_bootstrap_auc(y, s, g, n_boot=2000, seed=2) != r


def test_bootstrap_resample_formula_matches_replicated_cells():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(7), [5, 3, 4, 6, 2, 5, 4])
    y = (g >= 3).astype(int)
    s = np.round(rng.random(len(y)), 1)                         # ties on purpose
    fields, codes = np.unique(g.astype(str), return_inverse=True)
    c = external._pair_counts(y, s, codes, len(fields))
    assert c.sum() / ((y == 1).sum() * (y == 0).sum()) == pytest.approx(roc_auc_score(y, s))
    w = np.array([2, 0, 1, 1, 3, 0, 1])                         # one resample's field counts
    rep = np.concatenate([np.flatnonzero(codes == f).repeat(1) for f in range(7) for _ in range(w[f])])
    n_pos = np.bincount(codes, weights=y == 1)
    n_neg = np.bincount(codes, weights=y == 0)
    assert w @ c @ w / ((w @ n_pos) * (w @ n_neg)) == pytest.approx(roc_auc_score(y[rep], s[rep]))


def test_bootstrap_unstratified_and_one_class():
    g, y = _fields(2, 2, 5)
    r = external.field_bootstrap_auc(y, y.astype(float), g, n_boot=300, seed=0, stratify=False)
    assert not r["stratified"] and r["n_dropped"] > 0 and r["n_boot"] + r["n_dropped"] == 300
    one = external.field_bootstrap_auc(np.zeros(10, int), np.linspace(0, 1, 10), np.arange(10) % 3)
    assert np.isnan(one["auc"]) and one["n_boot"] == 0


def test_calibration_bins_sum_to_n_and_ece():
    rng = np.random.default_rng(0)
    p = rng.random(337)
    p[:3] = [0.0, 1.0, 0.1]
    y = (rng.random(337) < p).astype(int)
    t = external.calibration_table(y, p)
    assert len(t) == 10 and t["count"].sum() == 337
    assert t.loc[9, "count"] >= 1 and t.loc[1, "lower"] == pytest.approx(0.1)
    full = t[t["count"] > 0]
    assert ((full.mean_predicted >= full.lower) & (full.mean_predicted <= full.upper)).all()
    ece = external.expected_calibration_error(t)
    assert 0 <= ece < 0.15                                     # calibrated by construction
    # a perfectly wrong model: ECE = 1, Brier = 1
    yy = np.array([0, 1, 0, 1])
    assert external.expected_calibration_error(external.calibration_table(yy, 1.0 - yy)) == 1.0
    assert external.brier_score(yy, 1.0 - yy) == 1.0
    empty = external.calibration_table(np.array([1, 1]), np.array([0.95, 0.99]))
    assert empty["count"].tolist() == [0] * 9 + [2] and np.isnan(empty.loc[0, "mean_predicted"])


# ---------------------------------------------------------------------------------------------
# evaluate: a tiny synthetic run folder with two real fold models
# ---------------------------------------------------------------------------------------------
S = 32


def _identity_zca() -> dict:
    return {"method": "zca-channels", "eps": 1e-5, "fitted": True, "n_images": 1, "n_pixels": 1,
            "mean": [0.0, 0.0, 0.0], "cov": np.eye(3).tolist(), "eigenvalues": [1.0, 1.0, 1.0],
            "W": np.eye(3).tolist()}


def _make_run(tmp_path: Path, train_cells: pd.DataFrame, folds=(0, 1), network="mhl"):
    """<run>/training/<network>/fold<k>: model_long.keras (a freshly initialised tiny model per
    fold), done.json, zca.json (fold 0: identity; others: fitted on random images),
    test_cells.csv. Returns (run_dir, {fold: model}, {fold: ZCAWhitening})."""
    import keras

    from cellstudy.learning import augment, models

    run = tmp_path / "run"
    mods, zcas = {}, {}
    for k in folds:
        fd = run / "training" / network / f"fold{k}"
        fd.mkdir(parents=True)
        keras.utils.set_random_seed(10 + k)
        m = models.build(network, S)
        m.save(fd / "model_long.keras")
        if k == 0:
            state = _identity_zca()
        else:
            rng = np.random.default_rng(k)
            state = augment.ZCAWhitening().fit(rng.random((4, S, S, 3), dtype=np.float32) * [1, .5, .2]).state()
        (fd / "zca.json").write_text(json.dumps(state))
        (fd / "done.json").write_text(json.dumps({"status": "done"}))
        train_cells.to_csv(fd / "test_cells.csv", index=False)
        mods[k], zcas[k] = m, augment.ZCAWhitening.from_state(json.loads((fd / "zca.json").read_text()))
    return run, mods, zcas


def _synthetic_external(n_fields=4, per=3, size=S):
    rng = np.random.default_rng(0)
    n = n_fields * per
    g = np.repeat([f"EXT{f}" for f in range(n_fields)], per).astype(object)
    y = (np.repeat(np.arange(n_fields), per) >= n_fields // 2).astype(np.int64)
    images = rng.random((n, size, size, 3), dtype=np.float32)
    ids = np.array([f"ext/{i}" for i in range(n)], dtype=object)
    table = pd.DataFrame({"cell_id": ids, "group": g, "label": y})
    coh = data.Cohort(name="synthetic-ext", root=Path("."), images=images, labels=y, groups=g, cell_ids=ids,
                      sha256=np.array([f"k{i}" for i in range(n)], dtype=object), table=table, scaling={})
    return coh


@pytest.fixture
def synthetic(monkeypatch):
    coh = _synthetic_external()
    calls = []
    real_manifest = data.load_manifest

    def load_manifest(name):
        if name == "synthetic-ext":
            return coh.table.copy()
        return real_manifest(name)

    def load_cohort(name, root=None, **kw):
        assert name == "synthetic-ext"
        return coh

    def preprocess_batch(images, keys, size, params, **kw):
        calls.append((len(images), size, dict(params)))
        return np.asarray(images, np.float32)

    monkeypatch.setattr(data, "load_manifest", load_manifest)
    monkeypatch.setattr(data, "load_cohort", load_cohort)
    from cellstudy.data import preprocess
    monkeypatch.setattr(preprocess, "preprocess_batch", preprocess_batch)
    monkeypatch.setitem(sys.modules, "cellstudy.learning.baseline", None)   # no baseline: a note
    return coh, calls


def _train_cells():
    return pd.DataFrame({"cell_id": ["run/a", "run/b"], "group": ["RUN1", "RUN2"], "label": [0, 1]})


def test_evaluate_ensemble_is_mean_of_whitened_fold_predictions(tmp_path, synthetic):
    coh, calls = synthetic
    run, mods, zcas = _make_run(tmp_path, _train_cells())
    (run / "training" / "vit" / "fold0").mkdir(parents=True)           # unfinished: a note
    res = external.evaluate(run, "synthetic-run", "ci", overrides={"image_size": S}, external="synthetic-ext",
                            networks=["mhl", "vit", "rf"], n_boot=200, echo=lambda s: None)
    assert calls == [(len(coh), S, config.get_scale("ci")["preprocess"])]
    per_fold = [np.asarray(mods[k].predict(zcas[k].transform(coh.images), verbose=0), np.float64) for k in (0, 1)]
    assert not np.allclose(per_fold[0], per_fold[1])                   # two different models
    pr = res.predictions
    assert len(pr) == len(coh) and set(pr.network) == {"mhl"} and (pr.family == "MHL").all()
    np.testing.assert_allclose(pr[["proba_normal", "proba_abnormal"]].to_numpy(),
                               (per_fold[0] + per_fold[1]) / 2, atol=1e-5)
    np.testing.assert_allclose(pr.fold_sd, np.std([p[:, 1] for p in per_fold], axis=0, ddof=1), atol=1e-5)
    assert pr.cell_id.tolist() == list(coh.cell_ids) and pr.y_true.tolist() == coh.labels.tolist()
    m = res.metrics.set_index("network").loc["mhl"]
    assert m.n_folds == 2 and m.n_cells == len(coh) and m.n_fields == 4
    assert m.auc == pytest.approx(roc_auc_score(coh.labels, pr.proba_abnormal))
    assert m.auc_ci_low <= m.auc <= m.auc_ci_high
    assert 0 <= m.brier <= 1 and 0 <= m.ece <= 1
    cal = res.calibration
    assert cal.groupby("network")["count"].sum().to_dict() == {"mhl": len(coh)}
    notes = res.notes
    assert ((notes.network == "vit") & (notes.status == "unfinished")).any()
    assert notes.status.str.contains("baseline").any()
    paths = external.write(res, tmp_path / "out")
    for f in ("external_predictions.csv", "external_predictions.parquet", "external_metrics.csv",
              "external_calibration.csv", "external_notes.csv"):
        assert (tmp_path / "out" / f).is_file()
    pd.testing.assert_frame_equal(pd.read_parquet(paths["predictions_parquet"]), pr)


class _FoldModel:
    def __init__(self, shift):
        self.shift = shift

    def predict_proba(self, feats):
        p = np.clip(np.asarray(feats)[:, 2] * 0.5 + self.shift, 0, 1)
        return np.stack([1 - p, p], axis=1)


def _baseline_run(tmp_path, folds=(0, 1), fitted=True):
    run = tmp_path / "run"
    for name in ("rf", "logreg"):
        for k in folds:
            fd = run / "training" / name / f"fold{k}"
            fd.mkdir(parents=True)
            if fitted:
                (fd / "done.json").write_text("{}")
                (fd / "model.joblib").write_bytes(b"")
    return run


def test_evaluate_scores_the_baseline_per_fold(tmp_path, synthetic, monkeypatch):
    coh, _ = synthetic
    run = _baseline_run(tmp_path)
    (run / "training" / "rf" / "fold2").mkdir()                         # unfitted: a note
    seen = []
    fake = types.ModuleType("cellstudy.learning.baseline")
    fake.cell_features = lambda images: (seen.append(images.shape), images.mean(axis=(1, 2)))[1]
    fake.load_fold_model = lambda run_dir, name, k: _FoldModel(0.1 * k)
    monkeypatch.setitem(sys.modules, "cellstudy.learning.baseline", fake)
    res = external.evaluate(run, "synthetic-run", "ci", overrides={"image_size": S}, external="synthetic-ext",
                            n_boot=100, echo=lambda s: None)
    assert seen == [coh.images.shape]                                  # stored size, computed once
    assert res.metrics.network.tolist() == ["rf", "logreg"] and (res.metrics.n_folds == 2).all()
    assert (res.metrics.family == "Classical").all()
    b = coh.images.mean(axis=(1, 2))[:, 2] * 0.5
    rf = res.predictions[res.predictions.network == "rf"]
    np.testing.assert_allclose(rf.proba_abnormal, b + 0.05, atol=1e-9)
    np.testing.assert_allclose(rf.fold_sd, np.full(len(coh), np.std([0, 0.1], ddof=1)), atol=1e-9)
    n = res.notes
    assert ((n.network == "rf") & (n.fold == 2) & (n.status == "unfinished")).any()
    assert ((n.network == "mhl") & (n.status == "not trained")).any()

    # only predict_proba (the fold-ensemble mean): scored, fold_sd NaN, a note says so
    old = types.ModuleType("cellstudy.learning.baseline")
    old.cell_features = fake.cell_features
    old.predict_proba = lambda run_dir, name, images: _FoldModel(0.2).predict_proba(images.mean(axis=(1, 2)))
    monkeypatch.setitem(sys.modules, "cellstudy.learning.baseline", old)
    res = external.evaluate(run, "synthetic-run", "ci", overrides={"image_size": S}, external="synthetic-ext",
                            networks=["logreg"], n_boot=100, echo=lambda s: None)
    np.testing.assert_allclose(res.predictions.proba_abnormal, b + 0.2, atol=1e-9)
    assert res.predictions.fold_sd.isna().all() and (res.notes.status == "ensemble only").any()


def test_evaluate_with_the_real_baseline_module(tmp_path, synthetic, monkeypatch):
    monkeypatch.delitem(sys.modules, "cellstudy.learning.baseline", raising=False)
    baseline = pytest.importorskip("cellstudy.learning.baseline")
    if not all(callable(getattr(baseline, f, None)) for f in ("cell_features", "load_fold_model",
                                                                "make_classifier")):
        pytest.skip("cellstudy.learning.baseline lacks cell_features / load_fold_model / make_classifier")
    import joblib

    coh, _ = synthetic
    run = _baseline_run(tmp_path, folds=(0,))
    feats = baseline.cell_features(coh.images)
    fitted = {}
    for name in ("rf", "logreg"):
        fitted[name] = baseline.make_classifier(name, seed=0).fit(feats, coh.labels)
        joblib.dump(fitted[name], run / "training" / name / "fold0" / "model.joblib")
    res = external.evaluate(run, "synthetic-run", "ci", overrides={"image_size": S}, external="synthetic-ext",
                            networks=["rf", "logreg"], n_boot=100, echo=lambda s: None)
    assert res.metrics.network.tolist() == ["rf", "logreg"]
    for name in ("rf", "logreg"):
        got = res.predictions.loc[res.predictions.network == name, "proba_abnormal"].to_numpy()
        np.testing.assert_allclose(got, fitted[name].predict_proba(feats)[:, 1], atol=1e-12)


def test_evaluate_refuses_a_shared_field(tmp_path, synthetic):
    coh, _ = synthetic
    run = tmp_path / "run"
    fd = run / "training" / "mhl" / "fold0"
    fd.mkdir(parents=True)
    pd.DataFrame({"cell_id": ["run/a"], "group": ["EXT2"], "label": [1]}).to_csv(fd / "test_cells.csv", index=False)
    with pytest.raises(ValueError, match=r"shares 1 field\(s\) \(EXT2\)"):
        external.evaluate(run, "synthetic-run", "ci", external="synthetic-ext", echo=lambda s: None)
    with pytest.raises(ValueError, match="has no external test set"):
        external.evaluate(run, "rxrx1-cells", "ci", echo=lambda s: None)


def test_evaluate_refuses_the_full_cohort(tmp_path):
    (tmp_path / "training").mkdir()
    with pytest.raises(ValueError, match=r"shares 14 field\(s\) .* with cohort 'bbbc021-full'"):
        external.evaluate(tmp_path, "bbbc021-full", "ci", external="bbbc021-unseen", echo=lambda s: None)


def test_evaluate_checks_the_runs_folds_file(tmp_path):
    from cellstudy.learning import folds

    unseen = _read("bbbc021-unseen")
    rows = unseen.groupby("group").head(1).iloc[:2].assign(fold=[0, 1])[["cell_id", "group", "label", "fold"]]
    (tmp_path / "training").mkdir()
    (tmp_path / "folds").mkdir()
    fp = tmp_path / "folds" / "bbbc021-paper.csv"
    fp.write_text(f"{folds.FOLDS_MAGIC}\n# {{}}\n" + rows.to_csv(index=False))
    with pytest.raises(ValueError, match=r"shares 2 field\(s\) .* with the run.s folds file"):
        external.evaluate(tmp_path, "bbbc021-paper", "ci", echo=lambda s: None)


@pytest.mark.slow
def test_evaluate_on_the_real_unseen_cells(tmp_path, shared_data, monkeypatch):
    """The same with the real bbbc021-unseen cells (manifest verified, checksums checked, real
    preprocessing at 32 px): 560 predictions, both classes, one fold model."""
    paper = _read("bbbc021-paper")
    run, mods, zcas = _make_run(tmp_path, paper[["cell_id", "group", "label"]], folds=(0,))
    monkeypatch.setitem(sys.modules, "cellstudy.learning.baseline", None)
    res = external.evaluate(run, "bbbc021-paper", "ci", overrides={"image_size": S}, data_root=shared_data,
                            networks=["mhl"], n_boot=100, echo=lambda s: None)
    assert res.external == "bbbc021-unseen"
    assert res.info["class_counts"] == {"normal": 240, "abnormal": 320} and res.info["n_fields"] == 14
    pr = res.predictions
    assert len(pr) == 560 and pr.fold_sd.isna().all() and (pr.n_folds == 1).all()
    assert not set(pr.group) & set(paper.group)
    m = res.metrics.iloc[0]
    assert m.n_fields == 14 and m.n_folds == 1 and 0 <= m.auc <= 1


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def test_reliability_and_external_auc_figures(tmp_path):
    from matplotlib.figure import Figure

    from cellstudy.learning import metrics
    from cellstudy.report import plots

    rng = np.random.default_rng(0)
    g, y = _fields(3, 3, 20)
    cals, rows = [], []
    for net, fam in (("mhl", "MHL"), ("rf", "baseline"), ("vgg16", "DL")):
        p = np.clip(y * 0.6 + rng.random(len(y)) * 0.4, 0, 1)
        m, cal = external.score(y, np.stack([1 - p, p], axis=1), g, n_boot=100)
        cals.append(cal.assign(network=net))
        rows.append({"network": net, "family": fam, **m})
    cal, met = pd.concat(cals), pd.DataFrame(rows)
    fig = plots.reliability(cal, ncols=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert fig.axes[0].get_title().startswith("VGG16")           # NETWORK_ORDER first, then others
    fig.savefig(tmp_path / "rel.png")
    fig2 = plots.external_auc(met)
    ticks = {t.get_text(): t.get_position()[1] for t in fig2.axes[0].get_yticklabels()}
    names = [metrics.DISPLAY_NAMES.get(n, n) for n in ("vgg16", "mhl", "rf")]
    assert sorted(ticks, key=ticks.get, reverse=True) == names                     # top to bottom
    fig2.savefig(tmp_path / "auc.png")
    with pytest.raises(ValueError, match="not in calibration_df"):
        plots.reliability(cal, networks=["vit"])


def _metrics_rows(n_folds=(5, 5)):
    return pd.DataFrame({"network": ["mhl", "logreg"], "family": ["MHL", "Classical"],
                         "n_cells": [560, 560], "n_fields": [14, 14], "n_folds": list(n_folds),
                         "auc": [0.92666, 0.9421], "auc_ci_low": [0.8804, 0.91], "auc_ci_high": [0.96, 0.97049],
                         "balanced_accuracy": [0.84166, 0.86], "accuracy": [0.8428, 0.87],
                         "brier": [0.1135, 0.1], "ece": [0.0401, 0.03], "n_boot": [2000, 2000]})


def test_book_table_is_narrow_and_keeps_the_numbers():
    t = external.book_table(_metrics_rows(), {"mhl": "MHL", "logreg": "logistic regression"}.get)
    assert list(t.index) == ["MHL", "logistic regression"]
    assert list(t.columns) == ["family", "AUC (95% CI)", "balanced accuracy", "accuracy", "Brier", "ECE"]
    assert t.loc["MHL", "AUC (95% CI)"] == "0.927 (0.880–0.960)"
    assert t.loc["logistic regression", "AUC (95% CI)"] == "0.942 (0.910–0.970)"
    assert t.loc["MHL", "balanced accuracy"] == "0.842"
    # sizes that differ between models (a fold not scored) get their column
    t2 = external.book_table(_metrics_rows(n_folds=(4, 5)))
    assert t2.loc["mhl", "cells / fields / folds"] == "560 / 14 / 4"
