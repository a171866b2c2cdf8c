"""Shared state in Redis: two gateway processes with one config share limits, /chat
sessions and the response cache; rateLimitFailureMode while Redis is down.

The shared Redis is 127.0.0.1:6379 (`make services` / scripts/services.sh starts it) or
$PARLEY_TEST_REDIS_URL. Tests that stop Redis start their own private redis-server on a
free port and never touch the shared one. Every test uses its own tenant ids, so keys
left in the shared Redis by an earlier run do not count.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import openai
import pytest

from conftest import TENANT_KEY, _wait_for, backend, config_doc, free_port, model

SHARED_REDIS = os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379")
MSG = [{"role": "user", "content": "hi"}]


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def shared_redis() -> str:
    rest = SHARED_REDIS.split("://", 1)[1].rsplit("@", 1)[-1].split("/", 1)[0]
    host, _, port = rest.partition(":")
    if not _ping(host or "127.0.0.1", int(port or 6379)):
        pytest.fail(f"no Redis answers at {host}:{port}: run `make services` (scripts/services.sh) first")
    return SHARED_REDIS


class PrivateRedis:
    """A redis-server of this test only, on a free port, that the test may stop."""

    def __init__(self, workdir: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: run `make services` (scripts/services.sh)")
        self.exe = exe
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.dir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        _wait_for(lambda: _ping("127.0.0.1", self.port), 10, "private redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def private_redis(tmp_path: Path):
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.stop()


def tenant_doc(mock, redis_url: str, rate_limit: dict | None = None, **extra) -> tuple[dict, str]:
    """A config on `redis_url` whose tenant id is new (keys of earlier runs do not count)."""
    tenant = f"test/acme-{uuid.uuid4().hex[:8]}"
    doc = config_doc([model("gpt-4o", [backend(mock)], cache={"ttlSeconds": 60})],
                     redis={"url": {"value": redis_url}}, **extra)
    doc["tenants"][0]["id"] = tenant
    doc["tenants"][1]["id"] = f"{tenant}-other"
    if rate_limit:
        doc["tenants"][0]["rateLimit"] = rate_limit
    return doc, tenant


def test_two_gateways_share_one_tenant_limit(start_mock, start_gateway, shared_redis):
    mock = start_mock("m")
    doc, _ = tenant_doc(mock, shared_redis, {"requestsPerMinute": 4})
    a, b = start_gateway(doc), start_gateway(doc)
    clients = [openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0) for gw in (a, b)]
    for i in range(4):
        r = clients[i % 2].chat.completions.create(model="gpt-4o", messages=MSG)
        assert r.choices[0].message.content
    for gw in (a, b):
        r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG})
        assert r.status_code == 429, r.text
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "requestsPerMinute (4)" in r.json()["error"]["message"]
        assert r.headers["x-ratelimit-limit-requests"] == "4"
    with pytest.raises(openai.RateLimitError):
        clients[1].chat.completions.create(model="gpt-4o", messages=MSG)
    assert mock.requests() == 4
    assert a.metric("parley_limit_decisions_total", backend="redis", result="refused") >= 1
    # The shared state really is in use: no "configured but unused" warning.
    assert "keeps limits, sessions and cache in process" not in a.proc.stderr()
    assert shared_redis not in a.proc.stderr()


def test_three_gateways_admit_exactly_the_limit_of_300_concurrent_requests(start_mock, start_gateway, shared_redis):
    # Admissions that arrive together share script calls (one per tenant and batch);
    # each decision stays exact: 50 a minute across three replicas is 50.
    from test_redis_cluster import burst
    from conftest import OTHER_KEY
    mock = start_mock("m")
    doc, _ = tenant_doc(mock, shared_redis, rateLimitFailureMode="closed")
    doc["tenants"][1]["id"] = f"{doc['tenants'][0]['id']}-limited"
    doc["tenants"][1]["rateLimit"] = {"requestsPerMinute": 50}
    gateways = [start_gateway(doc) for _ in range(3)]
    codes = burst(gateways, 300, OTHER_KEY)
    counts = {c: codes.count(c) for c in set(codes)}
    # Never more than 50; on a loaded machine a request that misses the 100 ms Redis
    # deadline gets a clear 503 (closed mode) and may still have used its slot.
    assert set(codes) <= {200, 429, 503}, counts
    assert counts.get(200, 0) <= 50 and counts.get(200, 0) + counts.get(503, 0) >= 50, counts
    if 503 not in counts:
        assert counts[200] == 50 and counts[429] == 250, counts
    assert mock.requests() == counts.get(200, 0)


def test_tokens_settle_exactly_across_gateways(start_mock, start_gateway, private_redis):
    # Each request reserves prompt + max_tokens (1000) and uses far less; the limit holds one
    # reservation plus what the earlier requests really used, so every request passes only
    # if the earlier ones (on either replica) were settled in Redis. Settles ride along with
    # the next admission of the tenant or are sent within 5 ms.
    mock = start_mock("m")
    doc, tenant = tenant_doc(mock, private_redis.url, {"tokensPerMinute": 1500})
    a, b = start_gateway(doc), start_gateway(doc)
    clients = [openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0) for gw in (a, b)]
    used = 0
    for i in range(8):
        r = clients[i % 2].chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)
        assert r.usage.total_tokens < 100
        used += r.usage.total_tokens
        time.sleep(0.05)
    cli = ["redis-cli", "-p", str(private_redis.port)]
    keys = subprocess.run([*cli, "--scan", "--pattern", f"*:{tenant}}}:tpm"], capture_output=True,
                          text=True, timeout=10).stdout.split()
    assert len(keys) == 1, keys

    def settled():
        out = subprocess.run([*cli, "HGET", keys[0], "s"], capture_output=True, text=True, timeout=10).stdout
        return int(out.strip() or 0) == used

    # The running sum of the tenant's token sub-windows is exactly what was used.
    _wait_for(settled, 2, f"tokensPerMinute counter == {used}")


def test_chat_session_started_on_one_gateway_continues_on_the_other(start_mock, start_gateway, shared_redis):
    mock = start_mock("m")
    doc, _ = tenant_doc(mock, shared_redis, systemPrompt="You are a test bot.")
    a, b = start_gateway(doc), start_gateway(doc)
    r = a.post("/chat", {"session_id": "s1", "messages": [{"role": "user", "content": "my name is Ada"}]})
    assert r.status_code == 200, r.text
    r = b.post("/chat", {"session_id": "s1", "messages": [{"role": "user", "content": "what is my name?"}]})
    assert r.status_code == 200, r.text
    sent = mock.stats()["last_request"]["body"]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "my name is Ada" and sent[3]["content"] == "what is my name?"
    # Another tenant with the same session id starts fresh, on either gateway.
    from conftest import OTHER_KEY
    r = a.post("/chat", {"session_id": "s1", "messages": MSG}, key=OTHER_KEY)
    assert r.status_code == 200, r.text
    assert len(mock.stats()["last_request"]["body"]["messages"]) == 2


def test_cache_hit_across_gateways(start_mock, start_gateway, shared_redis):
    mock = start_mock("m")
    doc, _ = tenant_doc(mock, shared_redis)
    a, b = start_gateway(doc), start_gateway(doc)
    body = {"model": "gpt-4o", "messages": MSG, "temperature": 0}
    r1 = a.post("/v1/chat/completions", body)
    assert r1.headers["x-parley-cache"] == "miss"
    # The entry is written off the request path: give it a moment.
    r2 = _wait_for(lambda: (r := b.post("/v1/chat/completions", body)).headers["x-parley-cache"] == "hit" and r,
                   5, "a cache hit on the other gateway")
    assert r2.json() == r1.json()
    assert r2.headers["x-parley-model"] == "gpt-4o" and r2.headers["x-parley-backend"] == "primary"
    assert mock.requests() == 1
    from conftest import OTHER_KEY
    assert b.post("/v1/chat/completions", body, key=OTHER_KEY).headers["x-parley-cache"] == "miss"


def test_failure_modes_while_redis_is_down_and_recovery(start_mock, start_gateway, private_redis):
    mock = start_mock("m")
    open_doc, _ = tenant_doc(mock, private_redis.url, {"requestsPerMinute": 2})
    closed_doc, _ = tenant_doc(mock, private_redis.url, {"requestsPerMinute": 2}, rateLimitFailureMode="closed")
    gw_open, gw_closed = start_gateway(open_doc), start_gateway(closed_doc)
    body = {"model": "gpt-4o", "messages": MSG}
    for gw in (gw_open, gw_closed):
        assert [gw.post("/v1/chat/completions", body).status_code for _ in range(3)] == [200, 200, 429]

    private_redis.stop()
    # open: admitted (limits not enforced) and counted; closed: 503 naming Redis. Quickly.
    for _ in range(3):
        t = time.monotonic()
        r = gw_open.post("/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t < 2
    assert gw_open.metric("parley_redis_errors_total", op="admit") >= 1
    assert gw_open.metric("parley_limit_decisions_total", result="redis_down_open") >= 1
    r = gw_closed.post("/v1/chat/completions", body)
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert "Redis" in msg and "closed" in msg
    assert private_redis.url not in gw_open.proc.stderr()

    # Redis is back (empty: no persistence): limits apply again, without a restart.
    private_redis.start()

    def statuses_until_refused(gw) -> list[int]:
        seen: list[int] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = gw.post("/v1/chat/completions", body)
            seen.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                return seen
            time.sleep(0.05)
        raise AssertionError(f"limits did not apply again after Redis came back: {seen}")

    # closed: 503 until the connection is back, then exactly the limit.
    seen = statuses_until_refused(gw_closed)
    assert [s for s in seen if s != 503] == [200, 200, 429], seen
    # open: admitted while reconnecting (not counted), then the limit holds again.
    seen = statuses_until_refused(gw_open)
    assert set(seen) == {200, 429} and seen.count(200) >= 2, seen


def test_the_redis_url_and_its_password_are_never_logged(start_mock, start_gateway):
    mock = start_mock("m")
    url = f"redis://:pw-s3cret-{uuid.uuid4().hex[:6]}@127.0.0.1:{free_port()}"
    doc, _ = tenant_doc(mock, url, {"requestsPerMinute": 5}, rateLimitFailureMode="closed")
    gw = start_gateway(doc)
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG})
    assert r.status_code == 503, r.text
    assert "retry-after" in r.headers
    time.sleep(0.2)
    assert "pw-s3cret" not in gw.proc.stderr() + r.text + gw.metrics()
    assert '"redis is unreachable or failing"' in gw.proc.stderr()


def test_check_validates_the_redis_url_without_connecting_or_echoing_it(binaries, tmp_path):
    from conftest import GATEWAY_BIN
    import json
    cfg = tmp_path / "c.yaml"
    doc = config_doc([model("gpt-4o", [{"name": "p", "provider": "openai", "baseUrl": "http://127.0.0.1:1/v1"}])],
                     redis={"url": {"value": "http://:pw-s3cret@127.0.0.1:1"}})
    cfg.write_text(json.dumps(doc))
    r = subprocess.run([GATEWAY_BIN, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "redis.url must start with redis://, rediss://, redis+cluster:// or rediss+cluster://" in r.stderr, r.stderr
    assert "pw-s3cret" not in r.stderr + r.stdout
    # A valid URL of a server that is not there: valid (check does not connect).
    doc["redis"] = {"url": {"value": f"rediss://:pw-s3cret@127.0.0.1:{free_port()}/0"}}
    cfg.write_text(json.dumps(doc))
    r = subprocess.run([GATEWAY_BIN, "check", "--config", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert "pw-s3cret" not in r.stderr + r.stdout
