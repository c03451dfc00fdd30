#!/usr/bin/env bash
# A local PostgreSQL for the MLflow server and Optuna studies at cluster scale (tests, CI, a
# workstation): installs Debian's postgresql if missing (as root), creates a cluster in
# $SODA_PG_DIR (default /tmp/soda-postgres) listening on 127.0.0.1:$SODA_PG_PORT (default 5433)
# with trust authentication for local connections only, and the databases `mlflow` and `optuna`.
# Idempotent: a running cluster is left as is. `scripts/postgres-up.sh down` stops it.
#   MLflow:  postgresql://postgres@127.0.0.1:5433/mlflow
#   Optuna:  postgresql://postgres@127.0.0.1:5433/optuna
set -euo pipefail

DIR=${SODA_PG_DIR:-/tmp/soda-postgres}
PORT=${SODA_PG_PORT:-5433}
log() { echo "postgres-up: $*"; }

bin_dir() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$found" ]; then echo "$found"; else dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)"; fi
}

as_owner() {
    # PostgreSQL refuses to run as root: use the `postgres` account then.
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

BIN=$(bin_dir)
if [ "${1:-up}" = "down" ]; then
    if [ -f "$DIR/data/postmaster.pid" ]; then as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null; fi
    log "stopped"
    exit 0
fi

if [ ! -x "$BIN/initdb" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "postgres-up: PostgreSQL is not installed; install it (sudo apt-get install postgresql) or run this as root" >&2
        exit 1
    fi
    log "installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
    BIN=$(bin_dir)
fi

mkdir -p "$DIR"
[ "$(id -u)" -ne 0 ] || chown postgres:postgres "$DIR"
if [ ! -s "$DIR/data/PG_VERSION" ]; then
    log "creating a cluster in $DIR/data"
    as_owner "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
fi
if ! as_owner "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
    log "started on 127.0.0.1:$PORT (log: $DIR/server.log)"
fi
for db in mlflow optuna; do
    if ! as_owner "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
        as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$db"
        log "created database $db"
    fi
done
log "ready: postgresql://postgres@127.0.0.1:$PORT/{mlflow,optuna}"
