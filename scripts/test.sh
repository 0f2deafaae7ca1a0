#!/usr/bin/env bash
# Set up and run every test (unit, component, real-data, S3 and end-to-end; slow ones included).
# Servers the tests need (S3, MLflow) are started and stopped by the test fixtures themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
