"""Tests of cellstudy.learning.train / cellstudy.learning.distribute on a tiny CNN at 32 px (CPU, deterministic)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from cellstudy.learning import benchmark, checkpoints, train  # noqa: E402
from cellstudy.learning.distribute import precision_policy, select_strategy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
S = 32
EPOCHS = dict(epochs_short=2, epochs_long=4)
COMMON = dict(batch_size=8, seed=0, deterministic=True, **EPOCHS)


def tiny_cnn(size: int = S, nan: bool = False, dropout: float = 0.3):
    """A zero-argument builder of a tiny uncompiled CNN with dropout (RNG state to resume)."""
    def build():
        layers = [keras.Input((size, size, 3)),
                  keras.layers.Conv2D(4, 3, activation="relu"),
                  keras.layers.MaxPooling2D(),
                  keras.layers.Conv2D(8, 3, activation="relu"),
                  keras.layers.GlobalAveragePooling2D(),
                  keras.layers.Dense(8, activation="relu"),
                  keras.layers.Dropout(dropout)]
        if nan:  # after the last ReLU: oneDNN's fused MatMul+ReLU maps NaN to 0
            layers.append(keras.layers.Lambda(lambda t: t * float("nan")))
        layers.append(keras.layers.Dense(2, activation="softmax"))
        return keras.Sequential(layers)
    return build


def make_data(n_train=40, n_test=10, size=S, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n_train, size, size, 3), dtype=np.float32)
    y = np.arange(n_train) % 2
    x[y == 1, :, :, 1] += 0.5           # a learnable signal in the green channel
    xt = rng.random((n_test, size, size, 3), dtype=np.float32)
    yt = np.arange(n_test) % 2
    xt[yt == 1, :, :, 1] += 0.5
    return x, y, xt, yt


DATA = make_data()


class Killed(RuntimeError):
    pass


class KillAfter(keras.callbacks.Callback):
    """Simulate a killed process: raise at the end of 0-based epoch ``k`` (before its
    checkpoint is written)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.k:
            raise Killed(f"killed after epoch index {epoch}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted deterministic run (network 'tiny', fold 0)."""
    out = tmp_path_factory.mktemp("ref")
    events = []
    res = train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0,
                           progress=events.append, **COMMON)
    return res, out, events


# ---------------------------------------------------------------------------------------------
def test_two_regimes_files_shapes_and_history(reference):
    res, out, events = reference
    assert res.status == "done" and not res.failed
    for regime in ("short", "long"):
        p = np.load(out / f"proba_{regime}.npy")
        assert p.shape == (10, 2) and p.dtype == np.float32
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        assert (out / f"model_{regime}.keras").exists()
        np.testing.assert_array_equal(p, res.proba[regime])
    # short and long are different models (two more epochs of SGD in between)
    assert not np.array_equal(res.proba["short"], res.proba["long"])
    np.testing.assert_array_equal(np.load(out / "y_test.npy"), DATA[3])
    hist = (out / "history.csv").read_text().splitlines()
    assert hist[0] == "epoch,loss,accuracy,seconds,images_per_s"
    assert [int(r.split(",")[0]) for r in hist[1:]] == [1, 2, 3, 4]
    assert all(np.isfinite(float(v)) for r in hist[1:] for v in r.split(","))
    done = json.loads((out / "done.json").read_text())
    assert done["network"] == "tiny" and done["fold"] == 0 and done["input_shape"] == [S, S, 3]
    assert done["timings"]["seconds_training"] > 0 and done["timings"]["images_per_s_median"] > 0
    assert set(done["test_accuracy"]) == {"short", "long"}
    assert not (out / "checkpoint.npz").exists()          # removed after a finished run
    # the saved long model reproduces the saved probabilities
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = keras.models.load_model(out / "model_long.keras")
    assert not [w for w in caught if "optimizer" in str(w.message)], [str(w.message) for w in caught]
    np.testing.assert_allclose(m.predict(DATA[2], verbose=0), res.proba["long"], atol=1e-5)
    # ... and holds no optimiser state (for inference: the weights only once)
    with zipfile.ZipFile(out / "model_long.keras") as z, h5py.File(io.BytesIO(z.read("model.weights.h5"))) as h:
        assert "optimizer" not in h.keys(), list(h.keys())
    # progress: one epoch event per epoch, ETA decreasing to 0, regimes announced
    ep = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in ep] == [1, 2, 3, 4] and ep[-1]["eta_s"] == 0
    assert [e["regime"] for e in events if e["event"] == "regime"] == ["short", "long"]


