"""Cache, CORS, request ids, header limits, metrics."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml

from conftest import TENANT_KEY, backend, config_doc, model

MSG = [{"role": "user", "content": "hi"}]


def test_cache_hits_only_for_temperature_zero_and_per_tenant(start_mock, start_gateway):
    mock = start_mock("m")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)], cache={"ttlSeconds": 60})]))
    body = {"model": "gpt-4o", "messages": MSG, "temperature": 0}
    r1 = gw.post("/v1/chat/completions", body)
    r2 = gw.post("/v1/chat/completions", body)
    assert r1.headers["x-parley-cache"] == "miss" and r2.headers["x-parley-cache"] == "hit"
    assert r1.json() == r2.json()
    assert r2.headers["x-parley-model"] == "gpt-4o"
    assert mock.requests() == 1
    # Other messages, other API format, no temperature, another tenant: all misses.
    assert gw.post("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "yo"}]}).headers["x-parley-cache"] == "miss"
    assert gw.post("/v1/messages", {**body, "max_tokens": 20}).headers["x-parley-cache"] == "miss"
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG})
    assert "x-parley-cache" not in r.headers
    from conftest import OTHER_KEY
    assert gw.post("/v1/chat/completions", body, key=OTHER_KEY).headers["x-parley-cache"] == "miss"
    assert mock.requests() == 5
    assert gw.metric("parley_cache_lookups_total", result="hit") == 1


def test_cors_request_ids_and_header_limits(start_mock, start_gateway):
    mock = start_mock("m")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)])],
                                  cors={"allowedOrigins": ["https://app.example.com"]}))
    pre = gw.http.options("/v1/chat/completions", headers={
        "origin": "https://app.example.com", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert pre.status_code in (200, 204)
    assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = gw.post("/v1/chat/completions", {"messages": MSG}, headers={"origin": "https://app.example.com", "x-request-id": "abc-123"})
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert r.headers["x-request-id"] == "abc-123"
    assert mock.stats()["last_request"]["headers"]["x-request-id"] == "abc-123"
    r = gw.post("/v1/chat/completions", {"messages": MSG}, headers={"origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in r.headers
    assert len(r.headers["x-request-id"]) == 32
    # Oversized headers are refused by the HTTP layer, not a crash: over HTTP/1.1 the
    # request head may be up to 8 KiB.
    for size, status in ((6_000, 200), (9_000, 431), (100_000, 431)):
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"x-big": "a" * size, "authorization": f"Bearer {TENANT_KEY}"},
                       json={"messages": MSG}, timeout=5)
        assert r.status_code == status, (size, r.status_code)
    assert gw.proc.alive()


def test_metrics_record_requests_tokens_and_overhead(start_mock, start_gateway):
    mock = start_mock("m")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)],
                                         pricing={"inputPerMillionTokens": "1000000", "outputPerMillionTokens": "2000000"})]))
    r = gw.post("/v1/chat/completions", {"messages": MSG})
    assert r.status_code == 200
    u = r.json()["usage"]
    assert gw.metric("parley_requests_total", tenant="test/acme", model="gpt-4o", backend="primary", status="200") == 1
    assert gw.metric("parley_tokens_total", tenant="test/acme", kind="output") == u["completion_tokens"]
    # 1 USD per input token, 2 per output token, in micro-USD.
    assert gw.metric("parley_cost_micro_usd_total", tenant="test/acme") == 1e6 * u["prompt_tokens"] + 2e6 * u["completion_tokens"]
    assert gw.metric("parley_overhead_seconds_count") == 1
    assert gw.metric("parley_config_info") == 1
    gw.post("/v1/chat/completions", {"model": "secret-model-name-xyz", "messages": MSG})
    text = gw.metrics()
    assert "secret-model-name-xyz" not in text, "client-supplied names are not labels"
    assert gw.metric("parley_requests_total", status="404") == 1


def test_tenant_upstream_keys_override_the_backend_key(start_mock, start_gateway):
    import hashlib

    def fp(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    oai = start_mock("oai")
    ant = start_mock("ant")
    doc = config_doc([model("gpt-4o", [backend(oai)]), model("claude", [backend(ant, "anthropic", name="a")])])
    doc["tenants"][0]["upstreamKeys"] = [
        {"model": "gpt-4o", "backend": "primary", "apiKey": {"value": "sk-tenant-own-openai"}},
        {"model": "claude", "backend": "a", "apiKey": {"value": "sk-tenant-own-anthropic"}},
    ]
    gw = start_gateway(doc)
    assert gw.post("/v1/chat/completions", {"messages": MSG}).status_code == 200
    last = oai.stats()["last_request"]
    assert last["api_key"] == fp("sk-tenant-own-openai")
    assert last["headers"]["authorization"].startswith("Bearer ")
    from conftest import OTHER_KEY
    assert gw.post("/v1/chat/completions", {"messages": MSG}, key=OTHER_KEY).status_code == 200
    assert oai.stats()["last_request"]["api_key"] == fp("upstream-key-primary")
    assert gw.post("/v1/chat/completions", {"model": "claude", "messages": MSG}).status_code == 200
    last = ant.stats()["last_request"]
    assert last["api_key"] == fp("sk-tenant-own-anthropic")
    assert "x-api-key" in last["headers"] and "authorization" not in last["headers"]


def _established_to(pid: int, port: int) -> int:
    """TCP connections of process `pid` in state ESTABLISHED to 127.0.0.1:`port`."""
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[2] == f"0100007F:{port:04X}" and fields[3] == "01" and fields[9] in inodes:
            n += 1
    return n


@pytest.mark.parametrize("h2c", [False, True], ids=["http1", "h2c"])
def test_h2c_backends_share_one_connection_for_all_streams(start_mock, start_gateway, h2c):
    import concurrent.futures

    import openai

    mock = start_mock("m", "--tokens-per-second", "10", "--reply-tokens", "10")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock, h2c=h2c)] if h2c else [backend(mock)])]))
    mock_port = int(mock.addr.rsplit(":", 1)[1])
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0, timeout=30)
    opened = concurrent.futures.ThreadPoolExecutor(12)
    streams = list(opened.map(lambda _: client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True), range(12)))
    firsts = [next(iter(s)) for s in streams]
    # All 12 are open upstream at once (1 s each): one connection with h2c, one each without.
    assert _established_to(gw.proc.popen.pid, mock_port) == (1 if h2c else 12)
    texts = list(opened.map(lambda s: "".join(c.choices[0].delta.content or "" for c in s if c.choices), streams))
    assert len(firsts) == 12 and all(texts), texts
    assert mock.stats()["streams_completed"] == 12
    # And a plain request over the same connection.
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content


def test_streams_beyond_one_http2_connections_limit_open_another_connection(start_mock, start_gateway):
    """A server allows 100 streams per HTTP/2 connection: the 101st stream gets a second
    connection instead of waiting for one of the first 100 to end."""
    import concurrent.futures

    import openai

    # Each stream lasts about 6 s upstream.
    mock = start_mock("m", "--tokens-per-second", "5", "--reply-tokens", "30", "--h2-max-streams", "100")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock, h2c=True)])]))
    mock_port = int(mock.addr.rsplit(":", 1)[1])
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0, timeout=60)
    n = 130

    def first_token_after(_):
        t0 = time.monotonic()
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
        chunks = iter(stream)
        next(chunks)
        ttft = time.monotonic() - t0
        return ttft, stream, chunks

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        opened = list(pool.map(first_token_after, range(n)))
        assert _established_to(gw.proc.popen.pid, mock_port) == 2
        texts = list(pool.map(lambda o: "".join(c.choices[0].delta.content or "" for c in o[2] if c.choices), opened))
    ttfts = sorted(o[0] for o in opened)
    # Waiting for a stream to end would take about 6 s.
    assert ttfts[-1] < 3, ttfts[-10:]
    assert all(texts) and mock.stats()["streams_completed"] == n


def test_h2c_needs_an_http_base_url(start_mock, binaries, tmp_path):
    import subprocess

    from conftest import GATEWAY_BIN

    doc = config_doc([model("gpt-4o", [{"name": "p", "provider": "openai", "baseUrl": "https://api.example/v1", "h2c": True}])])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([GATEWAY_BIN, "check", "--config", path], capture_output=True, text=True)
    assert out.returncode == 1
    assert "models[0].backends[0].h2c: h2c is HTTP/2 without TLS and needs an http:// baseUrl" in out.stderr, out.stderr
