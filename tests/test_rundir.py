"""The run folder's owner (cellstudy.rundir) and the package's atomic writer (cellstudy.atomic)."""
import json
import os

import numpy as np
import pytest

from cellstudy import atomic, config, rundir


def _fold(run, name, k, *files):
    fd = run.fold(name, k, create=True)
    for f in files:
        (fd.path / f).write_text("{}")
    return fd


def test_paths_of_a_run(tmp_path):
    run = rundir.Run(tmp_path / "r")
    assert not run.root.exists()
    assert run.step("07_results") == tmp_path / "r" / "07_results" and run.root.is_dir()
    assert run.step("08_xai", create=False) == tmp_path / "r" / "08_xai" and not (tmp_path / "r" / "08_xai").exists()
    assert run.folds_file("bbbc021-paper") == tmp_path / "r" / "folds" / "bbbc021-paper.csv"
    assert run.executed("00_cohort") == tmp_path / "r" / "notebooks" / "00_cohort.ipynb"
    assert run.log("08_xai") == tmp_path / "r" / "logs" / "08_xai.log"
    fd = run.fold("mhl", 3)
    assert fd.path == tmp_path / "r" / "training" / "mhl" / "fold3" and not fd.path.exists()
    assert (fd.done.name, fd.failed.name, fd.zca.name, fd.test_cells.name) == (
        "done.json", "failed.json", "zca.json", "test_cells.csv")
    assert fd.model("short").name == "model_short.keras" and fd.proba("long").name == "proba_long.npy"
    with pytest.raises(ValueError, match="regime 'medium'"):
        fd.model("medium")
    assert os.fspath(run) == str(tmp_path / "r")


def test_usable_folds_say_why_the_others_are_not(tmp_path):
    run = rundir.Run(tmp_path)
    _fold(run, "mhl", 0, "done.json", "model_long.keras", "zca.json", "test_cells.csv")
    _fold(run, "mhl", 1, "failed.json")
    _fold(run, "mhl", 2, "done.json", "model_short.keras", "zca.json", "test_cells.csv")   # no long model
    _fold(run, "mhl", 3, "done.json", "model_long.keras", "test_cells.csv")                # no whitening
    _fold(run, "mhl", 4, "done.json", "model_long.keras", "zca.json")                      # no test cells
    (run.training / "mhl" / "foldx").mkdir()                                               # not a fold
    ok, notes = run.usable_folds("mhl", "long")
    assert [fd.fold for fd in ok] == [0]
    assert [(n["fold"], n["status"]) for n in notes] == [(1, "failed"), (2, "model deleted"), (3, "incomplete"),
                                                         (4, "incomplete")]
    ok, notes = run.usable_folds("mhl", "long", need_test_cells=False)
    assert [fd.fold for fd in ok] == [0, 4]
    ok, notes = run.usable_folds("vit", "long")
    assert ok == [] and notes == [{"network": "vit", "fold": None, "status": "not trained",
                                   "detail": f"no folder {run.training / 'vit'}"}]
    (run.training / "mhl_den").mkdir()
    assert run.usable_folds("mhl_den", "long")[1][0]["status"] == "not trained"
    # a classical classifier: done.json and its fitted model
    _fold(run, "rf", 0, "done.json", "model.joblib")
    _fold(run, "rf", 2, "done.json")
    ok, notes = run.usable_folds("rf", classical=True)
    assert [fd.fold for fd in ok] == [0] and [(n["fold"], n["status"]) for n in notes] == [(2, "unfinished")]
    # every model folder in the catalogue's order, folds by number
    _fold(run, "vgg16", 10)
    _fold(run, "vgg16", 2)
    assert run.models() == ["vgg16", "mhl", "mhl_den", "rf"]
    assert [(fd.network, fd.fold) for fd in run.all_folds()][:3] == [("vgg16", 2), ("vgg16", 10), ("mhl", 0)]


