"""cellstudy.data.folder and ``cellstudy manifest``: a cohort manifest from a folder of the user's
own images (issue 18 item 1). Small TIFF / PNG files written here; no TensorFlow."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellstudy import cli, data, rundir, runner
from cellstudy.data import folder as mf

GROUP_RX = r"(?P<group>[A-Z]\d{2}_s\d)"
SIZE = 8


def _pixels(seed: int, channels: int, dtype=np.uint16) -> np.ndarray:
    """(SIZE, SIZE, channels) distinct random pixels."""
    hi = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, hi, (SIZE, SIZE, channels), endpoint=True).astype(dtype)


def _wells(n: int, letter: str) -> list[str]:
    return [f"{letter}{i + 1:02d}_s1" for i in range(n)]


def _tiff_folder(root: Path, groups_per_class: int = 4, cells_per_group: int = 2,
                 classes=("ctrl", "treated")) -> dict[str, np.ndarray]:
    """FOLDER/<class>/<well>_c<k>.tif, (8, 8, 3) uint16 stored channel-last as DNA, actin, third."""
    stored = {}
    for ci, cls in enumerate(classes):
        for well in _wells(groups_per_class, "ABCDEFG"[ci]):
            for k in range(cells_per_group):
                rel = f"{cls}/{well}_c{k}.tif"
                a = _pixels(len(stored), 3)
                (root / cls).mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(root / rel, a)
                stored[rel] = a
    return stored


def _rgb_from_stored(a: np.ndarray, order=(2, 1, 0)) -> np.ndarray:
    return a[:, :, list(order)].astype(np.float32)


def _check_cohort(out: Path, df: pd.DataFrame, expected: dict[str, np.ndarray]) -> None:
    """The written manifest loads as a cohort whose raw images are the files' pixels (R, G, B)."""
    root = Path(df.attrs["data_root"])
    coh = data.load_cohort(str(out), root=root)
    assert len(coh) == len(expected)
    raw = np.stack([data.read_image(p, c, root=root) for p, c in zip(coh.table["path"], coh.table["channels"])])
    want = np.stack([expected[cid] for cid in coh.cell_ids])
    np.testing.assert_array_equal(raw, want)
    np.testing.assert_allclose(coh.images, data.robust_scale(want), atol=1e-6)
    data.verify_manifest(data.load_manifest(str(out)), root)


# ---------------------------------------------------------------------------------------------
def test_class_folders_multichannel_tiff(tmp_path):
    src = tmp_path / "cells"
    stored = _tiff_folder(src)
    df = mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="third=2,actin=1,dna=0",
                           group_pattern=GROUP_RX, n_splits=2)
    assert list(df.columns) == list(mf.MANIFEST_COLUMNS)
    assert len(df) == 16 and df.attrs["data_root"] == str(src.resolve())
    assert (df.loc[df.class_name == "ctrl", "label"] == 0).all()
    assert (df.loc[df.class_name == "treated", "label"] == 1).all()
    row = df.set_index("cell_id").loc["ctrl/A01_s1_c0"]
    assert row.path == "ctrl/A01_s1_c0.tif" and row.group == "A01_s1" and row.channels == "2,1,0"
    assert row["shape"] == "8x8x3" and row.sha256 == data.sha256_file(src / "ctrl/A01_s1_c0.tif")
    out = mf.write_manifest(df, tmp_path / "my.csv")
    expected = {rel[:-4]: _rgb_from_stored(a) for rel, a in stored.items()}
    _check_cohort(out, df, expected)


def test_data_root_above_the_folder(tmp_path):
    src = tmp_path / "project" / "cells"
    _tiff_folder(src)
    df = mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0",
                           group_pattern=GROUP_RX, n_splits=2, data_root=tmp_path / "project")
    assert df["path"].str.startswith("cells/ctrl/").any()
    assert df.attrs["data_root"] == str((tmp_path / "project").resolve())
    with pytest.raises(data.DataError, match="not inside it"):
        mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0",
                          group_pattern=GROUP_RX, n_splits=2, data_root=tmp_path / "elsewhere")


