"""Tests for cellstudy.learning.models: the eleven networks at tiny sizes (32 px, batch 2).

Each network is built once (module-scoped, parametrized fixture; pytest groups the tests by
network) and reused by every check; the training step runs last for each network because it
changes the weights.
"""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from cellstudy.learning import models as M  # noqa: E402
from cellstudy.learning.models import backbones as bbs  # noqa: E402
from cellstudy.learning.models.weights import sha256_file  # noqa: E402

S = 32
BATCH = 2


def _x(seed=0, size=S):
    return np.random.default_rng(seed).random((BATCH, size, size, 3), dtype=np.float32)


# The networks on a ResNet50 / DenseNet121 backbone take 5-35 s per check on 2 CPU cores: their
# parametrizations are marked slow (run by `make test`, not by `pytest -m "not slow"`). The fast
# tier keeps one network per family: vgg16 (DL), vit (ViT), rgb (RGB), mhl (MHL).
HEAVY = ("resnet50", "densenet121", "denres131", "rgb_res", "rgb_den", "mhl_res", "mhl_den")


def _networks(slow=HEAVY):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in M.NETWORKS]


@pytest.fixture(scope="module", params=_networks())
def net(request):
    keras.utils.set_random_seed(0)
    model = M.build(request.param, S)
    yield request.param, model
    del model
    keras.backend.clear_session()


def test_registry_and_families():
    assert len(M.NETWORKS) == 11
    assert set(M.FAMILIES) == set(M.NETWORKS)
    assert set(M.FAMILIES.values()) == {"DL", "ViT", "RGB", "MHL"}
    assert [n for n, f in M.FAMILIES.items() if f == "RGB"] == ["rgb", "rgb_res", "rgb_den"]


def test_flat_output_and_rows_sum_to_one(net):
    name, model = net
    assert model.name == name
    nested = [l.name for l in model.layers if isinstance(l, keras.Model)]
    assert nested == [], f"{name} has nested sub-models {nested}"
    p = model(_x(), training=False).numpy()
    assert p.shape == (BATCH, 2)
    assert p.dtype == np.float32
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_gradcam_layers_are_4d_and_reachable(net):
    name, model = net
    names = M.gradcam_layers(model)
    assert names == M.gradcam_layers(name)
    assert len(names) == {"RGB": 3}.get(M.FAMILIES[name], 2 if name == "denres131" else 1)
    outs = [model.get_layer(n).output for n in names]
    for n, t in zip(names, outs):
        assert len(t.shape) == 4, f"{name}: Grad-CAM layer {n} output {t.shape} is not 4-D"
    # the XAI engineer's construction, plus the pre-softmax scores for the gradient (eq. 12)
    sub = keras.Model(model.inputs, outs + [model.get_layer("logits").output, model.output])
    x = _x()
    with tf.GradientTape() as tape:
        res = sub([x], training=False)
        score = tf.reduce_sum(res[-2][:, 1])
    grads = tape.gradient(score, res[:-2])
    for n, f, g in zip(names, res[:-2], grads):
        assert f.shape[0] == BATCH and f.shape[1] >= 1 and f.shape[2] >= 1
        assert np.all(np.isfinite(f.numpy()))
        assert g is not None and g.shape == f.shape, f"{name}: no gradient at {n}"
    np.testing.assert_allclose(res[-1].numpy(), tf.nn.softmax(res[-2]).numpy(), atol=1e-6)


def test_gradcam_chooser_at_32_matches_the_stride_arithmetic(net):
    """At S = 32 every chosen map is >= 4 x 4 (a 1 x 1 last map for the stride-32 backbones), and
    the sizes read from the built model equal the name path's stride arithmetic for every
    candidate layer."""
    name, model = net
    chosen = M.gradcam_layers(model, min_size=4)
    assert chosen == M.gradcam_layers(name, min_size=4, input_size=S)
    for n in chosen:
        assert min(model.get_layer(n).output.shape[1:3]) >= 4, (name, n)
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(M.gradcam_table(model, min_size=4), M.gradcam_table(name, S, 4))
    _check_candidate_sizes(name, model, S)


