#!/usr/bin/env bash
# `make bench`: installs the load tools (wrk and nginx from Debian, vegeta from the Go
# module proxy), builds release binaries, runs scripts/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi
if [ ! -x target/tools/vegeta ]; then
  GOBIN="$PWD/target/tools" go install github.com/tsenart/vegeta/v12@v12.12.0
fi
cargo build -q --release -p parley-gateway -p parley-e2e --bins
exec python3 scripts/bench.py "$@"
