//! What the benchmark programs of epoch-gateway share. The programs (`src/bin/`):
//!
//! - `epoch-load`: the load tool, the gateway against nats-server's own WebSocket listener and against
//!   `bare_server` in the same run (docs/benchmarks.md, `scripts/bench.sh`);
//! - `bare_server`: the lower bound `epoch-load` measures the gateway against, delivery and nothing else;
//! - `presence_bench`: what cluster-wide presence costs and how fast it answers (docs/presence-benchmark.md,
//!   `scripts/bench-presence.sh`);
//! - `tracing_overhead`: broadcast fan-out with trace export off and sampled out (docs/tracing-overhead.md).
//!
//! Each starts its own nats-server and gateways through `epoch-testkit`, and finds the release gateway next
//! to its own executable (`target/release/epoch-gateway`, built by `cargo build --release`).

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

pub mod rng;

/// Runs `work` to its end, or until Ctrl-C or SIGTERM: then `work` is dropped, and with it every process
/// and temporary directory it holds.
pub async fn until_interrupted(work: impl Future<Output = Result<()>>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = terminate.recv() => anyhow::bail!("terminated"),
    }
}

/// Writes a report as pretty JSON, creating its directory when needed.
pub fn write_json(path: &Path, report: &impl Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")?;
    Ok(())
}

/// CPUs this process may use (0 when unknown), recorded with every report.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}
