//! `reconnect`: N sockets open, all dropped at once, reopened with 3 joins each; the time from the drop
//! until the last socket has its 3 ok replies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::report::{Headlines, Opened};
use crate::stats::{Stats, sample};

/// Pause between opening the sockets and dropping them.
const BEFORE_DROP: Duration = Duration::from_secs(1);

pub(super) struct Reconnect;

/// The report's socket figures are those of the second opening; these are of the first.
#[derive(Serialize)]
pub(super) struct ReconnectFigures {
    first_open: Opened,
    rejoined_all_secs: f64,
    rejoined: u64,
}

impl Measure for Reconnect {
    type Figures = ReconnectFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<ReconnectFigures>> {
        let stats = Arc::new(Stats::new(args.sockets));
        let held = target.open(args, &stats).await?;
        let first_open = Opened::of(&held);
        tokio::time::sleep(BEFORE_DROP).await;
        let start = sample(target.pid)?;
        let dropped_at = Instant::now();
        held.drop_all().await;
        let again = target.open(args, &stats).await?;
        let all_joined = dropped_at.elapsed().as_secs_f64();
        println!(
            "  dropped and re-joined {} sockets (3 joins each) in {all_joined:.2} s",
            again.opened
        );
        let figures = ReconnectFigures {
            first_open,
            rejoined_all_secs: all_joined,
            rejoined: again.opened,
        };
        target.finish(again, figures, &stats, start).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, ReconnectFigures>) {
        rows.judged(
            format!(
                "reconnect storm: {} sockets all re-joined (s)",
                args.sockets
            ),
            |r| r.figures.rejoined_all_secs,
            "< 3 s",
            |g, _| g < 3.0,
        );
    }
}
