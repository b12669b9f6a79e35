"""Check a built book as a reader would: open every chapter in headless Chromium.

``check_book(html_dir, out_dir)`` opens each chapter page of a built Jupyter Book with Debian's
``chromium`` (headless, no network, a throw-away profile) in a 1280 px wide window, lets the page's
scripts run for a fixed virtual time (``--virtual-time-budget``) and inspects the rendered DOM
(``--dump-dom``). Chromium opens a copy of the page beside it (``.cellstudy-check-<page>``, removed
afterwards) with one small script added (:data:`CHECK_SCRIPT`) that measures the laid-out page
and writes what it found into an attribute of ``<html>``, which the dumped DOM carries back. Per
page it asserts what a reader sees:

* layout: the main column (``article.bd-article``, else ``<main>``, else ``<body>``) does not
  overflow horizontally (its ``scrollWidth`` is not wider than its ``clientWidth``) and the page
  has no horizontal scroll; the elements that stick out are named;
* figures: every ``<img>`` of the page is in the rendered DOM, loaded (``naturalWidth`` > 0), its
  file exists, and the image is not a single colour (decoded with Pillow: every pixel the same);
* equations: every display/inline math element of the page was typeset by MathJax (the DOM holds
  at least as many ``<mjx-container>`` elements as the page has math elements, and MathJax left no
  ``merror`` element);
* no error outputs: no notebook traceback / error output, no Python traceback text
  (``Traceback (most recent call last)``).

Every failed assertion is a problem naming the page and what failed (``BookCheck.problems``);
the runner fails the study on any. It saves a screenshot of each page (``--screenshot``) as
``<out_dir>/<page>.png``. Chromium is found as ``$CHROMIUM``, ``chromium``, ``chromium-browser`` or
``google-chrome`` on the PATH; when none is there the report says so (``report.skipped``) instead
of failing, unless ``require=True``. Install on Debian / Ubuntu with
``apt-get install -y --no-install-recommends chromium``.
"""
from __future__ import annotations

import html as html_mod
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

__all__ = ["BrowserUnavailable", "PageCheck", "BookCheck", "find_chromium", "chromium_flags", "dump_dom",
           "screenshot", "check_page", "check_book", "chapter_pages", "image_is_constant", "WINDOW"]

#: Flags for every Chromium call: headless, no GPU, no network services, no first-run UI.
BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--hide-scrollbars", "--mute-audio")
#: The findings page (cellstudy.report.findings), whose numbers the check compares with the run's CSVs.
FINDINGS_PAGE = "findings.html"
#: Pages of a Jupyter Book build that are not chapters.
NON_CHAPTER_PAGES = ("genindex.html", "search.html", "py-modindex.html")
#: Markers of an error output in a rendered notebook (MyST-NB / nbsphinx classes, Python tracebacks).
ERROR_MARKERS = ("output traceback", "output error", "Traceback (most recent call last)",
                 'class="ansi-red-fg">---------------------------------------------------------------------------')
#: The reader's window: 1280 px wide (the layout check's width), 1600 px tall (the screenshot).
WINDOW = (1280, 1600)
#: Overflow up to this many CSS pixels is rounding, not a problem.
OVERFLOW_TOLERANCE_PX = 1
#: The attribute of <html> the check script writes its measurements into.
CHECK_ATTR = "data-cellstudy-check"

