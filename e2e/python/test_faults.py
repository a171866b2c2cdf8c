"""Upstream failures, with the mock's counters as evidence."""

from __future__ import annotations

import concurrent.futures
import json
import time

import anthropic
import httpx
import openai
import pytest

from conftest import TENANT_KEY, backend, config_doc, model

MSG = [{"role": "user", "content": "hi"}]
FAST_RETRY = {"maxAttempts": 1, "initialBackoffMs": 10, "maxBackoffMs": 100}


def oai(gw):
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0, timeout=20)


def ant(gw):
    return anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=0, timeout=20)


@pytest.fixture
def pair(start_mock, start_gateway):
    """gpt-4o on mock `primary`, falling back to model `backup` on mock `backup`."""

    def make(primary_model: dict | None = None, **backend_extra):
        p = start_mock("primary")
        b = start_mock("backup")
        gw = start_gateway(config_doc([
            model("gpt-4o", [backend(p, "openai", **backend_extra)], fallbacks=["backup"], **(primary_model or {})),
            model("backup", [backend(b, "anthropic", name="secondary")]),
        ]))
        return gw, p, b

    return make


def test_429_is_served_by_the_fallback(pair):
    gw, p, b = pair({"retry": {"maxAttempts": 3, "initialBackoffMs": 10, "maxBackoffMs": 500}})
    p.config(fail_status=429, retry_after=30)
    raw = oai(gw).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert raw.headers["x-parley-model"] == "backup"
    assert raw.headers["x-parley-backend"] == "secondary"
    assert "Hello from backup" in raw.parse().choices[0].message.content
    # Retry-After (30 s) is longer than maxBackoffMs: the gateway moved on at once.
    assert p.stats()["by_status"] == {"429": 1}
    assert b.stats()["by_status"] == {"200": 1}
    # A 429 does not count against the breaker.
    assert gw.metric("parley_circuit_breaker_state", model="gpt-4o") == 0


def test_two_500s_then_success_is_retried(pair):
    gw, p, b = pair({"retry": {"maxAttempts": 3, "initialBackoffMs": 20, "maxBackoffMs": 100}})
    p.config(fail_first=2, fail_status=500)
    t0 = time.monotonic()
    raw = oai(gw).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    elapsed = time.monotonic() - t0
    assert raw.headers["x-parley-model"] == "gpt-4o"
    assert p.stats()["by_status"] == {"500": 2, "200": 1}
    assert b.requests() == 0
    assert elapsed >= 0.02, "there was a backoff"
    assert gw.metric("parley_upstream_attempts_total", model="gpt-4o", outcome="server_error") == 2


def test_hanging_backend_times_out_and_falls_back(pair):
    gw, p, b = pair({"retry": FAST_RETRY}, timeouts={"connectMs": 500, "firstTokenMs": 600, "totalMs": 5000})
    p.config(hang=True)
    t0 = time.monotonic()
    raw = oai(gw).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    elapsed = time.monotonic() - t0
    assert raw.headers["x-parley-model"] == "backup"
    assert 0.55 <= elapsed < 2.5, elapsed
    assert p.requests() == 1 and b.requests() == 1
    # A streamed request too.
    t0 = time.monotonic()
    text = "".join(c.choices[0].delta.content or "" for c in oai(gw).chat.completions.create(
        model="gpt-4o", messages=MSG, stream=True) if c.choices)
    assert "Hello from backup" in text
    assert time.monotonic() - t0 < 2.5


def test_breaker_opens_then_sends_one_probe(pair):
    gw, p, b = pair({"retry": FAST_RETRY, "circuitBreaker": {"failureThreshold": 3, "openSeconds": 2}})
    p.config(fail_status=500, latency_ms=300)
    client = oai(gw)
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
        assert raw.headers["x-parley-model"] == "backup"
    assert p.requests() == 3
    assert gw.metric("parley_circuit_breaker_state", model="gpt-4o", backend="primary") == 1
    opened = time.monotonic()
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
        assert raw.headers["x-parley-model"] == "backup"
    assert p.requests() == 3, "an open breaker sends the backend nothing"
    time.sleep(max(0.0, 2.1 - (time.monotonic() - opened)))
    # Now several requests at once: exactly one probe reaches the backend.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MSG).headers["x-parley-model"], range(4)))
    assert results == ["backup"] * 4
    assert p.requests() == 4, "one probe"
    # The probe failed: open again.
    assert gw.metric("parley_circuit_breaker_state", model="gpt-4o", backend="primary") == 1
    p.config(fail_rate=0, latency_ms=0)
    time.sleep(2.1)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert raw.headers["x-parley-model"] == "gpt-4o", "a successful probe closes the breaker"
    assert gw.metric("parley_circuit_breaker_state", model="gpt-4o", backend="primary") == 0
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert raw.headers["x-parley-model"] == "gpt-4o"
    # Operators see each opening (the first and after the failed probe) and the closing.
    logs = [json.loads(line) for line in gw.proc.stderr().splitlines() if line.startswith("{")]
    events = [(r.get("level"), r.get("message", "").split(":")[0]) for r in logs
              if r.get("backend") == "primary" and "circuit breaker" in r.get("message", "")]
    assert events == [("WARN", "circuit breaker opened")] * 2 + [("INFO", "circuit breaker closed")], events


