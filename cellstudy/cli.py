"""Command line: ``cellstudy run CONFIG`` (the study), ``cellstudy verify COHORT``,
``cellstudy book RUN_DIR``, ``cellstudy manifest FOLDER -o OUT.csv`` (a cohort from your own images),
``cellstudy predict RUN_DIR CELLS -o OUT`` (a run's models on new cells), ``cellstudy replicate RUN_DIR
--network N --seeds 1 2`` (seed replicates of a network on the run's folds); the Snakemake workflow:
``cellstudy workflow CONFIG [--profile DIR]`` and its jobs ``cellstudy train-fold RUN_DIR --network N
--fold K``, ``cellstudy step RUN_DIR STEP``. ``make study`` calls ``cellstudy run configs/default.yaml``."""
from __future__ import annotations

import argparse
import os
import logging
import re
import sys
from pathlib import Path

from cellstudy import config, rundir


def _run(a: argparse.Namespace) -> int:
    from cellstudy.runner import run_study

    run_study(a.config, runs_dir=a.runs_dir, new=a.new, build=not a.no_book, log_output=not a.quiet,
              cohort=a.cohort, scale=a.scale, data_root=a.data_root, workers=a.workers)
    return 0


def _verify(a: argparse.Namespace) -> int:
    from cellstudy import data

    root = config.data_root(a.data_root)
    table = data.load_manifest(a.cohort)
    unlabelled = data.is_unlabelled(table)   # cells to predict (cellstudy manifest --unlabelled)
    data.verify_manifest(table, root, check_sha=True, labelled=not unlabelled)
    groups = f", {table['group'].nunique()} groups" if "group" in table.columns else ""
    print(f"{a.cohort}: {len(table)} cells{groups}, all files present and checksums match under {root}"
          + ("; unlabelled: cells for `cellstudy predict`, not a study cohort" if unlabelled else ""))
    return 0


def _manifest(a: argparse.Namespace) -> int:
    from cellstudy import data
    from cellstudy.data import folder

    out = Path(a.output)
    if out.exists() and not a.force:  # before reading any image
        raise FileExistsError(f"{out} exists; not overwritten (pass --force to replace it)")
    try:
        df = folder.build_manifest(
            a.folder, normal=a.normal, abnormal=a.abnormal, channels=a.channels, labels=a.labels,
            unlabelled=a.unlabelled, stains=a.stains,
            file_column=a.file_column, class_column=a.class_column, group_column=a.group_column,
            group_pattern=a.group_pattern, channel_pattern=a.channel_pattern, n_splits=a.n_splits,
            data_root=a.data_root)
    except data.DataError as e:
        if len(e.problems) <= 1:
            raise
        listed = "\n".join(f"  - {p}" for p in data.group_problems(e.problems))
        print(f"cellstudy: error: {len(e.problems)} problem(s) in {a.folder}; nothing written:\n{listed}",
              file=sys.stderr)
        return 2
    folder.write_manifest(df, out, force=a.force)
    root = df.attrs["data_root"]
    for note in df.attrs["notes"]:
        print(f"note: {note}")
    if a.unlabelled:
        print(f"wrote {out}: {len(df)} unlabelled cells in {folder.plural(df['group'].nunique(), 'group')}\n"
              f"{folder.shape_line(df)}\ndata root: {root}\n"
              f"predict them: cellstudy predict runs/<run> {out.resolve()} --data-root {root} -o <out>")
        return 0
    configs = config.REPO_ROOT / "configs"
    print(f"wrote {out}: {len(df)} cells\n{folder.summary(df)}\ndata root: {root}\n"
          f"check it:  cellstudy verify {out.resolve()} --data-root {root}\n"
          f"run on it: cellstudy run {configs / 'default.yaml'} --cohort {out.resolve()} --data-root {root}"
          f" --runs-dir <folder>\n  (the study, 2-4 h on 2 cores for 220 cells; {configs / 'ci.yaml'}: a smoke "
          f"test in minutes; the README's 'Your own cells')")
    return 0


