"""Status codes and error shapes of DESIGN.md's table, per API."""

from __future__ import annotations

import socket

import anthropic
import openai
import pytest

from conftest import OTHER_KEY, TENANT_KEY, backend, config_doc, model

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def setup(start_mock, start_gateway):
    oai = start_mock("oai")
    ant = start_mock("ant")
    doc = config_doc([
        model("gpt-4o", [backend(oai, "openai")]),
        model("claude", [backend(ant, "anthropic")]),
    ], limits={"maxBodyBytes": 4096})
    doc["tenants"].append({"id": "test/slow", "apiKeys": [{"value": "sk-rate"}],
                           "rateLimit": {"requestsPerMinute": 2}})
    doc["tenants"].append({"id": "test/poor", "apiKeys": [{"value": "sk-poor"}],
                           "budget": {"monthlyUsd": "0.000001"}})
    doc["tenants"].append({"id": "test/terse", "apiKeys": [{"value": "sk-terse"}], "maxBodyBytes": 200})
    doc["tenants"].append({"id": "test/verbose", "apiKeys": [{"value": "sk-verbose"}], "maxBodyBytes": 65536})
    doc["models"][0]["pricing"] = {"inputPerMillionTokens": "1000.00", "outputPerMillionTokens": "1000.00"}
    gw = start_gateway(doc)
    return gw, oai, ant


def openai_error(r):
    body = r.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "code"} <= set(body["error"])
    return body["error"]


def anthropic_error(r):
    body = r.json()
    assert body["type"] == "error", body
    return body["error"]


def test_auth(setup):
    gw, oai, _ = setup
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}, key=None)
    assert r.status_code == 401
    assert "missing API key" in openai_error(r)["message"]
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}, key="sk-wrong")
    assert r.status_code == 401
    assert r.headers["x-request-id"]
    r = gw.post("/v1/messages", {"model": "claude", "max_tokens": 5, "messages": MSG}, key=None,
                headers={"x-api-key": "sk-wrong"})
    assert r.status_code == 401
    assert anthropic_error(r)["type"] == "authentication_error"
    # x-api-key works on the OpenAI endpoint too.
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}, key=None,
                headers={"x-api-key": TENANT_KEY})
    assert r.status_code == 200
    # The SDKs raise their own error types.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="nope", max_retries=0).chat.completions.create(model="gpt-4o", messages=MSG)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.url, api_key="nope", max_retries=0).messages.create(model="claude", max_tokens=5, messages=MSG)
    assert oai.requests() == 1
    # Keys never reach logs.
    assert "sk-wrong" not in gw.proc.stderr() and TENANT_KEY not in gw.proc.stderr()
    assert TENANT_KEY not in gw.metrics()


def test_bad_requests(setup):
    gw, oai, _ = setup
    r = gw.http.post("/v1/chat/completions", content=b"{not json", headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert r.status_code == 400
    assert "not valid JSON" in openai_error(r)["message"]
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o"})
    assert r.status_code == 400 and "messages" in openai_error(r)["message"]
    r = gw.post("/v1/messages", {"model": "claude", "max_tokens": 5, "messages": "x"})
    assert r.status_code == 400 and anthropic_error(r)["type"] == "invalid_request_error"
    r = gw.post("/v1/chat/completions", {"model": "gpt-5-turbo", "messages": MSG})
    assert r.status_code == 404
    err = openai_error(r)
    assert "gpt-5-turbo" in err["message"] and err["code"] == "model_not_found"
    r = gw.post("/v1/messages", {"model": "nope", "max_tokens": 5, "messages": MSG})
    assert r.status_code == 404 and anthropic_error(r)["type"] == "not_found_error"
    r = gw.post("/v1/chat/completions", {"model": "claude", "messages": MSG}, key=OTHER_KEY)
    assert r.status_code == 403
    assert "claude" in openai_error(r)["message"]
    assert gw.metric("parley_requests_total", model="claude", status="403") == 1, "refusals count under the model"
    assert gw.metric("parley_requests_total", model="gpt-5-turbo") == 0, "unknown names never become labels"
    assert oai.requests() == 0


def test_unsupported_parameters_are_named(setup):
    gw, _, ant = setup
    r = gw.post("/v1/chat/completions", {"model": "claude", "messages": MSG, "n": 2})
    assert r.status_code == 400
    assert "`n`" in openai_error(r)["message"]
    r = gw.post("/v1/chat/completions", {"model": "claude", "messages": MSG, "logprobs": True})
    assert r.status_code == 400 and "`logprobs`" in openai_error(r)["message"]
    r = gw.post("/v1/messages", {"model": "gpt-4o", "max_tokens": 5, "messages": MSG, "top_k": 5})
    assert r.status_code == 400 and "`top_k`" in anthropic_error(r)["message"]
    assert ant.requests() == 0


def test_body_limit_is_a_413_the_client_receives(setup):
    gw, oai, _ = setup
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 200_000}]}
    r = gw.post("/v1/chat/completions", big)
    assert r.status_code == 413
    assert "4096 bytes" in openai_error(r)["message"]
    r = gw.post("/v1/messages", {**big, "max_tokens": 5})
    assert r.status_code == 413 and anthropic_error(r)["type"] == "request_too_large"
    # Also with a raw socket that sends the whole body at once, then reads.
    body = b'{"messages":[{"role":"user","content":"' + b"y" * 300_000 + b'"}]}'
    host, port = gw.addr.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  + f"authorization: Bearer {TENANT_KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    assert oai.requests() == 0