def test_finished_run_is_skipped(reference, capsys):
    res, out, _ = reference
    mtime = (out / "proba_long.npy").stat().st_mtime_ns

    def must_not_build():
        raise AssertionError("a finished run must not build its model again")

    again = train.train_fold(must_not_build, *DATA, out, network_name="tiny", fold=0,
                             progress=train.print_progress, **COMMON)
    assert again.skipped and again.status == "done"
    np.testing.assert_array_equal(again.proba["long"], res.proba["long"])
    assert (out / "proba_long.npy").stat().st_mtime_ns == mtime
    assert "already done" in capsys.readouterr().out


def test_determinism_two_runs_identical(reference, tmp_path):
    res, _, _ = reference
    res2 = train.train_fold(tiny_cnn(), *DATA, tmp_path / "again", network_name="tiny", fold=0,
                            **COMMON)
    for regime in ("short", "long"):
        np.testing.assert_array_equal(res2.proba[regime], res.proba[regime])
    assert [r["loss"] for r in res2.history] == [r["loss"] for r in res.history]
    # and a different seed gives a different run (the test can fail)
    res3 = train.train_fold(tiny_cnn(), *DATA, tmp_path / "seed1", network_name="tiny", fold=0,
                            **{**COMMON, "seed": 1})
    assert not np.array_equal(res3.proba["long"], res.proba["long"])


def test_resume_after_kill_equals_uninterrupted(reference, tmp_path):
    res, _, _ = reference
    out = tmp_path / "killed"
    # killed during the 3rd epoch's end (after the short regime was saved; epoch 3 is lost)
    with pytest.raises(Killed):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0,
                         callbacks=[KillAfter(2)], **COMMON)
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["epoch"] == 2 and not (out / "done.json").exists()
    assert (out / "proba_short.npy").exists() and not (out / "proba_long.npy").exists()
    resumed = train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, **COMMON)
    assert resumed.resumed_from == 2 and resumed.status == "done"
    for regime in ("short", "long"):
        np.testing.assert_array_equal(resumed.proba[regime], res.proba[regime])
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in res.history]
    assert len(resumed.history) == 4


def test_resume_before_short_regime(reference, tmp_path):
    res, _, _ = reference
    out = tmp_path / "killed0"
    with pytest.raises(Killed):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0,
                         callbacks=[KillAfter(1)], **COMMON)   # only epoch 1 checkpointed
    assert json.loads((out / "checkpoint.json").read_text())["epoch"] == 1
    resumed = train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, **COMMON)
    assert resumed.resumed_from == 1
    for regime in ("short", "long"):
        np.testing.assert_array_equal(resumed.proba[regime], res.proba[regime])


def test_one_class_training_set_is_rejected(tmp_path):
    x, y, xt, yt = DATA
    built = []
    with pytest.raises(ValueError, match=r"fold 3 has one class"):
        train.train_fold(lambda: built.append(1), x, np.ones_like(y), xt, yt, tmp_path / "o",
                         network_name="tiny", fold=3, **COMMON)
    assert not built


@pytest.mark.parametrize("bad", [
    dict(epochs_short=4, epochs_long=4), dict(batch_size=0), dict(momentum=1.0)])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        train.train_fold(tiny_cnn(), *DATA, tmp_path / "o", network_name="tiny", fold=0,
                         **{**COMMON, **bad})


def test_bad_arrays_named(tmp_path):
    x, y, xt, yt = DATA
    x_nan = x.copy()
    x_nan[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x_train.*NaN"):
        train.train_fold(tiny_cnn(), x_nan, y, xt, yt, tmp_path / "o", network_name="t", **COMMON)
    with pytest.raises(ValueError, match=r"y_test.*shape"):
        train.train_fold(tiny_cnn(), x, y, xt, yt[:-1], tmp_path / "o", network_name="t",
                         **COMMON)
    with pytest.raises(ValueError, match=r"expects input \[24, 24, 3\]"):
        train.train_fold(tiny_cnn(24), x, y, xt, yt, tmp_path / "o", network_name="t", **COMMON)


def test_nan_loss_writes_failed_json_without_raising(tmp_path, capsys):
    out = tmp_path / "nan"
    res = train.train_fold(tiny_cnn(nan=True), *DATA, out, network_name="nan-net", fold=2,
                           progress=train.print_progress, **COMMON)
    assert res.failed and res.status == "failed"
    info = json.loads((out / "failed.json").read_text())
    assert info["epoch"] == 1 and "nan" in info["reason"].lower()
    assert info["network"] == "nan-net" and info["fold"] == 2
    assert not (out / "done.json").exists() and not (out / "proba_short.npy").exists()
    assert "FAILED at epoch 1" in capsys.readouterr().out
    # a re-run does not train again; it reports the failure
    again = train.train_fold(tiny_cnn(nan=True), *DATA, out, network_name="nan-net", fold=2,
                             **COMMON)
    assert again.failed and again.skipped


def test_nan_after_short_regime_keeps_short(tmp_path):
    """A run that diverges later keeps what it finished (huge learning rate)."""
    class PoisonAt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                w = self.model.layers[-1].kernel
                w.assign(np.full(w.shape, np.nan, dtype=np.float32))

    out = tmp_path / "late"
    res = train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0,
                           callbacks=[PoisonAt()], **COMMON)
    assert res.failed
    info = json.loads((out / "failed.json").read_text())
    assert info["epoch"] == 3 and info["regimes_saved"] == ["short"]
    assert "short" in res.proba and "long" not in res.proba


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    built = []

    def build():
        built.append(1)
        return tiny_cnn()()

    with pytest.raises(train.OutputError, match=r"output folder .*a_file.*not writable"):
        train.train_fold(build, *DATA, blocker / "run", network_name="tiny", fold=0, **COMMON)
    assert not built
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(train.OutputError, match="not writable"):
                train.train_fold(build, *DATA, ro, network_name="tiny", fold=0, **COMMON)
        finally:
            ro.chmod(0o700)
    assert issubclass(train.OutputError, ValueError)