def _book(a: argparse.Namespace) -> int:
    from cellstudy.report.book import build_book
    from cellstudy.runner import load_config

    run_dir = Path(a.run_dir)
    cfg = load_config(rundir.Run(run_dir).study_config)
    index = build_book(run_dir, cfg)
    print(index)
    if not (a.check or a.report):
        return 0
    from cellstudy.runner import check_built_book

    report = check_built_book(run_dir, index, report=a.report)
    if a.report:   # the caller (the workflow's book rule -> cellstudy run) judges the report
        return 0
    return 0 if report["ok"] is not False else 1


def _predict(a: argparse.Namespace) -> int:
    from cellstudy.predict import predict

    predict(a.run_dir, a.cells, network=a.network, regime=a.regime, mc_samples=a.mc_samples,
            classical=a.classical, data_root=a.data_root, out_dir=a.out, overwrite=a.force,
            ignore_stains=a.ignore_stains)
    return 0


def _pretrain(a: argparse.Namespace) -> int:
    from cellstudy.learning.pretrain import pretrain_backbone

    pretrain_backbone(a.backbone, a.cohort, a.serves, a.output, scale=a.scale, epochs=a.epochs, seed=a.seed,
                      data_root=a.data_root, force=a.force, family=a.family)
    return 0


def _export(a: argparse.Namespace) -> int:
    from cellstudy.export import export

    export(a.run_dir, a.network, a.output, fold=a.fold, regime=a.regime, license=a.license,
           authors=tuple(a.author or ["cellstudy"]), force=a.force, test=not a.no_test)
    return 0


def _test_package(a: argparse.Namespace) -> int:
    from cellstudy.export import test_package

    summary = test_package(a.package)
    if a.full or summary.status != "passed":   # the whole report when asked, or when a check failed
        print(summary.format())
    else:
        from cellstudy.export import short_report
        print(short_report(summary, a.package))
        print("(bioimageio's full report, with its recommended conda environment: --full)")
    print(f"test-package: {a.package}: {summary.status}")
    return 0 if summary.status == "passed" else 1


def _weights(a: argparse.Namespace) -> int:
    from cellstudy.learning.models import weights as W

    cache = Path(a.cache) if a.cache else config.cache_dir() / "weights"
    try:
        got = W.fetch_imagenet(a.names, cache, base_url=a.base_url or W.KERAS_WEIGHTS_URL)
    except W.FetchError as e:
        print(f"cellstudy: error: {e}", file=sys.stderr)
        return 2
    print("\nadd to your study config (configs/<name>.yaml):\n" + W.weights_block(got))
    return 0


def _train_network(a: argparse.Namespace) -> int:
    from cellstudy.workflow import train_network

    for res in train_network(a.run_dir, a.network, data_root=a.data_root):
        if res.failed:
            print(f"cellstudy: {a.network} fold {res.fold} failed: {(res.failure or {}).get('reason')} "
                  f"({rundir.Run(a.run_dir).fold(a.network, res.fold).failed}); the book reports it", file=sys.stderr)
    return 0


def _explain_fold(a: argparse.Namespace) -> int:
    from cellstudy.workflow import explain_fold

    explain_fold(a.run_dir, a.network, a.fold, data_root=a.data_root)
    return 0


def _train_fold(a: argparse.Namespace) -> int:
    from cellstudy.workflow import train_fold

    res = train_fold(a.run_dir, a.network, a.fold, data_root=a.data_root)
    if res.failed:   # a diverged run is a result (failed.json, reported by the book), not a crash
        failed = rundir.Run(a.run_dir).fold(a.network, a.fold).failed
        print(f"cellstudy: {a.network} fold {a.fold} failed: {(res.failure or {}).get('reason')} ({failed}); "
              "the book reports it", file=sys.stderr)
    return 0


