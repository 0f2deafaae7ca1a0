#!/usr/bin/env bash
# Render an HTML report to PNG with headless Chromium, to look at it as a reader would.
# Usage: scripts/screenshot.sh REPORT.html OUT.png [WIDTH] [HEIGHT]
set -euo pipefail
report=$(realpath "$1"); out=$2; width=${3:-1400}; height=${4:-4000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no Chromium found: apt-get install chromium" >&2; exit 2; }
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$width,$height" \
  --screenshot="$(realpath -m "$out")" "file://$report" 2>/dev/null
echo "$out"
