import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
import cellstudy  # noqa: E402,F401  (before any TensorFlow import: sets TF_ENABLE_ONEDNN_OPTS)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    # Tests never write into the repository's cache: a per-session cache folder.
    if "CELLSTUDY_CACHE" not in os.environ:
        import tempfile
        os.environ["CELLSTUDY_CACHE"] = tempfile.mkdtemp(prefix="cellstudy-cache-")
        config._cellstudy_made_cache = os.environ["CELLSTUDY_CACHE"]


def pytest_unconfigure(config):
    # the session's cache folder goes with the session (each run left up to 13 MB in /tmp)
    made = getattr(config, "_cellstudy_made_cache", None)
    if made and os.environ.get("CELLSTUDY_CACHE") == made:
        import shutil
        shutil.rmtree(made, ignore_errors=True)
        del os.environ["CELLSTUDY_CACHE"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = Path(os.environ.get("CELLSTUDY_DATA_ROOT", SHARED_DATA))
    if not (root / "bbbc021-mcf7").is_dir():
        pytest.skip(f"real data not found at {root} (set CELLSTUDY_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory, shared_data) -> Path:
    """The `ci` study (configs/ci.yaml) run once per test session by the runner, book included;
    shared by the end-to-end and browser tests. Returns the run folder."""
    from cellstudy import config, runner

    runs = tmp_path_factory.mktemp("runs")
    said: list[str] = []

    def echo(line: str) -> None:   # the terminal's lines, kept in runs/console.txt for the tests
        print(line)
        said.append(line)

    rd = runner.run_study(config.REPO_ROOT / "configs" / "ci.yaml", runs_dir=runs, data_root=str(shared_data),
                          log_output=False, echo=echo)
    (runs / "console.txt").write_text("\n".join(said) + "\n")
    return rd


def backbone_weights_file(folder: Path, backbone: str = "cnn3", size: int = 32, seed: int = 1):
    """A local weights file of ``backbone`` (seeded random weights) in ``folder``: what a user's
    pretrained file looks like. Returns (the reference backbone model, the file's path)."""
    import keras

    from cellstudy.learning.models import backbones as bbs

    keras.utils.set_random_seed(seed)
    ref = bbs.standalone(backbone, (size, size, 3))
    path = Path(folder) / f"{backbone}.weights.h5"
    ref.save_weights(path)
    return ref, path