def test_scale_is_written_once_and_checked(tmp_path):
    run = rundir.Run(tmp_path / "r")
    sc = run.scale("ci", {"image_size": 48})
    assert sc == config.get_scale("ci", {"image_size": 48})
    rec = json.loads(run.scale_file.read_text())
    assert rec["name"] == "ci" and rec["overrides"] == {"image_size": 48} and rec["values"]["image_size"] == 48
    assert run.scale("ci", {"image_size": 48}) == sc            # read back, same values
    with pytest.raises(rundir.RunFolderError, match=r"made at scale 'ci' with overrides \{'image_size': 48\} "
                       r"\(.*scale.json\); you asked for scale 'ci' with overrides \{\}, which differs in "
                       r"image_size: 48 in the run, 32 now\. A run keeps one scale"):
        run.scale("ci")
    with pytest.raises(rundir.RunFolderError, match=r"differs in .*epochs_long: 2 in the run, 10 now.*and 7 more"):
        run.scale("cpu", {"image_size": 48})
    # an edited scale (the same name resolving to other values) is refused too
    rec["values"]["epochs_long"] = 99
    run.scale_file.write_text(json.dumps(rec))
    with pytest.raises(rundir.RunFolderError, match="epochs_long"):
        run.scale("ci", {"image_size": 48})
    run.scale_file.write_text("not json")
    with pytest.raises(rundir.RunFolderError, match="cannot read the run's resolved scale"):
        run.scale("ci", {"image_size": 48})


def test_prepare_uses_the_runs_scale(tmp_path, shared_data):
    from cellstudy import study

    p = study.prepare("bbbc021-paper", "ci", tmp_path, data_root=str(shared_data), progress=False)
    assert rundir.Run(tmp_path).scale_file.is_file() and p.scale == config.get_scale("ci")
    with pytest.raises(rundir.RunFolderError, match="scale.json"):
        study.prepare("bbbc021-paper", "ci", tmp_path, data_root=str(shared_data),
                      overrides={"image_size": 64}, progress=False)


def test_a_run_keeps_one_cohort(tmp_path):
    run = rundir.Run(tmp_path / "r")
    run.check_cohort("bbbc021-paper", "a" * 64, 220)                 # the first cohort is written
    assert json.loads(run.cohort_file.read_text()) == {"cohort": "bbbc021-paper", "cells_hash": "a" * 64,
                                                        "n_cells": 220}
    run.check_cohort("/data/same_cells.csv", "a" * 64, 220)          # the same cells under another name pass
    # ... and read the run's folds file, not one of their own
    assert run.folds_file("/data/same_cells.csv") == run.folds_file("bbbc021-paper") == run.root / "folds" / "bbbc021-paper.csv"
    with pytest.raises(rundir.RunFolderError, match=r"made for cohort 'bbbc021-paper' \(220 cells\), not "
                                                    r"'rxrx1-cells' \(1440 cells.*a run keeps one cohort"):
        run.check_cohort("rxrx1-cells", "b" * 64, 1440)
    assert json.loads(run.cohort_file.read_text())["cohort"] == "bbbc021-paper"   # nothing overwritten
    run.cohort_file.write_text("{}")
    with pytest.raises(rundir.RunFolderError, match="cannot read the run's cohort record"):
        run.check_cohort("bbbc021-paper", "a" * 64, 220)


def test_a_run_made_before_cohort_json_is_checked_against_its_folds(tmp_path):
    from cellstudy.learning import folds

    run = rundir.Run(tmp_path / "old")
    ids, y, g = [f"c{i}" for i in range(10)], [0, 1] * 5, [f"g{i}" for i in range(10)]
    folds.save_folds(run.folds_file("bbbc021-paper"), ids, y, g, [0, 1] * 5, {"n_splits": 2, "seed": 0})
    with pytest.raises(rundir.RunFolderError, match=r"made for the cells of bbbc021-paper.csv \(10 cells\)"):
        run.check_cohort("rxrx1-cells", "b" * 64, 1440)
    assert not run.cohort_file.exists()
    run.check_cohort("/elsewhere/renamed.csv", folds.cells_hash(ids, y, g), 10)   # its own cells, renamed: recorded
    assert json.loads(run.cohort_file.read_text())["n_cells"] == 10
    # ... under the name of the folds file they match, so every step reads that file
    assert run.folds_file("/elsewhere/renamed.csv") == run.root / "folds" / "bbbc021-paper.csv"


