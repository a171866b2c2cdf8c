"""`make bench`: parley-gateway against a bare nginx `proxy_pass`, in one run, in front of
the same parley-mock-llm upstream, on this machine. Writes BENCHMARKS.md.

Everything listens on 127.0.0.1; every load is bounded in time and stops by itself."""
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
RELEASE = REPO / "target" / "release"
TOOLS = REPO / "target" / "tools"
DURATION = int(os.environ.get("PARLEY_BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("PARLEY_BENCH_CONNECTIONS", "32"))
RATE = int(os.environ.get("PARLEY_BENCH_RATE", "1000"))
KEY = "pk-bench-0123456789"
BODY = json.dumps({"model": "gpt-4o", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "Say something short please"}]})
PROCESSES: list[subprocess.Popen] = []


def nginx_conf(work: pathlib.Path, mock_port: int, nginx_port: int, head: str = "") -> str:
    """A bare nginx `proxy_pass` to the mock (one worker, upstream keepalive, no log)."""
    return f"""{head}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
  upstream mock {{ server 127.0.0.1:{mock_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{nginx_port};
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


# A section's hand-written notes (what a run's numbers mean, how they got there) sit between
# these lines; a rerun replaces the section's measured lines and keeps its notes after them.
NOTES_BEGIN = "<!-- notes: written by hand, kept when the bench scripts rewrite this section -->"
NOTES_END = "<!-- /notes -->"


def section_notes(section: list[str]) -> list[str]:
    """The notes block of a section's lines, markers included (empty if it has none)."""
    try:
        begin = section.index(NOTES_BEGIN)
        end = section.index(NOTES_END, begin)
    except ValueError:
        return []
    return section[begin:end + 1]


def write_section(title: str, lines: list[str]) -> None:
    """Replaces (or appends) the `## ` section `title` of BENCHMARKS.md by `lines`, keeping
    the section's notes (see `NOTES_BEGIN`)."""
    path = REPO / "BENCHMARKS.md"
    existing = path.read_text().splitlines() if path.exists() else []
    start_i = next((i for i, l in enumerate(existing) if l.strip() == title), None)
    if start_i is None:
        out = existing + ([""] if existing else []) + lines
    else:
        end_i = next((i for i in range(start_i + 1, len(existing)) if existing[i].startswith("## ")), len(existing))
        notes = section_notes(existing[start_i:end_i])
        lines = lines + ([""] + notes if notes else [])
        out = existing[:start_i] + lines + ([""] + existing[end_i:] if end_i < len(existing) else [])
    path.write_text("\n".join(out) + "\n")
    print("\n".join(lines))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in args], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    PROCESSES.append(p)
    return p


def wait_http(url, headers=None, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {url}")


def wrk(url, work: pathlib.Path, auth=True) -> dict:
    script = work / "post.lua"
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {KEY}"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(BODY)}\n"
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=DURATION + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "non2xx": int(non2xx.group(1)) if non2xx else 0, "raw": out}


def vegeta(url, work: pathlib.Path, auth=True) -> dict:
    body = work / "body.json"
    body.write_text(BODY)
    target = f"POST {url}\nContent-Type: application/json\n"
    if auth:
        target += f"Authorization: Bearer {KEY}\n"
    target += f"@{body}\n"
    (work / "target.txt").write_text(target)
    attack = subprocess.run(
        [TOOLS / "vegeta", "attack", "-targets", work / "target.txt", "-rate", f"{RATE}/s",
         "-duration", f"{DURATION}s", "-keepalive=true", "-max-workers", "256"],
        capture_output=True, timeout=DURATION + 60,
    ).stdout
    report = subprocess.run(
        [TOOLS / "vegeta", "report", "-type", "json"], input=attack, capture_output=True, timeout=60,
    ).stdout
    r = json.loads(report)
    ms = lambda ns: ns / 1e6
    return {"p50": ms(r["latencies"]["50th"]), "p99": ms(r["latencies"]["99th"]), "mean": ms(r["latencies"]["mean"]),
            "max": ms(r["latencies"]["max"]), "success": r["success"], "rate": r["throughput"]}


