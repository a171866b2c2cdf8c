"""The Helm chart of the operator (charts/parley), checked with the real helm CLI (built
from the Go module proxy by `make target/tools/helm`): `helm lint --strict`, the rendered
objects against the official Kubernetes schemas, the RBAC against config/rbac/role.yaml,
the Deployment against what `parley-operator run` expects, and the values schema."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from conftest import KUBERNETES_VERSION, REPO

BIN = pathlib.Path(sys.executable).parent
CHART = REPO / "charts/parley"
HELM = pathlib.Path(os.environ.get("PARLEY_HELM_BIN", REPO / "target/tools/helm"))
NAMESPACE = "parley-system"


@pytest.fixture(scope="session")
def helm() -> pathlib.Path:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `make target/tools/helm` (or set PARLEY_HELM_BIN)")
    return HELM


def run_helm(helm, *args) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *map(str, args)], capture_output=True, text=True, cwd=REPO)


def template(helm, *args) -> list[dict]:
    result = run_helm(
        helm, "template", "parley", CHART, "-n", NAMESPACE, "--kube-version", KUBERNETES_VERSION, *args
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs, kind) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)} objects"
    return found[0]


def operator_container(docs) -> dict:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["--set", "watchNamespace=team-a", "--set", "leaderElection.enabled=false", "--set", "replicas=1"],
        ["--set", "serviceMonitor.enabled=true"],
        ["--set", "grafanaDashboard.enabled=true", "--set", "prometheusRule.enabled=true"],
        ["--set", "rbac.secretWritePolicy=true"],
    ],
    ids=["defaults", "one-namespace-no-leader-election", "service-monitor", "dashboard-and-rules", "secret-write-policy"],
)
def test_helm_lint_strict(helm, overrides):
    result = run_helm(helm, "lint", "--strict", CHART, "-n", NAMESPACE, *overrides)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout, result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    "overrides",
    [[], ["--set", "watchNamespace=team-a", "--set", "leaderElection.enabled=false"]],
    ids=["defaults", "one-namespace"],
)
def test_rendered_chart_passes_kubernetes_validate_strict(helm, overrides, tmp_path):
    docs = template(helm, "--include-crds", *overrides)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["CustomResourceDefinition"] * 3
        + ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"]
    ), kinds
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(docs), result.stdout


def test_cluster_role_rules_equal_config_rbac(helm):
    expected = yaml.safe_load((REPO / "config/rbac/role.yaml").read_text())["rules"]
    docs = template(helm)
    assert one(docs, "ClusterRole")["rules"] == expected
    binding = one(docs, "ClusterRoleBinding")
    account = one(docs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": one(docs, "ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]


def test_secret_write_policy_is_config_rbac_aimed_at_the_release(helm, tmp_path):
    assert not [d for d in template(helm) if d["kind"].startswith("ValidatingAdmissionPolicy")]
    docs = template(helm, "--set", "rbac.secretWritePolicy=true", "--set", "serviceAccount.name=ops")
    policy, binding = one(docs, "ValidatingAdmissionPolicy"), one(docs, "ValidatingAdmissionPolicyBinding")
    expected_policy, expected_binding = yaml.safe_load_all((REPO / "config/rbac/secret_write_policy.yaml").read_text())
    # The same rules as the file the operator tests run under; only the user is this release's.
    for field in ("failurePolicy", "matchConstraints", "variables", "validations"):
        assert policy["spec"][field] == expected_policy["spec"][field], field
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == f"request.userInfo.username == 'system:serviceaccount:{NAMESPACE}:ops'"
    assert binding["spec"] == {**expected_binding["spec"], "policyName": policy["metadata"]["name"]}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump_all([policy, binding]))
    result = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 2, result.stdout


def test_deployment_runs_the_operator_restricted(helm):
    docs = template(helm)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    assert container["image"] == "ghcr.io/parley-dev/parley-operator:0.1.0"
    assert container["args"] == [
        "run",
        "--gateway-image=ghcr.io/parley-dev/parley-gateway:0.1.0",
        "--metrics-addr=0.0.0.0:8080",
    ]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    assert env["POD_NAME"] == "metadata.name"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    # The restricted Pod Security Standard.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    service = one(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8080


def test_deployment_args_follow_values(helm):
    docs = template(
        helm,
        "--set", "watchNamespace=team-a",
        "--set", "leaderElection.enabled=false",
        "--set", "replicas=1",
        "--set", "metrics.port=9090",
        "--set", "image.tag=dev",
        "--set", "gatewayImage.repository=registry.local/gw,gatewayImage.tag=1.2.3",
        "--set", "extraArgs={--leader-election-namespace=locks}",
    )
    container = operator_container(docs)
    assert container["image"] == "ghcr.io/parley-dev/parley-operator:dev"
    assert container["args"] == [
        "run",
        "--gateway-image=registry.local/gw:1.2.3",
        "--metrics-addr=0.0.0.0:9090",
        "--namespace=team-a",
        "--leader-election=false",
        "--leader-election-namespace=locks",
    ]
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert container["ports"][0]["containerPort"] == 9090


def test_long_names_are_cut_to_63_characters(helm):
    docs = template(helm, "--set", "nameOverride=" + "n" * 70)
    release = "r" * 53  # helm's longest release name
    result = run_helm(
        helm, "template", release, CHART, "-n", NAMESPACE, "--kube-version", KUBERNETES_VERSION,
        "--set", "nameOverride=operator",
    )
    assert result.returncode == 0, result.stderr
    docs += [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
        assert not doc["metadata"]["name"].endswith("-"), doc["metadata"]["name"]
        for value in doc["metadata"]["labels"].values():
            assert len(value) <= 63, value
    assert one(docs[-5:], "Service")["metadata"]["name"].endswith("-metrics")


def test_service_monitor_only_with_the_prometheus_operator_api(helm):
    assert not [d for d in template(helm, "--set", "serviceMonitor.enabled=true") if d["kind"] == "ServiceMonitor"]
    docs = template(helm, "--set", "serviceMonitor.enabled=true", "--api-versions", "monitoring.coreos.com/v1")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == one(docs, "Service")["spec"]["selector"]


def test_grafana_dashboard_config_map_for_the_sidecar(helm, tmp_path):
    assert not [d for d in template(helm) if d["kind"] == "ConfigMap"]
    docs = template(helm, "--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.annotations.grafana_folder=Parley")
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Parley"}
    assert json.loads(cm["data"]["parley.json"]) == json.loads((REPO / "config/grafana/parley.json").read_text())
    other = one(template(helm, "--set", "grafanaDashboard.enabled=true", "--set", "grafanaDashboard.namespace=monitoring",
                         "--set", "grafanaDashboard.label=dashboards", "--set", "grafanaDashboard.labelValue=parley"), "ConfigMap")
    assert other["metadata"]["namespace"] == "monitoring" and other["metadata"]["labels"]["dashboards"] == "parley"
    # A valid Kubernetes object.
    path = tmp_path / "cm.yaml"
    path.write_text(yaml.safe_dump(cm))
    result = subprocess.run([BIN / "kubernetes-validate", "--strict", "-k", KUBERNETES_VERSION, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_rule_only_with_its_api_and_equal_to_config(helm):
    assert not [d for d in template(helm, "--set", "prometheusRule.enabled=true") if d["kind"] == "PrometheusRule"]
    api = ["--api-versions", "monitoring.coreos.com/v1/PrometheusRule"]
    assert not [d for d in template(helm, *api) if d["kind"] == "PrometheusRule"]
    rule = one(template(helm, "--set", "prometheusRule.enabled=true", "--set", "prometheusRule.labels.release=kps", *api), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load((REPO / "config/prometheus/parley-rules.yaml").read_text())
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    runbook = (REPO / "docs/runbook.md").read_text()
    for a in alerts:
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        anchor = a["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor == a["alert"].lower() and f"\n## {a['alert']}\n" in runbook, a["alert"]


def test_chart_files_are_the_committed_dashboard_and_rules():
    """charts/parley/files/ holds copies (helm reads only files inside the chart): after
    changing config/, `cp config/grafana/parley.json config/prometheus/parley-rules.yaml charts/parley/files/`."""
    assert (CHART / "files/parley.json").read_bytes() == (REPO / "config/grafana/parley.json").read_bytes()
    assert (CHART / "files/parley-rules.yaml").read_bytes() == (REPO / "config/prometheus/parley-rules.yaml").read_bytes()


def test_chart_crds_are_the_committed_crds():
    assert (CHART / "crds/parley-crds.yaml").read_bytes() == (REPO / "config/crd/parley-crds.yaml").read_bytes()


@pytest.mark.parametrize(
    "overrides",
    [
        ["--set-string", "replicas=two"],
        ["--set", "leaderElection.enabled=maybe"],
        ["--set", "watchNamespace=Team_A"],
        ["--set", "metrics.port=70000"],
        ["--set", "image.pullPolicy=Sometimes"],
        ["--set", "replicaCount=3"],
        ["--set", "grafanaDashboard.enabled=yes"],
        ["--set", "prometheusRule.severity=page"],
    ],
    ids=["replicas-string", "leader-election-not-bool", "bad-namespace", "bad-port", "bad-pull-policy", "unknown-key",
         "dashboard-enabled-not-bool", "unknown-rule-key"],
)
def test_broken_values_are_refused(helm, overrides):
    lint = run_helm(helm, "lint", "--strict", CHART, *overrides)
    assert lint.returncode != 0, lint.stdout
    assert "values don't meet the specifications of the schema" in lint.stdout + lint.stderr, lint.stdout
    rendered = run_helm(helm, "template", "parley", CHART, *overrides)
    assert rendered.returncode != 0, rendered.stdout
