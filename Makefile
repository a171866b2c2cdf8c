# Parley's front door. `make demo` and `make test` work on a fresh clone: they install
# what they need (a Python virtualenv, the Go-built test control plane) themselves.

SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PY_REQUIREMENTS := $(wildcard e2e/manifests/requirements.txt e2e/python/requirements.txt e2e/images/requirements.txt e2e/cluster/requirements.txt)
export PARLEY_OPERATOR_BIN ?= $(CURDIR)/target/debug/parley-operator
export PARLEY_GATEWAY_BIN ?= $(CURDIR)/target/debug/parley-gateway
export PARLEY_MOCK_LLM_BIN ?= $(CURDIR)/target/debug/parley-mock-llm

-include e2e/controlplane/controlplane.mk
include mk/images.mk mk/cluster.mk

.PHONY: help build release lint fmt crds docs render demo test test-rust test-python services bench bench-scale bench-streams chaos toolchain clean

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

docs: ## Regenerate docs/reference/ (CRD and GatewayConfig reference) from the schemas
	PARLEY_UPDATE_DOCS=1 $(CARGO) test -q -p parley-crds --test reference_docs

render: ## Print what the operator renders for config/samples (YAML only, release build)
	@$(CARGO) run -q --release -p parley-operator -- render -f config/samples

$(VENV)/.installed: $(PY_REQUIREMENTS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check $(addprefix -r ,$(PY_REQUIREMENTS))
	touch $@

demo: toolchain $(VENV)/.installed ## The whole path on embedded defaults: no cluster, no keys, no Redis
	@scripts/demo.sh

test: lint test-rust test-python test-images-e2e test-node test-cluster ## Everything CI runs

# The cluster suite: the images `make images` and `make test-images` built, imported into
# the test cluster's node (scripts/cluster.sh reads target/images/*.tar), the chart
# installed with helm, the samples applied, traffic through the gateway pods. Against a
# cluster of your own: PARLEY_CLUSTER_KUBECONFIG=... (see e2e/cluster/conftest.py).
test-cluster: images test-images cluster-tools target/tools/helm $(VENV)/.installed ## The cluster suite on a real node (e2e/cluster)
	@scripts/images.sh save target/images
	$(PYTHON) -m pytest -q e2e/cluster

services: ## Start the shared test services (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:55432) unless they are running
	@scripts/services.sh

test-rust: toolchain services $(CONTROLPLANE_BIN)
	$(CARGO) test --workspace --no-fail-fast

test-python: $(VENV)/.installed build services target/tools/helm $(CONTROLPLANE_BIN)
	$(PYTHON) -m pytest -q e2e/manifests
	$(PYTHON) -m pytest -q -c e2e/python/pytest.ini e2e/python
	$(PYTHON) -m pytest -q -c e2e/python/pytest.ini e2e/observability

# helm, for the chart tests (e2e/manifests/test_chart.py): built once from the Go module
# proxy (no binary downloads) into target/tools/helm, with the ldflags of helm's own
# Makefile (its version, and the Kubernetes version of its client-go as the default
# capabilities). A cold build, module downloads included, took 2m36s on 2 cores. After
# changing HELM_VERSION, `rm target/tools/helm`. GOTOOLCHAIN=local: never download a Go.
HELM_VERSION := v3.22.0
HELM_K8S_MINOR := 37
HELM_LDFLAGS := -s -w -X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) \
	-X helm.sh/helm/v3/internal/version.gitTreeState=clean \
	-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
	-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$(HELM_K8S_MINOR) \
	-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
	-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$(HELM_K8S_MINOR)
export PARLEY_HELM_BIN ?= $(CURDIR)/target/tools/helm

target/tools/helm:
	@command -v go >/dev/null 2>&1 || { \
	  echo "helm: 'go' is not on PATH; Go 1.26 or newer is needed to build $@" >&2; exit 127; }
	@mkdir -p $(@D)/.helm-build
	GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN=$(CURDIR)/$(@D)/.helm-build go install -trimpath \
	  -ldflags='$(HELM_LDFLAGS)' helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
	@mv -f $(@D)/.helm-build/helm $@ && rmdir $(@D)/.helm-build

bench: toolchain ## Gateway vs nginx proxy_pass on this machine; writes BENCHMARKS.md (not in CI)
	@scripts/bench.sh

bench-scale: toolchain bench-streams ## bench-streams, then the operator with 1,000 Chatbots in the test API server and render of them offline (not in CI)
	@scripts/bench_scale.sh $(ARGS)

bench-streams: toolchain ## 10,000 concurrent streams and a 10,000-tenant config through the gateway; writes BENCHMARKS.md (not in CI)
	@scripts/bench_streams.sh $(STREAMS_ARGS)

chaos: toolchain $(VENV)/.installed services $(CONTROLPLANE_BIN) ## Fault drills under load; writes CHAOS.md (not in CI)
	$(CARGO) build --release -p parley-gateway -p parley-e2e -p parley-operator --bins
	$(VENV)/bin/python scripts/chaos.py

clean: ## Remove build outputs and the virtualenv
	$(CARGO) clean
	rm -rf $(VENV)
