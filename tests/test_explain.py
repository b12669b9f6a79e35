"""cellstudy.explain on a tiny real run (mhl + rgb, folds 0-1, ci scale) and the XAI figures."""
import json
import os
import time

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cellstudy.learning import augment
from cellstudy import config, explain
from cellstudy.explain import xai, figures as xai_figures

pytestmark = pytest.mark.slow

FAST = explain.XaiParams(ig_steps=4, faithfulness_steps=4, occlusion_patch=8, n_boot=200)
MAX_CELLS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data, ci_run):
    """mhl and rgb on folds 0-1, copied from the session's ci run (read back, not retrained)."""
    import shutil

    from cellstudy.learning import experiment
    from cellstudy import study

    run = tmp_path_factory.mktemp("xai_run")
    shutil.copytree(ci_run / "folds", run / "folds")
    for net in ("mhl", "rgb"):
        for k in (0, 1):
            shutil.copytree(ci_run / "training" / net / f"fold{k}", run / "training" / net / f"fold{k}")
    p = study.prepare("bbbc021-paper", "ci", run, data_root=str(shared_data), progress=False,
                      overrides={"networks": ["mhl", "rgb"], "folds_to_run": [0, 1]})
    quiet = {"echo": lambda s: None, "progress": lambda e: None}
    experiment.run_networks(p, "MHL", "05_mhl_family", **quiet)
    experiment.run_networks(p, "RGB", "04_rgb_family", **quiet)
    return p


@pytest.fixture(scope="module")
def explained(trained):
    lines = []
    t0 = time.perf_counter()
    res = explain.explain_run(trained, max_cells=MAX_CELLS, params=FAST, echo=lines.append)
    return res, lines, time.perf_counter() - t0


