"""`POST /v1/embeddings` through Parley with the official openai SDK: models of kind
embeddings, priced per input token, with keys, limits, routing, metrics and the ledger of
the chat endpoints; chat endpoints and the embeddings endpoint refuse each other's models."""

from __future__ import annotations

import base64
import json
import struct
import subprocess

import openai
import pytest

from conftest import GATEWAY_BIN, OTHER_KEY, TENANT_KEY, _wait_for, backend, config_doc, model
from pg import shared_pg  # noqa: F401 - fixture

EMBED = "text-embedding-3-small"
# 2 USD per million input tokens: a token costs 2 micro-USD.
PRICING = {"inputPerMillionTokens": "2.00", "outputPerMillionTokens": "0"}


def embed_doc(mock, *, broken=None, **extra) -> dict:
    models = [
        model("gpt-4o", [backend(mock)]),
        model(EMBED, [backend(mock)], kind="embeddings", pricing=PRICING, retry={"maxAttempts": 2, "initialBackoffMs": 1, "maxBackoffMs": 5}),
    ]
    if broken is not None:
        models.append(model("embed-flaky", [backend(broken, name="down")], kind="embeddings", fallbacks=[EMBED], retry={"maxAttempts": 1}))
    doc = config_doc(models, **extra)
    for t in doc["tenants"]:
        if t["id"] == "test/limited":
            t["allowedModels"] = ["gpt-4o", EMBED]
            t["rateLimit"] = {"requestsPerMinute": 2}
    return doc


