"""Build the study's book (Jupyter Book 1.x, Sphinx) from a run's executed notebooks.

The book is assembled in ``<run>/book/`` (or another folder, ``book_dir``): the static pages of
``book/`` (introduction, ...), the executed notebooks (rendered with execution off, so they show
what papermill stored), a generated provenance page and table of contents, and MathJax served from
the book itself (no CDN). The build treats warnings as errors and keeps going so every problem is
reported at once; its log is kept in ``<book>/build.log``.

The book is a report, not a notebook dump. The executed notebooks in ``<run>/notebooks/`` stay
as papermill wrote them; the book's copies (:func:`report_notebook`) differ:

* code inputs are folded (``hide-input``: one click shows them), except cells already tagged
  ``remove-input`` / ``remove-cell`` / ``hide-cell``; the ``parameters`` cell and papermill's
  ``injected-parameters`` cell are removed (``remove-cell``): the run's actual parameters are shown
  once, as a table on the introduction page (:func:`run_parameters_markdown`);
* progress and log output (every stream output: stdout / stderr text such as training epochs) is
  dropped from the page and written to ``<run>/logs/<step>.log`` (copied into the book as a
  download), and the chapter ends with a line naming that log; a bare return value echoed by a
  bookkeeping call (a PNG's bytes, the character count of ``Path.write_text``) is dropped too;
* a figure that is a constant image (every pixel one colour, :func:`png_is_constant`) is replaced
  by a sentence saying it is blank and why.

Rich outputs (tables, figures, markdown) stay. Wide tables scroll inside their output
(``book/_static/cellstudy.css``, which Jupyter Book links from every page).
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from cellstudy import config, rundir

BOOK_TEMPLATE_DIR = config.REPO_ROOT / "book"
MATHJAX_DIR = config.REPO_ROOT / "node_modules" / "mathjax" / "es5"

#: Static pages placed before / after the notebooks (only those present in book/ are used).
PAGES_BEFORE = ["intro", "findings"]
PAGES_AFTER = ["reproducibility", "default_scale", "scaling", "glossary"]


class BookError(RuntimeError):
    """The book could not be built (the message says why and where the log is)."""


def notebook_title(nb_path: Path) -> str:
    """The first markdown heading of a notebook (its chapter title)."""
    nb = json.loads(Path(nb_path).read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return Path(nb_path).stem


def check_mathjax(or_else: str = "", error: type[Exception] = BookError) -> None:
    """``error`` (BookError) when MathJax (the offline book's formulas) is not installed: the
    runner and the workflow ask before any work, not after the study's last notebook; ``or_else``
    says how to run without the book (their option)."""
    if not (MATHJAX_DIR / "tex-chtml.js").is_file():
        raise error(f"MathJax is missing at {MATHJAX_DIR} (the book needs it offline); run `make assets` "
                    f"(npm install, in {config.REPO_ROOT}) first; `make study` does it"
                    + (f"; or {or_else}" if or_else else ""))


def _copy_mathjax(dest: Path) -> None:
    """Copy the parts of MathJax 3 the pages need (tex-chtml + its fonts) into the book."""
    check_mathjax()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(MATHJAX_DIR / "tex-chtml.js", dest / "tex-chtml.js")
    for sub in ("output/chtml/fonts", "input/tex/extensions"):
        if (MATHJAX_DIR / sub).is_dir():
            shutil.copytree(MATHJAX_DIR / sub, dest / sub, dirs_exist_ok=True)


def training_origin(run_dir: Path, started: str | None) -> list[dict]:
    """Per network with finished folds (catalogue order): ``network`` (display name), ``folds``,
    ``by this run`` / ``before this run`` (each fold's ``done.json`` ``finished`` time against the
    run's ``started``, both read as this machine's time when they carry no zone; every fold counts
    as this run's when either is missing), ``epochs`` ("11-13") and ``core_min`` (the folds'
    ``seconds_total_this_session`` / 60)."""
    from datetime import datetime

    from cellstudy import networks

    def when(text):
        try:
            t = datetime.fromisoformat(str(text))
        except (TypeError, ValueError):
            return None
        return t if t.tzinfo else t.astimezone()

    t0 = when(started)
    run = rundir.Run(run_dir)
    rows = []
    for net in networks.NETWORK_NAMES:
        done = []
        for fd in run.folds(net):
            if fd.done.is_file():
                try:
                    done.append(fd.read_done())
                except (OSError, ValueError):
                    continue
        if not done:
            continue
        fin = [when(d.get("finished")) for d in done]
        before = sum(1 for f in fin if t0 is not None and f is not None and f < t0)
        ep = [int(d["epochs_trained"]) if d.get("epochs_trained") is not None else int(d.get("epochs_long", 0))
              for d in done]
        secs = sum(float((d.get("timings") or {}).get("seconds_total_this_session") or 0.0) for d in done)
        rows.append({"network": networks.display(net), "folds": len(done), "by this run": len(done) - before,
                     "before this run": before,
                     "epochs": f"{min(ep)}-{max(ep)}" if min(ep) != max(ep) else str(ep[0]),
                     "core_min": secs / 60.0})
    return rows


def provenance_page(run_dir: Path) -> str:
    """Markdown for the provenance chapter, from provenance.json and status.json."""
    run = rundir.Run(run_dir)
    prov = json.loads(run.provenance.read_text())
    status = json.loads(run.status.read_text())
    cfg = prov["config"]
    lines = [
        "# Provenance",
        "",
        "Everything needed to trace this book back to its inputs. The same facts are stored in "
        "`provenance.json` and `status.json` in the run folder.",
        "",
        "## The run",
        "",
        f"- Run folder: `{Path(run_dir).resolve().name}`",
        f"- Study config: `{Path(prov['config_file']).name}` (name `{cfg['name']}`, cohort `{cfg['cohort']}`, "
        f"scale `{cfg['scale']}`, seed {cfg['seed']})",
        f"- Started: {prov.get('started')}",
        f"- Code: git commit `{prov['git'].get('commit')}`" + (" (with uncommitted changes)" if prov['git'].get('dirty') else ""),
        "",
        "## Scale parameters",
        "",
        "```yaml",
        yaml.safe_dump(prov["scale_parameters"], sort_keys=True).rstrip(),
        "```",
        "",
        "## Data",
        "",
        "| item | value |",
        "|---|---|",
    ]
    for k, v in prov["data"].items():
        lines.append(f"| {k} | `{v}` |")
    lines += ["", "## Timings", "", "| step | state | seconds |", "|---|---|---|"]
    for step, st in status.get("steps", {}).items():
        lines.append(f"| {step} | {st.get('state')} | {st.get('seconds', '')} |")
    if "notebooks_seconds" in status:
        lines.append(f"| the last `cellstudy run` command: every step, the training jobs included (wall clock) | | "
                     f"{status['notebooks_seconds']} |")
    origin = training_origin(run_dir, status.get("started"))
    if origin:
        earlier = sum(r["before this run"] for r in origin)
        lines += ["", "## Training", "",
                  "The family chapters' times above leave out the training jobs, which ran beside them. Per network: "
                  "its folds, how many of them finished after this run folder was made (by its commands, a resumed "
                  "one included) and how many before it (copied in from elsewhere: they are read back, not "
                  "retrained), the epochs of the long regime and the training time (each fold's job minutes from "
                  "its `done.json`; core-minutes at the default of one TensorFlow thread a job)."
                  + (f" **{earlier} fold(s) finished before this run folder was made.**" if earlier else ""), "",
                  "| network | folds | trained in this run folder | finished before it | epochs | training minutes |",
                  "|---|---|---|---|---|---|"]
        for r in origin:
            lines.append(f"| {r['network']} | {r['folds']} | {r['by this run']} | {r['before this run']} | "
                         f"{r['epochs']} | {r['core_min']:.1f} |")
    hw = prov["hardware"]
    lines += ["", "## Hardware", "", "| item | value |", "|---|---|"]
    for k, v in hw.items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Package versions", "", "| package | version |", "|---|---|"]
    for k, v in prov["packages"].items():
        lines.append(f"| {k} | {v} |")
    lines += ["", f"All {len(prov.get('all_packages', {}))} installed packages are listed in `provenance.json`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The book's copies of the notebooks: a report, not a notebook dump
# ---------------------------------------------------------------------------------------------
#: Tags after which a code cell's input is not shown anyway (it gets no ``hide-input``).
INPUT_HIDDEN_TAGS = frozenset({"remove-input", "remove-cell", "hide-input", "hide-cell"})
#: Tags of the cells removed from the page: the notebook's defaults and papermill's injection.
PARAMETER_TAGS = frozenset({"parameters", "injected-parameters"})
#: The folder of the run (and of the book) that holds each chapter's log output.
LOG_DIR = "logs"

_BYTES_REPR = re.compile(r"^b(['\"])")
_WRITE_CALL = re.compile(r"\.write_(?:text|bytes)\(.*\)\s*$")


def png_is_constant(png: bytes) -> tuple[bool, str, tuple[int, int]]:
    """Whether a PNG (or any image Pillow reads) is one colour: every pixel the same value in
    every band (RGBA after conversion). Returns ``(constant, colour, (width, height))``, colour as
    ``#rrggbb`` (``#rrggbbaa`` when not opaque). Raises ValueError when the bytes are not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(png)) as im:
            size = im.size
            rgba = im.convert("RGBA")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a readable image ({len(png)} bytes): {e}") from None
    ext = rgba.getextrema()
    constant = all(lo == hi for lo, hi in ext)
    lows = [lo for lo, _ in ext]
    colour = "#" + "".join(f"{v:02x}" for v in (lows[:3] if lows[3] == 255 else lows))
    return constant, colour, size


def blank_figure_note(colour: str, size: tuple[int, int]) -> str:
    """The sentence shown instead of a constant figure."""
    return (f"*This figure is not shown: it is blank, all {size[0]} x {size[1]} pixels of it the same colour "
            f"({colour}).* A figure comes out blank when every value it draws is the same, for example "
            "explanation maps that are all zero or computed on a 1 x 1 feature map, so it would show nothing. "
            "The cell's code (click to show it) says what it plots, and the run folder keeps the image.")


def _decode_png(data: Any) -> bytes:
    import base64

    text = "".join(data) if isinstance(data, list) else str(data)
    return base64.b64decode(text)


def _is_bookkeeping_result(cell: dict, out: dict) -> bool:
    """A plain-text return value nobody meant to show: a bytes literal (``figures.show(...)``
    without the trailing ``;`` echoes the PNG's bytes) or the number a final
    ``Path.write_text(...)`` / ``write_bytes(...)`` returns."""
    if out.get("output_type") != "execute_result" or set(out.get("data", {})) != {"text/plain"}:
        return False
    text = "".join(out["data"]["text/plain"]).strip()
    if _BYTES_REPR.match(text):
        return True
    lines = [ln for ln in "".join(cell.get("source", "")).strip().splitlines() if ln.strip()]
    return bool(lines) and text.isdigit() and bool(_WRITE_CALL.search(lines[-1]))


def _first_line(cell: dict) -> str:
    for ln in "".join(cell.get("source", "")).splitlines():
        if ln.strip():
            return ln.strip()[:80]
    return ""


def report_notebook(nb: dict, step: str) -> tuple[dict, str, dict[str, int]]:
    """The book's copy of an executed notebook (the module docstring lists what changes); ``nb``
    is the notebook as a JSON dict and is not modified.

    Returns ``(book_nb, log_text, counts)``: ``log_text`` holds every stream output, each under a
    header naming its cell (empty when there was none); ``counts`` has ``streams`` (stream outputs
    removed), ``log_lines``, ``blank_figures`` (replaced), ``bookkeeping`` (return values
    dropped), ``folded`` (code inputs folded) and ``removed`` (parameter cells removed).
    """
    import copy

    nb = copy.deepcopy(nb)
    counts = {"streams": 0, "log_lines": 0, "blank_figures": 0, "bookkeeping": 0, "folded": 0, "removed": 0}
    log: list[str] = []
    code_i = 0
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        code_i += 1
        meta = cell.setdefault("metadata", {})
        tags = list(meta.get("tags", []))
        if PARAMETER_TAGS & set(tags) and "remove-cell" not in tags:
            tags.append("remove-cell")
            counts["removed"] += 1
        if not INPUT_HIDDEN_TAGS & set(tags):
            tags.append("hide-input")
            counts["folded"] += 1
        meta["tags"] = tags
        kept, cell_log = [], []
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "stream":
                counts["streams"] += 1
                text = "".join(out.get("text", ""))
                cell_log.append(text if out.get("name") != "stderr" else
                                "".join(f"[stderr] {ln}\n" for ln in text.splitlines()))
                continue
            if _is_bookkeeping_result(cell, out):
                counts["bookkeeping"] += 1
                continue
            data = out.get("data", {})
            if kind in ("display_data", "execute_result") and "image/png" in data:
                try:
                    constant, colour, size = png_is_constant(_decode_png(data["image/png"]))
                except ValueError:
                    constant = False
                if constant:
                    counts["blank_figures"] += 1
                    out = {"output_type": "display_data", "metadata": {},
                           "data": {"text/markdown": blank_figure_note(colour, size),
                                    "text/plain": f"<blank figure: {size[0]} x {size[1]}, {colour}>"}}
            kept.append(out)
        cell["outputs"] = kept
        if cell_log:
            text = "".join(cell_log)
            log.append(f"--- cell {i} (code cell {code_i}: {_first_line(cell)}) ---\n" + text
                       + ("" if text.endswith("\n") else "\n"))
    log_text = "".join(log)
    counts["log_lines"] = len(log_text.splitlines()) - len(log)
    if log_text:
        nb["cells"].append({
            "cell_type": "markdown", "metadata": {"tags": ["cellstudy-log-note"]},
            "source": (":::{container} cellstudy-log-note\n"
                       f"*Log.* This chapter's progress output ({counts['log_lines']} line(s): what ran and "
                       "how long it took) is not shown on the page. It is in the run "
                       f"folder as `{LOG_DIR}/{step}.log`, and here: [{step}.log]({LOG_DIR}/{step}.log).\n"
                       ":::"),
        })
    return nb, log_text, counts


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) if v else "none"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _epochs(sc: dict) -> str:
    short, long_ = sc.get("epochs_short"), sc.get("epochs_long")
    most = config.plateau_cap(sc)
    if isinstance(short, int) and isinstance(long_, int) and long_ >= short and most is not None:
        return (f"{short} + {long_ - short} to {most - short} (the short regime's model after {short}; the long "
                f"regime goes on to the training plateau, at least {long_} and at most {most} epochs in all)")
    if isinstance(short, int) and isinstance(long_, int) and long_ >= short:
        return f"{short} + {long_ - short} (the short regime's model after {short}, the long regime's after {long_})"
    return f"short {_fmt(short)}, long {_fmt(long_)}"


