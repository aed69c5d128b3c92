//! `is-online`: a warm-up window of per-user messages alone (reported, not counted), then `--repeats`
//! rounds (3 by default) of windows of `--secs` each, every window a turn of its own between the other
//! targets': per-user messages at `--per-user-rate` alone; then, for each of `--rates`, the same per-user
//! load while every socket sends a control frame N / rate seconds apart (a client frame and its reply, no
//! presence lookup: a heartbeat to the gateway and to the bare server, `PING` to nats-server), and, on the
//! gateway only, while every socket sends `is_online` about a random online user at the same rate. Odd
//! rounds run their windows in the reverse order. Per condition, the windows' latency counts are pooled and
//! each window's p99 is kept.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::publish::{RateTotals, WarmUp, in_round_order, per_user_window, warm_up};
use super::{Measure, Run, Target};
use crate::cli::Args;
use crate::clients::Held;
use crate::driver::Phase;
use crate::report::{Headlines, TargetReport};
use crate::stats::{
    Latency, Pooled, Stats, counts_between, cpu_percent, mean, percentiles, sample,
};

/// After a window, time for the answers still in flight to land in it.
const IN_FLIGHT: Duration = Duration::from_millis(500);

pub(super) struct IsOnline;

#[derive(Serialize)]
pub(super) struct IsOnlineFigures {
    rounds: u32,
    warm_up: WarmUp,
    per_user_alone: Latency,
    per_user_alone_p99_ms_per_window: Vec<f64>,
    per_user_alone_sent: u64,
    per_user_alone_delivered: u64,
    points: Vec<FramePoint>,
}

/// One offered rate of client frames, pooled over the rounds.
#[derive(Serialize)]
struct FramePoint {
    rate_frames_per_sec: f64,
    /// `heartbeats` (gateway, bare server) or `PINGs` (nats-server).
    control_frame: &'static str,
    control_frames_per_sec_sent: f64,
    control_round_trip: Latency,
    per_user_with_control: Latency,
    per_user_with_control_p99_ms_per_window: Vec<f64>,
    server_cpu_percent_with_control: f64,
    per_user_p99_ratio_control_to_alone: f64,
    /// The gateway's `is_online` windows (the other servers have no `is_online`).
    #[serde(flatten)]
    queries: Option<QueryPoint>,
}

#[derive(Serialize)]
struct QueryPoint {
    queries_per_sec_sent: f64,
    answers: Latency,
    answers_p99_ms_per_window: Vec<f64>,
    not_online: u64,
    per_user_with_queries: Latency,
    per_user_with_queries_p99_ms_per_window: Vec<f64>,
    per_user_sent: u64,
    per_user_delivered: u64,
    server_cpu_percent: f64,
    per_user_p99_ratio_queries_to_alone: f64,
}

/// One window: client frames at `rate`/s from all sockets alongside per-user messages.
struct QueryWindow {
    frames_per_sec: f64,
    /// Round trips of the replies: `is_online` answers, or the control frames' replies.
    answers: Vec<u64>,
    wrong: u64,
    sent: u64,
    delivered: u64,
    per_user: Vec<u64>,
    cpu_percent: f64,
}

/// What one offered rate of client frames gathered over the rounds, for queries or for control frames.
#[derive(Default)]
struct FrameLoad {
    per_user: Pooled,
    answers: Pooled,
    frames_per_sec: Vec<f64>,
    cpu_percent: Vec<f64>,
    wrong: u64,
    sent: u64,
    delivered: u64,
}

impl FrameLoad {
    fn add(&mut self, window: &QueryWindow) {
        self.per_user.add(&window.per_user);
        self.answers.add(&window.answers);
        self.frames_per_sec.push(window.frames_per_sec);
        self.cpu_percent.push(window.cpu_percent);
        self.wrong += window.wrong;
        self.sent += window.sent;
        self.delivered += window.delivered;
    }

    fn print_pooled(&self, rate: f64, what: &str) {
        println!(
            "  pooled, {rate:.0}/s offered: per-user p99 with {what} {:.3} ms (windows {:?}), replies p99 {:.3} ms",
            self.per_user.latency().p99_ms,
            self.per_user.window_p99_ms,
            self.answers.latency().p99_ms,
        );
    }
}

