"""pyproject.toml, environment.yml and constraints.txt pin the same versions; cellstudy turns on
TensorFlow's oneDNN CPU kernels."""
import json
import os
import platform
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import REPO


def _pins(lines):
    out = {}
    for s in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)==([^;\s]+)(.*)$", s)
        if m:
            out[(m.group(1).lower(), m.group(3).strip())] = m.group(2)
    return out


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = py["dependencies"] + py["optional-dependencies"]["dev"] + py["optional-dependencies"]["export"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    assert _pins(deps) == _pins(pip)


def test_constraints_agree_with_pyproject():
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = py["dependencies"] + py["optional-dependencies"]["dev"] + py["optional-dependencies"]["export"]
    cons = {name: v for (name, _), v in _pins((REPO / "constraints.txt").read_text().splitlines()).items()}
    for (name, marker), version in _pins(deps).items():
        if "!=" in marker:  # the non-x86_64 tensorflow line is not installed here
            continue
        norm = name.replace("_", "-")
        found = {k.replace("_", "-"): v for k, v in cons.items()}
        assert found.get(norm) == version, f"{name}: pyproject {version}, constraints {found.get(norm)}"


# ---- TensorFlow's oneDNN CPU kernels --------------------------------------------------------


def _onednn_in_fresh_process(env_value):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if env_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = env_value
    code = ("import json, os, cellstudy, tensorflow\n"
            "print(json.dumps([os.environ.get('TF_ENABLE_ONEDNN_OPTS'), cellstudy.onednn_enabled()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_cellstudy_sets_the_onednn_variable_unless_the_user_set_it():
    """The fast check (no TensorFlow in the fresh process): the variable TensorFlow will read."""
    code = ("import json, os, sys, cellstudy\n"
            "print(json.dumps([os.environ.get('TF_ENABLE_ONEDNN_OPTS'), 'tensorflow' in sys.modules]))")
    for env_value, expected in ((None, "1"), ("0", "0"), ("1", "1")):
        env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
        if env_value is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = env_value
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=300, check=True).stdout
        # set before TensorFlow is loaded (importing cellstudy does not load it)
        assert json.loads(out.strip().splitlines()[-1]) == [expected, False], env_value


@pytest.mark.slow  # two fresh processes import TensorFlow (~10-30 s on 2 loaded cores)
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's x86 kernels")
def test_importing_cellstudy_turns_on_onednn_unless_the_user_opted_out():
    # TensorFlow leaves oneDNN off on CPUs without AVX512-VNNI (this machine: AVX2), where it
    # makes training up to 6x faster; cellstudy turns it on, an explicit 0 wins.
    assert _onednn_in_fresh_process(None) == ["1", True]
    assert _onednn_in_fresh_process("0") == ["0", False]


def test_notebooks_import_cellstudy_before_tensorflow():
    # TF_ENABLE_ONEDNN_OPTS is read once, when TensorFlow loads: cellstudy must come first.
    pat = re.compile(r"^\s*(?:import|from)\s+(cellstudy|keras|tensorflow)\b", re.M)
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        src = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        first = [m.group(1) for m in pat.finditer(src)]
        if any(m in ("keras", "tensorflow") for m in first):
            assert first[0] == "cellstudy", f"{nb.name} imports {first[0]} before cellstudy"


def test_training_warns_when_tensorflow_came_first(monkeypatch):
    from cellstudy.learning import train
    from cellstudy.learning.distribute import resolve_strategy

    sinfo = resolve_strategy(None)
    monkeypatch.setattr(train, "onednn_enabled", lambda: False)
    monkeypatch.setattr(train, "_ONEDNN_WARNED", False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    with pytest.warns(RuntimeWarning, match="Import cellstudy first"):
        train._warn_if_onednn_off(sinfo)
    monkeypatch.setattr(train, "_ONEDNN_WARNED", False)
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # the user's opt-out: silent
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train._warn_if_onednn_off(sinfo)
