#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the multi-worker sweep test, and print its URL.
#
#   export CDKA_TEST_POSTGRES_URL="$(bash .ci/start_postgres.sh)"
#   # -> postgresql://postgres@127.0.0.1:54329/cdka_test   (trust auth on 127.0.0.1 only, no password)
#
# Installs Debian's postgresql with apt-get when no server binaries are found (needs root or sudo).
# The cluster lives in a temporary folder ($CDKA_PG_DIR, default /tmp/cdka-pg-$PORT) owned by the
# postgres user, listens on 127.0.0.1 only, port $CDKA_PG_PORT (default 54329). Running the script again
# reuses a running server but always gives a new, empty database. Stop it with:
#   runuser -u postgres -- "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/pg_ctl" -D /tmp/cdka-pg-54329 stop
# Only the URL goes to stdout; everything else goes to stderr. Nothing secret is printed or exported.
set -euo pipefail

PORT="${CDKA_PG_PORT:-54329}"
DB="${CDKA_PG_DB:-cdka_test}"
DIR="${CDKA_PG_DIR:-/tmp/cdka-pg-$PORT}"
URL="postgresql://postgres@127.0.0.1:${PORT}/${DB}"

log() { echo "start_postgres: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root (or sudo) for: $*"; exit 1; fi
}

find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

BIN="$(find_bin || true)"
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
  log "installing Debian's postgresql with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  BIN="$(find_bin)"
fi

# initdb and postgres refuse to run as root: use the postgres account then, else the current user.
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
  RUN=(runuser -u postgres --)
  OWNER=postgres
else
  RUN=()
  OWNER="$(id -un)"
fi

if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  log "a server already answers on 127.0.0.1:$PORT; reusing it"
else
  if [ ! -f "$DIR/PG_VERSION" ]; then
    mkdir -p "$DIR"
    chown "$OWNER" "$DIR"
    chmod 700 "$DIR"
    log "initdb in $DIR"
    "${RUN[@]}" "$BIN/initdb" -D "$DIR" -U postgres -A trust --no-sync -E UTF8 >&2
  fi
  # Nothing answers on the port, so a postmaster.pid left by a killed server is stale (its PID may
  # even belong to another process by now): remove it rather than let pg_ctl refuse to start.
  rm -f "$DIR/postmaster.pid"
  log "starting on 127.0.0.1:$PORT"
  "${RUN[@]}" "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=100" start >&2
fi

# A fresh database every run: a server (or its folder in /tmp) kept from an earlier run must not hand
# this run studies made by other code.
"$BIN/dropdb" -h 127.0.0.1 -p "$PORT" -U postgres --if-exists --force "$DB" >&2
"$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB" >&2
log "created a fresh database $DB"
echo "$URL"
