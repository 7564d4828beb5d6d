#!/usr/bin/env bash
# Serves the demo built by scripts/build-web.sh at http://127.0.0.1:${PORT:-8080}/
# (Python's http.server sends .wasm as application/wasm, which streaming
# compilation needs; localhost counts as a secure context for the service worker).
set -euo pipefail
cd "$(dirname "$0")/../web"
if [[ ! -f pkg/mhc_wasm_bg.wasm ]]; then
  echo "error: web/pkg is missing: run scripts/build-web.sh first" >&2
  exit 2
fi
port=${PORT:-8080}
echo "mhc web demo: http://127.0.0.1:$port/"
exec python3 -m http.server "$port" --bind 127.0.0.1
