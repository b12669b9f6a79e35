"""The family runner on the real cohort at a tiny scale: files, metrics, read-back, no re-training."""
import numpy as np
import pandas as pd
import pytest

from cellstudy.learning import experiment, metrics
from cellstudy import study

pytestmark = pytest.mark.slow


def test_unknown_family_or_network_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown family 'CNN'"):
        experiment.networks_for("CNN", {"networks": None})
    with pytest.raises(ValueError, match="unknown network"):
        experiment.networks_for("DL", {"networks": ["resnet5"]})
    assert experiment.networks_for("MHL", {"networks": ["mhl", "vgg16"]}) == ["mhl"]
    with pytest.raises(ValueError, match="outside 0..4"):
        experiment.folds_for({"n_splits": 5, "folds_to_run": [7]})


def test_run_networks_writes_tables_and_reads_back(tmp_path, shared_data):
    p = study.prepare("bbbc021-paper", "ci", tmp_path, data_root=str(shared_data),
                      overrides={"networks": ["mhl"], "folds_to_run": [0, 1], "batch_size": 32})
    res = experiment.run_networks(p, "MHL", "05_mhl_family", echo=lambda s: None, progress=lambda e: None)
    assert set(res.tidy["regime"]) == {"short", "long"} and set(res.tidy["fold"]) == {0, 1}
    assert set(res.tidy["family"]) == {"MHL"}
    # every test cell predicted once per regime, from the right fold, probabilities summing to 1
    pr = res.predictions
    for k in (0, 1):
        test_ids = set(p.cell_ids[p.folds == k])
        got = pr[(pr.fold == k) & (pr.regime == "long")]
        assert set(got["cell_id"]) == test_ids and len(got) == len(test_ids)
    assert ((pr.proba_normal + pr.proba_abnormal - 1).abs() < 1e-5).all()
    # metrics recomputed from the stored predictions agree with the table
    for (k, regime), g in pr.groupby(["fold", "regime"]):
        m = metrics.fold_metrics(g.y_true.to_numpy(), g[["proba_normal", "proba_abnormal"]].to_numpy())
        v = res.tidy.query("fold == @k and regime == @regime and metric == 'accuracy'")["value"].item()
        assert v == pytest.approx(m["accuracy"])
    out = tmp_path / "05_mhl_family"
    for f in ("metrics_tidy.csv", "metrics_tidy.parquet", "predictions.csv", "history.csv", "summary_long.csv"):
        assert (out / f).is_file(), f
    assert len(pd.read_csv(out / "history.csv")) == 2 * 2  # 2 folds x epochs_long

    # a second call trains nothing: every run is read back from its done.json
    again = experiment.run_networks(p, "MHL", "05_mhl_family", echo=lambda s: None, progress=lambda e: None)
    assert again.timings["skipped"].all()
    pd.testing.assert_frame_equal(again.tidy, res.tidy)
    col = experiment.collect(tmp_path)
    pd.testing.assert_frame_equal(col.tidy.reset_index(drop=True), res.tidy.reset_index(drop=True))