/// The windows of one round: the per-user load alone (`None`), then for each rate the control frames
/// (`true`) and `is_online` queries (`false`). Every target has the same windows, so that they alternate
/// window for window; a target without `is_online` passes its turn in the query windows.
fn round_order(round: u32, rates: usize) -> Vec<Option<(usize, bool)>> {
    let mut order = vec![None];
    for rate in 0..rates {
        order.push(Some((rate, true)));
        order.push(Some((rate, false)));
    }
    in_round_order(round, order)
}

/// Per-user messages at `--per-user-rate` while every socket sends a client frame, `rate` in all: the
/// control frame (`control`) or `is_online` queries.
async fn query_window(
    args: &Args,
    target: &Target,
    stats: &Stats,
    held: &Held,
    rate: f64,
    control: bool,
    seq: u64,
) -> Result<QueryWindow> {
    stats.query_heartbeats.store(control, Ordering::Relaxed);
    // Every socket sends once per period: N / rate seconds.
    let period = (held.opened as f64 / rate * 1e6) as u64;
    stats.query_period_us.send_replace(period.max(1));
    // The frames ramp up over one period (random phases), then per-user messages flow alongside; the rate
    // sent and the CPU are taken over that part only.
    tokio::time::sleep(Duration::from_micros(period)).await;
    let rtt = stats.query_rtt.snapshot();
    let (queries, wrong) = (
        stats.queries.load(Ordering::Relaxed),
        stats.query_wrong.load(Ordering::Relaxed),
    );
    let from = sample(target.pid)?;
    let users = held.opened.max(1);
    let window = per_user_window(target, stats, args.per_user_rate, args.secs, seq, users).await?;
    let to = sample(target.pid)?;
    let frames = stats.queries.load(Ordering::Relaxed) - queries;
    stats.query_period_us.send_replace(0);
    tokio::time::sleep(IN_FLIGHT).await;
    Ok(QueryWindow {
        frames_per_sec: frames as f64 / to.at.duration_since(from.at).as_secs_f64(),
        answers: counts_between(&rtt, &stats.query_rtt.snapshot()),
        wrong: stats.query_wrong.load(Ordering::Relaxed) - wrong,
        sent: window.sent,
        delivered: window.delivered,
        per_user: window.counts,
        cpu_percent: cpu_percent(from, to),
    })
}

impl Measure for IsOnline {
    type Figures = IsOnlineFigures;

