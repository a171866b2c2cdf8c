"""Shared state in a real Redis Cluster: three masters and three replicas of Debian's
`redis-server`, created with `redis-cli --cluster create` on free loopback ports (data and
cluster-bus ports), private to this module and stopped even when a test fails.

The gateway is told "cluster" by the URL scheme: `redis+cluster://host:port,host:port`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import TENANT_KEY, OTHER_KEY, _wait_for, backend, config_doc, model

MSG = [{"role": "user", "content": "hi"}]
CHATBOT = "test/cluster"


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), Redis Cluster's key hash."""
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def tenant_slot(tenant: str) -> int:
    # Every key of a decision is `parley:v1:{<chatbot>:<tenant>}:...`: the tag decides.
    return _crc16(f"{CHATBOT}:{tenant}".encode()) % 16384


class Cluster:
    def __init__(self, workdir: Path):
        self.exe = shutil.which("redis-server")
        self.cli = shutil.which("redis-cli")
        if self.exe is None or self.cli is None:
            pytest.fail("redis-server/redis-cli are not installed: run `make services` (scripts/services.sh)")
        self.dir = workdir
        ports = _free_ports(12)
        self.ports, self.bus_ports = ports[:6], ports[6:]
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self) -> None:
        for port, bus in zip(self.ports, self.bus_ports):
            d = self.dir / f"node-{port}"
            d.mkdir()
            log = open(d / "redis.log", "ab")
            self.procs[port] = subprocess.Popen(
                [self.exe, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-port", str(bus), "--cluster-config-file", str(d / "nodes.conf"),
                 "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0",
                 "--repl-diskless-sync-delay", "0", "--save", "", "--appendonly", "no", "--dir", str(d)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        for port in self.ports:
            _wait_for(lambda: self.cmd(port, "PING") == "PONG", 10, f"redis-server on {port}")
        r = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        for port in self.ports:
            _wait_for(lambda: "cluster_state:ok" in self.cmd(port, "CLUSTER", "INFO"), 20, f"cluster state ok on {port}")
        # Every replica in sync with its master, so a failover has a replica to promote.
        for port in self.ports:
            _wait_for(lambda: "role:master" in (i := self.cmd(port, "INFO", "replication"))
                      or "master_link_status:up" in i, 20, f"replica {port} in sync")

    def cmd(self, port: int, *args: str) -> str:
        r = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=5)
        return r.stdout.strip()

    def live_port(self) -> int:
        return next(p for p, proc in self.procs.items() if proc.poll() is None)

    def master_of(self, slot: int) -> int:
        """The port of the master serving `slot`, as the live nodes see it."""
        for line in self.cmd(self.live_port(), "CLUSTER", "NODES").splitlines():
            f = line.split()
            if "master" not in f[2] or "fail" in f[2]:
                continue
            for r in f[8:]:
                lo, _, hi = r.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(f[1].split(":")[1].split("@")[0])
        raise AssertionError(f"no master serves slot {slot}")

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(timeout=5)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def cluster_doc(mock, c: Cluster, limited_rpm: int, **extra) -> tuple[dict, str, str]:
    """Tenant `a` (no limit) and tenant `b` (`limited_rpm` a minute), new ids whose keys
    hash to the same master, so killing that master hits both."""
    a = f"test/a-{uuid.uuid4().hex[:8]}"
    master = c.master_of(tenant_slot(a))
    while True:
        b = f"test/b-{uuid.uuid4().hex[:8]}"
        if c.master_of(tenant_slot(b)) == master:
            break
    # Two seeds: the client starts from whichever answers.
    url = f"redis+cluster://127.0.0.1:{c.ports[0]},127.0.0.1:{c.ports[1]}"
    doc = config_doc([model("gpt-4o", [backend(mock)])], chatbot=CHATBOT,
                     redis={"url": {"value": url}}, **extra)
    doc["tenants"][0]["id"] = a
    doc["tenants"][1]["id"] = b
    doc["tenants"][1]["rateLimit"] = {"requestsPerMinute": limited_rpm}
    return doc, a, b


def warm(gateways) -> None:
    """Until each gateway has answered tenant `a` once (its cluster connection is up)."""
    for gw in gateways:
        _wait_for(lambda: gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}).status_code == 200,
                  10, "the gateway to reach the cluster")