def test_labels_csv_8bit_png_and_group_column(tmp_path):
    """A flat folder of 8-bit RGB PNG files (stored R, G, B = actin, DNA, third) with a labels CSV
    naming class, well and a free column."""
    src = tmp_path / "pngs"
    src.mkdir()
    rows, expected = [], {}
    for i in range(12):
        a = _pixels(100 + i, 3, np.uint8)
        name = f"img{i:02d}.png"
        Image.fromarray(a, "RGB").save(src / name)
        cls = "healthy" if i % 2 == 0 else "tumour"
        rows.append({"filename": name, "kind": cls, "well": f"W{i // 2 % 3}{cls[0]}", "plate": "P1"})
        expected[f"img{i:02d}"] = _rgb_from_stored(a, order=(2, 0, 1))
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    # 3 wells per class: too few for n_splits=4 (the study's rule: n_splits a class)
    with pytest.raises(data.DataError) as e:
        mf.build_manifest(src, normal="healthy", abnormal="tumour", channels="actin=0,dna=1,third=2",
                          labels=tmp_path / "labels.csv", file_column="filename", class_column="kind",
                          group_column="well", n_splits=4)
    assert sum("has 3 group(s)" in p for p in e.value.problems) == 2
    # enough for n_splits=2, where the study accepts them, with a note (under 2 x n_splits)
    few = mf.build_manifest(src, normal="healthy", abnormal="tumour", channels="actin=0,dna=1,third=2",
                            labels=tmp_path / "labels.csv", file_column="filename", class_column="kind",
                            group_column="well", n_splits=2)
    assert sum("has 3 groups for 2 folds" in n for n in few.attrs["notes"]) == 2
    # six wells per class: enough
    for r in rows:
        r["well"] = r["filename"][3:5] + r["kind"][0]
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    df = mf.build_manifest(src, normal="healthy", abnormal="tumour", channels="actin=0,dna=1,third=2",
                           labels=tmp_path / "labels.csv", file_column="filename", class_column="kind",
                           group_column="well", n_splits=3)
    assert list(df.columns) == list(mf.MANIFEST_COLUMNS) + ["plate", "well"]
    assert (df["group"] == df["well"]).all() and (df["plate"] == "P1").all() and df["channels"].eq("2,0,1").all()
    assert df["shape"].eq("8x8x3").all()
    out = mf.write_manifest(df, tmp_path / "png.csv")
    _check_cohort(out, df, expected)


@pytest.mark.parametrize("pattern", ["_{channel}.png", r"_(?P<channel>w\d)\.png$"])
def test_per_channel_16bit_png(tmp_path, pattern):
    """One 16-bit grey PNG per channel: <well>_c<k>_w1.png (DNA), _w2 (actin), _w3 (third); a
    stray w4 file is ignored with a note."""
    src = tmp_path / "perchannel"
    expected = {}
    for ci, cls in enumerate(("ctrl", "drug")):
        (src / cls).mkdir(parents=True)
        for well in _wells(4, "AB"[ci]):
            cid = f"{cls}/{well}_c0"
            planes = {w: _pixels(len(expected) * 4 + j, 1)[:, :, 0] for j, w in enumerate(("w1", "w2", "w3"))}
            for w, p in planes.items():
                Image.fromarray(p).save(src / f"{cid}_{w}.png")
            expected[cid] = np.stack([planes["w3"], planes["w2"], planes["w1"]], -1).astype(np.float32)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint16)).save(src / "ctrl" / "A01_s1_c0_w4.png")
    assert Image.open(src / "ctrl" / "A01_s1_c0_w1.png").mode.startswith("I")  # 16-bit
    df = mf.build_manifest(src, normal="ctrl", abnormal="drug", channels="third=w3,actin=w2,dna=w1",
                           channel_pattern=pattern, group_pattern=GROUP_RX, n_splits=2)
    row = df.set_index("cell_id").loc["ctrl/A01_s1_c0"]
    assert row.path == "ctrl/A01_s1_c0_w3.png;ctrl/A01_s1_c0_w2.png;ctrl/A01_s1_c0_w1.png"
    assert row.channels == "0,0,0" and row["shape"] == "8x8;8x8;8x8" and len(row.sha256.split(";")) == 3
    assert any("'w4' ignored" in n for n in df.attrs["notes"])
    out = mf.write_manifest(df, tmp_path / "pc.csv")
    _check_cohort(out, df, expected)


