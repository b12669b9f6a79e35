"""The study runner (`cellstudy run`, through the Snakemake workflow): config validation, failing
notebooks, resume, never overwriting a run, jobs at once."""
import json
import os
import pathlib

import nbformat
import pytest
import yaml

from cellstudy import config, rundir, runner, study, threads


def _nb(path, *sources, needs=None):
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}}
    if needs is not None:
        meta["cellstudy"] = {"needs": list(needs)}
    nb = nbformat.v4.new_notebook(metadata=meta)
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
    # the workflow's jobs are other processes: they find the notebooks through the environment
    monkeypatch.setenv(runner.NOTEBOOKS_ENV, str(nbdir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(config.REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p))
    monkeypatch.setattr(runner, "preflight", lambda cfg: {"data_root": str(tmp_path), "cohort": cfg.cohort})
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


@pytest.mark.slow  # executes notebooks three times and builds a book (~35 s on 2 loaded cores); the failure
# message alone: test_parallel_failure_keeps_the_running_step_and_starts_nothing_after
def test_failing_notebook_names_notebook_and_cell_and_blocks_the_book(tmp_path, fake_notebooks):
    _nb(fake_notebooks / "00_ok.ipynb", "import pathlib\npathlib.Path(run_dir, '00_ok', 'out.txt').write_text(scale)")
    _nb(fake_notebooks / "01_bad.ipynb", "x = 1", "raise ValueError('broken on purpose')")
    cfg = _config(tmp_path, ["00_ok", "01_bad"])
    runs = tmp_path / "runs"
    with pytest.raises(runner.StudyError, match=r"01_bad\.ipynb failed at cell .*ValueError: broken on purpose"
                                                r".*logs/01_bad\.failed\.ipynb"):
        runner.run_study(cfg, runs_dir=runs, log_output=False, echo=lambda s: None)
    (run,) = runs.iterdir()
    assert "broken on purpose" in (run / "logs" / "01_bad.failed.ipynb").read_text()   # the traceback is kept
    st = runner.read_status(run)
    assert st["state"] == "failed" and st["steps"]["00_ok"]["state"] == "done"
    assert st["steps"]["01_bad"]["state"] == "failed"
    assert not (run / "book").exists()
    assert (run / "00_ok" / "out.txt").read_text() == "ci"  # parameters were injected
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["config"]["scale"] == "ci" and "numpy" in prov["packages"] and prov["git"]["commit"]

    # The same command again without a fix: the step fails again and the message still names it
    # (a resumed run's failure was told only as "the failed job is named above": its status
    # entry equalled the first run's)
    with pytest.raises(runner.StudyError, match=r"01_bad\.ipynb failed at cell .*ValueError: broken on purpose") as again:
        runner.run_study(cfg, runs_dir=runs, log_output=False, echo=lambda s: None)
    assert not str(again.value).startswith("the workflow of run")    # the step's own message, not the generic one
    assert [p.name for p in runs.iterdir()] == [run.name]

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


# A notebook that marks its start, waits (up to 60 s) until ``other`` has started, then marks its
# end: two of them finish only when they run at the same time.
_RENDEZVOUS = """
import pathlib, time
d = pathlib.Path(run_dir)
(d / "{me}.started").write_text(str(time.time()))
t = time.time()
while not (d / "{other}.started").exists():
    if time.time() - t > 60:
        raise RuntimeError("{other} did not start while {me} ran")
    time.sleep(0.1)
(d / "{me}.ended").write_text(str(time.time()))
"""


def test_steps_run_at_once_in_dependency_order(tmp_path, fake_notebooks):
    _nb(fake_notebooks / "00_a.ipynb", _RENDEZVOUS.format(me="00_a", other="01_b"), needs=[])
    _nb(fake_notebooks / "01_b.ipynb", _RENDEZVOUS.format(me="01_b", other="00_a"), needs=[])
    _nb(fake_notebooks / "02_c.ipynb", "import pathlib, time\n"
        "d = pathlib.Path(run_dir)\n"
        "assert (d / '00_a.ended').exists() and (d / '01_b.ended').exists()\n"
        "(d / '02_c.started').write_text(str(time.time()))\n"
        "import os\n(d / 'threads.txt').write_text(os.environ.get('TF_NUM_INTRAOP_THREADS', 'unset'))",
        needs=["00_a", "01_b"])
    lines = []
    run = runner.run_study(_config(tmp_path, ["00_a", "01_b", "02_c"], workers=2), runs_dir=tmp_path / "runs",
                           build=False, log_output=False, echo=lines.append)
    st = runner.read_status(run)
    assert st["state"] == "complete" and all(st["steps"][s]["state"] == "done" for s in ("00_a", "01_b", "02_c"))
    t = {p.name: float(p.read_text()) for p in run.glob("*.*ed")}
    assert t["02_c.started"] >= max(t["00_a.ended"], t["01_b.ended"])
    assert any("up to 2 job(s) at once" in x for x in lines)
    # two kernels at once: each kernel's TensorFlow gets half the cores (cellstudy.threads)
    if "TF_NUM_INTRAOP_THREADS" not in os.environ:
        assert (run / "threads.txt").read_text() == str(threads.threads_per_process(2))
        hw = json.loads((run / "provenance.json").read_text())["hardware"]
        assert hw["tf_threads"] == {threads.INTRA_ENV: str(threads.threads_per_process(2)),
                                    threads.INTER_ENV: str(threads.threads_per_process(2))}
    assert runner.step_needs("02_c", ["00_a", "01_b", "02_c"]) == ["00_a", "01_b"]
    assert runner.step_needs("02_c", ["01_b", "02_c"]) == ["01_b"]  # a step not in the config is not waited for


def test_parallel_failure_keeps_the_running_step_and_starts_nothing_after(tmp_path, fake_notebooks):
    _nb(fake_notebooks / "00_a.ipynb", _RENDEZVOUS.format(me="00_a", other="01_bad"), needs=[])
    _nb(fake_notebooks / "01_bad.ipynb", "import pathlib\npathlib.Path(run_dir, '01_bad.started').write_text('1')",
        "raise ValueError('broken on purpose')", needs=[])
    _nb(fake_notebooks / "02_c.ipynb", "x = 1", needs=["00_a", "01_bad"])
    cfg = _config(tmp_path, ["00_a", "01_bad", "02_c"], workers=2)
    with pytest.raises(runner.StudyError, match=r"01_bad\.ipynb failed at cell .*broken on purpose"):
        runner.run_study(cfg, runs_dir=tmp_path / "runs", build=False, log_output=False, echo=lambda s: None)
    (run,) = (tmp_path / "runs").iterdir()
    st = runner.read_status(run)
    assert st["state"] == "failed"
    assert st["steps"]["00_a"]["state"] == "done" and st["steps"]["01_bad"]["state"] == "failed"
    assert "02_c" not in st["steps"] and not (run / "notebooks" / "02_c.ipynb").exists()


def test_serial_is_the_default_and_bad_workers_or_order_fail_early(tmp_path, fake_notebooks):
    _nb(fake_notebooks / "00_a.ipynb", "x = 1", needs=[])
    _nb(fake_notebooks / "01_b.ipynb", "x = 1", needs=["00_a"])
    assert runner.load_config(_config(tmp_path, ["00_a", "01_b"])).workers == 1
    assert runner.load_config(_config(tmp_path, ["00_a", "01_b"]), workers=3).workers == 3
    for bad in (0, "two", True):
        with pytest.raises(config.ConfigError, match="workers="):
            runner.load_config(_config(tmp_path, ["00_a", "01_b"], workers=bad))
    with pytest.raises(config.ConfigError, match=r"step 01_b needs \['00_a'\], listed after it"):
        runner.load_config(_config(tmp_path, ["01_b", "00_a"]))
    # workers is not part of a run's identity: a run started with 1 is resumed with 2 (the
    # thread count it implies is recorded per fold, done.json tf_threads)
    a = runner.load_config(_config(tmp_path, ["00_a", "01_b"], workers=1))
    b = runner.load_config(_config(tmp_path, ["00_a", "01_b"], workers=2))
    assert a.digest() == b.digest()


def test_shipped_notebooks_declare_what_they_need():
    steps = runner.available_steps()
    for step in steps:
        nb = json.loads((runner.notebook_dir() / f"{step}.ipynb").read_text())
        needs = nb["metadata"]["cellstudy"]["needs"]
        assert all(d in steps and d < step for d in needs), (step, needs)
    assert runner.step_needs("08_xai", steps) == ["02_dl_family", "03_vit", "04_rgb_family", "05_mhl_family"]
    assert "08_xai" in runner.step_needs("09_statistics", steps)


def test_shared_cpu_note_follows_the_runs_workers(tmp_path):
    from cellstudy.study import run_workers, shared_cpu_note

    assert run_workers(tmp_path) == 1 and shared_cpu_note(tmp_path) == ""  # a notebook run by hand
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "x", "workers": 1}))
    assert shared_cpu_note(tmp_path) == ""
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "x", "workers": 2}))
    assert run_workers(tmp_path) == 2 and "up to 2 jobs (training jobs and notebooks) ran at once" in shared_cpu_note(tmp_path)
    assert "thread" not in shared_cpu_note(tmp_path)  # no provenance.json: nothing said about threads
    (tmp_path / "provenance.json").write_text(json.dumps(
        {"hardware": {"tf_threads": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}}}))
    assert "each job's TensorFlow with 1 thread(s)" in shared_cpu_note(tmp_path)


