"""`make bench-scale` part 2 (not in CI): many concurrent streams and big configs.

Run by scripts/bench_streams.sh. Everything listens on 127.0.0.1; the load driver is
e2e/examples/bench_streams.rs (release). Writes the `## Many streams` and `## Big configs`
sections of BENCHMARKS.md (each replaced in place, the rest of the file kept).

Many streams: one parley-mock-llm paces a 30-token reply at 1 token/s (model `slow`)
or sends a 16-token reply at once (model `fast`). A fresh gateway per run; its RSS is
sampled every 100 ms and when the driver reports every stream open at once.
Big configs: a config of 10,000 tenants (3 keys each) and 1,000 models against a
1-tenant, 1-model config, both gateways alive at once, alternating load runs.

`--only ttft` / `--only streams` / `--only config` runs one part."""
import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
RELEASE = REPO / "target" / "release"
DRIVER = RELEASE / "examples" / "bench_streams"
KEY = "pk-bench-0123456789"
STREAMS = int(os.environ.get("PARLEY_BENCH_STREAMS", "10000"))
PROCESSES: list[subprocess.Popen] = []


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log, env=None) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                         env={**os.environ, **(env or {})})
    PROCESSES.append(p)
    return p


def stop(p: subprocess.Popen):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_http(url, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {url}")


def status_mib(pid) -> tuple[float, float]:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    get = lambda k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) / 1024
    return get("VmRSS"), get("VmHWM")


def cpu_s(pid) -> float:
    """User + system CPU seconds a process has used: what the machine's load distorts least."""
    f = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


