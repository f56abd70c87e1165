# cattle: `make run` serves the API on embedded SQLite; `make test` installs
# what the suite needs (system packages too, via apt when root) and runs it.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# Debian packages the test suite starts for real: PostgreSQL (primary and
# streaming replicas), Patroni + etcd (HA mode), HAProxy (the lab's front),
# wrk (benchmarks), and for the anycast front BIRD 2 (the router), ExaBGP
# (the nodes' sidecars, whose healthcheck runs curl) and nftables (pinning).
# The lab runs its own bird with its own config and control socket inside
# its own network namespace; Debian's bird.service (host namespace,
# /etc/bird, /run/bird) is neither used nor touched. The image tests
# (tests/ship/) build the Dockerfile with buildah over a Debian base made
# by debootstrap: no Docker engine and no registry needed. The workshop's
# tests drive `make demo` in a real terminal (tmux) and photograph
# Prometheus's graph page (headless chromium).
SYSTEM_PACKAGES := postgresql patroni etcd-server haproxy wrk bird2 exabgp nftables curl buildah debootstrap prometheus tmux chromium

export UV_PYTHON_DOWNLOADS := never
# Compile the dependencies' bytecode when installing them. Where
# PYTHONDONTWRITEBYTECODE is set (CI images often do), Python never caches
# it, and every process (each node the suite starts) compiles FastAPI,
# SQLAlchemy and the rest from source again before it can serve.
export UV_COMPILE_BYTECODE := 1
# ... and pytest caches nothing either: each pytest process (each xdist
# worker, each suite a drill runs in a copy) would rewrite the asserts of
# the test modules and of its plugins' hundreds of modules again before
# collecting. Our own commands may write __pycache__ (git ignores it).
unexport PYTHONDONTWRITEBYTECODE
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(HOME)/.local/bin/uv
endif
PY := .venv/bin/python
VENV_STAMP := .venv/.synced

.PHONY: help run test test-fast lint fmt sysdeps venv clean lab lab-down demo bench-telemetry bench-efficiency failover scaleout nodeloss nodeloss-anycast lab-anycast hardening-report image fork fork-update

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-22s %s\n", $$1, $$2}'

# Debian's python3 is "externally managed" (PEP 668): pip refuses --user
# installs unless told that this one, into ~/.local, is meant.
PIP_USER_FLAGS := --user --quiet $(shell python3 -c 'import os, sysconfig; print("--break-system-packages" if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else "")' 2>/dev/null)

$(UV):
	@echo "uv not found: installing it for this user with pip"
	@python3 -m pip --version >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "python3 has no pip: installing python3-pip"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip; \
	else \
	  echo "python3 has no pip: install it (sudo apt-get install python3-pip) or uv, then run make again" >&2; exit 1; \
	fi
	PIP_ROOT_USER_ACTION=ignore python3 -m pip install $(PIP_USER_FLAGS) uv

$(VENV_STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

venv: $(VENV_STAMP) ## create .venv from uv.lock

sysdeps: ## install the Debian packages the suite needs (apt, when root)
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else \
	  echo "missing system packages:$$missing (install them: sudo apt-get install$$missing)" >&2; \
	  case "$$(echo "$${CI:-}" | tr A-Z a-z)" in ""|0|false|no|off) ;; *) exit 1;; esac; \
	  echo "tests that need them will be skipped" >&2; \
	fi

run: $(VENV_STAMP) ## serve the API on http://127.0.0.1:8000 (embedded SQLite under ./var)
	$(PY) -m service migrate
	exec $(PY) -m service serve

lint: $(VENV_STAMP) ## ruff (lint + format check), mypy, and the import layers (lint-imports)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy service
	.venv/bin/mypy deploy loadtests
	.venv/bin/lint-imports

fmt: $(VENV_STAMP) ## format and fix what ruff can
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# The in-process tests (no PostgreSQL, no subprocess nodes, no clusters, no
# image build, no fork drill: tests/conftest.py marks them) share no port,
# file or process, and run two at a time. The rest start real processes and
# run three files at a time on the two cores (--dist loadfile: a file's tests
# in order, on one worker, its fixtures shared): they wait on processes they
# start much of the time, so a third worker fills the cores they leave
# idle. Nothing of theirs is shared either: ports are free ports, each lab's
# namespaces, cgroups and nftables tables carry its own id, each worker
# starts its own PostgreSQL.
FAST_TESTS := -n 2 -m inprocess
SYSTEM_TESTS := -n 3 --dist loadfile -m "not inprocess"

