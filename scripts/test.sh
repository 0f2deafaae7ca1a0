#!/usr/bin/env bash
# Set up, lint, type-check and run every test (unit, component, real-data, S3 and end-to-end; slow
# ones included). A lint or type error fails the run before the tests start.
# Servers the tests need (S3, MLflow) are started and stopped by the test fixtures themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
command -v helm >/dev/null || { echo "test: helm is missing (scripts/install-helm.sh needs npm): the chart tests cannot run" >&2; exit 2; }
ruff check src components pipelines tests benchmarks scripts
mypy src
exec python -m pytest -q "$@"
