# The test cluster with a real node (`scripts/cluster.sh`, the kubelet build). Included from the Makefile.
#
# `make cluster-tools` builds everything `scripts/cluster.sh up` needs:
# - target/controlplane/parley-controlplane: the API server + etcd, and as subcommands
#   the kubelet, kube-proxy, kube-scheduler and kube-controller-manager, all from the one
#   k8s.io/kubernetes module of e2e/controlplane/go.mod (e2e/controlplane/controlplane.mk);
# - target/cluster/pause.tar: the pause image (localhost/parley/pause:1.0), a static C
#   binary in a FROM-scratch image, assembled without a registry or docker;
# - target/cluster/test-images/nodetest.tar: the image of the node test (e2e/node).
# gcc (with static glibc, Debian's libc6-dev) builds the two C programs.

CLUSTER_OUT := target/cluster
CLUSTER_PAUSE_TAR := $(CLUSTER_OUT)/pause.tar
CLUSTER_NODETEST_TAR := $(CLUSTER_OUT)/test-images/nodetest.tar
CLUSTER_CFLAGS := -static -Os -s -Wall -Wextra

.PHONY: cluster-tools test-node

cluster-tools: $(CONTROLPLANE_BIN) $(CLUSTER_PAUSE_TAR) $(CLUSTER_NODETEST_TAR) ## Build what scripts/cluster.sh (the test cluster with a node) needs

$(CLUSTER_OUT)/%: scripts/cluster/%.c
	@mkdir -p $(@D)
	@command -v gcc >/dev/null 2>&1 || scripts/cluster.sh install-packages
	gcc $(CLUSTER_CFLAGS) -o $@ $<

$(CLUSTER_PAUSE_TAR): $(CLUSTER_OUT)/pause scripts/cluster/mkimage.py
	python3 scripts/cluster/mkimage.py --name localhost/parley/pause:1.0 --out $@ \
	  --file $<:/pause --entrypoint /pause --user 65535:65535

$(CLUSTER_NODETEST_TAR): $(CLUSTER_OUT)/nodetest scripts/cluster/mkimage.py
	@mkdir -p $(@D)
	python3 scripts/cluster/mkimage.py --name localhost/parley/nodetest:1.0 --out $@ \
	  --file $<:/nodetest --entrypoint /nodetest --user 65532:65532

# The node test: `scripts/cluster.sh up`, a pod, a Service, logs/exec/port-forward, the
# HPA, then `down` leaves nothing behind. Needs root. About 1-2 minutes.
test-node: cluster-tools $(VENV)/.installed
	$(PYTHON) -m pytest -q e2e/node