def overhead_metric(admin_port) -> tuple[float, float]:
    """`parley_overhead_seconds` (sum, count) as the gateway exports it now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    d = dict(re.findall(r'parley_overhead_seconds_(sum|count)(?:\{[^}]*\})? ([\d.e+-]+)', metrics))
    return float(d.get("sum", 0)), float(d.get("count", 0))


def rss_mib(pid) -> tuple[float, float]:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    get = lambda k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) / 1024
    return get("VmRSS"), get("VmHWM")


def main() -> int:
    work = pathlib.Path(tempfile.mkdtemp(prefix="parley-bench-"))
    mock_port, nginx_port, gw_port, admin_port = (free_port() for _ in range(4))
    start([RELEASE / "parley-mock-llm", "--listen", f"127.0.0.1:{mock_port}", "--reply-tokens", "16"],
          work / "mock.log")
    wait_http(f"http://127.0.0.1:{mock_port}/healthz")

    (work / "nginx.conf").write_text(nginx_conf(work, mock_port, nginx_port))
    start(["nginx", "-c", work / "nginx.conf", "-g", "daemon off;"], work / "nginx.log")

    (work / "gateway.yaml").write_text(f"""
apiVersion: parley.dev/gateway/v1
listen: 127.0.0.1:{gw_port}
adminListen: 127.0.0.1:{admin_port}
defaultModel: gpt-4o
models:
- name: gpt-4o
  backends:
  - {{name: mock, provider: openai, baseUrl: "http://127.0.0.1:{mock_port}/v1", apiKey: {{value: sk-upstream}}}}
  pricing: {{inputPerMillionTokens: "2.50", outputPerMillionTokens: "10.00"}}
tenants:
- id: bench/tenant
  apiKeys: [{{value: {KEY}}}]
  rateLimit: {{requestsPerMinute: 100000000, tokensPerMinute: 100000000000}}
  budget: {{monthlyUsd: "100000000.00"}}