def test_every_problem_in_one_error(tmp_path):
    """Per-channel files with a missing channel file, an unreadable file, a file with three
    channels, a third class and too few groups: one DataError naming each."""
    src = tmp_path / "bad"
    for ci, cls in enumerate(("ctrl", "drug", "other")):
        (src / cls).mkdir(parents=True)
        for well in _wells(4 if cls != "other" else 1, "ABC"[ci]):
            for w in ("w1", "w2", "w3"):
                tifffile.imwrite(src / cls / f"{well}_{w}.tif", _pixels(ci, 1)[:, :, 0])
    (src / "ctrl" / "A02_s1_w2.tif").unlink()                                 # missing channel
    (src / "drug" / "B01_s1_w1.tif").write_bytes(b"II*\x00garbage")         # unreadable
    tifffile.imwrite(src / "drug" / "B02_s1_w3.tif", _pixels(9, 3))          # three channels
    with pytest.raises(data.DataError) as e:
        mf.build_manifest(src, normal="ctrl", abnormal="drug", channels="third=w3,actin=w2,dna=w1",
                          channel_pattern="_{channel}.tif", group_pattern=GROUP_RX, n_splits=5)
    probs = e.value.problems
    text = "\n".join(probs)

    def one(*needles: str) -> None:
        assert sum(all(n in p for n in needles) for p in probs) == 1, (needles, text)

    one("ctrl/A02_s1_w2.tif", "missing channel file", "actin (w2)")
    one("drug/B01_s1_w1.tif", "unreadable")
    one("drug/B02_s1_w3.tif", "has 3 channels", "third (w3)")
    one("classes found", "'other' (1 cells)", "'ctrl'", "'drug'")
    one("class 'ctrl'", "has 3 group(s)", "at least n_splits = 5")   # A02 lost its cell
    one("class 'drug'", "has 4 group(s)")
    assert len(probs) == 6
    assert str(len(probs)) in str(e.value)


def test_multichannel_errors_name_each_file(tmp_path):
    src = tmp_path / "cells"
    _tiff_folder(src)
    tifffile.imwrite(src / "ctrl" / "A01_s1_c0.tif", _pixels(0, 2))           # 2 channels, index 2 needed
    (src / "treated" / "B01_s1_c1.tif").write_bytes(b"not a tiff")          # unreadable
    tifffile.imwrite(src / "treated" / "B02_s1_c0.tif", _pixels(1, 4))        # 4 channels, the rest 3
    (src / "A09_s1_c0.tif").write_bytes((src / "ctrl" / "A02_s1_c0.tif").read_bytes())  # no class folder
    tifffile.imwrite(src / "ctrl" / "nogroup.tif", _pixels(2, 3))            # no group in its name
    with pytest.raises(data.DataError) as e:
        mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="third=2,actin=1,dna=0",
                          group_pattern=GROUP_RX, n_splits=2)
    probs = e.value.problems
    assert any(p.startswith("ctrl/A01_s1_c0.tif: has 2 channel(s)") for p in probs)
    assert any(p.startswith("treated/B01_s1_c1.tif") and "unreadable" in p for p in probs)
    assert any(p.startswith("treated/B02_s1_c0.tif: has 4 channels; expected 3") for p in probs)
    assert any(p.startswith("A09_s1_c0.tif: not inside a class subfolder") for p in probs)
    assert any(p.startswith("ctrl/nogroup.tif: --group-pattern") for p in probs)
    assert len(probs) == 5, probs


def test_a_mixed_group_and_unlisted_files(tmp_path):
    src = tmp_path / "cells"
    _tiff_folder(src, groups_per_class=4)
    tifffile.imwrite(src / "treated" / "A01_s1_c9.tif", _pixels(3, 3))        # A01_s1 is a ctrl well
    with pytest.raises(data.DataError, match="group 'A01_s1' spans both classes"):
        mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0",
                          group_pattern=GROUP_RX, n_splits=2)
    labels = pd.DataFrame({"file": ["ctrl/A01_s1_c0.tif", "missing.tif"], "class": ["ctrl", "treated"]})
    with pytest.raises(data.DataError) as e:
        mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0", labels=labels,
                          group_pattern=GROUP_RX, n_splits=2)
    assert any("'missing.tif'" in p and "no such image file" in p for p in e.value.problems)
    assert any(p.startswith("ctrl/A01_s1_c1.tif: not in the labels table") for p in e.value.problems)


