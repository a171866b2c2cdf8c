#!/usr/bin/env bash
# The shared services the tests use: Redis on 127.0.0.1:6379 and PostgreSQL on
# 127.0.0.1:55432 (not 5432, where a packaged cluster may run). Idempotent and quick when
# they are already running; installs Debian's redis-server and postgresql when absent.
# Never touches the system configuration: Redis runs daemonized without persistence from
# /tmp; PostgreSQL runs as the postgres user from a data directory under /tmp with trust
# authentication on loopback only. Tests that stop or break a server start their own
# private one on a free port.
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

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

redis_start() {
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "services: installing redis-server (Debian package)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  fi

  echo "services: starting redis-server on 127.0.0.1:$REDIS_PORT" >&2
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' --appendonly no \
    --dir /tmp --pidfile "/tmp/parley-redis-$REDIS_PORT.pid" --logfile "/tmp/parley-redis-$REDIS_PORT.log"

  for _ in $(seq 1 100); do
    if redis_up; then return 0; fi
    sleep 0.05
  done
  echo "services: redis-server did not answer on 127.0.0.1:$REDIS_PORT (see /tmp/parley-redis-$REDIS_PORT.log)" >&2
  return 1
}

PG_PORT="${PARLEY_PG_PORT:-55432}"
PG_DIR="/tmp/parley-pg-$PG_PORT"

pg_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

pg_up() {
  local bin; bin=$(pg_bin)
  [ -n "$bin" ] && "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null
}

pg_start() {
  if [ -z "$(pg_bin)" ]; then
    echo "services: installing postgresql (Debian package)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  fi
  local bin; bin=$(pg_bin)
  local as=()
  # PostgreSQL refuses to run as root: run it as the postgres user.
  if [ "$(id -u)" = 0 ]; then as=(runuser -u postgres --); fi
  if [ ! -s "$PG_DIR/PG_VERSION" ]; then
    rm -rf "$PG_DIR"
    mkdir -p "$PG_DIR"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DIR"
    "${as[@]}" "$bin/initdb" -D "$PG_DIR" -U postgres -A trust -E UTF8 --no-instructions >/dev/null
  fi
  echo "services: starting PostgreSQL on 127.0.0.1:$PG_PORT (data in $PG_DIR)" >&2
  "${as[@]}" "$bin/pg_ctl" -D "$PG_DIR" -l "$PG_DIR.log" -w -t 30 start \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k /tmp -c fsync=off -c max_connections=200" >/dev/null
  pg_up || { echo "services: PostgreSQL did not answer on 127.0.0.1:$PG_PORT (see $PG_DIR.log)" >&2; return 1; }
}

redis_up || redis_start
pg_up || pg_start
