"""A running study's progress on the terminal: one line a minute while the workflow runs.

``cellstudy run`` / ``cellstudy workflow`` hand the work to Snakemake, which prints a block per job
and "N of M steps done", and nothing while a network trains (10-30 minutes a job at the default
scale); the training jobs write their epochs to their logs. :class:`Monitor` reads the run folder
every ``interval`` seconds and prints what is going on and how long the training has left::

    progress 14:21 (18 min): training 7 of 25 folds done; now resnet50 fold 2 epoch 6/10, vit fold 1 epoch 3/10; ~21 min of training left (estimate); notebooks 2 of 13 done

Sources, all in the run folder: a fold is done when its ``ended.json`` is there
(:class:`cellstudy.rundir.FoldDir`); the training logs' epoch lines
(``<network> fold <k> epoch <e>/<E> ... <r> imgs/s ETA <m:ss>``, ``train.print_progress``) and
"done in" lines; ``status.json``'s steps (``done`` / ``running``) and a running notebook's last
``[i/n]`` line in ``logs/<step>.log``.

The training estimate (:func:`training_left_s`): each network's fold takes the median time of its
finished folds in this run; a network with none yet takes the catalogue's time
(``networks.SPECS[n].train_images_per_s``, measured on another CPU) times this machine's factor,
the median ratio of measured to catalogue fold time over the networks measured so far; a running
fold adds its own ETA, at most what its network's finished folds took less its epochs done
(:func:`running_left_s`: a fold that goes on to its plateau stops before the cap its ETA
counts to). The sum is shared by the ``workers`` training jobs at once. No estimate is
given before any fold has finished (the first fold's time includes TensorFlow's graph tracing
and says what this machine does)."""
from __future__ import annotations

import os
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cellstudy import networks, rundir

#: ``train.print_progress``'s epoch line.
EPOCH_LINE = re.compile(r"^(?P<network>\S+) fold (?P<fold>\d+) epoch (?P<epoch>\d+)/(?P<epochs>\d+) .*?"
                        r"(?P<ips>[\d.]+) imgs/s ETA (?P<eta>\d+(?::\d\d){1,2})\s*$")
#: ``train.print_progress``'s start and done lines.
START_LINE = re.compile(r"^(?P<network>\S+) fold (?P<fold>\d+) start: (?P<n_train>\d+) train ")
DONE_LINE = re.compile(r"^(?P<network>\S+) fold (?P<fold>\d+) done in (?P<t>\d+(?::\d\d){1,2})\s*$")
#: A notebook's count line, e.g. the XAI chapter's ``[3/11] xai vit: ...``.
COUNT_LINE = re.compile(r"^\[(?P<i>\d+)/(?P<n>\d+)\] ")
#: A log line older than this (seconds) is not "now" (a job that stopped writing).
RECENT_S = 300.0


def clock_seconds(text: str) -> int:
    """``"m:ss"`` or ``"h:mm:ss"`` (``train._fmt_s``) -> seconds."""
    s = 0
    for part in text.split(":"):
        s = s * 60 + int(part)
    return s


def _fmt_min(seconds: float) -> str:
    m = max(1, round(seconds / 60))
    return f"{m} min" if m < 90 else f"{m // 60} h {m % 60:02d} min"