def test_argument_errors(tmp_path):
    src = tmp_path / "cells"
    _tiff_folder(src)
    kw = dict(normal="ctrl", abnormal="treated", group_pattern=GROUP_RX, n_splits=2)
    for bad in ("third=2,actin=1", "third=2,actin=1,rna=0", "x,y,z", "third=2,1,0"):
        with pytest.raises(data.DataError, match="--channels"):
            mf.build_manifest(src, channels=bad, **kw)
    with pytest.raises(data.DataError, match="the same file token"):
        mf.parse_channel_map("third=w1,actin=w1,dna=w2", per_file=True)
    assert mf.parse_channel_map("b=0,g=1,r=2").values == ("2", "1", "0")
    # file tokens without --channel-pattern: the option is named with a pattern for those tokens
    with pytest.raises(data.DataError, match=r"tokens such as 'w3' need --channel-pattern.*"
                                             r"--channel-pattern '_\{channel\}.tif' for names that end in _w3.tif"):
        mf.parse_channel_map("third=w3,actin=w2,dna=w1")
    with pytest.raises(data.DataError, match=r"for names that end in _w3.tif$"):
        mf.parse_channel_map("third=w3.tif,actin=w2.tif,dna=w1.tif")
    with pytest.raises(data.DataError, match=r"stains read the same stored channel \(R, G, B = 1, 1, 0\)"):
        mf.parse_channel_map("third=1,actin=1,dna=0")          # F-actin twice, the third stain dropped
    with pytest.raises(data.DataError, match="named group"):
        mf.build_manifest(src, channels="2,1,0", **{**kw, "group_pattern": "[A-Z]"})
    with pytest.raises(data.DataError, match="exactly one of --group-pattern"):
        mf.build_manifest(src, channels="2,1,0", normal="ctrl", abnormal="treated")
    with pytest.raises(data.DataError, match="named group"):
        mf.channel_regex("_w.tif", ["w1", "w2", "w3"])
    with pytest.raises(FileNotFoundError):
        mf.build_manifest(tmp_path / "nowhere", channels="2,1,0", **kw)


def test_no_overwrite_without_force(tmp_path):
    src = tmp_path / "cells"
    _tiff_folder(src)
    df = mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0",
                           group_pattern=GROUP_RX, n_splits=2)
    out = tmp_path / "my.csv"
    out.write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        mf.write_manifest(df, out)
    assert out.read_text() == "keep me"
    mf.write_manifest(df, out, force=True)
    assert len(data.load_manifest(str(out))) == len(df)


def test_cli_end_to_end(tmp_path, capsys):
    src = tmp_path / "cells"
    _tiff_folder(src)
    out = tmp_path / "my.csv"
    args = ["manifest", str(src), "-o", str(out), "--normal", "ctrl", "--abnormal", "treated",
            "--channels", "third=2,actin=1,dna=0", "--group-pattern", GROUP_RX, "--n-splits", "2"]
    assert cli.main(args) == 0
    said = capsys.readouterr().out
    assert f"data root: {src.resolve()}" in said and "--cohort" in said and "16 cells" in said
    # the config's path works from any folder, and the scale and the runs folder are said
    from cellstudy import config as _config
    assert f"cellstudy run {_config.REPO_ROOT / 'configs' / 'default.yaml'} --cohort" in said
    assert "ci.yaml" in said and "--runs-dir" in said
    assert (_config.REPO_ROOT / "configs" / "ci.yaml").is_file()
    assert cli.main(["verify", str(out), "--data-root", str(src)]) == 0
    before = out.read_bytes()
    assert cli.main(args) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    assert cli.main(args + ["--force"]) == 0
    # problems: every one listed on stderr, nothing written
    tifffile.imwrite(src / "ctrl" / "A01_s1_c0.tif", _pixels(0, 2))
    (src / "treated" / "B01_s1_c1.tif").write_bytes(b"broken")
    out2 = tmp_path / "bad.csv"
    assert cli.main(args[:3] + [str(out2)] + args[4:]) == 2
    err = capsys.readouterr().err
    assert "ctrl/A01_s1_c0.tif: has 2 channel(s)" in err and "treated/B01_s1_c1.tif" in err
    assert "nothing written" in err and not out2.exists()