def test_terminal_drops_papermill_bookkeeping_tagged_or_not():
    from cellstudy.cli import is_noise

    for m in ("Input Notebook:  /a/09.ipynb", "[09_statistics] Output Notebook: /x", "[08_xai] Executing Cell 3"):
        assert is_noise(m), m
    for m in ("[08_xai] [1/11] xai resnet50: 5 fold(s) in 105 s", "resnet50 fold 0 done in 0:29"):
        assert not is_noise(m), m


@pytest.mark.slow  # a study, a book build and Chromium (~38 s on 2 loaded cores)
def test_a_page_failing_the_browser_check_fails_the_study_naming_page_and_problem(tmp_path, fake_notebooks):
    from cellstudy.report import browser

    if browser.find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y --no-install-recommends chromium)")
    if not (config.REPO_ROOT / "node_modules" / "mathjax" / "es5" / "tex-chtml.js").is_file():
        pytest.skip("MathJax is not installed (npm install)")
    _nb(fake_notebooks / "00_ok.ipynb", "print('progress line', 1, 'of', 1)")
    _nb(fake_notebooks / "01_shows_a_traceback.ipynb", "from IPython.display import Markdown, display\n"
        "display(Markdown('Traceback (most recent call last): a pasted error'))")
    cfg = _config(tmp_path, ["00_ok", "01_shows_a_traceback"])
    with pytest.raises(runner.StudyError, match=r"failed the browser check .*01_shows_a_traceback\.html: an error "
                                                r"output is shown .*Traceback \(most recent call last\)"):
        runner.run_study(cfg, runs_dir=tmp_path / "runs", log_output=False, echo=lambda s: None)
    (run,) = (tmp_path / "runs").iterdir()
    st = runner.read_status(run)
    assert st["state"] == "failed" and st["browser_check"]["ok"] is False
    assert (run / "screenshots" / "01_shows_a_traceback.png").is_file()
    # the progress line went to the run's log, not onto the page (the code that prints it is folded there)
    assert "progress line 1 of 1" in (run / "logs" / "00_ok.log").read_text()
    assert "progress line 1 of 1" not in (run / "book" / "_build" / "html" / "00_ok.html").read_text()


