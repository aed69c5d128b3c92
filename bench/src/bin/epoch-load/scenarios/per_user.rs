//! `per-user`: a warm-up window at the first of `--rates` (reported, not counted), then at each of
//! `--rates`, `--secs` of messages to uniformly random users, each window a turn of its own between the
//! other targets'; percentiles over all deliveries. With `--repeats N` the rates run N times (odd rounds in
//! the reverse order) and each rate's deliveries are pooled, with every window's p99 kept. With
//! `--timeline`, every measured window is also recorded per 10 ms ([`crate::timeline`]).

use anyhow::Result;
use serde::Serialize;

use super::publish::{
    RatePoint, RateTotals, WarmUp, in_round_order, messages, per_user_window, warm_up,
};
use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::driver::Phase;
use crate::report::{Headlines, TargetReport};
use crate::stats::percentiles;
use crate::timeline::{self, Timeline};

pub(super) struct PerUser;

#[derive(Serialize)]
pub(super) struct PerUserFigures {
    rounds: u32,
    warm_up: WarmUp,
    points: Vec<RatePoint>,
    /// Where this target's timeline was written (`--timeline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    timeline: Option<String>,
}

impl Measure for PerUser {
    type Figures = PerUserFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<PerUserFigures>> {
        let (stats, held) = target.start(args).await?;
        let users = held.opened.max(1);
        let rounds = args.rounds();
        let mut per_rate: Vec<RateTotals> =
            args.rates.iter().map(|_| RateTotals::default()).collect();
        let warm_up = warm_up(target, &stats, args.rates[0], args.secs, users).await?;
        let mut timeline = args
            .timeline
            .as_ref()
            .map(|_| {
                let capacity = timeline::capacity(&args.rates, args.secs);
                Timeline::start(target, &stats, capacity)
            })
            .transpose()?;
        let mut seq = warm_up.next_seq();
        for round in 0..rounds {
            for i in in_round_order(round, (0..args.rates.len()).collect()) {
                let rate = args.rates[i];
                let window = per_user_window(target, &stats, rate, args.secs, seq, users);
                let (w, recorded) = match &timeline {
                    Some(timeline) => {
                        let recording = timeline.around(seq, messages(rate, args.secs), window);
                        let (w, recorded) = target.turn(Phase::Measured, recording).await?;
                        (w, Some(recorded))
                    }
                    None => (target.turn(Phase::Measured, window).await?, None),
                };
                seq += w.sent;
                let lat = percentiles(&w.counts);
                let label = if rounds > 1 {
                    format!(" (round {}/{rounds})", round + 1)
                } else {
                    String::new()
                };
                println!(
                    "  {rate:>7.0} msg/s{label}: {} of {} delivered, p50 {:.3} ms p99 {:.3} ms p999 {:.3} ms, server cpu {:.0} %, tool cpu {:.0} %",
                    w.delivered,
                    w.sent,
                    lat.p50_ms,
                    lat.p99_ms,
                    lat.p999_ms,
                    w.server_cpu,
                    w.tool_cpu
                );
                if let (Some(timeline), Some(recorded)) = (timeline.as_mut(), recorded) {
                    timeline.add(recorded, rate, round + 1);
                }
                per_rate[i].add(&w);
            }
        }
        let points = args
            .rates
            .iter()
            .zip(per_rate)
            .map(|(&rate, t)| RatePoint::of(rate, t))
            .collect();
        let timeline = match (&timeline, &args.timeline) {
            (Some(timeline), Some(path)) => Some(timeline.write(path)?.display().to_string()),
            _ => None,
        };
        let figures = PerUserFigures {
            rounds,
            warm_up,
            points,
            timeline,
        };
        target.finish(held, figures, &stats).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, PerUserFigures>) {
        for (i, rate) in args.rates.iter().enumerate() {
            let point = move |r: &TargetReport<PerUserFigures>| r.figures.points[i].latency;
            rows.info(format!("per-user {rate} msg/s: p50 (ms)"), move |r| {
                point(r).p50_ms
            });
            rows.against_nats(
                format!("per-user {rate} msg/s: p99 (ms)"),
                move |r| point(r).p99_ms,
                "≤ 1.0 ms and ≤ 1.5× nats-ws",
                |g, ratio| g <= 1.0 && ratio <= 1.5,
            );
            rows.judged(
                format!("per-user {rate} msg/s: p999 (ms)"),
                move |r| point(r).p999_ms,
                "≤ 3 ms",
                |g| g <= 3.0,
            );
        }
    }
}
