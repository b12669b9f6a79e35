"""The book as a reader sees it: every chapter opened in headless Chromium (cellstudy.report.browser).

Needs Debian's `chromium` (`apt-get install -y --no-install-recommends chromium`). Without it the
tests skip with that reason, except under CI=true, where a missing browser is a failure.
"""
import os
import shutil
import struct

import pytest

from cellstudy.report import browser
from cellstudy import config, runner

MATHJAX = config.REPO_ROOT / "node_modules" / "mathjax" / "es5"


def _need_chromium():
    if browser.find_chromium() is None:
        msg = ("chromium is not installed (apt-get install -y --no-install-recommends chromium); "
               "the browser check cannot run")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " -- CI=true requires it")
        pytest.skip(msg)


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ---------------------------------------------------------------------------------------------
# the checker itself, on hand-made pages (fast): it must pass a good page and catch bad ones
# ---------------------------------------------------------------------------------------------
_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
{head}</head><body><h1>{title}</h1>{body}</body></html>"""
_MJ = '<script defer src="mathjax/tex-chtml.js"></script>'


@pytest.fixture
def handmade_book(tmp_path):
    if not (MATHJAX / "tex-chtml.js").is_file():
        pytest.skip(f"MathJax not installed at {MATHJAX} (npm install)")
    html = tmp_path / "html"
    (html / "_images").mkdir(parents=True)
    (html / "mathjax").mkdir()
    shutil.copy2(MATHJAX / "tex-chtml.js", html / "mathjax" / "tex-chtml.js")
    shutil.copytree(MATHJAX / "output" / "chtml" / "fonts", html / "mathjax" / "output" / "chtml" / "fonts")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [0, 1])
    fig.savefig(html / "_images" / "fig.png")
    (html / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=good.html" />')
    (html / "good.html").write_text(_PAGE.format(
        head=_MJ, title="good", body='<img src="_images/fig.png" alt="a figure">'
        '<div class="math notranslate nohighlight">\\[t = \\frac{\\bar d}{s_d}\\]</div>'
        '<p>inline <span class="math notranslate nohighlight">\\(x^2\\)</span></p>'))
    from PIL import Image
    Image.new("RGB", (60, 40), (255, 255, 255)).save(html / "_images" / "blank.png")
    (html / "overflow.html").write_text(_PAGE.format(
        head="", title="overflow", body='<main><p>text</p><div class="wide" style="width:3000px">a row of '
        'nine metric columns</div></main>'))
    (html / "scrolls.html").write_text(_PAGE.format(   # as wide, but in a scroll container: fine
        head="", title="scrolls", body='<main><div style="overflow-x:auto"><table style="width:3000px">'
        '<tr><th>network</th><th>auc_macro</th></tr><tr><td>a wide table</td><td>0.9</td></tr></table></div>'
        '<div style="overflow-x:auto"><table><tr><th>narrow</th></tr></table></div></main>'))
    (html / "blank.html").write_text(_PAGE.format(
        head="", title="blank", body='<img src="_images/fig.png"><img src="_images/blank.png" alt="blank">'))
    (html / "traceback.html").write_text(_PAGE.format(
        head="", title="traceback", body='<pre>Traceback (most recent call last):\n  File "x.py", line 1\n'
        'ValueError: boom</pre>'))
    (html / "bad.html").write_text(_PAGE.format(
        head="", title="bad", body='<img src="_images/missing.png">'
        '<div class="math notranslate nohighlight">\\[x^2\\]</div>'
        '<div class="cell_output docutils container"><div class="output traceback highlight-ipythontb">'
        '<pre>ValueError: boom</pre></div></div>'))
    return html


@pytest.mark.slow  # Chromium on six pages (~12 s on 2 loaded cores)
def test_checker_passes_a_good_page_and_catches_missing_figure_untypeset_math_and_errors(handmade_book, tmp_path):
    _need_chromium()
    report = browser.check_book(handmade_book, tmp_path / "shots")
    pages = {p.page: p for p in report.pages}
    assert set(pages) == {"good.html", "bad.html", "overflow.html", "scrolls.html", "blank.html", "traceback.html"}
    good, bad = pages["good.html"], pages["bad.html"]
    assert good.ok, good.problems
    assert good.images == 1 and good.math_expected == 2 and good.math_typeset >= 2
    assert good.layout["scrollWidth"] <= good.layout["clientWidth"] and good.layout["viewportWidth"] == 1280
    assert pages["scrolls.html"].ok, pages["scrolls.html"].problems
    # ... but the reader has to scroll it: reported (not a problem), the narrow table not
    (wide,) = pages["scrolls.html"].wide_tables
    assert wide.startswith("network | auc_macro (") and "px more" in wide
    assert good.wide_tables == [] and "1 table(s) scroll sideways" in report.summary()
    # what a reader sees: the column overflows, a figure is one colour, a traceback is shown
    (over,) = pages["overflow.html"].problems
    assert "horizontal overflow at 1280 px" in over and "div.wide" in over and "main" in over
    (blank,) = pages["blank.html"].problems
    assert "_images/blank.png is blank: every pixel the same colour" in blank
    (tb,) = pages["traceback.html"].problems
    assert "Traceback (most recent call last)" in tb and "a Python traceback" in tb
    # each problem of the book names its page
    assert "overflow.html: horizontal overflow" in " | ".join(report.problems)
    assert "blank.html: figure _images/blank.png is blank" in " | ".join(report.problems)
    assert "traceback.html: an error output is shown" in " | ".join(report.problems)
    assert not list(handmade_book.glob(".cellstudy-check-*")), "the probe copies are removed"
    assert not bad.ok and report.ok is False
    text = " | ".join(bad.problems)
    assert "missing.png is missing" in text
    assert "1 equation(s) in the HTML but 0 typeset" in text
    assert "error output" in text
    for p in report.pages:
        w, h = _png_size(p.screenshot)
        assert (w, h) == (1280, 1600) and p.screenshot.stat().st_size > 5_000


def test_findings_page_must_show_the_runs_numbers(handmade_book, tmp_path):
    # the check recomputes the findings from the run's CSVs and looks for each number on the page
    _need_chromium()
    (handmade_book / "findings.html").write_text(_PAGE.format(
        head="", title="findings", body="<p>MHL, AUC <strong>0.912</strong>; 3 of 4 networks</p>"))
    ok = browser.check_page(handmade_book / "findings.html", expect=[("0.912", "best = 0.912"), ("3", "n = 3")])
    assert ok.ok, ok.problems
    bad = browser.check_page(handmade_book / "findings.html", expect=[("0.913", "best_MHL = 0.913 (from x.csv)")])
    assert bad.problems == ["the page does not show best_MHL = 0.913 (from x.csv)"]


def test_image_is_constant_decodes_the_file(tmp_path):
    from PIL import Image
    Image.new("RGBA", (8, 8), (10, 20, 30, 255)).save(tmp_path / "one.png")
    im = Image.new("RGB", (8, 8), (10, 20, 30))
    im.putpixel((7, 7), (10, 20, 31))
    im.save(tmp_path / "two.png")
    (tmp_path / "fig.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    assert browser.image_is_constant(tmp_path / "one.png") is True
    assert browser.image_is_constant(tmp_path / "two.png") is False
    assert browser.image_is_constant(tmp_path / "fig.svg") is None      # not a raster: not judged


def test_missing_chromium_is_reported_not_crashed(handmade_book, monkeypatch, tmp_path):
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-such-browser"))
    report = browser.check_book(handmade_book, tmp_path / "shots")
    assert report.ok is None and "apt-get install" in report.skipped and report.pages == []
    with pytest.raises(browser.BrowserUnavailable, match="no Chromium found"):
        browser.check_book(handmade_book, tmp_path / "shots", require=True)
    with pytest.raises(FileNotFoundError, match="no index.html"):
        browser.check_book(tmp_path, None)


# ---------------------------------------------------------------------------------------------
# the real book of the ci study
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_chapter_of_the_ci_book_renders_with_figures_and_equations(ci_run):
    _need_chromium()
    html = ci_run / "book" / "_build" / "html"
    shots = ci_run / "screenshots"
    report = browser.check_book(html, shots, run_dir=ci_run)   # the findings page's numbers vs the CSVs too
    print(report.summary())
    assert report.ok, report.summary()
    pages = {p.page: p for p in report.pages}
    cfg = runner.load_config(config.REPO_ROOT / "configs" / "ci.yaml")
    for step in cfg.steps:  # every notebook chapter has its figures
        assert f"{step}.html" in pages, f"{step} was not checked"
        assert pages[f"{step}.html"].images >= 1, f"{step} shows no figure"
    for page in ("intro.html", "provenance.html", "findings.html"):
        assert page in pages
    with_math = [p for p in report.pages if p.math_expected]
    assert with_math, "no chapter has an equation"
    assert all(p.math_typeset >= p.math_expected for p in with_math)
    if "01_preprocessing.html" in pages:
        assert pages["01_preprocessing.html"].math_expected >= 2  # the filters' equations (1) and (2)
    for p in report.pages:  # a screenshot of every page, saved with the run
        assert p.screenshot == shots / f"{p.page[:-5]}.png"
        assert _png_size(p.screenshot)[0] == 1280 and p.screenshot.stat().st_size > 10_000
