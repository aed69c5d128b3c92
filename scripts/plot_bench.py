#!/usr/bin/env python3
"""Draws latency against offered load from the reports of scripts/bench.sh.

    python3 scripts/plot_bench.py target/bench docs/benchmarks-latency.png

Left: broadcast to N sockets, p50 and p99 publish -> receive latency against the deliveries/s offered at
each step (the gateway, nats-server's WebSocket listener and the bare server, same run); a step that did
not keep up (a socket closed, < 99.9 % delivered, or p99 >= 1 s) is drawn hollow. Right: per-user messages,
p50/p99/p999 against the messages/s offered. Needs matplotlib (scripts/bench.sh installs it into .tools/py).
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIDES = (
    ("gateway", "epoch-gateway", "tab:blue"),
    ("nats_ws", "nats-server WebSocket", "tab:orange"),
    ("bare", "bare server (lower bound)", "tab:green"),
)


def load(directory: Path, name: str):
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    directory, output = Path(sys.argv[1]), Path(sys.argv[2])
    broadcast, per_user = load(directory, "broadcast"), load(directory, "per-user")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))

    if broadcast:
        sockets = broadcast["args"]["sockets"]
        for key, label, colour in SIDES:
            side = broadcast.get(key)
            if not side:
                continue
            steps = side["steps"]
            x = [s["offered_deliveries_per_sec"] for s in steps]
            for q, style, marker in (("p50_ms", "-", "o"), ("p99_ms", "--", "s")):
                y = [s["latency"][q] for s in steps]
                left.plot(x, y, style, color=colour, label=f"{label} {q[:3]}")
                kept = [s["kept_up"] for s in steps]
                left.scatter(
                    x, y, marker=marker, color=[colour if k else "none" for k in kept], edgecolors=colour, zorder=3
                )
        left.set_xscale("log")
        left.set_yscale("log")
        left.set_xlabel("offered deliveries/s (messages/s × sockets)")
        left.set_ylabel("publish → receive latency (ms)")
        left.set_title(f"broadcast on user:public to {sockets:,} sockets")
        left.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=8)

    if per_user:
        sockets = per_user["args"]["sockets"]
        for key, label, colour in SIDES:
            side = per_user.get(key)
            if not side:
                continue
            points = side["points"]
            x = [p["rate_msgs_per_sec"] for p in points]
            for q, style in (("p50_ms", "o-"), ("p99_ms", "s--"), ("p999_ms", "^:")):
                right.plot(x, [p["latency"][q] for p in points], style, color=colour, label=f"{label} {q[:-3]}")
        right.axhline(1.5, color="grey", lw=0.8, ls="-.", label="target p99 ≤ 1.5 ms")
        right.set_yscale("log")
        right.set_xlabel("offered messages/s to random user:<id>")
        right.set_ylabel("publish → receive latency (ms)")
        right.set_title(f"per-user messages, {sockets:,} sockets")
        right.grid(True, which="both", alpha=0.3)
        right.set_ylim(0.1, 100)
        right.legend(fontsize=7, ncol=2, loc="upper left")

    fig.suptitle("epoch-gateway, nats-server WebSocket listener and bare server, same run, same 2-core machine")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    print(f"plot written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
