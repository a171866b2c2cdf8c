#!/usr/bin/env bash
# `make bench-scale` (not in CI): the operator with many Chatbots in the test control
# plane (e2e/examples/bench_scale.rs: time until all Ready, peak RSS, API requests, writes
# at rest, a one-ModelRoute change), then `parley-operator render -f` of the same objects
# offline (wall time and peak RSS from /usr/bin/time, best of 3).
# Options go to the example, e.g. `make bench-scale ARGS="--chatbots 200 --rest-seconds 20"`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/time ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
fi
make -s target/controlplane/parley-controlplane
cargo build -q --release -p parley-operator --bin parley-operator
# The driver only creates objects and reads the audit log: a debug build will do.
cargo build -q -p parley-e2e --example bench_scale
dir=$(mktemp -d /tmp/parley-bench-scale.XXXXXX)
trap 'rm -rf "$dir"' EXIT
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
target/debug/examples/bench_scale --write-dir "$dir/objects" "$@"
echo
echo "render -f of the same objects offline (3 runs): wall seconds, peak RSS KiB"
for _ in 1 2 3; do
  /usr/bin/time -f "  %e s  %M KiB" target/release/parley-operator render -f "$dir/objects" >"$dir/rendered.yaml"
done
echo "  $(grep -c '^kind: Deployment' "$dir/rendered.yaml") Deployments, $(wc -c <"$dir/rendered.yaml") bytes rendered"
