"""Parley run the way users run it: the Helm chart's operator on a real node, the samples
applied, chat through the gateway pods it makes, and every lifecycle step that only a
kubelet can prove (the ConfigMap's `..data` swap, projected Secret rotation, probes, the
HPA hand-over, garbage collection, `helm uninstall`).

The tests run in file order and build on each other, like a user's session: install,
apply, chat, change, scale, delete, uninstall. The upstream is `parley-mock-llm` and the
shared state a Redis, both as pods of the test's namespace (no registry, no DNS needed):
the samples are applied with their provider URLs and the Redis URL pointed at those
pods' Services, and nothing else changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import httpx
import openai
import pytest
import yaml

from conftest import (
    CHART,
    REPO,
    IMAGE_TAG,
    MOCK_IMAGE,
    REDIS_IMAGE,
    SAMPLES,
    Kube,
    PortForward,
    condition,
    wait_for,
)

sys.path.insert(0, str(REPO / "e2e" / "manifests"))
from argocd_health import health  # noqa: E402 - the Argo CD health scripts' runner

RELEASE = "parley"
SYSTEM_NS = "parley-system"
NS = "parley-cluster-e2e"
DIAGNOSTIC_NAMESPACES = [SYSTEM_NS, NS]
CHATBOT = "support"
GATEWAY = f"{CHATBOT}-gateway"
GATEWAY_PODS = f"app.kubernetes.io/instance={CHATBOT},app.kubernetes.io/managed-by=parley-operator"
# How long a change may take to reach a running pod: the kubelet's sync of ConfigMap and
# Secret volumes (about a minute on a default kubelet) plus the gateway's reload.
PROPAGATION_S = 150

RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def fingerprint(key: str) -> str:
    """What the mock records instead of a key (`parley_e2e::mock_llm::key_fingerprint`)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def sample_docs() -> list[dict]:
    docs = []
    for path in sorted(SAMPLES.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def sample_secret(name: str, key: str) -> str:
    for doc in sample_docs():
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == name:
            return doc["stringData"][key]
    raise AssertionError(f"config/samples has no Secret {name}")


ACME_KEY = sample_secret("acme-key", "api-key")
ROTATED_KEY = "pk-acme-rotated-in-cluster"


def openai_client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=30)


def gateway_pods(kube: Kube) -> list[dict]:
    return kube.ready_pods(NS, GATEWAY_PODS)


def deployment_replicas(kube: Kube) -> int | None:
    dep = kube.get("deployment", GATEWAY, NS)
    return None if dep is None else dep["spec"].get("replicas")


def wait_gateway_ready(kube: Kube, replicas: int, timeout: float = 180) -> list[dict]:
    def settled() -> list[dict] | None:
        pods = gateway_pods(kube)
        dep = kube.get("deployment", GATEWAY, NS)
        if dep is None or dep["spec"].get("replicas") != replicas:
            return None
        status = dep.get("status", {})
        if status.get("readyReplicas") == replicas and status.get("updatedReplicas") == replicas and len(pods) == replicas:
            return pods
        return None

    return wait_for(settled, timeout, f"{replicas} ready gateway pods")


# --- fixtures: the release, the namespace, the upstream ---------------------------------


@pytest.fixture(scope="module")
def release(kube: Kube):
    kube.helm("install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace", "--wait", "--timeout", "5m")
    yield RELEASE
    kube.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--ignore-not-found", "--wait")
    kube.run("delete", "namespace", SYSTEM_NS, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="module")
def namespace(kube: Kube):
    kube.run("create", "namespace", NS)
    yield NS
    kube.run("delete", "namespace", NS, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="module")
def upstream(kube: Kube, namespace: str) -> dict:
    """parley-mock-llm and Redis as pods with Services; their cluster URLs."""

    def pod(name: str, image: str, args: list[str], port: int, probe: dict) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [
                    {
                        "name": name,
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "args": args,
                        "ports": [{"containerPort": port}],
                        "readinessProbe": {**probe, "periodSeconds": 1},
                        "securityContext": RESTRICTED_CONTAINER,
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }
                ],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        }

    def service(name: str, port: int) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": port}]},
        }

    kube.apply(
        [
            pod("mock-llm", MOCK_IMAGE, ["--listen", "0.0.0.0:8000", "--name", "cluster-mock"], 8000,
                {"httpGet": {"path": "/healthz", "port": 8000}}),
            service("mock-llm", 8000),
            pod("redis", REDIS_IMAGE, ["--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no",
                                       "--save", "", "--appendonly", "no", "--dir", "/data"], 6379,
                {"tcpSocket": {"port": 6379}}),
            service("redis", 6379),
        ],
        namespace,
    )
    for name in ("mock-llm", "redis"):
        kube.run("wait", "-n", namespace, "--for=condition=Ready", f"pod/{name}", "--timeout=120s")
    mock_ip = kube.get("service", "mock-llm", namespace)["spec"]["clusterIP"]
    redis_ip = kube.get("service", "redis", namespace)["spec"]["clusterIP"]
    return {"mock": f"http://{mock_ip}:8000", "redis": f"redis://{redis_ip}:6379/0"}