class Sampler:
    """Samples a process's RSS every 100 ms; `peak` is the highest sample."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0.0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                self.peak = max(self.peak, status_mib(self.pid)[0])
            except (OSError, AttributeError):
                return
            time.sleep(0.1)

    def done(self):
        self.stop = True
        self.thread.join()
        return self.peak


def driver(args: list, pid=None) -> tuple[dict, float | None]:
    """Runs the driver; returns its summary and the gateway RSS when all streams were open."""
    p = subprocess.Popen([str(DRIVER), *[str(a) for a in args]], stdout=subprocess.PIPE, text=True)
    at_open = None
    out = None
    for line in p.stdout:
        if line.startswith("ALL_OPEN") and pid is not None:
            at_open = status_mib(pid)[0]
        elif line.startswith("{"):
            out = json.loads(line)
    if p.wait() != 0 or out is None:
        raise SystemExit(f"driver failed: {args}")
    return out, at_open


MOCK_MODELS = json.dumps({"fast": {"tokens_per_second": 0, "reply_tokens": 16}})


def start_mock(work, name="mock") -> int:
    port = free_port()
    start([RELEASE / "parley-mock-llm", "--listen", f"127.0.0.1:{port}", "--reply-tokens", "30",
           "--tokens-per-second", "1", "--models", MOCK_MODELS], work / f"{name}.log")
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return port


def backend(mock_port, upstream, h2c=False):
    return (f'{{name: mock, provider: openai, baseUrl: "http://127.0.0.1:{mock_port}/v1", '
            f'apiKey: {{value: sk-upstream}}, upstreamModel: {upstream}{", h2c: true" if h2c else ""}}}')


def small_config(gw_port, admin_port, mock_port, models=("slow", "fast"), h2c=False) -> str:
    lines = [
        "apiVersion: parley.dev/gateway/v1",
        f"listen: 127.0.0.1:{gw_port}",
        f"adminListen: 127.0.0.1:{admin_port}",
        f"defaultModel: {models[0]}",
        "models:",
    ]
    for m in models:
        up = "slow" if m == "slow" else "fast"
        lines += [f"- name: {m}", f"  backends: [{backend(mock_port, up, h2c)}]",
                  '  pricing: {inputPerMillionTokens: "2.50", outputPerMillionTokens: "10.00"}']
    lines += [
        "tenants:",
        "- id: bench/tenant",
        f"  apiKeys: [{{value: {KEY}}}]",
        "  rateLimit: {requestsPerMinute: 100000000, tokensPerMinute: 100000000000}",
        '  budget: {monthlyUsd: "100000000.00"}',
    ]
    return "\n".join(lines) + "\n"


def start_gateway(work, name, config_text, env=None):
    gw_port, admin_port = free_port(), free_port()
    path = work / f"{name}.yaml"
    path.write_text(config_text(gw_port, admin_port))
    t = time.monotonic()
    p = start([RELEASE / "parley-gateway", "--config", path, "--log-format", "json"], work / f"{name}.log",
              env=env)
    wait_http(f"http://127.0.0.1:{admin_port}/readyz")
    return p, gw_port, admin_port, path, time.monotonic() - t


def fmt(x, digits=3):
    return f"{x:.{digits}f}"


# ---------------------------------------------------------------- many streams

def many_streams(work) -> list[str]:
    mock = start_mock(work)
    mock_pid = PROCESSES[-1].pid
    direct = f"127.0.0.1:{mock}"
    env = {"PARLEY_MAX_CONCURRENT_REQUESTS": "30000"}
    cfg = lambda g, a: small_config(g, a, mock)
    load_start = load()

    # 10,000 streams at once over HTTP/2, then HTTP/1.1 at several counts.
    runs = []
    # (client protocol, streams, client connections, h2c upstream)
    plan = [("HTTP/2", STREAMS, max(1, STREAMS // 100), False),
            ("HTTP/2", STREAMS, max(1, STREAMS // 100), True)]
    # HTTP/1.1: the gateway holds two sockets a stream (client and upstream) and this
    # machine's hard limit on open files is the process limit below.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    h1_max = min(STREAMS, (nofile - 200) // 2 // 1000 * 1000)
    for n in sorted({1000, 3000, h1_max}):
        if n <= h1_max:
            plan.append(("HTTP/1.1", n, 0, False))
    for proto, n, conns, h2c in plan:
        base = ["--key", KEY, "--models", "slow", "--streams", n, "--conns", conns,
                "--open-per-second", 1000, "--period-ms", 1000]
        print(f"{n} streams over {proto}: direct ...", flush=True)
        c0 = cpu_s(mock_pid)
        d, _ = driver(["--addr", direct, *base]) if (proto == "HTTP/2" and not h2c) or n == h1_max else (None, None)
        mock_cpu = cpu_s(mock_pid) - c0
        print(f"{n} streams over {proto}: gateway ...", flush=True)
        gw, gw_port, admin, _, _ = start_gateway(work, f"gw-{proto[5]}-{n}{'-h2c' if h2c else ''}",
                                                 lambda g, a: small_config(g, a, mock, h2c=h2c), env)
        time.sleep(0.5)
        idle = status_mib(gw.pid)[0]
        sampler = Sampler(gw.pid)
        c0 = cpu_s(gw.pid)
        g, at_open = driver(["--addr", f"127.0.0.1:{gw_port}", *base], pid=gw.pid)
        gw_cpu = cpu_s(gw.pid) - c0
        peak = sampler.done()
        _, hwm = status_mib(gw.pid)
        after = status_mib(gw.pid)[0]
        stop(gw)
        runs.append(dict(proto=proto, n=n, conns=conns, h2c=h2c, direct=d, gw=g, idle=idle, at_open=at_open,
                         peak=max(peak, hwm), after=after, load=load(), gw_cpu=gw_cpu,
                         mock_cpu=mock_cpu if d else None))
        print(json.dumps(runs[-1]), flush=True)
        (work / "streams.json").write_text(json.dumps({"runs": runs}))

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = [
        "## Many streams",
        "",
        f"Measured by `make bench-scale` (`scripts/bench_streams.py`, driver `e2e/examples/bench_streams.rs`;",
        f"not in CI) on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores ({cpu}),",
        f"{platform.system()} {platform.release()}, **shared and noisy** (load average {load_start} at the start).",
        f"Release builds; a fresh gateway per run (one tenant, limits, budget and pricing on,",
        f"`PARLEY_MAX_CONCURRENT_REQUESTS=30000`); upstream `parley-mock-llm` pacing a 30-token",
        f"reply at 1 token/s (each stream is open about 30 s), streams opened at 1,000/s; open-files",
        f"limit {nofile} (the hard limit of this machine, which HTTP/1.1 at 10,000 streams would",
        f"exceed: the gateway holds two sockets a stream there, so HTTP/1.1 stops at {h1_max:,}).",
        f"Upstream protocol: HTTP/1.1 (the mock is plain `http://`, so a connection per stream) or",
        f"h2c (the backend's `h2c: true`: HTTP/2 with prior knowledge, up to 100 streams a connection, so 10,000 streams on 64).",
        "",
        "| streams | client protocol | upstream | completed | errors | gateway RSS idle | RSS with all open | peak RSS | per open stream | TTFT p50 / p99 (gateway) | TTFT p50 / p99 (direct) | chunk lag p99 gateway / direct | load after |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        g, d = r["gw"], r["direct"]
        # Not every stream open at once (errors): the peak stands in, over those that were.
        at_open = r["at_open"] if r["at_open"] is not None else r["peak"]
        per = (at_open - r["idle"]) * 1024 / max(1, g["peak_open"])
        dt = f"{fmt(d['ttft_ms']['p50'], 2)} / {fmt(d['ttft_ms']['p99'], 2)} ms" if d else "-"
        dl = fmt(d["chunk_lag_ms"]["p99"], 2) if d else "-"
        lines.append(
            f"| {r['n']:,} | {r['proto']}{' (' + str(r['conns']) + ' connections)' if r['conns'] else ''} | "
            f"{'h2c' if r['h2c'] else 'HTTP/1.1'} | "
            f"{g['completed']:,} | **{g['errors']}** | {r['idle']:.1f} MiB | "
            f"{at_open:.1f} MiB{'' if r['at_open'] is not None else ' (never all open: peak)'} | **{r['peak']:.1f} MiB** | **{per:.1f} KiB** | "
            f"{fmt(g['ttft_ms']['p50'], 2)} / {fmt(g['ttft_ms']['p99'], 2)} ms | {dt} | "
            f"{fmt(g['chunk_lag_ms']['p99'], 2)} / {dl} ms | {r['load']} |")
    lines += ["", "CPU per stream (30 chunks each; user + system time of the process over the run, which",
              "the machine's load distorts far less than latency): gateway against the mock serving the",
              "same streams directly.", "", "| streams | client protocol | upstream | gateway CPU | per stream | mock CPU (direct run) | per stream |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for r in runs:
        m = r["mock_cpu"]
        lines.append(f"| {r['n']:,} | {r['proto']} | {'h2c' if r['h2c'] else 'HTTP/1.1'} | {r['gw_cpu']:.1f} s | {r['gw_cpu'] / r['n'] * 1e6:.0f} µs | "
                     + (f"{m:.1f} s | {m / r['n'] * 1e6:.0f} µs |" if m is not None else "- | - |"))
    for r in runs:
        if r["gw"]["errors"]:
            kinds = "; ".join(f"{n} x `{k[:100]}`" for k, n in r["gw"]["error_kinds"].items())
            up = "h2c" if r["h2c"] else "HTTP/1.1"
            lines += ["", f"Errors of the {r['n']:,}-stream {r['proto']} run (upstream {up}) through the gateway: {kinds}."]
    lines += ["", "Chunk lag: how late the j-th chunk of a stream arrives against the upstream's schedule",
              "(`(t_j - t_0) - j x 1 s`), over every chunk after the first; the direct column is the same",
              "load straight at the mock, so the difference is the gateway's per-chunk cost.", ""]
    bars = []
    for r in runs:
        if r["n"] == STREAMS:
            at_open = r["at_open"] if r["at_open"] is not None else r["peak"]
            up = "h2c" if r["h2c"] else "HTTP/1.1"
            bars.append(f"{r['n']:,} streams over {r['proto']} with {up} upstreams: **{r['gw']['errors']} errors**, "
                        f"RSS **{at_open:.0f} MiB** with all open (bar 256 MiB: **{'met' if at_open < 256 else 'missed'}**)")
        elif r["proto"] == "HTTP/1.1" and r["n"] == max(x["n"] for x in runs if x["proto"] == "HTTP/1.1"):
            # The open-files limit stops HTTP/1.1 short of the bar's count: the most it held,
            # and what its cost a stream comes to at the bar's count.
            at_open = r["at_open"] if r["at_open"] is not None else r["peak"]
            per = (at_open - r["idle"]) / r["n"]
            bars.append(f"{r['n']:,} streams over HTTP/1.1 with HTTP/1.1 upstreams (the most this machine's open-files "
                        f"limit allows): **{r['gw']['errors']} errors**, RSS **{at_open:.0f} MiB** with all open, which at "
                        f"{per * 1024:.1f} KiB a stream comes to **{r['idle'] + per * STREAMS:.0f} MiB** at {STREAMS:,}")
    bars.append("TTFT added one stream at a time: see `## Time to first token`")
    lines += ["Against the bars (this run): " + "; ".join(bars) + ".", ""]
    lines += MEMORY_NOTES
    return lines


# Where the bytes of an open stream go: a heap census, not something this script measures.
# Taken on 2026-12-03 with heaptrack (the gateway built with the system allocator: heaptrack
# does not see mimalloc) at the peak of 1,000 HTTP/1.1 streams with HTTP/1.1 upstreams;
# keep it true when it changes.
MEMORY_NOTES = [
    "Where the memory of an open stream goes (a heaptrack census of the live heap at the peak of",
    "1,000 HTTP/1.1 streams with HTTP/1.1 upstreams, 2026-12-03; not redone by this script):",
    "24 MiB of heap, about 22 KiB a stream (34.5 MiB before the three changes below):",
    "- The client's HTTP/1.1 connection (hyper's server), ~19 KiB: an 8 KiB read buffer and an",
    "  8 KiB write buffer (`INIT_BUFFER_SIZE`, allocated per connection; no setting lowers the",
    "  write buffer, of which a stream writes only its response head), the connection's task",
    "  (2.3 KiB), the cached response header map (1.2 KiB) and hyper's dispatch state (0.7 KiB).",
    "  The read buffer was 16 KiB (it grew while the response streamed) until `max_buf_size`",
    "  was set to hyper's least, 8 KiB, which is also the largest request head accepted over",
    "  HTTP/1.1; the task was 4.5 KiB while it was an `async` block that held the connection",
    "  twice (captured and awaited).",
    "- The upstream HTTP/1.1 connection (`gateway/src/upstream/http1.rs`): its socket and",
    "  clock, under 0.5 KiB; no buffer between chunks. With hyper's client it was ~27 KiB: 8 KiB",
    "  read and 8 KiB write buffers, the first block of the dispatch channel (8,992 bytes), a",
    "  cached header map and the connection's task.",
    "- The relay, ~2 KiB: the boxed response body stream (0.9 KiB), the SSE parser (0.5 KiB),",
    "  the translator (0.45 KiB), accounting.",
    "- Over client HTTP/2 the client's half is h2's per-stream state and the stream's task",
    "  (~3.5 KiB), so a stream there is ~5 KiB with either upstream protocol; RSS runs above",
    "  the live heap by what the allocator keeps of the opening burst.",
    "",
    "`PARLEY_MAX_CONCURRENT_REQUESTS=30000` is only a precaution: the shed limit counts handlers",
    "up to a stream's response head, not open streams (a run with the default 1,024 held the same",
    "10,000 HTTP/2 streams with 0 errors). On this shared machine a run under heavy load (13-22,",
    "others' release builds) has had errors: upstream connects timing out after 2 s in a starved",
    "gateway, then the breaker opening.",
]


# ---------------------------------------------------------------- big configs

TENANTS = int(os.environ.get("PARLEY_BENCH_TENANTS", "10000"))
MODELS = int(os.environ.get("PARLEY_BENCH_MODELS", "1000"))
KEYS_PER_TENANT = 3


def big_config(gw_port, admin_port, mock_port, marker=0) -> str:
    out = [
        "apiVersion: parley.dev/gateway/v1",
        f"listen: 127.0.0.1:{gw_port}",
        f"adminListen: 127.0.0.1:{admin_port}",
        "defaultModel: m-0",
        "models:",
    ]
    for i in range(MODELS):
        fb = f"\n  fallbacks: [m-{i + 1}]" if i % 10 == 0 and i + 1 < MODELS else ""
        out.append(f"- name: m-{i}{fb}\n  backends: [{backend(mock_port, 'fast')}]\n"
                   f'  pricing: {{inputPerMillionTokens: "2.50", outputPerMillionTokens: "10.00"}}')
    out.append("tenants:")
    for t in range(TENANTS):
        keys = ", ".join(f"{{value: pk-t{t}-k{k}-{marker if t == 0 else 0}}}" for k in range(KEYS_PER_TENANT))
        extra = ""
        if t % 10 == 1:
            extra = f"\n  modelQuotas: [{{model: m-{t % MODELS}, requestsPerMinute: 100000000}}]"
        out.append(f"- id: ns-{t % 100}/tenant-{t}\n  apiKeys: [{keys}]\n"
                   f"  rateLimit: {{requestsPerMinute: 100000000, tokensPerMinute: 100000000000}}\n"
                   f'  budget: {{monthlyUsd: "100000000.00"}}{extra}')
    return "\n".join(out) + "\n"


def reload_ms(log: pathlib.Path, seen: int, timeout=30.0) -> tuple[float, int]:
    """Waits for the next `config reloaded` log line; its `build_ms`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = [l for l in log.read_text().splitlines() if "config reloaded" in l]
        if len(lines) > seen:
            return float(json.loads(lines[-1]).get("fields", json.loads(lines[-1])).get("build_ms", "nan")), len(lines)
        time.sleep(0.02)
    raise SystemExit("no reload seen")