#: Added to a copy of each page: measures the laid-out page once it has loaded, and again every
#: 500 ms of (virtual) time, so the last measurement is after MathJax and the images settled.
CHECK_SCRIPT = r"""<script>(function () {
  function describe(el) {
    var d = el.tagName.toLowerCase();
    if (el.id) d += "#" + el.id;
    if (typeof el.className === "string" && el.className.trim())
      d += "." + el.className.trim().split(/\s+/).slice(0, 3).join(".");
    return d;
  }
  function scroller(el, column) {   // the scroll container below the column that holds el, or null (a reader
    for (var a = el.parentElement; a && a !== column; a = a.parentElement) {   // can scroll to el; "hidden" would cut it off)
      var o = getComputedStyle(a).overflowX;
      if (o === "auto" || o === "scroll") return a;
    }
    return null;
  }
  function check() {
    var column = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    var r = {column: describe(column), scrollWidth: column.scrollWidth, clientWidth: column.clientWidth,
             pageScrollWidth: document.documentElement.scrollWidth, viewportWidth: window.innerWidth,
             offenders: [], images: []};
    var right = column.getBoundingClientRect().right;
    var els = column.querySelectorAll("*");
    for (var i = 0; i < els.length && r.offenders.length < 5; i++) {
      var el = els[i], b = el.getBoundingClientRect();
      if (b.width > 0 && b.right > right + 1 && !scroller(el, column)) {
        var inside = false;   // name the outermost element only
        for (var j = 0; j < r.offenders.length; j++) if (r.offenders[j].el.contains(el)) inside = true;
        if (!inside) r.offenders.push({el: el, what: describe(el), px: Math.round(b.right - right)});
      }
    }
    r.offenders = r.offenders.map(function (o) { return o.what + " (" + o.px + " px past the column)"; });
    r.wide_tables = [];   // tables a reader has to scroll sideways (not a problem: a fact to report)
    var tables = column.querySelectorAll("table");
    for (var t = 0; t < tables.length; t++) {
      var c = scroller(tables[t], column);
      if (c && c.scrollWidth > c.clientWidth + 1) {
        var heads = Array.prototype.slice.call(tables[t].querySelectorAll("th"))
          .map(function (h) { return h.textContent.trim(); }).filter(function (x) { return x; }).slice(0, 4);
        r.wide_tables.push({head: heads.join(" | "), px: c.scrollWidth - c.clientWidth});
      }
    }
    var imgs = document.images;
    for (var k = 0; k < imgs.length; k++)
      r.images.push({src: imgs[k].getAttribute("src"), complete: imgs[k].complete, naturalWidth: imgs[k].naturalWidth});
    document.documentElement.setAttribute("data-cellstudy-check", JSON.stringify(r));
  }
  window.addEventListener("load", function () { check(); setInterval(check, 500); });
})();</script>"""


class BrowserUnavailable(RuntimeError):
    """No Chromium executable was found (the message says how to install one)."""


@dataclass
class PageCheck:
    """What one page showed in the browser."""

    page: str
    images: int = 0                 # <img> elements in the rendered DOM
    math_expected: int = 0          # math elements in the page's HTML
    math_typeset: int = 0           # <mjx-container> elements after MathJax ran
    layout: dict | None = None      # what the check script measured (column and page widths, images)
    screenshot: Path | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def wide_tables(self) -> list[str]:
        """The page's tables wider than the text column (a reader scrolls them sideways; not a
        problem): ``"<first header cells> (<px> px more)"`` each."""
        return [f"{t['head'] or 'table'} ({t['px']} px more)" for t in (self.layout or {}).get("wide_tables", [])]


@dataclass
class BookCheck:
    """The result of :func:`check_book`: ``ok`` is True / False, or None when ``skipped``."""

    html_dir: Path
    pages: list[PageCheck] = field(default_factory=list)
    skipped: str | None = None
    chromium: str | None = None

    @property
    def ok(self) -> bool | None:
        if self.skipped:
            return None
        return bool(self.pages) and all(p.ok for p in self.pages)

    @property
    def problems(self) -> list[str]:
        return [f"{p.page}: {msg}" for p in self.pages for msg in p.problems]

    @property
    def screenshots(self) -> list[Path]:
        return [p.screenshot for p in self.pages if p.screenshot is not None]

    def summary(self) -> str:
        if self.skipped:
            return f"browser check skipped: {self.skipped}"
        lines = [f"browser check of {len(self.pages)} page(s) in {self.html_dir} with {self.chromium}: "
                 + ("OK" if self.ok else f"{len(self.problems)} problem(s)")]
        for p in self.pages:
            width = "" if not p.layout else f", column {p.layout['scrollWidth']}/{p.layout['clientWidth']} px"
            if p.wide_tables:
                width += f", {len(p.wide_tables)} table(s) scroll sideways"
            lines.append(f"  {p.page}: {p.images} figure(s), {p.math_typeset}/{p.math_expected} equation(s) "
                         f"typeset{width}{'' if p.ok else ' -- ' + '; '.join(p.problems)}")
        return "\n".join(lines)


