# cellstudy: the two commands are `make study` and `make test`. Both set themselves up: a virtual
# environment under .venv/ installed from the pinned dependencies (reused while pyproject.toml and
# constraints.txt are unchanged) and MathJax under node_modules/ for the offline book.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: study test test-fast venv assets clean-venv

study: venv assets
	$(VENV)/bin/cellstudy run $(CONFIG)

test: venv assets
	$(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

# The fast tier (2-4 minutes on 2 cores, for the edit-test loop): the tests not marked slow.
test-fast: venv assets
	$(VENV)/bin/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "cellstudy needs Python 3.11, found " + sys.version' 
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,export]"
	$(VENV)/bin/python -m pip check
	touch $(STAMP)

assets: node_modules/mathjax/es5/tex-chtml.js

node_modules/mathjax/es5/tex-chtml.js: package.json
	npm install --no-audit --no-fund --silent
	touch $@

clean-venv:
	rm -rf $(VENV)
