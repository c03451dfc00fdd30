#!/usr/bin/env bash
# An MLflow tracking server on the local PostgreSQL (scripts/postgres-up.sh), for many concurrent
# runs: `make mlflow-server`, then run with tracking=server (MLFLOW_TRACKING_URI or
# tracking.uri=http://127.0.0.1:5000). Artifacts are proxied by the server into $SODA_MLFLOW_ARTIFACTS.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${SODA_MLFLOW_PORT:-5000}
PG_PORT=${SODA_PG_PORT:-5433}
BACKEND=${SODA_MLFLOW_BACKEND:-postgresql://postgres@127.0.0.1:$PG_PORT/mlflow}
ARTIFACTS=${SODA_MLFLOW_ARTIFACTS:-$PWD/mlartifacts-server}
exec .venv/bin/mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
    --host 127.0.0.1 --port "$PORT" --workers "${SODA_MLFLOW_WORKERS:-4}"
