//! `epoch-load`: the load tool of the gateway, measured in the same run against nats-server's own
//! WebSocket listener (the baseline) and against `bare_server` (the lower bound: delivery and nothing else).
//!
//! One command runs one scenario end to end. The tool starts its own processes: per target, the server and
//! the nats-server its messages come through (a JetStream nats-server and the release `epoch-gateway`; a
//! nats-server with a `websocket` block; a core nats-server and the release `bare_server`). It then starts
//! one driver per target, this program again ([`driver`]), which opens that target's sockets (from several
//! `127.0.0.x` source addresses so that ports never run out, under its own open-file limit), publishes
//! through that target's NATS, and measures on the turns the main process gives it: the targets' windows
//! alternate, A B C A B C, while every server stays up with its sockets open. The main process prints the
//! headline table and writes the report as JSON: connect rate, deliveries per second, publish → receive
//! latency percentiles (a timestamp in every payload), every server's RSS and CPU from `/proc` (and its
//! nats-server's, apart), closes and errors, and the gateway's ratios to the other two. Every child is
//! killed on exit.
//!
//! - Gateway sockets speak Phoenix V2 like phoenix.js: an authenticated socket per user `1..=N`, each joining
//!   `user:public`, `user:role` and `user:<id>`, with a heartbeat every 30 s.
//! - Bare sockets are the same client with the user in the URL instead of a token; the bare server answers
//!   the joins and heartbeats ok and delivers `user:public`, `user:role` and `user:<id>`.
//! - Baseline sockets speak the NATS text protocol over WebSocket: `CONNECT`, then `SUB` to the equivalent
//!   subjects `<prefix>.user.public`, `<prefix>.user.role`, `<prefix>.user.<id>`, then `PING`; the `PONG`
//!   plays the part of the join replies. Server `PING`s are answered with `PONG`.
//!
//! The same publisher (async-nats, open-loop at the offered rate) feeds every target, and the same receive
//! path (find `"t":` in the frame, subtract from now) times them all, so the ratios compare the servers.
//!
//! Scenarios: `idle`, `broadcast`, `broadcast-latency`, `per-user`, `reconnect`, `is-online` (only the
//! gateway has `is_online`: the other targets get the control frames, heartbeats to the bare server and
//! `PING`s to nats-server) and `soak` (gateway only in `scripts/bench.sh`); and, on the gateway alone, the
//! delivery scenarios of the event stream (CONTRACT §8): `recovery-storm` (an instance killed under its
//! sockets, which rejoin another with `since`; the run fails on any event lost or duplicated) and
//! `scale-out` (what each of 1, 2, 4 instances receives from NATS with interest-based ingress); and
//! `presence-feed`, the gateway against itself: two gateways, the presence feed off and on, each a target
//! with its own sockets and driver, their windows alternated (watchers, churn of presence joins and leaves,
//! per-user load; the run fails when a watcher's diffs or list break the feed's promises).
//! `scripts/bench.sh` runs them all at the sizes of docs/benchmarks.md; `scripts/bench.sh --smoke` runs
//! them small, for CI.
//!
//! # Layout
//! - [`cli`]: the command line.
//! - [`servers`]: the targets' processes, started by the main process.
//! - [`driver`]: the driver processes, their turns, and the CPU accounted over the measured turns.
//! - [`clients`]: the sockets, [`clients::phoenix`] for the gateway and the bare server and
//!   [`clients::nats_ws`] for the baseline, each held by a task that times what arrives.
//! - [`stats`]: what the socket tasks record, latency histograms and percentiles, `/proc` samples.
//! - [`timeline`]: per-user `--timeline`: each 10 ms of a window, its deliveries and latency beside the
//!   CPU of every thread of the server, its nats-server and the load tool, and the servers' counters.
//! - [`scenarios`]: one module per scenario, on the run they share (targets, sockets, publisher).
//! - [`report`]: the typed report (JSON), the headline table and its rules.

mod cli;
mod clients;
mod driver;
mod report;
mod scenarios;
mod servers;
mod stats;
mod timeline;

use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    let args = cli::Args::parse();
    args.check()?;
    stats::start_clock();
    epoch_bench::until_interrupted(scenarios::run(&args)).await
}