def test_shapes_ranges_and_files(trained, explained):
    res, lines, _ = explained
    S = trained.images.shape[1]
    assert res.networks == ["rgb", "mhl"]  # registry order
    assert len(lines) == 4 and all("xai" in s and "cells" in s for s in lines)
    assert res.layers("rgb") == ["feat_r", "feat_g", "feat_b", "combined"]
    assert res.layers("mhl") == ["cnn_relu3", "combined"]
    for net in res.networks:
        s = res.stacked(net)
        n = len(s["label"])
        assert n == 2 * MAX_CELLS
        assert s["images"].shape == (n, S, S, 3)
        for layer in res.layers(net):
            m = s[f"cam/{layer}"]
            assert m.shape == (n, 2, S, S)
            assert m.min() >= 0 and m.max() <= 1
        assert s["cam/combined"].max() > 0.99  # min-max scaled once
        # the per-layer maps of a cell share one maximum: the strongest is 1 (or all are 0)
        per = np.stack([s[f"cam/{k}"] for k in res.layers(net) if k != "combined"]).max(axis=(0, 3, 4))
        assert np.all((np.abs(per - 1) < 1e-3) | (per == 0))
        hw = res.map_hw(net)
        assert set(hw) == set(res.layers(net)) and all(min(v) >= 4 for v in hw.values())
        assert s["ig"].shape == s["occlusion"].shape == (n, S, S)
        assert np.allclose(s["proba"].sum(1), 1, atol=1e-5)
        # balanced selection: half of each class per fold
        for k in (0, 1):
            assert np.bincount(s["label"][s["fold"] == k], minlength=2).tolist() == [3, 3]
    r = res.ratios
    assert set(r["class"]) == {"normal", "abnormal"}
    assert r[["positive_ratio", "negative_ratio"]].stack().between(0, 1).all()
    assert ((r.positive_ratio + r.negative_ratio) <= 1).all()
    assert set(r[r.network == "rgb"]["shape"]) == {"merged", "third", "actin", "dna"}
    assert set(r[r.network == "mhl"]["shape"]) == {"merged"}
    ci = res.channel_importance
    assert len(ci) == 2 * 3 * 2 and (ci.ci_low <= ci.mean_drop + 1e-12).all() and (ci.mean_drop <= ci.ci_high + 1e-12).all()
    f = res.faithfulness
    assert set(f.method) == set(explain.METHODS) and set(f.curve) == {"deletion", "insertion"}
    assert f[["auc", "random_auc"]].stack().between(0, 1).all()
    assert len(res.gallery) and set(res.gallery.kind) == {"confident", "ambiguous"}
    gm = res.gmeans["mhl"][1]
    assert gm["shape_rgb"].shape == (S, S, 3) and gm["cam/combined"].shape == (S, S)
    assert np.abs(gm["corr"]).max() <= 1
    # the missing networks are named
    miss = res.missing
    assert {"vgg16", "vit", "denres131"} <= set(miss[miss.fold.isna()].network)
    assert set(miss[(miss.network == "mhl")].fold.dropna().astype(int)) == {2, 3, 4}
    out = trained.run_dir / "08_xai"
    # the Grad-CAM layer table: per target the layer used (the scale's gradcam_min_size) and the
    # last conv map; at S = 32 the 3-layer CNN's last map (8 x 8) is the one used
    t = res.gradcam_table
    assert list(t.network) == ["rgb"] * 3 + ["mhl"] and list(t.layer) == ["feat_r", "feat_g", "feat_b", "cnn_relu3"]
    assert (t[["map_h", "map_w"]] == S // 4).all().all() and (t.layer == t.last_conv_layer).all()
    assert set(res.exclusions.columns) >= {"network", "map", "map_h", "map_w", "n_excluded", "reason"}
    assert (res.exclusions.map_h >= 2).all()  # nothing below 2 x 2 here; only constant maps, if any
    for name in ("cells.csv", "ratios.csv", "faithfulness.csv", "channel_importance.csv", "gallery.csv",
                 "timings.csv", "missing.csv", "exclusions.csv", "gradcam_layers.csv", "gmean_rgb.npz",
                 "gmean_mhl.npz", "faithfulness_curves.npz"):
        assert (out / name).is_file(), name
    assert len(pd.read_csv(out / "cells.csv")) == 4 * MAX_CELLS
    with np.load(out / "gmean_rgb.npz") as z:
        assert {"normal/shape_rgb", "abnormal/cam/feat_r", "abnormal/corr/third"} <= set(z.files)
    assert len(list((out / "cache").glob("*/fold*_long.npz"))) == 4


def test_every_cell_explained_by_its_own_fold_model(trained, explained):
    res, _, _ = explained
    shift = config.max_shift_px(trained.scale)
    for net in res.networks:
        for fx in res.folds[net]:
            k = fx.fold
            # the cells are test cells of fold k, never in that model's training set
            assert (trained.folds[fx.index] == k).all()
            fa = augment.fold_arrays(trained.images, trained.labels, trained.folds, k, max_shift_px=shift,
                                     max_rotation_deg=trained.scale["max_rotation_deg"], seed=0)
            assert not set(fx.index) & set(fa["train_index"]) and set(fx.index) <= set(fa["test_index"])
            # the model explaining them is fold k's: its probabilities are the stored test predictions
            stored = np.load(trained.run_dir / "training" / net / f"fold{k}" / "proba_long.npy")
            cells = pd.read_csv(trained.run_dir / "training" / net / f"fold{k}" / "test_cells.csv",
                                dtype={"cell_id": str})
            rows = [cells.cell_id.tolist().index(c) for c in fx.cell_ids]
            np.testing.assert_allclose(fx.arrays["proba"], stored[rows], atol=1e-5)
            # and the whitened input is exactly the fold's x_test
            zca = augment.ZCAWhitening.from_state(
                json.loads((trained.run_dir / "training" / net / f"fold{k}" / "zca.json").read_text()))
            pos = [list(fa["test_index"]).index(i) for i in fx.index]
            np.testing.assert_allclose(zca.transform(trained.images[fx.index]), fa["x_test"][pos], atol=1e-5)
    # one model object per network: the first fold loads it, later folds load their weights into it
    for net, g in res.timings.groupby("network"):
        assert list(g.sort_values("fold").reused_model) == [False] + [True] * (len(g) - 1), net
    # the same cells for every network (selection depends on seed and fold only)
    assert np.array_equal(res.stacked("rgb")["cell_id"], res.stacked("mhl")["cell_id"])
    # the check can fail: fold 1's model gives other probabilities for fold 0's cells
    import keras

    fd1 = trained.run_dir / "training" / "mhl" / "fold1"
    other = keras.saving.load_model(fd1 / "model_long.keras", compile=False)
    z1 = augment.ZCAWhitening.from_state(json.loads((fd1 / "zca.json").read_text()))
    fx0 = res.folds["mhl"][0]
    p_other = other.predict(z1.transform(trained.images[fx0.index]), verbose=0)
    assert np.abs(p_other - fx0.arrays["proba"]).max() > 1e-3


def test_second_call_is_served_from_cache(trained, explained):
    res, _, first = explained
    lines = []
    t0 = time.perf_counter()
    again = explain.explain_run(trained, max_cells=MAX_CELLS, params=FAST, echo=lines.append)
    assert again.timings.cached.all() and all("read from cache" in s for s in lines)
    assert time.perf_counter() - t0 < first
    for net in res.networks:
        a, b = res.stacked(net), again.stacked(net)
        for key in ("proba", "cam/combined", "ig", "occlusion"):
            np.testing.assert_array_equal(a[key], b[key])
    pd.testing.assert_frame_equal(res.ratios, again.ratios)
    pd.testing.assert_frame_equal(res.channel_importance, again.channel_importance)
    # restricting the networks explains only those (from the cache)
    only = explain.explain_run(trained, max_cells=MAX_CELLS, params=FAST, networks=["mhl"], echo=lambda s: None)
    assert only.networks == ["mhl"]
    # a newer model file or other parameters invalidate the cached fold
    fd = trained.run_dir / "training" / "mhl" / "fold0"
    cache = trained.run_dir / "08_xai" / "cache" / "mhl" / "fold0_long.npz"
    ids = res.folds["mhl"][0].cell_ids
    key = explain._key(fd / "model_long.keras", ids, again.params, 32)
    assert explain._load_npz(cache, key) is not None and explain._cache_is_current(cache, key)
    other = explain._key(fd / "model_long.keras", ids, explain.replace(again.params, ig_steps=5), 32)
    assert explain._load_npz(cache, other) is None and not explain._cache_is_current(cache, other)
    assert not explain._cache_is_current(cache.with_name("absent.npz"), key)
    st = (fd / "model_long.keras").stat()
    os.utime(fd / "model_long.keras", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert explain._load_npz(cache, explain._key(fd / "model_long.keras", ids, again.params, 32)) is None
    finally:
        os.utime(fd / "model_long.keras", ns=(st.st_atime_ns, st.st_mtime_ns))


def test_errors(trained, tmp_path):
    import copy

    empty = copy.copy(trained)
    empty.run_dir = tmp_path
    with pytest.raises(FileNotFoundError, match="no trained model_long.keras"):
        explain.explain_run(empty, echo=lambda s: None)
    with pytest.raises(ValueError, match="regime"):
        explain.explain_run(trained, regime="medium", echo=lambda s: None)
    with pytest.raises(ValueError, match="max_cells"):
        explain.explain_run(trained, max_cells=0, echo=lambda s: None)
    with pytest.raises(ValueError, match="unknown network"):
        explain.explain_run(trained, networks=["resnet5"], echo=lambda s: None)
    # a folds file that disagrees with the training is caught
    wrong = copy.copy(trained)
    wrong.folds = (trained.folds + 1) % trained.n_splits
    with pytest.raises(ValueError, match="not all in test fold"):
        explain.explain_run(wrong, networks=["mhl"], echo=lambda s: None)


def test_select_cells_balanced_and_seeded():
    y = np.array([0] * 10 + [1] * 3)
    a = explain.select_cells(y, 8, seed=0, fold=1)
    assert len(a) == 8 and np.bincount(y[a]).tolist() == [5, 3]  # class 1 short: filled from class 0
    assert np.array_equal(a, explain.select_cells(y, 8, seed=0, fold=1))
    assert not np.array_equal(a, explain.select_cells(y, 8, seed=0, fold=2))
    assert np.array_equal(explain.select_cells(y, None, 0, 0), np.arange(13))
    assert np.bincount(y[explain.select_cells(y, 6, 0, 0)]).tolist() == [3, 3]


def test_gmean_per_class_matches_the_numeric_library():
    rng = np.random.default_rng(0)
    imgs = rng.random((6, 16, 16, 3))
    maps = {"feat_r": rng.random((6, 16, 16)), "combined": rng.random((6, 16, 16))}
    y = np.array([0, 1, 0, 1, 1, 0])
    g = explain.gmean_per_class(imgs, maps, y, eps=1e-3)
    sel = y == 1
    np.testing.assert_allclose(g[1]["shape_rgb"], xai.gmean(imgs[sel], eps=1e-3))
    np.testing.assert_allclose(g[1]["shape_gray"], xai.gmean(imgs[sel], eps=1e-3).mean(-1))
    np.testing.assert_allclose(g[1]["corr"], xai.local_correlation(g[1]["shape_gray"], g[1]["cam/combined"]))
    np.testing.assert_allclose(g[0]["corr/third"],
                               xai.local_correlation(g[0]["shape_rgb"][..., 0], g[0]["cam/feat_r"]))
    assert g[1]["n"] == 3 and set(g[1]["ratios"]) == {("merged", "combined"), ("third", "feat_r")}
    with pytest.raises(ValueError, match="combined"):
        explain.gmean_per_class(imgs, {"feat_r": maps["feat_r"]}, y)


def test_map_exclusions_records_maps_without_resolution_and_constant_maps():
    rng = np.random.default_rng(0)
    maps = {"coarse": rng.random((4, 8, 8)), "fine": rng.random((4, 8, 8)), "combined": rng.random((4, 8, 8))}
    maps["fine"][1] = 0.0        # all zero after the ReLU
    maps["fine"][2] = 0.25       # constant, not zero
    keep, rows = explain.map_exclusions(maps, {"coarse": (1, 1), "fine": (4, 4), "combined": (4, 4)})
    assert not keep["coarse"].any()
    assert keep["fine"].tolist() == [True, False, False, True] and keep["combined"].all()
    by = {r["map"]: r for r in rows}
    assert set(by) == {"coarse", "fine"}  # nothing to record for combined
    assert by["coarse"]["n_excluded"] == 4 and "1 x 1 is below 2 x 2" in by["coarse"]["reason"]
    assert "no spatial resolution" in by["coarse"]["reason"]
    assert by["fine"]["n_excluded"] == 2 and "constant" in by["fine"]["reason"]
    # a 2 x 1 map has no resolution along one side: excluded as well
    keep, rows = explain.map_exclusions({"a": maps["combined"]}, {"a": (2, 1)})
    assert not keep["a"].any() and "2 x 1" in rows[0]["reason"]
    with pytest.raises(ValueError, match="map_hw has no size"):
        explain.map_exclusions({"a": maps["combined"]}, {})


def test_gmean_per_class_leaves_out_excluded_cells():
    rng = np.random.default_rng(1)
    imgs = rng.random((6, 16, 16, 3))
    maps = {"feat_r_s16": rng.random((6, 16, 16)), "combined": rng.random((6, 16, 16))}
    y = np.array([0, 1, 0, 1, 1, 0])
    keep = {"feat_r_s16": np.array([True, True, True, False, True, False]),
            "combined": np.array([True, False, True, True, True, True])}
    g = explain.gmean_per_class(imgs, maps, y, eps=1e-3, keep=keep)
    np.testing.assert_allclose(g[1]["cam/combined"], xai.gmean(maps["combined"][[3, 4]], eps=1e-3))
    np.testing.assert_allclose(g[1]["shape_rgb"], xai.gmean(imgs[[3, 4]], eps=1e-3))  # the same cells
    np.testing.assert_allclose(g[0]["cam/feat_r_s16"], xai.gmean(maps["feat_r_s16"][[0, 2]], eps=1e-3))
    # the per-channel stage map is R's: compared with R's Gmean-Shape over its own kept cells
    np.testing.assert_allclose(g[1]["corr/third"], xai.local_correlation(
        xai.gmean(imgs[[1, 4]], eps=1e-3)[..., 0], g[1]["cam/feat_r_s16"]))
    assert g[1]["n"] == 3 and g[1]["n_used"] == {"feat_r_s16": 2, "combined": 2}
    # a map with no kept cell in a class: no Gmean, no ratio
    none = {"feat_r_s16": np.zeros(6, bool), "combined": np.ones(6, bool)}
    g = explain.gmean_per_class(imgs, maps, y, keep=none)
    assert "cam/feat_r_s16" not in g[0] and set(g[0]["ratios"]) == {("merged", "combined")}
    assert explain.channel_of_map("feat_b_s8") == 2 and explain.channel_of_map("feat_g") == 1
    assert explain.channel_of_map("res_relu") is None


def _two_scale_model(size=16):
    """A registry-free model with a fine (size x size) and a coarse (1 x 1) Grad-CAM layer."""
    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input((size, size, 3))
    fine = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="fine")(inp)
    coarse = keras.layers.Conv2D(4, size, strides=size, activation="relu", name="coarse")(fine)
    g = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(fine),
                                    keras.layers.GlobalAveragePooling2D()(coarse)])
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(8, activation="tanh")(g))
    return keras.Model(inp, out, name="toy")


