# Two set-up commands: `make run` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ./filedock-data
API_LISTEN ?= tcp:7480:interface=127.0.0.1
DATA_LISTEN ?= tcp:7481:interface=127.0.0.1:backlog=1024

.PHONY: run test test-ceph soak e2e bench install clean web

# Node peers (tus-js-client, esbuild, @tus/server) come from the npm registry with each folder's
# lockfile (`npm ci`). Without npm, the tests that need them skip and say how to install it
# (under CI they fail instead); `make run` never needs Node: the upload page's bundle is checked in.
NPM := $(shell command -v npm 2>/dev/null)
NODE_TEST_PEERS := $(if $(NPM),tests/node/node_modules/.installed web/node_modules/.installed)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-e2e: $(VENV)/.installed-test
	$(PY) -m pip install -q -e '.[e2e]'
	touch $@

# the bench starts the same engines as the tests (tests/engines: PostgreSQL, SeaweedFS), so it has the test extras too
$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/filedock serve --data-dir $(DATA_DIR) --api-listen '$(API_LISTEN)' --data-listen '$(DATA_LISTEN)' --issue-admin-token

%/node_modules/.installed: %/package-lock.json
	cd $* && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# the upload page (web/src: Uppy, bundled by esbuild) into src/filedock/server/static/, checked in
web: web/node_modules/.installed
	node web/build.mjs

test: $(VENV)/.installed-test $(NODE_TEST_PEERS)
	$(PY) -m pytest -q -m 'not soak and not e2e and not ceph'

# S3 conformance against a private Ceph RADOS Gateway (needs Debian's ceph-mon ceph-osd radosgw)
test-ceph: $(VENV)/.installed-test
	$(PY) -m pytest -q -m ceph

e2e: $(VENV)/.installed-e2e
	@command -v chromium >/dev/null || { echo "make e2e needs Debian's chromium: apt-get install chromium"; exit 1; }
	$(PY) -m pytest -q -m e2e tests/e2e

soak: $(VENV)/.installed-test
	$(PY) -m pytest -q -m soak

bench: $(VENV)/.installed-bench $(if $(NPM),benchmarks/node/node_modules/.installed)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