def test_create_json_creates_once(tmp_path):
    p = tmp_path / "c.json"
    assert atomic.create_json(p, {"a": 1}) is True
    assert atomic.create_json(p, {"a": 2}) is False          # the first one stays; no temporary left
    assert json.loads(p.read_text()) == {"a": 1} and sorted(q.name for q in tmp_path.iterdir()) == ["c.json"]


def test_prepare_refuses_another_cohort_in_the_run_folder(tmp_path, shared_data):
    """The newcomer's case: notebooks run by hand with -p cohort rxrx1-cells in a bbbc021-paper run
    folder read the bbbc021 folds back as RxRx1's."""
    from cellstudy import study

    study.prepare("bbbc021-paper", "ci", tmp_path, data_root=str(shared_data), progress=False)
    with pytest.raises(rundir.RunFolderError, match="made for cohort 'bbbc021-paper'"):
        study.prepare("rxrx1-cells", "ci", tmp_path, data_root=str(shared_data), progress=False)
    assert not (tmp_path / "folds" / "rxrx1-cells.csv").exists()   # refused before any work


def test_a_renamed_manifest_of_the_same_cells_reads_the_runs_folds(tmp_path, shared_data):
    """A user who copies or renames the manifest between two notebooks: the same cells pass, and
    every step reads the run's one folds file (07 once failed on folds/<new name>.csv)."""
    import shutil

    from cellstudy import config, study

    first = study.prepare("bbbc021-paper", "ci", tmp_path / "run", data_root=str(shared_data), progress=False)
    mine = tmp_path / "elsewhere" / "mine.csv"
    mine.parent.mkdir()
    shutil.copy2(config.REPO_ROOT / "data_manifest" / "bbbc021-paper.csv", mine)
    again = study.prepare(str(mine), "ci", tmp_path / "run", data_root=str(shared_data), progress=False)
    assert again.folds_path == first.folds_path == study.folds_path(tmp_path / "run", str(mine))
    assert sorted(p.name for p in (tmp_path / "run" / "folds").iterdir()) == ["bbbc021-paper.csv"]
    assert (again.folds == first.folds).all()


def test_atomic_writes_are_whole_or_absent(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic.write_json(p, {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(2), "d": tmp_path})
    assert json.loads(p.read_text()) == {"a": 3, "b": 0.5, "c": [0, 1], "d": str(tmp_path)}
    atomic.save_npy(tmp_path / "a.npy", np.eye(2))
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.eye(2))

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(atomic.OutputError, match=r"could not write .*x.json.*previous version"):
        atomic.write(p, broken)
    assert json.loads(p.read_text())["a"] == 3                          # the old file is intact
    assert sorted(q.name for q in p.parent.iterdir()) == ["x.json"]     # no temporary left
    with pytest.raises(TypeError, match="not JSON serialisable"):
        atomic.write_json(tmp_path / "y.json", {"s": {1, 2}})


def test_digest_includes_the_resolved_scale(monkeypatch):
    from cellstudy import runner

    cfg = runner.StudyConfig(name="t", cohort="bbbc021-paper", scale="ci", steps=["00_cohort"])
    before = cfg.digest()
    assert cfg.digest() == before
    monkeypatch.setitem(config.SCALES["ci"], "batch_size", 7)      # the scale edited in config.py
    assert cfg.digest() != before


def test_atomic_files_get_the_ordinary_mode(tmp_path):
    # mkstemp makes 0600 files; a run folder shared with colleagues needs what open() gives
    import stat

    p = atomic.write_text(tmp_path / "a.txt", "x")
    q = tmp_path / "b.txt"
    q.write_text("x")
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(q.stat().st_mode) == atomic.FILE_MODE


