# ece-plugin: two commands matter.
#   make demo   sets up .venv if needed, then runs the main job (`ece-plugin demo` on the bundled testbed)
#   make test   sets up both environments if needed, then lint, type check and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_TF5 := .venv-tf5
EASYEDITOR := easyeditor==0.0.1.dev0
PIP_FLAGS := -q --disable-pip-version-check
export PIP_NO_INPUT := 1

.PHONY: demo test setup lint typecheck pytest pytest-tf5 clean

setup: $(VENV)/.stamp $(VENV_TF5)/.stamp

# Default environment: PyPI easyeditor 0.0.1.dev0 (without its own pins, which cannot be met on Python 3.11)
# on top of a tested, fully pinned version set (transformers 4.46.3).
$(VENV)/.stamp: requirements/default.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements/default.txt
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps $(EASYEDITOR)
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

# Second environment: transformers 5.x (EasyEdit main's line) without easyeditor.
$(VENV_TF5)/.stamp: requirements/tf5.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV_TF5)
	$(VENV_TF5)/bin/pip install $(PIP_FLAGS) -r requirements/tf5.txt
	$(VENV_TF5)/bin/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	touch $@

demo: $(VENV)/.stamp
	$(VENV)/bin/ece-plugin demo

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check ece_plugin tests examples benchmarks

typecheck: $(VENV)/.stamp
	$(VENV)/bin/mypy ece_plugin

pytest: $(VENV)/.stamp
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

# The EasyEdit-independent suite under transformers 5.x (tests marked `easyeditor` skip themselves here).
pytest-tf5: $(VENV_TF5)/.stamp
	$(VENV_TF5)/bin/python -m pytest -q -p no:cacheprovider -m "not easyeditor" tests

test: lint typecheck pytest pytest-tf5

clean:
	rm -rf $(VENV) $(VENV_TF5) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
