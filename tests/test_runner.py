"""The study runner: config validation, failing notebooks, resume, never overwriting a run."""
import json
import os

import nbformat
import pytest
import yaml

from cellstudy import config, runner


def _nb(path, *sources):
    nb = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    params = nbformat.v4.new_code_cell(
        'run_dir = "x"\ndata_root = None\ncohort = "c"\nscale = "ci"\nseed = 0\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# Chapter {path.stem}"), params]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


def _config(tmp_path, steps, **kw):
    cfg = {"name": "t", "cohort": "bbbc021-paper", "scale": "ci", "seed": 0, "data_root": None,
           "overrides": {}, "steps": steps, **kw}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture
def fake_notebooks(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", nbdir)
    monkeypatch.setattr(runner, "preflight", lambda cfg: {"data_root": "/nowhere", "cohort": cfg.cohort})
    return nbdir


@pytest.mark.parametrize("patch, message", [
    ({"scale": "huge"}, "unknown scale 'huge'"),
    ({"cohort": "nope"}, "unknown cohort 'nope'"),
    ({"steps": ["00_cohort", "99_missing"]}, r"unknown step\(s\) \['99_missing'\]"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"overrides": {"image_sz": 3}}, "unknown scale parameter 'image_sz'"),
    ({"name": "a b"}, "name 'a b'"),
])
def test_bad_config_values_fail_before_any_work(tmp_path, patch, message):
    cfg = {"name": "t", "cohort": "bbbc021-paper", "scale": "ci", "steps": ["00_cohort"]}
    cfg.update(patch)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(config.ConfigError, match=message):
        runner.load_config(p)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        runner.load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_valid():
    for name in ("default", "ci", "paper"):
        cfg = runner.load_config(config.REPO_ROOT / "configs" / f"{name}.yaml")
        assert cfg.steps[:2] == ["00_cohort", "01_preprocessing"]


def test_failing_notebook_names_notebook_and_cell_and_blocks_the_book(tmp_path, fake_notebooks):
    _nb(fake_notebooks / "00_ok.ipynb", "import pathlib\npathlib.Path(run_dir, '00_ok', 'out.txt').write_text(scale)")
    _nb(fake_notebooks / "01_bad.ipynb", "x = 1", "raise ValueError('broken on purpose')")
    cfg = _config(tmp_path, ["00_ok", "01_bad"])
    runs = tmp_path / "runs"
    with pytest.raises(runner.StudyError, match=r"01_bad\.ipynb failed at cell .*ValueError: broken on purpose"):
        runner.run_study(cfg, runs_dir=runs, log_output=False, echo=lambda s: None)
    (run,) = runs.iterdir()
    st = runner.read_status(run)
    assert st["state"] == "failed" and st["steps"]["00_ok"]["state"] == "done"
    assert st["steps"]["01_bad"]["state"] == "failed"
    assert not (run / "book").exists()
    assert (run / "00_ok" / "out.txt").read_text() == "ci"  # parameters were injected
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["config"]["scale"] == "ci" and "numpy" in prov["packages"] and prov["git"]["commit"]

    # Fix the notebook and rerun the same command: the run resumes in the same folder, the step
    # that was done is kept (not executed again), and the book is built.
    done_nb = run / "notebooks" / "00_ok.ipynb"
    mtime = done_nb.stat().st_mtime_ns
    _nb(fake_notebooks / "01_bad.ipynb", "x = 1", "print('fixed')")
    out = runner.run_study(cfg, runs_dir=runs, log_output=False, echo=lambda s: None)
    assert out == run
    assert done_nb.stat().st_mtime_ns == mtime
    st = runner.read_status(run)
    assert st["state"] == "complete"
    index = run / "book" / "_build" / "html" / "index.html"
    assert index.is_file() and (run / "book" / "_build" / "html" / "01_bad.html").is_file()
    assert (run / "book" / "_build" / "html" / "mathjax" / "tex-chtml.js").is_file()
    html = (run / "book" / "_build" / "html" / "provenance.html").read_text()
    assert "00_ok" in html and "Package versions" in html

    # A completed run is never touched again: the next run gets a new folder.
    out2 = runner.run_study(cfg, runs_dir=runs, build=False, log_output=False, echo=lambda s: None)
    assert out2 != run and sorted(p.name for p in runs.iterdir()) == sorted([run.name, out2.name])
    assert runner.read_status(run)["state"] == "complete"


def test_unwritable_runs_folder_is_a_clear_error(tmp_path, fake_notebooks):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path below a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        runs = blocker / "runs"
    else:
        runs = tmp_path / "ro"
        runs.mkdir()
        runs.chmod(0o500)
    _nb(fake_notebooks / "00_ok.ipynb", "x = 1")
    with pytest.raises((runner.StudyError, OSError)):
        runner.run_study(_config(tmp_path, ["00_ok"]), runs_dir=runs, log_output=False, echo=lambda s: None)