def test_stream_failing_before_first_byte_falls_back(pair):
    gw, p, b = pair({"retry": FAST_RETRY}, timeouts={"connectMs": 500, "firstTokenMs": 400, "totalMs": 5000})
    p.config(fail_status=503)
    with ant(gw).messages.stream(model="gpt-4o", max_tokens=50, messages=MSG) as s:
        text = "".join(s.text_stream)
    assert text.startswith("Hello from backup")
    assert p.stats()["by_status"] == {"503": 1}
    # Headers arrive but the first token does not (ttft beyond firstTokenMs).
    p.config(reset=True)
    p.config(ttft_ms=3000)
    t0 = time.monotonic()
    raw = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                     json={"model": "gpt-4o", "messages": MSG, "stream": True}, timeout=10)
    assert raw.headers["x-parley-model"] == "backup"
    assert "Hello" in raw.text and raw.text.rstrip().endswith("data: [DONE]")
    assert time.monotonic() - t0 < 2.5


@pytest.mark.parametrize("fault", ["drop_after_tokens", "error_event_after_tokens"])
def test_stream_failing_midway_ends_with_an_error_event(pair, fault):
    gw, p, b = pair({"retry": FAST_RETRY})
    p.config(**{fault: 3})
    got = []
    with pytest.raises(openai.APIError) as e:
        for c in oai(gw).chat.completions.create(model="gpt-4o", messages=MSG, stream=True):
            if c.choices and c.choices[0].delta.content:
                got.append(c.choices[0].delta.content)
    assert len(got) == 3, got
    assert b.requests() == 0, "no fallback after the first byte"
    assert str(e.value), "the error says what happened"
    # Anthropic SDK over a translated stream.
    got = []
    with pytest.raises(anthropic.APIError):
        with ant(gw).messages.stream(model="gpt-4o", max_tokens=50, messages=MSG) as s:
            for t in s.text_stream:
                got.append(t)
    assert len(got) == 3, got


def test_all_backends_down_fails_fast_with_a_clear_message(start_mock, start_gateway):
    p = start_mock("p")
    b = start_mock("b")
    slow = {"connectMs": 1000, "firstTokenMs": 20000, "totalMs": 60000}
    gw = start_gateway(config_doc([
        model("gpt-4o", [backend(p, "openai", timeouts=slow)], fallbacks=["backup"],
              retry={"maxAttempts": 2, "initialBackoffMs": 50, "maxBackoffMs": 200},
              circuitBreaker={"failureThreshold": 2, "openSeconds": 30}),
        model("backup", [backend(b, "openai", timeouts=slow)],
              retry={"maxAttempts": 2, "initialBackoffMs": 50, "maxBackoffMs": 200},
              circuitBreaker={"failureThreshold": 2, "openSeconds": 30}),
    ]))
    p.config(fail_status=500)
    b.config(fail_status=502)
    t0 = time.monotonic()
    r = gw.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG})
    assert time.monotonic() - t0 < 2, "well under the 60 s total budget"
    assert r.status_code == 502
    msg = r.json()["error"]["message"]
    assert "gpt-4o/primary" in msg and "backup/primary" in msg and "HTTP 500" in msg
    assert p.requests() == 2 and b.requests() == 2
    # Both breakers are open now: 503, and nothing reaches the backends.
    r = gw.post("/v1/messages", {"model": "gpt-4o", "max_tokens": 5, "messages": MSG})
    assert r.status_code == 503
    assert "no backend is available" in r.json()["error"]["message"]
    assert p.requests() == 2 and b.requests() == 2
    # Connection refused counts too.
    p.proc.stop()
    gw2 = start_gateway(config_doc([model("gpt-4o", [backend(p, "openai", timeouts=slow)],
                                          retry={"maxAttempts": 3, "initialBackoffMs": 10, "maxBackoffMs": 50})]))
    t0 = time.monotonic()
    r = gw2.post("/v1/chat/completions", {"model": "gpt-4o", "messages": MSG})
    assert r.status_code == 502 and "connect" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 2


def test_client_disconnect_mid_stream_is_charged_for_the_whole_upstream_answer(start_mock, start_gateway):
    # The upstream generates (and bills) the answer whether or not the client stays: the
    # gateway reads the stream to its end and charges its real usage.
    mock = start_mock("slow", "--tokens-per-second", "20", "--reply-tokens", "60")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)])]))
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                      json={"model": "gpt-4o", "messages": MSG, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 3:
                    break
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and gw.metric("parley_requests_total", status="499") < 1:
        time.sleep(0.05)
    assert gw.metric("parley_requests_total", status="499") == 1
    stats = mock.stats()
    assert stats["streams_completed"] == 1 and stats["streams_cancelled"] == 0, stats
    assert gw.metric("parley_tokens_total", kind="output") == stats["completion_tokens_total"] == 60
    assert gw.metric("parley_tokens_total", kind="input") == stats["prompt_tokens_total"]
