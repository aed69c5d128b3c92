//! `reconnect`: N sockets open; then per measurement (`--repeats`, each on a turn of its own, alternated
//! with the other targets'), all dropped at once and reopened with 3 joins each: the time from the drop
//! until the last socket has its 3 ok replies. The figure is the median of the measurements.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::driver::Phase;
use crate::report::{Headlines, Opened};
use crate::stats::{Stats, median};

/// Pause between opening the sockets and dropping them.
const BEFORE_DROP: Duration = Duration::from_secs(1);

pub(super) struct Reconnect;

/// The report's socket figures are those of the last opening; these are of the first.
#[derive(Serialize)]
pub(super) struct ReconnectFigures {
    first_open: Opened,
    /// The median of the measurements.
    rejoined_all_secs: f64,
    rejoined_all_secs_per_measurement: Vec<f64>,
    rejoined: u64,
}

impl Measure for Reconnect {
    type Figures = ReconnectFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<ReconnectFigures>> {
        let stats = Arc::new(Stats::new(args.sockets));
        let mut held = target
            .turn(Phase::Setup, async {
                let held = target.open(args, &stats).await?;
                tokio::time::sleep(BEFORE_DROP).await;
                Ok(held)
            })
            .await?;
        let first_open = Opened::of(&held);
        let mut secs = Vec::new();
        for _ in 0..args.rounds() {
            let (again, all_joined) = target
                .turn(Phase::Measured, async {
                    let dropped_at = Instant::now();
                    held.drop_all().await;
                    let again = target.open(args, &stats).await?;
                    Ok((again, dropped_at.elapsed().as_secs_f64()))
                })
                .await?;
            println!(
                "  dropped and re-joined {} sockets (3 joins each) in {all_joined:.2} s",
                again.opened
            );
            held = again;
            secs.push(all_joined);
        }
        let figures = ReconnectFigures {
            first_open,
            rejoined_all_secs: median(&secs),
            rejoined_all_secs_per_measurement: secs,
            rejoined: held.opened,
        };
        target.finish(held, figures, &stats).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, ReconnectFigures>) {
        rows.judged(
            format!(
                "reconnect storm: {} sockets all re-joined (s)",
                args.sockets
            ),
            |r| r.figures.rejoined_all_secs,
            "≤ 1.2 s",
            |g| g <= 1.2,
        );
    }
}
