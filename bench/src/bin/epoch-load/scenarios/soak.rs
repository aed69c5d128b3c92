//! `soak` (gateway only in `scripts/bench.sh`): per-user messages at `--per-user-rate` for `--secs`, in
//! windows of `--sample-secs`, each a turn of its own; after each window the server's RSS, open file
//! descriptors and threads.
//! Tokio tasks are not counted directly: each socket's task owns its descriptor, so a leaked session shows
//! as a descriptor that stays. Growth is judged from the end of the first window (warm) to the end of the
//! last.

use anyhow::Result;
use serde::Serialize;

use super::publish::{Window, per_user_window};
use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::driver::Phase;
use crate::report::Headlines;
use crate::stats::{fds_and_threads, mib, percentiles, sample};

/// Fewest windows: growth is measured between the first and the last.
const MIN_WINDOWS: f64 = 2.0;

pub(super) struct Soak;

#[derive(Serialize)]
pub(super) struct SoakFigures {
    soak: SoakSummary,
}

#[derive(Serialize)]
struct SoakSummary {
    windows: Vec<SoakWindow>,
    lost: u64,
    rss_change_percent: f64,
    fds_change: i64,
    threads_change: i64,
}

/// The server after one window.
#[derive(Serialize)]
struct SoakWindow {
    window: u64,
    /// Since the start of the measurement.
    secs: f64,
    sent: u64,
    delivered: u64,
    p99_ms: f64,
    rss_mib: f64,
    fds: u64,
    threads: u64,
}

impl Measure for Soak {
    type Figures = SoakFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<SoakFigures>> {
        let (stats, held) = target.start(args).await?;
        let start = std::time::Instant::now();
        let users = held.opened.max(1);
        let windows = (args.secs / args.sample_secs).ceil().max(MIN_WINDOWS) as u64;
        let (mut samples, mut seq, mut lost) = (Vec::new(), 0, 0);
        for window in 1..=windows {
            let measured = per_user_window(
                target,
                &stats,
                args.per_user_rate,
                args.sample_secs,
                seq,
                users,
            );
            let Window {
                sent,
                delivered,
                counts,
                ..
            } = target.turn(Phase::Measured, measured).await?;
            let p99_ms = percentiles(&counts).p99_ms;
            seq += sent;
            lost += sent.saturating_sub(delivered);
            let now = sample(target.pid)?;
            let (fds, threads) = fds_and_threads(target.pid)?;
            let rss_mib = mib(now.rss);
            println!(
                "  window {window}/{windows}: {delivered} of {sent} delivered, p99 {p99_ms:.3} ms, RSS {rss_mib:.1} MiB, {fds} fds, {threads} threads",
            );
            samples.push(SoakWindow {
                window,
                secs: start.elapsed().as_secs_f64(),
                sent,
                delivered,
                p99_ms,
                rss_mib,
                fds,
                threads,
            });
        }
        let (first, last) = (&samples[0], &samples[samples.len() - 1]);
        let change = |from: u64, to: u64| to as i64 - from as i64;
        let summary = SoakSummary {
            lost,
            rss_change_percent: 100.0 * (last.rss_mib - first.rss_mib) / first.rss_mib,
            fds_change: change(first.fds, last.fds),
            threads_change: change(first.threads, last.threads),
            windows: samples,
        };
        let figures = SoakFigures { soak: summary };
        target.finish(held, figures, &stats).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, SoakFigures>) {
        rows.judged(
            format!(
                "soak: RSS change, end of first → last window (%), {} s",
                args.secs
            ),
            |r| r.figures.soak.rss_change_percent,
            "within ±10 %",
            |g| g.abs() <= 10.0,
        );
        rows.zero("  … open file descriptors change", |r| {
            r.figures.soak.fds_change as f64
        });
        rows.judged(
            "  … threads change",
            |r| r.figures.soak.threads_change as f64,
            "no growth",
            |g| g <= 0.0,
        );
        rows.zero("  … messages lost", |r| r.figures.soak.lost as f64);
    }
}
