#!/usr/bin/env bash
# The shared services the tests use: Redis on 127.0.0.1:6379. Idempotent and quick when
# it is already running; installs Debian's redis-server when absent. Never touches the
# system configuration: the server runs daemonized, without persistence, from /tmp.
# Tests that stop or break Redis start their own private server on a free port.
set -euo pipefail

REDIS_PORT="${PARLEY_REDIS_PORT:-6379}"

redis_up() {
  # PING over a plain TCP socket (redis-cli may not be installed).
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
  else
    local reply
    reply=$( { exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" && printf 'PING\r\n' >&3 &&
               read -r -t 2 line <&3 && printf '%s' "$line"; } 2>/dev/null ) || return 1
    [[ "$reply" == +PONG* ]]
  fi
}

if redis_up; then
  exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "services: installing redis-server (Debian package)" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

echo "services: starting redis-server on 127.0.0.1:$REDIS_PORT" >&2
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' --appendonly no \
  --dir /tmp --pidfile "/tmp/parley-redis-$REDIS_PORT.pid" --logfile "/tmp/parley-redis-$REDIS_PORT.log"

for _ in $(seq 1 100); do
  if redis_up; then exit 0; fi
  sleep 0.05
done
echo "services: redis-server did not answer on 127.0.0.1:$REDIS_PORT (see /tmp/parley-redis-$REDIS_PORT.log)" >&2
exit 1
