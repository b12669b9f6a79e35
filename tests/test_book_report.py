"""The book is a report (cellstudy.report.book): code folded, parameter cells removed and shown once as a
table, log output moved to the run folder, blank figures replaced. Pure notebook-dict tests (fast)
and one small book build from a hand-made run folder."""
import base64
import io
import json
import re

import nbformat
import numpy as np
import pytest
import yaml

from cellstudy.report import book
from cellstudy import runner


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


CONSTANT = _png(np.full((30, 40, 3), 255))
GRADIENT = _png(np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (30, 1, 3)))
ONE_DOT = np.full((30, 40, 3), 255)
ONE_DOT[3, 5] = (0, 0, 0)


def _image_output(png):
    return nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png).decode(),
                                                          "text/plain": "<IPython.core.display.Image object>"})


def _executed_notebook():
    nb = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    params = nbformat.v4.new_code_cell('run_dir = "../runs/dev"\nscale = "cpu"')
    params.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell('# Parameters\nrun_dir = "/machine/path/run"\nscale = "ci"\n')
    injected.metadata["tags"] = ["injected-parameters"]
    quiet = nbformat.v4.new_code_cell("import os")
    quiet.metadata["tags"] = ["remove-cell"]
    train = nbformat.v4.new_code_cell("results = train()\nresults.table")
    train.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="[12/55] xai densenet121 fold 1: 8 cells\n"),
        nbformat.v4.new_output("stream", name="stdout", text="vgg16 fold 0 epoch 1/2 loss 0.69\n"),
        nbformat.v4.new_output("stream", name="stderr", text="a warning\n"),
        nbformat.v4.new_output("execute_result", data={"text/html": "<table class='dataframe'></table>",
                                                       "text/plain": "table"}, execution_count=3),
    ]
    text = nbformat.v4.new_code_cell("display(Markdown(txt))")
    text.metadata["tags"] = ["remove-input"]
    text.outputs = [nbformat.v4.new_output("display_data", data={"text/markdown": "**42** cells", "text/plain": "md"})]
    figs = nbformat.v4.new_code_cell("figures.show(fig)\nfigures.show(fig2)\nfigures.show(fig3)")
    figs.outputs = [_image_output(CONSTANT), _image_output(GRADIENT), _image_output(_png(ONE_DOT))]
    echo = nbformat.v4.new_code_cell("figures.show(fig, out / 'x.png')")
    echo.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "b'\\x89PNG\\r\\n\\x1a\\n...'"},
                                           execution_count=5)]
    write = nbformat.v4.new_code_cell("(out / 'a.json').write_text(json.dumps(state))")
    write.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "828"}, execution_count=6)]
    answer = nbformat.v4.new_code_cell("n_cells")
    answer.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "220"}, execution_count=7)]
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter"), params, injected, quiet, train, text, figs, echo,
                write, answer]
    return json.loads(nbformat.writes(nb))


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def test_png_is_constant_on_synthetic_images():
    assert book.png_is_constant(CONSTANT) == (True, "#ffffff", (40, 30))
    assert book.png_is_constant(GRADIENT)[0] is False
    assert book.png_is_constant(_png(ONE_DOT))[0] is False          # one pixel differs: not blank
    grey = _png(np.full((5, 5), 128))                               # a single-band image
    assert book.png_is_constant(grey) == (True, "#808080", (5, 5))
    with pytest.raises(ValueError, match="not a readable image"):
        book.png_is_constant(b"not a png")