def big_configs(work) -> list[str]:
    mock = start_mock(work, "mock-config")
    load_start = load()
    # Only the `fast` model: the big config's models all map to it.
    small = lambda g, a: small_config(g, a, mock, models=("m-0",))
    big = lambda g, a: big_config(g, a, mock)
    print(f"big config: {TENANTS} tenants x {KEYS_PER_TENANT} keys, {MODELS} models", flush=True)
    keys = work / "keys.txt"
    keys.write_text("\n".join(f"pk-t{t}-k{k}-0" for t in range(1, TENANTS) for k in range(KEYS_PER_TENANT)) + "\n")
    models = ",".join(f"m-{i}" for i in range(MODELS))

    # `check` (parse + validate + build) wall time and peak RSS.
    g_small, sp, sa, spath, s_start = start_gateway(work, "cfg-small", small)
    g_big, bp, ba, bpath, b_start = start_gateway(work, "cfg-big", big)
    checks = {}
    for name, path in [("small", spath), ("big", bpath)]:
        best = None
        for _ in range(3):
            t = time.monotonic()
            p = subprocess.Popen([RELEASE / "parley-gateway", "check", "--config", path],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, st, ru = os.wait4(p.pid, 0)
            wall = time.monotonic() - t
            if os.waitstatus_to_exitcode(st) != 0:
                raise SystemExit(f"check of {path} failed")
            cpu = ru.ru_utime + ru.ru_stime
            # CPU time, not wall time, picks the best: it is what the machine's load distorts least.
            best = min(best or (cpu, wall, ru.ru_maxrss / 1024), (cpu, wall, ru.ru_maxrss / 1024))
        checks[name] = best
    time.sleep(1)
    rss = {"small": status_mib(g_small.pid)[0], "big": status_mib(g_big.pid)[0]}

    # Per-request cost, alternating rounds; each round also measures the mock directly.
    rounds = []
    for rnd in range(3):
        r = {}
        for name, addr, extra in [
            ("direct", f"127.0.0.1:{mock}", ["--models", "fast"]),
            ("small", f"127.0.0.1:{sp}", ["--key", KEY, "--models", "m-0"]),
            ("big", f"127.0.0.1:{bp}", ["--keys-file", keys, "--models", models]),
        ]:
            print(f"per-request round {rnd + 1}: {name} ...", flush=True)
            out, _ = driver(["--mode", "request", "--addr", addr, "--conns", 16, "--seconds", 5,
                             "--max-tokens", 16, *extra])
            r[name] = out
        rounds.append(r)

    # Reloads of the big config (one tenant's key changes), with the small one's load on.
    reloads = []
    log = work / "cfg-big.log"
    seen = sum(1 for l in log.read_text().splitlines() if "config reloaded" in l)
    for i in range(1, 4):
        t = time.monotonic()
        bpath.write_text(big_config(bp, ba, mock, marker=i))
        ms, seen = reload_ms(log, seen)
        reloads.append((ms, (time.monotonic() - t) * 1000))
    # Requests while the big config reloads: the key of the reloaded tenant aside, the
    # latency of requests through the big gateway during back-to-back reloads.
    stop_flag = threading.Event()

    def reloader():
        i = 10
        while not stop_flag.is_set():
            bpath.write_text(big_config(bp, ba, mock, marker=i))
            i += 1
            time.sleep(0.5)

    th = threading.Thread(target=reloader, daemon=True)
    th.start()
    during, _ = driver(["--mode", "request", "--addr", f"127.0.0.1:{bp}", "--conns", 16, "--seconds", 5,
                        "--max-tokens", 16, "--keys-file", keys, "--models", models])
    stop_flag.set()
    th.join()
    rss["big_after"] = status_mib(g_big.pid)[0]
    rss["big_hwm"] = status_mib(g_big.pid)[1]
    stop(g_small)
    stop(g_big)

    size = bpath.stat().st_size
    lines = [
        "## Big configs",
        "",
        f"Measured by `make bench-scale` (`scripts/bench_streams.py --only config`, driver",
        f"`e2e/examples/bench_streams.rs --mode request`; not in CI) on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,",
        f"same machine, **shared and noisy** (load average {load_start} at the start, {load()} at the end).",
        f"Big: {TENANTS:,} tenants x {KEYS_PER_TENANT} keys ({TENANTS * KEYS_PER_TENANT:,} keys), every tenant with rate limits",
        f"and a budget, a tenth with a model quota; {MODELS:,} models (a tenth with a fallback), one",
        f"backend each: {size / 1e6:.1f} MB of YAML. Small: 1 tenant, 1 key, 1 model. Both gateways",
        f"run at once in front of one `parley-mock-llm` (16-token non-streaming reply).",
        "",
        "| measure | small | big |",
        "|---|---:|---:|",
        f"| start until ready (`/readyz`) | {s_start * 1000:.0f} ms | {b_start * 1000:.0f} ms |",
        f"| `parley-gateway check` (best of 3): CPU, wall, peak RSS | {checks['small'][0] * 1000:.0f} ms, {checks['small'][1] * 1000:.0f} ms, {checks['small'][2]:.1f} MiB | "
        f"{checks['big'][0] * 1000:.0f} ms, {checks['big'][1] * 1000:.0f} ms, {checks['big'][2]:.1f} MiB |",
        f"| RSS serving, idle | {rss['small']:.1f} MiB | {rss['big']:.1f} MiB (peak {rss['big_hwm']:.1f} MiB after the reloads) |",
        "",
        "Reload of the big config (one tenant's keys changed; the file watcher picks it up): the",
        "build time the gateway logs (`build_ms`: read, parse, validate, build, off the request path",
        "on a blocking thread) and the time from writing the file until the new config serves",
        "(includes the watcher's 50 ms settling delay): " +
        ", ".join(f"**{b:.0f} ms** / {w:.0f} ms" for b, w in reloads) + " (bar: under 1 s).",
        "",
        "Per-request cost: `--conns 16` keep-alive connections for 5 s each, alternating direct /",
        "small / big; the big runs cycle through 29,997 keys (every tenant but the first), key k with model",
        f"m-(k mod {MODELS:,}):",
        "",
        "| round | direct req/s | small req/s | big req/s | big / small | small mean latency | big mean latency | added over direct small / big |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rounds):
        d, s, b = r["direct"], r["small"], r["big"]
        dm, sm, bm = d["latency_ms"]["mean"], s["latency_ms"]["mean"], b["latency_ms"]["mean"]
        errs = d["errors"] + s["errors"] + b["errors"]
        lines.append(f"| {i + 1} | {d['rps']:.0f} | {s['rps']:.0f} | {b['rps']:.0f} | **{b['rps'] / s['rps'] * 100:.1f} %** | "
                     f"{sm:.3f} ms | {bm:.3f} ms | {sm - dm:.3f} / {bm - dm:.3f} ms{'' if errs == 0 else f' ({errs} errors)'} |")
    tot = lambda k: sum(r[k]["rps"] for r in rounds)
    lines += ["", f"Over the three rounds the big config serves **{tot('big') / tot('small') * 100:.1f} %** of the small one's",
              f"requests per second (bar: within 5 %). During back-to-back reloads of the big config",
              f"(one every 0.5 s plus its build), requests through it: {during['rps']:.0f} req/s, p50",
              f"{during['latency_ms']['p50']:.3f} ms, p99 {during['latency_ms']['p99']:.3f} ms, max {during['latency_ms']['max']:.3f} ms,",
              f"{during['errors']} errors."]
    return lines


TTFT_ROUNDS = int(os.environ.get("PARLEY_BENCH_TTFT_ROUNDS", "3"))


def time_to_first_token(work) -> list[str]:
    """`## Time to first token`: one stream at a time against the mock directly, through a bare
    nginx `proxy_pass` (the cost of any proxy hop on this machine) and through the gateway."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench import free_port as nginx_port, nginx_conf

    mock = start_mock(work)
    gw, gw_port, _, _, _ = start_gateway(work, "gw-ttft", lambda g, a: small_config(g, a, mock))
    port = nginx_port()
    for d in ("nginx-body", "nginx-proxy"):
        (work / d).mkdir(exist_ok=True)
    (work / "nginx.conf").write_text(nginx_conf(work, mock, port, head="daemon off;\nmaster_process off;"))
    nginx = start(["nginx", "-c", work / "nginx.conf", "-p", work], work / "nginx.log")
    wait_http(f"http://127.0.0.1:{port}/v1/models")
    load_start = load()
    targets = [("direct", f"127.0.0.1:{mock}"), ("nginx", f"127.0.0.1:{port}"), ("gateway", f"127.0.0.1:{gw_port}")]
    rounds = []
    for rnd in range(TTFT_ROUNDS):
        res = {}
        for name, addr in targets:
            print(f"TTFT, one stream at a time, round {rnd + 1}: {name} ...", flush=True)
            res[name], _ = driver(["--addr", addr, "--key", KEY, "--models", "fast", "--streams", 2000,
                                   "--max-pending", 1, "--open-per-second", 1e6, "--period-ms", 0])
        rounds.append(res)
    stop(gw)
    stop(nginx)
    lines = [
        "## Time to first token",
        "",
        f"Measured by `make bench-streams` (`scripts/bench_streams.py`; alone: `--only ttft`) on",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average {load_start} at the start, {load()} at the end.",
        "One stream at a time, 2,000 per target and round (the `fast` model: the whole 16-token",
        "reply in one write), from the first byte of the request to the first content chunk, against",
        "`parley-mock-llm` directly, through a bare nginx `proxy_pass` (one worker, upstream",
        "keepalive, `proxy_buffering off`) and through the gateway (one tenant, limits, budget and",
        "pricing on), alternating. nginx shows what any proxy hop costs on this machine.",
        "",
        "| round | direct p50 / p99 | nginx p50 / p99 | gateway p50 / p99 | nginx added p50 / p99 | gateway added p50 / p99 | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    added = []
    for i, r in enumerate(rounds):
        d, n, g = (r[k]["ttft_ms"] for k in ("direct", "nginx", "gateway"))
        errs = sum(r[k]["errors"] for k in r)
        added.append(g["p99"] - d["p99"])
        lines.append(f"| {i + 1} | {fmt(d['p50'])} / {fmt(d['p99'])} ms | {fmt(n['p50'])} / {fmt(n['p99'])} ms | "
                     f"{fmt(g['p50'])} / {fmt(g['p99'])} ms | {n['p50'] - d['p50']:+.3f} / {n['p99'] - d['p99']:+.3f} ms | "
                     f"**{g['p50'] - d['p50']:+.3f} / {g['p99'] - d['p99']:+.3f} ms** | {errs} |")
    lines += ["", f"TTFT the gateway adds at p99: **{min(added):+.2f} to {max(added):+.2f} ms** (bar 1 ms: "
              f"**{'met' if max(added) < 1 else 'missed'}** in this run). The p99 of a 2,000-stream round moves",
              "with the machine's load: on this shared machine runs at load 2-7 measured +1.3 to +3.3 ms, so",
              "compare the gateway with nginx of the same round."]
    return lines


def write_section(lines: list[str]):
    """Replaces (or appends) the `## <title>` section of BENCHMARKS.md, keeping its notes."""
    from bench import write_section as write
    write(lines[0], lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["ttft", "streams", "config"])
    a = ap.parse_args()
    raise_nofile()
    work = pathlib.Path(tempfile.mkdtemp(prefix="parley-bench-streams-"))
    print(f"work dir {work}; machine: {os.cpu_count()} cores, load {load()}", flush=True)
    if a.only in (None, "ttft"):
        lines = time_to_first_token(work)
        write_section(lines)
    if a.only in (None, "streams"):
        lines = many_streams(work)
        write_section(lines)
    if a.only in (None, "config"):
        lines = big_configs(work)
        write_section(lines)
    return 0


def stop_all():
    for p in PROCESSES:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in PROCESSES:
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            p.kill()


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
