"""The gateway image, run the way the operator's Deployment runs it (read-only root,
user 65532, no capabilities, the ConfigMap at /etc/parley and the Secret keys under
/var/run/parley/secrets as the kubelet lays them out), in front of the mock image."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from conftest import TENANT_KEY, docker, openai_backend, wait_for

MSG = [{"role": "user", "content": "hello from the image test"}]


def test_serves_chat_and_stream_through_the_mock(start_mock, start_gateway):
    mock = start_mock()
    # `localhost`, not 127.0.0.1: the static binary resolves names (here from /etc/hosts).
    gw = start_gateway([{"name": "gpt-4o", "backends": [openai_backend(f"http://localhost:{mock.port}/v1")]}])
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0, timeout=30)

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert raw.headers["x-parley-model"] == "gpt-4o"
    assert raw.headers["x-parley-backend"] == "primary"
    reply = raw.parse()
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert mock.stats()["requests_total"] == 2

    # A wrong tenant key is refused by the gateway, not passed on.
    bad = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-not-a-tenant", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="gpt-4o", messages=MSG)
    assert mock.stats()["requests_total"] == 2
    # Secrets never reach the logs; the CA bundle was readable by user 65532.
    logs = gw.container.logs()
    assert "no system CA certificates" not in logs, logs
    assert TENANT_KEY not in logs and "sk-upstream-imgtest" not in logs


def test_reloads_when_the_mounted_config_changes(start_mock, start_gateway):
    mock = start_mock()
    gw = start_gateway([{"name": "gpt-4o", "backends": [openai_backend(f"http://127.0.0.1:{mock.port}/v1")]}])
    headers = {"authorization": f"Bearer {TENANT_KEY}"}
    body = {"model": "gpt-4o-mini", "messages": MSG}
    assert gw.http.post("/v1/chat/completions", json=body, headers=headers).status_code == 404
    before = gw.metric("parley_config_reloads_total", result="success")

    doc = json.loads(json.dumps(gw.doc))
    doc["models"].append({"name": "gpt-4o-mini", "backends": [openai_backend(f"http://127.0.0.1:{mock.port}/v1")]})
    gw.config.write({"config.yaml": json.dumps(doc, indent=2)})  # the kubelet's ..data swap

    wait_for(lambda: gw.http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200,
             15, "the gateway to serve the model the new config adds")
    assert gw.metric("parley_config_reloads_total", result="success") > before

    # An invalid config is refused and the running one keeps serving.
    gw.config.write({"config.yaml": "apiVersion: parley.dev/gateway/v1\nnotAField: 1\n"})
    wait_for(lambda: gw.metric("parley_config_reloads_total", result="failure") >= 1, 15, "the refused reload")
    assert gw.http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
    assert gw.container.running()


def test_drains_an_in_flight_stream_on_docker_stop(start_mock, start_gateway):
    # 20 tokens at 10 per second: the stream is still running when the stop arrives.
    mock = start_mock("--tokens-per-second", "10", "--reply-tokens", "20")
    gw = start_gateway([{"name": "gpt-4o", "backends": [openai_backend(f"http://127.0.0.1:{mock.port}/v1")]}])
    body = {"model": "gpt-4o", "messages": MSG, "stream": True}
    first_token = threading.Event()
    result: dict = {"tokens": 0, "done": False}

    def stream():
        try:
            with httpx.Client(timeout=30) as c, c.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                                                         headers={"authorization": f"Bearer {TENANT_KEY}"}) as r:
                result["status"] = r.status_code
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        result["done"] = True
                    elif line.startswith("data: "):
                        d = json.loads(line[6:])
                        if d.get("choices") and d["choices"][0]["delta"].get("content"):
                            result["tokens"] += 1
                            first_token.set()
        except Exception as e:  # noqa: BLE001
            result["error"] = repr(e)
            first_token.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first_token.wait(15), "no token arrived"
    started = time.monotonic()
    stop = threading.Thread(target=lambda: result.__setitem__("stop", gw.container.stop(timeout=30)))
    stop.start()
    # Once the gateway has the SIGTERM, it takes no new connections...
    wait_for(lambda: "shutting down" in gw.container.logs(), 10, "the gateway to log the SIGTERM")
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG},
                   headers={"authorization": f"Bearer {TENANT_KEY}"}, timeout=5)
    # ...but the stream in flight runs to its end.
    t.join(30)
    stop.join(60)
    assert "error" not in result, result
    assert result["status"] == 200 and result["tokens"] == 20 and result["done"], result
    assert time.monotonic() - started < 25, "docker stop waited for its timeout (SIGKILL) instead of the drain"
    assert gw.container.exit_code() == 0, gw.container.logs()
    assert '"stopped"' in gw.container.logs()


def test_without_args_serves_the_config_mounted_at_etc_parley(start_mock, start_gateway):
    mock = start_mock()
    gw = start_gateway([{"name": "gpt-4o", "backends": [openai_backend(f"http://127.0.0.1:{mock.port}/v1")]}], args=[])
    r = gw.http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG},
                     headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert r.status_code == 200, r.text


def test_check_names_the_missing_config(images, run):
    """PARLEY_CONFIG is /etc/parley/config.yaml in the image; without the volume, `check`
    says which file is missing."""
    c = run(images["gateway"], "check")
    wait_for(lambda: not c.running(), 20, "`check` to exit")
    assert c.exit_code() != 0
    assert "/etc/parley/config.yaml" in c.logs()

