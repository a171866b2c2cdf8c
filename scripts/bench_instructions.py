"""`make bench`, second part: CPU instructions per proxied request, counted by valgrind's
callgrind, for parley-gateway and for a bare nginx `proxy_pass` in front of the same
parley-mock-llm. Unlike requests per second, an instruction count does not move with
the load of a shared machine, so it shows a regression of the request path exactly
(user-space instructions only: the system calls, about the same for both, are not
counted). Writes the `## Instructions per request` section of BENCHMARKS.md.

Everything listens on 127.0.0.1; each load is bounded in time and stops by itself."""
import datetime
import glob
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("bench", HERE / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SECTION = "## Instructions per request"
SECONDS = int(os.environ.get("PARLEY_BENCH_CALLGRIND_SECONDS", "6"))
# The gateway's first config poll (one more parse of the unchanged config, a period after
# the start; later polls of unchanged files parse nothing) is kept out of the counted
# window: under valgrind, parsing the big config takes longer than the whole run.
POLL = ["--poll-seconds", "3600"]


def callgrind(name, argv, ready_url, url, work: pathlib.Path) -> tuple[float, int]:
    """Instructions per request of `argv` serving `url`, counted after a warm-up."""
    out = work / f"callgrind.{name}.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *map(str, argv)],
        stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.valgrind.log", "w"))
    try:
        bench.wait_http(ready_url, seconds=120)
        bench.DURATION, bench.CONNECTIONS = 2, 4
        bench.wrk(url, work)  # warm-up, not counted
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True, check=True)
        bench.DURATION = SECONDS
        raw = bench.wrk(url, work)["raw"]
        requests = int(re.search(r"(\d+) requests in", raw).group(1))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    total = 0
    for f in glob.glob(f"{out}*"):
        m = re.search(r"^(?:totals|summary):\s+(\d+)", pathlib.Path(f).read_text(), re.M)
        total += int(m.group(1)) if m else 0
    return total / max(requests, 1), requests


def main() -> int:
    work = pathlib.Path(tempfile.mkdtemp(prefix="parley-bench-cg-"))
    mock_port, nginx_port, gw_port, admin_port = (bench.free_port() for _ in range(4))
    bench.start([bench.RELEASE / "parley-mock-llm", "--listen", f"127.0.0.1:{mock_port}", "--reply-tokens", "16"],
                work / "mock.log")
    bench.wait_http(f"http://127.0.0.1:{mock_port}/healthz")
    (work / "nginx.conf").write_text(bench.nginx_conf(work, mock_port, nginx_port, head="daemon off;\nmaster_process off;"))
    # The gateway config of `make bench`, and the same in a big config (10,000 tenants of
    # 3 keys, 1,000 models), each in a directory of its own (the gateway watches its
    # config's directory; callgrind's output files must not be there).
    def gateway_config(tenants: int, models: int, keys: int) -> str:
        out = [
            "apiVersion: parley.dev/gateway/v1",
            f"listen: 127.0.0.1:{gw_port}",
            f"adminListen: 127.0.0.1:{admin_port}",
            "defaultModel: gpt-4o",
            "models:",
        ]
        names = ["gpt-4o"] + [f"model-{i}" for i in range(1, models)]
        for name in names:
            out += [f"- name: {name}",
                    f'  backends: [{{name: mock, provider: openai, baseUrl: "http://127.0.0.1:{mock_port}/v1", '
                    "apiKey: {value: sk-upstream}, upstreamModel: gpt-4o}]",
                    '  pricing: {inputPerMillionTokens: "2.50", outputPerMillionTokens: "10.00"}']
        out.append("tenants:")
        for t in range(tenants):
            api_keys = [bench.KEY] if t == 0 else [f"pk-t{t}-k{k}" for k in range(keys)]
            out += [f"- id: ns-{t % 100}/tenant-{t}",
                    "  apiKeys: [" + ", ".join(f"{{value: {k}}}" for k in api_keys) + "]",
                    "  rateLimit: {requestsPerMinute: 100000000, tokensPerMinute: 100000000000}",
                    '  budget: {monthlyUsd: "100000000.00"}']
        return "\n".join(out) + "\n"

    configs = {"small": gateway_config(1, 1, 1), "big": gateway_config(10_000, 1_000, 3)}
    for name, text in configs.items():
        (work / name).mkdir()
        (work / name / "gateway.yaml").write_text(text)
    url = lambda port: f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        nginx, n_nginx = callgrind("nginx", ["nginx", "-c", work / "nginx.conf"],
                                   f"http://127.0.0.1:{nginx_port}/healthz", url(nginx_port), work)
        gateway, n_gateway = callgrind(
            "gateway", [bench.RELEASE / "parley-gateway", "--config", work / "small" / "gateway.yaml", "--log-format", "json", *POLL],
            f"http://127.0.0.1:{admin_port}/readyz", url(gw_port), work)
        big, n_big = callgrind(
            "gateway-big", [bench.RELEASE / "parley-gateway", "--config", work / "big" / "gateway.yaml", "--log-format", "json", *POLL],
            f"http://127.0.0.1:{admin_port}/readyz", url(gw_port), work)
    finally:
        bench.stop_all()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Measured by `make bench` (`scripts/bench_instructions.py`) on {now}: user-space CPU",
        "instructions per proxied request, counted by valgrind's callgrind over a "
        f"{SECONDS} s `wrk -t1 -c4` run after a warm-up, for the gateway config of the table above and",
        "for nginx (`master_process off`, one process) in front of the same mock, and for the",
        "gateway with the same tenant and model among 10,000 tenants and 1,000 models. Exact and",
        "independent of the machine's load (system calls and waiting are not counted).",
        "",
        "| target | instructions per request | requests counted |",
        "|---|---:|---:|",
        f"| nginx proxy_pass | {nginx:,.0f} | {n_nginx} |",
        f"| parley-gateway | {gateway:,.0f} | {n_gateway} |",
        f"| parley-gateway, 10,000 tenants (3 keys each) and 1,000 models | {big:,.0f} | {n_big} |",
        "",
        f"- parley-gateway executes **{gateway / nginx:.2f}x** nginx's instructions per request",
        f"- with the big config: **{(big / gateway - 1) * 100:+.1f} %** instructions per request "
        "(bar: per-request cost within 5 % of the 1-tenant config)",
    ]
    bench.write_section(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