def test_report_notebook_folds_code_removes_parameters_and_moves_logs():
    nb = _executed_notebook()
    before = json.dumps(nb)
    out, log, counts = book.report_notebook(nb, "08_xai")
    assert json.dumps(nb) == before, "the executed notebook itself is not modified"
    md, params, injected, quiet, train, text, figs, echo, write, answer = out["cells"][:10]
    # parameters: removed from the page (tags kept), input of other code cells folded
    assert "remove-cell" in _tags(params) and "parameters" in _tags(params)
    assert "remove-cell" in _tags(injected) and "injected-parameters" in _tags(injected)
    assert _tags(quiet) == ["remove-cell"]                 # already removed: unchanged
    assert _tags(text) == ["remove-input"]                 # already hidden: no hide-input
    for cell in (train, figs, echo, write, answer):
        assert _tags(cell) == ["hide-input"], cell["source"]
    assert counts["removed"] == 2 and counts["folded"] == 5
    # stream outputs: off the page, into the log, under a header naming the cell
    assert all(o["output_type"] != "stream" for c in out["cells"] for o in c.get("outputs", []))
    assert "[12/55] xai densenet121 fold 1: 8 cells" in log and "epoch 1/2" in log and "[stderr] a warning" in log
    assert "--- cell 4 (code cell 4: results = train()) ---" in log
    assert counts["streams"] == 3 and counts["log_lines"] == 3
    # rich outputs stay
    assert [o["output_type"] for o in train["outputs"]] == ["execute_result"]
    assert "".join(text["outputs"][0]["data"]["text/markdown"]) == "**42** cells"
    # the constant figure is replaced by a sentence; the others stay images
    kinds = [sorted(o["data"]) for o in figs["outputs"]]
    assert kinds == [["text/markdown", "text/plain"], ["image/png", "text/plain"], ["image/png", "text/plain"]]
    note = figs["outputs"][0]["data"]["text/markdown"]
    assert "blank" in note and "40 x 30" in note and "#ffffff" in note and counts["blank_figures"] == 1
    # bookkeeping return values are dropped, a real result is kept
    assert echo["outputs"] == [] and write["outputs"] == [] and counts["bookkeeping"] == 2
    assert "".join(answer["outputs"][0]["data"]["text/plain"]) == "220"
    # the chapter ends with a line naming its log
    last = out["cells"][-1]
    src = "".join(last["source"])
    assert last["cell_type"] == "markdown" and "`logs/08_xai.log`" in src and "[08_xai.log](logs/08_xai.log)" in src


def test_a_chapter_without_log_output_gets_no_log_line():
    nb = json.loads(nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])))
    out, log, counts = book.report_notebook(nb, "00_x")
    assert log == "" and counts["streams"] == 0 and len(out["cells"]) == 1
    assert _tags(out["cells"][0]) == ["hide-input"]


def _fake_run(tmp_path, nb):
    run = tmp_path / "runs" / "t-20261202-000000"
    (run / "notebooks").mkdir(parents=True)
    (run / "notebooks" / "00_a.ipynb").write_text(json.dumps(nb))
    cfg = {"name": "t", "cohort": "bbbc021-paper", "scale": "ci", "seed": 3, "data_root": None,
           "overrides": {"epochs_long": 4}, "steps": ["00_a"], "title": "cellstudy", "notebook_parameters": {},
           "workers": 2}
    from cellstudy import config
    prov = {"config": cfg, "config_file": "/x/configs/t.yaml",
            "scale_parameters": config.get_scale("ci", cfg["overrides"]),
            "data": {"data_root": "/d", "cohort": "bbbc021-paper", "n_cells": 220},
            "git": {"commit": "0123456789abcdef0123", "dirty": False}, "hardware": {"cpu_count": 2},
            "packages": {"numpy": "x"}, "all_packages": {}, "started": "2026-12-02T00:00:00+0000"}
    (run / "provenance.json").write_text(json.dumps(prov))
    (run / "status.json").write_text(json.dumps({"steps": {"00_a": {"state": "done", "seconds": 1.0}}}))
    (run / "study.yaml").write_text(yaml.safe_dump(cfg))
    return run, runner.StudyConfig(**cfg)


