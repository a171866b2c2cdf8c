"""Parley watched by a real Prometheus (Debian's package, run as a plain process on a free
loopback port with its storage in a temporary directory): it scrapes a running gateway
(Redis, a PostgreSQL ledger, every kind of traffic) and a running operator (against the
test control plane, e2e/controlplane) under a short load, with the SLA rules loaded. Every
query of the Grafana dashboard returns data and every alert expression names metrics and
labels that exist (no typo'd name). `promtool check rules` is clean and the rules' unit
tests (config/prometheus/tests/) pass."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "e2e/python"))

from conftest import OTHER_KEY, TENANT_KEY, Proc, _wait_for, backend, binaries, config_doc, free_port, model, start_gateway, start_mock  # noqa: E402,F401
from pg import shared_pg  # noqa: E402,F401

RULES = REPO / "config/prometheus/parley-rules.yaml"
DASHBOARD = REPO / "config/grafana/parley.json"
OPERATOR_BIN = Path(os.environ.get("PARLEY_OPERATOR_BIN", REPO / "target/debug/parley-operator"))
CONTROLPLANE_BIN = REPO / "target/controlplane/parley-controlplane"
REDIS_URL = os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379")
BUDGET_KEY = "sk-parley-test-budget"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=600)
        # Only the binaries are used (run as a plain process below), not the packaged service.
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], check=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which(name)
    assert found, f"{name} is not installed (Debian package prometheus)"
    return found


def test_promtool_check_rules_is_clean():
    r = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_promtool_unit_tests_fire_each_alert_only_on_its_input():
    tests = sorted((REPO / "config/prometheus/tests").glob("*.yaml"))
    assert tests
    r = subprocess.run([tool("promtool"), "test", "rules", *map(str, tests)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Every alert is tested firing somewhere and silent somewhere.
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    fired, silent = set(), set()
    for path in tests:
        for t in yaml.safe_load(path.read_text())["tests"]:
            for a in t.get("alert_rule_test", []):
                (fired if a["exp_alerts"] else silent).add(a["alertname"])
    assert fired == alerts and silent == alerts, (alerts - fired, alerts - silent)


# --- a control plane with the operator reconciling the samples ---------------------------

class ControlPlane:
    def __init__(self, workdir: Path):
        if not os.access(CONTROLPLANE_BIN, os.X_OK):
            pytest.fail(f"{CONTROLPLANE_BIN} is not built: run `make controlplane`")
        self.dir = workdir / "cp"
        self.proc = subprocess.Popen([str(CONTROLPLANE_BIN), "--data-dir", str(self.dir), "--exit-on-stdin-close"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(workdir / "cp.err", "wb"), text=True)
        line = ""
        deadline = time.monotonic() + 120
        while line.strip() != "ready":
            assert time.monotonic() < deadline and self.proc.poll() is None, (workdir / "cp.err").read_text()[-2000:]
            line = self.proc.stdout.readline()
        self.kubeconfig = self.dir / "kubeconfig"
        cfg = yaml.safe_load(self.kubeconfig.read_text())
        cluster, user = cfg["clusters"][0]["cluster"], cfg["users"][0]["user"]
        self.server = cluster["server"]
        pki = workdir / "pki"
        pki.mkdir()
        files = {}
        for name, key in [("ca", "certificate-authority"), ("cert", "client-certificate"), ("key", "client-key")]:
            src = cluster if name == "ca" else user
            if f"{key}-data" in src:
                (pki / name).write_bytes(base64.b64decode(src[f"{key}-data"]))
                files[name] = str(pki / name)
            else:
                files[name] = src[key]
        ctx = ssl.create_default_context(cafile=files["ca"])
        ctx.load_cert_chain(files["cert"], files["key"])
        self.http = httpx.Client(base_url=self.server, verify=ctx, timeout=30)

    PLURALS = {"CustomResourceDefinition": "customresourcedefinitions", "Namespace": "namespaces", "Secret": "secrets",
               "ModelRoute": "modelroutes", "Tenant": "tenants", "Chatbot": "chatbots"}

    def apply(self, doc: dict, namespace: str | None = None) -> None:
        api = doc["apiVersion"]
        prefix = f"/api/{api}" if "/" not in api else f"/apis/{api}"
        plural = self.PLURALS[doc["kind"]]
        if doc["kind"] in ("CustomResourceDefinition", "Namespace"):
            url = f"{prefix}/{plural}/{doc['metadata']['name']}"
        else:
            url = f"{prefix}/namespaces/{namespace}/{plural}/{doc['metadata']['name']}"
        r = self.http.patch(url, params={"fieldManager": "parley-observability-test", "force": "true"},
                            content=json.dumps(doc), headers={"content-type": "application/apply-patch+yaml"})
        assert r.status_code in (200, 201), r.text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def operator_metrics(tmp_path):
    cp = ControlPlane(tmp_path)
    procs: list[subprocess.Popen] = []
    try:
        for crd in yaml.safe_load_all((REPO / "config/crd/parley-crds.yaml").read_text()):
            if crd:
                cp.apply(crd)
        for crd in ("chatbots", "tenants", "modelroutes"):
            _wait_for(lambda: any(c["type"] == "Established" and c["status"] == "True" for c in
                                  cp.http.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}.parley.dev").json().get("status", {}).get("conditions", [])),
                      30, f"CRD {crd} established")
        ns = "parley-observability"
        cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        port = free_port()
        log = open(tmp_path / "operator.log", "wb")
        operator = subprocess.Popen(
            [str(OPERATOR_BIN), "run", "--metrics-addr", f"127.0.0.1:{port}", "--leader-election-namespace", ns],
            env={**os.environ, "KUBECONFIG": str(cp.kubeconfig)}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        procs.append(operator)
        for path in sorted((REPO / "config/samples").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    cp.apply(doc, ns)
        url = f"http://127.0.0.1:{port}/metrics"
        _wait_for(lambda: 'parley_operator_reconciles_total{kind="Chatbot",result="ok"}' in httpx.get(url, timeout=2).text
                  and "parley_operator_leader 1" in httpx.get(url, timeout=2).text, 60, "the operator to reconcile the samples")
        yield f"127.0.0.1:{port}"
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        cp.stop()


# --- the gateway under a short load ---------------------------------------------------------

def gateway_doc(mock, broken, db) -> dict:
    pricing = {"inputPerMillionTokens": "2.50", "outputPerMillionTokens": "10.00"}
    models = [
        model("gpt-4o", [backend(mock)], pricing=pricing, cache={"ttlSeconds": 300}),
        model("flaky", [backend(broken, name="down")], pricing=pricing, fallbacks=["gpt-4o"], retry={"maxAttempts": 1}),
        model("broken", [backend(broken, name="down2")], pricing=pricing, retry={"maxAttempts": 1}),
    ]
    doc = config_doc(models, chatbot="observability/parley", redis={"url": {"value": REDIS_URL}}, usage={"postgresUrl": {"value": db.url}})
    for t in doc["tenants"]:
        if t["id"] == "test/limited":
            t["rateLimit"] = {"requestsPerMinute": 5}
            t["allowedModels"] = ["gpt-4o"]
    doc["tenants"].append({"id": "test/budget", "apiKeys": [{"value": BUDGET_KEY}], "budget": {"monthlyUsd": "0.0001"}})
    return doc


def load(gw, seconds: float) -> dict[int, int]:
    statuses: dict[int, int] = {}
    auth = lambda k: {"authorization": f"Bearer {k}"}  # noqa: E731
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        msgs = [{"role": "user", "content": f"hello {i}"}]
        rs = [
            gw.http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": msgs}, headers=auth(TENANT_KEY)),
            gw.http.post("/v1/messages", json={"model": "gpt-4o", "max_tokens": 30, "messages": msgs}, headers=auth(TENANT_KEY)),
            gw.http.post("/v1/chat/completions", json={"model": "gpt-4o", "temperature": 0, "messages": [{"role": "user", "content": "cached"}]}, headers=auth(TENANT_KEY)),
            gw.http.post("/v1/chat/completions", json={"model": "flaky", "messages": msgs}, headers=auth(TENANT_KEY)),
            gw.http.post("/v1/chat/completions", json={"model": "broken", "messages": msgs}, headers=auth(TENANT_KEY)),
            gw.http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": msgs}, headers=auth(OTHER_KEY)),
            gw.http.post("/v1/chat/completions", json={"model": "gpt-4o", "max_tokens": 500, "messages": msgs}, headers=auth(BUDGET_KEY)),
            gw.http.post("/chat", json={"session_id": f"s{i % 3}", "messages": msgs}, headers=auth(TENANT_KEY)),
        ]
        with gw.http.stream("POST", "/v1/chat/completions", json={"model": "gpt-4o", "stream": True, "messages": msgs}, headers=auth(TENANT_KEY)) as r:
            r.read()
            rs.append(r)
        for r in rs:
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        time.sleep(0.05)
    return statuses


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, str]):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="parley-prometheus-"))
        rules = yaml.safe_load(RULES.read_text())
        for g in rules["groups"]:
            g["interval"] = "1s"  # evaluated at once, not every 30 s
        (self.dir / "rules.yaml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(self.dir / "rules.yaml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [addr]}]} for job, addr in targets.items()],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = Proc([tool("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
                          f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], workdir, "prometheus")
        self.url = f"http://127.0.0.1:{self.port}"
        _wait_for(lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, 60, "prometheus ready")

    def query(self, expr: str) -> list:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def dashboard_queries() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["definition"])
            assert m, v
            out.append((f"variable {v['name']}", f"count by ({m.group(2)}) ({m.group(1)}{{{m.group(2)}!=\"\"}})"))
    return out


def grafana(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace('"$tenant"', '".*"')


SELECTOR = re.compile(r"\b(parley[_:][a-zA-Z0-9_:]*)(\{[^}]*\})?")
BY = re.compile(r"\bby \(([^)]*)\)")


def test_prometheus_scrapes_every_dashboard_query_and_alert_expression(start_mock, start_gateway, shared_pg, operator_metrics, tmp_path):
    mock = start_mock("good")
    broken = start_mock("broken")
    broken.config(fail_status=503)
    gw = start_gateway(gateway_doc(mock, broken, shared_pg))
    prom = Prometheus(tmp_path, {"parley-gateway": gw.admin.removeprefix("http://"), "parley-operator": operator_metrics})
    try:
        statuses = load(gw, 25)
        assert {200, 402, 429}.issubset(statuses) and any(s >= 500 for s in statuses), statuses
        _wait_for(lambda: all(t["health"] == "up" for t in httpx.get(f"{prom.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]), 30, "both targets up")
        _wait_for(lambda: prom.query("parley:overhead_seconds:p99_5m"), 30, "the recording rules")
        time.sleep(2)  # every group evaluated at least once more
        empty = []
        for title, expr in dashboard_queries():
            if not prom.query(grafana(expr)):
                empty.append(f"{title}: {expr}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        rules = yaml.safe_load(RULES.read_text())
        problems = []
        for g in rules["groups"]:
            for r in g["rules"]:
                expr = r["expr"]
                name = r.get("alert") or r.get("record")
                prom.query(expr)  # valid PromQL, evaluates
                metrics = set()
                for metric, matchers in SELECTOR.findall(expr):
                    metrics.add(metric)
                    if not prom.query(f"count({metric})"):
                        problems.append(f"{name}: {metric} has no series")
                        continue
                    for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or ""):
                        if not prom.query(f'count by ({label}) ({metric}{{{label}!=""}})'):
                            problems.append(f"{name}: {metric} has no label {label}")
                for labels in BY.findall(expr):
                    for label in (x.strip() for x in labels.split(",")):
                        # namespace and pod come from Kubernetes service discovery.
                        if label in ("namespace", "pod", "le", ""):
                            continue
                        if not any(prom.query(f'count by ({label}) ({m}{{{label}!=""}})') for m in metrics):
                            problems.append(f"{name}: no metric of its expression has label {label}")
                # Each alert's own selectors return data now (with their matchers).
                if "alert" in r:
                    for metric, matchers in SELECTOR.findall(expr):
                        if matchers and "!=\"ok\"" in matchers:
                            continue  # reconcile errors: none in a healthy run (labels checked above)
                        if not prom.query(f"{metric}{matchers}"):
                            problems.append(f"{name}: {metric}{matchers} returns nothing")
        assert not problems, "\n".join(problems)
        # The healthy operator raises nothing; the broken upstream does (breaker open).
        firing = {a["labels"]["alertname"] for a in httpx.get(f"{prom.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]}
        assert "ParleyOperatorNoLeader" not in firing and "ParleyRedisDown" not in firing and "ParleyLedgerDown" not in firing, firing
    finally:
        prom.stop()
