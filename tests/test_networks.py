"""The catalogue (cellstudy.networks): one record per model, read by every module; no TensorFlow."""
import subprocess
import sys

import pytest

from cellstudy import networks


def test_catalogue_holds_the_eleven_networks_then_the_baseline():
    assert networks.NETWORK_NAMES == ("vgg16", "resnet50", "densenet121", "denres131", "vit", "rgb",
                                      "rgb_res", "rgb_den", "mhl", "mhl_res", "mhl_den")
    assert networks.CLASSIFIER_NAMES == ("rf", "logreg")
    assert networks.ORDER == networks.NETWORK_NAMES + networks.CLASSIFIER_NAMES
    assert [networks.family(n) for n in networks.ORDER] == ["DL"] * 4 + ["ViT"] + ["RGB"] * 3 + ["MHL"] * 3 + [
        "Classical"] * 2
    assert networks.networks_of("RGB") == ["rgb", "rgb_res", "rgb_den"]
    # what a pretrained backbone file starts (the runner's provenance, pretrain's family check)
    assert networks.networks_on("cnn3") == ["rgb", "mhl"]
    assert networks.networks_on("resnet50") == ["resnet50", "denres131", "rgb_res", "mhl_res"]
    assert networks.networks_on("none") == []
    assert networks.display("denres131") == "DenRes-131" and networks.display("other") == "other"
    assert networks.family("other") == "other" and networks.family("other", "?") == "?"
    # every network names a builder, its Grad-CAM targets and (but the ViT) a backbone; the
    # classifiers none of these
    for s in networks.CATALOGUE:
        assert s.is_network == (s.family != "Classical")
        assert bool(s.builder) == s.is_network and bool(s.gradcam_last) == s.is_network
    assert [n for n in networks.NETWORK_NAMES if not networks.spec(n).backbones] == ["vit"]
    assert len(networks.spec("rgb_den").gradcam_last) == 3 and len(networks.spec("denres131").gradcam_last) == 2


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet5'.*vgg16"):
        networks.spec("resnet5")
    with pytest.raises(ValueError, match="unknown network 'rf'"):
        networks.check_network("rf")
    with pytest.raises(ValueError, match=r"unknown network 'MHL-Resnet'; expected one of: vgg16 \(VGG16\)"):
        networks.resolve("MHL-Resnet")
    with pytest.raises(ValueError, match="unknown network 'rf'"):
        networks.resolve("rf")   # a classifier is not a network
    with pytest.raises(ValueError, match="unknown family 'CNN'"):
        networks.networks_of("CNN")
    with pytest.raises(ValueError, match="unknown family 'Classical'"):
        networks.networks_of("Classical")


def test_resolve_takes_ids_and_the_papers_names():
    """What a user types after --network: the id or the display name, any case, - or _."""
    for n in networks.NETWORK_NAMES:
        assert networks.resolve(n) == n
        assert networks.resolve(networks.display(n)) == n
        assert networks.resolve(networks.display(n).upper()) == n
    assert networks.resolve("mhl-res") == "mhl_res" and networks.resolve("DenRes131") == "denres131"
    assert networks.resolve(" MHL ") == "mhl"


def test_ordered_follows_the_catalogue_then_alphabet():
    assert networks.ordered(["zeta", "logreg", "mhl", "vgg16", "alpha", "mhl"]) == [
        "vgg16", "mhl", "logreg", "alpha", "zeta"]
    assert networks.ordered(["Classical", "MHL", "DL", "x"], networks.FAMILY_ORDER) == ["DL", "MHL", "Classical", "x"]


def test_the_tables_the_plots_and_the_baseline_read_the_catalogue():
    from cellstudy.learning import baseline, metrics
    from cellstudy.report import plots

    assert metrics.NETWORK_FAMILY is networks.FAMILY and metrics.DISPLAY_NAMES is networks.DISPLAY
    assert metrics.NETWORK_ORDER is networks.ORDER
    assert plots._FAMILY_ORDER is networks.FAMILY_ORDER
    assert baseline.CLASSIFIERS is networks.CLASSIFIER_NAMES


def test_catalogue_and_its_readers_load_no_tensorflow():
    code = ("import sys; import cellstudy.networks, cellstudy.learning.metrics, cellstudy.report.plots, cellstudy.rundir, "
            "cellstudy.report.findings, cellstudy.learning.experiment; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