def _tail(path: Path, nbytes: int = 32768) -> list[str]:
    """The last lines of a log (its last ``nbytes``); [] when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - nbytes))
            return fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []


def _training_logs(run: rundir.Run, network: str) -> list[Path]:
    d = run.training / network
    return [p for p in [d / "train.log", *sorted(d.glob("fold*/train.log"))] if p.is_file()]


def network_progress(run: rundir.Run, network: str, folds: Sequence[int], now: float | None = None
                     ) -> dict[str, Any]:
    """One network's training in run folder ``run``: ``done`` (folds whose ``ended.json`` is
    there), ``fold_s`` (seconds of each fold's "done in" line), ``n_train`` (training images a fold,
    from a start line; None before), ``running`` (``{fold, epoch, epochs, eta_s}`` of the newest
    epoch line, when its log was written in the last ``RECENT_S`` seconds and that fold is not
    done; else None)."""
    now = time.time() if now is None else now
    done = [k for k in folds if run.fold(network, k).ended.is_file()]
    fold_s: list[float] = []
    n_train = None
    running = None
    newest = -1.0
    for log in _training_logs(run, network):
        lines = _tail(log)
        for ln in lines:
            m = DONE_LINE.match(ln)
            if m and m["network"] == network:
                fold_s.append(float(clock_seconds(m["t"])))
            m = START_LINE.match(ln)
            if m and m["network"] == network:
                n_train = int(m["n_train"])
        try:
            mtime = log.stat().st_mtime
        except OSError:
            continue
        if now - mtime > RECENT_S or mtime < newest:
            continue
        for ln in reversed(lines):
            m = EPOCH_LINE.match(ln)
            if m and m["network"] == network:
                if int(m["fold"]) not in done:
                    running = {"fold": int(m["fold"]), "epoch": int(m["epoch"]), "epochs": int(m["epochs"]),
                               "eta_s": float(clock_seconds(m["eta"]))}
                    newest = mtime
                break
    return {"network": network, "done": done, "fold_s": fold_s, "n_train": n_train, "running": running}


def running_left_s(running: dict[str, Any], fold_s: float | None) -> float:
    """Seconds left of a running fold: its log's ETA (the epochs left to the long regime's last
    epoch; with a plateau stop, that is the cap), at most the network's median finished fold
    ``fold_s`` less the epochs done (at the log's rate), and at least one epoch. A fold that goes
    on to its plateau usually stops well before the cap (the default: 10-27 of 30 epochs), so its
    own ETA alone overstates the time left."""
    eta = float(running["eta_s"])
    left_epochs = int(running["epochs"]) - int(running["epoch"])
    if fold_s is None or left_epochs <= 0:
        return eta
    per_epoch = eta / left_epochs
    return min(eta, max(per_epoch, float(fold_s) - per_epoch * int(running["epoch"])))


def training_left_s(progress: Sequence[dict[str, Any]], n_folds: dict[str, int], epochs: int,
                    workers: int) -> float | None:
    """Seconds of training left (module docstring), from :func:`network_progress` of every
    network; ``n_folds``: folds to train per network; None before any fold has finished."""
    measured = {p["network"]: statistics.median(p["fold_s"]) for p in progress if p["fold_s"]}
    if not measured:
        return None

    def catalogue_s(p):
        spec = networks.SPECS.get(p["network"])
        ips = getattr(spec, "train_images_per_s", None)
        n = p["n_train"] or next((q["n_train"] for q in progress if q["n_train"]), None)
        return None if not ips or not n else n * epochs / ips

    ratios = [measured[p["network"]] / c for p in progress
              if p["network"] in measured and (c := catalogue_s(p))]
    factor = statistics.median(ratios) if ratios else None
    left = 0.0
    for p in progress:
        todo = n_folds[p["network"]] - len(p["done"]) - (1 if p["running"] else 0)
        if p["running"]:
            left += running_left_s(p["running"], measured.get(p["network"]))
        if todo <= 0:
            continue
        per_fold = measured.get(p["network"])
        if per_fold is None:
            c = catalogue_s(p)
            if c is None or factor is None:
                return None
            per_fold = c * factor
        left += todo * per_fold
    return left / max(1, int(workers))


def status_line(run_dir: str | Path, train: Sequence[tuple[str, int]], steps: Sequence[str], epochs: int,
                workers: int, started: float, now: float | None = None) -> str:
    """The progress line of run folder ``run_dir`` (module docstring). ``train``: the (network,
    fold) pairs the run trains; ``steps``: its notebooks; ``epochs``: the long regime's;
    ``started``: when the workflow started (epoch seconds)."""
    from cellstudy import runner

    now = time.time() if now is None else now
    run = rundir.Run(run_dir)
    folds: dict[str, list[int]] = {}
    for n, k in train:
        folds.setdefault(n, []).append(k)
    parts = []
    if folds:
        prog = [network_progress(run, n, ks, now) for n, ks in folds.items()]
        n_done = sum(len(p["done"]) for p in prog)
        txt = f"training {n_done} of {len(train)} folds done"
        if n_done < len(train):
            now_running = [f"{p['network']} fold {p['running']['fold']} epoch {p['running']['epoch']}/"
                           f"{p['running']['epochs']}" for p in prog if p["running"]]
            if now_running:
                txt += "; now " + ", ".join(now_running)
            left = training_left_s(prog, {n: len(ks) for n, ks in folds.items()}, epochs, workers)
            txt += (f"; ~{_fmt_min(left)} of training left (estimate)" if left is not None
                    else "; time left: estimated once a fold has finished")
        parts.append(txt)
    st = (runner.read_status(run.root) or {}).get("steps", {})
    done = [s for s in steps if st.get(s, {}).get("state") == "done"]
    txt = f"notebooks {len(done)} of {len(steps)} done"
    running = []
    for s in steps:
        if st.get(s, {}).get("state") != "running":
            continue
        log = run.root / "logs" / f"{s}.log"
        count = ""
        try:
            recent = now - log.stat().st_mtime <= RECENT_S
        except OSError:
            recent = False
        if recent:
            for ln in reversed(_tail(log, 8192)):
                m = COUNT_LINE.match(ln)
                if m:
                    count = f" [{m['i']}/{m['n']}]"
                    break
        running.append(s + count)
    if running:
        txt += "; running " + ", ".join(running)
    parts.append(txt)
    t = time.strftime("%H:%M", time.localtime(now))
    return f"progress {t} ({_fmt_min(now - started)}): " + "; ".join(parts)


#: Seconds between two progress lines (``CELLSTUDY_PROGRESS_S``; 0 turns them off).
INTERVAL_ENV = "CELLSTUDY_PROGRESS_S"
DEFAULT_INTERVAL_S = 60.0


def interval_from_env() -> float:
    """``$CELLSTUDY_PROGRESS_S`` as seconds (default 60; 0: no progress lines); ValueError naming
    the variable for anything else than a number >= 0."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}; expected seconds between progress lines (a number >= 0; 0: none)")
    return v