@pytest.fixture(scope="module")
def mock_url(kube: Kube, upstream: dict):
    """The mock upstream pod, port-forwarded to the host (its /_mock/* endpoints)."""
    pf = PortForward(kube, NS, "pod/mock-llm", 8000)
    yield pf.url
    pf.close()


@pytest.fixture(scope="module")
def mock_stats(mock_url: str):
    """A function that reads the mock upstream's counters."""

    def stats() -> dict:
        return httpx.get(f"{mock_url}/_mock/stats", timeout=10).json()

    return stats


@pytest.fixture(scope="module")
def samples(kube: Kube, release: str, upstream: dict) -> list[dict]:
    """config/samples, with the provider URLs and the Redis URL pointed at the test's pods
    (and the ledger's at a closed port: there is no PostgreSQL in the test cluster, and an
    unreachable ledger must never affect a request)."""
    docs = sample_docs()
    for doc in docs:
        if doc["kind"] == "ModelRoute":
            for backend in doc["spec"]["backends"]:
                assert backend["baseUrl"].startswith("https://api."), backend
                backend["baseUrl"] = f"{upstream['mock']}/v1"
        elif doc["kind"] == "Secret" and doc["metadata"]["name"] == "redis":
            doc["stringData"]["url"] = upstream["redis"]
        elif doc["kind"] == "Secret" and doc["metadata"]["name"] == "usage-db":
            doc["stringData"]["url"] = "postgres://parley:test@127.0.0.1:1/parley"
    kube.apply(docs, NS)
    return docs


# --- the tests, in the order a user goes -----------------------------------------------