def test_a_tenant_body_limit_replaces_the_gateway_one(setup):
    gw, oai, _ = setup
    medium = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 1000}]}
    # Under the gateway's 4096 bytes but over test/terse's 200.
    r = gw.post("/v1/chat/completions", medium, key="sk-terse")
    assert r.status_code == 413 and "200 bytes" in openai_error(r)["message"]
    assert gw.post("/v1/chat/completions", medium).status_code == 200
    # Over the gateway's 4096 bytes but under test/verbose's 65536.
    large = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 20_000}]}
    assert gw.post("/v1/chat/completions", large).status_code == 413
    r = gw.post("/v1/chat/completions", large, key="sk-verbose")
    assert r.status_code == 200, r.text
    assert oai.requests() == 2


def test_upstream_answers(setup):
    gw, oai, _ = setup
    oai.config(fail_status=400)
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG})
    assert r.status_code == 400
    assert "upstream refused" in openai_error(r)["message"]
    assert oai.requests() == 1, "a 400 is not retried"
    oai.config(fail_status=401)
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG})
    assert r.status_code == 502
    msg = openai_error(r)["message"]
    assert "rejected the gateway's API key" in msg
    assert "injected failure" not in msg, "the provider's text (which may quote the key) is not repeated"
    assert oai.requests() == 2, "a 401 is not retried"


def test_rate_limit_and_budget(setup):
    gw, _, _ = setup
    for _ in range(2):
        assert gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}, key="sk-rate").status_code == 200
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}, key="sk-rate")
    assert r.status_code == 429
    assert "requestsPerMinute" in openai_error(r)["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-limit-requests"] == "2"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    r = gw.post("/v1/messages", {"model": "gpt-4o", "max_tokens": 5, "messages": MSG}, key="sk-rate")
    assert r.status_code == 429 and anthropic_error(r)["type"] == "rate_limit_error"
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}, key="sk-poor")
    assert r.status_code == 402
    assert "budget" in openai_error(r)["message"]
    assert gw.metric("parley_limit_refusals_total", limit="budget") == 1


HOSTILE = [
    b"", b"null", b"[]", b'"x"', b"{}", b'{"messages": null}', b'{"messages": [1, 2]}',
    b'{"messages": [{"role": 5}]}', b'{"messages": [{"role": "user", "content": {"a": 1}}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "weird"}]}]}',
    b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}',
    b'{"stream": "yes", "messages": [{"role": "user", "content": "x"}]}',
    b'{"max_tokens": 18446744073709551615, "messages": [{"role": "user", "content": "x"}]}',
    b'{"max_tokens": 1e300, "messages": [{"role": "user", "content": "x"}]}',
    b'{"max_tokens": -1, "messages": [{"role": "user", "content": "x"}]}',
    b'{"tools": "nope", "tool_choice": 7, "messages": [{"role": "user", "content": "x"}]}',
    b'{"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]}',
    b'{"messages": [{"role": "tool", "content": "x"}]}',
    b'{"system": 5, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}',
    b'\xff\xfe\x00garbage', b'{"messages": [' * 2000,
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/chat"])
@pytest.mark.parametrize("model_name", ["gpt-4o", "claude"])
def test_hostile_bodies_never_cause_a_500(setup, path, model_name):
    gw, _, _ = setup
    for raw in HOSTILE:
        body = raw.replace(b'"messages"', b'"model": "' + model_name.encode() + b'", "messages"', 1) if raw.startswith(b"{\"") and b'"model"' not in raw else raw
        r = gw.http.post(path, content=body, headers={"authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json"})
        assert r.status_code < 500 or r.status_code in (502, 503, 504), (raw[:80], r.status_code, r.text)
        assert r.status_code != 500
        assert r.json(), raw[:80]
    assert gw.proc.alive()
