#!/usr/bin/env bash
# `make demo`: the whole Parley path on one machine, with no cluster, no keys and no Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building parley-operator, parley-gateway and parley-mock-llm (debug)"
cargo build -q -p parley-operator -p parley-gateway -p parley-e2e --bins
# The Makefile's virtualenv (pyyaml, and the openai and anthropic SDKs the demo and the
# README's next steps use); `make demo` has made it already.
if [ ! -f .venv/.installed ]; then
  make --no-print-directory .venv/.installed
fi
exec .venv/bin/python scripts/demo.py "$@"
