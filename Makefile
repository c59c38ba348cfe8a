# kith: make run | make test | make lint | make lock
#
# Everything installs into ./.venv from the pinned locks (requirements*.lock).  An
# install is skipped when a stamp for the current lock and pyproject.toml exists, so
# repeated runs start at once.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

RUN_LOCK  := requirements.lock
TEST_LOCK := requirements-test.lock

# `make test PYTEST_ARGS="-k lookup -x"` passes arguments to pytest.
PYTEST_ARGS ?=
# `make lock PIP_COMPILE_ARGS=--upgrade` moves every pin to the newest release.
PIP_COMPILE_ARGS ?=
PIP_COMPILE := $(VENV)/bin/pip-compile --quiet --strip-extras --no-emit-index-url \
	--no-emit-find-links --no-emit-trusted-host $(PIP_COMPILE_ARGS)

# A stamp per lock, named by a hash of that lock, pyproject.toml (entry points) and the
# compiled probe's source and build (`pip install -e .` builds it into kith/).
stamp = $(VENV)/.installed-$(shell cat $(1) pyproject.toml setup.py kith/_probe.c | sha256sum | cut -c1-16)
RUN_STAMP  = $(call stamp,$(RUN_LOCK))
TEST_STAMP = $(call stamp,$(TEST_LOCK))

# Synapse for the end-to-end tests (tests/e2e) lives in its own venv, never in .venv.
SYNAPSE_VENV  := .venv-synapse
SYNAPSE_LOCK  := requirements-synapse.lock
SYNAPSE_STAMP  = $(SYNAPSE_VENV)/.installed-$(shell cat $(SYNAPSE_LOCK) | sha256sum | cut -c1-16)
# matrix-sydent 2.6.1 for the import-sydent test (tests/e2e), in its own venv too.
SYDENT_VENV   := .venv-sydent
SYDENT_LOCK   := requirements-sydent.lock
SYDENT_STAMP   = $(SYDENT_VENV)/.installed-$(shell cat $(SYDENT_LOCK) | sha256sum | cut -c1-16)
# matrix-js-sdk (the SDK behind Element) and the node 22 it needs, for the Element tests
# (tests/e2e): installed by `npm ci` from tests/e2e/js/package-lock.json.
JS_DIR   := tests/e2e/js
JS_STAMP  = $(JS_DIR)/node_modules/.installed-$(shell cat $(JS_DIR)/package.json \
	$(JS_DIR)/package-lock.json | sha256sum | cut -c1-16)
NPM      ?= npm

.PHONY: run test lint lock install install-test install-synapse install-sydent install-js \
	clean

run: install
	exec $(PY) -m kith

test: install-test install-synapse install-sydent install-js
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Both linters run even when the first one complains; either failing fails the target.
lint: install-test
	@status=0; \
	echo "ruff check ."; $(VENV)/bin/ruff check . || status=1; \
	echo "mypy --strict kith tests"; $(VENV)/bin/mypy --strict kith tests || status=1; \
	exit $$status

install: $(PY)
	@if [ ! -f "$(RUN_STAMP)" ]; then \
		set -e; \
		echo "installing $(RUN_LOCK) into $(VENV)"; \
		$(PIP) install --quiet -r $(RUN_LOCK); \
		$(PIP) install --quiet --no-deps -e .; \
		touch "$(RUN_STAMP)"; \
	fi

install-test: $(PY)
	@if [ ! -f "$(TEST_STAMP)" ]; then \
		set -e; \
		echo "installing $(TEST_LOCK) into $(VENV)"; \
		$(PIP) install --quiet -r $(TEST_LOCK); \
		$(PIP) install --quiet --no-deps -e .; \
		touch "$(TEST_STAMP)"; \
	fi

install-synapse:
	@if [ ! -f "$(SYNAPSE_STAMP)" ]; then \
		set -e; \
		echo "installing $(SYNAPSE_LOCK) into $(SYNAPSE_VENV)"; \
		[ -x $(SYNAPSE_VENV)/bin/python ] || $(PYTHON) -m venv $(SYNAPSE_VENV); \
		$(SYNAPSE_VENV)/bin/python -m pip --disable-pip-version-check install --quiet \
			-r $(SYNAPSE_LOCK); \
		touch "$(SYNAPSE_STAMP)"; \
	fi

install-sydent:
	@if [ ! -f "$(SYDENT_STAMP)" ]; then \
		set -e; \
		echo "installing $(SYDENT_LOCK) into $(SYDENT_VENV)"; \
		[ -x $(SYDENT_VENV)/bin/python ] || $(PYTHON) -m venv $(SYDENT_VENV); \
		$(SYDENT_VENV)/bin/python -m pip --disable-pip-version-check install --quiet \
			-r $(SYDENT_LOCK); \
		touch "$(SYDENT_STAMP)"; \
	fi

# npm may run on an older node (Debian 12 has 18) and would warn that the SDK wants
# node >= 22: that is the node this step installs, and the one the tests run the SDK with.
install-js:
	@if [ ! -f "$(JS_STAMP)" ]; then \
		set -e; \
		command -v $(NPM) >/dev/null || { \
			echo "npm not found: on Debian, apt-get install npm" >&2; exit 1; }; \
		echo "installing $(JS_DIR)/package-lock.json into $(JS_DIR)/node_modules"; \
		(cd $(JS_DIR) && $(NPM) ci --no-audit --no-fund --loglevel=error); \
		touch "$(JS_STAMP)"; \
	fi

$(PY):
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "cannot create $(VENV): on Debian, apt-get install python3-venv" >&2; exit 1; }

# The test lock is resolved first; the runtime lock is constrained to it, so the
# two never pin a package differently.
lock: $(PY)
	@$(VENV)/bin/pip-compile --version >/dev/null 2>&1 || $(PIP) install --quiet pip-tools
	$(PIP_COMPILE) --extra test --output-file $(TEST_LOCK) pyproject.toml
	$(PIP_COMPILE) --constraint $(TEST_LOCK) --output-file $(RUN_LOCK) pyproject.toml

clean:
	rm -rf $(VENV) $(SYNAPSE_VENV) $(SYDENT_VENV) $(JS_DIR)/node_modules build *.egg-info .pytest_cache .mypy_cache .ruff_cache kith/*.so
