"""The Snakemake workflow (issue 17): its DAG for the shipped configs, the per-fold command's
errors, the profiles, and (slow) a small grid through a real single-node Slurm on 127.0.0.1 whose
folds must equal a local run's.

The Slurm test needs root and Debian's slurm-wlm + munge (`.ci/run` installs them); its fixture
starts the daemons with `.ci/slurm-cluster` and stops them. Without them it skips with that
reason, except under CI=true, where a missing Slurm is a failure."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from cellstudy import cli, networks, rundir, runner, workflow

PYTHONPATH = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    """Snakemake's jobs import this checkout's cellstudy."""
    monkeypatch.setenv("PYTHONPATH", PYTHONPATH["PYTHONPATH"])


# ---- the DAG -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, trains, steps", [("paper", 55, 13), ("default", 55, 13), ("ci", 12, 13)])
def test_dry_run_has_one_training_job_per_network_and_fold(tmp_path, name, trains, steps):
    jobs = workflow.dag_jobs(tmp_path, REPO / "configs" / f"{name}.yaml")
    assert jobs["train"] == trains
    assert jobs["step"] + jobs["gpu_step"] == steps
    assert jobs["gpu_step"] == 2 and jobs["book"] == 1
    assert jobs["xai"] == trains          # on a cluster: one explanation job per (network, fold) too
    # on one machine (cellstudy run, make study): one training job per network, all its folds
    local = workflow.dag_jobs(tmp_path, REPO / "configs" / f"{name}.yaml", fold_jobs=False)
    nets = workflow.make_plan(runner.load_config(REPO / "configs" / f"{name}.yaml")).networks
    assert "train" not in local and "xai" not in local
    assert {r: n for r, n in local.items() if r.startswith("train_network")} == {f"train_network_{n}": 1 for n in nets}
    assert local["step"] + local["gpu_step"] == steps


def test_the_slowest_networks_train_first():
    """Each network's training job has the priority of its cost per image: on one machine the
    heavy networks start first (longest-processing-time-first), the light ones fill the end."""
    from cellstudy import networks
    pr = {n: networks.train_priority(n) for n in networks.NETWORK_NAMES}
    assert all(networks.spec(n).train_images_per_s for n in networks.NETWORK_NAMES)   # every network measured
    order = sorted(pr, key=pr.get, reverse=True)
    assert order[:3] == ["denres131", "rgb_res", "rgb_den"] and order[-2:] == ["vit", "mhl"]
    assert all(p >= 1 for p in pr.values()) and networks.train_priority("not_a_network") == 1

def test_snakemake_gives_each_training_job_its_priority(tmp_path):
    import re
    from cellstudy import networks
    text = workflow.dry_run(tmp_path, REPO / "configs" / "default.yaml", fold_jobs=False)
    seen = {}
    for block in re.split(r"\n(?=\[)", text):       # one job per block, each after its "[date]" line
        rule, prio = re.search(r"rule train_network_(\w+):", block), re.search(r"priority: (\d+)", block)
        if rule:
            seen[rule.group(1)] = int(prio.group(1)) if prio else 0
    assert seen == {n: networks.train_priority(n) for n in networks.NETWORK_NAMES}


def test_a_folds_workflow_target_is_written_once(tmp_path):
    from types import SimpleNamespace

    fd = rundir.Run(tmp_path).fold("mhl", 0, create=True)
    fd.done.write_text("{}")
    workflow.mark_ended(fd, SimpleNamespace(status="done"))
    first = fd.ended.read_text()
    assert json.loads(first)["marker"] == "done.json"
    workflow.mark_ended(fd, SimpleNamespace(status="failed"))   # kept, not rewritten
    assert fd.ended.read_text() == first


def test_the_xai_jobs_follow_the_chapters_regime(tmp_path):
    cfg = runner.load_config(REPO / "configs" / "ci.yaml")
    assert workflow.make_plan(cfg).xai_file("mhl", 1) == "08_xai/jobs/mhl/fold1_long.json"
    cfg.notebook_parameters = {"08_xai": {"regime": "short"}}
    assert workflow.make_plan(cfg).xai_file("mhl", 1) == "08_xai/jobs/mhl/fold1_short.json"
    cfg.notebook_parameters = {"08_xai": {"regime": "medium"}}
    with pytest.raises(ValueError, match="regime='medium'"):
        workflow.make_plan(cfg)


def test_cluster_or_local_decides_the_training_jobs(tmp_path):
    assert not workflow.on_cluster(None) and not workflow.on_cluster(None, ["--executor", "local"])
    assert workflow.on_cluster(None, ["--executor", "slurm"]) and workflow.on_cluster(None, ["--executor=slurm"])
    assert workflow.on_cluster(workflow.PROFILES / "slurm") and not workflow.on_cluster(workflow.PROFILES / "local")
    cmd = workflow.snakemake_command(tmp_path, None, 2, ["all"])
    assert cmd[cmd.index("--config") + 1] == "fold_jobs=False" and cmd[-1] == "all"
    assert cmd[cmd.index("--rerun-triggers") + 1] == "mtime"   # never rerun for a changed rule or mode
    cmd = workflow.snakemake_command(tmp_path, workflow.PROFILES / "slurm", None, ["all"])
    assert cmd[cmd.index("--config") + 1] == "fold_jobs=True"


def test_plan_follows_the_scale_and_the_steps():
    cfg = runner.load_config(REPO / "configs" / "ci.yaml")
    plan = workflow.make_plan(cfg)
    assert plan.networks == ["vgg16", "vit", "rgb", "mhl"]  # the ci scale's networks, the book's order
    assert {k for _, k in plan.train} == {0, 1, 2}            # its folds_to_run
    assert plan.done_file("mhl", 2) in plan.step_inputs("05_mhl_family")
    assert "notebooks/02_dl_family.ipynb" in plan.step_inputs("07_results")
    cfg.overrides = {"networks": ["mhl"]}
    with pytest.raises(ValueError, match="02_dl_family trains family DL"):
        workflow.make_plan(cfg)


def test_family_steps_match_the_notebooks():
    for step, fam in workflow.FAMILY_STEPS.items():
        nb = json.loads((REPO / "notebooks" / f"{step}.ipynb").read_text())
        src = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert re.search(rf'^FAMILY = "{fam}"', src, re.M), step
        assert set(networks.networks_of(fam))


# ---- cellstudy train-fold: bad input ----------------------------------------------------------------
def _prepared_looking(tmp_path: Path) -> Path:
    """A run folder with study.yaml and scale.json (ci scale), no data prepared."""
    run = rundir.Run(tmp_path / "run")
    cfg = runner.load_config(REPO / "configs" / "ci.yaml")
    run.scale(cfg.scale, cfg.overrides)
    run.study_config.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    return run.root


@pytest.mark.parametrize("args, message", [
    (["--network", "resnet5", "--fold", "0"], "unknown network 'resnet5'"),
    (["--network", "densenet121", "--fold", "0"], "network 'densenet121' is not trained in run"),
    (["--network", "mhl", "--fold", "5"], "fold 5 is outside 0..4"),
    (["--network", "mhl", "--fold", "0"], "is not prepared: its folds file"),
])
def test_train_fold_names_the_bad_value(tmp_path, capsys, args, message):
    run = _prepared_looking(tmp_path)
    assert cli.main(["train-fold", str(run), *args]) == 2
    assert message in capsys.readouterr().err


def test_train_fold_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["train-fold", str(tmp_path), "--network", "mhl", "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a prepared run folder: study.yaml is missing" in err
    assert cli.main(["train-fold", str(tmp_path / "nope"), "--network", "mhl", "--fold", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_step_refuses_a_step_the_run_does_not_have(tmp_path, capsys):
    run = _prepared_looking(tmp_path)
    assert cli.main(["step", str(run), "99_nothing"]) == 2
    assert "step '99_nothing' is not one of run" in capsys.readouterr().err


# ---- profiles -----------------------------------------------------------------------------------
def test_shipped_profiles_parse_and_ask_a_gpu_for_training():
    local = workflow.check_profile(REPO / "profiles" / "local")
    assert (local / "config.yaml").is_file()
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    for rule in ("train", "xai", "gpu_step"):
        assert slurm["set-resources"][rule]["gpu"] == 1
    for key in ("slurm_partition", "slurm_account"):
        assert key in slurm["default-resources"]


def test_bad_profiles_are_named(tmp_path):
    with pytest.raises(workflow.WorkflowError, match="is not a folder"):
        workflow.check_profile(tmp_path / "missing")
    with pytest.raises(workflow.WorkflowError, match="has no config.yaml"):
        workflow.check_profile(tmp_path)
    (tmp_path / "config.yaml").write_text("executor: [slurm\n")
    with pytest.raises(workflow.WorkflowError, match="config.yaml is not valid YAML"):
        workflow.check_profile(tmp_path)
    (tmp_path / "config.yaml").write_text("- executor\n")
    with pytest.raises(workflow.WorkflowError, match="expected a mapping"):
        workflow.check_profile(tmp_path)


# ---- a small grid on a real Slurm ---------------------------------------------------------------
def _need_slurm() -> None:
    why = None
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        why = "Slurm is not installed (apt-get install -y slurm-wlm munge; .ci/run does)"
    elif os.geteuid() != 0:
        why = "the single-node Slurm of this test needs root (slurmd starts the jobs)"
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why + " -- CI=true requires it")
        pytest.skip(why)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A single-node Slurm on 127.0.0.1 (.ci/slurm-cluster), stopped after the module's tests."""
    _need_slurm()
    state = tmp_path_factory.mktemp("slurm")
    script = REPO / ".ci" / "slurm-cluster"
    out = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, timeout=60)
        pytest.fail(f"could not start the test Slurm: {out.stdout}{out.stderr}")
    yield state
    subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, timeout=60)