def test_checkpoint_from_another_network_or_size(tmp_path):
    out = tmp_path / "shared"
    with pytest.raises(Killed):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0,
                         callbacks=[KillAfter(1)], **COMMON)
    assert (out / "checkpoint.npz").exists()
    # another network name, same architecture
    with pytest.raises(train.CheckpointMismatchError, match=r"'tiny'.*'other'"):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="other", fold=0, **COMMON)
    # another input size
    d24 = make_data(size=24)
    with pytest.raises(train.CheckpointMismatchError,
                       match=r"network 'tiny' \(input 32x32x3.*input 24x24x3"):
        train.train_fold(tiny_cnn(24), *d24, out, network_name="tiny", fold=0, **COMMON)
    # the same parameter count, another architecture (a dropout rate): refused by its fingerprint
    with pytest.raises(train.CheckpointMismatchError, match=r"architecture [0-9a-f]{16}, fold 0\) but"):
        train.train_fold(tiny_cnn(dropout=0.5), *DATA, out, network_name="tiny", fold=0, **COMMON)
    # a checkpoint written before the fingerprint existed is compared by parameter count
    old = checkpoints.read_checkpoint_meta(out / "checkpoint.npz")
    checkpoints.compare_meta(out, {k: v for k, v in old.items() if k != "architecture"}, old)
    # another seed: the checkpoint cannot continue this run
    with pytest.raises(train.CheckpointMismatchError, match="seed 0 there vs 5 now"):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0,
                         **{**COMMON, "seed": 5})
    assert issubclass(train.CheckpointMismatchError, ValueError)


def test_architecture_fingerprint_sees_settings_the_parameter_count_does_not():
    """checkpoints.architecture: the same for two builds (auto-generated layer names differ), the
    same at another precision, different for another dropout rate with the same parameters."""
    a, b = tiny_cnn()(), tiny_cnn()()
    assert [l.name for l in a.layers] != [l.name for l in b.layers]
    assert checkpoints.architecture(a) == checkpoints.architecture(b)
    with precision_policy("mixed_bfloat16"):
        assert checkpoints.architecture(tiny_cnn()()) == checkpoints.architecture(a)
    c = tiny_cnn(dropout=0.5)()
    assert checkpoints.n_params(c) == checkpoints.n_params(a)
    assert checkpoints.architecture(c) != checkpoints.architecture(a)
    assert len(checkpoints.architecture(a)) == 16

    def residual(from_input: bool):   # the same layers in the same order, wired otherwise
        x = keras.Input((4,))
        d1 = keras.layers.Dense(4)(x)
        d2 = keras.layers.Dense(4)(d1)
        return keras.Model(x, keras.layers.Add()([d2, x if from_input else d1]))
    a1, a2 = residual(False), residual(True)
    rows = [[type(l).__name__, [list(w.shape) for w in l.weights]] for l in (a1, a2)[0].layers]
    assert rows == [[type(l).__name__, [list(w.shape) for w in l.weights]] for l in a2.layers]
    assert checkpoints.architecture(a1) == checkpoints.architecture(residual(False))
    assert checkpoints.architecture(a1) != checkpoints.architecture(a2)
    # a fingerprint made by another Keras version is not compared (configs gain keys)
    m = checkpoints.architecture_meta(a)
    assert checkpoints.architecture_differs(m, {**m, "architecture": "0" * 16})
    assert not checkpoints.architecture_differs(m, {"architecture": "0" * 16, "architecture_keras": "0.0"})