def test_explain_fold_and_summary_exclude_a_1x1_map():
    """explain_fold records each map's feature size and leaves a 1 x 1 layer out of combined; the
    summary excludes it from the Gmean / ratios / faithfulness and says so in exclusions and missing."""
    from pathlib import Path

    from cellstudy.explain.xai.gradcam import gradcam

    model = _two_scale_model()
    rng = np.random.default_rng(2)
    x = rng.random((6, 16, 16, 3), dtype=np.float32)
    y = np.array([0, 1, 0, 1, 0, 1])
    zca = augment.ZCAWhitening().fit(rng.random((12, 16, 16, 3), dtype=np.float32))
    params = explain.replace(FAST, occlusion_patch=8, n_boot=50, batch_size=8)
    arr = explain.explain_fold(model, x, y, zca, params, layers=["fine", "coarse"])
    assert arr["cam_hw/coarse"].tolist() == [1, 1] and arr["cam_hw/fine"].tolist() == [16, 16]
    assert arr["cam_hw/combined"].tolist() == [16, 16] and arr["gradcam_table"] == "[]"
    # combined comes from the spatial layer only
    xw = zca.transform(x)
    np.testing.assert_allclose(arr["cam/combined"][:, 1].astype(np.float32),
                               gradcam(model, xw, 1, layer="fine"), atol=2e-3)
    fe = explain.FoldExplanation("toy", 0, np.arange(6), np.array(list("abcdef")), y, arr, False, 1.0)
    res = explain.XaiRun(out_dir=Path("."), params=params, networks=["toy"],
                         missing=pd.DataFrame(columns=["network", "fold", "status", "detail"]),
                         folds={"toy": [fe]}, cells=pd.DataFrame(), ratios=pd.DataFrame(),
                         faithfulness=pd.DataFrame(), channel_importance=pd.DataFrame(),
                         channel_importance_cells=pd.DataFrame(), gallery=pd.DataFrame(),
                         timings=pd.DataFrame(), images=x)
    explain.summarise(res, 2, 0.5, 1e-3, 1)
    ex = res.exclusions.set_index("map")
    assert ex.loc["coarse", "n_excluded"] == 6 and "below 2 x 2" in ex.loc["coarse", "reason"]
    assert ((res.missing.status == "excluded") & res.missing.detail.str.contains("coarse (1 x 1)", regex=False)).any()
    for d in res.gmeans["toy"].values():
        assert "cam/coarse" not in d and "cam/fine" in d
    assert set(res.ratios.gradcam) == {"combined"}
    n_const = int(ex.loc["combined", "n_excluded"]) if "combined" in ex.index else 0
    g = res.faithfulness[res.faithfulness.method == "gradcam"]
    assert (g.n_cells == 6 - n_const).all()


