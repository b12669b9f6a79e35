import pytest

from cellstudy import config


def test_scales_share_keys_and_differ_in_numbers_only():
    keys = {name: set(s) for name, s in config.SCALES.items()}
    assert keys["ci"] == keys["cpu"] == keys["paper"]
    assert config.SCALES["paper"]["image_size"] == 512
    assert config.SCALES["paper"]["epochs_short"] < 100 < config.SCALES["paper"]["epochs_long"]
    for s in config.SCALES.values():
        assert set(s["preprocess"]) == set(config.SCALES["paper"]["preprocess"])
        assert s["preprocess"]["diffusion_time_step"] <= 0.125


def test_unknown_scale_and_parameter_are_clear_errors():
    with pytest.raises(config.ConfigError, match="unknown scale 'huge'.*ci"):
        config.get_scale("huge")
    with pytest.raises(config.ConfigError, match="unknown scale parameter 'imagesize'"):
        config.get_scale("ci", {"imagesize": 3})
    with pytest.raises(config.ConfigError, match="preprocess parameter"):
        config.get_scale("ci", {"preprocess": {"sigma": 3}})


def test_overrides_do_not_leak_into_the_defaults():
    s = config.get_scale("ci", {"image_size": 40, "preprocess": {"psf_sigma": 2.0}})
    assert s["image_size"] == 40 and s["preprocess"]["psf_sigma"] == 2.0
    assert config.SCALES["ci"]["image_size"] == 32
    assert config.SCALES["ci"]["preprocess"]["psf_sigma"] == 1.0


def test_shift_scales_with_image_size():
    assert config.max_shift_px(config.get_scale("paper")) == 20
    assert config.max_shift_px(config.get_scale("ci", {"image_size": 128})) == 5


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(config.DATA_ROOT_ENV, str(tmp_path))
    assert config.data_root() == tmp_path.resolve()
    assert config.data_root(tmp_path / ".") == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="nowhere.*data_root parameter"):
        config.data_root(tmp_path / "nowhere")
    monkeypatch.setenv(config.DATA_ROOT_ENV, str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"gone.*\$CELLSTUDY_DATA_ROOT"):
        config.data_root()


def test_whitening_per_family():
    """whitening: one mode for every network, or a mapping family -> mode (a family left out:
    "zca"); pre-training (network None) gets the one mode, else the paper's ZCA."""
    assert config.whitening_for({"whitening": "channel"}, "mhl") == "channel"
    assert config.whitening_for({}, "rgb") == "zca"                   # a scale from before the key
    per = {"whitening": {"RGB": "channel", "MHL": "zca"}}
    assert [config.whitening_for(per, n) for n in ("rgb", "rgb_res", "rgb_den", "mhl", "vgg16", "vit")] == \
        ["channel", "channel", "channel", "zca", "zca", "zca"]
    assert config.whitening_for(per) == "zca" and config.whitening_for({"whitening": "channel"}) == "channel"
    # the default scale: the RGB family on its own stains, the others the paper's ZCA
    cpu = config.get_scale("cpu")
    assert {n: config.whitening_for(cpu, n) for n in ("rgb", "rgb_res", "rgb_den", "mhl", "densenet121", "vit")} == \
        {"rgb": "channel", "rgb_res": "channel", "rgb_den": "channel", "mhl": "zca", "densenet121": "zca", "vit": "zca"}
    # overrides replace the scale's whitening whole (a mode for all, or a mapping: the families
    # it does not name get "zca")
    assert config.whitening_for(config.get_scale("cpu", {"whitening": "zca"}), "rgb") == "zca"
    sc = config.get_scale("cpu", {"whitening": {"MHL": "channel"}})
    assert (config.whitening_for(sc, "mhl"), config.whitening_for(sc, "rgb")) == ("channel", "zca")
    assert config.SCALES["cpu"]["whitening"] == {"RGB": "channel"}          # not changed by overrides
    for scale in ("paper", "cpu"):
        for bad in ("pca", {"CNN": "zca"}, {"RGB": "pca"}, ["zca"]):
            with pytest.raises(config.ConfigError, match="whitening="):
                config.get_scale(scale, {"whitening": bad})


def test_per_stain_families():
    """The families a scale whitens per stain, as the preprocessing and reproducibility chapters
    state them."""
    assert config.per_stain_families(config.get_scale("cpu")) == ["RGB"]
    assert config.per_stain_families(config.get_scale("paper")) == []
    assert config.per_stain_families({"whitening": "channel"}) == ["DL", "ViT", "RGB", "MHL"]
    assert config.per_stain_families({"whitening": {"MHL": "channel", "DL": "zca"}}) == ["MHL"]


