"""Command line: ``cellstudy run CONFIG`` (the study), ``cellstudy verify COHORT``,
``cellstudy book RUN_DIR``. ``make study`` calls ``cellstudy run configs/default.yaml``."""
from __future__ import annotations

import argparse
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
    data.verify_manifest(table, root, check_sha=True)
    print(f"{a.cohort}: {len(table)} cells, {table['group'].nunique()} groups, all files present and "
          f"checksums match under {root}")
    return 0


def _book(a: argparse.Namespace) -> int:
    from cellstudy.report.book import build_book
    from cellstudy.runner import load_config

    run_dir = Path(a.run_dir)
    cfg = load_config(rundir.Run(run_dir).study_config)
    print(build_book(run_dir, cfg))
    return 0


def _predict(a: argparse.Namespace) -> int:
    from .predict import predict

    predict(a.run_dir, a.cells, network=a.network, regime=a.regime, mc_samples=a.mc_samples,
            classical=a.classical, data_root=a.data_root, out_dir=a.out)
    return 0


#: papermill's cell-boundary lines, also when tagged with the step ("[08_xai] ...") by the runner
_NOISE = re.compile(r"(\[\w+\] )?((Executing|Ending) Cell|(Input|Output) Notebook|Working directory|"
                    r"Executing notebook with kernel)")


def is_noise(message: str) -> bool:
    """Whether a log line is papermill bookkeeping that the terminal does not show."""
    return bool(_NOISE.match(message))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cellstudy", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a study config: notebooks with papermill, then the book")
    r.add_argument("config", help="study config YAML, e.g. configs/default.yaml")
    r.add_argument("--runs-dir", default=None, help="where run folders go (default: <repo>/runs)")
    r.add_argument("--new", action="store_true", help="start a new run even if an incomplete one could be resumed")
    r.add_argument("--scale", default=None, help="override the config's scale (ci | cpu | paper)")
    r.add_argument("--cohort", default=None, help="override the config's cohort")
    r.add_argument("--data-root", default=None, help="the data root (default: $CELLSTUDY_DATA_ROOT or ../shared/data)")
    r.add_argument("--no-book", action="store_true", help="run the notebooks only")
    r.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output")
    r.add_argument("--workers", type=int, default=None,
                   help="how many notebooks run at once (overrides the config's workers; 1 = one after another)")
    r.set_defaults(func=_run)
    v = sub.add_parser("verify", help="check a cohort's files and checksums")
    v.add_argument("cohort")
    v.add_argument("--data-root", default=None)
    v.set_defaults(func=_verify)
    b = sub.add_parser("book", help="(re)build the book of a finished run folder")
    b.add_argument("run_dir")
    b.set_defaults(func=_book)
    q = sub.add_parser("predict", help="apply a finished run's models to new cells (a cohort name or a manifest CSV)")
    q.add_argument("run_dir", help="a finished run folder (runs/<name>-<date>-<time>)")
    q.add_argument("cells", help="a cohort name (data_manifest/) or a manifest CSV of the new cells")
    q.add_argument("-o", "--out", required=True, help="output folder (predictions.csv / .parquet, galleries)")
    q.add_argument("--network", default=None, help="which network (default: the run's best by long-regime AUC)")
    q.add_argument("--regime", default="long", choices=("short", "long"))
    q.add_argument("--mc-samples", type=int, default=20, help="Monte Carlo dropout passes per fold model (0: none)")
    q.add_argument("--classical", action="store_true", help="add the classical baseline's probabilities")
    q.add_argument("--data-root", default=None, help="where the cells' paths are relative to")
    q.set_defaults(func=_predict)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  | %(message)s", stream=sys.stdout)
    for h in logging.getLogger().handlers:  # papermill's cell-boundary lines are noise here
        h.addFilter(lambda r: not is_noise(str(r.getMessage())))
    for noisy in ("traitlets", "asyncio", "blib2to3", "nbclient"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return a.func(a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"cellstudy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
