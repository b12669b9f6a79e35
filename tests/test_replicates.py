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
    assert s["seeds"] == 1 and s["mean"] == pytest.approx(0.9) and np.isnan(s["sd"])
    assert s["per_seed"] == "0: 0.900, 1: incomplete, 2: incomplete"
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


@pytest.mark.slow
def test_replicate_trains_other_seeds_on_the_same_folds_and_never_touches_the_study(ci_run, capsys):
    from cellstudy import cli
    from cellstudy.learning import metrics

    run = rundir.Run(ci_run)
    study_folds = {fd.fold: _digest(fd.path) for fd in run.folds("mhl")}
    assert sorted(study_folds) == [0, 1, 2]                     # the ci scale's folds_to_run
    assert cli.main([  "replicate", str(ci_run), "--network", "mhl", "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "[6/6] mhl seed 1 fold 2" in out and "[1/6] mhl seed 0 (the study) fold 0: done (read back)" in out
    assert {fd.fold: _digest(fd.path) for fd in run.folds("mhl")} == study_folds   # not retrained, not rewritten

    table = pd.read_csv(run.replicates / "mhl.csv")
    assert sorted(set(zip(table["seed"], table["fold"]))) == [(s, k) for s in (0, 1) for k in (0, 1, 2)]
    # seed 0 rows are the book's numbers for the study's folds
    tidy = pd.read_csv(ci_run / "07_results" / "metrics_tidy.csv")
    book = tidy[(tidy["network"] == "mhl") & (tidy["metric"] == "auc_macro")].set_index(["fold", "regime"])["value"]
    mine = table[table["seed"] == 0].set_index(["fold", "regime"])["auc_macro"]
    assert np.allclose(mine.sort_index(), book.sort_index().loc[mine.sort_index().index])
    # seed 1: the same test cells, another training
    for k in (0, 1, 2):
        rep, own = run.replicate("mhl", k, 1), run.fold("mhl", k)
        assert rep.done.is_file() and (rep.path / "test_cells.csv").read_text() == own.test_cells.read_text()
        assert np.array_equal(np.load(rep.path / "y_test.npy"), np.load(own.path / "y_test.npy"))
    p0 = np.concatenate([np.load(run.fold("mhl", k).path / "proba_long.npy") for k in (0, 1, 2)])
    p1 = np.concatenate([np.load(run.replicate("mhl", k, 1).path / "proba_long.npy") for k in (0, 1, 2)])
    assert not np.allclose(p0, p1)                                # the seed changed the training
    assert metrics.fold_metrics(np.load(run.replicate("mhl", 0, 1).path / "y_test.npy"),
                                np.load(run.replicate("mhl", 0, 1).path / "proba_long.npy"))["auc_macro"] == \
        pytest.approx(table.set_index(["seed", "fold", "regime"]).loc[(1, 0, "long"), "auc_macro"])
    assert "per_seed" in out and "0: " in out and "1: " in out

    # again: everything read back, nothing retrained
    before = _digest(run.replicate("mhl", 1, 1).path)
    assert cli.main(["replicate", str(ci_run), "--network", "mhl", "--seeds", "1"]) == 0
    assert "[3/3] mhl seed 1 fold 2: done (read back)" in capsys.readouterr().out
    assert _digest(run.replicate("mhl", 1, 1).path) == before
    assert sorted(pd.read_csv(run.replicates / "mhl.csv")["seed"].unique()) == [0, 1]  # seed 0 kept in the table

    # the results chapter shows them
    from cellstudy.workflow import run_step
    run_step(ci_run, "07_results", log_output=False)
    text = run.executed("07_results").read_text()
    assert "fold-mean AUC macro per seed" in text and "MHL 0: " in text and "This run has no seed replicates" not in text
    assert set(pd.read_csv(ci_run / "07_results" / "seed_replicates.csv")["network"]) == {"mhl"}


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
