"""Argo CD health checks (config/argocd/resource_customizations/parley.dev/<Kind>/):
each script passes its own `health_test.yaml` under a real Lua 5.1, in Argo CD's layout,
for every state the operator can report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from argocd_health import HEALTH_DIR, health

KINDS = ["Chatbot", "Tenant", "ModelRoute"]


def cases() -> list:
    out = []
    for kind in KINDS:
        spec = yaml.safe_load((HEALTH_DIR / kind / "health_test.yaml").read_text())
        for test in spec["tests"]:
            out.append(pytest.param(kind, test, id=f"{kind}-{Path(test['inputPath']).stem}"))
    return out


def test_every_kind_has_a_health_check_in_argo_cds_layout():
    for kind in KINDS:
        for name in ("health.lua", "health_test.yaml"):
            assert (HEALTH_DIR / kind / name).is_file(), f"{kind}/{name}"
        # Each health state appears in the tests.
        spec = yaml.safe_load((HEALTH_DIR / kind / "health_test.yaml").read_text())
        states = {t["healthStatus"]["status"] for t in spec["tests"]}
        assert states == {"Healthy", "Progressing", "Degraded"}, (kind, states)
        # Every testdata file is used by a test.
        used = {t["inputPath"] for t in spec["tests"]}
        files = {f"testdata/{p.name}" for p in (HEALTH_DIR / kind / "testdata").glob("*.yaml")}
        assert files == used, (kind, files ^ used)


@pytest.mark.parametrize("kind,test", cases())
def test_health_script_gives_the_expected_status(kind: str, test: dict):
    obj = yaml.safe_load((HEALTH_DIR / kind / test["inputPath"]).read_text())
    status, message = health(kind, obj)
    assert (status, message) == (test["healthStatus"]["status"], test["healthStatus"]["message"])


def test_strings_with_quotes_and_newlines_reach_lua_intact():
    message = 'spec.systemPrompt: "bad"\nsecond line \\ done'
    obj = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "conditions": [
        {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": message}]}}
    assert health("Tenant", obj) == ("Degraded", f"InvalidSpec: {message}")


def test_argocd_cm_snippet_carries_the_same_scripts():
    cm = yaml.safe_load((HEALTH_DIR.parents[1] / "argocd-cm.yaml").read_text())
    for kind in KINDS:
        script = (HEALTH_DIR / kind / "health.lua").read_text()
        assert cm["data"][f"resource.customizations.health.parley.dev_{kind}"] == script, kind


def test_example_applications_point_at_paths_that_exist():
    repo = HEALTH_DIR.parents[3]
    apps = list(yaml.safe_load_all((HEALTH_DIR.parents[1] / "application.yaml").read_text()))
    assert {a["kind"] for a in apps} == {"Application"}
    for app in apps:
        assert (repo / app["spec"]["source"]["path"]).is_dir(), app["spec"]["source"]["path"]