def test_lr_decay_is_checked_when_the_scale_is_read():
    """A scale's ``lr_decay``: "none" (the paper's fixed rate) or "cosine"; another value stops
    the config before any work, naming the value."""
    assert config.get_scale("paper")["lr_decay"] == "none"
    assert config.get_scale("cpu", {"lr_decay": "cosine", "epochs_long_max": None})["lr_decay"] == "cosine"
    for bad in ("linear", None, 1):
        with pytest.raises(config.ConfigError, match=f"lr_decay={bad!r}; expected 'none'"):
            config.get_scale("cpu", {"lr_decay": bad})


def test_rate_text_says_the_schedule():
    """The learning rate in words, as the book's parameters table and the reproducibility chapter
    state it."""
    cpu = config.get_scale("cpu")
    assert config.rate_text(cpu) == "0.003 after a 2-epoch linear warm-up"
    assert config.rate_text({**cpu, "lr_decay": "cosine"}) == \
        "0.003 after a 2-epoch linear warm-up, then a cosine decay to 0 by the last epoch"
    assert config.rate_text(config.get_scale("paper")) == "0.001, fixed"
    assert config.rate_text(config.get_scale("paper", {"lr_decay": "cosine"})) == \
        "0.001, a cosine decay to 0 by the last epoch"
    assert config.rate_text({"learning_rate": 1e-3}) == "0.001, fixed"     # a scale of an older run


def test_epochs_long_max_is_checked_when_the_scale_is_read():
    """``epochs_long_max``: None (a fixed long regime) or an int >= epochs_long (on to the training
    plateau, at most that many epochs); not with a decay whose length is the regime's. A bad value
    stops the config before any work, naming it."""
    assert config.get_scale("paper")["epochs_long_max"] is None
    assert config.get_scale("cpu")["epochs_long_max"] == 30
    assert config.get_scale("ci", {"epochs_long_max": 5})["epochs_long_max"] == 5
    for bad in (1, True, 2.5, "30"):
        with pytest.raises(config.ConfigError, match=f"epochs_long_max={bad!r}; expected null"):
            config.get_scale("ci", {"epochs_long_max": bad})
    with pytest.raises(config.ConfigError, match="a decay runs to the last epoch"):
        config.get_scale("ci", {"epochs_long_max": 5, "lr_decay": "cosine"})
    assert config.get_scale("cpu", {"lr_decay": "cosine", "epochs_long_max": 10})["epochs_long_max"] == 10
    assert config.get_scale("cpu", {"epochs_long": 20})["epochs_long_max"] is None  # 20 asked: 20, fixed
    assert config.get_scale("cpu", {"epochs_long": 3})["epochs_long_max"] is None
    assert config.get_scale("cpu", {"epochs_long": 12, "epochs_long_max": 40})["epochs_long_max"] == 40
    assert config.get_scale("ci", {"epochs_long": 4})["epochs_long_max"] is None    # fixed stays fixed
    assert config.ADDED_SCALE_KEYS["epochs_long_max"] is None     # run folders made before it: fixed


def test_epochs_in_words():
    """The epochs as the book states them, fixed and on to the plateau."""
    fixed = {"epochs_short": 5, "epochs_long": 10, "epochs_long_max": None}
    assert config.epochs_text(fixed) == "5 + 5 epochs"
    assert config.regime_epochs_text(fixed, "long") == "10 epochs"
    assert config.regime_epochs_text({"epochs_short": 1, "epochs_long": 2}, "short") == "1 epoch"
    assert config.plateau_stop_text(fixed) == ""
    up = {**fixed, "epochs_long_max": 30}
    assert config.epochs_text(up) == ("5 epochs for the short regime, then on to the training plateau for "
                                      "the long, 10 to 30 epochs in all")
    assert config.regime_epochs_text(up, "short") == "5 epochs"
    assert config.regime_epochs_text(up, "long") == "on to the training plateau, 10-30 epochs"
    assert "from epoch 10 until this rule held" in config.plateau_stop_text(up)
    assert "by epoch 30, the scale's cap" in config.plateau_stop_text(up)
    assert config.plateau_cap(up) == 30 and config.plateau_cap(fixed) is None
    assert config.plateau_cap({**fixed, "epochs_long_max": 10}) is None       # = epochs_long: fixed
    assert config.plateau_cap({"epochs_short": 5, "epochs_long": 10}) is None  # a run made before the key
