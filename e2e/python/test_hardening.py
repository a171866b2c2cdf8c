"""The request path under faults and hostile clients: charging what was generated when a
client goes away, refusing anonymous bodies before reading them, isolation of Chatbots
sharing a Redis, panics, load shedding, the Chatbot's system prompt on every endpoint.

Real binaries, the real mock (its counters are the evidence), real Redis.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
import uuid

import httpx
import pytest

from conftest import TENANT_KEY, _wait_for, backend, config_doc, model, write_config
from test_redis import private_redis, shared_redis  # noqa: F401 - fixtures

MSG = [{"role": "user", "content": "hi"}]
PERSONA = "You are Parley's test persona; answer briefly."


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_a_client_that_goes_away_is_charged_what_the_upstream_generated(start_mock, start_gateway):
    mock = start_mock("m")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)],
                                         pricing={"inputPerMillionTokens": "1000000",
                                                  "outputPerMillionTokens": "2000000"})]))
    mock.reset()
    mock.config(latency_ms=800)
    # Non-streaming: the client gives up long before the answer.
    with pytest.raises(httpx.ReadTimeout):
        gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG}, timeout=0.2)
    _wait_for(lambda: gw.metric("parley_requests_total", status="499") == 1, 10, "the request to be settled")
    stats = mock.stats()
    assert stats["by_status"] == {"200": 1}, stats
    assert stats["completion_tokens_total"] > 0
    assert gw.metric("parley_tokens_total", tenant="test/acme", kind="input") == stats["prompt_tokens_total"]
    assert gw.metric("parley_tokens_total", tenant="test/acme", kind="output") == stats["completion_tokens_total"]
    expected_cost = stats["prompt_tokens_total"] * 1_000_000 + stats["completion_tokens_total"] * 2_000_000
    assert gw.metric("parley_cost_micro_usd_total", tenant="test/acme") == expected_cost

    # Streaming: the client reads the first event and hangs up; the gateway reads the rest.
    mock.reset()
    mock.config(tokens_per_second=25, reply_tokens=20)
    before_out = gw.metric("parley_tokens_total", tenant="test/acme", kind="output")
    with gw.http.stream("POST", "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG, "stream": True},
                        headers={"authorization": f"Bearer {TENANT_KEY}"}) as r:
        assert r.status_code == 200
        next(r.iter_bytes())
    _wait_for(lambda: gw.metric("parley_requests_total", status="499") == 2, 10, "the stream to be settled")
    stats = mock.stats()
    assert stats["streams_completed"] == 1, stats
    assert stats["streams_cancelled"] == 0, stats
    out = gw.metric("parley_tokens_total", tenant="test/acme", kind="output") - before_out
    assert out == stats["completion_tokens_total"] == 20


def _raw_post_headers(addr: str, headers: dict[str, str], length: int) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    lines = [f"POST /v1/chat/completions HTTP/1.1", f"host: {addr}", "content-type: application/json",
             f"content-length: {length}"] + [f"{k}: {v}" for k, v in headers.items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return s


def _status_within(s: socket.socket, seconds: float) -> str | None:
    s.settimeout(seconds)
    try:
        data = s.recv(4096)
    except socket.timeout:
        return None
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def test_an_anonymous_50_mib_post_is_refused_before_its_body_is_read(start_mock, start_gateway):
    mock = start_mock("m")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)])]))
    size = 50 * 1024 * 1024
    # Only the headers are sent: the 401 comes at once, without waiting for a byte of body.
    for headers in ({}, {"authorization": "Bearer not-a-key"}, {"x-api-key": "nope"}):
        s = _raw_post_headers(gw.addr, headers, size)
        t0 = time.monotonic()
        line = _status_within(s, 3)
        s.close()
        assert line is not None and " 401 " in line + " ", (headers, line)
        assert time.monotonic() - t0 < 1.0
    # An authenticated client with the same headers is waited for (its body would be read,
    # up to the limit): no answer before the body comes.
    s = _raw_post_headers(gw.addr, {"authorization": f"Bearer {TENANT_KEY}"}, 1000)
    assert _status_within(s, 1.0) is None
    s.close()
    # A real anonymous 50 MiB upload gets its 401 long before 50 MiB could have been read,
    # and the gateway's memory does not grow by the body.
    rss0 = rss_kib(gw.proc.popen.pid)
    s = _raw_post_headers(gw.addr, {}, size)
    s.settimeout(2)
    sent = 0
    chunk = b"x" * 65536
    t0 = time.monotonic()
    try:
        while sent < size:
            s.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the gateway answered and closed: the rest is never read
    try:
        s.settimeout(2)
        status = s.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace") or "connection closed"
    except OSError:
        status = "connection closed"
    s.close()
    assert sent < size, "the gateway read the whole anonymous body"
    assert status.startswith("HTTP/1.1 401") or status == "connection closed", status
    assert time.monotonic() - t0 < 5
    assert rss_kib(gw.proc.popen.pid) - rss0 < 20 * 1024
    assert gw.proc.alive()
    assert mock.requests() == 0
    # Small anonymous bodies keep working the ordinary way (an SDK sees a clean 401).
    r = gw.post("/v1/chat/completions", {"messages": MSG}, key="wrong")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_two_chatbots_sharing_a_redis_and_a_tenant_share_no_cache_or_sessions(start_mock, start_gateway, shared_redis):
    mock = start_mock("m")
    tenant = f"test/iso-{uuid.uuid4().hex[:8]}"
    key = f"sk-iso-{uuid.uuid4().hex}"

    def doc(chatbot: str) -> dict:
        d = config_doc([model("gpt-4o", [backend(mock)], cache={"ttlSeconds": 300})],
                       chatbot=chatbot, redis={"url": {"value": shared_redis}})
        d["tenants"] = [{"id": tenant, "apiKeys": [{"value": key}]}]
        return d

    a = start_gateway(doc("ns/bot-a"))
    a2 = start_gateway(doc("ns/bot-a"))
    b = start_gateway(doc("ns/bot-b"))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"cache me {uuid.uuid4()}"}], "temperature": 0}
    assert a.post("/v1/chat/completions", body, key=key).headers["x-parley-cache"] == "miss"
    # Another replica of the same Chatbot shares the entry ...
    _wait_for(lambda: a2.post("/v1/chat/completions", body, key=key).headers["x-parley-cache"] == "hit", 5, "shared cache hit")
    # ... another Chatbot does not.
    assert b.post("/v1/chat/completions", body, key=key).headers["x-parley-cache"] == "miss"
    # Sessions: the same tenant and session id are two conversations in two Chatbots.
    sid = f"s-{uuid.uuid4().hex[:8]}"
    r = a.post("/chat", {"session_id": sid, "messages": "first turn in bot a"}, key=key)
    assert r.status_code == 200, r.text
    mock.reset()
    r = b.post("/chat", {"session_id": sid, "messages": "first turn in bot b"}, key=key)
    assert r.status_code == 200, r.text
    sent = mock.stats()["last_request"]["body"]["messages"]
    assert [m["content"] for m in sent] == ["first turn in bot b"], sent
    r = a2.post("/chat", {"session_id": sid, "messages": "second turn in bot a"}, key=key)
    sent = mock.stats()["last_request"]["body"]["messages"]
    assert sent[0]["content"] == "first turn in bot a"
    assert all("bot b" not in json.dumps(m) for m in sent)


def test_a_panic_in_a_handler_is_a_500_in_the_api_shape_and_the_gateway_serves_on(start_mock, start_gateway, monkeypatch):
    mock = start_mock("m")
    doc = config_doc([model("gpt-4o", [backend(mock)])])
    plain = start_gateway(doc)
    assert plain.post("/_test/panic", {}).status_code == 404, "the hook exists only when asked for"
    monkeypatch.setenv("PARLEY_TEST_HOOKS", "1")
    gw = start_gateway(doc)
    for _ in range(3):
        r = gw.post("/_test/panic", {})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "api_error" and err["code"] == "internal_error"
        assert r.headers["x-request-id"]
    assert gw.proc.alive()
    # Counted as what the client got, not as a client that went away.
    assert gw.metric("parley_requests_total", api="openai", status="500") == 3
    assert gw.metric("parley_requests_total", status="499") == 0
    assert gw.metric("parley_in_flight_requests") == 0
    r = gw.post("/v1/chat/completions", {"messages": MSG})
    assert r.status_code == 200, r.text
    assert '"injected panic' not in r.text


def test_over_the_concurrency_limit_clients_get_503_with_retry_after(start_mock, start_gateway, monkeypatch):
    mock = start_mock("m")
    mock.config(latency_ms=1500)
    monkeypatch.setenv("PARLEY_MAX_CONCURRENT_REQUESTS", "8")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)])]))
    pid = gw.proc.popen.pid
    rss_before = rss_kib(pid)
    peak = [rss_before]

    def one(_):
        t0 = time.monotonic()
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={"messages": MSG},
                       headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=20)
        peak[0] = max(peak[0], rss_kib(pid))
        return r.status_code, r.headers.get("retry-after"), time.monotonic() - t0, r.json()

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(200)))
    elapsed = time.monotonic() - t0
    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 503]
    assert len(ok) + len(shed) == len(results), {r[0] for r in results}
    assert 8 <= len(ok) and len(shed) >= 100, (len(ok), len(shed))
    for status, retry_after, took, body in shed:
        assert retry_after == "1"
        assert body["error"]["code"] == "no_backend_available"
        assert took < 5.0, "a shed request is answered at once"
    assert elapsed < 15, "nothing hangs"
    assert gw.metric("parley_load_shed_total") == len(shed)
    rss_after = rss_kib(pid)
    print(f"gateway RSS under load shedding: before {rss_before} KiB, peak {peak[0]} KiB, after {rss_after} KiB")
    assert peak[0] < 128 * 1024, peak[0]
    # Below the limit again, everything is served.
    assert gw.post("/v1/chat/completions", {"messages": MSG}).status_code == 200


def test_the_chatbot_system_prompt_reaches_the_upstream_on_every_chat_endpoint(start_mock, start_gateway):
    oai = start_mock("oai")
    ant = start_mock("ant")
    gw = start_gateway(config_doc([
        model("gpt-4o", [backend(oai)], cache={"ttlSeconds": 300}),
        model("claude", [backend(ant, "anthropic")]),
    ], systemPrompt=PERSONA))

    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "system", "content": "client rules"}, *MSG]})
    assert r.status_code == 200, r.text
    sent = oai.stats()["last_request"]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": PERSONA}
    assert sent[1]["content"] == "client rules"

    h = {"x-api-key": TENANT_KEY, "anthropic-version": "2023-06-01"}
    r = gw.http.post("/v1/messages", json={"model": "claude", "max_tokens": 50, "system": "client rules", "messages": MSG}, headers=h)
    assert r.status_code == 200, r.text
    system = ant.stats()["last_request"]["body"]["system"]
    assert [b["text"] for b in system] == [PERSONA, "client rules"]
    # Anthropic client to an OpenAI upstream: translated, persona first.
    r = gw.http.post("/v1/messages", json={"model": "gpt-4o", "max_tokens": 50, "messages": MSG}, headers=h)
    assert r.status_code == 200, r.text
    assert PERSONA in oai.stats()["last_request"]["body"]["messages"][0]["content"]

    r = gw.post("/chat", {"session_id": "persona", "messages": "hello"})
    assert r.status_code == 200, r.text
    sent = oai.stats()["last_request"]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": PERSONA}

    # The system prompt is part of the cache key: a new persona is a miss.
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "cached?"}], "temperature": 0}
    assert gw.post("/v1/chat/completions", body).headers["x-parley-cache"] == "miss"
    assert gw.post("/v1/chat/completions", body).headers["x-parley-cache"] == "hit"
    doc = config_doc([
        model("gpt-4o", [backend(oai)], cache={"ttlSeconds": 300}),
        model("claude", [backend(ant, "anthropic")]),
    ], systemPrompt=PERSONA + " Now in French.")
    write_config(gw.config_path, doc)
    _wait_for(lambda: gw.metric("parley_config_reloads_total", result="success") >= 2, 10, "reload")
    assert gw.post("/v1/chat/completions", body).headers["x-parley-cache"] == "miss"


def test_chat_reserves_tokens_for_the_system_prompt_and_history(start_mock, start_gateway):
    mock = start_mock("m")
    long_persona = "Be helpful. " * 400  # about 4,800 bytes: 1,200 estimated tokens
    doc = config_doc([model("gpt-4o", [backend(mock)])], systemPrompt=long_persona)
    doc["tenants"][0]["rateLimit"] = {"tokensPerMinute": 1000}
    gw = start_gateway(doc)
    # The new turn alone is tiny; what is sent (persona + history + turn) is not.
    r = gw.post("/chat", {"session_id": "big", "messages": "hi", "max_tokens": 10})
    assert r.status_code == 429, r.text
    assert "tokensPerMinute" in r.json()["error"]["message"]
    assert mock.requests() == 0


def test_a_chat_turn_that_cannot_be_stored_is_an_error_not_200(start_mock, start_gateway, private_redis):
    mock = start_mock("m")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)])],
                                  redis={"url": {"value": private_redis.url}}, rateLimitFailureMode="open"))
    assert gw.post("/chat", {"session_id": "s", "messages": "one"}).status_code == 200
    mock.config(latency_ms=1000)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(gw.post, "/chat", {"session_id": "s", "messages": "two"})
        time.sleep(0.5)
        private_redis.stop()  # Redis goes away while the upstream answers
        r = fut.result(timeout=20)
    assert r.status_code == 503, r.text
    assert "could not be stored" in r.json()["error"]["message"]
    # The upstream answered, so the tokens are charged all the same.
    assert gw.metric("parley_tokens_total", tenant="test/acme", kind="output") == mock.stats()["completion_tokens_total"]


def test_a_missing_redis_url_file_degrades_shared_state_not_the_config(start_mock, start_gateway, shared_redis):
    mock = start_mock("m")
    tenant = f"test/nourl-{uuid.uuid4().hex[:8]}"
    key = f"sk-nourl-{uuid.uuid4().hex}"
    doc = config_doc([model("gpt-4o", [backend(mock)])], chatbot="ns/nourl",
                     redis={"url": {"file": "redis/url"}}, rateLimitFailureMode="open")
    doc["tenants"] = [{"id": tenant, "apiKeys": [{"value": key}], "rateLimit": {"requestsPerMinute": 1}}]
    gw = start_gateway(doc)  # ready: the config is valid, only Redis is missing
    assert "redis.url" in gw.proc.stderr() and "rateLimitFailureMode" in gw.proc.stderr()
    # Open: admitted without limits; sessions need Redis: 503 that says so.
    for _ in range(3):
        assert gw.post("/v1/chat/completions", {"messages": MSG}, key=key).status_code == 200
    r = gw.post("/chat", {"session_id": "s", "messages": "hi"}, key=key)
    assert r.status_code == 503 and "Redis" in r.json()["error"]["message"], r.text
    assert gw.metric("parley_limit_decisions_total", backend="redis", result="redis_down_open") >= 3
    # The file appears (a Secret mounted late): the reload picks it up and limits apply.
    secret = gw.config_path.parent / "redis"
    secret.mkdir()
    (secret / "url").write_text(shared_redis + "\n")
    _wait_for(lambda: gw.post("/v1/chat/completions", {"messages": MSG}, key=key).status_code == 429, 15,
              "limits through Redis once its URL can be read")
    assert gw.post("/chat", {"session_id": "s", "messages": "hi"}, key=key).status_code in (200, 429)
