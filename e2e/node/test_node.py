"""The test cluster with a real node (scripts/cluster.sh).

`up` gives a node that reports Ready and runs pods: scheduled by kube-scheduler, with a
ServiceAccount token, reachable from the host at their IP and through a Service's
ClusterIP (kube-proxy), reaching the host's node address and the API server through the
`kubernetes` Service; `kubectl logs`, `exec` and `port-forward` work; the HPA controller
raises a Deployment to its minimum. `down` leaves no process, mount, network namespace,
interface or iptables chain behind, also after an `up` that failed half-way.

Needs root, and `make cluster-tools` (the Makefile target `test-node` builds it). The
image of the pods is target/cluster/test-images/nodetest.tar (scripts/cluster/nodetest.c).
"""

import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = str(ROOT / "scripts" / "cluster.sh")
TEST_IMAGES = ROOT / "target" / "cluster" / "test-images"
KUBECTL = os.environ.get("KUBECTL", "kubectl")
NODE_IP = "10.245.0.1"
POD_CIDR = ipaddress.ip_network("10.244.0.0/24")
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/24")
IMAGE = "localhost/parley/nodetest:1.0"
NS = "node-test"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the node needs root")


def no_other_cluster():
    """One test cluster per machine (fixed addresses): fail, never disturb another one."""
    lock = Path("/run/parley-cluster.dir")
    if lock.exists():
        pytest.fail(f"a test cluster is up from {lock.read_text().strip()}: scripts/cluster.sh down it first")


def host_state() -> dict:
    """What `up` may add to the machine and `down` must remove again (only what is
    recognisably the cluster's: the machine is shared, dockerd may add its own)."""

    def lines(*cmd: str) -> set[str]:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    links = {re.split(r"[@:]", line.split(": ", 2)[1])[0] for line in lines("ip", "-o", "link", "show")}
    rules = set()
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            for line in lines(tool, "-w", "-t", table, "-S"):
                if re.search(r"KUBE-|CNI-|parley-cluster", line):
                    rules.add(f"{tool} -t {table} {line}")
    return {
        "links": {link for link in links if link.startswith("parley")},
        "netns": {ns for ns in lines("ip", "netns", "list") if ns.startswith("cni-")},
        "iptables": rules,
        "routes": {r for r in lines("ip", "route", "show") if re.match(r"10\.(96|244|245)\.", r)},
    }


