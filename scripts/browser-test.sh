#!/usr/bin/env bash
# Browser end-to-end test: the example page of examples/browser (official phoenix.js, bundled by esbuild)
# in headless Chromium against the real gateway and nats-server (tests/browser/e2e.mjs).
# Installs what it needs: Chromium with apt-get when missing (as root; otherwise it prints
# "SKIPPED: chromium not installable" and exits 0), the example's Node packages (npm ci), the gateway
# (cargo build) and nats-server (scripts/setup.sh --nats-only). Screenshot: target/browser-e2e.png.
set -euo pipefail
cd "$(dirname "$0")/.."

chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
if ! [ -x "$chromium" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "browser-test: installing chromium with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium ||
      true
    chromium=/usr/bin/chromium
  fi
  if ! [ -x "$chromium" ]; then
    echo "SKIPPED: chromium not installable (needs root and apt-get, or CHROMIUM_PATH set to a Chromium)"
    exit 0
  fi
fi
export CHROMIUM_PATH="$chromium"
"$chromium" --version 2>/dev/null  # (Debian's wrapper prints a harmless shell warning on stderr)

(cd examples/browser && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
cargo build --locked
scripts/setup.sh --nats-only
exec node tests/browser/e2e.mjs
