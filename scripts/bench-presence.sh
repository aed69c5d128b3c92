#!/usr/bin/env bash
# Presence benchmark (docs/presence-benchmark.md): builds the gateway and the benchmark in release mode,
# installs nats-server if needed, then runs presence_bench (bench/src/bin/presence_bench.rs), which starts
# its own nats-server and two gateways, prints a table of figures with their targets and writes them to
# target/presence-bench.json. Extra arguments go to the benchmark, e.g.
#   scripts/bench-presence.sh --users 1000 --queries 2000 --trials 30 --records 10000
# Exit status: non-zero when the benchmark fails or a figure misses its target.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin epoch-gateway
cargo build --release --locked -p epoch-bench --bin presence_bench
scripts/setup.sh --nats-only
exec cargo run --release --locked --quiet -p epoch-bench --bin presence_bench -- \
  --json target/presence-bench.json "$@"