""")
    gateway = start([RELEASE / "parley-gateway", "--config", work / "gateway.yaml", "--log-format", "json"],
                    work / "gateway.log")
    wait_http(f"http://127.0.0.1:{admin_port}/readyz")
    wait_http(f"http://127.0.0.1:{nginx_port}/healthz")
    idle_rss, _ = rss_mib(gateway.pid)

    url = lambda port: f"http://127.0.0.1:{port}/v1/chat/completions"
    results = {}
    for name, port in [("mock (direct)", mock_port), ("nginx proxy_pass", nginx_port), ("parley-gateway", gw_port)]:
        print(f"throughput: {name} ...", flush=True)
        results[name] = {"wrk": wrk(url(port), work)}
        time.sleep(1)
    for name, port in [("mock (direct)", mock_port), ("nginx proxy_pass", nginx_port), ("parley-gateway", gw_port)]:
        print(f"latency at {RATE} rps: {name} ...", flush=True)
        before = overhead_metric(admin_port)
        results[name]["vegeta"] = vegeta(url(port), work)
        after = overhead_metric(admin_port)
        if name == "parley-gateway":
            # The overhead the gateway reports over exactly this run (no saturation).
            n = after[1] - before[1]
            results[name]["overhead_mean"] = (after[0] - before[0]) / n * 1000 if n else float("nan")
            results[name]["overhead_count"] = n
        time.sleep(1)
    rss, hwm = rss_mib(gateway.pid)

    nginx, gw, direct = results["nginx proxy_pass"], results["parley-gateway"], results["mock (direct)"]
    ratio = gw["wrk"]["rps"] / nginx["wrk"]["rps"] * 100
    added_p50 = gw["vegeta"]["p50"] - direct["vegeta"]["p50"]
    added_p99 = gw["vegeta"]["p99"] - direct["vegeta"]["p99"]
    added_mean = gw["vegeta"]["mean"] - direct["vegeta"]["mean"]
    reported = gw.get("overhead_mean", float("nan"))
    agree = reported > 0 and added_mean > 0 and 0.5 <= added_mean / reported <= 2.0
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = [
        "# Benchmarks",
        "",
        "Measured by `make bench` (`scripts/bench.py`); rerun it to refresh this file. The machine is",
        "shared and noisy: compare numbers of one run with each other, not across runs.",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}",
        f"- Upstream: `parley-mock-llm` (release), non-streaming OpenAI chat completion, 16-token reply",
        f"- Gateway: release build, one tenant with API-key auth, rate limits, budget and pricing on,",
        f"  Prometheus metrics on, in-process limiter (no Redis)",
        f"- nginx: `worker_processes 1`, `proxy_pass` with upstream keepalive, access log off",
        f"- Throughput: `wrk -t1 -c{CONNECTIONS} -d{DURATION}s` POST; latency: `vegeta attack -rate {RATE}/s -duration {DURATION}s`",
        "",
        "| target | throughput (req/s) | non-2xx | p50 at {r} rps (ms) | p99 at {r} rps (ms) | success |".format(r=RATE),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        v = r["vegeta"]
        lines.append(f"| {name} | {r['wrk']['rps']:.0f} | {r['wrk']['non2xx']} | {v['p50']:.3f} | {v['p99']:.3f} | {v['success'] * 100:.1f} % |")
    lines += [
        "",
        f"- parley-gateway throughput = **{ratio:.0f} % of nginx** (bar: 55 %)",
        f"- added latency at {RATE} rps over the direct upstream: p50 **{added_p50:+.3f} ms**, p99 **{added_p99:+.3f} ms** (bar: p99 < 1 ms; a p99 of a 10 s run on a shared 2-core machine moves by about a millisecond from run to run)",
        f"- gateway memory: {idle_rss:.1f} MiB RSS idle, {rss:.1f} MiB after the runs, peak {hwm:.1f} MiB (bar: < 64 MiB)",
    ]
    if added_mean > 0 and reported > 0:
        lines.append(
            f"- overhead the gateway reports (`parley_overhead_seconds`, mean over the {RATE} rps run, "
            f"{gw['overhead_count']:.0f} requests) **{reported:.3f} ms** vs added mean latency measured "
            f"over the direct upstream **{added_mean:+.3f} ms**: ratio {added_mean / reported:.2f} "
            f"({'agree' if agree else 'DO NOT agree'} within a factor of two; bar: 0.5-2)")
    else:
        lines.append(f"- overhead the gateway reports {reported:.3f} ms vs added mean latency {added_mean:+.3f} ms: "
                     "too small to compare on this run (noise)")
    # This run owns the top of the file; the sections other benchmarks write (`## ...`,
    # e.g. `make bench-scale`) are kept as they are.
    path = REPO / "BENCHMARKS.md"
    existing = path.read_text().splitlines() if path.exists() else []
    kept = next((existing[i:] for i, l in enumerate(existing) if l.startswith("## ")), [])
    path.write_text("\n".join(lines + ([""] + kept if kept else [])) + "\n")
    print("\n".join(lines))
    redis_store(work, mock_port)
    return 0


REDIS_SECTION = "## Redis store"
REDIS_ROUNDS = int(os.environ.get("PARLEY_BENCH_REDIS_ROUNDS", "3"))


def redis_info(port) -> dict:
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "all"], capture_output=True, text=True,
                         timeout=10).stdout
    return dict(l.split(":", 1) for l in out.splitlines() if ":" in l and not l.startswith("#"))


def proc_cpu_secs(pid) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_store(work: pathlib.Path, mock_port: int) -> None:
    """`## Redis store`: the same gateway config with the in-process store and with a
    private Redis (one redis-server on a free port, no persistence), measured in the same
    run, alternating rounds; writes that section of BENCHMARKS.md."""
    load = os.getloadavg()
    redis_port = free_port()
    start(["redis-server", "--port", redis_port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", work], work / "redis.log")
    deadline = time.time() + 10
    while subprocess.run(["redis-cli", "-p", str(redis_port), "ping"], capture_output=True,
                         text=True).stdout.strip() != "PONG":
        if time.time() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.1)
    gateways = {}
    for name, extra in [("in-process", ""), ("redis", f"redis: {{url: {{value: \"redis://127.0.0.1:{redis_port}\"}}}}\n")]:
        port, admin = free_port(), free_port()
        cfg = work / f"gateway-{name}.yaml"
        cfg.write_text(f"""
apiVersion: parley.dev/gateway/v1
chatbot: bench/redis
listen: 127.0.0.1:{port}
adminListen: 127.0.0.1:{admin}
defaultModel: gpt-4o
models:
- name: gpt-4o
  backends:
  - {{name: mock, provider: openai, baseUrl: "http://127.0.0.1:{mock_port}/v1", apiKey: {{value: sk-upstream}}}}
  pricing: {{inputPerMillionTokens: "2.50", outputPerMillionTokens: "10.00"}}
