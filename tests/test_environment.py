"""pyproject.toml, environment.yml and constraints.txt pin the same versions."""
import re
import tomllib

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
    deps = py["dependencies"] + py["optional-dependencies"]["dev"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    assert _pins(deps) == _pins(pip)


def test_constraints_agree_with_pyproject():
    py = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = py["dependencies"] + py["optional-dependencies"]["dev"]
    cons = {name: v for (name, _), v in _pins((REPO / "constraints.txt").read_text().splitlines()).items()}
    for (name, marker), version in _pins(deps).items():
        if "!=" in marker:  # the non-x86_64 tensorflow line is not installed here
            continue
        norm = name.replace("_", "-")
        found = {k.replace("_", "-"): v for k, v in cons.items()}
        assert found.get(norm) == version, f"{name}: pyproject {version}, constraints {found.get(norm)}"