def test_weight_resetter_reuses_model_without_retracing(reference, tmp_path):
    res, _, _ = reference
    wr = train.WeightResetter(tiny_cnn())
    r0 = train.train_fold(wr, *DATA, tmp_path / "f0", network_name="tiny", fold=0, **COMMON)
    model = wr.model
    fn = model.train_function
    r1 = train.train_fold(wr, *DATA, tmp_path / "f1", network_name="tiny", fold=1, **COMMON)
    assert wr.builds == 1 and wr.resets == 1 and wr.model is model
    assert model.train_function is fn            # compiled step reused, not re-traced
    assert r1.timings["reused_model"] and not r0.timings["reused_model"]
    # same seed, same data: the reset model reproduces a fresh build exactly
    for regime in ("short", "long"):
        np.testing.assert_array_equal(r0.proba[regime], res.proba[regime])
        np.testing.assert_array_equal(r1.proba[regime], res.proba[regime])


def _counting(build_fn, traces: list):
    """``build_fn`` whose model records every Python trace of its training step."""
    def build():
        model = build_fn()
        step = model.train_step
        model.train_step = lambda data: (traces.append(1), step(data))[1]
        return model
    return build


def test_training_step_is_traced_once(reference, tmp_path):
    """Keras would create the optimiser / metric variables inside the first trace and tf.function
    would then trace the step again; train_fold builds them first, so one trace per model."""
    res, _, _ = reference
    traces: list = []
    r = train.train_fold(_counting(tiny_cnn(), traces), *DATA, tmp_path / "f0",
                         network_name="tiny", fold=0, **COMMON)
    assert len(traces) == 1
    np.testing.assert_array_equal(r.proba["long"], res.proba["long"])
    # what it avoids: the same model compiled the plain Keras way traces its step twice
    plain: list = []
    model = benchmark._compiled(_counting(tiny_cnn(), plain))
    model.fit(DATA[0], DATA[1], batch_size=8, epochs=1, verbose=0)
    assert len(plain) == 2


def test_pipelines_do_not_autotune():
    """tf.data autotuning made every fit / predict wait for the autotuner's next wake-up when its
    iterator was deleted (epochs stuck at 1.28, 2.56, 5.12 ... s): the pipelines turn it off."""
    x, y = DATA[0], DATA[1]
    ds = train.make_train_dataset(x, y, batch_size=8, seed=0, epoch=0)
    assert ds.options().autotune.enabled is False
    assert train._test_dataset(x, 8).options().autotune.enabled is False
    # same batches as before: the option changes scheduling, not data
    got = np.concatenate([b[1].numpy() for b in ds])
    assert sorted(got.tolist()) == sorted(y.tolist()) and len(got) == len(y)


def test_reused_model_keeps_tensorflow_kernels(reference, tmp_path, monkeypatch):
    """Re-setting TF's global seed clears its kernel caches (every compiled function is
    re-instantiated): a reused model must not trigger it, a fresh build must, and the reused
    run still reproduces the fresh one."""
    import tensorflow as tf

    res, _, _ = reference
    calls = []
    real = tf.random.set_seed
    monkeypatch.setattr(tf.random, "set_seed", lambda s: (calls.append(s), real(s)))
    wr = train.WeightResetter(tiny_cnn())
    train.train_fold(wr, *DATA, tmp_path / "f0", network_name="tiny", fold=0, **COMMON)
    assert len(calls) == 1
    r1 = train.train_fold(wr, *DATA, tmp_path / "f1", network_name="tiny", fold=1, **COMMON)
    assert len(calls) == 1                       # same seed, reused model: caches kept
    np.testing.assert_array_equal(r1.proba["long"], res.proba["long"])
    train.train_fold(wr, *DATA, tmp_path / "f2", network_name="tiny", fold=2,
                     **{**COMMON, "seed": COMMON.get("seed", 0) + 1})
    assert len(calls) == 2                       # another seed: TF is re-seeded


def test_epoch_seed_and_dataset_order():
    x, y = DATA[0][:12], np.arange(12)
    assert train.epoch_seed(0, 3) == train.epoch_seed(0, 3)
    assert len({train.epoch_seed(0, e) for e in range(20)}) == 20
    assert train.epoch_seed(1, 0) != train.epoch_seed(0, 0)

    def order(seed, epoch):
        ds = train.make_train_dataset(x, y.astype(np.int32), 4, seed, epoch)
        return np.concatenate([b[1].numpy() for b in ds])

    a = order(0, 2)
    assert sorted(a.tolist()) == list(range(12))
    np.testing.assert_array_equal(a, order(0, 2))          # a function of (seed, epoch)
    assert not np.array_equal(a, order(0, 3))
    batches = [b[0].shape[0] for b in train.make_train_dataset(x, y.astype(np.int32), 5, 0, 0)]
    assert batches == [5, 5, 2]


