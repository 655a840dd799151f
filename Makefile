# The two commands a new user needs: `make setup`, then `make demo`. `make test` is what CI runs;
# `make test-fast` the tests that train nothing and start no job (pytest's `slow` marker, which
# tests/conftest.py sets), for the edit-test loop.
# `make browser` installs Debian's chromium for the test that renders report.html headless.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast browser

# setup installs the pinned locks, then the project itself, editable, so that tests and bench/
# import job, export, edge, storage and common from this checkout; its build backend is the venv's
# own setuptools (pyproject.toml), so that step fetches nothing.
setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

demo:
	$(PY) -m demo

# pytest-xdist: one worker per core, each test file on one worker (its module fixtures built
# once); while one worker trains, the other's tests wait on subprocesses, storage and sleeps.
test:
	$(PY) -m pytest -n auto --dist loadfile

test-fast:
	$(PY) -m pytest -m "not slow"

# Debian's chromium, through apt (sudo unless root); a machine without apt-get is told so and the
# test that needs it skips, saying why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { \
	  command -v apt-get >/dev/null || { echo "no chromium and no apt-get: install Chromium yourself (the report test skips without it)"; exit 0; }; \
	  $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }
