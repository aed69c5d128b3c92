//! The publisher (async-nats, open loop at the offered rate, the same for every target), the wait for a
//! backlog to drain, and the window of per-user messages that the per-user, is-online, soak and
//! presence-feed scenarios are made of, with the warm-up window they start with (soak aside) and the
//! figures of one rate pooled over rounds.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use epoch_bench::rng::Rng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{PREFIX, Target};
use crate::driver::Phase;
use crate::stats::{
    Latency, Pooled, Stats, counts_between, cpu_percent, mean, percentiles, sample, sample_self,
    stamped_body,
};

/// A step is over when no delivery arrived for this long (polled every `DRAIN_POLL`).
const DRAIN_QUIET: Duration = Duration::from_millis(500);
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// Bound on the drain after a per-user window.
pub(super) const WINDOW_DRAIN_CAP: Duration = Duration::from_secs(10);
/// How often an open-loop schedule ([`paced`]) looks at the clock.
const PACE_TICK: Duration = Duration::from_millis(1);
/// Seed of the per-user windows' choice of users: every window sends to the same sequence of users.
const USERS_SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// Publishes at `rate` messages per second for `secs` (open loop: the schedule does not wait for the
/// servers), numbering messages from `first_seq`. `subject(k)` names the subject of message `k`.
pub(super) async fn publish(
    client: &async_nats::Client,
    rate: f64,
    secs: f64,
    first_seq: u64,
    subject: impl Fn(u64) -> String,
) -> Result<u64> {
    let total = messages(rate, secs);
    publish_until(
        client,
        rate,
        total,
        &CancellationToken::new(),
        first_seq,
        subject,
    )
    .await
}

/// The messages [`publish`] sends at `rate` for `secs`.
pub(super) fn messages(rate: f64, secs: f64) -> u64 {
    (rate * secs).round() as u64
}

/// [`publish`] of at most `total` messages, until `stop` is cancelled; returns how many were sent.
pub(super) async fn publish_until(
    client: &async_nats::Client,
    rate: f64,
    total: u64,
    stop: &CancellationToken,
    first_seq: u64,
    subject: impl Fn(u64) -> String,
) -> Result<u64> {
    let sent = paced(rate, total, stop, |k| {
        let seq = first_seq + k;
        client.publish(subject(seq), stamped_body(seq).into())
    })
    .await?;
    client.flush().await?;
    Ok(sent)
}

