//! `idle`: RSS after opening N sockets and settling, minus RSS before connecting, divided by N.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::report::Headlines;
use crate::stats::{Stats, mib, sample};

pub(super) struct Idle;

#[derive(Serialize)]
pub(super) struct IdleFigures {
    rss_before_mib: f64,
    kib_per_socket: f64,
}

impl Measure for Idle {
    type Figures = IdleFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<IdleFigures>> {
        tokio::time::sleep(Duration::from_secs_f64(args.settle_secs / 3.0)).await;
        let before = sample(target.pid)?;
        let stats = Arc::new(Stats::new(args.sockets));
        let held = target.open(args, &stats).await?;
        tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
        let after = sample(target.pid)?;
        let per_socket = after.rss.saturating_sub(before.rss) as f64 / held.opened.max(1) as f64;
        let figures = IdleFigures {
            rss_before_mib: mib(before.rss),
            kib_per_socket: per_socket / 1024.0,
        };
        target.finish(held, figures, &stats, before).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, IdleFigures>) {
        rows.judged(
            format!("RSS per idle socket (KiB), {} sockets", args.sockets),
            |r| r.figures.kib_per_socket,
            "≤ 8 KiB",
            |g, _| g <= 8.0,
        );
    }
}
