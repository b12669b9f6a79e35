"""Pretrained backbone weights through the study config (issue 19 item 1): the `weights:` block is
checked for form when the config loads and for its files before any work; every network on that
backbone starts from the file; done.json records it. Small files written here."""
import json

import keras
import numpy as np
import pytest
import yaml

from cellstudy import config, runner
from cellstudy.data import sha256_file
from cellstudy.learning import experiment, train

S = 32


@pytest.fixture(scope="module")
def cnn3_file(tmp_path_factory):
    from conftest import backbone_weights_file

    return backbone_weights_file(tmp_path_factory.mktemp("w"), "cnn3", S, seed=3)


def _cfg(tmp_path, weights):
    p = tmp_path / "w.yaml"
    p.write_text(yaml.safe_dump({"name": "w", "cohort": "bbbc021-paper", "scale": "ci", "steps": ["00_cohort"],
                                 "weights": weights}))
    return p


def test_weights_block_form_and_files_checked_before_any_work(tmp_path, cnn3_file, monkeypatch):
    _, path = cnn3_file
    sha = sha256_file(path)
    for bad, message in [({"alexnet": {"path": str(path), "sha256": sha}}, "unknown backbone 'alexnet'"),
                         ({"cnn3": str(path)}, r"weights\['cnn3'\] must be \{path: FILE, sha256: HEX\}"),
                         ({"cnn3": {"path": str(path), "sha256": "abc"}}, "is not a sha256"),
                         (["cnn3"], "weights must be a mapping")]:
        with pytest.raises(config.ConfigError, match=message):
            runner.load_config(_cfg(tmp_path, bad))
    monkeypatch.chdir(path.parent)   # a relative path is taken from where the command runs
    cfg = runner.load_config(_cfg(tmp_path, {"cnn3": {"path": path.name, "sha256": sha.upper()}}))
    assert cfg.weights == {"cnn3": {"path": str(path), "sha256": sha}}
    prov = runner.check_weights(cfg)
    assert prov["cnn3"]["networks"] == ["rgb", "mhl"] and prov["cnn3"]["bytes"] == path.stat().st_size
    # the files: wrong checksum, missing, another backbone's file -- each named
    cfg.weights = {"cnn3": {"path": str(path), "sha256": "0" * 64}}
    with pytest.raises(ValueError, match=rf"{path.name}: sha256 .* does not match"):
        runner.check_weights(cfg)
    cfg.weights = {"cnn3": {"path": str(tmp_path / "gone.h5"), "sha256": sha}}
    with pytest.raises(FileNotFoundError, match="gone.h5"):
        runner.check_weights(cfg)
    cfg.weights = {"resnet50": {"path": str(path), "sha256": sha}}
    with pytest.raises(ValueError, match=r"cnn3.weights.h5 does not fit backbone 'resnet50'"):
        runner.check_weights(cfg)


def test_networks_on_the_backbone_start_from_the_file(cnn3_file):
    ref, path = cnn3_file
    w = {"cnn3": {"path": str(path), "sha256": sha256_file(path)}}
    assert experiment.weights_params("vit", w) == {} and experiment.initial_weights("vgg16", w) is None
    assert experiment.weights_params("mhl", w) == {"weights": str(path), "weights_sha256": w["cnn3"]["sha256"]}
    assert experiment.initial_weights("rgb", w) == w
    sc = config.get_scale("ci")
    b = experiment.fold_builder("mhl", sc, experiment.weights_params("mhl", w))
    m = b()
    np.testing.assert_array_equal(m.get_layer("cnn_conv3").get_weights()[0], ref.get_layer("cnn_conv3").get_weights()[0])
    # the next fold gets the file's weights again, not the trained ones
    m.get_layer("cnn_conv3").set_weights([np.zeros_like(v) for v in m.get_layer("cnn_conv3").get_weights()])
    m2 = b()
    np.testing.assert_array_equal(m2.get_layer("cnn_conv3").get_weights()[0], ref.get_layer("cnn_conv3").get_weights()[0])