def test_rgb_family_routes_channels_separately(net):
    name, model = net
    if M.FAMILIES[name] != "RGB":
        pytest.skip("RGB family only")
    toks = [f"tokens_{c}" for c in "rgb"]
    blocks = [f"att_{a}{b}_pool" for a, b in (("r", "r"), ("g", "g"), ("b", "b"),
                                               ("r", "g"), ("r", "b"), ("g", "b"))]
    sub = keras.Model(model.inputs, [model.get_layer(n).output for n in toks + blocks])
    x = _x(1)
    base = [t.numpy() for t in sub([x], training=False)]
    for ci, c in enumerate("rgb"):
        x2 = x.copy()
        x2[..., ci] = np.random.default_rng(10 + ci).random(x2.shape[:3], dtype=np.float32)
        new = [t.numpy() for t in sub([x2], training=False)]
        for n, a, b in zip(toks + blocks, base, new):
            uses_c = c in n.split("_")[1]
            if uses_c:
                assert not np.allclose(a, b), f"{name}: changing {c} did not change {n}"
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{name}: changing {c} changed {n}")


@pytest.mark.parametrize("name", ["rgb", "mhl"])
def test_inference_uses_the_statistics_training_normalised_with(name):
    """With BatchNorm momentum 0, a training-mode pass leaves each BatchNorm's moving statistics
    equal to the batch statistics it just normalised with, so an inference pass on the same batch
    gives the training pass's output. For the RGB family this holds only if the shared backbone
    sees the three stains as one batch (``StackChannels``): called once per stain, its BatchNorm
    layers normalised each stain by its own statistics in training and kept the last stain's in
    their moving averages, which inference then applied to all three."""
    from cellstudy.learning.experiment import set_bn_momentum

    keras.utils.set_random_seed(0)
    model = M.build(name, S, head_dropout=0.0)
    set_bn_momentum(model, 0.0)
    x = np.random.default_rng(3).random((6, S, S, 3), dtype=np.float32)
    x[..., 1] *= 4.0  # stains of different brightness, as after any preprocessing but per-stain whitening
    trained = model(x, training=True).numpy()
    np.testing.assert_allclose(model(x, training=False).numpy(), trained, atol=2e-4)
    keras.backend.clear_session()


