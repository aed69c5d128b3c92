//! `idle`: N sockets opened and held idle. Per measurement (`--repeats`, each on a turn of its own,
//! alternated with the other targets'): the server's RSS after opening N sockets and `--settle-secs`, minus
//! its RSS before its first socket, divided by N; the same for the nats-server behind it, reported beside
//! (the gateway's presence and event stream live there). The deltas are signed: a process that shrinks shows
//! a negative figure, never a clamped 0. The figure is the median of the measurements.
//!
//! Every measurement but the last drops its sockets and leaves the server `--settle-secs` before its turn
//! ends; the last keeps them for the final sample. A later measurement's figure includes what the earlier
//! ones left behind (an allocator keeps what it freed); the report also gives each one's growth from the
//! start of its own turn.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::driver::Phase;
use crate::report::Headlines;
use crate::stats::{Stats, median, mib, sample};

/// Share of `--settle-secs` left to a fresh server before its RSS is read.
const SETTLE_BEFORE: f64 = 1.0 / 3.0;

pub(super) struct Idle;

#[derive(Serialize)]
pub(super) struct IdleFigures {
    /// Before the first socket.
    rss_before_mib: f64,
    backing_nats_rss_before_mib: Option<f64>,
    /// The median of the measurements.
    kib_per_socket: f64,
    backing_nats_kib_per_socket: Option<f64>,
    measurements: Vec<Measurement>,
}

/// One opening of N sockets.
#[derive(Serialize)]
struct Measurement {
    sockets: u64,
    rss_mib: f64,
    /// From the server's RSS before its first socket.
    kib_per_socket: f64,
    /// From its RSS at the start of this measurement's turn.
    kib_per_socket_since_turn_start: f64,
    backing_nats_rss_mib: Option<f64>,
    backing_nats_kib_per_socket: Option<f64>,
}

/// RSS of the server and of its nats-server, in bytes.
fn rss(target: &Target) -> Result<(u64, Option<u64>)> {
    let backing = target
        .backing_pid
        .map(|pid| sample(pid).map(|s| s.rss))
        .transpose()?;
    Ok((sample(target.pid)?.rss, backing))
}

/// KiB per socket that RSS grew (or shrank) by from `before` to `after`.
fn kib_per_socket(before: u64, after: u64, sockets: u64) -> f64 {
    (after as i64 - before as i64) as f64 / sockets.max(1) as f64 / 1024.0
}

impl Measure for Idle {
    type Figures = IdleFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<IdleFigures>> {
        let settle = Duration::from_secs_f64(args.settle_secs);
        let before = target
            .turn(Phase::Setup, async {
                tokio::time::sleep(settle.mul_f64(SETTLE_BEFORE)).await;
                rss(target)
            })
            .await?;
        let stats = Arc::new(Stats::new(args.sockets));
        let (rounds, mut measurements, mut kept) = (args.rounds(), Vec::new(), None);
        for round in 1..=rounds {
            let (measurement, held) = target
                .turn(Phase::Measured, async {
                    let turn_start = rss(target)?.0;
                    let held = target.open(args, &stats).await?;
                    tokio::time::sleep(settle).await;
                    let after = rss(target)?;
                    let measurement = Measurement {
                        sockets: held.opened,
                        rss_mib: mib(after.0),
                        kib_per_socket: kib_per_socket(before.0, after.0, held.opened),
                        kib_per_socket_since_turn_start: kib_per_socket(
                            turn_start,
                            after.0,
                            held.opened,
                        ),
                        backing_nats_rss_mib: after.1.map(mib),
                        backing_nats_kib_per_socket: before
                            .1
                            .zip(after.1)
                            .map(|(b, a)| kib_per_socket(b, a, held.opened)),
                    };
                    println!(
                        "  measurement {round}/{rounds}: {:.2} KiB per socket ({:.2} since its turn began); its nats-server {}",
                        measurement.kib_per_socket,
                        measurement.kib_per_socket_since_turn_start,
                        measurement
                            .backing_nats_kib_per_socket
                            .map_or("—".to_owned(), |k| format!("{k:.2} KiB per socket")),
                    );
                    if round < rounds {
                        held.drop_all().await;
                        tokio::time::sleep(settle).await;
                        return Ok((measurement, None));
                    }
                    Ok((measurement, Some(held)))
                })
                .await?;
            measurements.push(measurement);
            kept = held;
        }
        let held = kept.context("--repeats is at least 1")?;
        let backing: Vec<f64> = measurements
            .iter()
            .filter_map(|m| m.backing_nats_kib_per_socket)
            .collect();
        let figures = IdleFigures {
            rss_before_mib: mib(before.0),
            backing_nats_rss_before_mib: before.1.map(mib),
            kib_per_socket: median(
                &measurements
                    .iter()
                    .map(|m| m.kib_per_socket)
                    .collect::<Vec<_>>(),
            ),
            backing_nats_kib_per_socket: (!backing.is_empty()).then(|| median(&backing)),
            measurements,
        };
        target.finish(held, figures, &stats).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, IdleFigures>) {
        rows.judged(
            format!("RSS per idle socket (KiB), {} sockets", args.sockets),
            |r| r.figures.kib_per_socket,
            "≤ 6 KiB",
            |g| g <= 6.0,
        );
        rows.own("  … its nats-server's RSS per idle socket (KiB)", |r| {
            r.figures.backing_nats_kib_per_socket.unwrap_or(f64::NAN)
        });
    }
}