def test_a_run_made_before_a_scale_key_existed_still_opens(tmp_path):
    """scale.json of an older run lacks keys added later (whitening): read as their old value."""
    import json as _json

    from cellstudy import config as _config
    from cellstudy.rundir import Run as _Run

    run = _Run(tmp_path / "old")
    run.scale("ci")
    rec = _json.loads(run.scale_file.read_text())
    del rec["values"]["whitening"]
    run.scale_file.write_text(_json.dumps(rec))
    assert run.scale("ci")["whitening"] == "zca" == _config.ADDED_SCALE_KEYS["whitening"]


def test_every_chapter_with_a_cohort_parameter_checks_it_before_it_writes(tmp_path):
    """00, 07, 09 and 11 do not call study.prepare (they read the run's files, not the images):
    by hand with another cohort they were not refused. Each chapter now calls prepare or
    check_run_cohort before its first step_dir (which makes its output folder)."""
    import nbformat

    from cellstudy import config as cfg_mod

    checked = []
    for nb_path in sorted((cfg_mod.REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        params = "".join(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        if "cohort =" not in params:
            continue
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
        first_out, guard = code.find("step_dir(run_dir"), code.find("check_run_cohort(run_dir, cohort)")
        if first_out < 0:   # the family chapters: study.prepare (which checks the cohort) comes first
            first_write = min(i for i in (code.find("experiment."), code.find("prepare(")) if i >= 0)
            assert code.find("prepare(") == first_write, f"{nb_path.name}: prepare does not come first"
        else:
            assert 0 <= guard < first_out, f"{nb_path.name}: no cohort check before its first step_dir"
        checked.append(nb_path.name[:2])
    assert len(checked) == 13


def test_check_run_cohort_reads_only_the_manifest(tmp_path, shared_data, monkeypatch):
    from cellstudy import data, study

    def no_images(*a, **k):
        raise AssertionError("an image was read")

    monkeypatch.setattr(data, "load_cohort", no_images)
    monkeypatch.setattr(data, "decode_image", no_images)
    tab = study.check_run_cohort(tmp_path, "bbbc021-paper")          # records it; no image read
    assert len(tab) == 220 and json.loads(rundir.Run(tmp_path).cohort_file.read_text())["n_cells"] == 220
    with pytest.raises(rundir.RunFolderError, match="made for cohort 'bbbc021-paper'"):
        study.check_run_cohort(tmp_path, "rxrx1-cells")
    with pytest.raises(FileNotFoundError, match="absent.csv does not exist"):
        study.check_run_cohort(tmp_path / "other", str(tmp_path / "absent.csv"))
    with pytest.raises(data.DataError, match="unknown cohort 'bbbc021-papr'"):   # a chapter stops (strict)
        study.check_run_cohort(tmp_path, "bbbc021-papr")
    bad = tmp_path / "nolabel.csv"
    bad.write_text("cell_id,path,group\nc0,a.npy,g0\n")
    with pytest.raises(data.DataError, match="no usable cell_id / label / group columns"):
        study.check_run_cohort(tmp_path / "other", str(bad))
    # prepare's call: load_cohort refuses such a manifest with its own message
    assert study.check_run_cohort(tmp_path / "other", str(bad), strict=False) is None
    assert not (tmp_path / "other").exists()


def test_the_scale_message_for_an_edited_scale_and_a_renamed_one(tmp_path, monkeypatch):
    run = rundir.Run(tmp_path / "r")
    run.scale("ci")
    monkeypatch.setitem(config.SCALES["ci"], "batch_size", 7)           # config.py edited since
    with pytest.raises(rundir.RunFolderError, match=r"the same request, but the scale's values have changed "
                                                    r"since the run was made: batch_size: 32 in the run, 7 now"):
        run.scale("ci")
    monkeypatch.setitem(config.SCALES, "ci2", dict(config.SCALES["ci"], batch_size=32))
    with pytest.raises(rundir.RunFolderError, match="resolves to the same values under another name"):
        run.scale("ci2")
