"""The operator image: prints its CRDs, and reconciles the sample Chatbot against the test
API server (target/controlplane/parley-controlplane, a real kube-apiserver on 127.0.0.1),
run with a read-only root filesystem as user 65532 on the host network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO, RESTRICTED, docker, free_port, wait_for

CONTROLPLANE_BIN = Path(os.environ.get("PARLEY_CONTROLPLANE_BIN", REPO / "target/controlplane/parley-controlplane"))
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl") or "kubectl"


class ControlPlane:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.out = open(data_dir.parent / "controlplane.out", "w+b")
        # --exit-on-stdin-close/--exit-with-parent: a crashed test run leaves nothing behind.
        self.proc = subprocess.Popen(
            [str(CONTROLPLANE_BIN), "--data-dir", str(data_dir), "--exit-on-stdin-close", "--exit-with-parent"],
            stdin=subprocess.PIPE, stdout=self.out, stderr=subprocess.STDOUT)
        self.kubeconfig = data_dir / "kubeconfig"

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the control plane exited: {self.output()}")
            return "ready" in self.output()

        wait_for(ready, 180, "the control plane to be ready", interval=0.2)

    def output(self) -> str:
        self.out.flush()
        return (self.data_dir.parent / "controlplane.out").read_text(errors="replace")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        p = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), *args], capture_output=True, text=True,
                           input=input, timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {p.stderr}")
        return p.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdin:
            self.proc.stdin.close()
        self.out.close()


@pytest.fixture(scope="module")
def controlplane(tmp_path_factory):
    if not os.access(CONTROLPLANE_BIN, os.X_OK):
        pytest.fail(f"{CONTROLPLANE_BIN} is not built: run `make {CONTROLPLANE_BIN.relative_to(REPO)}`")
    base = tmp_path_factory.mktemp("controlplane")
    cp = ControlPlane(base / "data")
    yield cp
    cp.stop()


def crds_from_image(tag: str) -> str:
    return docker("run", "--rm", *RESTRICTED, tag, "crds").stdout


def test_prints_the_crds(images):
    docs = [d for d in yaml.safe_load_all(crds_from_image(images["operator"])) if d]
    names = sorted(d["metadata"]["name"] for d in docs)
    assert names == ["chatbots.parley.dev", "modelroutes.parley.dev", "tenants.parley.dev"]
    committed = sorted(d["metadata"]["name"] for d in yaml.safe_load_all((REPO / "config/crd/parley-crds.yaml").read_text()) if d)
    assert names == committed
    assert all(d["kind"] == "CustomResourceDefinition" for d in docs)


def _condition(obj: dict, type_: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def test_reconciles_the_sample_chatbot(images, controlplane, run, tmp_path):
    cp = controlplane
    cp.kubectl("apply", "-f", "-", input=crds_from_image(images["operator"]))
    for crd in ("chatbots.parley.dev", "modelroutes.parley.dev", "tenants.parley.dev"):
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
    ns = f"parley-imgtest-{uuid.uuid4().hex[:6]}"
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("apply", "-n", ns, "-f", str(REPO / "config/samples"))

    # The admin kubeconfig (certificates inline), readable by user 65532 in the container.
    kdir = tmp_path / "kube"
    kdir.mkdir(mode=0o755)
    kdir.chmod(0o755)
    shutil.copy(cp.kubeconfig, kdir / "config")
    (kdir / "config").chmod(0o644)
    metrics = free_port()
    op = run(images["operator"], "run", "--leader-election=false", f"--namespace={ns}",
             f"--metrics-addr=127.0.0.1:{metrics}",
             docker_args=["-v", f"{kdir}:/var/run/parley/kube:ro", "-e", "KUBECONFIG=/var/run/parley/kube/config",
                          "-e", "RUST_LOG=info"])

    def chatbot_ready():
        if not op.running():
            raise AssertionError(f"the operator exited ({op.exit_code()}): {op.logs()}")
        cb = json.loads(cp.kubectl("get", "chatbot", "support", "-n", ns, "-o", "json"))
        cond = _condition(cb, "Ready")
        return cond if cond and cond.get("status") == "True" else None

    try:
        wait_for(chatbot_ready, 90, "the sample Chatbot to be Ready", interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}\noperator logs:\n{op.logs()}\nchatbot:\n"
                             f"{cp.kubectl('get', 'chatbot', 'support', '-n', ns, '-o', 'yaml', check=False)}") from None
    assert httpx.get(f"http://127.0.0.1:{metrics}/healthz", timeout=5).status_code == 200

    dep = json.loads(cp.kubectl("get", "deployment", "support-gateway", "-n", ns, "-o", "json"))
    container = dep["spec"]["template"]["spec"]["containers"][0]
    # The operator's default gateway image is exactly the image `make images` built.
    assert container["image"] == images["gateway"]
    pod_sc = dep["spec"]["template"]["spec"].get("securityContext") or {}
    sc = container.get("securityContext") or {}
    assert sc.get("readOnlyRootFilesystem") is True
    assert pod_sc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True
    cm = json.loads(cp.kubectl("get", "configmap", "support-gateway", "-n", ns, "-o", "json"))
    assert "parley.dev/gateway/v1" in cm["data"]["config.yaml"]

    started = time.monotonic()
    op.stop(timeout=30)
    assert op.exit_code() == 0, op.logs()
    assert time.monotonic() - started < 20, "the operator did not stop on SIGTERM"
    cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
