//! Broadcasts on `user.public` to every socket.
//!
//! - `broadcast`: the offered rate starts at `--start-rate` and is multiplied by `--step-factor` each
//!   `--step-secs` step. A step's deliveries/s = all deliveries of the step ÷ time until the last of them
//!   arrived (a server that falls behind pays for its backlog). *Saturated* = the best step; *sustained* =
//!   the best step that delivered ≥ 90 % of the offer.
//! - `broadcast-latency`: 1 message/s for `--secs`; for each message the latency of the last socket to get
//!   it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::publish::{drain, public_subject, publish};
use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::report::Headlines;
use crate::stats::{Latency, cpu_percent, latency, sample, sample_self};

/// A step whose backlog takes longer than this to drain ends the stepping (deep overload).
const DRAIN_CAP: Duration = Duration::from_secs(15);
/// A step is "sustained" when at least this share of the offered deliveries/s was delivered.
const SUSTAINED: f64 = 0.9;
/// A step "adds nothing" when it delivers less than this times the best step so far.
const GROWTH: f64 = 1.05;
/// Steps in a row that add nothing before the stepping stops.
const FLAT_STEPS: u32 = 2;
/// broadcast-latency: how long the last messages may take to arrive.
const LATENCY_DRAIN_CAP: Duration = Duration::from_secs(10);

pub(super) struct Broadcast;

#[derive(Serialize)]
pub(super) struct BroadcastFigures {
    saturated_deliveries_per_sec: f64,
    sustained_deliveries_per_sec: f64,
    steps: Vec<Step>,
}

/// One offered rate.
#[derive(Serialize)]
struct Step {
    rate_msgs_per_sec: f64,
    offered_deliveries_per_sec: f64,
    deliveries_per_sec: f64,
    latency: Latency,
    server_cpu_percent: f64,
    load_tool_cpu_percent: f64,
    drain_secs: f64,
    closes_so_far: u64,
}

impl Measure for Broadcast {
    type Figures = BroadcastFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<BroadcastFigures>> {
        let (stats, held, start) = target.start(args).await?;
        let n = held.opened as f64;
        let subject = public_subject();
        let (mut steps, mut best, mut flat, mut seq) = (Vec::new(), 0.0f64, 0, 0);
        let mut sustained = 0.0f64;
        let mut rate = args.start_rate;
        for _ in 0..args.max_steps {
            let hist = stats.latency.snapshot();
            let count = stats.delivered.load(Ordering::Relaxed);
            let from = sample(target.pid)?;
            let tool_from = sample_self()?;
            let sent = publish(&target.client, rate, args.step_secs, seq, |_| {
                subject.clone()
            })
            .await?;
            let to = sample(target.pid)?;
            let tool_cpu = cpu_percent(tool_from, sample_self()?);
            let published = from.at.elapsed();
            // Every delivery of the step's messages, over the time until the last one arrived: a server that
            // falls behind the offered rate pays for its backlog in this figure.
            let last_delivery = drain(&stats, DRAIN_CAP).await;
            let secs = last_delivery
                .duration_since(from.at)
                .as_secs_f64()
                .max(args.step_secs);
            let delivered = (stats.delivered.load(Ordering::Relaxed) - count) as f64 / secs;
            let drain_secs = last_delivery
                .duration_since(from.at)
                .saturating_sub(published)
                .as_secs_f64();
            seq += sent;
            let lat = latency(&hist, &stats.latency.snapshot());
            let offered = rate * n;
            let server_cpu = cpu_percent(from, to);
            println!(
                "  offered {rate:>7.1} msg/s = {offered:>9.0} deliveries/s → {delivered:>9.0}/s, p50 {:.1} ms p99 {:.1} ms, server cpu {server_cpu:.0} %, tool cpu {tool_cpu:.0} %, drained in {drain_secs:.1} s",
                lat.p50_ms, lat.p99_ms,
            );
            steps.push(Step {
                rate_msgs_per_sec: rate,
                offered_deliveries_per_sec: offered,
                deliveries_per_sec: delivered,
                latency: lat,
                server_cpu_percent: server_cpu,
                load_tool_cpu_percent: tool_cpu,
                drain_secs,
                closes_so_far: stats.close_count(),
            });
            // Saturated: steps in a row that add little to the best figure, or sockets being dropped, or a
            // backlog that took longer than the step itself to drain.
            if delivered < best * GROWTH {
                flat += 1;
            } else {
                flat = 0;
            }
            best = best.max(delivered);
            if delivered >= SUSTAINED * offered {
                sustained = sustained.max(delivered);
            }
            if flat >= FLAT_STEPS || stats.close_count() > 0 || drain_secs > args.step_secs {
                break;
            }
            rate *= args.step_factor;
        }
        let figures = BroadcastFigures {
            saturated_deliveries_per_sec: best,
            sustained_deliveries_per_sec: sustained,
            steps,
        };
        target.finish(held, figures, &stats, start).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, BroadcastFigures>) {
        rows.judged(
            format!("saturated broadcast deliveries/s, {} sockets", args.sockets),
            |r| r.figures.saturated_deliveries_per_sec,
            "≥ 3× baseline",
            |_, ratio| ratio.is_some_and(|r| r >= 3.0),
        );
        rows.info(
            "  … highest step delivering ≥ 90 % of offered (deliveries/s)",
            |r| r.figures.sustained_deliveries_per_sec,
        );
    }
}

pub(super) struct BroadcastLatency;

#[derive(Serialize)]
pub(super) struct BroadcastLatencyFigures {
    messages: u64,
    messages_reaching_every_socket: usize,
    last_socket_p50_ms: f64,
    last_socket_p99_ms: f64,
    last_socket_max_ms: f64,
    every_delivery: Latency,
}

impl Measure for BroadcastLatency {
    type Figures = BroadcastLatencyFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<BroadcastLatencyFigures>> {
        let (stats, held, start) = target.start(args).await?;
        let hist = stats.latency.snapshot();
        let subject = public_subject();
        let messages = publish(&target.client, 1.0, args.secs, 0, |_| subject.clone()).await?;
        drain(&stats, LATENCY_DRAIN_CAP).await;
        let reached: Vec<(u64, u64)> = (0..messages).map(|seq| stats.reached(seq)).collect();
        let complete = reached
            .iter()
            .filter(|&&(_, sockets)| sockets >= held.opened)
            .count();
        let mut last: Vec<u64> = reached.iter().map(|&(us, _)| us).collect();
        last.sort_unstable();
        let pick = |q: f64| {
            let rank = ((q * last.len() as f64).ceil() as usize).clamp(1, last.len().max(1));
            last.get(rank - 1)
                .map_or(f64::NAN, |&us| us as f64 / 1000.0)
        };
        let figures = BroadcastLatencyFigures {
            messages,
            messages_reaching_every_socket: complete,
            last_socket_p50_ms: pick(0.5),
            last_socket_p99_ms: pick(0.99),
            last_socket_max_ms: pick(1.0),
            every_delivery: latency(&hist, &stats.latency.snapshot()),
        };
        println!(
            "  {messages} messages, {complete} reached all {} sockets; last socket p50 {:.1} ms p99 {:.1} ms",
            held.opened, figures.last_socket_p50_ms, figures.last_socket_p99_ms
        );
        target.finish(held, figures, &stats, start).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, BroadcastLatencyFigures>) {
        rows.judged(
            format!("1 msg/s to {} sockets: last socket p99 (ms)", args.sockets),
            |r| r.figures.last_socket_p99_ms,
            "≤ 200 ms",
            |g, _| g <= 200.0,
        );
    }
}
