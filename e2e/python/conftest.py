"""Fixtures that start the real binaries (parley-mock-llm, parley-gateway) on loopback
ports and stop every process they started.

Binaries: $PARLEY_GATEWAY_BIN and $PARLEY_MOCK_LLM_BIN, by default target/debug/... of
the repository root.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
GATEWAY_BIN = os.environ.get("PARLEY_GATEWAY_BIN", str(REPO / "target/debug/parley-gateway"))
MOCK_BIN = os.environ.get("PARLEY_MOCK_LLM_BIN", str(REPO / "target/debug/parley-mock-llm"))

TENANT_KEY = "sk-parley-test-acme"
OTHER_KEY = "sk-parley-test-limited"


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling
            last = e
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


class Proc:
    """A child process with its output in files."""

    def __init__(self, args: list[str], workdir: Path, name: str):
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.popen = subprocess.Popen(args, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()
        self._err.close()


class Mock:
    """A parley-mock-llm process and its control API."""

    def __init__(self, proc: Proc, addr: str):
        self.proc = proc
        self.addr = addr
        self.base = f"http://{addr}"
        self.base_url = f"{self.base}/v1"
        self.http = httpx.Client(timeout=5)

    def config(self, **update: Any) -> dict:
        r = self.http.post(f"{self.base}/_mock/config", json=update)
        assert r.status_code == 200, r.text
        return r.json()

    def reset(self) -> None:
        self.config(reset=True)
        r = self.http.post(f"{self.base}/_mock/reset-stats")
        assert r.status_code in (200, 204), r.text

    def stats(self) -> dict:
        r = self.http.get(f"{self.base}/_mock/stats")
        assert r.status_code == 200, r.text
        return r.json()

    def requests(self) -> int:
        return self.stats()["requests_total"]


class Gateway:
    """A parley-gateway process."""

    def __init__(self, proc: Proc, config_path: Path, addr: str, admin: str):
        self.proc = proc
        self.config_path = config_path
        self.addr = addr
        self.url = f"http://{addr}"
        self.admin = f"http://{admin}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def metrics(self) -> str:
        return httpx.get(f"{self.admin}/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if not m or m.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def post(self, path: str, body: Any, key: str | None = TENANT_KEY, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", {})
        if key is not None:
            headers.setdefault("authorization", f"Bearer {key}")
        return self.http.post(path, json=body, headers=headers, **kw)


@pytest.fixture(scope="session")
def binaries() -> None:
    for b in (GATEWAY_BIN, MOCK_BIN):
        if not os.access(b, os.X_OK):
            pytest.fail(f"{b} is not built: run `cargo build -p parley-gateway -p parley-e2e` first")


@pytest.fixture
def start_mock(binaries: None, tmp_path: Path):
    started: list[Proc] = []

    def start(name: str = "mock", *flags: str) -> Mock:
        proc = Proc([MOCK_BIN, "--listen", "127.0.0.1:0", "--name", name, *flags], tmp_path, f"mock-{name}-{len(started)}")
        started.append(proc)
        line = _wait_for(lambda: re.search(r"listening on http://(\S+)", proc.stdout()), 10, f"mock {name} to listen")
        mock = Mock(proc, line.group(1))
        _wait_for(lambda: mock.http.get(f"{mock.base}/healthz").status_code == 200, 5, "mock health")
        return mock

    yield start
    for p in started:
        p.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model(name: str, backends: list[dict], **extra: Any) -> dict:
    return {"name": name, "backends": backends, **extra}


def backend(mock: Mock, provider: str = "openai", name: str = "primary", **extra: Any) -> dict:
    return {
        "name": name,
        "provider": provider,
        "baseUrl": mock.base_url,
        "apiKey": {"value": f"upstream-key-{name}"},
        **extra,
    }


def config_doc(models: list[dict], **extra: Any) -> dict:
    doc = {
        "apiVersion": "parley.dev/gateway/v1",
        "listen": "127.0.0.1:0",
        "adminListen": "127.0.0.1:0",
        "defaultModel": models[0]["name"],
        "models": models,
        "tenants": [
            {"id": "test/acme", "apiKeys": [{"value": TENANT_KEY}]},
            {"id": "test/limited", "apiKeys": [{"value": OTHER_KEY}], "allowedModels": [models[0]["name"]]},
        ],
    }
    doc.update(extra)
    return doc


def write_config(path: Path, doc: dict | str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc, indent=2)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def start_gateway(binaries: None, tmp_path: Path):
    started: list[Proc] = []

    def start(doc: dict | str, *flags: str, wait_ready: bool = True) -> Gateway:
        cfg_dir = tmp_path / f"gw{len(started)}"
        cfg_dir.mkdir()
        path = cfg_dir / "config.yaml"
        write_config(path, doc)
        proc = Proc([GATEWAY_BIN, "--config", str(path), "--log-format", "json", "--poll-seconds", "1", *flags], tmp_path, f"gateway{len(started)}")
        started.append(proc)

        def serving():
            if not proc.alive():
                raise AssertionError(f"gateway exited: {proc.stderr()}")
            for line in proc.stderr().splitlines():
                if '"parley-gateway serving"' in line:
                    rec = json.loads(line)
                    return rec["listen"], rec["admin"]
            return None

        listen, admin = _wait_for(serving, 15, "gateway to serve")
        gw = Gateway(proc, path, listen, admin)
        if wait_ready:
            _wait_for(lambda: httpx.get(f"{gw.admin}/readyz", timeout=2).status_code == 200, 10, "readyz")
        return gw

    yield start
    for p in started:
        p.stop()