def test_provenance_records_the_threads_of_the_jobs_the_run_starts(tmp_path, monkeypatch):
    """`cellstudy workflow --cores N` on one machine: N jobs at once, each with cores // N threads;
    on a cluster the threads are the job's own (not this machine's split)."""
    for k in (threads.INTRA_ENV, threads.INTER_ENV):
        monkeypatch.delenv(k, raising=False)
    cfg = runner.load_config(_config(tmp_path, ["00_cohort"], workers=1))
    prov = {"data_root": str(tmp_path), "cohort": cfg.cohort}

    def recorded(processes, name):
        rd = tmp_path / name
        rd.mkdir()
        runner.init_run(cfg, tmp_path / "study.yaml", rd, prov, {"steps": {}}, processes=processes)
        return json.loads((rd / "provenance.json").read_text())["hardware"]["tf_threads"]

    t2 = str(threads.threads_per_process(2))
    assert recorded(2, "two") == {threads.INTRA_ENV: t2, threads.INTER_ENV: t2}
    assert recorded(None, "config") == {threads.INTRA_ENV: None, threads.INTER_ENV: None}   # workers: 1
    assert "per cluster job" in recorded(0, "cluster")
    assert study.kernel_tf_threads(tmp_path / "cluster") is None


def test_a_run_made_before_a_scale_key_existed_is_still_resumable(tmp_path, monkeypatch):
    """A scale key added later (config.ADDED_SCALE_KEYS) at its old value leaves the run's
    digest acceptable: an interrupted run of the older version is resumed, not restarted."""
    import copy
    cfg = runner.load_config(_config(tmp_path, ["00_cohort"]))
    now = cfg.digest()
    assert now in cfg.digests()
    old_scales = copy.deepcopy(config.SCALES)
    monkeypatch.setattr(config, "SCALES", old_scales)
    for sc in old_scales.values():        # the version before "epochs_long_max"
        sc.pop("epochs_long_max")
    before_max = cfg.digest()
    for sc in old_scales.values():        # before "lr_decay"
        sc.pop("lr_decay")
    before_decay = cfg.digest()
    for sc in old_scales.values():        # before "flips" (and before "whitening")
        sc.pop("flips")
    before_flips = cfg.digest()
    for sc in old_scales.values():
        sc.pop("whitening")
    before_whitening = cfg.digest()
    monkeypatch.undo()
    assert len({now, before_max, before_decay, before_flips, before_whitening}) == 5
    assert {now, before_max, before_decay, before_flips, before_whitening} == cfg.digests()
    decayed = runner.load_config(_config(tmp_path, ["00_cohort"], overrides={"lr_decay": "cosine"}))
    assert not {before_decay, before_flips} & decayed.digests()
    # a run at another value of the new key is another computation: not resumed
    flipped = runner.load_config(_config(tmp_path, ["00_cohort"], overrides={"flips": True}))
    assert before_flips not in flipped.digests() and before_whitening not in flipped.digests()
    # find_resumable finds the older version's interrupted run
    runs = tmp_path / "runs"
    old_run = runs / "t-20261201-000000"
    old_run.mkdir(parents=True)
    (old_run / "status.json").write_text(json.dumps({"digest": before_flips, "state": "running"}))
    assert runner.find_resumable(runs, cfg) == old_run


