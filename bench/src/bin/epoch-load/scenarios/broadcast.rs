//! Broadcasts on `user.public` to every socket.
//!
//! - `broadcast`: a warm-up step at `--start-rate` (reported apart, never counted), then the offered rate
//!   starts at `--start-rate` and is multiplied by `--step-factor` each `--step-secs` step. A step's
//!   deliveries/s = the step's messages received, each socket's counted by message number (each once), ÷
//!   the time until the last of them arrived (a server that falls behind pays for its backlog). A step
//!   *kept up* when no socket was closed, at least [`KEPT_UP_DELIVERED_PERCENT`] of its deliveries (its
//!   messages × the sockets held) arrived, and its p99 was under [`KEPT_UP_P99_MS`]; the figure is the
//!   best step that kept up, with every step in the report (closes, delivered %, missing, p99), so that
//!   no step that dropped sockets or messages can be the figure.
//! - `broadcast-latency`: 1 message/s for `--secs` (per repeat, `--repeats` alternated with the other
//!   targets'); for each message the latency of the last socket to get it, pooled over the repeats.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::publish::{drain, public_subject, publish};
use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::clients::Held;
use crate::driver::Phase;
use crate::report::Headlines;
use crate::stats::{Latency, Stats, cpu_percent, latency, sample, sample_self};

/// A step whose backlog takes longer than this to drain ends the stepping (deep overload).
const DRAIN_CAP: Duration = Duration::from_secs(15);
/// A step kept up only when at least this share (%) of its deliveries arrived.
const KEPT_UP_DELIVERED_PERCENT: f64 = 99.9;
/// A step kept up only when its p99 publish → receive latency was under this.
const KEPT_UP_P99_MS: f64 = 1000.0;
/// A step "adds nothing" when it delivers less than this times the best step so far.
const GROWTH: f64 = 1.05;
/// Steps in a row that add nothing before the stepping stops.
const FLAT_STEPS: u32 = 2;
/// broadcast-latency: how long the last messages may take to arrive.
const LATENCY_DRAIN_CAP: Duration = Duration::from_secs(10);

pub(super) struct Broadcast;

#[derive(Serialize)]
pub(super) struct BroadcastFigures {
    /// The best step that kept up (none: NaN, `null` in JSON).
    best_kept_up_deliveries_per_sec: f64,
    best_kept_up_rate_msgs_per_sec: f64,
    best_kept_up_p99_ms: f64,
    /// The first step, at `--start-rate`: it warms the server and the sockets up and never counts.
    warmup_step: Step,
    steps: Vec<Step>,
}

/// One offered rate.
#[derive(Serialize)]
struct Step {
    rate_msgs_per_sec: f64,
    messages: u64,
    offered_deliveries_per_sec: f64,
    deliveries_per_sec: f64,
    /// Of the step's messages × the sockets held: the share that arrived, each socket's counted by
    /// message number; what did not, and on how many sockets.
    delivered_percent: f64,
    missing_deliveries: u64,
    sockets_missing_any: u64,
    most_missing_on_a_socket: u64,
    latency: Latency,
    closes_in_step: u64,
    closes_so_far: u64,
    /// No socket closed so far, ≥ [`KEPT_UP_DELIVERED_PERCENT`] delivered, p99 under [`KEPT_UP_P99_MS`].
    kept_up: bool,
    server_cpu_percent: f64,
    load_tool_cpu_percent: f64,
    drain_secs: f64,
}

impl Step {
    fn print(&self, label: &str) {
        println!(
            "  {label}offered {:>7.1} msg/s = {:>9.0} deliveries/s → {:>9.0}/s, {:.3} % delivered ({} missing on {} sockets), p50 {:.1} ms p99 {:.1} ms, {} closed, server cpu {:.0} %, tool cpu {:.0} %, drained in {:.1} s: {}",
            self.rate_msgs_per_sec,
            self.offered_deliveries_per_sec,
            self.deliveries_per_sec,
            self.delivered_percent,
            self.missing_deliveries,
            self.sockets_missing_any,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.closes_in_step,
            self.server_cpu_percent,
            self.load_tool_cpu_percent,
            self.drain_secs,
            if self.kept_up {
                "kept up"
            } else {
                "did not keep up"
            },
        );
    }
}