def leftovers(d: str, before: dict) -> list[str]:
    """Everything of DIR d still running or mounted, and what differs from `before`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if d + "/" in cmd:
            found.append(f"process {pid}: {cmd}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4]
        if mount_point.startswith(d + "/"):
            found.append(f"mount {mount_point}")
    after = host_state()
    for key, items in after.items():
        for item in sorted(items - before[key]):
            found.append(f"{key}: {item}")
    return found


def run_cluster(action: str, d: str, images: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PARLEY_CLUSTER_IMAGES=str(images))
    return subprocess.run([CLUSTER, action, d], env=env, capture_output=True, text=True, timeout=timeout)


def kubectl(kubeconfig: str, *args: str, check: bool = True, timeout: int = 60) -> str:
    proc = subprocess.run(
        [KUBECTL, "--kubeconfig", kubeconfig, *args], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def eventually(what: str, fn, timeout: float = 60, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = fn()
            if result:
                return result
            last = result
        except Exception as e:  # noqa: BLE001 - report the last failure on timeout
            last = e
        time.sleep(interval)
    raise AssertionError(f"{what}: not after {timeout}s (last: {last!r})")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - addresses of this machine
        assert resp.status == 200
        return resp.read().decode()


def test_down_cleans_up_after_a_failed_up():
    """`up` fails at the image import (after the control plane and containerd started);
    the error names the archive, and `down` still removes everything."""
    no_other_cluster()
    before = host_state()
    d = tempfile.mkdtemp(prefix="pn-", dir="/tmp")
    images = Path(d) / "images"
    images.mkdir()
    (images / "broken.tar").write_bytes(b"this is not an image archive\n" * 100)
    try:
        up = run_cluster("up", d, images)
        assert up.returncode != 0, up.stdout
        assert "ready" not in up.stdout.splitlines()
        assert "broken.tar" in up.stderr, up.stderr
        assert Path(d, "run", "containerd.pid").exists(), "up failed before containerd started"
        down = run_cluster("down", d, images)
        assert down.returncode == 0, down.stderr
        assert leftovers(d, before) == []
    finally:
        run_cluster("down", d, images)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    if not (TEST_IMAGES / "nodetest.tar").exists():
        pytest.fail(f"{TEST_IMAGES}/nodetest.tar is missing: run `make cluster-tools`")
    no_other_cluster()
    before = host_state()
    d = tempfile.mkdtemp(prefix="pn-", dir="/tmp")
    started = time.monotonic()
    up = run_cluster("up", d, TEST_IMAGES)
    try:
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stderr[-6000:]}"
        assert up.stdout.splitlines()[-1:] == ["ready"], up.stdout
        print(f"cluster.sh up took {time.monotonic() - started:.1f}s")
        yield {"dir": d, "kubeconfig": f"{d}/kubeconfig", "before": before}
    finally:
        down = run_cluster("down", d, TEST_IMAGES)
        if down.returncode == 0:
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"cluster.sh down failed (kept {d}):\n{down.stderr}")


def test_node_is_ready(cluster):
    node = json.loads(kubectl(cluster["kubeconfig"], "get", "node", "parley-node", "-o", "json"))
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True", conditions
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == NODE_IP
    # The pause image and the test image were imported, nothing pulled (the kubelet
    # reports images with its node status, every 10 s).
    def images():
        node = json.loads(kubectl(cluster["kubeconfig"], "get", "node", "parley-node", "-o", "json"))
        names = {name for i in node["status"].get("images") or [] for name in i.get("names", [])}
        return {IMAGE, "localhost/parley/pause:1.0"} <= names and names

    eventually("the imported images in the node's status", images, timeout=30)


@pytest.fixture(scope="module")
def app(cluster):
    """A Deployment of the test server with a Service, rolled out."""
    kc = cluster["kubeconfig"]
    manifest = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "nodetest", "namespace": NS},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "nodetest"}},
                    "template": {
                        "metadata": {"labels": {"app": "nodetest"}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "server",
                                    "image": IMAGE,
                                    "imagePullPolicy": "IfNotPresent",
                                    "args": ["serve", "8080"],
                                    "ports": [{"containerPort": 8080}],
                                    "readinessProbe": {
                                        "httpGet": {"path": "/ready", "port": 8080},
                                        "periodSeconds": 1,
                                    },
                                    "resources": {"requests": {"cpu": "10m", "memory": "8Mi"}},
                                    "securityContext": {
                                        "runAsNonRoot": True,
                                        "allowPrivilegeEscalation": False,
                                        "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]},
                                        "seccompProfile": {"type": "RuntimeDefault"},
                                    },
                                }
                            ]
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "nodetest", "namespace": NS},
                "spec": {"selector": {"app": "nodetest"}, "ports": [{"port": 80, "targetPort": 8080}]},
            },
        ],
    }
    path = Path(cluster["dir"]) / "nodetest.json"
    path.write_text(json.dumps(manifest))
    # The namespace's `default` ServiceAccount comes from kube-controller-manager;
    # ServiceAccount admission refuses pods until it exists, the ReplicaSet retries.
    kubectl(kc, "apply", "-f", str(path))
    kubectl(kc, "-n", NS, "rollout", "status", "deploy/nodetest", "--timeout=120s", timeout=130)
    pods = json.loads(kubectl(kc, "-n", NS, "get", "pods", "-l", "app=nodetest", "-o", "json"))["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    assert len(running) == 1, [p["status"] for p in pods]
    svc = json.loads(kubectl(kc, "-n", NS, "get", "svc", "nodetest", "-o", "json"))
    return {"pod": running[0], "cluster_ip": svc["spec"]["clusterIP"], "kubeconfig": kc}


def test_pod_is_scheduled_and_reachable_from_the_host(app):
    pod = app["pod"]
    assert pod["spec"]["nodeName"] == "parley-node"
    ip = ipaddress.ip_address(pod["status"]["podIP"])
    assert ip in POD_CIDR
    assert http_get(f"http://{ip}:8080/").startswith(f"hello from {pod['metadata']['name']}")


def test_service_cluster_ip_is_reachable_from_the_host(app):
    assert ipaddress.ip_address(app["cluster_ip"]) in SERVICE_CIDR
    body = eventually("the Service answers", lambda: http_get(f"http://{app['cluster_ip']}/"), timeout=30)
    assert body.startswith("hello from nodetest-")


def test_pod_has_a_service_account_token(app):
    name = app["pod"]["metadata"]["name"]
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    ns = kubectl(app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "cat", f"{sa}/namespace")
    assert ns == NS
    token = kubectl(app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "cat", f"{sa}/token")
    assert token.count(".") == 2  # a JWT
    ca = kubectl(app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "cat", f"{sa}/ca.crt")
    assert "BEGIN CERTIFICATE" in ca


def test_pod_reaches_the_api_server_through_the_kubernetes_service(app):
    name = app["pod"]["metadata"]["name"]
    out = kubectl(app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "tcp", "10.96.0.1", "443")
    assert "connected" in out


def test_pods_find_services_by_name(app):
    """Cluster DNS (parley-controlplane cluster-dns): Service names resolve to their
    ClusterIP through the pod's search path; names outside the cluster do not resolve."""
    name = app["pod"]["metadata"]["name"]
    resolv = kubectl(app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "cat", "/etc/resolv.conf")
    assert f"nameserver {NODE_IP}" in resolv
    assert f"search {NS}.svc.cluster.local svc.cluster.local cluster.local" in resolv
    for query in ("nodetest", f"nodetest.{NS}", f"nodetest.{NS}.svc.cluster.local"):
        out = kubectl(app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "resolve", query)
        assert out.split() == [app["cluster_ip"]], (query, out)
    out = kubectl(app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "resolve", "kubernetes.default")
    assert out.split() == ["10.96.0.1"]
    for missing in ("no-such-service", "example.com"):
        proc = subprocess.run(
            [KUBECTL, "--kubeconfig", app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "resolve", missing],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode != 0 and "resolve" in proc.stderr, (missing, proc.stdout, proc.stderr)


def test_configmap_volume_follows_an_edit(cluster):
    """The kubelet swaps a ConfigMap volume's ..data within its sync period (10 s)."""
    kc = cluster["kubeconfig"]
    kubectl(kc, "-n", NS, "create", "configmap", "conf", "--from-literal=greeting=one")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "conf-reader", "namespace": NS},
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": IMAGE,
                    "args": ["serve", "8080"],
                    "volumeMounts": [{"name": "conf", "mountPath": "/conf"}],
                }
            ],
            "volumes": [{"name": "conf", "configMap": {"name": "conf"}}],
        },
    }
    path = Path(cluster["dir"]) / "conf-reader.json"
    path.write_text(json.dumps(pod))
    kubectl(kc, "apply", "-f", str(path))
    kubectl(kc, "-n", NS, "wait", "--for=condition=Ready", "pod/conf-reader", "--timeout=60s", timeout=70)

    def read():
        return kubectl(kc, "-n", NS, "exec", "conf-reader", "--", "/nodetest", "cat", "/conf/greeting")

    assert read() == "one"
    kubectl(kc, "-n", NS, "patch", "configmap", "conf", "-p", '{"data":{"greeting":"two"}}')
    started = time.monotonic()
    eventually("the edited ConfigMap in the volume", lambda: read() == "two", timeout=30)
    took = time.monotonic() - started
    print(f"ConfigMap edit visible in the pod after {took:.1f}s")
    assert took < 20
    kubectl(kc, "-n", NS, "delete", "pod", "conf-reader", "--wait=false")