def test_done_json_records_the_initial_weights_and_resume_checks_them(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((16, 8, 8, 3)).astype(np.float32)
    y = np.array([0, 1] * 8)

    def build():
        inp = keras.Input((8, 8, 3))
        h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inp))
        return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))
    w = {"cnn3": {"path": "/data/cnn3.weights.h5", "sha256": "a" * 64}}
    train.train_fold(build, x, y, x[:4], y[:4], tmp_path / "f", 1, 2, batch_size=8, network_name="tiny",
                     initial_weights=w)
    assert json.loads((tmp_path / "f" / "done.json").read_text())["initial_weights"] == w
    from cellstudy.learning import checkpoints
    with pytest.raises(checkpoints.CheckpointMismatchError, match="initial_weights"):
        checkpoints.compare_meta(tmp_path / "c", {"network": "t", "initial_weights": w}, {"network": "t"})


def test_the_chapters_say_which_networks_started_from_what():
    from cellstudy.report import chapters

    assert chapters.starting_weights(None, ["vgg16"]).startswith("random weights (seeded)")
    w = {"resnet50": {"path": "/w/resnet50_notop.h5", "sha256": "ab" * 32}}
    s = chapters.starting_weights(w, ["vgg16", "resnet50", "denres131"])
    assert s == ("ResNet50, DenRes-131 from `resnet50_notop.h5` (resnet50, sha256 abababababab...); "
                 "random weights (seeded): VGG16")


@pytest.fixture
def weights_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www (stopped after the test)."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def test_weights_fetch_checks_the_published_hash(weights_server, tmp_path, monkeypatch, capsys):
    import hashlib

    from cellstudy import cli
    from cellstudy.learning.models import weights as W

    www, url = weights_server
    rel = W.IMAGENET_NOTOP["resnet50"][0]
    (www / rel).parent.mkdir(parents=True)
    (www / rel).write_bytes(b"resnet50 notop weights, a stand-in" * 100)
    md5 = hashlib.md5((www / rel).read_bytes()).hexdigest()
    monkeypatch.setitem(W.IMAGENET_NOTOP, "resnet50", (rel, md5))
    cache = tmp_path / "cache"
    got = W.fetch_imagenet(["resnet50"], cache, base_url=url, echo=lambda s: None)
    dest = cache / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert got == {"resnet50": {"path": str(dest), "sha256": sha256_file(dest)}}
    assert dest.read_bytes() == (www / rel).read_bytes()
    assert W.weights_block(got).splitlines()[1] == f"  resnet50: {{path: {dest}, sha256: {sha256_file(dest)}}}"
    # a file already in the cache with the right hash is not downloaded again (server gone)
    (www / rel).unlink()
    assert W.fetch_imagenet(["resnet50"], cache, base_url=url, echo=lambda s: None) == got
    # a wrong hash is refused and nothing is kept
    (www / rel).write_bytes(b"tampered")
    dest.unlink()
    with pytest.raises(W.FetchError, match=rf"md5 {hashlib.md5(b'tampered').hexdigest()}, not the published {md5}"):
        W.fetch_imagenet(["resnet50"], cache, base_url=url, echo=lambda s: None)
    assert not dest.exists() and not list(cache.glob(".*"))
    # offline: the message says which file to place where; the CLI exits 2
    assert cli.main(["weights", "fetch", "resnet50", "--cache", str(cache), "--base-url", "http://127.0.0.1:9/"]) == 2
    err = capsys.readouterr().err
    assert f"place it as {dest}" in err and md5 in err
    with pytest.raises(ValueError, match="no published ImageNet weights for \\['cnn3'\\]"):
        W.fetch_imagenet(["cnn3"], cache)