SLURM_ARGS = ["--executor", "slurm", "--jobs", "4", "--slurm-status-command", "squeue", "--slurm-no-account",
              "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs", "--default-resources", "mem_mb=2000", "runtime=10"]


@pytest.mark.slow
def test_grid_on_slurm_equals_a_local_run(tmp_path, shared_data, slurm_cluster, monkeypatch):
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "1")
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "grid", "cohort": "bbbc021-paper", "scale": "ci", "seed": 0, "steps":
        ["00_cohort", "01_preprocessing", "05_mhl_family"], "overrides": {
            "networks": ["mhl"], "folds_to_run": [0, 1], "epochs_short": 1, "epochs_long": 2, "batch_size": 32}}))
    local, on_slurm = tmp_path / "local", tmp_path / "slurm"
    # prepare once (01_preprocessing: cohort, preprocessing cache, folds), copy the prepared folder
    workflow.run_workflow(cfg, run_dir=str(local), data_root=str(shared_data), cores=2,
                          targets=["notebooks/01_preprocessing.ipynb"])
    shutil.copytree(local, on_slurm, ignore=shutil.ignore_patterns(".snakemake"))
    workflow.run_workflow(cfg, run_dir=str(local), data_root=str(shared_data), cores=2, targets=["training"])
    workflow.run_workflow(cfg, run_dir=str(on_slurm), data_root=str(shared_data), targets=["training"],
                          extra=SLURM_ARGS)

    # every (network, fold) ran as its own Slurm job, its log beside the fold
    logs = "".join(p.read_text() for p in (on_slurm / ".snakemake" / "log").glob("*.snakemake.log"))
    ids = workflow.slurm_jobs_of(logs)
    assert len(ids) == 2 and len(set(ids)) == 2, logs[-3000:]
    for k in (0, 1):
        assert list((on_slurm / ".snakemake" / "slurm_logs" / "rule_train" / f"mhl_{k}").glob("*.log"))
        assert "mhl fold" in (on_slurm / "training" / "mhl" / f"fold{k}" / "train.log").read_text()
        for regime in ("short", "long"):
            a = np.load(rundir.Run(local).fold("mhl", k).proba(regime))
            b = np.load(rundir.Run(on_slurm).fold("mhl", k).proba(regime))
            np.testing.assert_array_equal(a, b, err_msg=f"mhl fold {k} {regime}: Slurm differs from local")

    # a finished fold is never redone: a second run submits nothing and leaves done.json as it was
    done = rundir.Run(on_slurm).fold("mhl", 0).done
    before = done.stat().st_mtime_ns
    workflow.run_workflow(cfg, run_dir=str(on_slurm), data_root=str(shared_data), targets=["training"],
                          extra=SLURM_ARGS)
    assert done.stat().st_mtime_ns == before
    logs2 = "".join(p.read_text() for p in (on_slurm / ".snakemake" / "log").glob("*.snakemake.log"))
    assert len(workflow.slurm_jobs_of(logs2)) == 2


