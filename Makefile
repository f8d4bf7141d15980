# Everything runs from a fresh clone with only Python 3.11+ and make:
# the first target that needs it creates .venv and installs the package.
# The interpreter .venv is made with, once (`make clean` to make it with another): PYTHON=... when given;
# else the system's /usr/bin/python3 where it can make one and compile the data plane (3.11+, ensurepip,
# Python.h: Debian's python3, python3-venv and python3-dev; `-m ensurepip --version` answers only where
# python3-venv installed ensurepip, and costs no venv made each time), the interpreter the container image runs
# (deploy/Containerfile), so that `make bench` measures what is shipped; else python3 on PATH.  Debian's
# python3 is one executable built with PGO and LTO: a handshake costs it 6-16 % less CPU than a python3
# that loads libpython3.x.so, as pyenv's and the python:3.x images' do (bench/HISTORY.md, "Which interpreter").
SYSTEM_PYTHON := /usr/bin/python3
PYTHON ?= $(shell $(SYSTEM_PYTHON) -c 'import os, sys, sysconfig; sys.exit(sys.version_info < (3, 11) or not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' >/dev/null 2>&1 \
	&& $(SYSTEM_PYTHON) -m ensurepip --version >/dev/null 2>&1 && echo $(SYSTEM_PYTHON) || echo python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The data plane compiled with mypyc (build_native.py), rebuilt when any of our modules changes
# (and tried again on the next make after a fallback to pure Python: the stamp marks success only).
# NATIVE_ARGS=--require fails the build instead of falling back to pure Python (CI does);
# PURE=1 on any target runs it with the compiled modules removed (same behaviour, more CPU per handshake).
NATIVE_ARGS ?=
NATIVE := $(VENV)/.native$(if $(PURE),-pure)
CONFIG ?= config.example.yaml

.PHONY: install setup native run demo test style types unit integration bench bench-quick image prometheusrule clean

# .venv is made once, with $(PYTHON); `make clean` to make it with another.  Not again when pyproject.toml
# changes: `venv` run over an existing one by another interpreter rewrites its pyvenv.cfg (home, version)
# and keeps its bin/python, a .venv that says one version and runs another.
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,fast]'
	@touch $@

install: $(NATIVE)

$(NATIVE): $(STAMP) build_native.py $(shell find lb -name '*.py' -o -name '*.c' -o -name '*.pyi')
	@rm -f $(VENV)/.native $(VENV)/.native-pure
	$(BIN)/python build_native.py $(if $(PURE),--remove,$(NATIVE_ARGS)) --stamp $@

native: $(NATIVE)

# Dev certificates: generated on first use, never committed.
certs/server.crt: | $(STAMP)
	$(BIN)/lb certs --out certs

# Dev-only secrets for config.example.yaml (${LB_COOKIE_KEY}, ${LB_ADMIN_TOKEN}):
# generated once per checkout into .dev/ (git-ignored). Variables already set in
# the environment win, so production keys never need to touch this file.
.dev/secrets.env: | $(STAMP)
	@mkdir -p .dev
	@printf 'LB_COOKIE_KEY=%s\nLB_ADMIN_TOKEN=%s\n' "$$($(BIN)/lb keygen)" "$$($(BIN)/lb keygen)" > $@
	@echo "wrote dev secrets to $@"

# What `make run` and `make demo` prepare, without starting anything (.venv, dev certs, dev secrets).
setup: $(NATIVE) certs/server.crt .dev/secrets.env

run: $(NATIVE) certs/server.crt .dev/secrets.env
	$(BIN)/python -m backends_demo.stack --config $(CONFIG) --env-file .dev/secrets.env

demo: $(NATIVE) certs/server.crt .dev/secrets.env
	$(BIN)/python -m backends_demo.stack --config $(CONFIG) --env-file .dev/secrets.env --demo

style: $(STAMP)
	$(BIN)/ruff check lb backends_demo bench tests build_native.py

types: $(STAMP)
	$(BIN)/mypy --strict lb

unit: $(NATIVE)
	$(BIN)/pytest -q tests/unit

integration: $(NATIVE)
	$(BIN)/pytest -q tests/integration

# Three test processes (pytest-xdist), each taking whole files, so a module's shared stack starts once:
# most of a test's time is waiting on real processes and deadlines, so three share 2 cores well.  On a
# slow night of the 2-core VM the suite took 434-446 s with three, 524-551 s with two (which, with the
# set-up, came to ten minutes), using about 1.55 cores on average.  TEST_JOBS=0 runs them all in this process.
TEST_JOBS ?= 3

test: style types $(NATIVE)
	PYTHONASYNCIODEBUG=1 $(BIN)/pytest -q -n $(TEST_JOBS) --dist loadfile

# A benchmark, not a test: direct vs balancer (vs haproxy when installed), one table.
# BENCH_ARGS="--json bench.json" also writes the numbers.
bench: $(NATIVE)
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: $(NATIVE)
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

# Opt-in, not part of `make test` (needs root, podman, mmdebstrap, the Debian archive and PyPI):
# builds deploy/Containerfile with podman from an mmdebstrap'd Debian base, no registry needed,
# then smoke-tests it (lb --version, lb validate of the deploy config, lb run as PID 1 until SIGTERM).
# 1-2 min from nothing, ~20 s when nothing changed. See README "Container image".
image:
	deploy/image/build.sh

# The alert rules as the Prometheus Operator's PrometheusRule (deploy/observability/prometheusrule.py).
prometheusrule:
	$(PYTHON) deploy/observability/prometheusrule.py > deploy/kubernetes/overlays/prometheus-operator/prometheusrule.yaml

clean:
	rm -rf $(VENV) .dev .mypy_cache .ruff_cache .pytest_cache .hypothesis