def find_chromium() -> str | None:
    """Path of a Chromium executable: ``$CHROMIUM`` if set, else the first of ``chromium``,
    ``chromium-browser``, ``google-chrome`` on the PATH, else None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if (Path(env).is_file() or shutil.which(env)) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def chromium_flags(user_data_dir: str | os.PathLike, window: tuple[int, int] = WINDOW,
                   budget_ms: int = 10000) -> list[str]:
    """The command-line flags of one headless call (a fresh profile in ``user_data_dir``)."""
    return [*BASE_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={int(budget_ms)}"]


def _run(chromium: str, args: list[str], timeout: float,
         window: tuple[int, int] = WINDOW) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="cellstudy-chromium-") as profile:
        cmd = [chromium, *chromium_flags(profile, window), *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"chromium did not finish within {timeout} s: {' '.join(cmd)}") from e


def dump_dom(url: str, chromium: str | None = None, timeout: float = 120,
             screenshot_path: str | os.PathLike | None = None, window: tuple[int, int] = WINDOW) -> str:
    """The DOM of ``url`` after its scripts ran for 10 s of virtual time (``--dump-dom``).

    With ``screenshot_path`` the same Chromium call also saves a PNG screenshot there (one
    browser start per page instead of two: 2.8 s instead of 4.4 s for a chapter of the book)."""
    chromium = chromium or _require()
    args = ["--dump-dom", url]
    if screenshot_path is not None:
        shot = Path(screenshot_path).resolve()
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.unlink(missing_ok=True)
        args.insert(0, f"--screenshot={shot}")
    r = _run(chromium, args, timeout, window)
    if r.returncode != 0 or "<html" not in r.stdout.lower():
        raise RuntimeError(f"chromium --dump-dom {url} failed (exit {r.returncode}): {r.stderr[-500:]}")
    if screenshot_path is not None and (not shot.is_file() or shot.stat().st_size == 0):
        raise RuntimeError(f"chromium --screenshot of {url} failed (exit {r.returncode}): {r.stderr[-500:]}")
    return r.stdout


def screenshot(url: str, path: str | os.PathLike, chromium: str | None = None, timeout: float = 120) -> Path:
    """Save a PNG screenshot of ``url`` at ``path`` (``--screenshot``); returns the path."""
    chromium = chromium or _require()
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    r = _run(chromium, [f"--screenshot={path}", url], timeout)
    if r.returncode != 0 or not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"chromium --screenshot of {url} failed (exit {r.returncode}): {r.stderr[-500:]}")
    return path


def _require() -> str:
    c = find_chromium()
    if c is None:
        raise BrowserUnavailable(
            "no Chromium found (looked for $CHROMIUM, chromium, chromium-browser, google-chrome); install it "
            "with `apt-get install -y --no-install-recommends chromium` (Debian / Ubuntu)")
    return c


def chapter_pages(html_dir: str | os.PathLike) -> list[Path]:
    """The chapter pages of a built book: the top-level ``*.html`` files except the index,
    search and module-index pages (``index.html`` is a redirect to the first chapter)."""
    html_dir = Path(html_dir)
    return sorted(p for p in html_dir.glob("*.html")
                  if p.name not in NON_CHAPTER_PAGES + ("index.html",) and not p.name.startswith("."))


_IMG_RE = re.compile(r"<img\b[^>]*?\bsrc=\"([^\"]+)\"", re.I)
# math elements as Sphinx writes them for MathJax: <div class="math ..."> / <span class="math ...">
_MATH_RE = re.compile(r"<(?:div|span)\b[^>]*\bclass=\"(?:[^\"]*\s)?math(?:\s[^\"]*)?\"", re.I)


def image_is_constant(path: str | os.PathLike) -> bool | None:
    """Whether the image file at ``path`` is a single colour (every pixel the same value in every
    band, after conversion to RGBA); None when Pillow cannot read it (e.g. SVG)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            ext = im.convert("RGBA").getextrema()
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return all(lo == hi for lo, hi in ext)


