"""`make chaos`: the fault drills of issue 8, each under a bounded load, on this machine.
Writes CHAOS.md. Not in CI.

Each gateway drill: a fresh parley-mock-llm upstream, a gateway (release build) with the
usage ledger in a private PostgreSQL on a free port, LOAD_THREADS client threads sending
chat completions (every other one `stream: true`) for LOAD_SECONDS, every request with a
CLIENT_TIMEOUT client timeout (a request that times out is "hung"). The fault is injected
after a third of the load and removed after two thirds. Afterwards the gateway is stopped
with SIGTERM (it drains its ledger queue) and the ledger rows are counted: every request
the gateway answered must have a row. The operator drill runs the operator against the
test control plane and SIGKILLs it mid-reconcile.

Everything listens on 127.0.0.1; everything started is stopped at the end, even on failure."""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import httpx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e" / "python"))
from pg import PrivatePostgres, psql  # noqa: E402

RELEASE = REPO / "target" / "release"
LOAD_THREADS = int(os.environ.get("PARLEY_CHAOS_THREADS", "8"))
LOAD_SECONDS = float(os.environ.get("PARLEY_CHAOS_SECONDS", "9"))
CLIENT_TIMEOUT = 15.0
KEY = "pk-chaos-0123456789"
PROCS: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log: pathlib.Path) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in args], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    PROCS.append(p)
    return p