def test_missing_mathjax_stops_the_study_before_any_work(tmp_path, fake_notebooks, monkeypatch):
    """`cellstudy run` after `make venv` alone (no `make assets`) used to train and run every
    notebook, then fail in the book job; now it says so first and starts nothing."""
    from cellstudy import workflow
    from cellstudy.report import book

    monkeypatch.setattr(book, "MATHJAX_DIR", tmp_path / "no_mathjax")
    _nb(fake_notebooks / "00_ok.ipynb", "x = 1")
    runs = tmp_path / "runs"
    with pytest.raises(runner.StudyError, match=r"MathJax is missing .*make assets.*--no-book"):
        runner.run_study(_config(tmp_path, ["00_ok"]), runs_dir=runs, log_output=False, echo=lambda s: None)
    assert not runs.exists() or not any(runs.iterdir())               # no run folder begun
    with pytest.raises(workflow.WorkflowError, match=r"MathJax is missing .*--target notebooks"):
        workflow.run_workflow(_config(tmp_path, ["00_ok"]), runs_dir=str(runs), echo=lambda s: None)
    assert not runs.exists() or not any(runs.iterdir())
    # a dry run (or the training alone) builds no book and needs no MathJax
    calls = []
    monkeypatch.setattr(workflow, "snakemake", lambda *a, **k: calls.append(k.get("extra")))
    workflow.run_workflow(_config(tmp_path, ["00_ok"]), runs_dir=str(runs), extra=["-n"], echo=lambda s: None)
    workflow.run_workflow(_config(tmp_path, ["00_ok"]), runs_dir=str(runs), targets=["training"],
                          echo=lambda s: None)
    assert len(calls) == 2