_CHECK_ATTR_RE = re.compile(CHECK_ATTR + r'="([^"]*)"')


def _with_check_script(raw: str) -> str:
    """The page's HTML with :data:`CHECK_SCRIPT` added before ``</body>`` (or at the end)."""
    i = raw.lower().rfind("</body>")
    return raw + CHECK_SCRIPT if i < 0 else raw[:i] + CHECK_SCRIPT + raw[i:]


def _layout(dom: str) -> dict | None:
    m = _CHECK_ATTR_RE.search(dom)
    if not m:
        return None
    try:
        return json.loads(html_mod.unescape(m.group(1)))
    except ValueError:
        return None


def _layout_problems(layout: dict | None) -> list[str]:
    if layout is None:
        return ["the layout check did not run (the page's load event never fired within the time budget)"]
    out = []
    over = layout["scrollWidth"] - layout["clientWidth"]
    page_over = layout["pageScrollWidth"] - layout["viewportWidth"]
    if over > OVERFLOW_TOLERANCE_PX or page_over > OVERFLOW_TOLERANCE_PX or layout.get("offenders"):
        what = "; ".join(layout.get("offenders") or []) or "no single element named"
        out.append(f"horizontal overflow at {layout['viewportWidth']} px: the main column {layout['column']} is "
                   f"{layout['scrollWidth']} px wide inside {layout['clientWidth']} px, the page "
                   f"{layout['pageScrollWidth']} px inside {layout['viewportWidth']} px; sticking out: {what}")
    return out


def check_page(page: str | os.PathLike, out_dir: str | os.PathLike | None = None, chromium: str | None = None,
               timeout: float = 120, window: tuple[int, int] = WINDOW,
               expect: Sequence[tuple[str, str]] = ()) -> PageCheck:
    """Open one HTML page in headless Chromium and check layout, figures, equations and error
    outputs (see the module docstring); with ``out_dir`` also save ``<out_dir>/<page stem>.png``.
    ``window``: (width, height) of the window in CSS pixels (the layout is checked at its width).
    ``expect``: ``(text, what)`` pairs: each text must be in the rendered page's text (e.g. the
    findings page's numbers, recomputed from the run's CSVs), else a problem naming ``what``."""
    chromium = chromium or _require()
    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"page {page} does not exist")
    raw = page.read_text(errors="replace")
    chk = PageCheck(page=page.name)
    probe = page.with_name(f".cellstudy-check-{page.name}")   # beside the page: relative links resolve
    shot = None if out_dir is None else Path(out_dir) / f"{page.stem}.png"
    try:
        probe.write_text(_with_check_script(raw))
        dom = dump_dom(probe.as_uri(), chromium, timeout, screenshot_path=shot, window=window)
    except (RuntimeError, TimeoutError, OSError) as e:
        chk.problems.append(str(e))
        return chk
    finally:
        probe.unlink(missing_ok=True)
    chk.screenshot = None if shot is None else shot.resolve()
    # layout: the main column fits the window
    chk.layout = _layout(dom)
    chk.problems += _layout_problems(chk.layout)
    # figures: rendered, loaded, their files exist and are not one colour
    srcs = _IMG_RE.findall(dom)
    chk.images = len(srcs)
    if len(_IMG_RE.findall(raw)) > len(srcs):
        chk.problems.append(f"{len(_IMG_RE.findall(raw))} <img> in the HTML but {len(srcs)} in the rendered page")
    not_loaded = {html_mod.unescape(i["src"] or "") for i in (chk.layout or {}).get("images", [])
                  if not i.get("naturalWidth")}
    for src in srcs:
        src = html_mod.unescape(src)
        if src.startswith("data:"):
            continue
        parsed = urlparse(src)
        if parsed.scheme in ("http", "https"):
            chk.problems.append(f"figure {src} is loaded from the network")
            continue
        f = Path(unquote(parsed.path)) if parsed.scheme == "file" else (page.parent / unquote(parsed.path))
        if not f.is_file() or f.stat().st_size == 0:
            chk.problems.append(f"figure {src} is missing or empty ({f})")
            continue
        if src in not_loaded:
            chk.problems.append(f"figure {src} did not load in the browser (naturalWidth 0)")
        if image_is_constant(f):
            chk.problems.append(f"figure {src} is blank: every pixel the same colour ({f})")
    # equations: every math element typeset by MathJax
    chk.math_expected = len(_MATH_RE.findall(raw))
    chk.math_typeset = len(re.findall(r"<mjx-container\b", dom))
    if chk.math_typeset < chk.math_expected:
        chk.problems.append(f"{chk.math_expected} equation(s) in the HTML but {chk.math_typeset} typeset by MathJax "
                            "(is MathJax reachable offline?)")
    if "<mjx-merror" in dom or 'data-mjx-error' in dom:
        chk.problems.append("MathJax reported a TeX error (mjx-merror)")
    # the texts the page must show (numbers recomputed from the run's files)
    if expect:
        text = " ".join(html_mod.unescape(re.sub(r"<[^>]+>", " ", dom)).split())
        for token, what in expect:
            if token not in text:
                chk.problems.append(f"the page does not show {what}")
    # no error outputs, no Python traceback text
    for marker in ERROR_MARKERS:
        if marker in dom:
            chk.problems.append(f"an error output is shown ({marker!r})"
                                + (": a Python traceback" if "Traceback" in marker else ""))
            break
    return chk


