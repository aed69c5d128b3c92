#!/usr/bin/env python3
"""Reads the per-user timelines of epoch-load (`--timeline`) and says what the slow buckets coincide with.

    python3 scripts/timeline.py target/bench/timeline-gateway.json [timeline-nats-ws.json ...]
                                [--slow-ms 2] [--plot docs/timeline.png] [--window N]
                                [--gctrace gateway=target/bench/gctrace/1234.log ...]

For each target's file and each of its measured windows: the buckets (10 ms) whose slowest message,
bucketed by publish time, took more than --slow-ms are the slow ones. Every signal of the timeline (CPU
run and run-queue wait of the server's tokio workers and other threads, of its nats-server and of the load
tool; the whole machine's busy time, the others' share of it and its runnable threads; heartbeats; presence
writes and KV watch updates, NATS messages, per 100 ms) is compared between the
slow buckets and the others: its mean in each, their ratio, and how many slow buckets have the signal
above its 90th percentile, in the bucket itself or the one after (a message published in bucket k is
delayed by what runs in k and after). Then the Pearson correlation of each signal with the bucket's
slowest message (log).

Where the tail is: the messages over 1 ms and over 3 ms (the issue's p99 and p999 targets), and the share
of them in stalls, buckets whose median message is over 3 ms (everything published then was held up).

--gctrace TARGET=LOG adds the garbage collections of that target's nats-server, from the log of
scripts/nats-gctrace.sh (the Go runtime's GODEBUG=gctrace=1, with the process's start time), as a signal
(a collection started in the bucket or the 3 before) and as marks on the plot; the other targets'
collections are a signal of their own (an idle target's nats-server still collects).

With --plot (needs matplotlib: `pip install --target target/py matplotlib`, then PYTHONPATH=target/py), one
column per file, window --window (default: the first): latency p99 and max per bucket on top, then CPU
run time per 10 ms, run-queue wait, and the gateway's counters.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

# A tokio worker's thread name as /proc shows it: "tokio-rt-worker" (tokio 1.4x) or 15 bytes of the older
# "tokio-runtime-worker". The runtime's blocking threads have the same name; they rarely run here.
TOKIO_WORKER_NAMES = ("tokio-runtime-w", "tokio-rt-worker")
# The load tool's sampler threads, counted apart from the load itself.
SAMPLERS = ("tl-proc", "tl-scrape")
# A signal is "high" in a bucket above this quantile of its values over the window.
HIGH_QUANTILE = 0.9
# A bucket whose median message is slower than this (ms) is a stall: everything published then was held up.
STALL_MS = 3.0
# A collection counts for the bucket it started in and this many after it (it runs for ~10-20 ms).
GC_BUCKETS_AFTER = 3
# The /proc sampler's tick this late (µs) while the sampler itself hardly waited for a CPU: nothing of the
# machine ran (its virtual CPUs were held up by the host).
HELD_LATE_US = 2000
# nats-server running this long (µs, all its threads) in a bucket of 10 ms is a burst of its own work.
NATS_BURST_US = 8000
# The other targets' processes (idle between their turns) running this long (µs) in a bucket took a core's
# worth of time from this one.
NEIGHBOURS_BUSY_US = 5000
# Resolution of the plot: enough to tell 10 ms buckets apart over a 10 s window, small enough for the docs.
PLOT_DPI = 60
# Scraped series shown, by their names in the timeline, and their labels.
SCRAPED = (
    ("epoch_gateway_presence_writes_total", "presence writes"),
    ("epoch_gateway_presence_watch_updates_total", "KV watch updates"),
    ("epoch_gateway_nats_messages_total", "gateway NATS msgs"),
    ("varz.in_msgs", "nats-server msgs in"),
    ("varz.out_msgs", "nats-server msgs out"),
)


def thread_sum(window, n, process, field, keep):
    """Per bucket, the sum of `field` over the threads of `process` that `keep(name)` accepts."""
    out = [0.0] * n
    for thread in window["threads"]:
        if thread["process"] == process and keep(thread["name"]):
            for i, value in enumerate(thread[field][:n]):
                out[i] += value
    return out


def spread(window, n, bucket_ms, name):
    """A series scraped every 100 ms, spread evenly over the buckets of the interval it covers."""
    scrapes = window["scrapes"]
    values = scrapes["series"].get(name)
    if not values:
        return None
    out = [0.0] * n
    at = scrapes["at_ms"]
    for i in range(1, len(at)):
        if values[i] is None:
            continue
        first, last = int(at[i - 1] // bucket_ms), int(at[i] // bucket_ms)
        width = max(1, last - first)
        for b in range(first, min(last, n)):
            out[b] += values[i] / width
    return out


def gc_starts(path):
    """Wall-clock start times (s) of the collections in a log of scripts/nats-gctrace.sh."""
    lines = Path(path).read_text().splitlines()
    started = float(lines[0].split()[1])
    # gc 12 @3.456s 2%: ...
    found = (re.match(r"gc \d+ @([\d.]+)s", line) for line in lines[1:])
    return [started + float(m.group(1)) for m in found if m]


def gc_buckets(window, bucket_ms, gcs):
    """Buckets of the window in which a collection started."""
    n = len(window["buckets"]["max_ms"])
    start = window["start_unix_s"]
    return sorted({int((t - start) * 1000.0 // bucket_ms) for t in gcs if 0 <= (t - start) * 1000.0 < n * bucket_ms})


def signals(window, bucket_ms, gcs=(), other_gcs=()):
    """Every signal of a window, per bucket: (name, values), in µs per 10 ms for CPU and counts otherwise."""
    n = len(window["buckets"]["max_ms"])
    worker = lambda name: name in TOKIO_WORKER_NAMES  # noqa: E731
    other = lambda name: name not in TOKIO_WORKER_NAMES  # noqa: E731
    tool = lambda name: name not in SAMPLERS  # noqa: E731
    every = lambda name: True  # noqa: E731
    out = [
        ("server workers run µs", thread_sum(window, n, "server", "run_us", worker)),
        ("server workers wait µs", thread_sum(window, n, "server", "wait_us", worker)),
        ("server workers scheduled", thread_sum(window, n, "server", "scheduled", worker)),
        ("server other threads run µs", thread_sum(window, n, "server", "run_us", other)),
        ("server other threads wait µs", thread_sum(window, n, "server", "wait_us", other)),
        ("nats-server run µs", thread_sum(window, n, "backing_nats", "run_us", every)),
        ("nats-server wait µs", thread_sum(window, n, "backing_nats", "wait_us", every)),
        ("load tool run µs", thread_sum(window, n, "load_tool", "run_us", tool)),
        ("load tool wait µs", thread_sum(window, n, "load_tool", "wait_us", tool)),
        ("samplers run µs", thread_sum(window, n, "load_tool", "run_us", lambda name: name in SAMPLERS)),
        ("other targets run µs", thread_sum(window, n, "other_targets", "run_us", every)),
        ("heartbeats sent", [float(h) for h in window["buckets"]["heartbeats"][:n]]),
        ("sampler tick late µs", [float(v or 0) for v in window["buckets"].get("sampler_late_us", [0] * n)[:n]]),
        ("messages published", [float(p) for p in window["buckets"]["published"][:n]]),
    ]
    for label, starts in (("nats-server GC", gcs), ("another target's nats-server GC", other_gcs)):
        if not starts:
            continue
        under_way = [0.0] * n
        for b in gc_buckets(window, bucket_ms, starts):
            for k in range(b, min(n, b + GC_BUCKETS_AFTER + 1)):
                under_way[k] = 1.0
        out.append((f"{label} started (k-{GC_BUCKETS_AFTER}…k)", under_way))
    buckets = window["buckets"]
    if "runnable" in buckets:
        ours = [
        sum(values[i] for name, values in out if name.endswith("run µs") and not name.startswith("other"))
        for i in range(n)
    ]
        busy = [1000.0 * b for b in buckets["machine_busy_ms"][:n]]
        out += [
            ("machine runnable threads", [float(r or 0) for r in buckets["runnable"][:n]]),
            ("machine busy µs (10 ms ticks)", busy),
            ("others' busy µs (machine − ours)", [max(0.0, b - o) for b, o in zip(busy, ours)]),
            ("machine steal µs (10 ms ticks)", [1000.0 * b for b in buckets["machine_steal_ms"][:n]]),
        ]
    for name, label in SCRAPED:
        values = spread(window, n, bucket_ms, name)
        if values is not None:
            out.append((label + " (per 100 ms, spread)", values))
    # A server with no threads of a kind (nats-ws has no backing nats-server) has a signal of zeros.
    return [(name, values) for name, values in out if any(values)]


def quantile(values, q):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def pearson(xs, ys):
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def mean(values):
    return sum(values) / len(values) if values else float("nan")


def classify_stalls(window, measured, bucket_ms, gcs, other_gcs):
    """Each stall (a bucket whose median is over STALL_MS) by the first thing it coincides with, in the bucket
    or the ones next to it: a collection of the target's nats-server or of another target's (with
    --gctrace), the machine held (the sampler's tick late while the sampler did not wait for a CPU), a burst
    of nats-server's own CPU, the other targets' processes busy, or none of these. Returns (kind, stalls,
    share of the messages over 3 ms) rows."""
    buckets = window["buckets"]
    n = len(buckets["max_ms"])
    stalls = [i for i in measured if buckets["p50_ms"][i] > STALL_MS]
    late = buckets.get("sampler_late_us", [None] * n)
    sampler_wait = thread_sum(window, n, "load_tool", "wait_us", lambda name: name == SAMPLERS[0])
    nats_run = thread_sum(window, n, "backing_nats", "run_us", lambda name: True)
    starts = gc_buckets(window, bucket_ms, gcs)
    other_starts = gc_buckets(window, bucket_ms, other_gcs)
    neighbours = thread_sum(window, n, "other_targets", "run_us", lambda name: True)

    def near(i, test):
        return any(test(k) for k in (i - 1, i, i + 1) if 0 <= k < n)

    kinds = (
        (f"its nats-server's collection (started ≤ {GC_BUCKETS_AFTER} buckets before)", lambda i: any(0 <= i - b <= GC_BUCKETS_AFTER for b in starts)),
        ("another target's nats-server's collection", lambda i: any(0 <= i - b <= GC_BUCKETS_AFTER for b in other_starts)),
        ("the machine held (sampler late, not queued)", lambda i: near(i, lambda k: (late[k] or 0) >= HELD_LATE_US and sampler_wait[k] < (late[k] or 0) / 2)),
        (f"a burst of its nats-server (≥ {NATS_BURST_US / 1000:.0f} ms of CPU in 10 ms)", lambda i: near(i, lambda k: nats_run[k] >= NATS_BURST_US)),
        (f"the other targets busy (≥ {NEIGHBOURS_BUSY_US / 1000:.0f} ms of CPU in 10 ms)", lambda i: near(i, lambda k: neighbours[k] >= NEIGHBOURS_BUSY_US)),
        ("none of these", lambda i: True),
    )
    total = max(1, sum(buckets["over_3ms"]))
    counted = set()
    rows = []
    for kind, test in kinds:
        mine = [i for i in stalls if i not in counted and test(i)]
        counted.update(mine)
        rows.append((kind, len(mine), 100.0 * sum(buckets["over_3ms"][i] for i in mine) / total))
    return rows


def analyse(label, window, bucket_ms, slow_ms, gcs, other_gcs):
    """Prints the slow buckets of one window and what each signal does in them."""
    buckets = window["buckets"]
    maxima = buckets["max_ms"]
    # Buckets in which messages were published: the drain after the window has none.
    measured = [i for i, m in enumerate(maxima) if m is not None]
    slow = [i for i in measured if maxima[i] > slow_ms]
    rest = [i for i in measured if maxima[i] <= slow_ms]
    sampler = window["sampler"]
    print(
        f"\n== {label}: {window['rate_msgs_per_sec']:.0f} msg/s, round {window['round']}: "
        f"{len(measured)} buckets with messages, {len(slow)} with a message over {slow_ms} ms "
        f"({100.0 * len(slow) / max(1, len(measured)):.1f} %); {window['sent']} sent, {window['lost']} lost"
    )
    all_latency = sorted(
        m for m in buckets["p50_ms"] if m is not None
    )
    if all_latency:
        print(f"   median of the buckets' p50: {quantile(all_latency, 0.5):.3f} ms; worst bucket max: {max(m for m in maxima if m is not None):.2f} ms")
    if "over_1ms" in buckets:
        stalls = [i for i in measured if buckets["p50_ms"][i] > STALL_MS]
        for key, what in (("over_1ms", "over 1 ms"), ("over_3ms", "over 3 ms")):
            total = sum(buckets[key])
            in_stalls = sum(buckets[key][i] for i in stalls)
            print(
                f"   messages {what}: {total} ({100.0 * total / max(1, window['sent']):.2f} %), "
                f"{100.0 * in_stalls / max(1, total):.0f} % of them in the {len(stalls)} stalls (buckets with p50 > {STALL_MS} ms)"
            )
    if "over_3ms" in buckets:
        print("   stalls by what they coincide with (a stall is counted once, in this order):")
        for kind, count, share in classify_stalls(window, measured, bucket_ms, gcs, other_gcs):
            print(f"     {kind:<58} {count:>3} stalls, {share:>4.0f} % of the messages over 3 ms")
    print(
        f"   samplers: /proc {sampler['proc_cpu_percent']:.2f} %, scrapes {sampler['scrape_cpu_percent']:.2f} % of a core; "
        f"{sampler['late_ticks']} of {sampler['proc_ticks']} ticks ≥ 2 ms late (worst {sampler['worst_late_ms']:.1f} ms)"
    )
    if not measured:
        return
    sigs = signals(window, bucket_ms, gcs, other_gcs)
    n = len(maxima)
    by_name = dict(sigs)
    if "machine busy µs (10 ms ticks)" in by_name:
        # Over the whole window the 10 ms ticks of /proc/stat average out: the machine's CPU beside ours.
        wall_us = n * bucket_ms * 1000.0
        machine = sum(by_name["machine busy µs (10 ms ticks)"])
        ours = sum(sum(values) for name, values in sigs if name.endswith("run µs"))
        neighbours = sum(by_name.get("other targets run µs", []))
        print(
            f"   CPU over the window, % of a core: machine {100.0 * machine / wall_us:.0f}, the targets' processes "
            f"{100.0 * ours / wall_us:.0f} (the other targets' {100.0 * neighbours / wall_us:.0f}), "
            f"everything else {100.0 * (machine - ours) / wall_us:.0f} (other users, the kernel)"
        )
    log_max = [math.log(maxima[i]) for i in measured]
    print(
        f"   {'signal':<40} {'mean slow':>10} {'mean rest':>10} {'ratio':>6} "
        f"{'slow hi k':>9} {'slow hi k+1':>11} {'rest hi':>7} {'r(k)':>6} {'r(k+1)':>6}"
    )
    rows = []
    for name, values in sigs:
        high = quantile([values[i] for i in measured], HIGH_QUANTILE)
        after = lambda i: values[i + 1] if i + 1 < n else 0.0  # noqa: E731
        slow_mean = mean([values[i] for i in slow])
        rest_mean = mean([values[i] for i in rest])
        ratio = slow_mean / rest_mean if rest_mean else float("nan")
        hi_k = sum(1 for i in slow if values[i] > high)
        hi_k1 = sum(1 for i in slow if after(i) > high)
        rest_hi = sum(1 for i in rest if values[i] > high)
        r0 = pearson([values[i] for i in measured], log_max)
        r1 = pearson([after(i) for i in measured], log_max)
        rows.append((name, slow_mean, rest_mean, ratio, hi_k, hi_k1, rest_hi, r0, r1))
    rows.sort(key=lambda r: -(r[3] if not math.isnan(r[3]) else 0))
    for name, slow_mean, rest_mean, ratio, hi_k, hi_k1, rest_hi, r0, r1 in rows:
        print(
            f"   {name:<40} {slow_mean:>10.1f} {rest_mean:>10.1f} {ratio:>6.2f} "
            f"{hi_k:>4}/{len(slow):<4} {hi_k1:>5}/{len(slow):<5} {100.0 * rest_hi / max(1, len(rest)):>6.1f}% "
            f"{r0:>6.2f} {r1:>6.2f}"
        )
    print(
        f"   (slow hi k / k+1: slow buckets whose signal is above its {HIGH_QUANTILE:.0%} quantile in the bucket / the next; "
        f"rest hi: share of the other buckets above it; r: correlation with log(max) at lag 0 / +1)"
    )


def others_of(gctraces, target):
    """The collections of every traced nats-server but the target's own."""
    return [t for other, starts in gctraces.items() if other != target for t in starts]


def plot(files, index, slow_ms, output, gctraces):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, len(files), figsize=(8 * len(files), 11), sharex="col", squeeze=False)
    for col, (label, timeline) in enumerate(files):
        windows = timeline["windows"]
        if not windows:
            continue
        window = windows[min(index, len(windows) - 1)]
        bucket_ms = timeline["bucket_ms"]
        buckets = window["buckets"]
        n = len(buckets["max_ms"])
        t = [i * bucket_ms / 1000.0 for i in range(n)]
        gcs = gctraces.get(label, ())
        sig = dict(signals(window, bucket_ms, gcs, others_of(gctraces, label)))
        top, cpu, wait, counters = (axes[r][col] for r in range(4))
        for i, b in enumerate(gc_buckets(window, bucket_ms, gcs)):
            for ax in (top, cpu, wait):
                ax.axvline(b * bucket_ms / 1000.0, color="purple", lw=0.6, alpha=0.5, label="nats-server GC" if i == 0 and ax is top else None)
        for key, style in (("max_ms", "-"), ("p99_ms", "-"), ("p50_ms", "-")):
            top.plot(t, [v if v is not None else float("nan") for v in buckets[key]], style, lw=0.6, label=key[:-3])
        top.axhline(slow_ms, color="grey", ls=":", lw=0.8, label=f"{slow_ms} ms")
        top.set_yscale("log")
        top.set_ylabel("publish → receive (ms)")
        top.set_title(f"{label}: {window['rate_msgs_per_sec']:.0f} msg/s, round {window['round']} (by publish time)")
        top.legend(fontsize=7, loc="upper right")
        for name in ("server workers run µs", "server other threads run µs", "nats-server run µs", "load tool run µs"):
            if name in sig:
                cpu.plot(t, [v / (bucket_ms * 10.0) for v in sig[name]], lw=0.6, label=name.replace(" µs", ""))
        cpu.set_ylabel(f"CPU run (% of a core per {bucket_ms:.0f} ms)")
        cpu.legend(fontsize=7, loc="upper right")
        for name in ("server workers wait µs", "server other threads wait µs", "nats-server wait µs", "load tool wait µs"):
            if name in sig:
                wait.plot(t, [v / 1000.0 for v in sig[name]], lw=0.6, label=name.replace(" µs", ""))
        if "machine runnable threads" in sig:
            wait.plot(t, sig["machine runnable threads"], lw=0.5, color="black", alpha=0.5, label="machine runnable threads")
        wait.set_ylabel(f"run-queue wait (ms per {bucket_ms:.0f} ms)")
        wait.legend(fontsize=7, loc="upper right")
        for name, label_ in SCRAPED:
            key = label_ + " (per 100 ms, spread)"
            if key in sig:
                counters.plot(t, [v * 1000.0 / bucket_ms for v in sig[key]], lw=0.8, label=f"{label_} /s")
        if "heartbeats sent" in sig:
            counters.plot(t, [v * 1000.0 / bucket_ms for v in sig["heartbeats sent"]], lw=0.5, alpha=0.6, label="heartbeats /s")
        counters.set_ylabel("per second")
        counters.set_xlabel("seconds into the window")
        counters.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=PLOT_DPI)
    print(f"\nplot written to {output}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--slow-ms", type=float, default=2.0, help="a bucket is slow when a message took longer")
    parser.add_argument("--plot", help="write a plot of one window per file to this PNG")
    parser.add_argument("--window", type=int, default=0, help="the window plotted (default: the first)")
    parser.add_argument(
        "--gctrace", action="append", default=[], metavar="TARGET=LOG", help="a target's nats-server GC trace"
    )
    args = parser.parse_args()
    gctraces = {}
    for pair in args.gctrace:
        target, _, log = pair.partition("=")
        gctraces[target] = gc_starts(log)
    files = []
    for path in args.files:
        timeline = json.loads(path.read_text())
        target = timeline["target"]
        files.append((target, timeline))
        for window in timeline["windows"]:
            analyse(
                f"{path.name} ({target})",
                window,
                timeline["bucket_ms"],
                args.slow_ms,
                gctraces.get(target, ()),
                others_of(gctraces, target),
            )
    if args.plot:
        plot(files, args.window, args.slow_ms, args.plot, gctraces)
    return 0


if __name__ == "__main__":
    sys.exit(main())
