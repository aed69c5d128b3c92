#!/usr/bin/env bash
# Load benchmark of the gateway against nats-server's own WebSocket listener (the baseline) and the bare
# server (the lower bound), all three in the same run (docs/benchmarks.md).
#
#   scripts/bench.sh           the full run: every scenario at the sizes of issue 6, the shared scenarios on
#                              the three targets (the soak, 10 minutes, on the gateway alone),
#                              reports in target/bench/*.json, plot in docs/benchmarks-latency.png
#   scripts/bench.sh --smoke   200 sockets, a few seconds per scenario, every target, no plot (CI: keeps the
#                              tool and its rules alive)
#
# Builds the gateway, the load tool and the bare server (crate epoch-bench, bench/) in release mode and
# installs nats-server if needed; each scenario starts and stops its own servers, and a driver process per
# target. Exit status: non-zero when the tool fails (a process does not start, sockets cannot be opened,
# ...), when a ratio lacks a side (a target ran but has no value for a compared figure, say no broadcast
# step that kept up), and when a delivery scenario (recovery-storm, scale-out) finds an event lost or
# duplicated, a recovery refused or a socket closed, and when presence-feed finds a watcher's diffs closer
# than the feed's interval allows, a watcher's list not who is online, or a socket closed; not when a figure
# misses its target: the targets are judged in docs/benchmarks.md, against the baseline measured in the
# same run. The delivery scenarios and presence-feed run on the gateway alone (the other targets have no
# equivalent; presence-feed sets the gateway with the feed off against the gateway with it on) and come
# last.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
case "${1:-}" in
  --smoke) smoke=1 ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

# The gateway alone, as it ships (deploy/Dockerfile builds it the same way), then the load tool and the bare
# server; the tool starts the gateway and the bare server next to its own executable.
cargo build --release --locked --bin epoch-gateway
cargo build --release --locked -p epoch-bench --bin epoch-load --bin bare_server
scripts/setup.sh --nats-only
out=target/bench
mkdir -p "$out"
load=(cargo run --release --locked --quiet -p epoch-bench --bin epoch-load --)

run() {
  local name=$1; shift
  echo
  echo "=== $name: epoch-load $*"
  "${load[@]}" "$@" --json "$out/$name.json"
}

if [ "$smoke" = 1 ]; then
  # The shared scenarios on all three targets (the default), alternated; idle and reconnect twice each, so
  # that whole measurements alternate too.
  small=(--sockets 200 --settle-secs 1)
  run smoke-idle idle "${small[@]}" --repeats 2
  run smoke-broadcast broadcast "${small[@]}" --start-rate 20 --step-factor 4 --step-secs 1 --max-steps 3
  run smoke-broadcast-latency broadcast-latency "${small[@]}" --secs 2
  # per-user also on a second gateway (an A/B pair: presence refreshes out of the window on B), with the
  # 10 ms timeline of every target, read back by its analysis (text only: no matplotlib needed).
  run smoke-per-user per-user "${small[@]}" --rates 500 --secs 2 --targets all,gateway-b \
    --gateway-b-setting presence.ttl_secs=600 --timeline "$out/smoke-timeline.json"
  python3 scripts/timeline.py "$out"/smoke-timeline-{gateway,gateway-b,nats-ws,bare}.json >/dev/null
  run smoke-reconnect reconnect "${small[@]}" --repeats 2
  run smoke-is-online is-online "${small[@]}" --rates 500 --per-user-rate 200 --secs 2 --repeats 1
  run smoke-soak soak --targets gateway "${small[@]}" --per-user-rate 200 --secs 4 --sample-secs 2
  run smoke-recovery-storm recovery-storm "${small[@]}" --rate 250 --secs 2
  run smoke-scale-out scale-out "${small[@]}" --rates 500 --secs 2 --instances 1,2,4
  run smoke-scale-out-core scale-out "${small[@]}" --rates 500 --secs 2 --instances 1,2,4 \
    --gateway-setting delivery.enabled=false
  run smoke-presence-feed presence-feed "${small[@]}" --watchers 20 --churn 10 --rates 500 --secs 2 \
    --repeats 1
  echo
  echo "smoke: every scenario ran; reports in $out/smoke-*.json"
  exit 0
fi

# The shared scenarios run on all three targets (the default), their windows alternated. As many sockets as
# one driver process can hold (open-file limit 20,000): each target's driver holds its own.
run idle idle --sockets 19000
run broadcast broadcast --sockets 10000 --start-rate 2 --step-factor 1.6 --step-secs 4
run broadcast-latency broadcast-latency --sockets 10000 --secs 30
run per-user per-user --sockets 10000 --rates 1000,2500,5000,7500,10000 --secs 10
# The per-user target's rate again, three windows pooled per server (a single window can catch a stall).
run per-user-5000 per-user --sockets 10000 --rates 5000 --secs 10 --repeats 3
run reconnect reconnect --sockets 10000
# nats-server gets PINGs where the gateway and the bare server get heartbeats (the control); only the gateway
# has is_online.
run is-online is-online --sockets 10000 --rates 5000,10000 --per-user-rate 5000 --secs 10
# Ten minutes of per-user load: RSS, file descriptors and threads sampled every 30 s.
run soak soak --targets gateway --sockets 10000 --per-user-rate 5000 --secs 600 --sample-secs 30

if ! PYTHONPATH=.tools/py python3 -c 'import matplotlib' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --target .tools/py matplotlib
fi
PYTHONPATH=.tools/py python3 scripts/plot_bench.py "$out" docs/benchmarks-latency.png

# Delivery (CONTRACT §8), gateway only. An instance killed under 10,000 sockets on user:public, which
# reconnect to the other and rejoin with since: 50 events/s are 500,000 deliveries/s to 10,000 sockets
# (1,000/s would be 10 million, far past what one instance delivers), and each rejoin replays what its
# socket missed while it reconnected.
run recovery-storm recovery-storm --sockets 10000 --rate 50
# What each instance receives from NATS with 1, 2 and 4 instances: interest-based, then the core NATS path.
run scale-out scale-out --sockets 10000 --rates 5000 --instances 1,2,4
run scale-out-core scale-out --sockets 10000 --rates 5000 --instances 1,2,4 \
  --gateway-setting delivery.enabled=false
# The presence feed (issue: 10,000 sockets, 1,000 watching, 100 joins and 100 leaves a second), off and on,
# the two gateways' windows alternated, 3 rounds; per-user messages at 5,000/s alongside.
run presence-feed presence-feed --sockets 10000 --watchers 1000 --churn 100 --rates 5000
