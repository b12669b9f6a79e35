"""Seed replicates (cellstudy.learning.replicates, workflow.replicate_network, `cellstudy replicate`)."""
import hashlib

import numpy as np
import pandas as pd
import pytest

from cellstudy import rundir
from cellstudy.learning import replicates


def _rows(net, seed, aucs, regime="long"):
    return [{"network": net, "seed": seed, "fold": k, "regime": regime, "auc_macro": a,
             "balanced_accuracy": 0.5} for k, a in enumerate(aucs)]


def test_summary_means_per_seed_then_spread_over_seeds():
    t = pd.DataFrame(_rows("rgb", 0, [0.8, 0.9, 1.0]) + _rows("rgb", 1, [0.7, 0.8, 0.9])
                     + _rows("rgb", 2, [0.9, 0.9, 0.9]))
    s = replicates.summary(t).set_index("regime").loc["long"]
    assert s["seeds"] == 3 and s["per_seed"] == "0: 0.900, 1: 0.800, 2: 0.900"
    assert s["mean"] == pytest.approx(2.6 / 3) and s["sd"] == pytest.approx(np.std([0.9, 0.8, 0.9], ddof=1))
    assert (s["min"], s["max"]) == pytest.approx((0.8, 0.9)) and s["range"] == pytest.approx(0.1)


def test_summary_leaves_out_an_incomplete_seed_and_says_so():
    t = pd.DataFrame(_rows("mhl", 0, [0.8, 0.9, 1.0]) + _rows("mhl", 1, [0.7, np.nan, 0.9])
                     + _rows("mhl", 2, [0.6, 0.7]))
    s = replicates.summary(t).iloc[0]
    assert s["seeds"] == 1 and s["mean"] == pytest.approx(0.9) and np.isnan(s["sd"]) and np.isnan(s["range"])
    assert s["per_seed"] == "0: 0.900, 1: failed fold, 2: incomplete"
    # the run's folds, not the table's: a fold that every seed lacks still counts
    t3 = pd.DataFrame(_rows("mhl", 0, [0.8, 0.9]) + _rows("mhl", 1, [0.7, 0.9]))
    assert replicates.summary(t3)["seeds"].iloc[0] == 2
    s3 = replicates.summary(t3, folds=[0, 1, 2]).iloc[0]
    assert s3["seeds"] == 0 and s3["per_seed"] == "0: incomplete, 1: incomplete" and np.isnan(s3["mean"])
    # a duplicated row does not stand in for a missing fold
    dup = pd.DataFrame(_rows("mhl", 0, [0.8, 0.9]) + _rows("mhl", 0, [0.8])[:1])
    assert replicates.summary(dup, folds=[0, 1, 2]).iloc[0]["per_seed"] == "0: incomplete"
    with pytest.raises(ValueError, match="auc_macro"):
        replicates.summary(t.drop(columns="auc_macro"))


@pytest.mark.parametrize("bad", [[], [-1], [1, 1], ["x"], [True], [1.5]])
def test_check_seeds_names_the_bad_value(bad):
    with pytest.raises(ValueError, match="seed"):
        replicates.check_seeds(bad)


def test_replicate_folder_is_apart_from_the_studys(tmp_path):
    run = rundir.Run(tmp_path)
    fd = run.replicate("rgb", 3, 2)
    assert fd.path == tmp_path / "replicates" / "seed2" / "rgb" / "fold3" and (fd.network, fd.fold) == ("rgb", 3)
    assert not fd.path.exists() and run.replicate("rgb", 3, 2, create=True).path.is_dir()
    assert run.training not in fd.path.parents


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _cell_outputs(nb_path, cell_id):
    import json
    cell = next(c for c in json.loads(nb_path.read_text())["cells"] if c.get("id") == cell_id)
    return json.dumps(cell["outputs"])


