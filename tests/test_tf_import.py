"""cellstudy.tf_import: TensorFlow's two pre-logging lines are kept off stderr, nothing else."""
import os
import subprocess
import sys
import textwrap

from cellstudy import tf_import

FAKE_TF = textwrap.dedent('''
    import os
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1.2   99 port.cc:153] oneDNN custom operations are on. You may see ...\\n")
    os.write(2, b"E0000 something TensorFlow wants you to see\\n")
    if os.environ.get("FAKE_TF_FAILS"):
        raise ImportError("fake tensorflow cannot load")
''')
SCRIPT = ("import sys\nfrom cellstudy import tf_import\ntf_import.import_quietly()\n"
          "print('after', file=sys.stderr)\n")


def _run(tmp_path, **env):
    pkg = tmp_path / "fake" / "tensorflow"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(FAKE_TF)
    e = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    e.pop("TF_CPP_MIN_LOG_LEVEL", None) if "TF_CPP_MIN_LOG_LEVEL" not in env else None
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=e, timeout=120)


def test_the_two_lines_are_dropped_and_the_rest_passed_on(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "absl::InitializeLog" not in r.stderr and "oneDNN custom operations" not in r.stderr
    assert "E0000 something TensorFlow wants you to see" in r.stderr
    assert r.stderr.rstrip().endswith("after")               # stderr is the terminal's again
    # TF_CPP_MIN_LOG_LEVEL=0: show everything
    r = _run(tmp_path, TF_CPP_MIN_LOG_LEVEL="0")
    assert "absl::InitializeLog" in r.stderr and "oneDNN custom operations" in r.stderr


def test_an_import_error_is_raised_with_what_tensorflow_wrote(tmp_path):
    r = _run(tmp_path, FAKE_TF_FAILS="1")
    assert r.returncode == 1 and "ImportError: fake tensorflow cannot load" in r.stderr
    assert "E0000 something TensorFlow wants you to see" in r.stderr and "oneDNN" not in r.stderr


def test_is_noise():
    assert tf_import.is_noise("I0000 00:00:1796644298.537130   28418 port.cc:153] oneDNN custom operations are on.")
    assert not tf_import.is_noise("E0000 oneDNN failed")
    assert tf_import.is_noise("I0000 00:00:1796693589.071322   12681 cpu_feature_guard.cc:227] This TensorFlow binary "
                              "is optimized to use available CPU instructions in performance-critical operations.")
    assert not tf_import.is_noise("E0000 00:00:1796693589.071322   12681 cpu_feature_guard.cc:227] This TensorFlow binary")


def test_a_child_holding_the_pipe_does_not_write_into_another_file(tmp_path):
    # a process started while TensorFlow loads inherits fd 2 (the pipe) and writes after the import
    # has returned: its line reaches stderr, not a file the program opened since
    pkg = tmp_path / "fake" / "tensorflow"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time, os; time.sleep(1.5); os.write(2, b'child late line\\\\n')"])
    '''))
    script = SCRIPT.replace("tf_import.import_quietly()\n", "tf_import.TIMEOUT = 0\ntf_import.import_quietly()\n"
                            "f = open(sys.argv[1], 'w')\nimport time; time.sleep(3)\nf.write('mine'); f.close()\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    out = tmp_path / "other.txt"
    r = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "mine" and "child late line" in r.stderr


def test_no_stderr_at_all(tmp_path):
    r = _run_closed_stderr(tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "imported"


def _run_closed_stderr(tmp_path):
    pkg = tmp_path / "fake" / "tensorflow"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    code = "import os, sys\nos.close(2)\nfrom cellstudy import tf_import\ntf_import.import_quietly()\nprint('imported')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


MARKER_TF = textwrap.dedent('''
    import os
    open(os.environ["FAKE_TF_MARKER"], "w").close()
''')


def _cli_with_marker_tf(tmp_path, argv):
    """``cellstudy.cli.main(argv)`` in a fresh process whose ``tensorflow`` only leaves a marker
    file when imported: (return code, stderr, whether TensorFlow was imported)."""
    pkg = tmp_path / "marker" / "tensorflow"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(MARKER_TF)
    marker = tmp_path / "tf_was_imported"
    e = {**os.environ, "PYTHONPATH": f"{tmp_path / 'marker'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
         "FAKE_TF_MARKER": str(marker)}
    code = f"import sys\nfrom cellstudy import cli\nsys.exit(cli.main({argv!r}))\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)
    return p.returncode, p.stderr, marker.exists()


def test_a_wrong_path_fails_before_tensorflow_loads(tmp_path):
    nope = str(tmp_path / "nope")
    (tmp_path / "nope.csv").write_text("file\n")              # a manifest given where the run goes
    runs = tmp_path / "runs"                                   # a folder of runs given instead of one run
    (runs / "default-20261207-120000").mkdir(parents=True)
    (runs / "default-20261207-120000" / "study.yaml").write_text("name: default\n")
    for argv, said in (
            (["predict", nope, "bbbc021-unseen", "-o", str(tmp_path / "out")], f"run folder {nope} does not exist"),
            (["export", nope, "--network", "vit", "-o", str(tmp_path / "x.zip")], f"run folder {nope} does not exist"),
            (["test-package", str(tmp_path / "vit.zip")], "vit.zip does not exist"),
            (["pretrain", "--backbone", "cnn3", "--cohort", "rxrx1-cells", "--serves", "bbbc021-paper",
              "-o", str(tmp_path / "nope.csv")], "must end in .weights.h5"),
            (["train-network", nope, "--network", "vit"], f"run folder {nope} does not exist"),
            (["predict", str(tmp_path / "nope.csv"), "bbbc021-unseen", "-o", str(tmp_path / "out")],
             "nope.csv is a file, not a run folder"),
            (["replicate", str(runs), "--network", "vit", "--seeds", "1"], "give one of them"),
            (["predict", str(runs), "bbbc021-unseen", "-o", str(tmp_path / "out")],
             f"run folders: {runs / 'default-20261207-120000'}: give one of them")):
        rc, err, tf = _cli_with_marker_tf(tmp_path, argv)
        assert rc == 2 and said in err, (argv, err)
        assert not tf, f"{argv[0]} imported TensorFlow before checking its path"
    assert not (tmp_path / "out").exists()


def test_a_right_path_goes_on_to_load_tensorflow(tmp_path):
    # the positive control of the test above: past the preflight, TensorFlow is imported
    pkg = tmp_path / "vit.zip"
    pkg.write_bytes(b"not a zip")
    rc, err, tf = _cli_with_marker_tf(tmp_path, ["test-package", str(pkg)])
    assert tf, err
