#!/usr/bin/env bash
# `make bench`: installs the load tools (wrk, nginx and valgrind from Debian, vegeta from
# the Go module proxy), builds release binaries, runs scripts/bench.py and
# scripts/bench_instructions.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v valgrind >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light valgrind >/dev/null
fi
if [ ! -x target/tools/vegeta ]; then
  GOBIN="$PWD/target/tools" go install github.com/tsenart/vegeta/v12@v12.12.0
fi
cargo build -q --release -p parley-gateway -p parley-e2e --bins
python3 scripts/bench.py "$@"
# Instructions per request (callgrind): exact where requests per second are noisy.
if [ $# -eq 0 ]; then exec python3 scripts/bench_instructions.py; fi