def test_a_run_folder_of_another_config_is_refused_naming_what_differs(tmp_path):
    """The refusal said two digests only; it names the settings that differ."""
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text("name: t\ncohort: bbbc021-paper\nscale: ci\nsteps: [00_cohort]\n")
    cfg = runner.load_config(cfg_file)
    run = tmp_path / "t-1"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"digest": "0123456789ab"}))
    (run / "study.yaml").write_text("name: t\ncohort: bbbc021-paper\nscale: cpu\nsteps: [00_cohort]\n"
                                    "overrides: {epochs_long: 20}\n")
    with pytest.raises(rundir.RunFolderError, match=r"another study config \(scale: 'cpu' there, 'ci' here; "
                                                    r"overrides: \{'epochs_long': 20\} there, \{\} here; digest"):
        workflow.check_same_config(run, cfg)
    (run / "study.yaml").unlink()     # no record of it: the digests alone
    with pytest.raises(rundir.RunFolderError, match=r"another version of the scale's values; digest 0123456789ab"):
        workflow.check_same_config(run, cfg)


def test_workflow_refuses_a_run_dir_made_for_other_cells(tmp_path):
    """`cellstudy workflow --run-dir` checks the folder's cells as `cellstudy run` does, before
    Snakemake starts (a dry run here: nothing would be run anyway)."""
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text("name: t\ncohort: bbbc021-paper\nscale: ci\nsteps: [00_cohort]\n")
    rd = tmp_path / "rd"
    rundir.Run(rd).check_cohort("bbbc021-paper", "0" * 64, 3)      # a record of three other cells
    with pytest.raises(runner.StudyError, match=r"made for other cells \(3 cells\).*--new"):
        workflow.run_workflow(cfg_file, run_dir=str(rd), extra=["-n"], echo=lambda s: None)


def test_workflow_takes_scale_and_cohort_like_run(tmp_path, capsys):
    """`cellstudy workflow` had no --scale / --cohort, unlike `cellstudy run`."""
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text("name: t\ncohort: bbbc021-paper\nscale: ci\nsteps: [00_cohort]\n")
    assert cli.main(["workflow", str(cfg_file), "--scale", "nope", "--run-dir", str(tmp_path / "x")]) == 2
    assert "unknown scale 'nope'" in capsys.readouterr().err
    rd = tmp_path / "rd"
    workflow.run_workflow(cfg_file, run_dir=str(rd), extra=["-n"], scale="quick", echo=lambda s: None)
    assert yaml.safe_load((rd / "study.yaml").read_text())["scale"] == "quick"
