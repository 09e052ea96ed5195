# ece-plugin: two commands matter.
#   make demo   runs the main job (`ece-plugin demo` on the bundled testbed): in .venv-main with EasyEdit main
#               where EasyEdit main is available (ECE beside EasyEdit's own ROME, MEMIT and AlphaEdit), otherwise
#               in .venv with the PyPI easyeditor (ECE only: that easyeditor cannot run on a CPU)
#   make test   sets up both environments if needed, then lint, type check and the whole test suite in each,
#               and ends by saying which EasyEdit lines were tested and how many tests ran in each
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_MAIN := .venv-main
EASYEDITOR := easyeditor==0.0.1.dev0
PIP_FLAGS := -q --disable-pip-version-check
export PIP_NO_INPUT := 1

# EasyEdit main is not a package: .venv-main imports it from EASYEDIT_MAIN, a folder holding `easyeditor/`
# (give your own: `make test EASYEDIT_MAIN=/path/to/EasyEdit`). Default: the snapshot in ../shared when it
# exists, otherwise a clone of EasyEdit main at the pinned commit (the snapshot's) into .easyedit-main/, made
# where git and the network allow; without either, the tests that need EasyEdit main skip and say why.
EASYEDIT_MAIN_REPO := https://github.com/zjunlp/EasyEdit
EASYEDIT_MAIN_COMMIT := 14cea8245f06715684592ab55184939b99d70784
EASYEDIT_MAIN_SHARED := ../shared/easyedit-main/src
EASYEDIT_MAIN_CLONE := .easyedit-main
EASYEDIT_MAIN ?= $(if $(wildcard $(EASYEDIT_MAIN_SHARED)/easyeditor/__init__.py),$(EASYEDIT_MAIN_SHARED),$(EASYEDIT_MAIN_CLONE))
HAVE_MAIN = test -f "$(EASYEDIT_MAIN)/easyeditor/__init__.py"
REPORTS := build/test-reports

.PHONY: demo demo-main demo-pypi test setup lint typecheck pytest pytest-main easyedit-main easyedit-main-path \
	test-summary clean

setup: $(VENV)/.stamp $(VENV_MAIN)/.stamp

# PyPI line: easyeditor 0.0.1.dev0 (without its own pins, which cannot be met on Python 3.11) on top of a
# tested, fully pinned version set (transformers 4.46.3). Lint and type check run here too.
$(VENV)/.stamp: requirements/default.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements/default.txt
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps $(EASYEDITOR)
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

# EasyEdit main's line: the pinned set EasyEdit main needs on a CPU (transformers 5.5.4; requirements/easyedit-main.txt).
$(VENV_MAIN)/.stamp: requirements/easyedit-main.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV_MAIN)
	$(VENV_MAIN)/bin/pip install $(PIP_FLAGS) -r requirements/easyedit-main.txt
	$(VENV_MAIN)/bin/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

# EasyEdit main's source: nothing to do when EASYEDIT_MAIN holds easyeditor/; when it is the clone folder, clone
# the pinned commit (a failed clone leaves nothing behind and is not an error: EasyEdit main is then absent).
easyedit-main:
	@if ! $(HAVE_MAIN) && [[ "$(EASYEDIT_MAIN)" == "$(EASYEDIT_MAIN_CLONE)" ]]; then \
	    echo "EasyEdit main: cloning $(EASYEDIT_MAIN_REPO) at $(EASYEDIT_MAIN_COMMIT) into $(EASYEDIT_MAIN_CLONE)/"; \
	    rm -rf "$(EASYEDIT_MAIN_CLONE).tmp"; \
	    if GIT_TERMINAL_PROMPT=0 timeout 600 git clone -q --filter=blob:none --no-checkout "$(EASYEDIT_MAIN_REPO)" "$(EASYEDIT_MAIN_CLONE).tmp" \
	        && git -C "$(EASYEDIT_MAIN_CLONE).tmp" -c advice.detachedHead=false checkout -q "$(EASYEDIT_MAIN_COMMIT)"; then \
	        mv "$(EASYEDIT_MAIN_CLONE).tmp" "$(EASYEDIT_MAIN_CLONE)"; \
	    else \
	        rm -rf "$(EASYEDIT_MAIN_CLONE).tmp"; \
	        echo "EasyEdit main: could not clone it (no git or no network); its tests skip, the demo runs without its baselines"; \
	    fi; \
	fi