/// One step: `rate` messages/s on user.public for `--step-secs`, numbered from `seq`, then until the
/// deliveries drain; what each socket of `held` received of it.
async fn step(
    args: &Args,
    target: &Target,
    stats: &Stats,
    held: &Held,
    rate: f64,
    seq: u64,
) -> Result<Step> {
    stats.count_from(seq);
    let received_before = stats.socket_counts();
    let closes_before = stats.close_count();
    let hist = stats.latency.snapshot();
    let from = sample(target.pid)?;
    let tool_from = sample_self()?;
    let subject = public_subject();
    let sent = publish(&target.client, rate, args.step_secs, seq, |_| {
        subject.clone()
    })
    .await?;
    let to = sample(target.pid)?;
    let tool_cpu = cpu_percent(tool_from, sample_self()?);
    let published = from.at.elapsed();
    // Every delivery of the step's messages, over the time until the last one arrived: a server that
    // falls behind the offered rate pays for its backlog in this figure.
    let last_delivery = drain(stats, DRAIN_CAP).await;
    let secs = last_delivery
        .duration_since(from.at)
        .as_secs_f64()
        .max(args.step_secs);
    let drain_secs = last_delivery
        .duration_since(from.at)
        .saturating_sub(published)
        .as_secs_f64();
    let received_after = stats.socket_counts();
    let missing: Vec<u64> = held
        .indices
        .iter()
        .map(|&i| {
            let i = i as usize;
            sent.saturating_sub(received_after[i] - received_before[i])
        })
        .collect();
    let expected = sent * held.indices.len() as u64;
    let missing_deliveries: u64 = missing.iter().sum();
    let delivered = expected - missing_deliveries;
    let delivered_percent = if expected == 0 {
        100.0
    } else {
        100.0 * delivered as f64 / expected as f64
    };
    let lat = latency(&hist, &stats.latency.snapshot());
    let closes_so_far = stats.close_count();
    Ok(Step {
        rate_msgs_per_sec: rate,
        messages: sent,
        offered_deliveries_per_sec: rate * held.opened as f64,
        deliveries_per_sec: delivered as f64 / secs,
        delivered_percent,
        missing_deliveries,
        sockets_missing_any: missing.iter().filter(|&&m| m > 0).count() as u64,
        most_missing_on_a_socket: missing.iter().copied().max().unwrap_or(0),
        latency: lat,
        closes_in_step: closes_so_far - closes_before,
        closes_so_far,
        // NaN (no delivery at all) is not under the bound.
        kept_up: closes_so_far == 0
            && delivered_percent >= KEPT_UP_DELIVERED_PERCENT
            && lat.p99_ms < KEPT_UP_P99_MS,
        server_cpu_percent: cpu_percent(from, to),
        load_tool_cpu_percent: tool_cpu,
        drain_secs,
    })
}