tenants:
- id: bench/tenant
  apiKeys: [{{value: {KEY}}}]
  rateLimit: {{requestsPerMinute: 100000000, tokensPerMinute: 100000000000}}
  budget: {{monthlyUsd: "100000000.00"}}
{extra}""")
        proc = start([RELEASE / "parley-gateway", "--config", cfg, "--log-format", "json"], work / f"gateway-{name}.log")
        wait_http(f"http://127.0.0.1:{admin}/readyz")
        gateways[name] = (proc, port)
    rps = {name: [] for name in gateways}
    cpu = {name: 0.0 for name in gateways}
    served = {name: 0 for name in gateways}
    non2xx = {name: 0 for name in gateways}
    before = redis_info(redis_port)
    for rnd in range(REDIS_ROUNDS):
        for name, (proc, port) in gateways.items():
            print(f"redis store: round {rnd + 1}, {name} ...", flush=True)
            c0 = proc_cpu_secs(proc.pid)
            r = wrk(f"http://127.0.0.1:{port}/v1/chat/completions", work)
            cpu[name] += proc_cpu_secs(proc.pid) - c0
            rps[name].append(r["rps"])
            served[name] += int(r["rps"] * DURATION)
            non2xx[name] += r["non2xx"]
            time.sleep(1)
    after = redis_info(redis_port)
    redis_cpu = (float(after["used_cpu_user"]) + float(after["used_cpu_sys"])
                 - float(before["used_cpu_user"]) - float(before["used_cpu_sys"]))
    commands = int(after["total_commands_processed"]) - int(before["total_commands_processed"])
    calls = {k.removeprefix("cmdstat_"): v for k, v in after.items() if k.startswith("cmdstat_")}
    med = lambda xs: sorted(xs)[len(xs) // 2]
    ratio = med(rps["redis"]) / med(rps["in-process"]) * 100
    n = max(served["redis"], 1)
    cmd_lines = []
    scripts = 0
    for cmd in ("evalsha", "eval", "script|load", "script"):
        if cmd in calls:
            stats = dict(kv.split("=", 1) for kv in calls[cmd].split(","))
            cmd_lines.append(f"`{cmd.upper()}` {int(stats['calls'])} calls, {float(stats['usec_per_call']):.1f} µs each")
            if cmd in ("evalsha", "eval"):
                scripts += int(stats["calls"])
    # Commands run inside scripts count too; a script call decides a batch of admissions
    # (and carries the batch's settles).
    cmd_lines.append(f"{n / max(scripts, 1):.1f} requests per script call")
    lines = [
        REDIS_SECTION,
        "",
        "Measured by `make bench` (`scripts/bench.py`, `redis_store`): the gateway config of the table",
        "above (rate limits, tokens per minute and budget on) served twice in the same run, once with the",
        "in-process store and once with `redis.url` on a private `redis-server` (loopback, no",
        f"persistence), each through `wrk -t1 -c{CONNECTIONS} -d{DURATION}s`, alternating, {REDIS_ROUNDS} rounds.",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average at the start "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)",
        "",
        "| store | req/s per round | median req/s | non-2xx | gateway CPU per request |",
        "|---|---|---:|---:|---:|",
    ]
    for name in gateways:
        per_req = cpu[name] / max(served[name], 1) * 1e6
        lines.append(f"| {name} | {' / '.join(f'{x:.0f}' for x in rps[name])} | {med(rps[name]):.0f} | "
                     f"{non2xx[name]} | {per_req:.1f} µs |")
    lines += [
        "",
        f"- Redis store throughput = **{ratio:.0f} % of the in-process store** (bar: 85 %)",
        f"- Redis: {redis_cpu / n * 1e6:.1f} µs of redis-server CPU and {commands / n:.2f} commands per request; "
        + "; ".join(cmd_lines),
    ]
    write_section(REDIS_SECTION, lines)


def redis_only() -> int:
    """`scripts/bench.py --redis`: only the `## Redis store` section."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="parley-bench-"))
    mock_port = free_port()
    start([RELEASE / "parley-mock-llm", "--listen", f"127.0.0.1:{mock_port}", "--reply-tokens", "16"],
          work / "mock.log")
    wait_http(f"http://127.0.0.1:{mock_port}/healthz")
    redis_store(work, mock_port)
    return 0


def stop_all():
    for p in PROCESSES:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in PROCESSES:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


if __name__ == "__main__":
    try:
        sys.exit(redis_only() if sys.argv[1:] == ["--redis"] else main())
    finally:
        stop_all()