def test_the_disk_the_models_take_is_checked_before_training(tmp_path):
    """A default run writes ~6.7 GB of model files (a newcomer's ci run folder was 479 MB); a disk
    that cannot hold them is said before the training, not when it fills after an hour."""
    from cellstudy import networks, workflow

    ci = runner.load_config(config.REPO_ROOT / "configs" / "ci.yaml")
    plan = workflow.make_plan(ci)
    expected = sum(2 * networks.SPECS[n].model_mb for n, _ in plan.train)
    said = []
    run = tmp_path / "runs" / "r"      # not there yet: free space of the nearest existing folder
    assert runner.check_disk(plan, run, None, echo=said.append, free_bytes=10**12) == pytest.approx(expected)
    assert 400 < expected < 500 and "will take ~0.4 GB" in said[0] and str(tmp_path) in said[0]
    with pytest.raises(runner.StudyError, match=r"need ~0.4 GB .*VGG16 63 MB a file.* has 0.2 GB free; nothing was started"):
        runner.check_disk(plan, run, None, free_bytes=2 * 10**8)
    # a resumed run: its finished folds (done or failed; their models may have been deleted) need nothing
    for i, (n, k) in enumerate(plan.train):
        fd = rundir.Run(run).fold(n, k, create=True)
        (fd.done if i % 2 else fd.failed).write_text("{}")
    assert runner.check_disk(plan, run, run, free_bytes=0) == 0
    assert runner.check_disk(plan, run, None, echo=lambda s: None, free_bytes=10**12) == pytest.approx(expected)
    default = workflow.make_plan(runner.load_config(config.REPO_ROOT / "configs" / "default.yaml"))
    assert 6000 < runner.check_disk(default, tmp_path, None, echo=lambda s: None, free_bytes=10**12) < 7500


def test_run_and_workflow_check_the_disk_before_they_make_a_run_folder(tmp_path, fake_notebooks, monkeypatch):
    import shutil
    from collections import namedtuple

    from cellstudy import workflow

    _nb(fake_notebooks / "00_ok.ipynb", "x = 1")
    _nb(fake_notebooks / "05_mhl_family.ipynb", "x = 1")    # a family step: the plan trains MHL
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))   # 1 MB free
    runs = tmp_path / "runs"
    with pytest.raises(runner.StudyError, match="nothing was started"):
        runner.run_study(_config(tmp_path, ["00_ok", "05_mhl_family"]), runs_dir=runs, build=False, log_output=False,
                         echo=lambda s: None)
    assert not runs.exists() or not any(runs.iterdir())               # no run folder begun
    with pytest.raises(workflow.WorkflowError, match="nothing was started"):
        workflow.run_workflow(_config(tmp_path, ["00_ok", "05_mhl_family"]), runs_dir=str(runs), targets=["notebooks"],
                              echo=lambda s: None)
    with pytest.raises(workflow.WorkflowError, match="nothing was started"):
        workflow.run_workflow(_config(tmp_path, ["00_ok", "05_mhl_family"]), run_dir=str(runs / "mine"), targets=["notebooks"],
                              echo=lambda s: None)
    assert not any(runs.iterdir())
    # a dry run writes no model: not refused
    calls = []
    monkeypatch.setattr(workflow, "snakemake", lambda *a, **k: calls.append(k.get("extra")))
    workflow.run_workflow(_config(tmp_path, ["00_ok", "05_mhl_family"]), runs_dir=str(runs), extra=["-n"], targets=["notebooks"],
                          echo=lambda s: None)
    assert calls == [["-n"]]


def test_open_run_takes_the_callers_resumable_folder(tmp_path, monkeypatch):
    """run_study / run_workflow look for a resumable run once (for check_disk) and hand it to
    open_run, which does not scan the runs folder again: a folder is resumed, None is a new one."""
    cfg = runner.load_config(_config(tmp_path, ["00_cohort"]))
    runs = tmp_path / "runs"
    old = runs / "t-20261201-000000"
    old.mkdir(parents=True)
    (old / "status.json").write_text(json.dumps({"digest": cfg.digest(), "state": "running", "steps": {}}))
    calls = []
    real = runner.find_resumable
    monkeypatch.setattr(runner, "find_resumable", lambda *a: calls.append(a) or real(*a))
    found = runner.find_resumable(runs, cfg)
    assert found == old and len(calls) == 1
    run_dir, status = runner.open_run(cfg, runs, found, echo=lambda m: None)
    assert run_dir == old and status["state"] == "running" and len(calls) == 1
    fresh, status = runner.open_run(cfg, runs, None, echo=lambda m: None)
    assert fresh != old and fresh.parent == runs and status["digest"] == cfg.digest() and len(calls) == 1