def test_benchmarks_return_sane_numbers():
    x, y = DATA[0][:32], DATA[1][:32]
    po = benchmark.pipeline_overhead(tiny_cnn(), x, y, batch_size=8, steps=6, warmup=2, rounds=1)
    assert po["pipeline_step_s"] > 0 and po["memory_step_s"] > 0
    assert po["ratio"] == pytest.approx(po["pipeline_step_s"] / po["memory_step_s"])
    assert len(po["pipeline_times"]) == 6 and len(po["memory_times"]) == 6
    tp = benchmark.throughput(tiny_cnn(), S, batch_size=8, steps=4, warmup=2)
    assert tp["images_per_s"] == pytest.approx(8 / tp["step_s_median"]) and tp["size"] == S


def test_precision_policy_restores_and_strategy_default():
    before = keras.mixed_precision.global_policy().name
    with precision_policy("bfloat16") as p:
        assert p == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == before
    with pytest.raises(ValueError, match="mixed_precision"):
        with precision_policy("float8"):
            pass
    info = select_strategy("auto")
    assert info.kind == "default" and info.replicas == 1 and info.devices
    with pytest.raises(ValueError, match="unknown strategy"):
        select_strategy("tpu-pod")


def test_mixed_bfloat16_run(tmp_path):
    res = train.train_fold(tiny_cnn(), *DATA, tmp_path / "bf16", network_name="tiny", fold=0,
                           mixed_precision="bfloat16", **{**COMMON, "epochs_long": 3})
    assert res.status == "done" and res.proba["long"].dtype == np.float32
    np.testing.assert_allclose(res.proba["long"].sum(1), 1.0, atol=1e-2)
    assert json.loads((tmp_path / "bf16" / "done.json").read_text())["mixed_precision"] == \
        "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[2])
    from cellstudy.learning import train
    from cellstudy.learning.distribute import select_strategy
    from tests.test_train import tiny_cnn, make_data
    info = select_strategy("mirrored")
    res = train.train_fold(tiny_cnn(), *make_data(n_train=32, n_test=8), sys.argv[1],
                           epochs_short=1, epochs_long=2, batch_size=8, seed=0,
                           strategy=info, network_name="tiny", fold=0)
    print("RESULT", json.dumps({"replicas": info.replicas, "devices": info.devices,
        "kind": info.kind, "status": res.status,
        "shapes": {k: list(v.shape) for k, v in res.proba.items()},
        "sums": float(np.abs(res.proba["long"].sum(1) - 1).max()),
        "strategy": res.strategy}))
