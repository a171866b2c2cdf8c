# Parley's front door. `make demo` and `make test` work on a fresh clone: they install
# what they need (a Python virtualenv, the Go-built test control plane) themselves.

SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PY_REQUIREMENTS := $(wildcard e2e/manifests/requirements.txt e2e/python/requirements.txt)
export PARLEY_OPERATOR_BIN ?= $(CURDIR)/target/debug/parley-operator
export PARLEY_GATEWAY_BIN ?= $(CURDIR)/target/debug/parley-gateway
export PARLEY_MOCK_LLM_BIN ?= $(CURDIR)/target/debug/parley-mock-llm

-include e2e/controlplane/controlplane.mk

.PHONY: help build release lint fmt crds render demo test test-rust test-python services bench chaos toolchain clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

toolchain: ## Check for (and install what can be installed of) the build tools
	@scripts/toolchain.sh

build: toolchain ## Debug build of every binary
	$(CARGO) build --workspace --bins

release: toolchain ## Optimised build of every binary
	$(CARGO) build --workspace --bins --release

fmt: ## Format the Rust code
	$(CARGO) fmt --all

lint: toolchain ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

crds: ## Regenerate the committed CRD YAML from the Rust types
	$(CARGO) run -q -p parley-operator -- crds > config/crd/parley-crds.yaml
	cp config/crd/parley-crds.yaml charts/parley/crds/parley-crds.yaml

render: ## Render the sample Chatbot to stdout
	$(CARGO) run -q -p parley-operator -- render -f config/samples

$(VENV)/.installed: $(PY_REQUIREMENTS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check $(addprefix -r ,$(PY_REQUIREMENTS))
	touch $@

demo: toolchain ## The whole path on embedded defaults: no cluster, no keys, no Redis
	@scripts/demo.sh

test: lint test-rust test-python ## Everything CI runs

services: ## Start the shared test services (Redis on 127.0.0.1:6379) unless they are running
	@scripts/services.sh

test-rust: toolchain services $(CONTROLPLANE_BIN)
	$(CARGO) test --workspace --no-fail-fast

test-python: $(VENV)/.installed build services
	$(PYTHON) -m pytest -q e2e/manifests
	$(PYTHON) -m pytest -q -c e2e/python/pytest.ini e2e/python

bench: toolchain ## Gateway vs nginx proxy_pass on this machine; writes BENCHMARKS.md (not in CI)
	@scripts/bench.sh

clean: ## Remove build outputs and the virtualenv
	$(CARGO) clean
	rm -rf $(VENV)