def test_save_load_round_trip(net, tmp_path):
    name, model = net
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = _x(2)
    np.testing.assert_allclose(loaded(x, training=False).numpy(), model(x, training=False).numpy(),
                               atol=1e-6)
    assert M.gradcam_layers(loaded) == M.gradcam_layers(name)
    # the chosen (deeper-than-last) layers survive saving: for the RGB family the per-channel
    # identity layers feat_<c>_s<stride>, whose outputs are each call's intermediate map
    chosen = M.gradcam_layers(loaded, min_size=4)
    assert chosen == M.gradcam_layers(model, min_size=4)
    if name in ("rgb_res", "rgb_den"):
        assert chosen == ["feat_r_s8", "feat_g_s8", "feat_b_s8"]
        sub = keras.Model(loaded.inputs[0], [loaded.get_layer(n).output for n in chosen])
        ref = keras.Model(model.inputs[0], [model.get_layer(n).output for n in chosen])
        for a, b in zip(sub(x, training=False), ref(x, training=False)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_zz_one_training_step_changes_weights(net):
    name, model = net
    x, y = _x(3), np.array([0, 1])
    before = [v.numpy().copy() for v in model.trainable_variables]
    opt = keras.optimizers.SGD(1e-3, momentum=0.9)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss))
    assert all(g is not None for g in grads), f"{name}: some weights get no gradient"
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    opt.apply(grads, model.trainable_variables)
    changed = sum(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    assert changed >= 0.9 * len(before), f"{name}: only {changed}/{len(before)} weights changed"


# --- Grad-CAM layers with spatial resolution (study.md section 12) ---------------------------

def _check_candidate_sizes(name, model, size):
    """Every candidate the model has: its output size equals backbones.stage_size (the name
    path's arithmetic); the ViT grid equals S / patch."""
    for _target, bb, cands in M._candidates(name):
        for layer, base, _stride in cands:
            got = tuple(int(v) for v in model.get_layer(layer).output.shape[1:3])
            if bb == "vit":
                from cellstudy.learning.models.vit import default_patch_size
                p = default_patch_size((size, size))
                assert got == (size // p, size // p)
            else:
                assert got == bbs.stage_size(bb, base, (size, size)), (name, layer, got)


@pytest.mark.parametrize("name", _networks(HEAVY + ("vgg16",)))  # vgg16 at 64 px: ~14 s
def test_gradcam_chooser_at_64_gives_4x4_maps(name):
    """S = 64 (the default study): every network's chosen Grad-CAM maps are >= 4 x 4 and reachable
    with a gradient, the name path (stride arithmetic) agrees with the built model, and the
    token grid of the attention networks is read from the model."""
    import importlib

    D = importlib.import_module("cellstudy.learning.models.describe")  # the module, not models.describe()
    keras.utils.set_random_seed(0)
    model = M.build(name, 64)
    chosen = M.gradcam_layers(model, min_size=4)
    assert chosen == M.gradcam_layers(name, min_size=4, input_size=64)
    assert len(chosen) == len(M.gradcam_layers(name))
    outs = [model.get_layer(n).output for n in chosen]
    for n, t in zip(chosen, outs):
        assert len(t.shape) == 4 and min(t.shape[1:3]) >= 4, (name, n, t.shape)
    table = M.gradcam_table(model, min_size=4)
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(table, M.gradcam_table(name, 64, 4))
    assert (table[["map_h", "map_w"]] >= 4).all().all() and list(table.layer) == chosen
    _check_candidate_sizes(name, model, 64)
    # gradients reach the chosen maps
    sub = keras.Model(model.inputs, outs + [model.get_layer("logits").output])
    with tf.GradientTape() as tape:
        res = sub([_x(0, 64)[:1]], training=False)
        score = tf.reduce_sum(res[-1][:, 1])
    for n, g in zip(chosen, tape.gradient(score, res[:-1])):
        assert g is not None, (name, n)
    # the token grid (computed from the model) and the book's sentence
    grid = D.token_grid(model)
    expect = {"vit": (16, 16), "rgb": (16, 16), "mhl": (16, 16), "rgb_res": (2, 2), "rgb_den": (2, 2),
              "mhl_res": (2, 2), "mhl_den": (2, 2)}.get(name)
    assert grid == expect
    row = D._row(name, model, 64, False, 1, 4)
    note = D.resolution_note(row)
    assert "At S = 64" in note and all(f"`{n}`" in note for n in chosen)
    if expect:
        assert f"{expect[0]} x {expect[1]} = {expect[0] * expect[1]} tokens" in note
    if name in ("resnet50", "mhl_res"):
        assert "`conv4_block6_out` (a 4 x 4 map)" in note and "`conv5_block3_out` would have been 2 x 2" in note


def test_gradcam_chooser_at_512_is_the_last_conv_layer():
    """The paper's size: stride arithmetic only (no 512 px model is built)."""
    for name in M.NETWORKS:
        assert M.gradcam_layers(name, min_size=4, input_size=512) == M.gradcam_layers(name), name
        t = M.gradcam_table(name, 512, 4)
        assert (t.layer == t.last_conv_layer).all() and (t.map_h >= 16).all(), name
    t = M.gradcam_table(list(M.NETWORKS), 512, 4).set_index(["network", "target"])
    assert tuple(t.loc[("vgg16", "vgg16"), ["map_h", "map_w"]]) == (32, 32)
    assert tuple(t.loc[("resnet50", "resnet50"), ["map_h", "map_w", "stride"]]) == (16, 16, 32)
    assert tuple(t.loc[("rgb", "R channel"), ["layer", "map_h"]]) == ("feat_r", 128)
    assert tuple(t.loc[("vit", "tokens"), ["map_h", "stride"]]) == (16, 32)


def test_gradcam_chooser_by_name_and_errors():
    # S = 32: the stride-32 backbones' last maps are 1 x 1, stride-8 stages are 4 x 4
    assert M.gradcam_layers("resnet50", 4, 32) == ["conv3_block4_out"]
    assert M.gradcam_layers("densenet121", 4, 32) == ["pool3_relu"]
    assert M.gradcam_layers("vgg16", 4, 32) == ["block4_conv3"]
    assert M.gradcam_layers("denres131", 4, 64) == ["res_conv4_block6_out", "den_pool4_relu"]
    assert M.gradcam_layers("rgb_den", 4, 64) == ["feat_r_s16", "feat_g_s16", "feat_b_s16"]
    assert M.gradcam_layers("rgb", 4, 64) == ["feat_r", "feat_g", "feat_b"]
    assert M.gradcam_layers("mhl_den", 2, 64) == ["relu"]
    # no candidate big enough: the largest map (the shallowest candidate)
    assert M.gradcam_layers("resnet50", 64, 64) == ["conv2_block3_out"]
    # arithmetic at odd sizes (ResNet rounds up, DenseNet's and VGG's poolings round down)
    assert bbs.stage_size("resnet50", "conv5_block3_out", (40, 48)) == (2, 2)
    assert bbs.stage_size("densenet121", "pool4_relu", (40, 48)) == (2, 3)
    assert bbs.stage_size("vgg16", "block5_conv3", (40, 40)) == (2, 2)
    assert M.gradcam_table("vit", 64, 4, patch_size=8).iloc[0][["map_h", "stride"]].tolist() == [8, 8]
    with pytest.raises(ValueError, match="input_size is required"):
        M.gradcam_layers("resnet50", min_size=4)
    with pytest.raises(ValueError, match="min_size"):
        M.gradcam_layers("resnet50", min_size=0, input_size=64)
    with pytest.raises(ValueError, match="unknown network"):
        M.gradcam_layers("nope", 4, 64)
    with pytest.raises(ValueError, match="not a Grad-CAM candidate"):
        bbs.stage_size("resnet50", "conv4_block1_out", (64, 64))
    assert M.GRADCAM_CANDIDATES["rgb_res"][0] == ("feat_r", "feat_r_s16", "feat_r_s8", "feat_r_s4")


@pytest.mark.slow  # builds rgb_res twice (~55 s on 2 loaded cores)
def test_rgb_stage_taps_change_no_number(monkeypatch):
    """The per-channel identity layers (feat_<c>_s<stride>) leave the RGB network's weights,
    parameter count and forward pass exactly as without them (same seed); a model without them
    (e.g. saved before they existed) falls back to the last conv maps."""
    from cellstudy.learning.models import attention

    x = _x(5)
    keras.utils.set_random_seed(0)
    with_taps = M.build("rgb_res", S)
    p_with = with_taps.predict(x, verbose=0)
    with monkeypatch.context() as mp:
        mp.setattr(attention, "stage_taps", lambda backbone: {})
        keras.utils.set_random_seed(0)
        plain = M.build("rgb_res", S)
    assert sorted(l.name for l in with_taps.layers if l.name.startswith("feat_")) == sorted(
        f"feat_{c}{s}" for c in "rgb" for s in ("_s4", "_s8", "_s16", ""))
    assert not [l.name for l in plain.layers if l.name.startswith("feat_") and "_s" in l.name]
    assert with_taps.count_params() == plain.count_params()
    for a, b in zip(with_taps.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(p_with, plain.predict(x, verbose=0))
    assert M.gradcam_layers(plain, min_size=4) == ["feat_r", "feat_g", "feat_b"]


# --- errors ---------------------------------------------------------------------------------

def test_the_catalogues_defaults_are_what_is_built(monkeypatch):
    """models.build applies each network's catalogue defaults (cellstudy.networks): the RGB
    family's tokens are RGB_ATTENTION_DEFAULTS' width, the MHL family's ATTENTION_DEFAULTS'; a
    parameter given overrides it."""
    from cellstudy import networks

    with monkeypatch.context() as m:          # build reads the catalogue, not only the builder's signature
        m.setitem(networks.RGB_ATTENTION_DEFAULTS, "token_dim", 4)
        assert M.build("rgb", 32).get_layer("tokens_g").units == 4

    rgb_d = networks.RGB_ATTENTION_DEFAULTS["token_dim"]
    assert rgb_d != networks.ATTENTION_DEFAULTS["token_dim"]
    assert M.build("rgb", 32).get_layer("tokens_g").units == rgb_d
    assert M.build("mhl", 32).get_layer("tokens").units == networks.ATTENTION_DEFAULTS["token_dim"]
    assert M.build("rgb", 32, token_dim=8).get_layer("tokens_g").units == 8
    assert M.valid_params("rgb_den")["token_dim"] == rgb_d


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown network 'resnet'.*'resnet50'"):
        M.build("resnet", 32)
    with pytest.raises(ValueError, match="unknown network"):
        M.gradcam_layers("nope")


@pytest.mark.parametrize("name,size", [("resnet50", 16), ("vgg16", 31), ("denres131", 24),
                                       ("rgb_den", 16), ("mhl", 4)])
def test_input_below_minimum(name, size):
    with pytest.raises(ValueError, match=f"below the minimum.*{name}"):
        M.build(name, size)


@pytest.mark.parametrize("size", [(32, 32, 1), (32, 32, 4), (32,), "abc"])
def test_wrong_channel_count_or_shape(size):
    with pytest.raises(ValueError, match="input_size"):
        M.build("mhl", size)


def test_vit_size_must_be_multiple_of_patch():
    with pytest.raises(ValueError, match="not a multiple of patch_size=16"):
        M.build("vit", 40, patch_size=16)
    with pytest.raises(ValueError, match="pass patch_size"):
        M.build("vit", 36 * 3)  # 108: no default patch gives a grid <= 16
    assert M.build("vit", 48).get_layer("vit_grid").output.shape[1:3] == (12, 12)


def test_unknown_parameter_and_bad_head():
    with pytest.raises(ValueError, match="unknown parameter.*'patch_size'.*expected some of"):
        M.build("resnet50", 32, patch_size=4)
    with pytest.raises(ValueError, match="head_pooling"):
        M.build("mhl", 32, head_pooling="median")
    with pytest.raises(ValueError, match="n_classes"):
        M.build("mhl", 32, n_classes=1)


def test_head_overrides_and_n_classes():
    m = M.build("mhl", 32, n_classes=3, head_units=(16,), head_dropout=0.0, head_pooling="max")
    assert m.output.shape[-1] == 3
    assert [l.name for l in m.layers if l.name.startswith("head_dense")] == ["head_dense1"]
    assert not any(isinstance(l, keras.layers.Dropout) for l in m.layers)
    assert m.get_layer("head_dense1").units == 16


def test_mixed_precision_output_is_float32():
    old = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        m = M.build("mhl", 32)
        assert m.get_layer("tokens").compute_dtype == "float16"
        p = m(_x(), training=False)
        assert p.dtype == "float32"
        np.testing.assert_allclose(p.numpy().sum(axis=1), 1.0, atol=1e-5)
    finally:
        keras.mixed_precision.set_global_policy(old)


# --- local weights ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn_weights(tmp_path_factory):
    from conftest import backbone_weights_file

    return backbone_weights_file(tmp_path_factory.mktemp("w"), "cnn3", S, seed=1)


def test_weights_rgb_sums_first_kernel_and_mhl_loads(cnn_weights):
    ref, path = cnn_weights
    rgb = M.build("rgb", S, weights=path, weights_sha256=sha256_file(path))
    k_src = ref.get_layer("cnn_conv1").get_weights()[0]
    k_rgb = rgb.get_layer("cnn_conv1").get_weights()[0]
    assert k_src.shape[2] == 3 and k_rgb.shape[2] == 1
    np.testing.assert_allclose(k_rgb, k_src.sum(axis=2, keepdims=True), rtol=1e-6)
    for n in ("cnn_conv2", "cnn_bn1", "cnn_bn3", "cnn_conv3"):
        for a, b in zip(ref.get_layer(n).get_weights(), rgb.get_layer(n).get_weights()):
            np.testing.assert_array_equal(a, b)
    # a grey image (g, g, g) gives the same first-conv response through both kernels
    mhl = M.build("mhl", S, weights=str(path))
    for n in ("cnn_conv1", "cnn_conv3", "cnn_bn2"):
        for a, b in zip(ref.get_layer(n).get_weights(), mhl.get_layer(n).get_weights()):
            np.testing.assert_array_equal(a, b)
    # random init differs (the load really happened)
    fresh = M.build("mhl", S)
    assert not np.array_equal(fresh.get_layer("cnn_conv3").get_weights()[0],
                              ref.get_layer("cnn_conv3").get_weights()[0])


def test_weights_errors(cnn_weights, tmp_path):
    _, path = cnn_weights
    missing = tmp_path / "nothere.weights.h5"
    with pytest.raises(FileNotFoundError, match="nothere.weights.h5"):
        M.build("rgb_res", S, weights=missing)
    with pytest.raises(ValueError, match="sha256"):
        M.build("rgb", S, weights=path, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match=r"\.h5"):
        M.build("mhl", S, weights=tmp_path / "w.npz")
    with pytest.raises(ValueError, match="imagenet"):
        M.build("resnet50", S, weights="imagenet")
    with pytest.raises(ValueError, match="mapping"):
        M.build("denres131", S, weights=path)
    with pytest.raises(ValueError, match="vit"):
        M.build("vit", S, weights=path)
    # a file for another backbone does not fit
    with pytest.raises(ValueError, match="does not fit backbone"):
        M.build("vgg16", S, weights=path)


def test_weights_legacy_h5_vgg16(tmp_path):
    """The ImageNet files are Keras-2 style .h5 (matched by layer order); write one, load it."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(2)
    ref = bbs.standalone("vgg16", (S, S, 3))
    path = tmp_path / "vgg16_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, ref)
    m = M.build("vgg16", S, weights=path, weights_sha256=sha256_file(path))
    for n in ("block1_conv1", "block3_conv2", "block5_conv3"):
        for a, b in zip(ref.get_layer(n).get_weights(), m.get_layer(n).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_registry_is_the_catalogues():
    # models reads the catalogue: names, families, backbones, parameters, last conv maps
    from cellstudy import networks

    assert list(M.NETWORKS) == list(networks.NETWORK_NAMES)
    assert M.FAMILIES == {n: networks.family(n) for n in networks.NETWORK_NAMES}
    assert M.BACKBONE_OF["denres131"] == ("resnet50", "densenet121")
    assert M.valid_params("vit")["depth"] == networks.VIT_DEFAULTS["depth"]
    assert all(M.gradcam_layers(n) == list(networks.spec(n).gradcam_last) for n in networks.NETWORK_NAMES)
    with pytest.raises(ValueError, match="unknown network 'rf'"):
        M.build("rf", 32)


def test_models_saved_with_the_former_isolator_still_load(tmp_path):
    """RGB-family models saved before 2026-12-07 slice each stain with ``ChannelSlice`` and call
    the shared backbone once per stain; ``ChannelSlice`` stays registered, so such a file (built
    here as it was then) loads, gives the same numbers and its Grad-CAM layers are found."""
    from keras import layers

    from cellstudy.learning.models import attention as A

    inp = keras.Input((S, S, 3), name="image")
    template = bbs.shared_backbone("cnn3", (S, S))
    feats = [layers.Activation("linear", name=A.tap_name(c))(bbs.replay(template, A.ChannelSlice(i, name=f"isolate_{c}")(inp)))
             for i, c in enumerate(A.CHANNEL_KEYS)]
    pooled = [layers.GlobalAveragePooling2D(name=f"pool_{c}")(f) for c, f in zip(A.CHANNEL_KEYS, feats)]
    old = keras.Model(inp, layers.Dense(2, activation="softmax", name="probs")(layers.Concatenate()(pooled)), name="rgb")
    old.save(tmp_path / "old.keras")
    loaded = M.load(tmp_path / "old.keras")
    x = _x(4)
    np.testing.assert_allclose(loaded(x, training=False).numpy(), old(x, training=False).numpy(), atol=1e-6)
    assert M.gradcam_layers(loaded, min_size=4) == ["feat_r", "feat_g", "feat_b"]


def test_load_needs_no_knowledge_of_custom_layers(tmp_path):
    # a saved RGB-family network (custom StackChannels / UnstackChannels / StackMaps) loads
    # through models.load, in a fresh process that never imported cellstudy.learning.models itself
    import subprocess
    import sys

    m = M.build("rgb", 32)
    p = tmp_path / "rgb.keras"
    m.save(p)
    code = ("import numpy as np; from cellstudy.learning.models import load; m = load(%r); "
            "print(m.name, m(np.zeros((1, 32, 32, 3), 'float32')).shape)" % str(p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("rgb (1, 2)")
    with pytest.raises(FileNotFoundError, match="no saved model at .*nothing.keras"):
        M.load(tmp_path / "nothing.keras")
    (tmp_path / "x.keras").write_text("not a zip")
    with pytest.raises(ValueError, match="is not a Keras model archive"):
        M.load(tmp_path / "x.keras")


@pytest.mark.parametrize("name", ["resnet50", "rgb", "denres131"])
def test_stage_table_counts_each_stages_own_weights_and_adds_up(name):
    """The family chapters' stage tables read 'params 0' for whole ResNet stages (a layer's own
    weights: the stage ends in an Add): now every weight is counted in the first stage that uses
    it, so the column adds up to the network's count (a shared backbone once, a parallel branch
    its own), and no stage is negative."""
    from cellstudy.learning.models.describe import stage_table
    m = M.build(name, 64)
    t = stage_table(m)
    assert t["params in stage"].sum() == m.count_params() and (t["params in stage"] >= 0).all()
    assert t["params up to here"].iloc[-1] == m.count_params()
    if name == "resnet50":
        assert t.set_index("layer").loc["conv4_block6_out", "params in stage"] > 1_000_000
    if name == "rgb":   # the backbone shared by the three stains counts once
        s = t.set_index("layer")["params in stage"]
        assert s["feat_r"] > 0 and s["feat_g"] == s["feat_b"] == 0
