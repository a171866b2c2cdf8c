#!/usr/bin/env bash
# `make bench-streams` (part of `make bench-scale`; not in CI): 10,000 concurrent streams
# through the gateway and a 10,000-tenant / 1,000-model config (scripts/bench_streams.py,
# driver e2e/examples/bench_streams.rs). Writes the `## Many streams` and `## Big configs`
# sections of BENCHMARKS.md. Options go to the script, e.g. `--only config`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every stream is a socket (two in the gateway over HTTP/1.1): as many files as allowed,
# raising the hard limit where we may (root), so HTTP/1.1 reaches 10,000 streams too.
ulimit -Hn 65536 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
cargo build -q --release -p parley-gateway -p parley-e2e --bins
cargo build -q --release -p parley-e2e --example bench_streams
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg), open files $(ulimit -n)"
exec python3 scripts/bench_streams.py "$@"