# Put EASYEDIT_MAIN on .venv-main's import path (a .pth file), or take it off when there is none.
easyedit-main-path: $(VENV_MAIN)/.stamp easyedit-main
	@pth="$$($(VENV_MAIN)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/easyedit_main.pth"; \
	if $(HAVE_MAIN); then \
	    (cd "$(EASYEDIT_MAIN)" && pwd -P) > "$$pth"; \
	    echo "EasyEdit main: $(EASYEDIT_MAIN) ($$(head -n1 "$(EASYEDIT_MAIN)/SNAPSHOT" 2>/dev/null || git -C "$(EASYEDIT_MAIN)" rev-parse HEAD 2>/dev/null || echo 'commit unknown')), on $(VENV_MAIN)'s import path"; \
	else \
	    rm -f "$$pth"; \
	    echo "EasyEdit main: none (no easyeditor/ in EASYEDIT_MAIN=$(EASYEDIT_MAIN)); the tests that need it skip"; \
	fi

demo: easyedit-main
	@if $(HAVE_MAIN); then \
	    $(MAKE) --no-print-directory demo-main; \
	else \
	    echo "EasyEdit main not found (EASYEDIT_MAIN=$(EASYEDIT_MAIN)): ECE only, with the PyPI easyeditor. For ECE beside EasyEdit's ROME, MEMIT and AlphaEdit: git clone $(EASYEDIT_MAIN_REPO) && make demo EASYEDIT_MAIN=/path/to/EasyEdit"; \
	    $(MAKE) --no-print-directory demo-pypi; \
	fi

demo-main: easyedit-main-path
	$(VENV_MAIN)/bin/ece-plugin demo

demo-pypi: $(VENV)/.stamp
	$(VENV)/bin/ece-plugin demo

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check ece_plugin tests examples benchmarks

typecheck: $(VENV)/.stamp
	$(VENV)/bin/mypy ece_plugin

# The whole suite under the PyPI easyeditor 0.0.1.dev0 (transformers 4.46.3).
pytest: $(VENV)/.stamp
	@mkdir -p $(REPORTS)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -rs --junitxml=$(REPORTS)/pypi.xml tests

# The whole suite under EasyEdit main (transformers 5.5.4), less the line_independent checks of the shipped testbed
# models, which the PyPI line's suite runs (about 150 s on 2 cores). Where EasyEdit main is there it must import, so
# that none of its tests can skip for want of it.
pytest-main: easyedit-main-path
	@mkdir -p $(REPORTS)
	@if $(HAVE_MAIN); then \
	    $(VENV_MAIN)/bin/python -c 'from ece_plugin import easyedit as e; v = e.easyedit_version(); assert v == e.EASYEDIT_MAIN, f"EasyEdit main at $(EASYEDIT_MAIN) does not import in $(VENV_MAIN) (easyedit_version: {v})"'; \
	fi
	$(VENV_MAIN)/bin/python -m pytest -q -p no:cacheprovider -rs -m "not line_independent" --junitxml=$(REPORTS)/main.xml tests

test-summary:
	@$(VENV)/bin/python .ci/test_summary.py $(REPORTS)/pypi.xml $(REPORTS)/main.xml

test: lint typecheck pytest pytest-main
	@$(MAKE) --no-print-directory test-summary

clean:
	rm -rf $(VENV) $(VENV_MAIN) .venv-tf5 $(EASYEDIT_MAIN_CLONE) $(EASYEDIT_MAIN_CLONE).tmp build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Every results table of README.md and docs/ rendered from results/ (`make render CHECK=--check` only checks).
.PHONY: render
render: $(VENV)/.stamp
	$(VENV)/bin/python -m ece_plugin.lab.results $(CHECK)