@pytest.mark.slow
def test_replicate_trains_other_seeds_on_the_same_folds_and_never_touches_the_study(ci_run, tmp_path, capsys):
    import shutil

    from cellstudy import cli
    from cellstudy.learning import metrics

    root = tmp_path / "run"   # a copy: the session's ci run stays as the other tests read it
    shutil.copytree(ci_run, root, ignore=shutil.ignore_patterns("_build", "screenshots"))
    run = rundir.Run(root)
    study_folds = {fd.fold: _digest(fd.path) for fd in run.folds("mhl")}
    assert sorted(study_folds) == [0, 1, 2]                     # the ci scale's folds_to_run
    assert cli.main(["replicate", str(root), "--network", "mhl", "--seeds", "0", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "[1/9] mhl seed 0 (the study) fold 0: done (read back)" in out and "[9/9] mhl seed 2 fold 2: done," in out
    assert {fd.fold: _digest(fd.path) for fd in run.folds("mhl")} == study_folds   # not retrained, not rewritten

    table = pd.read_csv(run.replicates / "mhl.csv")
    assert sorted(set(zip(table["seed"], table["fold"]))) == [(s, k) for s in (0, 1, 2) for k in (0, 1, 2)]
    # seed 0 rows are the book's numbers for the study's folds
    tidy = pd.read_csv(root / "07_results" / "metrics_tidy.csv")
    book = tidy[(tidy["network"] == "mhl") & (tidy["metric"] == "auc_macro")].set_index(["fold", "regime"])["value"]
    mine = table[table["seed"] == 0].set_index(["fold", "regime"])["auc_macro"].sort_index()
    assert np.allclose(mine, book.loc[mine.index])
    # seeds 1 and 2: the same test cells, another training each
    for k in (0, 1, 2):
        rep, own = run.replicate("mhl", k, 1), run.fold("mhl", k)
        assert rep.done.is_file() and rep.test_cells.read_text() == own.test_cells.read_text()
        assert np.array_equal(np.load(rep.path / "y_test.npy"), np.load(own.path / "y_test.npy"))
    proba = {s: np.concatenate([np.load((run.fold("mhl", k) if s == 0 else run.replicate("mhl", k, s)).path
                                        / "proba_long.npy") for k in (0, 1, 2)]) for s in (0, 1, 2)}
    assert not np.allclose(proba[0], proba[1]) and not np.allclose(proba[1], proba[2])
    y1 = np.load(run.replicate("mhl", 0, 1).path / "y_test.npy")
    assert metrics.fold_metrics(y1, np.load(run.replicate("mhl", 0, 1).path / "proba_long.npy"))["auc_macro"] == \
        pytest.approx(table.set_index(["seed", "fold", "regime"]).loc[(1, 0, "long"), "auc_macro"])
    summ = out[out.index("per training seed"):]
    assert all(f"{s}: " in summ for s in (0, 1, 2)) and "long" in summ and "short" in summ

    # seed 2 is its own seed, not seed 1's initial weights: alone it gives the same result
    shutil.rmtree(run.replicates / "seed2")
    assert cli.main(["replicate", str(root), "--network", "mhl", "--seeds", "2"]) == 0
    alone = np.concatenate([np.load(run.replicate("mhl", k, 2).path / "proba_long.npy") for k in (0, 1, 2)])
    assert np.allclose(alone, proba[2], atol=1e-5)

    # two seeds at once, each in its own worker process (cores // 2 threads each): each seed's
    # own result, as one after the other gives it up to the round-off of the thread count
    import json

    from cellstudy import threads
    shutil.rmtree(run.replicates / "seed1")
    shutil.rmtree(run.replicates / "seed2")
    assert cli.main(["replicate", str(root), "--network", "mhl", "--seeds", "1", "2", "--workers", "2"]) == 0
    assert "training mhl at seeds 1, 2 in 2 worker processes" in capsys.readouterr().out
    for s in (1, 2):
        for k in (0, 1, 2):
            done = json.loads(run.replicate("mhl", k, s).done.read_text())
            assert done["tf_threads"] == threads.settings_for(2)
        par = np.concatenate([np.load(run.replicate("mhl", k, s).path / "proba_long.npy") for k in (0, 1, 2)])
        assert np.allclose(par, proba[s], atol=1e-3), (s, np.abs(par - proba[s]).max())
    assert sorted(pd.read_csv(run.replicates / "mhl.csv")["seed"].unique()) == [0, 1, 2]
    capsys.readouterr()
    assert cli.main(["replicate", str(root), "--network", "mhl", "--seeds", "1", "--workers", "0"]) == 2
    assert "workers=0: expected an int >= 1" in capsys.readouterr().err
    # a worker's error names its seed and fails the command (here a fold of seed 3 trained as
    # another architecture: refused when the worker reads it back)
    bad = run.replicate("mhl", 0, 3)
    shutil.copytree(run.replicate("mhl", 0, 1).path, bad.path)
    bad.done.write_text(json.dumps({**json.loads(bad.done.read_text()), "architecture": "0" * 16}))
    assert cli.main(["replicate", str(root), "--network", "mhl", "--seeds", "2", "3", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "training mhl at seed 3 in a worker process failed: CheckpointMismatchError" in err, err
    assert "resumes" in err
    shutil.rmtree(run.replicates / "seed3")

    # again: everything read back, nothing retrained; the table keeps every seed
    capsys.readouterr()
    before = _digest(run.replicate("mhl", 1, 1).path)
    assert cli.main(["replicate", str(root), "--network", "mhl", "--seeds", "1"]) == 0
    assert "[3/3] mhl seed 1 fold 2: done (read back)" in capsys.readouterr().out
    assert _digest(run.replicate("mhl", 1, 1).path) == before
    assert sorted(pd.read_csv(run.replicates / "mhl.csv")["seed"].unique()) == [0, 1, 2]

    # a seed read back for the table only, trained as another architecture (e.g. an RGB-family
    # fold from before 2026-12-07), is refused, not mixed into the table
    marker = run.replicate("mhl", 1, 2).done
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "architecture": "0" * 16}))
    capsys.readouterr()
    assert cli.main(["replicate", str(root), "--network", "mhl", "--seeds", "1"]) == 2
    assert "was trained with architecture 0000000000000000" in capsys.readouterr().err
    marker.write_text(json.dumps(meta))

    # the results chapter shows them (its outputs, not its source)
    from cellstudy.workflow import run_step
    run_step(root, "07_results", log_output=False)
    shown = _cell_outputs(run.executed("07_results"), "5eedrep2")
    assert "MHL 0: " in shown and "1: " in shown and "2: " in shown and "no seed replicates" not in shown
    assert set(pd.read_csv(root / "07_results" / "seed_replicates.csv")["network"]) == {"mhl"}


@pytest.mark.slow
def test_the_results_chapter_says_when_a_run_has_no_replicates(ci_run):
    shown = _cell_outputs(rundir.Run(ci_run).executed("07_results"), "5eedrep2")
    assert "This run has no seed replicates" in shown


@pytest.mark.slow
def test_replicate_refuses_a_network_the_run_does_not_train(ci_run):
    from cellstudy import workflow

    with pytest.raises(ValueError, match="resnet50"):
        workflow.replicate_network(ci_run, "resnet50", [1])
    with pytest.raises(ValueError, match="seed -1"):
        workflow.replicate_network(ci_run, "mhl", [-1])


def test_read_run_and_the_chapters_sentence(tmp_path):
    assert replicates.read_run(tmp_path).empty                   # no replicates folder
    d = tmp_path / "replicates"
    d.mkdir()
    pd.DataFrame(_rows("rgb", 0, [0.8, 0.9]) + _rows("rgb", 1, [0.9, 0.9])).to_csv(d / "rgb.csv", index=False)
    pd.DataFrame(_rows("mhl", 0, [0.9, 0.95])).to_csv(d / "mhl.csv", index=False)
    t = replicates.read_run(tmp_path)
    assert list(t["network"].unique()) == ["rgb", "mhl"]       # the catalogue's order
    text = replicates.sentence(replicates.summary(t))
    assert "RGB 0: 0.850, 1: 0.900 (range 0.050)" in text and "MHL 0: 0.925 (one complete seed" in text
    assert "up to 0.050 (RGB)" in text
    assert replicates.sentence(replicates.summary(t), regime="short") == ""
    pd.DataFrame({"network": ["vit"]}).to_csv(d / "vit.csv", index=False)
    with pytest.raises(ValueError, match="vit.csv lacks columns"):
        replicates.read_run(tmp_path)