def test_pretraining_never_uses_the_served_cohorts_cells_or_fields(shared_data, tmp_path):
    from cellstudy import data
    from cellstudy.learning import pretrain

    full, paper = data.load_manifest("bbbc021-full"), data.load_manifest("bbbc021-paper")
    keep = pretrain.pretraining_cells(full, paper)
    used = full[keep]
    assert len(used) == 1360 - int(full["group"].isin(set(paper["group"])).sum())
    assert not set(used["group"]) & set(paper["group"]) and not set(used["cell_id"]) & set(paper["cell_id"])
    with pytest.raises(pretrain.PretrainError, match="pre-training needs both classes"):
        pretrain.pretraining_cells(paper, paper)
    # a short pre-training at the ci scale writes a file that a study config can name
    out = tmp_path / "cnn3.weights.h5"
    said = []
    rec = pretrain.pretrain_backbone("cnn3", "bbbc021-full", "bbbc021-paper", out, scale="ci", epochs=2,
                                     max_cells=40, data_root=str(shared_data), echo=said.append)
    # it says each epoch with its accuracy, speed and time left (the fit itself is silent)
    epochs = [m for m in said if ": epoch " in m]
    assert [m.split(",")[0] for m in epochs] == ["pretrain cnn3: epoch 1/2", "pretrain cnn3: epoch 2/2"]
    assert epochs[-1].endswith("ETA 0:00") and "images/s" in epochs[0]
    assert f"{rec['train_accuracy_by_epoch'][0]:.3f}" in epochs[0]
    assert rec["sha256"] == sha256_file(out) and rec["n_cells"] == 40 and rec["fields_left_out"]
    assert json.loads((tmp_path / "cnn3.weights.h5.json").read_text())["rule"].startswith("no cell and no source field")
    cfg = runner.load_config(_cfg(tmp_path, {"cnn3": {"path": str(out), "sha256": rec["sha256"]}}))
    assert runner.check_weights(cfg)["cnn3"]["networks"] == ["rgb", "mhl"]
    # a study of a cohort that shares fields with the pre-training is refused before any work
    p = tmp_path / "full.yaml"
    p.write_text(yaml.safe_dump({"name": "w", "cohort": "bbbc021-full", "scale": "ci", "steps": ["00_cohort"],
                                 "weights": {"cnn3": {"path": str(out), "sha256": rec["sha256"]}}}))
    with pytest.raises(ValueError, match=r"was pre-trained on \d+ file\(s\) and \d+ source field\(s\) of this "
                                         r"study's cohort 'bbbc021-full'.*--serves bbbc021-full"):
        runner.check_weights(runner.load_config(p))
    assert rec["whitening"] == "zca" and rec["family"] is None
    # for one family: its input's whitening at the scale (RGB: each stain on its own), named in the record;
    # a family without a network on the backbone is refused before any work
    rgb = pretrain.pretrain_backbone("cnn3", "bbbc021-full", "bbbc021-paper", tmp_path / "rgb.weights.h5",
                                     scale="ci", overrides={"whitening": {"RGB": "channel"}}, epochs=1,
                                     max_cells=40, family="RGB", data_root=str(shared_data), echo=lambda s: None)
    assert (rgb["family"], rgb["whitening"]) == ("RGB", "channel")
    with pytest.raises(pretrain.PretrainError, match=r"family 'ViT' has no network on backbone 'cnn3'; expected one of \['MHL', 'RGB'\]"):
        pretrain.pretrain_backbone("cnn3", "bbbc021-full", "bbbc021-paper", tmp_path / "v.weights.h5",
                                   scale="ci", family="ViT", echo=lambda s: None)
    assert not (tmp_path / "v.weights.h5").exists()
    with pytest.raises(pretrain.PretrainError, match="exists; not overwritten"):
        pretrain.pretrain_backbone("cnn3", "bbbc021-full", "bbbc021-paper", out, scale="ci", echo=lambda s: None)
