#!/usr/bin/env bash
# `make demo`: the whole Parley path on one machine, with no cluster, no keys and no Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building parley-operator, parley-gateway and parley-mock-llm (debug)"
cargo build -q -p parley-operator -p parley-gateway -p parley-e2e --bins
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import yaml' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check pyyaml
fi
exec .venv/bin/python scripts/demo.py "$@"
