"""Cache, CORS, request ids, header limits, metrics."""

from __future__ import annotations

import httpx

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
    # Oversized headers are refused by the HTTP layer, not a crash.
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"x-big": "a" * 100_000, "authorization": f"Bearer {TENANT_KEY}"},
                   json={"messages": MSG}, timeout=5)
    assert r.status_code == 431
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