def _fake_papermill(fail_on: set[int], started: bool):
    """A papermill.execute_notebook stand-in: writes the executed copy as real papermill leaves it
    and raises the kernel-start error on the calls in ``fail_on``. After a dead kernel papermill
    marks its pending cells "completed" with no start_time; a cell it began has a start_time."""
    calls = []

    def execute_notebook(src, out, **kwargs):
        calls.append(out)
        meta = {"papermill": {"status": "completed", "start_time": "2026-12-07T10:00:00" if started else None}}
        nb = {"cells": [{"cell_type": "code", "metadata": meta, "execution_count": None,
                         "source": "x = 1", "outputs": []}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
        pathlib.Path(out).write_text(json.dumps(nb))
        if len(calls) in fail_on:
            raise RuntimeError("Kernel died before replying to kernel_info")
    return execute_notebook, calls


def test_a_kernel_that_did_not_start_is_started_again(tmp_path, monkeypatch, capsys):
    """Two notebooks whose kernels start in the same second can draw the same port (zmq
    'Address already in use', 'Kernel died before replying to kernel_info'): a newcomer's run
    failed so. The step starts the kernel again when no cell had begun; it fails, naming the
    notebook, when a cell had (something may have run), after KERNEL_START_ATTEMPTS tries, or
    at once for an error that is not the kernel's start."""
    import papermill

    monkeypatch.setattr(runner, "KERNEL_RETRY_DELAY_S", 0.0)
    fake, calls = _fake_papermill({1}, started=False)
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    runner.execute_step("00_cohort", tmp_path / "run", {}, log_output=False)
    assert len(calls) == 2
    assert "kernel did not start" in capsys.readouterr().err

    fake, calls = _fake_papermill({1, 2, 3}, started=False)
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    with pytest.raises(runner.StudyError, match="notebook 00_cohort.ipynb failed .*kernel_info"):
        runner.execute_step("00_cohort", tmp_path / "run2", {}, log_output=False)
    assert len(calls) == runner.KERNEL_START_ATTEMPTS

    fake, calls = _fake_papermill({1}, started=True)
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    with pytest.raises(runner.StudyError, match="notebook 00_cohort.ipynb failed"):
        runner.execute_step("00_cohort", tmp_path / "run3", {}, log_output=False)
    assert len(calls) == 1

    def missing(src, out, **kwargs):
        calls.append(out)
        raise FileNotFoundError(src)
    calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(papermill, "execute_notebook", missing)
    with pytest.raises(runner.StudyError, match="FileNotFoundError"):
        runner.execute_step("00_cohort", tmp_path / "run4", {}, log_output=False)
    assert len(calls) == 1 and "kernel did not start" not in capsys.readouterr().err


def test_a_real_dead_kernel_is_started_again_then_named(tmp_path, monkeypatch, capsys):
    """The same with real papermill and a kernel that exits at once (a kernelspec "python3" on
    JUPYTER_PATH): every try is a kernel that did not start, the step fails after the last."""
    import sys as _sys

    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [_sys.executable, "-c", "import sys; sys.exit(3)"],
                                                  "display_name": "dead", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setattr(runner, "KERNEL_RETRY_DELAY_S", 0.0)
    with pytest.raises(runner.StudyError, match="notebook 00_cohort.ipynb failed .*Kernel died"):
        runner.execute_step("00_cohort", tmp_path / "run", {}, log_output=False)
    assert capsys.readouterr().err.count("kernel did not start") == runner.KERNEL_START_ATTEMPTS - 1


def test_failed_job_lines_name_the_newest_error_of_this_run(tmp_path):
    """A failed workflow's message ends with the error lines of the job logs written since it
    began, newest first, at most 3; a diverged fold, a kept failed.json or an earlier run's log
    are not errors of this call."""
    import time as _time
    from cellstudy import workflow

    now = _time.time()

    def log(rel, text, age):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.utime(p, (now - age, now - age))

    log("logs/07_results.job.log", "ok\nall fine\n", 5)
    log("logs/00_cohort.job.log", "x\ncellstudy.runner.StudyError: notebook 00_cohort.ipynb failed (old)\n", 3600)
    log("training/vgg16/train.log", "cellstudy: vgg16 fold 0 failed: NaN loss at epoch 3; the book reports it\n"
        "fold 1: finished earlier (training/vgg16/fold1/failed.json); kept\n", 4)
    log("training/mhl/fold0/train.log", "epoch 1\nTraceback (most recent call last):\n  File \"x\"\n"
        "ValueError: bad arrays for fold 0\n", 30)
    log("logs/09_statistics.job.log",
        "a\ncellstudy.runner.StudyError: notebook 09_statistics.ipynb failed at cell 15 (ValueError: NaN)\nb\n", 20)
    log("08_xai/jobs/vit/fold2_long.log", "cellstudy: error: fold 2 of vit has no model_long.keras\n", 10)
    log("08_xai/jobs/rgb/fold1_long.log", "KeyboardInterrupt:\n", 40)
    lines = workflow.failed_job_lines(tmp_path, since=now - 60)
    assert lines == ["08_xai/jobs/vit/fold2_long.log: cellstudy: error: fold 2 of vit has no model_long.keras",
                     "logs/09_statistics.job.log: cellstudy.runner.StudyError: notebook 09_statistics.ipynb "
                     "failed at cell 15 (ValueError: NaN)",
                     "training/mhl/fold0/train.log: ValueError: bad arrays for fold 0"]     # the 4th, rgb: left out


def test_a_default_run_of_the_fixed_long_regime_resumes_with_its_override(tmp_path, monkeypatch):
    """A run of the default scale made before the plateau stop (a fixed 10-epoch long regime) is
    another computation than today's default: not resumed by it; with ``overrides:
    {epochs_long_max: null}``, the same computation, it is."""
    import copy
    old_scales = copy.deepcopy(config.SCALES)
    for sc in old_scales.values():        # the version before "epochs_long_max"
        sc.pop("epochs_long_max")
    monkeypatch.setattr(config, "SCALES", old_scales)
    old = runner.load_config(_config(tmp_path, ["00_cohort"], scale="cpu")).digest()
    monkeypatch.undo()
    default = runner.load_config(_config(tmp_path, ["00_cohort"], scale="cpu"))
    fixed = runner.load_config(_config(tmp_path, ["00_cohort"], scale="cpu", overrides={"epochs_long_max": None}))
    assert old not in default.digests()
    assert old in fixed.digests()


def test_a_cohort_that_cannot_make_the_scales_folds_is_refused_before_a_run_folder(tmp_path):
    """4 fields per class cannot make 5 grouped folds: said by `cellstudy run` before it makes a
    run folder (it used to fail inside 01_preprocessing, after the folder was made)."""
    import pandas as pd
    cfg = runner.load_config(_config(tmp_path, ["00_cohort"]))
    tab = pd.DataFrame({"cell_id": [f"c{i}" for i in range(16)], "label": [0] * 8 + [1] * 8,
                        "group": [f"g{i // 2}" for i in range(16)]})
    with pytest.raises(runner.StudyError, match=r"cannot be split into the ci scale's 5 grouped folds.*"
                                                r"class 0: 4 group\(s\), class 1: 4 group\(s\)"):
        runner.check_cohort_folds(cfg, tab)
    ok = tab.assign(group=[f"g{i}" for i in range(16)])        # 8 fields per class
    runner.check_cohort_folds(cfg, ok)


def test_an_edited_manifest_does_not_resume_the_run_folder_of_its_old_cells(tmp_path, monkeypatch):
    """The config's digest names the manifest, not its cells: after the manifest is edited, the
    same command would resume a folder made for the old cells and fail inside a chapter. It is
    refused up front, naming --new."""
    import pandas as pd
    from cellstudy import data
    from cellstudy.learning import folds
    cfg = runner.load_config(_config(tmp_path, ["00_cohort"]))
    old = pd.DataFrame({"cell_id": ["a", "b"], "label": [0, 1], "group": ["g0", "g1"]})
    run = tmp_path / "runs" / "t-1"
    rundir.Run(run).check_cohort(cfg.cohort, folds.cells_hash(old.cell_id, old.label, old.group), 2)
    monkeypatch.setattr(data, "load_manifest", lambda cohort: old)
    runner.check_resumable_cohort(run, cfg)                     # the same cells: resumed
    new = pd.concat([old, pd.DataFrame({"cell_id": ["c"], "label": [1], "group": ["g2"]})])
    monkeypatch.setattr(data, "load_manifest", lambda cohort: new)
    with pytest.raises(runner.StudyError, match=r"made for other cells \(2 cells\).*lists now \(3 cells\).*--new"):
        runner.check_resumable_cohort(run, cfg)
    runner.check_resumable_cohort(tmp_path / "runs" / "no-record", cfg)   # no cohort.json: nothing to say


def test_the_end_of_a_run_names_its_book_when_the_summary_cannot_be_made(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cellstudy.report.findings", None)   # its import fails
    lines = []
    runner.echo_finished(tmp_path, "book/_build/html/index.html", lines.append)
    assert any("could not be read" in line for line in lines)
    assert lines[-1].endswith("book/_build/html/index.html")
