"""The cluster suite's fixtures: a Kubernetes cluster with a real node, kubectl, helm,
and port-forwards to pods.

Which cluster:
- `PARLEY_CLUSTER_KUBECONFIG=PATH` (or `KUBECONFIG=PATH` with
  `PARLEY_TEST_EXTERNAL_CLUSTER=1`): an existing cluster with nodes (kind, k3d, ...) that
  can pull or already has the images named below. Nothing is started or stopped.
- otherwise `scripts/cluster.sh up DIR` starts the test cluster of this repository (the
  test control plane, a kubelet on Debian's containerd, the images of `make images`
  imported) and `scripts/cluster.sh down DIR` stops it at the end, whatever happened.

No silent skips: when the cluster cannot be had, the suite fails with the reason, unless
`PARLEY_E2E_ALLOW_SKIP=1` asks for a skip.

Images (defaults are the chart's; override for a registry of your own):
`PARLEY_IMAGE_TAG` [the chart's appVersion], `PARLEY_MOCK_LLM_IMAGE`
[ghcr.io/parley-dev/parley-mock-llm:<tag>], `PARLEY_TEST_REDIS_IMAGE`
[parley-test/redis:local]. Every address the tests send to is either 127.0.0.1 (port-forwards)
or, from inside the cluster, a Service of the test's own namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "parley"
SAMPLES = REPO / "config" / "samples"


def chart_app_version() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return str(chart["appVersion"])


IMAGE_TAG = os.environ.get("PARLEY_IMAGE_TAG", chart_app_version())
MOCK_IMAGE = os.environ.get("PARLEY_MOCK_LLM_IMAGE", f"ghcr.io/parley-dev/parley-mock-llm:{IMAGE_TAG}")
REDIS_IMAGE = os.environ.get("PARLEY_TEST_REDIS_IMAGE", "parley-test/redis:local")
HELM = os.environ.get("PARLEY_HELM_BIN", str(REPO / "target" / "tools" / "helm"))
KUBECTL = os.environ.get("PARLEY_KUBECTL_BIN", shutil.which("kubectl") or "kubectl")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Polls until `predicate` returns something truthy; fails naming `what` and the last
    value (or exception) seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling, report the last one
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


class Kube:
    """kubectl and helm against one cluster."""

    def __init__(self, kubeconfig: Path):
        self.kubeconfig = kubeconfig
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def run(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [KUBECTL, *args], input=input, capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def get(self, kind: str, name: str, namespace: str) -> dict | None:
        proc = self.run("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found", check=False)
        if proc.returncode != 0:
            raise AssertionError(f"kubectl get {kind} {name}: {proc.stderr.strip()}")
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def apply(self, docs: list[dict], namespace: str) -> None:
        self.run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [HELM, *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def ready_pods(self, namespace: str, selector: str) -> list[dict]:
        pods = self.json("get", "pods", "-n", namespace, "-l", selector)["items"]
        return [p for p in pods if p["metadata"].get("deletionTimestamp") is None and pod_ready(p)]

    def diagnostics(self, namespaces: list[str]) -> str:
        """What a failed test run leaves for a human: objects, events, pod logs."""
        out = []
        for args in (["get", "nodes", "-o", "wide"], ["get", "all,cm,lease,hpa,pdb", "-A", "-o", "wide"]):
            out.append(f"$ kubectl {' '.join(args)}\n{self.run(*args, check=False).stdout}")
        for ns in namespaces:
            out.append(f"$ kubectl get events -n {ns}\n{self.run('get', 'events', '-n', ns, '--sort-by=.lastTimestamp', check=False).stdout[-6000:]}")
            pods = self.run("get", "pods", "-n", ns, "-o", "name", check=False).stdout.split()
            for pod in pods:
                logs = self.run("logs", "-n", ns, pod, "--all-containers", "--tail=40", check=False)
                out.append(f"$ kubectl logs -n {ns} {pod}\n{logs.stdout}{logs.stderr}")
        return "\n".join(out)


def pod_ready(pod: dict) -> bool:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond["type"] == "Ready":
            return cond["status"] == "True"
    return False


def condition(obj: dict | None, type_: str) -> dict | None:
    for cond in (obj or {}).get("status", {}).get("conditions", []):
        if cond["type"] == type_:
            return cond
    return None


class PortForward:
    """`kubectl port-forward TARGET :PORT` on 127.0.0.1; `url` is where it listens."""

    _LINE = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) ->")

    def __init__(self, kube: Kube, namespace: str, target: str, port: int):
        self.proc = subprocess.Popen(
            [KUBECTL, "port-forward", "-n", namespace, "--address", "127.0.0.1", target, f":{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=kube.env,
        )
        self.port = self._read_port(target)
        self.url = f"http://127.0.0.1:{self.port}"

    def _read_port(self, target: str) -> int:
        found: list[int] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = self._LINE.search(line)
                if m and not found:
                    found.append(int(m.group(1)))
            # Keep draining so kubectl never blocks on a full pipe.

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 30
        while not found:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"kubectl port-forward {target} exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"kubectl port-forward {target} printed no port in 30s")
            time.sleep(0.05)
        return found[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "PortForward":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _external_kubeconfig() -> Path | None:
    path = os.environ.get("PARLEY_CLUSTER_KUBECONFIG")
    if not path and os.environ.get("PARLEY_TEST_EXTERNAL_CLUSTER") == "1":
        path = os.environ.get("KUBECONFIG")
    return Path(path) if path else None


def _unavailable(reason: str) -> None:
    if os.environ.get("PARLEY_E2E_ALLOW_SKIP") == "1":
        pytest.skip(f"no cluster: {reason}")
    pytest.fail(f"no cluster: {reason} (set PARLEY_E2E_ALLOW_SKIP=1 to skip instead)", pytrace=False)


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    external = _external_kubeconfig()
    if external is not None:
        if not external.is_file():
            _unavailable(f"kubeconfig {external} does not exist")
        yield Kube(external)
        return

    script = REPO / "scripts" / "cluster.sh"
    workdir = Path(tempfile.mkdtemp(prefix="parley-cluster-"))
    log = open(workdir / "cluster-up.log", "w")
    up = subprocess.Popen([str(script), "up", str(workdir)], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        ready = False
        assert up.stdout is not None
        deadline = time.monotonic() + 600
        for line in up.stdout:
            if line.strip() == "ready":
                ready = True
                break
            if time.monotonic() > deadline:
                break
        if not ready:
            up.wait(timeout=30)
            tail = (workdir / "cluster-up.log").read_text(errors="replace")[-4000:]
            _unavailable(f"scripts/cluster.sh up exited {up.returncode} without 'ready':\n{tail}")
        # `up` may stay in the foreground or leave daemons behind; drain its output either way.
        threading.Thread(target=lambda: [None for _ in up.stdout], daemon=True).start()
        yield Kube(workdir / "kubeconfig")
    finally:
        down = subprocess.run([str(script), "down", str(workdir)], capture_output=True, text=True, timeout=300)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()
        if down.returncode != 0:
            raise AssertionError(f"scripts/cluster.sh down failed: {down.stderr[-2000:]}")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _diagnostics_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test, print the cluster's state (objects, events, logs)."""
    yield
    if request.node.stash.get(_FAILED, False) and "kube" in request.fixturenames:
        kube: Kube = request.getfixturevalue("kube")
        namespaces = getattr(request.module, "DIAGNOSTIC_NAMESPACES", [])
        print("\n===== cluster diagnostics =====\n" + kube.diagnostics(namespaces))