def test_channel_claim():
    rows = []
    for net, drops in {"a": (0.3, 0.1, 0.0), "b": (0.05, 0.2, 0.0), "c": (0.1, 0.0, 0.0)}.items():
        for ch, d in zip(config.CHANNELS, drops):
            lo = d - 0.05 if net != "c" else -0.01
            rows.append({"network": net, "channel": ch, "method": "mean", "mean_drop": d, "ci_low": lo,
                         "ci_high": d + 0.05})
    c = explain.channel_claim(pd.DataFrame(rows)).set_index("network")
    assert c.loc["a", "supports_claim"] and c.loc["a", "most_important"] == "third"
    assert not c.loc["b", "supports_claim"] and c.loc["b", "most_important"] == "actin"
    assert c.loc["c", "third_is_top"] and not c.loc["c", "supports_claim"]  # CI touches 0


def test_figures(explained):
    res, _, _ = explained
    s = res.stacked("rgb")
    y = s["label"].astype(int)
    n = len(y)
    own = s["cam/combined"][np.arange(n), y]
    figs = [
        xai_figures.heatmap_examples(s["images"], own, s["proba"], y, cell_ids=s["cell_id"], title="rgb"),
        xai_figures.channel_maps(s["images"], {k: s[f"cam/{k}"][np.arange(n), y] for k in res.layers("rgb")},
                                 s["proba"], y, rows=[0, 1]),
        xai_figures.gmean_figure(res.gmeans),
        xai_figures.correlation_figure(res.gmeans),
        xai_figures.faithfulness_curves(res.curves),
        xai_figures.channel_importance_figure(res.channel_importance),
        xai_figures.gallery_figure(s["images"], own, s["proba"], y, res.gallery[res.gallery.network == "rgb"]),
        xai_figures.attribution_examples(s["images"], {"gradcam": own, "integrated_gradients": s["ig"],
                                                       "occlusion": s["occlusion"]}, s["proba"], y, [0]),
    ]
    for f in figs:
        assert isinstance(f, Figure) and len(f.axes) >= 1
        f.canvas.draw()
    # heat map examples: 2 per class, input + overlay each; the titles carry both probabilities
    assert len(figs[0].axes) == 8 and "p(normal)" in figs[0].axes[0].get_title()
    # the correlation panels are titled with the ratios of the table
    r = res.ratios.query("network == 'rgb' and shape == 'merged' and `class` == 'normal'").iloc[0]
    assert f"+ {100 * r.positive_ratio:.1f}%" in figs[3].axes[0].get_title()