def run_parameters_markdown(run_dir: Path) -> str:
    """Markdown: the run's actual parameters as one small table (cohort, scale, seed, overrides,
    the resolved scale's key numbers, git commit, date), from ``provenance.json`` (the config the
    runner used, as in ``study.yaml``, and the scale it resolved)."""
    prov = json.loads(rundir.Run(run_dir).provenance.read_text())
    cfg = prov["config"]
    sc = prov.get("scale_parameters", {})
    git = prov.get("git", {})
    data = prov.get("data", {})
    commit = git.get("commit") or "unknown"
    nets = sc.get("networks")
    folds = sc.get("folds_to_run")
    n_splits = sc.get("n_splits")
    bn = sc.get("bn_momentum")
    he = [n for n in (sc.get("he_init") or []) if not nets or n in nets]   # only networks this run trains
    rows = [
        ("cohort", f"`{cfg.get('cohort')}`" + (f", {data['n_cells']} cells" if "n_cells" in data else "")),
        ("scale", f"`{cfg.get('scale')}`"),
        ("seed", _fmt(cfg.get("seed"))),
        ("overrides", "none" if not cfg.get("overrides") else f"`{json.dumps(cfg['overrides'], sort_keys=True)}`"),
        ("image size S", f"{_fmt(sc.get('image_size'))} px"),
        ("networks, folds", ("all eleven" if not nets else _fmt(nets)) + "; "
         + (f"all {n_splits} folds" if folds is None else f"folds {_fmt(folds)} of {n_splits}")),
        ("training", (f"SGD, learning rate {config.rate_text(sc)}" if "learning_rate" in sc else "SGD")
         + f", momentum {_fmt(sc.get('momentum'))}, "
         f"batch {_fmt(sc.get('batch_size'))}; epochs {_epochs(sc)}"),
        ("initial weights", "random" + (f"; He-normal convolutions for {_fmt(he)}" if he else "")
         + f"; BatchNorm momentum {'0.99 (Keras default)' if bn is None else _fmt(bn)}"),
        ("explanations", "every test cell" if sc.get("xai_max_cells") is None
         else f"up to {sc['xai_max_cells']} test cells per fold"),
    ]
    extra = cfg.get("notebook_parameters") or {}
    if extra:
        rows.append(("per-notebook parameters", "; ".join(f"{s}: `{json.dumps(v, sort_keys=True)}`" for s, v in extra.items())))
    rows += [
        ("run", f"`{Path(run_dir).resolve().name}` (config `{Path(prov.get('config_file', '?')).name}`, "
         f"{_fmt(cfg.get('workers', 1))} notebook(s) at once), started {_fmt(prov.get('started'))}"),
        ("code", f"git commit `{commit[:12]}`" + (" with uncommitted changes" if git.get("dirty") else "")),
    ]
    lines = [
        "## This run",
        "",
        "The parameters this book's notebooks ran with (the runner injected them; the notebooks' own "
        "`parameters` cells hold defaults). Every scale number, package version and data checksum is "
        "on the [provenance page](provenance.md).",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def write_report_notebook(src: Path, dest: Path, run_dir: Path, step: str) -> dict[str, int]:
    """Write the book's copy of the executed notebook ``src`` at ``dest`` (:func:`report_notebook`)
    and its log output to ``<run>/logs/<step>.log`` and ``<book>/logs/<step>.log``. Returns the counts."""
    nb = json.loads(Path(src).read_text())
    book_nb, log_text, counts = report_notebook(nb, step)
    Path(dest).write_text(json.dumps(book_nb, indent=1, ensure_ascii=False) + "\n")
    # every chapter has its log (the README says so), one that printed nothing says that
    header = (f"# {step}: the progress / log output of the executed notebook {Path(src).name}, "
              "taken out of the book's page by cellstudy.report.book\n")
    body = log_text or ("(this chapter printed no progress or log output: everything it wrote is on its "
                        "book page)\n")
    for folder in (Path(run_dir) / LOG_DIR, Path(dest).parent / LOG_DIR):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{step}.log").write_text(header + body)
    return counts


def assemble(run_dir: Path, cfg: Any, book_dir: Path | None = None) -> Path:
    """Lay out the book's sources in ``book_dir`` (default ``<run>/book/``; replaced if it exists);
    returns its path. Writes each chapter's log output to ``<run>/logs/<step>.log``."""
    run_dir = Path(run_dir)
    run = rundir.Run(run_dir)
    book = Path(book_dir) if book_dir is not None else run.book
    if book.exists():
        shutil.rmtree(book)  # the book is derived from the run's files; rebuilt each time
    book.mkdir(parents=True)
    for p in BOOK_TEMPLATE_DIR.iterdir():
        if p.name.startswith("_build") or p.name == "_toc.yml":
            continue
        if p.is_dir():
            shutil.copytree(p, book / p.name)
        else:
            shutil.copy2(p, book / p.name)
    _copy_mathjax(book / "_mathjax" / "mathjax")
    (book / "_static").mkdir(exist_ok=True)

    chapters = []
    for step in cfg.steps:
        src = run.executed(step)
        if not src.is_file():
            raise BookError(f"executed notebook {src} is missing; the run is incomplete")
        write_report_notebook(src, book / f"{step}.ipynb", run_dir, step)
        chapters.append(step)
    (book / "provenance.md").write_text(provenance_page(run_dir))
    if (run.step("07_results", create=False) / "verdicts_long.csv").is_file():
        from cellstudy.report import findings  # the findings page, written from the run's own CSVs
        findings.write_findings_page(run_dir, book)
    intro = book / f"{PAGES_BEFORE[0]}.md"
    if intro.is_file() and run.provenance.is_file():
        intro.write_text(intro.read_text().rstrip("\n") + "\n\n" + run_parameters_markdown(run_dir))

    with open(book / "_config.yml") as fh:
        conf = yaml.safe_load(fh)
    conf["title"] = f"{getattr(cfg, 'title', 'cellstudy')}: {cfg.name} run ({cfg.cohort}, scale {cfg.scale})"
    with open(book / "_config.yml", "w") as fh:
        yaml.safe_dump(conf, fh, sort_keys=False)

    before = [p for p in PAGES_BEFORE if (book / f"{p}.md").is_file()]
    after = [p for p in PAGES_AFTER if (book / f"{p}.md").is_file()]
    toc = {
        "format": "jb-book",
        "root": before[0] if before else chapters[0],
        "chapters": [{"file": f} for f in before[1:] + chapters + after + ["provenance"]],
    }
    with open(book / "_toc.yml", "w") as fh:
        yaml.safe_dump(toc, fh, sort_keys=False)
    return book


def build_book(run_dir: Path, cfg: Any, echo: Callable[[str], None] = print, book_dir: Path | None = None) -> Path:
    """Assemble (:func:`assemble`, into ``book_dir``, default ``<run>/book``) and build the book;
    returns the path of ``index.html``. Raises BookError with the warnings when the build is not
    clean."""
    book = assemble(Path(run_dir), cfg, book_dir)
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(book), "--warningiserror", "--keep-going",
           "--builder", "html"]
    echo("building the book ...")
    env = dict(os.environ)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (book / "build.log").write_text(r.stdout + "\n" + r.stderr)
    index = book / "_build" / "html" / "index.html"
    if r.returncode != 0 or not index.is_file():
        warn = [ln for ln in (r.stdout + r.stderr).splitlines() if "WARNING" in ln or "ERROR" in ln]
        raise BookError(
            f"the book build failed (exit {r.returncode}); log: {book / 'build.log'}\n" + "\n".join(warn[:20])
        )
    return index