def check_book(html_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, pages=None,
               screenshot_pages=None, require: bool = False, timeout: float = 120,
               window: tuple[int, int] = WINDOW, run_dir: str | os.PathLike | None = None) -> BookCheck:
    """Open every chapter page of a built book in headless Chromium and check it.

    html_dir: the build's ``_build/html`` folder. out_dir: where the screenshots go (e.g.
    ``<run>/screenshots``; None: no screenshots). pages: page file names to check (default
    :func:`chapter_pages`). screenshot_pages: which of them get a screenshot (default: all).
    require: raise :class:`BrowserUnavailable` when no Chromium is found; otherwise the report is
    returned with ``skipped`` set and ``ok`` None. window: (width, height) of the browser window
    (default :data:`WINDOW`, 1280 x 1600; the layout is checked at its width). run_dir: the run the
    book was built from; with it the findings page must show every number
    ``findings.findings_page`` computes from the run's CSVs now (``findings.expected_on_page``).

    Returns a :class:`BookCheck` (``ok``, ``problems``, ``screenshots``, ``summary()``).
    Raises FileNotFoundError when ``html_dir`` has no ``index.html`` or a named page is missing.
    """
    html_dir = Path(html_dir)
    if not (html_dir / "index.html").is_file():
        raise FileNotFoundError(f"{html_dir} holds no index.html; expected a built book's _build/html folder")
    report = BookCheck(html_dir=html_dir)
    chromium = find_chromium()
    if chromium is None:
        msg = ("no Chromium found (looked for $CHROMIUM, chromium, chromium-browser, google-chrome); install it "
               "with `apt-get install -y --no-install-recommends chromium`")
        if require:
            raise BrowserUnavailable(msg)
        report.skipped = msg
        return report
    report.chromium = chromium
    files = chapter_pages(html_dir) if pages is None else [html_dir / p for p in pages]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"page {f} does not exist in the built book")
    shots = None if screenshot_pages is None else set(screenshot_pages)
    for f in files:
        target = out_dir if (out_dir is not None and (shots is None or f.name in shots)) else None
        expect = ()
        if run_dir is not None and f.name == FINDINGS_PAGE:
            from cellstudy.report.findings import expected_on_page
            expect = expected_on_page(run_dir)
        report.pages.append(check_page(f, target, chromium, timeout, window, expect))
    return report