def kill_group(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {url}")


def clear_error(body: bytes) -> bool:
    """A JSON error in the API's shape with a message."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    err = doc.get("error") if isinstance(doc, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and bool(err["message"].strip())


class Load:
    """LOAD_THREADS threads sending requests until stopped; outcomes counted."""

    def __init__(self, url: str):
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.c = {"sent": 0, "ok": 0, "clear_error": 0, "unclear_error": 0, "hung": 0, "refused": 0, "answered": 0}
        self.statuses: dict[str, int] = {}
        self.examples: list[str] = []
        self.refusals: dict[str, int] = {}  # by exception: ConnectError = refused, others = closed unanswered
        self.sigterm_at: float | None = None  # connection errors before it are failures
        self.inflight: set[int] = set()
        self.at_sigterm: dict[int, str] = {}  # requests in flight when SIGTERM was sent -> outcome
        self.seq = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(LOAD_THREADS)]

    def mark_sigterm(self) -> None:
        with self.lock:
            self.sigterm_at = time.monotonic()
            self.at_sigterm = {r: "pending" for r in self.inflight}

    def _count(self, key: str, status=None, example: str | None = None, rid: int | None = None) -> None:
        with self.lock:
            self.c[key] += 1
            if rid is not None:
                self.inflight.discard(rid)
                if rid in self.at_sigterm:
                    self.at_sigterm[rid] = key if status is not None or key == "hung" else f"{key} (no answer)"
            if status is not None:
                self.c["answered"] += 1
                self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            if example and len(self.examples) < 5:
                self.examples.append(example)

    def _one(self, client: httpx.Client, stream: bool, n: int) -> None:
        body = {"model": "gpt-4o", "max_tokens": 16, "stream": stream,
                "messages": [{"role": "user", "content": f"chaos {uuid.uuid4().hex[:8]} {n}"}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        with self.lock:
            self.c["sent"] += 1
            self.seq += 1
            rid = self.seq
            self.inflight.add(rid)
        count = lambda key, status=None, example=None: self._count(key, status, example, rid)
        try:
            with client.stream("POST", self.url, json=body, headers={"authorization": f"Bearer {KEY}"}) as r:
                data = r.read()
                status = r.status_code
        except httpx.TimeoutException:
            count("hung", example="client timeout")
            return
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
            # No (complete) answer: the connection was refused or closed. Only expected
            # after SIGTERM; before it, it is a failure without a clear error.
            with self.lock:
                kind = type(e).__name__
                self.refusals[kind] = self.refusals.get(kind, 0) + 1
            count("refused" if self.sigterm_at is not None else "unclear_error", example=f"{type(e).__name__}: {e}")
            return
        if status >= 300:
            count("clear_error" if clear_error(data) else "unclear_error", status,
                        None if clear_error(data) else f"{status}: {data[:200]!r}")
            return
        if not stream:
            ok = b'"choices"' in data
            count("ok" if ok else "unclear_error", status, None if ok else f"200 without choices: {data[:200]!r}")
            return
        text = data.decode(errors="replace")
        events = [l[5:].strip() for l in text.splitlines() if l.startswith("data:")]
        errors = [e for e in events if e != "[DONE]" and clear_error(e.encode())]
        if errors:
            count("clear_error", status)
        elif events and events[-1] == "[DONE]":
            count("ok", status)
        else:
            count("unclear_error", status, f"stream cut without an error event: {text[-200:]!r}")

    def _run(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
            while not self.stop.is_set():
                self._one(client, stream=(n + i) % 2 == 1, n=n)
                n += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=CLIENT_TIMEOUT + 5)
        return False


class Env:
    """Mock + gateway (+ optional Redis) with the ledger in a database of the private PG."""

    def __init__(self, work: pathlib.Path, pg: PrivatePostgres, name: str, redis_port: int | None = None):
        self.work = work / name
        self.work.mkdir()
        self.pg = pg
        self.db = f"chaos_{name.replace('-', '_')}_{uuid.uuid4().hex[:6]}"
        psql(pg.port, f"CREATE DATABASE {self.db}")
        self.mock_port, self.gw_port, self.admin_port = free_port(), free_port(), free_port()
        self.mock = start([RELEASE / "parley-mock-llm", "--listen", f"127.0.0.1:{self.mock_port}",
                           "--reply-tokens", "12", "--tokens-per-second", "200"], self.work / "mock.log")
        wait_http(f"http://127.0.0.1:{self.mock_port}/healthz")
        redis = f"redis: {{url: {{value: 'redis://127.0.0.1:{redis_port}'}}}}\nrateLimitFailureMode: open\n" if redis_port else ""
        self.config = self.work / "gateway.yaml"
        self.good_config = f"""apiVersion: parley.dev/gateway/v1
listen: 127.0.0.1:{self.gw_port}
adminListen: 127.0.0.1:{self.admin_port}
defaultModel: gpt-4o
{redis}usage: {{postgresUrl: {{value: 'postgres://postgres@127.0.0.1:{pg.port}/{self.db}?sslmode=disable'}}}}
models:
- name: gpt-4o
  backends:
  - name: mock
    provider: openai
    baseUrl: "http://127.0.0.1:{self.mock_port}/v1"
    apiKey: {{value: sk-upstream}}
    timeouts: {{connectMs: 1000, firstTokenMs: 3000, totalMs: 6000}}
  retry: {{maxAttempts: 2}}
  pricing: {{inputPerMillionTokens: "2.50", outputPerMillionTokens: "10.00"}}
tenants:
- id: chaos/tenant
  apiKeys: [{{value: {KEY}}}]
  rateLimit: {{requestsPerMinute: 100000000, tokensPerMinute: 100000000000}}
"""
        self.config.write_text(self.good_config)
        self.gw_log = self.work / "gateway.log"
        self.gateway = start([RELEASE / "parley-gateway", "--config", self.config, "--log-format", "json"], self.gw_log)
        wait_http(f"http://127.0.0.1:{self.admin_port}/readyz")
        self.url = f"http://127.0.0.1:{self.gw_port}/v1/chat/completions"

    def mock_config(self, **cfg) -> None:
        r = httpx.post(f"http://127.0.0.1:{self.mock_port}/_mock/config", json=cfg, timeout=5)
        if r.status_code != 200:
            raise RuntimeError(f"mock config {cfg}: {r.status_code} {r.text}")

    def stop_gateway(self) -> tuple[int | None, float]:
        """SIGTERM; (exit code, seconds to exit)."""
        t0 = time.monotonic()
        if self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
        try:
            rc = self.gateway.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_group(self.gateway)
            rc = None
        return rc, time.monotonic() - t0

    def rows(self) -> int:
        rows = psql(self.pg.port, "SELECT count(*) FROM parley_usage", self.db)
        return int(rows[0][0])

    def close(self) -> None:
        kill_group(self.gateway)
        kill_group(self.mock)


def phases(inject, remove) -> list[str]:
    """Runs inject at 1/3 and remove at 2/3 of the load; notes of what happened."""
    notes = []
    time.sleep(LOAD_SECONDS / 3)
    notes.append(inject() or "")
    time.sleep(LOAD_SECONDS / 3)
    notes.append(remove() or "")
    time.sleep(LOAD_SECONDS / 3)
    return [n for n in notes if n]


def gateway_drill(work, pg, name: str, what: str, inject, remove, *, redis=False, sigterm=False, check=None) -> dict:
    redis_proc = None
    redis_port = free_port() if redis else None
    redis_args = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"] if redis else []
    env = None
    result = {"drill": name, "what": what, "notes": []}
    try:
        if redis:
            redis_proc = start(redis_args, work / f"redis-{name}.log")
            time.sleep(0.3)
        env = Env(work, pg, name, redis_port)
        ctx = {"env": env, "redis_proc": redis_proc, "redis_args": redis_args, "work": work}
        rc = drain = None
        with Load(env.url) as load:
            if sigterm:
                time.sleep(LOAD_SECONDS / 2)
                load.mark_sigterm()
                rc, drain = env.stop_gateway()
                result["notes"].append(f"SIGTERM under load: exit code {rc} after {drain:.2f} s")
                time.sleep(1)
            with load.lock:
                outcomes: dict[str, int] = {}
                for o in load.at_sigterm.values():
                    outcomes[o] = outcomes.get(o, 0) + 1
            if sigterm:
                result["notes"].append(f"{len(load.at_sigterm)} requests in flight when SIGTERM was sent, their outcomes: {outcomes}")
            else:
                result["notes"] += phases(lambda: inject(ctx), lambda: remove(ctx))
        if redis:
            ctx["redis_proc"] and kill_group(ctx["redis_proc"])
        if check:
            result["notes"] += check(ctx)
        if not sigterm:
            rc, drain = env.stop_gateway()
            result["notes"].append(f"graceful stop: exit code {rc} after {drain:.2f} s")
        if not pg_ready(pg):
            pg.start()
        result["notes"].append(log_summary(env.gw_log))
        rows = env.rows()
        c = load.c
        result.update(sent=c["sent"], ok=c["ok"], clear=c["clear_error"], unclear=c["unclear_error"], hung=c["hung"],
                      refused=c["refused"], answered=c["answered"], rows=rows, lost=c["answered"] - rows,
                      statuses=load.statuses, refusals=load.refusals, examples=load.examples, exit=rc)
        result["pass"] = (c["hung"] == 0 and c["unclear_error"] == 0 and rows >= c["answered"] and rc == 0
                          and (sigterm or c["refused"] == 0) and c["sent"] == sum(c[k] for k in ("ok", "clear_error", "unclear_error", "hung", "refused"))
                          and not any(n.startswith("FAIL") for n in result["notes"]))
    except Exception as e:  # noqa: BLE001 - one broken drill must not hide the others
        result.update(pass_=False, error=f"{type(e).__name__}: {e}")
        result["pass"] = False
    finally:
        if env:
            env.close()
        if redis_proc:
            kill_group(redis_proc)
        if ctx_redis := (locals().get("ctx") or {}).get("redis_proc"):
            kill_group(ctx_redis)
    return result


def log_summary(path: pathlib.Path) -> str:
    """The gateway's WARN/ERROR lines: how many, and the distinct messages (first few)."""
    msgs: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if str(doc.get("level", "")).upper() in ("WARN", "ERROR"):
            m = str(doc.get("fields", {}).get("message", doc.get("message", "")))[:160]
            msgs[m] = msgs.get(m, 0) + 1
    if not msgs:
        return "gateway logged no WARN/ERROR"
    top = sorted(msgs.items(), key=lambda kv: -kv[1])[:3]
    return f"gateway WARN/ERROR lines: {sum(msgs.values())}, e.g. " + " | ".join(f"{n}x `{m}`" for m, n in top)


def pg_ready(pg: PrivatePostgres) -> bool:
    from pg import ready
    return ready(pg.port)


# --- the faults -----------------------------------------------------------------------

def upstream(**cfg):
    return (lambda ctx: ctx["env"].mock_config(**cfg), lambda ctx: ctx["env"].mock_config(reset=True))


def kill_redis(ctx):
    kill_group(ctx["redis_proc"])
    return "redis-server SIGKILLed"


def restart_redis(ctx):
    ctx["redis_proc"] = start(ctx["redis_args"], ctx["work"] / "redis-restarted.log")
    return "redis-server restarted on the same port"


def kill_pg(ctx):
    pg = ctx["env"].pg
    pid = int((pg.data / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    # The backends of a SIGKILLed postmaster exit on their own; wait for the port to close.
    deadline = time.time() + 10
    while pg_ready(pg) and time.time() < deadline:
        time.sleep(0.1)
    return f"postmaster (pid {pid}) SIGKILLed"


def restart_pg(ctx):
    pg = ctx["env"].pg
    (pg.data / "postmaster.pid").unlink(missing_ok=True)
    time.sleep(0.5)
    pg.start()
    return "PostgreSQL restarted (crash recovery)"


def garbage_config(ctx):
    env = ctx["env"]
    env.config.write_text("apiVersion: parley.dev/gateway/v1\nlisten: [this is {not valid\n\x00\x01 garbage: ::: }\n")
    return "config file overwritten with garbage"


def restore_config(ctx):
    env = ctx["env"]
    alive = env.gateway.poll() is None
    log = env.gw_log.read_text(errors="replace")
    refused = any(w in log.lower() for w in ("refus", "keeping", "invalid", "reload failed", "not applied"))
    env.config.write_text(env.good_config)
    if not alive:
        return "FAIL: the gateway exited after the garbage config"
    return "gateway still running; the log " + ("names the refused config" if refused else "FAIL: says nothing about the refused config")


# --- the operator drill --------------------------------------------------------------

def operator_drill(work: pathlib.Path) -> dict:
    result = {"drill": "operator SIGKILLed mid-reconcile", "notes": [],
              "what": "config/samples applied, operator SIGKILLed mid-reconcile, restarted; sent = resources, succeeded = Ready, hung = not Ready after 90 s"}
    op_bin = RELEASE / "parley-operator"
    cp_bin = REPO / "target" / "controlplane" / "parley-controlplane"
    procs = []
    try:
        d = work / "controlplane"
        d.mkdir()
        cp = start([cp_bin, "--data-dir", d], work / "controlplane.log")
        procs.append(cp)
        deadline = time.time() + 120
        while not (d / "kubeconfig").exists() or "ready" not in (work / "controlplane.log").read_text(errors="replace"):
            if time.time() > deadline or cp.poll() is not None:
                raise RuntimeError("control plane did not become ready: " + (work / "controlplane.log").read_text(errors="replace")[-1000:])
            time.sleep(0.2)
        env = {**os.environ, "KUBECONFIG": str(d / "kubeconfig")}
        kubectl = lambda *a, **kw: subprocess.run(["kubectl", *a], env=env, capture_output=True, text=True, timeout=60, **kw)
        crds = subprocess.run([op_bin, "crds"], capture_output=True, text=True, check=True).stdout
        r = kubectl("apply", "-f", "-", input=crds)
        if r.returncode:
            raise RuntimeError(f"kubectl apply crds: {r.stderr}")
        kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        kubectl("create", "namespace", "chaos")
        opargs = [op_bin, "run", "--leader-election=false"]
        op = subprocess.Popen([str(a) for a in opargs], env=env, stdout=open(work / "operator.log", "ab"),
                              stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(op)
        time.sleep(2)
        r = kubectl("apply", "-n", "chaos", "-f", str(REPO / "config" / "samples"))
        if r.returncode:
            raise RuntimeError(f"kubectl apply samples: {r.stderr}")
        # SIGKILL as soon as the operator logs that it is reconciling what was just applied.
        t_apply = time.time()
        seen = 0
        while time.time() - t_apply < 10:
            seen = sum(1 for l in (work / "operator.log").read_text(errors="replace").splitlines() if "chaos" in l)
            if seen:
                break
            time.sleep(0.02)
        kill_group(op)
        result["notes"].append(f"operator SIGKILLed {time.time() - t_apply:.2f} s after the samples were applied, "
                               f"{seen} log line(s) about namespace chaos written before (exit {op.returncode})")
        op2 = subprocess.Popen([str(a) for a in opargs], env=env, stdout=open(work / "operator2.log", "ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(op2)
        kinds = ["chatbots.parley.dev", "tenants.parley.dev", "modelroutes.parley.dev"]
        t0 = time.time()
        not_ready: list[str] = []
        while time.time() - t0 < 90:
            not_ready, total = [], 0
            for k in kinds:
                r = kubectl("get", k, "-n", "chaos", "-o", "json")
                for item in json.loads(r.stdout or '{"items": []}').get("items", []):
                    total += 1
                    conds = {c["type"]: c["status"] for c in item.get("status", {}).get("conditions", [])}
                    if conds.get("Ready") != "True":
                        not_ready.append(f"{item['kind']}/{item['metadata']['name']}")
            if total and not not_ready:
                break
            time.sleep(1)
        result["sent"] = total
        result["ok"] = total - len(not_ready)
        result["hung"] = len(not_ready)
        result["notes"].append(f"{total} resources; all Ready {time.time() - t0:.1f} s after the restart" if not not_ready
                               else f"FAIL: not Ready after 90 s: {', '.join(not_ready)}")
        r = kubectl("get", "chatbots.parley.dev", "-n", "chaos", "-o", "jsonpath={.items[*].metadata.name}")
        missing = []
        for bot in r.stdout.split():
            for kind in ("deployment", "service", "configmap"):
                g = kubectl("get", kind, "-n", "chaos", "-l", f"app.kubernetes.io/instance={bot}", "-o", "name")
                if not g.stdout.strip():
                    missing.append(f"{kind} of {bot}")
        result["notes"].append("children of every Chatbot exist (Deployment, Service, ConfigMap)" if not missing
                               else f"FAIL: missing children: {', '.join(missing)}")
        result["pass"] = not not_ready and not missing
    except Exception as e:  # noqa: BLE001
        result["pass"] = False
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        for p in reversed(procs):
            kill_group(p, signal.SIGTERM)
            kill_group(p)
    return result


# --- main ----------------------------------------------------------------------------

DRILLS = [
    ("upstream 429", "mock answers 429 (Retry-After: 1) to every request", upstream(fail_status=429, fail_rate=1.0, retry_after=1), {}),
    ("upstream 5xx", "mock answers 500 to every request", upstream(fail_status=500, fail_rate=1.0), {}),
    ("upstream hang", "mock never answers (hang)", upstream(hang=True), {}),
    ("upstream reset", "mock drops the connection after 3 tokens", upstream(drop_after_tokens=3), {}),
    ("upstream mid-stream error", "mock sends an error event after 3 tokens", upstream(error_event_after_tokens=3), {}),
    ("Redis killed + restarted", "redis-server SIGKILLed, restarted on the same port (rateLimitFailureMode: open)", (kill_redis, restart_redis), {"redis": True}),
    ("PostgreSQL killed + restarted", "the ledger's postmaster SIGKILLed, restarted", (kill_pg, restart_pg), {}),
    ("garbage config under load", "the gateway's config file overwritten with junk, restored later", (garbage_config, restore_config), {}),
    ("SIGTERM under load", "SIGTERM to the gateway mid-load", (None, None), {"sigterm": True}),
]


def main() -> int:
    only = set(sys.argv[1:])
    work = pathlib.Path(tempfile.mkdtemp(prefix="parley-chaos-", dir="/tmp"))
    os.chmod(work, 0o755)
    pg = PrivatePostgres(free_port())
    results = []
    try:
        pg.start()
        for name, what, (inject, remove), kw in DRILLS:
            if only and not any(o.lower() in name.lower() for o in only):
                continue
            print(f"drill: {name} ...", flush=True)
            r = gateway_drill(work, pg, name.split()[0].lower() + f"-{len(results)}", what, inject, remove, **kw)
            r["drill"] = name
            results.append(r)
            print(json.dumps(r), flush=True)
        if not only or any("operator" in o for o in only):
            print("drill: operator ...", flush=True)
            r = operator_drill(work)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        pg.cleanup()
    write_report(results)
    if all(r.get("pass") for r in results):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work}")
    return 0 if all(r.get("pass") for r in results) else 1


def write_report(results: list[dict]) -> None:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    table = [
        "| drill | sent | succeeded | failed, clear error | failed, unclear | hung | refused conn. | answered | ledger rows | rows lost | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        g = lambda k: str(r.get(k, "-"))
        table.append(f"| {r['drill']} | {g('sent')} | {g('ok')} | {g('clear')} | {g('unclear')} | {g('hung')} | {g('refused')} | "
                     f"{g('answered')} | {g('rows')} | {g('lost')} | {'pass' if r.get('pass') else '**FAIL**'} |")
    lines = [
        "# Chaos drills",
        "",
        "Measured by `make chaos` (`scripts/chaos.py`; one drill: `.venv/bin/python scripts/chaos.py redis`). Not in CI.",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, shared with other builds",
        f"- Load per gateway drill: {LOAD_THREADS} client threads for {LOAD_SECONDS:.0f} s, every other request `stream: true`,"
        f" client timeout {CLIENT_TIMEOUT:.0f} s (a timeout counts as hung); fault injected at 1/3, removed at 2/3",
        "- Gateway: release build, ledger in a private PostgreSQL on a free port (`usage.postgresUrl`), backend timeouts"
        " connect 1 s / first token 3 s / total 6 s, `retry.maxAttempts: 2`",
        "- succeeded: 2xx with a complete body (non-stream: `choices`; stream: ends with `[DONE]`);"
        " failed, clear error: non-2xx with a JSON `{\"error\": {\"message\": ...}}`, or a stream carrying such an error event;"
        " failed, unclear: anything else (must be 0); refused conn.: connection refused/closed before an answer (only expected after SIGTERM);"
        " rows lost = answered - ledger rows after a graceful stop (must be 0)",
        "",
        *table,
        "",
        "What each drill checked:",
        "",
    ]
    for r in results:
        detail = "; ".join(r.get("notes", []))
        if r.get("statuses"):
            detail += f"; statuses {r['statuses']}"
        if r.get("refusals"):
            detail += f"; no answer, by client exception (ConnectError = refused, RemoteProtocolError = closed without an answer) {r['refusals']}"
        if r.get("examples"):
            detail += f"; examples: {r['examples'][:2]}"
        if r.get("error"):
            detail += f"; ERROR: {r['error']}"
        lines.append(f"- **{r['drill']}** ({r.get('what') or 'see notes'}): {detail}")
    text = "\n".join(lines) + "\n"
    (REPO / "CHAOS.md").write_text(text)
    print("\n".join(table))


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        for p in PROCS:
            kill_group(p)
