"""`parley-gateway check --config FILE`."""

from __future__ import annotations

import subprocess

from conftest import GATEWAY_BIN, REPO


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GATEWAY_BIN, *args], capture_output=True, text=True, timeout=20)


def test_example_config_is_valid(binaries):
    r = run("check", "--config", str(REPO / "config/gateway.example.yaml"))
    assert r.returncode == 0, r.stderr
    assert "valid: 2 models, 3 backends, 2 tenants" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 1
    assert "PARLEY_STANDBY_KEY" in r.stderr, "an unusable key is a warning"


def test_every_problem_is_reported(binaries, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "apiVersion: parley.dev/gateway/v1\ndefaultModel: nope\nmodels:\n"
        "- name: a\n  fallbacks: [b]\n  retry: {maxAttempts: 0}\n  backends: [{name: p, provider: openai, baseUrl: 'ftp://x'}]\n"
        "- name: b\n  fallbacks: [a]\n  backends: [{name: p, provider: openai, baseUrl: 'http://x/v1'}]\n"
    )
    r = run("check", "--config", str(cfg))
    assert r.returncode != 0
    for needle in ("defaultModel", "maxAttempts", "baseUrl", "cycle"):
        assert needle in r.stderr, (needle, r.stderr)
    r = run("check", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode != 0 and "cannot read" in r.stderr
