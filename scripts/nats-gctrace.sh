#!/usr/bin/env bash
# nats-server with the Go runtime's garbage-collection trace (GODEBUG=gctrace=1): a stand-in for the real
# binary, for epoch-load's --nats-server, so that a per-user timeline can be set against nats-server's
# collections (scripts/timeline.py --gctrace TARGET=LOG).
#
#   NATS_GCTRACE_DIR=target/bench/gctrace target/release/epoch-load per-user ... \
#       --nats-server "$PWD/scripts/nats-gctrace.sh" --timeline target/bench/timeline.json
#
# Each nats-server writes <dir>/<pid>.log: a first line `start <unix time> <arguments>`, then its log and
# one `gc N @<seconds since start>s ...` line per collection. The real binary is NATS_SERVER_BIN, else the
# one scripts/setup.sh installs. NATS_GOGC_EACH="100 400" gives the servers started one after the other
# these GOGC values in turn (an A/B test of the collector's pacing: with --targets gateway,gateway-b the
# gateway's nats-server starts first).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${NATS_GCTRACE_DIR:-$root/target/bench/gctrace}"
bin="${NATS_SERVER_BIN:-$root/.tools/nats-server-bin/bin/nats-server}"
mkdir -p "$dir"
if [ -n "${NATS_GOGC_EACH:-}" ]; then
  read -r -a values <<<"$NATS_GOGC_EACH"
  # One slot per server started, taken under a lock: the servers of a run start one after the other.
  exec 9>>"$dir/.started"
  flock 9
  started=$(wc -l <"$dir/.started")
  echo "$$" >&9
  # Closed before the exec: the server would hold the lock for its whole life.
  exec 9>&-
  export GOGC="${values[started % ${#values[@]}]}"
fi
echo "start $(date +%s.%N) GOGC=${GOGC:-100} $*" >"$dir/$$.log"
GODEBUG=gctrace=1 exec "$bin" "$@" 2>>"$dir/$$.log"
