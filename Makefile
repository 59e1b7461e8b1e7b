# ferrotune: `make demo` runs the main job on a built-in tiny model; `make test` runs every check.
# The Python environment is created once in $(VENV) and reused by later runs and fresh clones
# (torch is several GB; CI must not download it again). Cargo's build folder is shared the same way.

SHELL := /bin/bash
VENV ?= $(HOME)/.cache/ferrotune/venv
export CARGO_TARGET_DIR ?= $(HOME)/.cache/ferrotune/target
PY := $(VENV)/bin/python
PY_DIRS := $(wildcard python tests bench examples)
REQS_HASH := $(shell sha256sum requirements-dev.txt | cut -c1-16)
ENV_STAMP := $(VENV)/.ferrotune-env-$(REQS_HASH)
export PYO3_PYTHON := $(PY)
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)

.PHONY: demo test env native wheel bench lint rust-test py-test clean

demo: native
	$(PY) -m ferrotune quickstart

test: native lint rust-test py-test

env: $(ENV_STAMP)

$(ENV_STAMP): requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@rm -f $(VENV)/.ferrotune-env-* && touch $@

# Builds the native module in release mode and installs the package into the environment.
native: env
	$(VENV)/bin/maturin develop --release -q

wheel: env
	$(VENV)/bin/maturin build --release

lint: env
	cargo fmt --all --check
	cargo clippy --all-targets -q -- -D warnings
	cargo clippy --all-targets --features python -q -- -D warnings
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)
	$(PY) -m mypy.stubtest ferrotune._native --allowlist .stubtest-allowlist

rust-test: env
	cargo test -q

py-test: native
	$(PY) -m pytest tests

bench: native
	$(PY) bench/run_all.py

clean:
	rm -rf $(CARGO_TARGET_DIR) python/ferrotune/*.so
