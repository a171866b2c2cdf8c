#!/usr/bin/env bash
# The test cluster with a real node, on this machine only.
#
#   scripts/cluster.sh up DIR     start it; writes DIR/kubeconfig, prints `ready` once the
#                                 node is Ready (exit 0), or the reason and exit 1
#   scripts/cluster.sh down DIR   stop everything `up` started and remove what it made,
#                                 also after a failed `up`; exit 1 if something is left
#   scripts/cluster.sh load DIR ARCHIVE...   import more image archives (`docker save`
#                                 or OCI) into the running node, like `kind load`
#   scripts/cluster.sh status DIR what runs
#   scripts/cluster.sh install-packages   the Debian packages it needs
#
# What runs (see e2e/controlplane/README.md, "A node"): parley-controlplane (kube-apiserver
# + etcd), and as its subcommands kube-controller-manager, kube-scheduler, kubelet and
# kube-proxy (iptables mode), all from the one k8s.io/kubernetes module; Debian's
# containerd and runc; Debian's CNI bridge/host-local/loopback plugins. Root is needed.
#
# Addresses (fixed: one such cluster per machine; `up` refuses a second one):
#   node IP        10.245.0.1/32 on interface parleynode0 (a bridge without ports: this
#                  kernel has no `dummy` link type); the kubelet (:10250) and the API
#                  server (same port as on 127.0.0.1) listen there; pods reach the host here
#   pods           10.244.0.0/24 on bridge parleybr0 (10.244.0.1 is the pods' gateway)
#   Services       10.96.0.0/24 (kubernetes = 10.96.0.1:443), routed to parleybr0, so the
#                  host reaches ClusterIPs through kube-proxy's rules
#   API server     https://127.0.0.1:PORT (DIR/kubeconfig) and https://10.245.0.1:PORT
# Nothing leaves the machine: pods' traffic to any other interface is dropped, and
# containerd's registry traffic goes to a closed local port (images are imported, never
# pulled).
#
# Environment:
#   PARLEY_CLUSTER_IMAGES   directory of image archives (`docker save` or OCI archives,
#                           *.tar) imported into containerd (namespace k8s.io) on `up`;
#                           default target/images. The pause image is always imported.
#   PARLEY_CONTROLPLANE_BIN the parley-controlplane binary (default: built by
#                           `make cluster-tools` into target/controlplane/)
#   PARLEY_CLUSTER_TIMEOUT  seconds `up` waits for the node (default 180)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NODE_NAME=parley-node
NODE_IF=parleynode0
NODE_IP=10.245.0.1
BRIDGE=parleybr0
POD_CIDR=10.244.0.0/24
POD_GW=10.244.0.1
SERVICE_CIDR=10.96.0.0/24
PAUSE_IMAGE=localhost/parley/pause:1.0
RULE_COMMENT=parley-cluster
LOCK=/run/parley-cluster.dir
PACKAGES=(containerd runc containernetworking-plugins iptables iproute2 mount util-linux procps gcc libc6-dev)

log() { echo "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]}: install them"
  log "installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------- processes

pidfile() { echo "$DIR/run/$1.pid"; }

# alive NAME: the process NAME started is running (its pid file names a live process
# whose command line mentions DIR, so a reused pid is never taken for it).
alive() {
  local f pid
  f=$(pidfile "$1")
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$DIR"
}

# start NAME CMD...: run CMD in a session of its own, output to DIR/logs/NAME.log.
start() {
  local name=$1
  shift
  setsid "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
}

# stop NAME [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 10).
stop() {
  local name=$1 wait=${2:-10} pid i
  alive "$name" || { rm -f "$(pidfile "$name")"; return 0; }
  pid=$(cat "$(pidfile "$name")")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait * 10; i++)); do
    alive "$name" || break
    sleep 0.1
  done
  if alive "$name"; then
    log "$name did not stop in ${wait}s: killing it"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$(pidfile "$name")"
}

# descendants PID: every process below PID.
descendants() {
  local pid=$1 child
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
    descendants "$child"
    echo "$child"
  done
}