def test_a_run_takes_the_manifest_path_as_its_cohort(tmp_path, monkeypatch):
    src = tmp_path / "cells"
    _tiff_folder(src)
    df = mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0",
                           group_pattern=GROUP_RX, n_splits=2)
    mf.write_manifest(df, tmp_path / "mine.csv")
    cfg_file = tmp_path / "study.yaml"
    # 4 fields per class: two grouped folds (the manifest's --n-splits 2), not the scale's five
    cfg_file.write_text("name: mine\ncohort: bbbc021-paper\nscale: ci\nsteps: [00_cohort, 01_preprocessing]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(runner.StudyError, match="cannot be split into the ci scale's 5 grouped folds"):
        runner.preflight(runner.load_config(cfg_file, cohort="mine.csv", data_root=str(src)))
    # the cohort chapter alone makes no folds: not refused
    cfg_file.write_text("name: mine\ncohort: bbbc021-paper\nscale: ci\nsteps: [00_cohort]\n")
    assert runner.preflight(runner.load_config(cfg_file, cohort="mine.csv", data_root=str(src)))["n_cells"] == 16
    cfg_file.write_text("name: mine\ncohort: bbbc021-paper\nscale: ci\nsteps: [00_cohort]\n"
                        "overrides: {n_splits: 2}\n")
    cfg = runner.load_config(cfg_file, cohort="mine.csv", data_root=str(src))
    assert cfg.cohort == str((tmp_path / "mine.csv").resolve())
    prov = runner.preflight(cfg)
    assert prov["n_cells"] == 16 and prov["manifest"] == cfg.cohort
    assert rundir.Run(tmp_path / "run").folds_file(cfg.cohort) == tmp_path / "run" / "folds" / "mine.csv"
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        runner.load_config(cfg_file, cohort="absent.csv")
    # a relative data root (the README's `--data-root cells/`) is made absolute as the cohort's path:
    # the jobs run inside the run folder, where "cells/" would not exist
    rel = runner.load_config(cfg_file, cohort="mine.csv", data_root="cells/")
    assert rel.data_root == str(src.resolve())
    assert runner.preflight(rel)["n_cells"] == 16
    assert runner.load_config(cfg_file).data_root is None        # unset stays unset ($CELLSTUDY_DATA_ROOT, ../shared/data)


def test_unlabelled_cells_to_predict(tmp_path, capsys):
    """--unlabelled: no classes, groups from subfolders (or a pattern), stains recorded; it loads
    for prediction (labels -1) and is refused as a study cohort with a message saying why."""
    src = tmp_path / "new"
    stored = {}
    for i, rel in enumerate(["plateA/x1.tif", "plateA/x2.tif", "plateB/y1.tif", "z.tif"]):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        stored[rel] = _pixels(100 + i, 3)
        tifffile.imwrite(src / rel, stored[rel])
    with pytest.raises(data.DataError, match="--unlabelled takes no --normal"):
        mf.build_manifest(src, channels="2,1,0", unlabelled=True, normal="ctrl")
    with pytest.raises(data.DataError, match="or --unlabelled for cells to predict"):
        mf.build_manifest(src, channels="2,1,0", group_pattern=GROUP_RX)
    with pytest.raises(data.DataError, match="--stains 'vimentin,DNA'"):
        mf.build_manifest(src, channels="2,1,0", unlabelled=True, stains="vimentin,DNA")
    df = mf.build_manifest(src, channels="2,1,0", unlabelled=True, stains=" vimentin, F-actin ,DNA")
    assert list(df.columns) == list(mf.MANIFEST_COLUMNS) + ["stains"]
    assert (df["label"] == "").all() and (df["class_name"] == "").all()
    assert df.set_index("cell_id")["group"].to_dict() == {"plateA/x1": "plateA", "plateA/x2": "plateA",
                                                          "plateB/y1": "plateB", "z": "."}
    out = mf.write_manifest(df, tmp_path / "new.csv")
    m = data.load_manifest(str(out))
    assert data.is_unlabelled(m) and data.stains_of(m) == ("vimentin", "F-actin", "DNA")
    coh = data.load_cohort(str(out), root=src, labelled=False)
    assert coh.labels.tolist() == [-1, -1, -1, -1]
    np.testing.assert_allclose(coh.images[0], data.robust_scale(_rgb_from_stored(stored["plateA/x1.tif"])[None])[0],
                               atol=1e-6)
    with pytest.raises(data.DataError, match="labels none of its cells"):
        data.load_cohort(str(out), root=src)
    # a pattern still gives the groups; a label that is given must be 0 or 1
    df2 = mf.build_manifest(src, channels="2,1,0", unlabelled=True, group_pattern=r"(?P<group>[a-z]+)\d?\.tif")
    assert sorted(df2["group"]) == ["x", "x", "y", "z"]
    m.loc[0, "label"] = "7"
    assert any("label '7'; expected 0 (normal) or 1 (abnormal) or empty" in p
               for p in data._check_table(m, labelled=False))
    # the CLI
    out3 = tmp_path / "new3.csv"
    assert cli.main(["manifest", str(src), "-o", str(out3), "--unlabelled", "--channels", "2,1,0",
                     "--stains", "vimentin,F-actin,DNA"]) == 0
    assert data.stains_of(data.load_manifest(str(out3))) == ("vimentin", "F-actin", "DNA")
    # verify checks its files and says what it is for (it refused it: "labels none of its cells")
    capsys.readouterr()
    assert cli.main(["verify", str(out3), "--data-root", str(src)]) == 0
    assert "unlabelled: cells for `cellstudy predict`" in capsys.readouterr().out
    (src / sorted(p.name for p in src.iterdir() if p.suffix == ".tif")[0]).write_bytes(b"changed")
    assert cli.main(["verify", str(out3), "--data-root", str(src)]) == 2   # a file changed: refused


def test_stains_column_rules(tmp_path):
    m = pd.DataFrame({"stains": ["tubulin,F-actin,DNA", ""]})
    assert data.stains_of(m) == ("tubulin", "F-actin", "DNA")
    assert data.stains_of(pd.DataFrame({"x": [1]})) is None
    with pytest.raises(data.DataError, match="2 different values"):
        data.stains_of(pd.DataFrame({"stains": ["a,b,c", "a,b,d"]}))
    with pytest.raises(data.DataError, match="expected three stain names"):
        data.stains_of(pd.DataFrame({"stains": ["a,b"]}))
    # the shipped cohorts name their stains
    assert data.stains_of(data.load_manifest("bbbc021-paper")) == ("tubulin", "F-actin", "DNA")
    assert data.stains_of(data.load_manifest("rxrx1-cells")) == ("concanavalin A", "F-actin", "DNA")


def _grey_folder(src: Path, infix: str = "") -> Path:
    """One grey TIFF per channel: <class>/<well>{infix}_w1/_w2/_w3.tif, 5 wells per class."""
    for ci, cls in enumerate(("ctrl", "drug")):
        (src / cls).mkdir(parents=True)
        for well in _wells(5, "AB"[ci]):
            for w in ("w1", "w2", "w3"):
                tifffile.imwrite(src / cls / f"{well}{infix}_{w}.tif", _pixels(ci, 1)[:, :, 0])
    return src


def test_a_wrong_channel_token_is_named_once_and_repeated_problems_are_grouped(tmp_path, capsys):
    """A newcomer's `--channels third=w4,...` on w1/w2/w3 files gave 121 lines without the cause."""
    from cellstudy import cli

    src = _grey_folder(tmp_path / "grey")
    with pytest.raises(data.DataError) as e:
        mf.build_manifest(src, normal="ctrl", abnormal="drug", channels="third=w4,actin=w2,dna=w1",
                          channel_pattern="_{channel}.tif", group_pattern=GROUP_RX, n_splits=2)
    assert any("no file name carries the channel token(s) ['w4']" in p and "['w1', 'w2', 'w3']" in p
               for p in e.value.problems)
    n_missing = sum("missing channel file" in p for p in e.value.problems)
    assert n_missing == 10
    grouped = data.group_problems(e.value.problems)
    assert sum("missing channel file" in p for p in grouped) == 4          # 3 examples + one summary line
    assert any(p.startswith("... and 7 more file(s) with the same problem: missing channel file for") for p in grouped)
    out = tmp_path / "m.csv"
    assert cli.main(["manifest", str(src), "-o", str(out), "--normal", "ctrl", "--abnormal", "drug",
                     "--channels", "third=w4,actin=w2,dna=w1", "--channel-pattern", "_{channel}.tif",
                     "--group-pattern", GROUP_RX]) == 2
    err = capsys.readouterr().err
    assert "no file name carries the channel token(s) ['w4']" in err and "... and 7 more" in err
    assert len(err.splitlines()) < 15 and not out.exists()
    # problems of one file each, all different, are all listed
    assert data.group_problems(["a.tif: x", "b.tif: y"]) == ["a.tif: x", "b.tif: y"]
    # the summary line keeps the option's value: a pattern is not a file name (it read
    # "--channel-pattern <file>'" for '_{channel}.tif'), a quoted file is replaced inside its quotes
    ps = [f"c/a{i}_w1.png: does not match --channel-pattern '_{{channel}}.tif'; expected one file per "
          f"channel, other file 'c/a{i}_w2.png'" for i in range(5)]
    assert data.group_problems(ps)[-1] == ("... and 2 more file(s) with the same problem: does not match "
                                           "--channel-pattern '_{channel}.tif'; expected one file per "
                                           "channel, other file '<file>'")


def test_grey_files_without_a_channel_pattern_get_the_option_named(tmp_path, capsys):
    """A newcomer's one-file-per-channel folder without --channel-pattern gave a page of per-file
    lines and no hint; the first problem now names --channel-pattern and the names' tokens."""
    from cellstudy import cli

    src = _grey_folder(tmp_path / "grey", "_c0")
    with pytest.raises(data.DataError) as e:
        mf.build_manifest(src, normal="ctrl", abnormal="drug", channels="third=2,actin=1,dna=0",
                          group_pattern=GROUP_RX, n_splits=2)
    first = e.value.problems[0]
    assert "all 30 image files have one grey channel" in first and "--channel-pattern '_{channel}.tif'" in first
    assert "['w1', 'w2', 'w3']" in first and "--channels third=w3,actin=w2,dna=w1" in first
    assert cli.main(["manifest", str(src), "-o", str(tmp_path / "m.csv"), "--normal", "ctrl", "--abnormal",
                     "drug", "--channels", "third=2,actin=1,dna=0", "--group-pattern", GROUP_RX]) == 2
    assert "--channel-pattern '_{channel}.tif'" in capsys.readouterr().err
    # following the hint works
    df = mf.build_manifest(src, normal="ctrl", abnormal="drug", channels="third=w3,actin=w2,dna=w1",
                           channel_pattern="_{channel}.tif", group_pattern=GROUP_RX, n_splits=2)
    assert "ctrl/A01_s1_c0" in set(df["cell_id"]) and len(df) == 10
    # the cell ids lose the whole "_w<k>" of a pattern with literal text around the token
    df = mf.build_manifest(src, normal="ctrl", abnormal="drug", channels="third=3,actin=2,dna=1",
                           channel_pattern="_w{channel}.tif", group_pattern=GROUP_RX, n_splits=2)
    assert "ctrl/A01_s1_c0" in set(df["cell_id"]) and not df["cell_id"].str.endswith("_w").any()
    assert len(df) == 10
    # two or four tokens: no --channels that parse_channel_map would refuse
    two = mf._per_channel_hint([f"A01_s1_c{k}_{w}.tif" for k in range(2) for w in ("w1", "w2")])
    assert "only two tokens ['w1', 'w2']" in two and "--channels third" not in two
    four = mf._per_channel_hint([f"A01_s1_c{k}_{w}.tif" for k in range(2) for w in ("w1", "w2", "w3", "w4")])
    assert "third=<token>" in four and "['w1', 'w2', 'w3', 'w4']" in four


def test_the_cell_id_of_a_channel_token_inside_the_name_or_a_folder(tmp_path):
    """The pattern's whole match leaves the id, separators kept: B01_s1_w1_c0.tif -> B01_s1_c0;
    w1/B01_s1_c0.tif (a folder per channel) -> B01_s1_c0."""
    rels = ["ctrl/A01_s1_w1_c0.tif", "ctrl/A01_s1_w2_c0.tif", "ctrl/A01_s1_w3_c0.tif"]
    cmap = mf.parse_channel_map("third=3,actin=2,dna=1", per_file=True)
    cells = mf._find_cells(rels, cmap, "_w{channel}_", [], [])
    assert [c.cell_id for c in cells] == ["ctrl/A01_s1_c0"]
    rels = [f"w{k}/A01_s1_c0.tif" for k in (1, 2, 3)]
    cells = mf._find_cells(rels, cmap, "w{channel}/", [], [])
    assert [c.cell_id for c in cells] == ["A01_s1_c0"]
    rels = [f"ctrl/w{k}/A01.tif" for k in (1, 2, 3)]     # the folder separator stays
    assert [c.cell_id for c in mf._find_cells(rels, cmap, "/w{channel}/", [], [])] == ["ctrl/A01"]
    # a regular expression may match text that differs between cells: only the token goes
    cmap = mf.parse_channel_map("third=w3,actin=w2,dna=w1", per_file=True)
    rels = [f"A_{w}_z0{z}.tif" for z in (1, 2) for w in ("w1", "w2", "w3")]
    cells = mf._find_cells(rels, cmap, r"_(?P<channel>w\d)_z\d+\.tif$", [], [])
    assert sorted(c.cell_id for c in cells) == ["A_z01", "A_z02"]



def test_the_summary_states_the_shape_as_read_and_a_relative_labels_path(tmp_path, monkeypatch):
    """A (3, H, W) TIFF is read channel last: the summary says so (the shape column read 8x8x3
    for a channel-first file and a newcomer took it for a mistake); a relative labels CSV that is
    not there names the working directory it was read from."""
    src = tmp_path / "cf"
    for ci, cls in enumerate(("ctrl", "treated")):
        (src / cls).mkdir(parents=True)
        for well in _wells(4, "AB"[ci]):
            tifffile.imwrite(src / cls / f"{well}_c0.tif", np.moveaxis(_pixels(ci, 3), -1, 0), photometric="minisblack",
                             metadata={"axes": "CYX"})
    df = mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="third=2,actin=1,dna=0",
                           group_pattern=GROUP_RX, n_splits=2)
    assert df["shape"].eq(f"{SIZE}x{SIZE}x3").all()
    line = mf.summary(df).splitlines()[0]
    assert f"{SIZE} x {SIZE} px, 3 channel(s) as read" in line and "channel last" in line
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"labels CSV labels.csv does not exist .*working directory {tmp_path}"):
        mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0", labels="labels.csv",
                          group_column="well")


