"""`parley-gateway check --config FILE`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from conftest import GATEWAY_BIN, REPO, _wait_for

OPERATOR_BIN = os.environ.get("PARLEY_OPERATOR_BIN", str(REPO / "target/debug/parley-operator"))


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


def test_listen_addresses_and_tenant_model_names_are_checked_and_every_problem_is_listed(binaries, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "apiVersion: parley.dev/gateway/v1\nlisten: 127.0.0.1:80800\nadminListen: localhost\n"
        "defaultModel: a\nmodels:\n"
        "- name: a\n  backends: [{name: p, provider: openai, baseUrl: 'http://127.0.0.1:1/v1'}]\n"
        "tenants:\n"
        "- {id: ns/acme, apiKeys: [{value: same}], allowedModels: [a, gpt-5], modelQuotas: [{model: b, requestsPerMinute: 1}]}\n"
        "- {id: ns/other, apiKeys: [{value: same}], upstreamKeys: [{model: a, backend: q, apiKey: {value: k}}]}\n"
    )
    r = run("check", "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    for needle in (
        'listen: "127.0.0.1:80800"',
        "0 to 65535",
        'adminListen: "localhost"',
        'tenants[0].allowedModels[1]: tenant "ns/acme" allows "gpt-5"',
        'tenants[0].modelQuotas[0].model: tenant "ns/acme"',
        'tenants[1].upstreamKeys[0].backend: tenant "ns/other"',
        # Found only by building the config: reported in the same run.
        "the same API key belongs to two tenants",
    ):
        assert needle in r.stderr, (needle, r.stderr)
    assert "invalid config (6 problems)" in r.stderr, r.stderr
    assert "same" not in r.stderr.replace("the same API key", ""), "a key was echoed"


def rendered_config(tmp_path: Path) -> Path:
    """The GatewayConfig the operator renders for config/samples, as a pod would mount it."""
    out = subprocess.run([OPERATOR_BIN, "render", "-f", str(REPO / "config/samples")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    config_map = next(o for o in yaml.safe_load_all(out.stdout) if o and o["kind"] == "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    return path


SAMPLE_SECRET_FILES = ["llm-keys/openai-primary", "llm-keys/openai-batch", "llm-keys/anthropic",
                       "acme-key/api-key", "acme-openai/key", "globex-api-key/api-key", "redis/url",
                       "usage-db/url"]


def test_rendered_config_without_its_secret_files_is_valid_and_says_how_to_provide_them(binaries, tmp_path):
    cfg = rendered_config(tmp_path)
    r = run("check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "valid: 3 models, 4 backends, 2 tenants, 0 API keys usable" in r.stdout, r.stdout
    for f in SAMPLE_SECRET_FILES:
        assert f"/var/run/parley/secrets/{f} does not exist" in r.stderr, (f, r.stderr)
    assert 'key "openai-primary" of Secret "llm-keys"' in r.stderr, r.stderr
    assert "--secrets-dir DIR" in r.stderr and "8 secret files" in r.stderr, r.stderr


def write_sample_secrets(root: Path, redis_url: str) -> dict[str, str]:
    values = {f: f"sk-local-{f.replace('/', '-')}" for f in SAMPLE_SECRET_FILES}
    values["redis/url"] = redis_url
    # `check` only parses it; the serving test below leaves the ledger out.
    values["usage-db/url"] = "postgres://parley:pw-local@127.0.0.1:1/parley"
    for f, v in values.items():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(v + "\n")
    return values


def test_rendered_config_runs_locally_with_secrets_dir(binaries, tmp_path, start_gateway):
    cfg = rendered_config(tmp_path)
    secrets = tmp_path / "secrets"
    values = write_sample_secrets(secrets, os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379"))
    # A relative --secrets-dir means: from the working directory.
    r = subprocess.run([GATEWAY_BIN, "check", "--config", str(cfg), "--secrets-dir", "secrets"],
                       capture_output=True, text=True, timeout=20, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 API keys usable" in r.stdout, r.stdout
    assert "does not exist" not in r.stderr, r.stderr
    for v in values.values():
        assert v not in r.stdout + r.stderr, "a secret was echoed"

    # Serve it, on loopback ports; only /v1/models is called (the backends are the real
    # providers' URLs, which a test must never reach).
    doc = yaml.safe_load(cfg.read_text())
    doc.update(listen="127.0.0.1:0", adminListen="127.0.0.1:0", usage=None)
    gw = start_gateway(doc, "--secrets-dir", str(secrets))
    acme = gw.http.get("/v1/models", headers={"authorization": f"Bearer {values['acme-key/api-key']}"})
    assert acme.status_code == 200, acme.text
    assert sorted(m["id"] for m in acme.json()["data"]) == ["claude-sonnet", "gpt-4o", "gpt-4o-mini"]
    globex = gw.http.get("/v1/models", headers={"x-api-key": values["globex-api-key/api-key"]})
    assert sorted(m["id"] for m in globex.json()["data"]) == ["claude-sonnet", "gpt-4o-mini"]
    assert gw.http.get("/v1/models", headers={"x-api-key": "sk-wrong"}).status_code == 401

    # A key file that appears later is picked up without a restart.
    (secrets / "acme-key/api-key").write_text("sk-rotated-acme\n")
    _wait_for(lambda: gw.http.get("/v1/models", headers={"x-api-key": "sk-rotated-acme"}).status_code == 200,
              15, "the rotated key to be read")


def test_every_unknown_field_is_named(binaries, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "apiVersion: parley.dev/gateway/v1\ndefaultModle: a\nmodels:\n"
        "- name: a\n  wieght: 1\n  backends: [{name: p, provider: openai, baseUrl: 'http://127.0.0.1:1/v1', apiKey: {fiel: k}}]\n"
    )
    r = run("check", "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    assert "invalid config (3 problems)" in r.stderr, r.stderr
    for needle in ("  - defaultModle: unknown field", "  - models[0].wieght: unknown field",
                   "  - models[0].backends[0].apiKey.fiel: unknown field `fiel`; expected one of: env, file, value"):
        assert needle in r.stderr, (needle, r.stderr)


def test_secrets_dir_must_exist(binaries, tmp_path):
    r = run("check", "--config", str(REPO / "config/gateway.example.yaml"), "--secrets-dir", str(tmp_path / "nope"))
    assert r.returncode == 2 and "--secrets-dir" in r.stderr and "not a directory" in r.stderr, r.stderr
