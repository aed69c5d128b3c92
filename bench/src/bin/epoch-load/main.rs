//! `epoch-load`: the load tool of the gateway, with nats-server's own WebSocket listener as the baseline.
//!
//! One command runs one scenario end to end. The tool starts its own processes (a JetStream nats-server
//! and the release `epoch-gateway` for the gateway run; a second nats-server with a `websocket` block for
//! the baseline run), opens the sockets from this process (its own open-file limit, several `127.0.0.x`
//! source addresses so that ports never run out), publishes through NATS, and reports as text and JSON:
//! connect rate, deliveries per second, publish → receive latency percentiles (a timestamp in every
//! payload), the server's RSS and CPU from `/proc`, and errors. Every child is killed on exit.
//!
//! - Gateway sockets speak Phoenix V2 like phoenix.js: an authenticated socket per user `1..=N`, each joining
//!   `user:public`, `user:role` and `user:<id>`, with a heartbeat every 30 s.
//! - Baseline sockets speak the NATS text protocol over WebSocket: `CONNECT`, then `SUB` to the equivalent
//!   subjects `<prefix>.user.public`, `<prefix>.user.role`, `<prefix>.user.<id>`, then `PING`; the `PONG`
//!   plays the part of the join replies. Server `PING`s are answered with `PONG`.
//!
//! The same publisher (async-nats, open-loop at the offered rate) feeds both, and the same receive path
//! (find `"t":` in the frame, subtract from now) times both, so the ratio compares the servers.
//!
//! Scenarios: `idle`, `broadcast`, `broadcast-latency`, `per-user`, `reconnect`, `is-online` (nats-server
//! has no `is_online`: its baseline is the control, `PING`s where the gateway gets heartbeats) and `soak`
//! (gateway only in `scripts/bench.sh`); and, on the gateway alone, the delivery scenarios of the event
//! stream (CONTRACT §8): `recovery-storm` (an instance killed under its sockets, which rejoin another with
//! `since`; the run fails on any event lost or duplicated) and `scale-out` (what each of 1, 2, 4 instances
//! receives from NATS with interest-based ingress). `scripts/bench.sh` runs them all at the sizes of
//! docs/benchmarks.md; `scripts/bench.sh --smoke` runs them small, for CI.
//!
//! # Layout
//! - [`cli`]: the command line.
//! - [`clients`]: the sockets, [`clients::phoenix`] for the gateway and [`clients::nats_ws`] for the
//!   baseline, each held by a task that times what arrives.
//! - [`stats`]: what the socket tasks record, latency histograms and percentiles, `/proc` samples.
//! - [`scenarios`]: one module per scenario, on the run they share (servers, sockets, publisher).
//! - [`report`]: the typed report (JSON) and the headline table.

mod cli;
mod clients;
mod report;
mod scenarios;
mod stats;

use anyhow::Result;
use clap::Parser;

#[tokio::main]
async fn main() -> Result<()> {
    let args = cli::Args::parse();
    args.check()?;
    stats::start_clock();
    epoch_bench::until_interrupted(scenarios::run(&args)).await
}