def client(gw, key: str = TENANT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture
def setup(start_mock, start_gateway):
    mock = start_mock("emb")
    gw = start_gateway(embed_doc(mock))
    return gw, mock


def test_sdk_embeddings_every_input_shape(setup):
    gw, mock = setup
    c = client(gw)
    # The SDK asks for base64 by default and decodes it.
    r = c.embeddings.with_raw_response.create(model=EMBED, input=["hello world", "three more words"])
    assert r.headers["x-parley-model"] == EMBED
    assert r.headers["x-parley-backend"] == "primary"
    assert r.headers["x-request-id"]
    assert float(r.headers["x-parley-overhead-ms"]) >= 0
    res = r.parse()
    assert [d.index for d in res.data] == [0, 1]
    assert len(res.data[0].embedding) == 256
    assert res.usage.prompt_tokens == 5 and res.usage.total_tokens == 5
    norm = sum(x * x for x in res.data[0].embedding) ** 0.5
    assert abs(norm - 1) < 1e-4
    # Deterministic: the same input gives the same vector, another input another one.
    again = c.embeddings.create(model=EMBED, input="hello world")
    assert again.data[0].embedding == res.data[0].embedding
    assert again.data[0].embedding != res.data[1].embedding
    # Floats as JSON, with dimensions.
    f = c.embeddings.create(model=EMBED, input="hello", encoding_format="float", dimensions=8)
    assert len(f.data[0].embedding) == 8 and all(isinstance(x, float) for x in f.data[0].embedding)
    # Token arrays, one and many.
    t = c.embeddings.create(model=EMBED, input=[1, 2, 3, 4])
    assert len(t.data) == 1 and t.usage.prompt_tokens == 4
    t = c.embeddings.create(model=EMBED, input=[[1, 2], [3]])
    assert len(t.data) == 2 and t.usage.prompt_tokens == 3
    # base64 passes through untouched: the bytes are the mock's little-endian f32s.
    raw = gw.post("/v1/embeddings", {"model": EMBED, "input": "hi", "encoding_format": "base64", "dimensions": 4})
    assert raw.status_code == 200, raw.text
    vec = struct.unpack("<4f", base64.b64decode(raw.json()["data"][0]["embedding"]))
    assert abs(sum(x * x for x in vec) - 1) < 1e-4


def test_tokens_and_cost_in_metrics_and_ledger(start_mock, start_gateway, shared_pg):
    mock = start_mock("emb")
    gw = start_gateway(embed_doc(mock, chatbot="emb/ledger", usage={"postgresUrl": {"value": shared_pg.url}}))
    c = client(gw)
    total = 0
    for text in ["one two three", "four five", "six"]:
        total += c.embeddings.create(model=EMBED, input=text).usage.prompt_tokens
    assert total == 6 == mock.stats()["prompt_tokens_total"]
    assert gw.metric("parley_tokens_total", tenant="test/acme", model=EMBED, kind="input") == total
    assert gw.metric("parley_tokens_total", tenant="test/acme", model=EMBED, kind="output") == 0
    assert gw.metric("parley_cost_micro_usd_total", tenant="test/acme", model=EMBED) == 2 * total
    assert gw.metric("parley_requests_total", tenant="test/acme", model=EMBED, api="embeddings", status="200") == 3
    # A refused one gets its row too.
    assert gw.post("/v1/embeddings", {"model": "gpt-4o", "input": "x"}).status_code == 400
    _wait_for(lambda: int(shared_pg.scalar("SELECT count(*) FROM parley_usage")) >= 4, 30, "4 ledger rows")
    rows = shared_pg.sql(
        "SELECT api, model, backend, input_tokens, output_tokens, cost_usd, status, stream, chatbot, namespace "
        "FROM parley_usage WHERE status = 200 ORDER BY created_at"
    )
    assert [r[0] for r in rows] == ["embeddings"] * 3
    assert {r[1] for r in rows} == {EMBED} and {r[2] for r in rows} == {"primary"}
    assert [int(r[3]) for r in rows] == [3, 2, 1]
    assert {int(r[4]) for r in rows} == {0}
    assert [r[5] for r in rows] == ["0.000006", "0.000004", "0.000002"]
    assert {r[7] for r in rows} == {"f"} and {(r[9], r[8]) for r in rows} == {("emb", "ledger")}
    refused = shared_pg.sql("SELECT api, requested_model, status, input_tokens FROM parley_usage WHERE status <> 200")
    assert refused == [["embeddings", "gpt-4o", "400", "0"]]


def test_limits_and_quotas_count_embeddings(start_mock, start_gateway):
    mock = start_mock("emb")
    doc = embed_doc(mock)
    doc["tenants"][0]["rateLimit"] = {"tokensPerMinute": 50}
    gw = start_gateway(doc)
    # Requests per minute: the limited tenant gets two.
    limited = client(gw, OTHER_KEY)
    for _ in range(2):
        limited.embeddings.create(model=EMBED, input="hi")
    with pytest.raises(openai.RateLimitError) as e:
        limited.embeddings.create(model=EMBED, input="hi")
    assert e.value.status_code == 429
    assert "requests" in e.value.message and e.value.response.headers.get("retry-after")
    # Input tokens count against tokens per minute: ~100 estimated tokens > 50.
    acme = client(gw)
    with pytest.raises(openai.RateLimitError) as e:
        acme.embeddings.create(model=EMBED, input="word " * 80)
    assert "tokens" in e.value.message
    acme.embeddings.create(model=EMBED, input="short")
    before = mock.stats()["requests_total"]
    assert gw.metric("parley_limit_refusals_total", tenant="test/acme", limit="rate") == 1
    assert mock.stats()["requests_total"] == before


def test_budget_refuses_with_402(start_mock, start_gateway):
    mock = start_mock("emb")
    doc = embed_doc(mock)
    doc["tenants"][0]["budget"] = {"monthlyUsd": "0.00001"}  # 10 micro-USD: 5 tokens
    gw = start_gateway(doc)
    c = client(gw)
    c.embeddings.create(model=EMBED, input="one two three four")  # 8 micro-USD
    with pytest.raises(openai.APIStatusError) as e:
        c.embeddings.create(model=EMBED, input="one two three four five six")
    assert e.value.status_code == 402


def test_retry_fallback_and_faults(start_mock, start_gateway):
    mock = start_mock("emb")
    broken = start_mock("broken")
    broken.config(fail_status=503)
    gw = start_gateway(embed_doc(mock, broken=broken))
    c = client(gw)
    # A 500 from the upstream is retried on the same model.
    mock.config(fail_first=1, fail_status=500)
    r = c.embeddings.with_raw_response.create(model=EMBED, input="retry me")
    assert r.headers["x-parley-model"] == EMBED
    assert mock.stats()["faults_injected"] == 1
    # A model whose backend fails falls back to its embeddings fallback.
    r = c.embeddings.with_raw_response.create(model="embed-flaky", input="fall back")
    assert r.headers["x-parley-model"] == EMBED
    assert broken.stats()["faults_injected"] >= 1
    assert gw.metric("parley_fallbacks_total", requested_model="embed-flaky", model=EMBED) == 1
    # An upstream 400 is passed on; a hang times out into a 5xx, never a hang.
    bad = gw.post("/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 100000})
    assert bad.status_code == 400 and "dimensions" in bad.json()["error"]["message"]
    # Nothing left to try: 502 in the OpenAI shape.
    mock.config(fail_status=500)
    with pytest.raises(openai.InternalServerError) as e:
        c.embeddings.create(model=EMBED, input="x")
    assert e.value.status_code == 502
    assert e.value.body["code"] == "upstream_error"


def test_endpoints_refuse_the_other_kind(setup):
    gw, mock = setup
    before = mock.stats()["requests_total"]
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    msg = e.value.message
    assert f'model "{EMBED}" is an embeddings model' in msg and "/v1/chat/completions serves chat models only" in msg and "/v1/embeddings" in msg
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="gpt-4o", input="hi")
    assert 'model "gpt-4o" is a chat model' in e.value.message and "/v1/embeddings serves embeddings models only" in e.value.message
    r = gw.post("/v1/messages", {"model": EMBED, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert "/v1/messages serves chat models only" in r.json()["error"]["message"]
    r = gw.post("/chat", {"session_id": "s1", "model": EMBED, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "/chat serves chat models only" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=EMBED, input="hi")
    assert "/v1/responses serves chat models only" in e.value.message
    # No model: the default is a chat model, so the embeddings endpoint asks for one.
    r = gw.post("/v1/embeddings", {"input": "hi"})
    assert r.status_code == 400 and "`model` is required" in r.json()["error"]["message"]
    for body, needle in [({"model": EMBED}, "`input` is required"), ({"model": EMBED, "input": []}, "`input` must not be an empty array"), ({"model": EMBED, "input": "x", "encoding_format": "int8"}, "encoding_format")]:
        r = gw.post("/v1/embeddings", body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert gw.post("/v1/embeddings", {"model": "nope", "input": "x"}).status_code == 404
    assert gw.post("/v1/embeddings", {"model": EMBED, "input": "x"}, key="wrong").status_code == 401
    assert mock.stats()["requests_total"] == before, "nothing refused reached the upstream"


def test_models_lists_each_kind(setup):
    gw, _ = setup
    models = {m.id: m.model_extra["kind"] for m in client(gw).models.list()}
    assert models == {"gpt-4o": "chat", EMBED: "embeddings"}
    r = gw.http.get("/v1/models", headers={"x-api-key": TENANT_KEY, "anthropic-version": "2023-06-01"})
    assert {m["id"]: m["kind"] for m in r.json()["data"]} == models


def test_anthropic_embeddings_backend_is_refused_at_load(tmp_path, start_mock):
    mock = start_mock("emb")
    doc = embed_doc(mock)
    doc["models"][1]["backends"][0]["provider"] = "anthropic"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    r = subprocess.run([GATEWAY_BIN, "check", "--config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "models[1].backends[0].provider" in out and "Anthropic has no embeddings API" in out, out