def test_run_parameters_table_is_the_runs_own():
    # the numbers come from provenance.json, the override applied
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        run, _ = _fake_run(Path(d), _executed_notebook())
        text = book.run_parameters_markdown(run)
    assert text.startswith("## This run") and "| parameter | value |" in text
    for expected in ("| cohort | `bbbc021-paper`, 220 cells |", "| scale | `ci` |", "| seed | 3 |",
                     '| overrides | `{"epochs_long": 4}` |', "| image size S | 32 px |",
                     "epochs 1 + 3 (the short regime's model after 1, the long regime's after 4)",
                     "vgg16, vit, rgb, mhl; folds 0, 1, 2 of 5", "git commit `0123456789ab`",
                     "started 2026-12-02T00:00:00+0000", "2 notebook(s) at once"):
        assert expected in text, expected


def test_assemble_writes_the_report_copy_the_logs_and_the_parameters(tmp_path):
    nb = _executed_notebook()
    run, cfg = _fake_run(tmp_path, nb)
    out = book.assemble(run, cfg, book_dir=tmp_path / "bookdir")
    assert out == tmp_path / "bookdir" and not (run / "book").exists()
    copy = json.loads((out / "00_a.ipynb").read_text())
    assert all(o["output_type"] != "stream" for c in copy["cells"] for o in c.get("outputs", []))
    # the executed notebook in the run folder keeps its outputs as papermill wrote them
    assert json.loads((run / "notebooks" / "00_a.ipynb").read_text()) == nb
    for log in (run / "logs" / "00_a.log", out / "logs" / "00_a.log"):
        assert "[12/55] xai densenet121 fold 1" in log.read_text()
    intro = (out / "intro.md").read_text()
    assert intro.count("## This run") == 1 and "| seed | 3 |" in intro
    assert (out / "_static" / "cellstudy.css").is_file()
    toc = yaml.safe_load((out / "_toc.yml").read_text())
    assert toc["root"] == "intro" and {"file": "00_a"} in toc["chapters"]
    # every page of the book's sources is in the table of contents (only_build_toc_files: a page
    # outside it is not built, and a link to it fails), the page on the default scale among them
    listed = {toc["root"]} | {c["file"] for c in toc["chapters"]}
    assert {p.stem for p in out.glob("*.md")} <= listed and "default_scale" in listed


@pytest.mark.slow  # a Sphinx build (~10 s on 2 loaded cores); the report copy: test_assemble_*
def test_the_built_book_folds_code_and_links_the_log(tmp_path):
    from cellstudy import config

    if not (config.REPO_ROOT / "node_modules" / "mathjax" / "es5" / "tex-chtml.js").is_file():
        pytest.skip("MathJax is not installed (npm install)")
    run, cfg = _fake_run(tmp_path, _executed_notebook())
    index = book.build_book(run, cfg, echo=lambda s: None, book_dir=tmp_path / "b")
    html = (index.parent / "00_a.html").read_text()
    assert "hide above-input" in html                      # folded code, one click away
    assert "/machine/path/run" not in html and "# Parameters" not in html
    assert "xai densenet121 fold 1" not in html            # the log is not on the page ...
    assert 'class="reference download internal"' in html and "00_a.log" in html   # ... but linked
    assert "blank" in html and html.count("<img") == 2     # the constant figure is a sentence
    assert html.count("cellstudy.css") == 1                # the stylesheet, linked once
    intro = (index.parent / "intro.html").read_text()
    assert "This run" in intro and "0123456789ab" in intro


def _show_calls(src: str) -> list[str]:
    """The full text of every figures.show(...) call in a code cell's source."""
    calls = []
    for m in re.finditer(r"figures\.show\(", src):
        depth = 0
        for j in range(m.start(), len(src)):
            depth += src[j] == "("
            depth -= src[j] == ")"
            if src[j] == ")" and depth == 0:
                calls.append(src[m.start():j + 1])
                break
    return calls