def _replicate(a: argparse.Namespace) -> int:
    from cellstudy.workflow import replicate_network

    table, summ = replicate_network(a.run_dir, a.network, a.seeds, data_root=a.data_root, workers=a.workers)
    print(f"\n{a.network}: AUC macro, fold mean, per training seed (the same folds); "
          f"{rundir.Run(a.run_dir).replicates / (a.network + '.csv')} has every fold")
    cols = ["regime", "seeds", "per_seed", "mean", "sd", "min", "max"]
    print(summ[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _step(a: argparse.Namespace) -> int:
    from cellstudy.workflow import run_step

    secs = run_step(a.run_dir, a.step, log_output=not a.quiet)
    print(f"{a.step}: done in {secs:.1f} s ({rundir.Run(a.run_dir).executed(a.step)})")
    return 0


def _workflow(a: argparse.Namespace) -> int:
    from cellstudy.workflow import run_workflow

    run_workflow(a.config, profile=a.profile, run_dir=a.run_dir, runs_dir=a.runs_dir, new=a.new,
                 cores=a.cores, targets=a.targets, extra=a.snakemake_args or [], data_root=a.data_root,
                 cohort=a.cohort, scale=a.scale)
    return 0


#: papermill's cell-boundary lines, also when tagged with the step ("[08_xai] ...") by the runner
_NOISE = re.compile(r"(\[\w+\] )?((Executing|Ending) Cell|(Input|Output) Notebook|Working directory|"
                    r"Executing notebook with kernel)")


def is_noise(message: str) -> bool:
    """Whether a log line is papermill bookkeeping that the terminal does not show."""
    return bool(_NOISE.match(message))


#: The commands that load TensorFlow in this process (the others start it in their jobs, or not at all).
TF_COMMANDS = {"predict", "export", "test-package", "pretrain", "train-network", "replicate", "train-fold",
               "explain-fold", "weights"}


def preflight(a: argparse.Namespace) -> None:
    """The first checks of a TensorFlow command, those that need no TensorFlow: ``predict`` /
    ``export``'s folder is a run with trained models (``predict.run_settings``, as they check it
    first), the training and explanation commands' a prepared run (``rundir.check_prepared``),
    ``test-package``'s package exists, ``pretrain``'s output is a new ``.weights.h5``. Each
    command checks the rest (a trained network, the cells' manifest, ...) as before."""
    if a.cmd in ("predict", "export"):
        from cellstudy.predict import run_settings
        run_settings(a.run_dir)
    elif getattr(a, "run_dir", None) is not None:
        rundir.check_prepared(a.run_dir)
    if a.cmd == "test-package":
        from cellstudy.export import check_package
        check_package(a.package)
    if a.cmd == "pretrain":
        from cellstudy.learning.pretrain import check_output
        check_output(a.output, a.force)


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ INFO / WARNING lines (CPU features, ...) are noise in a command's output;
    # errors still print. An exported value is kept (TF_CPP_MIN_LOG_LEVEL=0 shows everything).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser(prog="cellstudy", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a study config: notebooks with papermill, then the book")
    r.add_argument("config", help="study config YAML, e.g. configs/default.yaml")
    r.add_argument("--runs-dir", default=None, help="where run folders go (default: <repo>/runs)")
    r.add_argument("--new", action="store_true", help="start a new run even if an incomplete one could be resumed")
    r.add_argument("--scale", default=None, help="override the config's scale (ci | quick | cpu | paper)")
    r.add_argument("--cohort", default=None, help="override the config's cohort")
    r.add_argument("--data-root", default=None, help="the data root (default: $CELLSTUDY_DATA_ROOT or ../shared/data)")
    r.add_argument("--no-book", action="store_true", help="run the notebooks only")
    r.add_argument("--quiet", action="store_true",
                   help="keep Snakemake's progress lines off the terminal (their last lines are shown when it fails); each job's "
                        "output is in the run folder's logs/ and training/<network>/train.log either way")
    r.add_argument("--workers", type=int, default=None,
                   help="how many jobs (training jobs, notebooks) run at once (overrides the config's workers; 1 = one after another)")
    r.set_defaults(func=_run)
    v = sub.add_parser("verify", help="check a cohort's files and checksums")
    v.add_argument("cohort", help="a cohort name (data_manifest/, e.g. bbbc021-paper) or a manifest CSV "
                   "(cellstudy manifest)")
    v.add_argument("--data-root", default=None, help="the data root (default: $CELLSTUDY_DATA_ROOT or ../shared/data)")
    v.set_defaults(func=_verify)
    m = sub.add_parser("manifest", help="build a cohort manifest from a folder of your own cell images",
                       description="Build a cohort manifest (CSV) from a folder of cell images: one "
                       "multi-channel file per cell or one file per channel (TIFF / OME-TIFF / PNG / NPY, "
                       "any bit depth). Every problem is reported at once; nothing is written then.")
    m.add_argument("folder", help="the image folder; without --labels, FOLDER/<class>/... gives the class")
    m.add_argument("-o", "--output", required=True, help="the manifest CSV to write (kept if it exists, unless --force)")
    m.add_argument("--normal", default=None, help="the class name taking the normal role (label 0)")
    m.add_argument("--abnormal", default=None, help="the class name taking the abnormal role (label 1)")
    m.add_argument("--unlabelled", action="store_true",
                   help="cells to predict (cellstudy predict): no classes; group = subfolder unless "
                        "--group-pattern / --group-column")
    m.add_argument("--stains", default=None,
                   help="the stains in R, G, B order, e.g. 'vimentin,F-actin,DNA' (predict compares "
                        "them with the run's cohort)")
    m.add_argument("--channels", required=True,
                   help="stored channel of R, G, B: 'third=2,actin=1,dna=0' (channel indices of a multi-channel "
                   "file) or with --channel-pattern 'third=w3,actin=w2,dna=w1' (file-name tokens)")
    m.add_argument("--channel-pattern", default=None,
                   help="one file per channel: '_{channel}.tif' (literal text with a {channel} placeholder) or a "
                   "regular expression with a named group (?P<channel>...)")
    m.add_argument("--group-pattern", default=None,
                   help="regular expression with a named group (?P<group>...) searched in each file's path "
                   "relative to FOLDER, e.g. '(?P<group>[A-Z]\\d{2}_s\\d+)' (\\d+: site s1 is not site s10)")
    m.add_argument("--labels", default=None, help="labels CSV: a file column and a class column (instead of class folders)")
    m.add_argument("--file-column", default="file", help="the labels CSV's file column (default: file)")
    m.add_argument("--class-column", default="class", help="the labels CSV's class column (default: class)")
    m.add_argument("--group-column", default=None, help="the labels CSV's group column (instead of --group-pattern)")
    m.add_argument("--n-splits", type=int, default=5, help="the study's folds; each class needs at least n_splits groups, 2 x n_splits to be steady (default 5)")
    m.add_argument("--data-root", default=None,
                   help="write paths relative to this folder (FOLDER or above it; default FOLDER)")
    m.add_argument("--force", action="store_true", help="overwrite an existing output file")
    m.set_defaults(func=_manifest)
    b = sub.add_parser("book", help="(re)build the book of a finished run folder")
    b.add_argument("run_dir")
    b.add_argument("--check", action="store_true",
                   help="open every page in headless Chromium and check it (exit 1 on a problem)")
    b.add_argument("--report", default=None,
                   help="write the check's report (JSON) to this file and exit 0 (the workflow's book rule)")
    b.set_defaults(func=_book)
    pt = sub.add_parser("pretrain", help="pre-train a backbone on a cohort (never on the cells or fields of the "
                        "cohort it will serve) and write a weights file a study config can name")
    pt.add_argument("--backbone", required=True, help="cnn3 (the RGB / MHL CNN), vgg16, resnet50 or densenet121")
    pt.add_argument("--cohort", required=True, help="the pre-training cohort, e.g. bbbc021-full")
    pt.add_argument("--serves", required=True, help="the study's cohort the weights are for, e.g. bbbc021-paper: "
                    "none of its cells or fields is used")
    pt.add_argument("-o", "--output", required=True, help="the weights file to write (NAME.weights.h5)")
    pt.add_argument("--scale", default="cpu", help="image size, schedule, augmentation (default cpu)")
    pt.add_argument("--epochs", type=int, default=None, help="default: the scale's epochs_long")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--data-root", default=None, help="the data root (default: $CELLSTUDY_DATA_ROOT or ../shared/data)")
    pt.add_argument("--force", action="store_true", help="replace an existing weights file")
    pt.add_argument("--family", default=None, help="the family the weights are for (RGB, MHL, DL): its "
                    "input whitening at the scale (default: the scale's one mode, or ZCA)")
    pt.set_defaults(func=_pretrain)
    ex = sub.add_parser("export", help="a bioimage.io model package (zip) of one fold's model of a finished run")
    ex.add_argument("run_dir")
    ex.add_argument("--network", required=True, help="a trained network of the run: its id or the paper's "
                    "name, e.g. mhl_res or MHL-Res")
    ex.add_argument("-o", "--output", required=True, help="the package to write, e.g. mhl.zip")
    ex.add_argument("--fold", type=int, default=None, help="which fold's model (default: the lowest finished fold)")
    ex.add_argument("--regime", default="long", choices=("short", "long"),
                    help="the model of the short or the long regime (default long: the study's results)")
    ex.add_argument("--license", default="CC-BY-NC-SA-4.0",
                    help="SPDX licence of the package (default CC-BY-NC-SA-4.0: non-commercial, as the data's terms)")
    ex.add_argument("--author", action="append", help="an author's name (repeat for more)")
    ex.add_argument("--force", action="store_true", help="replace an existing package")
    ex.add_argument("--no-test", action="store_true", help="skip bioimageio's test of the package")
    ex.set_defaults(func=_export)
    tp = sub.add_parser("test-package", help="bioimageio's test of a package cellstudy export wrote, with "
                        "cellstudy's layers loaded (the ViT and RGB packages need them)")
    tp.add_argument("package", help="the package, e.g. vit.zip")
    tp.add_argument("--full", action="store_true", help="print bioimageio's whole report (its recommended conda "
                    "environment, the tolerances); a failed test prints it anyway")
    tp.set_defaults(func=_test_package)
    wt = sub.add_parser("weights", help="fetch Keras's published ImageNet weights (online machines only) and "
                        "print the study config's weights block")
    wts = wt.add_subparsers(dest="weights_command", required=True)
    wf = wts.add_parser("fetch", help="download and check the ImageNet 'notop' files of backbones")
    wf.add_argument("names", nargs="+", help="backbones: vgg16 resnet50 densenet121")
    wf.add_argument("--cache", default=None, help="where the files go (default: the cellstudy cache, .cache/weights)")
    wf.add_argument("--base-url", default=None, help="another server holding Keras's files (a mirror)")
    wf.set_defaults(func=_weights)
    tn = sub.add_parser("train-network", help="train every fold of one network of a prepared run folder "
                        "in one process (a workflow job on one machine)")
    tn.add_argument("run_dir")
    tn.add_argument("--network", required=True, help="a network of the run, e.g. mhl")
    tn.add_argument("--data-root", default=None, help="the data root (default: the run config's, "
                    "$CELLSTUDY_DATA_ROOT or ../shared/data)")
    tn.set_defaults(func=_train_network)
    rp = sub.add_parser("replicate", help="train one network of a prepared run folder again at other training "
                        "seeds, on the same folds: how much of its number is the seed")
    rp.add_argument("run_dir")
    rp.add_argument("--network", required=True, help="a network of the run, e.g. rgb")
    rp.add_argument("--seeds", required=True, nargs="+", type=int, help="training seeds, e.g. 1 2 (the run's "
                    "own seed is its study folds, read back)")
    rp.add_argument("--data-root", default=None, help="the data root (default: the run config's, "
                    "$CELLSTUDY_DATA_ROOT or ../shared/data)")
    rp.add_argument("--workers", type=int, default=1, help="seeds trained at once, each in its own process "
                    "with cores / workers threads (default 1: one seed after the other, all cores)")
    rp.set_defaults(func=_replicate)
    q = sub.add_parser("predict", help="apply a finished run's models to new cells (a cohort name or a manifest CSV)")
    q.add_argument("run_dir", help="a finished run folder (runs/<name>-<date>-<time>)")
    q.add_argument("cells", help="a cohort name (data_manifest/) or a manifest CSV of the new cells")
    q.add_argument("-o", "--out", required=True, help="output folder (predictions.csv / .parquet, galleries)")
    q.add_argument("--network", default=None, help="which network: its id or the paper's name, e.g. mhl_res or "
                   "MHL-Res (default: the run's best by long-regime AUC)")
    q.add_argument("--regime", default="long", choices=("short", "long"),
                   help="the models of the short or the long regime (default long: the study's results)")
    q.add_argument("--mc-samples", type=int, default=20, help="Monte Carlo dropout passes per fold model (0: none; default 20)")
    q.add_argument("--classical", action="store_true", help="add the classical baseline's probabilities")
    q.add_argument("--data-root", default=None, help="where the cells' paths are relative to")
    q.add_argument("--force", action="store_true", help="replace the predictions in an output folder that has them")
    q.add_argument("--ignore-stains", action="store_true",
                   help="predict although the cells' stains (manifest column 'stains') differ from the run's")
    q.set_defaults(func=_predict)
    for name, func, what in (
            ("train-fold", _train_fold, "train one (network, fold) of a prepared run folder (a workflow job)"),
            ("explain-fold", _explain_fold, "explain one trained (network, fold) of a prepared run folder into "
                                            "the XAI chapter's cache (a workflow job on a cluster)")):
        t = sub.add_parser(name, help=what)
        t.add_argument("run_dir")
        t.add_argument("--network", required=True, help="a network of the run, e.g. mhl")
        t.add_argument("--fold", required=True, type=int, help="the test fold, 0..n_splits-1")
        t.add_argument("--data-root", default=None, help="the data root (default: the run config's, "
                       "$CELLSTUDY_DATA_ROOT or ../shared/data)")
        t.set_defaults(func=func)
    st = sub.add_parser("step", help="execute one notebook of a prepared run folder with its parameters")
    st.add_argument("run_dir")
    st.add_argument("step", help="a step of the run's config, e.g. 05_mhl_family")
    st.add_argument("--quiet", action="store_true", help="do not stream the notebook's output")
    st.set_defaults(func=_step)
    w = sub.add_parser("workflow", help="run a study config as a Snakemake workflow (locally or with a profile)")
    w.add_argument("config", help="study config YAML, e.g. configs/paper.yaml")
    w.add_argument("--profile", default=None, help="Snakemake profile folder, e.g. profiles/slurm (default: "
                   "local, all cores)")
    w.add_argument("--run-dir", default=None, help="the run folder (default: a new one under --runs-dir, or "
                   "the newest incomplete run of this config)")
    w.add_argument("--runs-dir", default=None, help="where run folders go (default: <repo>/runs)")
    w.add_argument("--new", action="store_true", help="start a new run even if an incomplete one could be resumed")
    w.add_argument("--cores", type=int, default=None, help="local cores (default: all; with a profile: its own)")
    w.add_argument("--data-root", default=None, help="the data root (default: $CELLSTUDY_DATA_ROOT or ../shared/data)")
    w.add_argument("--scale", default=None, help="override the config's scale (ci | quick | cpu | paper), as `run` does")
    w.add_argument("--cohort", default=None, help="override the config's cohort (a name or a manifest CSV), as `run` does")
    w.add_argument("--target", dest="targets", action="append", default=[],
                   help="a Snakemake target (default: all, i.e. the book): training (every fold), notebooks, "
                        "or a file of the run folder; repeatable")
    w.add_argument("--snakemake-args", nargs=argparse.REMAINDER, default=None,
                   help="everything after this goes to snakemake, e.g. --snakemake-args -n")
    w.set_defaults(func=_workflow)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  | %(message)s", stream=sys.stdout)
    for h in logging.getLogger().handlers:  # papermill's cell-boundary lines are noise here
        h.addFilter(lambda r: not is_noise(str(r.getMessage())))
    for noisy in ("traitlets", "asyncio", "blib2to3", "nbclient"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if a.cmd in TF_COMMANDS:
            preflight(a)   # a wrong path fails now, not after TensorFlow's import (~5-10 s)
            from cellstudy import tf_import
            tf_import.import_quietly()   # without the two lines TensorFlow writes before its logging
        return a.func(a)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"cellstudy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
