"""The OpenAI Responses API through the gateway with the official `openai` SDK: against
an OpenAI-compatible backend without a Responses API (translated to chat completions),
an Anthropic backend (translated to Messages) and a backend with `responsesApi`
(passed through); plain, streamed, with a function tool round trip and continued with
`previous_response_id`; fallback before the first byte, a failure after it; stored
responses per tenant, expiring with the session TTL (in process and in Redis)."""

from __future__ import annotations

import json
import os
import time
import uuid

import openai
import pytest

from conftest import OTHER_KEY, TENANT_KEY, backend, config_doc, model

TOOLS = [{
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
}]
SHARED_REDIS = os.environ.get("PARLEY_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def client(gw, key: str = TENANT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture
def setup(start_mock, start_gateway):
    oai = start_mock("oai")
    ant = start_mock("ant")
    native = start_mock("native")
    gw = start_gateway(config_doc([
        model("gpt-4o", [backend(oai, "openai")]),
        model("claude", [backend(ant, "anthropic")]),
        model("native", [backend(native, "openai", responsesApi=True)]),
    ], systemPrompt="You are a test bot."))
    return gw, {"gpt-4o": oai, "claude": ant, "native": native}


MODELS = ["gpt-4o", "claude", "native"]


def usage_of(mock) -> tuple[int, int]:
    s = mock.stats()
    return s["prompt_tokens_total"], s["completion_tokens_total"]


def last_path(mock) -> str:
    return mock.stats()["last_request"]["path"]


@pytest.mark.parametrize("name", MODELS)
def test_plain_create(setup, name):
    gw, mocks = setup
    raw = client(gw).responses.with_raw_response.create(
        model=name, input="hello there", instructions="be short", max_output_tokens=50,
        temperature=0.5, metadata={"order": "42"})
    r = raw.parse()
    assert raw.headers["x-parley-model"] == name
    assert raw.headers["x-parley-backend"] == "primary"
    assert float(raw.headers["x-parley-overhead-ms"]) >= 0
    assert r.object == "response" and r.status == "completed"
    assert "Hello from" in r.output_text
    assert r.metadata == {"order": "42"}
    assert (r.usage.input_tokens, r.usage.output_tokens) == usage_of(mocks[name])
    mock = mocks[name]
    expected = {"gpt-4o": "/v1/chat/completions", "claude": "/v1/messages", "native": "/v1/responses"}[name]
    assert last_path(mock) == expected
    body = mock.stats()["last_request"]["body"]
    # The Chatbot's prompt comes before the client's instructions, whatever the format.
    text = json.dumps(body)
    assert text.index("You are a test bot.") < text.index("be short")
    if name == "native":
        assert body["store"] is False and "previous_response_id" not in body
    # Stored: readable by its id, then deleted.
    got = client(gw).responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    client(gw).responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client(gw).responses.retrieve(r.id)


@pytest.mark.parametrize("name", MODELS)
def test_streamed(setup, name):
    gw, mocks = setup
    c = client(gw)
    with c.responses.stream(model=name, input="count for me") as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created"
    assert "response.output_text.delta" in kinds
    assert kinds[-1] == "response.completed"
    assert "Hello from" in final.output_text
    assert (final.usage.input_tokens, final.usage.output_tokens) == usage_of(mocks[name])
    # A streamed response is stored too: the conversation continues from it.
    nxt = c.responses.create(model=name, input="and again", previous_response_id=final.id)
    body = json.dumps(mocks[name].stats()["last_request"]["body"])
    assert "count for me" in body and "and again" in body
    assert nxt.previous_response_id == final.id


@pytest.mark.parametrize("name", MODELS)
def test_function_tool_round_trip_and_continuation(setup, name):
    gw, mocks = setup
    c = client(gw)
    first = c.responses.create(model=name, input="what is the weather in Paris?", tools=TOOLS)
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1, first.output
    call = calls[0]
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"location": "Paris"}
    # The tool's result, continued from the stored response (only the new item is sent).
    second = c.responses.create(
        model=name, previous_response_id=first.id, tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert "Tool result: sunny, 21 C" in second.output_text
    # The upstream saw the whole conversation: question, call and result.
    body = json.dumps(mocks[name].stats()["last_request"]["body"])
    assert "weather in Paris" in body and call.call_id in body and "sunny, 21 C" in body


@pytest.mark.parametrize("name", MODELS)
def test_streamed_function_call(setup, name):
    gw, _ = setup
    with client(gw).responses.stream(model=name, input="call_tool please", tools=TOOLS) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    call = [o for o in final.output if o.type == "function_call"][0]
    assert json.loads(call.arguments) == {"location": "Paris"}


def test_json_schema_format_and_tool_choice_reach_the_chat_backend(setup):
    gw, mocks = setup
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    r = client(gw).responses.create(
        model="gpt-4o", input="hi", tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"},
        top_p=0.9, text={"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}})
    body = mocks["gpt-4o"].stats()["last_request"]["body"]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["top_p"] == 0.9
    assert r.output[0].type == "function_call"
    assert r.text.format.type == "json_schema"


def test_another_tenants_response_is_404(setup):
    gw, _ = setup
    r = client(gw).responses.create(model="gpt-4o", input="secret")
    other = client(gw, OTHER_KEY)
    with pytest.raises(openai.NotFoundError) as e:
        other.responses.create(model="gpt-4o", input="go on", previous_response_id=r.id)
    assert r.id in str(e.value)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(r.id)
    # Still there for its owner.
    assert client(gw).responses.retrieve(r.id).id == r.id


def test_store_false_is_not_kept_and_bad_input_is_400(setup):
    gw, _ = setup
    c = client(gw)
    r = c.responses.create(model="gpt-4o", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="gpt-4o", input=[{"type": "web_search_call", "id": "x"}])
    assert "input[0].type" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="gpt-4o", input="hi", tools=[{"type": "web_search"}])
    assert "tools[0].type" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        client(gw, "sk-wrong").responses.create(model="gpt-4o", input="hi")


@pytest.fixture
def pair(start_mock, start_gateway):
    def make(native: bool):
        p = start_mock("primary")
        b = start_mock("backup")
        extra = {"responsesApi": True} if native else {}
        gw = start_gateway(config_doc([
            model("gpt-4o", [backend(p, "openai", **extra)], fallbacks=["backup"],
                  retry={"maxAttempts": 2, "initialBackoffMs": 10, "maxBackoffMs": 50}),
            model("backup", [backend(b, "anthropic", name="secondary")]),
        ]))
        return gw, p, b

    return make


@pytest.mark.parametrize("native", [False, True])
def test_429_falls_back_before_the_first_byte(pair, native):
    gw, p, b = pair(native)
    p.config(fail_status=429, retry_after=30)
    with client(gw).responses.with_streaming_response.create(model="gpt-4o", input="hi", stream=True) as raw:
        assert raw.headers["x-parley-model"] == "backup"
        events = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.created") == 1
    assert "Hello from backup" in events[-1]["response"]["output"][0]["content"][0]["text"]
    assert p.stats()["by_status"] == {"429": 1}
    assert b.stats()["by_status"] == {"200": 1}


@pytest.mark.parametrize("native", [False, True])
def test_failure_after_the_first_byte_is_the_sdks_error(pair, native):
    gw, p, _ = pair(native)
    p.config(drop_after_tokens=3, reply_tokens=20)
    seen = []
    with pytest.raises(openai.APIError) as e:
        with client(gw).responses.stream(model="gpt-4o", input="hi") as stream:
            for ev in stream:
                seen.append(ev.type)
    assert "response.output_text.delta" in seen
    assert "response.failed" in seen
    assert "upstream" in str(e.value) and "stream" in str(e.value)
    p.config(drop_after_tokens=None, error_event_after_tokens=2)
    with pytest.raises(openai.APIError):
        with client(gw).responses.stream(model="gpt-4o", input="hi") as stream:
            for _ in stream:
                pass


def test_stored_response_expires_with_the_session_ttl(start_mock, start_gateway):
    mock = start_mock("oai")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)])], sessions={"ttlSeconds": 1}))
    c = client(gw)
    r = c.responses.create(model="gpt-4o", input="hi")
    assert c.responses.retrieve(r.id).id == r.id
    time.sleep(1.5)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="gpt-4o", input="more", previous_response_id=r.id)


def test_stored_in_redis_shared_per_tenant_and_expiring(start_mock, start_gateway):
    mock = start_mock("oai")
    suffix = uuid.uuid4().hex[:8]
    doc = config_doc([model("gpt-4o", [backend(mock)])], sessions={"ttlSeconds": 1},
                     redis={"url": {"value": SHARED_REDIS}})
    for t in doc["tenants"]:
        t["id"] = f"{t['id']}-{suffix}"
    a = start_gateway(doc)
    b = start_gateway(doc)
    r = client(a).responses.create(model="gpt-4o", input="remember me")
    # Another replica continues it; another tenant cannot.
    nxt = client(b).responses.create(model="gpt-4o", input="go on", previous_response_id=r.id)
    assert "remember me" in json.dumps(mock.stats()["last_request"]["body"])
    with pytest.raises(openai.NotFoundError):
        client(b, OTHER_KEY).responses.retrieve(nxt.id)
    time.sleep(1.5)
    with pytest.raises(openai.NotFoundError):
        client(b).responses.retrieve(nxt.id)