def test_the_shape_line_of_one_grey_file_per_channel():
    df = pd.DataFrame({"path": ["a_w3.tif;a_w2.tif;a_w1.tif"], "shape": ["8x8;8x8;8x8"]})
    line = mf.shape_line(df)
    assert "8 x 8 px, one grey file per channel as read" in line and "file token" in line and "last axis" not in line


def test_a_group_pattern_that_cuts_a_site_number_is_said(tmp_path):
    """'_s\\d' on B02_s10 gives B02_s1: sites 1, 10 and 11 fall into one group (the README's
    example did this). The manifest says so, and says it in the error when too few groups are
    left. With \\d+ every site is its own group and nothing is said."""
    src = tmp_path / "cells"
    for cls, wells in (("ctrl", ("A01", "A02")), ("treated", ("B01", "B02"))):
        (src / cls).mkdir(parents=True)
        for well in wells:
            for site in (1, 2, 10, 11):
                tifffile.imwrite(src / cls / f"{well}_s{site}_c0.tif", _pixels(site, 3))
    cut, whole = r"(?P<group>[A-Z]\d{2}_s\d)", r"(?P<group>[A-Z]\d{2}_s\d+)"
    df = mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0", group_pattern=cut, n_splits=2)
    assert df["group"].nunique() == 8 and df.groupby("label")["group"].nunique().tolist() == [4, 4]
    assert any("cut a number in 8 file(s)" in n and "\\d+" in n for n in df.attrs["notes"])
    with pytest.raises(data.DataError, match=r"(?s)has 4 group\(s\).*cut a number"):
        mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0", group_pattern=cut, n_splits=5)
    df2 = mf.build_manifest(src, normal="ctrl", abnormal="treated", channels="2,1,0", group_pattern=whole, n_splits=2)
    assert df2.groupby("label")["group"].nunique().tolist() == [8, 8]
    assert not any("cut a number" in n for n in df2.attrs["notes"])
