"""The Parley demo: render the sample Chatbot, run its gateway against fake upstreams,
and chat through it with curl. Everything listens on 127.0.0.1 and stops at the end."""
import json
import os
import pathlib
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = REPO / "target" / "debug"
PROCESSES: list[subprocess.Popen] = []


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list, log: pathlib.Path) -> subprocess.Popen:
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)
    PROCESSES.append(process)
    return process


def wait_http(url: str, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {url}")


def curl(*args: str, show_headers: bool = False) -> str:
    command = ["curl", "-sS", *(["-D", "-"] if show_headers else []), *args]
    print("$ " + " ".join(shlex.quote(a) for a in command), flush=True)
    out = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    print(out.strip(), flush=True)
    return out


def main() -> int:
    work = pathlib.Path(tempfile.mkdtemp(prefix="parley-demo-"))
    say("rendering config/samples with parley-operator render")
    rendered = subprocess.run(
        [BIN / "parley-operator", "render", "-f", REPO / "config/samples"],
        check=True, capture_output=True, text=True,
    ).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    for o in objects:
        print(f"  {o['kind']}/{o['metadata']['name']}")
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["config.yaml"])

    say("starting two fake upstreams (parley-mock-llm): an OpenAI-compatible one and an Anthropic one")
    openai_port, anthropic_port = free_port(), free_port()
    start([BIN / "parley-mock-llm", "--listen", f"127.0.0.1:{openai_port}", "--name", "mock-openai",
           "--tokens-per-second", "200"], work / "mock-openai.log")
    start([BIN / "parley-mock-llm", "--listen", f"127.0.0.1:{anthropic_port}", "--name", "mock-anthropic",
           "--tokens-per-second", "200"], work / "mock-anthropic.log")
    wait_http(f"http://127.0.0.1:{openai_port}/healthz")
    wait_http(f"http://127.0.0.1:{anthropic_port}/healthz")

    say("pointing the rendered GatewayConfig at them (one local gateway: no Redis, no PostgreSQL)")
    for model in config["models"]:
        for backend in model["backends"]:
            port = anthropic_port if backend["provider"] == "anthropic" else openai_port
            print(f"  {model['name']}/{backend['name']}: {backend['baseUrl']} -> http://127.0.0.1:{port}/v1")
            backend["baseUrl"] = f"http://127.0.0.1:{port}/v1"
    port, admin_port = free_port(), free_port()
    config.update(listen=f"127.0.0.1:{port}", adminListen=f"127.0.0.1:{admin_port}",
                  secretsDir=str(work / "secrets"), redis=None, usage=None)

    say("writing the sample Secrets as files, as the projected volume would")
    for doc in yaml.safe_load_all((REPO / "config/samples/00-secrets.yaml").read_text()):
        for key, value in (doc or {}).get("stringData", {}).items():
            path = work / "secrets" / doc["metadata"]["name"] / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value)
    globex_key = "pk-globex-" + secrets.token_hex(12)   # what the Tenant controller generates
    (work / "secrets/globex-api-key").mkdir(parents=True)
    (work / "secrets/globex-api-key/api-key").write_text(globex_key)
    print(f"  {work / 'secrets'}")
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    say("checking and starting parley-gateway")
    subprocess.run([BIN / "parley-gateway", "check", "--config", config_path], check=True)
    start([BIN / "parley-gateway", "--config", config_path], work / "gateway.log")
    wait_http(f"http://127.0.0.1:{admin_port}/readyz")
    base = f"http://127.0.0.1:{port}"
    acme = "Authorization: Bearer pk-acme-REPLACE-ME"
    json_type = "content-type: application/json"

    say("models Acme may use")
    curl(f"{base}/v1/models", "-H", acme)

    say("an OpenAI-style chat completion for gpt-4o")
    curl(f"{base}/v1/chat/completions", "-H", acme, "-H", json_type, "-d", json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello, who are you?"}]}), show_headers=True)

    say("the same, streamed (server-sent events as they arrive)")
    curl("-N", f"{base}/v1/chat/completions", "-H", acme, "-H", json_type, "-d", json.dumps(
        {"model": "gpt-4o", "stream": True, "max_tokens": 5,
         "messages": [{"role": "user", "content": "Stream five words"}]}))

    say("the Anthropic Messages API in front of an OpenAI backend (translated both ways)")
    curl(f"{base}/v1/messages", "-H", "x-api-key: pk-acme-REPLACE-ME", "-H", "anthropic-version: 2023-06-01",
         "-H", json_type, "-d", json.dumps(
             {"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi there"}]}))

    say("the OpenAI upstream starts answering 429: gpt-4o falls back to gpt-4o-mini, then claude-sonnet")
    curl(f"http://127.0.0.1:{openai_port}/_mock/config", "-H", json_type, "-d", json.dumps(
        {"fail_status": 429, "fail_rate": 1.0, "retry_after": 30}))
    curl(f"{base}/v1/chat/completions", "-H", acme, "-H", json_type, "-d", json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Are you still there?"}]}), show_headers=True)
    curl(f"http://127.0.0.1:{openai_port}/_mock/config", "-H", json_type, "-d", json.dumps({"reset": True}))

    say("a /chat session: the gateway keeps the history and the system prompt")
    for turn in ["My name is Ada.", "What did I just tell you?"]:
        curl(f"{base}/chat", "-H", f"Authorization: Bearer {globex_key}", "-H", json_type, "-d", json.dumps(
            {"session_id": "demo-1", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": turn}]}))

    say("the official openai and anthropic Python SDKs, pointed at the gateway")
    import anthropic
    import openai
    chat = openai.OpenAI(base_url=f"{base}/v1", api_key="pk-acme-REPLACE-ME", max_retries=0)
    print('>>> openai.OpenAI(base_url="%s/v1", api_key=KEY).chat.completions.create(model="gpt-4o", ...)' % base)
    completion = chat.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hello from the openai SDK"}])
    print(f"    {completion.choices[0].message.content!r} ({completion.usage.total_tokens} tokens)")
    messages = anthropic.Anthropic(base_url=base, api_key="pk-acme-REPLACE-ME", max_retries=0)
    print('>>> anthropic.Anthropic(base_url="%s", api_key=KEY).messages.create(model="claude-sonnet", ...)' % base)
    message = messages.messages.create(
        model="claude-sonnet", max_tokens=64, messages=[{"role": "user", "content": "Hello from the anthropic SDK"}])
    print(f"    {message.content[0].text!r} (stop_reason {message.stop_reason})")

    say("Globex may not use gpt-4o, and a wrong key is refused")
    curl(f"{base}/v1/chat/completions", "-H", f"Authorization: Bearer {globex_key}", "-H", json_type, "-d",
         json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
    curl(f"{base}/v1/chat/completions", "-H", "Authorization: Bearer wrong", "-H", json_type, "-d",
         json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))

    say("a few of the gateway's metrics")
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        lines = [l for l in r.read().decode().splitlines()
                 if l.startswith(("parley_requests_total", "parley_tokens_total", "parley_config_hash"))]
    print("\n".join(lines[:12]))
    say(f"done; logs are in {work}")
    return 0


def stop_all() -> None:
    for process in PROCESSES:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in PROCESSES:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