impl Measure for Broadcast {
    type Figures = BroadcastFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<BroadcastFigures>> {
        let (stats, held) = target.start(args).await?;
        let mut seq = 0;
        let warmup = step(args, target, &stats, &held, args.start_rate, seq);
        let warmup_step = target.turn(Phase::Setup, warmup).await?;
        seq += warmup_step.messages;
        warmup_step.print("warm-up: ");
        let (mut steps, mut best, mut flat) = (Vec::new(), 0.0f64, 0);
        let mut rate = args.start_rate;
        // A warm-up that closed sockets leaves nothing to step on.
        let steps_left = if warmup_step.closes_so_far > 0 {
            0
        } else {
            args.max_steps
        };
        for _ in 0..steps_left {
            let step = target
                .turn(
                    Phase::Measured,
                    step(args, target, &stats, &held, rate, seq),
                )
                .await?;
            seq += step.messages;
            step.print("");
            // Saturated: steps in a row that add little to the best figure, or sockets being dropped, or
            // a backlog that took longer than the step itself to drain.
            if step.deliveries_per_sec < best * GROWTH {
                flat += 1;
            } else {
                flat = 0;
            }
            best = best.max(step.deliveries_per_sec);
            let saturated =
                flat >= FLAT_STEPS || step.closes_so_far > 0 || step.drain_secs > args.step_secs;
            steps.push(step);
            if saturated {
                break;
            }
            rate *= args.step_factor;
        }
        let best = steps
            .iter()
            .filter(|s| s.kept_up)
            .max_by(|a, b| a.deliveries_per_sec.total_cmp(&b.deliveries_per_sec));
        match best {
            Some(best) => println!(
                "  best step that kept up: {:.1} msg/s, {:.0} deliveries/s, p99 {:.1} ms",
                best.rate_msgs_per_sec, best.deliveries_per_sec, best.latency.p99_ms
            ),
            None => println!("  no step kept up"),
        }
        let figures = BroadcastFigures {
            best_kept_up_deliveries_per_sec: best.map_or(f64::NAN, |s| s.deliveries_per_sec),
            best_kept_up_rate_msgs_per_sec: best.map_or(f64::NAN, |s| s.rate_msgs_per_sec),
            best_kept_up_p99_ms: best.map_or(f64::NAN, |s| s.latency.p99_ms),
            warmup_step,
            steps,
        };
        target.finish(held, figures, &stats).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, BroadcastFigures>) {
        rows.against_bare(
            format!(
                "broadcast to {} sockets: deliveries/s of the best step that kept up",
                args.sockets
            ),
            |r| r.figures.best_kept_up_deliveries_per_sec,
            "≥ 0.95× bare",
            |_, ratio| ratio >= 0.95,
        );
        rows.info("  … p99 of that step (ms)", |r| {
            r.figures.best_kept_up_p99_ms
        });
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
    last_socket_p99_ms_per_repeat: Vec<f64>,
    every_delivery: Latency,
}

/// The nearest-rank `q` quantile of sorted microseconds, in ms (NaN when there are none).
fn quantile_ms(sorted_us: &[u64], q: f64) -> f64 {
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len().max(1));
    sorted_us
        .get(rank - 1)
        .map_or(f64::NAN, |&us| us as f64 / 1000.0)
}

impl Measure for BroadcastLatency {
    type Figures = BroadcastLatencyFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<BroadcastLatencyFigures>> {
        let (stats, held) = target.start(args).await?;
        let hist = stats.latency.snapshot();
        let subject = public_subject();
        let (mut seq, mut complete, mut last, mut per_repeat) = (0, 0, Vec::new(), Vec::new());
        for _ in 0..args.rounds() {
            let sent = target
                .turn(Phase::Measured, async {
                    let sent =
                        publish(&target.client, 1.0, args.secs, seq, |_| subject.clone()).await?;
                    drain(&stats, LATENCY_DRAIN_CAP).await;
                    Ok(sent)
                })
                .await?;
            let reached: Vec<(u64, u64)> = (seq..seq + sent).map(|s| stats.reached(s)).collect();
            seq += sent;
            complete += reached
                .iter()
                .filter(|&&(_, sockets)| sockets >= held.opened)
                .count();
            let mut repeat: Vec<u64> = reached.iter().map(|&(us, _)| us).collect();
            repeat.sort_unstable();
            per_repeat.push(quantile_ms(&repeat, 0.99));
            last.extend(repeat);
        }
        last.sort_unstable();
        let figures = BroadcastLatencyFigures {
            messages: seq,
            messages_reaching_every_socket: complete,
            last_socket_p50_ms: quantile_ms(&last, 0.5),
            last_socket_p99_ms: quantile_ms(&last, 0.99),
            last_socket_max_ms: quantile_ms(&last, 1.0),
            last_socket_p99_ms_per_repeat: per_repeat,
            every_delivery: latency(&hist, &stats.latency.snapshot()),
        };
        println!(
            "  {seq} messages, {complete} reached all {} sockets; last socket p50 {:.1} ms p99 {:.1} ms",
            held.opened, figures.last_socket_p50_ms, figures.last_socket_p99_ms
        );
        target.finish(held, figures, &stats).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, BroadcastLatencyFigures>) {
        rows.judged(
            format!("1 msg/s to {} sockets: last socket p99 (ms)", args.sockets),
            |r| r.figures.last_socket_p99_ms,
            "≤ 200 ms",
            |g| g <= 200.0,
        );
    }
}
