"""Streaming latency, config reload and SIGTERM draining."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from conftest import TENANT_KEY, backend, config_doc, model, write_config

MSG = [{"role": "user", "content": "hi"}]


def stream_arrivals(url: str, body: dict, headers: dict, out: list, start: threading.Barrier) -> None:
    """Records (time, text) of every content delta as it arrives."""
    with httpx.Client(timeout=30) as c:
        start.wait()
        with c.stream("POST", url, json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("choices") and data["choices"][0]["delta"].get("content"):
                    out.append((time.monotonic(), data["choices"][0]["delta"]["content"]))


def test_tokens_reach_the_client_as_the_upstream_sends_them(start_mock, start_gateway):
    mock = start_mock("slow", "--tokens-per-second", "8", "--reply-tokens", "8")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)])]))
    body = {"model": "gpt-4o", "messages": MSG, "stream": True}
    direct, via = [], []
    barrier = threading.Barrier(2)
    threads = [
        threading.Thread(target=stream_arrivals, args=(f"{mock.base_url}/chat/completions", body,
                                                        {"authorization": "Bearer upstream"}, direct, barrier)),
        threading.Thread(target=stream_arrivals, args=(f"{gw.url}/v1/chat/completions", body,
                                                        {"authorization": f"Bearer {TENANT_KEY}"}, via, barrier)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [t for _, t in direct] == [t for _, t in via]
    assert len(via) == 8
    # The mock paces tokens 125 ms apart; through the gateway each token must arrive
    # within a few ms of the same token sent straight from the mock. Buffering (even of
    # one event) would show as a delay of >= 125 ms.
    delays = [v - d for (d, _), (v, _) in zip(direct, via)]
    assert max(delays[1:]) < 0.05, delays
    gaps = [b - a for (a, _), (b, _) in zip(via, via[1:])]
    assert min(gaps) > 0.08, f"tokens arrived bunched: {gaps}"


def test_reload_adds_a_model_without_failing_in_flight_requests(start_mock, start_gateway):
    mock = start_mock("m", "--tokens-per-second", "10", "--reply-tokens", "15")
    doc = config_doc([model("gpt-4o", [backend(mock)])])
    gw = start_gateway(doc)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0, timeout=30)
    assert gw.post("/v1/chat/completions", {"model": "new-model", "messages": MSG}).status_code == 404
    result: dict = {}

    def long_stream():
        try:
            result["text"] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="gpt-4o", messages=MSG, stream=True) if c.choices)
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.3)
    before = gw.metric("parley_config_reloads_total", result="success")
    doc2 = json.loads(json.dumps(doc))
    doc2["models"].append(model("new-model", [backend(mock, name="n")]))
    write_config(gw.config_path, doc2)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = gw.post("/v1/chat/completions", {"model": "new-model", "messages": MSG})
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    assert r.headers["x-parley-model"] == "new-model"
    assert gw.metric("parley_config_reloads_total", result="success") == before + 1
    t.join(10)
    assert "error" not in result, result
    assert len(result["text"].split()) == 15
    assert gw.proc.alive()

    # A broken file is refused; the old config keeps serving.
    write_config(gw.config_path, "apiVersion: parley.dev/gateway/v1\nmodels: [oops\n")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and gw.metric("parley_config_reloads_total", result="failure") < 1:
        time.sleep(0.05)
    assert gw.metric("parley_config_reloads_total", result="failure") == 1
    assert "new config refused" in gw.proc.stderr()
    assert gw.post("/v1/chat/completions", {"model": "new-model", "messages": MSG}).status_code == 200
    assert httpx.get(f"{gw.admin}/readyz").status_code == 200
    # Invalid but well-formed (a fallback cycle) is refused too, naming the problem.
    bad = json.loads(json.dumps(doc2))
    bad["models"][0]["fallbacks"] = ["new-model"]
    bad["models"][1]["fallbacks"] = ["gpt-4o"]
    write_config(gw.config_path, bad)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "cycle" not in gw.proc.stderr():
        time.sleep(0.05)
    assert "cycle" in gw.proc.stderr()
    assert gw.post("/v1/chat/completions", {"model": "new-model", "messages": MSG}).status_code == 200


def test_kubernetes_symlink_swap_and_secret_rotation(start_mock, start_gateway, tmp_path):
    """A ConfigMap/Secret volume: `config.yaml -> ..data/config.yaml`, `..data -> ..v1`,
    updated by pointing `..data` at a new directory."""
    mock = start_mock("m")
    vol = tmp_path / "vol"
    (vol / "..v1").mkdir(parents=True)
    (vol / "..v1" / "key").write_text("sk-first\n")
    doc = config_doc([model("gpt-4o", [backend(mock)])])
    doc["tenants"].append({"id": "test/file", "apiKeys": [{"file": "key"}]})
    doc["secretsDir"] = str(vol)
    (vol / "..v1" / "config.yaml").write_text(json.dumps(doc))
    (vol / "..data").symlink_to("..v1")
    (vol / "config.yaml").symlink_to("..data/config.yaml")
    (vol / "key").symlink_to("..data/key")
    gw = start_gateway(doc)
    # Restart the gateway on the volume itself.
    gw.proc.stop()
    from conftest import GATEWAY_BIN, Proc, Gateway, _wait_for
    proc = Proc([GATEWAY_BIN, "--config", str(vol / "config.yaml"), "--log-format", "json", "--poll-seconds", "30"], tmp_path, "gw-vol")
    try:
        def serving():
            for line in proc.stderr().splitlines():
                if '"parley-gateway serving"' in line:
                    rec = json.loads(line)
                    return rec["listen"], rec["admin"]
            return None
        listen, admin = _wait_for(serving, 10, "gateway")
        g = Gateway(proc, vol / "config.yaml", listen, admin)
        assert g.post("/v1/chat/completions", {"messages": MSG}, key="sk-first").status_code == 200
        # The kubelet's update: new dir, atomic rename of a new ..data symlink.
        (vol / "..v2").mkdir()
        (vol / "..v2" / "key").write_text("sk-second\n")
        doc2 = json.loads(json.dumps(doc))
        doc2["models"].append(model("added", [backend(mock, name="a")]))
        (vol / "..v2" / "config.yaml").write_text(json.dumps(doc2))
        (vol / "..data_tmp").symlink_to("..v2")
        (vol / "..data_tmp").rename(vol / "..data")
        # The watcher (not the 30 s poll) must pick it up.
        _wait_for(lambda: g.post("/v1/chat/completions", {"model": "added", "messages": MSG}, key="sk-second").status_code == 200,
                  5, "reload after the symlink swap")
        assert g.post("/v1/chat/completions", {"messages": MSG}, key="sk-first").status_code == 401
    finally:
        proc.stop()


def test_sigterm_drains_streams_and_refuses_new_connections(start_mock, start_gateway):
    mock = start_mock("m", "--tokens-per-second", "10", "--reply-tokens", "20")
    gw = start_gateway(config_doc([model("gpt-4o", [backend(mock)])]), "--drain-seconds", "20")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TENANT_KEY, max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
    tokens = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            tokens.append(chunk.choices[0].delta.content)
            if len(tokens) == 3:
                gw.proc.signal(signal.SIGTERM)
                time.sleep(0.3)
                host, port = gw.addr.split(":")
                with pytest.raises(OSError):
                    socket.create_connection((host, int(port)), timeout=2).close()
                assert httpx.get(f"{gw.admin}/readyz").status_code == 503
    assert len(tokens) == 20, "the stream completed after SIGTERM"
    assert gw.proc.popen.wait(timeout=10) == 0
    assert mock.stats()["streams_completed"] == 1


def test_not_ready_until_a_valid_config_is_loaded(start_mock, start_gateway):
    mock = start_mock("m")
    broken = ("apiVersion: parley.dev/gateway/v1\nlisten: 127.0.0.1:0\nadminListen: 127.0.0.1:0\n"
              "defaultModel: gpt-4o\nmodels: []\n")
    gw = start_gateway(broken, wait_ready=False)
    assert httpx.get(f"{gw.admin}/readyz").status_code == 503
    assert httpx.get(f"{gw.admin}/healthz").status_code == 200
    r = gw.post("/v1/chat/completions", {"messages": MSG})
    assert r.status_code == 503 and "no valid configuration" in r.json()["error"]["message"]
    assert gw.metric("parley_config_reloads_total", result="failure") == 1
    assert "config invalid" in gw.proc.stderr()
    write_config(gw.config_path, config_doc([model("gpt-4o", [backend(mock)])]))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and httpx.get(f"{gw.admin}/readyz").status_code != 200:
        time.sleep(0.05)
    assert httpx.get(f"{gw.admin}/readyz").status_code == 200
    assert gw.post("/v1/chat/completions", {"messages": MSG}).status_code == 200
