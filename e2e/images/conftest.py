"""Fixtures for the image tests: the images `make images` and `make test-images` built,
run with the local Docker engine the way a restricted pod runs them (read-only root
filesystem, user 65532, every capability dropped, no privilege escalation), on the host
network, talking only to 127.0.0.1.

Every container a test starts is named `parley-imgtest-...` and removed (`docker rm -f`)
when the test ends, whether it passed or not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES_SH = REPO / "scripts/images.sh"
DOCKER = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else (shutil.which("docker") or "docker")

# How a restricted pod runs the images (the operator renders exactly this for the gateway).
RESTRICTED = ["--read-only", "--user", "65532:65532", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "--network", "host"]

TENANT_KEY = "sk-parley-imgtest-acme"
UPSTREAM_KEY = "sk-upstream-imgtest"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def image_tag(name: str) -> str:
    return subprocess.run([str(IMAGES_SH), "tag", name], capture_output=True, text=True, check=True).stdout.strip()


class Container:
    """A detached container and its logs."""

    def __init__(self, name: str):
        self.name = name

    def logs(self) -> str:
        p = docker("logs", self.name, check=False)
        return p.stdout + p.stderr

    def state(self) -> dict:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name).stdout)

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def exit_code(self) -> int:
        return int(self.state()["ExitCode"])

    def stop(self, timeout: int = 30) -> subprocess.CompletedProcess:
        return docker("stop", "-t", str(timeout), self.name, timeout=timeout + 30)


@pytest.fixture(scope="session")
def engine() -> None:
    """The Docker engine answers (scripts/docker.sh starts it when needed)."""
    p = subprocess.run([str(REPO / "scripts/docker.sh")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"scripts/docker.sh failed:\n{p.stderr}"


@pytest.fixture(scope="session")
def images(engine: None) -> dict[str, str]:
    """name -> tag of the four images, which must have been built."""
    tags = {n: image_tag(n) for n in ("gateway", "operator", "mock-llm", "redis")}
    for name, tag in tags.items():
        if docker("image", "inspect", tag, check=False).returncode != 0:
            pytest.fail(f"image {tag} is not built: run `make images test-images` first")
    return tags


@pytest.fixture
def run(engine: None):
    """run(image, *args, docker_args=[...]) -> Container, started detached; removed at the end."""
    started: list[Container] = []

    def start(image: str, *args: str, docker_args: list[str] | None = None, restricted: bool = True) -> Container:
        name = f"parley-imgtest-{uuid.uuid4().hex[:10]}"
        flags = (RESTRICTED if restricted else []) + (docker_args or [])
        docker("run", "-d", "--name", name, *flags, image, *args)
        c = Container(name)
        started.append(c)
        return c

    yield start
    for c in started:
        docker("rm", "-f", c.name, check=False)


class Mock:
    def __init__(self, container: Container, port: int):
        self.container = container
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(timeout=5)

    def stats(self) -> dict:
        r = self.http.get(f"{self.base}/_mock/stats")
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def start_mock(images: dict[str, str], run):
    """The mock upstream from its image, on a free loopback port."""

    def start(*flags: str) -> Mock:
        port = free_port()
        c = run(images["mock-llm"], "--listen", f"127.0.0.1:{port}", "--api-key", UPSTREAM_KEY, *flags)
        m = Mock(c, port)
        wait_for(lambda: m.http.get(f"{m.base}/healthz").status_code == 200, 20,
                 f"the mock to answer (logs: {c.logs()})")
        return m

    return start


class AtomicDir:
    """A directory laid out the way the kubelet writes ConfigMap and projected volumes:
    the files live in a timestamped `..<ts>` directory, `..data` is a symlink to it, and
    each visible name is a symlink through `..data`. An update writes a new `..<ts>`
    directory and swaps `..data` with a rename, exactly like the kubelet's atomic writer."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        self.generation = 0

    def write(self, files: dict[str, str]) -> None:
        self.generation += 1
        ts = f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{self.generation}"
        payload = self.root / ts
        for rel, content in files.items():
            p = payload / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
            p.chmod(0o644)
        for d in [payload, *[d for d in payload.rglob("*") if d.is_dir()]]:
            d.chmod(0o755)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        tmp_link = self.root / "..data_tmp"
        if tmp_link.is_symlink():
            tmp_link.unlink()
        os.symlink(ts, tmp_link)
        os.replace(tmp_link, self.root / "..data")
        for top in {rel.split("/")[0] for rel in files}:
            visible = self.root / top
            if not visible.is_symlink():
                os.symlink(f"..data/{top}", visible)
        if old:
            shutil.rmtree(self.root / old, ignore_errors=True)