# Processes whose command line mentions DIR (what `down` must leave none of).
our_processes() {
  local p cmd
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = "$$" ] && continue
    cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
    case "$cmd" in
      *cluster.sh*) ;; # this script and its subshells
      *"$DIR/"* | *"$DIR "*) echo "${p#/proc/} $cmd" ;;
    esac
  done
}

# ---------------------------------------------------------------- up

containerd_sock() { echo "$DIR/containerd/containerd.sock"; }
ctr_() { ctr --address "$(containerd_sock)" --namespace k8s.io "$@"; }

setup_network() {
  # A bridge without ports stands in for a dummy interface (not in every kernel).
  ip link add "$NODE_IF" type bridge
  echo "$NODE_IF" >>"$DIR/run/links"
  ip addr add "$NODE_IP/32" dev "$NODE_IF"
  ip link set "$NODE_IF" up
  ip link add "$BRIDGE" type bridge
  echo "$BRIDGE" >>"$DIR/run/links"
  ip addr add "$POD_GW/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # ClusterIPs: kube-proxy's rules rewrite them; without a rule they stay on the bridge.
  ip route add "$SERVICE_CIDR" dev "$BRIDGE"
  # Pods talk to each other, to Services and to the host, never beyond: drop what they
  # send to another interface. Pod-to-pod traffic crosses FORWARD when the bridge is
  # netfiltered, and another program (dockerd) may have set its policy to DROP.
  iptables -w -I FORWARD 1 -i "$BRIDGE" ! -o "$BRIDGE" -m comment --comment "$RULE_COMMENT" -j DROP
  iptables -w -I FORWARD 1 -i "$BRIDGE" -o "$BRIDGE" -m comment --comment "$RULE_COMMENT" -j ACCEPT
  iptables -w -I FORWARD 1 -o "$BRIDGE" -m comment --comment "$RULE_COMMENT" -j ACCEPT
  # A pod's connection to a Service backed by a pod on the same bridge is routed.
  cat /proc/sys/net/ipv4/ip_forward >"$DIR/run/ip_forward.orig"
  echo 1 >/proc/sys/net/ipv4/ip_forward
  if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
    cat /proc/sys/net/bridge/bridge-nf-call-iptables >"$DIR/run/bridge-nf-call-iptables.orig"
    echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
  fi
}

write_configs() {
  local runc=runc
  # See scripts/cluster/runc-oom-clamp for why.
  if ! sh -c 'echo -1 >/proc/self/oom_score_adj' 2>/dev/null; then
    runc="$ROOT/scripts/cluster/runc-oom-clamp"
    log "negative oom_score_adj is forbidden here: containers run through $runc"
  fi
  mkdir -p "$DIR/containerd" "$DIR/cni/net.d" "$DIR/kubelet/root" "$DIR/kubelet/pki"
  cat >"$DIR/containerd/config.toml" <<EOF
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "$(containerd_sock)"
[ttrpc]
  address = ""
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Network namespaces under DIR (unmounted by down), not /var/run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
    max_conf_num = 1
EOF
  cat >"$DIR/cni/net.d/10-parley.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "parley",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$DIR/cni/ipam"
      }
    }
  ]
}
EOF
  local pki="$DIR/controlplane/pki" sock
  sock="unix://$(containerd_sock)"
  cat >"$DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: $sock
imageServiceEndpoint: $sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzPort: 0
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
# This machine: cgroup v1 managed by nobody (no systemd), swap allowed.
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
localStorageCapacityIsolation: false
# Cluster DNS: parley-controlplane cluster-dns on the node's address. Pods get only the
# cluster's search path and this server (resolvConf "": nothing of the host's).
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: ""
# ConfigMap and Secret volumes follow edits within 5-8 s (a pod is synced every
# syncFrequency plus up to half of it in jitter).
syncFrequency: 5s
fileCheckFrequency: 10s
# A shared test machine: never evict or collect images because of its disks.
evictionHard: {memory.available: "1Mi", nodefs.available: "0%", imagefs.available: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
podLogsDir: $DIR/kubelet/pod-logs
volumePluginDir: $DIR/kubelet/volume-plugins
staticPodPath: ""
shutdownGracePeriod: 0s
rotateCertificates: false
serverTLSBootstrap: false
EOF
}

