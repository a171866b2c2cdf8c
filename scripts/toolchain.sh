#!/usr/bin/env bash
# Makes sure the tools the build and tests need are here, installing what a package
# manager can install. Rust, Go and Python come with the machine image.
set -euo pipefail

need() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  if need apt-get; then
    [ -n "${PARLEY_APT_UPDATED:-}" ] || { apt-get update -qq >/dev/null; export PARLEY_APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "missing $*: install it with your package manager" >&2
    exit 1
  fi
}

need cargo || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
need python3 || apt_install python3
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
need curl || apt_install curl
# Argo CD's health scripts are tested under a real Lua 5.1 (Argo CD embeds gopher-lua).
need lua5.1 || apt_install lua5.1
