#!/usr/bin/env bash
# Throughput and latency of parley-gateway (auth, limits, metrics on) against a bare
# nginx proxy_pass in front of the same parley-mock-llm, on loopback.
#
#   cargo build --release -p parley-gateway -p parley-e2e --bins
#   gateway/bench/compare-nginx.sh [seconds] [connections]
#
# Needs nginx and wrk (Debian packages `nginx`, `wrk`). Every process it starts is
# stopped on exit. Bounded: 3 rounds of `seconds` per target.
set -euo pipefail
SECS=${1:-8}
CONNS=${2:-32}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${PARLEY_BIN_DIR:-$ROOT/target/release}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=$(free_port); NGX=$(free_port); GW=$(free_port); ADMIN=$(free_port)

"$BIN/parley-mock-llm" --listen "127.0.0.1:$MOCK" --reply-tokens 16 --no-auth >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream mock { server 127.0.0.1:$MOCK; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX;
    location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)
cat >"$WORK/gateway.yaml" <<YAML
apiVersion: parley.dev/gateway/v1
listen: 127.0.0.1:$GW
adminListen: 127.0.0.1:$ADMIN
defaultModel: gpt-4o
models:
- name: gpt-4o
  backends: [{name: primary, provider: openai, baseUrl: "http://127.0.0.1:$MOCK/v1", apiKey: {value: upstream}}]
  pricing: {inputPerMillionTokens: "2.50", outputPerMillionTokens: "10.00"}
tenants:
- id: bench/t
  apiKeys: [{value: sk-bench}]
  rateLimit: {requestsPerMinute: 100000000, tokensPerMinute: 100000000000}
  budget: {monthlyUsd: "1000000.00"}
YAML
"$BIN/parley-gateway" --config "$WORK/gateway.yaml" --log-format json >"$WORK/gateway.log" 2>&1 &
GWPID=$!
PIDS+=($GWPID)
cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o","messages":[{"role":"user","content":"hello there, how are you today?"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
LUA
sleep 1
rps() { wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$1/v1/chat/completions" | awk '/Requests\/sec/ {print $2} / 99%/ {print "p99=" $2 > "/dev/stderr"}'; }
total_n=0; total_g=0
for round in 1 2 3; do
  n=$(rps "$NGX"); g=$(rps "$GW")
  echo "round $round: nginx $n req/s, parley-gateway $g req/s ($(python3 -c "print(round(100*$g/$n))") %)"
  total_n=$(python3 -c "print($total_n+$n)"); total_g=$(python3 -c "print($total_g+$g)")
done
echo "overall: parley-gateway at $(python3 -c "print(round(100*$total_g/$total_n))") % of nginx"
for t in "$MOCK" "$GW"; do
  echo "latency at 2 connections via port $t: $(wrk -t1 -c2 -d3s --latency -s "$WORK/post.lua" "http://127.0.0.1:$t/v1/chat/completions" | awk '/ 50%/ {printf "p50=%s ", $2} / 99%/ {printf "p99=%s", $2}')"
done
echo "gateway RSS: $(ps -o rss= -p $GWPID) KiB"
