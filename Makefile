# The two newcomer commands: `make demo` and `make test`. Both create and reuse .venv.
# `make dist` builds what goes to other machines: the zerorun wheel (broker, agent, CLI, client
# library) and the zerorun.fleet collection tarball, both into $(DIST).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# two workers (pytest-xdist): the suite is mostly waiting on real processes; PYTEST_ARGS= runs it serially
PYTEST_ARGS ?= -n 2
DIST ?= dist

.PHONY: venv demo test unit integration sanity bench dist clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m zerorun.demo

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python tests/sanity/run_sanity.py

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

sanity: $(STAMP)
	$(BIN)/python tests/sanity/run_sanity.py

# setuptools builds in ./build: emptied before (no stale modules in the wheel) and after.
dist: $(STAMP)
	@mkdir -p $(DIST)
	rm -rf build $(DIST)/zerorun-[0-9]*.whl $(DIST)/zerorun-fleet-*.tar.gz
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir $(DIST) .
	rm -rf build
	$(BIN)/ansible-galaxy collection build --force --output-path $(DIST)
	@ls -1 $(DIST)/zerorun-[0-9]*.whl $(DIST)/zerorun-fleet-*.tar.gz

clean:
	rm -rf $(VENV) *.egg-info build dist