def for_plan(run_dir: str | Path, plan, cfg, workers: int, echo: Callable[[str], None] = print) -> "Monitor":
    """The :class:`Monitor` of a study config's run: ``plan`` (``workflow.make_plan``) gives the
    (network, fold) pairs and notebooks, ``cfg``'s scale the long regime's epochs; the interval
    from :func:`interval_from_env`."""
    from cellstudy import config

    sc = config.get_scale(cfg.scale, cfg.overrides)
    # a long regime that goes on to the plateau: its cap (a running fold's ETA is then up to the
    # cap, bounded by its network's finished folds: running_left_s; the networks not started yet
    # scale with the epochs the finished folds took, through the machine factor, in which the cap
    # cancels)
    epochs = config.plateau_cap(sc) or int(sc["epochs_long"])
    return Monitor(run_dir, plan.train, plan.steps, epochs, workers, interval=interval_from_env(), echo=echo)


class Monitor:
    """``with Monitor(...):`` prints :func:`status_line` every ``interval`` seconds (first after
    one interval) from a daemon thread until the block ends. A line that cannot be made (a file
    read as it is written) is skipped, never raised: progress never stops the work."""

    def __init__(self, run_dir: str | Path, train: Sequence[tuple[str, int]], steps: Sequence[str], epochs: int,
                 workers: int, interval: float = 60.0, echo: Callable[[str], None] = print):
        self.args = (Path(run_dir), list(train), list(steps), int(epochs), int(workers))
        self.interval, self.echo = float(interval), echo
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                line = status_line(*self.args, started=self.started)
            except Exception:   # noqa: BLE001  (a half-written file: the next minute reads it)
                continue
            self.echo(line)

    def __enter__(self) -> "Monitor":
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="cellstudy-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