def test_every_figure_of_the_chapters_has_a_caption():
    # issue 16: a caption naming what the figure shows and the paper figure it corresponds to
    # (or that it has none)
    from cellstudy import config

    seen = 0
    for p in sorted((config.REPO_ROOT / "notebooks").glob("*.ipynb")):
        for c in json.loads(p.read_text())["cells"]:
            if c["cell_type"] != "code":
                continue
            for call in _show_calls("".join(c["source"])):
                seen += 1
                assert "caption=" in call, f"{p.name}: a figure without a caption: {call[:120]}"
                assert re.search(r"paper|Fig", call), f"{p.name}: the caption names no paper figure: {call[:160]}"
    assert seen >= 30


def test_caption_markdown():
    from cellstudy.report import figures

    assert figures.caption_markdown("  ROC curves,\n pooled. ") == "**Figure.** ROC curves, pooled."
    with pytest.raises(ValueError, match="caption is empty"):
        figures.caption_markdown("  ")


def test_pages_name_the_run_folder_when_given_as_a_relative_path(tmp_path, monkeypatch):
    # the workflow builds the book from inside the run folder (run_dir "."): the pages still
    # name the folder (they showed `` before)
    from pathlib import Path
    run, _ = _fake_run(tmp_path, _executed_notebook())
    monkeypatch.chdir(run)
    assert "- Run folder: `t-20261202-000000`" in book.provenance_page(Path("."))
    assert "| run | `t-20261202-000000` (config `t.yaml`" in book.run_parameters_markdown(Path("."))


def test_run_parameters_name_he_init_only_for_networks_the_run_trains(tmp_path):
    import json
    run, _ = _fake_run(tmp_path, _executed_notebook())
    prov = json.loads((run / "provenance.json").read_text())
    prov["scale_parameters"]["he_init"] = ["vgg16"]
    prov["scale_parameters"]["networks"] = ["vit", "mhl"]
    (run / "provenance.json").write_text(json.dumps(prov))
    assert "He-normal" not in book.run_parameters_markdown(run)
    prov["scale_parameters"]["networks"] = ["vgg16", "mhl"]
    (run / "provenance.json").write_text(json.dumps(prov))
    assert "He-normal convolutions for vgg16" in book.run_parameters_markdown(run)


def test_provenance_page_says_which_folds_this_run_trained_and_which_it_found_done(tmp_path):
    """A run folder's folds may have been trained by an earlier command or copied in (as the
    2026-12-07 default run's ten probe folds were): the provenance page says how many, per network,
    with the epochs and the training time the family chapters' step times leave out."""
    run, _ = _fake_run(tmp_path, _executed_notebook())
    (run / "status.json").write_text(json.dumps({"started": "2026-12-02T10:00:00+0000",
                                                 "steps": {"00_a": {"state": "done", "seconds": 1.0}}}))
    for k, (fin, ep, sec) in enumerate([("2026-12-02T09:00:00+0000", 11, 120.0),    # before the run
                                        ("2026-12-02T11:00:00+0000", 13, 180.0)]):   # by the run
        d = run / "training" / "resnet50" / f"fold{k}"
        d.mkdir(parents=True)
        (d / "done.json").write_text(json.dumps({"finished": fin, "epochs_trained": ep, "epochs_long": 10,
                                                 "timings": {"seconds_total_this_session": sec}}))
    page = book.provenance_page(run)
    assert "**1 fold(s) finished before this run folder was made.**" in page
    assert "| ResNet50 | 2 | 1 | 1 | 11-13 | 5.0 |" in page


def test_a_chapter_that_prints_nothing_still_has_its_log(tmp_path):
    """The README promises each notebook's output in logs/<step>.log; 09 and 10 print nothing
    and had none: now their log says so."""
    nb = _executed_notebook()
    for c in nb["cells"]:
        if "outputs" in c:
            c["outputs"] = [o for o in c["outputs"] if o.get("output_type") != "stream"]
    run, cfg = _fake_run(tmp_path, nb)
    out = book.assemble(run, cfg, book_dir=tmp_path / "bookdir")
    for log in (run / "logs" / "00_a.log", out / "logs" / "00_a.log"):
        assert "printed no progress or log output" in log.read_text()
