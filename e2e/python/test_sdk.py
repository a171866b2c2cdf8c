"""The official OpenAI and Anthropic SDKs against the gateway, same-format and
translated, plain and streamed, tool calls included; usage must equal the mock's."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from conftest import TENANT_KEY, backend, config_doc, model

TOOLS_OPENAI = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}]
TOOLS_ANTHROPIC = [{
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
}]


@pytest.fixture
def setup(start_mock, start_gateway):
    oai = start_mock("oai")
    ant = start_mock("ant")
    gw = start_gateway(config_doc([
        model("gpt-4o", [backend(oai, "openai")]),
        model("claude", [backend(ant, "anthropic")]),
    ], systemPrompt="You are a test bot."))
    return gw, oai, ant


def oai_client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0, timeout=20)


def ant_client(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=TENANT_KEY, max_retries=0, timeout=20)


def usage_of(mock) -> tuple[int, int]:
    s = mock.stats()
    return s["prompt_tokens_total"], s["completion_tokens_total"]


def test_openai_sdk_to_openai_backend(setup):
    gw, oai, _ = setup
    raw = oai_client(gw).chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "system", "content": "be short"}, {"role": "user", "content": "hello there friend"}],
    )
    r = raw.parse()
    assert raw.headers["x-parley-model"] == "gpt-4o"
    assert raw.headers["x-parley-backend"] == "primary"
    assert raw.headers["x-request-id"]
    assert float(raw.headers["x-parley-overhead-ms"]) >= 0
    assert "Hello from oai" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == usage_of(oai)
    # The upstream saw the gateway's key, never the tenant's.
    last = oai.stats()["last_request"]
    assert TENANT_KEY not in json.dumps(last)
    assert last["body"]["model"] == "gpt-4o"


def test_openai_sdk_stream_with_and_without_usage(setup):
    gw, oai, _ = setup
    client = oai_client(gw)
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "count"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from oai")
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == usage_of(oai)
    # The gateway always asked upstream for usage...
    assert oai.stats()["last_request"]["body"]["stream_options"]["include_usage"] is True
    # ...and strips it when the client did not ask.
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "count"}], stream=True))
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert oai.stats()["last_request"]["body"]["stream_options"]["include_usage"] is True


def test_anthropic_sdk_to_anthropic_backend(setup):
    gw, _, ant = setup
    client = ant_client(gw)
    raw = client.messages.with_raw_response.create(
        model="claude", max_tokens=100, system="be short",
        messages=[{"role": "user", "content": "hello there"}])
    m = raw.parse()
    assert raw.headers["x-parley-model"] == "claude"
    assert m.content[0].text.startswith("Hello from ant")
    assert m.stop_reason == "end_turn"
    assert (m.usage.input_tokens, m.usage.output_tokens) == usage_of(ant)
    last = ant.stats()["last_request"]
    assert last["headers"]["anthropic-version"] == "2023-06-01"
    with client.messages.stream(model="claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text.startswith("Hello from ant")
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 5


def test_anthropic_sdk_to_openai_backend_with_tools(setup):
    gw, oai, _ = setup
    client = ant_client(gw)
    m = client.messages.create(
        model="gpt-4o", max_tokens=200, system="You help.",
        tools=TOOLS_ANTHROPIC,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert m.stop_reason == "tool_use"
    tool = next(b for b in m.content if b.type == "tool_use")
    assert tool.name == "get_weather"
    assert tool.input == {"location": "Paris"}
    assert (m.usage.input_tokens, m.usage.output_tokens) == usage_of(oai)
    sent = oai.stats()["last_request"]["body"]
    # The Chatbot's systemPrompt goes first, then the client's own.
    assert sent["messages"][0] == {"role": "system", "content": "You are a test bot.\nYou help."}
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["max_tokens"] == 200
    # Send the tool result back: it must reach the OpenAI backend as a `tool` message.
    m2 = client.messages.create(
        model="gpt-4o", max_tokens=200, tools=TOOLS_ANTHROPIC,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "sunny"}]},
        ])
    assert m2.stop_reason == "end_turn"
    assert "sunny" in m2.content[0].text
    sent = oai.stats()["last_request"]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "You are a test bot."}
    assert sent["messages"][2]["tool_calls"][0]["id"] == tool.id
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": tool.id, "content": "sunny"}
    # Streamed, with a tool call.
    with client.messages.stream(model="gpt-4o", max_tokens=200, tools=TOOLS_ANTHROPIC,
                                messages=[{"role": "user", "content": "weather in Paris?"}]) as s:
        final = s.get_final_message()
    tool = next(b for b in final.content if b.type == "tool_use")
    assert tool.input == {"location": "Paris"}
    assert final.stop_reason == "tool_use"
    p, c = usage_of(oai)
    assert final.usage.output_tokens > 0
    assert final.usage.input_tokens > 0


def test_openai_sdk_to_anthropic_backend_with_tools(setup):
    gw, _, ant = setup
    client = oai_client(gw)
    r = client.chat.completions.create(
        model="claude", tools=TOOLS_OPENAI,
        messages=[{"role": "system", "content": "You help."},
                  {"role": "user", "content": "What is the weather in Paris?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris"}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == usage_of(ant)
    sent = ant.stats()["last_request"]["body"]
    # The Chatbot's systemPrompt goes first, then the client's own.
    assert sent["system"] == "You are a test bot.\n\nYou help."
    assert sent["max_tokens"] == 4096, "the model's maxOutputTokens fills in max_tokens"
    assert sent["tools"][0]["input_schema"]["type"] == "object"
    r2 = client.chat.completions.create(
        model="claude", tools=TOOLS_OPENAI,
        messages=[{"role": "user", "content": "What is the weather in Paris?"},
                  choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "rainy"}])
    assert "rainy" in r2.choices[0].message.content
    sent = ant.stats()["last_request"]["body"]
    assert sent["messages"][1]["content"][0]["type"] == "tool_use"
    assert sent["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id, "content": "rainy"}
    # Streamed tool call through translation.
    chunks = list(client.chat.completions.create(
        model="claude", tools=TOOLS_OPENAI, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "weather in Paris?"}]))
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                   for tc in (c.choices[0].delta.tool_calls or []))
    assert json.loads(args) == {"location": "Paris"}
    assert any(c.choices and c.choices[0].finish_reason == "tool_calls" for c in chunks)
    assert chunks[-1].usage.completion_tokens > 0


def test_streamed_text_translation_usage_matches_mock(setup):
    gw, oai, ant = setup
    ant.reset()
    chunks = list(oai_client(gw).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "one two three"}], stream=True,
        stream_options={"include_usage": True}))
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == usage_of(ant)
    oai.reset()
    with ant_client(gw).messages.stream(model="gpt-4o", max_tokens=50,
                                        messages=[{"role": "user", "content": "one two three"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text.startswith("Hello from oai")
    assert (final.usage.input_tokens, final.usage.output_tokens) == usage_of(oai)


def test_models_lists_what_the_tenant_may_use(setup):
    gw, _, _ = setup
    ids = [m.id for m in oai_client(gw).models.list()]
    assert ids == ["claude", "gpt-4o"]
    from conftest import OTHER_KEY
    limited = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=OTHER_KEY, max_retries=0)
    assert [m.id for m in limited.models.list()] == ["gpt-4o"]


def test_chat_session_api_keeps_history(setup):
    gw, oai, _ = setup
    r = gw.post("/chat", {"session_id": "s1", "messages": [{"role": "user", "content": "my name is Ada"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session_id"] == "s1" and body["model"] == "gpt-4o"
    assert body["reply"].startswith("Hello from oai")
    assert body["usage"]["completion_tokens"] == 20
    r = gw.post("/chat", {"session_id": "s1", "messages": [{"role": "user", "content": "what is my name?"}]})
    assert r.status_code == 200, r.text
    sent = oai.stats()["last_request"]["body"]["messages"]
    assert sent[0] == {"role": "system", "content": "You are a test bot."}
    assert sent[1]["content"] == "my name is Ada"
    assert sent[2]["role"] == "assistant"
    assert sent[3]["content"] == "what is my name?"
    # Another tenant with the same session id does not see it.
    from conftest import OTHER_KEY
    r = gw.post("/chat", {"session_id": "s1", "messages": [{"role": "user", "content": "hi"}]}, key=OTHER_KEY)
    assert r.status_code == 200, r.text
    sent = oai.stats()["last_request"]["body"]["messages"]
    assert len(sent) == 2
    r = gw.post("/chat", {"messages": []})
    assert r.status_code == 400
    assert "session_id" in r.json()["error"]["message"]