    async fn run(args: &Args, target: &Target) -> Result<Run<IsOnlineFigures>> {
        let kind = target.endpoint.kind;
        // Only the gateway has is_online.
        let gateway = kind.is_gateway();
        let control = if kind.speaks_phoenix() {
            "heartbeats"
        } else {
            "PINGs"
        };
        let (stats, held) = target.start(args).await?;
        let users = held.opened.max(1);
        stats.query_users.store(users, Ordering::Relaxed);
        let warm_up = warm_up(target, &stats, args.per_user_rate, args.secs, users).await?;
        let mut alone = RateTotals::default();
        // Per rate: [control frames, queries].
        let mut loads: Vec<[FrameLoad; 2]> =
            args.rates.iter().map(|_| Default::default()).collect();
        let mut seq = warm_up.next_seq();
        let rounds = args.rounds();
        for round in 0..rounds {
            for window in round_order(round, args.rates.len()) {
                let label = format!("  round {}/{rounds}:", round + 1);
                if window.is_some_and(|(_, is_control)| !is_control) && !gateway {
                    target.turn(Phase::Setup, async { Ok(()) }).await?;
                    continue;
                }
                let Some((i, is_control)) = window else {
                    let window =
                        per_user_window(target, &stats, args.per_user_rate, args.secs, seq, users);
                    let w = target.turn(Phase::Measured, window).await?;
                    seq += w.sent;
                    println!(
                        "{label} per-user {} msg/s alone: {} of {} delivered, p99 {:.3} ms",
                        args.per_user_rate,
                        w.delivered,
                        w.sent,
                        percentiles(&w.counts).p99_ms
                    );
                    alone.add(&w);
                    continue;
                };
                let rate = args.rates[i];
                let window = query_window(args, target, &stats, &held, rate, is_control, seq);
                let w = target.turn(Phase::Measured, window).await?;
                seq += w.sent;
                let what = if is_control { control } else { "queries" };
                let a = percentiles(&w.answers);
                let wrong = if is_control {
                    String::new()
                } else {
                    format!(", {} not online", w.wrong)
                };
                let answers = format!(
                    "replies p50 {:.3} ms p99 {:.3} ms{wrong}; ",
                    a.p50_ms, a.p99_ms
                );
                println!(
                    "{label} {rate:.0} {what}/s offered ({:.0}/s sent): {answers}per-user p99 {:.3} ms ({} of {}), server cpu {:.0} %",
                    w.frames_per_sec,
                    percentiles(&w.per_user).p99_ms,
                    w.delivered,
                    w.sent,
                    w.cpu_percent,
                );
                loads[i][usize::from(!is_control)].add(&w);
            }
        }
        let alone_latency = alone.latency.latency();
        println!(
            "  pooled over {} rounds: per-user alone p99 {:.3} ms (windows {:?})",
            rounds, alone_latency.p99_ms, alone.latency.window_p99_ms
        );
        let mut points = Vec::new();
        for (&rate, [controls, queries]) in args.rates.iter().zip(loads) {
            controls.print_pooled(rate, control);
            let with_control = controls.per_user.latency();
            let queries = gateway.then(|| {
                queries.print_pooled(rate, "queries");
                let with_queries = queries.per_user.latency();
                QueryPoint {
                    queries_per_sec_sent: mean(&queries.frames_per_sec),
                    answers: queries.answers.latency(),
                    answers_p99_ms_per_window: queries.answers.window_p99_ms,
                    not_online: queries.wrong,
                    per_user_with_queries: with_queries,
                    per_user_with_queries_p99_ms_per_window: queries.per_user.window_p99_ms,
                    per_user_sent: queries.sent,
                    per_user_delivered: queries.delivered,
                    server_cpu_percent: mean(&queries.cpu_percent),
                    per_user_p99_ratio_queries_to_alone: with_queries.p99_ms / alone_latency.p99_ms,
                }
            });
            points.push(FramePoint {
                rate_frames_per_sec: rate,
                control_frame: control,
                control_frames_per_sec_sent: mean(&controls.frames_per_sec),
                control_round_trip: controls.answers.latency(),
                per_user_with_control: with_control,
                per_user_with_control_p99_ms_per_window: controls.per_user.window_p99_ms,
                server_cpu_percent_with_control: mean(&controls.cpu_percent),
                per_user_p99_ratio_control_to_alone: with_control.p99_ms / alone_latency.p99_ms,
                queries,
            });
        }
        let figures = IsOnlineFigures {
            rounds,
            warm_up,
            per_user_alone: alone_latency,
            per_user_alone_p99_ms_per_window: alone.latency.window_p99_ms,
            per_user_alone_sent: alone.sent,
            per_user_alone_delivered: alone.delivered,
            points,
        };
        target.finish(held, figures, &stats).await
    }

    fn headlines(args: &Args, rows: &mut Headlines<'_, IsOnlineFigures>) {
        rows.info(
            format!("per-user {} msg/s alone: p99 (ms)", args.per_user_rate),
            |r| r.figures.per_user_alone.p99_ms,
        );
        for (i, rate) in args.rates.iter().enumerate() {
            rows.own_judged(
                format!("is_online {rate} queries/s: p99 (ms)"),
                move |r| query(r, i, |q| q.answers.p99_ms),
                "< 2 ms",
                |g| g < 2.0,
            );
            rows.info(
                format!("  {rate} heartbeats (gateway, bare) / PINGs (nats)/s: reply p99 (ms)"),
                move |r| point(r, i).control_round_trip.p99_ms,
            );
            rows.own("  per-user p99 alongside the queries (ms)", move |r| {
                query(r, i, |q| q.per_user_with_queries.p99_ms)
            });
            rows.info(
                "  per-user p99 alongside heartbeats / PINGs (ms)",
                move |r| point(r, i).per_user_with_control.p99_ms,
            );
            // "No effect" is judged from the windows (docs/benchmarks.md), not from this ratio: one noisy
            // window of either condition moves a pooled p99 either way.
            rows.own("  … alongside the queries / alone", move |r| {
                query(r, i, |q| q.per_user_p99_ratio_queries_to_alone)
            });
            rows.info("  … alongside heartbeats / PINGs / alone", move |r| {
                point(r, i).per_user_p99_ratio_control_to_alone
            });
        }
    }
}

/// The figures of rate `i`.
fn point(r: &TargetReport<IsOnlineFigures>, i: usize) -> &FramePoint {
    &r.figures.points[i]
}

/// A query figure of rate `i`: NaN (no value) for the servers without `is_online`.
fn query(r: &TargetReport<IsOnlineFigures>, i: usize, figure: fn(&QueryPoint) -> f64) -> f64 {
    point(r, i).queries.as_ref().map_or(f64::NAN, figure)
}