wait_for() { # wait_for SECONDS DESCRIPTION PROCESS CMD...: until CMD succeeds
  local secs=$1 what=$2 proc=$3 i
  shift 3
  for ((i = 0; i < secs * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    if [ -n "$proc" ] && ! alive "$proc"; then
      tail -n 20 "$DIR/logs/$proc.log" >&2 || true
      die "$proc exited while waiting for $what (log: $DIR/logs/$proc.log)"
    fi
    sleep 0.1
  done
  [ -n "$proc" ] && { tail -n 20 "$DIR/logs/$proc.log" >&2 || true; }
  die "no $what after ${secs}s"
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "needs root (network interfaces, iptables, containerd)"
  if [ -e "$LOCK" ]; then
    die "a test cluster is up from $(cat "$LOCK") (one per machine): run scripts/cluster.sh down $(cat "$LOCK")"
  fi
  for link in "$NODE_IF" "$BRIDGE"; do
    ip link show "$link" >/dev/null 2>&1 && die "interface $link exists: another test cluster? (scripts/cluster.sh down DIR)"
  done
  install_packages
  local bin=${PARLEY_CONTROLPLANE_BIN:-$ROOT/target/controlplane/parley-controlplane}
  local pause_tar=$ROOT/target/cluster/pause.tar
  if [ -z "${PARLEY_CONTROLPLANE_BIN:-}" ] || [ ! -f "$pause_tar" ]; then
    make -s -C "$ROOT" cluster-tools >&2
  fi
  [ -x "$bin" ] || die "$bin: not found (make cluster-tools)"
  local images=${PARLEY_CLUSTER_IMAGES:-$ROOT/target/images}

  local sock_len
  sock_len=$(containerd_sock | wc -c)
  [ "$sock_len" -lt 100 ] || die "DIR is too long for a unix socket path ($(containerd_sock)): use a shorter one"
  # A fresh cluster every time: what an earlier `up` left in DIR (etcd's pods and nodes,
  # images, logs) goes, once nothing is mounted there any more.
  if awk -v d="$DIR/" 'index($5, d) == 1 {found=1} END {exit !found}' /proc/self/mountinfo; then
    die "something is mounted under $DIR: run scripts/cluster.sh down $DIR first"
  fi
  rm -rf "${DIR:?}/controlplane" "$DIR/containerd" "$DIR/kubelet" "$DIR/cni" "$DIR/logs" "$DIR/run" "$DIR/kubeconfig"
  mkdir -p "$DIR/run" "$DIR/logs"
  echo "$DIR" >"$LOCK"

  setup_network
  write_configs

  log "starting the control plane"
  start controlplane "$bin" --data-dir "$DIR/controlplane" --node-ip "$NODE_IP" --node-name "$NODE_NAME" \
    --service-cidr "$SERVICE_CIDR" --controllers=false
  wait_for 120 "control plane" controlplane grep -qx ready "$DIR/logs/controlplane.log"
  cp "$DIR/controlplane/kubeconfig" "$DIR/kubeconfig"
  local pki="$DIR/controlplane/pki"
  start kube-controller-manager "$bin" kube-controller-manager --kubeconfig="$DIR/kubeconfig" \
    --leader-elect=false --secure-port=0 --use-service-account-credentials=false \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --horizontal-pod-autoscaler-sync-period=5s --v=1
  start kube-scheduler "$bin" kube-scheduler --kubeconfig="$DIR/kubeconfig" --leader-elect=false --secure-port=0 --v=1
  start cluster-dns "$bin" cluster-dns --kubeconfig="$DIR/kubeconfig" --listen="$NODE_IP:53"

  log "starting containerd"
  # Registry traffic goes to a closed local port: images are imported, never pulled.
  start containerd env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    containerd --config "$DIR/containerd/config.toml"
  wait_for 30 "containerd socket" containerd ctr_ version
  ctr_ images import "$pause_tar" >/dev/null || die "ctr images import $pause_tar failed"
  local tar n=0
  if [ -d "$images" ]; then
    for tar in "$images"/*.tar; do
      [ -f "$tar" ] || continue
      log "importing $tar"
      ctr_ images import "$tar" >/dev/null || die "ctr images import $tar failed"
      n=$((n + 1))
    done
  fi
  log "imported the pause image and $n image archive(s) from $images"

  log "starting the kubelet and kube-proxy"
  start kubelet "$bin" kubelet --config="$DIR/kubelet/config.yaml" \
    --kubeconfig="$DIR/controlplane/kubelet.kubeconfig" --root-dir="$DIR/kubelet/root" \
    --cert-dir="$DIR/kubelet/pki" --node-ip="$NODE_IP" --hostname-override="$NODE_NAME" --v=1
  start kube-proxy "$bin" kube-proxy --kubeconfig="$DIR/controlplane/kube-proxy.kubeconfig" \
    --hostname-override="$NODE_NAME" --proxy-mode=iptables --cluster-cidr="$POD_CIDR" \
    --nodeport-addresses="$NODE_IP/32" --iptables-localhost-nodeports=false \
    --healthz-bind-address=127.0.0.1:10256 --metrics-bind-address=127.0.0.1:10249 \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 --v=1

  local timeout=${PARLEY_CLUSTER_TIMEOUT:-180}
  if ! "$bin" wait-node --kubeconfig "$DIR/kubeconfig" --node "$NODE_NAME" --timeout "${timeout}s"; then
    for p in kubelet kube-proxy kube-controller-manager containerd; do
      alive "$p" || log "$p is not running (log: $DIR/logs/$p.log)"
    done
    tail -n 20 "$DIR/logs/kubelet.log" >&2 || true
    die "the node did not become Ready (logs in $DIR/logs)"
  fi
  for p in controlplane kube-controller-manager kube-scheduler cluster-dns containerd kubelet kube-proxy; do
    alive "$p" || die "$p exited (log: $DIR/logs/$p.log)"
  done
  log "node $NODE_NAME is Ready; kubeconfig: $DIR/kubeconfig"
  echo ready
}

# ---------------------------------------------------------------- down

delete_rules() { # delete_rules CMD TABLE: rules in built-in chains that jump to KUBE-*
  local ipt=$1 table=$2 rule
  { "$ipt" -w -t "$table" -S 2>/dev/null || true; } |
    { grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-' || true; } |
    while read -r rule; do
      eval "$ipt -w -t $table -D ${rule#-A }" 2>/dev/null || true
    done
}

cleanup_iptables() {
  local ipt table chain rule
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for table in filter nat mangle raw; do
      delete_rules "$ipt" "$table"
      for chain in $("$ipt" -w -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "$ipt" -w -t "$table" -F "$chain" 2>/dev/null || true
      done
      for chain in $("$ipt" -w -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "$ipt" -w -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
  { iptables -w -S FORWARD 2>/dev/null || true; } | { grep -F -- "--comment $RULE_COMMENT" || true; } | while read -r rule; do
    eval "iptables -w -D ${rule#-A }" 2>/dev/null || true
  done
}

unmount_all() {
  local i m left
  for ((i = 0; i < 5; i++)); do
    left=0
    # Deepest first; a mount point may be stacked, so go round again.
    while read -r m; do
      left=1
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | awk '{print length, $0}' | sort -rn | cut -d' ' -f2-)
    [ "$left" = 0 ] && return 0
  done
}

cmd_down() {
  [ "$(id -u)" = 0 ] || die "needs root"
  mkdir -p "$DIR/run"
  local bin=${PARLEY_CONTROLPLANE_BIN:-$ROOT/target/controlplane/parley-controlplane}
  # The kubelet first, so that it restarts nothing; then every pod through CRI (which
  # tears down their networks and network namespaces), then containerd.
  stop kubelet 15
  if alive containerd && [ -x "$bin" ]; then
    "$bin" cri-cleanup --endpoint "unix://$(containerd_sock)" --timeout 60s || log "cri-cleanup failed; killing what is left"
  fi
  stop containerd 15
  # Shims (and their containers) of this containerd that outlived it.
  local line pid
  while read -r line; do
    pid=${line%% *}
    case "$line" in
      # shellcheck disable=SC2046
      *containerd-shim*) kill -KILL $(descendants "$pid") "$pid" 2>/dev/null || true ;;
    esac
  done < <(our_processes)
  stop kube-proxy 10
  # Not `kube-proxy --cleanup`: that also flushes every IPVS rule of the machine.
  # The interfaces, routes and chains are the machine's one cluster's: leave them to
  # the `down` of the directory that is up, if that is another one.
  local owner=""
  [ -e "$LOCK" ] && owner=$(cat "$LOCK")
  if [ -n "$owner" ] && [ "$owner" != "$DIR" ]; then
    log "the cluster's network belongs to $owner (up): leaving interfaces and iptables alone"
  else
    cleanup_iptables
  fi
  stop cluster-dns 5
  stop kube-scheduler 5
  stop kube-controller-manager 5
  stop controlplane 10
  # Anything else still running from DIR (processes of a crashed start).
  while read -r line; do
    [ -n "$line" ] && kill -KILL "${line%% *}" 2>/dev/null || true
  done < <(our_processes)
  sleep 0.2
  unmount_all

  # Network: veths of pods that were not torn down, the bridges, the route.
  local link
  [ -n "$owner" ] && [ "$owner" != "$DIR" ] && BRIDGE=none-of-ours NODE_IF=none-of-ours SERVICE_CIDR=
  for link in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$link" 2>/dev/null || true
  done
  [ -n "$SERVICE_CIDR" ] && { ip route del "$SERVICE_CIDR" dev "$BRIDGE" 2>/dev/null || true; }
  for link in "$BRIDGE" "$NODE_IF"; do
    ip link del "$link" 2>/dev/null || true
  done
  [ -f "$DIR/run/ip_forward.orig" ] && cat "$DIR/run/ip_forward.orig" >/proc/sys/net/ipv4/ip_forward
  [ -f "$DIR/run/bridge-nf-call-iptables.orig" ] &&
    cat "$DIR/run/bridge-nf-call-iptables.orig" >/proc/sys/net/bridge/bridge-nf-call-iptables
  rm -f "$DIR/run/ip_forward.orig" "$DIR/run/bridge-nf-call-iptables.orig" "$DIR/run/links"
  # Cgroups of containers killed above (rmdir fails on a cgroup still in use).
  rmdir /sys/fs/cgroup/*/k8s.io/*/ /sys/fs/cgroup/*/k8s.io 2>/dev/null || true
  if [ -e "$LOCK" ] && [ "$(cat "$LOCK")" = "$DIR" ]; then
    rm -f "$LOCK"
  fi

  # What is left?
  local bad=0
  if [ -n "$(our_processes)" ]; then
    log "processes left:"
    our_processes >&2
    bad=1
  fi
  if awk -v d="$DIR/" 'index($5, d) == 1 {found=1} END {exit !found}' /proc/self/mountinfo; then
    log "mounts left:"
    awk -v d="$DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo >&2
    bad=1
  fi
  for link in "$BRIDGE" "$NODE_IF"; do
    ip link show "$link" >/dev/null 2>&1 && { log "interface $link left"; bad=1; }
  done
  [ "$bad" = 0 ] || die "down left something behind"
  log "down: nothing left"
}

cmd_load() {
  alive containerd || die "containerd of $DIR is not running (scripts/cluster.sh up $DIR)"
  local tar
  for tar in "$@"; do
    [ -f "$tar" ] || die "$tar: no such file"
    ctr_ images import "$tar" >/dev/null || die "ctr images import $tar failed"
    log "imported $tar"
  done
}

cmd_status() {
  local p
  for p in controlplane kube-controller-manager kube-scheduler cluster-dns containerd kubelet kube-proxy; do
    if alive "$p"; then echo "$p running (pid $(cat "$(pidfile "$p")"))"; else echo "$p not running"; fi
  done
}

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

case "${1:-}" in
  up | down | status)
    [ $# -eq 2 ] || usage
    mkdir -p "$2"
    DIR=$(cd "$2" && pwd -P)
    "cmd_$1"
    ;;
  load)
    [ $# -ge 3 ] || usage
    DIR=$(cd "$2" && pwd -P)
    shift 2
    cmd_load "$@"
    ;;
  install-packages) install_packages ;;
  *) usage ;;
esac