""")


@pytest.mark.slow  # a fresh process imports TensorFlow and trains (~22 s on 2 loaded cores)
def test_mirrored_strategy_two_logical_cpus(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(REPO)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["kind"] == "mirrored" and out["replicas"] == 2 and len(out["devices"]) == 2
    assert out["status"] == "done" and out["shapes"] == {"short": [8, 2], "long": [8, 2]}
    assert out["sums"] < 1e-5 and out["strategy"]["replicas"] == 2


def test_last_epoch_checkpoint_is_written_only_when_kept(tmp_path, monkeypatch):
    """A finished run deletes its checkpoint, so the last epoch's is not written at all (it is
    the biggest file a fold writes); with keep_checkpoint=True it is, and holds the last epoch."""
    written = []
    real = checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint",
                        lambda out, model, meta: (written.append(meta["epoch"]), real(out, model, meta)))
    train.train_fold(tiny_cnn(), *DATA, tmp_path / "a", network_name="tiny", fold=0, **COMMON)
    n_long = COMMON["epochs_long"]
    assert written == list(range(1, n_long)) and not (tmp_path / "a" / "checkpoint.npz").exists()
    written.clear()
    train.train_fold(tiny_cnn(), *DATA, tmp_path / "b", network_name="tiny", fold=0, keep_checkpoint=True, **COMMON)
    assert written == list(range(1, n_long + 1))
    assert checkpoints.read_checkpoint_meta(tmp_path / "b" / "checkpoint.npz")["epoch"] == n_long


def test_explain_load_weights_reads_a_keras_archive_like_keras(tmp_path):
    """explain.load_weights (extracts the archive's weights file first) gives exactly the weights
    Keras' own load_weights gives; a mismatching archive raises; other files go to Keras."""
    from cellstudy import explain

    src, dst = tiny_cnn()(), tiny_cnn()()
    src.save(tmp_path / "m.keras")
    explain.load_weights(dst, tmp_path / "m.keras")
    ref = tiny_cnn()()
    ref.load_weights(tmp_path / "m.keras")
    for a, b, c in zip(src.weights, dst.weights, ref.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(b.numpy(), c.numpy())
    src.save_weights(tmp_path / "w.weights.h5")
    explain.load_weights(tiny_cnn()(), tmp_path / "w.weights.h5")
    with pytest.raises(ValueError):
        other = keras.Sequential([keras.Input((S, S, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
        explain.load_weights(other, tmp_path / "m.keras")


def test_learning_rate_warmup_schedule():
    assert train.learning_rate_schedule(1e-3, 0) == 1e-3      # no warm-up: the paper's fixed rate
    sched = train.learning_rate_schedule(1e-2, 10)
    lr = [float(sched(s)) for s in (0, 5, 10, 11, 500)]
    np.testing.assert_allclose(lr, [0.0, 5e-3, 1e-2, 1e-2, 1e-2], rtol=1e-6, atol=1e-9)
    # a built-in Keras schedule: saved models load without cellstudy
    assert type(sched).__module__.startswith("keras")


def test_cosine_decay_schedule():
    """After the warm-up the rate falls as a half cosine to 0 at the end of the long regime."""
    sched = train.learning_rate_schedule(1e-2, 10, 20)
    lr = [float(sched(s)) for s in (0, 5, 10, 15, 20, 25, 30, 31, 500)]
    half = [(1 + np.cos(np.pi * u)) / 2 * 1e-2 for u in (0.25, 0.5, 0.75)]
    np.testing.assert_allclose(lr, [0.0, 5e-3, 1e-2, half[0], half[1], half[2], 0.0, 0.0, 0.0],
                               rtol=1e-5, atol=1e-9)
    no_warm = train.learning_rate_schedule(1e-2, 0, 20)
    np.testing.assert_allclose([float(no_warm(s)) for s in (0, 10, 20)], [1e-2, 5e-3, 0.0], atol=1e-9)
    assert type(sched).__module__.startswith("keras") and type(no_warm).__module__.startswith("keras")
    # the decay spans the long regime after the warm-up, in optimiser steps
    assert train.decay_steps_for("cosine", 10, 2, 11) == 88
    assert train.decay_steps_for("none", 10, 2, 11) == 0
    with pytest.raises(ValueError, match="lr_decay='linear'"):
        train.decay_steps_for("linear", 10, 2, 11)
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        train.learning_rate_schedule(1e-2, -1, 20)


@pytest.mark.slow  # three training runs of the tiny network
def test_cosine_decay_resume_equals_uninterrupted_and_is_checked(tmp_path):
    """The decay follows the optimiser's step count (restored from the checkpoint); a checkpoint
    of another decay, or of the same decay over another length, is refused."""
    kw = {**COMMON, "warmup_epochs": 1, "learning_rate": 1e-2, "lr_decay": "cosine"}
    ref = train.train_fold(tiny_cnn(), *DATA, tmp_path / "ref", network_name="tiny", fold=0, **kw)
    done = json.loads((tmp_path / "ref" / "done.json").read_text())
    steps = int(np.ceil(len(DATA[0]) / COMMON["batch_size"]))
    assert done["lr_decay"] == "cosine" and done["decay_steps"] == (COMMON["epochs_long"] - 1) * steps
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, callbacks=[KillAfter(1)], **kw)
    with pytest.raises(train.CheckpointMismatchError, match="lr_decay 'cosine' there vs 'none' now"):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0,
                         **{**kw, "lr_decay": "none"})
    with pytest.raises(train.CheckpointMismatchError, match="decay_steps"):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0,
                         **{**kw, "epochs_long": COMMON["epochs_long"] + 1})
    resumed = train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, **kw)
    assert resumed.resumed_from == 1
    np.testing.assert_array_equal(resumed.proba["long"], ref.proba["long"])
    with pytest.raises(train.TrainError, match="lr_decay .* must be one of"):
        train.train_fold(tiny_cnn(), *DATA, tmp_path / "bad", network_name="tiny", fold=0,
                         **{**kw, "lr_decay": "step"})


@pytest.mark.slow  # three training runs (~10 s on 2 loaded cores); resume itself: test_resume_after_kill_*
def test_warmup_resume_equals_uninterrupted(tmp_path):
    """The warm-up follows the optimiser's step count, which the checkpoint restores."""
    kw = {**COMMON, "warmup_epochs": 2, "learning_rate": 1e-2}
    ref = train.train_fold(tiny_cnn(), *DATA, tmp_path / "ref", network_name="tiny", fold=0, **kw)
    assert json.loads((tmp_path / "ref" / "done.json").read_text())["warmup_epochs"] == 2
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, callbacks=[KillAfter(1)], **kw)
    resumed = train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, **kw)
    assert resumed.resumed_from == 1
    np.testing.assert_array_equal(resumed.proba["long"], ref.proba["long"])
    with pytest.raises(ValueError, match="warmup_epochs"):
        train.train_fold(tiny_cnn(), *DATA, tmp_path / "bad", network_name="tiny", fold=0,
                         **{**kw, "warmup_epochs": 4})