def test_figure_errors():
    img = np.zeros((2, 8, 8, 3))
    with pytest.raises(ValueError, match="one entry per cell"):
        xai_figures.heatmap_examples(img, np.zeros((3, 8, 8)), np.zeros((2, 2)), [0, 1])
    with pytest.raises(ValueError, match="must match"):
        xai_figures.overlay(img[0], np.zeros((4, 4)))
    with pytest.raises(ValueError, match="lacks columns"):
        xai_figures.channel_importance_figure(pd.DataFrame({"network": ["a"]}))
    with pytest.raises(ValueError, match="empty"):
        xai_figures.gmean_figure({})
    # the overlay of a zero map is the grey image
    o = xai_figures.overlay(np.random.default_rng(0).random((8, 8, 3)), np.ones((8, 8)), alpha=0.0)
    assert np.allclose(o[..., 0], o[..., 1]) and np.allclose(o[..., 1], o[..., 2])


def test_worker_processes_give_the_same_explanations(trained, explained, tmp_path):
    """workers=2 explains the two networks in spawned processes through the same cache: the
    arrays equal the single-process run's, and the timings say which folds a worker computed."""
    import shutil

    res, _, _ = explained
    twin = tmp_path / "twin"
    for part in ("folds", "training"):
        shutil.copytree(trained.run_dir / part, twin / part)
    import copy
    p = copy.copy(trained)
    p.run_dir = twin
    p.folds_path = twin / "folds" / trained.folds_path.name
    lines = []
    par = explain.explain_run(p, max_cells=MAX_CELLS, params=FAST, workers=2, echo=lines.append)
    assert par.workers == 2 and par.timings.worker.all() and not par.timings.cached.any()
    assert any("2 worker processes" in s for s in lines)
    assert any("computed by a worker process" in s for s in lines)
    # each of the 2 workers' TensorFlow got half the cores (unless the environment said otherwise)
    from cellstudy import threads
    if "TF_NUM_INTRAOP_THREADS" not in os.environ:
        assert set(par.timings.tf_threads) == {str(threads.threads_per_process(2))}
    for net in res.networks:
        a, b = res.stacked(net), par.stacked(net)
        np.testing.assert_array_equal(a["cell_id"], b["cell_id"])
        for key in ("proba", "cam/combined", "ig", "occlusion"):
            np.testing.assert_allclose(a[key], b[key], atol=1e-5)
    # a second call finds everything cached: no worker is started
    again = explain.explain_run(p, max_cells=MAX_CELLS, params=FAST, workers=2, echo=lambda s: None)
    assert again.workers == 0 and again.timings.cached.all()
    with pytest.raises(ValueError, match="workers"):
        explain.explain_run(p, workers=0, echo=lambda s: None)


