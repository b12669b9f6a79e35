"""Build the study's book (Jupyter Book 1.x, Sphinx) from a run's executed notebooks.

The book is assembled in ``<run>/book/``: the static pages of ``book/`` (introduction, ...), the
executed notebooks (rendered with execution off, so they show what papermill stored), a
generated provenance page and table of contents, and MathJax served from the book itself (no
CDN). The build treats warnings as errors and keeps going so every problem is reported at once;
its log is kept in ``<run>/book/build.log``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from . import config

BOOK_TEMPLATE_DIR = config.REPO_ROOT / "book"
MATHJAX_DIR = config.REPO_ROOT / "node_modules" / "mathjax" / "es5"

#: Static pages placed before / after the notebooks (only those present in book/ are used).
PAGES_BEFORE = ["intro"]
PAGES_AFTER = ["reproducibility", "scaling"]


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


def _copy_mathjax(dest: Path) -> None:
    """Copy the parts of MathJax 3 the pages need (tex-chtml + its fonts) into the book."""
    if not (MATHJAX_DIR / "tex-chtml.js").is_file():
        raise BookError(f"MathJax is missing at {MATHJAX_DIR}; run `npm install` (make does) first")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(MATHJAX_DIR / "tex-chtml.js", dest / "tex-chtml.js")
    for sub in ("output/chtml/fonts", "input/tex/extensions"):
        if (MATHJAX_DIR / sub).is_dir():
            shutil.copytree(MATHJAX_DIR / sub, dest / sub, dirs_exist_ok=True)


def provenance_page(run_dir: Path) -> str:
    """Markdown for the provenance chapter, from provenance.json and status.json."""
    prov = json.loads((run_dir / "provenance.json").read_text())
    status = json.loads((run_dir / "status.json").read_text())
    cfg = prov["config"]
    lines = [
        "# Provenance",
        "",
        "Everything needed to trace this book back to its inputs. The same facts are stored in "
        "`provenance.json` and `status.json` in the run folder.",
        "",
        "## The run",
        "",
        f"- Run folder: `{run_dir.name}`",
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
        lines.append(f"| all notebooks | | {status['notebooks_seconds']} |")
    hw = prov["hardware"]
    lines += ["", "## Hardware", "", "| item | value |", "|---|---|"]
    for k, v in hw.items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Package versions", "", "| package | version |", "|---|---|"]
    for k, v in prov["packages"].items():
        lines.append(f"| {k} | {v} |")
    lines += ["", f"All {len(prov.get('all_packages', {}))} installed packages are listed in `provenance.json`.", ""]
    return "\n".join(lines)


def assemble(run_dir: Path, cfg: Any) -> Path:
    """Lay out ``<run>/book/`` (sources only); returns its path."""
    run_dir = Path(run_dir)
    book = run_dir / "book"
    if book.exists():
        shutil.rmtree(book)  # the book is derived from the run's files; rebuilt each time
    book.mkdir()
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
        src = run_dir / "notebooks" / f"{step}.ipynb"
        if not src.is_file():
            raise BookError(f"executed notebook {src} is missing; the run is incomplete")
        shutil.copy2(src, book / f"{step}.ipynb")
        chapters.append(step)
    (book / "provenance.md").write_text(provenance_page(run_dir))

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


def build_book(run_dir: Path, cfg: Any, echo: Callable[[str], None] = print) -> Path:
    """Assemble and build the book; returns the path of ``index.html``. Raises BookError with
    the warnings when the build is not clean."""
    book = assemble(Path(run_dir), cfg)
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
