# Builds parley-controlplane (a real kube-apiserver + embedded etcd for the
# tests, see e2e/controlplane/README.md) from the Go module proxy. Include it
# from the main Makefile, or run `make -f e2e/controlplane/controlplane.mk
# controlplane`; paths are relative to the repository root.
#
# The binary is rebuilt only when the Go sources, go.mod or go.sum change.
# GOTOOLCHAIN=local: never download a Go toolchain.

CONTROLPLANE_DIR := e2e/controlplane
CONTROLPLANE_BIN := target/controlplane/parley-controlplane
CONTROLPLANE_SRCS := $(wildcard $(CONTROLPLANE_DIR)/*.go) $(CONTROLPLANE_DIR)/go.mod $(CONTROLPLANE_DIR)/go.sum
# The Kubernetes release it is built from (k8s.io/kubernetes in go.mod),
# reported by /version.
CONTROLPLANE_K8S_VERSION = $(shell sed -n 's|^[[:space:]]*k8s.io/kubernetes \(v[0-9][0-9.]*\)$$|\1|p' $(CONTROLPLANE_DIR)/go.mod)
CONTROLPLANE_LDFLAGS = -s -w \
	-X k8s.io/component-base/version.gitVersion=$(CONTROLPLANE_K8S_VERSION) \
	-X k8s.io/component-base/version.gitMajor=$(word 1,$(subst ., ,$(CONTROLPLANE_K8S_VERSION:v%=%))) \
	-X k8s.io/component-base/version.gitMinor=$(word 2,$(subst ., ,$(CONTROLPLANE_K8S_VERSION:v%=%))) \
	-X k8s.io/component-base/version.gitTreeState=clean

.PHONY: controlplane controlplane-clean

controlplane: $(CONTROLPLANE_BIN) ## Build the test kube-apiserver + etcd (target/controlplane/parley-controlplane)

$(CONTROLPLANE_BIN): $(CONTROLPLANE_SRCS)
	@command -v go >/dev/null 2>&1 || { \
	  echo "controlplane: 'go' is not on PATH; Go 1.24 or newer is needed to build $@" >&2; exit 127; }
	@mkdir -p $(@D)
	cd $(CONTROLPLANE_DIR) && GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -buildvcs=false \
	  -ldflags='$(CONTROLPLANE_LDFLAGS)' -o $(CURDIR)/$@.tmp .
	@mv -f $@.tmp $@

controlplane-clean:
	rm -f $(CONTROLPLANE_BIN) $(CONTROLPLANE_BIN).tmp