def test_helm_install_runs_the_operator_which_takes_the_lease(kube: Kube, release: str):
    dep = kube.json("get", "deployment", "-n", SYSTEM_NS, "-l", f"app.kubernetes.io/instance={release}")["items"]
    assert len(dep) == 1, [d["metadata"]["name"] for d in dep]
    operator = dep[0]
    image = operator["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/parley-dev/parley-operator:{IMAGE_TAG}", "the chart's default image"
    assert operator["status"].get("readyReplicas") == operator["spec"]["replicas"]

    pods = {p["metadata"]["name"] for p in kube.ready_pods(SYSTEM_NS, f"app.kubernetes.io/instance={release}")}

    def holder() -> str | None:
        lease = kube.get("lease", "parley-operator", SYSTEM_NS)
        return lease and lease["spec"].get("holderIdentity")

    identity = wait_for(holder, 60, "the operator's leader Lease")
    assert any(identity.startswith(p) for p in pods), f"Lease held by {identity!r}, pods {pods}"


def test_samples_become_ready_and_the_hpa_takes_the_gateway_to_its_minimum(kube: Kube, samples: list[dict]):
    def ready(kind: str, name: str) -> dict | None:
        obj = kube.get(kind, name, NS)
        cond = condition(obj, "Ready")
        return obj if cond and cond["status"] == "True" else None

    for doc in samples:
        if doc["apiVersion"].startswith("parley.dev/"):
            wait_for(lambda: ready(doc["kind"], doc["metadata"]["name"]), 90,
                     f"{doc['kind']} {doc['metadata']['name']} Ready")
    # The generated key of the Tenant without keys exists, owned by its Tenant.
    secret = wait_for(lambda: kube.get("secret", "globex-api-key", NS), 30, "globex-api-key")
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "Tenant"

    hpa = kube.get("hpa", GATEWAY, NS)
    assert hpa is not None and hpa["spec"]["minReplicas"] == 2
    # The operator renders no replicas under an HPA: the Deployment starts at 1 and the
    # HPA controller raises it to its minimum, which the operator must then leave alone.
    pods = wait_gateway_ready(kube, 2)
    spec = pods[0]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == f"ghcr.io/parley-dev/parley-gateway:{IMAGE_TAG}"
    time.sleep(5)
    assert deployment_replicas(kube) == 2, "the operator reset the replicas the HPA set"

    # Argo CD's view of the same objects (config/argocd): all Healthy once the pods are.
    for doc in samples:
        if doc["apiVersion"].startswith("parley.dev/"):
            kind, name = doc["kind"], doc["metadata"]["name"]

            def healthy() -> bool:
                status = health(kind, kube.get(kind, name, NS))
                assert status[0] == "Healthy", status
                return True

            wait_for(healthy, 60, f"Argo CD to see {kind} {name} Healthy")


def test_chat_and_stream_through_the_gateway_service(kube: Kube, samples: list[dict], mock_stats):
    before = mock_stats()
    with PortForward(kube, NS, f"svc/{GATEWAY}", 80) as pf:
        client = openai_client(pf.url, ACME_KEY)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hello from a pod"}]
        )
        completion = raw.parse()
        assert completion.choices[0].message.content
        assert completion.usage and completion.usage.completion_tokens > 0
        assert raw.headers["x-parley-model"] == "gpt-4o"
        backend = raw.headers["x-parley-backend"]
        assert backend in ("primary", "batch-account")
        assert raw.headers["x-request-id"]

        stream = client.chat.completions.create(
            model="claude-sonnet",
            messages=[{"role": "user", "content": "Stream me a reply"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0

        # An unknown key is refused by the pod, not passed on.
        with pytest.raises(openai.AuthenticationError):
            openai_client(pf.url, "sk-not-a-tenant-key").models.list()

    after = mock_stats()
    # Both calls reached the upstream pod: gpt-4o on the OpenAI API, claude-sonnet
    # translated to the Anthropic API with its upstream model name.
    assert after["by_model"].get("gpt-4o", 0) > before["by_model"].get("gpt-4o", 0)
    assert after["by_model"].get("claude-sonnet-4-5", 0) > before["by_model"].get("claude-sonnet-4-5", 0)
    assert after["by_path"].get("/v1/messages", 0) > before["by_path"].get("/v1/messages", 0)
    assert after["streams_completed"] > before["streams_completed"]
    # The projected Secrets reached the pod: acme's own key pays for gpt-4o on `primary`,
    # the route's key for `batch-account`.
    gpt4o = [r for r in after["recent_requests"] if isinstance(r["body"], dict) and r["body"].get("model") == "gpt-4o"]
    expected = sample_secret("acme-openai", "key") if backend == "primary" else sample_secret("llm-keys", "openai-batch")
    assert gpt4o and gpt4o[-1]["api_key"] == fingerprint(expected)


def test_a_model_route_edit_reaches_the_running_pods_without_a_restart(kube: Kube, samples: list[dict], mock_stats):
    pods = gateway_pods(kube)
    before = {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"] for p in pods}
    edited = "gpt-4o-mini-edited-in-cluster"
    kube.run("patch", "modelroute", "gpt-4o-mini", "-n", NS, "--type=json",
             "-p", json.dumps([{"op": "add", "path": "/spec/backends/0/upstreamModel", "value": edited}]))

    for pod in pods:
        name = pod["metadata"]["name"]
        with PortForward(kube, NS, f"pod/{name}", 8080) as pf:
            client = openai_client(pf.url, ACME_KEY)

            def serves_the_edit() -> bool:
                seen = mock_stats()["by_model"].get(edited, 0)
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
                return mock_stats()["by_model"].get(edited, 0) > seen

            wait_for(serves_the_edit, PROPAGATION_S, f"pod {name} to serve the edited ModelRoute", interval=2)

    after = {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"] for p in gateway_pods(kube)}
    assert after == before, "a config change must be reloaded, not restart or replace pods"


def test_a_rotated_tenant_key_is_refused_and_its_successor_accepted(kube: Kube, samples: list[dict]):
    pods = gateway_pods(kube)
    rotated = ROTATED_KEY
    kube.run("patch", "secret", "acme-key", "-n", NS, "-p", json.dumps({"stringData": {"api-key": rotated}}))
    for pod in pods:
        name = pod["metadata"]["name"]
        with PortForward(kube, NS, f"pod/{name}", 8080) as pf:

            def rotated_in() -> bool:
                old = httpx.get(f"{pf.url}/v1/models", headers={"Authorization": f"Bearer {ACME_KEY}"}, timeout=10)
                new = httpx.get(f"{pf.url}/v1/models", headers={"Authorization": f"Bearer {rotated}"}, timeout=10)
                return old.status_code == 401 and new.status_code == 200

            wait_for(rotated_in, PROPAGATION_S, f"pod {name} to take the rotated key", interval=2)
    # Rotating a key inside a Secret the pods already mount does not roll the fleet.
    assert {p["metadata"]["uid"] for p in gateway_pods(kube)} == {p["metadata"]["uid"] for p in pods}


def test_a_terminating_pod_finishes_its_open_stream(kube: Kube, samples: list[dict], mock_url: str):
    """The preStop pause and the grace period let a pod that is being deleted finish the
    stream it is serving before it exits."""
    slow = {"tokens_per_second": 4.0, "reply_tokens": 24}
    httpx.post(f"{mock_url}/_mock/config", json=slow, timeout=10).raise_for_status()
    try:
        pod = gateway_pods(kube)[0]["metadata"]["name"]
        with PortForward(kube, NS, f"pod/{pod}", 8080) as pf:
            stream = openai_client(pf.url, ROTATED_KEY).chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "a slow reply, please"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [next(stream)]
            kube.run("delete", "pod", pod, "-n", NS, "--wait=false")
            started = time.monotonic()
            chunks.extend(stream)
            elapsed = time.monotonic() - started
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["stop"], f"the stream was cut: {finish}"
        assert chunks[-1].usage and chunks[-1].usage.completion_tokens == 24
        assert elapsed > 3, "the stream should have outlived the deletion by seconds"
        wait_for(lambda: kube.get("pod", pod, NS) is None, 120, f"pod {pod} to be gone")
    finally:
        httpx.post(f"{mock_url}/_mock/config", json={"tokens_per_second": 0.0, "reply_tokens": 20}, timeout=10)
    wait_gateway_ready(kube, 2)


def test_scaling_hands_replicas_between_the_operator_and_the_hpa(kube: Kube, samples: list[dict]):
    def patch_gateway(gateway: dict) -> None:
        kube.run("patch", "chatbot", CHATBOT, "-n", NS, "--type=merge", "-p", json.dumps({"spec": {"gateway": gateway}}))

    # A higher minimum: the HPA scales the running Deployment up.
    patch_gateway({"autoscaling": {"minReplicas": 3, "maxReplicas": 10}})
    wait_for(lambda: kube.get("hpa", GATEWAY, NS)["spec"]["minReplicas"] == 3, 60, "the HPA's new minimum")
    wait_gateway_ready(kube, 3)

    # Autoscaling off: the operator owns replicas again and the HPA goes.
    patch_gateway({"autoscaling": None, "replicas": 2})
    wait_for(lambda: kube.get("hpa", GATEWAY, NS) is None, 60, "the HPA to be deleted")
    wait_gateway_ready(kube, 2)

    # Autoscaling on again: replicas change hands without a reset to 1 on the way.
    patch_gateway({"autoscaling": {"minReplicas": 2, "maxReplicas": 4}, "replicas": None})
    seen: set[int | None] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen.add(deployment_replicas(kube))
        time.sleep(0.2)
    assert kube.get("hpa", GATEWAY, NS) is not None
    assert seen == {2}, f"replicas went through {sorted(seen, key=str)} during the hand-over"
    wait_gateway_ready(kube, 2)


def test_deleting_the_chatbot_collects_every_child(kube: Kube, samples: list[dict]):
    kinds = "deployments,replicasets,pods,services,configmaps,hpa,pdb,serviceaccounts"
    children = kube.run("get", kinds, "-n", NS, "-l", f"app.kubernetes.io/instance={CHATBOT}", "-o", "name").stdout.split()
    assert {c.split("/")[0] for c in children} >= {
        "deployment.apps", "service", "configmap", "horizontalpodautoscaler.autoscaling",
        "poddisruptionbudget.policy", "serviceaccount",
    }, children
    kube.run("delete", "chatbot", CHATBOT, "-n", NS, "--wait=true", "--timeout=60s")

    def gone() -> bool:
        left = kube.run("get", kinds, "-n", NS, "-l", f"app.kubernetes.io/instance={CHATBOT}", "-o", "name").stdout.split()
        return not left

    wait_for(gone, 120, "every child of the Chatbot to be garbage-collected")
    # What belongs to the Tenants stays.
    assert kube.get("secret", "globex-api-key", NS) is not None


def test_helm_uninstall_leaves_nothing_but_the_crds(kube: Kube, release: str):
    kube.helm("uninstall", release, "-n", SYSTEM_NS, "--wait")
    selector = f"app.kubernetes.io/instance={release}"

    def chart_objects() -> list[str]:
        names = kube.run("get", "deployments,pods,services,serviceaccounts,configmaps,secrets", "-n", SYSTEM_NS,
                         "-l", selector, "-o", "name").stdout.split()
        names += kube.run("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name").stdout.split()
        return names

    wait_for(lambda: not chart_objects(), 120, "the chart's objects to be gone")
    crds = kube.run("get", "crd", "-o", "name").stdout.split()
    for kind in ("chatbots", "tenants", "modelroutes"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{kind}.parley.dev" in crds
