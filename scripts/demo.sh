#!/usr/bin/env bash
# Set up and run the main job end to end on the embedded default: a generated synthetic cohort,
# onboarded and trained on through kfp.local with a local MLflow server, into demo-output/ (public
# demo pseudonym key: synthetic data only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec pe-triage demo --out "${1:-demo-output}" --config configs/demo.yaml
