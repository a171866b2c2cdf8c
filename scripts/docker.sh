#!/usr/bin/env bash
# A local Docker engine for `make images` and the image tests. Idempotent and quick when
# the engine already answers; installs Debian's docker.io when dockerd is absent and
# starts dockerd when it does not answer.
#
#   scripts/docker.sh          make sure dockerd answers (install and start it if needed)
#   scripts/docker.sh stop     stop the dockerd this script started (pid file below)
#
# The engine runs without the default bridge and without touching iptables
# (`--bridge=none --iptables=false`): every image test runs its containers with
# `--network host` or `--network none`, and the images are built FROM scratch with COPY
# only (no RUN step that would need a network). So dockerd puts no address on the host.
# Its log goes to $PARLEY_DOCKERD_LOG (default /tmp/parley-dockerd.log).
set -euo pipefail

LOG="${PARLEY_DOCKERD_LOG:-/tmp/parley-dockerd.log}"
PIDFILE="${PARLEY_DOCKERD_PIDFILE:-/tmp/parley-dockerd.pid}"

# Prefer Debian's client from docker.io (/usr/bin/docker): it matches the daemon's API and
# has the classic builder the Dockerfile is written for. Any other `docker` on PATH is used
# only when Debian's is absent.
docker_cli() {
  if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi
}

engine_up() {
  local cli
  cli=$(docker_cli 2>/dev/null) || return 1
  "$cli" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

if [ "${1:-}" = "stop" ]; then
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    pid=$(cat "$PIDFILE")
    echo "docker: stopping dockerd (pid $pid)" >&2
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$PIDFILE"
  exit 0
fi

if engine_up; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "docker: dockerd does not answer and starting it needs root" >&2; exit 1
  fi
fi

if ! command -v dockerd >/dev/null 2>&1 || [ ! -x /usr/bin/docker ]; then
  echo "docker: installing docker.io (Debian package)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io >/dev/null
fi

# A daemon that runs but does not answer yet (just started by someone else): wait for it
# rather than starting a second one on the same socket.
if ! pgrep -x dockerd >/dev/null 2>&1; then
  echo "docker: starting dockerd (log: $LOG)" >&2
  # setsid: the daemon outlives the make that started it, like the test Redis does.
  $SUDO setsid dockerd --bridge=none --iptables=false --ip-masq=false --ip-forward=false \
    --userland-proxy=false --pidfile "$PIDFILE" >>"$LOG" 2>&1 </dev/null &
fi

for _ in $(seq 1 300); do
  if engine_up; then exit 0; fi
  sleep 0.1
done
echo "docker: dockerd did not answer within 30 s; the end of $LOG:" >&2
tail -n 30 "$LOG" >&2 || true
exit 1