/// Does `step(k)` for `k` in `0..total` at `rate` a second, until `stop`; returns how many were done. Open
/// loop: the schedule does not wait for the servers, and a late tick catches up at once.
pub(super) async fn paced<E, Step>(
    rate: f64,
    total: u64,
    stop: &CancellationToken,
    mut step: impl FnMut(u64) -> Step,
) -> Result<u64>
where
    Step: Future<Output = Result<(), E>>,
    anyhow::Error: From<E>,
{
    let started = tokio::time::Instant::now();
    let mut done = 0;
    let mut tick = tokio::time::interval(PACE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while done < total && !stop.is_cancelled() {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(total);
        while done < due {
            step(done).await?;
            done += 1;
        }
    }
    Ok(done)
}

/// The subject of every broadcast.
pub(super) fn public_subject() -> String {
    format!("{PREFIX}.user.public")
}

/// Waits until no delivery arrives for `DRAIN_QUIET` (at most `cap`): the backlog of a step has drained.
/// Returns when the last delivery was seen (to within one poll).
pub(super) async fn drain(stats: &Stats, cap: Duration) -> Instant {
    let deadline = Instant::now() + cap;
    let mut last = stats.delivered.load(Ordering::Relaxed);
    let mut last_seen = Instant::now();
    while Instant::now() < deadline && last_seen.elapsed() < DRAIN_QUIET {
        tokio::time::sleep(DRAIN_POLL).await;
        let now = stats.delivered.load(Ordering::Relaxed);
        if now != last {
            (last, last_seen) = (now, Instant::now());
        }
    }
    last_seen
}

/// One window of per-user messages: what was sent and delivered, the deliveries' latency counts, and the CPU
/// of the server (of each of the servers sampled) and of this tool while publishing.
pub(super) struct Window {
    pub(super) sent: u64,
    pub(super) delivered: u64,
    pub(super) counts: Vec<u64>,
    pub(super) server_cpu: f64,
    pub(super) servers_cpu: Vec<f64>,
    pub(super) tool_cpu: f64,
}

/// Per-user messages at `rate` for `secs`, to uniformly random users `1..=users`, then until the
/// deliveries drain.
pub(super) async fn per_user_window(
    target: &Target,
    stats: &Stats,
    rate: f64,
    secs: f64,
    seq: u64,
    users: u64,
) -> Result<Window> {
    per_user_window_over(target, &[target.pid], stats, rate, secs, seq, users).await
}

/// [`per_user_window`] with the CPU of each of `servers` sampled (`server_cpu` is the first's).
pub(super) async fn per_user_window_over(
    target: &Target,
    servers: &[u32],
    stats: &Stats,
    rate: f64,
    secs: f64,
    seq: u64,
    users: u64,
) -> Result<Window> {
    let hist = stats.latency.snapshot();
    let count = stats.delivered.load(Ordering::Relaxed);
    let from = servers
        .iter()
        .map(|&pid| sample(pid))
        .collect::<Result<Vec<_>>>()?;
    let tool_from = sample_self()?;
    let rng = Mutex::new(Rng::seeded(USERS_SEED));
    let sent = publish(&target.client, rate, secs, seq, |_| {
        let user = rng.lock().expect("no panics under this lock").below(users) + 1;
        format!("{PREFIX}.user.{user}")
    })
    .await?;
    let servers_cpu = servers
        .iter()
        .zip(from)
        .map(|(&pid, from)| Ok(cpu_percent(from, sample(pid)?)))
        .collect::<Result<Vec<_>>>()?;
    let tool_cpu = cpu_percent(tool_from, sample_self()?);
    drain(stats, WINDOW_DRAIN_CAP).await;
    Ok(Window {
        sent,
        delivered: stats.delivered.load(Ordering::Relaxed) - count,
        counts: counts_between(&hist, &stats.latency.snapshot()),
        server_cpu: servers_cpu.first().copied().unwrap_or(f64::NAN),
        servers_cpu,
        tool_cpu,
    })
}

/// The first window after the sockets opened: it warms the server, its caches and the sockets up, and is
/// reported apart, never counted.
#[derive(Serialize)]
pub(super) struct WarmUp {
    rate_msgs_per_sec: f64,
    sent: u64,
    delivered: u64,
    latency: Latency,
}

/// A warm-up window of per-user messages at `rate` on a setup turn, messages numbered from 0.
pub(super) async fn warm_up(
    target: &Target,
    stats: &Stats,
    rate: f64,
    secs: f64,
    users: u64,
) -> Result<WarmUp> {
    let window = per_user_window(target, stats, rate, secs, 0, users);
    let w = target.turn(Phase::Setup, window).await?;
    Ok(WarmUp::of(rate, &w))
}

impl WarmUp {
    /// The warm-up that window `w`, at `rate`, was; printed.
    pub(super) fn of(rate: f64, w: &Window) -> Self {
        let warm_up = Self {
            rate_msgs_per_sec: rate,
            sent: w.sent,
            delivered: w.delivered,
            latency: percentiles(&w.counts),
        };
        println!(
            "  warm-up, {rate:.0} msg/s: {} of {} delivered, p99 {:.3} ms (not counted)",
            w.delivered, w.sent, warm_up.latency.p99_ms
        );
        warm_up
    }

    /// The number of the first message after it.
    pub(super) fn next_seq(&self) -> u64 {
        self.sent
    }
}

/// One per-user rate's windows over the rounds.
#[derive(Default)]
pub(super) struct RateTotals {
    pub(super) latency: Pooled,
    pub(super) sent: u64,
    pub(super) delivered: u64,
    pub(super) server_cpu: Vec<f64>,
    pub(super) tool_cpu: Vec<f64>,
}

/// One offered rate, pooled over the rounds.
#[derive(Serialize)]
pub(super) struct RatePoint {
    rate_msgs_per_sec: f64,
    sent: u64,
    delivered: u64,
    pub(super) lost: u64,
    pub(super) latency: Latency,
    p99_ms_per_window: Vec<f64>,
    server_cpu_percent: f64,
    load_tool_cpu_percent: f64,
}

impl RatePoint {
    /// The windows at `rate`.
    pub(super) fn of(rate: f64, totals: RateTotals) -> Self {
        Self {
            rate_msgs_per_sec: rate,
            sent: totals.sent,
            delivered: totals.delivered,
            lost: totals.sent.saturating_sub(totals.delivered),
            latency: totals.latency.latency(),
            server_cpu_percent: mean(&totals.server_cpu),
            load_tool_cpu_percent: mean(&totals.tool_cpu),
            p99_ms_per_window: totals.latency.window_p99_ms,
        }
    }
}

impl RateTotals {
    pub(super) fn add(&mut self, window: &Window) {
        self.latency.add(&window.counts);
        self.sent += window.sent;
        self.delivered += window.delivered;
        self.server_cpu.push(window.server_cpu);
        self.tool_cpu.push(window.tool_cpu);
    }
}

/// Odd rounds run their windows in the reverse order, so that a drift over the run weighs on every
/// window alike.
pub(super) fn in_round_order<T>(round: u32, mut windows: Vec<T>) -> Vec<T> {
    if round % 2 == 1 {
        windows.reverse();
    }
    windows
}