def test_set_bn_momentum_changes_only_the_moving_average_rate():
    import keras

    from cellstudy.learning.experiment import set_bn_momentum

    def tiny():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(2, 3)(inp)
        x = keras.layers.BatchNormalization()(x)
        return keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))

    ref, m = tiny(), set_bn_momentum(tiny(), 0.9)
    bn = [l for l in m.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert [l.momentum for l in bn] == [0.9]
    assert [w.shape for w in m.weights] == [w.shape for w in ref.weights]
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert set_bn_momentum(ref, None) is ref and ref.layers[2].momentum == 0.99
    with pytest.raises(ValueError, match="bn_momentum"):
        set_bn_momentum(tiny(), 1.0)


def test_he_initialise_draws_he_normal_kernels_reproducibly():
    import keras

    from cellstudy.learning.experiment import he_initialise

    def tiny():
        inp = keras.Input((16, 16, 8))
        return keras.Model(inp, keras.layers.Conv2D(64, 3)(inp))

    keras.utils.set_random_seed(3)
    a = he_initialise(tiny()).layers[1].kernel.numpy()
    keras.utils.set_random_seed(3)
    b = he_initialise(tiny()).layers[1].kernel.numpy()
    np.testing.assert_array_equal(a, b)
    fan_in = 3 * 3 * 8
    assert abs(a.std() ** 2 * fan_in / 2 - 1) < 0.1          # Var = 2 / fan_in (truncated normal: ~0.8-1)
    keras.utils.set_random_seed(3)
    glorot = tiny().layers[1].kernel.numpy()
    assert glorot.std() < a.std()                            # Glorot's is smaller for ReLU nets


def test_each_network_gets_its_familys_whitening(tmp_path, shared_data):
    """whitening per family (the default scale's RGB: each stain on its own): the fold's fitted
    whitening (zca.json, what prediction and explanation re-apply) is the network's family's."""
    import json

    p = study.prepare("bbbc021-paper", "ci", tmp_path, data_root=str(shared_data),
                      overrides={"folds_to_run": [0], "whitening": {"RGB": "channel"}})
    for name, mode in (("rgb", "channel"), ("mhl", "zca")):
        experiment.run_fold(p, name, 0, progress=lambda e: None)
        state = json.loads((tmp_path / "training" / name / "fold0" / "zca.json").read_text())
        assert state["mode"] == mode, (name, state["mode"])
        w = np.asarray(state["W"])
        mixed = np.count_nonzero(w - np.diag(np.diag(w)))               # stains mixed into another
        assert (mixed == 0) == (mode == "channel"), (name, w)
    # the finished fold is read back only by the same network: other model parameters (as when a
    # network's catalogue defaults change between the run and its resume) are refused, by name
    from cellstudy.learning.checkpoints import CheckpointMismatchError
    res, _ = experiment.run_fold(p, "rgb", 0, progress=lambda e: None)
    assert res.skipped
    with pytest.raises(CheckpointMismatchError, match=r"fold0/done.json was trained with .* parameters, but 'rgb'"):
        experiment.run_fold(p, "rgb", 0, model_params={"token_dim": 8}, progress=lambda e: None)
    # the same parameter count, another network (a dropout rate): refused by its fingerprint
    with pytest.raises(CheckpointMismatchError, match=r"fold0/done.json was trained with architecture [0-9a-f]{16}, but 'rgb'"):
        experiment.run_fold(p, "rgb", 0, model_params={"head_dropout": 0.5}, progress=lambda e: None)
    # a done.json written before the fingerprint existed is compared by its parameter count only
    done = tmp_path / "training" / "rgb" / "fold0" / "done.json"
    meta = json.loads(done.read_text())
    done.write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("architecture")}))
    res, _ = experiment.run_fold(p, "rgb", 0, model_params={"head_dropout": 0.5}, progress=lambda e: None)
    assert res.skipped


def test_training_options_are_the_scales_numbers():
    """What a scale sets of the training (the study's jobs and the GPU chapter both use it): the
    global batch grows with the replicas, the schedule's warm-up and decay, the flips."""
    from cellstudy import config
    sc = config.get_scale("cpu", {"lr_decay": "cosine", "flips": True, "epochs_long_max": None})
    opts = experiment.training_options(sc)
    assert opts == {"epochs_short": 5, "epochs_long": 10, "batch_size": 32, "learning_rate": 3e-3,
                    "momentum": 0.9, "warmup_epochs": 2, "flips": True, "lr_decay": "cosine",
                    "epochs_long_max": None}
    assert experiment.training_options(config.get_scale("cpu", {"epochs_long_max": 25}))["epochs_long_max"] == 25
    assert experiment.training_options(sc, replicas=4)["batch_size"] == 128
    paper = experiment.training_options(config.get_scale("paper"))
    assert (paper["warmup_epochs"], paper["lr_decay"], paper["flips"]) == (0, "none", False)
    import inspect
    from cellstudy.learning import train
    assert set(opts) <= set(inspect.signature(train.train_fold).parameters)   # all train_fold keywords