def test_pod_reaches_the_host_at_the_node_ip(app):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b"hello from the host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((NODE_IP, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        name = app["pod"]["metadata"]["name"]
        out = kubectl(app["kubeconfig"], "-n", NS, "exec", name, "--", "/nodetest", "get", NODE_IP, port, "/")
        assert "hello from the host" in out
    finally:
        server.shutdown()
        server.server_close()


def test_logs_and_port_forward(app):
    name = app["pod"]["metadata"]["name"]
    proc = subprocess.Popen(
        [KUBECTL, "--kubeconfig", app["kubeconfig"], "-n", NS, "port-forward", f"pod/{name}", ":8080"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, f"port-forward printed {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        assert http_get(f"http://127.0.0.1:{m.group(1)}/port-forwarded").startswith("hello from")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    logs = eventually(
        "the request in the pod's log",
        lambda: (out := kubectl(app["kubeconfig"], "-n", NS, "logs", name)) and "/port-forwarded" in out and out,
        timeout=15,
    )
    assert "listening on port 8080" in logs


def test_hpa_raises_the_deployment_to_its_minimum(app):
    kc = app["kubeconfig"]
    kubectl(kc, "-n", NS, "autoscale", "deploy/nodetest", "--min=2", "--max=3", "--cpu-percent=80")

    def two_ready():
        d = json.loads(kubectl(kc, "-n", NS, "get", "deploy", "nodetest", "-o", "json"))
        return d["spec"]["replicas"] == 2 and d["status"].get("readyReplicas") == 2

    eventually("2 ready replicas after the HPA", two_ready, timeout=90)


def test_down_leaves_nothing_behind(cluster):
    d = cluster["dir"]
    pods = kubectl(cluster["kubeconfig"], "get", "pods", "-A", "-o", "name")
    assert pods.strip(), "no pods ran: the check below would prove little"
    started = time.monotonic()
    down = run_cluster("down", d, TEST_IMAGES)
    assert down.returncode == 0, down.stderr
    print(f"cluster.sh down took {time.monotonic() - started:.1f}s")
    assert leftovers(d, cluster["before"]) == []
    # kube-proxy's health and metrics ports are free again.
    for port in (10249, 10256):
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", port)) != 0
