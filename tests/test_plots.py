"""cellstudy.report.plots: figures build from small synthetic frames and save to PNG."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cellstudy.learning import metrics as M
from cellstudy.report import plots as P


def synthetic_predictions(networks=("vgg16", "mhl", "rgb_res"), regimes=("short", "long"), seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    cid = 0
    for net in networks:
        for regime in regimes:
            for fold in range(5):
                y = np.array([0] * 5 + [1] * 6)
                p1 = np.clip(0.35 * y + rng.uniform(0, 0.65, y.size), 0, 1)
                ids = [f"c{cid + i}" for i in range(y.size)]
                cid += y.size
                frames.append(M.predictions_frame(ids, [f"g{fold}"] * y.size, fold, net, regime,
                                                  y, np.stack([1 - p1, p1], 1)))
    return pd.concat(frames, ignore_index=True)


def test_roc_summary_matches_fold_auc():
    pred = synthetic_predictions()
    s = P.roc_summary(pred, regime="short", grid_points=51)
    assert set(s["class"]) == {"normal", "abnormal"}
    assert len(s) == 3 * 2 * 51
    sub = pred[(pred.regime == "short") & (pred.network == "vgg16")]
    aucs = [M.fold_metrics(f.y_true, f[list(M.PROBA_COLUMNS)].to_numpy())["auc_macro"]
            for _, f in sub.groupby("fold")]
    row = s[(s.network == "vgg16") & (s["class"] == "abnormal")].iloc[0]
    assert row.auc_mean == pytest.approx(np.mean(aucs))
    assert row.auc_sd == pytest.approx(np.std(aucs, ddof=1))
    assert row.n_folds == 5
    curve = s[(s.network == "vgg16") & (s["class"] == "abnormal")]
    assert curve["tpr_mean"].iloc[0] == 0.0 and curve["tpr_mean"].iloc[-1] == pytest.approx(1.0)
    assert np.all(np.diff(curve["tpr_mean"]) >= -1e-12)  # monotone


def test_roc_curves_figure(tmp_path):
    pred = synthetic_predictions()
    fig = P.roc_curves(pred, regime="long", ncols=2)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3  # one per network; the empty 4th grid cell removed
    for ax in fig.axes:
        assert len(ax.lines) == 3  # two classes + chance diagonal
        assert len(ax.collections) == 2  # SD bands
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["VGG16", "RGB-Res", "MHL"]
    out = tmp_path / "roc.png"
    fig.savefig(out, dpi=60)
    assert out.stat().st_size > 1000
    with pytest.raises(ValueError, match="regime"):
        P.roc_curves(pred)  # two regimes present: must choose
    with pytest.raises(ValueError, match="network"):
        P.roc_curves(pred, regime="long", networks=["ViT"])


def test_roc_skips_one_class_fold():
    pred = synthetic_predictions(networks=("vgg16",), regimes=("short",))
    pred = pred[~((pred.fold == 0) & (pred.y_true == 0))]  # fold 0: abnormal cells only
    s = P.roc_summary(pred)
    assert set(s["n_folds"]) == {4}


def test_metric_boxplots(tmp_path):
    recs = []
    rng = np.random.default_rng(1)
    for net in ("vgg16", "resnet50", "rgb", "rgb_res", "mhl", "mhl_den"):
        for fold in range(5):
            for regime in ("short", "long"):
                recs.append({"network": net, "fold": fold, "regime": regime,
                             **{m: rng.uniform(0.6, 1.0) for m in ("recall_macro", "f1_macro",
                                                                 "precision_macro", "auc_macro")}})
    tidy = M.tidy_metrics(recs)
    fig = P.metric_boxplots(tidy, ncols=2)
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == ["recall_macro", "f1_macro", "precision_macro", "auc_macro"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["DL", "RGB", "MHL"]
    # 3 families x 2 regimes = 6 boxes (seaborn draws each as a PathPatch) and 6 point clouds
    assert len(ax.patches) == 6
    assert sum(len(c.get_offsets()) for c in ax.collections) == 6 * 2 * 5  # all 60 values shown
    assert ax.get_legend() is not None and fig.axes[1].get_legend() is None
    fig.savefig(tmp_path / "box.png", dpi=60)
    assert (tmp_path / "box.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="metric"):
        P.metric_boxplots(tidy, metrics=["nope"])
    with pytest.raises(ValueError, match="family"):
        P.metric_boxplots(tidy, families=["ViT"])


def test_training_curves(tmp_path):
    rows = []
    for fold in range(3):
        for epoch in range(1, 9):
            rows.append({"network": "vgg16", "fold": fold, "epoch": epoch, "loss": 1 / epoch + fold * 0.01,
                         "accuracy": 1 - 0.5 / epoch, "val_loss": 1.1 / epoch, "val_accuracy": 0.9 - 0.4 / epoch})
    hist = pd.DataFrame(rows)
    fig = P.training_curves(hist, mark_epochs=[4])
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.lines) == 3 * 2 + 1  # 3 folds x (train + val) + the regime marker
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), 1 / np.arange(1, 9))
    assert "dashed: validation" in fig._suptitle.get_text()
    fig.savefig(tmp_path / "hist.png", dpi=60)
    assert (tmp_path / "hist.png").stat().st_size > 1000
    # no network/fold columns, no val columns: one run, one line per panel
    fig = P.training_curves(hist[hist.fold == 0][["epoch", "loss", "accuracy"]])
    assert [len(ax.lines) for ax in fig.axes] == [1, 1]
    assert fig._suptitle.get_text() == "Training curves"
    with pytest.raises(ValueError, match="accuracy"):
        P.training_curves(hist.drop(columns="accuracy"))
    # two networks x 3 folds without validation: the folds of a network share its colour, the
    # legend names the networks once each, and the title does not promise validation curves
    two = pd.concat([hist.drop(columns=["val_loss", "val_accuracy"]),
                     hist.drop(columns=["val_loss", "val_accuracy"]).assign(network="mhl")])
    fig = P.training_curves(two)
    ax = fig.axes[0]
    nets = [t.get_text() for t in ax.get_legend().get_texts()]
    assert nets == ["VGG16", "MHL"]                   # the book's names
    by_net = [tuple(l.get_color()) for l in ax.lines]
    assert len(set(by_net[:3])) == 1 and len(set(by_net[3:])) == 1 and by_net[0] != by_net[3]
    assert "validation" not in fig._suptitle.get_text()


def test_step_times_figure(tmp_path):
    ov = {"pipeline_times": [0.011, 0.012, 0.013, 0.010], "memory_times": [0.010, 0.010, 0.011]}
    fig = P.step_times(ov)
    left, right = fig.axes
    np.testing.assert_allclose(left.lines[0].get_ydata(), [11, 12, 13, 10])
    np.testing.assert_allclose(left.lines[1].get_ydata(), [10, 10, 11])
    assert "1.15" in fig._suptitle.get_text()  # median 11.5 ms / 10 ms
    fig.savefig(tmp_path / "steps.png", dpi=60)
    assert (tmp_path / "steps.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="memory_times"):
        P.step_times({"pipeline_times": [0.1], "memory_times": []})


def test_no_pyplot_figures_left_open():
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    P.roc_curves(synthetic_predictions(networks=("vgg16",), regimes=("short",)))
    assert len(plt.get_fignums()) == before


def test_a_long_gallery_title_is_wrapped_not_cut():
    from cellstudy.report.figures import cell_gallery

    imgs = np.zeros((4, 8, 8, 3))   # 4 columns of 2 inches: 88 characters a line
    long = ("most confident normal calls (p(normal) 0.66-0.69; none reaches 0.75: no confident call): "
            "Grad-CAM of the call (mean over the fold models)")
    fig = cell_gallery(imgs, list("abcd"), title=long)
    shown = fig._suptitle.get_text()
    assert shown.replace("\n", " ") == long and shown.count("\n") >= 1
    assert all(len(line) <= 88 for line in shown.splitlines()) and len(shown.splitlines()[0]) > 60
    assert fig.get_figheight() > cell_gallery(imgs, list("abcd"), title="short").get_figheight()
    assert cell_gallery(imgs, list("abcd"), title="short")._suptitle.get_text() == "short"
    two = cell_gallery(imgs[:2], ["a", "b"], title=long)._suptitle.get_text()   # 2 columns: 44 a line
    assert all(len(line) <= 44 for line in two.splitlines())


def test_training_curves_of_many_networks_are_small_multiples():
    """Eleven networks x five folds in one panel could not be told apart: above
    SMALL_MULTIPLES_ABOVE networks, one panel per network and metric, one line per fold."""
    nets = ["vgg16", "resnet50", "densenet121", "vit", "mhl"]
    rows = [{"network": n, "fold": f, "epoch": e, "loss": 1 / e + i * 0.1, "accuracy": 1 - 0.5 / e}
            for i, n in enumerate(nets) for f in range(3) for e in range(1, 7)]
    fig = P.training_curves(pd.DataFrame(rows), mark_epochs=[3])
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 2 * len(nets)                       # loss and accuracy for each network
    assert [ax.get_title() for ax in shown[:2]] == ["VGG16: training loss", "ResNet50: training loss"]
    assert all(len(ax.lines) == 3 + 1 for ax in shown)       # 3 folds + the regime marker
    # the loss panels share one y range (the networks are compared by eye)
    assert len({ax.get_ylim() for ax in shown[:len(nets)]}) == 1
    np.testing.assert_allclose(shown[1].lines[0].get_ydata(), 1 / np.arange(1, 7) + 0.1)


def test_cell_montage_names_the_manifests_stains_and_classes():
    from cellstudy.report import figures

    rng = np.random.default_rng(0)
    imgs, labels = rng.random((6, 8, 8, 3)).astype(np.float32), np.array([0, 0, 0, 1, 1, 1])
    fig = figures.cell_montage(imgs, labels, n_per_class=2, class_names=["normal", "abnormal (tumour)"],
                               stain_names=("concanavalin A", "F-actin", "DNA"))
    axes = np.array(fig.axes).reshape(4, 4)
    assert [a.get_title() for a in axes[0]] == ["concanavalin A (red)", "F-actin (green)", "DNA (blue)", "merged"]
    assert axes[2, 0].get_ylabel() == "abnormal (tumour)"
    plain = figures.cell_montage(imgs, labels, n_per_class=1)
    assert plain.axes[0].get_title() == "third stain (red)"