test: sysdeps $(VENV_STAMP) lint ## everything: lint, unit, API, system, lab and experiment smoke tests
	$(PY) -m pytest -q $(FAST_TESTS)
	$(PY) -m pytest $(SYSTEM_TESTS)

test-fast: $(VENV_STAMP) lint ## lint + unit + API tests on SQLite (the inner loop, under a minute)
	$(PY) -m pytest -q $(FAST_TESTS)

# The tests that try hostile input and faults; each records its cases (tests/hardening.py).
HARDENING_TESTS := tests/notes/test_bad_input.py tests/idempotency/test_pool.py \
	tests/system/test_exposed.py tests/system/test_database_faults.py \
	tests/system/test_database_outage.py \
	tests/lab/test_lab.py::test_a_burst_of_keyed_creates_through_haproxy_is_all_answered

hardening-report: sysdeps $(VENV_STAMP) ## run the hardening tests -> docs/results/hardening.* (the table in docs/hardening.md)
	HARDENING_WRITE=1 $(PY) -m pytest -q $(HARDENING_TESTS)
	DOCS_WRITE=1 $(PY) -m pytest -q tests/test_docs.py

lab: sysdeps $(VENV_STAMP) ## a local cluster: 3 nodes, PostgreSQL + 1 replica, HAProxy
	$(PY) -m deploy.lab up --nodes 3 --backend postgres --replicas 1

lab-down: $(VENV_STAMP) ## stop the local cluster
	$(PY) -m deploy.lab down

FRONT ?= haproxy
demo: sysdeps $(VENV_STAMP) ## the workshop: 3 nodes under steady load, Prometheus, live view [FRONT=anycast]; Ctrl+C ends it
	$(PY) -m deploy.lab.demo --front $(FRONT) $(if $(RUN_DIR),--run-dir $(RUN_DIR))

bench-telemetry: sysdeps $(VENV_STAMP) ## telemetry overhead benchmark -> docs/results/telemetry-overhead.*
	$(PY) -m loadtests.benchmarks.telemetry --together --rounds 8

bench-efficiency: sysdeps $(VENV_STAMP) ## req/s per core: cattle vs bare FastAPI, Starlette, raw ASGI -> docs/results/efficiency.*
	$(PY) -m loadtests.benchmarks.efficiency --rounds 9

failover: sysdeps $(VENV_STAMP) ## Patroni failover under write load -> docs/results/failover.*
	$(PY) -m loadtests.experiments.failover

scaleout: sysdeps $(VENV_STAMP) ## throughput of 2, 4, 8 nodes in pairs beside 1, USL fit -> docs/results/scaleout.*
	$(PY) -m loadtests.experiments.scaleout

nodeloss: sysdeps $(VENV_STAMP) ## drain / kill -9 / restart under load, audit -> docs/results/nodeloss.*
	$(PY) -m loadtests.experiments.nodeloss

nodeloss-anycast: sysdeps $(VENV_STAMP) ## the same drill on the anycast front (BIRD, ExaBGP, pinning; SQLite) -> docs/results/nodeloss-anycast.*
	$(PY) -m loadtests.experiments.nodeloss --front anycast

lab-anycast: sysdeps $(VENV_STAMP) ## a local cluster on the anycast front: BIRD router with ECMP, 3 nodes with ExaBGP sidecars
	$(PY) -m deploy.lab up --nodes 3 --front anycast

image: sysdeps $(VENV_STAMP) ## build the Dockerfile here: buildah over a debootstrap Debian base (no engine, no registry)
	$(PY) -m tests.ship.images

fork: $(VENV_STAMP) ## a named copy of this template: make fork DEST=../ledger NAME=ledger [PORT=8000] [REF=v0.2.0]
	@test -n "$(DEST)" -a -n "$(NAME)" || { echo "usage: make fork DEST=../ledger NAME=ledger [PORT=8000] [REF=tag]" >&2; exit 2; }
	$(PY) -m deploy.fork copy "$(DEST)" --name "$(NAME)" $(if $(PORT),--port $(PORT)) $(if $(REF),--ref $(REF))

fork-update: $(VENV_STAMP) ## in a fork: pull a newer template version in [REF=v0.3.0], then check for conflicts
	$(PY) -m deploy.fork update . $(if $(REF),--ref $(REF))

clean: ## remove the environment and local data
	rm -rf .venv var run .pytest_cache .mypy_cache .ruff_cache
