"""cellstudy.progress: the running study's line a minute, read from a run folder's logs."""
import contextlib
import io
import json
import os
import time

import pytest

from cellstudy import networks, progress, rundir
from cellstudy.learning import train


def _said(ev):
    """What ``train.print_progress`` prints for event ``ev`` (the lines the monitor parses)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train.print_progress(ev)
    return buf.getvalue().strip()


def _epoch(net, k, e, E, eta_s, ips=30.0):
    return _said({"event": "epoch", "network": net, "fold": k, "epoch": e, "epochs": E, "loss": 0.5,
                  "accuracy": 0.8, "images_per_s": ips, "eta_s": eta_s})


def _start(net, k, n=352):
    return _said({"event": "start", "network": net, "fold": k, "n_train": n, "n_test": 44, "epochs_short": 5,
                  "epochs_long": 10, "strategy": "default"})


def _done(net, k, s):
    return _said({"event": "done", "network": net, "fold": k, "seconds": s})


def _fold_ended(run, net, k):
    f = rundir.Run(run).fold(net, k, create=True).ended
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("{}")


def test_the_patterns_read_what_the_training_prints():
    m = progress.EPOCH_LINE.match(_epoch("rgb_res", 3, 7, 10, 3725.0, ips=12.5))
    assert (m["network"], m["fold"], m["epoch"], m["epochs"], m["ips"]) == ("rgb_res", "3", "7", "10", "12.5")
    assert progress.clock_seconds(m["eta"]) == 3725                       # h:mm:ss
    m = progress.DONE_LINE.match(_done("vit", 1, 101.0))
    assert m["network"] == "vit" and progress.clock_seconds(m["t"]) == 101   # m:ss
    assert progress.START_LINE.match(_start("mhl", 0, 264))["n_train"] == "264"
    assert progress.EPOCH_LINE.match(_done("vit", 1, 101.0)) is None


def test_network_progress_counts_folds_and_finds_the_running_one(tmp_path):
    run = tmp_path / "run"
    log = run / "training" / "vit" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(["WARNING: absl ...", _start("vit", 0), _epoch("vit", 0, 10, 10, 0), _done("vit", 0, 100),
                              _start("vit", 1), _epoch("vit", 1, 1, 10, 180), _epoch("vit", 1, 4, 10, 120)]) + "\n")
    _fold_ended(run, "vit", 0)
    p = progress.network_progress(rundir.Run(run), "vit", [0, 1, 2])
    assert p["done"] == [0] and p["fold_s"] == [100.0] and p["n_train"] == 352
    assert p["running"] == {"fold": 1, "epoch": 4, "epochs": 10, "eta_s": 120.0}
    # a log nobody wrote for longer than RECENT_S: nothing runs now
    old = time.time() - progress.RECENT_S - 60
    os.utime(log, (old, old))
    assert progress.network_progress(rundir.Run(run), "vit", [0, 1, 2])["running"] is None
    # a fold whose ended.json is there is not running, whatever its log says last
    os.utime(log, None)
    _fold_ended(run, "vit", 1)
    assert progress.network_progress(rundir.Run(run), "vit", [0, 1, 2])["running"] is None


def test_training_left_from_this_runs_fold_times_and_the_catalogue():
    ips = {n: networks.SPECS[n].train_images_per_s for n in ("vit", "mhl")}
    vit_cat, mhl_cat = 352 * 10 / ips["vit"], 352 * 10 / ips["mhl"]
    prog = [{"network": "vit", "done": [0, 1], "fold_s": [100.0, 140.0], "n_train": 352,
             "running": {"fold": 2, "epoch": 5, "epochs": 10, "eta_s": 60.0}},
            {"network": "mhl", "done": [], "fold_s": [], "n_train": None, "running": None}]
    left = progress.training_left_s(prog, {"vit": 5, "mhl": 5}, epochs=10, workers=2)
    factor = 120.0 / vit_cat                       # this machine against the catalogue, from ViT
    want = (60.0 + 2 * 120.0 + 5 * mhl_cat * factor) / 2
    assert left == pytest.approx(want)
    # nothing finished yet: no estimate (a first epoch's ETA holds the graph's tracing)
    prog[0].update(done=[], fold_s=[])
    assert progress.training_left_s(prog, {"vit": 5, "mhl": 5}, epochs=10, workers=2) is None


def test_a_running_fold_on_to_its_plateau_is_estimated_by_the_networks_finished_folds():
    # epoch 6 of at most 30 at 10 s an epoch: the log's ETA is the cap's, 240 s; the network's
    # finished folds took 120 s (12 epochs), so ~60 s are left of this one
    run = {"fold": 2, "epoch": 6, "epochs": 30, "eta_s": 240.0}
    assert progress.running_left_s(run, 120.0) == pytest.approx(60.0)
    # no finished fold of the network: the log's ETA
    assert progress.running_left_s(run, None) == pytest.approx(240.0)
    # past the median fold's time: at least one more epoch, never more than the log's ETA
    assert progress.running_left_s(dict(run, epoch=15, eta_s=150.0), 120.0) == pytest.approx(10.0)
    assert progress.running_left_s(run, 1000.0) == pytest.approx(240.0)
    prog = [{"network": "vit", "done": [0, 1], "fold_s": [100.0, 140.0], "n_train": 352, "running": run}]
    assert progress.training_left_s(prog, {"vit": 3}, epochs=30, workers=1) == pytest.approx(60.0)


def test_the_status_line_says_folds_notebooks_and_what_runs(tmp_path):
    run = tmp_path / "run"
    log = run / "training" / "vit" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join([_start("vit", 0), _done("vit", 0, 120), _start("vit", 1), _epoch("vit", 1, 3, 10, 90)]) + "\n")
    _fold_ended(run, "vit", 0)
    (run / "status.json").write_text(json.dumps({"steps": {"00_cohort": {"state": "done"},
                                                            "08_xai": {"state": "running"}}}))
    (run / "logs").mkdir()
    (run / "logs" / "08_xai.log").write_text("[1/5] xai vit: done\n[3/5] xai mhl: 5 fold(s)\n")
    train_pairs = [("vit", k) for k in range(3)] + [("mhl", k) for k in range(3)]
    started = time.time() - 600
    line = progress.status_line(run, train_pairs, ["00_cohort", "03_vit", "08_xai"], epochs=10, workers=2,
                                started=started)
    assert line.startswith("progress ") and "(10 min)" in line
    assert "training 1 of 6 folds done; now vit fold 1 epoch 3/10; ~" in line and "of training left (estimate)" in line
    assert "notebooks 1 of 3 done; running 08_xai [3/5]" in line
    # every fold done: no training estimate, the notebooks go on
    for k in range(3):
        _fold_ended(run, "vit", k)
        _fold_ended(run, "mhl", k)
    line = progress.status_line(run, train_pairs, ["00_cohort", "03_vit", "08_xai"], 10, 2, started=started)
    assert "training 6 of 6 folds done; notebooks 1 of 3 done" in line and "left" not in line


def test_the_monitor_prints_until_the_work_ends_and_never_raises(tmp_path, monkeypatch):
    said = []
    with progress.Monitor(tmp_path, [("vit", 0)], ["00_cohort"], 10, 2, interval=0.05, echo=said.append):
        time.sleep(0.4)
    n = len(said)
    assert n >= 2 and all(s.startswith("progress ") for s in said)
    time.sleep(0.2)
    assert len(said) == n                                  # stopped with the block

    def broken(*a, **k):
        raise OSError("a log read as it is written")
    monkeypatch.setattr(progress, "status_line", broken)
    with progress.Monitor(tmp_path, [], [], 10, 2, interval=0.05, echo=said.append):
        time.sleep(0.2)                                     # no line, no exception
    assert len(said) == n
    with progress.Monitor(tmp_path, [], [], 10, 2, interval=0, echo=said.append) as m:
        assert m._thread is None                            # 0: off


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    assert progress.interval_from_env() == progress.DEFAULT_INTERVAL_S
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    assert progress.interval_from_env() == 0
    for bad in ("soon", "-5", "nan"):
        monkeypatch.setenv(progress.INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=f"{progress.INTERVAL_ENV}='{bad}'"):
            progress.interval_from_env()