def test_dihedral_transforms_are_the_eight_symmetries():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    outs = [np.asarray(train.dihedral(x, np.int32(k))) for k in range(8)]
    assert len({o.tobytes() for o in outs}) == 8                 # all different
    np.testing.assert_array_equal(outs[0], x)                     # k = 0: identity
    np.testing.assert_array_equal(outs[1], np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_array_equal(outs[4], x[:, :, ::-1])         # flip only
    for o in outs:  # pixels move, each pixel keeps its channels (commutes with colour whitening)
        assert sorted(map(tuple, o.reshape(-1, 3))) == sorted(map(tuple, x.reshape(-1, 3)))


def test_flips_pipeline_is_a_function_of_seed_and_epoch():
    x, y = DATA[0][:12], np.arange(12).astype(np.int32)

    def images(epoch, flips=True):
        ds = train.make_train_dataset(x, y, 4, 0, epoch, flips=flips)
        return [(b[0].numpy(), b[1].numpy()) for b in ds]

    a = images(2)
    plain = images(2, flips=False)
    for (xa, ya), (xp, yp) in zip(a, plain):
        np.testing.assert_array_equal(ya, yp)                     # the same order as without flips
        for img, ref in zip(xa, xp):                              # each image a symmetry of its cell
            assert any(np.array_equal(img, np.asarray(train.dihedral(ref, np.int32(k)))) for k in range(8))
    ks_changed = sum(not np.array_equal(i, r) for (xa, _), (xp, _) in zip(a, plain) for i, r in zip(xa, xp))
    assert ks_changed >= 6                                        # ~7/8 of the images transformed
    for (x1, _), (x2, _) in zip(a, images(2)):
        np.testing.assert_array_equal(x1, x2)                     # repeatable
    assert not all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(a, images(3)))


@pytest.mark.slow  # three training runs of the tiny network
def test_flips_resume_equals_uninterrupted_and_is_checked(tmp_path):
    kw = {**COMMON, "flips": True}
    ref = train.train_fold(tiny_cnn(), *DATA, tmp_path / "ref", network_name="tiny", fold=0, **kw)
    assert json.loads((tmp_path / "ref" / "done.json").read_text())["flips"] is True
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, callbacks=[KillAfter(1)], **kw)
    with pytest.raises(train.CheckpointMismatchError, match="flips True there vs False now"):
        train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, **COMMON)
    resumed = train.train_fold(tiny_cnn(), *DATA, out, network_name="tiny", fold=0, **kw)
    assert resumed.resumed_from == 1
    np.testing.assert_array_equal(resumed.proba["long"], ref.proba["long"])


# ---- the long regime on to the training plateau (epochs_long_max) ------------------------------
PLATEAU_DATA = make_data(n_train=64)
PLATEAU = dict(epochs_short=2, epochs_long=6, batch_size=8, seed=0, deterministic=True,
               learning_rate=1e-2)


def _history(out):
    import pandas as pd
    return pd.read_csv(out / "history.csv")


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory):
    """One uninterrupted run that goes on to its plateau (at most 30 epochs)."""
    out = tmp_path_factory.mktemp("plateau") / "run"
    events = []
    train.train_fold(tiny_cnn(dropout=0.0), *PLATEAU_DATA, out, network_name="tiny", fold=0,
                     epochs_long_max=30, progress=events.append, **PLATEAU)
    return out, events


def test_long_regime_stops_at_the_first_plateau_epoch(plateau_run, capsys):
    """The run trains past epochs_long until the results chapter's rule calls its training
    accuracy converged, and stops at the first such epoch, before the cap."""
    out, events = plateau_run
    done = json.loads((out / "done.json").read_text())
    acc = _history(out)["accuracy"].tolist()
    n = done["epochs_trained"]
    assert done["long_stop"] == "plateau" and done["epochs_long_max"] == 30
    assert PLATEAU["epochs_long"] < n < 30 and len(acc) == n      # went on past 6, stopped before 30
    assert train.stops_at_plateau(acc)                            # converged where it stopped ...
    assert not any(train.stops_at_plateau(acc[:e]) for e in range(PLATEAU["epochs_long"], n))  # ... and not before
    from cellstudy.learning import convergence
    assert convergence.plateau(acc)["converged"]                  # what the book will say of it
    assert [e["epoch"] for e in events if e["event"] == "regime"] == [2, n]
    assert {e["epochs"] for e in events if e["event"] == "epoch"} == {30}
    assert [e["epoch"] for e in events if e["event"] == "plateau"] == [n]
    assert np.load(out / "proba_long.npy").shape == (len(PLATEAU_DATA[3]), 2)
    assert (out / "model_long.keras").exists() and not (out / "checkpoint.npz").exists()
    train.print_progress(next(e for e in events if e["event"] == "plateau"))
    train.print_progress(next(e for e in events if e["event"] == "start"))
    printed = capsys.readouterr().out
    assert f"on its plateau after epoch {n}" in printed and "at most 30 in all" in printed