class GatewayPod:
    """The gateway image run like the pod the operator renders: the config at
    /etc/parley/config.yaml (a ConfigMap volume), the Secret keys under
    /var/run/parley/secrets/<secret>/<key> (a projected volume), both read-only."""

    def __init__(self, container: Container, config: AtomicDir, listen: int, admin: int):
        self.container = container
        self.config = config
        self.url = f"http://127.0.0.1:{listen}"
        self.admin = f"http://127.0.0.1:{admin}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in httpx.get(f"{self.admin}/metrics", timeout=5).text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if not m or m.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total


def gateway_config(listen: int, admin: int, models: list[dict], **extra: Any) -> dict:
    doc = {
        "apiVersion": "parley.dev/gateway/v1",
        "chatbot": "imgtest/support",
        "listen": f"127.0.0.1:{listen}",
        "adminListen": f"127.0.0.1:{admin}",
        "secretsDir": "/var/run/parley/secrets",
        "defaultModel": models[0]["name"],
        "models": models,
        "tenants": [{"id": "imgtest/acme", "apiKeys": [{"file": "acme-key/api-key"}]}],
    }
    doc.update(extra)
    return doc


def openai_backend(base_url: str, name: str = "primary") -> dict:
    return {"name": name, "provider": "openai", "baseUrl": base_url,
            "apiKey": {"file": "llm-keys/primary"}, "timeouts": {"connectMs": 2000}}


@pytest.fixture
def start_gateway(images: dict[str, str], run, tmp_path: Path):
    """start_gateway(models, docker_args=[...], extra={...}, secrets={...}) -> GatewayPod."""
    count = [0]

    def start(models: list[dict], *, docker_args: list[str] | None = None, extra: dict | None = None,
              secrets: dict[str, str] | None = None, wait_ready: bool = True, args: list[str] | None = None) -> GatewayPod:
        count[0] += 1
        base = tmp_path / f"pod{count[0]}"
        cfg = AtomicDir(base / "config")
        sec = AtomicDir(base / "secrets")
        listen, admin = free_port(), free_port()
        doc = gateway_config(listen, admin, models, **(extra or {}))
        cfg.write({"config.yaml": json.dumps(doc, indent=2)})
        sec.write(secrets or {"llm-keys/primary": UPSTREAM_KEY, "acme-key/api-key": TENANT_KEY})
        c = run(images["gateway"],
                *(args if args is not None else
                  ["--config", "/etc/parley/config.yaml", "--log-format", "json", "--drain-seconds", "30"]),
                docker_args=["-v", f"{cfg.root}:/etc/parley:ro", "-v", f"{sec.root}:/var/run/parley/secrets:ro",
                             *(docker_args or [])])
        pod = GatewayPod(c, cfg, listen, admin)
        pod.doc = doc  # type: ignore[attr-defined]

        def ready():
            if not c.running():
                raise AssertionError(f"the gateway container exited ({c.exit_code()}): {c.logs()}")
            return httpx.get(f"{pod.admin}/readyz", timeout=2).status_code == 200

        if wait_ready:
            wait_for(ready, 20, "the gateway to be ready")
        return pod

    return start