def test_worker_tasks_start_with_the_slowest_network(tmp_path):
    """Ordered by training seconds per epoch (then file size): a small but slow network goes
    before a large but fast one; a fold without done.json counts by its file only."""
    def plan(name, k, epoch_s, size):
        fd = tmp_path / name / f"fold{k}"
        fd.mkdir(parents=True)
        (fd / "model_long.keras").write_bytes(b"x" * size)
        if epoch_s is not None:
            (fd / "done.json").write_text(json.dumps({"timings": {"seconds_per_epoch_median": epoch_s}}))
        return {"fd": fd, "model_path": fd / "model_long.keras"}
    slow_small = [plan("slow", k, 20.0, 10) for k in range(2)]
    fast_big = [plan("fast", k, 2.0, 1000) for k in range(2)]
    no_done = [plan("nodone", 0, None, 5000)]
    assert explain._expected_cost(slow_small) == (40.0, 20)
    assert explain._expected_cost(no_done) == (0.0, 5000)
    costs = {"fast": explain._expected_cost(fast_big), "slow": explain._expected_cost(slow_small),
             "nodone": explain._expected_cost(no_done)}
    assert sorted(costs, key=costs.get, reverse=True) == ["slow", "fast", "nodone"]


def test_a_fold_job_fills_the_cache_the_chapter_reads(trained, tmp_path):
    """explain_fold_job (the workflow's per-(network, fold) XAI job on a cluster) uses exactly the
    chapter's parameters: explain_run then reads that fold from the cache and computes the other."""
    import shutil

    from cellstudy import study

    run = tmp_path / "run"
    shutil.copytree(trained.run_dir / "folds", run / "folds")
    shutil.copytree(trained.run_dir / "training" / "mhl", run / "training" / "mhl")
    (run / "scale.json").write_text((trained.run_dir / "scale.json").read_text())
    p = study.prepare("bbbc021-paper", "ci", run, data_root=str(trained.cohort.root), progress=False,
                      overrides={"networks": ["mhl", "rgb"], "folds_to_run": [0, 1]})
    said = []
    marker = explain.explain_fold_job(p, "mhl", 0, echo=said.append)
    info = json.loads(marker.read_text())
    assert marker == explain.job_marker(run, "mhl", 0) and info["status"] == "explained" and info["n_cells"] == 8
    assert (run / info["cache"]).is_file() and "xai mhl fold 0: explained" in said[0]
    skipped = json.loads(explain.explain_fold_job(p, "mhl", 2, echo=said.append).read_text())
    assert skipped["status"] == "skipped" and "fold2" in skipped["reason"]
    res = explain.explain_run(p, networks=["mhl"], echo=lambda s: None)
    t = res.timings.set_index("fold")["cached"]
    assert bool(t[0]) and not bool(t[1])