def test_long_regime_stops_at_the_cap(plateau_run, tmp_path):
    """A run whose training accuracy is not on its plateau by epochs_long_max stops there, and
    says so; its first epochs are those of the longer run."""
    ref, _ = plateau_run
    acc_ref = _history(ref)["accuracy"].tolist()
    cap = len(acc_ref) - 1                  # the epoch before the plateau: not converged there
    assert cap > PLATEAU["epochs_long"] and not train.stops_at_plateau(acc_ref[:cap])
    out = tmp_path / "run"
    train.train_fold(tiny_cnn(dropout=0.0), *PLATEAU_DATA, out, network_name="tiny", fold=0,
                     epochs_long_max=cap, **PLATEAU)
    done = json.loads((out / "done.json").read_text())
    assert (done["long_stop"], done["epochs_trained"]) == ("cap", cap)
    np.testing.assert_array_equal(_history(out)["accuracy"], acc_ref[:cap])


def test_plateau_run_resumes_to_the_same_stop(plateau_run, tmp_path):
    """Killed after the minimum and before the plateau, the run resumes (its history restored from
    the checkpoint) and stops at the same epoch with the same probabilities; a kept checkpoint of
    an ended run gives its long regime again without training another epoch."""
    ref, _ = plateau_run
    n = json.loads((ref / "done.json").read_text())["epochs_trained"]
    assert n - 2 >= PLATEAU["epochs_long"]            # the kill falls after the minimum
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train.train_fold(tiny_cnn(dropout=0.0), *PLATEAU_DATA, out, network_name="tiny", fold=0,
                         epochs_long_max=30, callbacks=[KillAfter(n - 2)], **PLATEAU)
    train.train_fold(tiny_cnn(dropout=0.0), *PLATEAU_DATA, out, network_name="tiny", fold=0,
                     epochs_long_max=30, keep_checkpoint=True, **PLATEAU)
    done = json.loads((out / "done.json").read_text())
    assert (done["long_stop"], done["epochs_trained"], done["timings"]["resumed_from_epoch"]) == ("plateau", n, n - 2)
    np.testing.assert_array_equal(np.load(out / "proba_long.npy"), np.load(ref / "proba_long.npy"))
    (out / "done.json").unlink()                      # killed between the last checkpoint and done.json
    train.train_fold(tiny_cnn(dropout=0.0), *PLATEAU_DATA, out, network_name="tiny", fold=0,
                     epochs_long_max=30, keep_checkpoint=True, **PLATEAU)
    done = json.loads((out / "done.json").read_text())
    assert (done["long_stop"], done["epochs_trained"]) == ("plateau", n) and len(_history(out)) == n
    np.testing.assert_array_equal(np.load(out / "proba_long.npy"), np.load(ref / "proba_long.npy"))


def test_a_checkpoint_of_another_long_regime_is_refused(tmp_path):
    """A checkpoint written under one end of the long regime (a cap, or a fixed count) is not
    resumed under another: the stop decisions would mix two rules."""
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train.train_fold(tiny_cnn(), *PLATEAU_DATA, out, network_name="tiny", fold=0,
                         epochs_long_max=30, callbacks=[KillAfter(2)], **PLATEAU)
    with pytest.raises(train.CheckpointMismatchError, match="epochs_long_max 30 there vs None now"):
        train.train_fold(tiny_cnn(), *PLATEAU_DATA, out, network_name="tiny", fold=0, **PLATEAU)


@pytest.mark.parametrize("bad, match", [
    (dict(epochs_long_max=5), "epochs_long_max .* must be None or an int >= epochs_long"),
    (dict(epochs_long_max=True), "epochs_long_max"),
    (dict(epochs_long_max=30, lr_decay="cosine"), "a decay runs to the last epoch")])
def test_bad_epochs_long_max(tmp_path, bad, match):
    with pytest.raises(train.TrainError, match=match):
        train.train_fold(tiny_cnn(), *PLATEAU_DATA, tmp_path / "run", network_name="tiny", fold=0,
                         **{**PLATEAU, **bad})
    assert not (tmp_path / "run").exists()