def burst(gateways, n: int, key: str) -> list[int]:
    """`n` requests at once, spread over `gateways`; their status codes."""
    barrier = threading.Barrier(min(n, 100))
    clients = [httpx.Client(base_url=gw.url, timeout=10) for gw in gateways]

    def one(i: int) -> int:
        if i < 100:
            barrier.wait(timeout=10)
        return clients[i % len(clients)].post(
            "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG},
            headers={"authorization": f"Bearer {key}"}).status_code

    try:
        with ThreadPoolExecutor(max_workers=100) as pool:
            return list(pool.map(one, range(n)))
    finally:
        for c in clients:
            c.close()


def test_three_gateways_on_a_cluster_admit_exactly_the_limit(start_mock, start_gateway, cluster):
    mock = start_mock("m")
    doc, _, b = cluster_doc(mock, cluster, 50, rateLimitFailureMode="closed")
    gateways = [start_gateway(doc) for _ in range(3)]
    warm(gateways)
    codes = burst(gateways, 300, OTHER_KEY)
    counts = {c: codes.count(c) for c in set(codes)}
    # Redis itself admitted exactly 50: the sliding log of tenant b holds 50 entries.
    key = f"parley:v1:{{{CHATBOT}:{b}}}:rpm"
    logged = cluster.cmd(cluster.master_of(tenant_slot(b)), "ZCARD", key)
    assert logged == "50", (logged, counts)
    # Every admitted request was served; on a loaded machine a few may have waited past
    # the 100 ms Redis deadline and got a clear 503 instead (closed mode), never a 500.
    assert set(codes) <= {200, 429, 503}, counts
    assert counts.get(200, 0) + counts.get(503, 0) >= 50 and counts.get(200, 0) <= 50, counts
    if 503 not in counts:
        assert counts[200] == 50 and counts[429] == 250, counts
    assert mock.requests() == 3 + counts.get(200, 0)  # the warm-up requests, then the admitted


def test_a_master_fails_over_under_load_and_decisions_stay_exact(start_mock, start_gateway, cluster):
    mock = start_mock("m")
    doc, a, b = cluster_doc(mock, cluster, 20, rateLimitFailureMode="closed")
    gateways = [start_gateway(doc) for _ in range(2)]
    warm(gateways)
    master = cluster.master_of(tenant_slot(a))

    stop = threading.Event()
    seen: list[tuple[int, float, str]] = []

    def load(gw) -> None:
        with httpx.Client(base_url=gw.url, timeout=5) as http:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    r = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG},
                                  headers={"authorization": f"Bearer {TENANT_KEY}"})
                    seen.append((r.status_code, time.monotonic() - t, r.text if r.status_code != 200 else ""))
                except httpx.HTTPError as e:  # a hang ends here (timeout): a failure below
                    seen.append((-1, time.monotonic() - t, repr(e)))

    threads = [threading.Thread(target=load, args=(gw,)) for gw in gateways for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: sum(1 for s in seen if s[0] == 200) >= 50, 10, "load to be served")
        before = len(seen)
        cluster.kill(master)
        # The replica of the dead master is promoted (node timeout 1 s, then the election).
        _wait_for(lambda: cluster.master_of(tenant_slot(a)) != master, 30, "a replica to be promoted")
        promoted = cluster.master_of(tenant_slot(a))
        # Served again through the new master.
        _wait_for(lambda: len(seen) > before and all(s[0] == 200 for s in seen[-20:]), 20,
                  "requests to be served again after the failover")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    during = seen[before:]
    codes = {s[0] for s in during}
    # Served, or a clear 503 naming Redis during the failover window; never a hang or a 500.
    assert codes <= {200, 503}, [s for s in during if s[0] not in (200, 503)][:5]
    assert max(s[1] for s in seen) < 2, "a request hung"
    for code, _, text in during:
        if code == 503:
            assert "Redis" in text and "closed" in text, text
    assert sum(1 for s in during if s[0] == 200) >= 20

    # Exact afterwards, on keys the promoted master now serves: 40 at once, 20 admitted.
    assert cluster.master_of(tenant_slot(b)) == promoted
    codes = burst(gateways, 40, OTHER_KEY)
    assert codes.count(200) == 20 and codes.count(429) == 20, codes
